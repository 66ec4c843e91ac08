//! The pictures a stage-1 run shows: validation inputs beside their reconstructions, label
//! maps in colour.

use burn::tensor::Tensor;
use image::RgbImage;

/// A grid with one row per image: input on the left, reconstruction on the right, four pairs
/// a row.
pub fn grid(inputs: &[RgbImage], reconstructions: &[RgbImage]) -> RgbImage {
    let Some(first) = inputs.first() else {
        return RgbImage::new(1, 1);
    };
    let (w, h) = first.dimensions();
    let per_row = 4u32; // pairs per row
    let rows = (inputs.len() as u32).div_ceil(per_row);
    let gap = 2;
    let mut grid = RgbImage::from_pixel(
        per_row * (2 * w + 3 * gap),
        rows * (h + gap),
        image::Rgb([255, 255, 255]),
    );
    for (i, (a, b)) in inputs.iter().zip(reconstructions).enumerate() {
        let (col, row) = (i as u32 % per_row, i as u32 / per_row);
        let x = col * (2 * w + 3 * gap);
        let y = row * (h + gap);
        image::imageops::replace(&mut grid, a, x as i64, y as i64);
        image::imageops::replace(&mut grid, b, (x + w + gap) as i64, y as i64);
    }
    grid
}

/// The first map of `[b, labels, h, w]` scores as colours (label of the highest score; label
/// 0 black).
pub fn label_image(t: Tensor<4>) -> RgbImage {
    let [_, _, h, w] = t.dims();
    let labels: Vec<i64> = t
        .narrow(0, 0, 1)
        .argmax(1)
        .try_into_vec_as::<i64>()
        .expect("int labels");
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let l = labels[y as usize * w + x as usize] as u32;
        if l == 0 {
            return image::Rgb([0, 0, 0]);
        }
        let hue = l.wrapping_mul(0x9E37_79B9);
        image::Rgb([
            (hue >> 24) as u8 | 64,
            (hue >> 16) as u8 | 64,
            (hue >> 8) as u8 | 64,
        ])
    })
}
