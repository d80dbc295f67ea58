//! The linear layers on the GPU path (`src/backend/emu/matmul.rs`, `kernels/matmul.cu`) on the
//! emulated backend (DESIGN.md principle 3):
//!
//! (a) the emulator's GEMM executor, which runs a cuBLAS call description as
//!     `CUBLAS_COMPUTE_32F_FAST_16BF` does, against a naive f64 triple loop over bf16-rounded
//!     operands written from cuBLAS's column-major definition: every transpose combination,
//!     leading dimensions above the minimum, several batches with gaps between them, alpha and
//!     beta (and beta = 0 not reading C);
//! (b) the three drivers, `matmul_forward`, `matmul_backward` and `bias_backward`, against the
//!     CPU backend's ops on odd shapes (one row, sizes that are multiples of nothing, empty
//!     dimensions, with and without bias, with and without dinp);
//! (c) that the backward adds into gradients that already hold values;
//! (d) that the bias gradient is the same bits for every thread order, and the CPU's bits.
//!
//! Tolerances are relative to an element's magnitude `mag = Σ |terms|` (the sum of absolute
//! products plus the absolute values added to them), the natural scale of a sum's error:
//! - f32 summation order (`ORDER_TOL` = 1e-5): where both sides multiply the same bf16 values,
//!   each product is exact in f32 (8 + 8 significant bits), so only the order of the f32 sums
//!   differs (the `gemm` crate's blocked kernels against a sequential loop, or an f64 loop). That
//!   error is a few ulp of the partial sums: at most 9e-8·mag measured here (k ≤ 300), so 1e-5
//!   leaves a hundredfold margin, while a wrong stride, transpose or missed term is off by
//!   ~1e-1·mag.
//! - bf16 operand rounding (`BF16_TOL` = 2⁻⁸ + 1e-5), where the CPU reference multiplies the
//!   unrounded f32 inputs: rounding each operand to 8 significant bits moves it by at most 2⁻⁹
//!   relative, so each product by at most (2·2⁻⁹ + 2⁻¹⁸)·|product|; the 1e-5 covers the 2⁻¹⁸
//!   (4e-6) and the summation order. That is a bound, not an estimate, so it cannot flake (measured:
//!   ~1.7e-3·mag at worst); the tests also check the difference is over ten times `ORDER_TOL`,
//!   i.e. that the operands really are rounded.

mod common;

use common::{Rng, RngVec};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::emu::matmul::{self, Gemm, Trans};
use rlhf::backend::emu::plan::DevPtr;
use rlhf::backend::emu::{Emu, Launcher};
use rlhf::backend::ModelOps;

const ORDER_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1.0 / 256.0 + 1e-5;

/// (N, C, OC) of the driver tests: one row, one column, sizes that are multiples of nothing,
/// rows past the bias gradient's 32-row chunk, columns past its 256-thread block.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 37, 5),
    (1, 1, 1),
    (3, 1, 7),
    (7, 33, 130),
    (67, 50, 3),
    (33, 256, 257),
    (2, 300, 11),
];

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Random N(0, std²) values already representable in bf16, so that the executor's rounding is
/// the identity and only summation order separates it from the CPU's f32 products.
fn bf16_normal(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    rng.vec_normal(n, std).into_iter().map(bf16).collect()
}

fn abs(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| v.abs()).collect()
}

/// Panics unless `|got - want| <= tol·mag` everywhere (NaN fails); returns the largest
/// `|got - want| / mag` seen.
fn check(what: &str, got: &[f32], want: &[f64], mag: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = 0.0f64;
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        // NaN, or a value outside C that was NaN before, compares as an infinite error.
        let err = if w.is_nan() {
            0.0
        } else {
            (g as f64 - w).abs()
        };
        let err = if err.is_nan() { f64::INFINITY } else { err };
        assert!(
            err <= tol * m,
            "{what}: [{i}] got {g:e}, expected {w:e} (|error| {err:e} > {tol:e}·{m:e})"
        );
        if m > 0.0 {
            worst = worst.max(err / m);
        }
    }
    worst
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn ptr(x: &[f32]) -> DevPtr {
    DevPtr(x.as_ptr() as u64)
}

