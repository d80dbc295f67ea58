//! Causal self-attention with grouped-query heads and a key padding mask, FlashAttention-2
//! style: queries go in blocks of [`TILE`] rows, keys in tiles of [`TILE`], with an online
//! softmax (running max and sum, the accumulator rescaled when the max grows, one
//! normalisation at the end). Only one `TILE × TILE` block of scores exists per task at a time;
//! the row log-sum-exp is saved and backward recomputes the probabilities from it.
//!
//! The tile products are `gemm` calls on strided views of `qkv` (no copies, one thread each:
//! the parallelism is across (batch, head) tasks). Each task writes a private, contiguous scratch
//! block, and a last parallel pass over token rows moves the blocks into the strided output, so
//! no two threads ever write the same memory and no atomics are needed.
//!
//! Shapes: `qkv` rows are `[q (NH·HD) | k (KVH·HD) | v (KVH·HD)]`, `B·T` rows batch-major;
//! `out` and `dout` are `(B·T, NH·HD)`; `lse` is `(B, NH, T)`.

use super::math::{self, simd_dispatch};
use super::matmul::{gemm_f32, Mat};
use super::reduce::{dot, max, sum};
use crate::backend::AttnShape;
use gemm::Parallelism;
use rayon::prelude::*;

/// Query rows per block and keys per tile: a 64×64 f32 score tile (16 KiB) and the q, k, v
/// tiles it is made from stay in L1/L2, and 64 is large enough for gemm's microkernels.
pub const TILE: usize = 64;

/// The `lse` stored for a query that sees no key: finite (so comparing two backends' `lse`
/// never meets `inf - inf`) and so large that `exp(s - lse)` is 0 for any score, so even a
/// backward that ignored the mask would give such a row no gradient.
pub const LSE_NO_KEY: f32 = f32::MAX;

/// Where one sequence's q head, k head and v head start inside a `qkv` row, and the row stride.
#[derive(Clone, Copy)]
struct Heads {
    /// Row stride of `qkv` (`qkv_width`).
    w: usize,
    /// Offset of the first row of this sequence (`b·T·w`).
    seq: usize,
    q: usize,
    k: usize,
    v: usize,
}

impl Heads {
    fn new(s: &AttnShape, b: usize, h: usize) -> Heads {
        let hd = s.head_dim;
        let g = h / (s.n_head / s.n_kv_head);
        let w = s.qkv_width();
        Heads {
            w,
            seq: b * s.t * w,
            q: h * hd,
            k: (s.n_head + g) * hd,
            v: (s.n_head + s.n_kv_head + g) * hd,
        }
    }
    /// Rows `i0..` of the q head, as a (rows, HD) matrix.
    fn q(&self, qkv: &[f32], i0: usize) -> Mat {
        Mat::rows(qkv, self.seq + i0 * self.w + self.q, self.w)
    }
    /// Rows `j0..` of the k head, transposed: a (HD, keys) matrix.
    fn k_t(&self, qkv: &[f32], j0: usize) -> Mat {
        Mat::cols(qkv, self.seq + j0 * self.w + self.k, self.w)
    }
    /// Rows `j0..` of the k head, as a (keys, HD) matrix.
    fn k(&self, qkv: &[f32], j0: usize) -> Mat {
        Mat::rows(qkv, self.seq + j0 * self.w + self.k, self.w)
    }
    /// Rows `j0..` of the v head, as a (keys, HD) matrix.
    fn v(&self, qkv: &[f32], j0: usize) -> Mat {
        Mat::rows(qkv, self.seq + j0 * self.w + self.v, self.w)
    }
    /// Rows `j0..` of the v head, transposed: a (HD, keys) matrix.
    fn v_t(&self, qkv: &[f32], j0: usize) -> Mat {
        Mat::cols(qkv, self.seq + j0 * self.w + self.v, self.w)
    }
}

/// Panics unless the buffers match the shape.
fn check(op: &str, s: &AttnShape, qkv: usize, out: usize, lse: usize, mask: usize) {
    assert!(
        s.n_kv_head > 0 && s.n_head.is_multiple_of(s.n_kv_head),
        "{op}: n_head {} is not a multiple of n_kv_head {}",
        s.n_head,
        s.n_kv_head
    );
    let n = s.b * s.t;
    assert_eq!(qkv, n * s.qkv_width(), "{op}: qkv is not B·T·qkv_width");
    assert_eq!(out, n * s.out_width(), "{op}: out is not B·T·NH·HD");
    assert_eq!(lse, s.b * s.n_head * s.t, "{op}: lse is not B·NH·T");
    assert_eq!(mask, n, "{op}: key_mask is not B·T");
}

