//! Decoding and augmentation: the reference's preprocessing (shorter side to `size`, random
//! crop for training or center crop for validation, x/127.5 - 1) plus an optional
//! horizontal flip. The resize is PIL's antialiased bilinear (within one level of PIL's
//! pixels, `tests/resize.rs`), not the reference's cv2 linear, which aliases when it shrinks.
//!
//! Image and label-map sizes are read from their headers and checked before any pixel buffer
//! is made: at most [`MAX_IMAGE_PIXELS`] decoded, and at most as many after the resize (a
//! 1 x 100000 image resized to a shorter side of 256 would be 256 x 25600000).

use image::{GrayImage, RgbImage};
use rand::Rng;

pub use crate::bounds::MAX_IMAGE_PIXELS;
use crate::bounds::check_pixels;

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

/// A channel value the loader writes: the byte as decoded, or x / 127.5 - 1.
pub trait Channel: Copy + Default + Send + Sync + 'static {
    /// The value of byte `p`.
    fn from_byte(p: u8) -> Self;
}

impl Channel for u8 {
    fn from_byte(p: u8) -> Self {
        p
    }
}

/// x / 127.5 - 1 for every byte, computed once at compile time (the same numbers as at run
/// time, without a division per element).
const UNIT: [f32; 256] = {
    let mut table = [0.0; 256];
    let mut p = 0;
    while p < 256 {
        table[p] = p as f32 / 127.5 - 1.0;
        p += 1;
    }
    table
};

impl Channel for f32 {
    fn from_byte(p: u8) -> Self {
        UNIT[p as usize]
    }
}

impl Preprocess {
    /// Values per image: `3 x size x size`.
    pub fn image_len(&self) -> usize {
        3 * self.size * self.size
    }

    /// Decodes `bytes` (PNG, JPEG, WebP) and returns CHW floats in [-1, 1].
    pub fn apply(&self, bytes: &[u8], rng: &mut impl Rng) -> Result<Vec<f32>, String> {
        let mut out = vec![0.0; self.image_len()];
        self.apply_into(bytes, None, rng, &mut out)?;
        Ok(out)
    }

    /// Decodes an image and optionally its label map (which must have the image's size),
    /// resizes both on the shorter side (bilinear for the image, nearest for labels), crops
    /// and flips them identically, writes the image into `out` (`[3, size, size]`) and
    /// returns the label map (`[size, size]`).
    pub fn apply_into<T: Channel>(
        &self,
        image: &[u8],
        mask: Option<&[u8]>,
        rng: &mut impl Rng,
        out: &mut [T],
    ) -> Result<Option<Vec<u8>>, String> {
        let img = self.decode_image(image)?;
        let mask = mask
            .map(|m| crate::label_map::decode_sized(m, img.dimensions()))
            .transpose()?;
        let img = resize_shorter(img, self.size);
        let (left, top) = self.crop_origin(img.dimensions(), rng);
        let flip = self.flip && rng.random_bool(0.5);
        let s = self.size as u32;
        crop_to_chw(&img, (left, top), (self.size, flip), out);
        Ok(mask.map(|m| {
            let (w, h) = img_dims_after_resize(&m, self.size);
            let m = resize_nearest(&m, w, h);
            let m = image::imageops::crop_imm(&m, left, top, s, s).to_image();
            flip_rows(m.into_raw(), self.size, flip)
        }))
    }

