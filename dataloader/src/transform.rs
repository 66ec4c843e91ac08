//! Decoding and augmentation: the reference's preprocessing (shorter side to `size`, random
//! crop for training or center crop for validation, x/127.5 - 1) plus an optional
//! horizontal flip.

use image::imageops::FilterType;
use image::{GrayImage, RgbImage};
use rand::Rng;

/// How images become model inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preprocess {
    /// Output side length.
    pub size: usize,
    /// Random crop (training) instead of center crop (validation).
    pub random_crop: bool,
    /// Flip horizontally with probability 1/2.
    pub flip: bool,
}

/// A decoded, cropped sample: CHW pixels and, when given, the label map cropped alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    /// `[3, size, size]` bytes.
    pub image: Vec<u8>,
    /// `[size, size]` label ids.
    pub mask: Option<Vec<u8>>,
}

impl Preprocess {
    /// Decodes `bytes` (PNG, JPEG, WebP) and returns CHW floats in [-1, 1].
    pub fn apply(&self, bytes: &[u8], rng: &mut impl Rng) -> Result<Vec<f32>, String> {
        Ok(normalize(&self.apply_pixels(bytes, None, rng)?.image))
    }

    /// Decodes an image and optionally its label map (which must have the image's size),
    /// resizes both on the shorter side (bilinear for the image, nearest for labels) and
    /// crops and flips them identically.
    pub fn apply_pixels(
        &self,
        image: &[u8],
        mask: Option<&[u8]>,
        rng: &mut impl Rng,
    ) -> Result<Pixels, String> {
        let img = image::load_from_memory(image)
            .map_err(|e| format!("image: {e}"))?
            .to_rgb8();
        let mask = mask.map(|m| decode_mask(m, img.dimensions())).transpose()?;
        let img = resize_shorter(img, self.size);
        let (left, top) = self.crop_origin(img.dimensions(), rng);
        let flip = self.flip && rng.random_bool(0.5);
        let s = self.size as u32;
        let img = image::imageops::crop_imm(&img, left, top, s, s).to_image();
        let mask = mask.map(|m| {
            let (w, h) = img_dims_after_resize(&m, self.size);
            let m = image::imageops::resize(&m, w, h, FilterType::Nearest);
            let m = image::imageops::crop_imm(&m, left, top, s, s).to_image();
            flip_rows(m.into_raw(), self.size, flip)
        });
        Ok(Pixels {
            image: to_chw(&img, flip),
            mask,
        })
    }

    fn crop_origin(&self, (w, h): (u32, u32), rng: &mut impl Rng) -> (u32, u32) {
        let s = self.size as u32;
        if self.random_crop {
            (rng.random_range(0..=w - s), rng.random_range(0..=h - s))
        } else {
            ((w - s) / 2, (h - s) / 2)
        }
    }
}

/// x / 127.5 - 1.
pub fn normalize(pixels: &[u8]) -> Vec<f32> {
    pixels.iter().map(|&p| p as f32 / 127.5 - 1.0).collect()
}

fn decode_mask(bytes: &[u8], image_dims: (u32, u32)) -> Result<GrayImage, String> {
    let mask = image::load_from_memory(bytes)
        .map_err(|e| format!("mask: {e}"))?
        .to_luma8();
    if mask.dimensions() != image_dims {
        return Err(format!(
            "mask is {}x{} but its image is {}x{}",
            mask.width(),
            mask.height(),
            image_dims.0,
            image_dims.1
        ));
    }
    Ok(mask)
}

fn img_dims_after_resize(img: &GrayImage, size: usize) -> (u32, u32) {
    let (w, h) = img.dimensions();
    resized_dims(w, h, size)
}

fn resized_dims(w: u32, h: u32, size: usize) -> (u32, u32) {
    let scale = size as f64 / w.min(h) as f64;
    let nw = ((w as f64 * scale).round() as u32).max(size as u32);
    let nh = ((h as f64 * scale).round() as u32).max(size as u32);
    (nw, nh)
}

fn flip_rows(mut data: Vec<u8>, size: usize, flip: bool) -> Vec<u8> {
    if flip {
        data.chunks_mut(size).for_each(<[u8]>::reverse);
    }
    data
}

/// Resizes so that the shorter side is `size` (bilinear convolution, antialiased when
/// shrinking, as PIL does; SIMD through `fast_image_resize`), keeping the aspect ratio.
pub fn resize_shorter(img: RgbImage, size: usize) -> RgbImage {
    use fast_image_resize as fr;
    let (w, h) = img.dimensions();
    let (nw, nh) = resized_dims(w, h, size);
    if (nw, nh) == (w, h) {
        return img;
    }
    let src = fr::images::Image::from_vec_u8(w, h, img.into_raw(), fr::PixelType::U8x3)
        .expect("an RGB buffer of its own size");
    let mut dst = fr::images::Image::new(nw, nh, fr::PixelType::U8x3);
    let opts =
        fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    fr::Resizer::new()
        .resize(&src, &mut dst, &opts)
        .expect("same pixel types");
    RgbImage::from_raw(nw, nh, dst.into_vec()).expect("a buffer of the new size")
}

fn to_chw(img: &RgbImage, flip: bool) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut out = vec![0u8; 3 * h * w];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        let (y, x) = (i / w, i % w);
        let x = if flip { w - 1 - x } else { x };
        for c in 0..3 {
            out[c * h * w + y * w + x] = px[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 255]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn center_crop_of_a_wide_image_keeps_the_middle_and_scales_to_unit_range() {
        let p = Preprocess {
            size: 4,
            random_crop: false,
            flip: false,
        };
        let v = p.apply(&png(8, 4), &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(v.len(), 3 * 16);
        // Red channel = x: columns 2..6 of the original.
        assert_eq!(v[0], 2.0 / 127.5 - 1.0);
        assert_eq!(v[3], 5.0 / 127.5 - 1.0);
        assert_eq!(v[2 * 16], 1.0, "blue 255 maps to 1");
    }

    #[test]
    fn flip_mirrors_columns() {
        let p = Preprocess {
            size: 4,
            random_crop: false,
            flip: true,
        };
        let mut rng = StdRng::seed_from_u64(1);
        let runs: Vec<Vec<f32>> = (0..8)
            .map(|_| p.apply(&png(4, 4), &mut rng).unwrap())
            .collect();
        assert!(
            runs.iter().any(|v| v[0] == 3.0 / 127.5 - 1.0),
            "some flipped"
        );
        assert!(runs.iter().any(|v| v[0] == -1.0), "some not flipped");
    }

    #[test]
    fn garbage_bytes_are_an_error() {
        let p = Preprocess {
            size: 4,
            random_crop: true,
            flip: false,
        };
        assert!(
            p.apply(b"not an image", &mut StdRng::seed_from_u64(0))
                .is_err()
        );
    }
}
