// pref_loss.cu: the pairwise preference losses, forward and backward in one pass.
//
// CPU ops they must match (src/backend/cpu/loss.rs):
//   bt_loss_f32   LossOps::bt_loss: mean(-logσ(r_c - r_r - margin)) + center_coef·mean((r_c + r_r)²).
//   dpo_loss_f32  LossOps::dpo_loss: sigmoid (cDPO with label smoothing), hinge, IPO (log-ratios
//                 divided by completion lengths) and robust DPO, with implicit rewards.
//
// One block over all P pairs. Pairs are few (one per sequence pair of a batch), so per-pair math
// is f64 at no measurable cost and the sums accumulate in f64 in a fixed tree; gradients are
// added (`+=`), scaled by `dloss / P`.
#include "common.cuh"

/// [`DpoLoss`] codes.
#define DPO_SIGMOID 0
#define DPO_HINGE 1
#define DPO_IPO 2
#define DPO_ROBUST 3

/// log(1 + e^x) without overflow.
__device__ __forceinline__ double softplus(double x) {
  return (x > 0.0 ? x : 0.0) + log1p(exp(-fabs(x)));
}

/// The logistic function without overflow.
__device__ __forceinline__ double sigmoid(double x) {
  if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
  const double e = exp(x);
  return e / (1.0 + e);
}

/// stats = [loss, accuracy, margin]; `margin`, `dchosen`/`drejected` may be null.
extern "C" __global__ void bt_loss_f32(const float* chosen, const float* rejected,
                                       const float* margin, int P, float center_coef, float dloss,
                                       float* dchosen, float* drejected, double* stats) {
  __shared__ double scratch[3 * RL_WARP];
  const double inv_p = 1.0 / (P > 1 ? P : 1);
  const double c = center_coef;
  double acc[3] = {0.0, 0.0, 0.0};
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    const double rc = chosen[i], rr = rejected[i];
    const double z = rc - rr - (margin ? (double)margin[i] : 0.0);
    const double s = rc + rr;
    acc[0] += softplus(-z) + c * s * s;  // -logσ(z) = softplus(-z)
    acc[1] += rc > rr ? 1.0 : 0.0;
    acc[2] += rc - rr;
    if (dchosen) {
      const double dl = dloss * inv_p;
      const double dz = -sigmoid(-z);
      dchosen[i] += (float)(dl * (dz + 2.0 * c * s));
      drejected[i] += (float)(dl * (-dz + 2.0 * c * s));
    }
  }
  block_sum<3>(acc, scratch);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) stats[k] = acc[k] * inv_p;
  }
}

/// stats = [loss, accuracy, margin, chosen_reward, rejected_reward]. The lengths are read only
/// for IPO; every output and gradient pointer may be null (the gradients together).
extern "C" __global__ void dpo_loss_f32(const float* policy_chosen, const float* policy_rejected,
                                        const float* ref_chosen, const float* ref_rejected,
                                        const float* chosen_len, const float* rejected_len, int P,
                                        float beta_f, float eps_f, int variant, float dloss,
                                        float* losses, float* chosen_rewards,
                                        float* rejected_rewards, float* dchosen,
                                        float* drejected, double* stats) {
  __shared__ double scratch[5 * RL_WARP];
  const double inv_p = 1.0 / (P > 1 ? P : 1);
  const double beta = beta_f, eps = eps_f;
  double acc[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    // IPO normalises each log-ratio by its completion length (clamped to 1, as TRL).
    double nc = 1.0, nr = 1.0;
    if (variant == DPO_IPO) {
      nc = chosen_len[i] > 1.f ? chosen_len[i] : 1.0;
      nr = rejected_len[i] > 1.f ? rejected_len[i] : 1.0;
    }
    const double ratio_c = ((double)policy_chosen[i] - ref_chosen[i]) / nc;
    const double ratio_r = ((double)policy_rejected[i] - ref_rejected[i]) / nr;
    const double d = ratio_c - ratio_r;
    const double bd = beta * d;
    // (loss, ∂loss/∂d); for every variant ∂d/∂π_c = 1/nc and ∂d/∂π_r = -1/nr.
    double l, dl_dd;
    if (variant == DPO_SIGMOID) {
      l = (1.0 - eps) * softplus(-bd) + eps * softplus(bd);
      dl_dd = beta * (-(1.0 - eps) * sigmoid(-bd) + eps * sigmoid(bd));
    } else if (variant == DPO_ROBUST) {
      l = ((1.0 - eps) * softplus(-bd) - eps * softplus(bd)) / (1.0 - 2.0 * eps);
      dl_dd = beta * (-(1.0 - eps) * sigmoid(-bd) - eps * sigmoid(bd)) / (1.0 - 2.0 * eps);
    } else if (variant == DPO_HINGE) {
      const bool active = 1.0 - bd > 0.0;
      l = active ? 1.0 - bd : 0.0;
      dl_dd = active ? -beta : 0.0;
    } else {
      const double h = d - 1.0 / (2.0 * beta);
      l = h * h;
      dl_dd = 2.0 * h;
    }
    const double rw_c = beta * ratio_c, rw_r = beta * ratio_r;
    if (losses) losses[i] = (float)l;
    if (chosen_rewards) chosen_rewards[i] = (float)rw_c;
    if (rejected_rewards) rejected_rewards[i] = (float)rw_r;
    acc[0] += l;
    acc[1] += rw_c > rw_r ? 1.0 : 0.0;
    acc[2] += rw_c - rw_r;
    acc[3] += rw_c;
    acc[4] += rw_r;
    if (dchosen) {
      const double k = dloss * inv_p * dl_dd;
      dchosen[i] += (float)(k / nc);
      drejected[i] -= (float)(k / nr);
    }
  }
  block_sum<5>(acc, scratch);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 5; ++k) stats[k] = acc[k] * inv_p;
  }
}
