// sampling.cu: picks the next token of each listed row of logits on the device, so that only ids
// and log-probs leave it (generation's decode loop).
//
// CPU op it must match (src/backend/cpu/sample.rs): DecodeOps::sample_tokens. With t the
// temperature (1 when greedy) and max the row's maximum:
//   - weights p_i = exp((z_i - max) / t) in f32, exactly as the CPU computes them: its exp
//     (src/backend/cpu/math.rs) is ported below operation for operation (`cpu_exp`);
//   - the log-prob of the pick is z_id / t - (max / t + log Σ p_i), the sum in f64;
//   - greedy: the first maximum (torch.argmax);
//   - sampled: inverse CDF over the kept tokens in index order: the first token at which
//     u · total minus the running f64 sum of kept weights turns negative (else the last kept).
// A truncated row keeps every token whose weight's bits are above a threshold `tau`, and the first
// `ties` tokens (in index order) whose weight is exactly tau: a prefix of the tokens ordered by
// weight, ties by lower id, as the CPU keeps. Weights are >= 0, so their bits order as the values
// do, and a radix select over the bits finds tau without sorting V values: for top-k it counts
// tokens, for top-p it adds their weights, restricted to the top-k set when both apply.
//
// One block per listed row. For the draw each thread owns a contiguous chunk of the vocabulary,
// so its partial sums run in index order; every thread adds the chunks' totals in chunk order
// (a fixed-order scan), the one thread whose range holds u · total walks its chunk. No atomics:
// the same bits on every run. Sums are grouped differently from the CPU's (in index order), so a
// token can differ from the CPU's only when u · total (or top-p's target mass) falls within
// rounding of a boundary between tokens (the same rounding can also leave the walking thread's
// chunk exhausted, when it takes its own last kept token where the CPU would go on to the next).
#include "common.cuh"

/// Threads per block (`SAMPLE_BLOCK` in src/backend/emu/sampling.rs): the chunk arrays hold one
/// value per thread.
#define SAMPLE_BLOCK 256
/// Bits of the weights' keys decided per radix pass, and the bins of one pass.
#define SAMPLE_DIGIT_BITS 4
#define SAMPLE_BINS (1 << SAMPLE_DIGIT_BITS)
#define SAMPLE_LEVELS (32 / SAMPLE_DIGIT_BITS)

/// One row of logits at a temperature.
struct SampleRow {
  const float* z;
  int V;
  float t;
  float max;
};

/// `math::exp` of src/backend/cpu/math.rs, the same f32 operations in the same order, so that
/// the weights have the CPU's bits: Cephes' expf, `x = n·ln2 + r` with `|r| <= ln2/2`, a
/// degree-6 polynomial for `e^r` and `2^n` built in the exponent bits; 0 below -87.33655
/// (subnormals flushed), +inf above 88, NaN for NaN. Every product goes through __fmul_rn:
/// NVRTC fuses `a * b + c` into one fma by default, which rounds once where the CPU rounds twice.
__device__ __forceinline__ float cpu_exp(float x) {
  const float lo = -87.33655f;
  const float hi = 88.0f;
  // Adding 1.5 · 2^23 rounds to an integer and leaves it in the low mantissa bits.
  const float round_magic = 12582912.0f;
  // NaN passes the clamp, as Rust's f32::clamp lets it.
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float t = __fmul_rn(xc, 1.44269504088896340736f) + round_magic;
  const float n = t - round_magic;
  const int n_int = __float_as_int(t) - __float_as_int(round_magic);
  // ln 2 split in two so that n · 0.6933594 is exact.
  const float r = xc - __fmul_rn(n, 0.6933594f) - __fmul_rn(n, -2.1219444e-4f);
  float p = 1.9875691e-4f;
  p = __fmul_rn(p, r) + 1.3981999e-3f;
  p = __fmul_rn(p, r) + 8.333452e-3f;
  p = __fmul_rn(p, r) + 4.1665796e-2f;
  p = __fmul_rn(p, r) + 1.6666665e-1f;
  p = __fmul_rn(p, r) + 0.5f;
  const float er = __fmul_rn(p, __fmul_rn(r, r)) + r + 1.0f;
  // n is in [-126, 127] after the clamp: a normal power of two.
  const float two_n = __uint_as_float((unsigned)(n_int + 127) << 23);
  const float y = __fmul_rn(er, two_n);
  return x < lo ? 0.0f : (x > hi ? rl_inf() : y);
}

