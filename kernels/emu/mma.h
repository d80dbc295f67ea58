// mma.h: the shim's `nvcuda::wmma` (CUDA's warp matrix API), so that a kernel file's
// `#include <mma.h>` compiles under g++ (build.rs puts kernels/emu/ on the include path; NVRTC
// gets CUDA's own header) and runs on the fiber scheduler of runtime.cpp. Included after
// cuda_emu.h, like every kernel file.
//
// Emulated: 16x16x16 fragments `fragment<matrix_a | matrix_b, 16, 16, 16, __nv_bfloat16,
// row_major | col_major>` and `fragment<accumulator, 16, 16, 16, float>`; `fill_fragment`,
// `load_matrix_sync`, `store_matrix_sync` (`mem_row_major` / `mem_col_major`), `mma_sync`; the
// `__nv_bfloat16` type that CUDA's mma.h brings in through cuda_bf16.h (here: the 16 bits only).
//
// The layout is the shim's own, on purpose different from any GPU's. CUDA leaves the mapping of
// tile elements to a lane's `x[]` unspecified; here every lane holds the WHOLE tile
// (`num_elements` = 256, where a GPU lane holds 8), element (r, c) at x[kSlotMul·(r·16 + c) +
// kSlotAdd mod 256], a scramble. So a loop over all `num_elements` applying one function works as
// on a GPU, while a kernel that picks elements by index (assuming a lane holds row lane/4, ...)
// touches the wrong elements, and in a different pattern than on the hardware: its test fails.
//
// Warp-collective semantics, as CUDA documents them ("waits until all warp lanes have arrived"):
// each operation starts with a warp barrier (in the scheduler, a fiber switch), at which the
// loads and stores also check that every lane passes the same pointer and stride, and that they
// meet the hardware's demands (a 32-byte-aligned pointer, a stride that is a multiple of 16
// bytes): a kernel that breaks them would fault or read garbage on a GPU. A store writes only the
// calling lane's share of the tile (the elements whose slot is the lane mod 32), so a lane that
// reads what other lanes stored without a `__syncwarp` in between reads stale values, as it may
// on a GPU. The product sums in f32 in a fixed order (k = 0..15, fused multiply-adds): bf16
// products are exact in f32, as on the tensor cores, so only the order of the f32 sums differs
// from a GPU's.
#pragma once

// No includes: cuda_emu.h, read first, brings <cstdio>, <cstring> and <type_traits>, and its
// macros must not reach system headers.

/// A bf16 value's bits (CUDA's type from cuda_bf16.h; the kernels convert with common.cuh).
struct __nv_bfloat16 {
  unsigned short bits;
};

namespace nvcuda {
namespace wmma {

/// Fragment roles.
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
/// Fragment layouts of the multiplicands.
struct row_major {};
struct col_major {};

/// Memory layouts of an accumulator tile.
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

constexpr int kDim = 16;
constexpr int kElements = kDim * kDim;
/// The scramble from element e = r·16 + c to its slot in `x[]`: odd, so a bijection mod 256.
constexpr int kSlotMul = 101;
constexpr int kSlotAdd = 37;

inline int slot(int r, int c) { return (kSlotMul * (r * kDim + c) + kSlotAdd) % kElements; }

[[noreturn]] inline void misuse(const char* op, const char* what) {
  fprintf(stderr, "emu: wmma::%s: %s (a fault or garbage on a GPU)\n", op, what);
  __builtin_abort();
}

/// The entry barrier of a warp-collective load or store, which also checks that all 32 lanes
/// take part with the same pointer and stride, and that the pointer and stride are aligned as
/// the hardware demands.
inline void enter(const char* op, const void* p, unsigned ldm, unsigned elem_bytes) {
  const unsigned long long addr = (unsigned long long)p;
  if (addr % 32 != 0) misuse(op, "pointer not 32-byte aligned");
  if ((ldm * elem_bytes) % 16 != 0) misuse(op, "ldm not a multiple of 16 bytes");
  const unsigned long long key = addr ^ ((unsigned long long)ldm << 48);
  if (::emu::exchange(0xffffffffu, key, 0) != key) {
    misuse(op, "lanes of the warp passed different pointers or strides, or not all 32 arrived");
  }
}

inline float to_float(__nv_bfloat16 v) {
  const unsigned u = (unsigned)v.bits << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/// Offset of element (r, c) of a tile in memory with leading dimension `ldm`.
inline long long offset(int r, int c, unsigned ldm, bool row_major) {
  return row_major ? (long long)r * ldm + c : (long long)c * ldm + r;
}

template <typename Layout>
constexpr bool is_row_major() {
  return std::is_same<Layout, row_major>::value;
}

}  // namespace detail

/// A 16x16 tile held by every lane whole, in the shim's scrambled order (see the file comment).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the shim emulates m16n16k16 fragments only");
  static_assert(std::is_same<Use, accumulator>::value ? std::is_same<T, float>::value
                                                      : std::is_same<T, __nv_bfloat16>::value,
                "the shim emulates bf16 multiplicands and f32 accumulators only");
  static_assert(std::is_same<Use, accumulator>::value == std::is_same<Layout, void>::value,
                "multiplicands have a layout, accumulators none");

