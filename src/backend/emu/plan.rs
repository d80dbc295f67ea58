//! Launch plans: for every kernel in `kernels/`, its grid, block and shared-memory sizes and its
//! arguments in the kernel's parameter order, written once. Every launcher takes the same
//! [`Launch`] values — the emulated one ([`super::Emu`]) and the device one
//! ([`crate::backend::cuda::Cuda`]) — so the emulated tests exercise all of the host code but the
//! driver call (DESIGN.md principle 3).
//!
//! Each plan function names the kernel whose C signature it mirrors; [`Launch::signature`] lets
//! the emulator check every launch's argument types against the kernel's, so a plan that drifts
//! from its kernel fails its first test instead of reading garbage.

use crate::backend::loss::{
    Aggregation, DpoCfg, DpoLoss, GroupAdvCfg, GroupBaseline, GroupScale, KlEstimator,
    PolicyLossCfg, Rows, ValueLossCfg,
};
use crate::backend::AttnShape;

/// A device address (a host address under emulation). [`DevPtr::NULL`] is an absent optional
/// input or output, which kernels test for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevPtr(pub u64);

impl DevPtr {
    /// The null pointer.
    pub const NULL: DevPtr = DevPtr(0);
}

/// One kernel argument, as the kernel's C parameter type sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// Any pointer.
    Ptr(DevPtr),
    /// `int` (or `unsigned`).
    I32(i32),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

impl Arg {
    /// The argument's type code in a kernel signature: `p`ointer, `i`nt, `f`loat, `d`ouble.
    pub fn code(self) -> char {
        match self {
            Arg::Ptr(_) => 'p',
            Arg::I32(_) => 'i',
            Arg::F32(_) => 'f',
            Arg::F64(_) => 'd',
        }
    }

    /// The argument's bytes at the start of an 8-byte little-endian slot: what a launch's
    /// parameter pointer (cuLaunchKernel's `kernelParams[i]`) must point to.
    pub fn bits(self) -> u64 {
        match self {
            Arg::Ptr(p) => p.0,
            Arg::I32(v) => v as u32 as u64,
            Arg::F32(v) => v.to_bits() as u64,
            Arg::F64(v) => v.to_bits(),
        }
    }
}

/// A kernel: its source file (relative to `kernels/`, one NVRTC module) and its unmangled name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kernel {
    /// The `.cu` file defining it.
    pub file: &'static str,
    /// Its `extern "C"` name.
    pub name: &'static str,
}

macro_rules! kernels {
    ($($konst:ident = $file:literal / $name:ident;)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "` in `kernels/", $file, "`.")]
            pub const $konst: Kernel = Kernel { file: $file, name: stringify!($name) };
        )*
        /// Every kernel the host code launches.
        pub const ALL: &[Kernel] = &[$($konst),*];
    };
}

kernels! {
    LOGPROB_FWD_F32 = "logprob.cu" / logprob_fwd_f32;
    LOGPROB_FWD_BF16 = "logprob.cu" / logprob_fwd_bf16;
    LOGPROB_FWD_F16 = "logprob.cu" / logprob_fwd_f16;
    LOGPROB_BWD_F32 = "logprob.cu" / logprob_bwd_f32;
    LOGPROB_BWD_BF16 = "logprob.cu" / logprob_bwd_bf16;
    LOGPROB_BWD_F16 = "logprob.cu" / logprob_bwd_f16;
    KL_F32 = "kl.cu" / kl_f32;
    KL_REWARDS_F32 = "kl.cu" / kl_rewards_f32;
    POLICY_LOSS_F32 = "ppo_loss.cu" / policy_loss_f32;
    VALUE_LOSS_F32 = "ppo_loss.cu" / value_loss_f32;
    GAE_F32 = "ppo_loss.cu" / gae_f32;
    DISCOUNTED_RETURNS_F32 = "ppo_loss.cu" / discounted_returns_f32;
    MASKED_WHITEN_F32 = "ppo_loss.cu" / masked_whiten_f32;
    GROUP_ADV_F32 = "ppo_loss.cu" / group_adv_f32;
    BT_LOSS_F32 = "pref_loss.cu" / bt_loss_f32;
    DPO_LOSS_F32 = "pref_loss.cu" / dpo_loss_f32;
    ROW_COUNTS_F32 = "reduce.cu" / row_counts_f32;
    MASKED_ROW_SUM_F32 = "reduce.cu" / masked_row_sum_f32;
    MASKED_ROW_SUM_BWD_F32 = "reduce.cu" / masked_row_sum_bwd_f32;
    SUM_PARTIALS_F64 = "reduce.cu" / sum_partials_f64;
    ATTN_FWD_F32 = "attention.cu" / attn_fwd_f32;
    ATTN_FWD_BF16 = "attention.cu" / attn_fwd_bf16;
    ATTN_FWD_TC_BF16 = "attention.cu" / attn_fwd_tc_bf16;
    ATTN_DECODE_F32 = "attention.cu" / attn_decode_f32;
    ATTN_DECODE_BF16 = "attention.cu" / attn_decode_bf16;
    ATTN_BWD_DOT_F32 = "attention.cu" / attn_bwd_dot_f32;
    ATTN_BWD_DOT_BF16 = "attention.cu" / attn_bwd_dot_bf16;
    ATTN_BWD_DQ_F32 = "attention.cu" / attn_bwd_dq_f32;
    ATTN_BWD_DQ_BF16 = "attention.cu" / attn_bwd_dq_bf16;
    ATTN_BWD_DKDV_F32 = "attention.cu" / attn_bwd_dkdv_f32;
    ATTN_BWD_DKDV_BF16 = "attention.cu" / attn_bwd_dkdv_bf16;
    ATTN_BWD_DQ_TC_BF16 = "attention.cu" / attn_bwd_dq_tc_bf16;
    ATTN_BWD_DKDV_TC_BF16 = "attention.cu" / attn_bwd_dkdv_tc_bf16;
    RMSNORM_FWD_F32 = "norm.cu" / rmsnorm_fwd_f32;
    LAYERNORM_FWD_F32 = "norm.cu" / layernorm_fwd_f32;
    RMSNORM_BWD_DX_F32 = "norm.cu" / rmsnorm_bwd_dx_f32;
    LAYERNORM_BWD_DX_F32 = "norm.cu" / layernorm_bwd_dx_f32;
    NORM_DW_PARTIAL_F32 = "norm.cu" / norm_dw_partial_f32;
    NORM_DW_SUM_F32 = "norm.cu" / norm_dw_sum_f32;
    SAMPLE_F32 = "sampling.cu" / sample_f32;
    BIAS_ROWS_F32 = "matmul.cu" / bias_rows_f32;
    BIAS_GRAD_PARTIAL_F32 = "matmul.cu" / bias_grad_partial_f32;
    BIAS_GRAD_SUM_F32 = "matmul.cu" / bias_grad_sum_f32;
    ADD_F32 = "elementwise.cu" / add_f32;
    ADD_INPLACE_F32 = "elementwise.cu" / add_inplace_f32;
    SCALE_F32 = "elementwise.cu" / scale_f32;
    GELU_FWD_F32 = "elementwise.cu" / gelu_fwd_f32;
    GELU_BWD_F32 = "elementwise.cu" / gelu_bwd_f32;
    SWIGLU_FWD_F32 = "elementwise.cu" / swiglu_fwd_f32;
    SWIGLU_BWD_F32 = "elementwise.cu" / swiglu_bwd_f32;
    KV_CACHE_STORE_F32 = "elementwise.cu" / kv_cache_store_f32;
    TO_BF16_F32 = "elementwise.cu" / to_bf16_f32;
    ADD_BF16_F32 = "elementwise.cu" / add_bf16_f32;
    EMBEDDING_FWD_F32 = "embedding.cu" / embedding_fwd_f32;
    EMBEDDING_BWD_F32 = "embedding.cu" / embedding_bwd_f32;
    ROPE_F32 = "rope.cu" / rope_f32;
    SUM_SQUARES_F32 = "optim.cu" / sum_squares_f32;
    ADAMW_F32 = "optim.cu" / adamw_f32;
}

