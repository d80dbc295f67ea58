//! Linear layers on the GPU path: the products as cuBLAS GEMM call descriptions ([`Gemm`]), the
//! bias halves as the kernels of `kernels/matmul.cu`, and the drivers that run
//! `ModelOps::matmul_forward`, `matmul_backward` and `bias_backward` through any [`Launcher`].
//!
//! The device backend hands a [`Gemm`] to `cublasGemmStridedBatchedEx` with f32 operands and
//! `CUBLAS_COMPUTE_32F_FAST_16BF` (operands rounded to bf16, f32 accumulation: DESIGN.md
//! principle 5, with no bf16 copy of the f32 master weights). The emulated backend runs the same
//! description with [`run_on_host`], written from cuBLAS's definition rather than from the CPU
//! backend's ops, so the row-major → column-major mapping built here is checked against the CPU
//! reference without a GPU.
//!
//! The mapping: cuBLAS is column-major, the model row-major, and a row-major (R, C) matrix is
//! the column-major (C, R) matrix with leading dimension C — its transpose. So each row-major
//! product `X = P·Q` is issued as the column-major `Xᵀ = Qᵀ·Pᵀ`, reading every operand in place.

use super::ops::{input, opt_input, opt_output, output, KernelError, Launcher};
use super::plan::{
    int, Arg, DevPtr, Launch, BIAS_GRAD_PARTIAL_F32, BIAS_GRAD_SUM_F32, BIAS_ROWS_F32,
};
use gemm::Parallelism;

/// Threads per block of the bias kernels: one element (forward) or one column (gradient) each.
pub const BIAS_BLOCK: u32 = 256;
/// Rows per chunk of `bias_grad_partial_f32` (`BIAS_GRAD_ROWS` in matmul.cu): the CPU
/// reference's row chunk, so that the chunk partials, added in chunk order, give its bits.
pub const BIAS_GRAD_ROWS: usize = 32;

/// Whether cuBLAS reads an operand as stored or transposed (`cublasOperation_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// `CUBLAS_OP_N`: op(X) = X.
    N,
    /// `CUBLAS_OP_T`: op(X) = Xᵀ.
    T,
}

/// One cuBLAS strided-batched GEMM, in cuBLAS's column-major terms: for each `p < batch`,
/// `C_p = alpha·op(A_p)·op(B_p) + beta·C_p`, with op(A_p) (m, k), op(B_p) (k, n) and C_p (m, n).
///
/// Matrix `X_p` starts `p·stride_x` f32 elements after `x`, and its element (i, j) is at
/// `X_p[i + j·ldx]` (column-major with leading dimension `ldx`, at least its row count). A is
/// stored (m, k) when `transa` is [`Trans::N`] and (k, m) when [`Trans::T`]; B likewise (k, n)
/// or (n, k). With `beta = 0`, C is written without being read (NaN there does not propagate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// op(A).
    pub transa: Trans,
    /// op(B).
    pub transb: Trans,
    /// Rows of op(A) and C.
    pub m: usize,
    /// Columns of op(B) and C.
    pub n: usize,
    /// Columns of op(A), rows of op(B): the summed dimension.
    pub k: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// A's first element (f32).
    pub a: DevPtr,
    /// A's leading dimension: elements between the starts of its stored columns.
    pub lda: usize,
    /// Elements from A_p to A_{p+1}.
    pub stride_a: usize,
    /// B's first element (f32).
    pub b: DevPtr,
    /// B's leading dimension.
    pub ldb: usize,
    /// Elements from B_p to B_{p+1}.
    pub stride_b: usize,
    /// Scale of C's old value; 0 overwrites C.
    pub beta: f32,
    /// C's first element (f32).
    pub c: DevPtr,
    /// C's leading dimension.
    pub ldc: usize,
    /// Elements from C_p to C_{p+1}.
    pub stride_c: usize,
    /// Number of products.
    pub batch: usize,
}

/// (rows, columns) of an operand as stored, given op(X)'s shape.
fn stored(trans: Trans, rows: usize, cols: usize) -> (usize, usize) {
    match trans {
        Trans::N => (rows, cols),
        Trans::T => (cols, rows),
    }
}

/// Elements a column-major (rows, cols) matrix with leading dimension `ld` spans: 0 if empty.
fn span(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (cols - 1) * ld + rows
    }
}

