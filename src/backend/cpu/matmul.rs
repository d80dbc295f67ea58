//! Linear layers through the `gemm` crate, plus the bias gradient.
//!
//! Every product is one `gemm` call on the caller's memory (or, for a 16-column one on an AVX-512
//! CPU, a kernel of its own): transposes are expressed as strides, so nothing is copied, and
//! backward accumulates straight into the gradient (`dst = dst + A·B`) as the trait's "backward
//! adds" rule asks.

#[cfg(target_arch = "x86_64")]
use super::math::lane_sums16;
use super::math::{halve_lanes, simd_dispatch};
use super::reduce::{add_partials, dot, ROW_CHUNK};
use gemm::Parallelism;
use rayon::prelude::*;

/// A strided read-only matrix operand: element `(i, j)` is at `ptr[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    /// A row-major matrix with row stride `rs` starting at `s[offset]`.
    pub fn rows(s: &[f32], offset: usize, rs: usize) -> Mat {
        debug_assert!(offset <= s.len());
        // `wrapping_add` keeps forming the pointer safe; `gemm_f32`'s callers check bounds.
        Mat {
            ptr: s.as_ptr().wrapping_add(offset),
            rs: rs as isize,
            cs: 1,
        }
    }
    /// The transpose of [`Mat::rows`]: element `(i, j)` is `s[offset + j·rs + i]`.
    pub fn cols(s: &[f32], offset: usize, rs: usize) -> Mat {
        Mat {
            ptr: s.as_ptr().wrapping_add(offset),
            rs: 1,
            cs: rs as isize,
        }
    }
}

/// `dst = (accumulate ? dst : 0) + scale · lhs · rhs`, dst (m, n) row-major with row stride
/// `dst_rs` from `dst[0]`, lhs (m, k), rhs (k, n).
///
/// # Safety
/// Every element `(i, j)` of `lhs` for `i < m, j < k` and of `rhs` for `i < k, j < n` must be
/// in bounds of one live allocation that `dst` does not overlap, and `dst` must hold
/// `(m-1)·dst_rs + n` elements.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    accumulate: bool,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst.len() >= (m - 1) * dst_rs + n,
        "gemm destination too small"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if n == NARROW
        && rhs.cs == 1
        && matches!(par, Parallelism::None)
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        // SAFETY: AVX-512F checked just above; bounds and aliasing as for gemm below.
        return unsafe { narrow_avx512(dst, dst_rs, lhs, rhs, m, k, scale, accumulate) };
    }
    // SAFETY: dst bounds checked above; operand bounds and aliasing are the caller's contract.
    // gemm computes dst := alpha·dst + beta·lhs·rhs, reading dst only when read_dst is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// The output width [`narrow_avx512`] handles: one AVX-512 vector, an attention head at the
/// llama fixture's head dim of 16.
const NARROW: usize = 16;

/// [`gemm_f32`] for a 16-column product with contiguous `rhs` rows (an attention tile times a
/// head's values, or a tile's gradient times its keys or queries). gemm's kernels for so narrow
/// an output load one vector per six broadcasts, and it packs both operands; at 64×16 by 64
/// this takes 0.7 µs where gemm took 1.2 µs. Sixteen output rows at a time, each an FMA chain,
/// so that enough of them are in flight to hide the FMA latency.
///
/// # Safety
/// The CPU must support AVX-512F; operands as for [`gemm_f32`], with `n` = 16 and
/// `rhs.cs` = 1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn narrow_avx512(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    m: usize,
    k: usize,
    scale: f32,
    accumulate: bool,
) {
    let mut i0 = 0;
    while i0 + 16 <= m {
        // SAFETY: rows i0..i0 + 16 <= m; the caller's contract covers the rest.
        unsafe { narrow_rows::<16>(dst, dst_rs, lhs, rhs, i0, k, scale, accumulate) };
        i0 += 16;
    }
    for i in i0..m {
        // SAFETY: as above.
        unsafe { narrow_rows::<1>(dst, dst_rs, lhs, rhs, i, k, scale, accumulate) };
    }
}

