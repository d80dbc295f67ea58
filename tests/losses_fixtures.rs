//! The loss family ([`LossOps`]) on the CPU backend against the TRL/PyTorch fixtures in
//! `shared/fixtures/losses` (made by `generators/ref_losses.py` and `ref_losses_extra.py`), and
//! every gradient against central finite differences of the op's own forward.
//!
//! Tolerances, and why:
//! - [`TOL_F32`] = 1e-5 (relative to max(1, |want|)) against the fixtures' f32 outputs: the
//!   fixtures' own f32-vs-f64 gaps are at most 9e-7 (`max_abs_diff_f32_vs_f64` in the JSON
//!   sidecars) and our ops compute in f64 from the same f32 inputs, so honest results land within
//!   ~1e-6; a wrong formula (an eps in the wrong place, a wrong normaliser) is off by ≥ 1e-4 here.
//! - [`TOL_F64`] = 1e-6 against the `@f64` outputs: our per-token math and reductions are f64, so
//!   what remains is the f32 store of per-token outputs (≤ 6e-8 relative), hyper-parameters held
//!   as f32 (0.2f32 is 0.2 + 3e-9) and, for `grpo_loss`, derived inputs the generator rounded to
//!   f32 only in its f32 pass. 1e-6 is 10× above those and 10× tighter than the f32 check.
//! - Finite differences: [`FD_H`] = 1e-4 steps, the step taken exactly as the difference of the two
//!   f32 inputs, the forward's f64 result differenced in f64. Truncation error is O(h²) ≈ 1e-9 and
//!   f64 round-off ≈ 1e-12, so the budget is the f32 store of the analytic gradient (6e-8
//!   relative; the worst seen is 5.6e-8): [`FD_RTOL`] = 1e-6 relative plus [`FD_ATOL`] = 1e-9
//!   absolute. Every loss here is
//!   piecewise smooth; the fixtures' inputs sit farther than h from every kink (clip bounds,
//!   the hinge, the dual-clip cap), which the check would otherwise report.

use rlhf::backend::cpu::Cpu;
use rlhf::backend::loss::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::sync::OnceLock;

const TOL_F32: f64 = 1e-5;
const TOL_F64: f64 = 1e-6;
const FD_H: f32 = 1e-4;
const FD_RTOL: f64 = 1e-6;
const FD_ATOL: f64 = 1e-9;

// ------------------------------------------------------------------------------------------------
// fixture loading
// ------------------------------------------------------------------------------------------------

enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
}

struct Fixture {
    file: &'static str,
    tensors: HashMap<String, (Vec<usize>, Data)>,
}

impl Fixture {
    fn load(file: &'static str) -> Fixture {
        let path = format!(
            "{}/../shared/fixtures/losses/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let raw = view.data();
            let data = match view.dtype() {
                Dtype::F32 => Data::F32(
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                Dtype::F64 => Data::F64(
                    raw.chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                Dtype::I64 => Data::I64(
                    raw.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                other => panic!("{path}: {name}: unexpected dtype {other:?}"),
            };
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        Fixture { file, tensors }
    }

    fn get(&self, name: &str) -> &(Vec<usize>, Data) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor {name}", self.file))
    }

    fn shape(&self, name: &str) -> &[usize] {
        &self.get(name).0
    }

    /// An F32 tensor (an input, or an output as computed in f32).
    fn f32(&self, name: &str) -> &[f32] {
        match &self.get(name).1 {
            Data::F32(v) => v,
            _ => panic!("{}: {name} is not F32", self.file),
        }
    }

    /// The `@f64` twin of an output.
    fn f64(&self, name: &str) -> &[f64] {
        match &self.get(&format!("{name}@f64")).1 {
            Data::F64(v) => v,
            _ => panic!("{}: {name}@f64 is not F64", self.file),
        }
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        match &self.get(name).1 {
            Data::I64(v) => v.iter().map(|&x| u32::try_from(x).unwrap()).collect(),
            _ => panic!("{}: {name} is not I64", self.file),
        }
    }

    /// Checks `got` against both the f32 output and its `@f64` twin.
    fn check(&self, name: &str, got: &[f64]) {
        let want32: Vec<f64> = self.f32(name).iter().map(|&x| x as f64).collect();
        assert_close(&format!("{name} (f32)"), got, &want32, TOL_F32);
        assert_close(&format!("{name} (@f64)"), got, self.f64(name), TOL_F64);
    }

    /// [`Fixture::check`] for an f32 output buffer.
    fn check32(&self, name: &str, got: &[f32]) {
        self.check(name, &widen(got));
    }

    /// [`Fixture::check`] for a scalar.
    fn check_scalar(&self, name: &str, got: f64) {
        self.check(name, &[got]);
    }
}

fn base() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture::load("losses.safetensors"))
}

fn extra() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture::load("losses_extra.safetensors"))
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `|got - want| <= tol · max(1, |want|)` elementwise, reporting the worst element.
fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(!err.is_nan(), "{what}[{i}]: got {g}, want {w}");
        if err > worst.0 {
            worst = (err, i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= tol,
        "{what}[{i}]: got {}, want {} (scaled error {:.3e} > {tol:.0e})",
        got[i],
        want[i],
        worst.0
    );
}

/// Element-wise `x * mask` (the fixtures store per-token values unmasked; our ops write 0 on pads).
fn masked(x: &[f32], mask: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(mask)
        .map(|(&v, &m)| if m == 0.0 { 0.0 } else { v })
        .collect()
}

