//! The loss family, the log-prob ops, attention and the norms driven through the kernels: which kernels run
//! in which order, the scratch they share (row counts, per-row partial sums, attention's D,
//! results) and the few numbers read back. Generic over the [`Launcher`], so the emulated backend
//! and a device backend run exactly this code and differ only in how a [`Launch`] reaches the
//! kernel.
//!
//! Every driver checks each view's length against the op's shapes (with the CPU reference's
//! messages) before it launches anything: a kernel trusts its sizes, so this is what makes the
//! launches sound.

use super::matmul::Gemm;
use super::plan::{self, AttnDtype, AttnKernel, DevPtr, Dtype, Launch, Whiten};
use crate::backend::loss::{
    Advantages, Aggregation, BtCfg, BtGrad, BtStats, DpoCfg, DpoGrad, DpoInputs, DpoLoss,
    DpoOutputs, DpoStats, GaeCfg, Grad, GroupAdvCfg, GroupAdvStats, GroupBaseline, KlEstimator,
    KlInputs, KlRewardCfg, PolicyLossCfg, PolicyLossGrad, PolicyLossInputs, PolicyLossStats, Rows,
    ValueLossCfg, ValueLossInputs, ValueLossStats,
};
use crate::backend::{AttnShape, Backend};

/// A kernel launch, or the device work around it (an allocation, a copy), that failed.
#[derive(Debug, thiserror::Error)]
#[error("{kernel}: {msg}")]
pub struct KernelError {
    /// The kernel's name, or the operation that failed (`device memory`, `copy to host`).
    pub kernel: &'static str,
    /// What went wrong, as the launcher reports it.
    pub msg: String,
}

/// What the drivers need from a backend: addresses and lengths of its views, a little scratch
/// memory, and launches.
///
/// # Safety
///
/// Implementors promise that `ptr(v)` addresses `view_len(v)` f32 values readable while `v` is
/// borrowed, that `ptr_mut(v)` addresses `view_mut_len(v)` f32 values readable and writable while
/// `v` is borrowed, and that `scratch_ptr(s)` addresses the whole of `s` (`len` 8-byte words),
/// all of it kept alive until the work queued on it is done. The drivers check lengths against
/// these and rely on them for their launches to be sound.
pub unsafe trait Launcher: Backend {
    /// Scratch memory of 8-byte words: f64 values, or packed u32 token ids.
    type Scratch;

