//! The loss family on the CPU: the reference the loss kernels are validated against.
//!
//! Inputs are f32 but every per-token expression is evaluated in f64 and every reduction
//! accumulates in f64: the reference should carry no rounding of its own beyond the final f32
//! store, so a gap to another backend is that backend's. Rows are processed in parallel; each
//! row's partial sums are combined in row order afterwards, so results never depend on thread
//! scheduling (DESIGN.md principle 9).

use super::Cpu;
use crate::backend::loss::{
    Advantages, Aggregation, BtCfg, BtGrad, BtStats, DpoCfg, DpoGrad, DpoInputs, DpoLoss,
    DpoOutputs, DpoStats, GaeCfg, Grad, GroupAdvCfg, GroupAdvStats, GroupBaseline, GroupScale,
    KlEstimator, KlInputs, KlRewardCfg, LossOps, PolicyLossCfg, PolicyLossGrad, PolicyLossInputs,
    PolicyLossStats, Rows, ValueLossCfg, ValueLossInputs, ValueLossStats,
};
use rayon::prelude::*;

/// TRL's `masked_whiten` adds this to the variance; OpenRLHF's REINFORCE++ adds it to the std.
const WHITEN_EPS: f64 = 1e-8;

/// Runs `f(b, outs_b)` for every row in parallel, where `outs_b` holds row `b`'s slice of each
/// given (B*T) output, and returns the per-row results in row order (for a fixed-order reduction).
fn par_rows<const K: usize, A: Send>(
    rows: Rows,
    outs: [Option<&mut [f32]>; K],
    f: impl Fn(usize, [Option<&mut [f32]>; K]) -> A + Sync,
) -> Vec<A> {
    let mut per_row: Vec<[Option<&mut [f32]>; K]> =
        (0..rows.b).map(|_| std::array::from_fn(|_| None)).collect();
    for (k, out) in outs.into_iter().enumerate() {
        if let Some(s) = out {
            assert_eq!(s.len(), rows.n(), "output length must be B*T");
            if rows.t > 0 {
                for (b, chunk) in s.chunks_mut(rows.t).enumerate() {
                    per_row[b][k] = Some(chunk);
                }
            }
        }
    }
    per_row
        .into_par_iter()
        .enumerate()
        .map(|(b, o)| f(b, o))
        .collect()
}

/// Mask sum of each row, f64.
fn row_counts(mask: &[f32], rows: Rows) -> Vec<f64> {
    assert_eq!(mask.len(), rows.n(), "mask length must be B*T");
    if rows.t == 0 {
        return vec![0.0; rows.b];
    }
    mask.par_chunks(rows.t)
        .map(|r| r.iter().map(|&m| m as f64).sum())
        .collect()
}

/// Per-row token weights of an aggregation, and the batch's total mask sum.
fn row_weights(agg: Aggregation, mask: &[f32], rows: Rows) -> (Vec<f64>, f64) {
    let counts = row_counts(mask, rows);
    let total: f64 = counts.iter().sum();
    let w = counts
        .iter()
        .map(|&c| agg.row_weight(rows, c, total))
        .collect();
    (w, total)
}

/// Adds `v` to `out[i]` if the output exists.
#[inline]
fn add_to(out: &mut Option<&mut [f32]>, i: usize, v: f64) {
    if let Some(o) = out {
        o[i] += v as f32;
    }
}

/// Stores `v` to `out[i]` if the output exists.
#[inline]
fn store(out: &mut Option<&mut [f32]>, i: usize, v: f64) {
    if let Some(o) = out {
        o[i] = v as f32;
    }
}

/// `log(1 + exp(x))` without overflow.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// The logistic function without overflow.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// A KL estimator and its derivative w.r.t. `logp`, for `delta = logp - logp_ref`.
fn kl_and_grad(estimator: KlEstimator, delta: f64) -> (f64, f64) {
    match estimator {
        KlEstimator::K1 => (delta, 1.0),
        KlEstimator::K2 => (0.5 * delta * delta, delta),
        // exp(-δ) + δ - 1 written with expm1: it is ~δ²/2 for small δ, where the plain form
        // cancels catastrophically.
        KlEstimator::K3 => ((-delta).exp_m1() + delta, 1.0 - (-delta).exp()),
    }
}

