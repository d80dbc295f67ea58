// kl.cu: per-token KL estimators between the policy and the reference, forward and backward in
// one pass, and the KL-shaped token rewards of PPO / REINFORCE++.
//
// CPU ops they must match (src/backend/cpu/loss.rs):
//   kl_f32          LossOps::kl: k1 = δ, k2 = δ²/2, k3 = e^-δ + δ - 1 (δ = logp - logp_ref),
//                   aggregated as `Aggregation`; per-token values and dx += dloss·∂agg/∂logp.
//   kl_rewards_f32  LossOps::kl_shaped_rewards: -kl_coef·k per unmasked token, plus the sequence
//                   score on the row's last unmasked token.
//
// Layout: one block per row of T tokens (any whole number of warps). Masked-out tokens are
// skipped, never multiplied by 0, so pads may hold NaN; per-token outputs are 0 there.
// `kl_f32` writes the row's weighted sum to `partials[row]`; `sum_partials_f64` (reduce.cu) adds
// the rows in order, so the result does not depend on scheduling.
#include "common.cuh"

extern "C" __global__ void kl_f32(const float* logp, const float* logp_ref, const float* mask,
                                  const double* counts, int rows, int T, int estimator, int agg,
                                  double agg_param, float dloss, float* per_token, float* dx,
                                  double* partials) {
  __shared__ double scratch[RL_WARP];
  const int b = blockIdx.x;
  const double total = agg_total_tokens(agg, counts, rows, scratch);
  const double w = agg_row_weight(agg, agg_param, rows, counts[b], total);
  const float coef = (float)(dloss * w);
  double acc = 0.0;
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const long long i = (long long)b * T + t;
    const float m = mask[i];
    if (m == 0.f) {
      if (per_token) per_token[i] = 0.f;
      continue;
    }
    float g;
    const float k = kl_estimate(estimator, logp[i] - logp_ref[i], &g);
    if (per_token) per_token[i] = k;
    if (dx) dx[i] += coef * m * g;
    acc += (double)m * k;
  }
  acc = block_sum1(acc, scratch);
  if (threadIdx.x == 0) partials[b] = w * acc;
}

extern "C" __global__ void kl_rewards_f32(const float* logp, const float* logp_ref,
                                          const float* scores, const float* mask, int T,
                                          int estimator, float kl_coef, float* rewards) {
  __shared__ int scratch[RL_WARP];
  const int b = blockIdx.x;
  const long long row = (long long)b * T;
  int last = -1;
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    if (mask[row + t] != 0.f) last = t;
  }
  last = block_max(last, scratch, -1);
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const long long i = row + t;
    if (mask[i] == 0.f) {
      rewards[i] = 0.f;
      continue;
    }
    float g;
    const float k = kl_estimate(estimator, logp[i] - logp_ref[i], &g);
    // The score is added before the one rounding to f32, as the reference does.
    rewards[i] = t == last ? (float)(-(double)kl_coef * k + scores[b]) : -kl_coef * k;
  }
}
