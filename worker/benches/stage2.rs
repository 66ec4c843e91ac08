//! Stage-2 speed on the CPU: training tokens per second of the small default transformer
//! (4 layers, 128 wide, 8x8 Fashion-MNIST codes with a class token), sampling tokens per
//! second at 256 tokens (batch 1 and 16, with and without the KV cache) and the time of a
//! 32x48 sliding-window grid (16x16 window, plain rule and reuse), and cached sampling with
//! the reference's 12-layer, 512-wide GPT. Random weights: speed does not depend on them.
//! tools/bench/compare_stage2.sh runs this and the reference side by side.
//!
//! `cargo bench -p taming-worker --bench stage2 -- [--iters N] [--json] [--skip-plain-window]
//! [--large-only]`

use std::time::Instant;

use burn::tensor::Device;
use taming_model::transformer::{
    Cond, Conditioning, Gpt, GridCond, Sampling, TokenLayout, WindowMode, sample_grid,
    sample_window,
};
use taming_worker::stage2::data::CodeSample;
use taming_worker::stage2::{GptShape, Schedule, Stage2Config, Stage2Trainer};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// A GPT of `n_layer` blocks `n_embd` wide, without dropout.
fn shape(n_layer: usize, n_head: usize, n_embd: usize) -> GptShape {
    GptShape {
        n_layer,
        n_head,
        n_embd,
        embd_pdrop: 0.0,
        resid_pdrop: 0.0,
        attn_pdrop: 0.0,
    }
}

/// The small default transformer: 4 layers, 4 heads, 128 wide.
fn small() -> GptShape {
    shape(4, 4, 128)
}

/// The reference's sampling shape: 12 layers, 8 heads, 512 wide.
fn large() -> GptShape {
    shape(12, 8, 512)
}

fn config(gpt: GptShape, batch_size: usize) -> Stage2Config {
    Stage2Config {
        gpt,
        window: None,
        pkeep: 1.0,
        permuter: Default::default(),
        n_classes: Some(10),
        base_learning_rate: 1.5e-5,
        batch_size,
        grad_accum: 1,
        weight_decay: 0.01,
        warmup_steps: 0,
        schedule: Schedule::Constant,
        min_lr_ratio: 0.0,
        grad_clip: None,
        seed: 0,
        ema: None,
    }
}

fn report(json: bool, what: &str, value: f64, unit: &str) {
    if json {
        println!("{{\"impl\": \"taming-rs\", \"what\": \"{what}\", \"{unit}\": {value:.3}}}");
    } else {
        println!("taming-rs  {what}: {value:.2} {unit}");
    }
}

fn train(iters: usize, json: bool) {
    let cfg = config(small(), 32);
    let model = cfg.model(256, [8, 8], Conditioning::Class { n_classes: 10 });
    let device = Device::flex().autodiff();
    let mut trainer = Stage2Trainer::new(cfg, model, 1, 1000, &device).expect("trainer");
    let batch: Vec<CodeSample> = (0..32)
        .map(|i| CodeSample {
            codes: (0..64).map(|t| ((i * 31 + t * 7) % 256) as i64).collect(),
            grid: [8, 8],
            label: Some((i % 10) as i64),
            cond: None,
        })
        .collect();
    trainer = trainer.train_batch(&batch).expect("warm-up step").0;
    let start = Instant::now();
    for _ in 0..iters {
        trainer = trainer.train_batch(&batch).expect("step").0;
    }
    let secs = start.elapsed().as_secs_f64();
    report(
        json,
        "train batch 32 x 64 tokens",
        (iters * 32 * 64) as f64 / secs,
        "tokens_per_s",
    );
}

/// A 256-token sampling model: vocabulary 1024 image codes + 1 SOS, 16x16 window.
fn sampling_model(gpt: GptShape) -> (Gpt, TokenLayout) {
    let model = config(gpt, 1).model(1024, [16, 16], Conditioning::None { sos_token: 0 });
    let device = Device::flex();
    device.seed(0);
    let gpt = Gpt::new(&model.gpt, &device);
    (gpt, TokenLayout::new(model).expect("layout"))
}

fn sample(json: bool, gpt: GptShape, name: &str, uncached: bool) {
    let (gpt, layout) = sampling_model(gpt);
    let sos = layout.cond_rows(&Cond::None).expect("sos");
    let sampling = Sampling {
        temperature: 1.0,
        top_k: Some(100),
        top_p: None,
    };
    let modes: &[bool] = if uncached { &[true, false] } else { &[true] };
    for batch in [1, 16] {
        for &cached in modes {
            let conds = vec![sos.clone(); batch];
            let start = Instant::now();
            sample_window(&gpt, &layout, &conds, sampling, 0, cached).expect("sample");
            let secs = start.elapsed().as_secs_f64();
            let what = format!(
                "sample 256 tokens batch {batch} {}{name}",
                if cached { "kv-cache" } else { "no cache" }
            );
            report(json, &what, (batch * 256) as f64 / secs, "tokens_per_s");
        }
    }
}

fn window(json: bool, plain: bool) {
    let (gpt, layout) = sampling_model(small());
    let cond = GridCond::Fixed(layout.cond_rows(&Cond::None).expect("sos"));
    let sampling = Sampling {
        temperature: 1.0,
        top_k: Some(100),
        top_p: None,
    };
    let mut modes = vec![WindowMode::Reuse];
    if plain {
        modes.push(WindowMode::Plain);
    }
    for mode in modes {
        let start = Instant::now();
        sample_grid(&gpt, &layout, [32, 48], &cond, sampling, 0, mode).expect("grid");
        let what = format!("sliding window 32x48 grid {mode:?}");
        report(json, &what, start.elapsed().as_secs_f64(), "seconds");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = arg(&args, "--iters").map_or(5, |s| s.parse().expect("iterations"));
    let json = args.iter().any(|a| a == "--json");
    if !args.iter().any(|a| a == "--large-only") {
        train(iters, json);
        sample(json, small(), "", true);
        window(json, !args.iter().any(|a| a == "--skip-plain-window"));
    }
    sample(json, large(), " 12x512", false);
}
