//! Picking the next token of each row on the CPU ([`DecodeOps::sample_tokens`]): greedy, or drawn
//! at a temperature with optional top-k / top-p truncation. The reference for
//! `kernels/sampling.cu`.
//!
//! With `t` the temperature (1 when greedy), a token's weight is `p_i = exp((z_i - max) / t)` in
//! f32. A truncated row keeps a prefix of the tokens ordered by weight, highest first, ties by
//! lower id: top-k keeps `k` of them; top-p then keeps the shortest prefix whose f64 mass first
//! reaches `top_p` times the mass top-k kept, as transformers does. The token is drawn by inverse
//! CDF over the kept tokens **in index order** (not in weight order as before): the same
//! distribution, and the walk a GPU can make without sorting the vocabulary, so that the kernel
//! picks the CPU's token for the same uniform. Untruncated sampling walks every token in index
//! order as it always did, and greedy takes the first maximum (torch.argmax): seeded runs keep
//! their tokens.
//!
//! [`DecodeOps::sample_tokens`]: crate::backend::DecodeOps::sample_tokens

use crate::backend::SampleParams;
use std::sync::{Mutex, PoisonError};

/// Per-token weights and ids of one row, for the selection top-k and top-p make.
struct Scratch {
    weights: Vec<f32>,
    order: Vec<u32>,
}

/// The only scratch sampling needs, global because the op has no place to keep it (`Cpu` is a
/// unit struct) and the decode loop must not allocate: it only grows, so only the first row of
/// the largest vocabulary seen allocates, whichever thread runs the step (a thread-local would
/// allocate again on each rayon worker that first runs one). Untruncated rows do not touch it.
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
    for (i, &r) in rows.iter().enumerate() {
        let z = &logits[r as usize * v..(r as usize + 1) * v];
        (ids[i], logps[i]) = if p.is_greedy() {
            greedy(z)
        } else {
            sample(z, p, uniforms[i])
        };
    }
}

/// The tempered row: its maximum and the log-sum-exp the recorded log-prob needs.
struct Tempered<'a> {
    z: &'a [f32],
    t: f32,
    max: f32,
    lse: f32,
}

impl<'a> Tempered<'a> {
    fn new(z: &'a [f32], t: f32) -> Tempered<'a> {
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let sum: f64 = z.iter().map(|&x| (((x - max) / t) as f64).exp()).sum();
        let lse = max / t + sum.ln() as f32;
        Tempered { z, t, max, lse }
    }

    /// Token `i`'s weight, exp((z_i - max) / t) in f32: the kernel computes exactly this.
    fn weight(&self, i: usize) -> f32 {
        ((self.z[i] - self.max) / self.t).exp()
    }

    /// Token `id` with its log-prob at the temperature, before any truncation.
    fn token(&self, id: usize) -> (u32, f32) {
        (id as u32, self.z[id] / self.t - self.lse)
    }
}

/// The first maximum (torch.argmax), its log-prob at temperature 1.
fn greedy(z: &[f32]) -> (u32, f32) {
    let row = Tempered::new(z, 1.0);
    let id = z
        .iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > z[best] { i } else { best });
    row.token(id)
}

/// A token drawn with uniform `u` at the temperature, truncated as `p` asks.
fn sample(z: &[f32], p: SampleParams, u: f64) -> (u32, f32) {
    let row = Tempered::new(z, p.temperature);
    let v = z.len();
    if !(0 < p.top_k && p.top_k < v) && p.top_p >= 1.0 {
        return row.token(inverse_cdf(&row, 0..v, u));
    }
    let mut guard = SCRATCH.lock().unwrap_or_else(PoisonError::into_inner);
    let s = &mut *guard;
    if s.weights.len() < v {
        s.weights.resize(v, 0.0);
        s.order.resize(v, 0);
    }
    let kept = keep(&row, p, &mut s.weights[..v], &mut s.order[..v]);
    // Index order for the draw (see the module comment).
    kept.sort_unstable();
    row.token(inverse_cdf(&row, kept.iter().map(|&i| i as usize), u))
}

/// The kept tokens of a truncated row: a prefix of `order` once it is sorted by weight (highest
/// first, ties by lower id), in that order. `weights` and `order` are scratch of V values.
fn keep<'o>(
    row: &Tempered<'_>,
    p: SampleParams,
    weights: &mut [f32],
    order: &'o mut [u32],
) -> &'o mut [u32] {
    for (i, (w, o)) in weights.iter_mut().zip(order.iter_mut()).enumerate() {
        (*w, *o) = (row.weight(i), i as u32);
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

/// Inverse CDF over `ids` (ascending): the first token at which `u · total` minus the running
/// f64 sum of weights turns negative, else (rounding) the last one.
fn inverse_cdf(row: &Tempered<'_>, ids: impl Iterator<Item = usize> + Clone, u: f64) -> usize {
    let total: f64 = ids.clone().map(|i| row.weight(i) as f64).sum();
    let mut left = u * total;
    let mut last = 0;
    for i in ids {
        left -= row.weight(i) as f64;
        if left < 0.0 {
            return i;
        }
        last = i;
    }
    last
}
