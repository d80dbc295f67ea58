//! Finite-difference checks of every CPU model op's backward, forward checks against naive
//! references, and determinism under different thread counts.
//!
//! Every gradient check uses `L = Σ r·op(x)` with fixed random `r` (so `dout = r`) and starts
//! the gradient buffer at [`PRIOR`] instead of zero, so it also checks that backward adds into
//! its output rather than overwriting it.

mod common;

use common::{check_close, check_grad, weighted_sum, Rng, RngVec, Tol, Worst};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::{AdamW, AttnShape, ModelOps};

const CPU: Cpu = Cpu;

/// What every gradient buffer holds before backward runs: a backward that overwrote instead of
/// adding would be off by this much everywhere.
const PRIOR: f32 = 0.5;

/// Ops linear in the checked input (embedding, matmul, bias, rope, add). Any step is exact for
/// a linear function, so a large one divides the f32 rounding noise of the outputs by more:
/// perturbing one input moves up to ~50 outputs of size up to ~7, each rounded to ~4e-7, so
/// `L` carries ~3e-6 of noise and the derivative ~3e-6/h. With h = 1 the observed worst error is
/// ~1e-5 on gradients of order 1–10: 1e-4 absolute and 1e-4 relative.
const LINEAR: Tol = Tol {
    step: 1.0,
    abs: 1e-4,
    rel: 1e-4,
};

/// Smooth elementwise and row ops (layernorm, rmsnorm, gelu, swiglu) on inputs of order 1. The
/// 4th-order difference with h = 0.03 has truncation error ~h⁴·f⁽⁵⁾ ≈ 1e-6; f32 rounding noise
/// on `L` (~1e-6, a row of outputs changes) divided by h gives ~3e-5. Observed worst errors
/// are below 3e-5; 2e-4 absolute + 1e-3 relative leaves margin and still fails a gradient
/// that is wrong by a few parts in a thousand.
const SMOOTH: Tol = Tol {
    step: 0.03,
    abs: 2e-4,
    rel: 1e-3,
};

/// Attention: perturbing a key or value moves the outputs of every later query in the sequence,
/// so up to T·NH·HD ≈ 2000 outputs carry f32 rounding noise (≈ 5e-6 on `L`, divided by the step
/// 0.03 → ~2e-4). Gradients are of order 0.1–1, so 5e-4 absolute + 2e-3 relative.
const ATTENTION: Tol = Tol {
    step: 0.03,
    abs: 5e-4,
    rel: 2e-3,
};

/// Log-probs: the outputs `logp` and entropy are f32, and their rounding is divided by the step.
/// The test keeps `logp` of order 1, but the entropy of a broad distribution over 2100 tokens is
/// ~7 (ulp 5e-7, a few ulp of error), so `L` carries ~2e-6 of noise: ~1e-5 on the derivative at
/// h = 0.1. A larger step does not help: the logits bend on a scale of T ≈ 1, and at h = 0.4 the
/// 4th-order truncation error is already visible. Gradients of non-target logits are p/T, often
/// below 1e-4, so 3e-5 absolute + 1e-3 relative checks the larger ones;
/// `logprobs_backward_matches_f64_formula` checks every element far more tightly against exact
/// arithmetic.
const LOGPROBS: Tol = Tol {
    step: 0.1,
    abs: 3e-5,
    rel: 1e-3,
};

/// The gradient a backward call adds into a buffer that starts at [`PRIOR`].
fn accumulated(len: usize, backward: impl FnOnce(&mut [f32])) -> Vec<f32> {
    let mut g = vec![PRIOR; len];
    backward(&mut g);
    g.iter().map(|&x| x - PRIOR).collect()
}

/// Unwraps a gradient check, printing how close the worst element came (run with
/// `--nocapture` to see the margins).
fn pass(name: &str, r: Result<Worst, String>) {
    match r {
        Ok(w) => eprintln!(
            "{name}: worst at [{}] is {:.3} of tolerance (numeric {:.6e}, analytic {:.6e})",
            w.index, w.ratio, w.numeric, w.analytic
        ),
        Err(e) => panic!("{name}: {e}"),
    }
}

#[test]
fn embedding_backward_matches_differences() {
    let mut rng = Rng::new(1);
    let (rows, c) = (7, 5);
    let ids = [3u32, 0, 3, 6, 1, 3];
    let n = ids.len();
    let table = rng.vec_normal(rows * c, 1.0);
    let base = rng.vec_normal(n * c, 1.0);
    let r = rng.vec_normal(n * c, 1.0);
    for accumulate in [false, true] {
        let loss = |t: &[f32]| {
            let mut out = base.clone();
            CPU.embedding_forward(&mut out, t, &ids, c, accumulate);
            weighted_sum(&r, &out)
        };
        let g = accumulated(rows * c, |d| CPU.embedding_backward(d, &r, &ids, c));
        pass("embedding", check_grad(loss, &table, &g, LINEAR));
    }
    // accumulate adds onto what is there; without it the rows are overwritten.
    let mut out = base.clone();
    CPU.embedding_forward(&mut out, &table, &ids, c, true);
    assert_eq!(out[0], base[0] + table[3 * c]);
}