/// Threads per block of the row-wise loss kernels (one block per sequence): rows are tens to a few
/// thousand tokens, so 128 threads keep every lane busy without idling most of a larger block.
pub const ROW_BLOCK: u32 = 128;
/// Threads per block of the log-prob kernels (one block per row of V logits).
pub const LOGPROB_BLOCK: u32 = 256;
/// Threads of the single-block kernels (final reductions, whitening, pairs, groups) and per block
/// of the elementwise ones.
pub const FLAT_BLOCK: u32 = 256;
/// Threads per block of the scans that give each thread a whole row (GAE, returns).
pub const SCAN_BLOCK: u32 = 64;

/// Threads per block of every attention kernel (`ATTN_WARPS` = 4 warps in attention.cu), each
/// taking a few query rows (or keys) whole, so that a row's softmax needs only warp shuffles.
pub const ATTN_THREADS: u32 = 128;
/// Query rows per block of `attn_fwd_*` and `attn_bwd_dq_*`, and query heads per block of
/// `attn_decode_*` (`ATTN_BQ`): 4 per warp, which share every key a lane reads from shared memory.
pub const ATTN_BQ: usize = 16;
/// Keys per tile of those kernels (`ATTN_BK`): one per lane.
pub const ATTN_BK: usize = 32;
/// Keys per block of `attn_bwd_dkdv_*` (`ATTN_BKV`): 2 per warp, whose dK and dV rows the warp
/// keeps in registers; more would not fit its shared memory in 48 KB at the largest head dim.
pub const ATTN_BKV: usize = 8;
/// Queries per tile of `attn_bwd_dkdv_*` (`ATTN_BQ_BWD`): one per lane.
pub const ATTN_BQ_BWD: usize = 32;
/// The largest head dim the attention kernels take (`ATTN_MAX_HEAD_DIM`): a lane holds 4 of the
/// dims of each accumulator row.
pub const ATTN_MAX_HEAD_DIM: usize = 128;
/// Query rows per block of `attn_fwd_tc_bf16` and `attn_bwd_dq_tc_bf16`, and keys per block of
/// `attn_bwd_dkdv_tc_bf16` (`ATTN_TC_BQ`): one 16-row wmma tile per warp.
pub const ATTN_TC_BQ: usize = 64;
/// The head dims the tensor-core kernels take; other head dims run the SIMT ones.
pub const ATTN_TC_HEAD_DIMS: [usize; 2] = [64, 128];

/// Threads per block of the norm kernels: one block per row of C values (768 to a few thousand in
/// the models served), and one column per thread in the weight-gradient kernels.
pub const NORM_BLOCK: u32 = 256;
/// Rows per chunk of `norm_dw_partial_f32` (`NORM_DW_ROWS` in norm.cu): each chunk's per-column
/// sums are one row of partials, which `norm_dw_sum_f32` adds in chunk order.
pub const NORM_DW_ROWS: usize = 64;

/// Columns of `policy_loss_f32`'s per-row partial sums (`POLICY_PARTIALS` in ppo_loss.cu):
/// loss, clipped, dual-clipped, approx-KL, KL, entropy, tokens.
pub const POLICY_PARTIALS: usize = 7;
/// Columns of `value_loss_f32`'s per-row partial sums: loss, clipped, tokens.
pub const VALUE_PARTIALS: usize = 3;
/// Values `bt_loss_f32` writes: loss, accuracy, margin.
pub const BT_STATS: usize = 3;
/// Values `dpo_loss_f32` writes: loss, accuracy, margin, chosen reward, rejected reward.
pub const DPO_STATS: usize = 5;

/// One kernel launch: what to run, its geometry, and its arguments in parameter order.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// The kernel.
    pub kernel: Kernel,
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory per block, bytes.
    pub shared_bytes: u32,
    /// Arguments, in the kernel's parameter order.
    pub args: Vec<Arg>,
}

impl Launch {
    pub(crate) fn new(kernel: Kernel, blocks: usize, threads: u32, args: Vec<Arg>) -> Launch {
        let blocks = u32::try_from(blocks).unwrap_or_else(|_| {
            panic!(
                "{}: {blocks} blocks exceed a grid's x dimension",
                kernel.name
            )
        });
        Launch {
            kernel,
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared_bytes: 0,
            args,
        }
    }

    /// The same launch with `floats` f32 values of dynamic shared memory per block.
    fn with_shared_f32(self, floats: usize) -> Launch {
        let bytes = u32::try_from(floats * 4).expect("shared memory of a block fits in u32");
        Launch {
            shared_bytes: bytes,
            ..self
        }
    }

    /// True when the grid has no block (an empty batch): there is nothing to run, and CUDA would
    /// reject the launch, so launchers skip it.
    pub fn is_empty(&self) -> bool {
        self.grid.contains(&0) || self.block.contains(&0)
    }

    /// The argument types as [`Arg::code`] letters, e.g. `"ppid"`.
    pub fn signature(&self) -> String {
        self.args.iter().map(|a| a.code()).collect()
    }

    /// The arguments packed for a launch, one 8-byte slot each in parameter order
    /// ([`Arg::bits`]): every launcher passes a pointer to slot `i` as the kernel's parameter `i`,
    /// from which the launch reads as many bytes as that parameter's type has.
    pub fn param_slots(&self) -> Vec<u64> {
        self.args.iter().map(|a| a.bits()).collect()
    }
}

/// Host u32 values (token ids) packed into 8-byte words as a `u32*` reads them from memory:
/// value `2k` in the low half of word `k` (little-endian), a trailing odd value padded with 0.
/// Launchers keep scratch memory in 8-byte words, so this is how ids reach a kernel.
pub fn pack_u32_words(data: &[u32]) -> Vec<u64> {
    data.chunks(2)
        .map(|c| c[0] as u64 | (c.get(1).copied().unwrap_or(0) as u64) << 32)
        .collect()
}

/// A size as a kernel's `int`; panics past `i32::MAX`, far beyond any batch this engine forms.
pub(crate) fn int(x: usize, what: &str) -> Arg {
    Arg::I32(
        i32::try_from(x).unwrap_or_else(|_| panic!("{what} = {x} exceeds a kernel's 32-bit index")),
    )
}