    /// The address of a view's first element.
    fn ptr(&self, v: Self::View<'_>) -> DevPtr;
    /// The address of a writable view's first element.
    fn ptr_mut(&self, v: &mut Self::ViewMut<'_>) -> DevPtr;
    /// Elements in a view.
    fn view_len(&self, v: Self::View<'_>) -> usize;
    /// Elements in a writable view.
    fn view_mut_len(&self, v: &Self::ViewMut<'_>) -> usize;
    /// `len` zeroed f64 values.
    fn scratch(&self, len: usize) -> Result<Self::Scratch, KernelError>;
    /// A copy of host u32 values (token ids).
    fn scratch_u32(&self, data: &[u32]) -> Result<Self::Scratch, KernelError>;
    /// The address of scratch memory.
    fn scratch_ptr(&self, s: &Self::Scratch) -> DevPtr;
    /// The first `len` f64 values of scratch memory, once the work queued before is done.
    fn read_f64(&self, s: &Self::Scratch, len: usize) -> Result<Vec<f64>, KernelError>;
    /// Waits until all work queued so far is done (a no-op where launches run to completion),
    /// so that a host clock can time launches.
    fn synchronize(&self) -> Result<(), KernelError>;
    /// Queues a launch; an empty grid ([`Launch::is_empty`]) runs nothing.
    ///
    /// # Safety
    ///
    /// Every pointer argument addresses memory valid for every access the kernel makes with the
    /// launch's other arguments.
    unsafe fn launch(&self, l: &Launch) -> Result<(), KernelError>;
    /// Queues a GEMM as cuBLAS runs it with f32 operands and `CUBLAS_COMPUTE_32F_FAST_16BF`
    /// (operands rounded to bf16, f32 accumulation); a description with no element of C
    /// ([`Gemm::is_empty`]) runs nothing, and one cuBLAS would reject is an error.
    ///
    /// # Safety
    ///
    /// `g.a`, `g.b` and `g.c` address f32 memory holding [`Gemm::extent_a`],
    /// [`Gemm::extent_b`] and [`Gemm::extent_c`] elements, valid until the GEMM is done, with C
    /// writable and overlapping neither A nor B.
    unsafe fn gemm(&self, g: &Gemm) -> Result<(), KernelError>;
}

/// Panics unless a view holds `want` elements (a caller's bug, as on the CPU backend).
pub(crate) fn check_len(what: &str, got: usize, want: usize) {
    assert_eq!(got, want, "{what}: {got} elements, expected {want}");
}

pub(crate) fn input<B: Launcher>(be: &B, v: B::View<'_>, want: usize, what: &str) -> DevPtr {
    check_len(what, be.view_len(v), want);
    be.ptr(v)
}

pub(crate) fn opt_input<B: Launcher>(
    be: &B,
    v: Option<B::View<'_>>,
    want: usize,
    what: &str,
) -> DevPtr {
    v.map_or(DevPtr::NULL, |v| input(be, v, want, what))
}

pub(crate) fn output<B: Launcher>(
    be: &B,
    v: &mut B::ViewMut<'_>,
    want: usize,
    what: &str,
) -> DevPtr {
    check_len(what, be.view_mut_len(v), want);
    be.ptr_mut(v)
}

pub(crate) fn opt_output<B: Launcher>(
    be: &B,
    v: &mut Option<B::ViewMut<'_>>,
    want: usize,
    what: &str,
) -> DevPtr {
    v.as_mut()
        .map_or(DevPtr::NULL, |v| output(be, v, want, what))
}

/// The f64 mask sum of each row.
fn row_counts<B: Launcher>(be: &B, mask: DevPtr, rows: Rows) -> Result<B::Scratch, KernelError> {
    let counts = be.scratch(rows.b)?;
    // SAFETY: the caller checked `mask` holds B*T values; `counts` holds B.
    unsafe { be.launch(&plan::row_counts(mask, rows, be.scratch_ptr(&counts)))? };
    Ok(counts)
}

/// Adds `rows` rows of `k` per-row partial sums in row order on the device; reads the k sums.
pub(crate) fn finish<B: Launcher>(
    be: &B,
    partials: &B::Scratch,
    rows: usize,
    k: usize,
) -> Result<Vec<f64>, KernelError> {
    let out = be.scratch(k)?;
    let l = plan::sum_partials(be.scratch_ptr(partials), rows, k, be.scratch_ptr(&out));
    // SAFETY: the caller allocated `partials` with rows*k values; `out` holds k.
    unsafe { be.launch(&l)? };
    be.read_f64(&out, k)
}

/// [`crate::backend::LossOps::masked_row_sum`].
pub fn masked_row_sum<B: Launcher>(
    be: &B,
    mut sums: B::ViewMut<'_>,
    mut counts: Option<B::ViewMut<'_>>,
    x: B::View<'_>,
    mask: B::View<'_>,
    rows: Rows,
) -> Result<(), KernelError> {
    let l = plan::masked_row_sum(
        input(be, x, rows.n(), "masked_row_sum: x"),
        input(be, mask, rows.n(), "masked_row_sum: mask"),
        rows,
        output(be, &mut sums, rows.b, "masked_row_sum: sums"),
        opt_output(be, &mut counts, rows.b, "masked_row_sum: counts"),
    );
    // SAFETY: every length was checked against `rows` above.
    unsafe { be.launch(&l) }
}

/// [`crate::backend::LossOps::masked_row_sum_backward`].
pub fn masked_row_sum_backward<B: Launcher>(
    be: &B,
    mut dx: B::ViewMut<'_>,
    dsums: B::View<'_>,
    mask: B::View<'_>,
    rows: Rows,
) -> Result<(), KernelError> {
    let l = plan::masked_row_sum_bwd(
        output(be, &mut dx, rows.n(), "masked_row_sum_backward: dx"),
        input(be, dsums, rows.b, "masked_row_sum_backward: dsums"),
        input(be, mask, rows.n(), "masked_row_sum_backward: mask"),
        rows,
    );
    // SAFETY: every length was checked against `rows` above.
    unsafe { be.launch(&l) }
}

/// [`crate::backend::LossOps::kl`].
pub fn kl<B: Launcher>(
    be: &B,
    x: &KlInputs<'_, B>,
    est: KlEstimator,
    agg: Aggregation,
    mut per_token: Option<B::ViewMut<'_>>,
    grad: Option<Grad<'_, B>>,
) -> Result<f64, KernelError> {
    let (rows, n) = (x.rows, x.rows.n());
    let (mut dx, dloss) = match grad {
        Some(g) => (Some(g.dx), g.dloss),
        None => (None, 0.0),
    };
    let mask = input(be, x.mask, n, "kl: mask");
    let counts = row_counts(be, mask, rows)?;
    let partials = be.scratch(rows.b)?;
    let p = plan::KlPtrs {
        logp: input(be, x.logp, n, "kl: logp"),
        logp_ref: input(be, x.logp_ref, n, "kl: logp_ref"),
        mask,
        counts: be.scratch_ptr(&counts),
        per_token: opt_output(be, &mut per_token, n, "kl: per_token"),
        dx: opt_output(be, &mut dx, n, "kl: dx"),
        partials: be.scratch_ptr(&partials),
    };
    // SAFETY: every length was checked against `rows` above; the scratch holds B values each.
    unsafe { be.launch(&plan::kl(p, rows, est, agg, dloss))? };
    Ok(finish(be, &partials, rows.b, 1)?[0])
}

/// [`crate::backend::LossOps::policy_loss`].
pub fn policy_loss<B: Launcher>(
    be: &B,
    x: &PolicyLossInputs<'_, B>,
    cfg: &PolicyLossCfg,
    mut per_token: Option<B::ViewMut<'_>>,
    grad: Option<PolicyLossGrad<'_, B>>,
) -> Result<PolicyLossStats, KernelError> {
    let (rows, n) = (x.rows, x.rows.n());
    assert!(
        cfg.kl_coef == 0.0 || x.logp_ref.is_some(),
        "kl_coef != 0 needs logp_ref"
    );
    assert!(
        cfg.entropy_coef == 0.0 || x.entropy.is_some(),
        "entropy_coef != 0 needs entropy"
    );
    let (adv, adv_per_seq) = match x.advantages {
        Advantages::PerToken(a) => (input(be, a, n, "policy_loss: advantages"), false),
        Advantages::PerSequence(a) => (input(be, a, rows.b, "policy_loss: advantages"), true),
    };
    let (mut dlogp, mut dentropy, dloss) = match grad {
        Some(g) => (Some(g.dlogp), g.dentropy, g.dloss),
        None => (None, None, 0.0),
    };
    let mask = input(be, x.mask, n, "policy_loss: mask");
    let counts = row_counts(be, mask, rows)?;
    let partials = be.scratch(rows.b * plan::POLICY_PARTIALS)?;
    let p = plan::PolicyPtrs {
        logp: input(be, x.logp, n, "policy_loss: logp"),
        logp_old: input(be, x.logp_old, n, "policy_loss: logp_old"),
        adv,
        adv_per_seq,
        logp_ref: opt_input(be, x.logp_ref, n, "policy_loss: logp_ref"),
        entropy: opt_input(be, x.entropy, n, "policy_loss: entropy"),
        mask,
        counts: be.scratch_ptr(&counts),
        per_token: opt_output(be, &mut per_token, n, "policy_loss: per_token"),
        dlogp: opt_output(be, &mut dlogp, n, "policy_loss: dlogp"),
        dentropy: opt_output(be, &mut dentropy, n, "policy_loss: dentropy"),
        partials: be.scratch_ptr(&partials),
        is_weight: opt_input(be, x.is_weight, n, "policy_loss: is_weight"),
    };
    // SAFETY: every length was checked against `rows` above; the scratch holds B counts and
    // B*POLICY_PARTIALS partial sums.
    unsafe { be.launch(&plan::policy_loss(p, rows, cfg, dloss))? };
    let s = finish(be, &partials, rows.b, plan::POLICY_PARTIALS)?;
    let tokens = s[6];
    let denom = tokens.max(1.0);
    Ok(PolicyLossStats {
        loss: s[0],
        clipfrac: s[1] / denom,
        dual_clipfrac: s[2] / denom,
        approx_kl: s[3] / denom,
        kl: s[4] / denom,
        entropy: s[5] / denom,
        tokens,
    })
}

/// [`crate::backend::LossOps::value_loss`].
pub fn value_loss<B: Launcher>(
    be: &B,
    x: &ValueLossInputs<'_, B>,
    cfg: &ValueLossCfg,
    mut per_token: Option<B::ViewMut<'_>>,
    grad: Option<Grad<'_, B>>,
) -> Result<ValueLossStats, KernelError> {
    let (rows, n) = (x.rows, x.rows.n());
    let (mut dx, dloss) = match grad {
        Some(g) => (Some(g.dx), g.dloss),
        None => (None, 0.0),
    };
    let mask = input(be, x.mask, n, "value_loss: mask");
    let counts = row_counts(be, mask, rows)?;
    let partials = be.scratch(rows.b * plan::VALUE_PARTIALS)?;
    let p = plan::ValuePtrs {
        values: input(be, x.values, n, "value_loss: values"),
        values_old: input(be, x.values_old, n, "value_loss: values_old"),
        returns: input(be, x.returns, n, "value_loss: returns"),
        mask,
        counts: be.scratch_ptr(&counts),
        per_token: opt_output(be, &mut per_token, n, "value_loss: per_token"),
        dx: opt_output(be, &mut dx, n, "value_loss: dx"),
        partials: be.scratch_ptr(&partials),
    };
    // SAFETY: every length was checked against `rows` above; the scratch holds B counts and
    // B*VALUE_PARTIALS partial sums.
    unsafe { be.launch(&plan::value_loss(p, rows, cfg, dloss))? };
    let s = finish(be, &partials, rows.b, plan::VALUE_PARTIALS)?;
    Ok(ValueLossStats {
        loss: s[0],
        clipfrac: s[1] / s[2].max(1.0),
        tokens: s[2],
    })
}

/// [`crate::backend::LossOps::kl_shaped_rewards`].
#[allow(clippy::too_many_arguments)]
pub fn kl_shaped_rewards<B: Launcher>(
    be: &B,
    mut rewards: B::ViewMut<'_>,
    logp: B::View<'_>,
    logp_ref: B::View<'_>,
    scores: B::View<'_>,
    mask: B::View<'_>,
    rows: Rows,
    cfg: &KlRewardCfg,
) -> Result<(), KernelError> {
    let n = rows.n();
    let p = plan::KlRewardsPtrs {
        logp: input(be, logp, n, "kl_shaped_rewards: logp"),
        logp_ref: input(be, logp_ref, n, "kl_shaped_rewards: logp_ref"),
        scores: input(be, scores, rows.b, "kl_shaped_rewards: scores"),
        mask: input(be, mask, n, "kl_shaped_rewards: mask"),
        rewards: output(be, &mut rewards, n, "kl_shaped_rewards: rewards"),
    };
    // SAFETY: every length was checked against `rows` above.
    unsafe { be.launch(&plan::kl_rewards(p, rows, cfg.estimator, cfg.kl_coef)) }
}

/// [`crate::backend::LossOps::gae`]: the scan, then (if asked) whitening in place.
#[allow(clippy::too_many_arguments)]
pub fn gae<B: Launcher>(
    be: &B,
    mut advantages: B::ViewMut<'_>,
    mut returns: B::ViewMut<'_>,
    rewards: B::View<'_>,
    values: B::View<'_>,
    mask: B::View<'_>,
    rows: Rows,
    cfg: &GaeCfg,
) -> Result<(), KernelError> {
    let n = rows.n();
    let adv = output(be, &mut advantages, n, "gae: advantages");
    let mask = input(be, mask, n, "gae: mask");
    let l = plan::gae(
        input(be, rewards, n, "gae: rewards"),
        input(be, values, n, "gae: values"),
        mask,
        rows,
        cfg.gamma,
        cfg.lam,
        adv,
        output(be, &mut returns, n, "gae: returns"),
    );
    // SAFETY: every length was checked against `rows` above.
    unsafe { be.launch(&l)? };
    if cfg.whiten {
        // SAFETY: as above; the kernel may whiten in place.
        unsafe { be.launch(&plan::masked_whiten(adv, mask, n, Whiten::UnbiasedVar, adv))? };
    }
    Ok(())
}

/// [`crate::backend::LossOps::reinforce_pp`]: discounted returns, then advantages whitened from
/// them.
pub fn reinforce_pp<B: Launcher>(
    be: &B,
    mut advantages: B::ViewMut<'_>,
    mut returns: B::ViewMut<'_>,
    rewards: B::View<'_>,
    mask: B::View<'_>,
    rows: Rows,
    gamma: f32,
) -> Result<(), KernelError> {
    let n = rows.n();
    let ret = output(be, &mut returns, n, "reinforce_pp: returns");
    let mask = input(be, mask, n, "reinforce_pp: mask");
    let l = plan::discounted_returns(
        input(be, rewards, n, "reinforce_pp: rewards"),
        mask,
        rows,
        gamma,
        ret,
    );
    let adv = output(be, &mut advantages, n, "reinforce_pp: advantages");
    // SAFETY: every length was checked against `rows` above.
    unsafe {
        be.launch(&l)?;
        be.launch(&plan::masked_whiten(
            ret,
            mask,
            n,
            Whiten::PopulationStd,
            adv,
        ))
    }
}

/// [`crate::backend::LossOps::group_advantages`].
pub fn group_advantages<B: Launcher>(
    be: &B,
    mut advantages: B::ViewMut<'_>,
    mut baseline: Option<B::ViewMut<'_>>,
    mut group_std: Option<B::ViewMut<'_>>,
    rewards: B::View<'_>,
    n: usize,
    cfg: &GroupAdvCfg,
) -> Result<GroupAdvStats, KernelError> {
    let g = cfg.group;
    assert!(
        g > 0 && n.is_multiple_of(g),
        "{n} rewards do not split into groups of {g}"
    );
    assert!(
        g > 1 || cfg.baseline != GroupBaseline::LeaveOneOut,
        "leave-one-out needs groups of at least 2"
    );
    let stats = be.scratch(1)?;
    let p = plan::GroupAdvPtrs {
        rewards: input(be, rewards, n, "group_advantages: rewards"),
        adv: output(be, &mut advantages, n, "group_advantages: advantages"),
        baseline: opt_output(be, &mut baseline, n, "group_advantages: baseline"),
        group_std: opt_output(be, &mut group_std, n, "group_advantages: group_std"),
        stats: be.scratch_ptr(&stats),
    };
    // SAFETY: every length was checked against `n` above; `stats` holds one value.
    unsafe { be.launch(&plan::group_adv(p, n, cfg))? };
    Ok(GroupAdvStats {
        frac_zero_std: be.read_f64(&stats, 1)?[0],
    })
}

/// [`crate::backend::LossOps::bt_loss`].
pub fn bt_loss<B: Launcher>(
    be: &B,
    chosen: B::View<'_>,
    rejected: B::View<'_>,
    margin: Option<B::View<'_>>,
    p: usize,
    cfg: &BtCfg,
    grad: Option<BtGrad<'_, B>>,
) -> Result<BtStats, KernelError> {
    let (mut dchosen, mut drejected, dloss) = match grad {
        Some(g) => (Some(g.dchosen), Some(g.drejected), g.dloss),
        None => (None, None, 0.0),
    };
    let stats = be.scratch(plan::BT_STATS)?;
    let ptrs = plan::BtPtrs {
        chosen: input(be, chosen, p, "bt_loss: chosen"),
        rejected: input(be, rejected, p, "bt_loss: rejected"),
        margin: opt_input(be, margin, p, "bt_loss: margin"),
        dchosen: opt_output(be, &mut dchosen, p, "bt_loss: dchosen"),
        drejected: opt_output(be, &mut drejected, p, "bt_loss: drejected"),
        stats: be.scratch_ptr(&stats),
    };
    // SAFETY: every length was checked against `p` above; `stats` holds BT_STATS values.
    unsafe { be.launch(&plan::bt_loss(ptrs, p, cfg.center_coef, dloss))? };
    let s = be.read_f64(&stats, plan::BT_STATS)?;
    Ok(BtStats {
        loss: s[0],
        accuracy: s[1],
        margin: s[2],
    })
}

/// [`crate::backend::LossOps::dpo_loss`].
pub fn dpo_loss<B: Launcher>(
    be: &B,
    x: &DpoInputs<'_, B>,
    cfg: &DpoCfg,
    mut out: DpoOutputs<'_, B>,
    grad: Option<DpoGrad<'_, B>>,
) -> Result<DpoStats, KernelError> {
    let p = x.pairs;
    let (chosen_len, rejected_len) = if cfg.loss == DpoLoss::Ipo {
        let (lc, lr) = x
            .chosen_len
            .zip(x.rejected_len)
            .expect("IPO needs chosen_len and rejected_len");
        (
            input(be, lc, p, "dpo_loss: chosen_len"),
            input(be, lr, p, "dpo_loss: rejected_len"),
        )
    } else {
        (DevPtr::NULL, DevPtr::NULL)
    };
    let (mut dchosen, mut drejected, dloss) = match grad {
        Some(g) => (Some(g.dchosen), Some(g.drejected), g.dloss),
        None => (None, None, 0.0),
    };
    let stats = be.scratch(plan::DPO_STATS)?;
    let ptrs = plan::DpoPtrs {
        policy_chosen: input(be, x.policy_chosen, p, "dpo_loss: policy_chosen"),
        policy_rejected: input(be, x.policy_rejected, p, "dpo_loss: policy_rejected"),
        ref_chosen: input(be, x.ref_chosen, p, "dpo_loss: ref_chosen"),
        ref_rejected: input(be, x.ref_rejected, p, "dpo_loss: ref_rejected"),
        chosen_len,
        rejected_len,
        losses: opt_output(be, &mut out.losses, p, "dpo_loss: losses"),
        chosen_rewards: opt_output(be, &mut out.chosen_rewards, p, "dpo_loss: chosen_rewards"),
        rejected_rewards: opt_output(
            be,
            &mut out.rejected_rewards,
            p,
            "dpo_loss: rejected_rewards",
        ),
        dchosen: opt_output(be, &mut dchosen, p, "dpo_loss: dchosen"),
        drejected: opt_output(be, &mut drejected, p, "dpo_loss: drejected"),
        stats: be.scratch_ptr(&stats),
    };
    // SAFETY: every length was checked against `p` above; `stats` holds DPO_STATS values.
    unsafe { be.launch(&plan::dpo_loss(ptrs, p, cfg, dloss))? };
    let s = be.read_f64(&stats, plan::DPO_STATS)?;
    Ok(DpoStats {
        loss: s[0],
        accuracy: s[1],
        margin: s[2],
        chosen_reward: s[3],
        rejected_reward: s[4],
    })
}

/// Panics unless every target indexes the vocabulary and the temperature is usable (the CPU op's
/// checks: a kernel would read out of bounds instead).
pub(crate) fn check_logprob_args(op: &str, targets: &[u32], n: usize, v: usize, temperature: f32) {
    check_len(&format!("{op}: targets"), targets.len(), n);
    assert!(
        temperature > 0.0 && temperature.is_finite(),
        "{op}: temperature {temperature} must be positive"
    );
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        panic!("{op}: target {bad} is outside the vocabulary of {v}");
    }
}

/// `ModelOps::logprobs_forward` for f32, bf16 or f16 logits; the host target ids are uploaded
/// here.
///
/// # Safety
///
/// The pointers must address the tensors [`plan::LogprobFwdPtrs`] documents, for `n` rows of `v`
/// logits of type `dtype`, valid for the launch.
pub unsafe fn logprobs_forward<L: Launcher>(
    l: &L,
    dtype: Dtype,
    p: plan::LogprobFwdPtrs,
    targets: &[u32],
    n: usize,
    v: usize,
    temperature: f32,
) -> Result<(), KernelError> {
    check_logprob_args("logprobs_forward", targets, n, v, temperature);
    let t = l.scratch_u32(targets)?;
    let launch = plan::logprob_fwd(dtype, p, l.scratch_ptr(&t), n, v, temperature);
    // SAFETY: the caller vouches for the tensors; the N targets are uploaded and all < V.
    unsafe { l.launch(&launch) }
}

/// `ModelOps::logprobs_backward` for f32, bf16 or f16 logits and logit gradients (added to);
/// the host target ids are uploaded here.
///
/// # Safety
///
/// The pointers must address the tensors [`plan::LogprobBwdPtrs`] documents, for `n` rows of `v`
/// logits of type `dtype`, valid for the launch.
pub unsafe fn logprobs_backward<L: Launcher>(
    l: &L,
    dtype: Dtype,
    p: plan::LogprobBwdPtrs,
    targets: &[u32],
    n: usize,
    v: usize,
    temperature: f32,
) -> Result<(), KernelError> {
    check_logprob_args("logprobs_backward", targets, n, v, temperature);
    let t = l.scratch_u32(targets)?;
    let launch = plan::logprob_bwd(dtype, p, l.scratch_ptr(&t), n, v, temperature);
    // SAFETY: the caller vouches for the tensors; the N targets are uploaded and all < V.
    unsafe { l.launch(&launch) }
}

/// Panics unless the attention kernels take this shape and mask (a kernel would read out of
/// bounds instead): whole query groups per key/value head, as the CPU op demands, a head dim
/// within [`plan::ATTN_MAX_HEAD_DIM`] (a lane holds four dims of each accumulator row), and one
/// mask flag per key.
pub(crate) fn check_attention(op: &str, s: &AttnShape, mask: usize, keys: usize) {
    assert!(
        s.n_kv_head > 0 && s.n_head.is_multiple_of(s.n_kv_head),
        "{op}: n_head {} is not a multiple of n_kv_head {}",
        s.n_head,
        s.n_kv_head
    );
    assert!(
        s.head_dim <= plan::ATTN_MAX_HEAD_DIM,
        "{op}: head_dim {} above the kernels' {}",
        s.head_dim,
        plan::ATTN_MAX_HEAD_DIM
    );
    check_len(&format!("{op}: key_mask"), mask, keys);
}

/// True when an attention op has nothing to compute, where the CPU op returns at once: no query,
/// no head, or an empty head (on which the kernels would divide by zero).
pub(crate) fn attention_is_empty(s: &AttnShape) -> bool {
    s.b == 0 || s.t == 0 || s.n_head == 0 || s.head_dim == 0
}

/// Key flags as the kernels read them: u32 0 (padding) or 1.
pub(crate) fn upload_mask<L: Launcher>(l: &L, mask: &[bool]) -> Result<L::Scratch, KernelError> {
    l.scratch_u32(&mask.iter().map(|&m| m as u32).collect::<Vec<_>>())
}

/// `ModelOps::attention_forward` for f32 or bf16 activations, on the kernel [`AttnKernel::Auto`]
/// picks (the tensor cores for bf16 at head dims 64 and 128); see [`attention_forward_with`].
///
/// # Safety
///
/// As for [`attention_forward_with`].
pub unsafe fn attention_forward<L: Launcher>(
    l: &L,
    dtype: AttnDtype,
    p: plan::AttnFwdPtrs,
    key_mask: &[bool],
    s: AttnShape,
) -> Result<(), KernelError> {
    // SAFETY: forwarded from the caller.
    unsafe { attention_forward_with(l, dtype, AttnKernel::Auto, p, key_mask, s) }
}

/// `ModelOps::attention_forward` for f32 or bf16 activations on the forward `kernel` selects
/// (both kernels take the same arguments and give the same results); the host key mask (B·T) is
/// uploaded here.
///
/// # Safety
///
/// The pointers must address the tensors [`plan::AttnFwdPtrs`] documents for shape `s`, of type
/// `dtype`, valid for the launch.
pub unsafe fn attention_forward_with<L: Launcher>(
    l: &L,
    dtype: AttnDtype,
    kernel: AttnKernel,
    p: plan::AttnFwdPtrs,
    key_mask: &[bool],
    s: AttnShape,
) -> Result<(), KernelError> {
    check_attention("attention_forward", &s, key_mask.len(), s.b * s.t);
    if attention_is_empty(&s) {
        return Ok(());
    }
    let mask = upload_mask(l, key_mask)?;
    let mask = l.scratch_ptr(&mask);
    let launch = if kernel.uses_tensor_cores(dtype, s.head_dim) {
        plan::attn_fwd_tc(p, mask, s)
    } else {
        plan::attn_fwd(dtype, p, mask, s)
    };
    // SAFETY: the caller vouches for the tensors; the shape was checked above (the tensor-core
    // plan checks its head dim) and the B·T mask flags are uploaded.
    unsafe { l.launch(&launch) }
}

/// `ModelOps::attention_backward` for f32 or bf16 activations (dqkv is added to), on the kernels
/// [`AttnKernel::Auto`] picks; see [`attention_backward_with`].
///
/// # Safety
///
/// As for [`attention_backward_with`].
pub unsafe fn attention_backward<L: Launcher>(
    l: &L,
    dtype: AttnDtype,
    p: plan::AttnBwdPtrs,
    key_mask: &[bool],
    s: AttnShape,
) -> Result<(), KernelError> {
    // SAFETY: forwarded from the caller.
    unsafe { attention_backward_with(l, dtype, AttnKernel::Auto, p, key_mask, s) }
}

/// `ModelOps::attention_backward` for f32 or bf16 activations (dqkv is added to) on the kernels
/// `kernel` selects: D, then dq, then dk and dv. The host key mask (B·T) is uploaded here, and D
/// kept in scratch memory.
///
/// # Safety
///
/// The pointers must address the tensors [`plan::AttnBwdPtrs`] documents for shape `s`, of type
/// `dtype`, valid for the launches.
pub unsafe fn attention_backward_with<L: Launcher>(
    l: &L,
    dtype: AttnDtype,
    kernel: AttnKernel,
    p: plan::AttnBwdPtrs,
    key_mask: &[bool],
    s: AttnShape,
) -> Result<(), KernelError> {
    check_attention("attention_backward", &s, key_mask.len(), s.b * s.t);
    if attention_is_empty(&s) {
        return Ok(());
    }
    let mask = upload_mask(l, key_mask)?;
    // D, (B, NH, T) f32: two values to an 8-byte scratch word.
    let d = l.scratch((s.b * s.n_head * s.t).div_ceil(2))?;
    let (mask, d) = (l.scratch_ptr(&mask), l.scratch_ptr(&d));
    let (dq, dkdv) = if kernel.uses_tensor_cores(dtype, s.head_dim) {
        (
            plan::attn_bwd_dq_tc(p, mask, d, s),
            plan::attn_bwd_dkdv_tc(p, mask, d, s),
        )
    } else {
        (
            plan::attn_bwd_dq(dtype, p, mask, d, s),
            plan::attn_bwd_dkdv(dtype, p, mask, d, s),
        )
    };
    // SAFETY: the caller vouches for the tensors; the shape was checked above (the tensor-core
    // plans check their head dim), the B·T mask flags are uploaded, and the scratch holds B·NH·T
    // f32 values for D, which the first launch writes whole before the others read it (launches
    // run in order).
    unsafe {
        l.launch(&plan::attn_bwd_dot(dtype, p, s, d))?;
        l.launch(&dq)?;
        l.launch(&dkdv)
    }
}

/// `DecodeOps::attention_decode` for f32 or bf16 activations and cache: cache columns `0..len` of
/// `t_max`; the host key mask (B·TMAX) is uploaded here.
///
/// # Safety
///
/// The pointers must address the tensors [`plan::AttnDecodePtrs`] documents for shape `s` and
/// `t_max`, of type `dtype`, valid for the launch.
pub unsafe fn attention_decode<L: Launcher>(
    l: &L,
    dtype: AttnDtype,
    p: plan::AttnDecodePtrs,
    key_mask: &[bool],
    s: AttnShape,
    len: usize,
    t_max: usize,
) -> Result<(), KernelError> {
    check_attention("attention_decode", &s, key_mask.len(), s.b * t_max);
    assert!(
        len <= t_max,
        "attention_decode: cache length {len} beyond the cache's {t_max}"
    );
    if s.b == 0 || s.n_head == 0 || s.head_dim == 0 {
        return Ok(());
    }
    let mask = upload_mask(l, key_mask)?;
    let launch = plan::attn_decode(dtype, p, l.scratch_ptr(&mask), s, len, t_max);
    // SAFETY: the caller vouches for the tensors; the shape was checked above, `len` is within
    // the cache and the B·TMAX mask flags are uploaded.
    unsafe { l.launch(&launch) }
}

/// `ModelOps::rmsnorm_forward` (`p.mean` and `p.b` unused) or, with `layer`,
/// `ModelOps::layernorm_forward`: one launch, one block per row.
///
/// # Safety
///
/// The pointers must address the tensors [`plan::NormFwdPtrs`] documents for `n` rows of `c`
/// values, valid for the launch.
pub unsafe fn norm_forward<L: Launcher>(
    l: &L,
    layer: bool,
    p: plan::NormFwdPtrs,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<(), KernelError> {
    if n == 0 || c == 0 {
        return Ok(());
    }
    let launch = if layer {
        plan::layernorm_fwd(p, n, c, eps)
    } else {
        plan::rmsnorm_fwd(p, n, c, eps)
    };
    // SAFETY: the caller vouches for the tensors.
    unsafe { l.launch(&launch) }
}

/// `ModelOps::rmsnorm_backward` (`p.mean` null) or `ModelOps::layernorm_backward`: dinp and dw
/// are added to. dinp one block per row; dw through per-chunk partials in scratch memory, added
/// in chunk order (no atomics, so the same bits every run).
///
/// # Safety
///
/// The pointers must address the tensors [`plan::NormBwdPtrs`] documents for `n` rows of `c`
/// values, valid for the launches.
pub unsafe fn norm_backward<L: Launcher>(
    l: &L,
    p: plan::NormBwdPtrs,
    n: usize,
    c: usize,
) -> Result<(), KernelError> {
    if n == 0 || c == 0 {
        return Ok(());
    }
    // (chunks, C) f32 partials: two values to an 8-byte scratch word.
    let partials = l.scratch((plan::norm_dw_chunks(n) * c).div_ceil(2))?;
    let partials = l.scratch_ptr(&partials);
    // SAFETY: the caller vouches for the tensors; the scratch holds chunks·C f32 partials, which
    // the second launch writes whole before the third reads them (launches run in order).
    unsafe {
        l.launch(&plan::norm_bwd_dx(p, n, c))?;
        l.launch(&plan::norm_dw_partial(p, n, c, partials))?;
        l.launch(&plan::norm_dw_sum(p, n, c, partials))
    }
}

/// `impl LossOps for $ty` by the drivers of this module, with `$ty` as the launcher; a launch
/// failure panics, as the trait's ops are infallible. `[$($gen)*]` holds the impl's generic
/// parameters, if any: `loss_ops_via_launcher!([] Emu)`, `loss_ops_via_launcher!([L: Launcher]
/// Metered<L>)`. One expansion for every launcher, so the backends cannot drift apart.
#[macro_export]
#[doc(hidden)]
macro_rules! loss_ops_via_launcher {
    ([$($gen:tt)*] $ty:ty) => {
        impl<$($gen)*> $crate::backend::LossOps for $ty {
            fn masked_row_sum(
                &self,
                sums: Self::ViewMut<'_>,
                counts: Option<Self::ViewMut<'_>>,
                x: Self::View<'_>,
                mask: Self::View<'_>,
                rows: $crate::backend::loss::Rows,
            ) {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::ops::masked_row_sum(
                    self, sums, counts, x, mask, rows,
                ))
            }

            fn masked_row_sum_backward(
                &self,
                dx: Self::ViewMut<'_>,
                dsums: Self::View<'_>,
                mask: Self::View<'_>,
                rows: $crate::backend::loss::Rows,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::ops::masked_row_sum_backward(self, dx, dsums, mask, rows),
                )
            }

            fn kl(
                &self,
                x: &$crate::backend::loss::KlInputs<'_, Self>,
                estimator: $crate::backend::loss::KlEstimator,
                agg: $crate::backend::loss::Aggregation,
                per_token: Option<Self::ViewMut<'_>>,
                grad: Option<$crate::backend::loss::Grad<'_, Self>>,
            ) -> f64 {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::ops::kl(
                    self, x, estimator, agg, per_token, grad,
                ))
            }

            fn policy_loss(
                &self,
                x: &$crate::backend::loss::PolicyLossInputs<'_, Self>,
                cfg: &$crate::backend::loss::PolicyLossCfg,
                per_token: Option<Self::ViewMut<'_>>,
                grad: Option<$crate::backend::loss::PolicyLossGrad<'_, Self>>,
            ) -> $crate::backend::loss::PolicyLossStats {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::ops::policy_loss(
                    self, x, cfg, per_token, grad,
                ))
            }

            fn value_loss(
                &self,
                x: &$crate::backend::loss::ValueLossInputs<'_, Self>,
                cfg: &$crate::backend::loss::ValueLossCfg,
                per_token: Option<Self::ViewMut<'_>>,
                grad: Option<$crate::backend::loss::Grad<'_, Self>>,
            ) -> $crate::backend::loss::ValueLossStats {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::ops::value_loss(
                    self, x, cfg, per_token, grad,
                ))
            }

            fn kl_shaped_rewards(
                &self,
                rewards: Self::ViewMut<'_>,
                logp: Self::View<'_>,
                logp_ref: Self::View<'_>,
                scores: Self::View<'_>,
                mask: Self::View<'_>,
                rows: $crate::backend::loss::Rows,
                cfg: &$crate::backend::loss::KlRewardCfg,
            ) {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::ops::kl_shaped_rewards(
                    self, rewards, logp, logp_ref, scores, mask, rows, cfg,
                ))
            }

