// ppo_loss.cu: the clipped policy loss (PPO, GRPO and its aggregations, dual clip, KL term,
// entropy bonus), the clipped value loss, and the advantage estimators (GAE, REINFORCE++ returns,
// whitening, group-relative GRPO / RLOO advantages).
//
// CPU ops they must match (src/backend/cpu/loss.rs):
//   policy_loss_f32         LossOps::policy_loss: with r = e^(logp - logp_old),
//                           l = max(-A·r, -A·clip(r, lo, hi)), capped at -A·c where A < 0 (dual
//                           clip), times the truncated importance weight w when given,
//                           + β·k3(logp, logp_ref) - entropy_coef·H; loss and gradient in one
//                           pass.
//   value_loss_f32          LossOps::value_loss: l = ½·max((V-R)², (clip(V, V_old ± ε) - R)²).
//   gae_f32                 LossOps::gae before whitening.
//   discounted_returns_f32  LossOps::reinforce_pp's returns.
//   masked_whiten_f32       the whitening of LossOps::gae (TRL masked_whiten) and of
//                           LossOps::reinforce_pp (population std, eps on the std).
//   group_adv_f32           LossOps::group_advantages (GRPO group/batch/no scaling, RLOO).
//
// The loss kernels run one block per row: the row's aggregation weight comes from the per-row
// mask counts (row_counts_f32 in reduce.cu), per-token math is f32, and each row's sums (f64) go to
// `partials`, which sum_partials_f64 adds in row order: no float atomics, so the same inputs give
// the same bits. Masked-out tokens are skipped, never multiplied by 0, so pads may hold NaN.
// Gradients are added (`+=`), scaled by `dloss`.
#include "common.cuh"

/// Columns of policy_loss_f32's per-row partials: the token sums behind `PolicyLossStats`.
#define POLICY_PARTIALS 7  // loss, clipped, dual-clipped, approx-kl, kl, entropy, tokens
/// Columns of value_loss_f32's per-row partials.
#define VALUE_PARTIALS 3  // loss, clipped, tokens

/// masked_whiten_f32 modes.
#define WHITEN_UNBIASED_VAR 0  // TRL masked_whiten: (x - mean)·rsqrt(var_unbiased + 1e-8)
#define WHITEN_POPULATION_STD 1  // REINFORCE++: (x - mean) / (std + 1e-8)

/// group_adv_f32 settings ([`GroupBaseline`], [`GroupScale`]).
#define GROUP_BASELINE_MEAN 0
#define GROUP_BASELINE_LOO 1
#define GROUP_SCALE_NONE 0
#define GROUP_SCALE_GROUP 1
#define GROUP_SCALE_BATCH 2

extern "C" __global__ void policy_loss_f32(
    const float* logp, const float* logp_old, const float* adv, int adv_per_seq,
    const float* logp_ref, const float* entropy, const float* mask, const double* counts,
    int rows, int T, float clip_lo, float clip_hi, int dual_clip, float dual_c, float kl_coef,
    float entropy_coef, int agg, double agg_param, float dloss, float* per_token, float* dlogp,
    float* dentropy, double* partials, const float* is_weight) {
  __shared__ double scratch[(POLICY_PARTIALS - 1) * RL_WARP];
  const int b = blockIdx.x;
  const double total = agg_total_tokens(agg, counts, rows, scratch);
  const double w = agg_row_weight(agg, agg_param, rows, counts[b], total);
  const float coef = (float)(dloss * w);
  double acc[POLICY_PARTIALS - 1] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const long long i = (long long)b * T + t;
    const float m = mask[i];
    if (m == 0.f) {
      if (per_token) per_token[i] = 0.f;
      continue;
    }
    const float a = adv_per_seq ? adv[b] : adv[i];
    const float d = logp[i] - logp_old[i];
    const float r = expf(d);
    const float unclipped = -a * r;
    const float clipped = -a * fminf(fmaxf(r, clip_lo), clip_hi);
    // Inside the clip range both terms are -A·r; outside it the clipped term is constant, so
    // it carries no gradient when it wins.
    const bool is_clipped = clipped > unclipped;
    float l = is_clipped ? clipped : unclipped;
    float g = is_clipped ? 0.f : unclipped;
    bool dual = false;
    if (dual_clip && a < 0.f && l > -a * dual_c) {
      l = -a * dual_c;
      g = 0.f;
      dual = true;
    }
    // TRL weights the clipped surrogate, not the KL term, by the constant truncated IS ratio.
    if (is_weight) {
      l *= is_weight[i];
      g *= is_weight[i];
    }
    if (logp_ref) {
      float dk3;
      const float k3 = kl_estimate(RL_KL_K3, logp[i] - logp_ref[i], &dk3);
      acc[4] += (double)m * k3;
      l += kl_coef * k3;
      g += kl_coef * dk3;
    }
    if (entropy) {
      const float h = entropy[i];
      acc[5] += (double)m * h;
      l -= entropy_coef * h;
      if (dentropy) dentropy[i] += -coef * m * entropy_coef;
    }
    if (per_token) per_token[i] = l;
    if (dlogp) dlogp[i] += coef * m * g;
    acc[0] += w * m * l;
    acc[1] += is_clipped ? m : 0.f;
    acc[2] += dual ? m : 0.f;
    acc[3] += 0.5 * m * d * d;
  }
  block_sum<POLICY_PARTIALS - 1>(acc, scratch);
  if (threadIdx.x == 0) {
    double* out = partials + (long long)b * POLICY_PARTIALS;
    for (int k = 0; k < POLICY_PARTIALS - 1; ++k) out[k] = acc[k];
    out[POLICY_PARTIALS - 1] = counts[b];
  }
}

