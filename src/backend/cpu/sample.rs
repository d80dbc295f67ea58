//! Picking the next token of each row on the CPU ([`DecodeOps::sample_tokens`]): greedy, or drawn
//! at a temperature with optional top-k / top-p truncation. The reference for
//! `kernels/sampling.cu`.
//!
//! With `t` the temperature (1 when greedy), a token's weight is `p_i = exp((z_i - max) / t)` in
//! f32, with [`math::exp`] (which the kernel ports operation for operation). A truncated row
//! keeps a prefix of the tokens ordered by weight, highest first, ties by lower id: top-k keeps
//! `k` of them; top-p then keeps the shortest prefix whose f64 mass first reaches `top_p` times
//! the mass top-k kept, as transformers does. The token is drawn by inverse CDF over the kept
//! tokens **in index order** (not in weight order as before): the same distribution, and the
//! walk a GPU can make without sorting the vocabulary, so that the kernel picks the CPU's token
//! for the same uniform. Untruncated sampling walks every token in index order as it always did
//! (its running sum a block of 16 tokens at a time: the same token but within f64 rounding of a
//! boundary), and greedy takes the first maximum (torch.argmax). The recorded log-prob is
//! `z_id / t - (max / t + ln Σ p_i)`, before truncation.
//!
//! A row's weights are computed once, in one vectorised pass, into a scratch row; the
//! log-sum-exp, the selection and the draw all read them from there.
//!
//! [`DecodeOps::sample_tokens`]: crate::backend::DecodeOps::sample_tokens

use super::math::{self, simd_dispatch};
use crate::backend::SampleParams;
use std::sync::{Mutex, PoisonError};

/// A row's per-token weights, and its ids for the selection top-k and top-p make.
struct Scratch {
    weights: Vec<f32>,
    order: Vec<u32>,
}

/// The only scratch sampling needs, global because the op has no place to keep it (`Cpu` is a
/// unit struct) and the decode loop must not allocate: it only grows, so only the first call
/// with the largest vocabulary seen allocates, whichever thread runs the step (a thread-local
/// would allocate again on each rayon worker that first runs one).
static SCRATCH: Mutex<Scratch> = Mutex::new(Scratch {
    weights: Vec::new(),
    order: Vec::new(),
});

/// [`DecodeOps::sample_tokens`](crate::backend::DecodeOps::sample_tokens): rows one after
/// another, as the RNG drew their uniforms.
pub fn sample_tokens(
    logits: &[f32],
    rows: &[u32],
    v: usize,
    p: SampleParams,
    uniforms: &[f64],
    ids: &mut [u32],
    logps: &mut [f32],
) {
    p.check_args(
        logits.len(),
        rows,
        v,
        uniforms.len(),
        ids.len(),
        logps.len(),
    );
    let mut guard = SCRATCH.lock().unwrap_or_else(PoisonError::into_inner);
    let s = &mut *guard;
    if s.weights.len() < v {
        s.weights.resize(v, 0.0);
        s.order.resize(v, 0);
    }
    let (weights, order) = (&mut s.weights[..v], &mut s.order[..v]);
    let t = if p.is_greedy() { 1.0 } else { p.temperature };
    for (i, &r) in rows.iter().enumerate() {
        let z = &logits[r as usize * v..(r as usize + 1) * v];
        let (max, first_max) = max_first_simd(z);
        let mass = weights_simd(z, max, t, weights);
        let lse = max / t + mass.ln() as f32;
        let id = if p.is_greedy() {
            first_max
        } else {
            draw(weights, mass, p, uniforms[i], order)
        };
        (ids[i], logps[i]) = (id as u32, z[id] / t - lse);
    }
}

simd_dispatch! {
    fn max_first_simd(z: &[f32]) -> (f32, usize) = max_first;
}

simd_dispatch! {
    fn weights_simd(z: &[f32], max: f32, t: f32, weights: &mut [f32]) -> f64 = fill_weights;
}

/// Lanes of the vectorised passes: independent running maxima, or partial sums combined in a
/// fixed order, so that results do not depend on the vector width.
const LANES: usize = 16;

