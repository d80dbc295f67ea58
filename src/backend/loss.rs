//! The loss family: the RL and preference objectives a training step needs, and the advantage
//! estimators that feed them.
//!
//! Design decisions a reader meets here:
//! - **Token batches are flat**: `B` rows of `T` tokens, row-major (`N = B*T`), with an f32 mask of
//!   the same shape, 1 for a token that counts and 0 for padding ([`Rows`]). A masked-out token is
//!   skipped entirely (never multiplied by 0), so pad positions may hold anything, even NaN.
//!   Per-token outputs are written as 0 on pads.
//! - **A loss and its gradient are one call.** Every loss op takes an optional gradient target; when
//!   given, the gradient is produced in the same pass over the tokens as the loss (DESIGN.md
//!   principle 4: one kernel per op on a GPU, no per-token intermediate kept between a forward and a
//!   backward). Without it the op is the forward alone (evaluation, metrics). Like every backward in
//!   [`super::ModelOps`], gradients are **added** (`d += dloss · ∂loss/∂x`); `dloss` is the upstream
//!   scale (a loss coefficient, 1/accumulation steps, ...).
//! - Scalars (loss, clip fraction, approx-KL, ...) come back as `f64` in small structs: a device
//!   backend reduces them on the device and downloads a handful of numbers. Reductions accumulate in
//!   f64 in a fixed order so results never depend on thread scheduling.
//! - Advantage estimators are forward only: nothing differentiates through them.
//! - Hyper-parameters are plain values in `Copy` structs, never callbacks, so a CUDA backend can
//!   pass them as kernel arguments.
//!
//! Formulas follow TRL (names included: `grpo`, `bnpo`, `dapo`, `dr_grpo`); the fixtures in
//! `shared/fixtures/losses` pin every one of them (`tests/losses_fixtures.rs`).

use super::Backend;

/// Geometry of a flat token batch: `b` rows (sequences) of `t` tokens, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    /// Number of rows (sequences) `B`.
    pub b: usize,
    /// Tokens per row `T` (the padded width).
    pub t: usize,
}

impl Rows {
    /// Number of tokens `N = B*T`.
    pub fn n(&self) -> usize {
        self.b * self.t
    }
}

/// How per-token losses `l[b,t]` are reduced to one scalar; TRL `GRPOConfig.loss_type` names.
/// Every variant is a weighted token sum `Σ w_b · m[b,t] · l[b,t]`; [`Aggregation::row_weight`]
/// gives `w_b`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Aggregation {
    /// Masked mean per sequence, then mean over the `B` rows (TRL `grpo`; original GRPO).
    /// Weights long and short sequences equally, so each token of a short one counts more.
    Grpo,
    /// Masked mean over all tokens of the micro-batch (TRL `bnpo`; legacy PPO's `masked_mean`).
    Bnpo,
    /// Token sum divided by `num_items`, the number of completion tokens of the *whole*
    /// accumulated batch (TRL `dapo`): micro-batch losses then add up to the full-batch token mean,
    /// so gradient accumulation does not change the objective.
    Dapo {
        /// Mask sum over every micro-batch of the accumulated batch (clamped to at least 1).
        num_items: f64,
    },
    /// Token sum divided by `B × max_completion_length` (TRL `dr_grpo`, "Dr. GRPO"): a constant
    /// normaliser, so there is no length bias at all.
    DrGrpo {
        /// The generation length cap (usually `T`).
        max_completion_length: usize,
    },
}

impl Aggregation {
    /// The weight `w_b` of each unmasked token of a row holding `row_tokens` mask sum, in a batch
    /// of `rows.b` rows holding `total_tokens`. Counts are clamped to at least 1, so an all-masked
    /// row (or batch) contributes zero instead of NaN.
    pub fn row_weight(&self, rows: Rows, row_tokens: f64, total_tokens: f64) -> f64 {
        match *self {
            Aggregation::Grpo => 1.0 / (rows.b as f64 * row_tokens.max(1.0)),
            Aggregation::Bnpo => 1.0 / total_tokens.max(1.0),
            Aggregation::Dapo { num_items } => 1.0 / num_items.max(1.0),
            Aggregation::DrGrpo {
                max_completion_length,
            } => 1.0 / ((rows.b * max_completion_length) as f64).max(1.0),
        }
    }
}

