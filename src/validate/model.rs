//! The model family in `rlhf validate` and `rlhf bench kernels`: every op of
//! [`ModelOps`](crate::backend::ModelOps) and [`DecodeOps`] on the kernels against the CPU
//! reference, as the loss family in the parent module: [`cases`] gives (op, shape) rows, [`Data`]
//! their random inputs, [`run`] runs one on any backend and flattens what it computes.
//!
//! Each op runs as a layer does: the forward, then the backward on the forward's own outputs
//! (attention's backward reads the backend's out and lse), gradients added to random starting
//! values (the trait's `+=`), outputs written over random contents where they must be overwritten.
//! Shapes are odd so that every bound runs: one row or one token, widths below and above a 256-
//! thread block, attention at GQA ratios 1 and 4, T = 1 and T not a multiple of the 32-key tile,
//! head dims 16, 64 and 128, right padding (a padded tail) in training and left padding and holes
//! in decode (with visible, random cache columns past the cache length, which must be ignored).
//!
//! Error measures (the parent module's docs give the tolerances):
//! - GEMMs ([`ModelOp::MatmulFwd`], [`ModelOp::MatmulBwd`]): every operand is rounded to bf16
//!   first, so that the bf16-operand GEMM (cuBLAS's `COMPUTE_32F_FAST_16BF`, the emulator's
//!   executor) and the CPU's f32 GEMM multiply the same values and each product is exact in f32;
//!   only the order of the f32 sums differs. The error is taken relative to each element's
//!   magnitude, Σ|terms| (the sum of absolute products plus the absolute values added to them),
//!   computed by the CPU op on the inputs' absolute values (tests/matmul_kernels.rs, whose
//!   `ORDER_TOL` this is).
//! - Sampled ids and the copies (the KV-cache store, the embedding lookup) must be exact.
//! - Sampling's log-probs and the sum of squares: per value, as the loss family.
//! - Everything else: relative to the scale of the tensor compared, `max(1, max |want|)`, the
//!   kernel tests' measure: gradients are sums of terms that cancel, so their rounding is
//!   relative to the tensor's largest values, not to each value.

use super::{host, widen, Out, Shape, TOL_ATTN_BF16, TOL_F32};
use crate::backend::emu::model_ops::bf16_attention;
use crate::backend::{AdamW, AttnShape, Backend, DecodeOps, SampleParams};
use crate::rng::Rng;
use half::bf16;

/// The norms' epsilon.
const EPS: f32 = 1e-5;
/// RoPE's base (Llama 3's): angles of many turns at the larger positions.
const ROPE_THETA: f32 = 500_000.0;
/// The scale factor of the scale op.
const SCALE: f32 = -0.37;
/// How far each sampling uniform is from every boundary between kept tokens, and each top-p
/// threshold from every cumulative mass, so that a token cannot flip. Both sides compute the
/// same f32 weights (`sampling.cu` ports the CPU's `math::exp` operation for operation) and
/// differ only in the order of the f64 sums, relative ~1e-15 on the cumulative masses; the
/// reference's f64 exps are within ~2.5e-7 relative of those weights. 1e-5 also covers a device
/// that rounds differently after all.
const MARGIN: f64 = 1e-5;
/// The cache columns beyond the decode cases' length (random, visible in the mask).
const DECODE_SLACK: usize = 3;

/// A model-family op, as the layers run it (most are a forward and its backward).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelOp {
    /// Causal attention: `attention_forward` (out, lse) then `attention_backward` (dqkv). The
    /// backend picks the kernels by head dim ([`bf16_attention`]): the f32 SIMT kernels, or the
    /// tensor-core kernels on bf16 copies of the activations (`tensor_cores`), whose inputs the
    /// case rounds to bf16 so that the CPU sees the same values.
    Attention {
        /// Whether the shape runs on the tensor cores (the case table asks the backend's rule).
        tensor_cores: bool,
    },
    /// One decode step: `kv_cache_store` of the new token's k and v, then `attention_decode`.
    Decode,
    /// RMSNorm forward and backward.
    RmsNorm,
    /// LayerNorm forward and backward.
    LayerNorm,
    /// `matmul_forward`, with or without the bias.
    MatmulFwd {
        /// Whether a bias is added.
        bias: bool,
    },
    /// `matmul_backward` (dinp and dw) and `bias_backward`.
    MatmulBwd,
    /// Embedding forward (overwriting, then accumulating) and backward, with repeated ids.
    Embedding,
    /// RoPE forward and backward on grouped-query heads.
    Rope,
    /// GELU forward and backward.
    Gelu,
    /// SwiGLU forward and backward.
    Swiglu,
    /// `add`, `add_inplace` and `scale`.
    Residual,
    /// Sum of squares (gradient clipping's norm).
    SumSquares,
    /// One AdamW step from non-zero moments (bias correction at step 3).
    AdamW,
    /// `DecodeOps::sample_tokens` in one mode.
    Sample(Sampling),
}