/// Central differences of `f` at `x`, compared with `analytic` (see the module comment).
fn fd_check(what: &str, x: &[f32], analytic: &[f32], f: impl Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + FD_H;
        let up = f(&xp);
        xp[i] = x[i] - FD_H;
        let down = f(&xp);
        let h = (x[i] + FD_H) as f64 - (x[i] - FD_H) as f64;
        xp[i] = x[i];
        let fd = (up - down) / h;
        let g = analytic[i] as f64;
        assert!(
            (fd - g).abs() <= FD_ATOL + FD_RTOL * fd.abs(),
            "{what}[{i}]: analytic {g:e}, finite difference {fd:e}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// a naive log-softmax / entropy in f64, for the chain from log-probs to logits
// ------------------------------------------------------------------------------------------------

/// Log-probs of `labels` and entropies under `softmax(logits / temp)`, and the probabilities.
/// logits: (N, V).
fn naive_logprobs(
    logits: &[f32],
    labels: &[u32],
    v: usize,
    temp: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = labels.len();
    let (mut logp, mut ent, mut probs) = (vec![0.0; n], vec![0.0; n], vec![0.0; n * v]);
    for r in 0..n {
        let z: Vec<f64> = logits[r * v..(r + 1) * v]
            .iter()
            .map(|&x| x as f64 / temp)
            .collect();
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
        logp[r] = z[labels[r] as usize] - lse;
        for j in 0..v {
            let lp = z[j] - lse;
            probs[r * v + j] = lp.exp();
            ent[r] -= lp.exp() * lp;
        }
    }
    (logp, ent, probs)
}

/// `∂/∂logits (Σ dlogp·logp + Σ dent·entropy)` at temperature 1:
/// `dlogp·(onehot - p) - dent·p·(log p + H)`.
fn naive_logprobs_backward(
    probs: &[f64],
    ent: &[f64],
    labels: &[u32],
    v: usize,
    dlogp: &[f32],
    dent: Option<&[f32]>,
) -> Vec<f64> {
    let mut g = vec![0.0; probs.len()];
    for r in 0..labels.len() {
        for j in 0..v {
            let p = probs[r * v + j];
            let onehot = (j == labels[r] as usize) as u8 as f64;
            g[r * v + j] = dlogp[r] as f64 * (onehot - p);
            if let Some(de) = dent {
                g[r * v + j] -= de[r] as f64 * p * (p.ln() + ent[r]);
            }
        }
    }
    g
}

fn rows_of(fx: &Fixture, mask: &str) -> Rows {
    let s = fx.shape(mask);
    Rows { b: s[0], t: s[1] }
}

fn mask_sum(mask: &[f32]) -> f64 {
    mask.iter().map(|&m| m as f64).sum()
}

fn round32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

// ------------------------------------------------------------------------------------------------
// losses.safetensors
// ------------------------------------------------------------------------------------------------

/// The test's own log-softmax chain, checked against TRL's `selective_log_softmax` and
/// `entropy_from_logits` so that the chains below rest on something verified.
#[test]
fn logprob_chain_matches_trl() {
    let fx = base();
    let logits = fx.f32("logprob.logits");
    let labels = fx.ids("logprob.labels");
    let v = fx.shape("logprob.logits")[2];
    let (logp, ent, probs) = naive_logprobs(logits, &labels, v, 1.0);
    fx.check("logprob.logp", &logp);
    fx.check("logprob.entropy", &ent);
    let (logp_t, _, _) = naive_logprobs(logits, &labels, v, 0.7);
    fx.check("logprob.logp_temp0.7", &logp_t);
    let up = fx.f32("logprob.upstream");
    let g = naive_logprobs_backward(&probs, &ent, &labels, v, up, None);
    fx.check("logprob.grad_logits", &g);
    let zeros = vec![0.0f32; up.len()];
    let upe = fx.f32("logprob.upstream_entropy");
    let g = naive_logprobs_backward(&probs, &ent, &labels, v, &zeros, Some(upe));
    fx.check("logprob.grad_entropy_logits", &g);
}

#[test]
fn kl_estimators() {
    let fx = base();
    let (logp, logp_ref, mask) = (fx.f32("kl.logp"), fx.f32("kl.ref_logp"), fx.f32("kl.mask"));
    let rows = rows_of(fx, "kl.mask");
    for (name, est) in [
        ("k1", KlEstimator::K1),
        ("k2", KlEstimator::K2),
        ("k3", KlEstimator::K3),
    ] {
        let mut per_token = vec![f32::NAN; rows.n()];
        let mut dx = vec![0.0f32; rows.n()];
        let mean = {
            let x = KlInputs::<Cpu> {
                logp,
                logp_ref,
                mask,
                rows,
            };
            Cpu.kl(
                &x,
                est,
                Aggregation::Bnpo,
                Some(&mut per_token),
                Some(Grad {
                    dx: &mut dx,
                    dloss: 1.0,
                }),
            )
        };
        // The fixture's per-token values are unmasked; ours are 0 on pads.
        let want = masked(fx.f32(&format!("kl.{name}")), mask);
        let want64: Vec<f64> = fx
            .f64(&format!("kl.{name}"))
            .iter()
            .zip(mask)
            .map(|(&v, &m)| if m == 0.0 { 0.0 } else { v })
            .collect();
        assert_close(name, &widen(&per_token), &widen(&want), TOL_F32);
        assert_close(name, &widen(&per_token), &want64, TOL_F64);
        fx.check_scalar(&format!("kl.{name}_masked_mean"), mean);
        fx.check32(&format!("kl.grad_{name}_masked_mean"), &dx);
        fd_check(&format!("kl.{name}"), logp, &dx, |lp| {
            let x = KlInputs::<Cpu> {
                logp: lp,
                logp_ref,
                mask,
                rows,
            };
            Cpu.kl(&x, est, Aggregation::Bnpo, None, None)
        });
    }
}

/// The clipped surrogate with per-token advantages, as the legacy TRL PPO trainer computes it.
fn ppo_cfg(agg: Aggregation) -> PolicyLossCfg {
    PolicyLossCfg {
        clip_low: 0.2,
        clip_high: 0.2,
        dual_clip: None,
        kl_coef: 0.0,
        entropy_coef: 0.0,
        agg,
    }
}

#[test]
fn ppo_policy_loss() {
    let fx = base();
    let (new, old, adv, mask) = (
        fx.f32("ppo.logp_new"),
        fx.f32("ppo.logp_old"),
        fx.f32("ppo.advantages"),
        fx.f32("ppo.mask"),
    );
    let rows = rows_of(fx, "ppo.mask");
    // A closure, not a struct value: the inputs must borrow the perturbed copies of the
    // finite-difference check, whose lifetime is the closure call's.
    let run = |logp: &[f32],
               cfg: &PolicyLossCfg,
               per_token: Option<&mut [f32]>,
               grad: Option<PolicyLossGrad<'_, Cpu>>| {
        let x = PolicyLossInputs::<Cpu> {
            logp,
            logp_old: old,
            advantages: Advantages::PerToken(adv),
            logp_ref: None,
            entropy: None,
            is_weight: None,
            mask,
            rows,
        };
        Cpu.policy_loss(&x, cfg, per_token, grad)
    };
    let mut per_token = vec![f32::NAN; rows.n()];
    let mut dlogp = vec![0.0f32; rows.n()];
    let cfg = ppo_cfg(Aggregation::Bnpo);
    let s = run(
        new,
        &cfg,
        Some(&mut per_token),
        Some(PolicyLossGrad {
            dlogp: &mut dlogp,
            dentropy: None,
            dloss: 1.0,
        }),
    );
    let want = masked(fx.f32("ppo.pg_losses"), mask);
    assert_close("ppo.pg_losses", &widen(&per_token), &widen(&want), TOL_F32);
    fx.check_scalar("ppo.pg_loss", s.loss);
    fx.check_scalar("ppo.pg_clipfrac", s.clipfrac);
    fx.check_scalar("ppo.approxkl_masked", s.approx_kl);
    fx.check32("ppo.grad_logp_new", &dlogp);
    assert_eq!(s.tokens, mask_sum(mask));
    assert!(s.clipfrac > 0.0, "the fixture should exercise the clip");
    fd_check("ppo.pg_loss", new, &dlogp, |lp| {
        run(lp, &cfg, None, None).loss
    });

    // TRL's "grpo" aggregation of the same per-token losses.
    let cfg = ppo_cfg(Aggregation::Grpo);
    let mut dlogp = vec![0.0f32; rows.n()];
    let s = run(
        new,
        &cfg,
        None,
        Some(PolicyLossGrad {
            dlogp: &mut dlogp,
            dentropy: None,
            dloss: 1.0,
        }),
    );
    fx.check_scalar("ppo.pg_loss_seq_mean", s.loss);
    fd_check("ppo.pg_loss_seq_mean", new, &dlogp, |lp| {
        run(lp, &cfg, None, None).loss
    });
}

#[test]
fn clipped_value_loss() {
    let fx = base();
    let (vpred, vold, ret, mask) = (
        fx.f32("vf.vpred"),
        fx.f32("vf.values_old"),
        fx.f32("vf.returns"),
        fx.f32("vf.mask"),
    );
    let rows = rows_of(fx, "vf.mask");
    let cfg = ValueLossCfg {
        clip: Some(0.2),
        agg: Aggregation::Bnpo,
    };
    let run = |values: &[f32], per_token: Option<&mut [f32]>, grad: Option<Grad<'_, Cpu>>| {
        let x = ValueLossInputs::<Cpu> {
            values,
            values_old: vold,
            returns: ret,
            mask,
            rows,
        };
        Cpu.value_loss(&x, &cfg, per_token, grad)
    };
    let mut per_token = vec![f32::NAN; rows.n()];
    let mut dv = vec![0.0f32; rows.n()];
    let s = run(
        vpred,
        Some(&mut per_token),
        Some(Grad {
            dx: &mut dv,
            dloss: 1.0,
        }),
    );
    // Our per-token loss carries the ½; the fixture's `vf.losses` is the max before it.
    let twice: Vec<f32> = per_token.iter().map(|&l| 2.0 * l).collect();
    let want = masked(fx.f32("vf.losses"), mask);
    assert_close("vf.losses", &widen(&twice), &widen(&want), TOL_F32);
    fx.check_scalar("vf.loss", s.loss);
    fx.check_scalar("vf.clipfrac", s.clipfrac);
    fx.check32("vf.grad_vpred", &dv);
    assert!(s.clipfrac > 0.0 && s.clipfrac < 1.0);
    fd_check("vf.loss", vpred, &dv, |v| run(v, None, None).loss);
    // `vf.vpred_clipped` is internal to the fused op; its effect is checked through `vf.losses`.
}

