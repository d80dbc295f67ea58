// matmul.cu: the bias halves of a linear layer, f32. The products themselves are cuBLAS GEMMs
// (src/backend/emu/matmul.rs describes them and the emulator runs the same descriptions).
//
// CPU ops they must match (src/backend/cpu/matmul.rs):
//   bias_rows_f32           the bias of matmul_forward: every row of out (N, OC) set to bias,
//                           or to 0 where bias is null, before the GEMM adds inp·wᵀ (beta = 1).
//   bias_grad_partial_f32   bias_backward's per-chunk column sums of dout over BIAS_GRAD_ROWS rows.
//   bias_grad_sum_f32       adds the chunks' partials into dbias one chunk after another.
//
// The bias gradient is a sum over rows: rather than float atomics (whose order, and so whose
// bits, change from run to run), each block of bias_grad_partial_f32 sums BIAS_GRAD_ROWS rows of
// blockDim columns, one column per thread in row order (coalesced reads along a row), and
// bias_grad_sum_f32 adds the partials to dbias in chunk order. That is the CPU reference's order
// exactly (32-row chunks summed from 0, then `dbias += partial` chunk by chunk), so the two agree
// to the bit.
#include "common.cuh"

/// Rows per chunk of bias_grad_partial_f32 (`BIAS_GRAD_ROWS` in src/backend/emu/matmul.rs, the
/// CPU reference's ROW_CHUNK).
#define BIAS_GRAD_ROWS 32

/// One thread per element of out (N, OC): out[r·OC + c] = bias ? bias[c] : 0.
extern "C" __global__ void bias_rows_f32(const float* bias, int N, int OC, float* out) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)N * OC) return;
  out[i] = bias ? bias[i % OC] : 0.f;
}

/// Block k·tiles + t sums columns [t·blockDim, (t+1)·blockDim) of rows
/// [k·BIAS_GRAD_ROWS, (k+1)·BIAS_GRAD_ROWS) ∩ [0, N) of dout (N, OC), one column per thread in
/// row order, into partials[k·OC + c].
extern "C" __global__ void bias_grad_partial_f32(const float* dout, int N, int OC,
                                                 float* partials) {
  const int tiles = (OC + blockDim.x - 1) / blockDim.x;
  const int chunk = blockIdx.x / tiles;
  const int c = (blockIdx.x % tiles) * blockDim.x + threadIdx.x;
  if (c >= OC) return;
  const int r0 = chunk * BIAS_GRAD_ROWS;
  const int r1 = r0 + BIAS_GRAD_ROWS < N ? r0 + BIAS_GRAD_ROWS : N;
  float acc = 0.f;
  for (int r = r0; r < r1; ++r) acc += dout[(long long)r * OC + c];
  partials[(long long)chunk * OC + c] = acc;
}

/// One thread per column: dbias[c] += partials[k·OC + c] for k = 0, 1, … in turn.
extern "C" __global__ void bias_grad_sum_f32(const float* partials, int chunks, int OC,
                                             float* dbias) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= OC) return;
  float acc = dbias[c];
  for (int k = 0; k < chunks; ++k) acc += partials[(long long)k * OC + c];
  dbias[c] = acc;
}
