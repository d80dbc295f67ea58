// attention.cu: fused causal self-attention with grouped-query heads and a key padding mask,
// FlashAttention-2 style: in plain SIMT code (one fused multiply-add per lane per step) the
// forward, the decode step (one query row per sequence against the KV cache) and the backward;
// and a tensor-core forward and backward for bf16 at head dims 64 and 128 through CUDA's wmma
// API (`attn_*_tc_bf16`, at the end of the file; under g++ the shim's kernels/emu/mma.h emulates
// the API with a fragment layout of its own).
//
// CPU ops it must match: ModelOps::attention_forward / attention_backward
// (src/backend/cpu/attention.rs) and DecodeOps::attention_decode (src/backend/cpu/decode.rs), in
// their layouts:
//   qkv (B·T, W), rows [q (NH·HD) | k (KVH·HD) | v (KVH·HD)], W = (NH + 2·KVH)·HD, batch-major;
//   out, dout (B·T, NH·HD); lse, D (B, NH, T); key_mask (B·T), u32 0 (padding) or 1;
//   decode: qkv (B, W), k and v caches (B, KVH, TMAX, HD), key_mask (B·TMAX), out (B, NH·HD).
// Query head h reads key/value head h / (NH/KVH). Key j is visible to query i iff j <= i and
// key_mask[j] (decode: every cached column j < len with key_mask[j]); a score is scale·(q·k),
// scale = 1/sqrt(HD) from the host. A query that sees no key outputs zeros and saves the lse
// marker f32::MAX (the CPU's LSE_NO_KEY), whose exp(s - lse) is 0 for any score.
//
// Kernels, E = f32 or bf16 (qkv, out, dout, dqkv and the caches are E; lse and D are f32; all
// arithmetic is f32). Blocks of ATTN_WARPS = 4 warps; dynamic shared memory sized from HD by the
// host plans (src/backend/emu/plan.rs: `attn_*_smem`), at most 43 KB at the largest head dim, 128:
//   attn_fwd_E(qkv, key_mask, T, NH, KVH, HD, scale, out, lse)
//   attn_fwd_tc_bf16(qkv, key_mask, T, NH, KVH, HD, scale, out, lse): HD 64 or 128 only
//   attn_bwd_dq_tc_bf16, attn_bwd_dkdv_tc_bf16: as attn_bwd_dq_E and attn_bwd_dkdv_E, likewise
//   attn_decode_E(qkv, k_cache, v_cache, key_mask, NH, KVH, HD, len, TMAX, scale, out)
//   attn_bwd_dot_E(dout, out, B·T, T, NH, HD, D)
//   attn_bwd_dq_E(qkv, dout, lse, D, key_mask, T, NH, KVH, HD, scale, dqkv)
//   attn_bwd_dkdv_E(qkv, dout, lse, D, key_mask, T, NH, KVH, HD, scale, dqkv)
// The backward runs attn_bwd_dot first (it writes D); then attn_bwd_dq adds dq into dqkv and
// attn_bwd_dkdv adds dk and dv: disjoint columns, so those two may run in either order.
//
// Forward (`attend`): a block takes ATTN_BQ = 16 query rows of one (sequence, head), ATTN_ROWS =
// 4 per warp, and keeps their q in shared memory; keys stream through shared memory in tiles of
// ATTN_BK = 32, one key per lane. Lane j computes key j's score against each of its warp's rows;
// the warp takes the row max with a shuffle butterfly (the same bits in every lane); the online
// softmax keeps the running max m, a per-lane partial sum of exp(s - m) (added over the warp once,
// at the end) and the output accumulator, rescaled by exp(m_old - m_new) when the max grows.
// The probabilities go to the warp's rows of a shared 16 x 32 tile, and lane d accumulates
// O[r][d] += Σ_j P[r][j]·V[j][d] for the head dims it owns (d = lane + 32c, c < ATTN_DPL). The
// output is normalised once at the end, and lse = m + log(Σ) saved. Nothing of size T x T exists:
// a block holds one 16 x 32 tile of scores at a time. The decode step is the same code with the
// rows being the query heads of one key/value group (the one query per head), so the heads of a
// group share every K/V tile they load.
//
// Backward, with P = exp(scale·S - lse) recomputed tile by tile from the forward's lse:
// - attn_bwd_dot: D = rowsum(dO ∘ O) per (sequence, head, query), one warp each.
// - attn_bwd_dkdv: a block owns ATTN_BKV = 8 keys of one (sequence, key/value head), 2 per warp,
//   and keeps their dK and dV in registers (lane d, as above). It walks every query tile of
//   ATTN_BQ_BWD = 32 (one query per lane) from its first key on, for each query head of the
//   group: S = Q·Kᵀ, dP = dO·Vᵀ, dS = P ∘ (dP - D), then dV += Pᵀ·dO and dK += dSᵀ·Q. A key/value
//   head's gradient has one owner block, which sums the group's heads in a fixed order.
// - attn_bwd_dq: a block owns 16 query rows of one (sequence, head), like the forward, and walks
//   the key tiles up to its last query: it recomputes P and dS and accumulates dQ += dS·K.
//   Computing dQ in a pass of its own costs S and dP a second time (7 tile products instead of 5);
//   the alternative, float atomics from the dK/dV blocks, would make dQ's bits depend on the order
//   blocks run in, which common.cuh rules out (DESIGN.md principle 9).
// No buffer is written by two blocks, so the kernels need no atomics and give the same bits for
// any schedule.
//
// Shared memory holds f32 tiles (inputs are converted once, as they are loaded). Where every lane
// reads a row of its own (`dot_rows`), lanes start at different columns and wrap around, which
// spreads the 32 reads over 32 banks without padding rows: at HD = 128, padding would not fit
// the tiles in 48 KB. Per block, in f32 values:
//   forward, decode: q (16·HD), k and v (32·HD each), P (16·32)
//   dQ: q and dO (16·HD each), one k or v tile (32·HD: v first for dP, then k for S and dQ), dS
//   (16·32)
//   dK/dV: k and v (8·HD each), q and dO (32·HD each), P and dS (8·32 each)
#include "common.cuh"

// CUDA's warp matrix API; under g++, the shim's (kernels/emu/mma.h).
#include <mma.h>

using namespace nvcuda;

/// Warps per block of every attention kernel.
#define ATTN_WARPS 4
/// Query rows per warp in the forward, decode and dQ kernels.
#define ATTN_ROWS 4
/// Query rows per block in those kernels.
#define ATTN_BQ (ATTN_WARPS * ATTN_ROWS)
/// Keys per tile in those kernels: one per lane.
#define ATTN_BK RL_WARP
/// Head dims a lane owns in an accumulator row (d = lane + 32c): the kernels take HD <= 128
/// (`ATTN_MAX_HEAD_DIM` in plan.rs, which the host checks).
#define ATTN_DPL 4
/// Keys per warp in the dK/dV kernel.
#define ATTN_KPW 2
/// Keys per block in the dK/dV kernel.
#define ATTN_BKV (ATTN_WARPS * ATTN_KPW)
/// Queries per tile in the dK/dV kernel: one per lane.
#define ATTN_BQ_BWD RL_WARP

/// The lse of a query that sees no key: f32::MAX (NVRTC has no <float.h>).
__device__ __forceinline__ float attn_lse_no_key() { return __int_as_float(0x7f7fffff); }

__device__ __forceinline__ int attn_min(int a, int b) { return a < b ? a : b; }

/// The query tile a block of a query-tiled kernel (forward, dQ) takes: blocks run over
/// (sequence·head, tile), and later tiles see more keys, so the first blocks take them and the
/// longest start first.
struct QueryTile {
  int b;     // sequence
  int h;     // query head
  int g;     // its key/value head
  int i0;    // the tile's first query
  int rows;  // its queries (fewer in the last tile)
};

__device__ __forceinline__ QueryTile query_tile(int bq, int T, int NH, int KVH) {
  const int tiles = (T + bq - 1) / bq;
  const int bh = (int)(blockIdx.x / tiles);
  QueryTile qt;
  qt.b = bh / NH;
  qt.h = bh % NH;
  qt.g = qt.h / (NH / KVH);
  qt.i0 = (tiles - 1 - (int)(blockIdx.x % tiles)) * bq;
  qt.rows = attn_min(bq, T - qt.i0);
  return qt;
}

/// Copies `rows` rows of `hd` values (row r at src + r·stride) into `dst` (rows hd apart) as f32,
/// and zeros rows `valid..rows`: a tile that runs past the sequence holds zeros, not stale rows
/// or the shim's NaN fill, so the products that give such rows weight 0 stay 0. Block-wide; the
/// caller syncs before reading.
template <typename E>
__device__ __forceinline__ void load_tile(float* dst, const E* src, long long stride, int rows,
                                          int valid, int hd) {
  // (r, d) of element e = r·hd + d, advanced by blockDim.x without a division per element.
  const int step_r = (int)blockDim.x / hd;
  const int step_d = (int)blockDim.x % hd;
  int r = (int)threadIdx.x / hd;
  int d = (int)threadIdx.x % hd;
  for (int e = threadIdx.x; e < rows * hd; e += blockDim.x) {
    dst[e] = r < valid ? to_f32(src[r * stride + d]) : 0.f;
    r += step_r;
    d += step_d;
    if (d >= hd) {
      d -= hd;
      r += 1;
    }
  }
}

