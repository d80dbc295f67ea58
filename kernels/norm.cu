// norm.cu: RMSNorm and LayerNorm over the last dimension, forward and backward, f32.
//
// CPU ops they must match (src/backend/cpu/norm.rs):
//   rmsnorm_fwd_f32       rmsnorm_forward: out = w·(x·rstd), rstd = 1/sqrt(mean(x²) + eps).
//   layernorm_fwd_f32     layernorm_forward: out = (x - mean)·rstd·w + b, biased variance, two
//                         passes (mean, then squared deviations).
//   rmsnorm_bwd_dx_f32    the dinp half of rmsnorm_backward (added to).
//   layernorm_bwd_dx_f32  the dinp half of layernorm_backward (added to).
//   norm_dw_partial_f32   the dw half of both: Σ_rows dout·x̂ over a fixed chunk of rows, per
//                         column, with x̂ = (x - mean)·rstd (mean null for RMSNorm).
//   norm_dw_sum_f32       adds the chunks' partials into dw in chunk order.
//
// Row kernels run one block per row and accumulate in f32 through the fixed shuffle tree of
// block_sum. The weight gradient is a sum over rows: rather than float atomics (whose order, and
// so whose bits, change from run to run), each block of norm_dw_partial_f32 sums NORM_DW_ROWS rows
// of NORM_DW_COLS columns, one column per thread in row order, and norm_dw_sum_f32 adds those
// partials in chunk order: the same bits on every run, with coalesced reads along a row.
#include "common.cuh"

/// Rows per chunk of norm_dw_partial_f32 (`NORM_DW_ROWS` in src/backend/emu/plan.rs).
#define NORM_DW_ROWS 64

/// One block per row: out (N, C), rstd (N).
extern "C" __global__ void rmsnorm_fwd_f32(const float* inp, const float* w, int C, float eps,
                                           float* out, float* rstd) {
  __shared__ float scratch[RL_WARP];
  const long long row = (long long)blockIdx.x * C;
  const float* x = inp + row;
  float ss = 0.f;
  for (int i = threadIdx.x; i < C; i += blockDim.x) ss += x[i] * x[i];
  ss = block_sum1(ss, scratch);
  const float rs = 1.f / sqrtf(ss / (float)C + eps);
  for (int i = threadIdx.x; i < C; i += blockDim.x) out[row + i] = w[i] * (x[i] * rs);
  if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
}

/// One block per row: out (N, C), mean (N), rstd (N).
extern "C" __global__ void layernorm_fwd_f32(const float* inp, const float* w, const float* b,
                                             int C, float eps, float* out, float* mean,
                                             float* rstd) {
  __shared__ float scratch[RL_WARP];
  const long long row = (long long)blockIdx.x * C;
  const float* x = inp + row;
  float s = 0.f;
  for (int i = threadIdx.x; i < C; i += blockDim.x) s += x[i];
  const float mu = block_sum1(s, scratch) / (float)C;
  float v = 0.f;
  for (int i = threadIdx.x; i < C; i += blockDim.x) v += (x[i] - mu) * (x[i] - mu);
  const float var = block_sum1(v, scratch) / (float)C;
  const float rs = 1.f / sqrtf(var + eps);
  for (int i = threadIdx.x; i < C; i += blockDim.x) out[row + i] = (x[i] - mu) * rs * w[i] + b[i];
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = mu;
    rstd[blockIdx.x] = rs;
  }
}

/// One block per row: dinp += (w·dy - x̂·mean(w·dy·x̂))·rstd, x̂ = x·rstd.
extern "C" __global__ void rmsnorm_bwd_dx_f32(const float* dout, const float* inp, const float* w,
                                              const float* rstd, int C, float* dinp) {
  __shared__ float scratch[RL_WARP];
  const long long row = (long long)blockIdx.x * C;
  const float rs = rstd[blockIdx.x];
  float d = 0.f;
  for (int i = threadIdx.x; i < C; i += blockDim.x) d += w[i] * dout[row + i] * (inp[row + i] * rs);
  const float dnn = block_sum1(d, scratch) / (float)C;
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    const float norm = inp[row + i] * rs;
    dinp[row + i] += (w[i] * dout[row + i] - norm * dnn) * rs;
  }
}

/// One block per row: dinp += (w·dy - mean(w·dy) - x̂·mean(w·dy·x̂))·rstd, x̂ = (x - mean)·rstd.
extern "C" __global__ void layernorm_bwd_dx_f32(const float* dout, const float* inp,
                                                const float* w, const float* mean,
                                                const float* rstd, int C, float* dinp) {
  __shared__ float scratch[2 * RL_WARP];
  const long long row = (long long)blockIdx.x * C;
  const float mu = mean[blockIdx.x];
  const float rs = rstd[blockIdx.x];
  float v[2] = {0.f, 0.f};
  // w·dy is rounded on its own (__fmul_rn: never fused into an FMA) in both loops, so that
  // w·dy - mean(w·dy) is exactly 0 where C = 1, as on the CPU; an FMA would leave the product's
  // rounding error, times rstd = 1/sqrt(eps).
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    const float dn = __fmul_rn(w[i], dout[row + i]);
    v[0] += dn;
    v[1] += dn * ((inp[row + i] - mu) * rs);
  }
  block_sum<2>(v, scratch);
  const float dn_mean = v[0] / (float)C;
  const float dnn = v[1] / (float)C;
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    const float norm = (inp[row + i] - mu) * rs;
    dinp[row + i] += (__fmul_rn(w[i], dout[row + i]) - dn_mean - norm * dnn) * rs;
  }
}

/// Block k·tiles + t sums columns [t·blockDim, (t+1)·blockDim) of rows
/// [k·NORM_DW_ROWS, (k+1)·NORM_DW_ROWS) ∩ [0, N), one column per thread in row order, into
/// partials[k·C + c]. `mean` is null for RMSNorm.
extern "C" __global__ void norm_dw_partial_f32(const float* dout, const float* inp,
                                               const float* mean, const float* rstd, int N, int C,
                                               float* partials) {
  const int tiles = (C + blockDim.x - 1) / blockDim.x;
  const int chunk = blockIdx.x / tiles;
  const int c = (blockIdx.x % tiles) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int r0 = chunk * NORM_DW_ROWS;
  const int r1 = r0 + NORM_DW_ROWS < N ? r0 + NORM_DW_ROWS : N;
  float acc = 0.f;
  for (int r = r0; r < r1; ++r) {
    const long long i = (long long)r * C + c;
    const float mu = mean ? mean[r] : 0.f;
    acc += dout[i] * ((inp[i] - mu) * rstd[r]);
  }
  partials[(long long)chunk * C + c] = acc;
}

/// One thread per column: dw[c] += Σ_k partials[k·C + c], k in order.
extern "C" __global__ void norm_dw_sum_f32(const float* partials, int chunks, int C, float* dw) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0.f;
  for (int k = 0; k < chunks; ++k) acc += partials[(long long)k * C + c];
  dw[c] += acc;
}
