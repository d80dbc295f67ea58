//! The optimizer's ops: the squared norm for gradient clipping and the AdamW update.

use super::math::simd_dispatch;
use super::reduce::ELEM_CHUNK;
use crate::backend::AdamW;
use rayon::prelude::*;

/// `Σ x²` in f64: each fixed chunk of [`ELEM_CHUNK`] elements is summed in f64, then the chunk
/// sums are added in order, so the result is the same for any number of threads.
pub fn sum_squares(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(ELEM_CHUNK)
        .map(|c| {
            // Four accumulators let the f64 adds overlap; fixed, so still deterministic.
            let mut acc = [0.0f64; 4];
            let quads = c.chunks_exact(4);
            let tail: f64 = quads.remainder().iter().map(|&v| v as f64 * v as f64).sum();
            for q in quads {
                for l in 0..4 {
                    acc[l] += q[l] as f64 * q[l] as f64;
                }
            }
            (acc[0] + acc[2]) + (acc[1] + acc[3]) + tail
        })
        .collect();
    partials.iter().sum()
}

/// One AdamW step, in the order `torch.optim.AdamW` (single-tensor path) performs it:
/// `p *= 1 - lr·wd`; `m += (1-β1)·(g - m)`; `v = β2·v + (1-β2)·g²`;
/// `p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)`.
/// The scalar factors are computed in f64, as Python computes them, then rounded to f32.
/// params, grads, m, v: equal lengths.
pub fn adamw(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], h: AdamW) {
    assert!(
        params.len() == grads.len() && grads.len() == m.len() && m.len() == v.len(),
        "adamw: params, grads, m and v differ in length"
    );
    assert!(h.step >= 1, "adamw: step is 1-based");
    let (lr, b1, b2) = (h.lr as f64, h.beta1 as f64, h.beta2 as f64);
    let step = h.step.min(i32::MAX as u64) as i32;
    let k = AdamKernel {
        decay: (1.0 - lr * h.weight_decay as f64) as f32,
        step_size: (lr / (1.0 - b1.powi(step))) as f32,
        bc2_sqrt: (1.0 - b2.powi(step)).sqrt() as f32,
        one_m_b1: (1.0 - b1) as f32,
        b2: h.beta2,
        one_m_b2: (1.0 - b2) as f32,
        eps: h.eps,
    };
    params
        .par_chunks_mut(ELEM_CHUNK)
        .zip(grads.par_chunks(ELEM_CHUNK))
        .zip(
            m.par_chunks_mut(ELEM_CHUNK)
                .zip(v.par_chunks_mut(ELEM_CHUNK)),
        )
        .for_each(|((p, g), (m, v))| adamw_simd(p, g, m, v, k));
}

/// The f32 scalars of one AdamW step.
#[derive(Clone, Copy)]
struct AdamKernel {
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    one_m_b1: f32,
    b2: f32,
    one_m_b2: f32,
    eps: f32,
}

simd_dispatch! {
    fn adamw_simd(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamKernel) =
        adamw_kernel;
}

/// [`adamw`] on one chunk.
#[inline(always)]
fn adamw_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamKernel) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let pi = *p * k.decay;
        let mi = *m + k.one_m_b1 * (g - *m);
        let vi = k.b2 * *v + k.one_m_b2 * g * g;
        let denom = vi.sqrt() / k.bc2_sqrt + k.eps;
        *p = pi - k.step_size * (mi / denom);
        *m = mi;
        *v = vi;
    }
}
