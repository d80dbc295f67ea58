// optim.cu: the optimizer's kernels: the squared norm for gradient clipping and the AdamW update.
//
// CPU ops they must match (src/backend/cpu/optim.rs):
//   sum_squares_f32  ModelOps::sum_squares: Σ x² in f64 over fixed chunks of `chunk` elements, one
//                    partial per chunk; sum_partials_f64 (reduce.cu) then adds the partials in a
//                    fixed order. No atomics: the same bits on every run.
//   adamw_f32        ModelOps::adamw, torch.optim.AdamW's single-tensor order: p *= 1 - lr·wd;
//                    m += (1-β1)·(g - m); v = β2·v + (1-β2)·g²;
//                    p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps). The host computes the
//                    f32 scalars as the CPU does (in f64, rounded once).
#include "common.cuh"

/// One block per chunk of x (n ≤ 2^30 elements): partials[blockIdx.x] = Σ x² over the chunk.
extern "C" __global__ void sum_squares_f32(const float* x, int n, int chunk, double* partials) {
  __shared__ double scratch[RL_WARP];
  const long long start = (long long)blockIdx.x * chunk;
  const long long end = start + chunk < n ? start + chunk : n;
  double acc = 0.0;
  for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
    const double v = x[i];
    acc += v * v;  // exact: an f32 squared fits in an f64 mantissa
  }
  acc = block_sum1(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

/// One thread per element; params, m, v updated in place.
extern "C" __global__ void adamw_f32(float* params, const float* grads, float* m, float* v, int n,
                                     float decay, float step_size, float bc2_sqrt, float one_m_b1,
                                     float b2, float one_m_b2, float eps) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = grads[i];
  const float p = params[i] * decay;
  const float mi = m[i] + one_m_b1 * (g - m[i]);
  const float vi = b2 * v[i] + one_m_b2 * g * g;
  const float denom = sqrtf(vi) / bc2_sqrt + eps;
  params[i] = p - step_size * (mi / denom);
  m[i] = mi;
  v[i] = vi;
}
