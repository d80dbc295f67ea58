//! Fused log-softmax + gather over the vocabulary, with optional entropy.
//!
//! A row of logits (`V` up to ~150k) is read in chunks of [`VOCAB_CHUNK`] with an online
//! softmax: a running max `m`, `s = Σ e^(z-m)` and, for the entropy, `t = Σ e^(z-m)·(z-m)`, all
//! rescaled when the max grows. No softmax row is ever stored; a chunk of tempered logits lives
//! on the stack while it is summed. With `z = logits/T`:
//! `lse = m + ln s`, `logp = z[target] - lse`, `H = lse - Σ p·z = ln s - t/s`
//! (the last form, relative to the max, avoids subtracting two numbers of the size of `z`).

use super::math::{self, simd_dispatch};
use super::reduce::{max, sum};
use rayon::prelude::*;

/// Vocabulary entries per chunk: two 8 KiB stack buffers (tempered logits and their
/// exponentials) that stay in L1 between the passes over the chunk.
pub const VOCAB_CHUNK: usize = 2048;

simd_dispatch! {
    fn row_lse_entropy_simd(row: &[f32], temperature: f32, with_entropy: bool) -> (f32, f32) =
        row_lse_entropy;
}

/// The tempered row's log-sum-exp and (if `with_entropy`) its entropy.
/// row: (V) logits.
///
/// Each pass over a chunk is either a plain map (which the compiler vectorises, `math::exp`
/// included) or a lane-wise sum; a map and a sum fused in one loop would not vectorise.
#[inline(always)]
fn row_lse_entropy(row: &[f32], temperature: f32, with_entropy: bool) -> (f32, f32) {
    let mut m = f32::NEG_INFINITY;
    let mut s = 0.0f32;
    let mut t = 0.0f32;
    let mut z_buf = [0.0f32; VOCAB_CHUNK];
    let mut e_buf = [0.0f32; VOCAB_CHUNK];
    for chunk in row.chunks(VOCAB_CHUNK) {
        let z = &mut z_buf[..chunk.len()];
        let e = &mut e_buf[..chunk.len()];
        for (zi, &x) in z.iter_mut().zip(chunk) {
            *zi = x / temperature;
        }
        let chunk_max = max(z);
        if chunk_max == f32::NEG_INFINITY {
            // Every entry is -inf (a masked-out chunk): it adds nothing.
            continue;
        }
        if chunk_max > m {
            if s > 0.0 {
                // Σ e^(z-m')·(z-m') = α·(t + (m-m')·s) and Σ e^(z-m') = α·s, α = e^(m-m').
                let alpha = math::exp(m - chunk_max);
                t = alpha * (t + (m - chunk_max) * s);
                s *= alpha;
            }
            m = chunk_max;
        }
        for (zi, ei) in z.iter_mut().zip(e.iter_mut()) {
            *zi -= m;
            *ei = math::exp(*zi);
        }
        s += sum(e);
        if with_entropy {
            for (ei, &d) in e.iter_mut().zip(z.iter()) {
                // e = 0 where z = -inf, and 0·(-inf) would be NaN.
                *ei = if *ei > 0.0 { *ei * d } else { 0.0 };
            }
            t += sum(e);
        }
    }
    let ln_s = s.ln();
    (m + ln_s, ln_s - t / s)
}

/// `logp[n] = log softmax(logits[n]/T)[targets[n]]`, `lse[n]` the tempered row's log-sum-exp,
/// and, when asked, `entropy[n]` of the tempered distribution.
/// logp: (N), entropy: (N), lse: (N), logits: (N, V), targets: (N) values `< V`.
#[allow(clippy::too_many_arguments)]
pub fn logprobs_forward(
    logp: &mut [f32],
    entropy: Option<&mut [f32]>,
    lse: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    n: usize,
    v: usize,
    temperature: f32,
) {
    check("logprobs_forward", logits.len(), targets, n, v, temperature);
    assert!(
        logp.len() == n && lse.len() == n,
        "logprobs_forward: logp and lse must be N"
    );
    if n == 0 {
        return;
    }
    let with_entropy = entropy.is_some();
    let rows: Vec<(f32, f32)> = logits
        .par_chunks(v)
        .map(|row| row_lse_entropy_simd(row, temperature, with_entropy))
        .collect();
    for (r, &(l, _)) in rows.iter().enumerate() {
        lse[r] = l;
        logp[r] = logits[r * v + targets[r] as usize] / temperature - l;
    }
    if let Some(entropy) = entropy {
        assert_eq!(entropy.len(), n, "logprobs_forward: entropy must be N");
        for (e, &(_, h)) in entropy.iter_mut().zip(&rows) {
            *e = h;
        }
    }
}

