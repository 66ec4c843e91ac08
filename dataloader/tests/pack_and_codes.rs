//! Packing image folders into shards at object-store URLs, and code Parquet with its manifest.

mod common;

use std::path::Path;

use common::{config, mask_png, png, png_from, sequential};
use taming_dataloader::codes::{self, CodeRow, ManifestFile};
use taming_dataloader::pack::{Layout, PackOptions, pack};
use taming_dataloader::shards::list_split;
use taming_dataloader::{LoaderState, ShardLoader};

fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn jpeg() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(10, 9, image::Rgb([200, 10, 10]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn read_all(dir: &str) -> taming_dataloader::ImageBatch {
    let shards = list_split(dir, "train").unwrap();
    ShardLoader::open(&shards, config(64, sequential()), &LoaderState::default())
        .unwrap()
        .next_in_epoch()
        .unwrap()
        .unwrap()
}

#[test]
fn an_imagefolder_packs_into_small_shards_with_class_labels() {
    let tmp = tempfile::tempdir().unwrap();
    for (class, n) in [("cat", 3), ("dog", 2)] {
        for i in 0..n {
            write(&tmp.path().join(format!("{class}/{i}.png")), &png());
        }
    }
    write(&tmp.path().join("dog/x.JPEG"), &jpeg());
    write(&tmp.path().join("dog/readme.txt"), b"not an image");
    let out = tmp.path().join("out").to_string_lossy().into_owned();
    let report = pack(&PackOptions {
        input: tmp.path().to_path_buf(),
        layout: Layout::ImageFolder,
        out: out.clone(),
        prefix: "train".into(),
        shard_bytes: 3000,
    })
    .unwrap();
    assert_eq!(report.samples, 6);
    assert!(report.shards.len() >= 2, "{:?}", report.shards);
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("train-") && n.ends_with(".tar")),
        "{names:?}"
    );
    let batch = read_all(&out);
    let mut got: Vec<(String, Option<i64>)> = batch.keys.into_iter().zip(batch.labels).collect();
    got.sort();
    assert_eq!(got[0], ("cat/0".to_string(), Some(0)));
    assert_eq!(got[5], ("dog/x".to_string(), Some(1)));
}

#[test]
fn pairs_pack_label_maps_beside_images_and_skip_images_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let img = png_from(10, 8, |x, _| [x as u8 * 20, 0, 0]);
    for i in 0..3 {
        write(&tmp.path().join(format!("images/{i}.png")), &img);
    }
    for i in 0..2 {
        write(
            &tmp.path().join(format!("labels/{i}.png")),
            &mask_png(10, 8, |_, _| 3),
        );
    }
    let report = pack(&PackOptions {
        input: tmp.path().join("images"),
        layout: Layout::Pairs {
            masks: tmp.path().join("labels"),
            label_offset: 0,
        },
        out: "memory://packed-pairs/ds".into(),
        prefix: "train".into(),
        shard_bytes: 1 << 20,
    })
    .unwrap();
    assert_eq!(
        (report.samples, report.skipped, report.shards.len()),
        (2, 1, 1)
    );
    let batch = read_all("memory://packed-pairs/ds");
    assert_eq!(batch.keys, ["0", "1"]);
    assert!(batch.masks.unwrap().iter().all(|&m| m == 3));
}

/// COCO-Stuff's label maps (classes 0..=181, unlabeled 255) packed with `label_offset: 1`
/// hold the reference's ids: unlabeled 0, classes 1..=182; a map that is not ids (colour)
/// is skipped and counted.
#[test]
fn a_label_offset_shifts_coco_stuff_ids_as_the_reference_does() {
    let tmp = tempfile::tempdir().unwrap();
    let img = png_from(10, 8, |x, _| [x as u8 * 20, 0, 0]);
    let ids = |x: u32, y: u32| [0u8, 5, 181, 255][((x + y) % 4) as usize];
    for i in 0..2 {
        write(&tmp.path().join(format!("images/{i}.png")), &img);
    }
    write(&tmp.path().join("labels/0.png"), &mask_png(10, 8, ids));
    write(&tmp.path().join("labels/1.png"), &img);
    let report = pack(&PackOptions {
        input: tmp.path().join("images"),
        layout: Layout::Pairs {
            masks: tmp.path().join("labels"),
            label_offset: 1,
        },
        out: "memory://packed-coco/ds".into(),
        prefix: "train".into(),
        shard_bytes: 1 << 20,
    })
    .unwrap();
    assert_eq!((report.samples, report.skipped), (1, 1));
    let batch = read_all("memory://packed-coco/ds");
    // The centre 8x8 crop of the 10x8 map: columns 1..9.
    let want: Vec<u8> = (0..8)
        .flat_map(|y| (1..9).map(move |x| ids(x, y).wrapping_add(1)))
        .collect();
    assert_eq!(batch.masks.unwrap(), want);
}