 public:
  /// Elements this lane holds: the whole tile (8 on a GPU).
  enum { num_elements = detail::kElements };
  T x[num_elements];

  /// Element (r, c) of the tile.
  T& at(int r, int c) { return x[detail::slot(r, c)]; }
  const T& at(int r, int c) const { return x[detail::slot(r, c)]; }
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& v) {
  for (int i = 0; i < detail::kElements; ++i) f.x[i] = v;
}

/// Loads a multiplicand tile (element (r, c) at p + r·ldm + c for row_major, p + c·ldm + r for
/// col_major, counting in elements).
template <typename Use, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, __nv_bfloat16, Layout>& f,
                             const __nv_bfloat16* p, unsigned ldm) {
  detail::enter("load_matrix_sync", p, ldm, 2);
  for (int r = 0; r < detail::kDim; ++r) {
    for (int c = 0; c < detail::kDim; ++c) {
      f.at(r, c) = p[detail::offset(r, c, ldm, detail::is_row_major<Layout>())];
    }
  }
}

/// Loads an accumulator tile laid out as `layout` says.
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  detail::enter("load_matrix_sync", p, ldm, 4);
  for (int r = 0; r < detail::kDim; ++r) {
    for (int c = 0; c < detail::kDim; ++c) {
      f.at(r, c) = p[detail::offset(r, c, ldm, layout == mem_row_major)];
    }
  }
}

/// Stores an accumulator tile: this lane writes its share, the elements whose slot is the lane
/// mod 32 (see the file comment).
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  detail::enter("store_matrix_sync", p, ldm, 4);
  const int lane = (int)::emu::lane_id();
  for (int r = 0; r < detail::kDim; ++r) {
    for (int c = 0; c < detail::kDim; ++c) {
      if (detail::slot(r, c) % warpSize == lane) {
        p[detail::offset(r, c, ldm, layout == mem_row_major)] = f.at(r, c);
      }
    }
  }
}

/// d = a·b + c; d may be c.
template <typename LayoutA, typename LayoutB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  ::emu::syncwarp(0xffffffffu);
  // Unscrambled once, so the 4096 multiply-adds run on plain arrays.
  float am[detail::kDim][detail::kDim], bm[detail::kDim][detail::kDim];
  float out[detail::kDim][detail::kDim];
  for (int r = 0; r < detail::kDim; ++r) {
    for (int k = 0; k < detail::kDim; ++k) {
      am[r][k] = detail::to_float(a.at(r, k));
      bm[r][k] = detail::to_float(b.at(r, k));
      out[r][k] = c.at(r, k);
    }
  }
  for (int m = 0; m < detail::kDim; ++m) {
    for (int n = 0; n < detail::kDim; ++n) {
      float acc = out[m][n];
      for (int k = 0; k < detail::kDim; ++k) acc = fmaf(am[m][k], bm[k][n], acc);
      out[m][n] = acc;
    }
  }
  for (int m = 0; m < detail::kDim; ++m) {
    for (int n = 0; n < detail::kDim; ++n) d.at(m, n) = out[m][n];
  }
}

}  // namespace wmma
}  // namespace nvcuda