/// s[k] += Σ_d a[d]·b[k·hd + d] for k < R, where `a` is a row this lane reads alone (the lanes'
/// rows are hd apart) and `b` holds R rows the whole warp reads. Lane l starts at column l mod hd
/// and wraps around: when hd is a multiple of 32, the 32 lanes read 32 different banks of `a`
/// and of `b` at every step. Each lane's summation order is fixed, so the bits are too.
template <int R>
__device__ __forceinline__ void dot_rows(float (&s)[R], const float* a, const float* b, int hd) {
  int d = (int)(threadIdx.x % RL_WARP) % hd;
  for (int n = 0; n < hd; ++n) {
    const float x = a[d];
    for (int k = 0; k < R; ++k) s[k] = fmaf(x, b[k * hd + d], s[k]);
    d = d + 1 == hd ? 0 : d + 1;
  }
}

/// acc[k][c] += Σ_j w[k·32 + j]·m[j·hd + lane + 32c] over j < 32: R weight rows of 32 (written
/// by this warp, read as broadcasts) times a 32-row tile `m`, into the head dims this lane owns.
template <int R>
__device__ __forceinline__ void accumulate(float (&acc)[R][ATTN_DPL], const float* w,
                                           const float* m, int hd) {
  const int lane = threadIdx.x % RL_WARP;
  for (int j = 0; j < RL_WARP; ++j) {
    float wj[R];
    for (int k = 0; k < R; ++k) wj[k] = w[k * RL_WARP + j];
    for (int c = 0; c < ATTN_DPL; ++c) {
      const int d = lane + c * RL_WARP;
      if (d < hd) {
        const float x = m[j * hd + d];
        for (int k = 0; k < R; ++k) acc[k][c] = fmaf(wj[k], x, acc[k][c]);
      }
    }
  }
}

/// One block's share of a forward or decode: `rows` (<= ATTN_BQ) query rows against keys
/// 0..n_keys of one key/value head. Row r's query is at q + r·q_stride and its output at
/// out + r·out_stride; key j's k and v are at k + j·kv_stride and v + j·kv_stride.
template <typename E>
struct AttendJob {
  const E* q;
  long long q_stride;
  int rows;
  const E* k;
  const E* v;
  long long kv_stride;
  int n_keys;
  /// Key j is padding where key_mask[j] is 0.
  const unsigned* key_mask;
  /// Row r sees keys j <= diag + r only (causality).
  int diag;
  E* out;
  long long out_stride;
  /// Row r's log-sum-exp goes to lse[r]; null in decode.
  float* lse;
  int hd;
  float scale;
};

/// The forward's online softmax over key tiles (see the file comment). Barriers: each tile is
/// published by the first `__syncthreads` of its iteration, and the second keeps every warp's
/// reads of it ahead of the next tile's writes.
template <typename E>
__device__ __forceinline__ void attend(const AttendJob<E>& a) {
  RL_DYNAMIC_SHARED(float, smem);
  const int hd = a.hd;
  float* qs = smem;                // [ATTN_BQ][hd]
  float* ks = qs + ATTN_BQ * hd;   // [ATTN_BK][hd]
  float* vs = ks + ATTN_BK * hd;   // [ATTN_BK][hd]
  float* ps = vs + ATTN_BK * hd;   // [ATTN_BQ][ATTN_BK]
  const int lane = threadIdx.x % RL_WARP;
  const int row0 = (threadIdx.x / RL_WARP) * ATTN_ROWS;
  load_tile(qs, a.q, a.q_stride, ATTN_BQ, a.rows, hd);

  float m[ATTN_ROWS];  // running max, the same in every lane (-inf until a key is visible)
  float l[ATTN_ROWS];  // this lane's share of Σ exp(s - m)
  float acc[ATTN_ROWS][ATTN_DPL];
  for (int k = 0; k < ATTN_ROWS; ++k) {
    m[k] = -rl_inf();
    l[k] = 0.f;
    for (int c = 0; c < ATTN_DPL; ++c) acc[k][c] = 0.f;
  }
  for (int j0 = 0; j0 < a.n_keys; j0 += ATTN_BK) {
    const int valid = a.n_keys - j0;
    load_tile(ks, a.k + j0 * a.kv_stride, a.kv_stride, ATTN_BK, valid, hd);
    load_tile(vs, a.v + j0 * a.kv_stride, a.kv_stride, ATTN_BK, valid, hd);
    __syncthreads();
    const int j = j0 + lane;
    const bool key = j < a.n_keys && a.key_mask[j] != 0u;
    float s[ATTN_ROWS];
    for (int k = 0; k < ATTN_ROWS; ++k) s[k] = 0.f;
    dot_rows(s, ks + lane * hd, qs + row0 * hd, hd);
    for (int k = 0; k < ATTN_ROWS; ++k) {
      const int r = row0 + k;
      const bool visible = key && r < a.rows && j <= a.diag + r;
      const float sc = visible ? s[k] * a.scale : -rl_inf();
      const float m_new = fmaxf(m[k], warp_max(sc));
      float p = 0.f;
      // Uniform over the warp. While no key is visible there is nothing to add, and
      // exp(-inf - -inf) would be NaN.
      if (m_new != -rl_inf()) {
        const float alpha = __expf(m[k] - m_new);  // 0 the first time, when m = -inf
        p = __expf(sc - m_new);                     // 0 where masked
        l[k] = l[k] * alpha + p;
        for (int c = 0; c < ATTN_DPL; ++c) acc[k][c] *= alpha;
        m[k] = m_new;
      }
      ps[r * ATTN_BK + lane] = p;
    }
    __syncwarp();  // the warp's rows of P are written
    accumulate(acc, ps + row0 * ATTN_BK, vs, hd);
    __syncthreads();
  }

  for (int k = 0; k < ATTN_ROWS; ++k) {
    const float sum = warp_sum(l[k]);
    const int r = row0 + k;
    if (r >= a.rows) continue;  // uniform over the warp
    E* o = a.out + r * a.out_stride;
    for (int c = 0; c < ATTN_DPL; ++c) {
      const int d = lane + c * RL_WARP;
      if (d < hd) store_f32(&o[d], sum > 0.f ? acc[k][c] / sum : 0.f);
    }
    if (a.lse && lane == 0) a.lse[r] = sum > 0.f ? m[k] + logf(sum) : attn_lse_no_key();
  }
}

template <typename E>
__device__ __forceinline__ void attn_fwd(const E* __restrict__ qkv,
                                         const unsigned* __restrict__ key_mask, int T,
                                         int NH, int KVH, int HD, float scale, E* __restrict__ out,
                                         float* __restrict__ lse) {
  const QueryTile qt = query_tile(ATTN_BQ, T, NH, KVH);
  const int b = qt.b, h = qt.h, g = qt.g, i0 = qt.i0;
  const long long w = (long long)(NH + 2 * KVH) * HD;
  const long long ow = (long long)NH * HD;
  const E* seq = qkv + (long long)b * T * w;
  AttendJob<E> a;
  a.q = seq + i0 * w + h * HD;
  a.q_stride = w;
  a.rows = qt.rows;
  a.k = seq + (NH + g) * HD;
  a.v = seq + (NH + KVH + g) * HD;
  a.kv_stride = w;
  a.n_keys = i0 + a.rows;  // causality: no query of the tile sees a later key
  a.key_mask = key_mask + (long long)b * T;
  a.diag = i0;
  a.out = out + ((long long)b * T + i0) * ow + h * HD;
  a.out_stride = ow;
  a.lse = lse + ((long long)b * NH + h) * T + i0;
  a.hd = HD;
  a.scale = scale;
  attend(a);
}

template <typename E>
__device__ __forceinline__ void attn_decode(const E* __restrict__ qkv,
                                            const E* __restrict__ k_cache,
                                            const E* __restrict__ v_cache,
                                            const unsigned* __restrict__ key_mask, int NH,
                                            int KVH, int HD, int len, int t_max, float scale,
                                            E* __restrict__ out) {
  const int group = NH / KVH;
  const int chunks = (group + ATTN_BQ - 1) / ATTN_BQ;
  const int chunk = (int)(blockIdx.x % chunks);
  const int bg = (int)(blockIdx.x / chunks);
  const int b = bg / KVH;
  const int g = bg % KVH;
  const int h0 = g * group + chunk * ATTN_BQ;  // the block's first query head
  const long long w = (long long)(NH + 2 * KVH) * HD;
  const long long cache = ((long long)b * KVH + g) * t_max * HD;
  AttendJob<E> a;
  a.q = qkv + b * w + h0 * HD;
  a.q_stride = HD;
  a.rows = attn_min(ATTN_BQ, group - chunk * ATTN_BQ);
  a.k = k_cache + cache;
  a.v = v_cache + cache;
  a.kv_stride = HD;
  a.n_keys = len;
  a.key_mask = key_mask + (long long)b * t_max;
  a.diag = len;  // every cached column is in the past
  a.out = out + ((long long)b * NH + h0) * HD;
  a.out_stride = HD;
  a.lse = nullptr;
  a.hd = HD;
  a.scale = scale;
  attend(a);
}