/// Per-token estimators of KL(π ‖ π_ref) from the sampled token's log-probs (Schulman's k1/k2/k3),
/// with `δ = logp - logp_ref`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlEstimator {
    /// `k1 = δ`: unbiased, high variance, can be negative (legacy PPO's reward penalty).
    K1,
    /// `k2 = ½·δ²`: biased, low variance, always ≥ 0 (PPO's `approxkl`).
    K2,
    /// `k3 = exp(-δ) + δ - 1`: unbiased and ≥ 0 (GRPO's loss term).
    K3,
}

/// Where a single-input loss op adds its gradient: `dx += dloss · ∂loss/∂x`.
pub struct Grad<'a, B: Backend + ?Sized + 'a> {
    /// The gradient buffer, same length as the differentiated input.
    pub dx: B::ViewMut<'a>,
    /// Upstream scale of the loss (a coefficient, 1/accumulation steps, ...).
    pub dloss: f32,
}

/// Inputs of [`LossOps::kl`]. All views are (N) = (B*T).
pub struct KlInputs<'a, B: Backend + ?Sized + 'a> {
    /// Policy log-probs of the sampled tokens; the gradient is taken w.r.t. these.
    pub logp: B::View<'a>,
    /// Reference-model log-probs of the same tokens (a constant).
    pub logp_ref: B::View<'a>,
    /// 1 = token counts, 0 = pad.
    pub mask: B::View<'a>,
    /// Batch geometry.
    pub rows: Rows,
}

/// Advantages of a policy-gradient loss: one per token (PPO/GAE, REINFORCE++) or one per sequence
/// broadcast over its tokens (GRPO, RLOO). Passing the (B) vector avoids materialising (B*T).
pub enum Advantages<'a, B: Backend + ?Sized + 'a> {
    /// (B*T) values.
    PerToken(B::View<'a>),
    /// (B) values, one per row.
    PerSequence(B::View<'a>),
}

impl<'a, B: Backend + ?Sized + 'a> Clone for Advantages<'a, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<'a, B: Backend + ?Sized + 'a> Copy for Advantages<'a, B> {}

/// Inputs of [`LossOps::policy_loss`]. Token views are (N) = (B*T).
pub struct PolicyLossInputs<'a, B: Backend + ?Sized + 'a> {
    /// Current policy log-probs of the sampled tokens (differentiated).
    pub logp: B::View<'a>,
    /// Log-probs under the policy that sampled the tokens (the ratio's denominator).
    pub logp_old: B::View<'a>,
    /// Advantages, per token or per sequence.
    pub advantages: Advantages<'a, B>,
    /// Reference-model log-probs; required when `kl_coef != 0`.
    pub logp_ref: Option<B::View<'a>>,
    /// Per-token entropy of the current policy (from `ModelOps::logprobs_forward`); required when
    /// `entropy_coef != 0`. Its gradient goes to [`PolicyLossGrad::dentropy`], which
    /// `ModelOps::logprobs_backward` chains to the logits.
    pub entropy: Option<B::View<'a>>,
    /// Per-token truncated importance-sampling weights `w = min(π_old / π_sampling, C)` (TRL's
    /// `vllm_importance_sampling_correction`), where π_old is the training forward's and
    /// π_sampling the sampler's: a constant that scales each token's clipped surrogate and its
    /// gradient, not the KL or entropy terms, and not the aggregation's token counts. `None`:
    /// every weight is 1.
    pub is_weight: Option<B::View<'a>>,
    /// 1 = token counts, 0 = pad.
    pub mask: B::View<'a>,
    /// Batch geometry.
    pub rows: Rows,
}

/// Settings of the clipped policy loss (PPO, GRPO, DAPO, Dr. GRPO, dual-clip PPO).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyLossCfg {
    /// `ε_low`: the ratio is clipped below at `1 - ε_low`.
    pub clip_low: f32,
    /// `ε_high`: the ratio is clipped above at `1 + ε_high` (DAPO's clip-higher uses > `ε_low`).
    pub clip_high: f32,
    /// Dual-clip constant `c > 1` (Ye et al. 2020, verl): where `A < 0` the loss is capped at
    /// `-A·c`, so a huge ratio on a bad action cannot blow up the loss. `None` disables it.
    pub dual_clip: Option<f32>,
    /// `β` of the per-token `k3(logp, logp_ref)` term added to the loss (GRPO); 0 disables it.
    pub kl_coef: f32,
    /// Coefficient of the entropy bonus: the per-token loss gets `- entropy_coef · H_t`.
    pub entropy_coef: f32,
    /// How per-token losses become one scalar.
    pub agg: Aggregation,
}

/// Where [`LossOps::policy_loss`] adds its gradient.
pub struct PolicyLossGrad<'a, B: Backend + ?Sized + 'a> {
    /// (N): `dlogp += dloss · ∂loss/∂logp`, 0 added on pads.
    pub dlogp: B::ViewMut<'a>,
    /// (N): `dentropy += dloss · ∂loss/∂entropy`; needed only with an entropy bonus.
    pub dentropy: Option<B::ViewMut<'a>>,
    /// Upstream scale of the loss.
    pub dloss: f32,
}

/// Scalars from [`LossOps::policy_loss`]. `loss` is aggregated as configured; the diagnostics are
/// token means over the micro-batch (legacy PPO's `masked_mean`), whatever the aggregation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PolicyLossStats {
    /// The aggregated loss.
    pub loss: f64,
    /// Fraction of tokens where the clipped term is the larger (active) one: `-A·clip(r) > -A·r`.
    pub clipfrac: f64,
    /// Fraction of tokens capped by the dual clip (`A < 0` and `max(..) > -A·c`); 0 without it.
    pub dual_clipfrac: f64,
    /// Mean of `½·(logp - logp_old)²` (k2 between the current and the sampling policy).
    pub approx_kl: f64,
    /// Mean of `k3(logp, logp_ref)`; 0 without a reference.
    pub kl: f64,
    /// Mean of the entropy input; 0 without one.
    pub entropy: f64,
    /// Mask sum of the micro-batch (the denominator of the means above).
    pub tokens: f64,
}