/// A sampling mode of [`ModelOp::Sample`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// Temperature 0: the first maximum.
    Greedy,
    /// Temperature 0.7, no truncation.
    Temperature,
    /// Top-k 5.
    TopK,
    /// Top-p 0.9 at temperature 0.8.
    TopP,
    /// Top-k 20 then top-p 0.8, at temperature 0.9.
    TopKTopP,
}

impl Sampling {
    /// The parameters (top-p before [`Data::new`] moves it clear of every row's cumulative mass).
    fn params(self) -> SampleParams {
        let (temperature, top_k, top_p) = match self {
            Sampling::Greedy => (0.0, 0, 1.0),
            Sampling::Temperature => (0.7, 0, 1.0),
            Sampling::TopK => (1.0, 5, 1.0),
            Sampling::TopP => (0.8, 0, 0.9),
            Sampling::TopKTopP => (0.9, 20, 0.8),
        };
        SampleParams {
            temperature,
            top_k,
            top_p,
        }
    }
}

/// How an op's errors are measured (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Measure {
    /// `|got - want| / max(1, |want|)`.
    Value,
    /// `|got - want| / max(1, max |want|)` over the tensor.
    Tensor,
    /// `|got - want| / Σ|terms|`.
    Terms,
}

impl ModelOp {
    /// The kernel column of the tables.
    pub fn name(self) -> String {
        match self {
            ModelOp::Attention {
                tensor_cores: false,
            } => "attention f32".into(),
            ModelOp::Attention { tensor_cores: true } => "attention bf16 tc".into(),
            ModelOp::Decode => "attn_decode f32".into(),
            ModelOp::RmsNorm => "rmsnorm".into(),
            ModelOp::LayerNorm => "layernorm".into(),
            ModelOp::MatmulFwd { bias: false } => "matmul_fwd".into(),
            ModelOp::MatmulFwd { bias: true } => "matmul_fwd bias".into(),
            ModelOp::MatmulBwd => "matmul_bwd".into(),
            ModelOp::Embedding => "embedding".into(),
            ModelOp::Rope => "rope".into(),
            ModelOp::Gelu => "gelu".into(),
            ModelOp::Swiglu => "swiglu".into(),
            ModelOp::Residual => "add/scale".into(),
            ModelOp::SumSquares => "sum_squares".into(),
            ModelOp::AdamW => "adamw".into(),
            ModelOp::Sample(m) => match m {
                Sampling::Greedy => "sample greedy",
                Sampling::Temperature => "sample temperature",
                Sampling::TopK => "sample top-k",
                Sampling::TopP => "sample top-p",
                Sampling::TopKTopP => "sample top-k top-p",
            }
            .into(),
        }
    }

    /// The scaled error allowed (the parent module's docs).
    pub fn tolerance(self) -> f64 {
        match self {
            ModelOp::Attention { tensor_cores: true } => TOL_ATTN_BF16,
            _ => TOL_F32,
        }
    }

    pub(super) fn measure(self) -> Measure {
        match self {
            ModelOp::MatmulFwd { .. } | ModelOp::MatmulBwd => Measure::Terms,
            ModelOp::SumSquares | ModelOp::Sample(_) => Measure::Value,
            _ => Measure::Tensor,
        }
    }

