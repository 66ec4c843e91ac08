//! An image of arbitrary bytes through the transform, as the loader decodes every sample: the
//! JPEG window path (libjpeg-turbo at a reduced scale, cropped and skipped scanlines) and the
//! full-decode path it falls back to. Every input ends in a crop or an error.
#![no_main]

use rand::SeedableRng;
use taming_dataloader::Preprocess;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&knob, bytes)) = data.split_first() else {
        return;
    };
    let pre = Preprocess {
        size: 8 + (knob as usize & 63),
        random_crop: knob & 64 != 0,
        flip: knob & 128 != 0,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(knob as u64);
    let _ = pre.apply(bytes, &mut rng);
});
