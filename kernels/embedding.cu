// embedding.cu: token (or position) embedding lookup and its gradient, f32.
//
// CPU ops they must match (src/backend/cpu/elementwise.rs):
//   embedding_fwd_f32  ModelOps::embedding_forward: out[n] = table[ids[n]] (+= when accumulating).
//   embedding_bwd_f32  ModelOps::embedding_backward: dtable[ids[n]] += dout[n].
//
// The backward must not race where ids repeat, and must be deterministic, so it takes no atomics:
// the host groups the positions by id (CSR: the distinct ids, where each one's positions start,
// and the positions in increasing n), and one thread per (distinct id, column) adds that id's rows
// one after another in increasing n, onto the table's value — the CPU's sequential order, so the
// same bits as the reference.
#include "common.cuh"

/// One block per row: out (N, C), table (rows, C), ids (N) < rows (checked by the host).
extern "C" __global__ void embedding_fwd_f32(const float* table, const unsigned* ids, int C,
                                             int accumulate, float* out) {
  float* o = out + (long long)blockIdx.x * C;
  const float* src = table + (long long)ids[blockIdx.x] * C;
  for (int i = threadIdx.x; i < C; i += blockDim.x) o[i] = accumulate ? o[i] + src[i] : src[i];
}

/// Block r·tiles + t adds, for columns [t·blockDim, (t+1)·blockDim), the rows of dout at
/// positions[starts[r] .. starts[r+1]) onto dtable[rows[r]], in that order.
extern "C" __global__ void embedding_bwd_f32(const float* dout, const unsigned* rows,
                                             const unsigned* starts, const unsigned* positions,
                                             int C, int tiles, float* dtable) {
  const int r = blockIdx.x / tiles;
  const int c = (blockIdx.x % tiles) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float* dst = dtable + (long long)rows[r] * C + c;
  float acc = *dst;
  for (unsigned k = starts[r]; k < starts[r + 1]; ++k) acc += dout[(long long)positions[k] * C + c];
  *dst = acc;
}