#[test]
fn matmul_backward_matches_differences() {
    let mut rng = Rng::new(2);
    // The small shape runs gemm single-threaded, the larger one through rayon.
    for (n, c, oc) in [(5, 7, 6), (40, 48, 40)] {
        let inp = rng.vec_normal(n * c, 1.0);
        let w = rng.vec_normal(oc * c, 1.0);
        let bias = rng.vec_normal(oc, 1.0);
        let r = rng.vec_normal(n * oc, 1.0);
        let fwd = |inp: &[f32], w: &[f32], bias: &[f32]| {
            let mut out = vec![0.0; n * oc];
            CPU.matmul_forward(&mut out, inp, w, Some(bias), n, c, oc);
            weighted_sum(&r, &out)
        };
        let mut dw = vec![PRIOR; oc * c];
        let dinp = accumulated(n * c, |d| {
            CPU.matmul_backward(Some(d), &mut dw, &r, &inp, &w, n, c, oc)
        });
        let dw: Vec<f32> = dw.iter().map(|x| x - PRIOR).collect();
        let dbias = accumulated(oc, |d| CPU.bias_backward(d, &r, n, oc));
        pass(
            "matmul dinp",
            check_grad(|x| fwd(x, &w, &bias), &inp, &dinp, LINEAR),
        );
        pass(
            "matmul dw",
            check_grad(|x| fwd(&inp, x, &bias), &w, &dw, LINEAR),
        );
        pass(
            "matmul dbias",
            check_grad(|x| fwd(&inp, &w, x), &bias, &dbias, LINEAR),
        );
        // Without dinp only dw is produced, and it is the same.
        let dw2 = accumulated(oc * c, |d| {
            CPU.matmul_backward(None, d, &r, &inp, &w, n, c, oc)
        });
        assert_eq!(dw, dw2);
    }
}

#[test]
fn matmul_forward_matches_naive_product() {
    let mut rng = Rng::new(3);
    let (n, c, oc) = (70, 130, 90);
    let inp = rng.vec_normal(n * c, 1.0);
    let w = rng.vec_normal(oc * c, 1.0);
    let mut out = vec![f32::NAN; n * oc];
    CPU.matmul_forward(&mut out, &inp, &w, None, n, c, oc);
    let want: Vec<f64> = (0..n * oc)
        .map(|k| {
            let (i, j) = (k / oc, k % oc);
            (0..c)
                .map(|t| inp[i * c + t] as f64 * w[j * c + t] as f64)
                .sum()
        })
        .collect();
    // A 130-term f32 dot product of unit normals: rounding ~1e-6 absolute.
    check_close("matmul", &out, &want, 1e-5, 1e-5).unwrap();
}

#[test]
fn layernorm_backward_matches_differences() {
    let mut rng = Rng::new(4);
    let (n, c) = (4, 13);
    let inp: Vec<f32> = rng.vec_normal(n * c, 1.0).iter().map(|x| x + 0.5).collect();
    let w = rng.vec_normal(c, 1.0);
    let b = rng.vec_normal(c, 1.0);
    let r = rng.vec_normal(n * c, 1.0);
    let eps = 1e-5;
    let fwd = |inp: &[f32], w: &[f32], b: &[f32]| {
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        CPU.layernorm_forward(&mut out, &mut mean, &mut rstd, inp, w, b, n, c, eps);
        (weighted_sum(&r, &out), mean, rstd)
    };
    let (_, mean, rstd) = fwd(&inp, &w, &b);
    let mut dw = vec![PRIOR; c];
    let dinp = accumulated(n * c, |d| {
        CPU.layernorm_backward(d, &mut dw, &r, &inp, &w, &mean, &rstd, n, c)
    });
    let dw: Vec<f32> = dw.iter().map(|x| x - PRIOR).collect();
    let db = accumulated(c, |d| CPU.bias_backward(d, &r, n, c));
    pass(
        "layernorm dinp",
        check_grad(|x| fwd(x, &w, &b).0, &inp, &dinp, SMOOTH),
    );
    pass(
        "layernorm dw",
        check_grad(|x| fwd(&inp, x, &b).0, &w, &dw, SMOOTH),
    );
    pass(
        "layernorm db",
        check_grad(|x| fwd(&inp, &w, x).0, &b, &db, LINEAR),
    );
}

#[test]
fn layernorm_forward_matches_formula() {
    let mut rng = Rng::new(5);
    let (n, c) = (3, 37);
    let inp = rng.vec_normal(n * c, 2.0);
    let w = rng.vec_normal(c, 1.0);
    let b = rng.vec_normal(c, 1.0);
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    CPU.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, c, 1e-5);
    let mut want = vec![0.0f64; n * c];
    for i in 0..n {
        let x: Vec<f64> = inp[i * c..(i + 1) * c].iter().map(|&v| v as f64).collect();
        let mu = x.iter().sum::<f64>() / c as f64;
        let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / c as f64;
        for j in 0..c {
            want[i * c + j] = (x[j] - mu) / (var + 1e-5).sqrt() * w[j] as f64 + b[j] as f64;
        }
    }
    // f32 sums over 37 elements: ~1e-6 relative.
    check_close("layernorm", &out, &want, 1e-5, 1e-5).unwrap();
}

