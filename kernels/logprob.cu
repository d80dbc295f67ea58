// logprob.cu: fused log-softmax + gather of the target token's log-prob, with the entropy and a
// temperature, forward and backward.
//
// CPU op it must match: `ModelOps::logprobs_forward` / `logprobs_backward`
// (src/backend/cpu/logprob.rs). With z = logits / temperature, per row of V logits:
//   lse = log Σ e^z,  logp = z[target] - lse,  H = -Σ p·log p  (p = softmax z),
//   dlogits += (dlogp·(onehot - p) - dH·p·(log p + H)) / temperature.
//
// Kernels (one block per row, any block size that is a whole number of warps):
//   logprob_fwd_{f32,bf16,f16}(logits, targets, V, temperature, logp, entropy?, lse)
//   logprob_bwd_{f32,bf16,f16}(dlogits, logits, targets, lse, dlogp, dentropy?, V, temperature)
// Logits (and dlogits) are f32, bf16 or f16; everything else is f32, and all arithmetic is f32.
//
// Nothing of size V is stored (DESIGN.md principle 4): the forward streams the row once, 16 bytes
// per load (common.cuh's row_split16), each thread keeping an online softmax (running max m,
// s = Σ e^(z-m), t = Σ e^(z-m)·(z-m)) over its strided share, and the block merges the
// per-thread triples in a fixed tree. Then lse = m + ln s and H = ln s - t/s (relative to the
// max, so no two large numbers are subtracted). The backward recomputes p from the saved lse,
// and H (one extra pass) only where dH != 0.
//
// Arithmetic per logit is kept to a few instructions so that the kernels stay memory-bound: the
// forward works in base 2 inside its loop (one multiply by log2(e)/temperature, one exp2, and
// one max and rescale per 16-byte chunk rather than per logit); the backward uses __expf
// (ex2.approx after one multiply), whose ~1e-6 errors fall on tiny terms.
#include "common.cuh"

/// Running softmax statistics of a set of tempered logits, relative to their max `m`.
struct OnlineSoftmax {
  float m;  // running max (-inf while empty)
  float s;  // Σ e^(z-m)
  float t;  // Σ e^(z-m)·(z-m)
};

/// Rescales `a` to the max `m` (>= a.m) and adds it to (s, t).
__device__ __forceinline__ void softmax_add_rescaled(const OnlineSoftmax& a, float m, float& s,
                                                     float& t) {
  if (a.s > 0.f) {
    const float d = a.m - m;
    const float alpha = __expf(d);
    s += alpha * a.s;
    t += alpha * (a.t + d * a.s);
  }
}

/// Merges two triples; `lo` and `hi` are ordered by lane (or warp) so that both partners of a
/// butterfly step compute the same bits.
__device__ __forceinline__ OnlineSoftmax softmax_merge(const OnlineSoftmax& lo,
                                                       const OnlineSoftmax& hi) {
  OnlineSoftmax r;
  r.m = fmaxf(lo.m, hi.m);
  r.s = 0.f;
  r.t = 0.f;
  softmax_add_rescaled(lo, r.m, r.s, r.t);
  softmax_add_rescaled(hi, r.m, r.s, r.t);
  return r;
}

__device__ __forceinline__ OnlineSoftmax warp_softmax_merge(OnlineSoftmax a) {
  const int lane = threadIdx.x % RL_WARP;
  for (int o = RL_WARP / 2; o > 0; o >>= 1) {
    OnlineSoftmax b;
    b.m = __shfl_xor_sync(RL_FULL_MASK, a.m, o);
    b.s = __shfl_xor_sync(RL_FULL_MASK, a.s, o);
    b.t = __shfl_xor_sync(RL_FULL_MASK, a.t, o);
    a = (lane & o) ? softmax_merge(b, a) : softmax_merge(a, b);
  }
  return a;
}