/// Elements `batch` matrices of `span` elements, `stride` apart, reach from the first.
fn batch_span(span: usize, stride: usize, batch: usize) -> usize {
    if span == 0 || batch == 0 {
        0
    } else {
        (batch - 1) * stride + span
    }
}

impl Gemm {
    /// Elements of A the call reads, from `a`.
    pub fn extent_a(&self) -> usize {
        let (r, c) = stored(self.transa, self.m, self.k);
        batch_span(span(r, c, self.lda), self.stride_a, self.batch)
    }

    /// Elements of B the call reads, from `b`.
    pub fn extent_b(&self) -> usize {
        let (r, c) = stored(self.transb, self.k, self.n);
        batch_span(span(r, c, self.ldb), self.stride_b, self.batch)
    }

    /// Elements of C the call may touch, from `c`.
    pub fn extent_c(&self) -> usize {
        batch_span(span(self.m, self.n, self.ldc), self.stride_c, self.batch)
    }

    /// True when there is no element of C to compute.
    pub fn is_empty(&self) -> bool {
        self.m == 0 || self.n == 0 || self.batch == 0
    }

    /// cuBLAS's argument checks (`CUBLAS_STATUS_INVALID_VALUE`): each leading dimension at least
    /// its stored matrix's rows, and at least 1.
    pub fn validate(&self) -> Result<(), String> {
        let (ra, _) = stored(self.transa, self.m, self.k);
        let (rb, _) = stored(self.transb, self.k, self.n);
        for (name, ld, rows) in [
            ("lda", self.lda, ra),
            ("ldb", self.ldb, rb),
            ("ldc", self.ldc, self.m),
        ] {
            if ld < rows.max(1) {
                return Err(format!("{name} = {ld} is below max(1, {rows} rows)"));
            }
        }
        Ok(())
    }
}

/// `out (N, OC) = inp (N, C) · wᵀ (+ out)`, w (OC, C) row-major: column-major
/// `outᵀ (OC, N) = w·inpᵀ`, where w is column-major (C, OC) read transposed and inp is
/// column-major (C, N). `accumulate` adds to `out` (beta = 1: the bias rows already there).
pub fn forward_gemm(
    out: DevPtr,
    inp: DevPtr,
    w: DevPtr,
    n: usize,
    c: usize,
    oc: usize,
    accumulate: bool,
) -> Gemm {
    one_matrix(Gemm {
        transa: Trans::T,
        transb: Trans::N,
        m: oc,
        n,
        k: c,
        alpha: 1.0,
        a: w,
        lda: c,
        b: inp,
        ldb: c,
        beta: if accumulate { 1.0 } else { 0.0 },
        c: out,
        ldc: oc,
        ..UNBATCHED
    })
}

/// `dinp (N, C) += dout (N, OC) · w (OC, C)`: column-major `dinpᵀ (C, N) += wᵀ·doutᵀ`, where
/// w is column-major (C, OC) and dout column-major (OC, N), both read as stored.
pub fn backward_dinp_gemm(
    dinp: DevPtr,
    dout: DevPtr,
    w: DevPtr,
    n: usize,
    c: usize,
    oc: usize,
) -> Gemm {
    one_matrix(Gemm {
        transa: Trans::N,
        transb: Trans::N,
        m: c,
        n,
        k: oc,
        alpha: 1.0,
        a: w,
        lda: c,
        b: dout,
        ldb: oc,
        beta: 1.0,
        c: dinp,
        ldc: c,
        ..UNBATCHED
    })
}

/// `dw (OC, C) += doutᵀ (OC, N) · inp (N, C)`: column-major `dwᵀ (C, OC) += inpᵀ·dout`, where
/// inp is column-major (C, N) read as stored and dout column-major (OC, N) read transposed.
pub fn backward_dw_gemm(
    dw: DevPtr,
    dout: DevPtr,
    inp: DevPtr,
    n: usize,
    c: usize,
    oc: usize,
) -> Gemm {
    one_matrix(Gemm {
        transa: Trans::N,
        transb: Trans::T,
        m: c,
        n: oc,
        k: n,
        alpha: 1.0,
        a: inp,
        lda: c,
        b: dout,
        ldb: oc,
        beta: 1.0,
        c: dw,
        ldc: c,
        ..UNBATCHED
    })
}