/// The row's maximum and the first index holding it (torch.argmax), in one pass: each lane keeps
/// its first maximum, then the lanes and the tail are merged by value, ties to the lower index.
/// The token is the plain fold's (`if z[i] > z[best]`): NaNs are never greater, so they are
/// skipped, except at index 0, where nothing is greater than one.
#[inline(always)]
fn max_first(z: &[f32]) -> (f32, usize) {
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut at = [u32::MAX; LANES];
    let chunks = z.chunks_exact(LANES);
    let tail_start = z.len() - chunks.remainder().len();
    for (c, x) in chunks.enumerate() {
        for l in 0..LANES {
            let better = x[l] > best[l];
            best[l] = if better { x[l] } else { best[l] };
            at[l] = if better {
                (c * LANES + l) as u32
            } else {
                at[l]
            };
        }
    }
    let lanes = best.into_iter().zip(at.map(|i| i as usize));
    let tail = z[tail_start..].iter().copied().zip(tail_start..);
    lanes.chain(tail).fold((z[0], 0), |(m, id), (x, i)| {
        if x > m || (x == m && i < id) {
            (x, i)
        } else {
            (m, id)
        }
    })
}

/// Writes every token's weight `exp((z_i - max) / t)` to `weights` and returns their sum in f64
/// (lane partial sums; it only feeds the log-sum-exp, never the draw).
#[inline(always)]
fn fill_weights(z: &[f32], max: f32, t: f32, weights: &mut [f32]) -> f64 {
    for (w, &x) in weights.iter_mut().zip(z) {
        *w = math::exp((x - max) / t);
    }
    let mut acc = [0.0f64; LANES];
    let chunks = weights.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&w| w as f64).sum();
    for w in chunks {
        for l in 0..LANES {
            acc[l] += w[l] as f64;
        }
    }
    math::halve_lanes(acc) + tail
}

/// The token drawn with uniform `u` from the row of `weights` (whose f64 sum is `mass`),
/// truncated as `p` asks. `order` is scratch of V ids.
fn draw(weights: &[f32], mass: f64, p: SampleParams, u: f64, order: &mut [u32]) -> usize {
    let v = weights.len();
    if !(0 < p.top_k && p.top_k < v) && p.top_p >= 1.0 {
        return inverse_cdf_all(weights, mass, u);
    }
    let kept = keep(weights, p, order);
    // Index order for the draw (see the module comment).
    kept.sort_unstable();
    inverse_cdf(kept.iter().map(|&i| (i as usize, weights[i as usize])), u)
}

/// The kept tokens of a truncated row: a prefix of `order` once it is sorted by weight (highest
/// first, ties by lower id), in that order. `order` is scratch of V ids.
fn keep<'o>(weights: &[f32], p: SampleParams, order: &'o mut [u32]) -> &'o mut [u32] {
    for (i, o) in order.iter_mut().enumerate() {
        *o = i as u32;
    }
    let by_weight = |a: &u32, b: &u32| {
        weights[*b as usize]
            .total_cmp(&weights[*a as usize])
            .then(a.cmp(b))
    };
    let mut keep = order.len();
    if 0 < p.top_k && p.top_k < keep {
        order.select_nth_unstable_by(p.top_k - 1, by_weight);
        keep = p.top_k;
    }
    if p.top_p < 1.0 {
        let kept = &mut order[..keep];
        kept.sort_unstable_by(by_weight);
        let mass = |ids: &[u32]| ids.iter().map(|&i| weights[i as usize] as f64).sum::<f64>();
        let target = p.top_p as f64 * mass(kept);
        let mut acc = 0.0;
        // transformers keeps tokens until the cumulative mass first reaches top_p.
        keep = 1 + kept
            .iter()
            .position(|&i| {
                acc += weights[i as usize] as f64;
                acc >= target
            })
            .unwrap_or(keep - 1);
    }
    &mut order[..keep]
}

