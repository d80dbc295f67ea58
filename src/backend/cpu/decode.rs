//! Generation with a KV cache on the CPU: storing new keys/values, one-row attention, and picking
//! tokens (in `sample.rs`). Nothing here allocates: the decode loop must not.

use super::math::{self, simd_dispatch};
use super::reduce::{max, sum};
use super::team;
use super::Cpu;
use crate::backend::{AttnShape, DecodeOps, SampleParams};

impl DecodeOps for Cpu {
    fn kv_cache_store(
        &self,
        k_cache: &mut [f32],
        v_cache: &mut [f32],
        qkv: &[f32],
        s: AttnShape,
        t0: usize,
        t_max: usize,
    ) {
        kv_cache_store(k_cache, v_cache, qkv, s, t0, t_max)
    }
    fn attention_decode(
        &self,
        out: &mut [f32],
        qkv: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        key_mask: &[bool],
        s: AttnShape,
        len: usize,
        t_max: usize,
    ) {
        attention_decode(out, qkv, k_cache, v_cache, key_mask, s, len, t_max)
    }
    fn sample_tokens(
        &self,
        logits: &[f32],
        rows: &[u32],
        v: usize,
        p: SampleParams,
        uniforms: &[f64],
        ids: &mut [u32],
        logps: &mut [f32],
    ) {
        super::sample::sample_tokens(logits, rows, v, p, uniforms, ids, logps)
    }
}

/// Copies k and v of `qkv` (B·S rows) into caches (B, KVH, TMAX, HD) at columns t0..t0+S.
pub fn kv_cache_store(
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    qkv: &[f32],
    s: AttnShape,
    t0: usize,
    t_max: usize,
) {
    let (hd, kvh, w) = (s.head_dim, s.n_kv_head, s.qkv_width());
    assert!(
        t0 + s.t <= t_max,
        "kv_cache_store: columns {t0}..{} beyond the cache's {t_max}",
        t0 + s.t
    );
    assert_eq!(
        k_cache.len(),
        s.b * kvh * t_max * hd,
        "kv_cache_store: cache is not B·KVH·TMAX·HD"
    );
    assert_eq!(
        qkv.len(),
        s.b * s.t * w,
        "kv_cache_store: qkv is not B·S·QKV"
    );
    let k_off = s.n_head * hd;
    let v_off = k_off + kvh * hd;
    for b in 0..s.b {
        for i in 0..s.t {
            let row = &qkv[(b * s.t + i) * w..(b * s.t + i + 1) * w];
            for h in 0..kvh {
                let dst = ((b * kvh + h) * t_max + t0 + i) * hd;
                k_cache[dst..dst + hd].copy_from_slice(&row[k_off + h * hd..k_off + (h + 1) * hd]);
                v_cache[dst..dst + hd].copy_from_slice(&row[v_off + h * hd..v_off + (h + 1) * hd]);
            }
        }
    }
}

/// One query per sequence against the cache, softmax over the visible columns a tile at a time.
/// out: (B, NH·HD), qkv: (B, QKV), caches: (B, KVH, TMAX, HD), key_mask: B·TMAX.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    out: &mut [f32],
    qkv: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    key_mask: &[bool],
    s: AttnShape,
    len: usize,
    t_max: usize,
) {
    let (hd, nh, kvh, w) = (s.head_dim, s.n_head, s.n_kv_head, s.qkv_width());
    assert!(
        len <= t_max && key_mask.len() == s.b * t_max,
        "attention_decode: bad cache length or mask"
    );
    assert_eq!(
        out.len(),
        s.b * nh * hd,
        "attention_decode: out is not B·NH·HD"
    );
    if out.is_empty() {
        return;
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let group = nh / kvh;
    // One task per (sequence, KV head): the query heads of its group are adjacent in `out` and
    // in the qkv row, and share the task's cache rows and mask. Each task writes only its own
    // outputs, so the split does not change any result. The tasks go to the spinning team
    // (`team.rs`), not to rayon: at the llama fixture's size the whole call takes a few
    // microseconds, about what waking a rayon worker costs.
    let out = SharedOut(out.as_mut_ptr());
    let out = &out;
    team::for_each(s.b * kvh, &|bg| {
        // SAFETY: task bg writes only its own group of heads, inside `out` (B·NH·HD).
        let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(bg * group * hd), group * hd) };
        let (b, g) = (bg / kvh, bg % kvh);
        let q = &qkv[b * w + g * group * hd..b * w + (g + 1) * group * hd];
        let cache = (b * kvh + g) * t_max * hd;
        let (k, v) = (
            &k_cache[cache..cache + len * hd],
            &v_cache[cache..cache + len * hd],
        );
        let mask = &key_mask[b * t_max..b * t_max + len];
        for (oh, qh) in o.chunks_exact_mut(hd).zip(q.chunks_exact(hd)) {
            attend_one(oh, qh, k, v, mask, scale);
        }
    });
}

