// common.cuh: the one header every kernel file includes; nothing else is ever included.
//
// It needs no CUDA header, so the same sources compile three ways: under NVRTC for the device,
// under NVRTC again in `tests/nvrtc.rs` (sm_80 and sm_90), and under g++ against the emulation
// shim (`kernels/emu/cuda_emu.h`, included first) for the CPU tests. What that asks of the code:
// - half-precision values are raw 16-bit patterns in tag structs, converted here by bit
//   manipulation with round-to-nearest-even (the `half` crate's results, bit for bit);
// - helper functions are `__device__` and never `static` (the shim makes them static itself);
// - block-wide reductions use warp shuffles and `__syncthreads` only, in a fixed tree, so a
//   result never depends on the order threads run in: no float atomics on results;
// - blocks are a whole number of warps (the host plans in `src/backend/emu/plan.rs` launch them so);
// - no inline PTX, `cp.async` or cooperative groups: the shim does not emulate them.
#pragma once

// ------------------------------------------------------------------------------------------------
// types and constants
// ------------------------------------------------------------------------------------------------

/// A bf16 value's bits (1 sign, 8 exponent, 7 mantissa bits): the top half of an f32.
struct rl_bf16 {
  unsigned short bits;
};

/// An IEEE f16 value's bits (1 sign, 5 exponent, 10 mantissa bits).
struct rl_f16 {
  unsigned short bits;
};

#define RL_FULL_MASK 0xffffffffu
#define RL_WARP 32

/// Declares `name` as the block's dynamic shared memory (the launch's shared_bytes), viewed as
/// `T[]`. A macro because the shim cannot emulate `extern __shared__` itself: it defines its own
/// version before this header is read.
#ifndef RL_DYNAMIC_SHARED
#define RL_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

/// +infinity (NVRTC has no <math.h>, hence no INFINITY).
__device__ __forceinline__ float rl_inf() { return __int_as_float(0x7f800000); }

// ------------------------------------------------------------------------------------------------
// half-precision conversions
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float x) { return x; }

__device__ __forceinline__ float to_f32(rl_bf16 x) {
  return __uint_as_float(((unsigned)x.bits) << 16);
}

/// f16 to f32 is exact: normals re-bias the exponent, subnormals are `man · 2^-24`, and a NaN
/// keeps its payload with the quiet bit set.
__device__ __forceinline__ float to_f32(rl_f16 x) {
  const unsigned sign = ((unsigned)x.bits & 0x8000u) << 16;
  const unsigned exp = ((unsigned)x.bits >> 10) & 0x1fu;
  const unsigned man = (unsigned)x.bits & 0x3ffu;
  if (exp == 0x1fu) {
    return __uint_as_float(sign | 0x7f800000u | (man ? 0x00400000u | (man << 13) : 0u));
  }
  if (exp == 0u) {
    const float v = (float)man * 5.9604644775390625e-8f;  // 2^-24: exact for man < 2^10
    return sign ? -v : v;
  }
  return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

/// f32 to bf16, rounding to nearest even; NaN stays a (quiet) NaN, overflow rounds to inf.
__device__ __forceinline__ rl_bf16 to_bf16(float f) {
  unsigned u = __float_as_uint(f);
  rl_bf16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.bits = (unsigned short)((u >> 16) | 0x0040u);
    return r;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.bits = (unsigned short)(u >> 16);
  return r;
}

/// f32 to f16, rounding to nearest even, with f16 subnormals; NaN keeps the top of its
/// payload with the quiet bit set, and anything from 65520 up becomes inf.
__device__ __forceinline__ rl_f16 to_f16(float f) {
  const unsigned x = __float_as_uint(f);
  const unsigned sign = (x >> 16) & 0x8000u;
  const unsigned ax = x & 0x7fffffffu;
  rl_f16 r;
  if (ax >= 0x7f800000u) {  // inf or NaN
    r.bits = (unsigned short)(sign | 0x7c00u |
                              (ax > 0x7f800000u ? 0x0200u | ((ax & 0x7fffffu) >> 13) : 0u));
    return r;
  }
  if (ax >= 0x477ff000u) {  // rounds past the largest finite f16, 65504
    r.bits = (unsigned short)(sign | 0x7c00u);
    return r;
  }
  if (ax < 0x38800000u) {  // below 2^-14: an f16 subnormal, in units of 2^-24
    if (ax < 0x33000000u) {  // at most 2^-25, the tie with 0, which is even
      r.bits = (unsigned short)sign;
      return r;
    }
    const unsigned e = ax >> 23;                      // 102 ..= 112
    const unsigned m = (ax & 0x7fffffu) | 0x800000u;  // 24-bit significand
    const unsigned shift = 126u - e;                  // 14 ..= 24
    unsigned h = m >> shift;
    const unsigned rem = m & ((1u << shift) - 1u);
    const unsigned half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) h += 1u;  // may carry into the smallest normal
    r.bits = (unsigned short)(sign | h);
    return r;
  }
  unsigned h = (ax - 0x38000000u) >> 13;  // re-biased exponent and the top 10 mantissa bits
  const unsigned rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1u;  // a carry bumps the exponent
  r.bits = (unsigned short)(sign | h);
  return r;
}