/// [`inverse_cdf`] over every token, with their sum `mass` already known, and the running sum
/// taken a block of [`LANES`] weights at a time: the blocks' sums do not depend on one another,
/// so only one subtraction per block waits on the last, where one per token made the draw as
/// slow as the rest of a small model's decode step. The grouping rounds differently from a
/// token-by-token sum, so the token can change only when `u · mass` lies within f64 rounding
/// of a boundary between tokens, as on the GPU.
fn inverse_cdf_all(weights: &[f32], mass: f64, u: f64) -> usize {
    let mut left = u * mass;
    for (b, block) in weights.chunks(LANES).enumerate() {
        let sum: f64 = block.iter().map(|&w| w as f64).sum();
        if left - sum >= 0.0 {
            left -= sum;
            continue;
        }
        for (i, &w) in block.iter().enumerate() {
            left -= w as f64;
            if left < 0.0 {
                return b * LANES + i;
            }
        }
    }
    weights.len().saturating_sub(1)
}

/// Inverse CDF over the kept `(id, weight)` pairs (ascending ids): the first token at which
/// `u · total` minus the running f64 sum of weights turns negative, else (rounding) the last
/// one. Both sums run in index order, one token after another.
fn inverse_cdf(kept: impl Iterator<Item = (usize, f32)> + Clone, u: f64) -> usize {
    let total: f64 = kept.clone().map(|(_, w)| w as f64).sum();
    let mut left = u * total;
    let mut last = 0;
    for (i, w) in kept {
        left -= w as f64;
        if left < 0.0 {
            return i;
        }
        last = i;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The blocked walk picks the token-by-token walk's token, whenever `u · mass` is not within
    /// 1e-9 (relative) of a boundary between tokens: rows of every length around the block width,
    /// zero weights (underflowed tokens) included, and u at both ends.
    #[test]
    fn blocked_walk_picks_the_sequential_token() {
        let mut rng = Rng::new(11);
        let mut checked = 0;
        for v in 1..=3 * LANES + 5 {
            for _ in 0..200 {
                let w: Vec<f32> = (0..v)
                    .map(|_| {
                        if rng.below(4) == 0 {
                            0.0
                        } else {
                            rng.uniform() as f32
                        }
                    })
                    .collect();
                let mass: f64 = w.iter().map(|&x| x as f64).sum();
                let u = match rng.below(10) {
                    0 => 0.0,
                    1 => 1.0 - 1e-12,
                    _ => rng.uniform(),
                };
                let mut edge = 0.0;
                let near = w.iter().any(|&x| {
                    edge += x as f64;
                    (u * mass - edge).abs() <= 1e-9 * mass
                });
                if near {
                    continue;
                }
                let want = inverse_cdf(w.iter().copied().enumerate(), u);
                assert_eq!(inverse_cdf_all(&w, mass, u), want, "{w:?} u {u}");
                checked += 1;
            }
        }
        assert!(checked > 8000, "only {checked} cases away from a boundary");
    }

    /// Rows of every length up to a few lane widths, of few distinct values (ties in the lanes,
    /// across lanes and in the tail) and NaNs: the vectorised pass takes the plain fold's first
    /// maximum, and the widest copy of each pass gives the baseline's bits.
    #[test]
    fn lanes_give_the_sequential_first_maximum() {
        let mut rng = Rng::new(7);
        for v in 1..=4 * LANES + 3 {
            for _ in 0..20 {
                let z: Vec<f32> = (0..v)
                    .map(|_| match rng.below(8) {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        k => k as f32,
                    })
                    .collect();
                let want = (1..v).fold(0, |best, i| if z[i] > z[best] { i } else { best });
                let (max, id) = max_first_simd(&z);
                assert_eq!(id, want, "{z:?}");
                assert_eq!(max.to_bits(), max_first(&z).0.to_bits());
                let (mut wide, mut base) = (vec![0.0; v], vec![0.0; v]);
                let sum = weights_simd(&z, 3.0, 0.7, &mut wide);
                assert_eq!(
                    sum.to_bits(),
                    fill_weights(&z, 3.0, 0.7, &mut base).to_bits()
                );
                let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&wide), bits(&base));
            }
        }
    }
}