extern "C" __global__ void value_loss_f32(const float* values, const float* values_old,
                                          const float* returns, const float* mask,
                                          const double* counts, int rows, int T, int has_clip,
                                          float clip, int agg, double agg_param, float dloss,
                                          float* per_token, float* dx, double* partials) {
  __shared__ double scratch[(VALUE_PARTIALS - 1) * RL_WARP];
  const int b = blockIdx.x;
  const double total = agg_total_tokens(agg, counts, rows, scratch);
  const double w = agg_row_weight(agg, agg_param, rows, counts[b], total);
  const float coef = (float)(dloss * w);
  double acc[VALUE_PARTIALS - 1] = {0.0, 0.0};
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const long long i = (long long)b * T + t;
    const float m = mask[i];
    if (m == 0.f) {
      if (per_token) per_token[i] = 0.f;
      continue;
    }
    const float v = values[i];
    const float r = returns[i];
    float e = (v - r) * (v - r);
    float g = v - r;
    bool is_clipped = false;
    if (has_clip) {
      const float vo = values_old[i];
      const float vc = fminf(fmaxf(v, vo - clip), vo + clip);
      const float e2 = (vc - r) * (vc - r);
      // The clipped error only wins when V is outside the range, where the clamp is constant.
      if (e2 > e) {
        e = e2;
        g = 0.f;
        is_clipped = true;
      }
    }
    const float l = 0.5f * e;
    if (per_token) per_token[i] = l;
    if (dx) dx[i] += coef * m * g;
    acc[0] += w * m * l;
    acc[1] += is_clipped ? m : 0.f;
  }
  block_sum<VALUE_PARTIALS - 1>(acc, scratch);
  if (threadIdx.x == 0) {
    double* out = partials + (long long)b * VALUE_PARTIALS;
    out[0] = acc[0];
    out[1] = acc[1];
    out[2] = counts[b];
  }
}

/// One thread per row, walking it backwards in f64 (the recurrence would accumulate f32 rounding
/// over a long row). A pad ends the sequence: what follows it bootstraps with 0.
extern "C" __global__ void gae_f32(const float* rewards, const float* values, const float* mask,
                                   int rows, int T, float gamma, float lam, float* adv,
                                   float* ret) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= rows) return;
  double next_value = 0.0, next_adv = 0.0;
  for (int t = T - 1; t >= 0; --t) {
    const long long i = (long long)b * T + t;
    if (mask[i] == 0.f) {
      adv[i] = 0.f;
      ret[i] = 0.f;
      next_value = 0.0;
      next_adv = 0.0;
      continue;
    }
    const double v = values[i];
    const double delta = rewards[i] + (double)gamma * next_value - v;
    const double a = delta + (double)gamma * lam * next_adv;
    adv[i] = (float)a;
    ret[i] = (float)(a + v);
    next_value = v;
    next_adv = a;
  }
}