#[test]
fn rmsnorm_backward_matches_differences() {
    let mut rng = Rng::new(6);
    let (n, c) = (4, 13);
    let inp = rng.vec_normal(n * c, 1.0);
    let w = rng.vec_normal(c, 1.0);
    let r = rng.vec_normal(n * c, 1.0);
    let eps = 1e-6;
    let fwd = |inp: &[f32], w: &[f32]| {
        let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        CPU.rmsnorm_forward(&mut out, &mut rstd, inp, w, n, c, eps);
        (weighted_sum(&r, &out), rstd)
    };
    let (_, rstd) = fwd(&inp, &w);
    let mut dw = vec![PRIOR; c];
    let dinp = accumulated(n * c, |d| {
        CPU.rmsnorm_backward(d, &mut dw, &r, &inp, &w, &rstd, n, c)
    });
    let dw: Vec<f32> = dw.iter().map(|x| x - PRIOR).collect();
    pass(
        "rmsnorm dinp",
        check_grad(|x| fwd(x, &w).0, &inp, &dinp, SMOOTH),
    );
    pass(
        "rmsnorm dw",
        check_grad(|x| fwd(&inp, x).0, &w, &dw, SMOOTH),
    );
}

/// Inputs spanning GELU's interesting range: both tails, the bend, and near zero (where the
/// tanh switches from its series to its exponential form).
fn gelu_inputs(rng: &mut Rng) -> Vec<f32> {
    let mut x = rng.vec_uniform(60, -5.0, 5.0);
    x.extend([0.0, 0.01, -0.01, 0.3, -0.3, 0.33, -0.33, 6.0, -6.0]);
    x
}

#[test]
fn gelu_backward_matches_differences() {
    let mut rng = Rng::new(7);
    let x = gelu_inputs(&mut rng);
    let r = rng.vec_normal(x.len(), 1.0);
    let loss = |x: &[f32]| {
        let mut out = vec![0.0; x.len()];
        CPU.gelu_forward(&mut out, x);
        weighted_sum(&r, &out)
    };
    let g = accumulated(x.len(), |d| CPU.gelu_backward(d, &x, &r));
    pass("gelu", check_grad(loss, &x, &g, SMOOTH));
}

#[test]
fn gelu_forward_matches_formula() {
    let x: Vec<f32> = (-800..=800).map(|i| i as f32 * 0.01).collect();
    let mut out = vec![0.0; x.len()];
    CPU.gelu_forward(&mut out, &x);
    let want: Vec<f64> = x
        .iter()
        .map(|&v| {
            let v = v as f64;
            let k = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())
        })
        .collect();
    // A few ulp of tanh, scaled by |x| ≤ 8.
    check_close("gelu", &out, &want, 1e-6, 1e-6).unwrap();
}

#[test]
fn swiglu_backward_matches_differences() {
    let mut rng = Rng::new(8);
    let (n, i) = (3, 9);
    let inp = rng.vec_normal(n * 2 * i, 2.0);
    let r = rng.vec_normal(n * i, 1.0);
    let loss = |x: &[f32]| {
        let mut out = vec![0.0; n * i];
        CPU.swiglu_forward(&mut out, x, n, i);
        weighted_sum(&r, &out)
    };
    let g = accumulated(n * 2 * i, |d| CPU.swiglu_backward(d, &inp, &r, n, i));
    pass("swiglu", check_grad(loss, &inp, &g, SMOOTH));
    // Forward against the formula: silu(gate)·up.
    let mut out = vec![0.0; n * i];
    CPU.swiglu_forward(&mut out, &inp, n, i);
    let want: Vec<f64> = (0..n * i)
        .map(|k| {
            let (row, j) = (k / i, k % i);
            let g = inp[row * 2 * i + j] as f64;
            let u = inp[row * 2 * i + i + j] as f64;
            g / (1.0 + (-g).exp()) * u
        })
        .collect();
    check_close("swiglu", &out, &want, 1e-6, 1e-5).unwrap();
}

#[test]
fn add_backward_matches_differences() {
    let mut rng = Rng::new(9);
    let a = rng.vec_normal(50, 1.0);
    let b = rng.vec_normal(50, 1.0);
    let r = rng.vec_normal(50, 1.0);
    let fwd = |a: &[f32], b: &[f32]| {
        let mut out = vec![0.0; 50];
        CPU.add(&mut out, a, b);
        weighted_sum(&r, &out)
    };
    // The gradient of a sum w.r.t. either term is dout, accumulated by add_inplace.
    let g = accumulated(50, |d| CPU.add_inplace(d, &r));
    pass("add a", check_grad(|x| fwd(x, &b), &a, &g, LINEAR));
    pass("add b", check_grad(|x| fwd(&a, x), &b, &g, LINEAR));
    let mut x = a.clone();
    CPU.scale(&mut x, -2.0);
    assert!(x.iter().zip(&a).all(|(x, a)| *x == -2.0 * a));
}