/// Inputs of [`LossOps::value_loss`]. All views are (N) = (B*T).
pub struct ValueLossInputs<'a, B: Backend + ?Sized + 'a> {
    /// Current value predictions (differentiated).
    pub values: B::View<'a>,
    /// Value predictions at rollout time (the clipping centre).
    pub values_old: B::View<'a>,
    /// Regression targets (GAE returns).
    pub returns: B::View<'a>,
    /// 1 = token counts, 0 = pad.
    pub mask: B::View<'a>,
    /// Batch geometry.
    pub rows: Rows,
}

/// Settings of the clipped value loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValueLossCfg {
    /// `ε_v`: predictions are clipped to `values_old ± ε_v`; `None` gives plain `½(V-R)²`.
    pub clip: Option<f32>,
    /// How per-token losses become one scalar (legacy PPO: [`Aggregation::Bnpo`]).
    pub agg: Aggregation,
}

/// Scalars from [`LossOps::value_loss`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ValueLossStats {
    /// The aggregated loss.
    pub loss: f64,
    /// Token fraction where the clipped error is the larger one (the clip is active).
    pub clipfrac: f64,
    /// Mask sum of the micro-batch.
    pub tokens: f64,
}

/// Settings of [`LossOps::gae`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GaeCfg {
    /// Discount `γ`.
    pub gamma: f32,
    /// GAE `λ`.
    pub lam: f32,
    /// Whiten the advantages with TRL's `masked_whiten` (masked mean, unbiased masked variance,
    /// `(A - mean)·rsqrt(var + 1e-8)`) after the returns are taken from the raw advantages.
    pub whiten: bool,
}

/// The baseline subtracted from each reward within its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBaseline {
    /// The group mean (GRPO).
    Mean,
    /// The mean of the *other* `G-1` rewards of the group (RLOO).
    LeaveOneOut,
}

/// What the baselined rewards are divided by (TRL `scale_rewards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupScale {
    /// No scaling (TRL `none`; Dr. GRPO).
    None,
    /// The group's unbiased std plus `eps` (TRL `group`, the default).
    Group,
    /// The unbiased std of all rewards of the batch plus `eps` (TRL `batch`).
    Batch,
}

