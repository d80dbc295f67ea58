//! `rlhf validate` and `rlhf bench kernels`: every kernel family of `kernels/` against the CPU
//! reference on a sweep of shapes (DESIGN.md principle 3).
//!
//! `--device` picks where the kernels run. On a CUDA device ([`Cuda`]) they run there; without
//! one they run on the emulation shim ([`Emu`]), and the commands say so. Both go through exactly
//! the same host code (launch plans and op drivers), so an emulated PASS checks the kernels and
//! that host code; emulated times are the shim's and say nothing about a GPU's.
//!
//! Two families: the loss family (log-probs, KL, policy and value losses, advantages, preference
//! losses: `LossOps` and the log-prob ops) and the model family ([`ModelOp`], in `model.rs`:
//! attention forward and backward with GQA and a padding mask, the KV-cache store and decode
//! attention, RMSNorm and LayerNorm, the GEMMs and bias gradient, embedding, RoPE, GELU, SwiGLU,
//! the residual ops, sum of squares, AdamW, and sampling: greedy, temperature, top-k, top-p).
//! After the kernel table, `rlhf validate` also runs one training step and generation of tiny
//! whole models against the CPU.
//!
//! Everything is data-driven: [`cases`] is the one table of (kernel, shape), `run_op` the one
//! dispatch that runs an [`Op`] on any backend and flattens every output, gradient and scalar it
//! produces into one vector (in segments, one per tensor, so that an error can be scaled by its
//! tensor), and both commands are one loop over the table. Kernel times come from [`Metered`],
//! which wraps the backend and times its launches.
//!
//! Tolerances, on a scaled error `|got - want| / scale`, where the scale is
//! - for the loss family, sampling's log-probs and the sum of squares: `max(1, |want|)` per
//!   value (the absolute error on values below 1, which are most of them, the relative error
//!   above);
//! - for the GEMMs: the element's Σ|terms| (the sum of absolute products plus the absolute
//!   values added to them), computed by the CPU op on the inputs' absolute values;
//! - for the rest of the model family: `max(1, max |want|)` over the tensor compared, the kernel
//!   tests' measure: gradients are sums of terms that cancel, so their rounding is relative to
//!   the tensor's largest values, not to each value.
//!
//! - [`TOL_F32`] = 1e-5: the loss kernels compute per-token values in f32 and reduce in f64, the
//!   CPU reference is f64 throughout; a wrong formula is off by 1e-4 or more. The f32 model
//!   kernels (SIMT attention, decode, norms, element-wise, embedding, RoPE, AdamW) compute in
//!   f32 from the same inputs as the CPU and differ only in summation order and in their
//!   `exp`/`tanh` (the kernel tests pass at 1e-6 of the scale); a wrong index, bound or mask is
//!   off by 1e-2 or more.
//! - GEMMs at [`TOL_F32`] of Σ|terms|: on a device they go through cuBLAS, and on the emulator
//!   through its bf16-operand executor (`COMPUTE_32F_FAST_16BF`), so the cases round every
//!   operand to bf16 first: both sides then multiply the same values, each product exact in f32,
//!   and only the order of the f32 sums differs (at most 9e-8 of Σ|terms| measured in
//!   tests/matmul_kernels.rs, which argues this bound as its `ORDER_TOL`).
//! - bf16 logits: the forward is compared with the CPU op on the same (bf16-rounded, widened)
//!   logits, so at [`TOL_F32`]; the backward stores its gradient in bf16, adding half an ulp
//!   (2^-9 relative) of rounding on top, checked at [`TOL_BF16`] = 2^-8.
//! - Attention at head dims 64 and 128 runs on the tensor cores on bf16 copies of its f32
//!   activations (the backend's rule, `bf16_attention`); the cases round qkv and dout to bf16
//!   so that the CPU sees the same values. The kernels round P and dS to bf16 before their
//!   products (measured at most 8.2e-4 of the tensor's scale in tests/attention_kernels.rs) and
//!   store out and dqkv in bf16 (half an ulp: at most 2^-8 of a value), so at most ~5e-3 of the
//!   scale (4.9e-3 seen): [`TOL_ATTN_BF16`] = 2^-7.
//! - Exact: sampled ids (uniforms are drawn, and top-p moved, at least 1e-5 from every token
//!   boundary, a hundredfold the f32 weights' rounding, so that a token cannot flip), and the
//!   KV-cache store's and the embedding lookup's copies.

use crate::backend::cpu::Cpu;
use crate::backend::cuda::{Cuda, DeviceChoice, Elem, Selected};
use crate::backend::emu::ops::or_panic;
use crate::backend::emu::plan::{DevPtr, Launch};
use crate::backend::emu::{Emu, KernelError, Launcher, Logits, LogitsMut};
use crate::backend::loss::*;
use crate::backend::{AttnShape, Backend, DecodeOps, ModelOps};
use crate::rng::Rng;
use anyhow::Context;
use half::bf16;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

mod model;

use model::Measure;
pub use model::{clear_uniform, sample_reference, ModelOp, SampleReference, Sampling};

/// The first line of both commands' output when the kernels run on the emulator.
pub const NOTICE: &str =
    "no GPU: running the emulated kernels (CPU shim), times are not device times";

/// Scaled error allowed for f32 kernels, and for the bf16 forward (see the module docs).
pub const TOL_F32: f64 = 1e-5;
/// Scaled error allowed for the bf16 log-prob backward, whose gradient is stored in bf16.
pub const TOL_BF16: f64 = 1.0 / 256.0;
/// Scaled error allowed for attention on the tensor cores (bf16 P, dS and stored outputs).
pub const TOL_ATTN_BF16: f64 = 1.0 / 128.0;

/// The log-softmax temperature every log-prob case uses: not 1, so the scaling is exercised.
const TEMPERATURE: f32 = 0.9;

/// Arguments of `rlhf validate`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ValidateArgs {
    /// A smaller sweep (still every kernel and every odd-shape class), for tests and CI.
    #[arg(long)]
    pub quick: bool,
    /// Where the kernels run: a CUDA device, the emulator on the CPU, or a device where one
    /// opens (else the emulator, with a notice).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

/// Arguments of `rlhf bench kernels`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchKernelsArgs {
    /// The small sweep instead of the full one (and a smaller log-prob bandwidth case).
    #[arg(long)]
    pub quick: bool,
    /// Timed runs per kernel and side; the fastest counts.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Where the kernels run, as for `rlhf validate`.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

impl Default for BenchKernelsArgs {
    fn default() -> BenchKernelsArgs {
        BenchKernelsArgs {
            quick: false,
            repeats: 3,
            device: DeviceChoice::Auto,
        }
    }
}

/// Type of the logits the log-prob kernels read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32 logits.
    F32,
    /// bf16 logits (and bf16 logit gradients).
    Bf16,
}

/// A loss aggregation; [`Aggregation`]'s parameters follow from the case's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agg {
    /// Per-sequence mean, then batch mean.
    Grpo,
    /// Mean over the batch's tokens.
    Bnpo,
    /// Sum over tokens / the batch's token count, given as a number.
    Dapo,
    /// Sum over tokens / (B · max completion length).
    DrGrpo,
}