// ---------------------------------------------------------------------------------------------
// (a) the GEMM executor against cuBLAS's definition
// ---------------------------------------------------------------------------------------------

/// Element (i, j) of op(X) for batch entry `p`, per cuBLAS: X_p(r, c) = x[p·stride + r + c·ld].
fn op_at(x: &[f32], t: Trans, ld: usize, base: usize, i: usize, j: usize) -> f32 {
    match t {
        Trans::N => x[base + i + j * ld],
        Trans::T => x[base + j + i * ld],
    }
}

/// What C should hold after `g`, by the definition in f64 over bf16-rounded operands.
struct Expected {
    /// The whole buffer: old values outside the matrices.
    want: Vec<f64>,
    /// Each element's magnitude, Σ|alpha·a·b| + |beta·c|.
    mag: Vec<f64>,
    /// Whether an element belongs to one of the batch's C matrices.
    inside: Vec<bool>,
}

fn reference(g: &Gemm, a: &[f32], b: &[f32], c: &[f32]) -> Expected {
    let mut want = f64s(c);
    let mut mag = vec![0.0; c.len()];
    let mut inside = vec![false; c.len()];
    for p in 0..g.batch {
        for j in 0..g.n {
            for i in 0..g.m {
                let (mut s, mut m) = (0.0f64, 0.0f64);
                for l in 0..g.k {
                    let x = bf16(op_at(a, g.transa, g.lda, p * g.stride_a, i, l)) as f64;
                    let y = bf16(op_at(b, g.transb, g.ldb, p * g.stride_b, l, j)) as f64;
                    s += x * y;
                    m += (x * y).abs();
                }
                let at = p * g.stride_c + i + j * g.ldc;
                let old = if g.beta == 0.0 {
                    0.0
                } else {
                    g.beta as f64 * c[at] as f64
                };
                want[at] = g.alpha as f64 * s + old;
                mag[at] = (g.alpha as f64).abs() * m + old.abs();
                inside[at] = true;
            }
        }
    }
    Expected { want, mag, inside }
}

