// attention.cu: fused causal self-attention with grouped-query heads and a key padding mask,
// FlashAttention-2 style, in plain SIMT code (one fused multiply-add per lane per step; a
// tensor-core version belongs in a file of its own): the forward, the decode step (one query row
// per sequence against the KV cache) and the backward.
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
  const int tiles = (T + ATTN_BQ - 1) / ATTN_BQ;
  // Later query tiles see more keys: the first blocks take them, so the longest start first.
  const int tile = tiles - 1 - (int)(blockIdx.x % tiles);
  const int bh = (int)(blockIdx.x / tiles);
  const int b = bh / NH;
  const int h = bh % NH;
  const int g = h / (NH / KVH);
  const int i0 = tile * ATTN_BQ;
  const long long w = (long long)(NH + 2 * KVH) * HD;
  const long long ow = (long long)NH * HD;
  const E* seq = qkv + (long long)b * T * w;
  AttendJob<E> a;
  a.q = seq + i0 * w + h * HD;
  a.q_stride = w;
  a.rows = attn_min(ATTN_BQ, T - i0);
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
  const int tiles = (T + ATTN_BQ - 1) / ATTN_BQ;
  const int tile = tiles - 1 - (int)(blockIdx.x % tiles);  // longest first, as in the forward
  const int bh = (int)(blockIdx.x / tiles);
  const int b = bh / NH;
  const int h = bh % NH;
  const int g = h / (NH / KVH);
  const int i0 = tile * ATTN_BQ;
  const int rows = attn_min(ATTN_BQ, T - i0);
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