/// The output's base pointer, shared by the attention tasks, each writing its own heads.
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint elements, and the output outlives their parallel loop.
unsafe impl Sync for SharedOut {}

/// Key columns per softmax tile: the scores and column indices of a tile live on the stack.
const TILE: usize = 128;

/// Lanes of the head-dim vectors below: one AVX-512 register.
const LANES: usize = 16;

// `tile_scores` pads a tile to whole blocks of `LANES` columns within its `TILE`-long arrays.
const _: () = assert!(TILE.is_multiple_of(LANES));

simd_dispatch! {
    /// One query `q` against the visible rows of `k` and `v` (len·HD each).
    fn attend_one(o: &mut [f32], q: &[f32], k: &[f32], v: &[f32], mask: &[bool], scale: f32) =
        attend_one_body;
}

/// Flash-decoding over tiles of [`TILE`] columns, accumulating into `o`: per tile the scores of
/// the visible columns, their max, `exp(score - max)` (vectorised) and sum, then one rescale of
/// `o` and the weighted V rows. The online rescale is per tile rather than per column.
#[inline(always)]
fn attend_one_body(o: &mut [f32], q: &[f32], k: &[f32], v: &[f32], mask: &[bool], scale: f32) {
    let hd = q.len();
    assert!(
        k.len() == mask.len() * hd && v.len() == k.len() && o.len() == hd,
        "attend_one: k, v and mask disagree"
    );
    let mut cols = [0u32; TILE];
    let mut p = [0.0f32; TILE];
    o.fill(0.0);
    let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
    for (t, tile_mask) in mask.chunks(TILE).enumerate() {
        let n = visible_columns(&mut cols, tile_mask, t * TILE);
        if n == 0 {
            // Nothing to add, and exp(-inf - -inf) would be NaN.
            continue;
        }
        tile_scores(&mut p, q, k, &mut cols, n);
        let (cols, p) = (&cols[..n], &mut p[..n]);
        for s in p.iter_mut() {
            *s *= scale;
        }
        let m_new = m.max(max(p));
        for s in p.iter_mut() {
            *s = math::exp(*s - m_new);
        }
        // Rescale what was accumulated under the old max (0 the first time, when `o` is zero).
        let corr = math::exp(m - m_new);
        l = l * corr + sum(p);
        m = m_new;
        accumulate(o, corr, p, cols, v);
    }
    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
    for a in o.iter_mut() {
        *a *= inv;
    }
}

/// Writes the indices (from `j0`) of the visible columns of `mask` (at most [`TILE`]) into
/// `cols`; returns how many.
#[inline(always)]
fn visible_columns(cols: &mut [u32; TILE], mask: &[bool], j0: usize) -> usize {
    assert!(mask.len() <= TILE, "visible_columns: more than a tile");
    let mut n = 0;
    let mut start = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked just above; the mask fits the tile (asserted).
        (n, start) = unsafe { visible_columns_avx512(cols, mask, j0) };
    }
    for (j, &vis) in mask.iter().enumerate().skip(start) {
        // Branch-free: always write, advance only past a visible column.
        cols[n] = (j0 + j) as u32;
        n += vis as usize;
    }
    n
}

