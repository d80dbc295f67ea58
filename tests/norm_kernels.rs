//! The norm kernels (`kernels/norm.cu`) on the emulated backend against the CPU reference:
//! `ModelOps::rmsnorm_forward` / `rmsnorm_backward` and `layernorm_forward` /
//! `layernorm_backward` (DESIGN.md principle 3).
//!
//! Shapes are odd, so that every bound runs: one row, row counts that are no multiple of anything
//! (3, 67, 130: more than two of the weight gradient's 64-row chunks, the last one partial), widths
//! below, between and above the 256-thread block (1, 37, 200, 1000), and one exact fit (256).
//! Inputs are N(0, 1.5²) plus, for LayerNorm, an offset of 3, so that the two-pass variance
//! matters. `dinp` and `dw` start from random values, since the backward adds to them.
//!
//! Tolerances (`|got - want| <= TOL·scale + TOL·|want|`, `scale` the largest magnitude of the
//! tensor compared, at least 1), and why: both sides compute in f32 from the same inputs and
//! differ only in summation order — the kernels' strided per-thread sums and shuffle tree
//! against the CPU's sequential `dot`/`sum`, and for dw 64-row chunks against the CPU's
//! `ROW_CHUNK` partials. A sum of C terms then differs by a few ulp of its largest partial sums,
//! relative ~1e-6 for these widths. Outputs and dinp are a handful of roundings from those sums;
//! dw is a sum over up to 130 rows of terms that cancel, so its error is relative to the scale
//! of the terms, not to each value. Every comparison here passes at 1e-6 (the first failures
//! appear at 1e-7), so TOL = 1e-5 leaves a tenfold margin; a wrong bound, a missed row or a
//! dropped term is off by 1e-2 or more.
//! Results must also be the same bits for every thread order (no atomics anywhere).

mod common;

use common::{check_close, Rng, RngVec};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::emu::Emu;
use rlhf::backend::ModelOps;

const TOL: f64 = 1e-5;
const STD: f32 = 1.5;
const EPS: f32 = 1e-5;

/// (N, C) pairs tested.
const SHAPES: &[(usize, usize)] = &[
    (1, 37),
    (1, 1000),
    (3, 200),
    (2, 1),
    (5, 256),
    (67, 37),
    (130, 200),
    (67, 1000),
];

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Closeness against the reference with the tensor's scale as the absolute part.
fn close(what: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(1.0f64, |m, &v| m.max((v as f64).abs()));
    check_close(what, got, &f64s(want), TOL * scale, TOL).unwrap_or_else(|e| panic!("{e}"));
}

struct Data {
    inp: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    dout: Vec<f32>,
    dinp0: Vec<f32>,
    dw0: Vec<f32>,
}

fn data(n: usize, c: usize, offset: f32, seed: u64) -> Data {
    let mut rng = Rng::new(seed);
    let inp = rng
        .vec_normal(n * c, STD)
        .into_iter()
        .map(|x| x + offset)
        .collect();
    Data {
        inp,
        w: rng.vec_uniform(c, 0.5, 1.5),
        b: rng.vec_normal(c, 0.5),
        dout: rng.vec_normal(n * c, 1.0),
        dinp0: rng.vec_normal(n * c, 1.0),
        dw0: rng.vec_normal(c, 1.0),
    }
}