/// A small GQA geometry with HD = 8.
fn rope_shape(n_kv_head: usize) -> AttnShape {
    AttnShape {
        b: 1,
        t: 6,
        n_head: 4,
        n_kv_head,
        head_dim: 8,
    }
}

#[test]
fn rope_backward_is_the_transpose() {
    let mut rng = Rng::new(10);
    let s = rope_shape(2);
    let pos = [0u32, 1, 5, 17, 300, 2047];
    let n = pos.len();
    let w = s.qkv_width();
    let qkv = rng.vec_normal(n * w, 1.0);
    let r = rng.vec_normal(n * w, 1.0);
    let theta = 10000.0;
    let loss = |x: &[f32]| {
        let mut y = x.to_vec();
        CPU.rope_forward(&mut y, &pos, s, theta);
        weighted_sum(&r, &y)
    };
    // rope_backward maps dout to dinp in place (a rotation, not an accumulation).
    let mut g = r.clone();
    CPU.rope_backward(&mut g, &pos, s, theta);
    pass("rope", check_grad(loss, &qkv, &g, LINEAR));
    // Backward undoes forward.
    let mut y = qkv.clone();
    CPU.rope_forward(&mut y, &pos, s, theta);
    CPU.rope_backward(&mut y, &pos, s, theta);
    let want: Vec<f64> = qkv.iter().map(|&v| v as f64).collect();
    check_close("rope round trip", &y, &want, 1e-6, 1e-6).unwrap();
}

#[test]
fn rope_forward_matches_direct_formula() {
    let mut rng = Rng::new(11);
    let s = rope_shape(2);
    let (hd, half) = (s.head_dim, s.head_dim / 2);
    let pos = [0u32, 1, 2, 9, 511, 2047];
    let n = pos.len();
    let w = s.qkv_width();
    let qkv = rng.vec_normal(n * w, 1.0);
    let theta = 500_000.0f32;
    let mut y = qkv.clone();
    CPU.rope_forward(&mut y, &pos, s, theta);
    // angle(p, j) in exact arithmetic, and as transformers rounds it (inv_freq and the product
    // in f32).
    let exact = |p: u32, j: usize| p as f64 * (theta as f64).powf(-2.0 * j as f64 / hd as f64);
    let hf = |p: u32, j: usize| {
        let inv = 1.0f32 / (theta as f64).powf((2 * j) as f32 as f64 / hd as f64) as f32;
        (p as f32 * inv) as f64
    };
    let rotate = |angle: &dyn Fn(u32, usize) -> f64| {
        let mut want: Vec<f64> = qkv.iter().map(|&v| v as f64).collect();
        for (row, &p) in pos.iter().enumerate() {
            for head in 0..s.n_head + s.n_kv_head {
                let at = row * w + head * hd;
                for j in 0..half {
                    let (x1, x2) = (qkv[at + j] as f64, qkv[at + j + half] as f64);
                    let (sin, cos) = angle(p, j).sin_cos();
                    want[at + j] = x1 * cos - x2 * sin;
                    want[at + j + half] = x2 * cos + x1 * sin;
                }
            }
        }
        want
    };
    // With HF's f32 angles the only differences are the f32 rotation itself (a few ulp).
    check_close("rope vs HF-rounded angles", &y, &rotate(&hf), 1e-6, 1e-6).unwrap();
    // Against exact angles, the f32 angle at position 2047 is off by up to ~2e-4 rad, so
    // outputs of size ~3 may move by ~6e-4.
    check_close("rope vs exact angles", &y, &rotate(&exact), 1e-3, 0.0).unwrap();
    // v is not rotated.
    for row in 0..n {
        let v = row * w + (s.n_head + s.n_kv_head) * hd;
        assert_eq!(y[v..v + s.n_kv_head * hd], qkv[v..v + s.n_kv_head * hd]);
    }
}

/// B = 2 sequences of `t` tokens, NH = 4 query heads over `n_kv_head` kv heads. Sequence 0 is
/// right-padded (its last 10 keys masked); sequence 1 is left-padded (its first 5 keys masked,
/// so its first 5 queries see no key at all). With `t` = 70 or 150 the last 64-key tile is
/// partial.
fn attention_case(n_kv_head: usize, t: usize, head_dim: usize) -> (AttnShape, Vec<bool>) {
    let s = AttnShape {
        b: 2,
        t,
        n_head: 4,
        n_kv_head,
        head_dim,
    };
    let mut mask = vec![true; 2 * t];
    mask[t - 10..t].fill(false);
    mask[t..t + 5].fill(false);
    (s, mask)
}