template <typename E>
__device__ __forceinline__ void attn_bwd_dot(const E* __restrict__ dout, const E* __restrict__ out,
                                             int rows, int T, int NH, int HD,
                                             float* __restrict__ D) {
  const int lane = threadIdx.x % RL_WARP;
  // One warp per (token row, head).
  const long long pair = (long long)blockIdx.x * ATTN_WARPS + threadIdx.x / RL_WARP;
  if (pair >= (long long)rows * NH) return;  // the whole warp: no shuffle below waits for it
  const long long row = pair / NH;
  const int h = (int)(pair % NH);
  const long long at = row * NH * HD + h * HD;
  float acc = 0.f;
  for (int d = lane; d < HD; d += RL_WARP) {
    acc = fmaf(to_f32(dout[at + d]), to_f32(out[at + d]), acc);
  }
  acc = warp_sum(acc);
  if (lane == 0) D[((row / T) * NH + h) * T + row % T] = acc;
}

/// Adds scale·acc[k] to gradient row first + k (rows `stride` apart from `g`) for k < R, except
/// rows from `rows` on, in the head dims this lane owns.
template <int R, typename E>
__device__ __forceinline__ void add_rows(E* g, long long stride, int first, int rows,
                                         const float (&acc)[R][ATTN_DPL], float scale, int hd) {
  const int lane = threadIdx.x % RL_WARP;
  for (int k = 0; k < R; ++k) {
    if (first + k >= rows) continue;
    E* row = g + (first + k) * stride;
    for (int c = 0; c < ATTN_DPL; ++c) {
      const int d = lane + c * RL_WARP;
      if (d < hd) store_f32(&row[d], to_f32(row[d]) + scale * acc[k][c]);
    }
  }
}

template <typename E>
__device__ __forceinline__ void attn_bwd_dq(const E* __restrict__ qkv, const E* __restrict__ dout,
                                            const float* __restrict__ lse,
                                            const float* __restrict__ D,
                                            const unsigned* __restrict__ key_mask, int T,
                                            int NH, int KVH, int HD, float scale,
                                            E* __restrict__ dqkv) {
  RL_DYNAMIC_SHARED(float, smem);
  float* qs = smem;                 // [ATTN_BQ][HD]
  float* dos = qs + ATTN_BQ * HD;   // [ATTN_BQ][HD]
  float* kvs = dos + ATTN_BQ * HD;  // [ATTN_BK][HD]: a tile of v, then k of the same keys
  float* dss = kvs + ATTN_BK * HD;  // [ATTN_BQ][ATTN_BK]
  const QueryTile qt = query_tile(ATTN_BQ, T, NH, KVH);
  const int b = qt.b, h = qt.h, g = qt.g, i0 = qt.i0, rows = qt.rows;
  const int n_keys = i0 + rows;
  const long long w = (long long)(NH + 2 * KVH) * HD;
  const long long ow = (long long)NH * HD;
  const E* seq = qkv + (long long)b * T * w;
  const E* k = seq + (NH + g) * HD;
  const E* v = seq + (NH + KVH + g) * HD;
  const unsigned* mask = key_mask + (long long)b * T;
  const long long stats = ((long long)b * NH + h) * T + i0;  // of (B, NH, T) lse and D
  const int lane = threadIdx.x % RL_WARP;
  const int row0 = (threadIdx.x / RL_WARP) * ATTN_ROWS;

  load_tile(qs, seq + i0 * w + h * HD, w, ATTN_BQ, rows, HD);
  load_tile(dos, dout + ((long long)b * T + i0) * ow + h * HD, ow, ATTN_BQ, rows, HD);
  float lse_r[ATTN_ROWS], d_r[ATTN_ROWS], acc[ATTN_ROWS][ATTN_DPL];
  for (int r = 0; r < ATTN_ROWS; ++r) {
    const bool in = row0 + r < rows;
    lse_r[r] = in ? lse[stats + row0 + r] : 0.f;
    d_r[r] = in ? D[stats + row0 + r] : 0.f;
    for (int c = 0; c < ATTN_DPL; ++c) acc[r][c] = 0.f;
  }
  for (int j0 = 0; j0 < n_keys; j0 += ATTN_BK) {
    load_tile(kvs, v + j0 * w, w, ATTN_BK, n_keys - j0, HD);
    __syncthreads();  // v (and, the first time, q and dO) written
    float dp[ATTN_ROWS], s[ATTN_ROWS];
    for (int r = 0; r < ATTN_ROWS; ++r) dp[r] = s[r] = 0.f;
    dot_rows(dp, kvs + lane * HD, dos + row0 * HD, HD);
    __syncthreads();  // every warp is done with v
    load_tile(kvs, k + j0 * w, w, ATTN_BK, n_keys - j0, HD);
    __syncthreads();  // k written
    dot_rows(s, kvs + lane * HD, qs + row0 * HD, HD);
    const int j = j0 + lane;
    const bool key = j < n_keys && mask[j] != 0u;
    for (int r = 0; r < ATTN_ROWS; ++r) {
      const int i = i0 + row0 + r;
      const bool visible = key && row0 + r < rows && j <= i;
      const float p = visible ? __expf(s[r] * scale - lse_r[r]) : 0.f;
      dss[(row0 + r) * ATTN_BK + lane] = p * (dp[r] - d_r[r]);
    }
    __syncwarp();  // the warp's rows of dS are written
    accumulate(acc, dss + row0 * ATTN_BK, kvs, HD);
    __syncthreads();  // every warp is done with k before the next v
  }
  add_rows(dqkv + ((long long)b * T + i0) * w + h * HD, w, row0, rows, acc, scale, HD);
}

template <typename E>
__device__ __forceinline__ void attn_bwd_dkdv(const E* __restrict__ qkv,
                                              const E* __restrict__ dout,
                                              const float* __restrict__ lse,
                                              const float* __restrict__ D,
                                              const unsigned* __restrict__ key_mask, int T,
                                              int NH, int KVH, int HD, float scale,
                                              E* __restrict__ dqkv) {
  RL_DYNAMIC_SHARED(float, smem);
  float* ks = smem;                     // [ATTN_BKV][HD]
  float* vs = ks + ATTN_BKV * HD;       // [ATTN_BKV][HD]
  float* qs = vs + ATTN_BKV * HD;       // [ATTN_BQ_BWD][HD]
  float* dos = qs + ATTN_BQ_BWD * HD;   // [ATTN_BQ_BWD][HD]
  float* ps = dos + ATTN_BQ_BWD * HD;   // [ATTN_BKV][ATTN_BQ_BWD]: P, a row per key
  float* dss = ps + ATTN_BKV * ATTN_BQ_BWD;  // [ATTN_BKV][ATTN_BQ_BWD]: dS, likewise
  const int tiles = (T + ATTN_BKV - 1) / ATTN_BKV;
  // Earlier keys are seen by more queries: ascending order starts the longest blocks first.
  const int tile = (int)(blockIdx.x % tiles);
  const int bg = (int)(blockIdx.x / tiles);
  const int b = bg / KVH;
  const int g = bg % KVH;
  const int group = NH / KVH;
  const int j0 = tile * ATTN_BKV;
  const long long w = (long long)(NH + 2 * KVH) * HD;
  const long long ow = (long long)NH * HD;
  const E* seq = qkv + (long long)b * T * w;
  const int lane = threadIdx.x % RL_WARP;
  const int key0 = (threadIdx.x / RL_WARP) * ATTN_KPW;  // the warp's first key in the block

  const int keys = attn_min(ATTN_BKV, T - j0);
  load_tile(ks, seq + j0 * w + (NH + g) * HD, w, ATTN_BKV, keys, HD);
  load_tile(vs, seq + j0 * w + (NH + KVH + g) * HD, w, ATTN_BKV, keys, HD);
  bool key[ATTN_KPW];
  float dk[ATTN_KPW][ATTN_DPL], dv[ATTN_KPW][ATTN_DPL];
  for (int k = 0; k < ATTN_KPW; ++k) {
    key[k] = key0 + k < keys && key_mask[(long long)b * T + j0 + key0 + k] != 0u;
    for (int c = 0; c < ATTN_DPL; ++c) dk[k][c] = dv[k][c] = 0.f;
  }
  for (int hh = 0; hh < group; ++hh) {
    const int h = g * group + hh;
    const long long stats = ((long long)b * NH + h) * T;  // of (B, NH, T) lse and D
    for (int i0 = j0; i0 < T; i0 += ATTN_BQ_BWD) {  // causality: queries before j0 see no key
      const int rows = attn_min(ATTN_BQ_BWD, T - i0);
      load_tile(qs, seq + i0 * w + h * HD, w, ATTN_BQ_BWD, rows, HD);
      load_tile(dos, dout + ((long long)b * T + i0) * ow + h * HD, ow, ATTN_BQ_BWD, rows, HD);
      __syncthreads();  // q and dO (and, the first time, k and v) written
      const int i = i0 + lane;  // this lane's query
      const float lse_i = lane < rows ? lse[stats + i] : 0.f;
      const float d_i = lane < rows ? D[stats + i] : 0.f;
      float s[ATTN_KPW], dp[ATTN_KPW];
      for (int k = 0; k < ATTN_KPW; ++k) s[k] = dp[k] = 0.f;
      dot_rows(s, qs + lane * HD, ks + key0 * HD, HD);
      dot_rows(dp, dos + lane * HD, vs + key0 * HD, HD);
      for (int k = 0; k < ATTN_KPW; ++k) {
        const bool visible = key[k] && lane < rows && j0 + key0 + k <= i;
        const float p = visible ? __expf(s[k] * scale - lse_i) : 0.f;
        ps[(key0 + k) * ATTN_BQ_BWD + lane] = p;
        dss[(key0 + k) * ATTN_BQ_BWD + lane] = p * (dp[k] - d_i);
      }
      __syncwarp();  // the warp's rows of P and dS are written
      accumulate(dv, ps + key0 * ATTN_BQ_BWD, dos, HD);
      accumulate(dk, dss + key0 * ATTN_BQ_BWD, qs, HD);
      __syncthreads();  // every warp is done with q and dO before the next tile
    }
  }
  E* key_rows = dqkv + ((long long)b * T + j0) * w;
  add_rows(key_rows + (NH + g) * HD, w, key0, keys, dk, scale, HD);
  add_rows(key_rows + (NH + KVH + g) * HD, w, key0, keys, dv, 1.f, HD);
}

