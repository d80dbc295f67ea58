// reduce.cu: masked per-row sums, and the fixed-order reductions the loss kernels finish with.
//
// CPU ops they must match (src/backend/cpu/loss.rs):
//   masked_row_sum_f32      LossOps::masked_row_sum: sums[b] = Σ_t m·x, counts[b] = Σ_t m.
//   masked_row_sum_bwd_f32  LossOps::masked_row_sum_backward: dx[b,t] += m·dsums[b].
//   row_counts_f32          the mask sum of each row (`row_counts`), kept in f64 for the
//                           aggregation weights of kl_f32, policy_loss_f32 and value_loss_f32.
//   sum_partials_f64        the row-ordered sum of per-row partial results that ends every
//                           reduction of the reference (`partial.iter().sum()`).
//
// Sums accumulate in f64, per thread in a strided order and then in a fixed tree, so results are
// the same bits on every run: no atomics.
#include "common.cuh"

/// One block per row.
extern "C" __global__ void row_counts_f32(const float* mask, int T, double* counts) {
  __shared__ double scratch[RL_WARP];
  const long long row = (long long)blockIdx.x * T;
  double acc = 0.0;
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const float m = mask[row + t];
    if (m != 0.f) acc += m;
  }
  acc = block_sum1(acc, scratch);
  if (threadIdx.x == 0) counts[blockIdx.x] = acc;
}

/// One block per row; `counts` may be null.
extern "C" __global__ void masked_row_sum_f32(const float* x, const float* mask, int T,
                                              float* sums, float* counts) {
  __shared__ double scratch[2 * RL_WARP];
  const long long row = (long long)blockIdx.x * T;
  double v[2] = {0.0, 0.0};
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const float m = mask[row + t];
    if (m != 0.f) {
      v[0] += (double)m * x[row + t];
      v[1] += m;
    }
  }
  block_sum<2>(v, scratch);
  if (threadIdx.x == 0) {
    sums[blockIdx.x] = (float)v[0];
    if (counts) counts[blockIdx.x] = (float)v[1];
  }
}

/// One thread per token, n = B·T.
extern "C" __global__ void masked_row_sum_bwd_f32(float* dx, const float* dsums, const float* mask,
                                                  int n, int T) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float m = mask[i];
  if (m != 0.f) dx[i] += m * dsums[i / T];
}

/// One block: out[j] = Σ_r partials[r·k + j] for each of the k columns.
extern "C" __global__ void sum_partials_f64(const double* partials, int rows, int k,
                                            double* out) {
  __shared__ double scratch[RL_WARP];
  for (int j = 0; j < k; ++j) {
    double acc = 0.0;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) acc += partials[(long long)r * k + j];
    acc = block_sum1(acc, scratch);
    if (threadIdx.x == 0) out[j] = acc;
  }
}