/// Masked mean and the masked sum of squared deviations over all tokens, in a fixed order.
fn masked_moments(x: &[f32], mask: &[f32], rows: Rows) -> (f64, f64, f64) {
    if rows.t == 0 {
        return (0.0, 0.0, 0.0);
    }
    let sums: Vec<(f64, f64)> = x
        .par_chunks(rows.t)
        .zip(mask.par_chunks(rows.t))
        .map(|(xr, mr)| {
            xr.iter().zip(mr).fold((0.0, 0.0), |(s, c), (&v, &m)| {
                if m == 0.0 {
                    (s, c)
                } else {
                    (s + m as f64 * v as f64, c + m as f64)
                }
            })
        })
        .collect();
    let (sum, count) = sums
        .iter()
        .fold((0.0, 0.0), |(s, c), &(rs, rc)| (s + rs, c + rc));
    let mean = sum / count.max(1.0);
    let sq: Vec<f64> = x
        .par_chunks(rows.t)
        .zip(mask.par_chunks(rows.t))
        .map(|(xr, mr)| {
            xr.iter()
                .zip(mr)
                .filter(|(_, &m)| m != 0.0)
                .map(|(&v, &m)| m as f64 * (v as f64 - mean).powi(2))
                .sum()
        })
        .collect();
    (mean, sq.iter().sum(), count)
}

/// `x = (x - mean) · scale` on unmasked tokens, 0 on pads.
fn normalise(x: &mut [f32], mask: &[f32], mean: f64, scale: f64) {
    x.par_iter_mut().zip(mask.par_iter()).for_each(|(v, &m)| {
        *v = if m == 0.0 {
            0.0
        } else {
            ((*v as f64 - mean) * scale) as f32
        };
    });
}

impl LossOps for Cpu {
    fn masked_row_sum(
        &self,
        sums: &mut [f32],
        counts: Option<&mut [f32]>,
        x: &[f32],
        mask: &[f32],
        rows: Rows,
    ) {
        assert_eq!(x.len(), rows.n());
        assert_eq!(mask.len(), rows.n());
        assert_eq!(sums.len(), rows.b);
        let per_row: Vec<(f64, f64)> = (0..rows.b)
            .into_par_iter()
            .map(|b| {
                let r = b * rows.t..(b + 1) * rows.t;
                x[r.clone()]
                    .iter()
                    .zip(&mask[r])
                    .filter(|(_, &m)| m != 0.0)
                    .fold((0.0, 0.0), |(s, c), (&v, &m)| {
                        (s + m as f64 * v as f64, c + m as f64)
                    })
            })
            .collect();
        for (s, &(rs, _)) in sums.iter_mut().zip(&per_row) {
            *s = rs as f32;
        }
        if let Some(counts) = counts {
            assert_eq!(counts.len(), rows.b);
            for (c, &(_, rc)) in counts.iter_mut().zip(&per_row) {
                *c = rc as f32;
            }
        }
    }

    fn masked_row_sum_backward(&self, dx: &mut [f32], dsums: &[f32], mask: &[f32], rows: Rows) {
        assert_eq!(dsums.len(), rows.b);
        assert_eq!(mask.len(), rows.n());
        par_rows(rows, [Some(dx)], |b, [dx]| {
            let dx = dx.expect("dx given");
            let m = &mask[b * rows.t..(b + 1) * rows.t];
            for (d, &m) in dx.iter_mut().zip(m) {
                if m != 0.0 {
                    *d += m * dsums[b];
                }
            }
        });
    }