/// `Aggregation` as the kernels' `(agg, agg_param)` pair (`RL_AGG_*` in common.cuh).
fn aggregation(agg: Aggregation) -> [Arg; 2] {
    let (code, param) = match agg {
        Aggregation::Grpo => (0, 0.0),
        Aggregation::Bnpo => (1, 0.0),
        Aggregation::Dapo { num_items } => (2, num_items),
        Aggregation::DrGrpo {
            max_completion_length,
        } => (3, max_completion_length as f64),
    };
    [Arg::I32(code), Arg::F64(param)]
}

/// `KlEstimator` as `RL_KL_*` in common.cuh.
fn estimator(e: KlEstimator) -> Arg {
    Arg::I32(match e {
        KlEstimator::K1 => 0,
        KlEstimator::K2 => 1,
        KlEstimator::K3 => 2,
    })
}

/// Element type of the log-prob kernels' logits (and logit gradients).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// f32.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

/// An element type the log-prob kernels read logits in.
pub trait LogitType: Copy + Send + Sync + 'static {
    /// The kernels' name for it.
    const DTYPE: Dtype;
}

impl LogitType for f32 {
    const DTYPE: Dtype = Dtype::F32;
}

impl LogitType for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
}

impl LogitType for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
}

/// Pointers of `logprob_fwd_*` (its targets come separately: they are host ids uploaded per call).
#[derive(Clone, Copy, Debug)]
pub struct LogprobFwdPtrs {
    /// (N, V) logits of the kernel's dtype.
    pub logits: DevPtr,
    /// (N), written.
    pub logp: DevPtr,
    /// (N) or null, written.
    pub entropy: DevPtr,
    /// (N), written.
    pub lse: DevPtr,
}

/// `logprob_fwd_{f32,bf16,f16}(logits, targets, V, temperature, logp, entropy, lse)`:
/// one block per row; targets are (N) u32.
pub fn logprob_fwd(
    dtype: Dtype,
    p: LogprobFwdPtrs,
    targets: DevPtr,
    n: usize,
    v: usize,
    temperature: f32,
) -> Launch {
    let kernel = match dtype {
        Dtype::F32 => LOGPROB_FWD_F32,
        Dtype::Bf16 => LOGPROB_FWD_BF16,
        Dtype::F16 => LOGPROB_FWD_F16,
    };
    let args = vec![
        Arg::Ptr(p.logits),
        Arg::Ptr(targets),
        int(v, "V"),
        Arg::F32(temperature),
        Arg::Ptr(p.logp),
        Arg::Ptr(p.entropy),
        Arg::Ptr(p.lse),
    ];
    Launch::new(kernel, n, LOGPROB_BLOCK, args)
}

/// Pointers of `logprob_bwd_*` (its targets come separately, as for the forward).
#[derive(Clone, Copy, Debug)]
pub struct LogprobBwdPtrs {
    /// (N, V) of the kernel's dtype, added to.
    pub dlogits: DevPtr,
    /// (N, V) of the kernel's dtype.
    pub logits: DevPtr,
    /// (N), from the forward.
    pub lse: DevPtr,
    /// (N).
    pub dlogp: DevPtr,
    /// (N) or null.
    pub dentropy: DevPtr,
}

/// `logprob_bwd_{f32,bf16,f16}(dlogits, logits, targets, lse, dlogp, dentropy, V, temperature)`:
/// one block per row; targets are (N) u32.
pub fn logprob_bwd(
    dtype: Dtype,
    p: LogprobBwdPtrs,
    targets: DevPtr,
    n: usize,
    v: usize,
    temperature: f32,
) -> Launch {
    let kernel = match dtype {
        Dtype::F32 => LOGPROB_BWD_F32,
        Dtype::Bf16 => LOGPROB_BWD_BF16,
        Dtype::F16 => LOGPROB_BWD_F16,
    };
    let args = vec![
        Arg::Ptr(p.dlogits),
        Arg::Ptr(p.logits),
        Arg::Ptr(targets),
        Arg::Ptr(p.lse),
        Arg::Ptr(p.dlogp),
        Arg::Ptr(p.dentropy),
        int(v, "V"),
        Arg::F32(temperature),
    ];
    Launch::new(kernel, n, LOGPROB_BLOCK, args)
}

/// `row_counts_f32(mask, T, counts)`: one block per row; counts are f64.
pub fn row_counts(mask: DevPtr, rows: Rows, counts: DevPtr) -> Launch {
    let args = vec![Arg::Ptr(mask), int(rows.t, "T"), Arg::Ptr(counts)];
    Launch::new(ROW_COUNTS_F32, rows.b, ROW_BLOCK, args)
}

/// `sum_partials_f64(partials, rows, k, out)`: one block adds `rows` rows of `k` columns.
pub fn sum_partials(partials: DevPtr, rows: usize, k: usize, out: DevPtr) -> Launch {
    let args = vec![
        Arg::Ptr(partials),
        int(rows, "rows"),
        int(k, "k"),
        Arg::Ptr(out),
    ];
    Launch::new(SUM_PARTIALS_F64, 1, FLAT_BLOCK, args)
}

/// `masked_row_sum_f32(x, mask, T, sums, counts)`: one block per row.
pub fn masked_row_sum(x: DevPtr, mask: DevPtr, rows: Rows, sums: DevPtr, counts: DevPtr) -> Launch {
    let args = vec![
        Arg::Ptr(x),
        Arg::Ptr(mask),
        int(rows.t, "T"),
        Arg::Ptr(sums),
        Arg::Ptr(counts),
    ];
    Launch::new(MASKED_ROW_SUM_F32, rows.b, ROW_BLOCK, args)
}

/// `masked_row_sum_bwd_f32(dx, dsums, mask, n, T)`: one thread per token.
pub fn masked_row_sum_bwd(dx: DevPtr, dsums: DevPtr, mask: DevPtr, rows: Rows) -> Launch {
    let n = rows.n();
    let args = vec![
        Arg::Ptr(dx),
        Arg::Ptr(dsums),
        Arg::Ptr(mask),
        int(n, "B*T"),
        int(rows.t, "T"),
    ];
    Launch::new(
        MASKED_ROW_SUM_BWD_F32,
        n.div_ceil(FLAT_BLOCK as usize),
        FLAT_BLOCK,
        args,
    )
}

/// Pointers of `kl_f32`, in its parameter order.
#[derive(Clone, Copy, Debug)]
pub struct KlPtrs {
    /// (B*T).
    pub logp: DevPtr,
    /// (B*T).
    pub logp_ref: DevPtr,
    /// (B*T).
    pub mask: DevPtr,
    /// (B) f64, from [`row_counts`].
    pub counts: DevPtr,
    /// (B*T) or null.
    pub per_token: DevPtr,
    /// (B*T) or null: the gradient, added to.
    pub dx: DevPtr,
    /// (B) f64: each row's weighted sum.
    pub partials: DevPtr,
}

/// `kl_f32(logp, logp_ref, mask, counts, rows, T, estimator, agg, agg_param, dloss, per_token,
/// dx, partials)`: one block per row.
pub fn kl(p: KlPtrs, rows: Rows, est: KlEstimator, agg: Aggregation, dloss: f32) -> Launch {
    let [agg, agg_param] = aggregation(agg);
    let args = vec![
        Arg::Ptr(p.logp),
        Arg::Ptr(p.logp_ref),
        Arg::Ptr(p.mask),
        Arg::Ptr(p.counts),
        int(rows.b, "B"),
        int(rows.t, "T"),
        estimator(est),
        agg,
        agg_param,
        Arg::F32(dloss),
        Arg::Ptr(p.per_token),
        Arg::Ptr(p.dx),
        Arg::Ptr(p.partials),
    ];
    Launch::new(KL_F32, rows.b, ROW_BLOCK, args)
}