/// Rows `i0..i0 + R` of [`narrow_avx512`]'s product.
///
/// # Safety
/// As for [`narrow_avx512`], with `i0 + R <= m`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn narrow_rows<const R: usize>(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    i0: usize,
    k: usize,
    scale: f32,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); R];
    for p in 0..k {
        // SAFETY: row p < k of rhs holds 16 contiguous elements, and element (i0 + r, p) of
        // lhs is in bounds (the caller's contract).
        unsafe {
            let b = _mm512_loadu_ps(rhs.ptr.offset(p as isize * rhs.rs));
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = *lhs
                    .ptr
                    .offset((i0 + r) as isize * lhs.rs + p as isize * lhs.cs);
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(a), b, *acc);
            }
        }
    }
    let scale = _mm512_set1_ps(scale);
    for (r, &acc) in acc.iter().enumerate() {
        let row = &mut dst[(i0 + r) * dst_rs..][..NARROW];
        // SAFETY: `row` holds 16 elements.
        unsafe {
            let out = if accumulate {
                _mm512_fmadd_ps(acc, scale, _mm512_loadu_ps(row.as_ptr()))
            } else {
                _mm512_mul_ps(acc, scale)
            };
            _mm512_storeu_ps(row.as_mut_ptr(), out);
        }
    }
}

/// Rayon threads for a large product; gemm's own threshold keeps small ones single-threaded,
/// and below 32³ multiply-adds the thread hand-off alone would cost more than the work.
fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    if m * n * k >= 32 * 32 * 32 && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

/// `out = inp · wᵀ + bias`.
/// out: (N, OC), inp: (N, C), w: (OC, C), bias: (OC).
pub fn matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    assert_eq!(out.len(), n * oc, "matmul_forward: out is not N·OC");
    assert_eq!(inp.len(), n * c, "matmul_forward: inp is not N·C");
    assert_eq!(w.len(), oc * c, "matmul_forward: w is not OC·C");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), oc, "matmul_forward: bias is not OC");
    }
    if n <= SKINNY_ROWS {
        return skinny_matmul_forward(out, inp, w, bias, n, c, oc);
    }
    // The bias goes in first and gemm accumulates onto it: one pass over `out` fewer than
    // adding it afterwards.
    if let Some(bias) = bias {
        if oc == 0 {
            return;
        }
        out.par_chunks_mut(oc * ROW_CHUNK).for_each(|rows| {
            for row in rows.chunks_exact_mut(oc) {
                row.copy_from_slice(bias);
            }
        });
    }
    // SAFETY: inp is (N, C) row-major and w (OC, C) read as its transpose (C, OC); lengths were
    // checked above and `out` is a distinct &mut.
    unsafe {
        gemm_f32(
            out,
            oc,
            Mat::rows(inp, 0, c),
            Mat::cols(w, 0, c),
            n,
            oc,
            c,
            1.0,
            bias.is_some(),
            parallelism(n, oc, c),
        )
    }
}

/// Row counts up to which [`skinny_matmul_forward`] replaces gemm: a decode step's one token per
/// sequence.
const SKINNY_ROWS: usize = 16;

/// Output channels per task of the skinny product, at least.
const SKINNY_OC_CHUNK: usize = 32;

/// Multiply-adds per task of the skinny product, at least: a smaller task costs more to hand to
/// another thread than it saves (at the llama fixture's width a decode step's products are a few
/// microseconds each, and split 32 channels a task they ran slower on two threads than on one).
const SKINNY_TASK_WORK: usize = 1 << 16;

/// Lanes of each accumulator, and input rows handled together: every weight element loaded goes
/// into 8 independent sums, so each weight is read from memory once and the adds never wait on
/// one another.
const SKINNY_LANES: usize = 16;
const SKINNY_GROUP: usize = 8;

