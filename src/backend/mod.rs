//! The backend trait: every op a training step needs, forward and backward.
//!
//! Design decisions a reader meets here:
//! - A backend owns its buffer type ([`Backend::Buf`]): a `Vec<f32>` on the CPU, device memory on
//!   a GPU. Ops never see host memory except for small integer inputs (token ids, positions,
//!   masks), which a device backend uploads itself.
//! - Ops take views ([`Backend::View`], [`Backend::ViewMut`]) so that parameters and gradients can
//!   each live in one flat allocation and be addressed by offset: one optimizer pass or one
//!   all-reduce covers them all.
//! - Shapes follow llm.c's naming in comments: `N` rows (tokens, `B*T`), `C` channels, `OC` output
//!   channels, `NH` query heads, `KVH` key/value heads, `HD` head dim, `V` vocabulary.
//! - **Every backward op adds into its gradient outputs** (`+=`), never overwrites: gradients of
//!   shared tensors (the residual stream, tied embeddings, accumulated micro-batches) then need no
//!   extra buffers. Callers zero gradient buffers when a fresh gradient is wanted.
//! - The trait is split into families ([`ModelOps`], loss ops elsewhere) so that a backend can
//!   implement one family completely before the next.

pub mod cpu;
pub mod cuda;
pub mod emu;
pub mod loss;

pub use loss::LossOps;

use std::ops::Range;

/// Buffers and views: the memory side of a backend.
pub trait Backend: Sync + Send {
    /// An owned f32 buffer (device-resident on a GPU backend).
    type Buf: Send + Sync;
    /// A read-only view into part of a buffer.
    type View<'a>: Copy
    where
        Self: 'a;
    /// A writable view into part of a buffer.
    type ViewMut<'a>
    where
        Self: 'a;

    /// A short name for messages (`cpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// A zero-filled buffer of `n` elements.
    fn zeros(&self, n: usize) -> Self::Buf;
    /// A buffer holding a copy of `data`.
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// A host copy of a view.
    fn download(&self, v: Self::View<'_>) -> Vec<f32>;
    /// Number of elements in a buffer.
    fn len(&self, b: &Self::Buf) -> usize;
    /// A view of `b[r]`.
    fn view<'a>(&self, b: &'a Self::Buf, r: Range<usize>) -> Self::View<'a>;
    /// A writable view of `b[r]`.
    fn view_mut<'a>(&self, b: &'a mut Self::Buf, r: Range<usize>) -> Self::ViewMut<'a>;
    /// Sets every element of the view to `value`.
    fn fill(&self, v: Self::ViewMut<'_>, value: f32);
    /// `dst = src` (same lengths).
    fn copy(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>);

    /// A view of the whole buffer.
    fn all<'a>(&self, b: &'a Self::Buf) -> Self::View<'a> {
        self.view(b, 0..self.len(b))
    }
    /// A writable view of the whole buffer.
    fn all_mut<'a>(&self, b: &'a mut Self::Buf) -> Self::ViewMut<'a> {
        let n = self.len(b);
        self.view_mut(b, 0..n)
    }
}

/// Geometry of one attention call. `qkv` rows are `[q (NH*HD) | k (KVH*HD) | v (KVH*HD)]`,
/// HF's q/k/v projection outputs concatenated; rows are `B*T` tokens, batch-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Width of one `qkv` row.
    pub fn qkv_width(&self) -> usize {
        (self.n_head + 2 * self.n_kv_head) * self.head_dim
    }
    /// Width of one attention output row (`NH*HD`).
    pub fn out_width(&self) -> usize {
        self.n_head * self.head_dim
    }
}

/// Hyper-parameters of one AdamW update (PyTorch's `torch.optim.AdamW` formula).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
}

/// The model family: every op of the transformer's forward and backward, plus the optimizer.
///
/// Matrix conventions: a linear layer's weight is `[OC, C]` (PyTorch `nn.Linear`), so
/// `out = inp · wᵀ + bias`.
pub trait ModelOps: Backend {
    /// `out[n] (+)= table[ids[n]]`; adds when `accumulate`, else overwrites.
    /// out: (N, C), table: (rows, C), ids: N values `< rows` (checked by the caller).
    fn embedding_forward(
        &self,
        out: Self::ViewMut<'_>,
        table: Self::View<'_>,
        ids: &[u32],
        c: usize,
        accumulate: bool,
    );
    /// `dtable[ids[n]] += dout[n]`. Deterministic: rows are reduced in a fixed order.
    fn embedding_backward(
        &self,
        dtable: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        ids: &[u32],
        c: usize,
    );