#[test]
fn gae_advantages_and_returns() {
    let fx = base();
    let (rewards, values, mask) = (
        fx.f32("gae.rewards"),
        fx.f32("gae.values"),
        fx.f32("gae.mask"),
    );
    let rows = rows_of(fx, "gae.mask");
    for whiten in [false, true] {
        let mut adv = vec![f32::NAN; rows.n()];
        let mut ret = vec![f32::NAN; rows.n()];
        let cfg = GaeCfg {
            gamma: 1.0,
            lam: 0.95,
            whiten,
        };
        Cpu.gae(&mut adv, &mut ret, rewards, values, mask, rows, &cfg);
        fx.check32("gae.returns", &ret);
        if whiten {
            fx.check32("gae.advantages_whitened", &adv);
        } else {
            fx.check32("gae.advantages", &adv);
        }
    }
}

#[test]
fn grpo_group_advantages() {
    let fx = base();
    let rewards = fx.f32("grpo_adv.rewards");
    let n = rewards.len();
    for (name, scale) in [
        ("group", GroupScale::Group),
        ("batch", GroupScale::Batch),
        ("none", GroupScale::None),
    ] {
        let cfg = GroupAdvCfg {
            group: 4,
            baseline: GroupBaseline::Mean,
            scale,
            eps: 1e-4,
        };
        let (mut adv, mut mean, mut std) = (vec![f32::NAN; n], vec![0.0; n], vec![0.0; n]);
        let s = Cpu.group_advantages(&mut adv, Some(&mut mean), Some(&mut std), rewards, n, &cfg);
        fx.check32(&format!("grpo_adv.advantages_{name}"), &adv);
        fx.check32("grpo_adv.group_mean", &mean);
        fx.check32("grpo_adv.group_std", &std);
        // The fixture's second group has identical rewards: its advantages are exactly 0.
        assert!(adv[4..8].iter().all(|&a| a == 0.0));
        assert!((s.frac_zero_std - 1.0 / 3.0).abs() < 1e-12);
    }
}