    /// Bytes of inputs and outputs the op must move at least, f32 values, u32 ids and mask flags
    /// (a `+=` output counts twice: read and written).
    pub fn io_bytes(self, s: Shape) -> usize {
        let f = 4;
        match self {
            ModelOp::Attention { .. } => {
                let a = attn(s);
                let (n, w, o, l) = (
                    a.b * a.t,
                    a.qkv_width(),
                    a.out_width(),
                    a.b * a.n_head * a.t,
                );
                // Forward: qkv, mask; out, lse. Backward: dout, qkv, out, lse, mask; dqkv (+=).
                f * ((n * w + n + n * o + l) + (n * o + n * w + n * o + l + n + 2 * n * w))
            }
            ModelOp::Decode => {
                let a = attn(s);
                let (len, t_max, hd) = (a.t, a.t + DECODE_SLACK, a.head_dim);
                let kv = a.b * a.n_kv_head * hd;
                // Store: k and v of the new rows; two cache columns. Decode: q, mask, the visible
                // length of both caches; out.
                f * (4 * kv
                    + a.b * a.n_head * hd
                    + a.b * t_max
                    + 2 * kv * len
                    + a.b * a.out_width())
            }
            ModelOp::RmsNorm | ModelOp::LayerNorm => {
                let (n, c) = rows(s);
                let layer = usize::from(self == ModelOp::LayerNorm);
                // Forward: inp, w, (b); out, rstd, (mean). Backward: dout, inp, w, rstd, (mean);
                // dinp and dw (+=).
                f * ((2 * n * c + c + layer * c + n + layer * n)
                    + (2 * n * c + c + n + layer * n + 2 * n * c + 2 * c))
            }
            ModelOp::MatmulFwd { bias } => {
                let (n, c, oc) = linear(s);
                f * (n * c + oc * c + usize::from(bias) * oc + n * oc)
            }
            ModelOp::MatmulBwd => {
                let (n, c, oc) = linear(s);
                // dout, inp, w; dinp and dw (+=). Then dout; dbias (+=).
                f * ((n * oc + n * c + oc * c + 2 * n * c + 2 * oc * c) + (n * oc + 2 * oc))
            }
            ModelOp::Embedding => {
                let (n, c) = rows(s);
                // Overwrite: ids, gathered rows; out. Accumulate: the same, out read too.
                // Backward: ids, dout; at most N table rows (+=).
                f * ((n + 2 * n * c) + (n + 3 * n * c) + (n + n * c + 2 * n.min(table_rows(n)) * c))
            }
            ModelOp::Rope => {
                let a = attn(s);
                let n = a.b * a.t;
                // Each way: positions; the q and k parts of qkv, read and written.
                2 * f * (n + 2 * n * (a.n_head + a.n_kv_head) * a.head_dim)
            }
            ModelOp::Gelu => {
                let n = flat(s);
                // Forward: inp; out. Backward: inp, dout; dinp (+=).
                f * (2 * n + 4 * n)
            }
            ModelOp::Swiglu => {
                let (n, i) = rows(s);
                // Forward: inp (2I); out (I). Backward: inp, dout; dinp (+=).
                f * n * i * (3 + 2 + 1 + 4)
            }
            // add: a, b; out. add_inplace: x; acc (+=). scale: x read and written.
            ModelOp::Residual => 8 * f * flat(s),
            ModelOp::SumSquares => f * flat(s) + 8,
            // params, m and v read and written, grads read.
            ModelOp::AdamW => 7 * f * flat(s),
            ModelOp::Sample(_) => {
                let (b, v) = rows(s);
                let listed = b + 1;
                // Each listed row's logits (once, at least), its row index and uniform; id and
                // log-prob (f64 each).
                listed * (f * v + f + 8 + 16)
            }
        }
    }
}

fn attn(s: Shape) -> AttnShape {
    match s {
        Shape::Attn(a) => a,
        _ => panic!("{s} is not an attention shape"),
    }
}

fn rows(s: Shape) -> (usize, usize) {
    match s {
        Shape::Rows { n, c } => (n, c),
        _ => panic!("{s} is not a rows shape"),
    }
}

fn linear(s: Shape) -> (usize, usize, usize) {
    match s {
        Shape::Linear { n, c, oc } => (n, c, oc),
        _ => panic!("{s} is not a linear-layer shape"),
    }
}

fn flat(s: Shape) -> usize {
    match s {
        Shape::Flat(n) => n,
        _ => panic!("{s} is not a flat shape"),
    }
}

/// Rows of the embedding table for `n` ids: ids are drawn from its lower half, so that they
/// repeat and some rows receive no gradient.
fn table_rows(n: usize) -> usize {
    n / 2 + 5
}

fn heads(b: usize, t: usize, n_head: usize, n_kv_head: usize, head_dim: usize) -> Shape {
    Shape::Attn(AttnShape {
        b,
        t,
        n_head,
        n_kv_head,
        head_dim,
    })
}

