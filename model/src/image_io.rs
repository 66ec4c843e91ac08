//! Images in and out of the model: RGB images as tensors in [-1, 1] and back, label maps as
//! one-hot tensors, grids of images, and PNGs written atomically.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;

use crate::error::ModelError;

/// An RGB image as a `[1, 3, h, w]` tensor in [-1, 1] (x / 127.5 - 1).
pub fn to_tensor(img: &RgbImage, device: &Device) -> Tensor<4> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut chw = vec![0f32; 3 * h * w];
    for (x, y, px) in img.enumerate_pixels() {
        for c in 0..3 {
            chw[c * h * w + y as usize * w + x as usize] = px.0[c] as f32 / 127.5 - 1.0;
        }
    }
    Tensor::from_data(TensorData::new(chw, [1, 3, h, w]), device)
}

/// The first image of a `[b, 3, h, w]` tensor in [-1, 1] as RGB (clamped, rounded).
pub fn to_image(x: Tensor<4>) -> RgbImage {
    let [_, c, h, w] = x.dims();
    assert_eq!(c, 3, "images have 3 channels");
    let first = x.narrow(0, 0, 1).clamp(-1.0, 1.0);
    let values: Vec<f32> = first.try_into_vec_as::<f32>().expect("f32 data");
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let at = |ch: usize| values[ch * h * w + y as usize * w + x as usize];
        image::Rgb([0, 1, 2].map(|ch| ((at(ch) + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8))
    })
}

/// Writes `img` as PNG to `path` through a temporary sibling file.
pub fn write_png(img: &RgbImage, path: &Path) -> Result<(), ModelError> {
    let tmp = crate::atomic::temp_sibling(path);
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| ModelError::file(&tmp, e.to_string()))?;
    crate::atomic::commit(&tmp, path)
}

/// Images of one size tiled `per_row` to a row with 2-pixel white gaps.
pub fn tile(images: &[RgbImage], per_row: usize) -> RgbImage {
    let Some(first) = images.first() else {
        return RgbImage::new(1, 1);
    };
    let (w, h) = first.dimensions();
    let per_row = per_row.clamp(1, images.len()) as u32;
    let rows = (images.len() as u32).div_ceil(per_row);
    let gap = 2;
    let mut grid = RgbImage::from_pixel(
        per_row * (w + gap) - gap,
        rows * (h + gap) - gap,
        image::Rgb([255, 255, 255]),
    );
    for (i, img) in images.iter().enumerate() {
        let (col, row) = (i as u32 % per_row, i as u32 / per_row);
        image::imageops::replace(
            &mut grid,
            img,
            (col * (w + gap)) as i64,
            (row * (h + gap)) as i64,
        );
    }
    grid
}

/// `[1, classes, h, w]` one-hot encoding of a label map of `h * w` labels; errors name
/// `source` and the first label outside `0..classes`.
pub fn one_hot(
    labels: &[u8],
    classes: usize,
    [h, w]: [usize; 2],
    source: &str,
    device: &Device,
) -> Result<Tensor<4>, ModelError> {
    let mut out = vec![0f32; classes * h * w];
    for (p, &label) in labels.iter().enumerate().take(h * w) {
        if label as usize >= classes {
            return Err(ModelError::file(
                source,
                format!(
                    "label {label} at pixel ({}, {}) but the cond stage knows {classes} classes",
                    p % w,
                    p / w
                ),
            ));
        }
        out[label as usize * h * w + p] = 1.0;
    }
    Ok(Tensor::from_data(
        TensorData::new(out, [1, classes, h, w]),
        device,
    ))
}