            fn gae(
                &self,
                advantages: Self::ViewMut<'_>,
                returns: Self::ViewMut<'_>,
                rewards: Self::View<'_>,
                values: Self::View<'_>,
                mask: Self::View<'_>,
                rows: $crate::backend::loss::Rows,
                cfg: &$crate::backend::loss::GaeCfg,
            ) {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::ops::gae(
                    self, advantages, returns, rewards, values, mask, rows, cfg,
                ))
            }

            fn reinforce_pp(
                &self,
                advantages: Self::ViewMut<'_>,
                returns: Self::ViewMut<'_>,
                rewards: Self::View<'_>,
                mask: Self::View<'_>,
                rows: $crate::backend::loss::Rows,
                gamma: f32,
            ) {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::ops::reinforce_pp(
                    self, advantages, returns, rewards, mask, rows, gamma,
                ))
            }

            fn group_advantages(
                &self,
                advantages: Self::ViewMut<'_>,
                baseline: Option<Self::ViewMut<'_>>,
                group_std: Option<Self::ViewMut<'_>>,
                rewards: Self::View<'_>,
                n: usize,
                cfg: &$crate::backend::loss::GroupAdvCfg,
            ) -> $crate::backend::loss::GroupAdvStats {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::ops::group_advantages(
                    self, advantages, baseline, group_std, rewards, n, cfg,
                ))
            }

            fn bt_loss(
                &self,
                chosen: Self::View<'_>,
                rejected: Self::View<'_>,
                margin: Option<Self::View<'_>>,
                p: usize,
                cfg: &$crate::backend::loss::BtCfg,
                grad: Option<$crate::backend::loss::BtGrad<'_, Self>>,
            ) -> $crate::backend::loss::BtStats {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::ops::bt_loss(
                    self, chosen, rejected, margin, p, cfg, grad,
                ))
            }

            fn dpo_loss(
                &self,
                x: &$crate::backend::loss::DpoInputs<'_, Self>,
                cfg: &$crate::backend::loss::DpoCfg,
                out: $crate::backend::loss::DpoOutputs<'_, Self>,
                grad: Option<$crate::backend::loss::DpoGrad<'_, Self>>,
            ) -> $crate::backend::loss::DpoStats {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::ops::dpo_loss(
                    self, x, cfg, out, grad,
                ))
            }
        }
    };
}

/// A driver's result, or a panic with its error: what the infallible trait ops do on a failed
/// launch (on the emulator a bug in a kernel or a plan; on a device also a lost device or memory
/// exhausted, which a training step cannot recover from either).
pub fn or_panic<T>(r: Result<T, KernelError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}