/// One kernel family, as an op of the backend trait (some run several kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Fused log-softmax + gather + entropy, forward.
    LogprobFwd(Precision),
    /// Its backward into the logits.
    LogprobBwd(Precision),
    /// A KL estimator with its masked mean, forward and backward.
    Kl(KlEstimator),
    /// The clipped policy loss (dual clip, k3 KL term, entropy bonus), forward and backward.
    Policy(Agg),
    /// The clipped value loss, forward and backward.
    Value,
    /// Generalised advantage estimation, whitened.
    Gae,
    /// Group-normalised advantages (GRPO).
    GroupAdv,
    /// KL-shaped rewards, then REINFORCE++ returns and whitened advantages.
    ReinforcePp,
    /// Bradley-Terry reward-model loss, forward and backward.
    Bt,
    /// Sequence sums of per-token log-probs, the DPO loss, and its gradient back to the tokens.
    Dpo,
    /// An op of the model family (`ModelOps`, `DecodeOps`).
    Model(ModelOp),
}

impl Op {
    /// The kernel column of the tables.
    pub fn name(self) -> String {
        match self {
            Op::LogprobFwd(p) => format!("logprob_fwd {}", precision_name(p)),
            Op::LogprobBwd(p) => format!("logprob_bwd {}", precision_name(p)),
            Op::Kl(e) => format!("kl {e:?}").to_lowercase(),
            Op::Policy(a) => format!("policy_loss {a:?}").to_lowercase(),
            Op::Value => "value_loss".into(),
            Op::Gae => "gae".into(),
            Op::GroupAdv => "group_adv".into(),
            Op::ReinforcePp => "reinforce_pp".into(),
            Op::Bt => "bt_loss".into(),
            Op::Dpo => "dpo_loss".into(),
            Op::Model(m) => m.name(),
        }
    }

    fn precision(self) -> Option<Precision> {
        match self {
            Op::LogprobFwd(p) | Op::LogprobBwd(p) => Some(p),
            _ => None,
        }
    }

    /// The scaled error allowed (module docs).
    pub fn tolerance(self) -> f64 {
        match self {
            Op::LogprobBwd(Precision::Bf16) => TOL_BF16,
            Op::Model(m) => m.tolerance(),
            _ => TOL_F32,
        }
    }

    /// What the error is scaled by (module docs).
    fn measure(self) -> Measure {
        match self {
            Op::Model(m) => m.measure(),
            _ => Measure::Value,
        }
    }

    /// Bytes of inputs and outputs the op must move at least (a `+=` output counts twice: read
    /// and written); the bandwidth column divides this by the time.
    pub fn io_bytes(self, s: Shape) -> usize {
        if let Op::Model(m) = self {
            return m.io_bytes(s);
        }
        let (b, t, v) = s.tokens();
        let n = b * t;
        let logit_bytes = match self.precision() {
            Some(Precision::Bf16) => 2,
            _ => 4,
        };
        match self {
            // logits, targets; logp, entropy, lse.
            Op::LogprobFwd(_) => n * v * logit_bytes + 4 * n * 4,
            // logits, dlogits (read and written); targets, lse, dlogp, dentropy.
            Op::LogprobBwd(_) => 3 * n * v * logit_bytes + 4 * n * 4,
            // logp, ref, mask; per-token; dx.
            Op::Kl(_) => (3 + 1 + 2) * n * 4,
            // logp, old, adv, ref, entropy, mask; per-token; dlogp, dentropy.
            Op::Policy(_) => (6 + 1 + 2 + 2) * n * 4,
            // values, old, returns, mask; per-token; dvalues.
            Op::Value => (4 + 1 + 2) * n * 4,
            // rewards, values, mask; advantages, returns.
            Op::Gae => (3 + 2) * n * 4,
            // rewards; advantages, baselines, stds.
            Op::GroupAdv => 4 * n * 4,
            // logp, ref, mask, scores (B); rewards; then rewards, mask; advantages, returns.
            Op::ReinforcePp => ((3 + 1 + 2 + 2) * n + b) * 4,
            // B·T pairs: chosen, rejected, margin; dchosen, drejected.
            Op::Bt => (3 + 4) * n * 4,
            // Four masked row sums (tokens, mask; sums, counts); the loss on B pairs (six
            // inputs; three outputs; two gradients); the row-sum backward (dsums, mask; dx).
            Op::Dpo => (4 * (2 * n + 2 * b) + 6 * b + 3 * b + 4 * b + b + n + 2 * n) * 4,
            Op::Model(_) => unreachable!("returned above"),
        }
    }
}

fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16",
    }
}

/// A case's shape, of the kind its op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// The loss family: `b` rows (sequences, pairs) of `t` tokens, and `v` logits per token
    /// (log-prob ops only; 0 elsewhere). Printed `BxT` or `BxTxV`.
    Tokens { b: usize, t: usize, v: usize },
    /// Attention's geometry (attention, RoPE); for decode, `t` is the cache length the new token
    /// completes. Printed `BxT NH:KVHxHD`.
    Attn(AttnShape),
    /// `n` rows of `c` values: norms, the embedding (`c` channels), SwiGLU (`c` = I), sampling
    /// (`n` rows of `c` = V logits). Printed `NxC`.
    Rows { n: usize, c: usize },
    /// A linear layer: `n` rows of `c` inputs onto `oc` outputs. Printed `NxCxOC`.
    Linear { n: usize, c: usize, oc: usize },
    /// `n` elements (element-wise ops, the optimizer).
    Flat(usize),
}

impl Shape {
    /// (B, T, V) of a loss-family shape; panics on another kind (a broken case table).
    fn tokens(self) -> (usize, usize, usize) {
        match self {
            Shape::Tokens { b, t, v } => (b, t, v),
            _ => panic!("{self} is not a loss-family shape"),
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Shape::Tokens { b, t, v: 0 } => write!(f, "{b}x{t}"),
            Shape::Tokens { b, t, v } => write!(f, "{b}x{t}x{v}"),
            Shape::Attn(a) => write!(
                f,
                "{}x{} {}:{}x{}",
                a.b, a.t, a.n_head, a.n_kv_head, a.head_dim
            ),
            Shape::Rows { n, c } => write!(f, "{n}x{c}"),
            Shape::Linear { n, c, oc } => write!(f, "{n}x{c}x{oc}"),
            Shape::Flat(n) => write!(f, "{n}"),
        }
    }
}