    /// Decodes an image whose header says it fits [`MAX_IMAGE_PIXELS`], decoded and resized.
    fn decode_image(&self, bytes: &[u8]) -> Result<RgbImage, String> {
        let reader = || {
            image::ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .expect("reading from memory")
        };
        let (w, h) = reader()
            .into_dimensions()
            .map_err(|e| format!("image: {e}"))?;
        check_pixels("image", w, h)?;
        let (nw, nh) = resized_dims(w, h, self.size);
        if nw as u64 * nh as u64 > MAX_IMAGE_PIXELS {
            return Err(format!(
                "image: {w}x{h} would be {nw}x{nh} with its shorter side resized to {}, over \
                 {MAX_IMAGE_PIXELS} pixels",
                self.size
            ));
        }
        Ok(reader()
            .decode()
            .map_err(|e| format!("image: {e}"))?
            .into_rgb8())
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

/// x / 127.5 - 1 for every byte.
pub fn normalize(pixels: &[u8]) -> Vec<f32> {
    pixels.iter().map(|&p| f32::from_byte(p)).collect()
}

/// Nearest-neighbour resize as OpenCV's `INTER_NEAREST`, which the reference's segmentation
/// data uses (through albumentations): output pixel `x` takes input pixel
/// `floor(x * in / out)` (PIL's `NEAREST` takes pixel centres and differs).
fn resize_nearest(m: &GrayImage, w: u32, h: u32) -> GrayImage {
    let (sw, sh) = m.dimensions();
    let (fx, fy) = (sw as f64 / w as f64, sh as f64 / h as f64);
    GrayImage::from_fn(w, h, |x, y| {
        let sx = ((x as f64 * fx).floor() as u32).min(sw - 1);
        let sy = ((y as f64 * fy).floor() as u32).min(sh - 1);
        *m.get_pixel(sx, sy)
    })
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

/// The `size` x `size` window of `img` at `(left, top)` into `out` as CHW planes, mirrored
/// left-right when `flip`: one pass over the window's rows.
fn crop_to_chw<T: Channel>(
    img: &RgbImage,
    (left, top): (u32, u32),
    (size, flip): (usize, bool),
    out: &mut [T],
) {
    let width = img.width() as usize;
    let (left, top) = (left as usize, top as usize);
    let plane = size * size;
    assert_eq!(
        out.len(),
        3 * plane,
        "room for one [3, {size}, {size}] image"
    );
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let raw = img.as_raw();
    let rows = r
        .chunks_exact_mut(size)
        .zip(g.chunks_exact_mut(size))
        .zip(b.chunks_exact_mut(size));
    for (y, ((r, g), b)) in rows.enumerate() {
        let start = ((top + y) * width + left) * 3;
        let row = raw[start..start + 3 * size].chunks_exact(3);
        let planes = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
        if flip {
            deinterleave(row.rev(), planes);
        } else {
            deinterleave(row, planes);
        }
    }
}

/// Writes each pixel's three bytes into the three planes.
fn deinterleave<'a, 'b, T: Channel>(
    pixels: impl Iterator<Item = &'a [u8]>,
    planes: impl Iterator<Item = ((&'b mut T, &'b mut T), &'b mut T)>,
) {
    for (px, ((r, g), b)) in pixels.zip(planes) {
        (*r, *g, *b) = (
            T::from_byte(px[0]),
            T::from_byte(px[1]),
            T::from_byte(px[2]),
        );
    }
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
    fn crop_to_chw_takes_every_channel_of_the_window_mirrored_or_not() {
        let img = RgbImage::from_fn(7, 5, |x, y| {
            image::Rgb([x as u8, y as u8, (10 * x + y) as u8])
        });
        for flip in [false, true] {
            let mut out = vec![0u8; 27];
            crop_to_chw(&img, (2, 1), (3, flip), &mut out);
            for (c, y, x) in
                (0..3).flat_map(|c| (0..3).flat_map(move |y| (0..3).map(move |x| (c, y, x))))
            {
                let sx = 2 + if flip { 2 - x } else { x };
                let want = img.get_pixel(sx as u32, 1 + y as u32)[c];
                assert_eq!(
                    out[c * 9 + y * 3 + x],
                    want,
                    "channel {c} row {y} column {x} flip {flip}"
                );
            }
        }
    }

    /// Both found from the header: a decode over the cap, and a small image whose resize
    /// would be over it (1 x 100000 to a shorter side of 256: 6.5 G pixels).
    #[test]
    fn oversized_images_are_refused_before_decoding_or_resizing() {
        let p = Preprocess {
            size: 256,
            random_crop: false,
            flip: false,
        };
        let tall = image::GrayImage::new(1, 100_000);
        let mut bytes = std::io::Cursor::new(Vec::new());
        tall.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        let e = p
            .apply(&bytes.into_inner(), &mut StdRng::seed_from_u64(0))
            .unwrap_err();
        assert!(e.contains("1x100000") && e.contains("256x25600000"), "{e}");
        let e = check_pixels("image", 60_000, 60_000).unwrap_err();
        assert!(e.contains("60000x60000"), "{e}");
        assert!(check_pixels("image", 9459, 9459).is_ok());
        assert!(check_pixels("image", 0, 5).is_err());
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
