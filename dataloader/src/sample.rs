//! What a WebDataset sample holds for taming-rs: an image (`.png`, `.jpg`, `.jpeg`,
//! `.webp`), optionally a segmentation label map (`.seg.png`, `.mask.png`, `.label.png`) and
//! a class label (`.cls` text or `.json` with `label`, `cls` or `class`).

use webdataset::Sample;

/// Image fields, in order of preference.
pub const IMAGE_FIELDS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];
/// Label-map fields, in order of preference.
pub const MASK_FIELDS: [&str; 3] = ["seg.png", "mask.png", "label.png"];

/// The sample's key, refused when it could escape a directory (`../x`, `/etc/x`).
pub fn safe_key(sample: &Sample) -> Result<&str, String> {
    let key = sample.key().ok_or("sample without a key")?;
    if key.starts_with('/') || key.split('/').any(|part| part == "..") {
        return Err(format!("unsafe entry name `{key}` (path traversal)"));
    }
    Ok(key)
}

/// The encoded image bytes.
pub fn image_bytes(sample: &Sample) -> Option<&[u8]> {
    field_bytes(sample, &IMAGE_FIELDS)
}

/// The encoded label-map bytes, when the sample has one.
pub fn mask_bytes(sample: &Sample) -> Option<&[u8]> {
    field_bytes(sample, &MASK_FIELDS)
}

fn field_bytes<'a>(sample: &'a Sample, fields: &[&str]) -> Option<&'a [u8]> {
    fields
        .iter()
        .find_map(|f| sample.get(f).and_then(|v| v.as_bytes()).map(|b| &b[..]))
}

/// The class label from `.cls` or `.json`.
pub fn label(sample: &Sample) -> Option<i64> {
    if let Some(value) = sample.get("cls") {
        return value.as_i64().or_else(|| parse_text(value.as_bytes()?));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&sample.get("json")?.as_bytes()?[..]).ok()?;
    ["label", "cls", "class"]
        .iter()
        .find_map(|k| json.get(k).and_then(serde_json::Value::as_i64))
}

fn parse_text(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}