/// Buffers for `g` with `guard` extra elements after each extent, which nothing may touch.
struct Operands {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

fn operands(g: &Gemm, rng: &mut Rng, guard: usize) -> Operands {
    Operands {
        a: rng.vec_normal(g.extent_a() + guard, 1.0),
        b: rng.vec_normal(g.extent_b() + guard, 1.0),
        c: rng.vec_normal(g.extent_c() + guard, 1.0),
    }
}

/// A description of the given shape, transposes, padding and batch over fresh pointers.
#[allow(clippy::too_many_arguments)]
fn layout(
    transa: Trans,
    transb: Trans,
    (m, n, k): (usize, usize, usize),
    pad: usize,
    batch: usize,
    gap: usize,
    alpha: f32,
    beta: f32,
) -> Gemm {
    let rows = |t: Trans, r: usize, c: usize| if t == Trans::N { r } else { c };
    let cols = |t: Trans, r: usize, c: usize| if t == Trans::N { c } else { r };
    let lda = rows(transa, m, k) + pad;
    let ldb = rows(transb, k, n) + pad + 1;
    let ldc = m + pad + 2;
    Gemm {
        transa,
        transb,
        m,
        n,
        k,
        alpha,
        a: DevPtr::NULL,
        lda,
        stride_a: lda * cols(transa, m, k) + gap,
        b: DevPtr::NULL,
        ldb,
        stride_b: ldb * cols(transb, k, n) + gap,
        beta,
        c: DevPtr::NULL,
        ldc,
        stride_c: ldc * n + gap,
        batch,
    }
}

/// Runs `g` on the emulator over `ops` (pointers filled in here) and checks every element of C
/// against the definition, and that nothing outside the matrices changed.
fn run_and_check(what: &str, g: Gemm, ops: &mut Operands) {
    let e = reference(&g, &ops.a, &ops.b, &ops.c);
    let before = ops.c.clone();
    let g = Gemm {
        a: ptr(&ops.a),
        b: ptr(&ops.b),
        c: DevPtr(ops.c.as_mut_ptr() as u64),
        ..g
    };
    // SAFETY: each buffer holds its extent (plus a guard); C is a separate allocation.
    unsafe { Emu::default().gemm(&g) }.unwrap_or_else(|e| panic!("{what}: {e}"));
    check(what, &ops.c, &e.want, &e.mag, ORDER_TOL);
    // Padding rows, gaps between batches and the guard: the same bits (NaN included).
    for (i, (&x, &y)) in ops.c.iter().zip(&before).enumerate() {
        if !e.inside[i] {
            assert_eq!(
                x.to_bits(),
                y.to_bits(),
                "{what}: C[{i}] outside C was written"
            );
        }
    }
}

#[test]
fn executor_follows_the_cublas_definition() {
    let mut rng = Rng::new(11);
    let mut case = 0;
    for transa in [Trans::N, Trans::T] {
        for transb in [Trans::N, Trans::T] {
            for (dims, pad, batch, gap, alpha, beta) in [
                ((5, 3, 7), 0, 1, 0, 1.0, 0.0),
                ((5, 3, 7), 3, 3, 4, 0.75, -1.25),
                ((1, 1, 1), 1, 2, 0, -2.0, 1.0),
                ((17, 9, 1), 0, 1, 0, 1.0, 1.0),
                // 40·33·37 multiply-adds: the gemm crate's multithreaded path.
                ((40, 33, 37), 2, 2, 5, 1.0, 0.5),
            ] {
                case += 1;
                let g = layout(transa, transb, dims, pad, batch, gap, alpha, beta);
                let what = format!("{transa:?}{transb:?} {dims:?} pad {pad} batch {batch}");
                let mut ops = operands(&g, &mut rng, 8);
                run_and_check(&what, g, &mut ops);
            }
        }
    }
    assert_eq!(case, 20);
}

/// beta = 0 must not read C (cuBLAS: C need not hold valid values), so NaN there vanishes.
#[test]
fn executor_with_zero_beta_does_not_read_c() {
    let mut rng = Rng::new(12);
    for transa in [Trans::N, Trans::T] {
        let g = layout(transa, Trans::T, (6, 4, 9), 2, 2, 3, 1.5, 0.0);
        let mut ops = operands(&g, &mut rng, 4);
        ops.c.fill(f32::NAN);
        run_and_check(&format!("{transa:?}T beta 0"), g, &mut ops);
        let written = ops.c.iter().filter(|v| v.is_finite()).count();
        assert_eq!(
            written,
            2 * 6 * 4,
            "every element of C written, nothing else"
        );
    }
}

/// k = 0: a sum of no terms, so C = beta·C.
#[test]
fn executor_with_empty_sum_scales_c() {
    let mut rng = Rng::new(13);
    for beta in [0.0, 1.0, -0.5] {
        let g = layout(Trans::N, Trans::N, (4, 3, 0), 1, 2, 1, 2.0, beta);
        let mut ops = operands(&g, &mut rng, 4);
        run_and_check(&format!("k = 0, beta {beta}"), g, &mut ops);
    }
}

/// The executor rounds its operands to bf16: against unrounded f32 products it is off by far
/// more than summation order allows, though within the rounding bound.
#[test]
fn executor_rounds_operands_to_bf16() {
    let mut rng = Rng::new(14);
    let g = layout(Trans::T, Trans::N, (13, 11, 64), 0, 1, 0, 1.0, 0.0);
    let ops = operands(&g, &mut rng, 0);
    let mut c = vec![0.0f32; g.extent_c()];
    let run = Gemm {
        a: ptr(&ops.a),
        b: ptr(&ops.b),
        c: DevPtr(c.as_mut_ptr() as u64),
        ..g
    };
    // SAFETY: the buffers hold their extents exactly; C is a separate allocation.
    unsafe { Emu::default().gemm(&run) }.unwrap();
    let (mut want, mut mag) = (vec![0.0; c.len()], vec![0.0; c.len()]);
    for j in 0..g.n {
        for i in 0..g.m {
            for l in 0..g.k {
                let x = ops.a[l + i * g.lda] as f64 * ops.b[l + j * g.ldb] as f64;
                want[i + j * g.ldc] += x;
                mag[i + j * g.ldc] += x.abs();
            }
        }
    }
    let worst = check("unrounded f32 products", &c, &want, &mag, BF16_TOL);
    assert!(
        worst > 10.0 * ORDER_TOL,
        "largest relative deviation {worst:e}: the operands were not rounded to bf16"
    );
}

#[test]
fn executor_rejects_what_cublas_rejects() {
    let g = layout(Trans::N, Trans::N, (5, 3, 7), 0, 1, 0, 1.0, 0.0);
    for (bad, field) in [
        (Gemm { lda: 4, ..g }, "lda = 4"),
        (Gemm { ldb: 6, ..g }, "ldb = 6"),
        (Gemm { ldc: 4, ..g }, "ldc = 4"),
        (
            Gemm {
                transa: Trans::T,
                ..g
            },
            "lda = 5",
        ),
    ] {
        // SAFETY: rejected before any pointer is read.
        let err = unsafe { Emu::default().gemm(&bad) }.unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
    // Nothing to compute: no pointer is touched, even null ones.
    let empty = Gemm {
        m: 0,
        lda: 1,
        ldc: 1,
        ..g
    };
    // SAFETY: an empty description reads and writes nothing.
    unsafe { Emu::default().gemm(&empty) }.unwrap();
}

// ---------------------------------------------------------------------------------------------
// (b), (c) the drivers against the CPU backend
// ---------------------------------------------------------------------------------------------

struct Data {
    inp: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    dout: Vec<f32>,
    dinp0: Vec<f32>,
    dw0: Vec<f32>,
}

/// bf16-representable operands; the gradients start from random values, as the backward adds.
fn data(n: usize, c: usize, oc: usize, seed: u64) -> Data {
    let mut rng = Rng::new(seed);
    Data {
        inp: bf16_normal(&mut rng, n * c, 1.0),
        w: bf16_normal(&mut rng, oc * c, 0.5),
        bias: rng.vec_normal(oc, 1.0),
        dout: bf16_normal(&mut rng, n * oc, 1.0),
        dinp0: rng.vec_normal(n * c, 1.0),
        dw0: rng.vec_normal(oc * c, 1.0),
    }
}

/// The CPU forward, and its magnitudes (the same op on absolute values).
fn cpu_forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; n * oc];
    Cpu.matmul_forward(&mut out, x, w, bias, n, c, oc);
    let mut mag = vec![0.0; n * oc];
    let bias_abs = bias.map(abs);
    Cpu.matmul_forward(&mut mag, &abs(x), &abs(w), bias_abs.as_deref(), n, c, oc);
    (f64s(&out), f64s(&mag))
}