/// The sweep: every kernel family on every shape of its kind. The token shapes cover one token,
/// rows shorter than a warp, rows longer than a row block (128) and not a multiple of it, and
/// more rows than a scan block (64); the log-prob shapes one token over a vocabulary smaller than
/// a warp, and vocabularies not a multiple of the block (256) nor of the chunk its threads stride
/// over. (A vocabulary of one is left out: its gradient is identically zero, which the all-zero
/// guard in [`validate`] would rightly refuse as a vacuous case.)
pub fn cases(quick: bool) -> Vec<(Op, Shape)> {
    let tokens: &[(usize, usize)] = if quick {
        &[(1, 1), (3, 7), (2, 300), (70, 5)]
    } else {
        &[
            (1, 1),
            (3, 7),
            (4, 12),
            (2, 300),
            (5, 129),
            (70, 5),
            (16, 1000),
        ]
    };
    let vocab: &[(usize, usize, usize)] = if quick {
        &[(1, 1, 7), (2, 3, 1000), (1, 2, 4099)]
    } else {
        &[(1, 1, 7), (2, 3, 1000), (1, 2, 4099), (4, 16, 32_003)]
    };
    let mut ops = Vec::new();
    for p in [Precision::F32, Precision::Bf16] {
        ops.push(Op::LogprobFwd(p));
        ops.push(Op::LogprobBwd(p));
    }
    let token_ops = [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3]
        .map(Op::Kl)
        .into_iter()
        .chain([Agg::Grpo, Agg::Bnpo, Agg::Dapo, Agg::DrGrpo].map(Op::Policy))
        .chain([
            Op::Value,
            Op::Gae,
            Op::GroupAdv,
            Op::ReinforcePp,
            Op::Bt,
            Op::Dpo,
        ]);
    ops.extend(token_ops);
    let mut out = Vec::new();
    for op in ops {
        if op.precision().is_some() {
            out.extend(
                vocab
                    .iter()
                    .map(|&(b, t, v)| (op, Shape::Tokens { b, t, v })),
            );
        } else {
            out.extend(
                tokens
                    .iter()
                    .map(|&(b, t)| (op, Shape::Tokens { b, t, v: 0 })),
            );
        }
    }
    let model = model::cases(quick);
    out.extend(model.into_iter().map(|(m, s)| (Op::Model(m), s)));
    out
}

/// Random inputs for one case, shared by both backends.
enum Data {
    Loss(LossData),
    Model(model::Data),
}

impl Data {
    fn new(op: Op, s: Shape, seed: u64) -> Data {
        match op {
            Op::Model(m) => Data::Model(model::Data::new(m, s, seed)),
            _ => Data::Loss(LossData::new(op, s, seed)),
        }
    }
}

/// Random inputs for one loss-family case.
struct LossData {
    rows: Rows,
    /// Right-padded: row 0 full, the last row (of two or more) all masked, others random.
    mask: Vec<f32>,
    /// A second mask of the same kind (DPO's rejected side).
    mask2: Vec<f32>,
    logp: Vec<f32>,
    logp_old: Vec<f32>,
    logp_ref: Vec<f32>,
    entropy: Vec<f32>,
    adv: Vec<f32>,
    values: Vec<f32>,
    /// `values` moved by up to ±0.4, so that a clip of 0.2 binds on some tokens only.
    values_old: Vec<f32>,
    returns: Vec<f32>,
    rewards: Vec<f32>,
    /// (B) sequence scores.
    scores: Vec<f32>,
    /// (N, V), rounded through bf16 for a bf16 case so that both sides see the same values.
    logits: Vec<f32>,
    /// The same logits in bf16 (bf16 cases only).
    logits_bf16: Vec<bf16>,
    targets: Vec<u32>,
    /// The CPU reference's lse of the logits (backward cases only).
    lse: Vec<f32>,
    dlogp: Vec<f32>,
    dentropy: Vec<f32>,
    v: usize,
}

fn uniform(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (lo + (hi - lo) * rng.uniform()) as f32)
        .collect()
}

fn normal(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (scale * rng.normal()) as f32).collect()
}

fn padded_mask(rng: &mut Rng, rows: Rows) -> Vec<f32> {
    let mut mask = vec![0.0; rows.n()];
    for r in 0..rows.b {
        let len = match r {
            0 => rows.t,
            _ if r + 1 == rows.b => 0,
            _ => 1 + rng.below(rows.t),
        };
        mask[r * rows.t..r * rows.t + len].fill(1.0);
    }
    mask
}

impl LossData {
    fn new(op: Op, s: Shape, seed: u64) -> LossData {
        let (b, t, v) = s.tokens();
        let mut rng = Rng::new(seed);
        let rows = Rows { b, t };
        let n = rows.n();
        let mut d = LossData {
            rows,
            mask: padded_mask(&mut rng, rows),
            mask2: padded_mask(&mut rng, rows),
            logp: uniform(&mut rng, n, -3.0, -0.1),
            logp_old: uniform(&mut rng, n, -3.0, -0.1),
            logp_ref: uniform(&mut rng, n, -3.0, -0.1),
            entropy: uniform(&mut rng, n, 0.5, 3.0),
            adv: normal(&mut rng, n, 1.0),
            values: normal(&mut rng, n, 1.0),
            values_old: Vec::new(),
            returns: normal(&mut rng, n, 1.0),
            rewards: normal(&mut rng, n, 0.5),
            scores: normal(&mut rng, b, 1.0),
            logits: Vec::new(),
            logits_bf16: Vec::new(),
            targets: Vec::new(),
            lse: Vec::new(),
            dlogp: normal(&mut rng, n, 1.0),
            dentropy: normal(&mut rng, n, 1.0),
            v,
        };
        d.values_old = (d.values.iter())
            .map(|&v| v + (0.8 * rng.uniform() - 0.4) as f32)
            .collect();
        if let Some(p) = op.precision() {
            d.logits = normal(&mut rng, n * v, 2.0);
            if p == Precision::Bf16 {
                d.logits_bf16 = d.logits.iter().map(|&x| bf16::from_f32(x)).collect();
                d.logits = d.logits_bf16.iter().map(|x| x.to_f32()).collect();
            }
            d.targets = (0..n).map(|_| rng.below(v) as u32).collect();
            if matches!(op, Op::LogprobBwd(_)) {
                d.lse = Cpu.logprobs(&d, p)[2].clone();
            }
        }
        d
    }
}

/// The log-prob op on host data (a `ModelOps` member on the CPU, kernels on the emulator).
trait LogprobOps: LossOps {
    /// logp, entropy, lse.
    fn logprobs(&self, d: &LossData, p: Precision) -> [Vec<f32>; 3];
    /// dlogits (from zero), widened to f32.
    fn logprobs_grad(&self, d: &LossData, p: Precision) -> Vec<f32>;
}

impl LogprobOps for Cpu {
    // The CPU reads the (already bf16-rounded) logits widened, whatever the precision.
    fn logprobs(&self, d: &LossData, _: Precision) -> [Vec<f32>; 3] {
        let n = d.targets.len();
        let [mut logp, mut ent, mut lse] = [vec![0.0; n], vec![0.0; n], vec![0.0; n]];
        let (logits, targets) = (&d.logits, &d.targets);
        self.logprobs_forward(
            &mut logp,
            Some(&mut ent),
            &mut lse,
            logits,
            targets,
            n,
            d.v,
            TEMPERATURE,
        );
        [logp, ent, lse]
    }
    fn logprobs_grad(&self, d: &LossData, _: Precision) -> Vec<f32> {
        let n = d.targets.len();
        let mut dl = vec![0.0; d.logits.len()];
        self.logprobs_backward(
            &mut dl,
            &d.logits,
            &d.targets,
            &d.lse,
            &d.dlogp,
            Some(&d.dentropy),
            n,
            d.v,
            TEMPERATURE,
        );
        dl
    }
}