/// Stores an f32 as the element type of `p` (rounding to nearest even for the half types).
__device__ __forceinline__ void store_f32(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_f32(rl_bf16* p, float x) { *p = to_bf16(x); }
__device__ __forceinline__ void store_f32(rl_f16* p, float x) { *p = to_f16(x); }

// ------------------------------------------------------------------------------------------------
// 16-byte loads and stores
// ------------------------------------------------------------------------------------------------
//
// A kernel that streams a long row (the log-prob kernels over the vocabulary) reads it 16 bytes
// per thread and instruction: with 2-byte elements read one at a time, a warp's load fetches
// 64 bytes and the kernel tops out near a third of the memory bandwidth.

/// 16 bytes, aligned so that a copy of it is one vector load or store.
struct alignas(16) rl_vec16 {
  unsigned w[4];
};

/// Elements of `T` in 16 bytes.
template <typename T>
struct rl_lanes {
  static constexpr int n = 16 / sizeof(T);
};

__device__ __forceinline__ void unpack16(const rl_vec16& v, float (&z)[4]) {
  for (int k = 0; k < 4; ++k) z[k] = __uint_as_float(v.w[k]);
}

/// Element 2k is the low half of word k (little-endian).
__device__ __forceinline__ void unpack16(const rl_vec16& v, rl_bf16, float (&z)[8]) {
  for (int k = 0; k < 4; ++k) {
    z[2 * k] = __uint_as_float(v.w[k] << 16);
    z[2 * k + 1] = __uint_as_float(v.w[k] & 0xffff0000u);
  }
}

__device__ __forceinline__ void unpack16(const rl_vec16& v, rl_f16, float (&z)[8]) {
  for (int k = 0; k < 4; ++k) {
    rl_f16 lo, hi;
    lo.bits = (unsigned short)(v.w[k] & 0xffffu);
    hi.bits = (unsigned short)(v.w[k] >> 16);
    z[2 * k] = to_f32(lo);
    z[2 * k + 1] = to_f32(hi);
  }
}

/// Reads the 16 bytes at `p` (16-byte aligned) as f32 values.
__device__ __forceinline__ void load16(const float* p, float (&z)[4]) {
  unpack16(*reinterpret_cast<const rl_vec16*>(p), z);
}
template <typename H>
__device__ __forceinline__ void load16(const H* p, float (&z)[8]) {
  unpack16(*reinterpret_cast<const rl_vec16*>(p), H(), z);
}

/// Writes `z` at `p` (16-byte aligned) as `p`'s element type, rounding as [`store_f32`] does.
__device__ __forceinline__ void store16(float* p, const float (&z)[4]) {
  rl_vec16 v;
  for (int k = 0; k < 4; ++k) v.w[k] = __float_as_uint(z[k]);
  *reinterpret_cast<rl_vec16*>(p) = v;
}
template <typename H>
__device__ __forceinline__ void store16(H* p, const float (&z)[8]) {
  rl_vec16 v;
  for (int k = 0; k < 4; ++k) {
    H lo, hi;
    store_f32(&lo, z[2 * k]);
    store_f32(&hi, z[2 * k + 1]);
    v.w[k] = (unsigned)lo.bits | ((unsigned)hi.bits << 16);
  }
  *reinterpret_cast<rl_vec16*>(p) = v;
}

/// How a row of `n` elements starting at `p` splits: elements [0, head) and [tail, n) one by
/// one, [head, tail) in 16-byte vectors. `q` is a second row (or `p` again) walked in step
/// with it; where the two are not aligned alike, the whole row goes one by one.
struct rl_row_split {
  int head, tail;
};
template <typename T>
__device__ __forceinline__ rl_row_split row_split16(const T* p, const T* q, int n) {
  const unsigned long long a = (unsigned long long)p, b = (unsigned long long)q;
  rl_row_split r;
  if ((a & 15u) != (b & 15u) || (a % sizeof(T)) != 0) {
    r.head = n;
    r.tail = n;
    return r;
  }
  const int head = (int)(((16u - (a & 15u)) & 15u) / sizeof(T));
  r.head = head < n ? head : n;
  r.tail = r.head + (n - r.head) / rl_lanes<T>::n * rl_lanes<T>::n;
  return r;
}

/// Calls `f(i)` for each element a [`row_split16`] leaves to one-by-one access, spread over the
/// block's threads.
template <typename F>
__device__ __forceinline__ void for_each_unaligned(const rl_row_split& s, int n, F f) {
  for (int i = threadIdx.x; i < s.head; i += blockDim.x) f(i);
  for (int i = s.tail + threadIdx.x; i < n; i += blockDim.x) f(i);
}

// ------------------------------------------------------------------------------------------------
// deterministic reductions
// ------------------------------------------------------------------------------------------------

/// Warp sum by an xor butterfly. Each step adds the same two values on both partner lanes (IEEE
/// addition commutes), so every lane ends with the same bits.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = RL_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(RL_FULL_MASK, v, o);
  return v;
}