// ------------------------------------------------------------------------------------------------
// tensor-core forward (wmma)
// ------------------------------------------------------------------------------------------------

/// Query rows per warp of the tensor-core forward: one 16-row wmma tile.
#define ATTN_TC_ROWS 16
/// Query rows per block of the tensor-core forward.
#define ATTN_TC_BQ (ATTN_WARPS * ATTN_TC_ROWS)
/// The wmma tile edge (m16n16k16).
#define ATTN_WM 16

typedef wmma::fragment<wmma::matrix_a, ATTN_WM, ATTN_WM, ATTN_WM, __nv_bfloat16, wmma::row_major>
    attn_frag_a;
typedef wmma::fragment<wmma::matrix_b, ATTN_WM, ATTN_WM, ATTN_WM, __nv_bfloat16, wmma::row_major>
    attn_frag_b_row;
typedef wmma::fragment<wmma::matrix_b, ATTN_WM, ATTN_WM, ATTN_WM, __nv_bfloat16, wmma::col_major>
    attn_frag_b_col;
typedef wmma::fragment<wmma::accumulator, ATTN_WM, ATTN_WM, ATTN_WM, float> attn_frag_acc;

/// bf16 shared memory as the wmma API's element type (the same 16 bits as rl_bf16).
__device__ __forceinline__ const __nv_bfloat16* attn_nv(const rl_bf16* p) {
  return reinterpret_cast<const __nv_bfloat16*>(p);
}

/// dst[16][BN] (f32, row stride ld) = A·Bᵀ on the tensor cores: A is 16 rows of HD in fragments,
/// B is BN rows of HD in shared memory (rows ldb apart), read as a col_major multiplicand.
/// Warp-collective; the stores are complete for the whole warp after a __syncwarp.
template <int HD, int BN>
__device__ __forceinline__ void attn_tc_abt(float* dst, int ld, const attn_frag_a (&a)[HD / ATTN_WM],
                                            const rl_bf16* b, int ldb) {
  for (int n = 0; n < BN / ATTN_WM; ++n) {
    attn_frag_acc acc;
    wmma::fill_fragment(acc, 0.f);
    for (int c = 0; c < HD / ATTN_WM; ++c) {
      attn_frag_b_col bt;  // Bᵀ: element (d, j) at b[j·ldb + d]
      wmma::load_matrix_sync(bt, attn_nv(b + n * ATTN_WM * ldb + c * ATTN_WM), ldb);
      wmma::mma_sync(acc, a[c], bt, acc);
    }
    wmma::store_matrix_sync(dst + n * ATTN_WM, acc, ld, wmma::mem_row_major);
  }
}

/// Loads 16 rows of HD bf16 (rows `ld` apart in shared memory) as HD/16 matrix_a fragments.
template <int HD>
__device__ __forceinline__ void attn_tc_load_a(attn_frag_a (&a)[HD / ATTN_WM], const rl_bf16* src,
                                               int ld) {
  for (int c = 0; c < HD / ATTN_WM; ++c) {
    wmma::load_matrix_sync(a[c], attn_nv(src + c * ATTN_WM), ld);
  }
}

/// acc[c] += W·M for the HD/16 column blocks c of M: W is 16 x BN bf16 in shared memory (row
/// stride BN), M is BN rows of HD bf16 in shared memory (rows `ldm` apart). Warp-collective.
template <int HD, int BN>
__device__ __forceinline__ void attn_tc_accumulate(attn_frag_acc (&acc)[HD / ATTN_WM],
                                                   const rl_bf16* w, const rl_bf16* m, int ldm) {
  attn_frag_a wf[BN / ATTN_WM];
  for (int n = 0; n < BN / ATTN_WM; ++n) {
    wmma::load_matrix_sync(wf[n], attn_nv(w + n * ATTN_WM), BN);
  }
  for (int c = 0; c < HD / ATTN_WM; ++c) {
    for (int n = 0; n < BN / ATTN_WM; ++n) {
      attn_frag_b_row mf;  // element (j, d) at m[j·ldm + d]
      wmma::load_matrix_sync(mf, attn_nv(m + n * ATTN_WM * ldm + c * ATTN_WM), ldm);
      wmma::mma_sync(acc[c], wf[n], mf, acc[c]);
    }
  }
}

/// Adds scale·acc to the warp's gradient rows: the fragments go to `stage` (16 rows of HD f32,
/// the warp's own), then lane pairs add a row each (half the dims per lane) to g + r·stride for
/// the rows r < valid. Warp-collective.
template <int HD>
__device__ __forceinline__ void attn_tc_add_rows(rl_bf16* g, long long stride, int valid,
                                                 const attn_frag_acc (&acc)[HD / ATTN_WM],
                                                 float* stage, float scale) {
  for (int c = 0; c < HD / ATTN_WM; ++c) {
    wmma::store_matrix_sync(stage + c * ATTN_WM, acc[c], HD, wmma::mem_row_major);
  }
  __syncwarp();  // the whole tile is stored
  const int lane = threadIdx.x % RL_WARP;
  const int row = lane / 2;
  if (row < valid) {
    rl_bf16* out = g + row * stride;
    for (int d = (lane % 2) * (HD / 2); d < (lane % 2 + 1) * (HD / 2); ++d) {
      store_f32(&out[d], to_f32(out[d]) + scale * stage[row * HD + d]);
    }
  }
  __syncwarp();  // every lane has read the stage before it is reused
}

/// 8 bf16 values from `p` as 16 bytes: one load where `p` is 16-byte aligned (`aligned`), else
/// two values at a time; zeros where `!exists` (a row past the sequence).
__device__ __forceinline__ rl_vec16 attn_load8(const rl_bf16* p, bool aligned, bool exists) {
  rl_vec16 v;
  if (!exists) {
    for (int q = 0; q < 4; ++q) v.w[q] = 0u;
  } else if (aligned) {
    v = *reinterpret_cast<const rl_vec16*>(p);
  } else {
    for (int q = 0; q < 4; ++q) {
      v.w[q] = (unsigned)p[2 * q].bits | ((unsigned)p[2 * q + 1].bits << 16);
    }
  }
  return v;
}

/// Whether rows of bf16 starting at `src`, `stride` values apart, can be read 16 bytes at a time.
__device__ __forceinline__ bool attn_rows_aligned(const rl_bf16* src, long long stride) {
  return (((unsigned long long)src | (unsigned long long)(stride * 2)) & 15u) == 0;
}

