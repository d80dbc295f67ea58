//! LayerNorm (GPT-2) and RMSNorm (Llama, Qwen2) over the last dimension.
//!
//! Forward saves the per-row statistics backward needs (`mean`, `rstd`); backward recomputes the
//! normalised row from them. Weight gradients are sums over rows, so they go through fixed row
//! chunks and ordered partials (see `reduce`).

use super::reduce::{add_partials, dot, sum, sum_by, ROW_CHUNK};
use rayon::prelude::*;

/// LayerNorm with PyTorch's biased variance: `out = (x - mean) · rstd · w + b`,
/// `rstd = 1/sqrt(var + eps)`.
/// out: (N, C), mean: (N), rstd: (N), inp: (N, C), w: (C), b: (C).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    c: usize,
    eps: f32,
) {
    check_shapes(
        "layernorm_forward",
        n,
        c,
        &[out.len(), inp.len()],
        &[mean.len(), rstd.len()],
    );
    assert!(
        w.len() == c && b.len() == c,
        "layernorm_forward: w and b must be C"
    );
    if n == 0 || c == 0 {
        return;
    }
    out.par_chunks_mut(c * ROW_CHUNK)
        .zip(inp.par_chunks(c * ROW_CHUNK))
        .zip(mean.par_chunks_mut(ROW_CHUNK))
        .zip(rstd.par_chunks_mut(ROW_CHUNK))
        .for_each(|(((out, inp), mean), rstd)| {
            for (((o, x), m), r) in out
                .chunks_exact_mut(c)
                .zip(inp.chunks_exact(c))
                .zip(mean.iter_mut())
                .zip(rstd.iter_mut())
            {
                // Two passes (mean, then squared deviations) rather than E[x²] - E[x]², which
                // cancels badly when |mean| is large next to the spread.
                let mu = sum(x) / c as f32;
                let var = sum_by(x, |xi| (xi - mu) * (xi - mu)) / c as f32;
                let rs = 1.0 / (var + eps).sqrt();
                for (((oi, &xi), &wi), &bi) in o.iter_mut().zip(x).zip(w).zip(b) {
                    *oi = (xi - mu) * rs * wi + bi;
                }
                *m = mu;
                *r = rs;
            }
        });
}

/// Gradients of LayerNorm: `dinp += ∂L/∂inp`, `dw += Σ_n dout·x̂` (x̂ the normalised input).
/// The bias gradient is `bias_backward(dout)`.
/// dinp: (N, C), dw: (C), dout: (N, C), inp: (N, C), w: (C), mean: (N), rstd: (N).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    check_shapes(
        "layernorm_backward",
        n,
        c,
        &[dinp.len(), dout.len(), inp.len()],
        &[mean.len(), rstd.len()],
    );
    assert!(
        w.len() == c && dw.len() == c,
        "layernorm_backward: w and dw must be C"
    );
    if n == 0 || c == 0 {
        return;
    }
    let partials: Vec<Vec<f32>> = dinp
        .par_chunks_mut(c * ROW_CHUNK)
        .zip(dout.par_chunks(c * ROW_CHUNK))
        .zip(inp.par_chunks(c * ROW_CHUNK))
        .zip(mean.par_chunks(ROW_CHUNK).zip(rstd.par_chunks(ROW_CHUNK)))
        .map(|(((dinp, dout), inp), (mean, rstd))| {
            let mut dw_part = vec![0.0f32; c];
            let mut norm = vec![0.0f32; c];
            let mut dnorm = vec![0.0f32; c];
            for ((((dx, dy), x), &mu), &rs) in dinp
                .chunks_exact_mut(c)
                .zip(dout.chunks_exact(c))
                .zip(inp.chunks_exact(c))
                .zip(mean)
                .zip(rstd)
            {
                for i in 0..c {
                    norm[i] = (x[i] - mu) * rs;
                    dnorm[i] = w[i] * dy[i];
                    dw_part[i] += dy[i] * norm[i];
                }
                // y = x̂·w + b with x̂ = (x - mean)·rstd: the gradient through mean and rstd
                // subtracts the mean of dx̂ and the projection of dx̂ on x̂.
                let dnorm_mean = sum(&dnorm) / c as f32;
                let dnorm_norm_mean = dot(&dnorm, &norm) / c as f32;
                for i in 0..c {
                    dx[i] += (dnorm[i] - dnorm_mean - norm[i] * dnorm_norm_mean) * rs;
                }
            }
            dw_part
        })
        .collect();
    add_partials(dw, &partials);
}