/// Warp maximum; every lane gets it.
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = RL_WARP / 2; o > 0; o >>= 1) {
    const T other = __shfl_xor_sync(RL_FULL_MASK, v, o);
    v = other > v ? other : v;
  }
  return v;
}

/// Sums each of `v[0..K)` over the block; every thread returns holding the block totals.
/// `scratch` is shared memory of `K * 32` elements. The first barrier lets a previous call's
/// readers finish with `scratch` before it is rewritten; the second publishes the warp sums.
template <int K, typename T>
__device__ __forceinline__ void block_sum(T (&v)[K], T* scratch) {
  const int lane = threadIdx.x % RL_WARP;
  const int warp = threadIdx.x / RL_WARP;
  const int warps = blockDim.x / RL_WARP;
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  __syncthreads();
  if (lane == 0) {
    for (int k = 0; k < K; ++k) scratch[k * RL_WARP + warp] = v[k];
  }
  __syncthreads();
  for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < warps ? scratch[k * RL_WARP + lane] : T(0));
}

/// [`block_sum`] of one value.
template <typename T>
__device__ __forceinline__ T block_sum1(T v, T* scratch) {
  T a[1] = {v};
  block_sum<1>(a, scratch);
  return a[0];
}

/// Block maximum; every thread gets it. `scratch`: shared, 32 elements.
template <typename T>
__device__ __forceinline__ T block_max(T v, T* scratch, T lowest) {
  const int lane = threadIdx.x % RL_WARP;
  const int warp = threadIdx.x / RL_WARP;
  const int warps = blockDim.x / RL_WARP;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < warps ? scratch[lane] : lowest);
}

// ------------------------------------------------------------------------------------------------
// loss helpers shared by kl.cu and ppo_loss.cu (src/backend/loss.rs names in brackets)
// ------------------------------------------------------------------------------------------------

/// [`KlEstimator`] codes.
#define RL_KL_K1 0
#define RL_KL_K2 1
#define RL_KL_K3 2

/// A KL estimator of `delta = logp - logp_ref` and its derivative w.r.t. `logp`. k3 is written
/// with expm1: it is ~delta²/2 for small delta, where `exp(-delta) + delta - 1` cancels.
__device__ __forceinline__ float kl_estimate(int estimator, float delta, float* grad) {
  if (estimator == RL_KL_K1) {
    *grad = 1.f;
    return delta;
  }
  if (estimator == RL_KL_K2) {
    *grad = delta;
    return 0.5f * delta * delta;
  }
  *grad = -expm1f(-delta);
  return expm1f(-delta) + delta;
}

/// [`Aggregation`] codes; the parameter is `num_items` for DAPO and `max_completion_length` for
/// Dr. GRPO.
#define RL_AGG_GRPO 0
#define RL_AGG_BNPO 1
#define RL_AGG_DAPO 2
#define RL_AGG_DR_GRPO 3

/// The weight of each unmasked token of a row: `Aggregation::row_weight`, counts clamped to 1.
__device__ __forceinline__ double agg_row_weight(int agg, double param, int rows,
                                                 double row_tokens, double total_tokens) {
  if (agg == RL_AGG_GRPO) return 1.0 / ((double)rows * (row_tokens > 1.0 ? row_tokens : 1.0));
  if (agg == RL_AGG_BNPO) return 1.0 / (total_tokens > 1.0 ? total_tokens : 1.0);
  if (agg == RL_AGG_DAPO) return 1.0 / (param > 1.0 ? param : 1.0);
  const double denom = (double)rows * param;
  return 1.0 / (denom > 1.0 ? denom : 1.0);
}

/// The batch's token count for BNPO (the other aggregations do not need it), summed from the
/// per-row counts in the same fixed order by every block. Uniform across the block.
__device__ __forceinline__ double agg_total_tokens(int agg, const double* counts, int rows,
                                                   double* scratch) {
  if (agg != RL_AGG_BNPO) return 0.0;
  double acc = 0.0;
  for (int r = threadIdx.x; r < rows; r += blockDim.x) acc += counts[r];
  return block_sum1(acc, scratch);
}