/// TRL `GRPOTrainer._compute_loss`: log-probs from the logits, per-sequence advantages,
/// k3 to the reference, four aggregations; the gradient chained to the logits.
#[test]
fn grpo_loss_all_types() {
    let fx = base();
    let logits = fx.f32("grpo_loss.logits");
    let ids = fx.ids("grpo_loss.completion_ids");
    let mask = fx.f32("grpo_loss.mask");
    let adv = fx.f32("grpo_loss.advantages");
    let old = fx.f32("grpo_loss.logp_old");
    let lref = fx.f32("grpo_loss.logp_ref");
    let rows = rows_of(fx, "grpo_loss.mask");
    let v = fx.shape("grpo_loss.logits")[2];
    let (logp64, ent, probs) = naive_logprobs(logits, &ids, v, 1.0);
    let logp = round32(&logp64);
    let run = |logp: &[f32], cfg: &PolicyLossCfg, grad: Option<PolicyLossGrad<'_, Cpu>>| {
        let x = PolicyLossInputs::<Cpu> {
            logp,
            logp_old: old,
            advantages: Advantages::PerSequence(adv),
            logp_ref: Some(lref),
            entropy: None,
            is_weight: None,
            mask,
            rows,
        };
        Cpu.policy_loss(&x, cfg, None, grad)
    };
    let types = [
        ("grpo", Aggregation::Grpo),
        ("bnpo", Aggregation::Bnpo),
        (
            "dr_grpo",
            Aggregation::DrGrpo {
                max_completion_length: rows.t,
            },
        ),
        (
            "dapo",
            Aggregation::Dapo {
                num_items: mask_sum(mask),
            },
        ),
    ];
    for (name, agg) in types {
        for (beta, sfx) in [(0.04f32, "0.04"), (0.0, "0")] {
            let cfg = PolicyLossCfg {
                kl_coef: beta,
                ..ppo_cfg(agg)
            };
            let mut dlogp = vec![0.0f32; rows.n()];
            let s = run(
                &logp,
                &cfg,
                Some(PolicyLossGrad {
                    dlogp: &mut dlogp,
                    dentropy: None,
                    dloss: 1.0,
                }),
            );
            // Our log-probs come from an f64 log-softmax, TRL's f32 pass from an f32 one: the
            // loss differs by their ~1e-7 gap, inside both tolerances.
            fx.check_scalar(&format!("grpo_loss.loss_{name}_beta{sfx}"), s.loss);
            let g = naive_logprobs_backward(&probs, &ent, &ids, v, &dlogp, None);
            fx.check(&format!("grpo_loss.grad_logits_{name}_beta{sfx}"), &g);
            fd_check(
                &format!("grpo_loss.{name}.beta{sfx}"),
                &logp,
                &dlogp,
                |lp| run(lp, &cfg, None).loss,
            );
        }
    }
}

#[test]
fn dpo_sigmoid_from_sequence_logps() {
    let fx = base();
    let (pc, pr, rc, rr) = (
        fx.f32("dpo.policy_chosen_logps"),
        fx.f32("dpo.policy_rejected_logps"),
        fx.f32("dpo.ref_chosen_logps"),
        fx.f32("dpo.ref_rejected_logps"),
    );
    let p = pc.len();
    let cfg = DpoCfg {
        beta: 0.1,
        label_smoothing: 0.0,
        loss: DpoLoss::Sigmoid,
    };
    let run = |pc: &[f32], pr: &[f32], out: DpoOutputs<'_, Cpu>, grad: Option<DpoGrad<'_, Cpu>>| {
        let x = DpoInputs::<Cpu> {
            policy_chosen: pc,
            policy_rejected: pr,
            ref_chosen: rc,
            ref_rejected: rr,
            chosen_len: None,
            rejected_len: None,
            pairs: p,
        };
        Cpu.dpo_loss(&x, &cfg, out, grad)
    };
    let (mut losses, mut rw_c, mut rw_r) = (vec![0.0; p], vec![0.0; p], vec![0.0; p]);
    let (mut dc, mut dr) = (vec![0.0f32; p], vec![0.0f32; p]);
    let s = run(
        pc,
        pr,
        DpoOutputs {
            losses: Some(&mut losses),
            chosen_rewards: Some(&mut rw_c),
            rejected_rewards: Some(&mut rw_r),
        },
        Some(DpoGrad {
            dchosen: &mut dc,
            drejected: &mut dr,
            dloss: 1.0,
        }),
    );
    fx.check32("dpo.losses", &losses);
    fx.check_scalar("dpo.loss", s.loss);
    fx.check32("dpo.chosen_rewards", &rw_c);
    fx.check32("dpo.rejected_rewards", &rw_r);
    fx.check32("dpo.grad_policy_chosen", &dc);
    fx.check32("dpo.grad_policy_rejected", &dr);
    let mean = |x: &[f32]| x.iter().map(|&v| v as f64).sum::<f64>() / p as f64;
    assert!((s.chosen_reward - mean(&rw_c)).abs() < 1e-6);
    assert!((s.margin - (mean(&rw_c) - mean(&rw_r))).abs() < 1e-6);
    fd_check("dpo.chosen", pc, &dc, |x| {
        run(x, pr, DpoOutputs::default(), None).loss
    });
    fd_check("dpo.rejected", pr, &dr, |x| {
        run(pc, x, DpoOutputs::default(), None).loss
    });
}

#[test]
fn bradley_terry_loss() {
    let fx = base();
    let (rc, rr, margin) = (
        fx.f32("bt.rewards_chosen"),
        fx.f32("bt.rewards_rejected"),
        fx.f32("bt.margin"),
    );
    let p = rc.len();
    let cfg = BtCfg { center_coef: 0.0 };
    let (mut dc, mut dr) = (vec![0.0f32; p], vec![0.0f32; p]);
    let s = Cpu.bt_loss(
        rc,
        rr,
        None,
        p,
        &cfg,
        Some(BtGrad {
            dchosen: &mut dc,
            drejected: &mut dr,
            dloss: 1.0,
        }),
    );
    fx.check_scalar("bt.loss", s.loss);
    fx.check_scalar("bt.accuracy", s.accuracy);
    fx.check32("bt.grad_chosen", &dc);
    fx.check32("bt.grad_rejected", &dr);
    let sm = Cpu.bt_loss(rc, rr, Some(margin), p, &cfg, None);
    fx.check_scalar("bt.loss_margin", sm.loss);
    fd_check("bt.chosen", rc, &dc, |x| {
        Cpu.bt_loss(x, rr, None, p, &cfg, None).loss
    });
    fd_check("bt.rejected", rr, &dr, |x| {
        Cpu.bt_loss(rc, x, None, p, &cfg, None).loss
    });
    // With the margin, by finite differences only (the fixture has no gradient for it).
    let (mut dc, mut dr) = (vec![0.0f32; p], vec![0.0f32; p]);
    Cpu.bt_loss(
        rc,
        rr,
        Some(margin),
        p,
        &cfg,
        Some(BtGrad {
            dchosen: &mut dc,
            drejected: &mut dr,
            dloss: 1.0,
        }),
    );
    fd_check("bt.margin.chosen", rc, &dc, |x| {
        Cpu.bt_loss(x, rr, Some(margin), p, &cfg, None).loss
    });
    fd_check("bt.margin.rejected", rr, &dr, |x| {
        Cpu.bt_loss(rc, x, Some(margin), p, &cfg, None).loss
    });
}

// ------------------------------------------------------------------------------------------------
// losses_extra.safetensors
// ------------------------------------------------------------------------------------------------