/// Token i's weight, bit for bit the CPU's.
__device__ __forceinline__ float sample_weight(const SampleRow& r, int i) {
  return cpu_exp((r.z[i] - r.max) / r.t);
}

/// Block minimum of ints; every thread gets it. `scratch`: shared, 32 elements.
__device__ __forceinline__ int block_min_int(int v, int* scratch) {
  const int lane = threadIdx.x % RL_WARP;
  const int warp = threadIdx.x / RL_WARP;
  const int warps = blockDim.x / RL_WARP;
  for (int o = RL_WARP / 2; o > 0; o >>= 1) {
    const int other = __shfl_xor_sync(RL_FULL_MASK, v, o);
    v = other < v ? other : v;
  }
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0x7fffffff;
  for (int o = RL_WARP / 2; o > 0; o >>= 1) {
    const int other = __shfl_xor_sync(RL_FULL_MASK, v, o);
    v = other < v ? other : v;
  }
  return v;
}

/// The first index holding the row's maximum.
__device__ int first_max(const SampleRow& r, int* scratch) {
  int best = 0x7fffffff;
  // Strided: a thread's first hit is its smallest.
  for (int i = threadIdx.x; i < r.V; i += blockDim.x) {
    if (r.z[i] == r.max) {
      best = i;
      break;
    }
  }
  return block_min_int(best, scratch);
}

/// Sums each of the SAMPLE_BINS bins of `h` over the block; every thread returns holding the block
/// totals. Within a warp a reduce-scatter: at each step a lane keeps the half of its bins that
/// its lane bit selects and adds its partner's copy of them (15 shuffles, then one to join the
/// two lanes left holding each bin, which add the same pair: the same bits), instead of a full
/// butterfly per bin (80). The warps' totals are then added in warp order by every thread.
/// `scratch`: shared, SAMPLE_BINS * 32 values.
template <typename T>
__device__ void block_sum_bins(T (&h)[SAMPLE_BINS], T* scratch) {
  static_assert(SAMPLE_BINS * 2 == RL_WARP, "one bin per lane pair after the reduce-scatter");
  const int lane = threadIdx.x % RL_WARP;
  const int warp = threadIdx.x / RL_WARP;
  const int warps = blockDim.x / RL_WARP;
  int n = SAMPLE_BINS;
  for (int o = RL_WARP / 2; o > 1; o >>= 1) {
    n >>= 1;
    const bool upper = (lane & o) != 0;
    for (int i = 0; i < n; ++i) {
      const T give = upper ? h[i] : h[n + i];
      const T keep = upper ? h[n + i] : h[i];
      h[i] = keep + __shfl_xor_sync(RL_FULL_MASK, give, o);
    }
  }
  // Lanes 2b and 2b + 1 now hold halves of bin b's warp total.
  const T total = h[0] + __shfl_xor_sync(RL_FULL_MASK, h[0], 1);
  __syncthreads();
  if ((lane & 1) == 0) scratch[(lane >> 1) * RL_WARP + warp] = total;
  __syncthreads();
  for (int b = 0; b < SAMPLE_BINS; ++b) {
    T sum = T(0);
    for (int w = 0; w < warps; ++w) sum += scratch[b * RL_WARP + w];
    h[b] = sum;
  }
}

/// A token's part in a selection: one for top-k's counts, its weight for top-p's mass.
__device__ __forceinline__ void add_weight(int& h, float) { h += 1; }
__device__ __forceinline__ void add_weight(double& h, float p) { h += (double)p; }

