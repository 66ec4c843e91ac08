//! pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`) into
//! [`FidInception`]: the file's SHA-256 is checked first (unless other weights of the same
//! layout are accepted, for fine-tuned Inceptions and tests), then its state dict fills the
//! network by pytorch-fid's tensor names. The classifier (`fc.*`) and the batch-norm counters
//! (`*.num_batches_tracked`) are not used; any other tensor the network has no place for means
//! the file is not pytorch-fid's layout and is refused.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;
use sha2::{Digest, Sha256};
use taming_model::checkpoint::fill_from;
use taming_model::error::ModelError;
use taming_model::inception::{FidInception, torch_name};

use crate::read_state_dict;

/// The file name pytorch-fid downloads its weights to.
pub const FID_WEIGHTS_FILE: &str = "pt_inception-2015-12-05-6726825d.pth";
/// SHA-256 of that file (95,628,359 bytes), as published with it.
pub const FID_WEIGHTS_SHA256: &str =
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2";

/// Which weights files are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsCheck {
    /// Only pytorch-fid's file, by its SHA-256.
    Standard,
    /// Any file of the same layout (a fine-tuned Inception, test weights).
    AnyWeights,
}

impl WeightsCheck {
    /// The check that an `any_weights` option asks for.
    pub fn accepting_any(any_weights: bool) -> Self {
        if any_weights {
            Self::AnyWeights
        } else {
            Self::Standard
        }
    }
}

/// Hex SHA-256 of the file at `path`, read in blocks.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Refuses a file whose SHA-256 is not that of pytorch-fid's weights; the error names the
/// file and both hashes.
pub fn check_standard_weights(path: &Path) -> Result<(), ModelError> {
    let actual = sha256_file(path)?;
    if actual != FID_WEIGHTS_SHA256 {
        return Err(ModelError::file(
            path,
            format!(
                "SHA-256 {actual} is not that of pytorch-fid's {FID_WEIGHTS_FILE} \
                 ({FID_WEIGHTS_SHA256})"
            ),
        ));
    }
    Ok(())
}

/// The FID Inception with the weights at `path` (a PyTorch state dict in pytorch-fid's
/// layout), after the check `check` asks for.
pub fn load_fid_inception(
    path: &Path,
    check: WeightsCheck,
    device: &Device,
) -> Result<FidInception, ModelError> {
    if check == WeightsCheck::Standard {
        check_standard_weights(path)?;
    }
    let mut net = FidInception::new(device);
    let rest = fill_from(&mut net, read_state_dict(path)?, torch_name, path)?;
    let unused = |name: &str| name.starts_with("fc.") || name.ends_with(".num_batches_tracked");
    let unknown: Vec<&String> = rest.keys().filter(|k| !unused(k)).collect();
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(5).map(|s| s.as_str()).collect();
        return Err(ModelError::file(
            path,
            format!(
                "{} tensor(s) that pytorch-fid's Inception does not have ({}{}): not its layout",
                unknown.len(),
                shown.join(", "),
                if unknown.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(net.no_grad())
}