/// The DPO family from per-token log-probs: `masked_row_sum` to sequence log-probs (and lengths,
/// for IPO), `dpo_loss`, then `masked_row_sum_backward` to the chosen tokens.
#[test]
fn dpo_variants_from_token_logps() {
    let fx = extra();
    let cm = fx.f32("dpo.chosen_mask");
    let rm = fx.f32("dpo.rejected_mask");
    let rows = rows_of(fx, "dpo.chosen_mask");
    let pc_tok = fx.f32("dpo.policy_chosen_token_logps");
    let pr_tok = fx.f32("dpo.policy_rejected_token_logps");
    let rc_tok = fx.f32("dpo.ref_chosen_token_logps");
    let rr_tok = fx.f32("dpo.ref_rejected_token_logps");
    let p = rows.b;
    let seq = |tok: &[f32], mask: &[f32]| {
        let (mut s, mut c) = (vec![0.0f32; p], vec![0.0f32; p]);
        Cpu.masked_row_sum(&mut s, Some(&mut c), tok, mask, rows);
        (s, c)
    };
    let (pr, lr) = seq(pr_tok, rm);
    let (rc, _) = seq(rc_tok, cm);
    let (rr, _) = seq(rr_tok, rm);
    let variants = [
        ("sigmoid", DpoLoss::Sigmoid, 0.0f32),
        ("sigmoid_ls", DpoLoss::Sigmoid, 0.1),
        ("hinge", DpoLoss::Hinge, 0.0),
        ("ipo", DpoLoss::Ipo, 0.0),
        ("robust", DpoLoss::Robust, 0.1),
    ];
    for (name, loss, label_smoothing) in variants {
        let cfg = DpoCfg {
            beta: 0.1,
            label_smoothing,
            loss,
        };
        // The whole chain from the chosen tokens to the loss, for the finite differences.
        let forward = |tok: &[f32]| {
            let (pc, lc) = seq(tok, cm);
            let x = DpoInputs::<Cpu> {
                policy_chosen: &pc,
                policy_rejected: &pr,
                ref_chosen: &rc,
                ref_rejected: &rr,
                chosen_len: Some(&lc),
                rejected_len: Some(&lr),
                pairs: p,
            };
            Cpu.dpo_loss(&x, &cfg, DpoOutputs::default(), None).loss
        };
        let (pc, lc) = seq(pc_tok, cm);
        let x = DpoInputs::<Cpu> {
            policy_chosen: &pc,
            policy_rejected: &pr,
            ref_chosen: &rc,
            ref_rejected: &rr,
            chosen_len: Some(&lc),
            rejected_len: Some(&lr),
            pairs: p,
        };
        let (mut dc, mut dr) = (vec![0.0f32; p], vec![0.0f32; p]);
        let s = Cpu.dpo_loss(
            &x,
            &cfg,
            DpoOutputs::default(),
            Some(DpoGrad {
                dchosen: &mut dc,
                drejected: &mut dr,
                dloss: 1.0,
            }),
        );
        fx.check_scalar(&format!("dpo.loss_{name}"), s.loss);
        let mut dtok = vec![0.0f32; rows.n()];
        Cpu.masked_row_sum_backward(&mut dtok, &dc, cm, rows);
        fx.check32(&format!("dpo.grad_policy_chosen_token_logps_{name}"), &dtok);
        // Sequence sums are stored in f32 between the two ops, so the chain's forward carries
        // f32 rounding of ~2e-6 absolute on a sum of ~-15: difference it with a wider step.
        fd_check_seq(&format!("dpo.{name}"), pc_tok, &dtok, &forward);
    }
}

/// [`fd_check`] for forwards that round an intermediate to f32: a 1e-2 step keeps the f32
/// rounding of the intermediate (~1e-6 absolute) below 1e-4 relative of the difference, and the
/// losses are smooth enough (no kink within 1e-2 here; IPO is quadratic) for O(h²) to stay
/// below that too. Tolerance 1e-3 relative, 1e-7 absolute.
fn fd_check_seq(what: &str, x: &[f32], analytic: &[f32], f: &dyn Fn(&[f32]) -> f64) {
    let h = 1e-2f32;
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + h;
        let up = f(&xp);
        xp[i] = x[i] - h;
        let down = f(&xp);
        xp[i] = x[i];
        let fd = (up - down) / ((x[i] + h) as f64 - (x[i] - h) as f64);
        let g = analytic[i] as f64;
        assert!(
            (fd - g).abs() <= 1e-7 + 1e-3 * fd.abs(),
            "{what}[{i}]: analytic {g:e}, finite difference {fd:e}"
        );
    }
}

#[test]
fn reward_model_centering() {
    let fx = extra();
    let (rc, rr) = (fx.f32("rm.rewards_chosen"), fx.f32("rm.rewards_rejected"));
    let p = rc.len();
    let cfg = BtCfg { center_coef: 0.01 };
    let (mut dc, mut dr) = (vec![0.0f32; p], vec![0.0f32; p]);
    let s = Cpu.bt_loss(
        rc,
        rr,
        None,
        p,
        &cfg,
        Some(BtGrad {
            dchosen: &mut dc,
            drejected: &mut dr,
            dloss: 1.0,
        }),
    );
    fx.check_scalar("rm.loss_centered", s.loss);
    fx.check32("rm.grad_chosen_centered", &dc);
    fd_check("rm.chosen", rc, &dc, |x| {
        Cpu.bt_loss(x, rr, None, p, &cfg, None).loss
    });
    fd_check("rm.rejected", rr, &dr, |x| {
        Cpu.bt_loss(rc, x, None, p, &cfg, None).loss
    });
}

#[test]
fn rloo_advantages() {
    let fx = extra();
    let r = fx.f32("rloo.rewards");
    let n = r.len();
    let cfg = GroupAdvCfg {
        group: 4,
        baseline: GroupBaseline::LeaveOneOut,
        scale: GroupScale::None,
        eps: 0.0,
    };
    let mut adv = vec![f32::NAN; n];
    Cpu.group_advantages(&mut adv, None, None, r, n, &cfg);
    fx.check32("rloo.advantages", &adv);
}