/// The block's merged triple; every thread gets it. One barrier only: each kernel calls this
/// once, so the shared slots are never rewritten while being read.
__device__ __forceinline__ OnlineSoftmax block_softmax_merge(OnlineSoftmax a) {
  __shared__ float sm[RL_WARP], ss[RL_WARP], st[RL_WARP];
  const int lane = threadIdx.x % RL_WARP;
  const int warp = threadIdx.x / RL_WARP;
  const int warps = blockDim.x / RL_WARP;
  a = warp_softmax_merge(a);
  if (lane == 0) {
    sm[warp] = a.m;
    ss[warp] = a.s;
    st[warp] = a.t;
  }
  __syncthreads();
  OnlineSoftmax w;
  w.m = lane < warps ? sm[lane] : -rl_inf();
  w.s = lane < warps ? ss[lane] : 0.f;
  w.t = lane < warps ? st[lane] : 0.f;
  return warp_softmax_merge(w);
}

/// Adds a chunk of logits already multiplied by log2(e)/temperature, in base-2 units (m, s, t
/// of [`OnlineSoftmax`] with 2^ for e^): one max and at most one rescale per chunk, then one
/// exp2 per element. A -inf or NaN logit gives d = NaN or -inf, clamped to -256, whose exp2 is 0
/// (so it adds nothing, and 0·d stays 0).
template <int N>
__device__ __forceinline__ void softmax_push2(OnlineSoftmax& a, const float (&z)[N]) {
  float cm = z[0];
  for (int k = 1; k < N; ++k) cm = fmaxf(cm, z[k]);
  if (cm > a.m) {
    if (a.s > 0.f) {
      const float d = a.m - cm;
      const float alpha = exp2f(d);
      a.t = alpha * (a.t + d * a.s);
      a.s *= alpha;
    }
    a.m = cm;
  }
  for (int k = 0; k < N; ++k) {
    const float d = fmaxf(z[k] - a.m, -256.f);
    const float e = exp2f(d);
    a.s += e;
    a.t = fmaf(e, d, a.t);
  }
}

template <typename T>
__device__ __forceinline__ void logprob_fwd(const T* __restrict__ logits,
                                            const unsigned* __restrict__ targets, int V,
                                            float temperature, float* __restrict__ logp,
                                            float* __restrict__ entropy, float* __restrict__ lse) {
  constexpr int L = rl_lanes<T>::n;
  const long long row = blockIdx.x;
  const T* x = logits + row * V;
  // Base-2 units inside the loop (one multiply and one exp2 per logit); natural units after.
  const float scale = 1.4426950408889634f / temperature;
  OnlineSoftmax acc;
  acc.m = -rl_inf();
  acc.s = 0.f;
  acc.t = 0.f;
  const rl_row_split split = row_split16(x, x, V);
  for_each_unaligned(split, V, [&](int i) {
    const float z[1] = {to_f32(x[i]) * scale};
    softmax_push2(acc, z);
  });
  // Two vectors in flight per thread, so enough bytes are outstanding to cover memory latency.
  const int vectors = (split.tail - split.head) / L;
  const T* body = x + split.head;
  int j = threadIdx.x;
  for (; j + (int)blockDim.x < vectors; j += 2 * blockDim.x) {
    float z0[L], z1[L];
    load16(body + (long long)j * L, z0);
    load16(body + (long long)(j + blockDim.x) * L, z1);
    for (int k = 0; k < L; ++k) {
      z0[k] *= scale;
      z1[k] *= scale;
    }
    softmax_push2(acc, z0);
    softmax_push2(acc, z1);
  }
  if (j < vectors) {
    float z0[L];
    load16(body + (long long)j * L, z0);
    for (int k = 0; k < L; ++k) z0[k] *= scale;
    softmax_push2(acc, z0);
  }
  const float ln2 = 0.6931471805599453f;
  acc.m *= ln2;
  acc.t *= ln2;
  acc = block_softmax_merge(acc);
  if (threadIdx.x == 0) {
    const float ln_s = logf(acc.s);
    const float l = acc.m + ln_s;
    lse[row] = l;
    logp[row] = to_f32(x[targets[row]]) / temperature - l;
    if (entropy) entropy[row] = ln_s - acc.t / acc.s;
  }
}

/// One element of the backward: dz - (p·(dlogp + dH·(c + H)) - [target]·dlogp) / temperature,
/// with c = z - lse = log p.
__device__ __forceinline__ float logprob_grad(float x, float dz, float inv_t, float l, float dl,
                                              float dh, float h, bool is_target) {
  const float c = x * inv_t - l;
  const float p = __expf(c);
  const float g = p > 0.f ? p * (dl + dh * (c + h)) : 0.f;  // 0 where a logit is -inf
  float d = dz - g * inv_t;
  if (is_target) d += dl * inv_t;
  return d;
}

