//! The GPT (the reference's minGPT): token embedding plus learned absolute positions, pre-LN
//! blocks of causal multi-head self-attention and a GELU MLP (4x wide), a final LayerNorm
//! and a bias-free head. Weights start at N(0, 0.02), biases and positions at zero.
//!
//! [`Gpt::forward_cached`] appends tokens to a [`KvCache`], so that sampling costs one new
//! position per token instead of the whole sequence.

use burn::module::{Module, Param};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig,
    Linear, LinearConfig,
};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use taming_kernels::linear::linear as apply;

use super::config::GptConfig;

fn init() -> Initializer {
    Initializer::Normal {
        mean: 0.0,
        std: 0.02,
    }
}

fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    let mut layer = LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .with_initializer(init())
        .init(device);
    // Biases start at zero (a fresh trainable parameter, not a mapped one).
    layer.bias = bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device)));
    layer
}

/// Causal multi-head self-attention with separate key, query and value projections.
#[derive(Module, Debug)]
pub struct CausalSelfAttention {
    /// Key projection.
    pub key: Linear,
    /// Query projection.
    pub query: Linear,
    /// Value projection.
    pub value: Linear,
    /// Output projection.
    pub proj: Linear,
    attn_drop: Dropout,
    resid_drop: Dropout,
    n_head: usize,
}

/// Keys and values of one layer: buffers of `[batch, heads, block_size, head_dim]`
/// allocated once, of which the first `len` positions are held; new positions are written
/// in place (the buffers are not shared unless the cache is cloned).
#[derive(Debug, Clone)]
pub struct LayerCache {
    k: Tensor<4>,
    v: Tensor<4>,
    len: usize,
}

impl LayerCache {
    /// Writes `k` and `v` (`[b, heads, t, head_dim]`) at positions `len..len + t` of
    /// buffers of `capacity` positions.
    fn append(self, k: Tensor<4>, v: Tensor<4>, capacity: usize) -> Self {
        let [b, h, t, d] = k.dims();
        let (mut keys, mut values, len) = (self.k, self.v, self.len);
        if keys.dims()[0] != b {
            let device = k.device();
            keys = Tensor::zeros([b, h, capacity, d], &device);
            values = Tensor::zeros([b, h, capacity, d], &device);
        }
        let at = [0..b, 0..h, len..len + t, 0..d];
        Self {
            k: keys.slice_assign(at.clone(), k),
            v: values.slice_assign(at, v),
            len: len + t,
        }
    }

    /// An empty layer cache (no buffers yet).
    fn empty(device: &Device) -> Self {
        Self {
            k: Tensor::zeros([0, 0, 0, 0], device),
            v: Tensor::zeros([0, 0, 0, 0], device),
            len: 0,
        }
    }
}

/// Keys and values of every layer for the positions fed so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `n` positions.
    pub fn truncate(&mut self, n: usize) {
        if n == 0 {
            self.layers.clear();
            return;
        }
        for l in &mut self.layers {
            l.len = l.len.min(n);
        }
    }
}

impl CausalSelfAttention {
    fn new(c: &GptConfig, device: &Device) -> Self {
        let n = c.n_embd;
        Self {
            key: linear(n, n, true, device),
            query: linear(n, n, true, device),
            value: linear(n, n, true, device),
            proj: linear(n, n, true, device),
            attn_drop: DropoutConfig::new(c.attn_pdrop).init(),
            resid_drop: DropoutConfig::new(c.resid_pdrop).init(),
            n_head: c.n_head,
        }
    }

    fn heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, t, n] = x.dims();
        x.reshape([b, t, self.n_head, n / self.n_head])
            .swap_dims(1, 2)
    }

    /// Queries, keys and values of `x` (`[b, t, n]`), each `[b, heads, t, head_dim]`.
    fn qkv(&self, x: Tensor<3>) -> [Tensor<4>; 3] {
        [
            self.heads(apply(&self.query, x.clone())),
            self.heads(apply(&self.key, x.clone())),
            self.heads(apply(&self.value, x)),
        ]
    }

    /// Attention over the whole sequence `x` (`[b, t, n]`).
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [q, k, v] = self.qkv(x);
        self.attend(q, k, v, 0)
    }

    /// `x`: `[b, t, n]` at positions `cache.len..cache.len + t` of at most `capacity`;
    /// returns the output and the cache with the new positions written in.
    fn forward_cached(
        &self,
        x: Tensor<3>,
        cache: LayerCache,
        capacity: usize,
    ) -> (Tensor<3>, LayerCache) {
        let [q, k, v] = self.qkv(x);
        let past = cache.len;
        let cache = cache.append(k, v, capacity);
        let total = cache.len;
        let k = cache.k.clone().narrow(2, 0, total);
        let v = cache.v.clone().narrow(2, 0, total);
        (self.attend(q, k, v, past), cache)
    }

    /// Causal attention of queries at positions `past..` over keys and values `0..`.
    fn attend(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, past: usize) -> Tensor<3> {
        let [b, _, t, d] = q.dims();
        let total = k.dims()[2];
        let scale = 1.0 / (d as f64).sqrt();
        let mut att = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        if t > 1 {
            let mask = causal_mask(t, total, past, &att.device());
            att = att.mask_fill(mask.expand([b, self.n_head, t, total]), f32::NEG_INFINITY);
        }
        let att = self.attn_drop.forward(softmax(att, 3));
        let y = att
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, t, d * self.n_head]);
        self.resid_drop.forward(apply(&self.proj, y))
    }
}