/// Full-softmax attention in f64: (out (B·T, NH·HD), lse (B, NH, T), None for no visible key).
fn naive_attention(qkv: &[f32], mask: &[bool], s: AttnShape) -> (Vec<f64>, Vec<Option<f64>>) {
    let (t, hd, nh, kvh) = (s.t, s.head_dim, s.n_head, s.n_kv_head);
    let w = s.qkv_width();
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0.0f64; s.b * t * nh * hd];
    let mut lse = vec![None; s.b * nh * t];
    for b in 0..s.b {
        for h in 0..nh {
            let g = h / (nh / kvh);
            for i in 0..t {
                let q = &qkv[(b * t + i) * w + h * hd..][..hd];
                let keys: Vec<usize> = (0..=i).filter(|&j| mask[b * t + j]).collect();
                if keys.is_empty() {
                    continue;
                }
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let k = &qkv[(b * t + j) * w + (nh + g) * hd..][..hd];
                        scale
                            * q.iter()
                                .zip(k)
                                .map(|(&a, &c)| a as f64 * c as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                lse[(b * nh + h) * t + i] = Some(m + z.ln());
                for (&j, &sc) in keys.iter().zip(&scores) {
                    let p = (sc - m).exp() / z;
                    let v = &qkv[(b * t + j) * w + (nh + kvh + g) * hd..][..hd];
                    for d in 0..hd {
                        out[(b * t + i) * nh * hd + h * hd + d] += p * v[d] as f64;
                    }
                }
            }
        }
    }
    (out, lse)
}

#[test]
fn attention_forward_matches_naive_softmax() {
    let mut rng = Rng::new(12);
    // T = 150: two full tiles and a partial one; every GQA grouping.
    for kvh in [1, 2, 4] {
        let (s, mask) = attention_case(kvh, 150, 16);
        let qkv = rng.vec_normal(s.b * s.t * s.qkv_width(), 1.0);
        let mut out = vec![f32::NAN; s.b * s.t * s.out_width()];
        let mut lse = vec![f32::NAN; s.b * s.n_head * s.t];
        CPU.attention_forward(&mut out, &mut lse, &qkv, &mask, s);
        let (want, want_lse) = naive_attention(&qkv, &mask, s);
        // f32 scores (16-term dot products), a 2-ulp exp and f32 sums over ≤ 150 keys: errors
        // ~1e-6 on outputs of order 1.
        check_close(
            &format!("attention out, KVH={kvh}"),
            &out,
            &want,
            1e-5,
            1e-5,
        )
        .unwrap();
        for (i, (&got, want)) in lse.iter().zip(&want_lse).enumerate() {
            match want {
                Some(w) => assert!((got as f64 - w).abs() < 1e-5 * (1.0 + w.abs()), "lse[{i}]"),
                None => assert_eq!(got, f32::MAX, "lse[{i}] of a query with no key"),
            }
        }
        // The left-padded sequence's first queries see nothing and output exact zeros.
        let row = s.t; // b = 1, i = 0
        assert!(out[row * s.out_width()..(row + 5) * s.out_width()]
            .iter()
            .all(|&x| x == 0.0));
    }
}

#[test]
fn attention_backward_matches_differences() {
    let mut rng = Rng::new(13);
    for kvh in [1, 2, 4] {
        let (s, mask) = attention_case(kvh, 70, 8);
        let qkv = rng.vec_normal(s.b * s.t * s.qkv_width(), 1.0);
        let r = rng.vec_normal(s.b * s.t * s.out_width(), 1.0);
        let fwd = |x: &[f32]| {
            let mut out = vec![0.0; s.b * s.t * s.out_width()];
            let mut lse = vec![0.0; s.b * s.n_head * s.t];
            CPU.attention_forward(&mut out, &mut lse, x, &mask, s);
            (out, lse)
        };
        let (out, lse) = fwd(&qkv);
        let g = accumulated(qkv.len(), |d| {
            CPU.attention_backward(d, &r, &qkv, &out, &lse, &mask, s)
        });
        // Sequence 1's first 5 tokens are padding: their queries see no key and their keys
        // and values are seen by no query, so their rows get exactly no gradient.
        let w = s.qkv_width();
        assert!(g[s.t * w..(s.t + 5) * w].iter().all(|&x| x == 0.0));
        pass(
            &format!("attention KVH={kvh}"),
            check_grad(|x| weighted_sum(&r, &fwd(x).0), &qkv, &g, ATTENTION),
        );
    }
}

/// Naive f64 log-softmax of `row / temperature`: (logp of `target`, entropy, lse).
fn naive_logprob(row: &[f32], target: usize, temperature: f32) -> (f64, f64, f64) {
    let z: Vec<f64> = row.iter().map(|&x| x as f64 / temperature as f64).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    let entropy = -z.iter().map(|x| (x - lse).exp() * (x - lse)).sum::<f64>();
    (z[target] - lse, entropy, lse)
}

/// Logits of `n` rows over `v` entries, with row maxima placed in different vocabulary chunks
/// (the first, a later one, the last) so the online rescaling runs.
fn logits_case(rng: &mut Rng, n: usize, v: usize, std: f32) -> (Vec<f32>, Vec<u32>) {
    let mut logits = rng.vec_normal(n * v, std);
    for r in 0..n {
        let peak = [3, v / 2 + 1, v - 2][r % 3];
        logits[r * v + peak] += 4.0 * std;
    }
    let targets = (0..n).map(|_| rng.below(v) as u32).collect();
    (logits, targets)
}

