//! The sampling kernel (`kernels/sampling.cu`, driven by `rlhf::backend::emu::sampling`) on the
//! emulated backend against the CPU reference `DecodeOps::sample_tokens`, and the CPU sampler
//! against the distribution it must draw from (DESIGN.md principle 3).
//!
//! Shapes: vocabularies below the 256-thread block (1, 37: most threads own no token), an exact
//! fit (256) and no multiple of it (1000, 300); batches of one row, of several, and a subset of
//! a batch's rows listed out of order, some more than once.
//!
//! Tokens must be equal. Both sides compute the same f32 weights (`exp((z - max) / t)` with the
//! CPU's `math::exp`, which the kernel ports operation for operation) and differ only in how
//! their f64 sums are grouped (the kernel's per-thread chunks and block trees against the CPU's
//! lane and block sums): relative differences of ~1e-16. A token can then differ only when
//! `u · total`, or top-p's target mass, falls within that of a boundary between tokens. The
//! reference distribution (`rlhf::validate::sample_reference`) takes its weights from an f64
//! `exp`, within ~2.5e-7 relative of the f32 ones (2 ulp of `math::exp` and the rounding to
//! f32), so every uniform here is drawn clear of its boundaries by `MARGIN` = 1e-6, which covers
//! both, and every top-p cut is asserted as clear. Log-probs: the same f32 operations around one
//! f64 log-sum-exp, so they agree within an ulp or two; `LOGP_TOL` = 1e-6 relative (plus 1e-6
//! absolute) is several ulp of values up to ~20, and any wrong token or wrong temperature is off
//! by far more.

mod common;

use common::{check_close, Rng, RngVec};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::emu::{sampling, Emu};
use rlhf::backend::{DecodeOps, SampleParams};
use rlhf::validate::{clear_uniform, sample_reference};

const LOGP_TOL: f64 = 1e-6;
const MARGIN: f64 = 1e-6;

fn params(temperature: f32, top_k: usize, top_p: f32) -> SampleParams {
    SampleParams {
        temperature,
        top_k,
        top_p,
    }
}

/// Logits (B, V), normal with standard deviation 2: spread enough that top-k and top-p cut deep.
fn logits(b: usize, v: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).vec_normal(b * v, 2.0)
}

/// One clear uniform per listed row (none when greedy); asserts top-p's cuts are clear too.
fn uniforms(z: &[f32], v: usize, rows: &[u32], p: SampleParams, seed: u64) -> Vec<f64> {
    if p.is_greedy() {
        return vec![];
    }
    let mut rng = Rng::new(seed);
    rows.iter()
        .map(|&r| {
            let reference = sample_reference(&z[r as usize * v..(r as usize + 1) * v], p);
            assert!(
                reference.cut_margin > MARGIN,
                "test data: row {r}'s top-p cut is within {MARGIN} of a token boundary"
            );
            clear_uniform(&mut rng, &reference.probs, MARGIN)
        })
        .collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `sample_tokens` on the CPU: (ids, log-probs).
fn cpu(z: &[f32], rows: &[u32], v: usize, p: SampleParams, u: &[f64]) -> (Vec<u32>, Vec<f32>) {
    let (mut ids, mut logps) = (vec![0; rows.len()], vec![0.0; rows.len()]);
    Cpu.sample_tokens(z, rows, v, p, u, &mut ids, &mut logps);
    (ids, logps)
}

/// `sample_tokens` on the emulated kernel.
fn emu(
    be: &Emu,
    z: &[f32],
    rows: &[u32],
    v: usize,
    p: SampleParams,
    u: &[f64],
) -> (Vec<u32>, Vec<f32>) {
    let (mut ids, mut logps) = (vec![0; rows.len()], vec![0.0; rows.len()]);
    sampling::sample_tokens(be, z, rows, v, p, u, &mut ids, &mut logps).unwrap();
    (ids, logps)
}

/// The kernel against the CPU on the listed rows: equal tokens, log-probs within `LOGP_TOL`, every
/// token one the reference keeps, and the same bits in another thread order.
fn compare(what: &str, z: &[f32], rows: &[u32], v: usize, p: SampleParams, seed: u64) {
    let u = uniforms(z, v, rows, p, seed);
    let (ids, logps) = cpu(z, rows, v, p, &u);
    let (got_ids, got_logps) = emu(&Emu::default(), z, rows, v, p, &u);
    assert_eq!(got_ids, ids, "{what}: tokens differ from the CPU's");
    check_close(
        &format!("{what}: log-probs"),
        &got_logps,
        &f64s(&logps),
        LOGP_TOL,
        LOGP_TOL,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    if !p.is_greedy() {
        for (&r, &id) in rows.iter().zip(&ids) {
            let reference = sample_reference(&z[r as usize * v..(r as usize + 1) * v], p);
            assert!(
                reference.probs[id as usize] > 0.0,
                "{what}: row {r} picked {id}, which truncation drops"
            );
        }
    }
    let (ids2, logps2) = emu(&Emu::with_seed(seed ^ 0x77), z, rows, v, p, &u);
    assert_eq!(ids2, got_ids, "{what}: tokens depend on thread order");
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&logps2),
        bits(&got_logps),
        "{what}: log-probs depend on thread order"
    );
}