/// The model family's rows of the sweep; every op has a one-row (one-token, one-element) case.
/// Attention: a single token, and T = 7, 33, 45, 70, 100, 129 (no multiple of the 32-key tile),
/// GQA ratios 1 and 4, head dims 16 (and 48) on the f32 kernels, 64 and 128 on the tensor cores
/// (the backend's choice). Decode: cache lengths of one column and past a tile, GQA 1 and 4.
/// Norms, SwiGLU and the embedding: widths below, at and above the 256-thread block. GEMMs: one
/// column, sizes that are multiples of nothing, rows past the bias gradient's 32-row chunk.
/// Sampling: vocabularies below, at and above the block. The full sweep adds larger shapes.
pub(super) fn cases(quick: bool) -> Vec<(ModelOp, Shape)> {
    let attention: &[Shape] = if quick {
        &[
            heads(1, 1, 2, 2, 16),
            heads(2, 33, 4, 1, 16),
            heads(1, 1, 4, 1, 64),
            heads(2, 33, 4, 1, 64),
            heads(2, 7, 2, 2, 128),
        ]
    } else {
        &[
            heads(1, 1, 2, 2, 16),
            heads(2, 33, 4, 1, 16),
            heads(3, 70, 8, 2, 16),
            heads(2, 45, 4, 4, 48),
            heads(1, 1, 4, 1, 64),
            heads(2, 33, 4, 1, 64),
            heads(2, 100, 4, 4, 64),
            heads(2, 7, 2, 2, 128),
            heads(2, 129, 8, 2, 128),
        ]
    };
    let decode: &[Shape] = if quick {
        &[heads(1, 1, 2, 2, 16), heads(3, 37, 8, 2, 64)]
    } else {
        &[
            heads(1, 1, 2, 2, 16),
            heads(3, 37, 8, 2, 64),
            heads(2, 5, 4, 4, 128),
            heads(4, 300, 16, 4, 128),
        ]
    };
    let rope: &[Shape] = if quick {
        &[heads(1, 1, 1, 1, 2), heads(2, 5, 4, 1, 10)]
    } else {
        &[
            heads(1, 1, 1, 1, 2),
            heads(2, 5, 4, 1, 10),
            heads(2, 33, 8, 2, 128),
        ]
    };
    let row_shapes = |quick_set: &[(usize, usize)], full: &[(usize, usize)]| -> Vec<Shape> {
        let set = if quick { quick_set } else { full };
        set.iter().map(|&(n, c)| Shape::Rows { n, c }).collect()
    };
    let norms = row_shapes(
        &[(1, 37), (5, 256), (67, 300)],
        &[
            (1, 37),
            (2, 1),
            (5, 256),
            (67, 300),
            (130, 1000),
            (64, 4096),
        ],
    );
    let embedding = row_shapes(
        &[(1, 37), (40, 256)],
        &[(1, 37), (7, 1), (40, 256), (64, 300), (512, 1024)],
    );
    let swiglu = row_shapes(
        &[(1, 1), (5, 37), (9, 257)],
        &[(1, 1), (5, 37), (33, 257), (64, 2048)],
    );
    let sampling = row_shapes(
        &[(1, 37), (3, 1000)],
        &[(1, 37), (3, 256), (4, 1000), (8, 32_000)],
    );
    let gemm: Vec<Shape> = if quick {
        &[(1, 37, 5), (3, 1, 7), (7, 33, 130), (67, 50, 3)][..]
    } else {
        &[
            (1, 37, 5),
            (1, 1, 1),
            (3, 1, 7),
            (7, 33, 130),
            (67, 50, 3),
            (33, 256, 257),
            (2, 300, 11),
            (256, 1024, 1000),
        ][..]
    }
    .iter()
    .map(|&(n, c, oc)| Shape::Linear { n, c, oc })
    .collect();
    let flat: Vec<Shape> = if quick {
        &[1, 257, 3001][..]
    } else {
        &[1, 37, 256, 257, 3001, 16_385, 1 << 20][..]
    }
    .iter()
    .map(|&n| Shape::Flat(n))
    .collect();

    let mut out = Vec::new();
    let mut add = |op: ModelOp, shapes: &[Shape]| out.extend(shapes.iter().map(|&s| (op, s)));
    for &s in attention {
        let tensor_cores = bf16_attention(&attn(s));
        add(ModelOp::Attention { tensor_cores }, &[s]);
    }
    add(ModelOp::Decode, decode);
    add(ModelOp::RmsNorm, &norms);
    add(ModelOp::LayerNorm, &norms);
    add(ModelOp::MatmulFwd { bias: false }, &gemm);
    add(ModelOp::MatmulFwd { bias: true }, &gemm);
    add(ModelOp::MatmulBwd, &gemm);
    add(ModelOp::Embedding, &embedding);
    add(ModelOp::Rope, rope);
    add(ModelOp::Gelu, &flat);
    add(ModelOp::Swiglu, &swiglu);
    add(ModelOp::Residual, &flat);
    add(ModelOp::SumSquares, &flat);
    add(ModelOp::AdamW, &flat);
    for m in [
        Sampling::Greedy,
        Sampling::Temperature,
        Sampling::TopK,
        Sampling::TopP,
        Sampling::TopKTopP,
    ] {
        add(ModelOp::Sample(m), &sampling);
    }
    out
}

/// Random inputs of one model-family case, shared by both backends; what each field holds
/// depends on the op (unused fields are empty).
pub(super) struct Data {
    shape: Shape,
    /// The main input: qkv (attention, RoPE; decode: the new tokens' rows), inp (norms, GEMMs,
    /// GELU, SwiGLU), the table (embedding), `a` (residual), the parameters (AdamW), the vector
    /// (sum of squares), the logits (sampling).
    x: Vec<f32>,
    /// The second input: the weight (norms, GEMMs), `b` (residual), the gradient (AdamW).
    w: Vec<f32>,
    /// The bias (LayerNorm, the GEMM forward with bias).
    bias: Vec<f32>,
    /// The gradient of the output (backward ops).
    dout: Vec<f32>,
    /// Starting contents of what the op writes, in the order it writes them: gradients (added
    /// to), the GEMM's and embedding's outputs (overwritten), the caches (decode), the moments
    /// (AdamW).
    init: Vec<Vec<f32>>,
    /// Token ids (embedding), positions (RoPE), the listed rows (sampling).
    ids: Vec<u32>,
    /// Key flags: B·T (attention) or B·TMAX (decode).
    mask: Vec<bool>,
    /// Sampling's parameters, with top-p clear of every row's cumulative masses.
    params: SampleParams,
    /// One uniform per listed row, clear of every boundary between kept tokens (sampling).
    uniforms: Vec<f64>,
}