fn emu_forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) -> Vec<f32> {
    // Garbage first: the forward overwrites out.
    let mut out = vec![f32::NAN; n * oc];
    matmul::matmul_forward(&Emu::default(), &mut out[..], x, w, bias, n, c, oc).unwrap();
    out
}

#[test]
fn forward_matches_cpu() {
    for (s, &(n, c, oc)) in SHAPES.iter().enumerate() {
        let d = data(n, c, oc, 100 + s as u64);
        for bias in [None, Some(&d.bias[..])] {
            let what = format!("forward N={n} C={c} OC={oc} bias {}", bias.is_some());
            let (want, mag) = cpu_forward(&d.inp, &d.w, bias, n, c, oc);
            let got = emu_forward(&d.inp, &d.w, bias, n, c, oc);
            check(&what, &got, &want, &mag, ORDER_TOL);
        }
    }
}

/// Unrounded f32 inputs: the emulated device differs from the CPU's f32 products by the bf16
/// rounding of its operands, within the bound that rounding allows.
#[test]
fn forward_on_f32_inputs_is_within_bf16_rounding() {
    let (n, c, oc) = (9, 130, 21);
    let mut rng = Rng::new(7);
    let (x, w, b) = (
        rng.vec_normal(n * c, 1.0),
        rng.vec_normal(oc * c, 0.5),
        rng.vec_normal(oc, 1.0),
    );
    let (want, mag) = cpu_forward(&x, &w, Some(&b), n, c, oc);
    let got = emu_forward(&x, &w, Some(&b), n, c, oc);
    let worst = check("forward on f32 inputs", &got, &want, &mag, BF16_TOL);
    assert!(worst > 10.0 * ORDER_TOL, "operands not rounded: {worst:e}");
}