/// (B, V) shapes every mode runs on.
const SHAPES: &[(usize, usize)] = &[(1, 1), (2, 37), (3, 256), (4, 1000)];

fn every_row(b: usize) -> Vec<u32> {
    (0..b as u32).collect()
}

fn compare_on_shapes(what: &str, p: SampleParams) {
    for (k, &(b, v)) in SHAPES.iter().enumerate() {
        let z = logits(b, v, 10 + k as u64);
        let what = format!("{what} B={b} V={v}");
        compare(&what, &z, &every_row(b), v, p, 20 + k as u64);
    }
}

#[test]
fn greedy_matches_cpu() {
    compare_on_shapes("greedy", params(0.0, 0, 1.0));
    // Truncation settings change nothing when greedy.
    compare_on_shapes("greedy with top-k/top-p", params(0.0, 5, 0.5));
}

#[test]
fn greedy_takes_the_first_maximum() {
    let v = 1000;
    let mut z = logits(2, v, 3);
    for i in [900, 17, 500, v + 300, v + 999] {
        z[i] = 9.0;
    }
    let rows = every_row(2);
    compare("greedy ties", &z, &rows, v, params(0.0, 0, 1.0), 4);
    assert_eq!(cpu(&z, &rows, v, params(0.0, 0, 1.0), &[]).0, [17, 300]);
}

#[test]
fn temperature_only_matches_cpu() {
    compare_on_shapes("T=0.7", params(0.7, 0, 1.0));
    compare_on_shapes("T=1.3", params(1.3, 0, 1.0));
}

#[test]
fn top_k_matches_cpu() {
    compare_on_shapes("top-k 5", params(1.0, 5, 1.0));
    // Top-k of V or more keeps everything.
    compare_on_shapes("top-k 1000", params(0.8, 1000, 1.0));
}

#[test]
fn top_p_matches_cpu() {
    compare_on_shapes("top-p 0.9", params(0.8, 0, 0.9));
    compare_on_shapes("top-p 0.3", params(1.0, 0, 0.3));
}

#[test]
fn top_k_and_top_p_match_cpu() {
    compare_on_shapes("top-k 20 top-p 0.8", params(0.9, 20, 0.8));
}

/// Many tokens share each weight: top-k and top-p cut inside a group of equal weights, which
/// both sides must cut at the same ids (lowest first).
#[test]
fn ties_are_kept_lowest_id_first() {
    let v = 300;
    // Five values, 60 tokens each, interleaved so that each group spans every thread's chunk.
    let z: Vec<f32> = (0..v).map(|i| ((i * 7) % 5) as f32 * 0.5).collect();
    // 32 draws each, so that some land on the cut group's last kept tokens.
    let rows = [0; 32];
    // Top-k 100: the 60 tokens at 2.0 and the first 40 at 1.5.
    compare("ties top-k", &z, &rows, v, params(1.0, 100, 1.0), 5);
    // Top-p 0.5 of 60·(1 + e^-0.5 + e^-1 + e^-1.5 + e^-2) ≈ 140: 60 tokens + 17 at 1.5.
    compare("ties top-p", &z, &rows, v, params(1.0, 0, 0.5), 6);
    // Top-k 100 then top-p 0.9 of its 84.3: the cut falls among top-k's kept ties at 1.5 (27).
    compare("ties top-k top-p", &z, &rows, v, params(1.0, 100, 0.9), 7);
    let group: Vec<usize> = (0..v).filter(|&i| z[i] == 1.5).collect();
    let kept = |p| {
        let r = sample_reference(&z, p);
        let n = group.iter().filter(|&&i| r.probs[i] > 0.0).count();
        (n, group[..n].iter().all(|&i| r.probs[i] > 0.0))
    };
    // The reference itself cuts where the comments say, at the lowest ids of the group.
    assert_eq!(kept(params(1.0, 100, 1.0)), (40, true));
    assert_eq!(kept(params(1.0, 0, 0.5)), (17, true));
    assert_eq!(kept(params(1.0, 100, 0.9)), (27, true));
}