/// A plain folder: every image below it in any letter case of its extension, keyed by its
/// path (also past the tar header's 100 bytes); files that would share a key are packed once,
/// the rest skipped and counted.
#[test]
fn a_plain_folder_packs_every_image_below_it_once_per_key() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("photos");
    write(&input.join("a.png"), &png());
    write(&input.join("a.JPG"), &jpeg());
    write(&input.join("trip/b.Png"), &png());
    write(&input.join("trip/day.2/c.jpeg"), &jpeg());
    write(&input.join("trip/day_2/c.png"), &png());
    // A path past the tar header's 100 bytes (a GNU long-name entry).
    let deep = format!("{}/d.png", ["a_rather_long_folder_name"; 5].join("/"));
    write(&input.join(&deep), &png());
    write(&input.join("notes.txt"), b"not an image");
    let report = pack(&PackOptions {
        input,
        layout: Layout::Plain,
        out: "memory://packed-plain/ds".into(),
        prefix: "train".into(),
        shard_bytes: 1 << 20,
    })
    .unwrap();
    assert_eq!((report.samples, report.skipped), (4, 2));
    let batch = read_all("memory://packed-plain/ds");
    let deep_key = deep.trim_end_matches(".png");
    assert_eq!(batch.keys, ["a", deep_key, "trip/b", "trip/day_2/c"]);
    assert!(batch.labels.iter().all(Option::is_none));
}

#[test]
fn packing_into_an_unwritable_place_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("in/a.png"), &png());
    write(&tmp.path().join("blocker"), b"a file, not a folder");
    let out = tmp
        .path()
        .join("blocker/out")
        .to_string_lossy()
        .into_owned();
    let err = pack(&PackOptions {
        input: tmp.path().join("in"),
        layout: Layout::Plain,
        out: out.clone(),
        prefix: "train".into(),
        shard_bytes: 1 << 20,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("blocker/out/train-000000.tar"), "{err}");
}

fn rows(n: usize, cond: bool) -> Vec<CodeRow> {
    (0..n)
        .map(|i| CodeRow {
            key: format!("k{i}"),
            codes: (0..16).map(|j| ((i * 31 + j * 7) % 1024) as i32).collect(),
            height: 4,
            width: 4,
            label: (i % 3 != 0).then_some(i as i64 % 10),
            cond_codes: cond.then(|| vec![i as i32; 4]),
            shard: "s3://b/train-000.tar".into(),
        })
        .collect()
}

#[test]
fn code_parquet_round_trips_with_nulls_and_the_manifest_lists_it() {
    let dir = "memory://codes/set";
    let a = rows(5000, false);
    let b = rows(7, true);
    codes::write_codes(&codes::join(dir, "a.parquet"), &a).unwrap();
    codes::write_codes(&codes::join(dir, "b.parquet"), &b).unwrap();
    assert_eq!(
        codes::read_codes(&codes::join(dir, "a.parquet")).unwrap(),
        a
    );
    assert_eq!(
        codes::read_codes(&codes::join(dir, "b.parquet")).unwrap(),
        b
    );
    let files = vec![
        ManifestFile {
            path: "a.parquet".into(),
            rows: 5000,
        },
        ManifestFile {
            path: "b.parquet".into(),
            rows: 7,
        },
    ];
    codes::write_manifest(dir, files.clone()).unwrap();
    let manifest = codes::read_manifest(dir).unwrap();
    assert_eq!((manifest.files, manifest.rows), (files, 5007));
}