template <typename T>
__device__ __forceinline__ void logprob_bwd(T* __restrict__ dlogits, const T* __restrict__ logits,
                                            const unsigned* __restrict__ targets,
                                            const float* __restrict__ lse,
                                            const float* __restrict__ dlogp,
                                            const float* __restrict__ dentropy, int V,
                                            float temperature) {
  constexpr int L = rl_lanes<T>::n;
  __shared__ float scratch[RL_WARP];
  const long long row = blockIdx.x;
  const T* x = logits + row * V;
  T* dz = dlogits + row * V;
  const float l = lse[row];
  const float dl = dlogp[row];
  const float dh = dentropy ? dentropy[row] : 0.f;
  const float inv_t = 1.f / temperature;
  const rl_row_split split = row_split16(x, (const T*)dz, V);
  const int vectors = (split.tail - split.head) / L;
  // H = -Σ p·log p from the saved lse; skipped (uniformly over the block) when dH = 0.
  float h = 0.f;
  if (dh != 0.f) {
    float acc = 0.f;
    // p = 0 where a logit is -inf, and 0·(-inf) is NaN.
    const auto add = [&](float z) {
      const float c = z * inv_t - l;
      const float p = __expf(c);
      if (p > 0.f) acc += p * c;
    };
    for_each_unaligned(split, V, [&](int i) { add(to_f32(x[i])); });
    for (int j = threadIdx.x; j < vectors; j += blockDim.x) {
      float z[L];
      load16(x + split.head + (long long)j * L, z);
      for (int k = 0; k < L; ++k) add(z[k]);
    }
    h = -block_sum1(acc, scratch);
  }
  const unsigned target = targets[row];
  for_each_unaligned(split, V, [&](int i) {
    store_f32(&dz[i], logprob_grad(to_f32(x[i]), to_f32(dz[i]), inv_t, l, dl, dh, h,
                                   (unsigned)i == target));
  });
  for (int j = threadIdx.x; j < vectors; j += blockDim.x) {
    const long long i0 = split.head + (long long)j * L;
    float z[L], d[L];
    load16(x + i0, z);
    load16((const T*)dz + i0, d);
    for (int k = 0; k < L; ++k) {
      d[k] = logprob_grad(z[k], d[k], inv_t, l, dl, dh, h, (unsigned long long)(i0 + k) == target);
    }
    store16(dz + i0, d);
  }
}

extern "C" __global__ void logprob_fwd_f32(const float* logits, const unsigned* targets, int V,
                                           float temperature, float* logp, float* entropy,
                                           float* lse) {
  logprob_fwd(logits, targets, V, temperature, logp, entropy, lse);
}

extern "C" __global__ void logprob_fwd_bf16(const rl_bf16* logits, const unsigned* targets, int V,
                                            float temperature, float* logp, float* entropy,
                                            float* lse) {
  logprob_fwd(logits, targets, V, temperature, logp, entropy, lse);
}

extern "C" __global__ void logprob_fwd_f16(const rl_f16* logits, const unsigned* targets, int V,
                                           float temperature, float* logp, float* entropy,
                                           float* lse) {
  logprob_fwd(logits, targets, V, temperature, logp, entropy, lse);
}

extern "C" __global__ void logprob_bwd_f32(float* dlogits, const float* logits,
                                           const unsigned* targets, const float* lse,
                                           const float* dlogp, const float* dentropy, int V,
                                           float temperature) {
  logprob_bwd(dlogits, logits, targets, lse, dlogp, dentropy, V, temperature);
}

extern "C" __global__ void logprob_bwd_bf16(rl_bf16* dlogits, const rl_bf16* logits,
                                            const unsigned* targets, const float* lse,
                                            const float* dlogp, const float* dentropy, int V,
                                            float temperature) {
  logprob_bwd(dlogits, logits, targets, lse, dlogp, dentropy, V, temperature);
}

extern "C" __global__ void logprob_bwd_f16(rl_f16* dlogits, const rl_f16* logits,
                                           const unsigned* targets, const float* lse,
                                           const float* dlogp, const float* dentropy, int V,
                                           float temperature) {
  logprob_bwd(dlogits, logits, targets, lse, dlogp, dentropy, V, temperature);
}