/// RMSNorm as Hugging Face's Llama computes it: `out = w · (x · rstd)`,
/// `rstd = 1/sqrt(mean(x²) + eps)`.
/// out: (N, C), rstd: (N), inp: (N, C), w: (C).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    c: usize,
    eps: f32,
) {
    check_shapes(
        "rmsnorm_forward",
        n,
        c,
        &[out.len(), inp.len()],
        &[rstd.len()],
    );
    assert_eq!(w.len(), c, "rmsnorm_forward: w must be C");
    if n == 0 || c == 0 {
        return;
    }
    out.par_chunks_mut(c * ROW_CHUNK)
        .zip(inp.par_chunks(c * ROW_CHUNK))
        .zip(rstd.par_chunks_mut(ROW_CHUNK))
        .for_each(|((out, inp), rstd)| {
            for ((o, x), r) in out.chunks_exact_mut(c).zip(inp.chunks_exact(c)).zip(rstd) {
                let ms = dot(x, x) / c as f32;
                let rs = 1.0 / (ms + eps).sqrt();
                for ((oi, &xi), &wi) in o.iter_mut().zip(x).zip(w) {
                    *oi = wi * (xi * rs);
                }
                *r = rs;
            }
        });
}

/// Gradients of RMSNorm: `dinp += ∂L/∂inp`, `dw += Σ_n dout·x̂` (x̂ = x·rstd).
/// dinp: (N, C), dw: (C), dout: (N, C), inp: (N, C), w: (C), rstd: (N).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    check_shapes(
        "rmsnorm_backward",
        n,
        c,
        &[dinp.len(), dout.len(), inp.len()],
        &[rstd.len()],
    );
    assert!(
        w.len() == c && dw.len() == c,
        "rmsnorm_backward: w and dw must be C"
    );
    if n == 0 || c == 0 {
        return;
    }
    let partials: Vec<Vec<f32>> = dinp
        .par_chunks_mut(c * ROW_CHUNK)
        .zip(dout.par_chunks(c * ROW_CHUNK))
        .zip(inp.par_chunks(c * ROW_CHUNK))
        .zip(rstd.par_chunks(ROW_CHUNK))
        .map(|(((dinp, dout), inp), rstd)| {
            let mut dw_part = vec![0.0f32; c];
            let mut norm = vec![0.0f32; c];
            let mut dnorm = vec![0.0f32; c];
            for (((dx, dy), x), &rs) in dinp
                .chunks_exact_mut(c)
                .zip(dout.chunks_exact(c))
                .zip(inp.chunks_exact(c))
                .zip(rstd)
            {
                for i in 0..c {
                    norm[i] = x[i] * rs;
                    dnorm[i] = w[i] * dy[i];
                    dw_part[i] += dy[i] * norm[i];
                }
                // x̂ = x·rstd(x): the gradient through rstd removes the component of dx̂ along x̂.
                let dnorm_norm_mean = dot(&dnorm, &norm) / c as f32;
                for i in 0..c {
                    dx[i] += (dnorm[i] - norm[i] * dnorm_norm_mean) * rs;
                }
            }
            dw_part
        })
        .collect();
    add_partials(dw, &partials);
}

/// Panics with the op's name unless every (N, C) buffer has `n·c` elements and every
/// per-row buffer `n`.
fn check_shapes(op: &str, n: usize, c: usize, nc: &[usize], per_row: &[usize]) {
    for &len in nc {
        assert_eq!(
            len,
            n * c,
            "{op}: an (N, C) buffer has {len} elements, expected {n}·{c}"
        );
    }
    for &len in per_row {
        assert_eq!(
            len, n,
            "{op}: a per-row buffer has {len} elements, expected N = {n}"
        );
    }
}