/// `[1, 1, t, total]`, true where query `past + i` must not see key `j` (`j > past + i`).
fn causal_mask(t: usize, total: usize, past: usize, device: &Device) -> Tensor<4, Bool> {
    let values: Vec<bool> = (0..t)
        .flat_map(|i| (0..total).map(move |j| j > past + i))
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, t, total]), device)
}

/// One pre-LN transformer block.
#[derive(Module, Debug)]
pub struct Block {
    /// LayerNorm before attention.
    pub ln1: LayerNorm,
    /// LayerNorm before the MLP.
    pub ln2: LayerNorm,
    /// Self-attention.
    pub attn: CausalSelfAttention,
    /// MLP expansion (the reference's `mlp.0`).
    pub mlp_fc: Linear,
    /// MLP projection (the reference's `mlp.2`).
    pub mlp_proj: Linear,
    mlp_drop: Dropout,
}

impl Block {
    fn new(c: &GptConfig, device: &Device) -> Self {
        let n = c.n_embd;
        Self {
            ln1: LayerNormConfig::new(n).init(device),
            ln2: LayerNormConfig::new(n).init(device),
            attn: CausalSelfAttention::new(c, device),
            mlp_fc: linear(n, 4 * n, true, device),
            mlp_proj: linear(4 * n, n, true, device),
            mlp_drop: DropoutConfig::new(c.resid_pdrop).init(),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let a = self.attn.forward(self.ln1.forward(x.clone()));
        self.mlp(x + a)
    }

    fn forward_cached(
        &self,
        x: Tensor<3>,
        cache: LayerCache,
        capacity: usize,
    ) -> (Tensor<3>, LayerCache) {
        let (a, cache) = self
            .attn
            .forward_cached(self.ln1.forward(x.clone()), cache, capacity);
        (self.mlp(x + a), cache)
    }

    fn mlp(&self, x: Tensor<3>) -> Tensor<3> {
        let h = apply(&self.mlp_fc, self.ln2.forward(x.clone()));
        x + self.mlp_drop.forward(apply(&self.mlp_proj, gelu(h)))
    }
}

/// The GPT.
#[derive(Module, Debug)]
pub struct Gpt {
    /// Token embedding.
    pub tok_emb: Embedding,
    /// Learned positions, `[1, block_size, n_embd]`.
    pub pos_emb: Param<Tensor<3>>,
    /// The blocks.
    pub blocks: Vec<Block>,
    /// Final LayerNorm.
    pub ln_f: LayerNorm,
    /// Bias-free head to the vocabulary.
    pub head: Linear,
    drop: Dropout,
    block_size: usize,
}

impl Gpt {
    /// A freshly initialized GPT (call `device.seed(..)` first for reproducible weights).
    pub fn new(c: &GptConfig, device: &Device) -> Self {
        Self {
            tok_emb: EmbeddingConfig::new(c.vocab_size, c.n_embd)
                .with_initializer(init())
                .init(device),
            pos_emb: Param::from_tensor(Tensor::zeros([1, c.block_size, c.n_embd], device)),
            blocks: (0..c.n_layer).map(|_| Block::new(c, device)).collect(),
            ln_f: LayerNormConfig::new(c.n_embd).init(device),
            head: linear(c.n_embd, c.vocab_size, false, device),
            drop: DropoutConfig::new(c.embd_pdrop).init(),
            block_size: c.block_size,
        }
    }

    /// Longest sequence.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Logits `[b, t, vocab]` of a whole sequence `[b, t]`.
    pub fn forward(&self, idx: Tensor<2, Int>) -> Tensor<3> {
        let x = self.embed(idx, 0);
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        apply(&self.head, self.ln_f.forward(x))
    }

    /// Logits `[b, t, vocab]` of tokens `[b, t]` that continue the positions in `cache`,
    /// which then holds them too.
    pub fn forward_cached(&self, idx: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        let past = cache.len();
        let mut x = self.embed(idx, past);
        let device = x.device();
        let mut old = std::mem::take(&mut cache.layers).into_iter();
        for block in &self.blocks {
            let layer = old.next().unwrap_or_else(|| LayerCache::empty(&device));
            let (y, kv) = block.forward_cached(x, layer, self.block_size);
            x = y;
            cache.layers.push(kv);
        }
        apply(&self.head, self.ln_f.forward(x))
    }

    /// Multiplies every Linear weight (not biases, LayerNorms, embeddings or positions) by
    /// `factor`: the decoupled weight decay of AdamW as the reference configures it.
    pub fn scale_linear_weights(mut self, factor: f64) -> Self {
        let scale = |l: &mut Linear| {
            l.weight = l.weight.clone().map(|w| {
                let grad = w.is_require_grad();
                let scaled = Tensor::from_inner(w.inner().mul_scalar(factor));
                if grad { scaled.require_grad() } else { scaled }
            });
        };
        for b in &mut self.blocks {
            for l in [
                &mut b.attn.key,
                &mut b.attn.query,
                &mut b.attn.value,
                &mut b.attn.proj,
                &mut b.mlp_fc,
                &mut b.mlp_proj,
            ] {
                scale(l);
            }
        }
        scale(&mut self.head);
        self
    }

    fn embed(&self, idx: Tensor<2, Int>, past: usize) -> Tensor<3> {
        let [_, t] = idx.dims();
        assert!(
            past + t <= self.block_size,
            "sequence of {} tokens is longer than the block size {}",
            past + t,
            self.block_size
        );
        let pos = self.pos_emb.val().narrow(1, past, t);
        self.drop.forward(self.tok_emb.forward(idx) + pos)
    }
}