    fn kl(
        &self,
        x: &KlInputs<'_, Self>,
        estimator: KlEstimator,
        agg: Aggregation,
        per_token: Option<&mut [f32]>,
        grad: Option<Grad<'_, Self>>,
    ) -> f64 {
        let rows = x.rows;
        assert_eq!(x.logp.len(), rows.n());
        assert_eq!(x.logp_ref.len(), rows.n());
        let (w, _) = row_weights(agg, x.mask, rows);
        let (dx, dloss) = match grad {
            Some(g) => (Some(g.dx), g.dloss as f64),
            None => (None, 0.0),
        };
        let partial = par_rows(rows, [per_token, dx], |b, [mut out, mut dx]| {
            let mut acc = 0.0;
            for t in 0..rows.t {
                let i = b * rows.t + t;
                let m = x.mask[i] as f64;
                if m == 0.0 {
                    store(&mut out, t, 0.0);
                    continue;
                }
                let (k, dk) = kl_and_grad(estimator, x.logp[i] as f64 - x.logp_ref[i] as f64);
                store(&mut out, t, k);
                acc += m * k;
                add_to(&mut dx, t, dloss * w[b] * m * dk);
            }
            w[b] * acc
        });
        partial.iter().sum()
    }

    fn policy_loss(
        &self,
        x: &PolicyLossInputs<'_, Self>,
        cfg: &PolicyLossCfg,
        per_token: Option<&mut [f32]>,
        grad: Option<PolicyLossGrad<'_, Self>>,
    ) -> PolicyLossStats {
        let rows = x.rows;
        assert_eq!(x.logp.len(), rows.n());
        assert_eq!(x.logp_old.len(), rows.n());
        match x.advantages {
            Advantages::PerToken(a) => assert_eq!(a.len(), rows.n()),
            Advantages::PerSequence(a) => assert_eq!(a.len(), rows.b),
        }
        assert!(
            cfg.kl_coef == 0.0 || x.logp_ref.is_some(),
            "kl_coef != 0 needs logp_ref"
        );
        assert!(
            cfg.entropy_coef == 0.0 || x.entropy.is_some(),
            "entropy_coef != 0 needs entropy"
        );
        if let Some(r) = x.logp_ref {
            assert_eq!(r.len(), rows.n());
        }
        if let Some(e) = x.entropy {
            assert_eq!(e.len(), rows.n());
        }
        if let Some(iw) = x.is_weight {
            assert_eq!(iw.len(), rows.n(), "is_weight length must be B*T");
        }
        let (w, total) = row_weights(cfg.agg, x.mask, rows);
        let (dlogp, dentropy, dloss) = match grad {
            Some(g) => (Some(g.dlogp), g.dentropy, g.dloss as f64),
            None => (None, None, 0.0),
        };
        let lo = 1.0 - cfg.clip_low as f64;
        let hi = 1.0 + cfg.clip_high as f64;
        let beta = cfg.kl_coef as f64;
        let ent_coef = cfg.entropy_coef as f64;

        // Per row: [weighted loss, clipped, dual-clipped, approx-kl, kl, entropy] token sums.
        let partial = par_rows(
            rows,
            [per_token, dlogp, dentropy],
            |b, [mut out, mut dlogp, mut dent]| {
                let mut acc = [0.0f64; 6];
                for t in 0..rows.t {
                    let i = b * rows.t + t;
                    let m = x.mask[i] as f64;
                    if m == 0.0 {
                        store(&mut out, t, 0.0);
                        continue;
                    }
                    let a = match x.advantages {
                        Advantages::PerToken(a) => a[i],
                        Advantages::PerSequence(a) => a[b],
                    } as f64;
                    let d = x.logp[i] as f64 - x.logp_old[i] as f64;
                    let r = d.exp();
                    let unclipped = -a * r;
                    let clipped = -a * r.clamp(lo, hi);
                    // Inside the clip range both terms are equal and both carry -A·r; outside it
                    // the clipped term is constant, so it contributes nothing when it wins.
                    let is_clipped = clipped > unclipped;
                    let (mut l, mut g) = if is_clipped {
                        (clipped, 0.0)
                    } else {
                        (unclipped, -a * r)
                    };
                    let mut dual = false;
                    if let Some(c) = cfg.dual_clip {
                        let cap = -a * c as f64;
                        if a < 0.0 && l > cap {
                            (l, g, dual) = (cap, 0.0, true);
                        }
                    }
                    // TRL multiplies the clipped surrogate by the (constant) truncated IS ratio
                    // before adding the KL term: `per_token_loss * importance_sampling_ratio`.
                    if let Some(iw) = x.is_weight {
                        let iw = iw[i] as f64;
                        (l, g) = (iw * l, iw * g);
                    }
                    if let Some(lr) = x.logp_ref {
                        let (k3, dk3) =
                            kl_and_grad(KlEstimator::K3, x.logp[i] as f64 - lr[i] as f64);
                        acc[4] += m * k3;
                        l += beta * k3;
                        g += beta * dk3;
                    }
                    if let Some(e) = x.entropy {
                        let h = e[i] as f64;
                        acc[5] += m * h;
                        l -= ent_coef * h;
                        add_to(&mut dent, t, -dloss * w[b] * m * ent_coef);
                    }
                    store(&mut out, t, l);
                    add_to(&mut dlogp, t, dloss * w[b] * m * g);
                    acc[0] += w[b] * m * l;
                    acc[1] += m * is_clipped as u8 as f64;
                    acc[2] += m * dual as u8 as f64;
                    acc[3] += m * 0.5 * d * d;
                }
                acc
            },
        );
        let mut s = [0.0f64; 6];
        for p in &partial {
            for (s, p) in s.iter_mut().zip(p) {
                *s += p;
            }
        }
        let n = total.max(1.0);
        PolicyLossStats {
            loss: s[0],
            clipfrac: s[1] / n,
            dual_clipfrac: s[2] / n,
            approx_kl: s[3] / n,
            kl: s[4] / n,
            entropy: s[5] / n,
            tokens: total,
        }
    }

