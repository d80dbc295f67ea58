//! The attention kernels (`kernels/attention.cu`) on the emulated backend against the CPU
//! reference: `ModelOps::attention_forward` / `attention_backward` and
//! `DecodeOps::attention_decode` (DESIGN.md principle 3).
//!
//! Shapes are small and odd, so that every path of the tiling runs: grouped-query ratios 1 and 4
//! (and 20 in decode, more query heads than one block takes), sequence lengths that are not a
//! multiple of any tile, a single token, head dims 16, 32, 48 (a lane's accumulator slots only
//! partly used), 64 and 128 (the largest, whose tiles fill most of the 48 KB of shared memory),
//! and padding masks: right padding, left padding (its rows see no key at all: zeros and the lse
//! marker), holes, and a sequence with every key masked. Inputs are N(0, 1.5²), so that scores
//! spread over several units and the online softmax really rescales. `dqkv` starts from random
//! values, since the backward adds to it.
//!
//! Tolerances (`|got - want| <= TOL_F32·scale + rel·|want|`, with `scale` the largest magnitude
//! of the tensor compared, at least 1), and why:
//! - f32 inputs: [`TOL_F32`] = 1e-5, and rel = 1e-5. Both sides compute in f32 from the same
//!   inputs and differ only in summation order (tiles of 32 keys against gemm's microkernels) and
//!   in `exp` (the kernels' `__expf`, which the shim computes as the hardware does,
//!   `exp2f(x·log2 e)`, a few ulp from the CPU's). Gradients are sums of terms as large as the
//!   tensor's largest values that cancel down to small ones, so their error is relative to that
//!   scale, not to each value: the worst seen is 1.4e-5 on a tensor of scale 18, a tenth of the
//!   tolerance. A wrong mask, scale or tile bound is off by 1e-2 or more.
//! - bf16 inputs: the CPU runs on the same bf16 values widened to f32, so the new error is the
//!   rounding of the kernels' outputs (out, dqkv) to bf16, at most half an ulp: 2^-8 relative
//!   (7 stored mantissa bits). rel = [`REL_BF16`] = 2^-7, since the f32 difference can move a
//!   value across a rounding boundary (the worst seen is half of it). lse stays f32 and is checked
//!   as in the f32 case.
//! - The tensor-core forward (bf16, head dims 64 and 128) rounds the probabilities P to bf16
//!   before P·V, as FlashAttention-2 does, while its normaliser sums them unrounded in f32: each
//!   weight is off by at most 2^-9 relative, which moves an output by at most 2^-9·max|v|.
//!   Outputs near 0 (averages of values of both signs) have no relative slack for that, so its
//!   out is checked at abs = [`TC_ABS`]·max|v| = 2^-8·max|v| (twice the bound: the f32 order of
//!   the mma sums adds a little) and rel = [`REL_BF16`]; a wrong mask or tile bound is off by 0.1
//!   or more (the worst seen is 3.3e-4·max|v|, a twelfth of the tolerance). Its scores are f32
//!   sums of exact bf16 products, so its lse is checked as the SIMT kernel's.
//! - The tensor-core backward rounds P (for dV) and dS (for dQ and dK) to bf16 before its
//!   products, 2^-9 relative on each term. Gradients are sums of such terms as large as the
//!   tensor's largest values, cancelling down to smaller ones, so the error is relative to the
//!   tensor's scale: abs = [`TC_GRAD_ABS`] = 2^-8 of it (the worst seen is 8.2e-4 of it, a fifth
//!   of the tolerance), and rel = [`REL_BF16`] for the bf16 store. A causal bound off by one key
//!   puts dK off by 1e3.
//! - The lse marker of a query that sees no key (f32::MAX, the CPU's `LSE_NO_KEY`) must match
//!   exactly, and must appear exactly where the mask leaves a query no key.

mod common;

use common::{check_close, Rng, RngVec};
use half::bf16;
use rlhf::backend::cpu::Cpu;
use rlhf::backend::emu::plan::{
    self, Arg, AttnDtype, AttnKernel, AttnType, DevPtr, Kernel, Launch,
};
use rlhf::backend::emu::{Emu, Launcher};
use rlhf::backend::{AttnShape, DecodeOps, ModelOps};