/// Copies `rows` rows of HD bf16 values (row r at src + r·stride) into `dst` (rows `ld` apart,
/// 16-byte aligned), zeroing rows `valid..rows`, as `load_tile` does for f32 tiles: 16 bytes per
/// thread and step. Block-wide; the caller syncs.
template <int HD>
__device__ __forceinline__ void load_tile_bf16(rl_bf16* dst, int ld, const rl_bf16* src,
                                               long long stride, int rows, int valid) {
  constexpr int per_row = HD / 8;
  const bool aligned = attn_rows_aligned(src, stride);
  for (int e = threadIdx.x; e < rows * per_row; e += blockDim.x) {
    const int r = e / per_row;
    const int d = e % per_row * 8;
    *reinterpret_cast<rl_vec16*>(dst + r * ld + d) =
        attn_load8(src + r * stride + d, aligned, r < valid);
  }
}

/// Threads of a tensor-core block.
#define ATTN_TC_THREADS (ATTN_WARPS * RL_WARP)

/// A tile of ROWS rows of HD bf16 on its way from global to shared memory, 16 bytes per thread
/// and vector: the forward fetches the next K and V tiles into registers before it works on the
/// current ones, so the loads' latency hides behind the products.
template <int HD, int ROWS>
struct AttnTileRegs {
  static constexpr int kPerRow = HD / 8;
  static constexpr int kVectors = ROWS * kPerRow / ATTN_TC_THREADS;
  static_assert(ROWS * kPerRow % ATTN_TC_THREADS == 0, "the block's threads split the tile evenly");
  rl_vec16 v[kVectors];
};

/// Rows [0, valid) of a tile from src (row r at src + r·stride), zeros past them, through
/// [`attn_load8`].
template <int HD, int ROWS>
__device__ __forceinline__ void attn_tile_fetch(AttnTileRegs<HD, ROWS>& t, const rl_bf16* src,
                                                long long stride, int valid, bool aligned) {
  typedef AttnTileRegs<HD, ROWS> Tile;
  for (int k = 0; k < Tile::kVectors; ++k) {
    const int e = threadIdx.x + k * ATTN_TC_THREADS;
    const int r = e / Tile::kPerRow;
    t.v[k] = attn_load8(src + r * stride + e % Tile::kPerRow * 8, aligned, r < valid);
  }
}

/// Writes a fetched tile to `dst` (rows `ld` apart, 16-byte aligned).
template <int HD, int ROWS>
__device__ __forceinline__ void attn_tile_put(const AttnTileRegs<HD, ROWS>& t, rl_bf16* dst,
                                              int ld) {
  typedef AttnTileRegs<HD, ROWS> Tile;
  for (int k = 0; k < Tile::kVectors; ++k) {
    const int e = threadIdx.x + k * ATTN_TC_THREADS;
    *reinterpret_cast<rl_vec16*>(dst + e / Tile::kPerRow * ld + e % Tile::kPerRow * 8) = t.v[k];
  }
}

/// Bit j set where key j0 + j (j < N <= 32) is visible to query i: bits `bit..bit + N` of
/// `keys` (a ballot of the tile's mask: the key exists and is not padding), and causality
/// (j0 + j <= i).
template <int N>
__device__ __forceinline__ unsigned attn_visible_bits(unsigned keys, int bit, int j0, int i) {
  const unsigned field = (keys >> bit) & (0xffffffffu >> (32 - N));
  const int seen = i - j0 + 1;  // keys from j0 on that causality lets the query see
  if (seen <= 0) return 0u;
  return seen >= N ? field : field & ((1u << seen) - 1u);
}

/// One warp's online-softmax step on its 16 x BK score tile `ss` (f32, row stride `lds`, as
/// store_matrix_sync left it): two lanes per row, each with half the columns. Writes
/// P = exp(s - m_new) as bf16 over the tile (row stride `ldp` in bf16, from the tile's start,
/// once the whole warp has read its scores) and the row's O rescale factor exp(m_old - m_new)
/// into `alpha[row]`, and updates the running max `m` (the same in both lanes of a row) and this
/// lane's partial sum `l` of the unrounded probabilities. `visible` bit j: whether the half's
/// column j is a key the row sees. Warp-collective.
template <int BK>
__device__ __forceinline__ void attn_tc_softmax(float* ss, int lds, int ldp, float* alpha, int row,
                                                int half, unsigned visible, float scale, float& m,
                                                float& l) {
  const float* srow = ss + row * lds + half * (BK / 2);
  float sc[BK / 2];
  float mx = -rl_inf();
  for (int j = 0; j < BK / 2; ++j) {
    sc[j] = (visible >> j & 1u) ? srow[j] * scale : -rl_inf();
    mx = fmaxf(mx, sc[j]);
  }
  const float m_new = fmaxf(m, fmaxf(mx, __shfl_xor_sync(RL_FULL_MASK, mx, 1)));
  // While the row has seen no key there is nothing to add, and exp(-inf - -inf) would be NaN.
  const bool live = m_new != -rl_inf();
  const float a = live ? __expf(m - m_new) : 1.f;  // 0 the first time, when m = -inf
  __syncwarp();  // every lane has read its scores before P overwrites them
  rl_bf16* prow = reinterpret_cast<rl_bf16*>(ss) + row * ldp + half * (BK / 2);
  float sum = 0.f;
  for (int j = 0; j < BK / 2; j += 2) {
    const float p0 = live ? __expf(sc[j] - m_new) : 0.f;  // 0 where masked
    const float p1 = live ? __expf(sc[j + 1] - m_new) : 0.f;
    sum += p0 + p1;
    // Two bf16 to a 4-byte store (the half row starts at an even column).
    *reinterpret_cast<unsigned*>(prow + j) =
        (unsigned)to_bf16(p0).bits | ((unsigned)to_bf16(p1).bits << 16);
  }
  l = l * a + sum;
  m = live ? m_new : m;
  if (half == 0) alpha[row] = a;
}

