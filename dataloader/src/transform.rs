//! Decoding and augmentation: the reference's preprocessing (shorter side to `size`, random
//! crop for training or center crop for validation, x/127.5 - 1) plus an optional
//! horizontal flip. The resize is PIL's antialiased bilinear (within one level of PIL's
//! pixels, `tests/resize.rs`), not the reference's cv2 linear, which aliases when it shrinks.
//!
//! A JPEG without a label map takes a shorter path to the same crop ([`crate::jpeg`]): the
//! window the crop's filter reads, decoded at the smallest scale (1/8, 1/4, 1/2 or 1) that
//! still holds the output size, then resized with the crop box. Its values stay within 2.5
//! levels (mean; 32 at most, at edges) of the full-decode path
//! ([`Preprocess::apply_full_decode`]; `tests/jpeg.rs`), and any JPEG it cannot decode (CMYK,
//! say) takes the full path.
//!
//! Image and label-map sizes are read from their headers and checked before any pixel buffer
//! is made: at most [`MAX_IMAGE_PIXELS`] decoded, and at most as many after the resize (a
//! 1 x 100000 image resized to a shorter side of 256 would be 256 x 25600000).

use image::{GrayImage, RgbImage};
use rand::Rng;

pub use crate::bounds::MAX_IMAGE_PIXELS;
use crate::bounds::check_pixels;
use crate::jpeg;

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
        let crop = self.crop(image, rng)?;
        if mask.is_none() && jpeg::is_jpeg(image) {
            // A truncated file is an error; any other failure (CMYK, corrupt data) takes the
            // full path, which decodes the image or reports what is wrong with it.
            match self.jpeg_crop_into(image, &crop, out) {
                Ok(()) => return Ok(None),
                Err(e @ jpeg::JpegError::Truncated(_)) => return Err(format!("image: {e}")),
                Err(jpeg::JpegError::Failed(_)) => {}
            }
        }
        self.full_decode_into(image, mask, &crop, out)
    }

    /// The decode-and-crop path without the JPEG window decoding: what
    /// [`Preprocess::apply_into`] computes for every other format, and the yardstick that
    /// the JPEG path is tested against.
    pub fn apply_full_decode(&self, bytes: &[u8], rng: &mut impl Rng) -> Result<Vec<f32>, String> {
        let crop = self.crop(bytes, rng)?;
        let mut out = vec![0.0; self.image_len()];
        self.full_decode_into(bytes, None, &crop, &mut out)?;
        Ok(out)
    }

    /// Where the crop falls, from the image's header, drawing from `rng` as every path does.
    fn crop(&self, bytes: &[u8], rng: &mut impl Rng) -> Result<Crop, String> {
        let ((width, height), resized) = self.image_size(bytes)?;
        let (left, top) = self.crop_origin(resized, rng);
        let flip = self.flip && rng.random_bool(0.5);
        Ok(Crop {
            width,
            height,
            resized,
            left,
            top,
            flip,
        })
    }

    /// Decodes the whole image (and label map), resizes, crops and flips.
    fn full_decode_into<T: Channel>(
        &self,
        image: &[u8],
        mask: Option<&[u8]>,
        crop: &Crop,
        out: &mut [T],
    ) -> Result<Option<Vec<u8>>, String> {
        let img = decode(image)?;
        if img.dimensions() != (crop.width, crop.height) {
            return Err(format!(
                "image: decoded {:?}, its header says {}x{}",
                img.dimensions(),
                crop.width,
                crop.height
            ));
        }
        let mask = mask
            .map(|m| crate::label_map::decode_sized(m, img.dimensions()))
            .transpose()?;
        let img = resize_shorter(img, self.size);
        let (s, origin) = (self.size as u32, (crop.left, crop.top));
        crop_to_chw(
            img.as_raw(),
            img.width(),
            origin,
            (self.size, crop.flip),
            out,
        );
        Ok(mask.map(|m| {
            let m = resize_nearest(&m, crop.resized.0, crop.resized.1);
            let m = image::imageops::crop_imm(&m, crop.left, crop.top, s, s).to_image();
            flip_rows(m.into_raw(), self.size, crop.flip)
        }))
    }

    /// The image's size from its header and its size with the shorter side resized, checked
    /// to fit [`MAX_IMAGE_PIXELS`] both.
    fn image_size(&self, bytes: &[u8]) -> Result<(Size, Size), String> {
        let (w, h) = reader(bytes)
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
        Ok(((w, h), (nw, nh)))
    }

    /// The `size` x `size` crop at `(left, top)` of the image resized on its shorter side,
    /// from a JPEG window: decoded at the smallest of the scales 1/8, 1/4, 1/2 and 1 whose
    /// shorter side still holds `size` (libjpeg-turbo's other scales use plain C IDCTs that
    /// are slower than its SIMD full-size one), only the columns and rows the crop's filter
    /// reaches, then resized with the crop box (the same filter taps as resizing the whole
    /// image and cropping).
    fn jpeg_crop_into<T: Channel>(
        &self,
        bytes: &[u8],
        crop: &Crop,
        out: &mut [T],
    ) -> Result<(), jpeg::JpegError> {
        let (s, w, h) = (self.size as u32, crop.width, crop.height);
        let ((left, top), (rw, rh)) = ((crop.left, crop.top), crop.resized);
        let flip = (self.size, crop.flip);
        BUFFERS.with_borrow_mut(|bufs| {
            if (rw, rh) == (w, h) {
                let window = jpeg::Window {
                    scale: 8,
                    x: left,
                    y: top,
                    width: s,
                    height: s,
                };
                let got = jpeg::decode_window(bytes, window, &mut bufs.region)?;
                crop_to_chw(&bufs.region, got.width, (left - got.x, 0), flip, out);
                return Ok(());
            }
            let scale = [1, 2, 4, 8]
                .into_iter()
                .find(|m: &u32| w.min(h) as u64 * *m as u64 >= 8 * s as u64)
                .unwrap_or(8);
            // Scaled pixels per output pixel: the scaled image holds the full one's content
            // scaled by exactly scale / 8.
            let f = scale as f64 / 8.0;
            let (fx, fy) = (w as f64 * f / rw as f64, h as f64 * f / rh as f64);
            let (sw, sh) = jpeg::scaled_size((w, h), scale);
            let (x0, x1) = filter_span(left, s, fx, sw);
            let (y0, y1) = filter_span(top, s, fy, sh);
            let window = jpeg::Window {
                scale,
                x: x0,
                y: y0,
                width: x1 - x0,
                height: y1 - y0,
            };
            let got = jpeg::decode_window(bytes, window, &mut bufs.region)?;
            let (bl, bt) = (left as f64 * fx - got.x as f64, top as f64 * fy - y0 as f64);
            // At the right and bottom edges s * fx can pass the region by a rounding error.
            let crop_box = CropBox {
                left: bl,
                top: bt,
                width: (s as f64 * fx).min(got.width as f64 - bl - 1e-9),
                height: (s as f64 * fy).min(got.height as f64 - bt - 1e-9),
            };
            let region = (
                &bufs.region[..3 * (got.width * got.height) as usize],
                got.width,
                got.height,
            );
            resize_box(region, crop_box, s, &mut bufs.resized)?;
            crop_to_chw(&bufs.resized, s, (0, 0), flip, out);
            Ok(())
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

/// An `image` reader over `bytes` that guesses the format from its first bytes.
fn reader(bytes: &[u8]) -> image::ImageReader<std::io::Cursor<&[u8]>> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .expect("reading from memory")
}

/// Decodes the whole image as RGB.
fn decode(bytes: &[u8]) -> Result<RgbImage, String> {
    Ok(reader(bytes)
        .decode()
        .map_err(|e| format!("image: {e}"))?
        .into_rgb8())
}

/// The source pixels `[lo, hi)` that a bilinear filter reads for the output pixels
/// `start..start + len` at `f` source pixels per output pixel (support `max(f, 1)` each
/// side, one more for rounding), within `0..limit`.
fn filter_span(start: u32, len: u32, f: f64, limit: u32) -> (u32, u32) {
    let margin = f.max(1.0) + 1.0;
    let lo = (start as f64 * f - margin).floor().max(0.0) as u32;
    let hi = ((start + len) as f64 * f + margin).ceil().min(limit as f64) as u32;
    (lo, hi)
}

/// Width and height in pixels.
type Size = (u32, u32);

/// The image's size, its size with the shorter side resized, and where its crop falls in
/// the resized image.
struct Crop {
    width: u32,
    height: u32,
    resized: Size,
    left: u32,
    top: u32,
    flip: bool,
}

/// A source rectangle in pixels, fractional.
struct CropBox {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
}

/// `crop` of the RGB image `(pixels, width, height)` resized to `size` x `size` into `dst`
/// with PIL's antialiased bilinear filter, which reads pixels outside the box as resizing
/// the whole image would.
fn resize_box(
    (pixels, w, h): (&[u8], u32, u32),
    crop: CropBox,
    size: u32,
    dst: &mut Vec<u8>,
) -> Result<(), jpeg::JpegError> {
    use fast_image_resize as fr;
    let src = fr::images::ImageRef::new(w, h, pixels, fr::PixelType::U8x3)
        .expect("an RGB buffer of its own size");
    dst.resize(3 * (size * size) as usize, 0);
    let mut dst = fr::images::Image::from_slice_u8(size, size, dst, fr::PixelType::U8x3)
        .expect("an RGB buffer of the output size");
    let opts = bilinear().crop(crop.left, crop.top, crop.width, crop.height);
    fr::Resizer::new()
        .resize(&src, &mut dst, &opts)
        .map_err(|e| jpeg::JpegError::Failed(format!("resizing the window: {e}")))
}

/// PIL's antialiased bilinear filter (a convolution whose support widens when shrinking).
fn bilinear() -> fast_image_resize::ResizeOptions {
    use fast_image_resize as fr;
    fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear))
}

/// Buffers a decoding thread reuses from image to image (no allocation or page faults per
/// JPEG): the decoded window and its resized crop.
#[derive(Default)]
struct Buffers {
    region: Vec<u8>,
    resized: Vec<u8>,
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::default();
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
    fr::Resizer::new()
        .resize(&src, &mut dst, &bilinear())
        .expect("same pixel types");
    RgbImage::from_raw(nw, nh, dst.into_vec()).expect("a buffer of the new size")
}

/// The `size` x `size` window at `(left, top)` of the RGB rows `raw` (`width` pixels each)
/// into `out` as CHW planes, mirrored left-right when `flip`: one pass over the window's rows.
fn crop_to_chw<T: Channel>(
    raw: &[u8],
    width: u32,
    (left, top): (u32, u32),
    (size, flip): (usize, bool),
    out: &mut [T],
) {
    let (width, left, top) = (width as usize, left as usize, top as usize);
    let plane = size * size;
    assert_eq!(
        out.len(),
        3 * plane,
        "room for one [3, {size}, {size}] image"
    );
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
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
            crop_to_chw(img.as_raw(), img.width(), (2, 1), (3, flip), &mut out);
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