    fn value_loss(
        &self,
        x: &ValueLossInputs<'_, Self>,
        cfg: &ValueLossCfg,
        per_token: Option<&mut [f32]>,
        grad: Option<Grad<'_, Self>>,
    ) -> ValueLossStats {
        let rows = x.rows;
        assert_eq!(x.values.len(), rows.n());
        assert_eq!(x.values_old.len(), rows.n());
        assert_eq!(x.returns.len(), rows.n());
        let (w, total) = row_weights(cfg.agg, x.mask, rows);
        let (dx, dloss) = match grad {
            Some(g) => (Some(g.dx), g.dloss as f64),
            None => (None, 0.0),
        };
        let partial = par_rows(rows, [per_token, dx], |b, [mut out, mut dx]| {
            let (mut loss, mut clipped_n) = (0.0, 0.0);
            for t in 0..rows.t {
                let i = b * rows.t + t;
                let m = x.mask[i] as f64;
                if m == 0.0 {
                    store(&mut out, t, 0.0);
                    continue;
                }
                let (v, r) = (x.values[i] as f64, x.returns[i] as f64);
                let e1 = (v - r) * (v - r);
                let (mut e, mut g, mut is_clipped) = (e1, v - r, false);
                if let Some(eps) = cfg.clip {
                    let vo = x.values_old[i] as f64;
                    let vc = v.clamp(vo - eps as f64, vo + eps as f64);
                    let e2 = (vc - r) * (vc - r);
                    // The clipped error only wins when V is outside the range, where the clamp
                    // is constant: no gradient then.
                    if e2 > e1 {
                        (e, g, is_clipped) = (e2, 0.0, true);
                    }
                }
                let l = 0.5 * e;
                store(&mut out, t, l);
                add_to(&mut dx, t, dloss * w[b] * m * g);
                loss += w[b] * m * l;
                clipped_n += m * is_clipped as u8 as f64;
            }
            (loss, clipped_n)
        });
        let (loss, clipped) = partial
            .iter()
            .fold((0.0, 0.0), |(l, c), &(pl, pc)| (l + pl, c + pc));
        ValueLossStats {
            loss,
            clipfrac: clipped / total.max(1.0),
            tokens: total,
        }
    }