/// Pointers of `kl_rewards_f32`, in its parameter order.
#[derive(Clone, Copy, Debug)]
pub struct KlRewardsPtrs {
    /// (B*T).
    pub logp: DevPtr,
    /// (B*T).
    pub logp_ref: DevPtr,
    /// (B).
    pub scores: DevPtr,
    /// (B*T).
    pub mask: DevPtr,
    /// (B*T), written.
    pub rewards: DevPtr,
}

/// `kl_rewards_f32(logp, logp_ref, scores, mask, T, estimator, kl_coef, rewards)`: one block per
/// row.
pub fn kl_rewards(p: KlRewardsPtrs, rows: Rows, est: KlEstimator, kl_coef: f32) -> Launch {
    let args = vec![
        Arg::Ptr(p.logp),
        Arg::Ptr(p.logp_ref),
        Arg::Ptr(p.scores),
        Arg::Ptr(p.mask),
        int(rows.t, "T"),
        estimator(est),
        Arg::F32(kl_coef),
        Arg::Ptr(p.rewards),
    ];
    Launch::new(KL_REWARDS_F32, rows.b, ROW_BLOCK, args)
}

/// Pointers of `policy_loss_f32`, in its parameter order.
#[derive(Clone, Copy, Debug)]
pub struct PolicyPtrs {
    /// (B*T).
    pub logp: DevPtr,
    /// (B*T).
    pub logp_old: DevPtr,
    /// (B*T), or (B) when `adv_per_seq`.
    pub adv: DevPtr,
    /// Whether `adv` holds one advantage per row.
    pub adv_per_seq: bool,
    /// (B*T) or null.
    pub logp_ref: DevPtr,
    /// (B*T) or null.
    pub entropy: DevPtr,
    /// (B*T).
    pub mask: DevPtr,
    /// (B) f64, from [`row_counts`].
    pub counts: DevPtr,
    /// (B*T) or null.
    pub per_token: DevPtr,
    /// (B*T) or null: added to.
    pub dlogp: DevPtr,
    /// (B*T) or null: added to.
    pub dentropy: DevPtr,
    /// (B, [`POLICY_PARTIALS`]) f64.
    pub partials: DevPtr,
    /// (B*T) truncated importance-sampling weights, or null.
    pub is_weight: DevPtr,
}

/// `policy_loss_f32(logp, logp_old, adv, adv_per_seq, logp_ref, entropy, mask, counts, rows, T,
/// clip_lo, clip_hi, dual_clip, dual_c, kl_coef, entropy_coef, agg, agg_param, dloss, per_token,
/// dlogp, dentropy, partials, is_weight)`: one block per row.
pub fn policy_loss(p: PolicyPtrs, rows: Rows, cfg: &PolicyLossCfg, dloss: f32) -> Launch {
    let [agg, agg_param] = aggregation(cfg.agg);
    // The clip bounds in f64 before the one rounding, as the reference forms them.
    let lo = (1.0 - cfg.clip_low as f64) as f32;
    let hi = (1.0 + cfg.clip_high as f64) as f32;
    let args = vec![
        Arg::Ptr(p.logp),
        Arg::Ptr(p.logp_old),
        Arg::Ptr(p.adv),
        Arg::I32(p.adv_per_seq as i32),
        Arg::Ptr(p.logp_ref),
        Arg::Ptr(p.entropy),
        Arg::Ptr(p.mask),
        Arg::Ptr(p.counts),
        int(rows.b, "B"),
        int(rows.t, "T"),
        Arg::F32(lo),
        Arg::F32(hi),
        Arg::I32(cfg.dual_clip.is_some() as i32),
        Arg::F32(cfg.dual_clip.unwrap_or(0.0)),
        Arg::F32(cfg.kl_coef),
        Arg::F32(cfg.entropy_coef),
        agg,
        agg_param,
        Arg::F32(dloss),
        Arg::Ptr(p.per_token),
        Arg::Ptr(p.dlogp),
        Arg::Ptr(p.dentropy),
        Arg::Ptr(p.partials),
        Arg::Ptr(p.is_weight),
    ];
    Launch::new(POLICY_LOSS_F32, rows.b, ROW_BLOCK, args)
}

/// Pointers of `value_loss_f32`, in its parameter order.
#[derive(Clone, Copy, Debug)]
pub struct ValuePtrs {
    /// (B*T).
    pub values: DevPtr,
    /// (B*T).
    pub values_old: DevPtr,
    /// (B*T).
    pub returns: DevPtr,
    /// (B*T).
    pub mask: DevPtr,
    /// (B) f64, from [`row_counts`].
    pub counts: DevPtr,
    /// (B*T) or null.
    pub per_token: DevPtr,
    /// (B*T) or null: added to.
    pub dx: DevPtr,
    /// (B, [`VALUE_PARTIALS`]) f64.
    pub partials: DevPtr,
}

/// `value_loss_f32(values, values_old, returns, mask, counts, rows, T, has_clip, clip, agg,
/// agg_param, dloss, per_token, dx, partials)`: one block per row.
pub fn value_loss(p: ValuePtrs, rows: Rows, cfg: &ValueLossCfg, dloss: f32) -> Launch {
    let [agg, agg_param] = aggregation(cfg.agg);
    let args = vec![
        Arg::Ptr(p.values),
        Arg::Ptr(p.values_old),
        Arg::Ptr(p.returns),
        Arg::Ptr(p.mask),
        Arg::Ptr(p.counts),
        int(rows.b, "B"),
        int(rows.t, "T"),
        Arg::I32(cfg.clip.is_some() as i32),
        Arg::F32(cfg.clip.unwrap_or(0.0)),
        agg,
        agg_param,
        Arg::F32(dloss),
        Arg::Ptr(p.per_token),
        Arg::Ptr(p.dx),
        Arg::Ptr(p.partials),
    ];
    Launch::new(VALUE_LOSS_F32, rows.b, ROW_BLOCK, args)
}

/// `gae_f32(rewards, values, mask, rows, T, gamma, lam, adv, ret)`: one thread per row.
#[allow(clippy::too_many_arguments)]
pub fn gae(
    rewards: DevPtr,
    values: DevPtr,
    mask: DevPtr,
    rows: Rows,
    gamma: f32,
    lam: f32,
    adv: DevPtr,
    ret: DevPtr,
) -> Launch {
    let args = vec![
        Arg::Ptr(rewards),
        Arg::Ptr(values),
        Arg::Ptr(mask),
        int(rows.b, "B"),
        int(rows.t, "T"),
        Arg::F32(gamma),
        Arg::F32(lam),
        Arg::Ptr(adv),
        Arg::Ptr(ret),
    ];
    Launch::new(
        GAE_F32,
        rows.b.div_ceil(SCAN_BLOCK as usize),
        SCAN_BLOCK,
        args,
    )
}

