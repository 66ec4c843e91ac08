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