/// Settings of [`LossOps::group_advantages`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupAdvCfg {
    /// Group size `G` (completions per prompt); the reward count must be a multiple of it.
    pub group: usize,
    /// Baseline.
    pub baseline: GroupBaseline,
    /// Scaling.
    pub scale: GroupScale,
    /// Added to the std (TRL adds it to the std, not the variance): 1e-4 in TRL.
    pub eps: f32,
}

/// Scalars from [`LossOps::group_advantages`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GroupAdvStats {
    /// Fraction of groups whose rewards are all equal (std 0): they carry no learning signal
    /// (TRL logs it as `frac_reward_zero_std`).
    pub frac_zero_std: f64,
}

/// Settings of [`LossOps::kl_shaped_rewards`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KlRewardCfg {
    /// Coefficient of the per-token penalty `-kl_coef · k(logp, logp_ref)`.
    pub kl_coef: f32,
    /// Estimator of the penalty (legacy PPO and REINFORCE++ use [`KlEstimator::K1`]).
    pub estimator: KlEstimator,
}

/// Settings of [`LossOps::bt_loss`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BtCfg {
    /// Coefficient of TRL's reward-centering term `coef · mean((r_c + r_r)²)`, which pins the
    /// reward scale's free offset near 0; 0 disables it.
    pub center_coef: f32,
}

/// Scalars from [`LossOps::bt_loss`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BtStats {
    /// The loss (mean over pairs, plus the centering term).
    pub loss: f64,
    /// Fraction of pairs with `r_c > r_r` (margin not applied).
    pub accuracy: f64,
    /// Mean of `r_c - r_r`.
    pub margin: f64,
}

/// Where [`LossOps::bt_loss`] adds its gradient (each (P)).
pub struct BtGrad<'a, B: Backend + ?Sized + 'a> {
    /// `dchosen += dloss · ∂loss/∂r_c`.
    pub dchosen: B::ViewMut<'a>,
    /// `drejected += dloss · ∂loss/∂r_r`.
    pub drejected: B::ViewMut<'a>,
    /// Upstream scale.
    pub dloss: f32,
}

/// The DPO family's per-pair loss, as a function of `β` and the log-ratio difference
/// `d = (π_c - ref_c) - (π_r - ref_r)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpoLoss {
    /// `-(1-ε)·logσ(β d) - ε·logσ(-β d)` (DPO; with label smoothing `ε > 0` it is cDPO).
    Sigmoid,
    /// `relu(1 - β d)` (SLiC).
    Hinge,
    /// `(d' - 1/(2β))²` with each log-ratio divided by its completion length (TRL's IPO):
    /// `d' = (π_c - ref_c)/len_c - (π_r - ref_r)/len_r`. Needs the lengths.
    Ipo,
    /// `(-(1-ε)·logσ(β d) + ε·logσ(-β d)) / (1 - 2ε)` (robust DPO, unbiased under label noise ε).
    Robust,
}

/// Settings of [`LossOps::dpo_loss`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpoCfg {
    /// `β`, the strength of the implicit KL constraint.
    pub beta: f32,
    /// Label smoothing `ε` (Sigmoid and Robust); must be < 0.5 for Robust.
    pub label_smoothing: f32,
    /// The loss variant.
    pub loss: DpoLoss,
}

/// Inputs of [`LossOps::dpo_loss`]: sequence log-probs (sums over completion tokens, from
/// [`LossOps::masked_row_sum`]), each (P) for P pairs.
pub struct DpoInputs<'a, B: Backend + ?Sized + 'a> {
    /// Policy log-prob of each chosen completion (differentiated).
    pub policy_chosen: B::View<'a>,
    /// Policy log-prob of each rejected completion (differentiated).
    pub policy_rejected: B::View<'a>,
    /// Reference log-prob of each chosen completion.
    pub ref_chosen: B::View<'a>,
    /// Reference log-prob of each rejected completion.
    pub ref_rejected: B::View<'a>,
    /// Completion lengths (token counts) of the chosen side; required by IPO.
    pub chosen_len: Option<B::View<'a>>,
    /// Completion lengths of the rejected side; required by IPO.
    pub rejected_len: Option<B::View<'a>>,
    /// Number of pairs `P`.
    pub pairs: usize,
}

