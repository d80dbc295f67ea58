//! Linear layers through the `gemm` crate, plus the bias gradient.
//!
//! Every product is one `gemm` call on the caller's memory (or, for a 16-column one on an AVX-512
//! CPU, a kernel of its own): transposes are expressed as strides, so nothing is copied, and
//! backward accumulates straight into the gradient (`dst = dst + A·B`) as the trait's "backward
//! adds" rule asks.

use super::math::{halve_lanes, simd_dispatch};
#[cfg(target_arch = "x86_64")]
use super::math::{lane_sums16_shuffled, SUM_LANE};
use super::reduce::{add_partials, ROW_CHUNK};
use super::team;
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
    if n == NARROW && rhs.cs == 1 && matches!(par, Parallelism::None) && has_avx512() {
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
        return skinny_matmul_forward(out, inp, w, bias, n, c, oc, has_avx512());
    }
    #[cfg(target_arch = "x86_64")]
    if n <= DOTS_ROWS && c >= DOTS_MIN_WIDTH && has_avx512() {
        return dots_matmul_forward(out, inp, w, bias, n, c, oc);
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

/// Multiply-adds per item of the skinny product, at least, and items per thread of the team, at
/// most: its partners are spinning, so handing them an item costs well under a microsecond.
const SKINNY_ITEM_WORK: usize = 1 << 13;
const SKINNY_ITEMS_PER_THREAD: usize = 8;

/// Lanes of each accumulator, and input rows handled together: every weight element loaded goes
/// into 8 independent sums, so each weight is read from memory once and the adds never wait on
/// one another.
const SKINNY_LANES: usize = 16;
const SKINNY_GROUP: usize = 8;

/// Weight rows dotted in one pass over the input group, so that each input load feeds two or
/// three multiply-adds instead of one. Two rows (16 accumulators, 2 weight vectors and an input
/// vector) serve the portable kernel and the AVX-512 kernel below [`SKINNY_TRIPLE_WIDTH`];
/// three rows (24, 3 and 1 of AVX-512's 32 registers) serve the AVX-512 kernel from there.
/// With two, the weight stream fell short of the memory's pace on the 6-layer config: `rlhf
/// bench generate --no-torch --rounds 5 --configs gpt2-6l-384`, alternating binaries four
/// times, gave 5439 / 5192 / 5239 / 5648 tok/s with two and 5901 / 5350 / 5794 / 5736 with
/// three.
const SKINNY_PAIR: usize = 2;
const SKINNY_TRIPLE: usize = 3;

/// Input widths from which the AVX-512 kernel dots three weight rows at a time. Narrower, a
/// block is a few lane steps long and its reductions and call weigh more than the loads saved:
/// the llama fixture (C = 64) generated 9% fewer tokens/s with three.
const SKINNY_TRIPLE_WIDTH: usize = 256;

/// How far ahead of the multiply-adds each weight row is prefetched, in floats (8 KiB). The
/// hardware prefetcher alone keeps too few lines in flight for the two interleaved row streams,
/// and a 6-layer decode step reads its 44 MB of weights from memory. `RAYON_NUM_THREADS=1 rlhf
/// bench generate --configs gpt2-6l-384 --no-torch --rounds 5`, alternating binaries: 2 KiB
/// ahead 1959/2064/2083 tok/s, 8 KiB ahead 2996/2988/3025 (other distances from 4 to 16 KiB
/// were no better). Past the end of a matrix it fetches the next parameters, which the model
/// reads next.
const SKINNY_PREFETCH: usize = 2048;

/// Whether this CPU has AVX-512F (the skinny product's fast kernel).
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out = inp · wᵀ + bias` for a few rows. Such a product is bound by reading `w`, so each weight
/// row is streamed once and dotted with all input rows (which stay in L1) at the same time.
/// Unlike gemm it packs nothing, hence allocates nothing: the decode loop relies on that.
/// `avx512` picks the AVX-512 kernel over the portable one (the same bits).
#[allow(clippy::too_many_arguments)]
fn skinny_matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
    avx512: bool,
) {
    if n == 0 {
        return;
    }
    if c == 0 {
        for r in 0..n {
            for o in 0..oc {
                out[r * oc + o] = bias.map_or(0.0, |b| b[o]);
            }
        }
        return;
    }
    // Enough items for the team to even out, none so small that claiming it costs much.
    let per_item = (SKINNY_ITEM_WORK / (n * c))
        .max(oc / (SKINNY_ITEMS_PER_THREAD * team::size()))
        .max(1)
        .next_multiple_of(SKINNY_PAIR * SKINNY_TRIPLE);
    #[cfg(target_arch = "x86_64")]
    let lanes = SkinnyLanes::new(oc);
    ProductTask::operands(out, inp, w, bias, n, c, oc).for_each_item(per_item, |task| {
        // SAFETY: the task's channels lie inside `out` (N·OC, asserted by the caller) and no
        // other task writes them.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if avx512 && c >= SKINNY_TRIPLE_WIDTH {
                return skinny_task_avx512::<SKINNY_TRIPLE>(task, &lanes);
            }
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                return skinny_task_avx512::<SKINNY_PAIR>(task, &lanes);
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = avx512;
            skinny_task_portable(task)
        }
    });
}

/// One parallel task of the skinny or the dot-product kernel: output channels `o_start..` (one
/// per row of `rows`) of all `n` rows.
#[derive(Clone, Copy)]
struct ProductTask<'a> {
    out: *mut f32,
    o_start: usize,
    rows: &'a [f32],
    inp: &'a [f32],
    n: usize,
    c: usize,
    oc: usize,
    bias: Option<&'a [f32]>,
}

// SAFETY: the tasks split from one product write disjoint output channels through `out`, and
// the output outlives their parallel loop.
unsafe impl Sync for ProductTask<'_> {}

impl<'a> ProductTask<'a> {
    /// The whole product `out = inp · wᵀ + bias` as one task (all channels).
    fn operands(
        out: &'a mut [f32],
        inp: &'a [f32],
        w: &'a [f32],
        bias: Option<&'a [f32]>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> ProductTask<'a> {
        ProductTask {
            out: out.as_mut_ptr(),
            o_start: 0,
            rows: w,
            inp,
            n,
            c,
            oc,
            bias,
        }
    }

    /// Runs `f` on the [`team`]'s threads, on items of `per_item` channels each.
    fn for_each_item(self, per_item: usize, f: impl Fn(&ProductTask) + Sync) {
        let items = (self.rows.len() / self.c).div_ceil(per_item);
        team::for_each(items, &|i| f(&self.part(i, per_item)));
    }

    /// Runs `f` in parallel (rayon) on tasks of `per_task` channels each.
    fn for_each_task(self, per_task: usize, f: impl Fn(&ProductTask) + Sync) {
        let tasks = (self.rows.len() / self.c).div_ceil(per_task);
        (0..tasks)
            .into_par_iter()
            .for_each(|i| f(&self.part(i, per_task)));
    }

    /// Part `i` of this task's channels, in parts of `per` channels.
    fn part(&self, i: usize, per: usize) -> ProductTask<'a> {
        let c = self.c;
        ProductTask {
            o_start: self.o_start + i * per,
            rows: &self.rows[i * per * c..self.rows.len().min((i + 1) * per * c)],
            ..*self
        }
    }
}

impl ProductTask<'_> {
    /// Calls `f` for each block of `CH` channels × 8 rows with the blocks' weight and input rows.
    /// A partial last block of channels repeats its last weight row and a partial group of rows
    /// its first row, so every block has full operands; only the real outputs are stored.
    #[inline(always)]
    fn each_block<const CH: usize>(
        &self,
        mut f: impl FnMut(&SkinnyBlock, [&[f32]; CH], &[&[f32]; SKINNY_GROUP]),
    ) {
        let (c, n) = (self.c, self.n);
        // Rows past the last stand in as row r0 of their group (the last row for a group
        // past the end, which is never used).
        let group = |r0: usize| -> [&[f32]; SKINNY_GROUP] {
            std::array::from_fn(|r| {
                let r = if r0 + r < n { r0 + r } else { r0.min(n - 1) };
                &self.inp[r * c..(r + 1) * c]
            })
        };
        let groups: [_; SKINNY_ROWS / SKINNY_GROUP] =
            std::array::from_fn(|i| group(i * SKINNY_GROUP));
        for (p, wrows) in self.rows.chunks(CH * c).enumerate() {
            let jn = wrows.len() / c;
            let ws: [&[f32]; CH] =
                std::array::from_fn(|j| &wrows[j.min(jn - 1) * c..(j.min(jn - 1) + 1) * c]);
            for (i, xs) in groups.iter().enumerate().take(n.div_ceil(SKINNY_GROUP)) {
                let r0 = i * SKINNY_GROUP;
                let block = SkinnyBlock {
                    o0: self.o_start + p * CH,
                    jn,
                    r0,
                    g: SKINNY_GROUP.min(n - r0),
                    oc: self.oc,
                };
                f(&block, ws, xs);
            }
        }
    }
}

/// [`ProductTask`] by the portable kernel.
///
/// # Safety
/// The task's outputs must be writable, and written by no one else meanwhile.
unsafe fn skinny_task_portable(task: &ProductTask) {
    task.each_block::<SKINNY_PAIR>(|block, ws, xs| {
        // SAFETY: the block's outputs are the task's (the caller's contract).
        unsafe { skinny_block_portable(task.out, block, task.bias, ws, xs) }
    });
}

/// [`ProductTask`] by the AVX-512 kernel.
///
/// # Safety
/// The CPU must support AVX-512F, and the contract of [`skinny_task_portable`] holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn skinny_task_avx512<const CH: usize>(task: &ProductTask, lanes: &SkinnyLanes) {
    task.each_block::<CH>(|block, ws, xs| {
        // SAFETY: AVX-512F and the block's outputs are the caller's contract.
        unsafe {
            let run = || skinny_block_avx512::<CH>(task.out, block, lanes, task.bias, ws, *xs);
            if CH == SKINNY_TRIPLE {
                out_of_line(run)
            } else {
                run()
            }
        }
    });
}

/// Runs `f` in a call of its own, so that its body is not inlined into the caller's loop. The
/// three-row block needs it: inlined into the loop over blocks, LLVM kept the reduction's
/// constants in registers across blocks and spilled 8 of the 24 accumulators to the stack,
/// which made the kernel half as fast. (Two rows fit either way, and at the llama fixture's
/// width the call costs them 6%.)
#[inline(never)]
fn out_of_line(f: impl FnOnce()) {
    f()
}

/// Where the AVX-512 kernel's sums go: it reduces its accumulators `a = j·8 + r` (channel
/// `o0 + j` of row `r0 + r`) 16 at a time, so sums vector `v` holds accumulator `16v + a` in
/// lane [`SUM_LANE`]`[a]`: channels `2v` and `2v + 1`.
#[cfg(target_arch = "x86_64")]
struct SkinnyLanes {
    /// Each lane's output offset from the block's first output, `r·OC + j`.
    offset: [i32; 16],
    /// The lanes of a sums vector's second channel (the rest hold its first).
    second: u16,
    /// `rows[g]`: the lanes of rows below `g`.
    rows: [u16; SKINNY_GROUP + 1],
}

#[cfg(target_arch = "x86_64")]
impl SkinnyLanes {
    fn new(oc: usize) -> SkinnyLanes {
        let mut lanes = SkinnyLanes {
            offset: [0; 16],
            second: 0,
            rows: [0; SKINNY_GROUP + 1],
        };
        for (a, &lane) in SUM_LANE.iter().enumerate() {
            let (j, r, lane) = (a / SKINNY_GROUP, a % SKINNY_GROUP, lane as usize);
            lanes.offset[lane] = (r * oc + j) as i32;
            if j == 1 {
                lanes.second |= 1 << lane;
            }
            for g in r + 1..=SKINNY_GROUP {
                lanes.rows[g] |= 1 << lane;
            }
        }
        lanes
    }
    /// The lanes of sums vector `v` (channels `2v` and `2v + 1`) to store for `block`.
    fn keep(&self, block: &SkinnyBlock, v: usize) -> u16 {
        let mut channels = 0;
        if 2 * v < block.jn {
            channels |= !self.second;
        }
        if 2 * v + 1 < block.jn {
            channels |= self.second;
        }
        self.rows[block.g] & channels
    }
}

/// Which outputs one call of the skinny kernel computes: channels `o0..o0 + jn` (`jn` 1 to 3)
/// of rows `r0..r0 + g` (`g` at most 8) of an output with `oc` channels.
struct SkinnyBlock {
    o0: usize,
    jn: usize,
    r0: usize,
    g: usize,
    oc: usize,
}

impl SkinnyBlock {
    /// The flat output index of row `r0 + r`, channel `o0 + j`.
    #[inline(always)]
    fn at(&self, j: usize, r: usize) -> usize {
        (self.r0 + r) * self.oc + self.o0 + j
    }
    /// Bias of channel `o0 + j` (0 without one).
    #[inline(always)]
    fn bias(&self, bias: Option<&[f32]>, j: usize) -> f32 {
        match bias {
            Some(b) if j < self.jn => b[self.o0 + j],
            _ => 0.0,
        }
    }
}

/// Stores the block's sums plus bias, computed by the portable body.
///
/// # Safety
/// Every `out.add(block.at(j, r))` for `j < jn`, `r < g` must be writable, and written by no
/// one else meanwhile.
unsafe fn skinny_block_portable(
    out: *mut f32,
    block: &SkinnyBlock,
    bias: Option<&[f32]>,
    ws: [&[f32]; SKINNY_PAIR],
    xs: &[&[f32]; SKINNY_GROUP],
) {
    let sums = skinny_sums(ws, *xs);
    for (j, sums) in sums.iter().enumerate().take(block.jn) {
        let b = block.bias(bias, j);
        for (r, s) in sums.iter().enumerate().take(block.g) {
            // SAFETY: by the caller's contract.
            unsafe { *out.add(block.at(j, r)) = s + b };
        }
    }
}

simd_dispatch! {
    /// `sums[j][r] = Σ_k ws[j][k] · xs[r][k]`, by the arithmetic [`skinny_block_avx512`] uses.
    fn skinny_sums(
        ws: [&[f32]; SKINNY_PAIR],
        xs: [&[f32]; SKINNY_GROUP],
    ) -> [[f32; SKINNY_GROUP]; SKINNY_PAIR] = skinny_sums_body;
}

/// The dots of 2 weight rows with 8 input rows. Each output is 16 lane sums over the lane blocks
/// in order, the last block zero-padded, then a fixed pairwise combination of the lanes
/// ([`halve_lanes`]): [`skinny_block_avx512`]'s arithmetic, element for element.
#[inline(always)]
fn skinny_sums_body(
    ws: [&[f32]; SKINNY_PAIR],
    xs: [&[f32]; SKINNY_GROUP],
) -> [[f32; SKINNY_GROUP]; SKINNY_PAIR] {
    let c = ws[0].len();
    assert!(
        ws.iter().chain(&xs).all(|s| s.len() == c),
        "skinny_sums: rows of different lengths"
    );
    let mut acc = [[[0.0f32; SKINNY_LANES]; SKINNY_GROUP]; SKINNY_PAIR];
    let mut add_block = |wk: [&[f32; SKINNY_LANES]; SKINNY_PAIR],
                         xk: [&[f32; SKINNY_LANES]; SKINNY_GROUP]| {
        for (a, wk) in acc.iter_mut().zip(wk) {
            for (a, xk) in a.iter_mut().zip(xk) {
                for l in 0..SKINNY_LANES {
                    a[l] += wk[l] * xk[l];
                }
            }
        }
    };
    /// The lane block of `s` at `k`.
    fn block(s: &[f32], k: usize) -> &[f32; SKINNY_LANES] {
        s[k..k + SKINNY_LANES]
            .try_into()
            .expect("a whole lane block")
    }
    let whole = c - c % SKINNY_LANES;
    for k in (0..whole).step_by(SKINNY_LANES) {
        add_block(ws.map(|s| block(s, k)), xs.map(|s| block(s, k)));
    }
    if whole < c {
        let pad = |s: &[f32]| {
            let mut p = [0.0f32; SKINNY_LANES];
            p[..c - whole].copy_from_slice(&s[whole..]);
            p
        };
        let (wp, xp) = (ws.map(pad), xs.map(pad));
        add_block(
            std::array::from_fn(|j| &wp[j]),
            std::array::from_fn(|r| &xp[r]),
        );
    }
    acc.map(|a| a.map(halve_lanes))
}

/// Asks for the cache line at `p` to be loaded into L1.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(p: *const f32) {
    // SAFETY: a prefetch is only a hint: it never faults, whatever the address (the pointer
    // may run past the weights near their end).
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()) };
}

/// [`skinny_block_portable`] in AVX-512, the same bits: the 16 accumulators reduce together
/// ([`lane_sums16_shuffled`]) and the bias add and the stores stay in vector registers (a
/// masked scatter). At the llama fixture's width (C = 64) a block's 4 steps of dot products
/// are short, and the reduction and scalar epilogue this replaces took most of the time:
/// `cargo bench --bench ops -- "matmul decode"` at 8×64 by 512 went from 8.1–12.7 µs to
/// 4.2–7.2 µs.
///
/// # Safety
/// The CPU must support AVX-512F, and the contract of [`skinny_block_portable`] holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn skinny_block_avx512<const CH: usize>(
    out: *mut f32,
    block: &SkinnyBlock,
    lanes: &SkinnyLanes,
    bias: Option<&[f32]>,
    ws: [&[f32]; CH],
    xs: [&[f32]; SKINNY_GROUP],
) {
    use std::arch::x86_64::*;
    let c = ws[0].len();
    assert!(
        ws.iter().chain(&xs).all(|s| s.len() == c),
        "skinny_sums: rows of different lengths"
    );
    let wp = ws.map(<[f32]>::as_ptr);
    let xp = xs.map(<[f32]>::as_ptr);
    // Accumulator a = j·8 + r, channels 0 and 1 in `acc01` and channel 2 in `acc2`: two
    // arrays, since LLVM kept part of one array of 24 on the stack.
    let mut acc01 = [_mm512_setzero_ps(); 2 * SKINNY_GROUP];
    let mut acc2 = [_mm512_setzero_ps(); SKINNY_GROUP];
    let mut add_block = |w: [__m512; CH], x: &dyn Fn(usize) -> __m512| {
        for r in 0..SKINNY_GROUP {
            let xr = x(r);
            // Multiply, then add, as the portable body does (no FMA): the same rounding.
            acc01[r] = _mm512_add_ps(acc01[r], _mm512_mul_ps(w[0], xr));
            acc01[SKINNY_GROUP + r] =
                _mm512_add_ps(acc01[SKINNY_GROUP + r], _mm512_mul_ps(w[1], xr));
            if CH == SKINNY_TRIPLE {
                acc2[r] = _mm512_add_ps(acc2[r], _mm512_mul_ps(w[CH - 1], xr));
            }
        }
    };
    let whole = c - c % SKINNY_LANES;
    for k in (0..whole).step_by(SKINNY_LANES) {
        // SAFETY: k + 16 <= whole <= C, so each load lies inside its row.
        let w = wp.map(|p| unsafe { _mm512_loadu_ps(p.add(k)) });
        for p in wp {
            prefetch(p.wrapping_add(k + SKINNY_PREFETCH));
        }
        // SAFETY: as above.
        add_block(w, &|r| unsafe { _mm512_loadu_ps(xp[r].add(k)) });
    }
    if whole < c {
        // The tail as a zero-padded block: masked loads read only the row's own elements.
        let m: __mmask16 = (1 << (c - whole)) - 1;
        // SAFETY: the mask keeps each load to elements whole..C of its row.
        let w = wp.map(|p| unsafe { _mm512_maskz_loadu_ps(m, p.add(whole)) });
        // SAFETY: as above.
        add_block(w, &|r| unsafe {
            _mm512_maskz_loadu_ps(m, xp[r].add(whole))
        });
    }
    // Sixteen accumulators per reduction: channels 0 and 1, then channel 2 padded with zeros.
    let padded2 = std::array::from_fn(|a| acc2.get(a).copied().unwrap_or(_mm512_setzero_ps()));
    for (v, half) in [acc01, padded2]
        .into_iter()
        .enumerate()
        .take(CH.div_ceil(2))
    {
        let keep = lanes.keep(block, v);
        if keep == 0 {
            continue;
        }
        // SAFETY: AVX-512F by the caller's contract.
        let sums = unsafe { lane_sums16_shuffled(half) };
        let bias = _mm512_mask_blend_ps(
            lanes.second,
            _mm512_set1_ps(block.bias(bias, 2 * v)),
            _mm512_set1_ps(block.bias(bias, 2 * v + 1)),
        );
        // SAFETY: `offset` holds 16 indices; the kept lanes' outputs are the caller's to write.
        unsafe {
            let offset = _mm512_loadu_si512(lanes.offset.as_ptr().cast());
            _mm512_mask_i32scatter_ps::<4>(
                out.wrapping_add(block.at(2 * v, 0)).cast(),
                keep,
                offset,
                _mm512_add_ps(sums, bias),
            );
        }
    }
}

/// Row counts up to which [`dots_matmul_forward`] replaces gemm on an AVX-512 CPU: a prefill's
/// prompt tokens, or a small batch's.
const DOTS_ROWS: usize = 256;

/// Input widths from which [`dots_matmul_forward`] is used. Narrower, a block's few steps of
/// dot products weigh little against its reduction and stores, and gemm's outer products do as
/// well or better: `cargo bench --bench ops -- "matmul prefill"` gave 562 µs against gemm's 457
/// at 128×384 by 1536, and 534 µs against 1009 at 128×1536 by 384; the llama fixture's prefill
/// (C = 64) took 290 µs this way against 175 µs through gemm.
const DOTS_MIN_WIDTH: usize = 1024;

/// Floats of weights per task of [`dots_matmul_forward`] (64 KiB): a task's rows stay in L2
/// while every block of input rows passes over them.
const DOTS_TASK_FLOATS: usize = 1 << 14;

/// Rows and channels of one [`dots_block_avx512`]: 16 accumulators, one per output.
const DOTS_BLOCK: usize = 4;

/// `out = inp · wᵀ + bias` for up to a few hundred rows, as dot products of input rows with
/// weight rows, 4 × 4 at a time. Both operands are read along `C` as they are stored, so
/// nothing is packed; gemm packs both here (our (OC, C) weights are its column-major right
/// operand, a strided gather). [`DOTS_MIN_WIDTH`] has the figures against gemm.
#[cfg(target_arch = "x86_64")]
fn dots_matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    let per_task = (DOTS_TASK_FLOATS / c)
        .next_multiple_of(DOTS_BLOCK)
        .max(DOTS_BLOCK);
    ProductTask::operands(out, inp, w, bias, n, c, oc).for_each_task(per_task, |task| {
        // SAFETY: AVX-512F checked by the caller; the task's channels lie inside `out` (N·OC,
        // asserted by the caller) and no other task writes them.
        unsafe { dots_task_avx512(task) }
    });
}

/// A [`ProductTask`] of [`dots_matmul_forward`]: blocks of 4 rows × 4 channels, each input
/// block against every weight block (the task's weights stay in L2, the 4 input rows in L1). A
/// partial block repeats its last row or channel and stores only the real outputs.
///
/// # Safety
/// The CPU must support AVX-512F; the task's outputs must be writable, and written by no one
/// else meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_task_avx512(task: &ProductTask) {
    use std::arch::x86_64::*;
    let (n, c, oc) = (task.n, task.c, task.oc);
    let channels = task.rows.len() / c;
    assert!(
        task.inp.len() == n * c && channels * c == task.rows.len() && task.o_start + channels <= oc,
        "dots_task: operands disagree"
    );
    let (x0, w0) = (task.inp.as_ptr(), task.rows.as_ptr());
    for r0 in (0..n).step_by(DOTS_BLOCK) {
        let rows_in = DOTS_BLOCK.min(n - r0);
        // SAFETY: every index is clamped to a real row of `inp`.
        let xs: [*const f32; DOTS_BLOCK] =
            std::array::from_fn(|r| unsafe { x0.add((r0 + r).min(n - 1) * c) });
        for j0 in (0..channels).step_by(DOTS_BLOCK) {
            let jn = DOTS_BLOCK.min(channels - j0);
            let o0 = task.o_start + j0;
            // SAFETY: every index is clamped to a real row of the task's weights.
            let ws: [*const f32; DOTS_BLOCK] =
                std::array::from_fn(|j| unsafe { w0.add((j0 + j).min(channels - 1) * c) });
            let bias = match task.bias {
                // SAFETY: channels o0..o0 + 4 exist.
                Some(b) if jn == DOTS_BLOCK => unsafe {
                    _mm512_broadcast_f32x4(_mm_loadu_ps(b[o0..o0 + DOTS_BLOCK].as_ptr()))
                },
                Some(b) => {
                    let q: [f32; DOTS_BLOCK] = std::array::from_fn(|j| b[o0 + j.min(jn - 1)]);
                    // SAFETY: `q` holds 4 floats.
                    unsafe { _mm512_broadcast_f32x4(_mm_loadu_ps(q.as_ptr())) }
                }
                None => _mm512_setzero_ps(),
            };
            // SAFETY: the pointers' rows hold C floats; AVX-512F by the caller's contract.
            let sums = _mm512_add_ps(unsafe { dots_block_avx512(ws, xs, c) }, bias);
            let keep: u16 = (1 << jn) - 1;
            for r in 0..rows_in {
                // Quarter r is row r0 + r's channels o0..o0 + 4: a store of the whole vector
                // from 4r floats before them, with only lanes 4r..4r + jn enabled (masked-off
                // lanes are not touched).
                let at = task.out.wrapping_add((r0 + r) * oc + o0);
                // SAFETY: the enabled lanes are this task's outputs (row r0 + r, channels
                // o0..o0 + jn), the caller's to write.
                unsafe {
                    _mm512_mask_storeu_ps(
                        at.wrapping_sub(DOTS_BLOCK * r),
                        keep << (DOTS_BLOCK * r),
                        sums,
                    )
                };
            }
        }
    }
}

/// The 16 dots of 4 weight rows `ws` with 4 input rows `xs` (C floats each), by FMA chains over
/// 16-lane blocks (the last one zero-padded). Accumulator `a = j·4 + r` lands in lane `4r + j`
/// of [`lane_sums16_shuffled`], so quarter `r` holds row `r`'s 4 channels in order.
///
/// # Safety
/// The CPU must support AVX-512F, and each pointer must start `c` readable floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dots_block_avx512(
    ws: [*const f32; DOTS_BLOCK],
    xs: [*const f32; DOTS_BLOCK],
    c: usize,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); DOTS_BLOCK * DOTS_BLOCK];
    let whole = c - c % 16;
    for k in (0..whole).step_by(16) {
        // SAFETY: k + 16 <= whole <= C, so each load lies inside its row.
        let load = |p: *const f32| unsafe { _mm512_loadu_ps(p.add(k)) };
        dots_step(&mut acc, ws.map(load), xs.map(load));
    }
    if whole < c {
        let m: __mmask16 = (1 << (c - whole)) - 1;
        // SAFETY: the mask keeps each load to elements whole..C of its row.
        let load = |p: *const f32| unsafe { _mm512_maskz_loadu_ps(m, p.add(whole)) };
        dots_step(&mut acc, ws.map(load), xs.map(load));
    }
    // SAFETY: AVX-512F by the caller's contract.
    unsafe { lane_sums16_shuffled(acc) }
}

/// One 16-lane step of [`dots_block_avx512`]: accumulator `j·4 + r` += `w[j] · x[r]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn dots_step(
    acc: &mut [std::arch::x86_64::__m512; DOTS_BLOCK * DOTS_BLOCK],
    w: [std::arch::x86_64::__m512; DOTS_BLOCK],
    x: [std::arch::x86_64::__m512; DOTS_BLOCK],
) {
    use std::arch::x86_64::_mm512_fmadd_ps;
    for (j, &w) in w.iter().enumerate() {
        for (r, &x) in x.iter().enumerate() {
            acc[j * DOTS_BLOCK + r] = _mm512_fmadd_ps(w, x, acc[j * DOTS_BLOCK + r]);
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

    /// Runs `f` on an output of `len` elements between two NaN guards, checks that neither guard
    /// was written, and returns the output.
    fn guarded(len: usize, f: impl FnOnce(&mut [f32])) -> Vec<f32> {
        let mut out = vec![f32::NAN; len + 2];
        f(&mut out[1..len + 1]);
        assert!(
            out[0].is_nan() && out[len + 1].is_nan(),
            "wrote outside out"
        );
        out[1..len + 1].to_vec()
    }

    /// Asserts `out = inp · wᵀ + bias` against an f64 product, within 1e-5 relative to the sum
    /// of |terms| (plus 1): an f32 sum's rounding.
    fn assert_product_f64(
        out: &[f32],
        (inp, w, bias): Operands,
        (n, c, oc): (usize, usize, usize),
    ) {
        for r in 0..n {
            for o in 0..oc {
                let terms = (0..c).map(|k| inp[r * c + k] as f64 * w[o * c + k] as f64);
                let exact = terms.clone().sum::<f64>() + bias.map_or(0.0, |b| b[o] as f64);
                let scale = terms.map(f64::abs).sum::<f64>() + 1.0;
                let got = out[r * oc + o] as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * scale,
                    "N {n} C {c} OC {oc} ({r}, {o}): {got} vs {exact}"
                );
            }
        }
    }

    /// A product's `(inp, w, bias)`.
    type Operands<'a> = (&'a [f32], &'a [f32], Option<&'a [f32]>);

    /// Calls `check` with operands drawn from N(0, 1) for each shape `(n, c, oc)`, without a
    /// bias and with one.
    fn each_case(
        seed: u64,
        shapes: &[(usize, usize, usize)],
        mut check: impl FnMut(Operands, (usize, usize, usize)),
    ) {
        let mut rng = Rng::new(seed);
        for &(n, c, oc) in shapes {
            let mut draw =
                |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
            let (inp, w, b) = (draw(n * c), draw(oc * c), draw(oc));
            for bias in [None, Some(&b[..])] {
                check((&inp, &w, bias), (n, c, oc));
            }
        }
    }

    /// The skinny product's AVX-512 kernel gives the portable kernel's bits (the same lane tree,
    /// the same zero-padded tail), and both match an f64 product within 1e-5 relative to the sum
    /// of |terms|: widths with and without a remainder past the 16-lane blocks, odd channel
    /// counts, partial row groups, with and without a bias, and nothing written outside `out`.
    #[test]
    fn skinny_kernels_agree_and_match_f64() {
        let shapes = [
            (8, 64, 128),
            (8, 100, 7),
            (3, 16, 5),
            (11, 384, 66),
            (16, 1001, 3),
            (1, 5, 1),
            (5, 300, 7),
            (8, 256, 8),
        ];
        each_case(3, &shapes, |(inp, w, bias), (n, c, oc)| {
            let run = |avx: bool| {
                guarded(n * oc, |out| {
                    skinny_matmul_forward(out, inp, w, bias, n, c, oc, avx)
                })
            };
            let portable = run(false);
            assert_product_f64(&portable, (inp, w, bias), (n, c, oc));
            if has_avx512() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&run(true)), bits(&portable), "N {n} C {c} OC {oc}");
            }
        });
    }

    /// Split over the team's threads, the skinny product gives the bits it gives on one thread:
    /// run inside a team item, where the team is busy, it runs every item itself.
    #[test]
    fn skinny_product_on_the_team_matches_one_thread() {
        each_case(
            4,
            &[(8, 64, 512), (8, 384, 1536), (5, 100, 37)],
            |ops, (n, c, oc)| {
                let (inp, w, bias) = ops;
                let run = || {
                    guarded(n * oc, |out| {
                        skinny_matmul_forward(out, inp, w, bias, n, c, oc, has_avx512())
                    })
                };
                let alone = std::sync::Mutex::new(Vec::new());
                team::for_each(2, &|i| {
                    if i == 0 {
                        *alone.lock().unwrap() = run();
                    }
                });
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&run()),
                    bits(&alone.into_inner().unwrap()),
                    "N {n} C {c} OC {oc}"
                );
            },
        );
    }

    /// The dot-product kernel against an f64 product, within 1e-5 relative to the sum of
    /// |terms|: row and channel counts that leave partial 4 × 4 blocks, widths with and without
    /// a tail past the 16-lane blocks, tasks split over the channels, with and without a bias,
    /// and nothing written outside `out`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn dots_product_matches_f64() {
        if !has_avx512() {
            return;
        }
        let shapes = [
            (17, 1031, 66),
            (128, 1024, 9),
            (19, 16, 5),
            (6, 5, 1),
            (33, 2048, 3),
        ];
        each_case(11, &shapes, |(inp, w, bias), (n, c, oc)| {
            let out = guarded(n * oc, |out| {
                dots_matmul_forward(out, inp, w, bias, n, c, oc)
            });
            assert_product_f64(&out, (inp, w, bias), (n, c, oc));
        });
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
