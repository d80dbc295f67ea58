// rope.cu: rotary position embedding in place on the q and k heads of qkv rows (HF's rotate-half
// layout: dimension j < HD/2 pairs with j + HD/2), f32.
//
// CPU op it must match (src/backend/cpu/rope.rs):
//   rope_f32  ModelOps::rope_forward (sign = 1) and rope_backward (sign = -1, the transpose):
//             x1' = x1·cos - x2·sin, x2' = x2·cos + x1·sin, angle = pos·inv_freq[j].
//
// Rounded where the reference (and transformers) rounds: inv_freq comes from the host, computed
// there exactly as the CPU computes it; the angle is an f32 product; cos and sin are taken in f64
// and rounded to f32. One block per row: its threads fill the row's cos/sin table in shared
// memory, then rotate every (head, pair) of the row.
#include "common.cuh"

/// Largest HD/2 (`MAX_HALF` in cpu/rope.rs; the host checks it).
#define ROPE_MAX_HALF 256

/// qkv (N, W), pos (N), inv_freq (HD/2); the first `heads` (NH + KVH) heads of each row rotate.
extern "C" __global__ void rope_f32(float* qkv, const unsigned* pos, const float* inv_freq, int W,
                                    int heads, int HD, float sign) {
  __shared__ float cos_t[ROPE_MAX_HALF];
  __shared__ float sin_t[ROPE_MAX_HALF];
  const int half = HD / 2;
  const float p = (float)pos[blockIdx.x];
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    const double angle = (double)(p * inv_freq[j]);
    cos_t[j] = (float)cos(angle);
    sin_t[j] = sign * (float)sin(angle);
  }
  __syncthreads();
  float* row = qkv + (long long)blockIdx.x * W;
  for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
    const int j = i % half;
    float* x = row + (i / half) * HD;
    const float a = x[j];
    const float b = x[j + half];
    x[j] = a * cos_t[j] - b * sin_t[j];
    x[j + half] = b * cos_t[j] + a * sin_t[j];
  }
}
