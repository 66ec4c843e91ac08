//! Segmentation label maps: PNGs holding one class index per pixel. Grayscale values are
//! the indices; palette images hold theirs as palette indices, not colours (as PIL's
//! `np.array` of a `P` image gives them, which is how VOC, and often ADE20K or COCO-Stuff
//! exports, store labels). Colour label maps are refused: their colours are not indices.

use image::GrayImage;
use png::{BitDepth, ColorType, Transformations};

use crate::bounds::check_pixels;

/// Decodes a PNG label map to one class index (byte) per pixel. Grayscale and palette maps
/// of any bit depth are read as they are stored; 16-bit maps only when every value fits a
/// byte (classes 0..=255).
///
/// The size is checked from the header before any pixel buffer is made: at most
/// [`MAX_IMAGE_PIXELS`](crate::bounds::MAX_IMAGE_PIXELS).
pub fn decode(bytes: &[u8]) -> Result<GrayImage, String> {
    decode_checked(bytes, None)
}

/// [`decode`], refused from the header unless the map is `w` x `h` (its image's size).
pub fn decode_sized(bytes: &[u8], (w, h): (u32, u32)) -> Result<GrayImage, String> {
    decode_checked(bytes, Some((w, h)))
}

fn decode_checked(bytes: &[u8], expect: Option<(u32, u32)>) -> Result<GrayImage, String> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(|e| format!("label map: {e}"))?;
    let (width, height) = (reader.info().width, reader.info().height);
    if let Some((w, h)) = expect
        && (width, height) != (w, h)
    {
        return Err(format!(
            "label map is {width}x{height} but its image is {w}x{h}"
        ));
    }
    check_pixels("label map", width, height)?;
    let size = reader
        .output_buffer_size()
        .ok_or("label map: too large to decode")?;
    let mut buf = vec![0; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("label map: {e}"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let rows = buf.chunks(info.line_size).take(h);
    let values: Vec<u8> = match (info.color_type, info.bit_depth) {
        (ColorType::Grayscale | ColorType::Indexed, BitDepth::Sixteen) => wide(rows, w)?,
        (ColorType::Grayscale | ColorType::Indexed, depth) => rows
            .flat_map(|row| unpack(row, depth as usize, w))
            .collect(),
        (other, _) => {
            let kind = match other {
                ColorType::GrayscaleAlpha => "grayscale with alpha",
                ColorType::Rgba => "RGBA",
                _ => "RGB",
            };
            return Err(format!(
                "label map is {kind}: expected one channel of class indices \
                 (a grayscale or palette PNG)"
            ));
        }
    };
    Ok(GrayImage::from_raw(w as u32, h as u32, values).expect("one value per pixel"))
}

/// [`decode`], with `offset` added to every id, wrapping at 256 (`--label-offset`: COCO-Stuff's
/// `+1` turns unlabeled 255 into 0).
pub fn decode_with_offset(bytes: &[u8], offset: u8) -> Result<GrayImage, String> {
    let mut map = decode(bytes)?;
    if offset != 0 {
        map.iter_mut().for_each(|v| *v = v.wrapping_add(offset));
    }
    Ok(map)
}

/// The `w` values of a row packed at `bits` (1, 2, 4 or 8) per value, high bits first.
fn unpack(row: &[u8], bits: usize, w: usize) -> impl Iterator<Item = u8> + '_ {
    let per_byte = 8 / bits;
    let mask = ((1u16 << bits) - 1) as u8;
    (0..w).map(move |x| {
        let shift = 8 - bits * (x % per_byte + 1);
        (row[x / per_byte] >> shift) & mask
    })
}

/// Big-endian 16-bit values, each of which must fit a byte.
fn wide<'a>(rows: impl Iterator<Item = &'a [u8]>, w: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for row in rows {
        for pair in row[..2 * w].chunks_exact(2) {
            let v = u16::from_be_bytes([pair[0], pair[1]]);
            let v = u8::try_from(v)
                .map_err(|_| format!("label map holds class {v}: at most 255 classes fit"))?;
            out.push(v);
        }
    }
    Ok(out)
}