/// [`visible_columns`] for whole blocks of 16 columns by a compressing store, where the scalar
/// loop's count is one chain of dependent adds. Returns the count and the columns covered.
///
/// # Safety
/// The CPU must support AVX-512F, and `mask` must hold at most [`TILE`] columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn visible_columns_avx512(
    cols: &mut [u32; TILE],
    mask: &[bool],
    j0: usize,
) -> (usize, usize) {
    use std::arch::x86_64::*;
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut n = 0;
    let blocks = mask.chunks_exact(LANES);
    let covered = mask.len() - blocks.remainder().len();
    for (i, block) in blocks.enumerate() {
        // SAFETY: a bool is one byte, 0 or 1, and the block holds 16 of them.
        let flags = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(block.as_ptr().cast()) });
        let visible = _mm512_test_epi32_mask(flags, flags);
        let index = _mm512_add_epi32(lane, _mm512_set1_epi32((j0 + i * LANES) as i32));
        // SAFETY: n + popcount <= covered <= TILE, so the stored lanes fit `cols`.
        unsafe {
            _mm512_mask_compressstoreu_epi32(cols.as_mut_ptr().add(n).cast(), visible, index)
        };
        n += visible.count_ones() as usize;
    }
    (n, covered)
}

/// `p[i] = q · k[cols[i]]` (unscaled) for the first `n` columns of `cols`: [`scores16_avx512`]
/// where the CPU has it (which may overwrite `cols` past `n`), else the portable body. Both give
/// the same bits.
fn tile_scores(p: &mut [f32; TILE], q: &[f32], k: &[f32], cols: &mut [u32; TILE], n: usize) {
    let hd = q.len();
    let rows = k.len().checked_div(hd).unwrap_or(0);
    assert!(
        cols[..n].iter().all(|&j| (j as usize) < rows),
        "tile_scores: a column beyond k's {rows} rows"
    );
    #[cfg(target_arch = "x86_64")]
    if n > 0 && std::arch::is_x86_feature_detected!("avx512f") {
        // Whole blocks of 16: pad with the last column, whose repeated scores are ignored.
        let padded = n.next_multiple_of(LANES);
        let last = cols[n - 1];
        cols[n..padded].fill(last);
        for (pb, cb) in p[..padded]
            .chunks_exact_mut(LANES)
            .zip(cols[..padded].chunks_exact(LANES))
        {
            let (pb, cb) = (pb.try_into().unwrap(), cb.try_into().unwrap());
            // SAFETY: the CPU supports AVX-512F, checked just above; every column is a row of
            // `k` (asserted above; the padding repeats one of them).
            unsafe { scores16_avx512(pb, q, k, cb) };
        }
        return;
    }
    scores_portable(&mut p[..n], q, k, &cols[..n]);
}

simd_dispatch! {
    /// [`tile_scores`] without AVX-512.
    fn scores_portable(p: &mut [f32], q: &[f32], k: &[f32], cols: &[u32]) = scores_body;
}

#[inline(always)]
fn scores_body(p: &mut [f32], q: &[f32], k: &[f32], cols: &[u32]) {
    let hd = q.len();
    for (s, &j) in p.iter_mut().zip(cols) {
        *s = dot_lanes(q, &k[j as usize * hd..(j as usize + 1) * hd]);
    }
}

/// `q · k` with [`LANES`] partial sums over the whole lane blocks, combined `[l] + [l + 8]`, then
/// `+ 4`, `+ 2`, `+ 1`, then the tail in order: the order [`scores16_avx512`] reproduces.
#[inline(always)]
fn dot_lanes(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (cq, ck) = (q.chunks_exact(LANES), k.chunks_exact(LANES));
    let tail = tail_dot(cq.remainder(), ck.remainder());
    for (x, y) in cq.zip(ck) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    math::halve_lanes(acc) + tail
}

/// The products past the last whole lane block, summed in order.
#[inline(always)]
fn tail_dot(q: &[f32], k: &[f32]) -> f32 {
    q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>()
}