/// dinp and dw from the CPU backward (added to `dinp0`, `dw0`) and their magnitudes.
struct Grads {
    dinp: Vec<f64>,
    dinp_mag: Vec<f64>,
    dw: Vec<f64>,
    dw_mag: Vec<f64>,
}

fn cpu_backward(d: &Data, n: usize, c: usize, oc: usize) -> Grads {
    let (mut dinp, mut dw) = (d.dinp0.clone(), d.dw0.clone());
    Cpu.matmul_backward(Some(&mut dinp), &mut dw, &d.dout, &d.inp, &d.w, n, c, oc);
    let (mut dinp_mag, mut dw_mag) = (abs(&d.dinp0), abs(&d.dw0));
    let (dout, inp, w) = (abs(&d.dout), abs(&d.inp), abs(&d.w));
    Cpu.matmul_backward(Some(&mut dinp_mag), &mut dw_mag, &dout, &inp, &w, n, c, oc);
    Grads {
        dinp: f64s(&dinp),
        dinp_mag: f64s(&dinp_mag),
        dw: f64s(&dw),
        dw_mag: f64s(&dw_mag),
    }
}

#[test]
fn backward_adds_what_cpu_adds() {
    let emu = Emu::default();
    for (s, &(n, c, oc)) in SHAPES.iter().enumerate() {
        let d = data(n, c, oc, 200 + s as u64);
        let what = format!("backward N={n} C={c} OC={oc}");
        let want = cpu_backward(&d, n, c, oc);

        let (mut dinp, mut dw) = (d.dinp0.clone(), d.dw0.clone());
        matmul::matmul_backward(
            &emu,
            Some(&mut dinp[..]),
            &mut dw[..],
            &d.dout,
            &d.inp,
            &d.w,
            n,
            c,
            oc,
        )
        .unwrap();
        check(
            &format!("{what} dinp"),
            &dinp,
            &want.dinp,
            &want.dinp_mag,
            ORDER_TOL,
        );
        check(
            &format!("{what} dw"),
            &dw,
            &want.dw,
            &want.dw_mag,
            ORDER_TOL,
        );

        // Without dinp, dw is the same.
        let mut dw_only = d.dw0.clone();
        matmul::matmul_backward(
            &emu,
            None,
            &mut dw_only[..],
            &d.dout,
            &d.inp,
            &d.w,
            n,
            c,
            oc,
        )
        .unwrap();
        assert_eq!(dw_only, dw, "{what}: dw without dinp");
    }
}

/// The backward adds: starting from non-zero gradients gives exactly what starting from zero
/// does, plus the starting values (checked against the CPU, whose backward adds too, and
/// against a zero start: the difference must be the start, not zero).
#[test]
fn backward_accumulates_into_existing_gradients() {
    let (n, c, oc) = (5, 19, 23);
    let d = data(n, c, oc, 300);
    let emu = Emu::default();
    let run = |dinp0: &[f32], dw0: &[f32]| {
        let (mut dinp, mut dw) = (dinp0.to_vec(), dw0.to_vec());
        matmul::matmul_backward(
            &emu,
            Some(&mut dinp[..]),
            &mut dw[..],
            &d.dout,
            &d.inp,
            &d.w,
            n,
            c,
            oc,
        )
        .unwrap();
        (dinp, dw)
    };
    let (dinp_zero, dw_zero) = run(&vec![0.0; n * c], &vec![0.0; oc * c]);
    let (dinp, dw) = run(&d.dinp0, &d.dw0);
    for (what, got, zero, start) in [
        ("dinp", &dinp, &dinp_zero, &d.dinp0),
        ("dw", &dw, &dw_zero, &d.dw0),
    ] {
        for i in 0..got.len() {
            let added = (got[i] - zero[i]) as f64;
            let tol = 1e-5 * (zero[i].abs() + start[i].abs()) as f64;
            assert!(
                (added - start[i] as f64).abs() <= tol,
                "{what}[{i}]: {} - {} is not the starting value {}",
                got[i],
                zero[i],
                start[i]
            );
        }
    }
}