impl LogprobOps for Metered<Emu> {
    fn logprobs(&self, d: &LossData, p: Precision) -> [Vec<f32>; 3] {
        let n = d.targets.len();
        let [mut logp, mut ent, mut lse] = [vec![0.0; n], vec![0.0; n], vec![0.0; n]];
        let logits = match p {
            Precision::F32 => Logits::F32(&d.logits),
            Precision::Bf16 => Logits::Bf16(&d.logits_bf16),
        };
        or_panic(self.timed(|| {
            self.inner.logprobs_forward(
                &mut logp,
                Some(&mut ent),
                &mut lse,
                logits,
                &d.targets,
                n,
                d.v,
                TEMPERATURE,
            );
            Ok(())
        }));
        [logp, ent, lse]
    }
    fn logprobs_grad(&self, d: &LossData, p: Precision) -> Vec<f32> {
        let n = d.targets.len();
        let run = |dlogits: LogitsMut<'_>, logits: Logits<'_>| {
            or_panic(self.timed(|| {
                self.inner.logprobs_backward(
                    dlogits,
                    logits,
                    &d.targets,
                    &d.lse,
                    &d.dlogp,
                    Some(&d.dentropy),
                    n,
                    d.v,
                    TEMPERATURE,
                );
                Ok(())
            }))
        };
        match p {
            Precision::F32 => {
                let mut dl = vec![0.0; d.logits.len()];
                run(LogitsMut::F32(&mut dl), Logits::F32(&d.logits));
                dl
            }
            Precision::Bf16 => {
                let mut dl = vec![bf16::ZERO; d.logits.len()];
                run(LogitsMut::Bf16(&mut dl), Logits::Bf16(&d.logits_bf16));
                dl.iter().map(|x| x.to_f32()).collect()
            }
        }
    }
}

impl Metered<Cuda> {
    /// The log-prob forward on the device with logits of type `T`.
    fn logprobs_on<T: Elem>(&self, d: &LossData, logits: &[T]) -> [Vec<f32>; 3] {
        let c = &self.inner;
        let n = d.targets.len();
        let logits = or_panic(c.upload_slice(logits));
        let [mut logp, mut ent, mut lse] = [c.zeros(n), c.zeros(n), c.zeros(n)];
        or_panic(self.timed(|| {
            c.logprobs_forward(
                logp.view_mut(),
                Some(ent.view_mut()),
                lse.view_mut(),
                logits.view(),
                &d.targets,
                n,
                d.v,
                TEMPERATURE,
            )
        }));
        [&logp, &ent, &lse].map(|b| c.download(b.view()))
    }

    /// The log-prob backward on the device with logits (and logit gradients, from zero) of
    /// type `T`; the gradient comes back in `T`.
    fn logprobs_grad_on<T: Elem>(&self, d: &LossData, logits: &[T]) -> Vec<T> {
        let c = &self.inner;
        let n = d.targets.len();
        let logits = or_panic(c.upload_slice(logits));
        let mut dlogits = or_panic(c.alloc_zeros::<T>(logits.len()));
        let (lse, dlogp, dent) = (c.upload(&d.lse), c.upload(&d.dlogp), c.upload(&d.dentropy));
        or_panic(self.timed(|| {
            c.logprobs_backward(
                dlogits.view_mut(),
                logits.view(),
                &d.targets,
                lse.view(),
                dlogp.view(),
                Some(dent.view()),
                n,
                d.v,
                TEMPERATURE,
            )
        }));
        or_panic(c.download_slice(dlogits.view()))
    }
}

impl LogprobOps for Metered<Cuda> {
    fn logprobs(&self, d: &LossData, p: Precision) -> [Vec<f32>; 3] {
        match p {
            Precision::F32 => self.logprobs_on(d, &d.logits),
            Precision::Bf16 => self.logprobs_on(d, &d.logits_bf16),
        }
    }
    fn logprobs_grad(&self, d: &LossData, p: Precision) -> Vec<f32> {
        match p {
            Precision::F32 => self.logprobs_grad_on(d, &d.logits),
            Precision::Bf16 => (self.logprobs_grad_on(d, &d.logits_bf16).iter())
                .map(|x| x.to_f32())
                .collect(),
        }
    }
}

fn widen(x: &[f32]) -> impl Iterator<Item = f64> + '_ {
    x.iter().map(|&v| v as f64)
}

fn host<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.download(be.all(b))
}

/// What an op computes, flattened: every output, gradient and scalar, in a fixed order, in
/// segments (one tensor, or a few scalars) that the error measures scale by.
#[derive(Default)]
struct Out {
    values: Vec<f64>,
    /// Each segment's end in `values`, and whether it must match exactly.
    ends: Vec<(usize, bool)>,
}

impl Out {
    /// Appends a segment compared by the op's measure.
    fn extend(&mut self, x: impl IntoIterator<Item = f64>) {
        self.values.extend(x);
        self.ends.push((self.values.len(), false));
    }
    /// Appends a segment of one scalar.
    fn push(&mut self, x: f64) {
        self.extend([x]);
    }
    /// Appends a segment that must match exactly (ids, copies).
    fn exact(&mut self, x: impl IntoIterator<Item = f64>) {
        self.values.extend(x);
        self.ends.push((self.values.len(), true));
    }
    /// Each segment's range in `values`, and whether it must match exactly.
    fn segments(&self) -> impl Iterator<Item = (Range<usize>, bool)> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&(end, _)| end));
        starts
            .zip(&self.ends)
            .map(|(start, &(end, exact))| (start..end, exact))
    }
}

/// Runs `op` on `be`, returning every output, gradient and scalar flattened, in a fixed order.
fn run_op<B: LogprobOps + DecodeOps>(be: &B, op: Op, d: &Data) -> Out {
    let mut out = Out::default();
    match (op, d) {
        (Op::Model(m), Data::Model(d)) => model::run(be, m, d, &mut out),
        (_, Data::Loss(d)) => run_loss(be, op, d, &mut out),
        _ => unreachable!("a case's data is made for its op"),
    }
    out
}