/// Optional per-pair outputs of [`LossOps::dpo_loss`], each (P).
pub struct DpoOutputs<'a, B: Backend + ?Sized + 'a> {
    /// Per-pair losses.
    pub losses: Option<B::ViewMut<'a>>,
    /// Implicit rewards `β·(π_c - ref_c)` (length-normalised log-ratio for IPO, as TRL).
    pub chosen_rewards: Option<B::ViewMut<'a>>,
    /// Implicit rewards `β·(π_r - ref_r)`.
    pub rejected_rewards: Option<B::ViewMut<'a>>,
}

impl<'a, B: Backend + ?Sized + 'a> Default for DpoOutputs<'a, B> {
    fn default() -> Self {
        DpoOutputs {
            losses: None,
            chosen_rewards: None,
            rejected_rewards: None,
        }
    }
}

/// Where [`LossOps::dpo_loss`] adds its gradient (each (P)); chain to tokens with
/// [`LossOps::masked_row_sum_backward`].
pub struct DpoGrad<'a, B: Backend + ?Sized + 'a> {
    /// `dchosen += dloss · ∂loss/∂π_c`.
    pub dchosen: B::ViewMut<'a>,
    /// `drejected += dloss · ∂loss/∂π_r`.
    pub drejected: B::ViewMut<'a>,
    /// Upstream scale.
    pub dloss: f32,
}

/// Scalars from [`LossOps::dpo_loss`] (means over pairs, as TRL logs them).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DpoStats {
    /// Mean per-pair loss.
    pub loss: f64,
    /// Fraction of pairs whose chosen reward exceeds the rejected one.
    pub accuracy: f64,
    /// Mean of `chosen_reward - rejected_reward`.
    pub margin: f64,
    /// Mean implicit chosen reward.
    pub chosen_reward: f64,
    /// Mean implicit rejected reward.
    pub rejected_reward: f64,
}

/// The loss family: implemented whole by each backend.
///
/// Callers pass views of the documented lengths: the CPU backend asserts them, a device backend
/// may trust them.
pub trait LossOps: Backend {
    /// `sums[b] = Σ_t mask[b,t]·x[b,t]` and, if asked, `counts[b] = Σ_t mask[b,t]`: sequence
    /// log-probs for DPO, completion lengths for IPO. x, mask: (B*T); sums, counts: (B).
    fn masked_row_sum(
        &self,
        sums: Self::ViewMut<'_>,
        counts: Option<Self::ViewMut<'_>>,
        x: Self::View<'_>,
        mask: Self::View<'_>,
        rows: Rows,
    );
    /// `dx[b,t] += mask[b,t]·dsums[b]`. dx, mask: (B*T); dsums: (B).
    fn masked_row_sum_backward(
        &self,
        dx: Self::ViewMut<'_>,
        dsums: Self::View<'_>,
        mask: Self::View<'_>,
        rows: Rows,
    );

    /// A KL estimator between the policy and the reference, aggregated as `agg`: returns the
    /// aggregate; writes the per-token values to `per_token` (N) if given (0 on pads); adds
    /// `grad.dloss · ∂aggregate/∂logp` to `grad.dx` (N) if given.
    fn kl(
        &self,
        x: &KlInputs<'_, Self>,
        estimator: KlEstimator,
        agg: Aggregation,
        per_token: Option<Self::ViewMut<'_>>,
        grad: Option<Grad<'_, Self>>,
    ) -> f64;

    /// The clipped surrogate policy loss. Per token, with `r = exp(logp - logp_old)`:
    /// `l = max(-A·r, -A·clip(r, 1-ε_low, 1+ε_high))`; with dual clip, `l = min(l, -A·c)` where
    /// `A < 0`; then `l = w·l` with the importance weight `w` when given; then
    /// `l += β·k3(logp, logp_ref) - entropy_coef·H`. Aggregated as `cfg.agg`.
    /// Writes the per-token `l` to `per_token` (N) if given (0 on pads), and the gradient to
    /// `grad` in the same pass.
    fn policy_loss(
        &self,
        x: &PolicyLossInputs<'_, Self>,
        cfg: &PolicyLossCfg,
        per_token: Option<Self::ViewMut<'_>>,
        grad: Option<PolicyLossGrad<'_, Self>>,
    ) -> PolicyLossStats;

