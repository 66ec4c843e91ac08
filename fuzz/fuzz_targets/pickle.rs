//! The checkpoint pickle reader on arbitrary bytes: every input ends in a value or an error,
//! within the reader's depth and memory limits (no panic, no stack overflow, no OOM).
#![no_main]

// The model crate's own reader, compiled here without burn.
#[path = "../../import/src/pickle/mod.rs"]
#[allow(dead_code)]
mod pickle;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = pickle::read(data);
});
