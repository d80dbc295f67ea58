// elementwise.cu: the pointwise ops of the model, f32, and the KV-cache store.
//
// CPU ops they must match (src/backend/cpu/{elementwise,activation,decode}.rs):
//   add_f32             ModelOps::add: out = a + b.
//   add_inplace_f32     ModelOps::add_inplace: acc += x.
//   scale_f32           ModelOps::scale: x *= s.
//   gelu_fwd_f32        ModelOps::gelu_forward, tanh form:
//                       0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
//   gelu_bwd_f32        ModelOps::gelu_backward: dinp += gelu'(x)·dout.
//   swiglu_fwd_f32      ModelOps::swiglu_forward: out[n, i] = silu(gate)·up, rows of inp
//                       [gate (I) | up (I)].
//   swiglu_bwd_f32      ModelOps::swiglu_backward: dgate += dout·up·silu'(gate),
//                       dup += dout·silu(gate).
//   kv_cache_store_f32  DecodeOps::kv_cache_store: k and v of each qkv row into cache column
//                       t0 + t.
//   to_bf16_f32         y = bf16(x), to nearest even: the f32 activations the tensor-core
//                       attention reads (no CPU op: the CPU reference attends in f32).
//   add_bf16_f32        acc (+)= x widened from bf16: that attention's results back into f32.
//
// All but the cache store take one element per thread. `int` indices end at 2^31, so the host
// splits the views of the purely flat ones (add, add_inplace, scale, GELU) into pieces of at most
// 2^30 elements, and checks that N·I fits for SwiGLU. Each expression keeps the CPU's order of
// operations; only tanhf and expf (a few ulp from the CPU's own polynomials) and the device's FMA
// contraction make the results differ, by a few ulp.
#include "common.cuh"

/// √(2/π), the scale inside GELU's tanh (`GELU_SCALE` in cpu/activation.rs).
#define GELU_SCALE 0.7978846f
/// The cubic coefficient of the tanh approximation (`GELU_CUBIC`).
#define GELU_CUBIC 0.044715f

/// This thread's element of a flat kernel.
__device__ __forceinline__ int flat_index() { return blockIdx.x * blockDim.x + threadIdx.x; }

extern "C" __global__ void add_f32(const float* a, const float* b, int n, float* out) {
  const int i = flat_index();
  if (i < n) out[i] = a[i] + b[i];
}

extern "C" __global__ void add_inplace_f32(float* acc, const float* x, int n) {
  const int i = flat_index();
  if (i < n) acc[i] += x[i];
}

extern "C" __global__ void scale_f32(float* x, float s, int n) {
  const int i = flat_index();
  if (i < n) x[i] *= s;
}

extern "C" __global__ void gelu_fwd_f32(const float* inp, int n, float* out) {
  const int i = flat_index();
  if (i >= n) return;
  const float x = inp[i];
  const float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
  out[i] = 0.5f * x * (1.f + tanhf(u));
}

extern "C" __global__ void gelu_bwd_f32(float* dinp, const float* inp, const float* dout, int n) {
  const int i = flat_index();
  if (i >= n) return;
  const float x = inp[i];
  const float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
  const float th = tanhf(u);
  const float sech2 = 1.f - th * th;
  const float grad =
      0.5f * (1.f + th) + 0.5f * x * sech2 * GELU_SCALE * (1.f + 3.f * GELU_CUBIC * x * x);
  dinp[i] += grad * dout[i];
}

/// The logistic function, 1 / (1 + e^-x), with an accurate exp (the CPU's is within 2 ulp).
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

/// One thread per output element: out (N, I), inp (N, 2I); n = N·I.
extern "C" __global__ void swiglu_fwd_f32(const float* inp, int I, int n, float* out) {
  const int i = flat_index();
  if (i >= n) return;
  const float* gate = inp + (long long)(i / I) * 2 * I + i % I;
  const float g = gate[0];
  out[i] = g * sigmoid(g) * gate[I];
}

/// One thread per element of dout: dinp, inp (N, 2I), dout (N, I); n = N·I.
extern "C" __global__ void swiglu_bwd_f32(float* dinp, const float* inp, const float* dout, int I,
                                          int n) {
  const int i = flat_index();
  if (i >= n) return;
  const long long k = (long long)(i / I) * 2 * I + i % I;
  const float g = inp[k];
  const float u = inp[k + I];
  const float dy = dout[i];
  const float s = sigmoid(g);
  dinp[k] += dy * u * s * (1.f + g * (1.f - s));
  dinp[k + I] += dy * g * s;
}

/// One block per qkv row (B·T of them, batch-major); caches (B, KVH, TMAX, HD), rows
/// [q (NH·HD) | k (KVH·HD) | v (KVH·HD)]. Row b·T + t goes to column t0 + t of sequence b.
extern "C" __global__ void kv_cache_store_f32(const float* qkv, int T, int NH, int KVH, int HD,
                                              int t0, int TMAX, float* k_cache, float* v_cache) {
  const int b = blockIdx.x / T;
  const int t = blockIdx.x % T;
  const int width = KVH * HD;
  const float* k = qkv + (long long)blockIdx.x * (NH * HD + 2 * width) + NH * HD;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const int h = i / HD;
    const long long dst = (((long long)b * KVH + h) * TMAX + t0 + t) * HD + i % HD;
    k_cache[dst] = k[i];
    v_cache[dst] = k[width + i];
  }
}

extern "C" __global__ void to_bf16_f32(const float* x, int n, rl_bf16* y) {
  const int i = flat_index();
  if (i < n) y[i] = to_bf16(x[i]);
}

/// `accumulate` 0 overwrites `acc`, which may hold anything (NaN included), else adds to it.
extern "C" __global__ void add_bf16_f32(float* acc, const rl_bf16* x, int accumulate, int n) {
  const int i = flat_index();
  if (i < n) acc[i] = accumulate ? acc[i] + to_f32(x[i]) : to_f32(x[i]);
}