    fn kl_shaped_rewards(
        &self,
        rewards: &mut [f32],
        logp: &[f32],
        logp_ref: &[f32],
        scores: &[f32],
        mask: &[f32],
        rows: Rows,
        cfg: &KlRewardCfg,
    ) {
        assert_eq!(logp.len(), rows.n());
        assert_eq!(logp_ref.len(), rows.n());
        assert_eq!(mask.len(), rows.n());
        assert_eq!(scores.len(), rows.b);
        let coef = cfg.kl_coef as f64;
        par_rows(rows, [Some(rewards)], |b, [out]| {
            let out = out.expect("rewards given");
            let mut last = None;
            for (t, o) in out.iter_mut().enumerate() {
                let i = b * rows.t + t;
                if mask[i] == 0.0 {
                    *o = 0.0;
                    continue;
                }
                let (k, _) = kl_and_grad(cfg.estimator, logp[i] as f64 - logp_ref[i] as f64);
                *o = (-coef * k) as f32;
                last = Some(t);
            }
            if let Some(t) = last {
                let i = b * rows.t + t;
                let k = kl_and_grad(cfg.estimator, logp[i] as f64 - logp_ref[i] as f64).0;
                // Recomputed in f64 so the score is added before the single f32 rounding.
                out[t] = (-coef * k + scores[b] as f64) as f32;
            }
        });
    }

    fn gae(
        &self,
        advantages: &mut [f32],
        returns: &mut [f32],
        rewards: &[f32],
        values: &[f32],
        mask: &[f32],
        rows: Rows,
        cfg: &GaeCfg,
    ) {
        assert_eq!(rewards.len(), rows.n());
        assert_eq!(values.len(), rows.n());
        assert_eq!(mask.len(), rows.n());
        let (gamma, lam) = (cfg.gamma as f64, cfg.lam as f64);
        par_rows(
            rows,
            [Some(&mut *advantages), Some(returns)],
            |b, [adv, ret]| {
                let (adv, ret) = (adv.expect("given"), ret.expect("given"));
                // Walking backwards, `next_*` describe the next unmasked token of the sequence; a
                // pad after the last token ends it (bootstrap 0), as in TRL's zero-padded loop.
                let (mut next_value, mut next_adv) = (0.0f64, 0.0f64);
                for t in (0..rows.t).rev() {
                    let i = b * rows.t + t;
                    if mask[i] == 0.0 {
                        (adv[t], ret[t]) = (0.0, 0.0);
                        (next_value, next_adv) = (0.0, 0.0);
                        continue;
                    }
                    let v = values[i] as f64;
                    let delta = rewards[i] as f64 + gamma * next_value - v;
                    let a = delta + gamma * lam * next_adv;
                    adv[t] = a as f32;
                    ret[t] = (a + v) as f32;
                    (next_value, next_adv) = (v, a);
                }
            },
        );
        if cfg.whiten {
            // TRL masked_whiten: unbiased masked variance, eps inside the square root.
            let (mean, sq, count) = masked_moments(advantages, mask, rows);
            let var = sq / count.max(1.0);
            let var = if count > 1.0 {
                var * count / (count - 1.0)
            } else {
                var
            };
            normalise(advantages, mask, mean, 1.0 / (var + WHITEN_EPS).sqrt());
        }
    }

    fn reinforce_pp(
        &self,
        advantages: &mut [f32],
        returns: &mut [f32],
        rewards: &[f32],
        mask: &[f32],
        rows: Rows,
        gamma: f32,
    ) {
        assert_eq!(rewards.len(), rows.n());
        assert_eq!(mask.len(), rows.n());
        assert_eq!(advantages.len(), rows.n());
        let gamma = gamma as f64;
        par_rows(rows, [Some(&mut *returns)], |b, [ret]| {
            let ret = ret.expect("given");
            let mut acc = 0.0f64;
            for t in (0..rows.t).rev() {
                let i = b * rows.t + t;
                if mask[i] == 0.0 {
                    ret[t] = 0.0;
                    acc = 0.0;
                    continue;
                }
                acc = rewards[i] as f64 + gamma * acc;
                ret[t] = acc as f32;
            }
        });
        // Whitening reads the f32-stored returns, as the reference (and a device kernel) does.
        let (mean, sq, count) = masked_moments(returns, mask, rows);
        let std = (sq / count.max(1.0)).sqrt();
        advantages.copy_from_slice(returns);
        normalise(advantages, mask, mean, 1.0 / (std + WHITEN_EPS));
    }