#[test]
fn reinforce_pp() {
    let fx = extra();
    let (logp, lref, scores, mask) = (
        fx.f32("rpp.logp"),
        fx.f32("rpp.ref_logp"),
        fx.f32("rpp.scores"),
        fx.f32("rpp.mask"),
    );
    let rows = rows_of(fx, "rpp.mask");
    let mut rewards = vec![f32::NAN; rows.n()];
    let cfg = KlRewardCfg {
        kl_coef: 0.05,
        estimator: KlEstimator::K1,
    };
    Cpu.kl_shaped_rewards(&mut rewards, logp, lref, scores, mask, rows, &cfg);
    fx.check32("rpp.token_rewards", &rewards);
    let (mut adv, mut ret) = (vec![f32::NAN; rows.n()], vec![f32::NAN; rows.n()]);
    Cpu.reinforce_pp(&mut adv, &mut ret, &rewards, mask, rows, 1.0);
    fx.check32("rpp.returns", &ret);
    fx.check32("rpp.advantages", &adv);
}

#[test]
fn dual_clip_policy_loss() {
    let fx = extra();
    let (new, old, adv, mask) = (
        fx.f32("dual.logp_new"),
        fx.f32("dual.logp_old"),
        fx.f32("dual.advantages"),
        fx.f32("dual.mask"),
    );
    let rows = rows_of(fx, "dual.mask");
    let cfg = PolicyLossCfg {
        dual_clip: Some(3.0),
        ..ppo_cfg(Aggregation::Bnpo)
    };
    let run =
        |logp: &[f32], per_token: Option<&mut [f32]>, grad: Option<PolicyLossGrad<'_, Cpu>>| {
            let x = PolicyLossInputs::<Cpu> {
                logp,
                logp_old: old,
                advantages: Advantages::PerToken(adv),
                logp_ref: None,
                entropy: None,
                is_weight: None,
                mask,
                rows,
            };
            Cpu.policy_loss(&x, &cfg, per_token, grad)
        };
    let mut per_token = vec![f32::NAN; rows.n()];
    let mut dlogp = vec![0.0f32; rows.n()];
    let s = run(
        new,
        Some(&mut per_token),
        Some(PolicyLossGrad {
            dlogp: &mut dlogp,
            dentropy: None,
            dloss: 1.0,
        }),
    );
    let want = masked(fx.f32("dual.pg_losses"), mask);
    assert_close("dual.pg_losses", &widen(&per_token), &widen(&want), TOL_F32);
    fx.check_scalar("dual.pg_loss", s.loss);
    fx.check_scalar("dual.dualclip_frac", s.dual_clipfrac);
    fx.check32("dual.grad_logp_new", &dlogp);
    assert!(
        s.dual_clipfrac > 0.0,
        "the fixture should exercise the dual clip"
    );
    fd_check("dual.pg_loss", new, &dlogp, |lp| run(lp, None, None).loss);
    // `dual.ratio` is internal to the fused op; it is checked through `dual.pg_losses`.
}

/// Clipped loss minus an entropy bonus; the op returns the gradient w.r.t. log-probs and
/// entropies, chained to the logits by the (naive) log-softmax backward.
#[test]
fn entropy_bonus() {
    let fx = extra();
    let logits = fx.f32("ent.logits");
    let labels = fx.ids("ent.labels");
    let (old, adv, mask) = (
        fx.f32("ent.logp_old"),
        fx.f32("ent.advantages"),
        fx.f32("ent.mask"),
    );
    let rows = rows_of(fx, "ent.mask");
    let v = fx.shape("ent.logits")[2];
    let (logp64, ent64, probs) = naive_logprobs(logits, &labels, v, 1.0);
    fx.check("ent.entropy", &ent64);
    let (logp, ent) = (round32(&logp64), round32(&ent64));
    let cfg = PolicyLossCfg {
        entropy_coef: 0.01,
        ..ppo_cfg(Aggregation::Bnpo)
    };
    let run = |logp: &[f32], entropy: &[f32], grad: Option<PolicyLossGrad<'_, Cpu>>| {
        let x = PolicyLossInputs::<Cpu> {
            logp,
            logp_old: old,
            advantages: Advantages::PerToken(adv),
            logp_ref: None,
            entropy: Some(entropy),
            is_weight: None,
            mask,
            rows,
        };
        Cpu.policy_loss(&x, &cfg, None, grad)
    };
    let (mut dlogp, mut dent) = (vec![0.0f32; rows.n()], vec![0.0f32; rows.n()]);
    let s = run(
        &logp,
        &ent,
        Some(PolicyLossGrad {
            dlogp: &mut dlogp,
            dentropy: Some(&mut dent),
            dloss: 1.0,
        }),
    );
    fx.check_scalar("ent.loss", s.loss);
    let g = naive_logprobs_backward(&probs, &ent64, &labels, v, &dlogp, Some(&dent));
    fx.check("ent.grad_logits", &g);
    fd_check("ent.logp", &logp, &dlogp, |lp| run(lp, &ent, None).loss);
    fd_check("ent.entropy", &ent, &dent, |e| run(&logp, e, None).loss);
}

// ------------------------------------------------------------------------------------------------
// properties the fixtures do not pin
// ------------------------------------------------------------------------------------------------

