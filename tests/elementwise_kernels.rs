//! The element-wise kernels (`kernels/{elementwise,embedding,rope,optim}.cu`) through their
//! drivers (`rlhf::backend::emu::elementwise`) on the emulated backend, against the CPU reference
//! (DESIGN.md principle 3): embedding forward and backward, GELU, SwiGLU, RoPE, add, add_inplace,
//! scale, sum of squares, AdamW and the KV-cache store.
//!
//! Shapes are odd so that every bound runs: one row or one element, widths below, at and above
//! the 256-thread block (1, 37, 256, 300), grouped-query heads (NH ≠ KVH) for RoPE and the cache,
//! and head dims whose half is odd. Gradients and accumulators start from random values, since the
//! ops add to them (`+=`), and the embedding's ids repeat (and leave rows untouched).
//!
//! Tolerances, and why (`|got - want| <= TOL·scale + TOL·|want|`, `scale` the largest magnitude
//! of the tensor compared, at least 1):
//! - exact (bits): lookups, copies and single additions or products (embedding forward, add,
//!   add_inplace, scale, the cache store) round once, identically on both sides; the embedding
//!   backward adds each row's contributions in the CPU's order, so it too is exact.
//! - [`TOL`] = 1e-6 elsewhere: the kernels evaluate the CPU's expressions in the same f32 order,
//!   but GELU and SwiGLU take `tanhf`/`expf` where the CPU has its own polynomials (both within a
//!   few ulp), and on a device FMA contraction saves a rounding here and there. RoPE's angles are
//!   the same f32 bits on both sides and only cos/sin may round differently. These comparisons
//!   all pass at 1e-7; a wrong index, a missed term or a wrong sign is off by 1e-2 or more.
//!   GELU's backward is the exception, with its own [`GELU_BWD_TOL`] (see there).
//! - sum of squares: all terms are positive, so any order of f64 additions is within `(n-1)·2^-53`
//!   relative of the exact sum; the two sides differ by at most twice that, `n·f64::EPSILON`.
//!
//! The reductions (sum of squares, embedding backward) must give the same bits for every thread
//! order the emulator draws (`Emu::with_seed`): they use no atomics.

mod common;

use common::{check_close, Rng, RngVec};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::emu::elementwise as ew;
use rlhf::backend::emu::Emu;
use rlhf::backend::{AdamW, AttnShape, DecodeOps, ModelOps};

const TOL: f64 = 1e-6;

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Closeness against the reference with the tensor's scale as the absolute part.
fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let scale = want.iter().fold(1.0f64, |m, &v| m.max((v as f64).abs()));
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    check_close(what, got, &want, tol * scale, tol).unwrap_or_else(|e| panic!("{e}"));
}

/// The same bits as the reference.
fn exact(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(bits(got), bits(want), "{what}: not the reference's bits");
}

