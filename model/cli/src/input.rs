//! Input images for the `vqgan` tool: decoded, then fitted to the model (the reference's
//! resize and center crop, or kept as they are).

use std::path::Path;

use image::RgbImage;
use taming_model::error::ModelError;

/// How an input image is fitted to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Resize the shorter side to `size` and center-crop to `size x size`.
    ResizeCrop {
        /// Side length in pixels.
        size: usize,
    },
    /// Keep the image as it is; both sides must be multiples of `factor`.
    AsIs {
        /// The model's downsampling factor.
        factor: usize,
    },
}

/// Reads an image file as RGB; the error names the file.
pub fn read_rgb(path: &Path) -> Result<RgbImage, ModelError> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| ModelError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| ModelError::io(path, e))?;
    let img = reader
        .decode()
        .map_err(|e| ModelError::file(path, format!("not a readable image ({e})")))?;
    Ok(img.to_rgb8())
}

/// Fits an image to the model as `fit` says; the error names the file when sizes don't fit.
pub fn fit_image(img: RgbImage, fit: Fit, path: &Path) -> Result<RgbImage, ModelError> {
    match fit {
        Fit::ResizeCrop { size } => Ok(resize_center_crop(img, size)),
        Fit::AsIs { factor } => {
            let (w, h) = img.dimensions();
            if !(w as usize).is_multiple_of(factor) || !(h as usize).is_multiple_of(factor) {
                return Err(ModelError::file(
                    path,
                    format!(
                        "{w}x{h} is not a multiple of the model's downsampling factor {factor}"
                    ),
                ));
            }
            Ok(img)
        }
    }
}

/// The reference's preprocessing: shorter side to `size` (bilinear), then a centered crop.
pub fn resize_center_crop(img: RgbImage, size: usize) -> RgbImage {
    let resized = taming_dataloader::transform::resize_shorter(img, size);
    let (w, h) = resized.dimensions();
    let s = size as u32;
    image::imageops::crop_imm(&resized, (w - s) / 2, (h - s) / 2, s, s).to_image()
}
