//! A bound on the entries of a shard, checked on the bytes as they stream past.
//!
//! The tar reader keeps each entry in memory whole (an image is decoded from one buffer), so
//! a shard whose header declares a multi-gigabyte member would grow the reader until the
//! machine runs out of memory. [`EntryBound`] reads every 512-byte header on its way to the
//! tar reader and fails the stream, naming the member, when a declared size exceeds the bound,
//! before any of that member's payload is passed on.

use std::io::{self, Read};

/// The largest shard member read: far above any image or label map a sample holds.
pub const MAX_ENTRY_BYTES: u64 = 256 << 20;

const BLOCK: usize = 512;
const SIZE_FIELD: std::ops::Range<usize> = 124..136;

/// A `Read` adapter over a plain (uncompressed) tar stream that refuses members larger than
/// its bound.
pub struct EntryBound<R> {
    inner: R,
    max_entry: u64,
    header: [u8; BLOCK],
    filled: usize,
    /// Payload and padding bytes left of the current member.
    skip: u64,
    started: bool,
}

impl<R: Read> EntryBound<R> {
    /// Wraps `inner`, allowing members of at most `max_entry` bytes.
    pub fn new(inner: R, max_entry: u64) -> Self {
        Self {
            inner,
            max_entry,
            header: [0; BLOCK],
            filled: 0,
            skip: 0,
            started: false,
        }
    }

    /// Follows the tar structure over `bytes`, which are about to be handed on.
    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if !self.started && !bytes.is_empty() {
            self.started = true;
            refuse_compressed(bytes)?;
        }
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(bytes.len() as u64)) as usize;
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (BLOCK - self.filled).min(bytes.len());
            self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == BLOCK {
                self.filled = 0;
                self.skip = self.member_span()?;
            }
        }
        Ok(())
    }

    /// The payload plus padding that follows the header just read, checked against the bound.
    fn member_span(&self) -> io::Result<u64> {
        if self.header.iter().all(|b| *b == 0) {
            return Ok(0);
        }
        let size = declared_size(&self.header[SIZE_FIELD]).ok_or_else(|| {
            invalid(format!(
                "tar member `{}` has an unreadable size field",
                member_name(&self.header)
            ))
        })?;
        if size > self.max_entry {
            return Err(invalid(format!(
                "tar member `{}` declares {size} bytes; members of at most {} bytes are read",
                member_name(&self.header),
                self.max_entry
            )));
        }
        Ok(size.div_ceil(BLOCK as u64) * BLOCK as u64)
    }
}

impl<R: Read> Read for EntryBound<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

/// Fails on the magic numbers of the compressed formats: shards are plain `.tar`.
fn refuse_compressed(start: &[u8]) -> io::Result<()> {
    const MAGICS: [(&[u8], &str); 4] = [
        (&[0x1f, 0x8b], "gzip"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (b"BZh", "bzip2"),
        (&[0xfd, b'7', b'z', b'X', b'Z'], "xz"),
    ];
    match MAGICS.iter().find(|(magic, _)| start.starts_with(magic)) {
        Some((_, format)) => Err(invalid(format!(
            "a {format}-compressed shard; shards are read as plain .tar (decompress it first)"
        ))),
        None => Ok(()),
    }
}

/// A tar size field: NUL/space-terminated octal, or GNU base-256 (top bit of the first byte).
fn declared_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(value);
    }
    let text = std::str::from_utf8(field).ok()?;
    let digits = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

fn member_name(header: &[u8; BLOCK]) -> String {
    let name = &header[..100];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(members: &[(&str, usize)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, len) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(*len as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, &vec![7u8; *len][..])
                .unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn read_all(bytes: &[u8], max: u64, chunk: usize) -> io::Result<Vec<u8>> {
        struct Chunked<'a>(&'a [u8], usize);
        impl Read for Chunked<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(self.1).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut out = Vec::new();
        EntryBound::new(Chunked(bytes, chunk), max).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn passes_members_within_the_bound_unchanged() {
        let tar = tar_of(&[("a.jpg", 1000), ("a.json", 3), ("b.jpg", 512)]);
        for chunk in [1, 100, 512, 4096] {
            assert_eq!(read_all(&tar, 1000, chunk).unwrap(), tar);
        }
    }

    #[test]
    fn refuses_a_member_over_the_bound_by_name() {
        let tar = tar_of(&[("a.jpg", 10), ("big.png", 1001)]);
        let err = read_all(&tar, 1000, 333).unwrap_err();
        assert!(
            err.to_string().contains("`big.png` declares 1001 bytes"),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_huge_base256_size_before_its_payload() {
        let mut tar = tar_of(&[("x.jpg", 1)]);
        tar[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
        let err = read_all(&tar[..BLOCK], MAX_ENTRY_BYTES, 512).unwrap_err();
        assert!(err.to_string().contains("`x.jpg` declares"), "{err}");
    }

    #[test]
    fn the_shard_reader_fails_on_an_oversized_member_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train-000.tar");
        let mut tar = tar_of(&[("a.jpg", 10)]);
        tar[124..136].copy_from_slice(b"77777777777\0");
        std::fs::write(&path, &tar).unwrap();
        let loc = crate::source::locate(path.to_str().unwrap()).unwrap();
        let err = match crate::reader::open_samples(&loc, 0) {
            Ok(mut samples) => samples.next().unwrap().unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("`a.jpg` declares 8589934591 bytes"), "{err}");
    }

    #[test]
    fn refuses_compressed_shards() {
        let err = read_all(&[0x1f, 0x8b, 8, 0, 0, 0], MAX_ENTRY_BYTES, 64).unwrap_err();
        assert!(err.to_string().contains("gzip-compressed shard"), "{err}");
    }

    #[test]
    fn reads_octal_and_base256_sizes() {
        assert_eq!(declared_size(b"00000001750\0"), Some(1000));
        assert_eq!(declared_size(b"        \0\0\0\0"), Some(0));
        let mut b256 = [0u8; 12];
        b256[0] = 0x80;
        b256[11] = 5;
        assert_eq!(declared_size(&b256), Some(5));
        assert_eq!(declared_size(b"12x45678901\0"), None);
    }
}