/// Weight rows dotted in one pass over the input group: each input load then feeds two
/// multiply-adds instead of one, so the loop is bound by the multiply-adds rather than by the
/// loads (16 accumulators + 2 weight + 1 input vector fit AVX-512's 32 registers).
const SKINNY_PAIR: usize = 2;

/// How far ahead of the multiply-adds each weight row is prefetched, in floats (2 KiB). The
/// hardware prefetcher alone keeps too few lines in flight for the two interleaved row streams:
/// measured here, this lifts the decode GEMVs from about 14 to 19 GB/s (2 threads).
const SKINNY_PREFETCH: usize = 512;

/// `out = inp · wᵀ + bias` for a few rows. Such a product is bound by reading `w`, so each weight
/// row is streamed once and dotted with all input rows (which stay in L1) at the same time.
/// Unlike gemm it packs nothing, hence allocates nothing: the decode loop relies on that.
fn skinny_matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    /// The output's base pointer, shared by tasks that write disjoint columns.
    struct Out(*mut f32);
    // SAFETY: tasks write disjoint elements (their own output channels) and the slice outlives
    // the parallel loop.
    unsafe impl Sync for Out {}
    if c == 0 {
        for r in 0..n {
            for o in 0..oc {
                out[r * oc + o] = bias.map_or(0.0, |b| b[o]);
            }
        }
        return;
    }
    let dst = Out(out.as_mut_ptr());
    let dst = &dst;
    let per_task = (SKINNY_TASK_WORK / (n * c).max(1))
        .next_multiple_of(SKINNY_PAIR)
        .max(SKINNY_OC_CHUNK);
    w.par_chunks(per_task * c)
        .enumerate()
        .for_each(|(chunk, rows)| {
            // Output channels o0..o0+j, their weight rows `wrows` (j·C).
            let store = |o0: usize, wrows: &[f32]| {
                let j = wrows.len() / c;
                for r0 in (0..n).step_by(SKINNY_GROUP) {
                    let g = SKINNY_GROUP.min(n - r0);
                    let mut dots = [[0.0f32; SKINNY_GROUP]; SKINNY_PAIR];
                    let x = &inp[r0 * c..(r0 + g) * c];
                    if g == SKINNY_GROUP && j == SKINNY_PAIR {
                        skinny_dots8x2(&mut dots, wrows, x);
                    } else if g == SKINNY_GROUP {
                        let [d, _] = &mut dots;
                        skinny_dots8x1(d, wrows, x);
                    } else {
                        for (d, wrow) in dots.iter_mut().zip(wrows.chunks_exact(c)) {
                            for (r, d) in d.iter_mut().enumerate().take(g) {
                                *d = dot(wrow, &x[r * c..(r + 1) * c]);
                            }
                        }
                    }
                    for (jj, d) in dots.iter().enumerate().take(j) {
                        let o = o0 + jj;
                        let b0 = bias.map_or(0.0, |b| b[o]);
                        for (r, d) in d.iter().enumerate().take(g) {
                            // SAFETY: r0 + r < n and o < oc, so the index is inside `out`
                            // (asserted by the caller); no other task writes channel o.
                            unsafe { *dst.0.add((r0 + r) * oc + o) = d + b0 };
                        }
                    }
                }
            };
            for (p, wrows) in rows.chunks(SKINNY_PAIR * c).enumerate() {
                store(chunk * per_task + p * SKINNY_PAIR, wrows);
            }
        });
}

/// `dots[j][r] = Σ_k w[j·C + k] · x[r·C + k]` for 2 weight rows `w` (2·C) and 8 input rows
/// `x` (8·C): [`skinny_dots8x2_avx512`] where the CPU has it, else the portable body. Both give
/// the same bits.
fn skinny_dots8x2(dots: &mut [[f32; SKINNY_GROUP]; SKINNY_PAIR], w: &[f32], x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        return unsafe { skinny_dots8x2_avx512(dots, w, x) };
    }
    skinny_dots8x2_portable(dots, w, x)
}