/// [`dot_lanes`] of `q` with the 16 rows `cols` of `k`, written with AVX-512 intrinsics for the
/// final reduction: left to LLVM, each dot compiled to 2-wide operations and cost more than
/// the rest of the attention (this made the whole call 1.3x faster at a head dim of 16, 1.5x
/// at 64, on warm caches). Here the 16 accumulators reduce together ([`math::lane_sums16`])
/// by the portable tree, so the bits are the same.
///
/// # Safety
/// The CPU must support AVX-512F, and every `cols[c]` must be a row of `k` (`k.len() / q.len()`
/// rows).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores16_avx512(p: &mut [f32; LANES], q: &[f32], k: &[f32], cols: &[u32; LANES]) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let whole = hd - hd % LANES;
    let rows: [*const f32; LANES] =
        std::array::from_fn(|c| k.as_ptr().wrapping_add(cols[c] as usize * hd));
    let mut acc = [_mm512_setzero_ps(); LANES];
    for d in (0..whole).step_by(LANES) {
        // SAFETY: d + 16 <= whole <= HD, so each load lies inside `q` or inside row cols[c] of
        // `k` (the caller's contract).
        let qd = unsafe { _mm512_loadu_ps(q.as_ptr().add(d)) };
        for (a, &row) in acc.iter_mut().zip(&rows) {
            // SAFETY: as above.
            let kd = unsafe { _mm512_loadu_ps(row.add(d)) };
            // Multiply, then add, as the portable body does (no FMA): the same rounding.
            *a = _mm512_add_ps(*a, _mm512_mul_ps(qd, kd));
        }
    }
    // SAFETY: the caller's contract (AVX-512F).
    let sums = unsafe { math::lane_sums16(acc) };
    if whole == hd {
        // No tail: the bounds-checked row slices below cost as much as the dots at HD = 16.
        *p = sums;
        return;
    }
    for (c, s) in p.iter_mut().enumerate() {
        let row = &k[cols[c] as usize * hd..(cols[c] as usize + 1) * hd];
        *s = sums[c] + tail_dot(&q[whole..], &row[whole..]);
    }
}

/// `o = o·corr + Σ_j p[j]·v[cols[j]]`, in blocks of up to 64 dims whose running sums stay in
/// registers across the columns. A whole block per column, rather than one lane chunk of every
/// column at a time, reads each V row front to back: the call ran a quarter faster at a head
/// dim of 64 with the cache coming from memory, as in a decode step (each sum's order is the
/// same either way).
#[inline(always)]
fn accumulate(o: &mut [f32], corr: f32, p: &[f32], cols: &[u32], v: &[f32]) {
    let hd = o.len();
    let whole = hd - hd % LANES;
    let mut d0 = 0;
    while d0 + 4 * LANES <= whole {
        accumulate_block::<{ 4 * LANES }>(o, d0, corr, p, cols, v);
        d0 += 4 * LANES;
    }
    while d0 < whole {
        accumulate_block::<LANES>(o, d0, corr, p, cols, v);
        d0 += LANES;
    }
    for d in whole..hd {
        let mut a = o[d] * corr;
        for (&pj, &j) in p.iter().zip(cols) {
            a += pj * v[j as usize * hd + d];
        }
        o[d] = a;
    }
}

