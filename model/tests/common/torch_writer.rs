//! A minimal PyTorch checkpoint writer for tests: a zip (sizes in zip64 fields, so any size
//! can be declared) and a pickle (protocol 2) holding `_rebuild_tensor_v2` calls, written byte
//! by byte (`malicious_checkpoints.rs` bends them; `fid.rs` writes a whole state dict).
#![allow(dead_code)]

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// One zip entry. `declared` overrides the uncompressed size written in its headers.
pub struct Entry {
    pub name: String,
    pub data: Vec<u8>,
    pub deflate: bool,
    pub declared: Option<u64>,
}

pub fn entry(name: &str, data: impl Into<Vec<u8>>) -> Entry {
    Entry {
        name: format!("archive/{name}"),
        data: data.into(),
        deflate: false,
        declared: None,
    }
}

/// A zip of `entries`; sizes go in zip64 extra fields, so any size can be declared.
pub fn zip(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let payload = if e.deflate {
            // One stored deflate block: final, type 00, LEN, NLEN, bytes.
            let n = u16::try_from(e.data.len()).unwrap();
            let mut p = vec![1];
            p.extend_from_slice(&n.to_le_bytes());
            p.extend_from_slice(&(!n).to_le_bytes());
            p.extend_from_slice(&e.data);
            p
        } else {
            e.data.clone()
        };
        let size = e.declared.unwrap_or(e.data.len() as u64);
        let mut zip64 = vec![1, 0, 16, 0];
        zip64.extend_from_slice(&size.to_le_bytes());
        zip64.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let method: u16 = if e.deflate { 8 } else { 0 };
        // Shared by both headers: needed version, flags, method, time, date, crc, sizes,
        // name and extra lengths.
        let mut common = Vec::new();
        common.extend_from_slice(&45u16.to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes());
        common.extend_from_slice(&method.to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes());
        common.extend_from_slice(&0x21u16.to_le_bytes());
        common.extend_from_slice(&crc32(&e.data).to_le_bytes());
        common.extend_from_slice(&u32::MAX.to_le_bytes());
        common.extend_from_slice(&u32::MAX.to_le_bytes());
        common.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        common.extend_from_slice(&(zip64.len() as u16).to_le_bytes());
        let offset = out.len() as u32;
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&common);
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&zip64);
        out.extend_from_slice(&payload);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&45u16.to_le_bytes());
        central.extend_from_slice(&common);
        central.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(e.name.as_bytes());
        central.extend_from_slice(&zip64);
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

pub struct Pickle(pub Vec<u8>);

impl Pickle {
    pub fn new() -> Self {
        Self(vec![0x80, 2])
    }

    pub fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.op(&[0x8c, s.len() as u8]).op(s.as_bytes())
    }

    pub fn int(&mut self, i: i64) -> &mut Self {
        self.op(&[0x8a, 8]).op(&i.to_le_bytes())
    }

    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }

    pub fn ints(&mut self, items: &[i64]) -> &mut Self {
        self.op(b"(");
        for &i in items {
            self.int(i);
        }
        self.op(b"t")
    }

    /// `_rebuild_tensor_v2(<FloatStorage `key` of `numel`>, offset, size, stride, False,
    /// OrderedDict())`.
    pub fn tensor(&mut self, key: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) {
        self.tensor_of("FloatStorage", key, numel, offset, size, stride);
    }

    /// As [`Self::tensor`] over a storage of another type (`LongStorage`).
    pub fn tensor_of(
        &mut self,
        storage: &str,
        key: &str,
        numel: i64,
        offset: i64,
        size: &[i64],
        stride: &[i64],
    ) {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"((");
        self.str("storage").global("torch", storage).str(key);
        self.str("cpu").int(numel).op(b"tQ");
        self.int(offset).ints(size).ints(stride).op(&[0x89]);
        self.global("collections", "OrderedDict")
            .op(b")Rt")
            .op(b"R");
    }

    /// Ends the pickle (STOP) and returns its bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        self.op(b".");
        std::mem::take(&mut self.0)
    }
}