/// [`run_op`] for the loss family.
fn run_loss<B: LogprobOps>(be: &B, op: Op, d: &LossData, out: &mut Out) {
    let (rows, n) = (d.rows, d.rows.n());
    let up = |x: &[f32]| be.upload(x);
    match op {
        Op::LogprobFwd(p) => be.logprobs(d, p).iter().for_each(|x| out.extend(widen(x))),
        Op::LogprobBwd(p) => out.extend(widen(&be.logprobs_grad(d, p))),
        Op::Kl(est) => {
            let (lp, lr, m) = (up(&d.logp), up(&d.logp_ref), up(&d.mask));
            let (mut per_token, mut dx) = (be.zeros(n), be.zeros(n));
            let x = KlInputs::<B> {
                logp: be.all(&lp),
                logp_ref: be.all(&lr),
                mask: be.all(&m),
                rows,
            };
            let grad = Grad {
                dx: be.all_mut(&mut dx),
                dloss: 0.75,
            };
            let agg = Aggregation::Grpo;
            out.push(be.kl(&x, est, agg, Some(be.all_mut(&mut per_token)), Some(grad)));
            out.extend(widen(&host(be, &per_token)));
            out.extend(widen(&host(be, &dx)));
        }
        Op::Policy(agg) => {
            let (lp, old, adv) = (up(&d.logp), up(&d.logp_old), up(&d.adv));
            let (lr, ent, m) = (up(&d.logp_ref), up(&d.entropy), up(&d.mask));
            let (mut per_token, mut dlogp, mut dent) = (be.zeros(n), be.zeros(n), be.zeros(n));
            let tokens = d.mask.iter().map(|&m| m as f64).sum();
            let agg = match agg {
                Agg::Grpo => Aggregation::Grpo,
                Agg::Bnpo => Aggregation::Bnpo,
                Agg::Dapo => Aggregation::Dapo { num_items: tokens },
                Agg::DrGrpo => Aggregation::DrGrpo {
                    max_completion_length: rows.t,
                },
            };
            let cfg = PolicyLossCfg {
                clip_low: 0.2,
                clip_high: 0.28,
                dual_clip: Some(3.0),
                kl_coef: 0.04,
                entropy_coef: 0.01,
                agg,
            };
            let x = PolicyLossInputs::<B> {
                logp: be.all(&lp),
                logp_old: be.all(&old),
                advantages: Advantages::PerToken(be.all(&adv)),
                logp_ref: Some(be.all(&lr)),
                entropy: Some(be.all(&ent)),
                is_weight: None,
                mask: be.all(&m),
                rows,
            };
            let grad = PolicyLossGrad {
                dlogp: be.all_mut(&mut dlogp),
                dentropy: Some(be.all_mut(&mut dent)),
                dloss: 1.0,
            };
            let s = be.policy_loss(&x, &cfg, Some(be.all_mut(&mut per_token)), Some(grad));
            out.extend([
                s.loss,
                s.clipfrac,
                s.dual_clipfrac,
                s.approx_kl,
                s.kl,
                s.entropy,
                s.tokens,
            ]);
            for b in [&per_token, &dlogp, &dent] {
                out.extend(widen(&host(be, b)));
            }
        }
        Op::Value => {
            let (v, vo, r, m) = (
                up(&d.values),
                up(&d.values_old),
                up(&d.returns),
                up(&d.mask),
            );
            let (mut per_token, mut dx) = (be.zeros(n), be.zeros(n));
            let cfg = ValueLossCfg {
                clip: Some(0.2),
                agg: Aggregation::Bnpo,
            };
            let x = ValueLossInputs::<B> {
                values: be.all(&v),
                values_old: be.all(&vo),
                returns: be.all(&r),
                mask: be.all(&m),
                rows,
            };
            let grad = Grad {
                dx: be.all_mut(&mut dx),
                dloss: 1.0,
            };
            let s = be.value_loss(&x, &cfg, Some(be.all_mut(&mut per_token)), Some(grad));
            out.extend([s.loss, s.clipfrac, s.tokens]);
            out.extend(widen(&host(be, &per_token)));
            out.extend(widen(&host(be, &dx)));
        }
        Op::Gae => {
            let (r, v, m) = (up(&d.rewards), up(&d.values), up(&d.mask));
            let (mut adv, mut ret) = (be.zeros(n), be.zeros(n));
            let cfg = GaeCfg {
                gamma: 0.99,
                lam: 0.95,
                whiten: true,
            };
            let (rv, vv, mv) = (be.all(&r), be.all(&v), be.all(&m));
            be.gae(
                be.all_mut(&mut adv),
                be.all_mut(&mut ret),
                rv,
                vv,
                mv,
                rows,
                &cfg,
            );
            out.extend(widen(&host(be, &adv)));
            out.extend(widen(&host(be, &ret)));
        }
        Op::GroupAdv => {
            let r = up(&d.rewards);
            let (mut adv, mut base, mut std) = (be.zeros(n), be.zeros(n), be.zeros(n));
            let cfg = GroupAdvCfg {
                group: rows.t,
                baseline: GroupBaseline::Mean,
                scale: GroupScale::Group,
                eps: 1e-4,
            };
            let s = be.group_advantages(
                be.all_mut(&mut adv),
                Some(be.all_mut(&mut base)),
                Some(be.all_mut(&mut std)),
                be.all(&r),
                n,
                &cfg,
            );
            out.push(s.frac_zero_std);
            for b in [&adv, &base, &std] {
                out.extend(widen(&host(be, b)));
            }
        }
        Op::ReinforcePp => {
            let (lp, lr, s, m) = (up(&d.logp), up(&d.logp_ref), up(&d.scores), up(&d.mask));
            let mut rewards = be.zeros(n);
            let cfg = KlRewardCfg {
                kl_coef: 0.05,
                estimator: KlEstimator::K1,
            };
            let (lpv, lrv, sv, mv) = (be.all(&lp), be.all(&lr), be.all(&s), be.all(&m));
            be.kl_shaped_rewards(be.all_mut(&mut rewards), lpv, lrv, sv, mv, rows, &cfg);
            let (mut adv, mut ret) = (be.zeros(n), be.zeros(n));
            let rv = be.all(&rewards);
            be.reinforce_pp(
                be.all_mut(&mut adv),
                be.all_mut(&mut ret),
                rv,
                mv,
                rows,
                0.99,
            );
            for b in [&rewards, &adv, &ret] {
                out.extend(widen(&host(be, b)));
            }
        }
        // Bt and DPO take scores and log-probs of any values: the shared per-token data serves.
        Op::Bt => {
            let (c, r, margin) = (up(&d.values), up(&d.returns), up(&d.entropy));
            let (mut dc, mut dr) = (be.zeros(n), be.zeros(n));
            let grad = BtGrad {
                dchosen: be.all_mut(&mut dc),
                drejected: be.all_mut(&mut dr),
                dloss: 1.0,
            };
            let cfg = BtCfg { center_coef: 0.01 };
            let (cv, rv, mv) = (be.all(&c), be.all(&r), be.all(&margin));
            let s = be.bt_loss(cv, rv, Some(mv), n, &cfg, Some(grad));
            out.extend([s.loss, s.accuracy, s.margin]);
            out.extend(widen(&host(be, &dc)));
            out.extend(widen(&host(be, &dr)));
        }
        Op::Dpo => {
            let p = rows.b;
            let (cm, rm) = (up(&d.mask), up(&d.mask2));
            let seq = |tok: &[f32], mask: &B::Buf| {
                let t = be.upload(tok);
                let (mut s, mut c) = (be.zeros(p), be.zeros(p));
                let (tv, mv) = (be.all(&t), be.all(mask));
                be.masked_row_sum(be.all_mut(&mut s), Some(be.all_mut(&mut c)), tv, mv, rows);
                (s, c)
            };
            let (pc, lc) = seq(&d.logp, &cm);
            let (pr, lr) = seq(&d.logp_old, &rm);
            let (rc, _) = seq(&d.logp_ref, &cm);
            let (rr, _) = seq(&d.entropy.iter().map(|e| -e).collect::<Vec<_>>(), &rm);
            let x = DpoInputs::<B> {
                policy_chosen: be.all(&pc),
                policy_rejected: be.all(&pr),
                ref_chosen: be.all(&rc),
                ref_rejected: be.all(&rr),
                chosen_len: Some(be.all(&lc)),
                rejected_len: Some(be.all(&lr)),
                pairs: p,
            };
            let cfg = DpoCfg {
                beta: 0.1,
                label_smoothing: 0.1,
                loss: DpoLoss::Sigmoid,
            };
            let (mut losses, mut rw_c, mut rw_r) = (be.zeros(p), be.zeros(p), be.zeros(p));
            let (mut dc, mut dr) = (be.zeros(p), be.zeros(p));
            let outputs = DpoOutputs {
                losses: Some(be.all_mut(&mut losses)),
                chosen_rewards: Some(be.all_mut(&mut rw_c)),
                rejected_rewards: Some(be.all_mut(&mut rw_r)),
            };
            let grad = DpoGrad {
                dchosen: be.all_mut(&mut dc),
                drejected: be.all_mut(&mut dr),
                dloss: 1.0,
            };
            let s = be.dpo_loss(&x, &cfg, outputs, Some(grad));
            let mut dtok = be.zeros(n);
            be.masked_row_sum_backward(be.all_mut(&mut dtok), be.all(&dc), be.all(&cm), rows);
            out.extend([
                s.loss,
                s.accuracy,
                s.margin,
                s.chosen_reward,
                s.rejected_reward,
            ]);
            for b in [&losses, &rw_c, &rw_r, &dr, &dtok] {
                out.extend(widen(&host(be, b)));
            }
        }
        Op::Model(_) => unreachable!("the model family runs in model::run"),
    }
}

