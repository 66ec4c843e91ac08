//! Reading the reference's PyTorch files into taming-rs models.
//!
//! - [`torch_file`]: `torch.save` zip archives (and the legacy format), their tensors read
//!   through a bounded pickle reader ([`pickle`]) with every size checked against the bytes
//!   that back it;
//! - [`taming`]: a taming-transformers VQGAN checkpoint and its YAML config as a [`Vqgan`];
//! - [`net2net`]: a Net2NetTransformer checkpoint as a GPT with its first and cond stages;
//! - [`read_state_dict`], [`fill_from_torch`], [`load_lpips`]: a state dict onto any module,
//!   and the LPIPS weights (torchvision's VGG16 and the `lpips` package's heads);
//! - [`inception`]: pytorch-fid's Inception weights (SHA-256 checked) for FID;
//! - [`npz`]: FID feature statistics (`mu`, `sigma`) as pytorch-fid's `.npz` files.
//!
//! [`Vqgan`]: taming_model::Vqgan

pub mod inception;
pub mod net2net;
pub mod npz;
pub mod pickle;
pub mod taming;
pub mod torch_file;

use std::collections::BTreeMap;
use std::path::Path;

use burn::store::ModuleSnapshot;
use burn::tensor::Device;
use taming_model::checkpoint::fill_from;
use taming_model::error::ModelError;
use taming_model::loss::{Lpips, LpipsConfig};

use torch_file::{RawTensor, TorchCheckpoint};

/// The state dict of the PyTorch file at `path`, by tensor name.
pub fn read_state_dict(path: &Path) -> Result<BTreeMap<String, RawTensor>, ModelError> {
    TorchCheckpoint::open(path)?.state_dict()
}

/// Fills `model` from a PyTorch file's state dict, `name_of` giving the file's name for each
/// module path (see [`fill_from`]); the tensors left over are returned.
pub fn fill_from_torch<M: ModuleSnapshot>(
    model: &mut M,
    path: &Path,
    name_of: impl Fn(&str) -> String,
) -> Result<BTreeMap<String, RawTensor>, ModelError> {
    fill_from(model, read_state_dict(path)?, name_of, path)
}

/// LPIPS with the weights named by `config`, read from their PyTorch files.
pub fn load_lpips(config: &LpipsConfig, device: &Device) -> Result<Lpips, ModelError> {
    Lpips::load_with(config, device, read_state_dict)
}
