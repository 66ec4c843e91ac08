//! Feature statistics as `.npz` files, the format of pytorch-fid's `--save-stats`
//! (`np.savez_compressed(path, mu=mu, sigma=sigma)`): a zip archive of two `.npy` arrays,
//! `mu.npy` (`[d]`) and `sigma.npy` (`[d, d]`). Files are read whether compressed or not,
//! with little- or big-endian f4 or f8 values in C or Fortran order; they are written
//! compressed, in f8 (what pytorch-fid's own statistics hold), `.npy` format 1.0.
//!
//! Reading is bounded before anything is allocated: each array's header is read first (at
//! most [`MAX_HEADER_BYTES`]), its shape must be `[d]` or `[d, d]` with `d` at most
//! [`MAX_DIM`], and header plus `shape x item size` must be exactly the entry's declared size,
//! which must fit the file's compressed bytes; then exactly those bytes are read.

use std::fs::File;
use std::io::{Cursor, Read, Write};
use std::path::Path;

use taming_model::error::ModelError;
use taming_model::fid::FeatureStats;
use zip::CompressionMethod;
use zip::write::SimpleFileOptions;

/// Largest feature dimension accepted (a `[d, d]` f8 covariance of 512 MiB).
pub const MAX_DIM: usize = 8192;
/// Largest `.npy` header accepted (format 1.0 allows 65,535 bytes; numpy writes about 128).
pub const MAX_HEADER_BYTES: usize = 65_535;
/// Most bytes deflate can expand one compressed byte into.
const MAX_DEFLATE_RATIO: u64 = 1032;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Element types read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F4 { big: bool },
    F8 { big: bool },
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Self::F4 { .. } => 4,
            Self::F8 { .. } => 8,
        }
    }

    fn parse(descr: &str) -> Option<Self> {
        let big = match descr.as_bytes().first()? {
            b'<' => false,
            b'>' => true,
            b'=' => cfg!(target_endian = "big"),
            _ => return None,
        };
        match &descr[1..] {
            "f4" => Some(Self::F4 { big }),
            "f8" => Some(Self::F8 { big }),
            _ => None,
        }
    }

    fn decode(self, bytes: &[u8]) -> Vec<f64> {
        match self {
            Self::F4 { big } => bytes
                .chunks_exact(4)
                .map(|c| {
                    let c: [u8; 4] = c.try_into().expect("4 bytes");
                    f64::from(if big {
                        f32::from_be_bytes(c)
                    } else {
                        f32::from_le_bytes(c)
                    })
                })
                .collect(),
            Self::F8 { big } => bytes
                .chunks_exact(8)
                .map(|c| {
                    let c: [u8; 8] = c.try_into().expect("8 bytes");
                    if big {
                        f64::from_be_bytes(c)
                    } else {
                        f64::from_le_bytes(c)
                    }
                })
                .collect(),
        }
    }
}

/// What an `.npy` header says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    dtype: Dtype,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Reads the statistics file at `path`.
pub fn read_stats(path: &Path) -> Result<FeatureStats, ModelError> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let bad =
        |why: String| ModelError::file(path, format!("not a readable statistics .npz ({why})"));
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let (mu_shape, mu) = read_array(&mut archive, "mu", len).map_err(&bad)?;
    let d = match mu_shape.as_slice() {
        [d] => *d,
        other => return Err(bad(format!("`mu` has shape {other:?}; [d] expected"))),
    };
    let (sigma_shape, sigma) = read_array(&mut archive, "sigma", len).map_err(&bad)?;
    if sigma_shape != [d, d] {
        return Err(bad(format!(
            "`sigma` has shape {sigma_shape:?}; `mu` has {d} values, so [{d}, {d}] expected"
        )));
    }
    let stats = FeatureStats { mu, sigma, n: None };
    stats
        .validate("statistics")
        .map_err(|e| ModelError::file(path, e.to_string()))?;
    Ok(stats)
}

