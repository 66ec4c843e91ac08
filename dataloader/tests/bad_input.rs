//! Corrupt, truncated and hostile shard contents are skipped with a counter and the run goes
//! on; masks follow their images; labels come from `.cls` or `.json`.

mod common;

use common::{config, mask_png, png, png_from, put_shard, sequential, tar_bytes};
use taming_dataloader::codes::upload;
use taming_dataloader::{LoaderState, ShardLoader};

#[test]
fn bad_entries_and_broken_shards_are_skipped_and_counted() {
    let good = png();
    let dir = "memory://bad/shards";
    put_shard(
        &format!("{dir}/train-0.tar"),
        &[
            ("a.png", &good),
            ("../evil.png", &good),
            ("b.png", &good[..good.len() / 2]),
            ("c.png", &good),
            ("c.seg.png", &mask_png(3, 3, |_, _| 1)),
            ("d.json", b"{\"label\": 4}"),
            ("d.png", &good),
            ("e.cls", b"1"),
        ],
    );
    let whole = tar_bytes(&[("f.png", &good), ("g.png", &good), ("h.png", &good)]);
    upload(&format!("{dir}/train-1.tar"), whole[..700].to_vec().into()).unwrap();
    upload(
        &format!("{dir}/train-2.tar"),
        b"this is not a tar archive at all".to_vec().into(),
    )
    .unwrap();
    put_shard(&format!("{dir}/train-3.tar"), &[("z.png", &good)]);
    let urls: Vec<String> = (0..4).map(|i| format!("{dir}/train-{i}.tar")).collect();
    let mut loader =
        ShardLoader::open(&urls, config(16, sequential()), &LoaderState::default()).unwrap();
    let batch = loader.next_in_epoch().unwrap().unwrap();
    let keys: Vec<&str> = batch.keys.iter().map(String::as_str).collect();
    assert!(keys.starts_with(&["a", "d"]), "{keys:?}");
    assert_eq!(
        keys.last(),
        Some(&"z"),
        "the shards after the broken ones are read"
    );
    assert!(!keys.contains(&"../evil"));
    assert_eq!(batch.labels[1], Some(4), "label from .json");
    // evil (traversal), b (truncated image), c (mask of another size), e (no image).
    assert!(loader.skipped() >= 4, "skipped {}", loader.skipped());
    assert!(loader.bad_shards() >= 1, "the non-tar shard is abandoned");
    assert!(loader.next_in_epoch().unwrap().is_none());
}

#[test]
fn masks_are_cropped_and_flipped_with_their_image() {
    // Left half red 0 / label 1, right half red 255 / label 2; 12 x 8 with size 8 means a
    // random horizontal crop and no resize.
    let img = png_from(12, 8, |x, _| [if x < 6 { 0 } else { 255 }, 0, 0]);
    let mask = mask_png(12, 8, |x, _| if x < 6 { 1 } else { 2 });
    let files: Vec<(String, Vec<u8>)> = (0..16)
        .flat_map(|i| {
            [
                (format!("k{i:02}.png"), img.clone()),
                (format!("k{i:02}.seg.png"), mask.clone()),
            ]
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
    put_shard("memory://masks/train-0.tar", &refs);
    let mut cfg = config(16, sequential());
    cfg.preprocess.random_crop = true;
    cfg.preprocess.flip = true;
    let urls = vec!["memory://masks/train-0.tar".to_string()];
    let batch = ShardLoader::open(&urls, cfg, &LoaderState::default())
        .unwrap()
        .next_in_epoch()
        .unwrap()
        .unwrap();
    let masks = batch.masks.expect("masks");
    assert_eq!(masks.len(), 16 * 64);
    let mut flipped = 0;
    for n in 0..16 {
        for p in 0..64 {
            let red = batch.images[n * 3 * 64 + p];
            let label = masks[n * 64 + p];
            assert_eq!(red > 0.0, label == 2, "sample {n} pixel {p}");
        }
        flipped += (masks[n * 64] == 2) as usize;
    }
    assert!(
        flipped > 0 && flipped < 16,
        "some flipped, some not: {flipped}"
    );
}

/// A sample without a label map: where every sample needs one it is skipped and counted;
/// otherwise it is kept and the batch goes without label maps.
#[test]
fn samples_without_a_label_map_are_skipped_only_where_maps_are_required() {
    let (img, seg) = (
        png_from(8, 8, |x, _| [x as u8, 0, 0]),
        mask_png(8, 8, |x, _| x as u8),
    );
    put_shard(
        "memory://no-mask/train-0.tar",
        &[
            ("a.png", &img),
            ("a.seg.png", &seg),
            ("b.png", &img),
            ("c.png", &img),
            ("c.seg.png", &seg),
        ],
    );
    let urls = vec!["memory://no-mask/train-0.tar".to_string()];
    let read = |require_masks| {
        let cfg = taming_dataloader::LoaderConfig {
            require_masks,
            ..config(3, sequential())
        };
        let mut loader = ShardLoader::open(&urls, cfg, &LoaderState::default()).unwrap();
        let batch = loader.next_in_epoch().unwrap().unwrap();
        (batch, loader.skipped())
    };
    let (batch, skipped) = read(true);
    assert_eq!(batch.keys, ["a", "c"]);
    assert_eq!(skipped, 1);
    assert_eq!(batch.masks.unwrap().len(), 2 * 64);
    let (batch, skipped) = read(false);
    assert_eq!(batch.keys, ["a", "b", "c"]);
    assert_eq!(skipped, 0);
    assert!(batch.masks.is_none());
}

#[test]
fn webp_and_jpeg_samples_decode_like_png() {
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 90]));
    let encode = |format| {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    };
    let (png, webp, jpg) = (
        encode(image::ImageFormat::Png),
        encode(image::ImageFormat::WebP),
        encode(image::ImageFormat::Jpeg),
    );
    put_shard(
        "memory://formats/train-0.tar",
        &[("a.png", &png), ("b.webp", &webp), ("c.jpg", &jpg)],
    );
    let urls = vec!["memory://formats/train-0.tar".to_string()];
    let batch = ShardLoader::open(&urls, config(3, sequential()), &LoaderState::default())
        .unwrap()
        .next_in_epoch()
        .unwrap()
        .unwrap();
    assert_eq!(batch.keys, ["a", "b", "c"]);
    let per = 3 * 64;
    let (a, b, c) = (
        &batch.images[..per],
        &batch.images[per..2 * per],
        &batch.images[2 * per..],
    );
    assert_eq!(a, b, "lossless WebP decodes to the PNG's pixels");
    let worst = a
        .iter()
        .zip(c)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(worst < 0.2, "JPEG close to the PNG: {worst}");
}
