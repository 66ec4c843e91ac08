//! `dataloader pack`: image folders into WebDataset shards of a target size, each written to
//! any object-store URL so that a shard appears only when complete.
//!
//! Layouts: `imagefolder` (one folder per class, ImageNet style: `.cls` is the class's index
//! in sorted folder order, `.json` holds the class name), `pairs` (COCO-Stuff / ADE20K:
//! images and label maps with the same stem in two folders; the map becomes `.seg.png`) and
//! `plain` (every image below a folder). Files are stored as they are, not re-encoded, except
//! label maps given a label offset (COCO-Stuff's `+1`).

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::codes::{join, upload};
use crate::error::DataError;

/// Image extensions packed, in any letter case (`.JPEG`, `.JPG`, `.Png`, ...).
const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// How the input folder is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// `root/<class>/<image>`.
    ImageFolder,
    /// Images in one folder, label maps (`<stem>.png`) in another.
    Pairs {
        /// The label-map folder.
        masks: PathBuf,
        /// Added to every label id, wrapping at 256 (COCO-Stuff: 1, so that its unlabeled
        /// 255 becomes 0 and classes 0..=181 become 1..=182, as the reference's loader
        /// shifts them); the maps are then stored re-encoded as 8-bit grayscale PNGs.
        label_offset: u8,
    },
    /// Every image below the root.
    Plain,
}

/// Packing settings.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// The input folder (the images, for `pairs`).
    pub input: PathBuf,
    /// Its layout.
    pub layout: Layout,
    /// Output directory URL or path.
    pub out: String,
    /// Shard name prefix (`train` gives `train-000000.tar`, ...).
    pub prefix: String,
    /// A shard is closed once it holds at least this many bytes.
    pub shard_bytes: usize,
}

/// What a pack wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackReport {
    /// The shards written, in order.
    pub shards: Vec<String>,
    /// Samples packed.
    pub samples: usize,
    /// Inputs skipped (a warning names each).
    pub skipped: usize,
}

/// One sample to pack: key and its files (extension, source path).
struct Entry {
    key: String,
    files: Vec<(String, Bytes)>,
}

/// Packs `opts.input` into shards under `opts.out`.
pub fn pack(opts: &PackOptions) -> Result<PackReport, DataError> {
    let (plan, mut skipped) = plan(opts)?;
    let mut report = PackReport {
        shards: Vec::new(),
        samples: 0,
        skipped: 0,
    };
    let mut shard = ShardBuffer::default();
    for item in plan {
        let entry = match item.load() {
            Ok(e) => e,
            Err(why) => {
                skipped += 1;
                tracing::warn!(input = %item.source.display(), "skipping: {why}");
                continue;
            }
        };
        shard.append(&entry).map_err(|e| write_err(&opts.out, e))?;
        report.samples += 1;
        if shard.len() >= opts.shard_bytes {
            report
                .shards
                .push(flush(&mut shard, opts, report.shards.len())?);
        }
    }
    if shard.samples > 0 {
        report
            .shards
            .push(flush(&mut shard, opts, report.shards.len())?);
    }
    report.skipped = skipped;
    Ok(report)
}

fn flush(shard: &mut ShardBuffer, opts: &PackOptions, n: usize) -> Result<String, DataError> {
    let url = join(&opts.out, &format!("{}-{n:06}.tar", opts.prefix));
    let data = std::mem::take(shard)
        .finish()
        .map_err(|e| write_err(&url, e))?;
    upload(&url, data.into())?;
    tracing::info!(shard = %url, "written");
    Ok(url)
}

fn write_err(target: &str, e: std::io::Error) -> DataError {
    DataError::Write {
        target: target.to_string(),
        reason: e.to_string(),
    }
}

#[derive(Default)]
struct ShardBuffer {
    builder: Option<tar::Builder<Vec<u8>>>,
    samples: usize,
}

impl ShardBuffer {
    fn append(&mut self, entry: &Entry) -> std::io::Result<()> {
        let builder = self
            .builder
            .get_or_insert_with(|| tar::Builder::new(Vec::new()));
        for (ext, data) in &entry.files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            builder.append_data(&mut header, format!("{}.{ext}", entry.key), &data[..])?;
        }
        self.samples += 1;
        Ok(())
    }

    fn len(&self) -> usize {
        self.builder.as_ref().map_or(0, |b| b.get_ref().len())
    }

    fn finish(self) -> std::io::Result<Vec<u8>> {
        self.builder.map_or(Ok(Vec::new()), |b| b.into_inner())
    }
}

/// A planned sample: where its image is and what goes beside it.
struct Planned {
    key: String,
    source: PathBuf,
    mask: Option<PathBuf>,
    label_offset: u8,
    class: Option<(usize, String)>,
}