/// The fields [`one_matrix`] sets, for struct-update syntax.
const UNBATCHED: Gemm = Gemm {
    transa: Trans::N,
    transb: Trans::N,
    m: 0,
    n: 0,
    k: 0,
    alpha: 1.0,
    a: DevPtr::NULL,
    lda: 1,
    stride_a: 0,
    b: DevPtr::NULL,
    ldb: 1,
    stride_b: 0,
    beta: 0.0,
    c: DevPtr::NULL,
    ldc: 1,
    stride_c: 0,
    batch: 1,
};

/// A single product: one batch, each stride one whole matrix (unused, but a valid layout). A
/// leading dimension of an empty matrix is raised to 1, which cuBLAS asks for.
fn one_matrix(g: Gemm) -> Gemm {
    let (ra, ca) = stored(g.transa, g.m, g.k);
    let (rb, cb) = stored(g.transb, g.k, g.n);
    Gemm {
        lda: g.lda.max(1),
        ldb: g.ldb.max(1),
        ldc: g.ldc.max(1),
        stride_a: ra * ca,
        stride_b: rb * cb,
        stride_c: g.m * g.n,
        batch: 1,
        ..g
    }
}

/// `bias_rows_f32(bias, N, OC, out)`: one thread per element of out (N, OC); a null bias
/// writes zeros.
pub fn bias_rows(bias: DevPtr, n: usize, oc: usize, out: DevPtr) -> Launch {
    let args = vec![Arg::Ptr(bias), int(n, "N"), int(oc, "OC"), Arg::Ptr(out)];
    let blocks = (n * oc).div_ceil(BIAS_BLOCK as usize);
    Launch::new(BIAS_ROWS_F32, blocks, BIAS_BLOCK, args)
}

/// Row chunks of the bias gradient: rows of (OC) f32 partials `bias_grad_partial_f32` writes.
pub fn bias_grad_chunks(n: usize) -> usize {
    n.div_ceil(BIAS_GRAD_ROWS)
}

/// `bias_grad_partial_f32(dout, N, OC, partials)`: one block per ([`BIAS_GRAD_ROWS`] rows,
/// [`BIAS_BLOCK`] columns); partials is ([`bias_grad_chunks`], OC) f32.
pub fn bias_grad_partial(dout: DevPtr, n: usize, oc: usize, partials: DevPtr) -> Launch {
    let args = vec![
        Arg::Ptr(dout),
        int(n, "N"),
        int(oc, "OC"),
        Arg::Ptr(partials),
    ];
    let blocks = bias_grad_chunks(n) * oc.div_ceil(BIAS_BLOCK as usize);
    Launch::new(BIAS_GRAD_PARTIAL_F32, blocks, BIAS_BLOCK, args)
}

/// `bias_grad_sum_f32(partials, chunks, OC, dbias)`: one thread per column, dbias added to.
pub fn bias_grad_sum(partials: DevPtr, n: usize, oc: usize, dbias: DevPtr) -> Launch {
    let args = vec![
        Arg::Ptr(partials),
        int(bias_grad_chunks(n), "chunks"),
        int(oc, "OC"),
        Arg::Ptr(dbias),
    ];
    let blocks = oc.div_ceil(BIAS_BLOCK as usize);
    Launch::new(BIAS_GRAD_SUM_F32, blocks, BIAS_BLOCK, args)
}

/// `ModelOps::matmul_forward` through the launcher: `out (N, OC) = inp (N, C) · wᵀ + bias`,
/// w (OC, C), bias (OC). With a bias its rows are written first and the GEMM adds onto them.
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward<L: Launcher>(
    l: &L,
    mut out: L::ViewMut<'_>,
    inp: L::View<'_>,
    w: L::View<'_>,
    bias: Option<L::View<'_>>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<(), KernelError> {
    let has_bias = bias.is_some();
    let out = output(l, &mut out, n * oc, "matmul_forward: out");
    let inp = input(l, inp, n * c, "matmul_forward: inp");
    let w = input(l, w, oc * c, "matmul_forward: w");
    let bias = opt_input(l, bias, oc, "matmul_forward: bias");
    if n == 0 || oc == 0 {
        return Ok(());
    }
    // With C = 0 the product is empty and out is the bias or zeros; no GEMM is issued for a sum
    // of no terms.
    if has_bias || c == 0 {
        // SAFETY: out holds N·OC values and bias, if not null, OC (checked above).
        unsafe { l.launch(&bias_rows(bias, n, oc, out))? };
    }
    if c == 0 {
        return Ok(());
    }
    // SAFETY: the description reads inp (N·C) and w (OC·C) and writes out (N·OC) exactly
    // (`forward_gemm`), each length checked above; out is a distinct writable view.
    unsafe { l.gemm(&forward_gemm(out, inp, w, n, c, oc, has_bias)) }
}