/// `dlogits += ∂/∂logits (Σ dlogp·logp + Σ dentropy·entropy)`.
///
/// With `z = logits/T`, `p = softmax(z)`, `c = z - lse = log p`, `H = -Σ p·c`:
/// `∂logp/∂z_k = onehot_k - p_k` and `∂H/∂z_k = -p_k·(c_k + H)`, and `∂z/∂logits = 1/T`.
/// `H` is recomputed from `lse` in a first pass over the row when an entropy gradient is given.
/// dlogits: (N, V), logits: (N, V), targets: (N), lse: (N), dlogp: (N), dentropy: (N).
#[allow(clippy::too_many_arguments)]
pub fn logprobs_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    lse: &[f32],
    dlogp: &[f32],
    dentropy: Option<&[f32]>,
    n: usize,
    v: usize,
    temperature: f32,
) {
    check(
        "logprobs_backward",
        logits.len(),
        targets,
        n,
        v,
        temperature,
    );
    assert_eq!(
        dlogits.len(),
        n * v,
        "logprobs_backward: dlogits is not N·V"
    );
    assert!(
        lse.len() == n && dlogp.len() == n,
        "logprobs_backward: lse and dlogp must be N"
    );
    if let Some(de) = dentropy {
        assert_eq!(de.len(), n, "logprobs_backward: dentropy must be N");
    }
    if n == 0 {
        return;
    }
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .enumerate()
        .for_each(|(r, (dz, x))| {
            let dh = dentropy.map_or(0.0, |d| d[r]);
            row_backward_simd(dz, x, targets[r], lse[r], dlogp[r], dh, temperature)
        });
}

simd_dispatch! {
    fn row_backward_simd(
        dz: &mut [f32],
        x: &[f32],
        target: u32,
        lse: f32,
        dlogp: f32,
        dentropy: f32,
        temperature: f32,
    ) = row_backward;
}

/// [`logprobs_backward`] on one row: dz, x: (V).
#[inline(always)]
fn row_backward(
    dz: &mut [f32],
    x: &[f32],
    target: u32,
    lse: f32,
    dlogp: f32,
    dentropy: f32,
    temperature: f32,
) {
    let inv_t = 1.0 / temperature;
    // H = -Σ p·log p, recomputed from lse in chunks (a map, then a lane-wise sum).
    let h = if dentropy != 0.0 {
        let mut buf = [0.0f32; VOCAB_CHUNK];
        let mut acc = 0.0f32;
        for chunk in x.chunks(VOCAB_CHUNK) {
            let b = &mut buf[..chunk.len()];
            for (bi, &xi) in b.iter_mut().zip(chunk) {
                let c = xi / temperature - lse;
                let p = math::exp(c);
                // p = 0 where a logit is -inf, and 0·(-inf) would be NaN.
                *bi = if p > 0.0 { p * c } else { 0.0 };
            }
            acc += sum(b);
        }
        -acc
    } else {
        0.0
    };
    for (d, &xi) in dz.iter_mut().zip(x) {
        let c = xi / temperature - lse;
        let p = math::exp(c);
        let g = if p > 0.0 {
            p * (dlogp + dentropy * (c + h))
        } else {
            0.0
        };
        *d -= g * inv_t;
    }
    dz[target as usize] += dlogp * inv_t;
}

/// Panics unless the shapes agree, every target is a vocabulary index and T > 0.
fn check(op: &str, logits: usize, targets: &[u32], n: usize, v: usize, temperature: f32) {
    assert_eq!(logits, n * v, "{op}: logits is not N·V");
    assert_eq!(targets.len(), n, "{op}: targets must be N");
    assert!(
        temperature > 0.0 && temperature.is_finite(),
        "{op}: temperature {temperature} must be positive"
    );
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        panic!("{op}: target {bad} is outside the vocabulary of {v}");
    }
}
