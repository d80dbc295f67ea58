//! Pointwise activations: GELU (tanh form) and SwiGLU.
//!
//! Each op is a parallel loop over fixed chunks whose body is an `#[inline(always)]` kernel run
//! through `simd_dispatch!`, so the exp/tanh arithmetic uses the CPU's widest vectors.

use super::math::{self, simd_dispatch};
use super::reduce::{ELEM_CHUNK, ROW_CHUNK};
use rayon::prelude::*;

/// `sqrt(2/π)`, the scale inside GELU's tanh.
const GELU_SCALE: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh approximation.
const GELU_CUBIC: f32 = 0.044_715;

/// GELU, tanh form: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (HF `gelu_new`,
/// `gelu_pytorch_tanh`). out, inp: any equal length.
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(
        out.len(),
        inp.len(),
        "gelu_forward: out and inp differ in length"
    );
    out.par_chunks_mut(ELEM_CHUNK)
        .zip(inp.par_chunks(ELEM_CHUNK))
        .for_each(|(out, inp)| gelu_forward_simd(out, inp));
}

simd_dispatch! {
    fn gelu_forward_simd(out: &mut [f32], inp: &[f32]) = gelu_forward_kernel;
}

/// [`gelu_forward`] on one chunk.
#[inline(always)]
fn gelu_forward_kernel(out: &mut [f32], inp: &[f32]) {
    for (o, &x) in out.iter_mut().zip(inp) {
        let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
        *o = 0.5 * x * (1.0 + math::tanh(u));
    }
}

/// `gelu'(x)` of the tanh form.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    let th = math::tanh(u);
    let sech2 = 1.0 - th * th;
    0.5 * (1.0 + th) + 0.5 * x * sech2 * GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x)
}

/// `dinp += gelu'(inp) · dout`. dinp, inp, dout: any equal length.
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    assert!(
        dinp.len() == inp.len() && inp.len() == dout.len(),
        "gelu_backward: dinp, inp and dout differ in length"
    );
    dinp.par_chunks_mut(ELEM_CHUNK)
        .zip(inp.par_chunks(ELEM_CHUNK))
        .zip(dout.par_chunks(ELEM_CHUNK))
        .for_each(|((dinp, inp), dout)| gelu_backward_simd(dinp, inp, dout));
}

simd_dispatch! {
    fn gelu_backward_simd(dinp: &mut [f32], inp: &[f32], dout: &[f32]) = gelu_backward_kernel;
}

/// [`gelu_backward`] on one chunk.
#[inline(always)]
fn gelu_backward_kernel(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    for ((dx, &x), &dy) in dinp.iter_mut().zip(inp).zip(dout) {
        *dx += gelu_grad(x) * dy;
    }
}

/// SwiGLU: `out[n, i] = silu(gate) · up`, `silu(g) = g·σ(g)`, with rows of `inp` laid out
/// `[gate (I) | up (I)]` (HF's `gate_proj` and `up_proj` outputs side by side).
/// out: (N, I), inp: (N, 2I).
pub fn swiglu_forward(out: &mut [f32], inp: &[f32], n: usize, i: usize) {
    assert_eq!(out.len(), n * i, "swiglu_forward: out is not N·I");
    assert_eq!(inp.len(), n * 2 * i, "swiglu_forward: inp is not N·2I");
    if n == 0 || i == 0 {
        return;
    }
    out.par_chunks_mut(i * ROW_CHUNK)
        .zip(inp.par_chunks(2 * i * ROW_CHUNK))
        .for_each(|(out, inp)| swiglu_forward_simd(out, inp, i));
}

simd_dispatch! {
    fn swiglu_forward_simd(out: &mut [f32], inp: &[f32], i: usize) = swiglu_forward_kernel;
}

/// [`swiglu_forward`] on a block of rows. out: (rows, I), inp: (rows, 2I).
#[inline(always)]
fn swiglu_forward_kernel(out: &mut [f32], inp: &[f32], i: usize) {
    for (o, x) in out.chunks_exact_mut(i).zip(inp.chunks_exact(2 * i)) {
        let (gate, up) = x.split_at(i);
        for ((oi, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            *oi = g * math::sigmoid(g) * u;
        }
    }
}

/// Gradient of SwiGLU: `dgate += dout·up·silu'(gate)`, `dup += dout·silu(gate)`, with
/// `silu'(g) = σ(g)·(1 + g·(1 - σ(g)))`.
/// dinp: (N, 2I), inp: (N, 2I), dout: (N, I).
pub fn swiglu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32], n: usize, i: usize) {
    assert_eq!(dinp.len(), n * 2 * i, "swiglu_backward: dinp is not N·2I");
    assert_eq!(inp.len(), n * 2 * i, "swiglu_backward: inp is not N·2I");
    assert_eq!(dout.len(), n * i, "swiglu_backward: dout is not N·I");
    if n == 0 || i == 0 {
        return;
    }
    dinp.par_chunks_mut(2 * i * ROW_CHUNK)
        .zip(inp.par_chunks(2 * i * ROW_CHUNK))
        .zip(dout.par_chunks(i * ROW_CHUNK))
        .for_each(|((dinp, inp), dout)| swiglu_backward_simd(dinp, inp, dout, i));
}

simd_dispatch! {
    fn swiglu_backward_simd(dinp: &mut [f32], inp: &[f32], dout: &[f32], i: usize) =
        swiglu_backward_kernel;
}

/// One element of [`swiglu_backward`]: adds into the gate's and the up projection's gradients.
#[inline(always)]
fn swiglu_grad(dg: &mut f32, du: &mut f32, g: f32, u: f32, dy: f32) {
    let s = math::sigmoid(g);
    *dg += dy * u * s * (1.0 + g * (1.0 - s));
    *du += dy * g * s;
}

/// [`swiglu_backward`] on a block of rows. dinp, inp: (rows, 2I), dout: (rows, I).
#[inline(always)]
fn swiglu_backward_kernel(dinp: &mut [f32], inp: &[f32], dout: &[f32], i: usize) {
    for ((dx, x), dy) in dinp
        .chunks_exact_mut(2 * i)
        .zip(inp.chunks_exact(2 * i))
        .zip(dout.chunks_exact(i))
    {
        let (gate, up) = x.split_at(i);
        let (dgate, dup) = dx.split_at_mut(i);
        // Blocks of 16 as arrays: with two outputs and three inputs per element, a plain loop
        // over the row was left scalar by the compiler.
        const L: usize = 16;
        let whole = i - i % L;
        for k in (0..whole).step_by(L) {
            let dg: &mut [f32; L] = (&mut dgate[k..k + L]).try_into().expect("a whole block");
            let du: &mut [f32; L] = (&mut dup[k..k + L]).try_into().expect("a whole block");
            let g: &[f32; L] = gate[k..k + L].try_into().expect("a whole block");
            let u: &[f32; L] = up[k..k + L].try_into().expect("a whole block");
            let d: &[f32; L] = dy[k..k + L].try_into().expect("a whole block");
            for l in 0..L {
                swiglu_grad(&mut dg[l], &mut du[l], g[l], u[l], d[l]);
            }
        }
        for k in whole..i {
            swiglu_grad(&mut dgate[k], &mut dup[k], gate[k], up[k], dy[k]);
        }
    }
}