/// `ModelOps::matmul_backward` through the launcher: `dinp += dout · w` (when given) and
/// `dw += doutᵀ · inp`. dinp, inp: (N, C); dw, w: (OC, C); dout: (N, OC).
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward<L: Launcher>(
    l: &L,
    mut dinp: Option<L::ViewMut<'_>>,
    mut dw: L::ViewMut<'_>,
    dout: L::View<'_>,
    inp: L::View<'_>,
    w: L::View<'_>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<(), KernelError> {
    let dout = input(l, dout, n * oc, "matmul_backward: dout");
    let inp = input(l, inp, n * c, "matmul_backward: inp");
    let w = input(l, w, oc * c, "matmul_backward: w");
    let dw = output(l, &mut dw, oc * c, "matmul_backward: dw");
    let has_dinp = dinp.is_some();
    let dinp = opt_output(l, &mut dinp, n * c, "matmul_backward: dinp");
    // A product with an empty summed dimension adds nothing: skip it, as beta = 1.
    if has_dinp && n * c > 0 && oc > 0 {
        // SAFETY: reads dout (N·OC) and w (OC·C), adds into dinp (N·C), each checked above.
        unsafe { l.gemm(&backward_dinp_gemm(dinp, dout, w, n, c, oc))? };
    }
    if oc * c > 0 && n > 0 {
        // SAFETY: reads dout (N·OC) and inp (N·C), adds into dw (OC·C), each checked above.
        unsafe { l.gemm(&backward_dw_gemm(dw, dout, inp, n, c, oc))? };
    }
    Ok(())
}

/// `ModelOps::bias_backward` through the launcher: `dbias (OC) += Σ_n dout[n]`, dout (N, OC),
/// through per-chunk partials in scratch memory added in chunk order (no atomics: the CPU
/// reference's bits, on every run).
pub fn bias_backward<L: Launcher>(
    l: &L,
    mut dbias: L::ViewMut<'_>,
    dout: L::View<'_>,
    n: usize,
    oc: usize,
) -> Result<(), KernelError> {
    let dbias = output(l, &mut dbias, oc, "bias_backward: dbias");
    let dout = input(l, dout, n * oc, "bias_backward: dout");
    if n == 0 || oc == 0 {
        return Ok(());
    }
    // (chunks, OC) f32 partials: two values to an 8-byte scratch word.
    let partials = l.scratch((bias_grad_chunks(n) * oc).div_ceil(2))?;
    let partials = l.scratch_ptr(&partials);
    // SAFETY: dout holds N·OC values and dbias OC (checked above); the scratch holds chunks·OC
    // f32 partials, which the first launch writes whole before the second reads them (launches
    // run in order).
    unsafe {
        l.launch(&bias_grad_partial(dout, n, oc, partials))?;
        l.launch(&bias_grad_sum(partials, n, oc, dbias))
    }
}