/// Reads array `key` (entry `key.npy`): its shape and values in C order.
fn read_array(
    archive: &mut zip::ZipArchive<File>,
    key: &str,
    archive_len: u64,
) -> Result<(Vec<usize>, Vec<f64>), String> {
    let name = format!("{key}.npy");
    let mut entry = archive
        .by_name(&name)
        .map_err(|e| format!("entry {name}: {e}"))?;
    let (declared, packed) = (entry.size(), entry.compressed_size());
    let most = match entry.compression() {
        CompressionMethod::Stored => packed,
        _ => packed.saturating_mul(MAX_DEFLATE_RATIO),
    };
    if packed > archive_len || declared > most {
        return Err(format!(
            "entry {name} declares {declared} bytes ({packed} compressed), more than the \
             file's {archive_len} bytes can hold"
        ));
    }
    let mut prefix = [0u8; 10];
    entry
        .read_exact(&mut prefix[..8])
        .map_err(|e| format!("entry {name}: {e}"))?;
    if &prefix[..6] != MAGIC {
        return Err(format!("entry {name} is not an .npy array (no magic)"));
    }
    let header_len = match prefix[6] {
        1 => {
            entry
                .read_exact(&mut prefix[8..10])
                .map_err(|e| format!("entry {name}: {e}"))?;
            u16::from_le_bytes([prefix[8], prefix[9]]) as usize
        }
        2 | 3 => {
            let mut n = [0u8; 4];
            entry
                .read_exact(&mut n)
                .map_err(|e| format!("entry {name}: {e}"))?;
            u32::from_le_bytes(n) as usize
        }
        v => {
            return Err(format!(
                "entry {name}: .npy format version {v} is not known"
            ));
        }
    };
    let preamble = if prefix[6] == 1 { 10 } else { 12 };
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "entry {name}: header of {header_len} bytes, more than the {MAX_HEADER_BYTES} accepted"
        ));
    }
    let mut text = vec![0u8; header_len];
    entry
        .read_exact(&mut text)
        .map_err(|e| format!("entry {name}: header: {e}"))?;
    let text = String::from_utf8(text).map_err(|_| format!("entry {name}: header is not text"))?;
    let header = parse_header(&text).map_err(|e| format!("entry {name}: {e}"))?;
    if header.shape.is_empty()
        || header.shape.len() > 2
        || header.shape.iter().any(|&n| n > MAX_DIM)
    {
        return Err(format!(
            "entry {name}: shape {:?}; [d] or [d, d] with d at most {MAX_DIM} accepted",
            header.shape
        ));
    }
    let count: usize = header.shape.iter().product();
    let data_len = count * header.dtype.size();
    let expected = (preamble + header_len + data_len) as u64;
    if expected != declared {
        return Err(format!(
            "entry {name}: shape {:?} of {}-byte values needs {expected} bytes, the entry \
             declares {declared}",
            header.shape,
            header.dtype.size()
        ));
    }
    let mut data = Vec::with_capacity(data_len);
    entry
        .by_ref()
        .take(data_len as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("entry {name}: {e}"))?;
    if data.len() != data_len {
        return Err(format!(
            "entry {name} holds {} bytes of values, its shape {:?} needs {data_len}",
            data.len(),
            header.shape
        ));
    }
    let mut values = header.dtype.decode(&data);
    if header.fortran_order && header.shape.len() == 2 {
        let (rows, cols) = (header.shape[0], header.shape[1]);
        let column_major = values;
        values = vec![0.0; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                values[r * cols + c] = column_major[c * rows + r];
            }
        }
    }
    Ok((header.shape, values))
}

/// Parses the Python dict literal of an `.npy` header:
/// `{'descr': '<f8', 'fortran_order': False, 'shape': (2048, 2048), }`.
fn parse_header(text: &str) -> Result<Header, String> {
    let value_of = |key: &str| -> Result<&str, String> {
        let at = text
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!("header has no '{key}'"))?;
        let rest = &text[at + key.len() + 2..];
        let rest = rest.trim_start();
        let rest = rest
            .strip_prefix(':')
            .ok_or_else(|| format!("header: no ':' after '{key}'"))?;
        Ok(rest.trim_start())
    };
    let descr = value_of("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split_once('\''))
        .map(|(d, _)| d)
        .ok_or("header: 'descr' is not a string")?;
    let dtype = Dtype::parse(descr)
        .ok_or_else(|| format!("values of type '{descr}'; f4 or f8 floats accepted"))?;
    let order = value_of("fortran_order")?;
    let fortran_order = if order.starts_with("True") {
        true
    } else if order.starts_with("False") {
        false
    } else {
        return Err("header: 'fortran_order' is neither True nor False".into());
    };
    let shape = value_of("shape")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split_once(')'))
        .map(|(s, _)| s)
        .ok_or("header: 'shape' is not a tuple")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("header: shape entry `{s}` is not a size"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Header {
        dtype,
        fortran_order,
        shape,
    })
}

/// An `.npy` (format 1.0) of f8 values in C order.
fn npy(shape: &[usize], values: &[f64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape_text}, }}");
    // numpy pads the header with spaces to a multiple of 64 bytes, ending in a newline.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total + values.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes `stats` to `path` (through a temporary sibling file) as pytorch-fid's
/// `--save-stats` does: a compressed `.npz` of `mu` and `sigma`.
pub fn write_stats(path: &Path, stats: &FeatureStats) -> Result<(), ModelError> {
    stats.validate("statistics")?;
    let d = stats.dim();
    let fail = |e: String| ModelError::file(path, format!("writing statistics: {e}"));
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .large_file(false);
    for (name, shape, values) in [
        ("mu.npy", vec![d], &stats.mu),
        ("sigma.npy", vec![d, d], &stats.sigma),
    ] {
        zip.start_file(name, options)
            .map_err(|e| fail(e.to_string()))?;
        zip.write_all(&npy(&shape, values))
            .map_err(|e| fail(e.to_string()))?;
    }
    let bytes = zip.finish().map_err(|e| fail(e.to_string()))?.into_inner();
    taming_model::atomic::write(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_as_numpy_writes_them_parse() {
        let h = parse_header("{'descr': '<f8', 'fortran_order': False, 'shape': (2048, 2048), }")
            .unwrap();
        assert_eq!(h.shape, vec![2048, 2048]);
        assert_eq!(h.dtype, Dtype::F8 { big: false });
        assert!(!h.fortran_order);
        let h = parse_header("{'descr': '>f4', 'fortran_order': True, 'shape': (5,), }").unwrap();
        assert_eq!(
            (h.shape, h.dtype, h.fortran_order),
            (vec![5], Dtype::F4 { big: true }, true)
        );
        let err =
            parse_header("{'descr': '<i8', 'fortran_order': False, 'shape': (5,), }").unwrap_err();
        assert!(err.contains("'<i8'"), "{err}");
    }

    #[test]
    fn written_arrays_have_numpy_headers() {
        let bytes = npy(&[3], &[1.0, 2.0, 3.0]);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let text = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert_eq!(
            text.trim_end(),
            "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }"
        );
        assert_eq!(bytes.len(), 10 + header_len + 24);
    }
}
