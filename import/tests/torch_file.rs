//! The PyTorch file reader against a plain `torch.save(state_dict)` file written by torch:
//! strided and offset views, half and bfloat16 storages, integer buffers, scalars.

#[path = "../../model/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;

use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use taming_import::torch_file::{RawData, TorchCheckpoint};

fn fixtures() -> PathBuf {
    common::fixtures_dir().join("torch")
}

#[test]
fn plain_state_dict_matches_torch_values() {
    let mut file = TorchCheckpoint::open(&fixtures().join("plain_state_dict.pt")).unwrap();
    let tensors = file.state_dict().unwrap();
    let bytes = std::fs::read(fixtures().join("plain_state_dict.expected.safetensors")).unwrap();
    let expected = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(tensors.len(), expected.len());
    for (name, view) in expected.tensors() {
        let ours = &tensors[&name];
        assert_eq!(ours.shape, view.shape(), "{name}");
        match (view.dtype(), &ours.data) {
            (Dtype::F32, RawData::F32(v)) => {
                let want: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                assert_eq!(v, &want, "{name}");
            }
            (Dtype::I64, RawData::I64(v)) => {
                let want: Vec<i64> = view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                assert_eq!(v, &want, "{name}");
            }
            (dtype, data) => panic!("{name}: expected {dtype:?}, read {data:?}"),
        }
    }
}

#[test]
fn a_file_that_is_not_a_checkpoint_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("weights.pt");
    std::fs::write(&path, b"not a zip archive at all").unwrap();
    let err = TorchCheckpoint::open(&path)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("weights.pt") && err.contains("PyTorch"),
        "{err}"
    );
}
