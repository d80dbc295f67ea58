//! Rotary position embedding, Hugging Face's rotate-half layout.
//!
//! For each q and k head, dimension `j < HD/2` is paired with `j + HD/2` and the pair is rotated
//! by `pos · inv_freq[j]`, `inv_freq[j] = theta^(-2j/HD)`. The frequencies and angles are
//! rounded to f32 exactly where transformers rounds them (`inv_freq` in f32, the angle as an f32
//! product), then cos and sin are taken in f64, so the result matches HF's f32 tables to within
//! the last bit of `cos`/`sin`.

use super::reduce::ROW_CHUNK;
use crate::backend::AttnShape;
use rayon::prelude::*;

/// Largest `HD/2` supported: the per-row tables live on the stack, because the decode loop
/// calls RoPE every step and must not allocate.
const MAX_HALF: usize = 256;

/// `inv_freq[j] = 1 / theta^(2j/HD)` for `j < HD/2`, rounded as transformers computes it
/// (`1.0 / base ** (arange(0, dim, 2).float() / dim)` in f32).
fn inv_freq(head_dim: usize, theta: f32) -> [f32; MAX_HALF] {
    let mut f = [0.0f32; MAX_HALF];
    for (j, x) in f.iter_mut().take(head_dim / 2).enumerate() {
        let e = (2 * j) as f32 / head_dim as f32;
        *x = 1.0 / (theta as f64).powf(e as f64) as f32;
    }
    f
}

/// Rotates the q and k heads of every row by its position: forward when `sign = 1`, the inverse
/// (the transpose) when `sign = -1`.
/// qkv: (N, qkv_width), pos: (N).
fn rope_rotate(qkv: &mut [f32], pos: &[u32], s: AttnShape, theta: f32, sign: f32) {
    let w = s.qkv_width();
    let hd = s.head_dim;
    assert_eq!(
        qkv.len(),
        pos.len() * w,
        "rope: qkv is not N·qkv_width with N = pos.len()"
    );
    assert!(hd.is_multiple_of(2), "rope: head_dim {hd} must be even");
    assert!(
        hd / 2 <= MAX_HALF,
        "rope: head_dim {hd} above {}",
        2 * MAX_HALF
    );
    if pos.is_empty() || hd == 0 {
        return;
    }
    let half = hd / 2;
    let freq = inv_freq(hd, theta);
    let angles = |p: u32, cos: &mut [f32], sin: &mut [f32]| {
        for j in 0..half {
            let angle = p as f32 * freq[j];
            cos[j] = (angle as f64).cos() as f32;
            sin[j] = sign * (angle as f64).sin() as f32;
        }
    };
    // A training batch repeats each position once per sequence: a table of the distinct ones
    // takes the f64 cos and sin (a few percent of a small model's step) once each. A decode step
    // has one row per sequence and must not allocate: it computes them per row, again only when
    // the position changes from the row before.
    let rows = pos.len();
    let distinct = *pos.iter().max().unwrap_or(&0) as usize + 1;
    let table = (2 * distinct <= rows).then(|| {
        let (mut cos, mut sin) = (vec![0.0f32; distinct * half], vec![0.0f32; distinct * half]);
        for (p, (c, s)) in cos
            .chunks_exact_mut(half)
            .zip(sin.chunks_exact_mut(half))
            .enumerate()
        {
            angles(p as u32, c, s);
        }
        (cos, sin)
    });
    // Only the q heads and the k heads rotate; v follows them in the row and is left alone.
    let rotated_heads = s.n_head + s.n_kv_head;
    qkv.par_chunks_mut(w * ROW_CHUNK)
        .zip(pos.par_chunks(ROW_CHUNK))
        .for_each(|(rows, pos)| {
            let (mut cos_row, mut sin_row) = ([0.0f32; MAX_HALF], [0.0f32; MAX_HALF]);
            // The position `cos_row` holds: the rows of a decode step often share one.
            let mut row_pos = None;
            for (row, &p) in rows.chunks_exact_mut(w).zip(pos) {
                let (cos, sin) = match &table {
                    Some((c, s)) => {
                        let at = p as usize * half..(p as usize + 1) * half;
                        (&c[at.clone()], &s[at])
                    }
                    None => {
                        if row_pos != Some(p) {
                            angles(p, &mut cos_row, &mut sin_row);
                            row_pos = Some(p);
                        }
                        (&cos_row[..half], &sin_row[..half])
                    }
                };
                for head in row[..rotated_heads * hd].chunks_exact_mut(hd) {
                    let (x1, x2) = head.split_at_mut(half);
                    for j in 0..half {
                        let (a, b) = (x1[j], x2[j]);
                        x1[j] = a * cos[j] - b * sin[j];
                        x2[j] = b * cos[j] + a * sin[j];
                    }
                }
            }
        });
}

/// RoPE in place on the q and k heads of `qkv`: `x1' = x1·cos - x2·sin`, `x2' = x2·cos + x1·sin`
/// for the pairs `(x[j], x[j + HD/2])`.
/// qkv: (N, qkv_width), pos: (N) position ids.
pub fn rope_forward(qkv: &mut [f32], pos: &[u32], s: AttnShape, theta: f32) {
    rope_rotate(qkv, pos, s, theta, 1.0);
}

/// The transpose of [`rope_forward`], in place on a gradient: a rotation's transpose is the
/// rotation by the opposite angle.
/// dqkv: (N, qkv_width), pos: (N).
pub fn rope_backward(dqkv: &mut [f32], pos: &[u32], s: AttnShape, theta: f32) {
    rope_rotate(dqkv, pos, s, theta, -1.0);
}