/// Runs `g` on the host as cuBLAS does with `CUBLAS_COMPUTE_32F_FAST_16BF`: A and B rounded to
/// bf16 (to nearest even), products accumulated in f32 (by the `gemm` crate), then
/// `C = alpha·op(A)·op(B) + beta·C`. A bf16·bf16 product is exact in f32, so this differs from
/// the device only in the order of the sums. With `round` false the operands are used as they are
/// (f32 products): tests use that to check everything else in the model to f32 precision.
///
/// # Safety
///
/// `g.a`, `g.b` and `g.c` address host f32 memory holding [`Gemm::extent_a`],
/// [`Gemm::extent_b`] and [`Gemm::extent_c`] elements, C writable and overlapping neither A nor
/// B, as [`Launcher::gemm`] requires.
pub unsafe fn run_on_host(g: &Gemm, round: bool) -> Result<(), KernelError> {
    g.validate().map_err(|msg| KernelError {
        kernel: "gemm",
        msg,
    })?;
    if g.is_empty() {
        return Ok(());
    }
    let (a_rows, a_cols) = stored(g.transa, g.m, g.k);
    let (b_rows, b_cols) = stored(g.transb, g.k, g.n);
    for p in 0..g.batch {
        // SAFETY: batch p's matrices lie within the extents the caller vouches for; the operand
        // slices are copied and dropped before C is borrowed mutably.
        let (lhs, rhs) = unsafe {
            let a = host_slice(g.a, p * g.stride_a, span(a_rows, a_cols, g.lda));
            let b = host_slice(g.b, p * g.stride_b, span(b_rows, b_cols, g.ldb));
            (
                pack(a, g.transa, g.m, g.k, g.lda, round),
                pack(b, g.transb, g.k, g.n, g.ldb, round),
            )
        };
        // SAFETY: as above, for C.
        let c = unsafe { host_slice_mut(g.c, p * g.stride_c, span(g.m, g.n, g.ldc)) };
        product(g, c, &lhs, &rhs);
    }
    Ok(())
}

/// `len` f32 values from element `offset` of host memory at `base`.
///
/// # Safety
///
/// The range must be readable f32 memory that nothing writes while the slice lives.
unsafe fn host_slice<'a>(base: DevPtr, offset: usize, len: usize) -> &'a [f32] {
    // SAFETY: forwarded from the caller.
    unsafe { std::slice::from_raw_parts((base.0 as *const f32).add(offset), len) }
}

/// `len` writable f32 values from element `offset` of host memory at `base`.
///
/// # Safety
///
/// The range must be writable f32 memory that nothing else reads or writes while the slice lives.
unsafe fn host_slice_mut<'a>(base: DevPtr, offset: usize, len: usize) -> &'a mut [f32] {
    // SAFETY: forwarded from the caller.
    unsafe { std::slice::from_raw_parts_mut((base.0 as *mut f32).add(offset), len) }
}

/// op(X) (rows, cols) as a packed column-major copy, its values rounded to bf16 if `round`, read
/// from X stored with leading dimension `ld`.
fn pack(x: &[f32], trans: Trans, rows: usize, cols: usize, ld: usize, round: bool) -> Vec<f32> {
    let at = |i: usize, j: usize| match trans {
        Trans::N => x[i + j * ld],
        Trans::T => x[j + i * ld],
    };
    (0..cols)
        .flat_map(|j| {
            (0..rows).map(move |i| {
                let x = at(i, j);
                if round {
                    half::bf16::from_f32(x).to_f32()
                } else {
                    x
                }
            })
        })
        .collect()
}

/// `C = alpha·lhs·rhs + beta·C` for one batch entry: lhs packed (m, k), rhs packed (k, n), C
/// (m, n) column-major with leading dimension `g.ldc`.
fn product(g: &Gemm, c: &mut [f32], lhs: &[f32], rhs: &[f32]) {
    let (m, n, k) = (g.m, g.n, g.k);
    if k == 0 {
        // A sum of no terms: C = beta·C, not reading C when beta = 0.
        for col in c.chunks_mut(g.ldc) {
            for v in &mut col[..m] {
                *v = if g.beta == 0.0 { 0.0 } else { g.beta * *v };
            }
        }
        return;
    }
    // Below 32³ multiply-adds the thread hand-off would cost more than the work; the split is
    // over rows and columns of C only, so the sums' order does not depend on it.
    let par = if m * n * k >= 32 * 32 * 32 && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: c holds (n-1)·ldc + m elements, lhs m·k and rhs k·n (packed above), so every
    // index gemm forms from these strides is in bounds; c is a distinct &mut. gemm computes
    // dst := alpha·dst + beta·lhs·rhs, reading dst only when read_dst is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            g.ldc as isize,
            1,
            g.beta != 0.0,
            lhs.as_ptr(),
            m as isize,
            1,
            rhs.as_ptr(),
            k as isize,
            1,
            g.beta,
            g.alpha,
            false,
            false,
            false,
            par,
        )
    }
}
