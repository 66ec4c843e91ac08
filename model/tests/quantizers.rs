//! Quantizer behaviour beyond the reference: paper vs legacy loss, EMA updates, cosine and
//! low-dimensional lookup, k-means initialization, dead-code restart, usage window, Gumbel
//! sampling.

mod common;

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use common::{ints, values};
use taming_model::config::{
    EmaConfig, GumbelConfig, KmeansConfig, RestartConfig, VectorQuantizerConfig,
};
use taming_model::quantize::{
    CodebookMaintainer, GumbelQuantizer, QuantizeMode, UsageWindow, VectorQuantizer,
};

fn vq(n: usize, d: usize, cfg: VectorQuantizerConfig, device: &Device) -> VectorQuantizer {
    VectorQuantizer::new(n, d, &cfg, device)
}

/// Four well-separated clusters in 2-D, `per` points each, as a `[1, 2, 1, 4*per]` map.
fn clustered(per: usize, device: &Device) -> (Tensor<4>, Vec<[f32; 2]>) {
    let centers = vec![[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]];
    let mut xs = vec![0f32; 2 * 4 * per];
    let n = 4 * per;
    for (k, c) in centers.iter().enumerate() {
        for j in 0..per {
            let i = k * per + j;
            let jitter = (j as f32 * 0.37).sin() * 0.3;
            xs[i] = c[0] + jitter;
            xs[n + i] = c[1] - jitter;
        }
    }
    (
        Tensor::from_data(TensorData::new(xs, [1, 2, 1, n]), device),
        centers,
    )
}

#[test]
fn paper_loss_puts_beta_on_commitment_and_legacy_on_codebook() {
    let device = Device::flex().autodiff();
    let z = Tensor::<4>::random([2, 4, 3, 3], Distribution::Normal(0.0, 1.0), &device);
    let codes = Tensor::<2>::random([8, 4], Distribution::Normal(0.0, 1.0), &device);
    let grads = |legacy: bool| {
        let cfg = VectorQuantizerConfig {
            legacy,
            ..Default::default()
        };
        let q = vq(8, 4, cfg, &device).with_codebook(codes.clone());
        let z = z.clone().detach().require_grad();
        let grads = q.forward(z.clone()).loss.backward();
        let gz = values(z.grad(&grads).unwrap());
        let ge = values(q.embedding.weight.grad(&grads).unwrap());
        (gz, ge)
    };
    let (paper_z, paper_e) = grads(false);
    let (legacy_z, legacy_e) = grads(true);
    // Commitment gradient (to z): beta in the paper's form, 1 in the legacy form; the
    // codebook gradient (to e) the other way round.
    let scaled = |v: &[f32], k: f32| v.iter().map(|x| x * k).collect::<Vec<_>>();
    common::assert_close_to_max("grad z", &scaled(&paper_z, 4.0), &legacy_z, 1e-5);
    common::assert_close_to_max("grad e", &paper_e, &scaled(&legacy_e, 4.0), 1e-5);
    assert!(legacy_z.iter().any(|g| *g != 0.0));
}