/// [`accumulate`] for dims `d0..d0 + W`. Below 64 dims (4 vectors) the columns go round-robin
/// into 4 partial sums, added pairwise at the end: one running sum made each column wait for the
/// last one's add, and at the llama fixture's head dim of 16 that wait was most of the call.
#[inline(always)]
fn accumulate_block<const W: usize>(
    o: &mut [f32],
    d0: usize,
    corr: f32,
    p: &[f32],
    cols: &[u32],
    v: &[f32],
) {
    let hd = o.len();
    let mut a = [[0.0f32; W]; 4];
    for l in 0..W {
        a[0][l] = o[d0 + l] * corr;
    }
    let row = |j: u32| &v[j as usize * hd + d0..][..W];
    if W >= 4 * LANES {
        for (&pj, &j) in p.iter().zip(cols) {
            let vj = row(j);
            for l in 0..W {
                a[0][l] += pj * vj[l];
            }
        }
    } else {
        let (pq, cq) = (p.chunks_exact(4), cols.chunks_exact(4));
        let (pr, cr) = (pq.remainder(), cq.remainder());
        for (p4, c4) in pq.zip(cq) {
            for s in 0..4 {
                let vj = row(c4[s]);
                for l in 0..W {
                    a[s][l] += p4[s] * vj[l];
                }
            }
        }
        for (s, (&pj, &j)) in pr.iter().zip(cr).enumerate() {
            let vj = row(j);
            for l in 0..W {
                a[s][l] += pj * vj[l];
            }
        }
        let [a0, a1, a2, a3] = &mut a;
        for (l, a0) in a0.iter_mut().enumerate() {
            *a0 = (*a0 + a1[l]) + (a2[l] + a3[l]);
        }
    }
    o[d0..d0 + W].copy_from_slice(&a[0]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Deterministic values in [-2, 2).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.uniform() as f32 * 4.0 - 2.0).collect()
    }

    /// The AVX-512 scores give the portable body's bits, with and without a tail past the last
    /// whole lane block.
    #[test]
    fn avx512_scores_match_portable() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            for hd in [4, 16, 20, 64, 72] {
                let (q, k) = (values(hd, 1), values(40 * hd, 2));
                let cols: [u32; LANES] = std::array::from_fn(|c| (c * 5 % 40) as u32);
                let (mut wide, mut portable) = ([0.0f32; LANES], [0.0f32; LANES]);
                // SAFETY: AVX-512F checked above; every column is below 40, k's row count.
                unsafe { scores16_avx512(&mut wide, &q, &k, &cols) };
                scores_body(&mut portable, &q, &k, &cols);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                assert_eq!(bits(&wide), bits(&portable), "head dim {hd}");
            }
        }
    }

    /// Softmax attention of one query in f64, over the visible columns.
    fn reference(q: &[f32], k: &[f32], v: &[f32], mask: &[bool]) -> Vec<f64> {
        let hd = q.len();
        let scale = 1.0 / (hd as f64).sqrt();
        let score = |j: usize| {
            let kj = &k[j * hd..(j + 1) * hd];
            q.iter()
                .zip(kj)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
                * scale
        };
        let visible: Vec<usize> = (0..mask.len()).filter(|&j| mask[j]).collect();
        let m = visible.iter().map(|&j| score(j)).fold(f64::MIN, f64::max);
        let mut out = vec![0.0f64; hd];
        let mut total = 0.0;
        for &j in &visible {
            let w = (score(j) - m).exp();
            total += w;
            for (o, &x) in out.iter_mut().zip(&v[j * hd..(j + 1) * hd]) {
                *o += w * x as f64;
            }
        }
        out.iter()
            .map(|o| if total > 0.0 { o / total } else { 0.0 })
            .collect()
    }

    /// Several tiles, one of them wholly masked, holes, and a query that sees nothing.
    /// The compressing store lists the same columns as the scalar loop: every tile length up
    /// to a whole tile, random masks, all visible and none visible.
    #[test]
    fn visible_columns_lists_each_visible_column_once_in_order() {
        let mut rng = Rng::new(4);
        for len in 0..=TILE {
            for density in [0.0, 0.3, 0.9, 1.0] {
                let mask: Vec<bool> = (0..len).map(|_| rng.uniform() < density).collect();
                let j0 = 5 * TILE;
                let mut cols = [u32::MAX; TILE];
                let n = visible_columns(&mut cols, &mask, j0);
                let want: Vec<u32> = (0..len)
                    .filter(|&j| mask[j])
                    .map(|j| (j0 + j) as u32)
                    .collect();
                assert_eq!(&cols[..n], &want[..], "length {len}, density {density}");
            }
        }
    }

    #[test]
    fn attend_one_matches_f64_softmax() {
        let len = 3 * TILE + 7;
        for hd in [8, 16, 20, 64] {
            let (q, k, v) = (values(hd, 3), values(len * hd, 4), values(len * hd, 5));
            let holes: Vec<bool> = (0..len)
                .map(|j| !(TILE..2 * TILE).contains(&j) && j % 7 != 3)
                .collect();
            for mask in [vec![true; len], holes, vec![false; len]] {
                let mut o = vec![1.0f32; hd];
                attend_one(&mut o, &q, &k, &v, &mask, 1.0 / (hd as f32).sqrt());
                for (got, want) in o.iter().zip(reference(&q, &k, &v, &mask)) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-5,
                        "head dim {hd}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