fn normal(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (std * rng.normal()) as f32).collect()
}

/// Activation inputs: N(0, 3²), with zero and the tails of GELU and the sigmoid among them.
fn activations(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut x = normal(rng, n, 3.0);
    for (slot, v) in x.iter_mut().zip([0.0, -12.0, 12.0, 0.1, -0.2]) {
        *slot = v;
    }
    x
}

fn to_bf16(x: Vec<f32>) -> Vec<f32> {
    x.into_iter().map(|v| bf16::from_f32(v).to_f32()).collect()
}

/// Right padding for attention: the first sequence full, every other one a padded tail of at
/// least one key (when T > 1). Every sequence keeps its first key, so every query sees one.
fn right_padded(rng: &mut Rng, b: usize, t: usize) -> Vec<bool> {
    let mut mask = vec![false; b * t];
    for r in 0..b {
        let len = if r == 0 || t == 1 {
            t
        } else {
            1 + rng.below(t - 1)
        };
        mask[r * t..r * t + len].fill(true);
    }
    mask
}

/// Decode's B·TMAX flags: the first sequence sees every column, the others are left-padded with
/// holes; the new column (`len - 1`) is always visible, and so are the columns past `len`, which
/// hold random values the kernel must not read.
fn decode_mask(rng: &mut Rng, b: usize, len: usize, t_max: usize) -> Vec<bool> {
    let mut mask = vec![true; b * t_max];
    for r in 1..b {
        let pad = rng.below(len);
        for j in 0..len - 1 {
            mask[r * t_max + j] = j >= pad && rng.uniform() >= 0.25;
        }
    }
    mask
}

/// The truncated distribution a row of logits is sampled from, computed independently of the
/// samplers' code paths (a full sort, no radix select, no in-place partitioning, exp in f64):
/// the reference both the validation and the sampling tests check tokens against.
pub struct SampleReference {
    /// Per token, its probability after truncation (0 when top-k or top-p drops it).
    pub probs: Vec<f64>,
    /// How far top-p's threshold is from the nearest cumulative mass of the kept tokens, in
    /// sorted order (infinite without top-p): a cut closer than an implementation's rounding
    /// could fall on either side.
    pub cut_margin: f64,
}

/// [`SampleReference`] of one row of logits `z` under `p`. Equal logits get equal weights, so
/// the order among ties is the implementations' own (lower index first, as they do).
pub fn sample_reference(z: &[f32], p: SampleParams) -> SampleReference {
    let v = z.len();
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let w: Vec<f64> = (z.iter())
        .map(|&x| (((x - max) / p.temperature) as f64).exp())
        .collect();
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
    let mut keep = if 0 < p.top_k && p.top_k < v {
        p.top_k
    } else {
        v
    };
    let mut cut_margin = f64::INFINITY;
    if p.top_p < 1.0 {
        let mass: f64 = order[..keep].iter().map(|&i| w[i]).sum();
        let mut acc = 0.0;
        let mut first = None;
        for (k, &i) in order[..keep].iter().enumerate() {
            acc += w[i] / mass;
            cut_margin = cut_margin.min((acc - p.top_p as f64).abs());
            if first.is_none() && acc >= p.top_p as f64 {
                first = Some(k);
            }
        }
        keep = first.unwrap_or(keep - 1) + 1;
    }
    let total: f64 = order[..keep].iter().map(|&i| w[i]).sum();
    let mut probs = vec![0.0; v];
    for &i in &order[..keep] {
        probs[i] = w[i] / total;
    }
    SampleReference { probs, cut_margin }
}

/// A uniform at least `margin` from 0 and from every boundary of the kept tokens' cumulative
/// distribution in index order (`probs` as in [`SampleReference`]), so that rounding on either
/// side cannot move the token it draws.
pub fn clear_uniform(rng: &mut Rng, probs: &[f64], margin: f64) -> f64 {
    loop {
        let u = rng.uniform();
        let mut acc = 0.0;
        let clear = probs.iter().filter(|&&q| q > 0.0).all(|&q| {
            acc += q;
            (u - acc).abs() > margin
        });
        if clear && u > margin {
            return u;
        }
    }
}