/// An all-masked row contributes nothing, whatever its values (even NaN), under every
/// aggregation; it still counts as a row where TRL counts it (the `grpo` batch mean, the
/// `dr_grpo` `B × L`).
#[test]
fn all_masked_row_contributes_zero() {
    let fx = base();
    let rows = rows_of(fx, "ppo.mask");
    let t = rows.t;
    let mut mask = fx.f32("ppo.mask").to_vec();
    let mut new = fx.f32("ppo.logp_new").to_vec();
    let mut lref = fx.f32("kl.ref_logp").to_vec();
    let mut ent = fx.f32("kl.ref_logp").iter().map(|x| -x).collect::<Vec<_>>();
    let last = (rows.b - 1) * t..rows.b * t;
    mask[last.clone()].fill(0.0);
    new[last.clone()].fill(f32::NAN);
    lref[last.clone()].fill(f32::NAN);
    ent[last.clone()].fill(f32::NAN);
    let old = fx.f32("ppo.logp_old");
    let adv = fx.f32("ppo.advantages");
    let n_keep = (rows.b - 1) * t;
    let kept = Rows { b: rows.b - 1, t };
    let count = mask_sum(&mask);
    for (agg, agg_kept, scale) in [
        (Aggregation::Grpo, Aggregation::Grpo, 3.0 / 4.0),
        (Aggregation::Bnpo, Aggregation::Bnpo, 1.0),
        (
            Aggregation::Dapo { num_items: count },
            Aggregation::Dapo { num_items: count },
            1.0,
        ),
        (
            Aggregation::DrGrpo {
                max_completion_length: t,
            },
            Aggregation::DrGrpo {
                max_completion_length: t,
            },
            3.0 / 4.0,
        ),
    ] {
        let cfg = PolicyLossCfg {
            kl_coef: 0.04,
            entropy_coef: 0.01,
            dual_clip: Some(3.0),
            ..ppo_cfg(agg)
        };
        let x = PolicyLossInputs::<Cpu> {
            logp: &new,
            logp_old: old,
            advantages: Advantages::PerToken(adv),
            logp_ref: Some(&lref),
            entropy: Some(&ent),
            is_weight: None,
            mask: &mask,
            rows,
        };
        let (mut dlogp, mut dent) = (vec![0.0f32; rows.n()], vec![0.0f32; rows.n()]);
        let mut per_token = vec![f32::NAN; rows.n()];
        let s = Cpu.policy_loss(
            &x,
            &cfg,
            Some(&mut per_token),
            Some(PolicyLossGrad {
                dlogp: &mut dlogp,
                dentropy: Some(&mut dent),
                dloss: 1.0,
            }),
        );
        assert!(s.loss.is_finite() && s.kl.is_finite() && s.entropy.is_finite());
        assert!(dlogp[last.clone()].iter().all(|&g| g == 0.0));
        assert!(dent[last.clone()].iter().all(|&g| g == 0.0));
        assert!(per_token[last.clone()].iter().all(|&l| l == 0.0));
        let xk = PolicyLossInputs::<Cpu> {
            logp: &new[..n_keep],
            logp_old: &old[..n_keep],
            advantages: Advantages::PerToken(&adv[..n_keep]),
            logp_ref: Some(&lref[..n_keep]),
            entropy: Some(&ent[..n_keep]),
            is_weight: None,
            mask: &mask[..n_keep],
            rows: kept,
        };
        let cfg_kept = PolicyLossCfg {
            agg: agg_kept,
            ..cfg
        };
        let sk = Cpu.policy_loss(&xk, &cfg_kept, None, None);
        assert!(
            (s.loss - scale * sk.loss).abs() < 1e-12,
            "{agg:?}: {} vs {} · {}",
            s.loss,
            scale,
            sk.loss
        );
        assert_eq!(s.tokens, sk.tokens);
    }
    // The value loss and the KL op skip the row the same way.
    let vs = Cpu.value_loss(
        &ValueLossInputs::<Cpu> {
            values: &new,
            values_old: old,
            returns: old,
            mask: &mask,
            rows,
        },
        &ValueLossCfg {
            clip: Some(0.2),
            agg: Aggregation::Grpo,
        },
        None,
        None,
    );
    assert!(vs.loss.is_finite());
    let kl = Cpu.kl(
        &KlInputs::<Cpu> {
            logp: &new,
            logp_ref: &lref,
            mask: &mask,
            rows,
        },
        KlEstimator::K3,
        Aggregation::Grpo,
        None,
        None,
    );
    assert!(kl.is_finite());
    // A batch with no token at all gives 0, not NaN.
    let none = vec![0.0f32; rows.n()];
    for agg in [Aggregation::Grpo, Aggregation::Bnpo] {
        let x = PolicyLossInputs::<Cpu> {
            logp: &new,
            logp_old: old,
            advantages: Advantages::PerToken(adv),
            logp_ref: None,
            entropy: None,
            is_weight: None,
            mask: &none,
            rows,
        };
        let s = Cpu.policy_loss(&x, &ppo_cfg(agg), None, None);
        assert_eq!((s.loss, s.clipfrac, s.tokens), (0.0, 0.0, 0.0));
    }
}

/// DAPO normalises by the token count of the whole accumulated batch: two micro-batches with
/// that count add up to the one-batch loss, and their gradients are the one-batch gradient.
#[test]
fn dapo_accumulates_across_micro_batches() {
    let fx = base();
    let logits = fx.f32("grpo_loss.logits");
    let ids = fx.ids("grpo_loss.completion_ids");
    let mask = fx.f32("grpo_loss.mask");
    let adv = fx.f32("grpo_loss.advantages");
    let old = fx.f32("grpo_loss.logp_old");
    let lref = fx.f32("grpo_loss.logp_ref");
    let rows = rows_of(fx, "grpo_loss.mask");
    let v = fx.shape("grpo_loss.logits")[2];
    let logp = round32(&naive_logprobs(logits, &ids, v, 1.0).0);
    let cfg = PolicyLossCfg {
        kl_coef: 0.04,
        ..ppo_cfg(Aggregation::Dapo {
            num_items: mask_sum(mask),
        })
    };
    let run = |r: std::ops::Range<usize>, dlogp: &mut [f32]| {
        let tok = r.start * rows.t..r.end * rows.t;
        let x = PolicyLossInputs::<Cpu> {
            logp: &logp[tok.clone()],
            logp_old: &old[tok.clone()],
            advantages: Advantages::PerSequence(&adv[r.clone()]),
            logp_ref: Some(&lref[tok.clone()]),
            entropy: None,
            is_weight: None,
            mask: &mask[tok],
            rows: Rows {
                b: r.len(),
                t: rows.t,
            },
        };
        Cpu.policy_loss(
            &x,
            &cfg,
            None,
            Some(PolicyLossGrad {
                dlogp,
                dentropy: None,
                dloss: 1.0,
            }),
        )
        .loss
    };
    let mut g_full = vec![0.0f32; rows.n()];
    let full = run(0..rows.b, &mut g_full);
    let half = rows.b / 2;
    let mut g_split = vec![0.0f32; rows.n()];
    let (g0, g1) = g_split.split_at_mut(half * rows.t);
    let split = run(0..half, g0) + run(half..rows.b, g1);
    assert!((full - split).abs() < 1e-12, "{full} vs {split}");
    assert_eq!(g_full, g_split);
    // With one micro-batch, DAPO is BNPO.
    fx.check_scalar("grpo_loss.loss_dapo_beta0.04", full);
}