simd_dispatch! {
    /// [`skinny_dots8x2`] without AVX-512.
    fn skinny_dots8x2_portable(
        dots: &mut [[f32; SKINNY_GROUP]; SKINNY_PAIR],
        w: &[f32],
        x: &[f32],
    ) = skinny_dots_body::<SKINNY_PAIR>;
}

/// [`skinny_dots_body`] for two weight rows, written with AVX-512 intrinsics so that its 16
/// accumulators reduce together ([`lane_sums16`]): the same bits, 1.3-1.6x faster.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn skinny_dots8x2_avx512(
    dots: &mut [[f32; SKINNY_GROUP]; SKINNY_PAIR],
    w: &[f32],
    x: &[f32],
) {
    use std::arch::x86_64::*;
    let c = w.len() / SKINNY_PAIR;
    assert!(
        w.len() == SKINNY_PAIR * c && x.len() == SKINNY_GROUP * c,
        "skinny_dots: operands are not 2·C and 8·C"
    );
    let whole = c - c % SKINNY_LANES;
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 2 * SKINNY_GROUP];
    for k in (0..whole).step_by(SKINNY_LANES) {
        // SAFETY: k + 16 <= whole <= C, so each load lies inside its row of `w` or `x`.
        let (w0, w1) = unsafe { (_mm512_loadu_ps(wp.add(k)), _mm512_loadu_ps(wp.add(c + k))) };
        prefetch(wp.wrapping_add(k + SKINNY_PREFETCH));
        prefetch(wp.wrapping_add(c + k + SKINNY_PREFETCH));
        for r in 0..SKINNY_GROUP {
            // SAFETY: as above.
            let xr = unsafe { _mm512_loadu_ps(xp.add(r * c + k)) };
            // Multiply, then add, as the portable body does (no FMA): the same rounding.
            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(w0, xr));
            acc[SKINNY_GROUP + r] = _mm512_add_ps(acc[SKINNY_GROUP + r], _mm512_mul_ps(w1, xr));
        }
    }
    // Accumulator a = j·8 + r.
    // SAFETY: the caller's contract (AVX-512F).
    let sums = unsafe { lane_sums16(acc) };
    for (j, d) in dots.iter_mut().enumerate() {
        let wrow = &w[j * c..(j + 1) * c];
        for (r, d) in d.iter_mut().enumerate() {
            let a = j * SKINNY_GROUP + r;
            let tail = (whole..c).map(|k| wrow[k] * x[r * c + k]).sum::<f32>();
            *d = sums[a] + tail;
        }
    }
}

simd_dispatch! {
    /// [`skinny_dots8x2`] for a single weight row (an odd channel count's last one).
    fn skinny_dots8x1(dots: &mut [f32; SKINNY_GROUP], w: &[f32], x: &[f32]) = skinny_dots1;
}

#[inline(always)]
fn skinny_dots1(dots: &mut [f32; SKINNY_GROUP], w: &[f32], x: &[f32]) {
    skinny_dots_body::<1>(std::array::from_mut(dots), w, x)
}