#[test]
fn a_subset_of_rows_in_any_order() {
    let (b, v) = (5, 1000);
    let z = logits(b, v, 8);
    let rows = [3, 0, 4, 3];
    compare("rows greedy", &z, &rows, v, params(0.0, 0, 1.0), 9);
    compare("rows sampled", &z, &rows, v, params(0.9, 30, 0.85), 10);
}

/// One row drawn with 48 uniforms: the kernel's inverse CDF picks the CPU's token all over the
/// kept set, not only for a few draws.
#[test]
fn many_uniforms_on_one_row_match_cpu() {
    let v = 300;
    let z = logits(1, v, 11);
    let rows = [0u32; 48];
    compare("one row, T=1", &z, &rows, v, params(1.0, 0, 1.0), 12);
    compare(
        "one row, top-k top-p",
        &z,
        &rows,
        v,
        params(0.7, 25, 0.9),
        13,
    );
}

/// A uniform of 0 takes the first kept token of positive weight on both sides.
#[test]
fn uniform_zero_takes_the_first_kept_token() {
    let v = 300;
    let z = logits(1, v, 14);
    for p in [params(1.0, 0, 1.0), params(0.7, 25, 0.9)] {
        let (ids, _) = cpu(&z, &[0], v, p, &[0.0]);
        let (got, _) = emu(&Emu::default(), &z, &[0], v, p, &[0.0]);
        let first = sample_reference(&z, p).probs.iter().position(|&q| q > 0.0);
        assert_eq!(Some(ids[0] as usize), first);
        assert_eq!(got, ids);
    }
}

#[test]
fn no_rows_is_a_no_op() {
    let z = logits(2, 37, 15);
    let (ids, logps) = emu(&Emu::default(), &z, &[], 37, params(1.0, 0, 1.0), &[]);
    assert!(ids.is_empty() && logps.is_empty());
}

#[test]
#[should_panic(expected = "sample_tokens: row 2 out of a batch of 2")]
fn a_row_past_the_batch_is_refused() {
    let z = logits(2, 37, 16);
    emu(&Emu::default(), &z, &[2], 37, params(1.0, 0, 1.0), &[0.5]);
}

/// Generation's seeded tokens depend on untruncated sampling walking every token in index order
/// with `u · Σ p` (the walk before sampling moved behind the backend): the CPU still does that,
/// for uniforms clear of the boundaries (its weights are `math::exp`'s, not the reference's).
#[test]
fn cpu_untruncated_walk_is_in_index_order() {
    let v = 1000;
    let z = logits(1, v, 17);
    let p = params(0.8, 0, 1.0);
    let probs = sample_reference(&z, p).probs;
    let mut rng = Rng::new(18);
    for _ in 0..200 {
        let u = clear_uniform(&mut rng, &probs, MARGIN);
        let mut acc = 0.0;
        let want = probs.iter().position(|&q| {
            acc += q;
            acc > u
        });
        assert_eq!(
            Some(cpu(&z, &[0], v, p, &[u]).0[0] as usize),
            want,
            "u = {u}"
        );
    }
}

/// Over many uniforms the CPU's tokens follow the truncated, renormalised distribution: every
/// kept token within 5 standard deviations of its probability (binomial), no dropped token ever.
/// 5σ over a dozen tokens fails by chance with probability ~1e-5, and the seed is fixed.
#[test]
fn cpu_frequencies_match_the_truncated_distribution() {
    let v = 12;
    let z = logits(1, v, 19);
    let draws = 200_000usize;
    for p in [
        params(0.9, 0, 1.0),
        params(0.9, 6, 1.0),
        params(1.1, 0, 0.7),
        params(0.9, 8, 0.8),
    ] {
        let want = sample_reference(&z, p).probs;
        let mut rng = Rng::new(20);
        let u: Vec<f64> = (0..draws).map(|_| rng.uniform()).collect();
        let rows = vec![0u32; draws];
        let (ids, _) = cpu(&z, &rows, v, p, &u);
        let mut counts = vec![0usize; v];
        for id in ids {
            counts[id as usize] += 1;
        }
        for (i, (&c, &q)) in counts.iter().zip(&want).enumerate() {
            let freq = c as f64 / draws as f64;
            let sigma = (q * (1.0 - q) / draws as f64).sqrt();
            assert!(
                (freq - q).abs() <= 5.0 * sigma + 1.0 / draws as f64,
                "{p:?}: token {i} drawn with frequency {freq}, expected {q}"
            );
        }
        assert!(
            want.iter().filter(|&&q| q == 0.0).count() > 0 || (p.top_k == 0 && p.top_p >= 1.0),
            "{p:?}: the truncation drops nothing, so the test would not see a wrong cut"
        );
    }
}