/// Gradients add into their buffers and scale with `dloss` (the backward convention).
#[test]
fn gradients_accumulate_and_scale() {
    let fx = base();
    let rows = rows_of(fx, "ppo.mask");
    let x = PolicyLossInputs::<Cpu> {
        logp: fx.f32("ppo.logp_new"),
        logp_old: fx.f32("ppo.logp_old"),
        advantages: Advantages::PerToken(fx.f32("ppo.advantages")),
        logp_ref: Some(fx.f32("kl.ref_logp")),
        entropy: None,
        is_weight: None,
        mask: fx.f32("ppo.mask"),
        rows,
    };
    let cfg = PolicyLossCfg {
        kl_coef: 0.04,
        ..ppo_cfg(Aggregation::Grpo)
    };
    let grad = |dloss: f32, init: f32| {
        let mut d = vec![init; rows.n()];
        let s = Cpu.policy_loss(
            &x,
            &cfg,
            None,
            Some(PolicyLossGrad {
                dlogp: &mut d,
                dentropy: None,
                dloss,
            }),
        );
        (s, d)
    };
    let (s1, g1) = grad(1.0, 0.0);
    let (s2, g2) = grad(0.5, 1.0);
    assert_eq!(s1, s2, "the forward does not depend on the gradient target");
    for (a, b) in g1.iter().zip(&g2) {
        assert!((0.5 * a + 1.0 - b).abs() < 1e-6);
    }
    // Deterministic: the same call gives the same bits.
    let (s3, g3) = grad(1.0, 0.0);
    assert_eq!(s1, s3);
    assert_eq!(g1, g3);
}

/// TRL's GRPO per-token loss with `vllm_importance_sampling_correction`, in f64 from the same
/// f32 inputs: `-min(r·A, clip(r)·A) · w + β·k3`, aggregated as `grpo` (each row's masked mean,
/// then the mean over rows) with the mask's token counts. Returns the per-token losses (0 on
/// pads) and the loss.
#[allow(clippy::too_many_arguments)]
fn trl_weighted_grpo(
    logp: &[f32],
    old: &[f32],
    adv: &[f32],
    lref: &[f32],
    w: &[f32],
    mask: &[f32],
    rows: Rows,
    cfg: &PolicyLossCfg,
) -> (Vec<f64>, f64) {
    let (lo, hi) = (1.0 - cfg.clip_low as f64, 1.0 + cfg.clip_high as f64);
    let mut per_token = vec![0.0; rows.n()];
    let mut loss = 0.0;
    assert_eq!(adv.len(), rows.b, "one advantage per row");
    for (b, &a) in adv.iter().enumerate() {
        let (mut sum, mut count) = (0.0, 0.0);
        let a = a as f64;
        for t in 0..rows.t {
            let i = b * rows.t + t;
            if mask[i] == 0.0 {
                continue;
            }
            let r = (logp[i] as f64 - old[i] as f64).exp();
            let surrogate = -(r * a).min(r.clamp(lo, hi) * a);
            let x = lref[i] as f64 - logp[i] as f64;
            let k3 = x.exp() - x - 1.0;
            per_token[i] = surrogate * w[i] as f64 + cfg.kl_coef as f64 * k3;
            sum += per_token[i];
            count += 1.0;
        }
        loss += sum / f64::max(count, 1.0) / rows.b as f64;
    }
    (per_token, loss)
}

/// Truncated importance-sampling weights scale each token's clipped surrogate and its gradient,
/// not the KL term, and leave the denominators to the mask (TRL's
/// `per_token_loss * importance_sampling_ratio` before `+ beta * per_token_kl`): hand-made
/// numbers against [`trl_weighted_grpo`], the gradient against finite differences. The tokens
/// include a clipped one (row 0, r ≈ 1.65 > 1.28 with A > 0), a weight of 0, weights below and
/// above 1, the cap itself, and a NaN pad.
#[test]
fn importance_weighted_policy_loss() {
    let rows = Rows { b: 2, t: 4 };
    // The pad's log-prob is finite garbage (the finite differences step it); its other inputs
    // are NaN.
    let logp = [-1.0, -0.5, -2.0, -0.7, -0.3, -1.2, -0.4, 5.0];
    let old = [-1.1, -0.2, -2.5, -0.7, -0.9, -1.0, -0.45, f32::NAN];
    let lref = [-0.9, -0.6, -1.8, -0.8, -0.5, -1.1, -0.3, f32::NAN];
    let w = [1.0, 0.5, 2.0, 0.0, 1.3, 0.8, 2.0, f32::NAN];
    let mask = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0];
    let adv = [0.7, -1.3];
    let cfg = PolicyLossCfg {
        clip_low: 0.2,
        clip_high: 0.28,
        dual_clip: None,
        kl_coef: 0.04,
        entropy_coef: 0.0,
        agg: Aggregation::Grpo,
    };
    let run = |logp: &[f32],
               w: Option<&[f32]>,
               per_token: Option<&mut [f32]>,
               grad: Option<PolicyLossGrad<'_, Cpu>>| {
        let x = PolicyLossInputs::<Cpu> {
            logp,
            logp_old: &old,
            advantages: Advantages::PerSequence(&adv[..]),
            logp_ref: Some(&lref),
            entropy: None,
            is_weight: w,
            mask: &mask,
            rows,
        };
        Cpu.policy_loss(&x, &cfg, per_token, grad)
    };
    let mut per_token = vec![f32::NAN; rows.n()];
    let mut dlogp = vec![0.0f32; rows.n()];
    let s = run(
        &logp,
        Some(&w),
        Some(&mut per_token),
        Some(PolicyLossGrad {
            dlogp: &mut dlogp,
            dentropy: None,
            dloss: 1.0,
        }),
    );
    let (want_tok, want) = trl_weighted_grpo(&logp, &old, &adv, &lref, &w, &mask, rows, &cfg);
    assert_close("weighted per_token", &widen(&per_token), &want_tok, TOL_F64);
    assert_close("weighted loss", &[s.loss], &[want], TOL_F64);
    assert_eq!(s.tokens, 7.0, "the weights leave the token count alone");
    assert!(s.clipfrac > 0.0, "the case should exercise the clip");
    fd_check("weighted loss", &logp, &dlogp, |lp| {
        run(lp, Some(&w), None, None).loss
    });
    // A zero weight leaves only the KL term's gradient on its token.
    let x = lref[3] as f64 - logp[3] as f64;
    let dk3 = 1.0 - x.exp();
    let want_d3 = cfg.kl_coef as f64 * dk3 / 4.0 / 2.0;
    assert!(
        (dlogp[3] as f64 - want_d3).abs() < 1e-8,
        "{} vs {want_d3}",
        dlogp[3]
    );

    // Weights of 1 are no correction at all, to the bit; other weights change the loss.
    let ones = [1.0f32; 8];
    let plain = run(&logp, None, None, None);
    assert_eq!(run(&logp, Some(&ones), None, None), plain);
    assert!(
        (plain.loss - s.loss).abs() > 1e-3,
        "{} vs {}",
        plain.loss,
        s.loss
    );
}