#[test]
fn straight_through_passes_gradient_unchanged_to_the_input() {
    let device = Device::flex().autodiff();
    let q = vq(16, 3, VectorQuantizerConfig::default(), &device);
    let z =
        Tensor::<4>::random([1, 3, 2, 2], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let out = q.forward(z.clone());
    let grads = out.z_q.sum().backward();
    assert_eq!(values(z.grad(&grads).unwrap()), vec![1.0; 12]);
}

#[test]
fn ema_codebook_converges_to_cluster_means() {
    let device = Device::flex();
    let (x, centers) = clustered(32, &device);
    let cfg = VectorQuantizerConfig {
        ema: Some(EmaConfig {
            decay: 0.5,
            eps: 1e-5,
        }),
        ..Default::default()
    };
    // Start from codes at the first point of each cluster, then EMA-update repeatedly.
    let q = vq(4, 2, cfg.clone(), &device);
    let rows = x.clone().permute([0, 2, 3, 1]).reshape([128, 2]);
    let init = rows.clone().select(
        0,
        Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 32, 64, 96], [4]), &device),
    );
    let mut q = q.with_codebook(init);
    let mut maint = CodebookMaintainer::new(&cfg, 4, 0);
    for _ in 0..30 {
        let out = q.forward(x.clone());
        let [b, h, w] = out.indices.dims();
        let idx = out.indices.reshape([b * h * w]);
        q = maint.step(q, out.lookup_latents, idx).0;
    }
    let codes = values(q.codebook());
    for (k, c) in centers.iter().enumerate() {
        let mean_jitter: f32 = (0..32).map(|j| (j as f32 * 0.37).sin() * 0.3).sum::<f32>() / 32.0;
        assert!(
            (codes[2 * k] - (c[0] + mean_jitter)).abs() < 1e-3,
            "code {k}: {:?}",
            &codes[2 * k..2 * k + 2]
        );
        assert!((codes[2 * k + 1] - (c[1] - mean_jitter)).abs() < 1e-3);
    }
}

#[test]
fn ema_quantizer_loss_is_commitment_only_and_codebook_gets_no_gradient() {
    let device = Device::flex().autodiff();
    let cfg = VectorQuantizerConfig {
        ema: Some(EmaConfig::default()),
        ..Default::default()
    };
    let q = vq(8, 4, cfg, &device);
    let z =
        Tensor::<4>::random([1, 4, 2, 2], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let out = q.forward(z.clone());
    let mse = values((out.z_q.clone() - z.clone()).powi_scalar(2).mean())[0];
    assert!((values(out.loss.clone())[0] - 0.25 * mse).abs() < 1e-6);
    let grads = out.loss.backward();
    assert!(q.embedding.weight.grad(&grads).is_none());
}

#[test]
fn kmeans_init_places_codes_on_the_clusters() {
    let device = Device::flex();
    let (x, centers) = clustered(16, &device);
    let cfg = VectorQuantizerConfig {
        kmeans_init: Some(KmeansConfig {
            iters: 10,
            batches: 2,
        }),
        ..Default::default()
    };
    let q = vq(4, 2, cfg.clone(), &device);
    let mut maint = CodebookMaintainer::new(&cfg, 4, 7);
    let mut q = q;
    let mut done = Vec::new();
    for _ in 0..2 {
        let out = q.forward(x.clone());
        let idx = out.indices.reshape([64]);
        let (next, report) = maint.step(q, out.lookup_latents, idx);
        q = next;
        done.push(report.kmeans_done);
    }
    assert_eq!(
        done,
        vec![false, true],
        "k-means waits for the configured batches"
    );
    let codes = values(q.codebook());
    for c in &centers {
        let nearest = (0..4)
            .map(|k| (codes[2 * k] - c[0]).powi(2) + (codes[2 * k + 1] - c[1]).powi(2))
            .fold(f32::MAX, f32::min);
        assert!(nearest < 0.2, "no code near {c:?}: {codes:?}");
    }
    let out = q.forward(x);
    let mut used = ints(out.indices);
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 4, "every code used after k-means");
}

#[test]
fn dead_codes_restart_from_batch_samples() {
    let device = Device::flex();
    let (x, _) = clustered(8, &device);
    let cfg = VectorQuantizerConfig {
        dead_code_restart: Some(RestartConfig {
            threshold: 0.6,
            decay: 0.5,
        }),
        ..Default::default()
    };
    // All codes far away in one corner: only one of them wins every token.
    let far = Tensor::<2>::from_data(
        TensorData::new(
            vec![100.0f32, 100.0, 101.0, 101.0, 102.0, 102.0, 103.0, 103.0],
            [4, 2],
        ),
        &device,
    );
    let mut q = vq(4, 2, cfg.clone(), &device).with_codebook(far);
    let mut maint = CodebookMaintainer::new(&cfg, 4, 3);
    let out = q.forward(x.clone());
    let idx = out.indices.reshape([32]);
    let (next, report) = maint.step(q, out.lookup_latents.clone(), idx);
    q = next;
    assert_eq!(report.restarted, vec![1, 2, 3], "unused codes restart");
    let codes = values(q.codebook());
    let latents = values(out.lookup_latents);
    for k in 1..4 {
        let code = [codes[2 * k], codes[2 * k + 1]];
        assert!(
            latents
                .chunks(2)
                .any(|p| p[0] == code[0] && p[1] == code[1]),
            "code {k} {code:?} is not a batch sample"
        );
    }
    assert_eq!(&codes[..2], &[100.0, 100.0], "the used code stays");
}