/// Descending radix select over the weights' bits among tokens whose key is above `floor` (-1:
/// all): the largest key `tau` such that the tokens at or above it weigh at least `target`, with
/// `*above` the weight of those strictly above it. Each pass bins the tokens that match the key
/// bits decided so far by their next SAMPLE_DIGIT_BITS bits, sums the bins over the block in a
/// fixed tree, and every thread takes the same decision from the same sums. The caller ensures
/// some token above `floor` has positive weight; should rounding leave every bin short of
/// `target`, the lowest non-empty bin is taken. `scratch`: shared, SAMPLE_BINS * 32 values.
template <typename T>
__device__ unsigned radix_select(const SampleRow& r, long long floor, T target, T* scratch,
                                 T* above) {
  unsigned prefix = 0;
  T acc_above = T(0);
  for (int level = 0; level < SAMPLE_LEVELS; ++level) {
    const int shift = 32 - SAMPLE_DIGIT_BITS * (level + 1);
    T hist[SAMPLE_BINS];
    for (int d = 0; d < SAMPLE_BINS; ++d) hist[d] = T(0);
    for (int i = threadIdx.x; i < r.V; i += blockDim.x) {
      const float p = sample_weight(r, i);
      const unsigned key = __float_as_uint(p);
      if ((long long)key <= floor) continue;
      if (level > 0 && (key >> (shift + SAMPLE_DIGIT_BITS)) != prefix) continue;
      add_weight(hist[(key >> shift) & (SAMPLE_BINS - 1)], p);
    }
    block_sum_bins(hist, scratch);
    int pick = 0;
    T before = acc_above;
    T acc = acc_above;
    for (int d = SAMPLE_BINS - 1; d >= 0; --d) {
      if (!(hist[d] > T(0))) continue;
      pick = d;
      before = acc;
      acc += hist[d];
      if (acc >= target) break;
    }
    acc_above = before;
    prefix = (prefix << SAMPLE_DIGIT_BITS) | (unsigned)pick;
  }
  *above = acc_above;
  return prefix;
}

/// The kept set of a row: every token whose weight's bits are above `tau`, and the first `ties`
/// at `tau` in index order.
struct KeptSet {
  unsigned tau;
  int ties;
};

/// Whether a token of key `key` is kept; `rank` counts the tokens at `tau` met so far.
__device__ __forceinline__ bool is_kept(const KeptSet& k, unsigned key, int* rank) {
  if (key != k.tau) return key > k.tau;
  return (*rank)++ < k.ties;
}

/// Top-k: the k-th largest weight's key and how many of the tokens at it are kept.
__device__ KeptSet top_k_set(const SampleRow& r, int k, int* scratch) {
  int above;
  const unsigned tau = radix_select<int>(r, -1, k, scratch, &above);
  KeptSet s = {tau, k - above};
  return s;
}

/// Top-p within `s` (`has_k`: the top-k set; else every token): the shortest prefix whose mass
/// first reaches top_p times the set's mass. `scratch`: shared, SAMPLE_BINS * 32 doubles.
__device__ KeptSet top_p_set(const SampleRow& r, float top_p, bool has_k, KeptSet s,
                             double* scratch) {
  const long long floor = has_k ? (long long)s.tau : -1;
  double above_floor = 0.0;
  for (int i = threadIdx.x; i < r.V; i += blockDim.x) {
    const float p = sample_weight(r, i);
    if ((long long)__float_as_uint(p) > floor) above_floor += (double)p;
  }
  above_floor = block_sum1(above_floor, scratch);
  const double tied = has_k ? (double)s.ties * (double)__uint_as_float(s.tau) : 0.0;
  const double target = (double)top_p * (above_floor + tied);
  double above = above_floor;
  int most = s.ties;
  // Otherwise the prefix ends among top-k's ties at its threshold, which `s` already holds.
  if (above_floor > 0.0 && above_floor >= target) {
    s.tau = radix_select<double>(r, floor, target, scratch, &above);
    most = r.V;
  }
  // Ties at the threshold, lowest ids first, until the mass reaches the target: at least one.
  const double need = ceil((target - above) / (double)__uint_as_float(s.tau));
  s.ties = need >= (double)most ? most : (need > 1.0 ? (int)need : 1);
  return s;
}