/// The tensor-core forward: the contract of `attn_fwd` (see the file comment), bf16 only, HD a
/// multiple of 16. A block takes ATTN_TC_BQ = 64 query rows of one (sequence, head), 16 per warp,
/// and streams keys through shared memory in tiles of BK, each fetched into registers while the
/// tile before it is worked on (`AttnTileRegs`). Per tile and warp: S = Q·Kᵀ on the tensor cores
/// (Q and K from shared memory, K as a col_major multiplicand), stored to shared memory; the
/// online softmax on the stored tile (`attn_tc_softmax`, P written over S); then
/// O = O·alpha + P·V, O in accumulator fragments for the whole loop. Scaling O by its row's alpha
/// needs each fragment element's row, which CUDA leaves unspecified: the kernel reads it back
/// once from a tile whose element (r, c) is r, loaded into an accumulator fragment (`rowid`), so
/// no step depends on the hardware's fragment layout. Shared memory (`attn_fwd_tc_smem` in
/// plan.rs), per block: K and V [BK][HD + 8] and Q [64][HD + 8] bf16, S (then P) [64][BK + 4]
/// f32, alpha [64] f32: 43 KB at HD = 128, BK = 32, and 44 KB at HD = 64, BK = 64. The rows are
/// padded so that the eight 16-byte rows a fragment load reads at once fall in different banks;
/// tiles and strides stay multiples of 32 and 16 bytes, as wmma's loads and stores require.
template <int HD, int BK>
__device__ __forceinline__ void attn_fwd_tc(const rl_bf16* __restrict__ qkv,
                                            const unsigned* __restrict__ key_mask, int T, int NH,
                                            int KVH, float scale, rl_bf16* __restrict__ out,
                                            float* __restrict__ lse) {
  constexpr int LDKV = HD + 8;  // K, V and Q
  constexpr int LDS = BK + 4;   // S, in f32
  constexpr int LDP = BK + 8;   // P, in bf16, over S
  constexpr int NC = HD / ATTN_WM;  // O's 16-column blocks
  RL_DYNAMIC_SHARED(float, smem);
  rl_bf16* ks = reinterpret_cast<rl_bf16*>(smem);        // [BK][LDKV]
  rl_bf16* vs = ks + BK * LDKV;                           // [BK][LDKV]
  rl_bf16* qs = vs + BK * LDKV;                           // [ATTN_TC_BQ][LDKV]
  float* ss = reinterpret_cast<float*>(qs + ATTN_TC_BQ * LDKV);  // [ATTN_TC_BQ][LDS]
  float* alpha = ss + ATTN_TC_BQ * LDS;                   // [ATTN_TC_BQ]
  const QueryTile qt = query_tile(ATTN_TC_BQ, T, NH, KVH);
  const int b = qt.b, h = qt.h, g = qt.g, i0 = qt.i0, rows = qt.rows;
  const int n_keys = i0 + rows;  // causality: no query of the tile sees a later key
  const long long w = (long long)(NH + 2 * KVH) * HD;
  const long long ow = (long long)NH * HD;
  const rl_bf16* seq = qkv + (long long)b * T * w;
  const unsigned* mask = key_mask + (long long)b * T;
  const int warp = threadIdx.x / RL_WARP;
  const int lane = threadIdx.x % RL_WARP;
  const int r0 = warp * ATTN_TC_ROWS;  // the warp's first row in the block
  const rl_bf16* qs_w = qs + r0 * LDKV;
  float* ss_w = ss + r0 * LDS;
  const rl_bf16* ps_w = reinterpret_cast<const rl_bf16*>(ss_w);
  float* alpha_w = alpha + r0;

  // Q, zero-padded past the sequence, and the row ids through the warp's S area.
  load_tile_bf16<HD>(qs, LDKV, seq + i0 * w + h * HD, w, ATTN_TC_BQ, rows);
  for (int e = lane; e < ATTN_WM * ATTN_WM; e += RL_WARP) {
    ss_w[e / ATTN_WM * LDS + e % ATTN_WM] = (float)(e / ATTN_WM);
  }
  const rl_bf16* k_src = seq + (NH + g) * HD;
  const rl_bf16* v_src = seq + (NH + KVH + g) * HD;
  const bool aligned = attn_rows_aligned(seq, w);
  AttnTileRegs<HD, BK> k_next, v_next;
  attn_tile_fetch(k_next, k_src, w, n_keys, aligned);
  attn_tile_fetch(v_next, v_src, w, n_keys, aligned);
  __syncthreads();  // Q and the row ids written
  attn_frag_acc rowid;
  wmma::load_matrix_sync(rowid, ss_w, LDS, wmma::mem_row_major);
  attn_frag_acc o[NC];
  for (int c = 0; c < NC; ++c) wmma::fill_fragment(o[c], 0.f);

  const int row = lane / 2;  // the row this lane's softmax work is on, and its half of it
  const int half = lane % 2;
  const int i = i0 + r0 + row;
  // The warp's last row that exists: a tile starting after it has no key for the warp.
  const int last = i0 + attn_min(r0 + ATTN_TC_ROWS, rows) - 1;
  float m = -rl_inf();
  float l = 0.f;
  for (int j0 = 0; j0 < n_keys; j0 += BK) {
    attn_tile_put(k_next, ks, LDKV);
    attn_tile_put(v_next, vs, LDKV);
    __syncthreads();  // K and V written (and, the first time, every warp holds its row ids)
    if (j0 + BK < n_keys) {
      attn_tile_fetch(k_next, k_src + (j0 + BK) * w, w, n_keys - j0 - BK, aligned);
      attn_tile_fetch(v_next, v_src + (j0 + BK) * w, w, n_keys - j0 - BK, aligned);
    }
    if (r0 < rows && j0 <= last) {  // uniform over the warp
      attn_frag_acc sacc[BK / ATTN_WM];
      for (int n = 0; n < BK / ATTN_WM; ++n) wmma::fill_fragment(sacc[n], 0.f);
      for (int c = 0; c < NC; ++c) {
        attn_frag_a qf;
        wmma::load_matrix_sync(qf, attn_nv(qs_w + c * ATTN_WM), LDKV);
        for (int n = 0; n < BK / ATTN_WM; ++n) {
          attn_frag_b_col kt;  // Kᵀ: element (d, j) at ks[j·LDKV + d]
          wmma::load_matrix_sync(kt, attn_nv(ks + n * ATTN_WM * LDKV + c * ATTN_WM), LDKV);
          wmma::mma_sync(sacc[n], qf, kt, sacc[n]);
        }
      }
      for (int n = 0; n < BK / ATTN_WM; ++n) {
        wmma::store_matrix_sync(ss_w + n * ATTN_WM, sacc[n], LDS, wmma::mem_row_major);
      }
      // Bit c of keys[c / 32]: tile column c is a key of the sequence that is not padding.
      unsigned keys[(BK + RL_WARP - 1) / RL_WARP];
      for (int k = 0; k * RL_WARP < BK; ++k) {
        const int j = j0 + k * RL_WARP + lane;
        keys[k] = __ballot_sync(RL_FULL_MASK, j < n_keys && mask[j] != 0u);
      }
      // This lane's half row: columns half·BK/2 on, within one ballot word.
      const int c0 = half * (BK / 2);
      const unsigned visible =
          r0 + row < rows
              ? attn_visible_bits<BK / 2>(keys[c0 / RL_WARP], c0 % RL_WARP, j0 + c0, i)
              : 0u;
      __syncwarp();  // the whole S tile is stored
      attn_tc_softmax<BK>(ss_w, LDS, LDP, alpha_w, row, half, visible, scale, m, l);
      __syncwarp();  // P and alpha are written
      for (int e = 0; e < rowid.num_elements; ++e) {
        const float a = alpha_w[(int)rowid.x[e]];
        for (int c = 0; c < NC; ++c) o[c].x[e] *= a;
      }
      attn_frag_a p[BK / ATTN_WM];
      for (int n = 0; n < BK / ATTN_WM; ++n) {
        wmma::load_matrix_sync(p[n], attn_nv(ps_w + n * ATTN_WM), LDP);
      }
      for (int c = 0; c < NC; ++c) {
        for (int n = 0; n < BK / ATTN_WM; ++n) {
          attn_frag_b_row v;  // element (j, d) at vs[j·LDKV + d]
          wmma::load_matrix_sync(v, attn_nv(vs + n * ATTN_WM * LDKV + c * ATTN_WM), LDKV);
          wmma::mma_sync(o[c], p[n], v, o[c]);
        }
      }
      __syncwarp();  // every lane has loaded P before the next tile's S overwrites it
    }
    __syncthreads();  // every warp is done with K and V
  }

  // O / Σ out, one 16-column block at a time through the warp's S area.
  const float sum = l + __shfl_xor_sync(RL_FULL_MASK, l, 1);
  const bool valid = r0 + row < rows;
  rl_bf16* o_row = out + ((long long)b * T + i) * ow + h * HD;
  for (int c = 0; c < NC; ++c) {
    wmma::store_matrix_sync(ss_w, o[c], LDS, wmma::mem_row_major);
    __syncwarp();  // the whole block is stored
    if (valid) {
      for (int d = half * (ATTN_WM / 2); d < (half + 1) * (ATTN_WM / 2); ++d) {
        store_f32(&o_row[c * ATTN_WM + d], sum > 0.f ? ss_w[row * LDS + d] / sum : 0.f);
      }
    }
    __syncwarp();  // every lane has read it before the next block overwrites it
  }
  if (valid && half == 0) {
    lse[((long long)b * NH + h) * T + i] = sum > 0.f ? m + logf(sum) : attn_lse_no_key();
  }
}

/// dS = P ∘ (dP - D) of one lane's half row (columns half·BN/2 on) of the dQ kernel's stored
/// 16 x BN tiles S and dP, with P = exp(scale·S - lse) where `visible` (bit jj: the half's column
/// jj) and 0 elsewhere; written as bf16 to `dss` (row stride BN). `lse` and `d`: the row's.
template <int BN>
__device__ __forceinline__ void attn_tc_ds(const float* ss, const float* dps, rl_bf16* dss,
                                           int row, int half, unsigned visible, float scale,
                                           float lse, float d) {
  for (int jj = 0; jj < BN / 2; ++jj) {
    const int j = row * BN + half * (BN / 2) + jj;
    const float p = (visible >> jj & 1u) ? __expf(ss[j] * scale - lse) : 0.f;
    dss[j] = to_bf16(p * (dps[j] - d));
  }
}

