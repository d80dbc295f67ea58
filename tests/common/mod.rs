//! Shared test helpers: a finite-difference gradient checker, a closeness check for forward
//! results, and random test vectors from the engine's seeded generator.
//!
//! Gradient checks follow one recipe: pick fixed random weights `r`, define the scalar loss
//! `L(x) = Σ r·op(x)` (accumulated in f64 by [`weighted_sum`]), get the analytic gradient by
//! running the op's backward with `dout = r`, and compare it with [`check_grad`]'s numerical
//! derivative of `L`.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

/// How to difference and how close is close enough: an element passes when
/// `|numeric - analytic| <= abs + rel · max(|numeric|, |analytic|)`.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    /// Absolute perturbation `h`: choose it near 1e-2 of the scale over which the function bends
    /// (the difference is 4th-order accurate, so a large step costs little truncation error and
    /// keeps f32 rounding noise, which is divided by `h`, small).
    pub step: f32,
    pub abs: f64,
    pub rel: f64,
}

/// The element that came closest to failing (or failed by most).
#[derive(Clone, Copy, Debug)]
pub struct Worst {
    pub index: usize,
    pub numeric: f64,
    pub analytic: f64,
    /// `|numeric - analytic| / (abs + rel·max(|numeric|, |analytic|))`: above 1 fails.
    pub ratio: f64,
}

/// The derivative of `f` along coordinate `i` at `x`, by Richardson-extrapolated central
/// differences: `D(h) = (f(x+h) - f(x-h)) / 2h` has error `f'''h²/6 + O(h⁴)`, so
/// `(4·D(h) - D(2h))/3` is accurate to `O(h⁴)`. The spacings actually used are the f32-rounded
/// ones (`(x+h) - (x-h)` computed from the perturbed values), so rounding of `x ± h` costs
/// nothing.
pub fn numeric_grad(f: &impl Fn(&[f32]) -> f64, x: &[f32], i: usize, step: f32) -> f64 {
    let mut xp = x.to_vec();
    let mut at = |v: f32| {
        xp[i] = v;
        (f(&xp), v as f64)
    };
    let central = |h: f32, at: &mut dyn FnMut(f32) -> (f64, f64)| {
        let (fp, vp) = at(x[i] + h);
        let (fm, vm) = at(x[i] - h);
        (fp - fm) / (vp - vm)
    };
    let d1 = central(step, &mut at);
    let d2 = central(2.0 * step, &mut at);
    (4.0 * d1 - d2) / 3.0
}

/// Checks `analytic` against numerical derivatives of `f` at `x` for every coordinate.
/// Returns the element closest to failing, or an error naming the failures (worst first).
pub fn check_grad(
    f: impl Fn(&[f32]) -> f64,
    x: &[f32],
    analytic: &[f32],
    tol: Tol,
) -> Result<Worst, String> {
    let all: Vec<usize> = (0..x.len()).collect();
    check_grad_at(f, x, analytic, &all, tol)
}

/// [`check_grad`] on the given coordinates only (for inputs too large to difference fully).
pub fn check_grad_at(
    f: impl Fn(&[f32]) -> f64,
    x: &[f32],
    analytic: &[f32],
    indices: &[usize],
    tol: Tol,
) -> Result<Worst, String> {
    assert_eq!(
        x.len(),
        analytic.len(),
        "check_grad: x and analytic differ in length"
    );
    let mut worst: Option<Worst> = None;
    let mut failures = Vec::new();
    for &i in indices {
        let numeric = numeric_grad(&f, x, i, tol.step);
        let a = analytic[i] as f64;
        let allowed = tol.abs + tol.rel * numeric.abs().max(a.abs());
        let ratio = (numeric - a).abs() / allowed;
        let this = Worst {
            index: i,
            numeric,
            analytic: a,
            ratio: if ratio.is_nan() { f64::INFINITY } else { ratio },
        };
        if worst.is_none_or(|w| this.ratio > w.ratio) {
            worst = Some(this);
        }
        if this.ratio > 1.0 {
            failures.push(this);
        }
    }
    let worst = worst.ok_or("check_grad: no coordinates to check")?;
    if failures.is_empty() {
        return Ok(worst);
    }
    failures.sort_by(|a, b| b.ratio.total_cmp(&a.ratio));
    let shown: Vec<String> = failures
        .iter()
        .take(5)
        .map(|w| {
            format!(
                "[{}] numeric {:.6e} analytic {:.6e} ({:.1}x tolerance)",
                w.index, w.numeric, w.analytic, w.ratio
            )
        })
        .collect();
    Err(format!(
        "{} of {} gradient elements out of tolerance (abs {:e}, rel {:e}, step {:e}); worst: {}",
        failures.len(),
        indices.len(),
        tol.abs,
        tol.rel,
        tol.step,
        shown.join("; ")
    ))
}

/// `Σ r[i]·out[i]` in f64: the scalar loss whose gradient w.r.t. `out` is `r`.
pub fn weighted_sum(r: &[f32], out: &[f32]) -> f64 {
    assert_eq!(r.len(), out.len(), "weighted_sum: lengths differ");
    r.iter().zip(out).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Checks `|got - want| <= abs + rel·|want|` elementwise; the error names the worst element and
/// how many fail.
pub fn check_close(
    what: &str,
    got: &[f32],
    want: &[f64],
    abs: f64,
    rel: f64,
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    let mut worst = (0usize, 0.0f64);
    let mut bad = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ratio = (g as f64 - w).abs() / (abs + rel * w.abs());
        let ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
        if ratio > 1.0 {
            bad += 1;
        }
        if ratio > worst.1 {
            worst = (i, ratio);
        }
    }
    if bad == 0 {
        Ok(())
    } else {
        let i = worst.0;
        Err(format!(
            "{what}: {bad} of {} values out of tolerance (abs {abs:e}, rel {rel:e}); worst [{i}]: \
             got {:.7e}, expected {:.7e}",
            got.len(),
            got[i],
            want[i]
        ))
    }
}

/// The engine's seeded generator, plus vector helpers for test data.
pub use rlhf::rng::Rng;

/// Random test vectors.
pub trait RngVec {
    /// `n` values uniform in `[lo, hi)`.
    fn vec_uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32>;
    /// `n` values normal with mean 0 and standard deviation `std`.
    fn vec_normal(&mut self, n: usize, std: f32) -> Vec<f32>;
}

impl RngVec for Rng {
    fn vec_uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * self.uniform() as f32)
            .collect()
    }
    fn vec_normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| std * self.normal() as f32).collect()
    }
}
