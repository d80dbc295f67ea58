//! The CUDA kernels in `kernels/`, run by the CPU emulation shim (`rlhf::backend::emu`) and, where
//! a GPU is present, by the CUDA backend (`rlhf::backend::cuda`), against the CPU reference and the
//! TRL/PyTorch fixtures in `shared/fixtures/losses`; and the shim's own self-tests (DESIGN.md
//! principle 3).
//!
//! - `cpu::*`, `emu::*`, `cuda::*`: one suite, parameterised by backend. Each `fixture_*` function
//!   runs ops on any backend through the [`LossOps`] trait (the log-prob op through
//!   [`LogprobOps`]) and checks them against the fixtures; `backend_tests!` instantiates it for
//!   the CPU reference, the emulated kernels and the device. Each `matches_cpu_*` function runs a
//!   kernel backend and the CPU reference on random small and odd shapes — one token, rows
//!   longer than a block and not a multiple of it, more rows than a scan block, vocabularies not
//!   a multiple of the block, all-masked rows, NaN on every pad — comparing every output,
//!   gradient and scalar; it is instantiated for the emulator and the device.
//! - `cuda::*` runs on CUDA device 0 when a driver and a device are present; otherwise each test
//!   says SKIPPED on stderr (which the harness does not capture) and passes. A device that is
//!   present but does not open fails them.
//! - `shim_*`: the emulator itself: shuffles, atomics, shared memory, deadlock and signature
//!   checks, the half-precision conversions, identical bits whatever the thread order, and that
//!   a kernel missing a `__syncthreads` is caught.
//!
//! Tolerances, and why (errors are scaled: `|got - want| / max(1, |want|)`):
//! - [`TOL_FIXTURE`] = 1e-5 against the fixtures' `@f64` outputs. The kernels compute each
//!   per-token value in f32 (a few ulp for the expf/expm1f chains) and sum in f64; the CPU
//!   reference is f64 throughout. The worst seen is 6.5e-7 (the entropy gradient through the
//!   emulated log-softmax); a wrong formula — an eps in the wrong place, a wrong normaliser — is
//!   off by 1e-4 or more.
//! - [`TOL_CPU`] = 1e-5 between the emulated kernels and the CPU reference on random data: the
//!   same f32-vs-f64 gap, on inputs of order 1 (log-ratios up to ±0.5, advantages ~N(0, 1)),
//!   sums over at most a few thousand values; the worst seen is 6e-7. Scalars pass at the same
//!   tolerance.
//! - bf16/f16 logits: log-probs are compared with the CPU op run on the same (widened) logits, so
//!   at [`TOL_CPU`]; logit gradients are stored in the narrow type, so they get its rounding on
//!   top: half an ulp, 2^-9 (bf16) or 2^-12 (f16) relative, checked at twice that.

mod common;

use common::{Rng, RngVec};
use half::{bf16, f16};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::cuda::{Cuda, Elem};
use rlhf::backend::emu::plan::{self, Arg, DevPtr, Kernel, Launch};
use rlhf::backend::emu::{has_kernel, Emu, Launcher, Logits, LogitsMut};
use rlhf::backend::loss::*;
use rlhf::backend::{Backend, ModelOps};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::io::Write;
use std::sync::OnceLock;

const TOL_FIXTURE: f64 = 1e-5;
const TOL_CPU: f64 = 1e-5;

// ------------------------------------------------------------------------------------------------
// comparisons
// ------------------------------------------------------------------------------------------------

/// `|got - want| <= tol · max(1, |want|)` elementwise (NaN fails), naming the worst element.
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

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn close32(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_close(what, &widen(got), &widen(want), tol);
}

