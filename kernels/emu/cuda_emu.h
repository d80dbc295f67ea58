// cuda_emu.h: just enough of CUDA for g++ to compile the kernels in kernels/*.cu unchanged and run
// them on the CPU (DESIGN.md principle 3). build.rs compiles, per kernel file, a translation unit
// that includes this header, then the .cu file, then one EMU_KERNEL(name) launch entry per kernel.
//
// Execution model (kernels/emu/runtime.cpp): one fiber per CUDA thread (ucontext), blocks one
// after another on the calling OS thread. A fiber runs until it reaches a barrier
// (`__syncthreads`, or the warp barrier inside every shuffle, ballot and `__syncwarp`), so that
// memory effects between barriers are atomic, as a correct kernel may assume and no more. To
// expose kernels that assume more, the runtime
// - resumes the threads released by a barrier in a seeded random order, and
// - fills static and dynamic shared memory with 0xff bytes (NaN as f32 and f64, -1 as int)
//   when a block starts.
// Launches are serialised process-wide: static `__shared__` variables live in one linker section
// (`emu_shared`) that the runtime refills for each block.
//
// Emulated: threadIdx/blockIdx/blockDim/gridDim; static `__shared__` and dynamic shared memory
// (`RL_DYNAMIC_SHARED`); `__syncthreads`, `__syncwarp`; `__shfl{,_up,_down,_xor}_sync` (any
// width), `__ballot_sync`; atomicAdd/Sub/Max/Min (a fiber never switches inside one, so plain
// read-modify-writes are atomic); the fast-math intrinsics and bit casts the kernels use. Not emulated: inline PTX, cp.async, cooperative groups, textures, streams.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------------------------
// built-in variables and qualifiers
// ------------------------------------------------------------------------------------------------

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
};

namespace emu {
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void* dynamic_shared();
void syncthreads();
void syncwarp(unsigned mask);
/// Writes `bits` to this lane's exchange slot, waits for the warp, and returns lane `src`'s.
unsigned long long exchange(unsigned mask, unsigned long long bits, int src);
unsigned ballot(unsigned mask, bool pred);
unsigned lane_id();
}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define warpSize 32

// Kernels are `extern "C" __global__`, so their names stay unmangled, as under NVRTC. Device
// functions become `static`: two kernel files may each define a helper of the same name.
#define __global__
#define __device__ static
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// (No `__noinline__`: libstdc++ spells GCC's attribute that way, so the macro would break it.)
#define __launch_bounds__(...)
// Every static `__shared__` variable lands in one section, which the runtime finds through the
// linker's __start_/__stop_ symbols and fills with 0xff at each block start.
#define __shared__ static __attribute__((section("emu_shared")))
#define RL_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::emu::dynamic_shared())

// ------------------------------------------------------------------------------------------------
// synchronisation and warp intrinsics
// ------------------------------------------------------------------------------------------------

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::syncwarp(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

namespace emu {
template <typename T>
inline T shuffle(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  unsigned long long bits = 0;
  memcpy(&bits, &v, sizeof(T));
  bits = exchange(mask, bits, src);
  T r;
  memcpy(&r, &bits, sizeof(T));
  return r;
}
}  // namespace emu

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = (int)::emu::lane_id();
  return ::emu::shuffle(mask, v, (lane & ~(width - 1)) + (src_lane & (width - 1)));
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = (int)::emu::lane_id();
  const int src = (lane & (width - 1)) >= (int)delta ? lane - (int)delta : lane;
  return ::emu::shuffle(mask, v, src);
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = (int)::emu::lane_id();
  const int src = (lane & (width - 1)) + (int)delta < width ? lane + (int)delta : lane;
  return ::emu::shuffle(mask, v, src);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = (int)::emu::lane_id();
  int src = lane ^ lane_mask;
  // A lane of a later width-group is out of reach: the caller keeps its own value.
  if (src >= ((lane / width) + 1) * width) src = lane;
  return ::emu::shuffle(mask, v, src);
}