    fn group_advantages(
        &self,
        advantages: &mut [f32],
        baseline: Option<&mut [f32]>,
        group_std: Option<&mut [f32]>,
        rewards: &[f32],
        n: usize,
        cfg: &GroupAdvCfg,
    ) -> GroupAdvStats {
        let g = cfg.group;
        assert!(
            g > 0 && n.is_multiple_of(g),
            "{n} rewards do not split into groups of {g}"
        );
        assert!(
            g > 1 || cfg.baseline != GroupBaseline::LeaveOneOut,
            "leave-one-out needs groups of at least 2"
        );
        assert_eq!(rewards.len(), n);
        assert_eq!(advantages.len(), n);
        let r: Vec<f64> = rewards.iter().map(|&v| v as f64).collect();
        // Unbiased std; a lone sample has none (TRL would give NaN).
        let std_of = |xs: &[f64]| -> f64 {
            if xs.len() < 2 {
                return 0.0;
            }
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            let ss: f64 = xs.iter().map(|v| (v - mean).powi(2)).sum();
            (ss / (xs.len() - 1) as f64).sqrt()
        };
        let batch_std = if cfg.scale == GroupScale::Batch {
            std_of(&r)
        } else {
            0.0
        };
        let eps = cfg.eps as f64;
        let mut base = vec![0.0f64; n];
        let mut stds = vec![0.0f64; n];
        let mut zero_std = 0usize;
        for (k, grp) in r.chunks(g).enumerate() {
            let sum: f64 = grp.iter().sum();
            let std = std_of(grp);
            // torch.isclose(std, 0) with its default atol, as TRL counts zero-std groups.
            if std <= 1e-8 {
                zero_std += 1;
            }
            for (j, &v) in grp.iter().enumerate() {
                let i = k * g + j;
                base[i] = match cfg.baseline {
                    GroupBaseline::Mean => sum / g as f64,
                    GroupBaseline::LeaveOneOut => (sum - v) / (g - 1) as f64,
                };
                stds[i] = std;
            }
        }
        for i in 0..n {
            let centred = r[i] - base[i];
            advantages[i] = match cfg.scale {
                GroupScale::None => centred,
                GroupScale::Group => centred / (stds[i] + eps),
                GroupScale::Batch => centred / (batch_std + eps),
            } as f32;
        }
        if let Some(out) = baseline {
            for (o, &v) in out.iter_mut().zip(&base) {
                *o = v as f32;
            }
        }
        if let Some(out) = group_std {
            for (o, &v) in out.iter_mut().zip(&stds) {
                *o = v as f32;
            }
        }
        GroupAdvStats {
            frac_zero_std: zero_std as f64 / (n / g).max(1) as f64,
        }
    }

    fn bt_loss(
        &self,
        chosen: &[f32],
        rejected: &[f32],
        margin: Option<&[f32]>,
        p: usize,
        cfg: &BtCfg,
        grad: Option<BtGrad<'_, Self>>,
    ) -> BtStats {
        assert_eq!(chosen.len(), p);
        assert_eq!(rejected.len(), p);
        if let Some(m) = margin {
            assert_eq!(m.len(), p);
        }
        let inv_p = 1.0 / p.max(1) as f64;
        let c = cfg.center_coef as f64;
        let (mut loss, mut correct, mut gap) = (0.0, 0.0, 0.0);
        let mut grads = grad;
        for i in 0..p {
            let (rc, rr) = (chosen[i] as f64, rejected[i] as f64);
            let z = rc - rr - margin.map_or(0.0, |m| m[i] as f64);
            let s = rc + rr;
            // -logσ(z) = softplus(-z); its derivative is -σ(-z).
            loss += softplus(-z) + c * s * s;
            correct += (rc > rr) as u8 as f64;
            gap += rc - rr;
            if let Some(g) = grads.as_mut() {
                let dl = g.dloss as f64 * inv_p;
                let dz = -sigmoid(-z);
                g.dchosen[i] += (dl * (dz + 2.0 * c * s)) as f32;
                g.drejected[i] += (dl * (-dz + 2.0 * c * s)) as f32;
            }
        }
        BtStats {
            loss: loss * inv_p,
            accuracy: correct * inv_p,
            margin: gap * inv_p,
        }
    }