/// `discounted_returns_f32(rewards, mask, rows, T, gamma, ret)`: one thread per row.
pub fn discounted_returns(
    rewards: DevPtr,
    mask: DevPtr,
    rows: Rows,
    gamma: f32,
    ret: DevPtr,
) -> Launch {
    let args = vec![
        Arg::Ptr(rewards),
        Arg::Ptr(mask),
        int(rows.b, "B"),
        int(rows.t, "T"),
        Arg::F32(gamma),
        Arg::Ptr(ret),
    ];
    Launch::new(
        DISCOUNTED_RETURNS_F32,
        rows.b.div_ceil(SCAN_BLOCK as usize),
        SCAN_BLOCK,
        args,
    )
}

/// How [`masked_whiten`] scales (`WHITEN_*` in ppo_loss.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whiten {
    /// TRL `masked_whiten`: `(x - mean)·rsqrt(var_unbiased + 1e-8)` (GAE).
    UnbiasedVar,
    /// `(x - mean) / (std_population + 1e-8)` (REINFORCE++).
    PopulationStd,
}

/// `masked_whiten_f32(x, mask, n, mode, out)`: one block over all n tokens; `out` may be `x`.
pub fn masked_whiten(x: DevPtr, mask: DevPtr, n: usize, mode: Whiten, out: DevPtr) -> Launch {
    let mode = match mode {
        Whiten::UnbiasedVar => 0,
        Whiten::PopulationStd => 1,
    };
    let args = vec![
        Arg::Ptr(x),
        Arg::Ptr(mask),
        int(n, "B*T"),
        Arg::I32(mode),
        Arg::Ptr(out),
    ];
    Launch::new(MASKED_WHITEN_F32, 1, FLAT_BLOCK, args)
}

/// Pointers of `group_adv_f32`, in its parameter order.
#[derive(Clone, Copy, Debug)]
pub struct GroupAdvPtrs {
    /// (n).
    pub rewards: DevPtr,
    /// (n), written.
    pub adv: DevPtr,
    /// (n) or null.
    pub baseline: DevPtr,
    /// (n) or null.
    pub group_std: DevPtr,
    /// (1) f64: the fraction of zero-std groups.
    pub stats: DevPtr,
}

/// `group_adv_f32(rewards, n, G, baseline, scale, eps, adv, baseline_out, std_out, stats)`:
/// one block, a thread per group.
pub fn group_adv(p: GroupAdvPtrs, n: usize, cfg: &GroupAdvCfg) -> Launch {
    let baseline = match cfg.baseline {
        GroupBaseline::Mean => 0,
        GroupBaseline::LeaveOneOut => 1,
    };
    let scale = match cfg.scale {
        GroupScale::None => 0,
        GroupScale::Group => 1,
        GroupScale::Batch => 2,
    };
    let args = vec![
        Arg::Ptr(p.rewards),
        int(n, "n"),
        int(cfg.group, "group"),
        Arg::I32(baseline),
        Arg::I32(scale),
        Arg::F32(cfg.eps),
        Arg::Ptr(p.adv),
        Arg::Ptr(p.baseline),
        Arg::Ptr(p.group_std),
        Arg::Ptr(p.stats),
    ];
    Launch::new(GROUP_ADV_F32, 1, FLAT_BLOCK, args)
}

/// Pointers of `bt_loss_f32`, in its parameter order.
#[derive(Clone, Copy, Debug)]
pub struct BtPtrs {
    /// (P).
    pub chosen: DevPtr,
    /// (P).
    pub rejected: DevPtr,
    /// (P) or null.
    pub margin: DevPtr,
    /// (P) or null (with `drejected`): added to.
    pub dchosen: DevPtr,
    /// (P) or null: added to.
    pub drejected: DevPtr,
    /// ([`BT_STATS`]) f64.
    pub stats: DevPtr,
}

/// `bt_loss_f32(chosen, rejected, margin, P, center_coef, dloss, dchosen, drejected, stats)`:
/// one block over all pairs.
pub fn bt_loss(p: BtPtrs, pairs: usize, center_coef: f32, dloss: f32) -> Launch {
    let args = vec![
        Arg::Ptr(p.chosen),
        Arg::Ptr(p.rejected),
        Arg::Ptr(p.margin),
        int(pairs, "P"),
        Arg::F32(center_coef),
        Arg::F32(dloss),
        Arg::Ptr(p.dchosen),
        Arg::Ptr(p.drejected),
        Arg::Ptr(p.stats),
    ];
    Launch::new(BT_LOSS_F32, 1, FLAT_BLOCK, args)
}

/// Pointers of `dpo_loss_f32`, in its parameter order.
#[derive(Clone, Copy, Debug)]
pub struct DpoPtrs {
    /// (P).
    pub policy_chosen: DevPtr,
    /// (P).
    pub policy_rejected: DevPtr,
    /// (P).
    pub ref_chosen: DevPtr,
    /// (P).
    pub ref_rejected: DevPtr,
    /// (P), read for IPO only.
    pub chosen_len: DevPtr,
    /// (P), read for IPO only.
    pub rejected_len: DevPtr,
    /// (P) or null.
    pub losses: DevPtr,
    /// (P) or null.
    pub chosen_rewards: DevPtr,
    /// (P) or null.
    pub rejected_rewards: DevPtr,
    /// (P) or null (with `drejected`): added to.
    pub dchosen: DevPtr,
    /// (P) or null: added to.
    pub drejected: DevPtr,
    /// ([`DPO_STATS`]) f64.
    pub stats: DevPtr,
}

/// `dpo_loss_f32(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len,
/// rejected_len, P, beta, eps, variant, dloss, losses, chosen_rewards, rejected_rewards, dchosen,
/// drejected, stats)`: one block over all pairs.
pub fn dpo_loss(p: DpoPtrs, pairs: usize, cfg: &DpoCfg, dloss: f32) -> Launch {
    let variant = match cfg.loss {
        DpoLoss::Sigmoid => 0,
        DpoLoss::Hinge => 1,
        DpoLoss::Ipo => 2,
        DpoLoss::Robust => 3,
    };
    let args = vec![
        Arg::Ptr(p.policy_chosen),
        Arg::Ptr(p.policy_rejected),
        Arg::Ptr(p.ref_chosen),
        Arg::Ptr(p.ref_rejected),
        Arg::Ptr(p.chosen_len),
        Arg::Ptr(p.rejected_len),
        int(pairs, "P"),
        Arg::F32(cfg.beta),
        Arg::F32(cfg.label_smoothing),
        Arg::I32(variant),
        Arg::F32(dloss),
        Arg::Ptr(p.losses),
        Arg::Ptr(p.chosen_rewards),
        Arg::Ptr(p.rejected_rewards),
        Arg::Ptr(p.dchosen),
        Arg::Ptr(p.drejected),
        Arg::Ptr(p.stats),
    ];
    Launch::new(DPO_LOSS_F32, 1, FLAT_BLOCK, args)
}

/// Element type of the attention kernels' activations: qkv, out, their gradients and the KV cache
/// (lse and D are always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnDtype {
    /// f32.
    F32,
    /// bfloat16.
    Bf16,
}

impl AttnDtype {
    /// The kernel of this type among a family's two.
    fn pick(self, f32: Kernel, bf16: Kernel) -> Kernel {
        match self {
            AttnDtype::F32 => f32,
            AttnDtype::Bf16 => bf16,
        }
    }
}