/// A codebook 64 times larger than the batch's latents: every dead code restarts from one of
/// the batch's few latents, and the used code stays.
#[test]
fn dead_codes_restart_when_codes_outnumber_the_batch_latents() {
    let device = Device::flex();
    let (x, _) = clustered(1, &device);
    let cfg = VectorQuantizerConfig {
        dead_code_restart: Some(RestartConfig {
            threshold: 0.6,
            decay: 0.5,
        }),
        ..Default::default()
    };
    let n = 256;
    let far: Vec<f32> = (0..n).flat_map(|k| [100.0 + k as f32; 2]).collect();
    let far = Tensor::<2>::from_data(TensorData::new(far, [n, 2]), &device);
    let q = vq(n, 2, cfg.clone(), &device).with_codebook(far);
    let mut maint = CodebookMaintainer::new(&cfg, n, 3);
    let out = q.forward(x);
    let idx = out.indices.reshape([4]);
    let (q, report) = maint.step(q, out.lookup_latents.clone(), idx);
    assert_eq!(report.restarted, (1..n).collect::<Vec<_>>());
    let codes = values(q.codebook());
    let latents = values(out.lookup_latents);
    for k in 1..n {
        let code = &codes[2 * k..2 * k + 2];
        assert!(
            latents.chunks(2).any(|p| p == code),
            "code {k} {code:?} is not a batch sample"
        );
    }
    assert_eq!(&codes[..2], &[100.0, 100.0], "the used code stays");
}

/// k-means initialization from fewer pooled latents than codes (4 latents, 64 codes, EMA
/// on): the initial centers repeat rows, every code ends on a latent, and the EMA and
/// usage-window paths take the batch's few tokens.
#[test]
fn kmeans_and_ema_with_fewer_latents_than_codes() {
    let device = Device::flex();
    let (x, _) = clustered(1, &device);
    let cfg = VectorQuantizerConfig {
        kmeans_init: Some(KmeansConfig {
            iters: 3,
            batches: 1,
        }),
        ema: Some(EmaConfig::default()),
        dead_code_restart: Some(RestartConfig {
            threshold: 0.6,
            decay: 0.5,
        }),
        usage_window: 8,
        ..Default::default()
    };
    let n = 64;
    let q = vq(n, 2, cfg.clone(), &device);
    let mut maint = CodebookMaintainer::new(&cfg, n, 5);
    let out = q.forward(x.clone());
    let (q, report) = maint.step(q, out.lookup_latents.clone(), out.indices.reshape([4]));
    assert!(report.kmeans_done);
    let codes = values(q.codebook());
    let latents = values(out.lookup_latents);
    for k in 0..n {
        let code = &codes[2 * k..2 * k + 2];
        assert!(
            latents
                .chunks(2)
                .any(|p| (p[0] - code[0]).abs() < 1e-4 && (p[1] - code[1]).abs() < 1e-4),
            "code {k} {code:?} is not on a latent"
        );
    }
    let out = q.forward(x);
    let (_, report) = maint.step(q, out.lookup_latents, out.indices.reshape([4]));
    // The window (8 tokens) holds both steps' four tokens.
    assert!(
        report.usage > 0.0 && report.usage <= 8.0 / n as f64,
        "{}",
        report.usage
    );
}

