//! Tensors from PyTorch zip checkpoints (`torch.save` since 1.6, Lightning `.ckpt` included).
//!
//! The pickle is read by [`super::pickle`]; each `_rebuild_tensor_v2` call found in the state
//! dict is materialized from its storage entry in the archive, honouring offset and strides.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::pickle::{self, Value};
use crate::error::ModelError;

/// Tensor values after conversion: floats as f32, integers as i64.
#[derive(Debug, Clone, PartialEq)]
pub enum RawData {
    /// Any floating-point storage (f64, f32, f16, bf16), converted to f32.
    F32(Vec<f32>),
    /// Any integer or bool storage, converted to i64.
    I64(Vec<i64>),
}

/// One tensor read from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Contiguous row-major values.
    pub data: RawData,
}

impl RawTensor {
    /// The float values, or an error naming `name` if the tensor holds integers.
    pub fn f32s(&self, name: &str) -> Result<&[f32], ModelError> {
        match &self.data {
            RawData::F32(v) => Ok(v),
            RawData::I64(_) => Err(ModelError::tensor(
                name,
                "expected a float tensor, found integers",
            )),
        }
    }
}

/// A PyTorch checkpoint opened for reading.
pub struct TorchCheckpoint {
    archive: zip::ZipArchive<File>,
    prefix: String,
    root: Value,
    path: std::path::PathBuf,
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
        let bytes = read_entry(&mut archive, &pkl_name).map_err(&not_torch)?;
        let root = pickle::read(&bytes).map_err(|e| not_torch(e.to_string()))?;
        if let Ok(order) = read_entry(&mut archive, &format!("{prefix}byteorder"))
            && order != b"little"
        {
            return Err(not_torch("big-endian checkpoints are not supported".into()));
        }
        Ok(Self {
            archive,
            prefix,
            root,
            path: path.to_path_buf(),
        })
    }

    /// The decoded top-level object (for metadata such as `global_step`).
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// Reads every tensor of the state dict: `state_dict` of a Lightning checkpoint, or the
    /// top-level dict of a plain `torch.save(model.state_dict())` file.
    pub fn state_dict(&mut self) -> Result<BTreeMap<String, RawTensor>, ModelError> {
        let dict = match self.root.get("state_dict") {
            Some(inner @ Value::Dict(_)) => inner.clone(),
            _ => self.root.clone(),
        };
        let Value::Dict(items) = dict else {
            return Err(ModelError::file(
                &self.path,
                "the checkpoint holds no state dict",
            ));
        };
        let mut out = BTreeMap::new();
        for (key, value) in items {
            let (Some(name), Some(spec)) = (key.as_str(), tensor_spec(&value)) else {
                continue;
            };
            let tensor = self.materialize(name, &spec)?;
            out.insert(name.to_string(), tensor);
        }
        Ok(out)
    }

    fn materialize(&mut self, name: &str, spec: &TensorSpec) -> Result<RawTensor, ModelError> {
        let entry = format!("{}data/{}", self.prefix, spec.storage_key);
        let bytes = read_entry(&mut self.archive, &entry).map_err(|e| {
            ModelError::file(&self.path, format!("storage of tensor `{name}`: {e}"))
        })?;
        let available = bytes.len() / spec.dtype.size();
        let needed = spec.offset
            + spec
                .size
                .iter()
                .zip(&spec.stride)
                .map(|(&n, &s)| n.saturating_sub(1) * s)
                .sum::<usize>()
            + 1;
        let numel: usize = spec.size.iter().product();
        if numel > 0 && needed > available {
            return Err(ModelError::tensor(
                name,
                format!("its storage holds {available} elements, the view needs {needed}"),
            ));
        }
        let picks = StridedIndices::new(spec.offset, &spec.size, &spec.stride);
        let data = spec.dtype.convert(&bytes, picks.take(numel));
        Ok(RawTensor {
            shape: spec.size.clone(),
            data,
        })
    }
}

fn read_entry(archive: &mut zip::ZipArchive<File>, name: &str) -> Result<Vec<u8>, String> {
    let mut entry = archive
        .by_name(name)
        .map_err(|e| format!("entry {name}: {e}"))?;
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| format!("entry {name}: {e}"))?;
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
