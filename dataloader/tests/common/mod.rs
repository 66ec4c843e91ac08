//! Shard and image builders for the dataloader tests.
#![allow(dead_code)]

use std::path::PathBuf;

use taming_dataloader::codes::upload;
use taming_dataloader::{LoaderConfig, Preprocess, ReaderConfig};

/// The embedded Fashion-MNIST shards.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/fashion-mnist")
}

/// A tar archive of `files` in order.
pub fn tar_bytes(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        // Names are written raw so that tests can make hostile ones (`../x`).
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// Writes a tar of `files` to a URL or path.
pub fn put_shard(url: &str, files: &[(&str, &[u8])]) {
    upload(url, tar_bytes(files).into()).unwrap();
}

/// A PNG of `w` x `h` with pixel values from `f`.
pub fn png_from(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A flat green PNG, 40 x 36.
pub fn png() -> Vec<u8> {
    png_from(40, 36, |_, _| [10, 200, 30])
}

/// A label map PNG (grey levels = labels).
pub fn mask_png(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Shards `{prefix}-{i:03}.tar` under `dir` with `counts[i]` samples each, keys
/// `s{i}-{j}`, tiny PNGs whose red channel encodes the shard.
pub fn numbered_shards(dir: &str, counts: &[usize]) -> Vec<String> {
    let mut urls = Vec::new();
    for (i, &n) in counts.iter().enumerate() {
        let img = png_from(8, 8, |_, _| [i as u8, 0, 0]);
        let names: Vec<(String, String)> = (0..n)
            .map(|j| (format!("s{i}-{j}.png"), format!("s{i}-{j}.cls")))
            .collect();
        let label = i.to_string();
        let mut files: Vec<(&str, &[u8])> = Vec::new();
        for (p, c) in &names {
            files.push((p, &img));
            files.push((c, label.as_bytes()));
        }
        let url = format!("{}/train-{i:03}.tar", dir.trim_end_matches('/'));
        put_shard(&url, &files);
        urls.push(url);
    }
    urls
}

/// Loader settings for 8 x 8 images.
pub fn config(batch_size: usize, reader: ReaderConfig) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        preprocess: Preprocess {
            size: 8,
            random_crop: false,
            flip: false,
        },
        reader,
        require_masks: false,
    }
}

/// One rank reading its shards in the order given, with no sample buffer.
pub fn sequential() -> ReaderConfig {
    ReaderConfig {
        shuffle_shards: false,
        ..ReaderConfig::default()
    }
}

/// Loader settings for the 32 x 32 embedded images: random crop and flip when `train`
/// (shards shuffled per epoch), centre crop otherwise.
pub fn crops(batch_size: usize, train: bool, seed: u64) -> LoaderConfig {
    let preprocess = Preprocess {
        size: 32,
        random_crop: train,
        flip: train,
    };
    LoaderConfig::simple(batch_size, preprocess, seed, train)
}

/// A PNG whose header says `w` x `h` (8-bit, `color`: 0 grey, 2 RGB) but whose data holds
/// only its first row: what an attacker sends to make a decoder allocate from the header.
pub fn png_header_claiming(w: u32, h: u32, color: u8) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }
    let channels = if color == 2 { 3 } else { 1 };
    let row: Vec<u8> = std::iter::once(0)
        .chain(std::iter::repeat_n(0, (w * channels) as usize))
        .collect();
    // zlib: header, stored deflate blocks holding the row, Adler-32.
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = row.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push((i + 1 == blocks.len()) as u8);
        zlib.extend((block.len() as u16).to_le_bytes());
        zlib.extend((!(block.len() as u16)).to_le_bytes());
        zlib.extend(*block);
    }
    zlib.extend(adler32(&row).to_be_bytes());
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, color, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &zlib);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in bytes {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// The most memory this process has held (VmHWM), in bytes.
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kb * 1024
}