/// Asks for the cache line at `p` to be loaded into L1.
#[inline(always)]
fn prefetch(p: *const f32) {
    // SAFETY: a prefetch is only a hint: it never faults, whatever the address (the pointer
    // may run past the weights near their end).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The dots of `J` weight rows with 8 input rows. Each output's arithmetic is the same whatever
/// `J`: 16 lane sums over the whole lane blocks in order, a fixed pairwise combination of the
/// lanes, then the tail in order.
#[inline(always)]
fn skinny_dots_body<const J: usize>(dots: &mut [[f32; SKINNY_GROUP]; J], w: &[f32], x: &[f32]) {
    let c = w.len() / J;
    assert!(
        w.len() == J * c && x.len() == SKINNY_GROUP * c,
        "skinny_dots: operands are not J·C and 8·C"
    );
    let whole = c - c % SKINNY_LANES;
    /// The lane block of `s` at `at`.
    ///
    /// # Safety
    /// `at + SKINNY_LANES <= s.len()`.
    #[inline(always)]
    unsafe fn block(s: &[f32], at: usize) -> &[f32; SKINNY_LANES] {
        debug_assert!(at + SKINNY_LANES <= s.len());
        // SAFETY: in bounds by the caller's contract; [f32; N] has f32's alignment.
        unsafe { &*s.as_ptr().add(at).cast::<[f32; SKINNY_LANES]>() }
    }
    let mut acc = [[[0.0f32; SKINNY_LANES]; SKINNY_GROUP]; J];
    for k in (0..whole).step_by(SKINNY_LANES) {
        // SAFETY: k + SKINNY_LANES <= whole <= c, so every block lies inside row j of `w` and
        // row r of `x` (lengths asserted above). Unchecked: the bounds checks were half the
        // loop's instructions.
        let wk: [&[f32; SKINNY_LANES]; J] = std::array::from_fn(|j| unsafe { block(w, j * c + k) });
        for j in 0..J {
            prefetch(w.as_ptr().wrapping_add(j * c + k + SKINNY_PREFETCH));
        }
        // The rows are unrolled by hand: left as a loop, LLVM vectorises it across the 8 rows
        // with gathers (4x slower) instead of across the lanes.
        macro_rules! rows {
            ($($r:literal)*) => {$({
                // SAFETY: as above.
                let xk = unsafe { block(x, $r * c + k) };
                for (a, wk) in acc.iter_mut().zip(wk) {
                    for l in 0..SKINNY_LANES {
                        a[$r][l] += wk[l] * xk[l];
                    }
                }
            })*};
        }
        rows!(0 1 2 3 4 5 6 7);
    }
    for j in 0..J {
        let wrow = &w[j * c..(j + 1) * c];
        for (r, d) in dots[j].iter_mut().enumerate() {
            let tail = (whole..c).map(|k| wrow[k] * x[r * c + k]).sum::<f32>();
            *d = halve_lanes(acc[j][r]) + tail;
        }
    }
}

/// `dinp += dout · w` (when `dinp` is given) and `dw += doutᵀ · inp`.
/// dinp: (N, C), dw: (OC, C), dout: (N, OC), inp: (N, C), w: (OC, C).
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: Option<&mut [f32]>,
    dw: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    c: usize,
    oc: usize,
) {
    assert_eq!(dout.len(), n * oc, "matmul_backward: dout is not N·OC");
    assert_eq!(inp.len(), n * c, "matmul_backward: inp is not N·C");
    assert_eq!(w.len(), oc * c, "matmul_backward: w is not OC·C");
    assert_eq!(dw.len(), oc * c, "matmul_backward: dw is not OC·C");
    if let Some(dinp) = dinp {
        assert_eq!(dinp.len(), n * c, "matmul_backward: dinp is not N·C");
        // SAFETY: dout (N, OC) and w (OC, C) are row-major and in bounds (checked above).
        unsafe {
            gemm_f32(
                dinp,
                c,
                Mat::rows(dout, 0, oc),
                Mat::rows(w, 0, c),
                n,
                c,
                oc,
                1.0,
                true,
                parallelism(n, c, oc),
            )
        }
    }
    // SAFETY: doutᵀ is (OC, N) read through dout's strides, inp (N, C) row-major; both in
    // bounds (checked above).
    unsafe {
        gemm_f32(
            dw,
            c,
            Mat::cols(dout, 0, oc),
            Mat::rows(inp, 0, c),
            oc,
            c,
            n,
            1.0,
            true,
            parallelism(oc, c, n),
        )
    }
}

