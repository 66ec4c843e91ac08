//! Tensors from PyTorch zip checkpoints (`torch.save` since 1.6, Lightning `.ckpt` included).
//!
//! The pickle is read by [`super::pickle`]; each `_rebuild_tensor_v2` call found in the state
//! dict is materialized from its storage entry in the archive, honouring offset and strides.
//!
//! Nothing is allocated from a size the file merely declares: entries are read only if their
//! declared size fits the archive on disk and a cap, and tensors only if their element count
//! fits their storage and a budget tied to the archive's size.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

pub use taming_model::checkpoint::tensors::{RawData, RawTensor};
use taming_model::error::ModelError;

use crate::pickle::{self, Value};

/// Largest `data.pkl` read. A Lightning checkpoint's pickle, optimizer state included, is well
/// under 1 MiB; decoding is bounded further by [`pickle::MAX_MEMORY`].
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Largest storage entry read. Reference checkpoints' largest storages are a few hundred MiB.
pub const MAX_STORAGE_BYTES: u64 = 16 << 30;

/// Most bytes a view may materialize beyond what its storage holds (a stride-0 expansion).
/// `torch.save` of a state dict writes contiguous tensors; small broadcast buffers still load.
pub const MAX_EXPANDED_BYTES: usize = 16 << 20;

/// Headroom, over four times the archive's size, for the tensors of one state dict together
/// (as f32 or i64). Four times covers f16 storages widened to f32 and weights that share a
/// storage; it stops many views of one storage from multiplying it.
pub const TENSOR_SLACK_BYTES: u64 = 256 << 20;

/// How far deflate can expand (its limit is about 1032:1).
const MAX_DEFLATE_RATIO: u64 = 1032;

/// A PyTorch checkpoint opened for reading.
pub struct TorchCheckpoint {
    archive: zip::ZipArchive<File>,
    prefix: String,
    root: Value,
    path: std::path::PathBuf,
    /// The archive's size on disk.
    len: u64,
}

#[derive(Debug)]
struct TensorSpec {
    storage_key: String,
    dtype: StorageType,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug, Clone, Copy)]
enum StorageType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageType {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// Bytes per element once converted ([`RawData`]).
    fn converted_size(self) -> usize {
        match self {
            Self::F64 | Self::F32 | Self::F16 | Self::BF16 => 4,
            _ => 8,
        }
    }

    fn convert(self, bytes: &[u8], picks: impl Iterator<Item = usize>) -> RawData {
        let at = |i: usize, n: usize| &bytes[i * n..(i + 1) * n];
        macro_rules! ints {
            ($t:ty) => {
                RawData::I64(
                    picks
                        .map(|i| {
                            <$t>::from_le_bytes(at(i, size_of::<$t>()).try_into().unwrap()) as i64
                        })
                        .collect(),
                )
            };
        }
        match self {
            Self::F64 => RawData::F32(
                picks
                    .map(|i| f64::from_le_bytes(at(i, 8).try_into().unwrap()) as f32)
                    .collect(),
            ),
            Self::F32 => RawData::F32(
                picks
                    .map(|i| f32::from_le_bytes(at(i, 4).try_into().unwrap()))
                    .collect(),
            ),
            Self::F16 => RawData::F32(
                picks
                    .map(|i| half::f16::from_le_bytes(at(i, 2).try_into().unwrap()).to_f32())
                    .collect(),
            ),
            Self::BF16 => RawData::F32(
                picks
                    .map(|i| half::bf16::from_le_bytes(at(i, 2).try_into().unwrap()).to_f32())
                    .collect(),
            ),
            Self::I64 => ints!(i64),
            Self::I32 => ints!(i32),
            Self::I16 => ints!(i16),
            Self::I8 => ints!(i8),
            Self::U8 | Self::Bool => RawData::I64(picks.map(|i| bytes[i] as i64).collect()),
        }
    }
}