const TOL_F32: f64 = 1e-5;
const REL_BF16: f64 = 1.0 / 128.0;
/// Absolute error of the tensor-core forward's out, in units of max|v| (see the module docs).
const TC_ABS: f64 = 1.0 / 256.0;
/// Absolute error of the tensor-core backward's gradients, in units of the gradient's largest
/// magnitude (see the module docs).
const TC_GRAD_ABS: f64 = 1.0 / 256.0;
/// The lse of a query that sees no key.
const LSE_NO_KEY: f32 = f32::MAX;
/// Standard deviation of the random inputs.
const STD: f32 = 1.5;

/// An activation type of the kernels, with its tolerance for stored outputs.
trait Act: AttnType + Default {
    /// Relative tolerance of an output stored in this type.
    const REL: f64;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Act for f32 {
    const REL: f64 = TOL_F32;
    fn from_f32(x: f32) -> f32 {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Act for bf16 {
    const REL: f64 = REL_BF16;
    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Values rounded to `E`, and the same values widened back to f32 for the CPU reference.
fn rounded<E: Act>(x: &[f32]) -> (Vec<E>, Vec<f32>) {
    let e: Vec<E> = x.iter().map(|&v| E::from_f32(v)).collect();
    let f = e.iter().map(|&v| v.to_f32()).collect();
    (e, f)
}

/// Random N(0, STD²) values rounded to `E`, as [`rounded`].
fn random<E: Act>(rng: &mut Rng, n: usize) -> (Vec<E>, Vec<f32>) {
    rounded(&rng.vec_normal(n, STD))
}

/// Checks kernel outputs against the CPU's: `|got - want| <= TOL_F32·scale + rel·|want|`, with
/// `scale` the tensor's largest magnitude (at least 1).
fn check_rel(what: &str, got: &[f32], want: &[f32], rel: f64) {
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    let scale = want.iter().fold(1.0f64, |m, &w| m.max(w.abs()));
    check_close(what, got, &want, TOL_F32 * scale, rel).unwrap_or_else(|e| panic!("{e}"));
}

fn widen<E: Act>(x: &[E]) -> Vec<f32> {
    x.iter().map(|&v| v.to_f32()).collect()
}

/// The padding of one sequence's keys.
#[derive(Clone, Copy, Debug)]
enum Pad {
    /// Every key visible.
    None,
    /// The first `n` keys visible (training batches).
    Right(usize),
    /// The first `n` keys masked (generation's left-padded prompts): their queries see no key.
    Left(usize),
    /// Each key masked with probability 1/4.
    Holes,
    /// Every key masked.
    All,
}

/// One sequence's key mask of `t` flags.
fn mask_of(pad: Pad, t: usize, rng: &mut Rng) -> Vec<bool> {
    (0..t)
        .map(|j| match pad {
            Pad::None => true,
            Pad::Right(n) => j < n,
            Pad::Left(n) => j >= n,
            Pad::Holes => rng.uniform() >= 0.25,
            Pad::All => false,
        })
        .collect()
}

/// A forward/backward case: the shape, and one padding per sequence (B of them).
struct Case {
    t: usize,
    nh: usize,
    kvh: usize,
    hd: usize,
    pads: &'static [Pad],
}

impl Case {
    fn shape(&self) -> AttnShape {
        AttnShape {
            b: self.pads.len(),
            t: self.t,
            n_head: self.nh,
            n_kv_head: self.kvh,
            head_dim: self.hd,
        }
    }

    fn mask(&self, rng: &mut Rng) -> Vec<bool> {
        self.pads
            .iter()
            .flat_map(|&p| mask_of(p, self.t, rng))
            .collect()
    }
}

/// The shapes of the forward and backward tests (tiles: 16 queries and 32 keys per forward and dQ
/// block, 8 keys and tiles of 32 queries per dK/dV block).
const CASES: &[Case] = &[
    // GQA ratio 1; T = 37: three query tiles, the last of 5 rows, and two key tiles.
    Case {
        t: 37,
        nh: 4,
        kvh: 4,
        hd: 16,
        pads: &[Pad::None, Pad::Right(29)],
    },
    // GQA ratio 4, left padding (rows without a key), holes, and a sequence with no key at all.
    Case {
        t: 45,
        nh: 4,
        kvh: 1,
        hd: 32,
        pads: &[Pad::Left(7), Pad::Holes, Pad::All],
    },
    // A single token.
    Case {
        t: 1,
        nh: 2,
        kvh: 1,
        hd: 64,
        pads: &[Pad::None],
    },
    // A head dim that fills a lane's second accumulator slot for half the lanes only.
    Case {
        t: 20,
        nh: 2,
        kvh: 2,
        hd: 48,
        pads: &[Pad::Holes, Pad::Left(3)],
    },
    // The largest head dim.
    Case {
        t: 19,
        nh: 2,
        kvh: 1,
        hd: 128,
        pads: &[Pad::Right(15)],
    },
    // Three key tiles of the forward, and three query tiles of the dK/dV kernel for early keys.
    Case {
        t: 70,
        nh: 8,
        kvh: 2,
        hd: 64,
        pads: &[Pad::Holes],
    },
];

/// The CPU forward: out (B·T, NH·HD) and lse (B, NH, T).
fn cpu_forward(qkv: &[f32], mask: &[bool], s: AttnShape) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0.0; s.b * s.t * s.out_width()];
    let mut lse = vec![0.0; s.b * s.n_head * s.t];
    Cpu.attention_forward(&mut out, &mut lse, qkv, mask, s);
    (out, lse)
}

/// Checks the kernels' lse against the CPU's: the no-key marker exactly where the mask leaves a
/// query no key (the CPU must agree), and f32 closeness elsewhere.
fn check_lse(what: &str, got: &[f32], want: &[f32], mask: &[bool], s: AttnShape) {
    for (at, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (b, i) = (at / (s.n_head * s.t), at % s.t);
        let sees_a_key = mask[b * s.t..b * s.t + i + 1].iter().any(|&m| m);
        assert_eq!(w == LSE_NO_KEY, !sees_a_key, "{what}[{at}]: CPU marker");
        assert_eq!(
            g == LSE_NO_KEY,
            !sees_a_key,
            "{what}[{at}]: got {g}, want {w}"
        );
    }
    let keep: Vec<usize> = (0..want.len()).filter(|&i| want[i] != LSE_NO_KEY).collect();
    let pick = |x: &[f32]| keep.iter().map(|&i| x[i]).collect::<Vec<f32>>();
    check_rel(what, &pick(got), &pick(want), TOL_F32);
}

fn forward_case<E: Act>(c: &Case, seed: u64) {
    let s = c.shape();
    let what = format!("{}: {s:?}", std::any::type_name::<E>());
    let mut rng = Rng::new(seed);
    let (qkv, qkv_f) = random::<E>(&mut rng, s.b * s.t * s.qkv_width());
    let mask = c.mask(&mut rng);
    let (want_out, want_lse) = cpu_forward(&qkv_f, &mask, s);
    let mut out = vec![E::default(); want_out.len()];
    let mut lse = vec![0.0; want_lse.len()];
    // The SIMT kernel, forced: for bf16 at head dims 64 and 128 the default is the tensor-core
    // one, tested below with its own tolerance.
    Emu::default().attention_forward_with(AttnKernel::Simt, &mut out, &mut lse, &qkv, &mask, s);
    check_rel(&format!("{what}: out"), &widen(&out), &want_out, E::REL);
    check_lse(&format!("{what}: lse"), &lse, &want_lse, &mask, s);
}

/// The q, k and v column blocks of `(B·T, qkv_width)` rows, each gathered row by row.
fn sections(x: &[f32], s: AttnShape) -> [Vec<f32>; 3] {
    let (q, kv) = (s.n_head * s.head_dim, s.n_kv_head * s.head_dim);
    let mut parts: [Vec<f32>; 3] = Default::default();
    for row in x.chunks_exact(s.qkv_width()) {
        parts[0].extend_from_slice(&row[..q]);
        parts[1].extend_from_slice(&row[q..q + kv]);
        parts[2].extend_from_slice(&row[q + kv..]);
    }
    parts
}

fn backward_case<E: Act>(c: &Case, seed: u64) {
    let s = c.shape();
    let what = format!("{}: {s:?}", std::any::type_name::<E>());
    let mut rng = Rng::new(seed);
    let (qkv, qkv_f) = random::<E>(&mut rng, s.b * s.t * s.qkv_width());
    let mask = c.mask(&mut rng);
    let (out_f, lse) = cpu_forward(&qkv_f, &mask, s);
    // Both backwards read the same forward results, rounded to E as a forward in E stores them.
    let (out, out_f) = rounded::<E>(&out_f);
    let (dout, dout_f) = random::<E>(&mut rng, out.len());
    let (init, init_f) = random::<E>(&mut rng, qkv.len());

    let mut want = init_f;
    Cpu.attention_backward(&mut want, &dout_f, &qkv_f, &out_f, &lse, &mask, s);
    let mut got = init;
    // The SIMT kernels, forced (see forward_case).
    let emu = Emu::default();
    emu.attention_backward_with(
        AttnKernel::Simt,
        &mut got,
        &dout,
        &qkv,
        &out,
        &lse,
        &mask,
        s,
    );

    let got = sections(&widen(&got), s);
    for ((name, g), w) in ["dq", "dk", "dv"].iter().zip(&got).zip(&sections(&want, s)) {
        check_rel(&format!("{what}: {name}"), g, w, E::REL);
    }
}

#[test]
fn forward_f32_matches_cpu() {
    for (i, c) in CASES.iter().enumerate() {
        forward_case::<f32>(c, 100 + i as u64);
    }
}

#[test]
fn forward_bf16_matches_cpu_on_rounded_inputs() {
    for (i, c) in CASES.iter().enumerate() {
        forward_case::<bf16>(c, 200 + i as u64);
    }
}

#[test]
fn backward_f32_matches_cpu() {
    for (i, c) in CASES.iter().enumerate() {
        backward_case::<f32>(c, 300 + i as u64);
    }
}

#[test]
fn backward_bf16_matches_cpu_on_rounded_inputs() {
    for (i, c) in CASES.iter().enumerate() {
        backward_case::<bf16>(c, 400 + i as u64);
    }
}

/// A decode case: B = pads.len() sequences, each one query against cache columns `0..len` of
/// `t_max`.
struct DecodeCase {
    nh: usize,
    kvh: usize,
    hd: usize,
    len: usize,
    t_max: usize,
    pads: &'static [Pad],
}

const DECODE_CASES: &[DecodeCase] = &[
    // GQA ratio 1; 37 columns: two key tiles, the second of 5.
    DecodeCase {
        nh: 4,
        kvh: 4,
        hd: 16,
        len: 37,
        t_max: 40,
        pads: &[Pad::None, Pad::Left(30)],
    },
    // GQA ratio 4, holes, and a sequence that sees no column (zeros).
    DecodeCase {
        nh: 8,
        kvh: 2,
        hd: 64,
        len: 50,
        t_max: 64,
        pads: &[Pad::Holes, Pad::All, Pad::Right(9)],
    },
    // 20 query heads on one key/value head: two blocks of heads per group, the second of 4.
    DecodeCase {
        nh: 20,
        kvh: 1,
        hd: 32,
        len: 9,
        t_max: 9,
        pads: &[Pad::Holes],
    },
    // The first step: one cached column.
    DecodeCase {
        nh: 2,
        kvh: 1,
        hd: 128,
        len: 1,
        t_max: 5,
        pads: &[Pad::None],
    },
];

fn decode_case<E: Act>(c: &DecodeCase, seed: u64) {
    let s = AttnShape {
        b: c.pads.len(),
        t: 1,
        n_head: c.nh,
        n_kv_head: c.kvh,
        head_dim: c.hd,
    };
    let what = format!("{}: {s:?} len {}", std::any::type_name::<E>(), c.len);
    let mut rng = Rng::new(seed);
    let (qkv, qkv_f) = random::<E>(&mut rng, s.b * s.qkv_width());
    let cache_len = s.b * c.kvh * c.t_max * c.hd;
    let (k_cache, k_f) = random::<E>(&mut rng, cache_len);
    let (mut v_cache, v_f) = random::<E>(&mut rng, cache_len);
    // Columns from `len` on are not the kernel's to read, masked or not: NaN there would show.
    for (at, v) in v_cache.iter_mut().enumerate() {
        if (at / c.hd) % c.t_max >= c.len {
            *v = E::from_f32(f32::NAN);
        }
    }
    let mut mask = Vec::new();
    for &pad in c.pads {
        let mut m = mask_of(pad, c.len, &mut rng);
        m.resize(c.t_max, true);
        mask.extend(m);
    }
    let mut want = vec![0.0; s.b * s.out_width()];
    Cpu.attention_decode(&mut want, &qkv_f, &k_f, &v_f, &mask, s, c.len, c.t_max);
    let mut got = vec![E::default(); want.len()];
    let emu = Emu::default();
    emu.attention_decode(&mut got, &qkv, &k_cache, &v_cache, &mask, s, c.len, c.t_max);
    check_rel(&format!("{what}: out"), &widen(&got), &want, E::REL);
}

#[test]
fn decode_matches_cpu() {
    for (i, c) in DECODE_CASES.iter().enumerate() {
        decode_case::<f32>(c, 500 + i as u64);
        decode_case::<bf16>(c, 600 + i as u64);
    }
}

/// The forward and backward of a case with several tiles per block, on the emulator `emu`:
/// (out, lse, dqkv).
fn run_all(emu: Emu) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = &CASES[5];
    let s = c.shape();
    let mut rng = Rng::new(7);
    let qkv = rng.vec_normal(s.b * s.t * s.qkv_width(), STD);
    let mask = c.mask(&mut rng);
    let dout = rng.vec_normal(s.b * s.t * s.out_width(), STD);
    let mut out = vec![0.0; dout.len()];
    let mut lse = vec![0.0; s.b * s.n_head * s.t];
    emu.attention_forward(&mut out, &mut lse, &qkv, &mask, s);
    let mut dqkv = vec![0.0; qkv.len()];
    emu.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &mask, s);
    (out, lse, dqkv)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// No atomics and fixed reduction trees: the same bits whatever order the shim resumes threads in
/// after each barrier.
#[test]
fn results_do_not_depend_on_thread_order() {
    let first = run_all(Emu::with_seed(1));
    for seed in [2, 0xdead_beef] {
        let other = run_all(Emu::with_seed(seed));
        assert_eq!(bits(&first.0), bits(&other.0), "out, seed {seed}");
        assert_eq!(bits(&first.1), bits(&other.1), "lse, seed {seed}");
        assert_eq!(bits(&first.2), bits(&other.2), "dqkv, seed {seed}");
    }
}

/// The forward's two barriers per key tile both matter, and the shim catches either one's
/// removal (`Emu::with_dropped_sync(k)` skips every thread's k-th `__syncthreads`): without the
/// first, warps read a k/v tile (and the q tile) before other warps have written it; without the
/// second (the first tile's), fast warps overwrite the k/v tile with the next one while slow
/// warps still read it. Shared memory starts as NaN in the shim, so stale reads show.
#[test]
fn forward_needs_its_barriers() {
    let c = &CASES[5];
    let s = c.shape();
    let mut rng = Rng::new(11);
    let qkv = rng.vec_normal(s.b * s.t * s.qkv_width(), STD);
    let mask = c.mask(&mut rng);
    let run = |emu: Emu| {
        let mut out = vec![0.0; s.b * s.t * s.out_width()];
        let mut lse = vec![0.0; s.b * s.n_head * s.t];
        emu.attention_forward(&mut out, &mut lse, &qkv, &mask, s);
        (bits(&out), bits(&lse))
    };
    let good = run(Emu::default());
    for k in [1, 2] {
        let raced = run(Emu::default().with_dropped_sync(k));
        assert!(
            raced != good,
            "removing __syncthreads #{k} of the forward went unnoticed"
        );
    }
}

#[test]
#[should_panic(expected = "head_dim 160 above the kernels' 128")]
fn rejects_head_dims_beyond_the_kernels() {
    let s = AttnShape {
        b: 1,
        t: 2,
        n_head: 1,
        n_kv_head: 1,
        head_dim: 160,
    };
    let qkv = vec![0.0f32; 2 * s.qkv_width()];
    let (mut out, mut lse) = (vec![0.0f32; 2 * s.out_width()], vec![0.0; 2]);
    Emu::default().attention_forward(&mut out, &mut lse, &qkv, &[true, true], s);
}

// ------------------------------------------------------------------------------------------------
// the tensor-core forward (attn_fwd_tc_bf16) and the shim's wmma
// ------------------------------------------------------------------------------------------------

/// Shapes of the tensor-core forward (blocks of 64 query rows, 16 per warp; key tiles of 32 at
/// head dim 64, of 16 at 128).
const TC_CASES: &[Case] = &[
    // A single token, GQA ratio 1.
    Case {
        t: 1,
        nh: 2,
        kvh: 2,
        hd: 64,
        pads: &[Pad::None],
    },
    // GQA ratio 4; T = 70: two query blocks (the second of 6 rows: one warp partly used, three
    // idle) and three key tiles, the last of 6 keys. Left padding (rows that see no key), holes,
    // and a sequence with every key masked.
    Case {
        t: 70,
        nh: 4,
        kvh: 1,
        hd: 64,
        pads: &[Pad::Left(7), Pad::Holes, Pad::All],
    },
    // Head dim 128, GQA ratio 1, right and left padding; T = 45, not a multiple of 16.
    Case {
        t: 45,
        nh: 2,
        kvh: 2,
        hd: 128,
        pads: &[Pad::Right(40), Pad::Left(3)],
    },
    // Head dim 128, GQA ratio 4, holes; T = 131: three query blocks, the last of 3 rows.
    Case {
        t: 131,
        nh: 4,
        kvh: 1,
        hd: 128,
        pads: &[Pad::Holes],
    },
];

/// Runs the tensor-core forward of `c` on `emu` and checks it against the CPU's (tolerances in
/// the module docs); returns out and lse.
fn tc_forward_case(c: &Case, seed: u64, emu: Emu) -> (Vec<f32>, Vec<f32>) {
    let s = c.shape();
    assert!(AttnKernel::Auto.uses_tensor_cores(AttnDtype::Bf16, s.head_dim));
    let what = format!("tensor cores: {s:?}");
    let mut rng = Rng::new(seed);
    let (qkv, qkv_f) = random::<bf16>(&mut rng, s.b * s.t * s.qkv_width());
    let mask = c.mask(&mut rng);
    let (want_out, want_lse) = cpu_forward(&qkv_f, &mask, s);
    let mut out = vec![bf16::ZERO; want_out.len()];
    let mut lse = vec![0.0; want_lse.len()];
    emu.attention_forward_with(AttnKernel::Auto, &mut out, &mut lse, &qkv, &mask, s);
    let v_max = sections(&qkv_f, s)[2]
        .iter()
        .fold(0.0f64, |m, &v| m.max(v.abs() as f64));
    let want: Vec<f64> = want_out.iter().map(|&v| v as f64).collect();
    let out = widen(&out);
    check_close(
        &format!("{what}: out"),
        &out,
        &want,
        TC_ABS * v_max,
        REL_BF16,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    check_lse(&format!("{what}: lse"), &lse, &want_lse, &mask, s);
    (out, lse)
}

/// The tensor-core backward of `c` on `emu` against the CPU's, from the same (bf16-rounded)
/// forward results; returns dqkv.
fn tc_backward_case(c: &Case, seed: u64, emu: Emu) -> Vec<f32> {
    let s = c.shape();
    let what = format!("tensor cores: {s:?}");
    let mut rng = Rng::new(seed);
    let (qkv, qkv_f) = random::<bf16>(&mut rng, s.b * s.t * s.qkv_width());
    let mask = c.mask(&mut rng);
    let (out_f, lse) = cpu_forward(&qkv_f, &mask, s);
    let (out, out_f) = rounded::<bf16>(&out_f);
    let (dout, dout_f) = random::<bf16>(&mut rng, out.len());
    let (init, init_f) = random::<bf16>(&mut rng, qkv.len());
    let mut want = init_f;
    Cpu.attention_backward(&mut want, &dout_f, &qkv_f, &out_f, &lse, &mask, s);
    let mut got = init;
    emu.attention_backward_with(
        AttnKernel::Auto,
        &mut got,
        &dout,
        &qkv,
        &out,
        &lse,
        &mask,
        s,
    );
    let got = widen(&got);
    let parts = sections(&got, s);
    for ((name, g), w) in ["dq", "dk", "dv"]
        .iter()
        .zip(&parts)
        .zip(&sections(&want, s))
    {
        let scale = w.iter().fold(1.0f64, |m, &v| m.max(v.abs() as f64));
        let w: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        check_close(
            &format!("{what}: {name}"),
            g,
            &w,
            TC_GRAD_ABS * scale,
            REL_BF16,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    got
}

#[test]
fn tensor_core_backward_matches_cpu() {
    for (i, c) in TC_CASES.iter().enumerate() {
        tc_backward_case(c, 800 + i as u64, Emu::default());
    }
}

/// The tensor-core kernels read tiles 16 bytes at a time where q, k and v are 16-byte aligned, and
/// element by element where not: both paths give the same bits, forward and backward, for the
/// same values at an aligned and at a misaligned address.
#[test]
fn tensor_core_kernels_agree_on_aligned_and_misaligned_inputs() {
    // Both head dims, with padding; the largest case is left out for time.
    for (i, c) in TC_CASES.iter().enumerate().take(3).skip(1) {
        let s = c.shape();
        let mut rng = Rng::new(850 + i as u64);
        let n = s.b * s.t * s.qkv_width();
        let (qkv, _) = random::<bf16>(&mut rng, n);
        let mask = c.mask(&mut rng);
        let (dout, _) = random::<bf16>(&mut rng, s.b * s.t * s.out_width());
        // One buffer, the values copied to an aligned start and to the element after it.
        let mut buf = vec![bf16::ZERO; n + 16];
        let aligned = (0..8)
            .find(|&o| (buf[o..].as_ptr() as usize).is_multiple_of(16))
            .expect("a 16-byte boundary within 8 bf16");
        let run = |buf: &mut Vec<bf16>, at: usize| {
            buf[at..at + n].copy_from_slice(&qkv);
            let qkv = &buf[at..at + n];
            let mut out = vec![bf16::ZERO; s.b * s.t * s.out_width()];
            let mut lse = vec![0.0; s.b * s.n_head * s.t];
            let emu = Emu::default();
            emu.attention_forward_with(AttnKernel::Auto, &mut out, &mut lse, qkv, &mask, s);
            let mut dqkv = vec![bf16::ZERO; n];
            emu.attention_backward_with(
                AttnKernel::Auto,
                &mut dqkv,
                &dout,
                qkv,
                &out,
                &lse,
                &mask,
                s,
            );
            (bits(&widen(&out)), bits(&lse), bits(&widen(&dqkv)))
        };
        let a = run(&mut buf, aligned);
        let m = run(&mut buf, aligned + 1);
        assert_eq!(a.0, m.0, "out, {s:?}");
        assert_eq!(a.1, m.1, "lse, {s:?}");
        assert_eq!(a.2, m.2, "dqkv, {s:?}");
    }
}

/// No atomics, one owner block per gradient row: the same bits whatever the thread order.
#[test]
fn tensor_core_backward_does_not_depend_on_thread_order() {
    let c = &TC_CASES[1];
    let first = tc_backward_case(c, 820, Emu::with_seed(1));
    for seed in [2, 0xdead_beef] {
        let other = tc_backward_case(c, 820, Emu::with_seed(seed));
        assert_eq!(bits(&first), bits(&other), "dqkv, seed {seed}");
    }
}

#[test]
fn tensor_core_forward_matches_cpu() {
    for (i, c) in TC_CASES.iter().enumerate() {
        tc_forward_case(c, 700 + i as u64, Emu::default());
    }
}

/// The default bf16 forward at head dim 64 is not the SIMT kernel: its bits differ (it rounds P),
/// and forcing the SIMT kernel gives the SIMT kernel's.
#[test]
fn tensor_core_forward_is_the_default_for_bf16() {
    let c = &TC_CASES[1];
    let s = c.shape();
    let (tc, _) = tc_forward_case(c, 710, Emu::default());
    let mut rng = Rng::new(710);
    let (qkv, _) = random::<bf16>(&mut rng, s.b * s.t * s.qkv_width());
    let mask = c.mask(&mut rng);
    let mut out = vec![bf16::ZERO; tc.len()];
    let mut lse = vec![0.0; s.b * s.n_head * s.t];
    Emu::default().attention_forward_with(AttnKernel::Simt, &mut out, &mut lse, &qkv, &mask, s);
    assert_ne!(bits(&tc), bits(&widen(&out)));
    assert!(!AttnKernel::Simt.uses_tensor_cores(AttnDtype::Bf16, 64));
    assert!(!AttnKernel::Auto.uses_tensor_cores(AttnDtype::F32, 64));
    assert!(!AttnKernel::Auto.uses_tensor_cores(AttnDtype::Bf16, 96));
}

/// Fixed-order sums and no atomics: the same bits whatever order the shim resumes threads in.
#[test]
fn tensor_core_forward_does_not_depend_on_thread_order() {
    let c = &TC_CASES[3];
    let first = tc_forward_case(c, 720, Emu::with_seed(1));
    for seed in [2, 0xdead_beef] {
        let other = tc_forward_case(c, 720, Emu::with_seed(seed));
        assert_eq!(bits(&first.0), bits(&other.0), "out, seed {seed}");
        assert_eq!(bits(&first.1), bits(&other.1), "lse, seed {seed}");
    }
}

/// The forward's barriers, where the shim can show them: without the third (the first tile's
/// last), the next tile overwrites K and V while slow warps read them. The first two (block-wide
/// copies of Q and the row ids, then of K and V, each followed by wmma loads of them) matter as
/// much on a GPU, but the shim cannot expose their loss: threads released by a barrier all run
/// to their next one before any is resumed again, so every copy is done before any warp's load
/// starts.
#[test]
fn tensor_core_forward_needs_its_barriers() {
    let c = &TC_CASES[1];
    let s = c.shape();
    let mut rng = Rng::new(730);
    let (qkv, _) = random::<bf16>(&mut rng, s.b * s.t * s.qkv_width());
    let mask = c.mask(&mut rng);
    let run = |emu: Emu| {
        let mut out = vec![bf16::ZERO; s.b * s.t * s.out_width()];
        let mut lse = vec![0.0; s.b * s.n_head * s.t];
        emu.attention_forward_with(AttnKernel::Auto, &mut out, &mut lse, &qkv, &mask, s);
        (bits(&widen(&out)), bits(&lse))
    };
    let good = run(Emu::default());
    let raced = run(Emu::default().with_dropped_sync(3));
    assert!(
        raced != good,
        "removing __syncthreads #3 of the tensor-core forward went unnoticed"
    );
}

/// A self-test kernel of `kernels/emu/selftest.cu`, one warp.
fn selftest(name: &'static str, shared_floats: u32, args: Vec<Arg>) -> Launch {
    Launch {
        kernel: Kernel {
            file: "emu/selftest.cu",
            name,
        },
        grid: [1, 1, 1],
        block: [32, 1, 1],
        shared_bytes: shared_floats * 4,
        args,
    }
}

fn arg<T>(x: &mut [T]) -> Arg {
    Arg::Ptr(DevPtr(x.as_mut_ptr() as u64))
}

/// The shim's `mma_sync` with every load and store layout: D = A·B + C exactly as f32 fused
/// multiply-adds over k = 0..15 give it (bf16 products are exact in f32), so bit for bit.
#[test]
fn wmma_shim_multiplies_in_every_layout() {
    let mut rng = Rng::new(740);
    let (mut a, a_f) = random::<bf16>(&mut rng, 256);
    let (mut b, b_f) = random::<bf16>(&mut rng, 256); // column-major: b[n·16 + k] = B[k][n]
    let mut c = rng.vec_normal(256, STD); // column-major: c[n·16 + m] = C[m][n]
    let mut d = vec![0.0f32; 256];
    let l = selftest(
        "selftest_wmma_mma_bf16",
        768,
        vec![arg(&mut a), arg(&mut b), arg(&mut c), arg(&mut d)],
    );
    // SAFETY: the kernel reads 256 values of a, b and c and writes 256 of d.
    unsafe { Emu::default().launch(&l) }.unwrap();
    for m in 0..16 {
        for n in 0..16 {
            let want = (0..16).fold(c[n * 16 + m], |acc, k| {
                a_f[m * 16 + k].mul_add(b_f[n * 16 + k], acc)
            });
            assert_eq!(d[m * 16 + n].to_bits(), want.to_bits(), "D[{m}][{n}]");
        }
    }
}

/// The shim's fragment layout is not the hardware's, so a kernel that picks fragment elements by
/// index gets a wrong answer in tests: `selftest_wmma_x0_f32` doubles x[0] only, written for a
/// GPU where lane l's x[0] is element (l / 4, 2·(l % 4)) (the layout PTX documents for the
/// accumulator of mma.m16n8k16, which wmma's 16x16 tiles use on sm_80), meaning to double those
/// 32 elements. Under the shim every lane holds the whole tile, scrambled, so one element doubles
/// instead.
#[test]
fn wmma_shim_layout_breaks_kernels_that_assume_the_hardware_one() {
    let mut x: Vec<f32> = (0..256).map(|i| 1.0 + i as f32).collect();
    let mut out = vec![0.0f32; 256];
    let l = selftest(
        "selftest_wmma_x0_f32",
        256,
        vec![arg(&mut x), arg(&mut out)],
    );
    // SAFETY: the kernel reads 256 values of x and writes 256 of out.
    unsafe { Emu::default().launch(&l) }.unwrap();
    let mut intended = x.clone();
    for lane in 0..32 {
        intended[(lane / 4) * 16 + 2 * (lane % 4)] *= 2.0;
    }
    let doubled: Vec<usize> = (0..256).filter(|&e| out[e] != x[e]).collect();
    assert_eq!(doubled.len(), 1, "one element doubled: {doubled:?}");
    assert_eq!(out[doubled[0]], 2.0 * x[doubled[0]]);
    assert_ne!(out, intended, "the shim matched the hardware layout");
}

#[test]
#[should_panic(expected = "head_dim 96 is not one of [64, 128]")]
fn tensor_core_plan_rejects_other_head_dims() {
    let s = AttnShape {
        b: 1,
        t: 2,
        n_head: 1,
        n_kv_head: 1,
        head_dim: 96,
    };
    let p = plan::AttnFwdPtrs {
        qkv: DevPtr::NULL,
        out: DevPtr::NULL,
        lse: DevPtr::NULL,
    };
    plan::attn_fwd_tc(p, DevPtr::NULL, s);
}