/// An element type the attention kernels take activations in.
pub trait AttnType: Copy + Send + Sync + 'static {
    /// The kernels' name for it.
    const ATTN: AttnDtype;
}

impl AttnType for f32 {
    const ATTN: AttnDtype = AttnDtype::F32;
}

impl AttnType for half::bf16 {
    const ATTN: AttnDtype = AttnDtype::Bf16;
}

/// The score scale `1/sqrt(HD)`, computed as the CPU reference computes it.
fn attn_scale(hd: usize) -> Arg {
    Arg::F32(1.0 / (hd as f32).sqrt())
}

/// f32 values of dynamic shared memory of `attn_fwd_*` and `attn_decode_*` (`attend` in
/// attention.cu): the q tile [ATTN_BQ][HD], k and v tiles [ATTN_BK][HD], P [ATTN_BQ][ATTN_BK].
/// 43 KB at HD = 128.
fn attn_fwd_smem(hd: usize) -> usize {
    (ATTN_BQ + 2 * ATTN_BK) * hd + ATTN_BQ * ATTN_BK
}

/// f32 values of dynamic shared memory of `attn_bwd_dq_*`: q and dO tiles [ATTN_BQ][HD], one tile
/// [ATTN_BK][HD] that holds v and then k, dS [ATTN_BQ][ATTN_BK]. 34 KB at HD = 128.
fn attn_dq_smem(hd: usize) -> usize {
    (2 * ATTN_BQ + ATTN_BK) * hd + ATTN_BQ * ATTN_BK
}

/// f32 values of dynamic shared memory of `attn_bwd_dkdv_*`: k and v [ATTN_BKV][HD], q and dO
/// [ATTN_BQ_BWD][HD], P and dS [ATTN_BKV][ATTN_BQ_BWD]. 43 KB at HD = 128.
fn attn_dkdv_smem(hd: usize) -> usize {
    2 * (ATTN_BKV + ATTN_BQ_BWD) * hd + 2 * ATTN_BKV * ATTN_BQ_BWD
}

/// Keys per tile of `attn_bwd_dq_tc_bf16`, and queries per tile of `attn_bwd_dkdv_tc_bf16`, at
/// head dim `hd` (their template argument BK or BQ): 32 at 64, 16 at 128, where 32 would not fit
/// the shared memory in 48 KB.
fn attn_tc_bk(hd: usize) -> usize {
    if hd == 64 {
        32
    } else {
        16
    }
}

/// Keys per tile of `attn_fwd_tc_bf16` at head dim `hd` (its template argument BK): 64 at 64,
/// 32 at 128, the most that keep its shared memory within 48 KB.
fn attn_fwd_tc_bk(hd: usize) -> usize {
    if hd == 64 {
        64
    } else {
        32
    }
}

/// f32 values of dynamic shared memory of `attn_fwd_tc_bf16`: K and V [BK][HD + 8] and Q
/// [ATTN_TC_BQ][HD + 8] bf16, two to an f32; S (then P) [ATTN_TC_BQ][BK + 4] and alpha
/// [ATTN_TC_BQ] f32 (the rows padded against bank conflicts). 43 KB at HD = 128, 44 KB at 64.
fn attn_fwd_tc_smem(hd: usize) -> usize {
    let bk = attn_fwd_tc_bk(hd);
    (2 * bk + ATTN_TC_BQ) * (hd + 8) / 2 + ATTN_TC_BQ * (bk + 4) + ATTN_TC_BQ
}

/// f32 values of dynamic shared memory of `attn_bwd_dq_tc_bf16`: a union of [ATTN_TC_BQ][HD] f32
/// (q and dO staging, the K and V tiles [BK][HD + 8] bf16, dQ staging), S and dP
/// [ATTN_TC_BQ][BK] f32, dS [ATTN_TC_BQ][BK] bf16. 42 KB at HD = 128.
fn attn_bwd_tc_dq_smem(hd: usize) -> usize {
    let bk = attn_tc_bk(hd);
    ATTN_TC_BQ * hd + 2 * ATTN_TC_BQ * bk + ATTN_TC_BQ * bk / 2
}

/// f32 values of dynamic shared memory of `attn_bwd_dkdv_tc_bf16`: K and V [ATTN_TC_BQ][HD + 8]
/// bf16 (rows padded against bank conflicts; later the dK/dV staging, [ATTN_TC_BQ][HD] f32), q
/// and dO [BQ][HD] bf16, Sᵀ/dPᵀ [ATTN_TC_BQ][BQ] f32, Pᵀ/dSᵀ [ATTN_TC_BQ][BQ] bf16. Exactly 48 KB
/// at HD = 128, which is why q and dO stay unpadded.
fn attn_bwd_tc_dkdv_smem(hd: usize) -> usize {
    let bq = attn_tc_bk(hd);
    ATTN_TC_BQ * (hd + 8) + bq * hd + ATTN_TC_BQ * bq + ATTN_TC_BQ * bq / 2
}

/// Which attention kernels run: the tensor-core ones where they apply, or the SIMT ones, forced
/// (for comparison).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttnKernel {
    /// The tensor-core kernels for bf16 at the head dims they take ([`ATTN_TC_HEAD_DIMS`]), else
    /// the SIMT ones.
    #[default]
    Auto,
    /// The SIMT kernels, whatever the type and head dim.
    Simt,
}

impl AttnKernel {
    /// Whether the forward and backward of `dtype` at head dim `hd` run on the tensor cores.
    pub fn uses_tensor_cores(self, dtype: AttnDtype, hd: usize) -> bool {
        self == AttnKernel::Auto && dtype == AttnDtype::Bf16 && ATTN_TC_HEAD_DIMS.contains(&hd)
    }
}

/// The shape arguments `T, NH, KVH, HD` the attention kernels share.
fn attn_dims(s: &AttnShape) -> [Arg; 4] {
    [
        int(s.t, "T"),
        int(s.n_head, "NH"),
        int(s.n_kv_head, "KVH"),
        int(s.head_dim, "HD"),
    ]
}

/// Pointers of `attn_fwd_*` (its key mask comes separately: host flags uploaded per call).
#[derive(Clone, Copy, Debug)]
pub struct AttnFwdPtrs {
    /// (B·T, qkv_width) of the kernel's type.
    pub qkv: DevPtr,
    /// (B·T, NH·HD) of the kernel's type, written.
    pub out: DevPtr,
    /// (B, NH, T) f32, written.
    pub lse: DevPtr,
}

/// `attn_fwd_{f32,bf16}(qkv, key_mask, T, NH, KVH, HD, scale, out, lse)`: one block per
/// [`ATTN_BQ`] query rows of a (sequence, head); key_mask is (B·T) u32.
pub fn attn_fwd(dtype: AttnDtype, p: AttnFwdPtrs, key_mask: DevPtr, s: AttnShape) -> Launch {
    let mut args = vec![Arg::Ptr(p.qkv), Arg::Ptr(key_mask)];
    args.extend(attn_dims(&s));
    args.extend([attn_scale(s.head_dim), Arg::Ptr(p.out), Arg::Ptr(p.lse)]);
    let blocks = s.b * s.n_head * s.t.div_ceil(ATTN_BQ);
    let kernel = dtype.pick(ATTN_FWD_F32, ATTN_FWD_BF16);
    Launch::new(kernel, blocks, ATTN_THREADS, args).with_shared_f32(attn_fwd_smem(s.head_dim))
}