/// The tensor-core dQ: the contract of `attn_bwd_dq` (adds dq into dqkv), bf16, HD 64 or 128.
/// A block takes ATTN_TC_BQ = 64 query rows of one (sequence, head), 16 per warp, whose q and dO
/// it keeps in fragments, and streams K and V in tiles of BK. Per tile and warp: S = Q·Kᵀ and
/// dP = dO·Vᵀ on the tensor cores, stored; dS = P ∘ (dP - D) from the stored tiles, as bf16; dQ
/// += dS·K on the tensor cores, in fragments (the backward rescales nothing). Shared memory
/// (`attn_bwd_tc_dq_smem` in plan.rs): a union of the q and dO staging [64][HD] bf16 each, the K
/// and V tiles [BK][HD + 8] bf16 (rows padded against bank conflicts), and the dQ staging
/// [64][HD] f32 (32 KB at HD = 128); then per
/// warp S and dP [16][BK] f32 and dS [16][BK] bf16: 42 KB at HD = 128.
template <int HD, int BK>
__device__ __forceinline__ void attn_bwd_dq_tc(const rl_bf16* __restrict__ qkv,
                                               const rl_bf16* __restrict__ dout,
                                               const float* __restrict__ lse,
                                               const float* __restrict__ D,
                                               const unsigned* __restrict__ key_mask, int T, int NH,
                                               int KVH, float scale, rl_bf16* __restrict__ dqkv) {
  constexpr int LDK = HD + 8;  // K and V rows, padded against bank conflicts
  RL_DYNAMIC_SHARED(float, smem);
  float* un = smem;                                        // the union, 64·HD f32
  rl_bf16* qs = reinterpret_cast<rl_bf16*>(un);            // [64][HD] bf16, staging
  rl_bf16* dos = qs + ATTN_TC_BQ * HD;                     // [64][HD] bf16, staging
  rl_bf16* ks = qs;                                        // [BK][LDK] bf16, in the loop
  rl_bf16* vs = ks + BK * LDK;                             // [BK][LDK] bf16, in the loop
  float* ss = un + ATTN_TC_BQ * HD;                        // [64][BK]
  float* dps = ss + ATTN_TC_BQ * BK;                       // [64][BK]
  rl_bf16* dss = reinterpret_cast<rl_bf16*>(dps + ATTN_TC_BQ * BK);  // [64][BK]
  const QueryTile qt = query_tile(ATTN_TC_BQ, T, NH, KVH);
  const int b = qt.b, h = qt.h, g = qt.g, i0 = qt.i0, rows = qt.rows;
  const int n_keys = i0 + rows;
  const long long w = (long long)(NH + 2 * KVH) * HD;
  const long long ow = (long long)NH * HD;
  const rl_bf16* seq = qkv + (long long)b * T * w;
  const unsigned* mask = key_mask + (long long)b * T;
  const long long stats = ((long long)b * NH + h) * T;  // of (B, NH, T) lse and D
  const int warp = threadIdx.x / RL_WARP;
  const int lane = threadIdx.x % RL_WARP;
  const int r0 = warp * ATTN_TC_ROWS;
  const int row = lane / 2;
  const int half = lane % 2;
  const int i = i0 + r0 + row;
  const bool row_in = r0 + row < rows;
  const float lse_r = row_in ? lse[stats + i] : 0.f;
  const float d_r = row_in ? D[stats + i] : 0.f;

  load_tile_bf16<HD>(qs, HD, seq + i0 * w + h * HD, w, ATTN_TC_BQ, rows);
  load_tile_bf16<HD>(dos, HD, dout + ((long long)b * T + i0) * ow + h * HD, ow, ATTN_TC_BQ, rows);
  __syncthreads();
  attn_frag_a q[HD / ATTN_WM], dof[HD / ATTN_WM];
  attn_tc_load_a<HD>(q, qs + r0 * HD, HD);
  attn_tc_load_a<HD>(dof, dos + r0 * HD, HD);
  __syncthreads();  // every warp holds its q and dO before K and V overwrite the staging
  attn_frag_acc dq[HD / ATTN_WM];
  for (int c = 0; c < HD / ATTN_WM; ++c) wmma::fill_fragment(dq[c], 0.f);
  const int last = i0 + attn_min(r0 + ATTN_TC_ROWS, rows) - 1;  // the warp's last row
  for (int j0 = 0; j0 < n_keys; j0 += BK) {
    load_tile_bf16<HD>(ks, LDK, seq + j0 * w + (NH + g) * HD, w, BK, n_keys - j0);
    load_tile_bf16<HD>(vs, LDK, seq + j0 * w + (NH + KVH + g) * HD, w, BK, n_keys - j0);
    __syncthreads();  // K and V written
    if (r0 < rows && j0 <= last) {  // uniform over the warp
      attn_tc_abt<HD, BK>(ss + r0 * BK, BK, q, ks, LDK);
      attn_tc_abt<HD, BK>(dps + r0 * BK, BK, dof, vs, LDK);
      unsigned visible = 0;
      for (int jj = 0; jj < BK / 2; ++jj) {
        const int j = j0 + half * (BK / 2) + jj;
        visible |= (unsigned)(row_in && j <= i && j < n_keys && mask[j] != 0u) << jj;
      }
      __syncwarp();  // S and dP are stored
      attn_tc_ds<BK>(ss + r0 * BK, dps + r0 * BK, dss + r0 * BK, row, half, visible, scale,
                     lse_r, d_r);
      __syncwarp();  // dS is written
      attn_tc_accumulate<HD, BK>(dq, dss + r0 * BK, ks, LDK);
    }
    __syncthreads();  // every warp is done with K and V
  }
  if (r0 >= rows) return;  // uniform over the warp; no block barrier follows
  attn_tc_add_rows<HD>(dqkv + ((long long)b * T + i0 + r0) * w + h * HD, w, rows - r0, dq,
                       un + r0 * HD, scale);
}

/// The tensor-core dK and dV: the contract of `attn_bwd_dkdv` (adds dk and dv into dqkv), bf16,
/// HD 64 or 128. A block takes ATTN_TC_BQ = 64 keys of one (sequence, key/value head), 16 per
/// warp, keeps their K and V in shared memory and their dK and dV in fragments, and walks, for
/// each query head of the group in order, the query tiles of BQ from its first key on. Per tile
/// and warp (keys as rows, queries as columns): Sᵀ = K·Qᵀ, stored; Pᵀ from it, as bf16;
/// dV += Pᵀ·dO; dPᵀ = V·dOᵀ, stored over Sᵀ; dSᵀ = Pᵀ ∘ (dPᵀ - D), as bf16 over Pᵀ;
/// dK += dSᵀ·Q.
/// Shared memory (`attn_bwd_tc_dkdv_smem` in plan.rs): K and V [64][HD + 8] bf16 (rows padded
/// against bank conflicts; at the end, the dK/dV staging, [64][HD] f32), q and dO tiles [BQ][HD]
/// bf16, and per warp one [16][BQ] f32 tile and one [16][BQ] bf16 tile: 48 KB at HD = 128,
/// BQ = 16.
template <int HD, int BQ>
__device__ __forceinline__ void attn_bwd_dkdv_tc(const rl_bf16* __restrict__ qkv,
                                                 const rl_bf16* __restrict__ dout,
                                                 const float* __restrict__ lse,
                                                 const float* __restrict__ D,
                                                 const unsigned* __restrict__ key_mask, int T,
                                                 int NH, int KVH, float scale,
                                                 rl_bf16* __restrict__ dqkv) {
  constexpr int LDK = HD + 8;  // K and V rows, padded against bank conflicts
  RL_DYNAMIC_SHARED(float, smem);
  rl_bf16* ks = reinterpret_cast<rl_bf16*>(smem);           // [64][LDK]
  rl_bf16* vs = ks + ATTN_TC_BQ * LDK;                      // [64][LDK]
  float* stage = smem;                                      // [64][HD] f32, at the end
  rl_bf16* qs = vs + ATTN_TC_BQ * LDK;                      // [BQ][HD]
  rl_bf16* dos = qs + BQ * HD;                              // [BQ][HD]
  float* sbuf = reinterpret_cast<float*>(dos + BQ * HD);    // [64][BQ]: Sᵀ, then dPᵀ
  rl_bf16* pbuf = reinterpret_cast<rl_bf16*>(sbuf + ATTN_TC_BQ * BQ);  // [64][BQ]: Pᵀ, then dSᵀ
  const int tiles = (T + ATTN_TC_BQ - 1) / ATTN_TC_BQ;
  const int tile = (int)(blockIdx.x % tiles);  // earlier keys see more queries: longest first
  const int bg = (int)(blockIdx.x / tiles);
  const int b = bg / KVH;
  const int g = bg % KVH;
  const int group = NH / KVH;
  const int j0 = tile * ATTN_TC_BQ;
  const int keys = attn_min(ATTN_TC_BQ, T - j0);
  const long long w = (long long)(NH + 2 * KVH) * HD;
  const long long ow = (long long)NH * HD;
  const rl_bf16* seq = qkv + (long long)b * T * w;
  const int warp = threadIdx.x / RL_WARP;
  const int lane = threadIdx.x % RL_WARP;
  const int r0 = warp * ATTN_TC_ROWS;  // the warp's first key in the block
  const int row = lane / 2;
  const int half = lane % 2;
  const int key = j0 + r0 + row;  // this lane's key
  const bool key_in = r0 + row < keys && key_mask[(long long)b * T + key] != 0u;
  float* sb = sbuf + r0 * BQ;
  rl_bf16* pb = pbuf + r0 * BQ;

  load_tile_bf16<HD>(ks, LDK, seq + j0 * w + (NH + g) * HD, w, ATTN_TC_BQ, keys);
  load_tile_bf16<HD>(vs, LDK, seq + j0 * w + (NH + KVH + g) * HD, w, ATTN_TC_BQ, keys);
  attn_frag_acc dk[HD / ATTN_WM], dv[HD / ATTN_WM];
  for (int c = 0; c < HD / ATTN_WM; ++c) {
    wmma::fill_fragment(dk[c], 0.f);
    wmma::fill_fragment(dv[c], 0.f);
  }
  for (int hh = 0; hh < group; ++hh) {
    const int h = g * group + hh;
    const long long stats = ((long long)b * NH + h) * T;
    for (int i0 = j0; i0 < T; i0 += BQ) {  // causality: queries before j0 see no key
      const int rows = attn_min(BQ, T - i0);
      load_tile_bf16<HD>(qs, HD, seq + i0 * w + h * HD, w, BQ, rows);
      load_tile_bf16<HD>(dos, HD, dout + ((long long)b * T + i0) * ow + h * HD, ow, BQ, rows);
      __syncthreads();  // q and dO (and, the first time, K and V) written
      // Uniform over the warp: its keys exist and the tile's last query sees its first key.
      if (r0 < keys && i0 + rows - 1 >= j0 + r0) {
        unsigned visible = 0;
        float lse_c[BQ / 2], d_c[BQ / 2];
        for (int jj = 0; jj < BQ / 2; ++jj) {
          const int col = half * (BQ / 2) + jj;
          const bool v = key_in && col < rows && key <= i0 + col;
          visible |= (unsigned)v << jj;
          lse_c[jj] = v ? lse[stats + i0 + col] : 0.f;
          d_c[jj] = v ? D[stats + i0 + col] : 0.f;
        }
        attn_frag_a a[HD / ATTN_WM];
        attn_tc_load_a<HD>(a, ks + r0 * LDK, LDK);
        attn_tc_abt<HD, BQ>(sb, BQ, a, qs, HD);  // Sᵀ
        __syncwarp();  // Sᵀ is stored
        for (int jj = 0; jj < BQ / 2; ++jj) {
          const int col = half * (BQ / 2) + jj;
          const float p =
              (visible >> jj & 1u) ? __expf(sb[row * BQ + col] * scale - lse_c[jj]) : 0.f;
          pb[row * BQ + col] = to_bf16(p);
        }
        __syncwarp();  // Pᵀ is written, and every lane has read Sᵀ
        attn_tc_accumulate<HD, BQ>(dv, pb, dos, HD);
        attn_tc_load_a<HD>(a, vs + r0 * LDK, LDK);
        attn_tc_abt<HD, BQ>(sb, BQ, a, dos, HD);  // dPᵀ, over Sᵀ
        __syncwarp();  // dPᵀ is stored, and every lane has read Pᵀ into its fragments
        for (int jj = 0; jj < BQ / 2; ++jj) {
          const int col = half * (BQ / 2) + jj;
          const float p = to_f32(pb[row * BQ + col]);
          pb[row * BQ + col] = to_bf16(p * (sb[row * BQ + col] - d_c[jj]));
        }
        __syncwarp();  // dSᵀ is written
        attn_tc_accumulate<HD, BQ>(dk, pb, qs, HD);
      }
      __syncthreads();  // every warp is done with q and dO (and K and V, the last time)
    }
  }
  if (r0 >= keys) return;  // uniform over the warp; no block barrier follows
  rl_bf16* key_rows = dqkv + ((long long)b * T + j0 + r0) * w;
  attn_tc_add_rows<HD>(key_rows + (NH + g) * HD, w, keys - r0, dk, stage + r0 * HD, scale);
  attn_tc_add_rows<HD>(key_rows + (NH + KVH + g) * HD, w, keys - r0, dv, stage + r0 * HD, 1.f);
}