impl Data {
    pub(super) fn new(op: ModelOp, shape: Shape, seed: u64) -> Data {
        let mut rng = Rng::new(seed);
        let r = &mut rng;
        let mut d = Data {
            shape,
            x: Vec::new(),
            w: Vec::new(),
            bias: Vec::new(),
            dout: Vec::new(),
            init: Vec::new(),
            ids: Vec::new(),
            mask: Vec::new(),
            params: Sampling::Greedy.params(),
            uniforms: Vec::new(),
        };
        match op {
            ModelOp::Attention { tensor_cores } => {
                let a = attn(shape);
                let n = a.b * a.t;
                d.x = normal(r, n * a.qkv_width(), 1.5);
                d.dout = normal(r, n * a.out_width(), 1.0);
                if tensor_cores {
                    d.x = to_bf16(d.x);
                    d.dout = to_bf16(d.dout);
                }
                d.init = vec![normal(r, n * a.qkv_width(), 1.0)];
                d.mask = right_padded(r, a.b, a.t);
            }
            ModelOp::Decode => {
                let a = attn(shape);
                let t_max = a.t + DECODE_SLACK;
                let cache = a.b * a.n_kv_head * t_max * a.head_dim;
                d.x = normal(r, a.b * a.qkv_width(), 1.5);
                d.init = vec![normal(r, cache, 1.5), normal(r, cache, 1.5)];
                d.mask = decode_mask(r, a.b, a.t, t_max);
            }
            ModelOp::RmsNorm | ModelOp::LayerNorm => {
                let (n, c) = rows(shape);
                let offset = if op == ModelOp::LayerNorm { 3.0 } else { 0.0 };
                d.x = normal(r, n * c, 1.5).iter().map(|v| v + offset).collect();
                d.w = normal(r, c, 1.0);
                d.bias = normal(r, c, 1.0);
                d.dout = normal(r, n * c, 1.0);
                d.init = vec![normal(r, n * c, 1.0), normal(r, c, 1.0)];
            }
            ModelOp::MatmulFwd { .. } | ModelOp::MatmulBwd => {
                let (n, c, oc) = linear(shape);
                d.x = to_bf16(normal(r, n * c, 1.0));
                d.w = to_bf16(normal(r, oc * c, 1.0));
                d.bias = to_bf16(normal(r, oc, 1.0));
                d.dout = to_bf16(normal(r, n * oc, 1.0));
                d.init = if op == ModelOp::MatmulBwd {
                    vec![
                        normal(r, n * c, 1.0),
                        normal(r, oc * c, 1.0),
                        normal(r, oc, 1.0),
                    ]
                } else {
                    vec![normal(r, n * oc, 1.0)]
                };
            }
            ModelOp::Embedding => {
                let (n, c) = rows(shape);
                let table = table_rows(n);
                d.x = normal(r, table * c, 1.0);
                d.ids = (0..n).map(|_| r.below(table / 2) as u32).collect();
                d.dout = normal(r, n * c, 1.0);
                d.init = vec![normal(r, n * c, 1.0), normal(r, table * c, 1.0)];
            }
            ModelOp::Rope => {
                let a = attn(shape);
                let n = a.b * a.t;
                d.x = normal(r, n * a.qkv_width(), 1.0);
                d.init = vec![normal(r, n * a.qkv_width(), 1.0)];
                // Each sequence from its own offset: up to thousands of positions, many turns.
                for _ in 0..a.b {
                    let start = r.below(5000) as u32;
                    d.ids.extend((0..a.t as u32).map(|i| start + i));
                }
            }
            ModelOp::Gelu => {
                let n = flat(shape);
                d.x = activations(r, n);
                d.dout = normal(r, n, 1.0);
                d.init = vec![normal(r, n, 1.0)];
            }
            ModelOp::Swiglu => {
                let (n, i) = rows(shape);
                d.x = activations(r, n * 2 * i);
                d.dout = normal(r, n * i, 1.0);
                d.init = vec![normal(r, n * 2 * i, 1.0)];
            }
            ModelOp::Residual => {
                let n = flat(shape);
                d.x = normal(r, n, 1.0);
                d.w = normal(r, n, 1.0);
            }
            ModelOp::SumSquares => d.x = normal(r, flat(shape), 2.0),
            ModelOp::AdamW => {
                let n = flat(shape);
                d.x = normal(r, n, 1.0);
                d.w = normal(r, n, 0.5);
                let v = (0..n).map(|_| (0.01 * r.uniform()) as f32).collect();
                d.init = vec![normal(r, n, 0.1), v];
            }
            ModelOp::Sample(mode) => {
                let (b, v) = rows(shape);
                d.x = normal(r, b * v, 2.0);
                // Every row, last first, and the first one again.
                d.ids = (0..b as u32).rev().chain([0]).collect();
                d.params = mode.params();
                let row = |i: u32| &d.x[i as usize * v..(i as usize + 1) * v];
                if d.params.top_p < 1.0 {
                    // Lower top-p until no row's cut is within the margin of a token's mass.
                    while (0..b as u32)
                        .any(|i| sample_reference(row(i), d.params).cut_margin <= MARGIN)
                    {
                        d.params.top_p -= 0.01;
                    }
                }
                if !d.params.is_greedy() {
                    d.uniforms = (d.ids.iter())
                        .map(|&i| {
                            clear_uniform(r, &sample_reference(row(i), d.params).probs, MARGIN)
                        })
                        .collect();
                }
            }
        }
        d
    }