// ------------------------------------------------------------------------------------------------
// fixtures
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

    fn f32(&self, name: &str) -> &[f32] {
        match &self.get(name).1 {
            Data::F32(v) => v,
            _ => panic!("{}: {name} is not F32", self.file),
        }
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        match &self.get(name).1 {
            Data::I64(v) => v.iter().map(|&x| u32::try_from(x).unwrap()).collect(),
            _ => panic!("{}: {name} is not I64", self.file),
        }
    }

    /// The `@f64` twin of an output, 0 where `mask` (if given) is 0: our ops write 0 on pads.
    fn want(&self, name: &str, mask: Option<&[f32]>) -> Vec<f64> {
        let v = match &self.get(&format!("{name}@f64")).1 {
            Data::F64(v) => v.clone(),
            _ => panic!("{}: {name}@f64 is not F64", self.file),
        };
        match mask {
            Some(m) => v
                .iter()
                .zip(m)
                .map(|(&x, &m)| if m == 0.0 { 0.0 } else { x })
                .collect(),
            None => v,
        }
    }

    fn check(&self, name: &str, got: &[f32]) {
        assert_close(name, &widen(got), &self.want(name, None), TOL_FIXTURE);
    }

    fn check_masked(&self, name: &str, got: &[f32], mask: &[f32]) {
        assert_close(name, &widen(got), &self.want(name, Some(mask)), TOL_FIXTURE);
    }

    fn check_scalar(&self, name: &str, got: f64) {
        assert_close(name, &[got], &self.want(name, None), TOL_FIXTURE);
    }

    fn rows(&self, mask: &str) -> Rows {
        let s = self.shape(mask);
        Rows { b: s[0], t: s[1] }
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

// ------------------------------------------------------------------------------------------------
// the log-prob op on each backend
// ------------------------------------------------------------------------------------------------

/// Outputs of the log-prob forward: logp, entropy, lse, each (N).
struct LogprobOut {
    logp: Vec<f32>,
    entropy: Vec<f32>,
    lse: Vec<f32>,
}

/// The fused log-softmax op (a `ModelOps` member on the CPU, the log-prob kernels on the
/// emulator) on host f32 data.
trait LogprobOps: LossOps {
    fn logprobs(&self, logits: &[f32], targets: &[u32], v: usize, temp: f32) -> LogprobOut;
    /// `dlogits` (starting from `init`) after the backward.
    #[allow(clippy::too_many_arguments)]
    fn logprobs_grad(
        &self,
        init: &[f32],
        logits: &[f32],
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
        v: usize,
        temp: f32,
    ) -> Vec<f32>;
}

impl LogprobOps for Cpu {
    fn logprobs(&self, logits: &[f32], targets: &[u32], v: usize, temp: f32) -> LogprobOut {
        let n = targets.len();
        let (mut logp, mut entropy, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        self.logprobs_forward(
            &mut logp,
            Some(&mut entropy),
            &mut lse,
            logits,
            targets,
            n,
            v,
            temp,
        );
        LogprobOut { logp, entropy, lse }
    }
    fn logprobs_grad(
        &self,
        init: &[f32],
        logits: &[f32],
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
        v: usize,
        temp: f32,
    ) -> Vec<f32> {
        let mut d = init.to_vec();
        let n = targets.len();
        self.logprobs_backward(&mut d, logits, targets, lse, dlogp, dentropy, n, v, temp);
        d
    }
}

impl LogprobOps for Emu {
    fn logprobs(&self, logits: &[f32], targets: &[u32], v: usize, temp: f32) -> LogprobOut {
        let n = targets.len();
        let (mut logp, mut entropy, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        self.logprobs_forward(
            &mut logp,
            Some(&mut entropy),
            &mut lse,
            Logits::F32(logits),
            targets,
            n,
            v,
            temp,
        );
        LogprobOut { logp, entropy, lse }
    }
    fn logprobs_grad(
        &self,
        init: &[f32],
        logits: &[f32],
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
        v: usize,
        temp: f32,
    ) -> Vec<f32> {
        let mut d = init.to_vec();
        let n = targets.len();
        self.logprobs_backward(
            LogitsMut::F32(&mut d),
            Logits::F32(logits),
            targets,
            lse,
            dlogp,
            dentropy,
            n,
            v,
            temp,
        );
        d
    }
}

impl LogprobOps for Cuda {
    fn logprobs(&self, logits: &[f32], targets: &[u32], v: usize, temp: f32) -> LogprobOut {
        let n = targets.len();
        let logits = self.upload(logits);
        let (mut logp, mut entropy, mut lse) = (self.zeros(n), self.zeros(n), self.zeros(n));
        Cuda::logprobs_forward(
            self,
            logp.view_mut(),
            Some(entropy.view_mut()),
            lse.view_mut(),
            logits.view(),
            targets,
            n,
            v,
            temp,
        )
        .unwrap();
        LogprobOut {
            logp: down(self, &logp),
            entropy: down(self, &entropy),
            lse: down(self, &lse),
        }
    }
    fn logprobs_grad(
        &self,
        init: &[f32],
        logits: &[f32],
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
        v: usize,
        temp: f32,
    ) -> Vec<f32> {
        let n = targets.len();
        let mut d = self.upload(init);
        let (logits, lse, dlogp) = (self.upload(logits), self.upload(lse), self.upload(dlogp));
        let dentropy = dentropy.map(|x| self.upload(x));
        Cuda::logprobs_backward(
            self,
            d.view_mut(),
            logits.view(),
            targets,
            lse.view(),
            dlogp.view(),
            dentropy.as_ref().map(|x| x.view()),
            n,
            v,
            temp,
        )
        .unwrap();
        down(self, &d)
    }
}

/// The log-prob kernels on host logits of any type they read (f32, bf16, f16): the emulator's
/// interface, which the device implements by uploading and downloading.
trait HalfLogprobs {
    #[allow(clippy::too_many_arguments)]
    fn logprobs_forward(
        &self,
        logp: &mut [f32],
        entropy: Option<&mut [f32]>,
        lse: &mut [f32],
        logits: Logits<'_>,
        targets: &[u32],
        n: usize,
        v: usize,
        temperature: f32,
    );
    #[allow(clippy::too_many_arguments)]
    fn logprobs_backward(
        &self,
        dlogits: LogitsMut<'_>,
        logits: Logits<'_>,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
        n: usize,
        v: usize,
        temperature: f32,
    );
}

impl HalfLogprobs for Emu {
    fn logprobs_forward(
        &self,
        logp: &mut [f32],
        entropy: Option<&mut [f32]>,
        lse: &mut [f32],
        logits: Logits<'_>,
        targets: &[u32],
        n: usize,
        v: usize,
        temperature: f32,
    ) {
        Emu::logprobs_forward(self, logp, entropy, lse, logits, targets, n, v, temperature)
    }
    fn logprobs_backward(
        &self,
        dlogits: LogitsMut<'_>,
        logits: Logits<'_>,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
        n: usize,
        v: usize,
        temperature: f32,
    ) {
        Emu::logprobs_backward(
            self,
            dlogits,
            logits,
            targets,
            lse,
            dlogp,
            dentropy,
            n,
            v,
            temperature,
        )
    }
}

/// The device's log-prob forward on host logits of type `T`.
fn forward_typed<T: Elem>(
    cuda: &Cuda,
    out: [&mut [f32]; 3],
    want_entropy: bool,
    logits: &[T],
    targets: &[u32],
    v: usize,
    temp: f32,
) {
    let n = targets.len();
    let logits = cuda.upload_slice(logits).unwrap();
    let (mut logp, mut entropy, mut lse) = (cuda.zeros(n), cuda.zeros(n), cuda.zeros(n));
    Cuda::logprobs_forward(
        cuda,
        logp.view_mut(),
        want_entropy.then(|| entropy.view_mut()),
        lse.view_mut(),
        logits.view(),
        targets,
        n,
        v,
        temp,
    )
    .unwrap();
    for (dst, src) in out.into_iter().zip([&logp, &entropy, &lse]) {
        dst.copy_from_slice(&down(cuda, src));
    }
}

/// The device's log-prob backward on host logits and gradients of type `T`.
#[allow(clippy::too_many_arguments)]
fn backward_typed<T: Elem>(
    cuda: &Cuda,
    dlogits: &mut [T],
    logits: &[T],
    targets: &[u32],
    lse: &[f32],
    dlogp: &[f32],
    dentropy: Option<&[f32]>,
    v: usize,
    temp: f32,
) {
    let n = targets.len();
    let mut d = cuda.upload_slice(dlogits).unwrap();
    let logits = cuda.upload_slice(logits).unwrap();
    let (lse, dlogp) = (cuda.upload(lse), cuda.upload(dlogp));
    let dentropy = dentropy.map(|x| cuda.upload(x));
    Cuda::logprobs_backward(
        cuda,
        d.view_mut(),
        logits.view(),
        targets,
        lse.view(),
        dlogp.view(),
        dentropy.as_ref().map(|x| x.view()),
        n,
        v,
        temp,
    )
    .unwrap();
    dlogits.copy_from_slice(&cuda.download_slice(d.view()).unwrap());
}

impl HalfLogprobs for Cuda {
    fn logprobs_forward(
        &self,
        logp: &mut [f32],
        entropy: Option<&mut [f32]>,
        lse: &mut [f32],
        logits: Logits<'_>,
        targets: &[u32],
        n: usize,
        v: usize,
        temperature: f32,
    ) {
        assert_eq!(targets.len(), n);
        let want_entropy = entropy.is_some();
        let mut unused = vec![0.0; n];
        let out = [logp, entropy.unwrap_or(&mut unused), lse];
        match logits {
            Logits::F32(x) => forward_typed(self, out, want_entropy, x, targets, v, temperature),
            Logits::Bf16(x) => forward_typed(self, out, want_entropy, x, targets, v, temperature),
            Logits::F16(x) => forward_typed(self, out, want_entropy, x, targets, v, temperature),
        }
    }
    fn logprobs_backward(
        &self,
        dlogits: LogitsMut<'_>,
        logits: Logits<'_>,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
        n: usize,
        v: usize,
        temperature: f32,
    ) {
        assert_eq!(targets.len(), n);
        let (t, l, dp, de) = (targets, lse, dlogp, dentropy);
        match (dlogits, logits) {
            (LogitsMut::F32(d), Logits::F32(x)) => {
                backward_typed(self, d, x, t, l, dp, de, v, temperature)
            }
            (LogitsMut::Bf16(d), Logits::Bf16(x)) => {
                backward_typed(self, d, x, t, l, dp, de, v, temperature)
            }
            (LogitsMut::F16(d), Logits::F16(x)) => {
                backward_typed(self, d, x, t, l, dp, de, v, temperature)
            }
            _ => panic!("logprobs_backward: dlogits and logits differ in type"),
        }
    }
}

/// CUDA device 0 with the kernels loaded, shared by the tests; `None` where there is no GPU
/// (no driver, or a driver that sees no device). A device that is present but does not open
/// fails the test that asks: that is a bug to see, not a GPU-less machine.
fn device() -> Option<&'static Cuda> {
    static DEVICE: OnceLock<Option<Cuda>> = OnceLock::new();
    DEVICE
        .get_or_init(|| match Cuda::open(0) {
            Ok(cuda) => Some(cuda),
            Err(e) if e.is_no_device() => None,
            Err(e) => panic!("a CUDA driver is present but the backend does not open: {e}"),
        })
        .as_ref()
}

/// Runs `check` on the device, or says on stderr (uncaptured) that it is skipped.
fn on_device(name: &str, check: fn(&Cuda)) {
    match device() {
        Some(cuda) => check(cuda),
        None => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED tests/kernels_emu.rs cuda::{name}: no CUDA device (no driver, or no GPU)"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// op runners: any backend, host data in and out
// ------------------------------------------------------------------------------------------------

fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.download(be.all(b))
}

/// Host inputs of the policy loss.
struct PolicyData<'a> {
    logp: &'a [f32],
    logp_old: &'a [f32],
    adv: &'a [f32],
    adv_per_seq: bool,
    logp_ref: Option<&'a [f32]>,
    entropy: Option<&'a [f32]>,
    is_weight: Option<&'a [f32]>,
    mask: &'a [f32],
    rows: Rows,
}

/// Policy-loss outputs: the stats, per-token losses, dlogp and dentropy (gradients started at
/// `grad_init`; dentropy only with an entropy input).
struct PolicyOut {
    stats: PolicyLossStats,
    per_token: Vec<f32>,
    dlogp: Vec<f32>,
    dentropy: Vec<f32>,
}

fn run_policy<B: LossOps>(
    be: &B,
    d: &PolicyData<'_>,
    cfg: &PolicyLossCfg,
    grad_init: &[f32],
    dloss: f32,
) -> PolicyOut {
    let (logp, old, adv, mask) = (
        be.upload(d.logp),
        be.upload(d.logp_old),
        be.upload(d.adv),
        be.upload(d.mask),
    );
    let lref = d.logp_ref.map(|x| be.upload(x));
    let ent = d.entropy.map(|x| be.upload(x));
    let iw = d.is_weight.map(|x| be.upload(x));
    let n = d.rows.n();
    let mut per_token = be.upload(&vec![f32::NAN; n]);
    let mut dlogp = be.upload(grad_init);
    let mut dent = be.upload(grad_init);
    let x = PolicyLossInputs::<B> {
        logp: be.all(&logp),
        logp_old: be.all(&old),
        advantages: if d.adv_per_seq {
            Advantages::PerSequence(be.all(&adv))
        } else {
            Advantages::PerToken(be.all(&adv))
        },
        logp_ref: lref.as_ref().map(|b| be.all(b)),
        entropy: ent.as_ref().map(|b| be.all(b)),
        is_weight: iw.as_ref().map(|b| be.all(b)),
        mask: be.all(&mask),
        rows: d.rows,
    };
    let has_entropy = d.entropy.is_some();
    let stats = be.policy_loss(
        &x,
        cfg,
        Some(be.all_mut(&mut per_token)),
        Some(PolicyLossGrad {
            dlogp: be.all_mut(&mut dlogp),
            dentropy: has_entropy.then(|| be.all_mut(&mut dent)),
            dloss,
        }),
    );
    PolicyOut {
        stats,
        per_token: down(be, &per_token),
        dlogp: down(be, &dlogp),
        dentropy: down(be, &dent),
    }
}

/// The KL op's aggregate, per-token values and gradient (started at `grad_init`).
fn run_kl<B: LossOps>(
    be: &B,
    logp: &[f32],
    logp_ref: &[f32],
    mask: &[f32],
    rows: Rows,
    est: KlEstimator,
    agg: Aggregation,
    grad_init: &[f32],
) -> (f64, Vec<f32>, Vec<f32>) {
    let (lp, lr, m) = (be.upload(logp), be.upload(logp_ref), be.upload(mask));
    let mut per_token = be.upload(&vec![f32::NAN; rows.n()]);
    let mut dx = be.upload(grad_init);
    let x = KlInputs::<B> {
        logp: be.all(&lp),
        logp_ref: be.all(&lr),
        mask: be.all(&m),
        rows,
    };
    let v = be.kl(
        &x,
        est,
        agg,
        Some(be.all_mut(&mut per_token)),
        Some(Grad {
            dx: be.all_mut(&mut dx),
            dloss: 0.75,
        }),
    );
    (v, down(be, &per_token), down(be, &dx))
}

/// The value loss's stats, per-token losses and gradient (started at `grad_init`).
#[allow(clippy::too_many_arguments)]
fn run_value<B: LossOps>(
    be: &B,
    values: &[f32],
    values_old: &[f32],
    returns: &[f32],
    mask: &[f32],
    rows: Rows,
    cfg: &ValueLossCfg,
    grad_init: &[f32],
) -> (ValueLossStats, Vec<f32>, Vec<f32>) {
    let (v, vo, r, m) = (
        be.upload(values),
        be.upload(values_old),
        be.upload(returns),
        be.upload(mask),
    );
    let mut per_token = be.upload(&vec![f32::NAN; rows.n()]);
    let mut dx = be.upload(grad_init);
    let x = ValueLossInputs::<B> {
        values: be.all(&v),
        values_old: be.all(&vo),
        returns: be.all(&r),
        mask: be.all(&m),
        rows,
    };
    let s = be.value_loss(
        &x,
        cfg,
        Some(be.all_mut(&mut per_token)),
        Some(Grad {
            dx: be.all_mut(&mut dx),
            dloss: 1.0,
        }),
    );
    (s, down(be, &per_token), down(be, &dx))
}

/// GAE's advantages and returns.
fn run_gae<B: LossOps>(
    be: &B,
    rewards: &[f32],
    values: &[f32],
    mask: &[f32],
    rows: Rows,
    cfg: &GaeCfg,
) -> (Vec<f32>, Vec<f32>) {
    let (r, v, m) = (be.upload(rewards), be.upload(values), be.upload(mask));
    let mut adv = be.upload(&vec![f32::NAN; rows.n()]);
    let mut ret = be.upload(&vec![f32::NAN; rows.n()]);
    be.gae(
        be.all_mut(&mut adv),
        be.all_mut(&mut ret),
        be.all(&r),
        be.all(&v),
        be.all(&m),
        rows,
        cfg,
    );
    (down(be, &adv), down(be, &ret))
}

/// KL-shaped rewards, then REINFORCE++ advantages and returns from them.
fn run_rpp<B: LossOps>(
    be: &B,
    logp: &[f32],
    logp_ref: &[f32],
    scores: &[f32],
    mask: &[f32],
    rows: Rows,
    cfg: &KlRewardCfg,
    gamma: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (lp, lr, s, m) = (
        be.upload(logp),
        be.upload(logp_ref),
        be.upload(scores),
        be.upload(mask),
    );
    let mut rewards = be.upload(&vec![f32::NAN; rows.n()]);
    be.kl_shaped_rewards(
        be.all_mut(&mut rewards),
        be.all(&lp),
        be.all(&lr),
        be.all(&s),
        be.all(&m),
        rows,
        cfg,
    );
    let mut adv = be.upload(&vec![f32::NAN; rows.n()]);
    let mut ret = be.upload(&vec![f32::NAN; rows.n()]);
    be.reinforce_pp(
        be.all_mut(&mut adv),
        be.all_mut(&mut ret),
        be.all(&rewards),
        be.all(&m),
        rows,
        gamma,
    );
    (down(be, &rewards), down(be, &adv), down(be, &ret))
}

/// Group advantages, baselines, stds and stats.
fn run_group<B: LossOps>(
    be: &B,
    rewards: &[f32],
    cfg: &GroupAdvCfg,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, GroupAdvStats) {
    let n = rewards.len();
    let r = be.upload(rewards);
    let mut adv = be.upload(&vec![f32::NAN; n]);
    let mut base = be.upload(&vec![f32::NAN; n]);
    let mut std = be.upload(&vec![f32::NAN; n]);
    let s = be.group_advantages(
        be.all_mut(&mut adv),
        Some(be.all_mut(&mut base)),
        Some(be.all_mut(&mut std)),
        be.all(&r),
        n,
        cfg,
    );
    (down(be, &adv), down(be, &base), down(be, &std), s)
}

/// Bradley-Terry stats and gradients. The gradient buffers start at 0.5, so the `+=` convention
/// is exercised; the 0.5 is taken off again.
fn run_bt<B: LossOps>(
    be: &B,
    chosen: &[f32],
    rejected: &[f32],
    margin: Option<&[f32]>,
    cfg: &BtCfg,
) -> (BtStats, Vec<f32>, Vec<f32>) {
    let p = chosen.len();
    let (c, r) = (be.upload(chosen), be.upload(rejected));
    let m = margin.map(|m| be.upload(m));
    let mut dc = be.upload(&vec![0.5; p]);
    let mut dr = be.upload(&vec![0.5; p]);
    let s = be.bt_loss(
        be.all(&c),
        be.all(&r),
        m.as_ref().map(|m| be.all(m)),
        p,
        cfg,
        Some(BtGrad {
            dchosen: be.all_mut(&mut dc),
            drejected: be.all_mut(&mut dr),
            dloss: 1.0,
        }),
    );
    (
        s,
        down(be, &dc).iter().map(|&g| g - 0.5).collect(),
        down(be, &dr).iter().map(|&g| g - 0.5).collect(),
    )
}

/// Per-token log-probs and masks of the DPO chain: (B*T) each, one pair per row.
struct DpoData<'a> {
    policy_chosen: &'a [f32],
    policy_rejected: &'a [f32],
    ref_chosen: &'a [f32],
    ref_rejected: &'a [f32],
    chosen_mask: &'a [f32],
    rejected_mask: &'a [f32],
    rows: Rows,
}

/// What [`run_dpo`] returns.
struct DpoOut {
    stats: DpoStats,
    losses: Vec<f32>,
    chosen_rewards: Vec<f32>,
    rejected_rewards: Vec<f32>,
    dtokens: Vec<f32>,
}

/// Sequence log-probs (and lengths) from per-token ones, then the DPO loss; returns the stats,
/// the per-pair outputs and the gradient w.r.t. the chosen per-token log-probs (chained through
/// `masked_row_sum_backward` into a buffer that starts at 0.25, so the `+=` convention is
/// exercised; the 0.25 is taken off again).
fn run_dpo<B: LossOps>(be: &B, d: &DpoData<'_>, cfg: &DpoCfg) -> DpoOut {
    let (rows, p) = (d.rows, d.rows.b);
    let seq = |tok: &[f32], mask: &B::Buf| {
        let t = be.upload(tok);
        let (mut s, mut c) = (be.zeros(p), be.zeros(p));
        be.masked_row_sum(
            be.all_mut(&mut s),
            Some(be.all_mut(&mut c)),
            be.all(&t),
            be.all(mask),
            rows,
        );
        (s, c)
    };
    let (cm, rm) = (be.upload(d.chosen_mask), be.upload(d.rejected_mask));
    let (pc, lc) = seq(d.policy_chosen, &cm);
    let (pr, lr) = seq(d.policy_rejected, &rm);
    let (rc, _) = seq(d.ref_chosen, &cm);
    let (rr, _) = seq(d.ref_rejected, &rm);
    let x = DpoInputs::<B> {
        policy_chosen: be.all(&pc),
        policy_rejected: be.all(&pr),
        ref_chosen: be.all(&rc),
        ref_rejected: be.all(&rr),
        chosen_len: Some(be.all(&lc)),
        rejected_len: Some(be.all(&lr)),
        pairs: p,
    };
    let (mut losses, mut rw_c, mut rw_r) = (be.zeros(p), be.zeros(p), be.zeros(p));
    let (mut dc, mut dr) = (be.zeros(p), be.zeros(p));
    let stats = be.dpo_loss(
        &x,
        cfg,
        DpoOutputs {
            losses: Some(be.all_mut(&mut losses)),
            chosen_rewards: Some(be.all_mut(&mut rw_c)),
            rejected_rewards: Some(be.all_mut(&mut rw_r)),
        },
        Some(DpoGrad {
            dchosen: be.all_mut(&mut dc),
            drejected: be.all_mut(&mut dr),
            dloss: 1.0,
        }),
    );
    let mut dtok = be.upload(&vec![0.25; rows.n()]);
    be.masked_row_sum_backward(be.all_mut(&mut dtok), be.all(&dc), be.all(&cm), rows);
    DpoOut {
        stats,
        losses: down(be, &losses),
        chosen_rewards: down(be, &rw_c),
        rejected_rewards: down(be, &rw_r),
        dtokens: down(be, &dtok).iter().map(|&g| g - 0.25).collect(),
    }
}

// ------------------------------------------------------------------------------------------------
// the fixture suite, on every backend
// ------------------------------------------------------------------------------------------------

macro_rules! backend_tests {
    (fixtures: [$($fx:ident),* $(,)?], comparisons: [$($cmp:ident),* $(,)?] $(,)?) => {
        /// The fixture suite on the CPU reference.
        mod cpu {
            $(#[test] fn $fx() { super::$fx(&rlhf::backend::cpu::Cpu); })*
        }
        /// The fixture suite and the comparisons with the CPU on the emulated kernels.
        mod emu {
            $(#[test] fn $fx() { super::$fx(&rlhf::backend::emu::Emu::default()); })*
            $(#[test] fn $cmp() { super::$cmp(&rlhf::backend::emu::Emu::default()); })*
        }
        /// The same on CUDA device 0, where there is one.
        mod cuda {
            $(#[test] fn $fx() { super::on_device(stringify!($fx), super::$fx); })*
            $(#[test] fn $cmp() { super::on_device(stringify!($cmp), super::$cmp); })*
        }
    };
}

backend_tests!(
    fixtures: [
        fixture_logprobs,
        fixture_kl,
        fixture_ppo,
        fixture_value_loss,
        fixture_gae,
        fixture_group_advantages,
        fixture_grpo_loss,
        fixture_dpo,
        fixture_bt,
        fixture_rpp,
        fixture_dual_clip,
        fixture_entropy_bonus,
    ],
    comparisons: [
        matches_cpu_policy_and_kl,
        matches_cpu_value_loss_and_advantages,
        matches_cpu_groups_and_pairs,
        matches_cpu_logprobs_f32,
        matches_cpu_logprobs_half,
    ],
);

fn fixture_logprobs<B: LogprobOps>(be: &B) {
    let fx = base();
    let logits = fx.f32("logprob.logits");
    let labels = fx.ids("logprob.labels");
    let v = fx.shape("logprob.logits")[2];
    let out = be.logprobs(logits, &labels, v, 1.0);
    fx.check("logprob.logp", &out.logp);
    fx.check("logprob.entropy", &out.entropy);
    fx.check(
        "logprob.logp_temp0.7",
        &be.logprobs(logits, &labels, v, 0.7).logp,
    );
    let zeros = vec![0.0f32; logits.len()];
    let g = be.logprobs_grad(
        &zeros,
        logits,
        &labels,
        &out.lse,
        fx.f32("logprob.upstream"),
        None,
        v,
        1.0,
    );
    fx.check("logprob.grad_logits", &g);
    let no_dlogp = vec![0.0f32; labels.len()];
    let g = be.logprobs_grad(
        &zeros,
        logits,
        &labels,
        &out.lse,
        &no_dlogp,
        Some(fx.f32("logprob.upstream_entropy")),
        v,
        1.0,
    );
    fx.check("logprob.grad_entropy_logits", &g);
}

fn fixture_kl<B: LossOps>(be: &B) {
    let fx = base();
    let (logp, lref, mask) = (fx.f32("kl.logp"), fx.f32("kl.ref_logp"), fx.f32("kl.mask"));
    let rows = fx.rows("kl.mask");
    for (name, est) in [
        ("k1", KlEstimator::K1),
        ("k2", KlEstimator::K2),
        ("k3", KlEstimator::K3),
    ] {
        let zeros = vec![0.0; rows.n()];
        let (mean, per_token, dx) =
            run_kl(be, logp, lref, mask, rows, est, Aggregation::Bnpo, &zeros);
        fx.check_masked(&format!("kl.{name}"), &per_token, mask);
        fx.check_scalar(&format!("kl.{name}_masked_mean"), mean);
        // run_kl scales the gradient by dloss = 0.75.
        let dx: Vec<f32> = dx.iter().map(|&g| g / 0.75).collect();
        fx.check(&format!("kl.grad_{name}_masked_mean"), &dx);
    }
}

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

fn fixture_ppo<B: LossOps>(be: &B) {
    let fx = base();
    let mask = fx.f32("ppo.mask");
    let d = PolicyData {
        logp: fx.f32("ppo.logp_new"),
        logp_old: fx.f32("ppo.logp_old"),
        adv: fx.f32("ppo.advantages"),
        adv_per_seq: false,
        logp_ref: None,
        entropy: None,
        is_weight: None,
        mask,
        rows: fx.rows("ppo.mask"),
    };
    let zeros = vec![0.0; d.rows.n()];
    let o = run_policy(be, &d, &ppo_cfg(Aggregation::Bnpo), &zeros, 1.0);
    fx.check_masked("ppo.pg_losses", &o.per_token, mask);
    fx.check_scalar("ppo.pg_loss", o.stats.loss);
    fx.check_scalar("ppo.pg_clipfrac", o.stats.clipfrac);
    fx.check_scalar("ppo.approxkl_masked", o.stats.approx_kl);
    fx.check("ppo.grad_logp_new", &o.dlogp);
    assert!(
        o.stats.clipfrac > 0.0,
        "the fixture should exercise the clip"
    );
    let o = run_policy(be, &d, &ppo_cfg(Aggregation::Grpo), &zeros, 1.0);
    fx.check_scalar("ppo.pg_loss_seq_mean", o.stats.loss);
}

fn fixture_value_loss<B: LossOps>(be: &B) {
    let fx = base();
    let mask = fx.f32("vf.mask");
    let rows = fx.rows("vf.mask");
    let cfg = ValueLossCfg {
        clip: Some(0.2),
        agg: Aggregation::Bnpo,
    };
    let (s, per_token, dv) = run_value(
        be,
        fx.f32("vf.vpred"),
        fx.f32("vf.values_old"),
        fx.f32("vf.returns"),
        mask,
        rows,
        &cfg,
        &vec![0.0; rows.n()],
    );
    // Our per-token loss carries the ½; the fixture's `vf.losses` is the max before it.
    let twice: Vec<f32> = per_token.iter().map(|&l| 2.0 * l).collect();
    fx.check_masked("vf.losses", &twice, mask);
    fx.check_scalar("vf.loss", s.loss);
    fx.check_scalar("vf.clipfrac", s.clipfrac);
    fx.check("vf.grad_vpred", &dv);
    assert!(s.clipfrac > 0.0 && s.clipfrac < 1.0);
}

fn fixture_gae<B: LossOps>(be: &B) {
    let fx = base();
    let rows = fx.rows("gae.mask");
    for whiten in [false, true] {
        let cfg = GaeCfg {
            gamma: 1.0,
            lam: 0.95,
            whiten,
        };
        let (adv, ret) = run_gae(
            be,
            fx.f32("gae.rewards"),
            fx.f32("gae.values"),
            fx.f32("gae.mask"),
            rows,
            &cfg,
        );
        fx.check("gae.returns", &ret);
        let name = if whiten {
            "gae.advantages_whitened"
        } else {
            "gae.advantages"
        };
        fx.check(name, &adv);
    }
}

fn fixture_group_advantages<B: LossOps>(be: &B) {
    let fx = base();
    let rewards = fx.f32("grpo_adv.rewards");
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
        let (adv, mean, std, s) = run_group(be, rewards, &cfg);
        fx.check(&format!("grpo_adv.advantages_{name}"), &adv);
        fx.check("grpo_adv.group_mean", &mean);
        fx.check("grpo_adv.group_std", &std);
        // The fixture's second group has identical rewards: its advantages are exactly 0.
        assert!(adv[4..8].iter().all(|&a| a == 0.0));
        assert!((s.frac_zero_std - 1.0 / 3.0).abs() < 1e-12);
    }
    let fx = extra();
    let cfg = GroupAdvCfg {
        group: 4,
        baseline: GroupBaseline::LeaveOneOut,
        scale: GroupScale::None,
        eps: 0.0,
    };
    fx.check(
        "rloo.advantages",
        &run_group(be, fx.f32("rloo.rewards"), &cfg).0,
    );
}

/// TRL's GRPO loss end to end on one backend: log-probs from the logits, the policy loss with
/// per-sequence advantages and the k3 term under each aggregation, and its gradient chained back
/// to the logits by the log-prob backward.
fn fixture_grpo_loss<B: LogprobOps>(be: &B) {
    let fx = base();
    let logits = fx.f32("grpo_loss.logits");
    let ids = fx.ids("grpo_loss.completion_ids");
    let mask = fx.f32("grpo_loss.mask");
    let rows = fx.rows("grpo_loss.mask");
    let v = fx.shape("grpo_loss.logits")[2];
    let lp = be.logprobs(logits, &ids, v, 1.0);
    let d = PolicyData {
        logp: &lp.logp,
        logp_old: fx.f32("grpo_loss.logp_old"),
        adv: fx.f32("grpo_loss.advantages"),
        adv_per_seq: true,
        logp_ref: Some(fx.f32("grpo_loss.logp_ref")),
        entropy: None,
        is_weight: None,
        mask,
        rows,
    };
    let tokens = mask.iter().map(|&m| m as f64).sum();
    let types = [
        ("grpo", Aggregation::Grpo),
        ("bnpo", Aggregation::Bnpo),
        (
            "dr_grpo",
            Aggregation::DrGrpo {
                max_completion_length: rows.t,
            },
        ),
        ("dapo", Aggregation::Dapo { num_items: tokens }),
    ];
    let zeros = vec![0.0; rows.n()];
    let zero_logits = vec![0.0; logits.len()];
    for (name, agg) in types {
        for (beta, sfx) in [(0.04f32, "0.04"), (0.0, "0")] {
            let cfg = PolicyLossCfg {
                kl_coef: beta,
                ..ppo_cfg(agg)
            };
            let o = run_policy(be, &d, &cfg, &zeros, 1.0);
            fx.check_scalar(&format!("grpo_loss.loss_{name}_beta{sfx}"), o.stats.loss);
            let g = be.logprobs_grad(&zero_logits, logits, &ids, &lp.lse, &o.dlogp, None, v, 1.0);
            fx.check(&format!("grpo_loss.grad_logits_{name}_beta{sfx}"), &g);
        }
    }
}

fn fixture_dpo<B: LossOps>(be: &B) {
    // Sequence log-probs given directly (base fixture): one token per "sequence".
    let fx = base();
    let pc = fx.f32("dpo.policy_chosen_logps");
    let ones = vec![1.0f32; pc.len()];
    let d = DpoData {
        policy_chosen: pc,
        policy_rejected: fx.f32("dpo.policy_rejected_logps"),
        ref_chosen: fx.f32("dpo.ref_chosen_logps"),
        ref_rejected: fx.f32("dpo.ref_rejected_logps"),
        chosen_mask: &ones,
        rejected_mask: &ones,
        rows: Rows { b: pc.len(), t: 1 },
    };
    let cfg = DpoCfg {
        beta: 0.1,
        label_smoothing: 0.0,
        loss: DpoLoss::Sigmoid,
    };
    let o = run_dpo(be, &d, &cfg);
    fx.check("dpo.losses", &o.losses);
    fx.check_scalar("dpo.loss", o.stats.loss);
    fx.check("dpo.chosen_rewards", &o.chosen_rewards);
    fx.check("dpo.rejected_rewards", &o.rejected_rewards);
    fx.check("dpo.grad_policy_chosen", &o.dtokens);

    // Per-token log-probs (extra fixture): every variant.
    let fx = extra();
    let d = DpoData {
        policy_chosen: fx.f32("dpo.policy_chosen_token_logps"),
        policy_rejected: fx.f32("dpo.policy_rejected_token_logps"),
        ref_chosen: fx.f32("dpo.ref_chosen_token_logps"),
        ref_rejected: fx.f32("dpo.ref_rejected_token_logps"),
        chosen_mask: fx.f32("dpo.chosen_mask"),
        rejected_mask: fx.f32("dpo.rejected_mask"),
        rows: fx.rows("dpo.chosen_mask"),
    };
    for (name, loss, label_smoothing) in [
        ("sigmoid", DpoLoss::Sigmoid, 0.0f32),
        ("sigmoid_ls", DpoLoss::Sigmoid, 0.1),
        ("hinge", DpoLoss::Hinge, 0.0),
        ("ipo", DpoLoss::Ipo, 0.0),
        ("robust", DpoLoss::Robust, 0.1),
    ] {
        let cfg = DpoCfg {
            beta: 0.1,
            label_smoothing,
            loss,
        };
        let o = run_dpo(be, &d, &cfg);
        fx.check_scalar(&format!("dpo.loss_{name}"), o.stats.loss);
        fx.check(
            &format!("dpo.grad_policy_chosen_token_logps_{name}"),
            &o.dtokens,
        );
    }
}

fn fixture_bt<B: LossOps>(be: &B) {
    let fx = base();
    let (rc, rr) = (fx.f32("bt.rewards_chosen"), fx.f32("bt.rewards_rejected"));
    let cfg = BtCfg { center_coef: 0.0 };
    let (s, dc, dr) = run_bt(be, rc, rr, None, &cfg);
    fx.check_scalar("bt.loss", s.loss);
    fx.check_scalar("bt.accuracy", s.accuracy);
    fx.check("bt.grad_chosen", &dc);
    fx.check("bt.grad_rejected", &dr);
    let (s, _, _) = run_bt(be, rc, rr, Some(fx.f32("bt.margin")), &cfg);
    fx.check_scalar("bt.loss_margin", s.loss);

    let fx = extra();
    let cfg = BtCfg { center_coef: 0.01 };
    let (s, dc, _) = run_bt(
        be,
        fx.f32("rm.rewards_chosen"),
        fx.f32("rm.rewards_rejected"),
        None,
        &cfg,
    );
    fx.check_scalar("rm.loss_centered", s.loss);
    fx.check("rm.grad_chosen_centered", &dc);
}

fn fixture_rpp<B: LossOps>(be: &B) {
    let fx = extra();
    let cfg = KlRewardCfg {
        kl_coef: 0.05,
        estimator: KlEstimator::K1,
    };
    let (rewards, adv, ret) = run_rpp(
        be,
        fx.f32("rpp.logp"),
        fx.f32("rpp.ref_logp"),
        fx.f32("rpp.scores"),
        fx.f32("rpp.mask"),
        fx.rows("rpp.mask"),
        &cfg,
        1.0,
    );
    fx.check("rpp.token_rewards", &rewards);
    fx.check("rpp.returns", &ret);
    fx.check("rpp.advantages", &adv);
}

fn fixture_dual_clip<B: LossOps>(be: &B) {
    let fx = extra();
    let mask = fx.f32("dual.mask");
    let d = PolicyData {
        logp: fx.f32("dual.logp_new"),
        logp_old: fx.f32("dual.logp_old"),
        adv: fx.f32("dual.advantages"),
        adv_per_seq: false,
        logp_ref: None,
        entropy: None,
        is_weight: None,
        mask,
        rows: fx.rows("dual.mask"),
    };
    let cfg = PolicyLossCfg {
        dual_clip: Some(3.0),
        ..ppo_cfg(Aggregation::Bnpo)
    };
    let o = run_policy(be, &d, &cfg, &vec![0.0; d.rows.n()], 1.0);
    fx.check_masked("dual.pg_losses", &o.per_token, mask);
    fx.check_scalar("dual.pg_loss", o.stats.loss);
    fx.check_scalar("dual.dualclip_frac", o.stats.dual_clipfrac);
    fx.check("dual.grad_logp_new", &o.dlogp);
    assert!(
        o.stats.dual_clipfrac > 0.0,
        "the fixture should exercise the dual clip"
    );
}

/// The clipped loss minus an entropy bonus, end to end: log-probs and entropies from the logits,
/// the loss, and both its gradients chained back to the logits.
fn fixture_entropy_bonus<B: LogprobOps>(be: &B) {
    let fx = extra();
    let logits = fx.f32("ent.logits");
    let labels = fx.ids("ent.labels");
    let v = fx.shape("ent.logits")[2];
    let lp = be.logprobs(logits, &labels, v, 1.0);
    fx.check("ent.entropy", &lp.entropy);
    let d = PolicyData {
        logp: &lp.logp,
        logp_old: fx.f32("ent.logp_old"),
        adv: fx.f32("ent.advantages"),
        adv_per_seq: false,
        logp_ref: None,
        entropy: Some(&lp.entropy),
        is_weight: None,
        mask: fx.f32("ent.mask"),
        rows: fx.rows("ent.mask"),
    };
    let cfg = PolicyLossCfg {
        entropy_coef: 0.01,
        ..ppo_cfg(Aggregation::Bnpo)
    };
    let o = run_policy(be, &d, &cfg, &vec![0.0; d.rows.n()], 1.0);
    fx.check_scalar("ent.loss", o.stats.loss);
    let g = be.logprobs_grad(
        &vec![0.0; logits.len()],
        logits,
        &labels,
        &lp.lse,
        &o.dlogp,
        Some(&o.dentropy),
        v,
        1.0,
    );
    fx.check("ent.grad_logits", &g);
}

// ------------------------------------------------------------------------------------------------
// the emulated kernels against the CPU reference on random odd shapes
// ------------------------------------------------------------------------------------------------

/// (B, T) shapes: one token; a few short rows; the fixtures' shape; rows longer than a row block
/// (128) and not a multiple of it; more rows than a scan block (64).
const SHAPES: [(usize, usize); 6] = [(1, 1), (3, 7), (4, 12), (2, 300), (5, 129), (70, 5)];

/// A right-padded batch: row 0 full, the last row (when there are two or more) all masked, the
/// others of random length; `nan_pads` puts NaN on every pad of a per-token input.
struct Batch {
    rows: Rows,
    mask: Vec<f32>,
}

impl Batch {
    fn new(rng: &mut Rng, b: usize, t: usize) -> Batch {
        let mut mask = vec![0.0f32; b * t];
        for r in 0..b {
            let len = match r {
                0 => t,
                _ if r == b - 1 => 0,
                _ => 1 + rng.below(t),
            };
            mask[r * t..r * t + len].fill(1.0);
        }
        Batch {
            rows: Rows { b, t },
            mask,
        }
    }

    fn nan_pads(&self, mut x: Vec<f32>) -> Vec<f32> {
        for (v, &m) in x.iter_mut().zip(&self.mask) {
            if m == 0.0 {
                *v = f32::NAN;
            }
        }
        x
    }

    fn tokens(&self) -> f64 {
        self.mask.iter().map(|&m| m as f64).sum()
    }
}

/// Compares the two backends' policy-loss outputs.
fn same_policy(what: &str, got: &PolicyOut, want: &PolicyOut) {
    close32(
        &format!("{what} per_token"),
        &got.per_token,
        &want.per_token,
        TOL_CPU,
    );
    close32(&format!("{what} dlogp"), &got.dlogp, &want.dlogp, TOL_CPU);
    close32(
        &format!("{what} dentropy"),
        &got.dentropy,
        &want.dentropy,
        TOL_CPU,
    );
    let (g, w) = (&got.stats, &want.stats);
    assert_close(
        &format!("{what} stats"),
        &[
            g.loss,
            g.clipfrac,
            g.dual_clipfrac,
            g.approx_kl,
            g.kl,
            g.entropy,
            g.tokens,
        ],
        &[
            w.loss,
            w.clipfrac,
            w.dual_clipfrac,
            w.approx_kl,
            w.kl,
            w.entropy,
            w.tokens,
        ],
        TOL_CPU,
    );
}

fn matches_cpu_policy_and_kl<B: LossOps>(be: &B) {
    let mut rng = Rng::new(7);
    for (b, t) in SHAPES {
        let batch = Batch::new(&mut rng, b, t);
        let n = b * t;
        let logp = batch.nan_pads(rng.vec_uniform(n, -3.0, -0.1));
        let old: Vec<f32> = logp
            .iter()
            .map(|&l| l + 0.5 * (rng.uniform() as f32 - 0.5))
            .collect();
        let lref = batch.nan_pads(
            logp.iter()
                .map(|&l| l + 0.3 * (rng.uniform() as f32 - 0.5))
                .collect(),
        );
        let ent = batch.nan_pads(rng.vec_uniform(n, 0.0, 4.0));
        let adv_tok = batch.nan_pads(rng.vec_normal(n, 1.0));
        let adv_seq = rng.vec_normal(b, 1.0);
        let init = rng.vec_normal(n, 0.1);
        // Truncated importance weights as a cap of 2 leaves them: below 1, above, and at the
        // cap itself.
        let iw = batch.nan_pads(
            rng.vec_uniform(n, 0.0, 3.0)
                .iter()
                .map(|&w| w.min(2.0))
                .collect(),
        );
        let aggs = [
            Aggregation::Grpo,
            Aggregation::Bnpo,
            Aggregation::Dapo {
                num_items: 2.0 * batch.tokens(),
            },
            Aggregation::DrGrpo {
                max_completion_length: t + 3,
            },
        ];
        for (k, agg) in aggs.into_iter().enumerate() {
            let per_seq = k % 2 == 1;
            let d = PolicyData {
                logp: &logp,
                logp_old: &old,
                adv: if per_seq { &adv_seq } else { &adv_tok },
                adv_per_seq: per_seq,
                logp_ref: Some(&lref),
                entropy: Some(&ent),
                is_weight: Some(&iw),
                mask: &batch.mask,
                rows: batch.rows,
            };
            let cfg = PolicyLossCfg {
                clip_low: 0.2,
                clip_high: 0.28,
                dual_clip: (k < 2).then_some(3.0),
                kl_coef: 0.04,
                entropy_coef: 0.01,
                agg,
            };
            let what = format!("policy_loss {b}x{t} {agg:?}");
            let want = run_policy(&Cpu, &d, &cfg, &init, 0.5);
            let got = run_policy(be, &d, &cfg, &init, 0.5);
            same_policy(&what, &got, &want);
            // Without the optional inputs: the kernel's null-pointer paths.
            let plain = PolicyData {
                logp_ref: None,
                entropy: None,
                is_weight: None,
                ..d
            };
            let cfg = ppo_cfg(agg);
            let want = run_policy(&Cpu, &plain, &cfg, &init, 1.0);
            let got = run_policy(be, &plain, &cfg, &init, 1.0);
            same_policy(&format!("{what} plain"), &got, &want);

            for est in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
                let what = format!("kl {b}x{t} {agg:?} {est:?}");
                let want = run_kl(&Cpu, &logp, &lref, &batch.mask, batch.rows, est, agg, &init);
                let got = run_kl(be, &logp, &lref, &batch.mask, batch.rows, est, agg, &init);
                assert_close(&what, &[got.0], &[want.0], TOL_CPU);
                close32(&format!("{what} per_token"), &got.1, &want.1, TOL_CPU);
                close32(&format!("{what} dx"), &got.2, &want.2, TOL_CPU);
            }
        }
    }
}

fn matches_cpu_value_loss_and_advantages<B: LossOps>(be: &B) {
    let mut rng = Rng::new(11);
    for (b, t) in SHAPES {
        let batch = Batch::new(&mut rng, b, t);
        let n = b * t;
        let values = batch.nan_pads(rng.vec_normal(n, 1.0));
        let old: Vec<f32> = values
            .iter()
            .map(|&v| v + 0.4 * (rng.uniform() as f32 - 0.5))
            .collect();
        let returns = batch.nan_pads(rng.vec_normal(n, 1.0));
        let init = rng.vec_normal(n, 0.1);
        for (clip, agg) in [
            (Some(0.2), Aggregation::Bnpo),
            (None, Aggregation::Grpo),
            (
                Some(0.1),
                Aggregation::DrGrpo {
                    max_completion_length: t,
                },
            ),
        ] {
            let cfg = ValueLossCfg { clip, agg };
            let what = format!("value_loss {b}x{t} {clip:?} {agg:?}");
            let args = (&values[..], &old[..], &returns[..], &batch.mask[..]);
            let want = run_value(
                &Cpu, args.0, args.1, args.2, args.3, batch.rows, &cfg, &init,
            );
            let got = run_value(be, args.0, args.1, args.2, args.3, batch.rows, &cfg, &init);
            assert_close(
                &what,
                &[got.0.loss, got.0.clipfrac, got.0.tokens],
                &[want.0.loss, want.0.clipfrac, want.0.tokens],
                TOL_CPU,
            );
            close32(&format!("{what} per_token"), &got.1, &want.1, TOL_CPU);
            close32(&format!("{what} dx"), &got.2, &want.2, TOL_CPU);
        }

        let rewards = batch.nan_pads(rng.vec_normal(n, 0.5));
        for whiten in [false, true] {
            let cfg = GaeCfg {
                gamma: 0.99,
                lam: 0.95,
                whiten,
            };
            let want = run_gae(&Cpu, &rewards, &values, &batch.mask, batch.rows, &cfg);
            let got = run_gae(be, &rewards, &values, &batch.mask, batch.rows, &cfg);
            close32(
                &format!("gae {b}x{t} {whiten} adv"),
                &got.0,
                &want.0,
                TOL_CPU,
            );
            close32(
                &format!("gae {b}x{t} {whiten} ret"),
                &got.1,
                &want.1,
                TOL_CPU,
            );
        }

        let scores = rng.vec_normal(b, 1.0);
        let lref = batch.nan_pads(
            values
                .iter()
                .map(|&v| v + 0.3 * (rng.uniform() as f32 - 0.5))
                .collect(),
        );
        for est in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            let cfg = KlRewardCfg {
                kl_coef: 0.05,
                estimator: est,
            };
            let what = format!("rpp {b}x{t} {est:?}");
            let want = run_rpp(
                &Cpu,
                &values,
                &lref,
                &scores,
                &batch.mask,
                batch.rows,
                &cfg,
                0.97,
            );
            let got = run_rpp(
                be,
                &values,
                &lref,
                &scores,
                &batch.mask,
                batch.rows,
                &cfg,
                0.97,
            );
            close32(&format!("{what} rewards"), &got.0, &want.0, TOL_CPU);
            close32(&format!("{what} adv"), &got.1, &want.1, TOL_CPU);
            close32(&format!("{what} ret"), &got.2, &want.2, TOL_CPU);
        }
    }
}

fn matches_cpu_groups_and_pairs<B: LossOps>(be: &B) {
    let mut rng = Rng::new(13);
    // n = 1, a few groups, and more groups than a block has threads (256).
    for (n, g) in [(1, 1), (12, 4), (10, 2), (8, 8), (1030, 5)] {
        // Whole groups of equal rewards exercise the zero-std path.
        let mut rewards = rng.vec_normal(n, 1.0);
        if n >= 2 * g {
            let first = rewards[0];
            rewards[..g].fill(first);
        }
        for baseline in [GroupBaseline::Mean, GroupBaseline::LeaveOneOut] {
            if baseline == GroupBaseline::LeaveOneOut && g < 2 {
                continue;
            }
            for scale in [GroupScale::None, GroupScale::Group, GroupScale::Batch] {
                let cfg = GroupAdvCfg {
                    group: g,
                    baseline,
                    scale,
                    eps: 1e-4,
                };
                let what = format!("group_advantages n={n} G={g} {baseline:?} {scale:?}");
                let want = run_group(&Cpu, &rewards, &cfg);
                let got = run_group(be, &rewards, &cfg);
                close32(&format!("{what} adv"), &got.0, &want.0, TOL_CPU);
                close32(&format!("{what} baseline"), &got.1, &want.1, TOL_CPU);
                close32(&format!("{what} std"), &got.2, &want.2, TOL_CPU);
                assert_eq!(got.3, want.3, "{what} stats");
            }
        }
    }

    for p in [1, 3, 300] {
        let rc = rng.vec_normal(p, 2.0);
        let rr = rng.vec_normal(p, 2.0);
        let margin = rng.vec_uniform(p, 0.0, 1.0);
        for (m, c) in [(None, 0.0), (Some(&margin[..]), 0.01)] {
            let cfg = BtCfg { center_coef: c };
            let want = run_bt(&Cpu, &rc, &rr, m, &cfg);
            let got = run_bt(be, &rc, &rr, m, &cfg);
            let what = format!("bt_loss P={p} c={c}");
            let (g, w) = (&got.0, &want.0);
            assert_close(
                &what,
                &[g.loss, g.accuracy, g.margin],
                &[w.loss, w.accuracy, w.margin],
                TOL_CPU,
            );
            close32(&format!("{what} dchosen"), &got.1, &want.1, TOL_CPU);
            close32(&format!("{what} drejected"), &got.2, &want.2, TOL_CPU);
        }
    }

    for (b, t) in [(1, 1), (5, 17), (3, 300)] {
        let batch = Batch::new(&mut rng, b, t);
        let other = Batch::new(&mut rng, b, t);
        let n = b * t;
        let tok = |rng: &mut Rng, m: &Batch| m.nan_pads(rng.vec_uniform(n, -4.0, -0.1));
        let (pc, pr) = (tok(&mut rng, &batch), tok(&mut rng, &other));
        let (rc, rr) = (tok(&mut rng, &batch), tok(&mut rng, &other));
        let d = DpoData {
            policy_chosen: &pc,
            policy_rejected: &pr,
            ref_chosen: &rc,
            ref_rejected: &rr,
            chosen_mask: &batch.mask,
            rejected_mask: &other.mask,
            rows: batch.rows,
        };
        for loss in [
            DpoLoss::Sigmoid,
            DpoLoss::Hinge,
            DpoLoss::Ipo,
            DpoLoss::Robust,
        ] {
            let cfg = DpoCfg {
                beta: 0.1,
                label_smoothing: 0.1,
                loss,
            };
            let what = format!("dpo {b}x{t} {loss:?}");
            let want = run_dpo(&Cpu, &d, &cfg);
            let got = run_dpo(be, &d, &cfg);
            let (g, w) = (&got.stats, &want.stats);
            assert_close(
                &what,
                &[
                    g.loss,
                    g.accuracy,
                    g.margin,
                    g.chosen_reward,
                    g.rejected_reward,
                ],
                &[
                    w.loss,
                    w.accuracy,
                    w.margin,
                    w.chosen_reward,
                    w.rejected_reward,
                ],
                TOL_CPU,
            );
            close32(
                &format!("{what} losses"),
                &got.losses,
                &want.losses,
                TOL_CPU,
            );
            close32(
                &format!("{what} chosen_rewards"),
                &got.chosen_rewards,
                &want.chosen_rewards,
                TOL_CPU,
            );
            close32(
                &format!("{what} rejected_rewards"),
                &got.rejected_rewards,
                &want.rejected_rewards,
                TOL_CPU,
            );
            close32(
                &format!("{what} dtokens"),
                &got.dtokens,
                &want.dtokens,
                TOL_CPU,
            );
        }
    }
}

/// (N, V) shapes: one row of one logit; V below, at, and not a multiple of the 256-thread block;
/// rows of 2k logits.
const LOGPROB_SHAPES: [(usize, usize); 5] = [(1, 1), (3, 31), (2, 256), (5, 1000), (2, 2053)];

/// Logits ~ N(0, 2), with some -inf entries (a masked vocabulary) away from the targets.
fn logits_case(rng: &mut Rng, n: usize, v: usize) -> (Vec<f32>, Vec<u32>) {
    let mut logits = rng.vec_normal(n * v, 2.0);
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    for (r, &tg) in targets.iter().enumerate() {
        for j in (0..v).step_by(7) {
            if j != tg as usize {
                logits[r * v + j] = f32::NEG_INFINITY;
            }
        }
    }
    (logits, targets)
}

fn matches_cpu_logprobs_f32<B: LogprobOps>(be: &B) {
    let mut rng = Rng::new(17);
    for (n, v) in LOGPROB_SHAPES {
        let (logits, targets) = logits_case(&mut rng, n, v);
        let dlogp = rng.vec_normal(n, 1.0);
        let dent = rng.vec_normal(n, 1.0);
        let init = rng.vec_normal(n * v, 0.01);
        for temp in [1.0, 0.7] {
            let what = format!("logprobs {n}x{v} T={temp}");
            let want = Cpu.logprobs(&logits, &targets, v, temp);
            let got = be.logprobs(&logits, &targets, v, temp);
            close32(&format!("{what} logp"), &got.logp, &want.logp, TOL_CPU);
            close32(&format!("{what} lse"), &got.lse, &want.lse, TOL_CPU);
            close32(
                &format!("{what} entropy"),
                &got.entropy,
                &want.entropy,
                TOL_CPU,
            );
            for dent in [None, Some(&dent[..])] {
                let want =
                    Cpu.logprobs_grad(&init, &logits, &targets, &want.lse, &dlogp, dent, v, temp);
                let got =
                    be.logprobs_grad(&init, &logits, &targets, &got.lse, &dlogp, dent, v, temp);
                close32(
                    &format!("{what} dlogits {}", dent.is_some()),
                    &got,
                    &want,
                    TOL_CPU,
                );
            }
        }
    }
}

/// bf16 and f16 logits: the kernels widen each logit exactly, so log-probs match the CPU op on the
/// widened logits at f32 tolerance; logit gradients are rounded to the narrow type once.
fn matches_cpu_logprobs_half<B: HalfLogprobs>(be: &B) {
    let mut rng = Rng::new(19);
    for (n, v) in LOGPROB_SHAPES {
        let (logits, targets) = logits_case(&mut rng, n, v);
        let dlogp = rng.vec_normal(n, 1.0);
        let dent = rng.vec_normal(n, 1.0);
        let init = rng.vec_normal(n * v, 0.01);
        // (name, narrow, rounding of the narrow type relative to a value)
        let bf: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();
        let hf: Vec<f16> = logits.iter().map(|&x| f16::from_f32(x)).collect();
        let cases: [(&str, Logits<'_>, Vec<f32>, f64); 2] = [
            (
                "bf16",
                Logits::Bf16(&bf),
                bf.iter().map(|x| x.to_f32()).collect(),
                2f64.powi(-8),
            ),
            (
                "f16",
                Logits::F16(&hf),
                hf.iter().map(|x| x.to_f32()).collect(),
                2f64.powi(-11),
            ),
        ];
        for (name, narrow, wide, round) in cases {
            let what = format!("logprobs {name} {n}x{v}");
            let want = Cpu.logprobs(&wide, &targets, v, 0.9);
            let (mut logp, mut ent, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            be.logprobs_forward(
                &mut logp,
                Some(&mut ent),
                &mut lse,
                narrow,
                &targets,
                n,
                v,
                0.9,
            );
            close32(&format!("{what} logp"), &logp, &want.logp, TOL_CPU);
            close32(&format!("{what} lse"), &lse, &want.lse, TOL_CPU);
            close32(&format!("{what} entropy"), &ent, &want.entropy, TOL_CPU);
            // The gradient starts from `init` in the narrow type.
            let (start, got): (Vec<f32>, Vec<f32>) = match narrow {
                Logits::Bf16(_) => {
                    let mut d: Vec<bf16> = init.iter().map(|&x| bf16::from_f32(x)).collect();
                    let start = d.iter().map(|x| x.to_f32()).collect();
                    be.logprobs_backward(
                        LogitsMut::Bf16(&mut d),
                        narrow,
                        &targets,
                        &lse,
                        &dlogp,
                        Some(&dent),
                        n,
                        v,
                        0.9,
                    );
                    (start, d.iter().map(|x| x.to_f32()).collect())
                }
                Logits::F16(_) => {
                    let mut d: Vec<f16> = init.iter().map(|&x| f16::from_f32(x)).collect();
                    let start = d.iter().map(|x| x.to_f32()).collect();
                    be.logprobs_backward(
                        LogitsMut::F16(&mut d),
                        narrow,
                        &targets,
                        &lse,
                        &dlogp,
                        Some(&dent),
                        n,
                        v,
                        0.9,
                    );
                    (start, d.iter().map(|x| x.to_f32()).collect())
                }
                Logits::F32(_) => unreachable!("only half types here"),
            };
            let want = Cpu.logprobs_grad(
                &start,
                &wide,
                &targets,
                &want.lse,
                &dlogp,
                Some(&dent),
                v,
                0.9,
            );
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let allowed = 2.0 * round * (w as f64).abs() + 1e-6;
                assert!(
                    ((g - w) as f64).abs() <= allowed,
                    "{what} dlogits[{i}]: got {g}, want {w}"
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// the shim itself
// ------------------------------------------------------------------------------------------------

/// A self-test kernel of `kernels/emu/selftest.cu`.
fn selftest(name: &'static str) -> Kernel {
    Kernel {
        file: "emu/selftest.cu",
        name,
    }
}

fn launch(kernel: Kernel, grid: u32, block: u32, shared_bytes: u32, args: Vec<Arg>) -> Launch {
    Launch {
        kernel,
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_bytes,
        args,
    }
}

fn ptr<T>(x: &mut [T]) -> Arg {
    Arg::Ptr(DevPtr(x.as_mut_ptr() as u64))
}

#[test]
fn shim_has_every_planned_kernel() {
    for k in plan::ALL {
        assert!(
            has_kernel(k.name),
            "{} ({}) is not in the emulator",
            k.name,
            k.file
        );
    }
}

/// CUDA's documented shuffle semantics, lane by lane, over two warps.
#[test]
fn shim_shuffles_follow_cuda() {
    let threads = 64usize;
    let mut out = vec![0i32; threads * 6];
    let l = launch(
        selftest("selftest_shuffles_i32"),
        1,
        threads as u32,
        0,
        vec![ptr(&mut out)],
    );
    // SAFETY: the kernel writes 6 ints per thread of the one block: `out` holds them.
    unsafe { Emu::default().launch(&l) }.unwrap();
    for t in 0..threads {
        let (lane, base) = (t % 32, (t / 32) * 32);
        let v = |l: usize| 100 + (base + l) as i32;
        let width_src = |w: usize, src: usize| (lane & !(w - 1)) + (src & (w - 1));
        let up = if lane % 32 >= 2 { lane - 2 } else { lane };
        let down = if lane % 16 + 5 < 16 { lane + 5 } else { lane };
        let xor = if (lane ^ 9) >= (lane / 8 + 1) * 8 {
            lane
        } else {
            lane ^ 9
        };
        let ballot = (0..32)
            .filter(|l| (base + l) % 3 == 0)
            .fold(0u32, |m, l| m | 1 << l) as i32;
        let want = [v(3), v(width_src(8, 5)), v(up), v(down), v(xor), ballot];
        assert_eq!(out[t * 6..t * 6 + 6], want, "thread {t}");
    }
}

#[test]
fn shim_atomics_dynamic_and_static_shared() {
    let emu = Emu::default();
    // 3 blocks of 100 threads: the last warp of each block is partial.
    let mut count = vec![0i32, 0, -1, i32::MAX];
    let l = launch(
        selftest("selftest_atomics_i32"),
        3,
        100,
        0,
        vec![ptr(&mut count)],
    );
    // SAFETY: the kernel touches count[0..4].
    unsafe { emu.launch(&l) }.unwrap();
    assert_eq!(count, [300, -600, 299, 0]);

    let x: Vec<f32> = (0..128).map(|i| i as f32).collect();
    let mut out = vec![0.0f32; 128];
    let mut xs = x.clone();
    let l = launch(
        selftest("selftest_dynamic_shared_f32"),
        2,
        64,
        64 * 4,
        vec![ptr(&mut xs), ptr(&mut out)],
    );
    // SAFETY: 2 blocks of 64 threads read and write one float each of 128; the block's dynamic
    // shared memory holds its 64 floats.
    unsafe { emu.launch(&l) }.unwrap();
    let want: Vec<f32> = (0..128)
        .map(|i| ((i / 64) * 64 + 63 - i % 64) as f32)
        .collect();
    assert_eq!(out, want);

    let mut out = vec![0.0f32; 64];
    let l = launch(
        selftest("selftest_uninit_shared_f32"),
        1,
        64,
        0,
        vec![ptr(&mut out)],
    );
    // SAFETY: one float per thread.
    unsafe { emu.launch(&l) }.unwrap();
    assert!(
        out.iter().all(|v| v.is_nan()),
        "shared memory starts as NaN: {out:?}"
    );
}

#[test]
fn shim_reports_deadlocks_and_bad_launches() {
    let emu = Emu::default();
    let mut out = vec![0i32; 64];
    let l = launch(
        selftest("selftest_deadlock_i32"),
        1,
        64,
        0,
        vec![ptr(&mut out)],
    );
    // SAFETY: one int per thread.
    let err = unsafe { emu.launch(&l) }.unwrap_err().to_string();
    assert!(err.contains("deadlock"), "{err}");
    // The emulator is usable after a deadlock.
    let l = launch(
        selftest("selftest_uninit_shared_f32"),
        1,
        64,
        0,
        vec![ptr(&mut out)],
    );
    // SAFETY: one 4-byte value per thread.
    unsafe { emu.launch(&l) }.unwrap();

    // An argument list that does not match the kernel's parameters is refused before it runs.
    let l = launch(
        selftest("selftest_deadlock_i32"),
        1,
        64,
        0,
        vec![Arg::I32(3)],
    );
    // SAFETY: refused before any access.
    let err = unsafe { emu.launch(&l) }.unwrap_err().to_string();
    assert!(
        err.contains("signature i") && err.contains("takes p"),
        "{err}"
    );
    // So are blocks beyond CUDA's limits and unknown kernels.
    let l = launch(
        selftest("selftest_deadlock_i32"),
        1,
        2048,
        0,
        vec![ptr(&mut out)],
    );
    // SAFETY: refused before any access.
    let err = unsafe { emu.launch(&l) }.unwrap_err().to_string();
    assert!(err.contains("limits"), "{err}");
    let l = launch(selftest("no_such_kernel"), 1, 32, 0, vec![]);
    // SAFETY: refused before any access.
    assert!(unsafe { emu.launch(&l) }.is_err());
}

/// common.cuh's conversions against the `half` crate, bit for bit (a NaN need only stay a NaN):
/// every 16-bit pattern to f32, and f32 to bf16/f16 on the values where rounding is decided
/// (ties, subnormal and overflow boundaries, NaNs) plus a million random bit patterns.
#[test]
fn shim_half_conversions_match_half_crate() {
    let mut rng = Rng::new(23);
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xffc0_1234),
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        65504.0,
        65519.996,
        65520.0,
        65536.0,
        1e-8,
        2f32.powi(-24),
        2f32.powi(-25),
        f32::from_bits(2f32.powi(-25).to_bits() + 1),
        2f32.powi(-14),
        f32::from_bits(2f32.powi(-14).to_bits() - 1),
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        3.389_531_4e38,
    ];
    x.extend((0..1 << 20).map(|_| f32::from_bits(rng.next_u64() as u32)));
    // Also every bf16 value with each rounding-relevant low half, and around every f16 value.
    for hi in 0..=u16::MAX as u32 {
        x.push(f32::from_bits(hi << 16 | 0x8000));
        x.push(f32::from_bits(hi << 16 | 0x7fff));
        x.push(f16::from_bits(hi as u16).to_f32());
    }
    let n = x.len();
    let patterns: Vec<u16> = (0..n).map(|i| i as u16).collect();
    let (mut xs, mut bf_in, mut hf_in) = (x.clone(), patterns.clone(), patterns.clone());
    let (mut to_bf, mut to_hf) = (vec![0u16; n], vec![0u16; n]);
    let (mut from_bf, mut from_hf) = (vec![0f32; n], vec![0f32; n]);
    let l = launch(
        selftest("selftest_convert_f32"),
        64,
        256,
        0,
        vec![
            ptr(&mut xs),
            ptr(&mut bf_in),
            ptr(&mut hf_in),
            Arg::I32(n as i32),
            ptr(&mut to_bf),
            ptr(&mut to_hf),
            ptr(&mut from_bf),
            ptr(&mut from_hf),
        ],
    );
    // SAFETY: a grid-stride loop over n elements of each array, all of length n.
    unsafe { Emu::default().launch(&l) }.unwrap();
    // NaN payloads are a convention (`half` quiets a signalling NaN when widening bf16, CUDA's
    // `__bfloat162float` is a plain shift): a NaN only has to stay a NaN.
    let same = |got: u32, want: f32| {
        got == want.to_bits() || (f32::from_bits(got).is_nan() && want.is_nan())
    };
    for i in 0..n {
        let v = x[i];
        let (b, h) = (bf16::from_f32(v), f16::from_f32(v));
        assert!(
            to_bf[i] == b.to_bits() || (bf16::from_bits(to_bf[i]).is_nan() && b.is_nan()),
            "bf16 of {v:e} ({:#x}): {:#x}, want {:#x}",
            v.to_bits(),
            to_bf[i],
            b.to_bits()
        );
        assert!(
            to_hf[i] == h.to_bits() || (f16::from_bits(to_hf[i]).is_nan() && h.is_nan()),
            "f16 of {v:e} ({:#x}): {:#x}, want {:#x}",
            v.to_bits(),
            to_hf[i],
            h.to_bits()
        );
        let p = patterns[i];
        assert!(
            same(from_bf[i].to_bits(), bf16::from_bits(p).to_f32()),
            "bf16 {p:#x}"
        );
        assert!(
            same(from_hf[i].to_bits(), f16::from_bits(p).to_f32()),
            "f16 {p:#x}"
        );
    }
}

/// A correct kernel gives the same bits whatever order the threads resume in after barriers:
/// its reductions have a fixed shape.
#[test]
fn shim_results_do_not_depend_on_thread_order() {
    let mut rng = Rng::new(29);
    let batch = Batch::new(&mut rng, 6, 300);
    let n = batch.rows.n();
    let logp = batch.nan_pads(rng.vec_uniform(n, -3.0, -0.1));
    let old = rng.vec_uniform(n, -3.0, -0.1);
    let adv = rng.vec_normal(n, 1.0);
    let d = PolicyData {
        logp: &logp,
        logp_old: &old,
        adv: &adv,
        adv_per_seq: false,
        logp_ref: Some(&old),
        entropy: None,
        is_weight: None,
        mask: &batch.mask,
        rows: batch.rows,
    };
    let cfg = PolicyLossCfg {
        kl_coef: 0.04,
        ..ppo_cfg(Aggregation::Bnpo)
    };
    let (logits, targets) = logits_case(&mut rng, 4, 1000);
    let zeros = vec![0.0; n];
    let run = |seed: u64| {
        let emu = Emu::with_seed(seed);
        let o = run_policy(&emu, &d, &cfg, &zeros, 1.0);
        let lp = emu.logprobs(&logits, &targets, 1000, 1.0);
        (o.stats, o.dlogp, lp.lse, lp.entropy)
    };
    let first = run(1);
    for seed in [2, 3, 0xdead_beef] {
        let other = run(seed);
        assert_eq!(first.0, other.0, "stats, seed {seed}");
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&first.1), bits(&other.1), "dlogp, seed {seed}");
        assert_eq!(bits(&first.2), bits(&other.2), "lse, seed {seed}");
        assert_eq!(bits(&first.3), bits(&other.3), "entropy, seed {seed}");
    }
}

/// Removing a `__syncthreads` is caught: the log-prob forward has exactly one (between writing
/// the per-warp softmax statistics to shared memory and merging them), and without it threads
/// read slots other warps have not written yet, which the shim fills with NaN.
#[test]
fn shim_catches_a_removed_syncthreads() {
    let mut rng = Rng::new(31);
    let (n, v) = (8, 1000);
    let (logits, targets) = logits_case(&mut rng, n, v);
    let good = Emu::default().logprobs(&logits, &targets, v, 1.0);
    let raced = Emu::default()
        .with_dropped_sync(1)
        .logprobs(&logits, &targets, v, 1.0);
    let wrong = good
        .lse
        .iter()
        .zip(&raced.lse)
        .filter(|(g, r)| g.to_bits() != r.to_bits())
        .count();
    assert!(
        wrong > 0,
        "a removed barrier went unnoticed: {:?}",
        raced.lse
    );

    // The same for a reduction kernel: block_sum's second barrier publishes the warp sums (its
    // first only guards a previous call's readers, and a first call has none).
    let batch = Batch::new(&mut rng, 5, 300);
    let logp = rng.vec_uniform(batch.rows.n(), -3.0, -0.1);
    let lref = rng.vec_uniform(batch.rows.n(), -3.0, -0.1);
    let zeros = vec![0.0; batch.rows.n()];
    let kl = |emu: Emu| {
        run_kl(
            &emu,
            &logp,
            &lref,
            &batch.mask,
            batch.rows,
            KlEstimator::K3,
            Aggregation::Grpo,
            &zeros,
        )
        .0
    };
    let want = kl(Emu::default());
    assert_eq!(
        kl(Emu::default().with_dropped_sync(1)),
        want,
        "the first barrier is a guard"
    );
    let got = kl(Emu::default().with_dropped_sync(2));
    assert!(
        got.to_bits() != want.to_bits(),
        "a removed barrier went unnoticed: {got}"
    );
}