// ------------------------------------------------------------------------------------------------
// entry points
// ------------------------------------------------------------------------------------------------

extern "C" __global__ void attn_fwd_f32(const float* qkv, const unsigned* key_mask, int T, int NH,
                                        int KVH, int HD, float scale, float* out, float* lse) {
  attn_fwd(qkv, key_mask, T, NH, KVH, HD, scale, out, lse);
}

extern "C" __global__ void attn_decode_f32(const float* qkv, const float* k_cache,
                                           const float* v_cache, const unsigned* key_mask, int NH,
                                           int KVH, int HD, int len, int t_max, float scale,
                                           float* out) {
  attn_decode(qkv, k_cache, v_cache, key_mask, NH, KVH, HD, len, t_max, scale, out);
}

extern "C" __global__ void attn_bwd_dot_f32(const float* dout, const float* out, int rows, int T,
                                            int NH, int HD, float* D) {
  attn_bwd_dot(dout, out, rows, T, NH, HD, D);
}

extern "C" __global__ void attn_bwd_dq_f32(const float* qkv, const float* dout, const float* lse,
                                           const float* D, const unsigned* key_mask, int T, int NH,
                                           int KVH, int HD, float scale, float* dqkv) {
  attn_bwd_dq(qkv, dout, lse, D, key_mask, T, NH, KVH, HD, scale, dqkv);
}

extern "C" __global__ void attn_bwd_dkdv_f32(const float* qkv, const float* dout, const float* lse,
                                             const float* D, const unsigned* key_mask, int T,
                                             int NH, int KVH, int HD, float scale, float* dqkv) {
  attn_bwd_dkdv(qkv, dout, lse, D, key_mask, T, NH, KVH, HD, scale, dqkv);
}

extern "C" __global__ void attn_fwd_bf16(const rl_bf16* qkv, const unsigned* key_mask, int T,
                                         int NH, int KVH, int HD, float scale, rl_bf16* out,
                                         float* lse) {
  attn_fwd(qkv, key_mask, T, NH, KVH, HD, scale, out, lse);
}

extern "C" __global__ void attn_decode_bf16(const rl_bf16* qkv, const rl_bf16* k_cache,
                                            const rl_bf16* v_cache, const unsigned* key_mask,
                                            int NH, int KVH, int HD, int len, int t_max,
                                            float scale, rl_bf16* out) {
  attn_decode(qkv, k_cache, v_cache, key_mask, NH, KVH, HD, len, t_max, scale, out);
}

extern "C" __global__ void attn_bwd_dot_bf16(const rl_bf16* dout, const rl_bf16* out, int rows,
                                             int T, int NH, int HD, float* D) {
  attn_bwd_dot(dout, out, rows, T, NH, HD, D);
}

extern "C" __global__ void attn_bwd_dq_bf16(const rl_bf16* qkv, const rl_bf16* dout,
                                            const float* lse, const float* D,
                                            const unsigned* key_mask, int T, int NH, int KVH,
                                            int HD, float scale, rl_bf16* dqkv) {
  attn_bwd_dq(qkv, dout, lse, D, key_mask, T, NH, KVH, HD, scale, dqkv);
}

extern "C" __global__ void attn_bwd_dkdv_bf16(const rl_bf16* qkv, const rl_bf16* dout,
                                              const float* lse, const float* D,
                                              const unsigned* key_mask, int T, int NH, int KVH,
                                              int HD, float scale, rl_bf16* dqkv) {
  attn_bwd_dkdv(qkv, dout, lse, D, key_mask, T, NH, KVH, HD, scale, dqkv);
}

extern "C" __global__ void attn_fwd_tc_bf16(const rl_bf16* qkv, const unsigned* key_mask, int T,
                                            int NH, int KVH, int HD, float scale, rl_bf16* out,
                                            float* lse) {
  // The host (plan::attn_fwd_tc) launches it for these head dims only, with the shared memory
  // of these key tiles (plan::attn_fwd_tc_bk).
  if (HD == 64) {
    attn_fwd_tc<64, 64>(qkv, key_mask, T, NH, KVH, scale, out, lse);
  } else if (HD == 128) {
    attn_fwd_tc<128, 32>(qkv, key_mask, T, NH, KVH, scale, out, lse);
  }
}

extern "C" __global__ void attn_bwd_dq_tc_bf16(const rl_bf16* qkv, const rl_bf16* dout,
                                               const float* lse, const float* D,
                                               const unsigned* key_mask, int T, int NH, int KVH,
                                               int HD, float scale, rl_bf16* dqkv) {
  // For these head dims only (plan::attn_bwd_dq_tc), with the key tiles of plan::attn_tc_bk.
  if (HD == 64) {
    attn_bwd_dq_tc<64, 32>(qkv, dout, lse, D, key_mask, T, NH, KVH, scale, dqkv);
  } else if (HD == 128) {
    attn_bwd_dq_tc<128, 16>(qkv, dout, lse, D, key_mask, T, NH, KVH, scale, dqkv);
  }
}

extern "C" __global__ void attn_bwd_dkdv_tc_bf16(const rl_bf16* qkv, const rl_bf16* dout,
                                                 const float* lse, const float* D,
                                                 const unsigned* key_mask, int T, int NH, int KVH,
                                                 int HD, float scale, rl_bf16* dqkv) {
  // For these head dims only (plan::attn_bwd_dkdv_tc); query tiles of 16 keep the shared memory
  // within 48 KB at HD = 128.
  if (HD == 64) {
    attn_bwd_dkdv_tc<64, 32>(qkv, dout, lse, D, key_mask, T, NH, KVH, scale, dqkv);
  } else if (HD == 128) {
    attn_bwd_dkdv_tc<128, 16>(qkv, dout, lse, D, key_mask, T, NH, KVH, scale, dqkv);
  }
}