/// `attn_fwd_tc_bf16(qkv, key_mask, T, NH, KVH, HD, scale, out, lse)`, the tensor-core forward
/// with `attn_fwd_bf16`'s arguments and results: one block per [`ATTN_TC_BQ`] query rows of a
/// (sequence, head). Panics unless HD is one of [`ATTN_TC_HEAD_DIMS`].
pub fn attn_fwd_tc(p: AttnFwdPtrs, key_mask: DevPtr, s: AttnShape) -> Launch {
    check_tc_head_dim(ATTN_FWD_TC_BF16, s.head_dim);
    let mut args = vec![Arg::Ptr(p.qkv), Arg::Ptr(key_mask)];
    args.extend(attn_dims(&s));
    args.extend([attn_scale(s.head_dim), Arg::Ptr(p.out), Arg::Ptr(p.lse)]);
    let blocks = s.b * s.n_head * s.t.div_ceil(ATTN_TC_BQ);
    Launch::new(ATTN_FWD_TC_BF16, blocks, ATTN_THREADS, args)
        .with_shared_f32(attn_fwd_tc_smem(s.head_dim))
}

/// Panics unless `kernel` (a tensor-core kernel) takes head dim `hd`.
fn check_tc_head_dim(kernel: Kernel, hd: usize) {
    assert!(
        ATTN_TC_HEAD_DIMS.contains(&hd),
        "{}: head_dim {hd} is not one of {ATTN_TC_HEAD_DIMS:?}",
        kernel.name
    );
}

/// Pointers of `attn_decode_*` (its key mask comes separately, as for the forward).
#[derive(Clone, Copy, Debug)]
pub struct AttnDecodePtrs {
    /// (B, qkv_width) of the kernel's type: one new token per sequence.
    pub qkv: DevPtr,
    /// (B, KVH, TMAX, HD) of the kernel's type.
    pub k_cache: DevPtr,
    /// (B, KVH, TMAX, HD) of the kernel's type.
    pub v_cache: DevPtr,
    /// (B, NH·HD) of the kernel's type, written.
    pub out: DevPtr,
}

/// `attn_decode_{f32,bf16}(qkv, k_cache, v_cache, key_mask, NH, KVH, HD, len, TMAX, scale, out)`:
/// one block per (sequence, key/value head) and [`ATTN_BQ`] of the group's query heads; key_mask
/// is (B·TMAX) u32, and columns `0..len` are read.
pub fn attn_decode(
    dtype: AttnDtype,
    p: AttnDecodePtrs,
    key_mask: DevPtr,
    s: AttnShape,
    len: usize,
    t_max: usize,
) -> Launch {
    let args = vec![
        Arg::Ptr(p.qkv),
        Arg::Ptr(p.k_cache),
        Arg::Ptr(p.v_cache),
        Arg::Ptr(key_mask),
        int(s.n_head, "NH"),
        int(s.n_kv_head, "KVH"),
        int(s.head_dim, "HD"),
        int(len, "len"),
        int(t_max, "TMAX"),
        attn_scale(s.head_dim),
        Arg::Ptr(p.out),
    ];
    let group = s.n_head / s.n_kv_head;
    let blocks = s.b * s.n_kv_head * group.div_ceil(ATTN_BQ);
    let kernel = dtype.pick(ATTN_DECODE_F32, ATTN_DECODE_BF16);
    Launch::new(kernel, blocks, ATTN_THREADS, args).with_shared_f32(attn_fwd_smem(s.head_dim))
}

/// Pointers of the attention backward (its key mask and D come separately).
#[derive(Clone, Copy, Debug)]
pub struct AttnBwdPtrs {
    /// (B·T, qkv_width) of the kernels' type, added to.
    pub dqkv: DevPtr,
    /// (B·T, NH·HD) of the kernels' type.
    pub dout: DevPtr,
    /// (B·T, qkv_width) of the kernels' type.
    pub qkv: DevPtr,
    /// (B·T, NH·HD) of the kernels' type: the forward's output.
    pub out: DevPtr,
    /// (B, NH, T) f32: the forward's.
    pub lse: DevPtr,
}

/// `attn_bwd_dot_{f32,bf16}(dout, out, B·T, T, NH, HD, D)`: `D = rowsum(dO ∘ O)` into (B, NH, T)
/// f32, a warp per (token, head).
pub fn attn_bwd_dot(dtype: AttnDtype, p: AttnBwdPtrs, s: AttnShape, d: DevPtr) -> Launch {
    let args = vec![
        Arg::Ptr(p.dout),
        Arg::Ptr(p.out),
        int(s.b * s.t, "B*T"),
        int(s.t, "T"),
        int(s.n_head, "NH"),
        int(s.head_dim, "HD"),
        Arg::Ptr(d),
    ];
    let warps = (ATTN_THREADS / 32) as usize;
    let blocks = (s.b * s.t * s.n_head).div_ceil(warps);
    let kernel = dtype.pick(ATTN_BWD_DOT_F32, ATTN_BWD_DOT_BF16);
    Launch::new(kernel, blocks, ATTN_THREADS, args)
}

/// The arguments `attn_bwd_dq_*` and `attn_bwd_dkdv_*` share: `(qkv, dout, lse, D, key_mask, T,
/// NH, KVH, HD, scale, dqkv)`.
fn attn_bwd_args(p: AttnBwdPtrs, key_mask: DevPtr, d: DevPtr, s: &AttnShape) -> Vec<Arg> {
    let mut args = vec![
        Arg::Ptr(p.qkv),
        Arg::Ptr(p.dout),
        Arg::Ptr(p.lse),
        Arg::Ptr(d),
        Arg::Ptr(key_mask),
    ];
    args.extend(attn_dims(s));
    args.extend([attn_scale(s.head_dim), Arg::Ptr(p.dqkv)]);
    args
}

/// `attn_bwd_dq_{f32,bf16}(qkv, dout, lse, D, key_mask, T, NH, KVH, HD, scale, dqkv)`: adds dq, one
/// block per [`ATTN_BQ`] query rows of a (sequence, head); D from [`attn_bwd_dot`].
pub fn attn_bwd_dq(
    dtype: AttnDtype,
    p: AttnBwdPtrs,
    key_mask: DevPtr,
    d: DevPtr,
    s: AttnShape,
) -> Launch {
    let blocks = s.b * s.n_head * s.t.div_ceil(ATTN_BQ);
    let kernel = dtype.pick(ATTN_BWD_DQ_F32, ATTN_BWD_DQ_BF16);
    Launch::new(
        kernel,
        blocks,
        ATTN_THREADS,
        attn_bwd_args(p, key_mask, d, &s),
    )
    .with_shared_f32(attn_dq_smem(s.head_dim))
}

/// `attn_bwd_dkdv_{f32,bf16}(qkv, dout, lse, D, key_mask, T, NH, KVH, HD, scale, dqkv)`: adds dk
/// and dv, one block per [`ATTN_BKV`] keys of a (sequence, key/value head); D from
/// [`attn_bwd_dot`].
pub fn attn_bwd_dkdv(
    dtype: AttnDtype,
    p: AttnBwdPtrs,
    key_mask: DevPtr,
    d: DevPtr,
    s: AttnShape,
) -> Launch {
    let blocks = s.b * s.n_kv_head * s.t.div_ceil(ATTN_BKV);
    let kernel = dtype.pick(ATTN_BWD_DKDV_F32, ATTN_BWD_DKDV_BF16);
    Launch::new(
        kernel,
        blocks,
        ATTN_THREADS,
        attn_bwd_args(p, key_mask, d, &s),
    )
    .with_shared_f32(attn_dkdv_smem(s.head_dim))
}