    fn dpo_loss(
        &self,
        x: &DpoInputs<'_, Self>,
        cfg: &DpoCfg,
        mut out: DpoOutputs<'_, Self>,
        grad: Option<DpoGrad<'_, Self>>,
    ) -> DpoStats {
        let p = x.pairs;
        for v in [
            x.policy_chosen,
            x.policy_rejected,
            x.ref_chosen,
            x.ref_rejected,
        ] {
            assert_eq!(v.len(), p);
        }
        let lens = match cfg.loss {
            DpoLoss::Ipo => {
                let (lc, lr) = x
                    .chosen_len
                    .zip(x.rejected_len)
                    .expect("IPO needs chosen_len and rejected_len");
                assert_eq!(lc.len(), p);
                assert_eq!(lr.len(), p);
                Some((lc, lr))
            }
            _ => None,
        };
        let beta = cfg.beta as f64;
        let eps = cfg.label_smoothing as f64;
        let inv_p = 1.0 / p.max(1) as f64;
        let mut grads = grad;
        let mut s = DpoStats::default();
        for i in 0..p {
            // IPO normalises each log-ratio by its completion length (clamped to 1, as TRL).
            let (nc, nr) = lens.map_or((1.0, 1.0), |(lc, lr)| {
                ((lc[i] as f64).max(1.0), (lr[i] as f64).max(1.0))
            });
            let ratio_c = (x.policy_chosen[i] as f64 - x.ref_chosen[i] as f64) / nc;
            let ratio_r = (x.policy_rejected[i] as f64 - x.ref_rejected[i] as f64) / nr;
            let d = ratio_c - ratio_r;
            let bd = beta * d;
            // (loss, ∂loss/∂d); for every variant ∂d/∂π_c = 1/nc and ∂d/∂π_r = -1/nr.
            let (l, dl_dd) = match cfg.loss {
                DpoLoss::Sigmoid => (
                    (1.0 - eps) * softplus(-bd) + eps * softplus(bd),
                    beta * (-(1.0 - eps) * sigmoid(-bd) + eps * sigmoid(bd)),
                ),
                DpoLoss::Robust => (
                    ((1.0 - eps) * softplus(-bd) - eps * softplus(bd)) / (1.0 - 2.0 * eps),
                    beta * (-(1.0 - eps) * sigmoid(-bd) - eps * sigmoid(bd)) / (1.0 - 2.0 * eps),
                ),
                DpoLoss::Hinge => {
                    if 1.0 - bd > 0.0 {
                        (1.0 - bd, -beta)
                    } else {
                        (0.0, 0.0)
                    }
                }
                DpoLoss::Ipo => {
                    let h = d - 1.0 / (2.0 * beta);
                    (h * h, 2.0 * h)
                }
            };
            let (rw_c, rw_r) = (beta * ratio_c, beta * ratio_r);
            store(&mut out.losses, i, l);
            store(&mut out.chosen_rewards, i, rw_c);
            store(&mut out.rejected_rewards, i, rw_r);
            s.loss += l;
            s.accuracy += (rw_c > rw_r) as u8 as f64;
            s.margin += rw_c - rw_r;
            s.chosen_reward += rw_c;
            s.rejected_reward += rw_r;
            if let Some(g) = grads.as_mut() {
                let k = g.dloss as f64 * inv_p * dl_dd;
                g.dchosen[i] += (k / nc) as f32;
                g.drejected[i] -= (k / nr) as f32;
            }
        }
        DpoStats {
            loss: s.loss * inv_p,
            accuracy: s.accuracy * inv_p,
            margin: s.margin * inv_p,
            chosen_reward: s.chosen_reward * inv_p,
            rejected_reward: s.rejected_reward * inv_p,
        }
    }
}