/// `dbias += Σ_n dout[n]`. dbias: (OC), dout: (N, OC).
///
/// Rows are summed in fixed chunks of [`ROW_CHUNK`] in parallel, then the chunk partials are
/// added in chunk order: the result does not depend on the number of threads.
pub fn bias_backward(dbias: &mut [f32], dout: &[f32], n: usize, oc: usize) {
    assert_eq!(dout.len(), n * oc, "bias_backward: dout is not N·OC");
    assert_eq!(dbias.len(), oc, "bias_backward: dbias is not OC");
    if oc == 0 {
        return;
    }
    let partials: Vec<Vec<f32>> = dout
        .par_chunks(oc * ROW_CHUNK)
        .map(|rows| {
            let mut acc = vec![0.0f32; oc];
            for row in rows.chunks_exact(oc) {
                for (a, &d) in acc.iter_mut().zip(row) {
                    *a += d;
                }
            }
            acc
        })
        .collect();
    add_partials(dbias, &partials);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The skinny product's AVX-512 dots give the portable body's bits (the same lane tree),
    /// at widths with and without a remainder past the 16-lane blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn skinny_avx512_dots_match_portable() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut rng = Rng::new(3);
        for c in [16, 64, 100, 384, 1001] {
            let w: Vec<f32> = (0..SKINNY_PAIR * c).map(|_| rng.normal() as f32).collect();
            let x: Vec<f32> = (0..SKINNY_GROUP * c).map(|_| rng.normal() as f32).collect();
            let (mut fast, mut portable) = (
                [[0.0; SKINNY_GROUP]; SKINNY_PAIR],
                [[1.0; SKINNY_GROUP]; SKINNY_PAIR],
            );
            // SAFETY: AVX-512F checked above.
            unsafe { skinny_dots8x2_avx512(&mut fast, &w, &x) };
            skinny_dots8x2_portable(&mut portable, &w, &x);
            let bits = |d: &[[f32; SKINNY_GROUP]; SKINNY_PAIR]| {
                d.as_flattened()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&fast), bits(&portable), "C = {c}");
        }
    }

    /// The 16-column kernel against an f64 product, for both lhs layouts, both write modes, and
    /// row counts with and without a tail: within 1e-5 relative to the sum of |terms| (an f32
    /// sum's rounding over at most 70 terms), and nothing outside the 16 columns written.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn narrow_product_matches_f64() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut rng = Rng::new(7);
        let mut data =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect() };
        for (m, k) in [(64, 64), (64, 16), (19, 70), (3, 1)] {
            for transposed in [false, true] {
                for accumulate in [false, true] {
                    let (a, b) = (data(m * k), data(k * NARROW));
                    let lhs = if transposed {
                        Mat::cols(&a, 0, m)
                    } else {
                        Mat::rows(&a, 0, k)
                    };
                    let a_at = |i: usize, p: usize| {
                        if transposed {
                            a[p * m + i]
                        } else {
                            a[i * k + p]
                        }
                    };
                    let dst_rs = NARROW + 3;
                    let before = data(m * dst_rs);
                    let mut dst = before.clone();
                    // SAFETY: lhs is (m, k) and rhs (k, 16) inside `a` and `b`; dst holds
                    // (m - 1)·dst_rs + 16 elements.
                    unsafe {
                        gemm_f32(
                            &mut dst,
                            dst_rs,
                            lhs,
                            Mat::rows(&b, 0, NARROW),
                            m,
                            NARROW,
                            k,
                            0.5,
                            accumulate,
                            Parallelism::None,
                        )
                    };
                    for i in 0..m {
                        for j in 0..dst_rs {
                            let (got, old) = (dst[i * dst_rs + j], before[i * dst_rs + j]);
                            if j >= NARROW {
                                assert_eq!(got, old, "wrote outside the product");
                                continue;
                            }
                            let terms =
                                (0..k).map(|p| a_at(i, p) as f64 * b[p * NARROW + j] as f64);
                            let base = if accumulate { old as f64 } else { 0.0 };
                            let want = base + 0.5 * terms.clone().sum::<f64>();
                            let bound = 1e-5 * (1.0 + terms.map(f64::abs).sum::<f64>());
                            assert!(
                                (got as f64 - want).abs() <= bound,
                                "m {m} k {k} [{i},{j}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
