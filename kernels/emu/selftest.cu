// selftest.cu: kernels that exercise the emulation shim itself (tests/kernels_emu.rs runs them),
// each checking one feature against CUDA's documented semantics. Plain CUDA, so tests/nvrtc.rs
// compiles them too: the shim is held to what the real compiler accepts.
#include "../common.cuh"

// CUDA's warp matrix API; under g++, the shim's (mma.h beside this file).
#include <mma.h>

using namespace nvcuda;

/// One value per lane through each shuffle; out: (blockDim.x, 6) ints.
extern "C" __global__ void selftest_shuffles_i32(int* out) {
  const int v = 100 + (int)threadIdx.x;
  int* o = out + threadIdx.x * 6;
  o[0] = __shfl_sync(RL_FULL_MASK, v, 3);
  o[1] = __shfl_sync(RL_FULL_MASK, v, 5, 8);
  o[2] = __shfl_up_sync(RL_FULL_MASK, v, 2);
  o[3] = __shfl_down_sync(RL_FULL_MASK, v, 5, 16);
  o[4] = __shfl_xor_sync(RL_FULL_MASK, v, 9, 8);
  o[5] = (int)__ballot_sync(RL_FULL_MASK, threadIdx.x % 3 == 0);
}

/// Integer atomics from every thread of every block: count[0] += 1, count[1] -= 2,
/// count[2] = max(gid), count[3] = min(gid).
extern "C" __global__ void selftest_atomics_i32(int* count) {
  const int gid = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&count[0], 1);
  atomicSub(&count[1], 2);
  atomicMax(&count[2], gid);
  atomicMin(&count[3], gid);
}

/// Reverses each block's slice of x through dynamic shared memory (blockDim.x floats).
extern "C" __global__ void selftest_dynamic_shared_f32(const float* x, float* out) {
  RL_DYNAMIC_SHARED(float, buf);
  const int base = blockIdx.x * blockDim.x;
  buf[threadIdx.x] = x[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

/// Reads static shared memory nobody wrote: the shim's fill makes that NaN.
extern "C" __global__ void selftest_uninit_shared_f32(float* out) {
  __shared__ float never_written[RL_WARP];
  out[threadIdx.x] = never_written[threadIdx.x % RL_WARP];
}

/// Half a warp at __syncthreads, the other half in a shuffle: a deadlock on any GPU.
extern "C" __global__ void selftest_deadlock_i32(int* out) {
  int v = (int)threadIdx.x;
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(RL_FULL_MASK, v, 1);
  }
  out[threadIdx.x] = v;
}

/// The common.cuh conversions over n values: f32 -> bf16/f16 bits, and 16-bit patterns -> f32.
extern "C" __global__ void selftest_convert_f32(const float* x, const rl_bf16* bf, const rl_f16* hf,
                                                int n, rl_bf16* to_bf, rl_f16* to_hf,
                                                float* from_bf, float* from_hf) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    to_bf[i] = to_bf16(x[i]);
    to_hf[i] = to_f16(x[i]);
    from_bf[i] = to_f32(bf[i]);
    from_hf[i] = to_f32(hf[i]);
  }
}

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> selftest_acc;

/// One warp: D = A·B + C through wmma, staged in dynamic shared memory (768 floats), with
/// every layout option: A (16x16 bf16) row-major, B given column-major (b[n·16 + k] = B[k][n]), C
/// (f32) loaded column-major (c[n·16 + m] = C[m][n]), D stored row-major.
extern "C" __global__ void selftest_wmma_mma_bf16(const rl_bf16* a, const rl_bf16* b,
                                                  const float* c, float* d) {
  RL_DYNAMIC_SHARED(float, smem);
  float* cs = smem;        // [256]: C, then D
  float* ds = smem + 256;  // [256]
  rl_bf16* as = reinterpret_cast<rl_bf16*>(smem + 512);  // [256]
  rl_bf16* bs = as + 256;                                 // [256]
  for (int e = threadIdx.x; e < 256; e += blockDim.x) {
    as[e] = a[e];
    bs[e] = b[e];
    cs[e] = c[e];
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  selftest_acc fc;
  wmma::load_matrix_sync(fa, reinterpret_cast<const __nv_bfloat16*>(as), 16);
  wmma::load_matrix_sync(fb, reinterpret_cast<const __nv_bfloat16*>(bs), 16);
  wmma::load_matrix_sync(fc, cs, 16, wmma::mem_col_major);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(ds, fc, 16, wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x; e < 256; e += blockDim.x) d[e] = ds[e];
}

/// One warp: loads a 16x16 f32 tile (row-major) into an accumulator fragment, doubles x[0] only
/// and stores it back: a kernel that assumes which element x[0] is, here (l / 4, 2·(l % 4)) for
/// lane l, as on sm_80 (32 elements double); the shim's layout differs (one element doubles), and
/// tests/attention_kernels.rs shows the difference. Dynamic shared memory:
/// 256 floats.
extern "C" __global__ void selftest_wmma_x0_f32(const float* x, float* out) {
  RL_DYNAMIC_SHARED(float, tile);
  for (int e = threadIdx.x; e < 256; e += blockDim.x) tile[e] = x[e];
  __syncwarp();
  selftest_acc f;
  wmma::load_matrix_sync(f, tile, 16, wmma::mem_row_major);
  f.x[0] *= 2.f;
  wmma::store_matrix_sync(tile, f, 16, wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x; e < 256; e += blockDim.x) out[e] = tile[e];
}