    /// `out = inp · wᵀ + bias`. out: (N, OC), inp: (N, C), w: (OC, C), bias: (OC).
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &self,
        out: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        w: Self::View<'_>,
        bias: Option<Self::View<'_>>,
        n: usize,
        c: usize,
        oc: usize,
    );
    /// `dinp += dout · w` (if given), `dw += doutᵀ · inp`. Shapes as in `matmul_forward`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: Option<Self::ViewMut<'_>>,
        dw: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        w: Self::View<'_>,
        n: usize,
        c: usize,
        oc: usize,
    );
    /// `dbias += Σ_n dout[n]`. dout: (N, OC), dbias: (OC).
    fn bias_backward(&self, dbias: Self::ViewMut<'_>, dout: Self::View<'_>, n: usize, oc: usize);

    /// LayerNorm over the last dimension; saves `mean` and `rstd` (N) for backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: Self::ViewMut<'_>,
        mean: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        w: Self::View<'_>,
        b: Self::View<'_>,
        n: usize,
        c: usize,
        eps: f32,
    );
    /// Gradients of LayerNorm w.r.t. its input and weight (the bias gradient is
    /// `bias_backward` of `dout`).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: Self::ViewMut<'_>,
        dw: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        w: Self::View<'_>,
        mean: Self::View<'_>,
        rstd: Self::View<'_>,
        n: usize,
        c: usize,
    );

    /// RMSNorm (Llama): `out = inp · rstd · w`, `rstd = 1/sqrt(mean(inp²) + eps)`, saved (N).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        out: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        w: Self::View<'_>,
        n: usize,
        c: usize,
        eps: f32,
    );
    /// Gradients of RMSNorm w.r.t. its input and weight.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dinp: Self::ViewMut<'_>,
        dw: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        w: Self::View<'_>,
        rstd: Self::View<'_>,
        n: usize,
        c: usize,
    );

    /// GELU, tanh form (`gelu_new`, `gelu_pytorch_tanh`), elementwise.
    fn gelu_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>);
    /// `dinp += gelu'(inp) · dout`.
    fn gelu_backward(&self, dinp: Self::ViewMut<'_>, inp: Self::View<'_>, dout: Self::View<'_>);

    /// SwiGLU: `out[n, i] = silu(inp[n, i]) · inp[n, I + i]`; inp rows are `[gate (I) | up (I)]`.
    /// out: (N, I), inp: (N, 2I).
    fn swiglu_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>, n: usize, i: usize);
    /// Gradient of SwiGLU w.r.t. its (N, 2I) input.
    fn swiglu_backward(
        &self,
        dinp: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        dout: Self::View<'_>,
        n: usize,
        i: usize,
    );

    /// Rotary position embedding in place on the q and k parts of `qkv` (HF's rotate-half
    /// layout: pairs `(x[j], x[j + HD/2])`), angle `pos[n] · theta^(-2j/HD)`.
    /// qkv: (N, qkv_width), pos: N position ids.
    fn rope_forward(&self, qkv: Self::ViewMut<'_>, pos: &[u32], shape: AttnShape, theta: f32);
    /// The transpose of `rope_forward` applied in place to `dqkv` (a rotation's inverse).
    fn rope_backward(&self, dqkv: Self::ViewMut<'_>, pos: &[u32], shape: AttnShape, theta: f32);

    /// Causal self-attention with grouped-query heads and a key padding mask.
    /// Query head `h` reads key/value head `h / (NH / KVH)`. Scale `1/sqrt(HD)`.
    /// Key `j` is visible to query `i` (same sequence) iff `j <= i` and `key_mask[b*T + j]`.
    /// A query that sees no key outputs zeros. Tiled with an online softmax: never more than one
    /// tile of scores per head at a time. Saves the row log-sum-exp `lse` (B, NH, T) for backward.
    /// out: (B*T, NH*HD), qkv: (B*T, qkv_width), key_mask: B*T.
    fn attention_forward(
        &self,
        out: Self::ViewMut<'_>,
        lse: Self::ViewMut<'_>,
        qkv: Self::View<'_>,
        key_mask: &[bool],
        shape: AttnShape,
    );
    /// `dqkv += ∂loss/∂qkv`, recomputing probabilities tile by tile from `lse`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        qkv: Self::View<'_>,
        out: Self::View<'_>,
        lse: Self::View<'_>,
        key_mask: &[bool],
        shape: AttnShape,
    );

    /// `out = a + b`, elementwise (the residual connection).
    fn add(&self, out: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>);
    /// `acc += x`, elementwise (gradient accumulation).
    fn add_inplace(&self, acc: Self::ViewMut<'_>, x: Self::View<'_>);
    /// `x *= s`, elementwise.
    fn scale(&self, x: Self::ViewMut<'_>, s: f32);

    /// Fused log-softmax + gather over the vocabulary, chunked so that no softmax row is kept:
    /// `logp[n] = log softmax(logits[n] / temperature)[targets[n]]`, optionally the entropy
    /// of that tempered distribution (`entropy[n]`), and the row log-sum-exp of the tempered logits
    /// (`lse[n]`, saved for backward). logits: (N, V).
    #[allow(clippy::too_many_arguments)]
    fn logprobs_forward(
        &self,
        logp: Self::ViewMut<'_>,
        entropy: Option<Self::ViewMut<'_>>,
        lse: Self::ViewMut<'_>,
        logits: Self::View<'_>,
        targets: &[u32],
        n: usize,
        v: usize,
        temperature: f32,
    );
    /// `dlogits += ∂/∂logits (Σ dlogp·logp + Σ dentropy·entropy)`.
    #[allow(clippy::too_many_arguments)]
    fn logprobs_backward(
        &self,
        dlogits: Self::ViewMut<'_>,
        logits: Self::View<'_>,
        targets: &[u32],
        lse: Self::View<'_>,
        dlogp: Self::View<'_>,
        dentropy: Option<Self::View<'_>>,
        n: usize,
        v: usize,
        temperature: f32,
    );

    /// Sum of squares of a view, reduced in fixed-size chunks (deterministic).
    fn sum_squares(&self, x: Self::View<'_>) -> f64;
    /// One AdamW step on a parameter view; `m` and `v` are the moment buffers of the same length.
    fn adamw(
        &self,
        params: Self::ViewMut<'_>,
        grads: Self::View<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        h: AdamW,
    );
}

/// The decode family: what generation with a KV cache adds to the model ops.
///
/// Cache layout: one `k` and one `v` buffer per layer, each (B, KVH, TMAX, HD), so that one
/// head's keys for a sequence are contiguous.
pub trait DecodeOps: ModelOps {
    /// Writes the k and v parts of `qkv` rows (B sequences × `shape.t` new tokens, batch-major)
    /// into cache columns `t0 .. t0 + shape.t`.
    fn kv_cache_store(
        &self,
        k_cache: Self::ViewMut<'_>,
        v_cache: Self::ViewMut<'_>,
        qkv: Self::View<'_>,
        shape: AttnShape,
        t0: usize,
        t_max: usize,
    );
    /// Attention of one query row per sequence (`qkv`: (B, QKV), `shape.t` = 1) against cache
    /// columns `0..len`, column `j` of sequence `b` visible iff `key_mask[b·TMAX + j]`.
    /// out: (B, NH·HD). A row that sees no key outputs zeros.
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        out: Self::ViewMut<'_>,
        qkv: Self::View<'_>,
        k_cache: Self::View<'_>,
        v_cache: Self::View<'_>,
        key_mask: &[bool],
        shape: AttnShape,
        len: usize,
        t_max: usize,
    );
    /// Picks a token for each row listed in `rows` from `logits` (B, V): ids[i], logps[i] for rows[i],
    /// with uniforms[i] in [0, 1) drawn by the caller (unused when greedy). logps[i] is the token's
    /// log-prob at the sampling temperature before top-k/top-p truncation (TRL's convention).
    #[allow(clippy::too_many_arguments)]
    fn sample_tokens(
        &self,
        logits: Self::View<'_>,
        rows: &[u32],
        v: usize,
        p: SampleParams,
        uniforms: &[f64],
        ids: &mut [u32],
        logps: &mut [f32],
    );
}

/// Sampling parameters of one decode step (temperature <= 0: greedy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0, or at least V: off).
    pub top_k: usize,
    /// Keep the shortest run of most likely tokens holding this share of the mass (>= 1: off).
    pub top_p: f32,
}

impl SampleParams {
    /// Whether the step decodes greedily (the first maximum, log-probs at temperature 1).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Panics unless `DecodeOps::sample_tokens`'s arguments agree (a caller's bug, as for every
    /// op): logits hold whole rows of `v > 0`, every listed row exists, one id and log-prob per
    /// listed row, and one uniform per listed row unless greedy. Returns B, the logits' rows.
    pub fn check_args(
        &self,
        logits: usize,
        rows: &[u32],
        v: usize,
        uniforms: usize,
        ids: usize,
        logps: usize,
    ) -> usize {
        let op = "sample_tokens";
        assert!(
            v > 0 && logits.is_multiple_of(v),
            "{op}: {logits} logits are not whole rows of V = {v}"
        );
        let b = logits / v;
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= b) {
            panic!("{op}: row {r} out of a batch of {b}");
        }
        let n = rows.len();
        assert!(
            ids == n && logps == n,
            "{op}: {ids} ids and {logps} log-probs for {n} rows"
        );
        assert!(
            self.is_greedy() || uniforms == n,
            "{op}: {uniforms} uniforms for {n} sampled rows"
        );
        b
    }
}