/// One thread per row: ret_t = r_t + γ·ret_{t+1} over the row's unmasked tokens, in f64.
extern "C" __global__ void discounted_returns_f32(const float* rewards, const float* mask,
                                                 int rows, int T, float gamma, float* ret) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= rows) return;
  double acc = 0.0;
  for (int t = T - 1; t >= 0; --t) {
    const long long i = (long long)b * T + t;
    if (mask[i] == 0.f) {
      ret[i] = 0.f;
      acc = 0.0;
      continue;
    }
    acc = rewards[i] + (double)gamma * acc;
    ret[i] = (float)acc;
  }
}

/// One block over all n tokens: masked mean, then the masked sum of squared deviations (two
/// passes, as the reference), then out = (x - mean)·scale on unmasked tokens and 0 on pads.
/// `out` may be `x`.
extern "C" __global__ void masked_whiten_f32(const float* x, const float* mask, int n, int mode,
                                             float* out) {
  __shared__ double scratch[2 * RL_WARP];
  double v[2] = {0.0, 0.0};
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float m = mask[i];
    if (m != 0.f) {
      v[0] += (double)m * x[i];
      v[1] += m;
    }
  }
  block_sum<2>(v, scratch);
  const double count = v[1];
  const double clamped = count > 1.0 ? count : 1.0;
  const double mean = v[0] / clamped;
  double sq = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float m = mask[i];
    if (m != 0.f) {
      const double d = x[i] - mean;
      sq += m * d * d;
    }
  }
  sq = block_sum1(sq, scratch);
  double scale;
  if (mode == WHITEN_UNBIASED_VAR) {
    double var = sq / clamped;
    if (count > 1.0) var = var * count / (count - 1.0);
    scale = 1.0 / sqrt(var + 1e-8);
  } else {
    scale = 1.0 / (sqrt(sq / clamped) + 1e-8);
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    out[i] = mask[i] == 0.f ? 0.f : (float)((x[i] - mean) * scale);
  }
}

/// One block over n rewards in groups of G; a thread per group. Std is unbiased; a group of one
/// has std 0. stats[0] = the fraction of groups whose std is ~0 (TRL's frac_reward_zero_std).
extern "C" __global__ void group_adv_f32(const float* rewards, int n, int G, int baseline,
                                         int scale, float eps, float* adv, float* baseline_out,
                                         float* std_out, double* stats) {
  __shared__ double scratch[RL_WARP];
  double batch_std = 0.0;
  if (scale == GROUP_SCALE_BATCH) {
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += rewards[i];
    const double mean = block_sum1(s, scratch) / (n > 0 ? n : 1);
    double ss = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const double d = rewards[i] - mean;
      ss += d * d;
    }
    ss = block_sum1(ss, scratch);
    batch_std = n < 2 ? 0.0 : sqrt(ss / (n - 1));
  }
  const int groups = n / G;
  double zero_std = 0.0;
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    const float* r = rewards + (long long)g * G;
    double sum = 0.0;
    for (int j = 0; j < G; ++j) sum += r[j];
    double std = 0.0;
    if (G >= 2) {
      const double mean = sum / G;
      double ss = 0.0;
      for (int j = 0; j < G; ++j) ss += (r[j] - mean) * (r[j] - mean);
      std = sqrt(ss / (G - 1));
    }
    // torch.isclose(std, 0) with its default atol, as TRL counts zero-std groups.
    if (std <= 1e-8) zero_std += 1.0;
    for (int j = 0; j < G; ++j) {
      const long long i = (long long)g * G + j;
      const double base = baseline == GROUP_BASELINE_MEAN ? sum / G : (sum - r[j]) / (G - 1);
      const double centred = r[j] - base;
      double a = centred;
      if (scale == GROUP_SCALE_GROUP) a = centred / (std + eps);
      if (scale == GROUP_SCALE_BATCH) a = centred / (batch_std + eps);
      adv[i] = (float)a;
      if (baseline_out) baseline_out[i] = (float)base;
      if (std_out) std_out[i] = (float)std;
    }
  }
  zero_std = block_sum1(zero_std, scratch);
  if (threadIdx.x == 0) stats[0] = zero_std / (groups > 0 ? groups : 1);
}