#[test]
fn logprobs_forward_matches_naive_log_softmax() {
    let mut rng = Rng::new(14);
    let (n, v) = (5, 5000);
    let (logits, targets) = logits_case(&mut rng, n, v, 3.0);
    for temperature in [1.0f32, 0.6, 1.7] {
        let (mut logp, mut ent, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        CPU.logprobs_forward(
            &mut logp,
            Some(&mut ent),
            &mut lse,
            &logits,
            &targets,
            n,
            v,
            temperature,
        );
        let want: Vec<(f64, f64, f64)> = (0..n)
            .map(|r| {
                naive_logprob(
                    &logits[r * v..(r + 1) * v],
                    targets[r] as usize,
                    temperature,
                )
            })
            .collect();
        // f32 sums of 5000 terms and lse of order 10–30: ~1e-6 relative.
        let tol = (1e-5, 1e-5);
        let w: Vec<f64> = want.iter().map(|x| x.0).collect();
        check_close("logp", &logp, &w, tol.0, tol.1).unwrap();
        let w: Vec<f64> = want.iter().map(|x| x.1).collect();
        check_close("entropy", &ent, &w, tol.0, tol.1).unwrap();
        let w: Vec<f64> = want.iter().map(|x| x.2).collect();
        check_close("lse", &lse, &w, tol.0, tol.1).unwrap();
        // Without entropy, the same logp and lse.
        let (mut logp2, mut lse2) = (vec![0.0; n], vec![0.0; n]);
        CPU.logprobs_forward(
            &mut logp2,
            None,
            &mut lse2,
            &logits,
            &targets,
            n,
            v,
            temperature,
        );
        assert_eq!((logp2, lse2), (logp, lse));
    }
}

#[test]
fn logprobs_backward_matches_differences() {
    let mut rng = Rng::new(15);
    // V = 2100: one full 2048 chunk and a short one.
    let (n, v) = (3, 2100);
    let (raw, _) = logits_case(&mut rng, n, v, 1.0);
    let dlogp = rng.vec_normal(n, 1.0);
    let dent = rng.vec_normal(n, 1.0);
    for (temperature, with_entropy) in [(0.7f32, true), (1.0, false), (1.3, true)] {
        // The outputs are f32 and their rounding, divided by the step, is the noise floor of the
        // difference (see LOGPROBS). Shifting each row so that lse = 0 and taking the most
        // likely token as the target keeps logp and the entropy of order 1 (not ~10), which
        // keeps that rounding near 1e-7.
        let mut logits = raw.clone();
        let mut targets = vec![0u32; n];
        for r in 0..n {
            let row = &mut logits[r * v..(r + 1) * v];
            let (_, _, lse) = naive_logprob(row, 0, temperature);
            for x in row.iter_mut() {
                *x -= (temperature as f64 * lse) as f32;
            }
            targets[r] = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
        }
        let fwd = |x: &[f32]| {
            let (mut logp, mut ent, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            CPU.logprobs_forward(
                &mut logp,
                Some(&mut ent),
                &mut lse,
                x,
                &targets,
                n,
                v,
                temperature,
            );
            let l = weighted_sum(&dlogp, &logp);
            (
                if with_entropy {
                    l + weighted_sum(&dent, &ent)
                } else {
                    l
                },
                lse,
            )
        };
        let (_, lse) = fwd(&logits);
        let de = with_entropy.then_some(dent.as_slice());
        let g = accumulated(n * v, |d| {
            CPU.logprobs_backward(d, &logits, &targets, &lse, &dlogp, de, n, v, temperature)
        });
        pass(
            &format!("logprobs T={temperature} entropy={with_entropy}"),
            check_grad(|x| fwd(x).0, &logits, &g, LOGPROBS),
        );
    }
}

#[test]
fn logprobs_backward_matches_f64_formula() {
    let mut rng = Rng::new(20);
    let (n, v) = (4, 5000);
    let (logits, targets) = logits_case(&mut rng, n, v, 3.0);
    let dlogp = rng.vec_normal(n, 1.0);
    let dent = rng.vec_normal(n, 1.0);
    for temperature in [0.7f32, 1.0, 1.3] {
        let (mut logp, mut ent, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        CPU.logprobs_forward(
            &mut logp,
            Some(&mut ent),
            &mut lse,
            &logits,
            &targets,
            n,
            v,
            temperature,
        );
        let mut g = vec![0.0; n * v];
        CPU.logprobs_backward(
            &mut g,
            &logits,
            &targets,
            &lse,
            &dlogp,
            Some(&dent),
            n,
            v,
            temperature,
        );
        // d/dz_k (a·logp + b·H) = a·(onehot_k - p_k) - b·p_k·(log p_k + H), and dz/dlogits = 1/T.
        let mut want = vec![0.0f64; n * v];
        for r in 0..n {
            let row = &logits[r * v..(r + 1) * v];
            let (_, h, l) = naive_logprob(row, targets[r] as usize, temperature);
            let (a, b) = (dlogp[r] as f64, dent[r] as f64);
            for k in 0..v {
                let c = row[k] as f64 / temperature as f64 - l;
                let p = c.exp();
                let onehot = if k == targets[r] as usize { 1.0 } else { 0.0 };
                want[r * v + k] = (a * (onehot - p) - b * p * (c + h)) / temperature as f64;
            }
        }
        // Probabilities to ~1e-6 relative (f32 lse of size ~20, ulp 2e-6); gradients of order 1
        // at most.
        check_close(&format!("dlogits T={temperature}"), &g, &want, 1e-7, 1e-4).unwrap();
    }
}

/// A copy of the GELU derivative with one sign flipped (`1 - 3·0.044715·x²` for `1 + …`): the
/// kind of slip a gradient check exists to catch.
fn gelu_grad_wrong(x: f32) -> f32 {
    let k = (2.0f32 / std::f32::consts::PI).sqrt();
    let u = k * (x + 0.044715 * x * x * x);
    let th = u.tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 - 3.0 * 0.044715 * x * x)
}

#[test]
fn gradient_check_catches_wrong_backward() {
    let mut rng = Rng::new(16);
    let x = gelu_inputs(&mut rng);
    let r = rng.vec_normal(x.len(), 1.0);
    let loss = |x: &[f32]| {
        let mut out = vec![0.0; x.len()];
        CPU.gelu_forward(&mut out, x);
        weighted_sum(&r, &out)
    };
    let wrong: Vec<f32> = x
        .iter()
        .zip(&r)
        .map(|(&x, &r)| gelu_grad_wrong(x) * r)
        .collect();
    let err = check_grad(loss, &x, &wrong, SMOOTH).expect_err("a wrong GELU backward passed");
    assert!(err.contains("out of tolerance"), "{err}");

    // One element of a correct matmul gradient off by 0.5% is caught, and named.
    let (n, c, oc) = (4, 6, 5);
    let inp = rng.vec_normal(n * c, 1.0);
    let w = rng.vec_normal(oc * c, 1.0);
    let r = rng.vec_normal(n * oc, 1.0);
    let loss = |x: &[f32]| {
        let mut out = vec![0.0; n * oc];
        CPU.matmul_forward(&mut out, x, &w, None, n, c, oc);
        weighted_sum(&r, &out)
    };
    let mut dw = vec![0.0; oc * c];
    let mut g = vec![0.0; n * c];
    CPU.matmul_backward(Some(&mut g), &mut dw, &r, &inp, &w, n, c, oc);
    check_grad(loss, &inp, &g, LINEAR).unwrap();
    let bad = 7;
    g[bad] *= 1.005;
    let err = check_grad(loss, &inp, &g, LINEAR).expect_err("a perturbed gradient passed");
    assert!(
        err.starts_with("1 of 24") && err.contains(&format!("[{bad}]")),
        "{err}"
    );
}

#[test]
fn adamw_matches_hand_computed_steps() {
    // One step worked by hand: p = 1, g = 0.5, m = v = 0, lr = 0.1, wd = 0.01, t = 1.
    // decay: 1·(1 - 0.1·0.01) = 0.999; m = 0.05, v = 0.00025; m̂ = 0.5, v̂ = 0.25;
    // p = 0.999 - 0.1·0.5/(0.5 + 1e-8) = 0.899000002.
    let h = AdamW {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
    };
    let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
    CPU.adamw(&mut p, &[0.5], &mut m, &mut v, h);
    assert!((p[0] - 0.899).abs() < 1e-6, "p = {}", p[0]);
    // β1 = 0.9 and β2 = 0.999 are not exact in f32: 1 - β1 is 0.10000002 (2.4e-7 off relative)
    // and 1 - β2 is 0.00099998713 (1.3e-5 off), and m and v inherit those errors.
    assert!((m[0] - 0.05).abs() < 0.05 * 3e-7, "m = {}", m[0]);
    assert!((v[0] - 0.00025).abs() < 0.00025 * 2e-5, "v = {}", v[0]);

    // Three steps on random data against the formula in f64.
    let mut rng = Rng::new(17);
    let len = 1000;
    let mut p = rng.vec_normal(len, 1.0);
    let (mut m, mut v) = (vec![0.0f32; len], vec![0.0f32; len]);
    let mut want: Vec<(f64, f64, f64)> = p.iter().map(|&x| (x as f64, 0.0, 0.0)).collect();
    for step in 1..=3u64 {
        let g = rng.vec_normal(len, 0.1);
        let h = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        };
        CPU.adamw(&mut p, &g, &mut m, &mut v, h);
        let (lr, b1, b2) = (h.lr as f64, h.beta1 as f64, h.beta2 as f64);
        for (w, &gi) in want.iter_mut().zip(&g) {
            let gi = gi as f64;
            let (mut pi, mut mi, mut vi) = *w;
            pi -= lr * h.weight_decay as f64 * pi;
            mi = b1 * mi + (1.0 - b1) * gi;
            vi = b2 * vi + (1.0 - b2) * gi * gi;
            let mhat = mi / (1.0 - b1.powi(step as i32));
            let vhat = vi / (1.0 - b2.powi(step as i32));
            pi -= lr * mhat / (vhat.sqrt() + h.eps as f64);
            *w = (pi, mi, vi);
        }
    }
    // f32 rounding of parameters of order 1: a few 1e-7.
    let wp: Vec<f64> = want.iter().map(|w| w.0).collect();
    check_close("adamw params", &p, &wp, 1e-6, 1e-6).unwrap();
    let wm: Vec<f64> = want.iter().map(|w| w.1).collect();
    check_close("adamw m", &m, &wm, 1e-9, 1e-5).unwrap();
    let wv: Vec<f64> = want.iter().map(|w| w.2).collect();
    check_close("adamw v", &v, &wv, 1e-12, 1e-5).unwrap();
}

#[test]
fn sum_squares_matches_f64_sum() {
    let mut rng = Rng::new(18);
    let x = rng.vec_normal(100_003, 1.0);
    let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let got = CPU.sum_squares(&x);
    // Both sum in f64; only the order differs.
    assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
}

/// Runs `f` on a rayon pool of `threads` threads.
fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// Runs `f` on 1, 2 and 5 threads (and twice on 2) and asserts every result has the same bits.
fn assert_deterministic(what: &str, f: impl Fn() -> Vec<f32> + Sync) {
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
    let first = bits(on_threads(1, &f));
    for threads in [2, 2, 5] {
        assert!(
            bits(on_threads(threads, &f)) == first,
            "{what}: result differs on {threads} threads"
        );
    }
}

#[test]
fn reductions_are_deterministic_across_thread_counts() {
    let mut rng = Rng::new(19);
    let (n, oc) = (10_000, 37);
    let dout = rng.vec_normal(n * oc, 1.0);
    assert_deterministic("bias_backward", || {
        let mut d = vec![0.0; oc];
        CPU.bias_backward(&mut d, &dout, n, oc);
        d
    });

    let (n, c) = (3000, 64);
    let inp = rng.vec_normal(n * c, 1.0);
    let w = rng.vec_normal(c, 1.0);
    let b = rng.vec_normal(c, 1.0);
    let dout = rng.vec_normal(n * c, 1.0);
    assert_deterministic("layernorm", || {
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        CPU.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, n, c, 1e-5);
        let (mut dinp, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
        CPU.layernorm_backward(&mut dinp, &mut dw, &dout, &inp, &w, &mean, &rstd, n, c);
        [out, dinp, dw].concat()
    });
    assert_deterministic("rmsnorm", || {
        let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        CPU.rmsnorm_forward(&mut out, &mut rstd, &inp, &w, n, c, 1e-6);
        let (mut dinp, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
        CPU.rmsnorm_backward(&mut dinp, &mut dw, &dout, &inp, &w, &rstd, n, c);
        [out, dinp, dw].concat()
    });

    let rows = 3000;
    let ids: Vec<u32> = (0..n).map(|_| rng.below(rows) as u32).collect();
    assert_deterministic("embedding_backward", || {
        let mut d = vec![0.0; rows * c];
        CPU.embedding_backward(&mut d, &dout, &ids, c);
        d
    });

    let x = rng.vec_normal(1_000_003, 1.0);
    assert_deterministic("sum_squares", || {
        let s = CPU.sum_squares(&x);
        vec![s as f32, (s - s as f32 as f64) as f32]
    });

    let (n, c, oc) = (200, 96, 300);
    let inp = rng.vec_normal(n * c, 1.0);
    let w = rng.vec_normal(oc * c, 1.0);
    let dout = rng.vec_normal(n * oc, 1.0);
    assert_deterministic("matmul", || {
        let mut out = vec![0.0; n * oc];
        CPU.matmul_forward(&mut out, &inp, &w, None, n, c, oc);
        let (mut dinp, mut dw) = (vec![0.0; n * c], vec![0.0; oc * c]);
        CPU.matmul_backward(Some(&mut dinp), &mut dw, &dout, &inp, &w, n, c, oc);
        [out, dinp, dw].concat()
    });

    let (s, mask) = attention_case(2, 130, 16);
    let qkv = rng.vec_normal(s.b * s.t * s.qkv_width(), 1.0);
    let dout = rng.vec_normal(s.b * s.t * s.out_width(), 1.0);
    assert_deterministic("attention", || {
        let mut out = vec![0.0; s.b * s.t * s.out_width()];
        let mut lse = vec![0.0; s.b * s.n_head * s.t];
        CPU.attention_forward(&mut out, &mut lse, &qkv, &mask, s);
        let mut dqkv = vec![0.0; qkv.len()];
        CPU.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &mask, s);
        [out, lse, dqkv].concat()
    });

    let (n, v) = (6, 5000);
    let (logits, targets) = logits_case(&mut rng, n, v, 3.0);
    let dlogp = rng.vec_normal(n, 1.0);
    let dent = rng.vec_normal(n, 1.0);
    assert_deterministic("logprobs", || {
        let (mut logp, mut ent, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        CPU.logprobs_forward(
            &mut logp,
            Some(&mut ent),
            &mut lse,
            &logits,
            &targets,
            n,
            v,
            0.8,
        );
        let mut d = vec![0.0; n * v];
        CPU.logprobs_backward(
            &mut d,
            &logits,
            &targets,
            &lse,
            &dlogp,
            Some(&dent),
            n,
            v,
            0.8,
        );
        [logp, ent, lse, d].concat()
    });
}