/// A tile of keys `j0..j1` that query block `i0..i1` must visit, and whether any of its scores
/// needs masking.
#[derive(Clone, Copy)]
struct KeyTile {
    j0: usize,
    j1: usize,
    /// False when every key of the tile is unpadded and at or before the block's first query:
    /// then every score is visible and the masking pass is skipped.
    masked: bool,
}

/// The key tiles that query block `i0..i1` must visit: causality stops them at `i1`, and a tile
/// whose keys are all padding is skipped.
fn key_tiles(i0: usize, i1: usize, mask: &[bool]) -> impl Iterator<Item = KeyTile> + '_ {
    (0..i1).step_by(TILE).filter_map(move |j0| {
        let j1 = (j0 + TILE).min(i1);
        let keys = &mask[j0..j1];
        let padded = keys.iter().filter(|&&m| !m).count();
        (padded < keys.len()).then_some(KeyTile {
            j0,
            j1,
            masked: padded > 0 || j1 - 1 > i0,
        })
    })
}

/// Sets the scores of keys that query `i` may not see to -inf: later keys and padding.
/// row: the scores of keys `j0..j0 + row.len()`; keys: the key mask of those keys.
#[inline]
fn mask_row(row: &mut [f32], i: usize, j0: usize, keys: &[bool]) {
    // Keys after the query form a suffix of the row.
    let visible = (i + 1).saturating_sub(j0).min(row.len());
    row[visible..].fill(f32::NEG_INFINITY);
    for (s, &m) in row[..visible].iter_mut().zip(keys) {
        if !m {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// The scores of a tile row worth computing when its query sees `keys` of the tile's `bk` by
/// causality: rounded up to whole vectors of 16, since the masked ones (-inf) cost nothing extra
/// there and give exactly 0, where a scalar remainder loop would cost more than it saves.
fn visible(keys: usize, bk: usize) -> usize {
    keys.next_multiple_of(16).min(bk)
}

simd_dispatch! {
    fn online_softmax_simd(
        scores: &mut [f32],
        bk: usize,
        row_max: &mut [f32],
        row_sum: &mut [f32],
        acc: &mut [f32],
        hd: usize,
        causal: usize,
    ) = online_softmax;
}

/// One online-softmax step over a tile of (masked) scores: updates each row's running max and
/// sum, rescales its accumulator row when the max grows, and leaves `exp(score - max)` in
/// `scores` for the `P·V` product.
/// scores: (rows, bk), row_max, row_sum: (rows) with rows <= TILE, acc: (rows, hd); row `r`
/// sees at most its first `causal + r` keys (the rest are masked: their exps are 0, not computed).
///
/// Three passes over the rows (maxima, exps, sums and rescaling) rather than one: the exps
/// then run back to back with no reduction or branch between rows, and their latency overlaps.
/// Done row by row, a 64-key row's four vector exps waited on each other between two
/// reductions, and the softmax cost as much as the tile's two products.
#[inline(always)]
fn online_softmax(
    scores: &mut [f32],
    bk: usize,
    row_max: &mut [f32],
    row_sum: &mut [f32],
    acc: &mut [f32],
    hd: usize,
    causal: usize,
) {
    let mut m_new = [0.0f32; TILE];
    let m_new = &mut m_new[..row_max.len()];
    for (r, (m, row)) in m_new.iter_mut().zip(scores.chunks_exact(bk)).enumerate() {
        *m = row_max[r].max(max(&row[..visible(causal + r, bk)]));
    }
    for (r, (row, &m)) in scores.chunks_exact_mut(bk).zip(&*m_new).enumerate() {
        let (row, hidden) = row.split_at_mut(visible(causal + r, bk));
        hidden.fill(0.0);
        // No visible key yet: nothing to add, and exp(-inf - -inf) would be NaN.
        let m = if m == f32::NEG_INFINITY {
            f32::INFINITY
        } else {
            m
        };
        for x in row.iter_mut() {
            *x = math::exp(*x - m);
        }
    }
    for (r, row) in scores.chunks_exact(bk).enumerate() {
        if m_new[r] == f32::NEG_INFINITY {
            continue;
        }
        // Rescale what was accumulated under the old max (alpha = 0 the first time, when the
        // accumulator is still zero; 1 when the max did not grow, which changes nothing).
        let alpha = math::exp(row_max[r] - m_new[r]);
        row_sum[r] = row_sum[r] * alpha + sum(row);
        row_max[r] = m_new[r];
        for a in &mut acc[r * hd..(r + 1) * hd] {
            *a *= alpha;
        }
    }
}

simd_dispatch! {
    fn probs_simd(p: &mut [f32], bk: usize, lse: &[f32], causal: usize) = probs;
}

/// Turns a tile of (masked) scores into probabilities `exp(s - lse)`, recomputed from the
/// forward's row log-sum-exp. p: (rows, bk), lse: (rows); row `r` sees at most its first
/// `causal + r` keys, as in [`online_softmax`].
#[inline(always)]
fn probs(p: &mut [f32], bk: usize, lse: &[f32], causal: usize) {
    for (r, (row, &l)) in p.chunks_exact_mut(bk).zip(lse).enumerate() {
        let (row, hidden) = row.split_at_mut(visible(causal + r, bk));
        hidden.fill(0.0);
        for x in row.iter_mut() {
            *x = math::exp(*x - l);
        }
    }
}

simd_dispatch! {
    fn score_grad_simd(ds: &mut [f32], p: &[f32], bk: usize, d: &[f32], scale: f32) =
        score_grad;
}

/// `dS = P ∘ (dP - D)·scale` in place of `dP`: the softmax backward per row, with the score scale
/// folded in. ds (holding dP), p: (rows, bk), d: (rows) the `rowsum(dO ∘ O)`.
#[inline(always)]
fn score_grad(ds: &mut [f32], p: &[f32], bk: usize, d: &[f32], scale: f32) {
    for ((row, prow), &dr) in ds.chunks_exact_mut(bk).zip(p.chunks_exact(bk)).zip(d) {
        for (x, &pv) in row.iter_mut().zip(prow) {
            *x = pv * (*x - dr) * scale;
        }
    }
}

/// Causal GQA attention forward. Key `j` is visible to query `i` of the same sequence iff
/// `j <= i && key_mask[b·T + j]`; a query that sees no key outputs zeros and `lse = LSE_NO_KEY`.
/// out: (B·T, NH·HD), lse: (B, NH, T), qkv: (B·T, qkv_width), key_mask: (B·T).
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    key_mask: &[bool],
    s: AttnShape,
) {
    check(
        "attention_forward",
        &s,
        qkv.len(),
        out.len(),
        lse.len(),
        key_mask.len(),
    );
    let (t, hd, nh) = (s.t, s.head_dim, s.n_head);
    if s.b == 0 || t == 0 || nh == 0 || hd == 0 {
        return;
    }
    let scale = 1.0 / (hd as f32).sqrt();
    // One (T, HD) block per (b, h): the task's normalised output, moved into `out` at the end.
    let mut head_out = vec![0.0f32; s.b * nh * t * hd];
    head_out
        .par_chunks_mut(t * hd)
        .zip(lse.par_chunks_mut(t))
        .enumerate()
        .for_each(|(task, (acc_all, lse))| {
            let (b, h) = (task / nh, task % nh);
            let heads = Heads::new(&s, b, h);
            let mask = &key_mask[b * t..(b + 1) * t];
            let mut scores = vec![0.0f32; TILE * TILE];
            let mut row_max = [0.0f32; TILE];
            let mut row_sum = [0.0f32; TILE];
            for i0 in (0..t).step_by(TILE) {
                let i1 = (i0 + TILE).min(t);
                let bq = i1 - i0;
                let acc = &mut acc_all[i0 * hd..i1 * hd];
                row_max[..bq].fill(f32::NEG_INFINITY);
                row_sum[..bq].fill(0.0);
                for tile in key_tiles(i0, i1, mask) {
                    let (j0, j1) = (tile.j0, tile.j1);
                    let bk = j1 - j0;
                    let sc = &mut scores[..bq * bk];
                    // SAFETY: rows i0..i1 and j0..j1 of sequence b lie inside qkv (i1, j1 <= T,
                    // checked shape), each row read over HD columns from its head's offset;
                    // `scores` is a separate allocation.
                    unsafe {
                        gemm_f32(
                            sc,
                            bk,
                            heads.q(qkv, i0),
                            heads.k_t(qkv, j0),
                            bq,
                            bk,
                            hd,
                            scale,
                            false,
                            Parallelism::None,
                        )
                    };
                    if tile.masked {
                        for r in 0..bq {
                            let row = &mut sc[r * bk..(r + 1) * bk];
                            mask_row(row, i0 + r, j0, &mask[j0..j1]);
                        }
                    }
                    let (maxes, sums) = (&mut row_max[..bq], &mut row_sum[..bq]);
                    online_softmax_simd(sc, bk, maxes, sums, acc, hd, i0 + 1 - j0);
                    // SAFETY: as above; the probabilities are a (bq, bk) block of `scores`.
                    unsafe {
                        gemm_f32(
                            acc,
                            hd,
                            Mat::rows(&scores, 0, bk),
                            heads.v(qkv, j0),
                            bq,
                            hd,
                            bk,
                            1.0,
                            true,
                            Parallelism::None,
                        )
                    };
                }
                for r in 0..bq {
                    let o = &mut acc[r * hd..(r + 1) * hd];
                    if row_sum[r] > 0.0 {
                        let l = row_sum[r];
                        for x in o.iter_mut() {
                            *x /= l;
                        }
                        lse[i0 + r] = row_max[r] + l.ln();
                    } else {
                        o.fill(0.0);
                        lse[i0 + r] = LSE_NO_KEY;
                    }
                }
            }
        });
    // Scatter the (b, h) blocks into the token-major output.
    let ow = s.out_width();
    out.par_chunks_mut(ow).enumerate().for_each(|(row, o)| {
        let (b, i) = (row / t, row % t);
        for (h, oh) in o.chunks_exact_mut(hd).enumerate() {
            let src = ((b * nh + h) * t + i) * hd;
            oh.copy_from_slice(&head_out[src..src + hd]);
        }
    });
}

/// Causal GQA attention backward: `dqkv += ∂L/∂qkv` given `dout = ∂L/∂out`.
///
/// With `P = exp(S - lse)` recomputed tile by tile and `D_i = Σ_d dO_id·O_id`:
/// `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP - D)`, `dQ += scale·dS·K`, `dK += scale·dSᵀ·Q`.
/// Tasks are (batch, kv head) groups, so each task owns its k/v head's gradient outright and sums
/// the contributions of its query heads in a fixed order.
/// dqkv: (B·T, qkv_width), dout, out: (B·T, NH·HD), qkv: (B·T, qkv_width), lse: (B, NH, T),
/// key_mask: (B·T).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    key_mask: &[bool],
    s: AttnShape,
) {
    check(
        "attention_backward",
        &s,
        qkv.len(),
        out.len(),
        lse.len(),
        key_mask.len(),
    );
    assert_eq!(
        dqkv.len(),
        qkv.len(),
        "attention_backward: dqkv and qkv differ in length"
    );
    assert_eq!(
        dout.len(),
        out.len(),
        "attention_backward: dout and out differ in length"
    );
    let (t, hd, nh, kvh) = (s.t, s.head_dim, s.n_head, s.n_kv_head);
    if s.b == 0 || t == 0 || nh == 0 || hd == 0 {
        return;
    }
    let group = nh / kvh;
    let ow = s.out_width();
    let scale = 1.0 / (hd as f32).sqrt();
    // Per (b, g) task a (T, RW) block; row i is [dq of the group's heads (G·HD) | dk | dv].
    let rw = (group + 2) * hd;
    let mut grads = vec![0.0f32; s.b * kvh * t * rw];
    grads
        .par_chunks_mut(t * rw)
        .enumerate()
        .for_each(|(task, g_all)| {
            let (b, g) = (task / kvh, task % kvh);
            let mask = &key_mask[b * t..(b + 1) * t];
            let mut p = vec![0.0f32; TILE * TILE];
            let mut ds = vec![0.0f32; TILE * TILE];
            let mut d_row = [0.0f32; TILE];
            for r_head in 0..group {
                let h = g * group + r_head;
                let heads = Heads::new(&s, b, h);
                let lse = &lse[(b * nh + h) * t..(b * nh + h + 1) * t];
                // dO and O of this head: (T, HD) views with row stride NH·HD.
                let o_off = b * t * ow + h * hd;
                for i0 in (0..t).step_by(TILE) {
                    let i1 = (i0 + TILE).min(t);
                    let bq = i1 - i0;
                    for (r, d) in d_row[..bq].iter_mut().enumerate() {
                        let at = o_off + (i0 + r) * ow;
                        *d = dot(&dout[at..at + hd], &out[at..at + hd]);
                    }
                    for tile in key_tiles(i0, i1, mask) {
                        let (j0, j1) = (tile.j0, tile.j1);
                        let bk = j1 - j0;
                        let p = &mut p[..bq * bk];
                        let ds = &mut ds[..bq * bk];
                        // SAFETY (all gemm calls below): the q/k/v views cover rows i0..i1 or
                        // j0..j1 < T of sequence b over HD columns inside qkv; dO covers the same
                        // rows of `dout` (checked lengths); destinations are `p`, `ds` or this
                        // task's own block of `grads`, none of which overlaps a source.
                        unsafe {
                            gemm_f32(
                                p,
                                bk,
                                heads.q(qkv, i0),
                                heads.k_t(qkv, j0),
                                bq,
                                bk,
                                hd,
                                scale,
                                false,
                                Parallelism::None,
                            )
                        };
                        if tile.masked {
                            for r in 0..bq {
                                let row = &mut p[r * bk..(r + 1) * bk];
                                mask_row(row, i0 + r, j0, &mask[j0..j1]);
                            }
                        }
                        // Masked scores are -inf and give exactly 0.
                        probs_simd(p, bk, &lse[i0..i1], i0 + 1 - j0);
                        // dV[j0..j1] += Pᵀ · dO
                        unsafe {
                            gemm_f32(
                                &mut g_all[j0 * rw + (group + 1) * hd..],
                                rw,
                                Mat::cols(p, 0, bk),
                                Mat::rows(dout, o_off + i0 * ow, ow),
                                bk,
                                hd,
                                bq,
                                1.0,
                                true,
                                Parallelism::None,
                            )
                        };
                        // dP = dO · Vᵀ
                        unsafe {
                            gemm_f32(
                                ds,
                                bk,
                                Mat::rows(dout, o_off + i0 * ow, ow),
                                heads.v_t(qkv, j0),
                                bq,
                                bk,
                                hd,
                                1.0,
                                false,
                                Parallelism::None,
                            )
                        };
                        // dS = P ∘ (dP - D), with the score scale folded in for dQ and dK.
                        score_grad_simd(ds, p, bk, &d_row[..bq], scale);
                        // dQ[i0..i1] += dS · K
                        unsafe {
                            gemm_f32(
                                &mut g_all[i0 * rw + r_head * hd..],
                                rw,
                                Mat::rows(ds, 0, bk),
                                heads.k(qkv, j0),
                                bq,
                                hd,
                                bk,
                                1.0,
                                true,
                                Parallelism::None,
                            )
                        };
                        // dK[j0..j1] += dSᵀ · Q
                        unsafe {
                            gemm_f32(
                                &mut g_all[j0 * rw + group * hd..],
                                rw,
                                Mat::cols(ds, 0, bk),
                                heads.q(qkv, i0),
                                bk,
                                hd,
                                bq,
                                1.0,
                                true,
                                Parallelism::None,
                            )
                        };
                    }
                }
            }
        });
    // Add each task's block into the token-major gradient: the group's q heads are adjacent in
    // the q section, then its k head and v head.
    let w = s.qkv_width();
    dqkv.par_chunks_mut(w).enumerate().for_each(|(row, d)| {
        let (b, i) = (row / t, row % t);
        for g in 0..kvh {
            let src = &grads[((b * kvh + g) * t + i) * rw..][..rw];
            let (dq, rest) = src.split_at(group * hd);
            let (dk, dv) = rest.split_at(hd);
            let parts = [
                (g * group * hd, dq),
                ((nh + g) * hd, dk),
                ((nh + kvh + g) * hd, dv),
            ];
            for (at, part) in parts {
                for (x, &y) in d[at..at + part.len()].iter_mut().zip(part) {
                    *x += y;
                }
            }
        }
    });
}
