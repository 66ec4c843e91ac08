//! JPEG windows decoded at a reduced scale (libjpeg-turbo's scaled IDCT, `M/8` for `M` in
//! 1..=8) with only the columns and rows the window needs (`jpeg_crop_scanline`,
//! `jpeg_skip_scanlines`; the rows below the window are never decoded). The random-crop path
//! uses it to decode the part of a photo that its crop keeps, at the smallest scale that
//! still holds the output size. The C side is `csrc/jpeg_window.c`.

use std::ffi::{CStr, c_char, c_int, c_long, c_uint, c_ulong};

/// Columns libjpeg may add to a window when it widens it to whole iMCUs (at most one iMCU,
/// 32 pixels at full scale for 4:1 subsampling).
const WIDENING: u32 = 32;

/// Memory libjpeg may allocate for one image (coefficient buffers of progressive JPEGs
/// included); the image's size is checked against [`crate::MAX_IMAGE_PIXELS`] before.
const MAX_MEMORY: c_long = 512 << 20;

#[repr(C)]
struct RawWindow {
    scale_num: c_uint,
    x: c_uint,
    y: c_uint,
    width: c_uint,
    height: c_uint,
}

unsafe extern "C" {
    fn taming_jpeg_decode_window(
        data: *const u8,
        len: c_ulong,
        window: *mut RawWindow,
        out: *mut u8,
        out_len: usize,
        max_memory: c_long,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;
}

/// A rectangle of a JPEG scaled by `scale / 8`, in the scaled image's pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Eighths of the full size (1..=8).
    pub scale: u32,
    /// Left column.
    pub x: u32,
    /// Top row.
    pub y: u32,
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
}

/// Why a window was not decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JpegError {
    /// The file ends before the window's last row: the image is broken.
    #[error("jpeg: {0}")]
    Truncated(String),
    /// Anything else (a colour space libjpeg cannot give as RGB, corrupt data): another
    /// decoder may still read the image.
    #[error("jpeg: {0}")]
    Failed(String),
}

/// Whether `bytes` start as a JPEG does (SOI and a marker).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// The size of the image scaled by `scale / 8`, as libjpeg rounds it (up).
pub fn scaled_size((w, h): (u32, u32), scale: u32) -> (u32, u32) {
    (
        (w as u64 * scale as u64).div_ceil(8) as u32,
        (h as u64 * scale as u64).div_ceil(8) as u32,
    )
}

/// Decodes `window` as RGB rows into `buf` (grown as needed, never shrunk) and returns the
/// window decoded: libjpeg widens the columns to whole iMCUs, so `x` may be smaller and
/// `width` larger than asked; each row in `buf` is `3 * width` bytes. The caller has checked
/// the image's size.
pub fn decode_window(bytes: &[u8], window: Window, buf: &mut Vec<u8>) -> Result<Window, JpegError> {
    if !(1..=8).contains(&window.scale) {
        let scale = window.scale;
        return Err(JpegError::Failed(format!(
            "scale {scale}/8 is not 1/8 to 8/8"
        )));
    }
    let len = 3 * (window.width + WIDENING) as usize * window.height as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let mut raw = RawWindow {
        scale_num: window.scale,
        x: window.x,
        y: window.y,
        width: window.width,
        height: window.height,
    };
    let mut message = [0 as c_char; 200];
    // SAFETY: `buf` holds `len` bytes, the most the C side writes (it checks); the other
    // pointers are valid for the lengths passed.
    let rc = unsafe {
        taming_jpeg_decode_window(
            bytes.as_ptr(),
            bytes.len() as c_ulong,
            &mut raw,
            buf.as_mut_ptr(),
            len,
            MAX_MEMORY,
            message.as_mut_ptr(),
            message.len(),
        )
    };
    check(rc, &message)?;
    Ok(Window {
        x: raw.x,
        width: raw.width,
        ..window
    })
}

fn check(rc: c_int, message: &[c_char]) -> Result<(), JpegError> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the C side always terminates the message (copy_message), and the buffer
    // started zeroed.
    let text = unsafe { CStr::from_ptr(message.as_ptr()) };
    let text = text.to_string_lossy().into_owned();
    Err(if rc == -2 {
        JpegError::Truncated(text)
    } else {
        JpegError::Failed(text)
    })
}