/// Errors of `got` against `want`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Errors {
    /// Largest `|got - want|`.
    pub abs: f64,
    /// Largest `|got - want| / |want|` over nonzero `want` (masked outputs are exactly 0).
    pub rel: f64,
    /// Largest scaled error, `|got - want|` over the op's scale (module docs), the measure the
    /// tolerances bound; infinite where an exact value differs, NaN if any value is NaN on one
    /// side only.
    pub scaled: f64,
}

/// Per value of `want`, what its error is divided by, by the op's measure (module docs); 0 for
/// values that must be exact. The GEMMs' Σ|terms| come from the CPU op on `d`'s magnitudes.
fn scales(op: Op, d: &Data, want: &Out) -> Vec<f64> {
    let measure = op.measure();
    let terms = match d {
        Data::Model(d) if measure == Measure::Terms => {
            run_op(&Cpu, op, &Data::Model(d.magnitudes())).values
        }
        _ => Vec::new(),
    };
    let mut scale = vec![0.0; want.values.len()];
    for (r, _) in want.segments().filter(|&(_, exact)| !exact) {
        let w = &want.values[r.clone()];
        match measure {
            Measure::Value => (scale[r].iter_mut().zip(w)).for_each(|(s, v)| *s = v.abs().max(1.0)),
            Measure::Tensor => scale[r].fill(w.iter().fold(1.0, |m, v| v.abs().max(m))),
            Measure::Terms => scale[r.clone()].copy_from_slice(&terms[r]),
        }
    }
    scale
}

fn errors(got: &Out, want: &Out, scale: &[f64]) -> Errors {
    let mut e = Errors::default();
    if got.values.len() != want.values.len() || got.ends != want.ends {
        e.scaled = f64::NAN;
        return e;
    }
    for ((&g, &w), &s) in got.values.iter().zip(&want.values).zip(scale) {
        let d = (g - w).abs();
        if d.is_nan() && !(g.is_nan() && w.is_nan()) {
            e.scaled = f64::NAN;
            return e;
        }
        e.abs = e.abs.max(d);
        if w != 0.0 {
            e.rel = e.rel.max(d / w.abs());
        }
        // A difference where the scale is 0 (an exact value) is infinite.
        if d > 0.0 {
            e.scaled = e.scaled.max(d / s);
        }
    }
    e
}

/// A backend (the emulator or a device) that counts the scratch memory its op drivers allocate
/// — the kernels' workspace beyond inputs and outputs — and times its kernels. The device copy
/// of the token ids is not counted as workspace (it is an input).
///
/// Kernel time: each launch (and each log-prob call) runs between two synchronisations, timed by
/// the host clock; the uploads, downloads and allocations around them are not counted. On a
/// device that adds a launch latency of a few microseconds to each kernel.
pub struct Metered<L> {
    inner: L,
    scratch_bytes: AtomicUsize,
    kernel_nanos: AtomicU64,
}

impl<L: Launcher> Metered<L> {
    /// Counters at zero over `inner`.
    pub fn new(inner: L) -> Metered<L> {
        Metered {
            inner,
            scratch_bytes: AtomicUsize::new(0),
            kernel_nanos: AtomicU64::new(0),
        }
    }

    /// The backend measured.
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// Scratch bytes allocated since the last call, resetting the count.
    pub fn take_scratch_bytes(&self) -> usize {
        self.scratch_bytes.swap(0, Ordering::Relaxed)
    }

    /// Kernel seconds since the last call, resetting the count.
    pub fn take_kernel_secs(&self) -> f64 {
        self.kernel_nanos.swap(0, Ordering::Relaxed) as f64 * 1e-9
    }

    /// Runs `f` between two synchronisations of the backend, adding its time to the kernel time.
    fn timed<T>(&self, f: impl FnOnce() -> Result<T, KernelError>) -> Result<T, KernelError> {
        self.inner.synchronize()?;
        let start = Instant::now();
        let r = f()?;
        self.inner.synchronize()?;
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.kernel_nanos.fetch_add(nanos, Ordering::Relaxed);
        Ok(r)
    }
}

impl<L: Launcher> Backend for Metered<L> {
    type Buf = L::Buf;
    type View<'a>
        = L::View<'a>
    where
        Self: 'a;
    type ViewMut<'a>
        = L::ViewMut<'a>
    where
        Self: 'a;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn zeros(&self, n: usize) -> L::Buf {
        self.inner.zeros(n)
    }
    fn upload(&self, data: &[f32]) -> L::Buf {
        self.inner.upload(data)
    }
    fn download(&self, v: L::View<'_>) -> Vec<f32> {
        self.inner.download(v)
    }
    fn len(&self, b: &L::Buf) -> usize {
        self.inner.len(b)
    }
    fn view<'a>(&self, b: &'a L::Buf, r: Range<usize>) -> L::View<'a> {
        self.inner.view(b, r)
    }
    fn view_mut<'a>(&self, b: &'a mut L::Buf, r: Range<usize>) -> L::ViewMut<'a> {
        self.inner.view_mut(b, r)
    }
    fn fill(&self, v: L::ViewMut<'_>, value: f32) {
        self.inner.fill(v, value)
    }
    fn copy(&self, dst: L::ViewMut<'_>, src: L::View<'_>) {
        self.inner.copy(dst, src)
    }
}

// SAFETY: every method forwards to the inner launcher's, with the same view and scratch types,
// so its guarantees carry over unchanged; counting and timing have no effect on memory.
unsafe impl<L: Launcher> Launcher for Metered<L> {
    type Scratch = L::Scratch;