impl TorchCheckpoint {
    /// Opens a zip-format PyTorch file and decodes its pickle.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let not_torch = |why: String| {
            ModelError::file(
                path,
                format!("not a readable PyTorch zip checkpoint ({why})"),
            )
        };
        let mut archive = zip::ZipArchive::new(file).map_err(|e| not_torch(e.to_string()))?;
        let pkl_name = archive
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.into_owned()))
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
            .ok_or_else(|| not_torch("no data.pkl entry".into()))?;
        let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
        let bytes =
            read_entry(&mut archive, &pkl_name, len, MAX_PICKLE_BYTES).map_err(&not_torch)?;
        let root = pickle::read(&bytes).map_err(|e| not_torch(format!("entry {pkl_name}: {e}")))?;
        let order_name = format!("{prefix}byteorder");
        if archive.index_for_name(&order_name).is_some() {
            let order = read_entry(&mut archive, &order_name, len, 64).map_err(&not_torch)?;
            if order != b"little" {
                return Err(not_torch("big-endian checkpoints are not supported".into()));
            }
        }
        Ok(Self {
            archive,
            prefix,
            root,
            path: path.to_path_buf(),
            len,
        })
    }

    /// The decoded top-level object (for metadata such as `global_step`).
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// Reads every tensor of the state dict: `state_dict` of a Lightning checkpoint, or the
    /// top-level dict of a plain `torch.save(model.state_dict())` file. All of them together
    /// may take at most four times the archive's size plus [`TENSOR_SLACK_BYTES`].
    pub fn state_dict(&mut self) -> Result<BTreeMap<String, RawTensor>, ModelError> {
        let dict = match self.root.get("state_dict") {
            Some(inner @ Value::Dict(_)) => inner,
            _ => &self.root,
        };
        let Value::Dict(items) = dict else {
            return Err(ModelError::file(
                &self.path,
                "the checkpoint holds no state dict",
            ));
        };
        let specs: Vec<(String, TensorSpec)> = items
            .iter()
            .filter_map(|(key, value)| Some((key.as_str()?.to_string(), tensor_spec(value)?)))
            .collect();
        let mut budget = self
            .len
            .saturating_mul(4)
            .saturating_add(TENSOR_SLACK_BYTES);
        let mut out = BTreeMap::new();
        for (name, spec) in specs {
            let tensor = self.materialize(&name, &spec, &mut budget)?;
            out.insert(name, tensor);
        }
        Ok(out)
    }

    /// Reads one tensor, after checking that its view fits its storage and that its
    /// converted size fits what is left of `budget` (which it then takes).
    fn materialize(
        &mut self,
        name: &str,
        spec: &TensorSpec,
        budget: &mut u64,
    ) -> Result<RawTensor, ModelError> {
        let path = &self.path;
        let refuse = |why: String| ModelError::file(path, format!("tensor `{name}`: {why}"));
        let (size, stride) = (&spec.size, &spec.stride);
        if size.len() != stride.len() {
            return Err(refuse(format!(
                "shape {size:?} and strides {stride:?} differ in rank"
            )));
        }
        let bytes_out = size
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|numel| Some((numel, numel.checked_mul(spec.dtype.converted_size())?)));
        let Some((numel, bytes_out)) = bytes_out else {
            return Err(refuse(format!(
                "shape {size:?} has more elements than memory can hold; refused"
            )));
        };
        if bytes_out as u64 > *budget {
            return Err(refuse(format!(
                "shape {size:?} takes {bytes_out} bytes, more than the {budget} left of what the \
                 checkpoint's tensors may take (4x its {} bytes plus {} MiB); refused",
                self.len,
                TENSOR_SLACK_BYTES >> 20
            )));
        }
        let entry = format!("{}data/{}", self.prefix, spec.storage_key);
        let bytes = read_entry(&mut self.archive, &entry, self.len, MAX_STORAGE_BYTES)
            .map_err(|e| refuse(format!("storage: {e}")))?;
        let available = bytes.len() / spec.dtype.size();
        if numel > 0 {
            // The last element a view touches: offset + sum((n - 1) * stride).
            let last = size
                .iter()
                .zip(stride)
                .try_fold(spec.offset, |at, (&n, &s)| {
                    (n - 1).checked_mul(s).and_then(|d| at.checked_add(d))
                });
            if last.is_none_or(|last| last >= available) {
                let needed = last.map_or("more than memory can hold".into(), |l| {
                    (l as u128 + 1).to_string()
                });
                return Err(refuse(format!(
                    "its storage holds {available} elements, the view (offset {}, shape \
                     {size:?}, strides {stride:?}) needs {needed}",
                    spec.offset
                )));
            }
            if numel > available && bytes_out > MAX_EXPANDED_BYTES {
                return Err(refuse(format!(
                    "shape {size:?} with strides {stride:?} repeats a storage of {available} \
                     elements into {numel}; views larger than their storage are read only up \
                     to {} MiB; refused",
                    MAX_EXPANDED_BYTES >> 20
                )));
            }
        }
        *budget -= bytes_out as u64;
        let picks = StridedIndices::new(spec.offset, size, stride);
        let data = spec.dtype.convert(&bytes, picks.take(numel));
        Ok(RawTensor {
            shape: size.clone(),
            data,
        })
    }
}