    /// The same case on the absolute values of every input and starting value: the CPU op on
    /// it gives each output's Σ|terms| (the GEMMs' error scale).
    pub(super) fn magnitudes(&self) -> Data {
        let abs = |x: &[f32]| x.iter().map(|v| v.abs()).collect::<Vec<_>>();
        Data {
            shape: self.shape,
            x: abs(&self.x),
            w: abs(&self.w),
            bias: abs(&self.bias),
            dout: abs(&self.dout),
            init: self.init.iter().map(|x| abs(x)).collect(),
            ids: self.ids.clone(),
            mask: self.mask.clone(),
            params: self.params,
            uniforms: self.uniforms.clone(),
        }
    }
}

/// Appends each buffer to `out` as a segment.
fn tensors<B: Backend>(be: &B, out: &mut Out, bufs: &[&B::Buf]) {
    for b in bufs {
        out.extend(widen(&host(be, b)));
    }
}

/// Runs `op` on `be`, appending every output and gradient to `out`, one segment each, in a
/// fixed order.
pub(super) fn run<B: DecodeOps>(be: &B, op: ModelOp, d: &Data, out: &mut Out) {
    let up = |x: &[f32]| be.upload(x);
    match op {
        ModelOp::Attention { .. } => {
            let a = attn(d.shape);
            let n = a.b * a.t;
            let qkv = up(&d.x);
            let (mut o, mut lse) = (be.zeros(n * a.out_width()), be.zeros(a.b * a.n_head * a.t));
            let (ov, lv) = (be.all_mut(&mut o), be.all_mut(&mut lse));
            be.attention_forward(ov, lv, be.all(&qkv), &d.mask, a);
            let (dout, mut dqkv) = (up(&d.dout), up(&d.init[0]));
            let (dv, qv) = (be.all(&dout), be.all(&qkv));
            let (ov, lv) = (be.all(&o), be.all(&lse));
            be.attention_backward(be.all_mut(&mut dqkv), dv, qv, ov, lv, &d.mask, a);
            tensors(be, out, &[&o, &lse, &dqkv]);
        }
        ModelOp::Decode => {
            let a = attn(d.shape);
            let (len, t_max) = (a.t, a.t + DECODE_SLACK);
            let step = AttnShape { t: 1, ..a };
            let qkv = up(&d.x);
            let (mut k, mut v) = (up(&d.init[0]), up(&d.init[1]));
            let (kv, vv) = (be.all_mut(&mut k), be.all_mut(&mut v));
            be.kv_cache_store(kv, vv, be.all(&qkv), step, len - 1, t_max);
            let mut o = be.zeros(a.b * a.out_width());
            let (qv, kv, vv) = (be.all(&qkv), be.all(&k), be.all(&v));
            be.attention_decode(be.all_mut(&mut o), qv, kv, vv, &d.mask, step, len, t_max);
            tensors(be, out, &[&o]);
            for b in [&k, &v] {
                out.exact(widen(&host(be, b)));
            }
        }
        ModelOp::RmsNorm | ModelOp::LayerNorm => {
            let (n, c) = rows(d.shape);
            let (x, w, bias, dout) = (up(&d.x), up(&d.w), up(&d.bias), up(&d.dout));
            let (mut o, mut mean, mut rstd) = (be.zeros(n * c), be.zeros(n), be.zeros(n));
            let (mut dinp, mut dw) = (up(&d.init[0]), up(&d.init[1]));
            let (xv, wv) = (be.all(&x), be.all(&w));
            if op == ModelOp::LayerNorm {
                let (ov, mv, rv) = (
                    be.all_mut(&mut o),
                    be.all_mut(&mut mean),
                    be.all_mut(&mut rstd),
                );
                be.layernorm_forward(ov, mv, rv, xv, wv, be.all(&bias), n, c, EPS);
                let (di, dwv) = (be.all_mut(&mut dinp), be.all_mut(&mut dw));
                let (mv, rv) = (be.all(&mean), be.all(&rstd));
                be.layernorm_backward(di, dwv, be.all(&dout), xv, wv, mv, rv, n, c);
                tensors(be, out, &[&o, &mean, &rstd, &dinp, &dw]);
            } else {
                let (ov, rv) = (be.all_mut(&mut o), be.all_mut(&mut rstd));
                be.rmsnorm_forward(ov, rv, xv, wv, n, c, EPS);
                let (di, dwv) = (be.all_mut(&mut dinp), be.all_mut(&mut dw));
                be.rmsnorm_backward(di, dwv, be.all(&dout), xv, wv, be.all(&rstd), n, c);
                tensors(be, out, &[&o, &rstd, &dinp, &dw]);
            }
        }
        ModelOp::MatmulFwd { bias } => {
            let (n, c, oc) = linear(d.shape);
            let (x, w, b, mut o) = (up(&d.x), up(&d.w), up(&d.bias), up(&d.init[0]));
            let bv = bias.then(|| be.all(&b));
            be.matmul_forward(be.all_mut(&mut o), be.all(&x), be.all(&w), bv, n, c, oc);
            tensors(be, out, &[&o]);
        }
        ModelOp::MatmulBwd => {
            let (n, c, oc) = linear(d.shape);
            let (x, w, dout) = (up(&d.x), up(&d.w), up(&d.dout));
            let (mut dinp, mut dw, mut db) = (up(&d.init[0]), up(&d.init[1]), up(&d.init[2]));
            let (di, dwv) = (be.all_mut(&mut dinp), be.all_mut(&mut dw));
            let (dv, xv, wv) = (be.all(&dout), be.all(&x), be.all(&w));
            be.matmul_backward(Some(di), dwv, dv, xv, wv, n, c, oc);
            be.bias_backward(be.all_mut(&mut db), dv, n, oc);
            tensors(be, out, &[&dinp, &dw, &db]);
        }
        ModelOp::Embedding => {
            let (_, c) = rows(d.shape);
            let (table, dout) = (up(&d.x), up(&d.dout));
            let (mut o, mut acc) = (up(&d.init[0]), up(&d.init[0]));
            let mut dtable = up(&d.init[1]);
            let tv = be.all(&table);
            be.embedding_forward(be.all_mut(&mut o), tv, &d.ids, c, false);
            be.embedding_forward(be.all_mut(&mut acc), tv, &d.ids, c, true);
            be.embedding_backward(be.all_mut(&mut dtable), be.all(&dout), &d.ids, c);
            out.exact(widen(&host(be, &o)));
            tensors(be, out, &[&acc, &dtable]);
        }
        ModelOp::Rope => {
            let a = attn(d.shape);
            let (mut qkv, mut dqkv) = (up(&d.x), up(&d.init[0]));
            be.rope_forward(be.all_mut(&mut qkv), &d.ids, a, ROPE_THETA);
            be.rope_backward(be.all_mut(&mut dqkv), &d.ids, a, ROPE_THETA);
            tensors(be, out, &[&qkv, &dqkv]);
        }
        ModelOp::Gelu => {
            let (x, dout, mut dinp) = (up(&d.x), up(&d.dout), up(&d.init[0]));
            let mut o = be.zeros(d.x.len());
            be.gelu_forward(be.all_mut(&mut o), be.all(&x));
            be.gelu_backward(be.all_mut(&mut dinp), be.all(&x), be.all(&dout));
            tensors(be, out, &[&o, &dinp]);
        }
        ModelOp::Swiglu => {
            let (n, i) = rows(d.shape);
            let (x, dout, mut dinp) = (up(&d.x), up(&d.dout), up(&d.init[0]));
            let mut o = be.zeros(n * i);
            be.swiglu_forward(be.all_mut(&mut o), be.all(&x), n, i);
            be.swiglu_backward(be.all_mut(&mut dinp), be.all(&x), be.all(&dout), n, i);
            tensors(be, out, &[&o, &dinp]);
        }
        ModelOp::Residual => {
            let (a, b) = (up(&d.x), up(&d.w));
            let (mut sum, mut acc, mut scaled) = (be.zeros(d.x.len()), up(&d.x), up(&d.x));
            be.add(be.all_mut(&mut sum), be.all(&a), be.all(&b));
            be.add_inplace(be.all_mut(&mut acc), be.all(&b));
            be.scale(be.all_mut(&mut scaled), SCALE);
            tensors(be, out, &[&sum, &acc, &scaled]);
        }
        ModelOp::SumSquares => {
            let x = up(&d.x);
            out.push(be.sum_squares(be.all(&x)));
        }
        ModelOp::AdamW => {
            let h = AdamW {
                lr: 3e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step: 3,
            };
            let (mut p, g) = (up(&d.x), up(&d.w));
            let (mut m, mut v) = (up(&d.init[0]), up(&d.init[1]));
            let (pv, mv, vv) = (be.all_mut(&mut p), be.all_mut(&mut m), be.all_mut(&mut v));
            be.adamw(pv, be.all(&g), mv, vv, h);
            tensors(be, out, &[&p, &m, &v]);
        }
        ModelOp::Sample(_) => {
            let (_, v) = rows(d.shape);
            let logits = up(&d.x);
            let k = d.ids.len();
            let (mut ids, mut logps) = (vec![0; k], vec![0.0; k]);
            let (lv, p) = (be.all(&logits), d.params);
            be.sample_tokens(lv, &d.ids, v, p, &d.uniforms, &mut ids, &mut logps);
            out.exact(ids.iter().map(|&i| i as f64));
            out.extend(widen(&logps));
        }
    }
}