impl Planned {
    fn load(&self) -> Result<Entry, String> {
        let read = |p: &Path| {
            std::fs::read(p)
                .map(Bytes::from)
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let ext = extension(&self.source).ok_or("no image extension")?;
        let mut files = vec![(ext, read(&self.source)?)];
        if let Some(mask) = &self.mask {
            let mut bytes = read(mask)?;
            if self.label_offset != 0 {
                bytes = shift_labels(&bytes, self.label_offset)
                    .map_err(|e| format!("{}: {e}", mask.display()))?;
            }
            files.push(("seg.png".into(), bytes));
        }
        if let Some((index, name)) = &self.class {
            files.push(("cls".into(), Bytes::from(index.to_string())));
            let json = serde_json::json!({ "label": index, "class": name });
            files.push(("json".into(), Bytes::from(json.to_string())));
        }
        Ok(Entry {
            key: self.key.clone(),
            files,
        })
    }
}

/// The label map with `offset` added to every id (wrapping), as an 8-bit grayscale PNG.
fn shift_labels(png: &[u8], offset: u8) -> Result<Bytes, String> {
    let map = crate::label_map::decode_with_offset(png, offset)?;
    let mut out = std::io::Cursor::new(Vec::new());
    map.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| format!("label map: {e}"))?;
    Ok(out.into_inner().into())
}

/// The extension an image is stored under (lower case, `.jpeg` as `.jpg`), or None for a
/// file that is not an image.
fn extension(p: &Path) -> Option<String> {
    let ext = p.extension()?.to_str()?.to_ascii_lowercase();
    IMAGE_EXTS
        .contains(&ext.as_str())
        .then(|| if ext == "jpeg" { "jpg".into() } else { ext })
}

/// Keeps the first image of each key: two files that map to one key (`a.jpg` beside `a.png`,
/// or `a.b.png` beside `a_b.png`) would otherwise become one sample. Each dropped file is
/// warned about and counted.
fn unique_keys(plan: Vec<Planned>) -> (Vec<Planned>, usize) {
    let mut seen = std::collections::HashSet::new();
    let (kept, dropped): (Vec<_>, Vec<_>) =
        plan.into_iter().partition(|p| seen.insert(p.key.clone()));
    for p in &dropped {
        tracing::warn!(input = %p.source.display(), key = %p.key, "skipping: another image has the same key");
    }
    (kept, dropped.len())
}

fn plan(opts: &PackOptions) -> Result<(Vec<Planned>, usize), DataError> {
    let images = |dir: &Path| -> Result<Vec<PathBuf>, DataError> {
        let mut files = walk(dir)?;
        files.retain(|p| extension(p).is_some());
        files.sort();
        Ok(files)
    };
    let key_of = |root: &Path, p: &Path| -> String {
        let rel = p.strip_prefix(root).unwrap_or(p).with_extension("");
        rel.to_string_lossy().replace(['.', '\\'], "_")
    };
    let mut skipped = 0;
    let plan = match &opts.layout {
        Layout::Plain => images(&opts.input)?
            .into_iter()
            .map(|p| Planned {
                key: key_of(&opts.input, &p),
                source: p,
                mask: None,
                label_offset: 0,
                class: None,
            })
            .collect(),
        Layout::ImageFolder => {
            let classes = subdirs(&opts.input)?;
            let mut plan = Vec::new();
            for (index, dir) in classes.iter().enumerate() {
                let name = dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                for p in images(dir)? {
                    let key = key_of(&opts.input, &p);
                    plan.push(Planned {
                        key,
                        source: p,
                        mask: None,
                        label_offset: 0,
                        class: Some((index, name.clone())),
                    });
                }
            }
            plan
        }
        Layout::Pairs {
            masks,
            label_offset,
        } => {
            let mut plan = Vec::new();
            for p in images(&opts.input)? {
                let rel = p
                    .strip_prefix(&opts.input)
                    .unwrap_or(&p)
                    .with_extension("png");
                let mask = masks.join(rel);
                if !mask.is_file() {
                    skipped += 1;
                    tracing::warn!(input = %p.display(), "skipping: no label map {}", mask.display());
                    continue;
                }
                plan.push(Planned {
                    key: key_of(&opts.input, &p),
                    source: p,
                    mask: Some(mask),
                    label_offset: *label_offset,
                    class: None,
                });
            }
            plan
        }
    };
    let (plan, duplicates) = unique_keys(plan);
    skipped += duplicates;
    if plan.is_empty() {
        return Err(DataError::NoShards {
            dir: opts.input.clone(),
            pattern: "images (.jpg, .jpeg, .png, .webp)".into(),
        });
    }
    Ok((plan, skipped))
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::Url {
        url: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut out: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    out.sort();
    Ok(out)
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(read_dir(dir)?.into_iter().filter(|p| p.is_dir()).collect())
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    for p in read_dir(dir)? {
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}
