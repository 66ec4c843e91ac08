//! Label maps are class indices: palette PNGs give their indices (not their colours),
//! grayscale ones their values at every bit depth; colour maps and classes past 255 are
//! refused with what is wrong.

mod common;

use common::{config, png_from, put_shard, sequential};
use png::{BitDepth, ColorType};
use rand::SeedableRng;
use taming_dataloader::label_map::decode;
use taming_dataloader::{LoaderState, Preprocess, ShardLoader};

/// A PNG of `w` x `h` with `rows` already packed as the PNG stores them.
fn encode(w: u32, h: u32, color: ColorType, depth: BitDepth, rows: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(color);
    enc.set_depth(depth);
    if color == ColorType::Indexed {
        // Colours whose brightness has nothing to do with their index.
        let palette: Vec<u8> = (0..256u32)
            .flat_map(|i| [(i * 97 % 256) as u8, 255 - i as u8, (i * 31 % 256) as u8])
            .collect();
        enc.set_palette(palette);
    }
    enc.write_header().unwrap().write_image_data(rows).unwrap();
    out
}

/// `values` (row-major, `w` a row) packed at `bits` per value, each row padded to a byte.
fn pack(values: &[u8], w: usize, bits: usize) -> Vec<u8> {
    values
        .chunks(w)
        .flat_map(|row| {
            let mut out = vec![0u8; (w * bits).div_ceil(8)];
            for (x, &v) in row.iter().enumerate() {
                out[x * bits / 8] |= v << (8 - bits - x * bits % 8);
            }
            out
        })
        .collect()
}

/// Index pattern of a `w` x `h` map with values below `classes`.
fn pattern(w: usize, h: usize, classes: usize) -> Vec<u8> {
    (0..w * h)
        .map(|i| ((i * 7 + i / w) % classes) as u8)
        .collect()
}

#[test]
fn palette_maps_give_their_indices_at_every_bit_depth() {
    let (w, h) = (5, 3);
    for (depth, bits) in [
        (BitDepth::One, 1),
        (BitDepth::Two, 2),
        (BitDepth::Four, 4),
        (BitDepth::Eight, 8),
    ] {
        let want = pattern(w, h, 1 << bits.min(7));
        let png = encode(
            w as u32,
            h as u32,
            ColorType::Indexed,
            depth,
            &pack(&want, w, bits),
        );
        let map = decode(&png).unwrap();
        assert_eq!(map.dimensions(), (w as u32, h as u32));
        assert_eq!(map.into_raw(), want, "{bits}-bit palette");
    }
}

#[test]
fn grayscale_maps_give_their_values_unscaled() {
    let (w, h) = (6, 2);
    let want = pattern(w, h, 4);
    let png = encode(
        6,
        2,
        ColorType::Grayscale,
        BitDepth::Two,
        &pack(&want, w, 2),
    );
    assert_eq!(
        decode(&png).unwrap().into_raw(),
        want,
        "2-bit gray is not scaled to 0..255"
    );

    let wide = |v: &[u16]| v.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
    let values: Vec<u16> = (0..12).map(|i| i * 20).collect();
    let png = encode(
        6,
        2,
        ColorType::Grayscale,
        BitDepth::Sixteen,
        &wide(&values),
    );
    let got = decode(&png).unwrap().into_raw();
    assert_eq!(got, values.iter().map(|&v| v as u8).collect::<Vec<_>>());

    let mut values = values;
    values[5] = 300;
    let png = encode(
        6,
        2,
        ColorType::Grayscale,
        BitDepth::Sixteen,
        &wide(&values),
    );
    let err = decode(&png).unwrap_err();
    assert!(err.contains("class 300") && err.contains("255"), "{err}");
}

#[test]
fn colour_maps_and_non_png_bytes_are_refused() {
    let err = decode(&png_from(4, 4, |x, _| [x as u8, 0, 0])).unwrap_err();
    assert!(
        err.contains("label map is RGB") && err.contains("palette"),
        "{err}"
    );
    let err = decode(b"not a png").unwrap_err();
    assert!(err.starts_with("label map:"), "{err}");
}

/// Through the loader: a VOC-style palette `.seg.png` becomes the batch's label map as
/// indices, and a sample whose map is in colour is skipped and counted.
#[test]
fn the_loader_reads_palette_label_maps_as_indices() {
    let (w, h) = (8, 8);
    let want = pattern(w, h, 21);
    let seg = encode(8, 8, ColorType::Indexed, BitDepth::Eight, &want);
    let img = png_from(8, 8, |x, y| [x as u8, y as u8, 0]);
    let rgb_seg = png_from(8, 8, |_, _| [1, 2, 3]);
    put_shard(
        "memory://palette/train-0.tar",
        &[
            ("a.png", &img),
            ("a.seg.png", &seg),
            ("b.png", &img),
            ("b.seg.png", &rgb_seg),
        ],
    );
    let urls = vec!["memory://palette/train-0.tar".to_string()];
    let mut loader =
        ShardLoader::open(&urls, config(2, sequential()), &LoaderState::default()).unwrap();
    let batch = loader.next_in_epoch().unwrap().unwrap();
    assert_eq!(batch.keys, ["a"]);
    assert_eq!(batch.masks.unwrap(), want);
    assert_eq!(loader.skipped(), 1);
}

/// Label maps are resized by nearest neighbours exactly as the reference's segmentation data
/// does it (albumentations' `SmallestMaxSize` with `cv2.INTER_NEAREST`, then a center crop:
/// `tools/fixtures/make_label_resize_fixtures.py`), on a map whose neighbours all differ.
#[test]
fn label_maps_are_resized_as_the_reference_resizes_them() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/label_resize");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let size = expected["size"].as_u64().unwrap() as usize;
    let preprocess = Preprocess {
        size,
        random_crop: false,
        flip: false,
    };
    let image = std::fs::read(dir.join("image.png")).unwrap();
    let map = std::fs::read(dir.join("map.png")).unwrap();
    let mut out = vec![0u8; preprocess.image_len()];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let ours = preprocess
        .apply_into(&image, Some(&map), &mut rng, &mut out)
        .unwrap()
        .expect("a label map");
    let rows = |key: &str| -> Vec<u8> {
        expected[key]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u8)
            })
            .collect()
    };
    let differing = |other: &[u8]| ours.iter().zip(other).filter(|(a, b)| a != b).count();
    assert_eq!(
        differing(&rows("reference")),
        0,
        "pixels differing from the reference's resize (PIL's NEAREST differs in {})",
        differing(&rows("pil"))
    );
}