fn ok<T>(r: Result<T, rlhf::backend::emu::KernelError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// (N, C, table rows) of the embedding tests.
const EMBED_SHAPES: &[(usize, usize, usize)] = &[
    (1, 37, 5),
    (7, 1, 3),
    (13, 300, 11),
    (40, 256, 6),
    (64, 37, 200),
];

/// `n` ids below `rows`, repeating: drawn from the lower half of the table only when it has more
/// than a few rows, so that some rows receive nothing.
fn ids(rng: &mut Rng, n: usize, rows: usize) -> Vec<u32> {
    let range = if rows > 4 { rows / 2 } else { rows };
    (0..n).map(|_| rng.below(range) as u32).collect()
}

#[test]
fn embedding_forward_matches_cpu() {
    for (k, &(n, c, rows)) in EMBED_SHAPES.iter().enumerate() {
        let mut rng = Rng::new(10 + k as u64);
        let table = rng.vec_normal(rows * c, 1.0);
        let ids = ids(&mut rng, n, rows);
        let out0 = rng.vec_normal(n * c, 1.0);
        for accumulate in [false, true] {
            let what = format!("embedding_forward N={n} C={c} accumulate={accumulate}");
            let mut want = out0.clone();
            Cpu.embedding_forward(&mut want, &table, &ids, c, accumulate);
            let mut got = out0.clone();
            ok(ew::embedding_forward(
                &Emu::default(),
                &mut got,
                &table,
                &ids,
                c,
                accumulate,
            ));
            exact(&what, &got, &want);
        }
    }
}

#[test]
fn embedding_backward_is_the_cpu_bits_for_every_thread_order() {
    for (k, &(n, c, rows)) in EMBED_SHAPES.iter().enumerate() {
        let mut rng = Rng::new(20 + k as u64);
        let dout = rng.vec_normal(n * c, 1.0);
        let ids = ids(&mut rng, n, rows);
        let dtable0 = rng.vec_normal(rows * c, 1.0);
        let what = format!("embedding_backward N={n} C={c} rows={rows}");
        let mut want = dtable0.clone();
        Cpu.embedding_backward(&mut want, &dout, &ids, c);
        for seed in [1, 2, 3] {
            let mut got = dtable0.clone();
            ok(ew::embedding_backward(
                &Emu::with_seed(seed),
                &mut got,
                &dout,
                &ids,
                c,
            ));
            exact(&format!("{what} seed {seed}"), &got, &want);
        }
    }
}

#[test]
#[should_panic(expected = "embedding_forward: id 4 is outside the table of 4 rows")]
fn embedding_forward_rejects_an_id_outside_the_table() {
    let (table, mut out) = (vec![0.0; 4 * 3], vec![0.0; 2 * 3]);
    let _ = ew::embedding_forward(&Emu::default(), &mut out, &table, &[1, 4], 3, false);
}

#[test]
#[should_panic(expected = "embedding_backward: id 7 is outside the table of 4 rows")]
fn embedding_backward_rejects_an_id_outside_the_table() {
    let (mut dtable, dout) = (vec![0.0; 4 * 3], vec![0.0; 2 * 3]);
    let _ = ew::embedding_backward(&Emu::default(), &mut dtable, &dout, &[7, 0], 3);
}

/// Element counts of the flat ops: one, below, at and just above a block, several blocks.
const FLAT_SIZES: &[usize] = &[1, 37, 256, 257, 3001];

/// Activation inputs: N(0, 3²), with zero and the tails of GELU and the sigmoid among them.
fn activations(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut x = rng.vec_normal(n, 3.0);
    for (slot, v) in x.iter_mut().zip([0.0, -12.0, 12.0, 0.1, -0.2]) {
        *slot = v;
    }
    x
}

/// GELU's derivative holds `1 - tanh²(u)`, which turns the few ulp of 1 between the CPU's tanh
/// polynomial and `tanhf` where |tanh| nears 1 into an absolute error of up to 1.1e-6·|dout|
/// (the worst over a sweep of x in [-12, 12] with step 1e-4, at x ≈ -5.2, where the CPU's tanh is
/// exactly -1 and `tanhf` is not); 1e-5 leaves a ninefold margin.
const GELU_BWD_TOL: f64 = 1e-5;

#[test]
fn gelu_matches_cpu() {
    // Random inputs of every flat size, then a sweep of [-12, 12] by 1e-3: both tails, the
    // switch of the CPU's tanh from its series to its exp form, and everything between.
    let sweep: Vec<f32> = (0..=24_000).map(|i| -12.0 + i as f32 * 1e-3).collect();
    let mut inputs: Vec<Vec<f32>> = FLAT_SIZES
        .iter()
        .enumerate()
        .map(|(k, &n)| activations(&mut Rng::new(30 + k as u64), n))
        .collect();
    inputs.push(sweep);
    for (k, x) in inputs.iter().enumerate() {
        let n = x.len();
        let mut rng = Rng::new(35 + k as u64);
        let (dout, dinp0) = (rng.vec_normal(n, 1.0), rng.vec_normal(n, 1.0));
        let mut want = vec![0.0; n];
        Cpu.gelu_forward(&mut want, x);
        let mut got = vec![f32::NAN; n];
        ok(ew::gelu_forward(&Emu::default(), &mut got, x));
        close(&format!("gelu_forward n={n}"), &got, &want, TOL);

        let mut want = dinp0.clone();
        Cpu.gelu_backward(&mut want, x, &dout);
        let mut got = dinp0;
        ok(ew::gelu_backward(&Emu::default(), &mut got, x, &dout));
        close(&format!("gelu_backward n={n}"), &got, &want, GELU_BWD_TOL);
    }
}

#[test]
fn swiglu_matches_cpu() {
    for (k, &(n, i)) in [(1, 1), (1, 300), (5, 37), (33, 257)].iter().enumerate() {
        let mut rng = Rng::new(40 + k as u64);
        let (inp, dout, dinp0) = (
            activations(&mut rng, n * 2 * i),
            rng.vec_normal(n * i, 1.0),
            rng.vec_normal(n * 2 * i, 1.0),
        );
        let mut want = vec![0.0; n * i];
        Cpu.swiglu_forward(&mut want, &inp, n, i);
        let mut got = vec![f32::NAN; n * i];
        ok(ew::swiglu_forward(&Emu::default(), &mut got, &inp, n, i));
        close(&format!("swiglu_forward N={n} I={i}"), &got, &want, TOL);

        let mut want = dinp0.clone();
        Cpu.swiglu_backward(&mut want, &inp, &dout, n, i);
        let mut got = dinp0.clone();
        ok(ew::swiglu_backward(
            &Emu::default(),
            &mut got,
            &inp,
            &dout,
            n,
            i,
        ));
        close(&format!("swiglu_backward N={n} I={i}"), &got, &want, TOL);
    }
}

fn shape(b: usize, t: usize, n_head: usize, n_kv_head: usize, head_dim: usize) -> AttnShape {
    AttnShape {
        b,
        t,
        n_head,
        n_kv_head,
        head_dim,
    }
}

#[test]
fn rope_matches_cpu_and_leaves_v_alone() {
    let cases = [
        (shape(1, 1, 1, 1, 2), 10_000.0),
        (shape(2, 3, 4, 2, 10), 10_000.0),
        (shape(1, 5, 3, 1, 64), 1e6),
        (shape(2, 2, 2, 2, 512), 500_000.0),
    ];
    for (k, &(s, theta)) in cases.iter().enumerate() {
        let mut rng = Rng::new(50 + k as u64);
        let n = s.b * s.t;
        let w = s.qkv_width();
        let x = rng.vec_normal(n * w, 1.0);
        // Left-padded style positions, and large ones, where the angle is many turns.
        let pos: Vec<u32> = (0..n).map(|r| (r as u32 * 977) % 5000).collect();
        let what = format!("rope {s:?} theta={theta}");

        let mut want = x.clone();
        Cpu.rope_forward(&mut want, &pos, s, theta);
        let mut got = x.clone();
        ok(ew::rope_forward(&Emu::default(), &mut got, &pos, s, theta));
        close(&format!("{what} forward"), &got, &want, TOL);
        let v = (s.n_head + s.n_kv_head) * s.head_dim;
        for r in 0..n {
            let row = r * w;
            exact(
                &format!("{what} v of row {r}"),
                &got[row + v..row + w],
                &x[row + v..row + w],
            );
        }

        let mut want = x.clone();
        Cpu.rope_backward(&mut want, &pos, s, theta);
        let mut got = x.clone();
        ok(ew::rope_backward(&Emu::default(), &mut got, &pos, s, theta));
        close(&format!("{what} backward"), &got, &want, TOL);
    }
}

#[test]
#[should_panic(expected = "rope: head_dim 5 must be even")]
fn rope_rejects_an_odd_head_dim() {
    let s = shape(1, 1, 1, 1, 5);
    let mut qkv = vec![0.0; s.qkv_width()];
    let _ = ew::rope_forward(&Emu::default(), &mut qkv, &[0], s, 10_000.0);
}

#[test]
fn residual_ops_are_the_cpu_bits() {
    for (k, &n) in FLAT_SIZES.iter().enumerate() {
        let mut rng = Rng::new(60 + k as u64);
        let (a, b) = (rng.vec_normal(n, 1.0), rng.vec_normal(n, 1.0));
        let emu = Emu::default();

        let (mut want, mut got) = (vec![0.0; n], vec![f32::NAN; n]);
        Cpu.add(&mut want, &a, &b);
        ok(ew::add(&emu, &mut got, &a, &b));
        exact(&format!("add n={n}"), &got, &want);

        let (mut want, mut got) = (a.clone(), a.clone());
        Cpu.add_inplace(&mut want, &b);
        ok(ew::add_inplace(&emu, &mut got, &b));
        exact(&format!("add_inplace n={n}"), &got, &want);

        let (mut want, mut got) = (a.clone(), a.clone());
        Cpu.scale(&mut want, -0.37);
        ok(ew::scale(&emu, &mut got, -0.37));
        exact(&format!("scale n={n}"), &got, &want);
    }
}

#[test]
#[should_panic(expected = "add: out, a and b differ in length")]
fn add_rejects_mismatched_lengths() {
    let (a, b, mut out) = (vec![0.0; 3], vec![0.0; 4], vec![0.0; 3]);
    let _ = ew::add(&Emu::default(), &mut out, &a, &b);
}

#[test]
fn sum_squares_matches_cpu_for_every_thread_order() {
    // One element, within a chunk, exactly one 16384-element chunk, one more, several chunks.
    for (k, &n) in [1usize, 3001, 16_384, 16_385, 50_000].iter().enumerate() {
        let mut rng = Rng::new(70 + k as u64);
        let x = rng.vec_normal(n, 2.0);
        let want = Cpu.sum_squares(&x);
        let got = ok(ew::sum_squares(&Emu::default(), &x));
        let tol = n as f64 * f64::EPSILON;
        assert!(
            (got - want).abs() <= tol * want,
            "sum_squares n={n}: got {got:e}, expected {want:e} (rel {:e} > {tol:e})",
            (got - want).abs() / want
        );
        let other = ok(ew::sum_squares(&Emu::with_seed(99 + k as u64), &x));
        assert_eq!(
            other.to_bits(),
            got.to_bits(),
            "sum_squares n={n}: depends on thread order"
        );
    }
    assert_eq!(ok(ew::sum_squares(&Emu::default(), &[])), 0.0);
}

#[test]
fn adamw_matches_cpu_over_steps() {
    let h = AdamW {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
    };
    for (k, &n) in FLAT_SIZES.iter().enumerate() {
        let mut rng = Rng::new(80 + k as u64);
        let p0 = rng.vec_normal(n, 1.0);
        let mut want = [p0, vec![0.0; n], vec![0.0; n]];
        let mut got = want.clone();
        // Three steps carry m and v, and bias correction changes with the step.
        for step in 1..=3 {
            let g = rng.vec_normal(n, 0.5);
            let h = AdamW { step, ..h };
            let [p, m, v] = &mut want;
            Cpu.adamw(p, &g, m, v, h);
            let [p, m, v] = &mut got;
            ok(ew::adamw(&Emu::default(), p, &g, m, v, h));
            for (name, (got, want)) in ["params", "m", "v"].iter().zip(got.iter().zip(&want)) {
                close(&format!("adamw n={n} step {step} {name}"), got, want, TOL);
            }
        }
    }
}

#[test]
fn kv_cache_store_is_the_cpu_bits() {
    let cases = [
        // (shape, t0, t_max): decode of one token, a GQA prefill at an offset, a wide head.
        (shape(1, 1, 1, 1, 2), 0, 1),
        (shape(2, 3, 4, 2, 5), 1, 7),
        (shape(3, 1, 2, 1, 300), 4, 5),
        (shape(2, 4, 6, 3, 37), 0, 4),
    ];
    for (k, &(s, t0, t_max)) in cases.iter().enumerate() {
        let mut rng = Rng::new(90 + k as u64);
        let qkv = rng.vec_normal(s.b * s.t * s.qkv_width(), 1.0);
        let cache = s.b * s.n_kv_head * t_max * s.head_dim;
        let (k0, v0) = (rng.vec_normal(cache, 1.0), rng.vec_normal(cache, 1.0));
        let (mut wk, mut wv) = (k0.clone(), v0.clone());
        Cpu.kv_cache_store(&mut wk, &mut wv, &qkv, s, t0, t_max);
        let (mut gk, mut gv) = (k0, v0);
        ok(ew::kv_cache_store(
            &Emu::default(),
            &mut gk,
            &mut gv,
            &qkv,
            s,
            t0,
            t_max,
        ));
        exact(&format!("kv_cache_store {s:?} k"), &gk, &wk);
        exact(&format!("kv_cache_store {s:?} v"), &gv, &wv);
    }
}

#[test]
#[should_panic(expected = "kv_cache_store: columns 3..5 beyond the cache's 4")]
fn kv_cache_store_rejects_columns_beyond_the_cache() {
    let s = shape(1, 2, 1, 1, 2);
    let (mut k, mut v) = (vec![0.0; 4 * 2], vec![0.0; 4 * 2]);
    let qkv = vec![0.0; 2 * s.qkv_width()];
    let _ = ew::kv_cache_store(&Emu::default(), &mut k, &mut v, &qkv, s, 3, 4);
}

/// Empty inputs launch nothing (CUDA would reject an empty grid) and change nothing.
#[test]
fn empty_inputs_are_no_ops() {
    let emu = Emu::default();
    let mut table = vec![1.0; 6];
    ok(ew::embedding_forward(&emu, &mut [], &table, &[], 3, true));
    ok(ew::embedding_backward(&emu, &mut table, &[], &[], 3));
    ok(ew::gelu_forward(&emu, &mut [], &[]));
    ok(ew::swiglu_forward(&emu, &mut [], &[], 0, 5));
    ok(ew::rope_forward(
        &emu,
        &mut [],
        &[],
        shape(0, 0, 2, 1, 4),
        1e4,
    ));
    ok(ew::add(&emu, &mut [], &[], &[]));
    ok(ew::scale(&emu, &mut [], 2.0));
    let h = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
    };
    ok(ew::adamw(&emu, &mut [], &[], &mut [], &mut [], h));
    ok(ew::kv_cache_store(
        &emu,
        &mut [],
        &mut [],
        &[],
        shape(0, 1, 2, 1, 4),
        0,
        3,
    ));
    assert_eq!(table, vec![1.0; 6]);
}