    fn ptr(&self, v: L::View<'_>) -> DevPtr {
        self.inner.ptr(v)
    }
    fn ptr_mut(&self, v: &mut L::ViewMut<'_>) -> DevPtr {
        self.inner.ptr_mut(v)
    }
    fn view_len(&self, v: L::View<'_>) -> usize {
        self.inner.view_len(v)
    }
    fn view_mut_len(&self, v: &L::ViewMut<'_>) -> usize {
        self.inner.view_mut_len(v)
    }
    fn scratch(&self, len: usize) -> Result<Self::Scratch, KernelError> {
        self.scratch_bytes.fetch_add(len * 8, Ordering::Relaxed);
        self.inner.scratch(len)
    }
    fn scratch_u32(&self, data: &[u32]) -> Result<Self::Scratch, KernelError> {
        self.inner.scratch_u32(data)
    }
    fn scratch_ptr(&self, s: &Self::Scratch) -> DevPtr {
        self.inner.scratch_ptr(s)
    }
    fn read_f64(&self, s: &Self::Scratch, len: usize) -> Result<Vec<f64>, KernelError> {
        self.inner.read_f64(s, len)
    }
    fn synchronize(&self) -> Result<(), KernelError> {
        self.inner.synchronize()
    }
    unsafe fn launch(&self, l: &Launch) -> Result<(), KernelError> {
        // SAFETY: forwarded from the caller.
        self.timed(|| unsafe { self.inner.launch(l) })
    }
    unsafe fn gemm(&self, g: &crate::backend::emu::matmul::Gemm) -> Result<(), KernelError> {
        // SAFETY: forwarded from the caller.
        self.timed(|| unsafe { self.inner.gemm(g) })
    }
}

// Each op goes through the shared drivers with the meter as the launcher, so the scratch they
// allocate is counted and their launches timed.
crate::loss_ops_via_launcher!([L: Launcher] Metered<L>);
crate::model_ops_via_launcher!([L: Launcher] Metered<L>);

/// The seed of a case's data: fixed, so that a failure reproduces.
fn seed(i: usize) -> u64 {
    0x7a11_da7e + i as u64
}

/// Runs `f`, returning its result and seconds taken.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let r = f();
    (r, start.elapsed().as_secs_f64())
}

/// Bytes of the lse per row that the log-prob forward keeps for the backward (the kernels keep
/// no softmax); 0 for the other ops.
fn lse_bytes(op: Op, shape: Shape) -> usize {
    if op.precision().is_some() {
        let (b, t, _) = shape.tokens();
        b * t * 4
    } else {
        0
    }
}

/// `op`'s workspace in bytes on `shape`, beyond its inputs and outputs: the scratch the drivers
/// allocate, measured by running the op on [`Metered`] (the emulator: the drivers, and so the
/// scratch, are the same on a device), plus the lse per row of the log-prob ops.
pub fn workspace_bytes(op: Op, shape: Shape) -> usize {
    let d = Data::new(op, shape, seed(0));
    let m = Metered::new(Emu::default());
    run_op(&m, op, &d);
    m.take_scratch_bytes() + lse_bytes(op, shape)
}

/// `--device`'s choice, opened. Only `cuda` can fail (`auto` falls back with a notice), so an
/// error names it and the alternatives.
fn select(device: DeviceChoice) -> anyhow::Result<Selected> {
    device.select().context(
        "--device cuda: no CUDA device to run on (--device cpu runs the emulated kernels, \
         --device auto falls back to them)",
    )
}

/// `rlhf validate`: every case of [`cases`] on the kernels — on the device `--device` selects,
/// else emulated — against the CPU reference; prints one table row per case (max abs and rel
/// error, the scaled error the tolerance bounds, kernel time, bandwidth) and fails if any case
/// is over its tolerance. The time is the op's kernel time ([`Metered`]); GB/s is
/// [`Op::io_bytes`] over that time.
pub fn validate(args: &ValidateArgs) -> anyhow::Result<()> {
    match select(args.device)? {
        Selected::Cpu | Selected::Emu => {
            println!("{NOTICE}");
            let kernels = validate_on(&Metered::new(Emu::default()), args.quick);
            let model = model_parity_on(&Emu::default());
            kernels.and(model)
        }
        Selected::Cuda(cuda) => {
            println!("{}", cuda.info());
            let metered = Metered::new(*cuda);
            let kernels = validate_on(&metered, args.quick);
            let model = model_parity_on(metered.inner());
            kernels.and(model)
        }
    }
}

/// The whole model on the kernels against the CPU ([`crate::model_parity`]): one training step
/// and the log-probs of generated tokens, for a tiny model of each family with random weights.
fn model_parity_on<B: crate::backend::DecodeOps>(be: &B) -> anyhow::Result<()> {
    use crate::model_parity::{failures, logprobs, training_step, Weights};
    println!(
        "\nwhole model vs CPU (bf16 GEMMs; llama-hd64 also bf16 tensor-core attention): loss, \
         gradient and optimizer step of one training step; teacher-forced log-probs; sampling \
         (decode) vs training (full-sequence) log-prob gap"
    );
    println!(
        "{:<11} {:>9} {:>9} {:>11} {:>11} {:>11} {:>9} {:>9}  result",
        "model", "loss", "dloss", "grad relL2", "step relL2", "logp relL2", "gap mean", "gap max"
    );
    let mut failed = Vec::new();
    for name in ["llama-tiny", "gpt2-tiny", "llama-hd64"] {
        let w = Weights::builtin(name, 97, 5)?;
        let s = training_step(be, &w, 11)?;
        let l = logprobs(be, &w, 8, 13)?;
        let bad = failures(&s, &l);
        println!(
            "{:<11} {:>9.4} {:>9.2e} {:>11.2e} {:>11.2e} {:>11.2e} {:>9.2e} {:>9.2e}  {}",
            name,
            s.loss.0,
            (s.loss.1 - s.loss.0).abs(),
            s.grads.rel_l2,
            s.update.rel_l2,
            l.teacher_forced.rel_l2,
            l.gap_mean,
            l.gap_max,
            if bad.is_empty() { "PASS" } else { "FAIL" }
        );
        failed.extend(bad.into_iter().map(|b| format!("{name}: {b}")));
    }
    anyhow::ensure!(
        failed.is_empty(),
        "whole model over tolerance: {}",
        failed.join("; ")
    );
    println!("whole model within tolerance");
    Ok(())
}

fn validate_on<L: Launcher>(metered: &Metered<L>, quick: bool) -> anyhow::Result<()>
where
    Metered<L>: LogprobOps,
{
    println!(
        "tolerances: scaled error |got-want|/scale <= {TOL_F32:.0e} (f32, bf16 forward, GEMMs on \
         bf16 operands), <= {TOL_BF16:.1e} (bf16 log-prob backward: gradient stored in bf16), \
         <= {TOL_ATTN_BF16:.1e} (tensor-core attention: bf16 P, dS and outputs); scale: \
         max(1,|want|) (loss family), max(1,max|tensor|) (model family), sum|terms| (GEMMs); \
         sampled ids and copies exact"
    );
    println!(
        "{:<22} {:>14} {:>10} {:>10} {:>10} {:>10} {:>9}  result",
        "kernel", "shape", "max abs", "max rel", "scaled", "kernel ms", "GB/s"
    );
    let mut failed = Vec::new();
    for (i, (op, shape)) in cases(quick).into_iter().enumerate() {
        let d = Data::new(op, shape, seed(i));
        let want = run_op(&Cpu, op, &d);
        metered.take_kernel_secs();
        let got = run_op(metered, op, &d);
        let secs = metered.take_kernel_secs();
        let e = errors(&got, &want, &scales(op, &d, &want));
        // An all-zero reference would make any kernel pass: that is a broken case, not a pass.
        let pass = e.scaled <= op.tolerance() && want.values.iter().any(|&w| w != 0.0);
        if !pass {
            failed.push(format!("{} {shape}", op.name()));
        }
        println!(
            "{:<22} {:>14} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.3} {:>9.2e}  {}",
            op.name(),
            shape.to_string(),
            e.abs,
            e.rel,
            e.scaled,
            secs * 1e3,
            op.io_bytes(shape) as f64 / secs / 1e9,
            if pass { "PASS" } else { "FAIL" }
        );
    }
    anyhow::ensure!(
        failed.is_empty(),
        "{} case(s) over tolerance: {}",
        failed.len(),
        failed.join(", ")
    );
    println!("all kernels within tolerance");
    Ok(())
}

