//! Size bounds on what is decoded from a shard: images and label maps are checked against
//! them from their headers, before any pixel is decoded.

/// Most pixels an image or label map may have, as decoded and as resized: Pillow's
/// `MAX_IMAGE_PIXELS` (1024 x 1024 x 1024 / 4 / 3, a 256 MiB RGB buffer).
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// Refuses a `w` x `h` `what` (image, label map) with no pixel or over [`MAX_IMAGE_PIXELS`].
pub(crate) fn check_pixels(what: &str, w: u32, h: u32) -> Result<(), String> {
    let pixels = w as u64 * h as u64;
    if pixels == 0 || pixels > MAX_IMAGE_PIXELS {
        return Err(format!(
            "{what}: {w}x{h} is {pixels} pixels; 1..={MAX_IMAGE_PIXELS} allowed"
        ));
    }
    Ok(())
}