/// Empty dimensions: no row, no input column (the output is the bias, or zeros; dinp and dw are
/// empty, dbias still sums dout), no output column. Gradients with nothing to add stay as they
/// were.
#[test]
fn empty_shapes_run_nothing_or_write_the_bias() {
    let emu = Emu::default();
    for &(n, c, oc) in &[(0, 5, 3), (4, 0, 6), (5, 6, 0), (0, 0, 0)] {
        let d = data(n, c, oc, 400);
        let what = format!("N={n} C={c} OC={oc}");
        for bias in [None, Some(&d.bias[..])] {
            let (want, _) = cpu_forward(&d.inp, &d.w, bias, n, c, oc);
            let got = emu_forward(&d.inp, &d.w, bias, n, c, oc);
            assert_eq!(f64s(&got), want, "{what} forward, bias {}", bias.is_some());
        }
        let want = cpu_backward(&d, n, c, oc);
        let (mut dinp, mut dw) = (d.dinp0.clone(), d.dw0.clone());
        matmul::matmul_backward(
            &emu,
            Some(&mut dinp[..]),
            &mut dw[..],
            &d.dout,
            &d.inp,
            &d.w,
            n,
            c,
            oc,
        )
        .unwrap();
        assert_eq!(f64s(&dinp), want.dinp, "{what} dinp");
        assert_eq!(f64s(&dw), want.dw, "{what} dw");
        let (mut dbias, mut want) = (d.bias.clone(), d.bias.clone());
        matmul::bias_backward(&emu, &mut dbias[..], &d.dout, n, oc).unwrap();
        Cpu.bias_backward(&mut want, &d.dout, n, oc);
        assert_eq!(dbias, want, "{what} dbias");
    }
}

#[test]
#[should_panic(expected = "matmul_forward: out: 5 elements, expected 6")]
fn forward_rejects_a_wrong_length() {
    let (inp, w) = (vec![0.0; 2 * 4], vec![0.0; 3 * 4]);
    let mut out = [0.0; 5];
    let _ = matmul::matmul_forward(&Emu::default(), &mut out[..], &inp, &w, None, 2, 4, 3);
}

#[test]
#[should_panic(expected = "matmul_backward: dinp: 7 elements, expected 8")]
fn backward_rejects_a_wrong_length() {
    let (dout, inp, w) = (vec![0.0; 2 * 3], vec![0.0; 2 * 4], vec![0.0; 3 * 4]);
    let (mut dinp, mut dw) = (vec![0.0; 7], vec![0.0; 12]);
    let emu = Emu::default();
    let _ = matmul::matmul_backward(
        &emu,
        Some(&mut dinp[..]),
        &mut dw[..],
        &dout,
        &inp,
        &w,
        2,
        4,
        3,
    );
}

// ---------------------------------------------------------------------------------------------
// (d) the bias gradient: the CPU's bits, for every thread order
// ---------------------------------------------------------------------------------------------

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// (N, OC): one row; one chunk exactly (32 rows); one past it; several chunks with a partial
/// last one; one column; a column count past the 256-thread block.
const BIAS_SHAPES: &[(usize, usize)] = &[(1, 5), (32, 7), (33, 1), (100, 257), (67, 300)];

#[test]
fn bias_backward_matches_cpu_bit_for_bit_in_every_thread_order() {
    for (s, &(n, oc)) in BIAS_SHAPES.iter().enumerate() {
        let mut rng = Rng::new(500 + s as u64);
        let dout = rng.vec_normal(n * oc, 1.0);
        let dbias0 = rng.vec_normal(oc, 1.0);
        let mut want = dbias0.clone();
        Cpu.bias_backward(&mut want, &dout, n, oc);
        // The same fixed order as the CPU (32-row chunks, then chunk by chunk into dbias), so
        // the same bits, whichever order the emulator resumes threads in.
        for seed in [0x5eed, 1, 2, 3] {
            let mut got = dbias0.clone();
            matmul::bias_backward(&Emu::with_seed(seed), &mut got[..], &dout, n, oc).unwrap();
            assert_eq!(bits(&got), bits(&want), "N={n} OC={oc} seed {seed}");
        }
    }
}