#[test]
fn rmsnorm_matches_cpu() {
    for (k, &(n, c)) in SHAPES.iter().enumerate() {
        let d = data(n, c, 0.0, 100 + k as u64);
        let what = format!("rmsnorm N={n} C={c}");

        let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        Cpu.rmsnorm_forward(&mut out, &mut rstd, &d.inp, &d.w, n, c, EPS);
        let (mut got_out, mut got_rstd) = (vec![0.0; n * c], vec![0.0; n]);
        let emu = Emu::default();
        emu.rmsnorm_forward(&mut got_out, &mut got_rstd, &d.inp, &d.w, n, c, EPS);
        close(&format!("{what} out"), &got_out, &out);
        close(&format!("{what} rstd"), &got_rstd, &rstd);

        let (mut dinp, mut dw) = (d.dinp0.clone(), d.dw0.clone());
        Cpu.rmsnorm_backward(&mut dinp, &mut dw, &d.dout, &d.inp, &d.w, &rstd, n, c);
        let (mut got_dinp, mut got_dw) = (d.dinp0.clone(), d.dw0.clone());
        emu.rmsnorm_backward(
            &mut got_dinp,
            &mut got_dw,
            &d.dout,
            &d.inp,
            &d.w,
            &rstd,
            n,
            c,
        );
        close(&format!("{what} dinp"), &got_dinp, &dinp);
        close(&format!("{what} dw"), &got_dw, &dw);

        // Another thread order: the same bits.
        let other = Emu::with_seed(7 + k as u64);
        let (mut o2, mut r2) = (vec![0.0; n * c], vec![0.0; n]);
        other.rmsnorm_forward(&mut o2, &mut r2, &d.inp, &d.w, n, c, EPS);
        let (mut di2, mut dw2) = (d.dinp0.clone(), d.dw0.clone());
        other.rmsnorm_backward(&mut di2, &mut dw2, &d.dout, &d.inp, &d.w, &rstd, n, c);
        assert_eq!(
            bits(&o2),
            bits(&got_out),
            "{what}: out depends on thread order"
        );
        assert_eq!(
            bits(&r2),
            bits(&got_rstd),
            "{what}: rstd depends on thread order"
        );
        assert_eq!(
            bits(&di2),
            bits(&got_dinp),
            "{what}: dinp depends on thread order"
        );
        assert_eq!(
            bits(&dw2),
            bits(&got_dw),
            "{what}: dw depends on thread order"
        );
    }
}

#[test]
fn layernorm_matches_cpu() {
    for (k, &(n, c)) in SHAPES.iter().enumerate() {
        let d = data(n, c, 3.0, 200 + k as u64);
        let what = format!("layernorm N={n} C={c}");
        let emu = Emu::default();

        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        Cpu.layernorm_forward(
            &mut out, &mut mean, &mut rstd, &d.inp, &d.w, &d.b, n, c, EPS,
        );
        let (mut got_out, mut got_mean, mut got_rstd) =
            (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        emu.layernorm_forward(
            &mut got_out,
            &mut got_mean,
            &mut got_rstd,
            &d.inp,
            &d.w,
            &d.b,
            n,
            c,
            EPS,
        );
        close(&format!("{what} out"), &got_out, &out);
        close(&format!("{what} mean"), &got_mean, &mean);
        close(&format!("{what} rstd"), &got_rstd, &rstd);

        let (mut dinp, mut dw) = (d.dinp0.clone(), d.dw0.clone());
        Cpu.layernorm_backward(
            &mut dinp, &mut dw, &d.dout, &d.inp, &d.w, &mean, &rstd, n, c,
        );
        let (mut got_dinp, mut got_dw) = (d.dinp0.clone(), d.dw0.clone());
        emu.layernorm_backward(
            &mut got_dinp,
            &mut got_dw,
            &d.dout,
            &d.inp,
            &d.w,
            &mean,
            &rstd,
            n,
            c,
        );
        close(&format!("{what} dinp"), &got_dinp, &dinp);
        close(&format!("{what} dw"), &got_dw, &dw);
    }
}

/// An empty batch runs nothing and leaves the gradients as they were.
#[test]
fn empty_batch_is_a_no_op() {
    let emu = Emu::default();
    let mut dw = vec![1.0f32, 2.0, 3.0];
    emu.rmsnorm_forward(&mut [], &mut [], &[], &[1.0; 3], 0, 3, EPS);
    emu.rmsnorm_backward(&mut [], &mut dw, &[], &[], &[1.0; 3], &[], 0, 3);
    emu.layernorm_backward(&mut [], &mut dw, &[], &[], &[1.0; 3], &[], &[], 0, 3);
    assert_eq!(dw, [1.0, 2.0, 3.0]);
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}