#[test]
fn usage_window_counts_distinct_codes_of_recent_tokens_only() {
    let mut w = UsageWindow::new(10, 4);
    w.observe(&[0, 1, 2, 3]);
    assert!((w.usage() - 0.4).abs() < 1e-12);
    w.observe(&[3, 3, 3]);
    // Window now [3, 3, 3, 3]: tokens 0, 1, 2 fell out.
    assert!((w.usage() - 0.1).abs() < 1e-12);
    assert_eq!(w.len(), 4);
}

#[test]
fn cosine_lookup_ignores_vector_length() {
    let device = Device::flex();
    let cfg = VectorQuantizerConfig {
        cosine: true,
        ..Default::default()
    };
    let codes = Tensor::<2>::from_data(
        TensorData::new(vec![1.0f32, 0.0, 0.0, 1.0], [2, 2]),
        &device,
    );
    let q = vq(2, 2, cfg, &device).with_codebook(codes);
    // (10, 1) is far from (1, 0) in L2 but nearly parallel to it; (0.1, 0.2) leans to (0, 1).
    let z = Tensor::<4>::from_data(
        TensorData::new(vec![10.0f32, 0.1, 1.0, 0.2], [1, 2, 1, 2]),
        &device,
    );
    let out = q.forward(z);
    assert_eq!(ints(out.indices), vec![0, 1]);
    let zq = values(out.z_q);
    assert!(
        (zq[0] - 1.0).abs() < 1e-6 && zq[2].abs() < 1e-6,
        "unit codes returned: {zq:?}"
    );
}

#[test]
fn low_dimensional_lookup_projects_in_and_out() {
    let device = Device::flex().autodiff();
    let cfg = VectorQuantizerConfig {
        codebook_dim: Some(3),
        ..Default::default()
    };
    let q = vq(32, 16, cfg, &device);
    assert_eq!(q.embedding.weight.dims(), [32, 3]);
    let z =
        Tensor::<4>::random([2, 16, 4, 4], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let out = q.forward(z.clone());
    assert_eq!(out.z_q.dims(), [2, 16, 4, 4]);
    assert_eq!(out.lookup_latents.dims(), [32, 3]);
    let looked_up = q.lookup(out.indices.clone());
    common::assert_close_to_max("lookup", &values(looked_up), &values(out.z_q.clone()), 1e-5);
    let grads = (out.z_q.sum() + out.loss.sum()).backward();
    assert!(
        q.proj_in.as_ref().unwrap().weight.grad(&grads).is_some(),
        "proj_in trains"
    );
    assert!(
        q.proj_out.as_ref().unwrap().weight.grad(&grads).is_some(),
        "proj_out trains"
    );
}

#[test]
fn gumbel_training_samples_hard_codes_with_gradients_to_logits() {
    let device = Device::flex().autodiff();
    device.seed(11);
    let q = GumbelQuantizer::new(16, 8, &GumbelConfig::default(), &device);
    let z =
        Tensor::<4>::random([2, 8, 3, 3], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let mode = QuantizeMode {
        training: true,
        temperature: 0.9,
        group: None,
    };
    let out = q.forward(z.clone(), mode);
    // Hard one-hot: each position equals exactly one code vector.
    let looked_up = q.lookup(out.indices.clone());
    common::assert_close_to_max(
        "hard codes",
        &values(out.z_q.clone()),
        &values(looked_up),
        1e-5,
    );
    let grads = out.z_q.sum().backward();
    assert!(
        z.grad(&grads).is_some(),
        "straight-through reaches the latents"
    );
    assert!(q.proj.weight.grad(&grads).is_some());
    // Sampling differs from the deterministic argmax somewhere at temperature 0.9.
    let eval = q.forward(z.clone(), QuantizeMode::EVAL);
    let samples: Vec<Vec<i64>> = (0..5)
        .map(|_| ints(q.forward(z.clone(), mode).indices))
        .collect();
    assert!(
        samples.iter().any(|s| *s != ints(eval.indices.clone())),
        "sampling is stochastic"
    );
}