/// Reads entry `name` whole. Its declared size must be at most `cap` and no more than its
/// compressed bytes, which must lie within the archive's `archive_len`, can hold; the buffer
/// grows with what is read, never beyond the archive's size on a declaration alone.
fn read_entry(
    archive: &mut zip::ZipArchive<File>,
    name: &str,
    archive_len: u64,
    cap: u64,
) -> Result<Vec<u8>, String> {
    let mut entry = archive
        .by_name(name)
        .map_err(|e| format!("entry {name}: {e}"))?;
    let (declared, packed) = (entry.size(), entry.compressed_size());
    let most = match entry.compression() {
        zip::CompressionMethod::Stored => packed,
        _ => packed.saturating_mul(MAX_DEFLATE_RATIO),
    };
    if packed > archive_len || declared > most {
        return Err(format!(
            "entry {name} declares {declared} bytes ({packed} compressed), more than the \
             archive's {archive_len} bytes can hold; refused"
        ));
    }
    if declared > cap {
        return Err(format!(
            "entry {name} declares {declared} bytes, more than the {cap} accepted; refused"
        ));
    }
    let capacity = usize::try_from(declared.min(archive_len)).map_err(|e| e.to_string())?;
    let mut bytes = Vec::with_capacity(capacity);
    entry
        .by_ref()
        .take(declared.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("entry {name}: {e}"))?;
    if bytes.len() as u64 != declared {
        return Err(format!(
            "entry {name} holds {} bytes, its header declares {declared}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// Recognizes `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, possibly wrapped in
/// `_rebuild_parameter(tensor, requires_grad, hooks)`.
fn tensor_spec(value: &Value) -> Option<TensorSpec> {
    let Value::Call { func, args, .. } = value else {
        return None;
    };
    let Value::Tuple(args) = args.as_ref() else {
        return None;
    };
    if func.is_global("torch._utils", "_rebuild_parameter") {
        return tensor_spec(args.first()?);
    }
    let rebuild = func.is_global("torch._utils", "_rebuild_tensor_v2")
        || func.is_global("torch._utils", "_rebuild_tensor");
    if !rebuild || args.len() < 4 {
        return None;
    }
    let Value::PersistentId(pid) = &args[0] else {
        return None;
    };
    let Value::Tuple(pid) = pid.as_ref() else {
        return None;
    };
    let (Some(Value::Global { name: class, .. }), Some(key)) = (pid.get(1), pid.get(2)) else {
        return None;
    };
    Some(TensorSpec {
        storage_key: key.as_str()?.to_string(),
        dtype: StorageType::from_class(class)?,
        offset: usize::try_from(args[1].as_int()?).ok()?,
        size: usizes(&args[2])?,
        stride: usizes(&args[3])?,
    })
}

fn usizes(value: &Value) -> Option<Vec<usize>> {
    let Value::Tuple(items) = value else {
        return None;
    };
    items
        .iter()
        .map(|v| v.as_int().and_then(|i| usize::try_from(i).ok()))
        .collect()
}

/// Storage positions of a strided view, in row-major order.
struct StridedIndices<'a> {
    offset: usize,
    size: &'a [usize],
    stride: &'a [usize],
    index: Vec<usize>,
    done: bool,
}

impl<'a> StridedIndices<'a> {
    fn new(offset: usize, size: &'a [usize], stride: &'a [usize]) -> Self {
        Self {
            offset,
            size,
            stride,
            index: vec![0; size.len()],
            done: size.contains(&0),
        }
    }
}

impl Iterator for StridedIndices<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.done {
            return None;
        }
        let pos = self.offset
            + self
                .index
                .iter()
                .zip(self.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        self.done = true;
        for d in (0..self.index.len()).rev() {
            self.index[d] += 1;
            if self.index[d] < self.size[d] {
                self.done = false;
                break;
            }
            self.index[d] = 0;
        }
        Some(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_indices_walk_a_transposed_view() {
        // A 2x3 view of a 3x2 row-major storage, transposed: strides (1, 2).
        let idx: Vec<usize> = StridedIndices::new(0, &[2, 3], &[1, 2]).collect();
        assert_eq!(idx, vec![0, 2, 4, 1, 3, 5]);
    }

    #[test]
    fn scalar_view_yields_its_offset() {
        let idx: Vec<usize> = StridedIndices::new(5, &[], &[]).collect();
        assert_eq!(idx, vec![5]);
    }
}