/// `attn_bwd_dq_tc_bf16`, the tensor-core dQ with `attn_bwd_dq_bf16`'s arguments and results: one
/// block per [`ATTN_TC_BQ`] query rows of a (sequence, head); D from [`attn_bwd_dot`]. Panics
/// unless HD is one of [`ATTN_TC_HEAD_DIMS`].
pub fn attn_bwd_dq_tc(p: AttnBwdPtrs, key_mask: DevPtr, d: DevPtr, s: AttnShape) -> Launch {
    check_tc_head_dim(ATTN_BWD_DQ_TC_BF16, s.head_dim);
    let blocks = s.b * s.n_head * s.t.div_ceil(ATTN_TC_BQ);
    let args = attn_bwd_args(p, key_mask, d, &s);
    Launch::new(ATTN_BWD_DQ_TC_BF16, blocks, ATTN_THREADS, args)
        .with_shared_f32(attn_bwd_tc_dq_smem(s.head_dim))
}

/// `attn_bwd_dkdv_tc_bf16`, the tensor-core dK/dV with `attn_bwd_dkdv_bf16`'s arguments and
/// results: one block per [`ATTN_TC_BQ`] keys of a (sequence, key/value head); D from
/// [`attn_bwd_dot`]. Panics unless HD is one of [`ATTN_TC_HEAD_DIMS`].
pub fn attn_bwd_dkdv_tc(p: AttnBwdPtrs, key_mask: DevPtr, d: DevPtr, s: AttnShape) -> Launch {
    check_tc_head_dim(ATTN_BWD_DKDV_TC_BF16, s.head_dim);
    let blocks = s.b * s.n_kv_head * s.t.div_ceil(ATTN_TC_BQ);
    let args = attn_bwd_args(p, key_mask, d, &s);
    Launch::new(ATTN_BWD_DKDV_TC_BF16, blocks, ATTN_THREADS, args)
        .with_shared_f32(attn_bwd_tc_dkdv_smem(s.head_dim))
}

/// Pointers of the norm forwards: (N, C) input and output, (C) weight and bias, (N) statistics.
#[derive(Clone, Copy, Debug)]
pub struct NormFwdPtrs {
    /// (N, C).
    pub inp: DevPtr,
    /// (C).
    pub w: DevPtr,
    /// (C); LayerNorm only.
    pub b: DevPtr,
    /// (N, C), written.
    pub out: DevPtr,
    /// (N), written; LayerNorm only.
    pub mean: DevPtr,
    /// (N), written.
    pub rstd: DevPtr,
}

/// `rmsnorm_fwd_f32(inp, w, C, eps, out, rstd)`: one block per row.
pub fn rmsnorm_fwd(p: NormFwdPtrs, n: usize, c: usize, eps: f32) -> Launch {
    let args = vec![
        Arg::Ptr(p.inp),
        Arg::Ptr(p.w),
        int(c, "C"),
        Arg::F32(eps),
        Arg::Ptr(p.out),
        Arg::Ptr(p.rstd),
    ];
    Launch::new(RMSNORM_FWD_F32, n, NORM_BLOCK, args)
}

/// `layernorm_fwd_f32(inp, w, b, C, eps, out, mean, rstd)`: one block per row.
pub fn layernorm_fwd(p: NormFwdPtrs, n: usize, c: usize, eps: f32) -> Launch {
    let args = vec![
        Arg::Ptr(p.inp),
        Arg::Ptr(p.w),
        Arg::Ptr(p.b),
        int(c, "C"),
        Arg::F32(eps),
        Arg::Ptr(p.out),
        Arg::Ptr(p.mean),
        Arg::Ptr(p.rstd),
    ];
    Launch::new(LAYERNORM_FWD_F32, n, NORM_BLOCK, args)
}

/// Pointers of the norm backwards.
#[derive(Clone, Copy, Debug)]
pub struct NormBwdPtrs {
    /// (N, C), added to.
    pub dinp: DevPtr,
    /// (C), added to.
    pub dw: DevPtr,
    /// (N, C).
    pub dout: DevPtr,
    /// (N, C).
    pub inp: DevPtr,
    /// (C).
    pub w: DevPtr,
    /// (N) from the forward; null for RMSNorm.
    pub mean: DevPtr,
    /// (N) from the forward.
    pub rstd: DevPtr,
}

/// `rmsnorm_bwd_dx_f32(dout, inp, w, rstd, C, dinp)` or, with a mean,
/// `layernorm_bwd_dx_f32(dout, inp, w, mean, rstd, C, dinp)`: one block per row.
pub fn norm_bwd_dx(p: NormBwdPtrs, n: usize, c: usize) -> Launch {
    let mut args = vec![Arg::Ptr(p.dout), Arg::Ptr(p.inp), Arg::Ptr(p.w)];
    let kernel = if p.mean == DevPtr::NULL {
        RMSNORM_BWD_DX_F32
    } else {
        args.push(Arg::Ptr(p.mean));
        LAYERNORM_BWD_DX_F32
    };
    args.extend([Arg::Ptr(p.rstd), int(c, "C"), Arg::Ptr(p.dinp)]);
    Launch::new(kernel, n, NORM_BLOCK, args)
}

/// Row chunks of the weight gradient: rows of (C) f32 partials `norm_dw_partial_f32` writes.
pub fn norm_dw_chunks(n: usize) -> usize {
    n.div_ceil(NORM_DW_ROWS)
}

/// `norm_dw_partial_f32(dout, inp, mean, rstd, N, C, partials)`: one block per
/// ([`NORM_DW_ROWS`] rows, [`NORM_BLOCK`] columns); partials is ([`norm_dw_chunks`], C) f32.
pub fn norm_dw_partial(p: NormBwdPtrs, n: usize, c: usize, partials: DevPtr) -> Launch {
    let args = vec![
        Arg::Ptr(p.dout),
        Arg::Ptr(p.inp),
        Arg::Ptr(p.mean),
        Arg::Ptr(p.rstd),
        int(n, "N"),
        int(c, "C"),
        Arg::Ptr(partials),
    ];
    let blocks = norm_dw_chunks(n) * c.div_ceil(NORM_BLOCK as usize);
    Launch::new(NORM_DW_PARTIAL_F32, blocks, NORM_BLOCK, args)
}

/// `norm_dw_sum_f32(partials, chunks, C, dw)`: one thread per column, dw added to.
pub fn norm_dw_sum(p: NormBwdPtrs, n: usize, c: usize, partials: DevPtr) -> Launch {
    let args = vec![
        Arg::Ptr(partials),
        int(norm_dw_chunks(n), "chunks"),
        int(c, "C"),
        Arg::Ptr(p.dw),
    ];
    Launch::new(
        NORM_DW_SUM_F32,
        c.div_ceil(NORM_BLOCK as usize),
        NORM_BLOCK,
        args,
    )
}