inline unsigned __ballot_sync(unsigned mask, int pred) { return ::emu::ballot(mask, pred != 0); }

// ------------------------------------------------------------------------------------------------
// atomics: fibers switch only at barriers, so a plain read-modify-write cannot be interleaved
// ------------------------------------------------------------------------------------------------

template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicSub(T* p, T v) {
  const T old = *p;
  *p = old - v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = v > old ? v : old;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}

// ------------------------------------------------------------------------------------------------
// intrinsics
// ------------------------------------------------------------------------------------------------

inline float __int_as_float(int x) {
  float f;
  memcpy(&f, &x, 4);
  return f;
}
inline float __uint_as_float(unsigned x) {
  float f;
  memcpy(&f, &x, 4);
  return f;
}
inline int __float_as_int(float f) {
  int x;
  memcpy(&x, &f, 4);
  return x;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  memcpy(&x, &f, 4);
  return x;
}
// The fast intrinsics as the hardware computes them: one f32 multiply into the base-2 function,
// so their range-reduction error shows up here too.
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
inline float __logf(float x) { return log2f(x) * 0.6931471805599453f; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
// A product rounded on its own, never fused into an fma: g++ in ISO C++ mode contracts nothing.
inline float __fmul_rn(float a, float b) { return a * b; }

// ------------------------------------------------------------------------------------------------
// launching
// ------------------------------------------------------------------------------------------------

namespace emu {

/// One launch's configuration, as the Rust launcher (src/backend/emu/shim.rs) lays it out.
struct Launch {
  unsigned grid[3];
  unsigned block[3];
  unsigned shared_bytes;
  /// 0, or k: every thread skips its k-th `__syncthreads` (tests show the race it opens).
  unsigned drop_sync;
  /// Seeds the order threads resume in after each barrier.
  unsigned long long seed;
};

/// Runs `body(ctx)` as every thread of every block; 0 on success, else an error in `err`.
int run(const char* kernel, const Launch* cfg, void (*body)(void*), void* ctx, char* err,
        size_t err_len);

/// The signature code of a kernel parameter type: pointer, 32-bit integer, f32 or f64.
template <typename T>
constexpr char arg_code() {
  return std::is_pointer<T>::value                                  ? 'p'
         : (std::is_same<T, int>::value || std::is_same<T, unsigned>::value) ? 'i'
         : std::is_same<T, float>::value                            ? 'f'
         : std::is_same<T, double>::value                           ? 'd'
                                                                     : '?';
}

template <typename... Args, size_t... I>
std::tuple<Args...> unpack(void** args, std::index_sequence<I...>) {
  return std::tuple<Args...>(*static_cast<Args*>(args[I])...);
}

/// Checks the caller's argument signature against the kernel's, unpacks `args` (pointers to
/// each argument, as cuLaunchKernel takes them) and runs the kernel.
template <typename... Args>
int launch(const char* name, void (*kernel)(Args...), const Launch* cfg, const char* sig,
           void** args, char* err, size_t err_len) {
  static const char expect[] = {arg_code<Args>()..., '\0'};
  if (strcmp(sig, expect) != 0) {
    snprintf(err, err_len, "%s: argument signature %s, the kernel takes %s", name, sig, expect);
    return 1;
  }
  struct Call {
    void (*kernel)(Args...);
    std::tuple<Args...> args;
  } call{kernel, unpack<Args...>(args, std::index_sequence_for<Args...>{})};
  return run(
      name, cfg, [](void* c) { std::apply(static_cast<Call*>(c)->kernel, static_cast<Call*>(c)->args); },
      &call, err, err_len);
}

}  // namespace emu

/// The launch entry of kernel `name`: `rlhf_emu_<name>(cfg, signature, args, err, err_len)`.
#define EMU_KERNEL(name)                                                                     \
  extern "C" int rlhf_emu_##name(const ::emu::Launch* cfg, const char* sig, void** args,     \
                                 char* err, size_t err_len) {                                \
    return ::emu::launch(#name, &name, cfg, sig, args, err, err_len);                        \
  }