    /// The clipped value loss, per token `l = ½·max((V-R)², (clip(V, V_old-ε_v, V_old+ε_v) - R)²)`
    /// (legacy TRL PPO), aggregated as `cfg.agg`. Writes `l` to `per_token` (N) if given (0 on
    /// pads); adds `grad.dloss · ∂loss/∂V` to `grad.dx` (N) if given.
    fn value_loss(
        &self,
        x: &ValueLossInputs<'_, Self>,
        cfg: &ValueLossCfg,
        per_token: Option<Self::ViewMut<'_>>,
        grad: Option<Grad<'_, Self>>,
    ) -> ValueLossStats;

    /// Per-token rewards for PPO and REINFORCE++: `-kl_coef · k(logp, logp_ref)` on every
    /// unmasked token, plus the sequence `scores[b]` on its last unmasked token (a row with no
    /// token gets nothing). rewards, logp, logp_ref, mask: (B*T); scores: (B).
    #[allow(clippy::too_many_arguments)]
    fn kl_shaped_rewards(
        &self,
        rewards: Self::ViewMut<'_>,
        logp: Self::View<'_>,
        logp_ref: Self::View<'_>,
        scores: Self::View<'_>,
        mask: Self::View<'_>,
        rows: Rows,
        cfg: &KlRewardCfg,
    );

    /// Generalised advantage estimation over each row's unmasked tokens, bootstrapping with 0
    /// after the last one (the sequence ends): `δ_t = r_t + γ V_{t+1} - V_t`,
    /// `A_t = δ_t + γλ A_{t+1}`, `returns = A + V` (from the raw advantages); advantages are then
    /// whitened if `cfg.whiten`. Outputs are 0 on pads. All views (B*T).
    #[allow(clippy::too_many_arguments)]
    fn gae(
        &self,
        advantages: Self::ViewMut<'_>,
        returns: Self::ViewMut<'_>,
        rewards: Self::View<'_>,
        values: Self::View<'_>,
        mask: Self::View<'_>,
        rows: Rows,
        cfg: &GaeCfg,
    );

    /// REINFORCE++ (OpenRLHF): discounted returns of the token rewards
    /// (`ret_t = r_t + γ·ret_{t+1}` over each row's unmasked tokens), and advantages that are the
    /// returns whitened over every unmasked token of the batch with the *population* std:
    /// `(ret - mean) / (std + 1e-8)`. Outputs are 0 on pads. All views (B*T).
    fn reinforce_pp(
        &self,
        advantages: Self::ViewMut<'_>,
        returns: Self::ViewMut<'_>,
        rewards: Self::View<'_>,
        mask: Self::View<'_>,
        rows: Rows,
        gamma: f32,
    );

    /// Group-relative advantages for `n` sequence rewards in consecutive groups of `cfg.group`:
    /// `(r - baseline) / (std + eps)` as configured; std is the unbiased (n-1) std, and a
    /// group of one has std 0. Optionally writes the per-sample baseline and group std (each (n),
    /// as TRL logs them). advantages, rewards: (n).
    fn group_advantages(
        &self,
        advantages: Self::ViewMut<'_>,
        baseline: Option<Self::ViewMut<'_>>,
        group_std: Option<Self::ViewMut<'_>>,
        rewards: Self::View<'_>,
        n: usize,
        cfg: &GroupAdvCfg,
    ) -> GroupAdvStats;

    /// Bradley-Terry reward-model loss over `p` pairs of scalar rewards:
    /// `mean(-logσ(r_c - r_r - margin)) + center_coef·mean((r_c + r_r)²)` (TRL RewardTrainer).
    /// chosen, rejected, margin: (P).
    fn bt_loss(
        &self,
        chosen: Self::View<'_>,
        rejected: Self::View<'_>,
        margin: Option<Self::View<'_>>,
        p: usize,
        cfg: &BtCfg,
        grad: Option<BtGrad<'_, Self>>,
    ) -> BtStats;

    /// The DPO family, mean over pairs (see [`DpoLoss`] for each variant).
    fn dpo_loss(
        &self,
        x: &DpoInputs<'_, Self>,
        cfg: &DpoCfg,
        out: DpoOutputs<'_, Self>,
        grad: Option<DpoGrad<'_, Self>>,
    ) -> DpoStats;
}