/// Inverse CDF over the kept tokens in index order with uniform `u` (see the file comment).
/// `chunk_ties` (int) and `chunk_mass` (double): shared, one per thread; `scratch`: shared, 32;
/// `picked`: shared.
__device__ int inverse_cdf(const SampleRow& r, double u, KeptSet k, int* chunk_ties,
                           double* chunk_mass, int* scratch, int* picked) {
  const int per = (r.V + blockDim.x - 1) / blockDim.x;
  const int lo = (int)threadIdx.x * per < r.V ? (int)threadIdx.x * per : r.V;
  const int hi = lo + per < r.V ? lo + per : r.V;
  int ties = 0;
  for (int i = lo; i < hi; ++i) ties += __float_as_uint(sample_weight(r, i)) == k.tau;
  chunk_ties[threadIdx.x] = ties;
  if (threadIdx.x == 0) *picked = -1;
  __syncthreads();
  int rank0 = 0;
  for (int j = 0; j < (int)threadIdx.x; ++j) rank0 += chunk_ties[j];
  double mass = 0.0;
  int last = -1;
  int rank = rank0;
  for (int i = lo; i < hi; ++i) {
    const float p = sample_weight(r, i);
    if (is_kept(k, __float_as_uint(p), &rank)) {
      mass += (double)p;
      last = i;
    }
  }
  chunk_mass[threadIdx.x] = mass;
  // Its barriers also publish chunk_mass.
  const int last_kept = block_max(last, scratch, -1);
  // The same sequential sum on every thread: chunk ranges tile [0, total) without gaps.
  double before = 0.0, after = 0.0, total = 0.0;
  for (int j = 0; j < (int)blockDim.x; ++j) {
    if (j == (int)threadIdx.x) before = total;
    total += chunk_mass[j];
    if (j == (int)threadIdx.x) after = total;
  }
  const double x = u * total;
  if (before <= x && x < after) {
    double left = x - before;
    int id = last;
    rank = rank0;
    for (int i = lo; i < hi; ++i) {
      const float p = sample_weight(r, i);
      if (!is_kept(k, __float_as_uint(p), &rank)) continue;
      left -= (double)p;
      if (left < 0.0) {
        id = i;
        break;
      }
    }
    *picked = id;
  }
  __syncthreads();
  return *picked >= 0 ? *picked : last_kept;
}

/// One block (SAMPLE_BLOCK threads) per listed row: block i picks from row rows[i] of logits
/// (B, V) with uniforms[i] (unread when greedy: temperature <= 0) and writes out[2i] = the token,
/// out[2i + 1] = its log-prob at the temperature before truncation. top_k: 0 or < V (0: off);
/// top_p >= 1: off.
extern "C" __global__ void sample_f32(const float* logits, const unsigned* rows,
                                      const double* uniforms, int V, float temperature, int top_k,
                                      float top_p, double* out) {
  __shared__ float fscratch[RL_WARP];
  __shared__ int iscratch[SAMPLE_BINS * RL_WARP];
  __shared__ double dscratch[SAMPLE_BINS * RL_WARP];
  __shared__ int chunk_ties[SAMPLE_BLOCK];
  __shared__ double chunk_mass[SAMPLE_BLOCK];
  __shared__ int picked;
  const bool greedy = temperature <= 0.f;
  SampleRow r;
  r.z = logits + (long long)rows[blockIdx.x] * V;
  r.V = V;
  r.t = greedy ? 1.f : temperature;
  float m = -rl_inf();
  for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, r.z[i]);
  r.max = block_max(m, fscratch, -rl_inf());
  double sum = 0.0;
  for (int i = threadIdx.x; i < V; i += blockDim.x) sum += (double)sample_weight(r, i);
  sum = block_sum1(sum, dscratch);
  const float lse = r.max / r.t + (float)log(sum);
  int id;
  if (greedy) {
    id = first_max(r, iscratch);
  } else {
    // Untruncated: every token is above key 0 or at it.
    KeptSet k = {0u, V};
    if (top_k > 0) k = top_k_set(r, top_k, iscratch);
    if (top_p < 1.f) k = top_p_set(r, top_p, top_k > 0, k, dscratch);
    id = inverse_cdf(r, uniforms[blockIdx.x], k, chunk_ties, chunk_mass, iscratch, &picked);
  }
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = (double)id;
    out[2 * blockIdx.x + 1] = (double)(r.z[id] / r.t - lse);
  }
}