/// `rlhf bench kernels`: each kernel — on the device `--device` selects, else emulated —
/// against its CPU reference op, fastest of `repeats` runs each, and the kernel's workspace
/// beyond its inputs and outputs; on a device, also the log-prob kernel's bandwidth against a
/// device-to-device copy (the benchmark: bf16, B·T = 16k, V = 128k).
pub fn bench_kernels(args: &BenchKernelsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeats > 0, "--repeats must be at least 1");
    match select(args.device)? {
        Selected::Cpu | Selected::Emu => {
            println!("{NOTICE}");
            println!(
                "emulated times say nothing about GPU speed; the log-prob bandwidth target (>= 80% \
                 of a device-to-device copy at B*T = 16k, V = 128k, bf16) needs a GPU and is not \
                 measured here"
            );
            bench_on(&Metered::new(Emu::default()), args)
        }
        Selected::Cuda(cuda) => {
            println!("{}", cuda.info());
            let metered = Metered::new(*cuda);
            bench_on(&metered, args)?;
            logprob_bandwidth(metered.inner(), args.quick, args.repeats)
        }
    }
}

fn bench_on<L: Launcher>(metered: &Metered<L>, args: &BenchKernelsArgs) -> anyhow::Result<()>
where
    Metered<L>: LogprobOps,
{
    let name = metered.name();
    println!(
        "{:<22} {:>14} {:>10} {:>10} {:>9} {:>14}",
        "kernel",
        "shape",
        format!("{name} ms"),
        "cpu ms",
        format!("{name}/cpu"),
        "workspace B"
    );
    for (i, (op, shape)) in cases(args.quick).into_iter().enumerate() {
        let d = Data::new(op, shape, seed(i));
        // A first, untimed run: it measures the workspace, and on a device it pays the
        // one-time costs (module loading, allocator warm-up) outside the timed runs.
        metered.take_scratch_bytes();
        run_op(metered, op, &d);
        let workspace = metered.take_scratch_bytes() + lse_bytes(op, shape);
        let kernel = (0..args.repeats)
            .map(|_| {
                metered.take_kernel_secs();
                run_op(metered, op, &d);
                metered.take_kernel_secs()
            })
            .fold(f64::INFINITY, f64::min);
        let cpu = (0..args.repeats)
            .map(|_| timed(|| run_op(&Cpu, op, &d)).1)
            .fold(f64::INFINITY, f64::min);
        println!(
            "{:<22} {:>14} {:>10.3} {:>10.3} {:>9.2} {:>14}",
            op.name(),
            shape.to_string(),
            kernel * 1e3,
            cpu * 1e3,
            kernel / cpu,
            workspace
        );
    }
    println!(
        "{name} ms: kernel time; cpu ms: the CPU reference op end to end. workspace: scratch the \
         op drivers allocate (row counts, per-row partial sums, results), plus the lse per row \
         for the log-prob ops; the log-prob kernels stream the vocabulary with an online \
         max/sum and keep no O(B*T*V) softmax"
    );
    Ok(())
}

/// The benchmark: the bf16 log-prob forward (with entropy) at B·T = 16k tokens and
/// V = 128k (Llama 3's 128,256; 2k × 32k with `quick`), its achieved bandwidth against a
/// device-to-device copy of the same logit bytes, fastest of `repeats` runs after a warm-up.
/// The kernel reads the logits once; the copy reads and writes them, so its bandwidth counts
/// both. The kernel is timed as the op runs in training, so its time includes uploading the
/// 64 KB of token ids, which understates its bandwidth by a percent or so.
fn logprob_bandwidth(cuda: &Cuda, quick: bool, repeats: usize) -> anyhow::Result<()> {
    let (n, v) = if quick {
        (2048, 32_000)
    } else {
        (16_384, 128_256)
    };
    let logit_bytes = n * v * 2;
    let (free, _) = cuda.memory()?;
    // The logits, the copy's destination, and a margin for the small buffers.
    let need = 2 * logit_bytes + (256 << 20);
    if free < need {
        println!(
            "log-prob bandwidth: skipped, {n} x {v} bf16 logits and their copy need {:.2} GB of \
             device memory, {:.2} GB free",
            need as f64 / 1e9,
            free as f64 / 1e9
        );
        return Ok(());
    }
    let mut rng = Rng::new(0xba4d);
    let mut logits = cuda.alloc_zeros::<bf16>(n * v)?;
    // Random rows generated once and repeated: the kernel streams every byte from memory all the
    // same (the logits are far larger than any cache), and filling gigabytes stays quick.
    let rows = n.min(64);
    let block: Vec<bf16> = (0..rows * v)
        .map(|_| bf16::from_f32((2.0 * rng.normal()) as f32))
        .collect();
    for r0 in (0..n).step_by(rows) {
        let r1 = (r0 + rows).min(n);
        cuda.copy_to_device(logits.slice_mut(r0 * v..r1 * v), &block[..(r1 - r0) * v])?;
    }
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    let [mut logp, mut ent, mut lse] = [cuda.zeros(n), cuda.zeros(n), cuda.zeros(n)];
    let mut copy = cuda.alloc_zeros::<bf16>(n * v)?;
    let best = |f: &mut dyn FnMut() -> Result<(), KernelError>| -> anyhow::Result<f64> {
        f()?;
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            cuda.synchronize_stream()?;
            let start = Instant::now();
            f()?;
            cuda.synchronize_stream()?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let kernel = best(&mut || {
        cuda.logprobs_forward(
            logp.view_mut(),
            Some(ent.view_mut()),
            lse.view_mut(),
            logits.view(),
            &targets,
            n,
            v,
            1.0,
        )
    })?;
    let copied = best(&mut || cuda.copy_on_device(copy.view_mut(), logits.view()))?;
    let shape = Shape::Tokens { b: 1, t: n, v };
    let kernel_bw = Op::LogprobFwd(Precision::Bf16).io_bytes(shape) as f64 / kernel;
    let copy_bw = 2.0 * logit_bytes as f64 / copied;
    println!(
        "log-prob bandwidth: bf16 logits, B*T = {n} tokens, V = {v} ({:.2} GB), fastest of \
         {repeats}",
        logit_bytes as f64 / 1e9
    );
    println!(
        "  logprob_fwd bf16 (+entropy): {:>9.3} ms {:>8.1} GB/s (reads the logits once)",
        kernel * 1e3,
        kernel_bw / 1e9
    );
    println!(
        "  device-to-device copy:       {:>9.3} ms {:>8.1} GB/s (reads and writes them)",
        copied * 1e3,
        copy_bw / 1e9
    );
    println!(
        "  logprob_fwd / copy: {:.1}% of the copy's bandwidth (target >= 80%)",
        100.0 * kernel_bw / copy_bw
    );
    Ok(())
}
