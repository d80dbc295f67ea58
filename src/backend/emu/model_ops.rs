//! The model and decode families ([`ModelOps`](crate::backend::ModelOps),
//! [`DecodeOps`](crate::backend::DecodeOps)) on the kernels, for every [`Launcher`]: the emulated
//! backend and the device backend implement them with one expansion of
//! [`model_ops_via_launcher!`](crate::model_ops_via_launcher), so they cannot drift apart.
//!
//! The drivers of the matmul ([`super::matmul`]) and element-wise ([`super::elementwise`]) kernels
//! already take views; this module adds view-taking drivers for the norm, attention and log-prob
//! kernels, whose pointer-level drivers in [`super::ops`] also serve bf16 activations.
//!
//! Precision: buffers are f32 (the trait's), GEMMs round their operands to bf16 and accumulate
//! in f32 (cuBLAS's `COMPUTE_32F_FAST_16BF`; see [`super::matmul`]), attention at head dims 64
//! and 128 runs the tensor-core kernels on bf16 copies of its inputs ([`bf16_attention`]),
//! everything else is f32. The parameters are the f32 master weights AdamW updates; the GEMMs'
//! rounding is the model's bf16 copy, made as each product reads them.

use super::elementwise::plans;
use super::ops::{self, input, output, KernelError, Launcher};
use super::plan::{self, AttnDtype, AttnKernel, DevPtr, Dtype};
use crate::backend::AttnShape;

/// `ModelOps::layernorm_forward` (with `mean` and `b`) or `ModelOps::rmsnorm_forward` (without)
/// on the kernels.
#[allow(clippy::too_many_arguments)]
pub fn norm_forward<L: Launcher>(
    l: &L,
    mut out: L::ViewMut<'_>,
    mut mean: Option<L::ViewMut<'_>>,
    mut rstd: L::ViewMut<'_>,
    inp: L::View<'_>,
    w: L::View<'_>,
    b: Option<L::View<'_>>,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<(), KernelError> {
    let layer = mean.is_some();
    assert_eq!(
        layer,
        b.is_some(),
        "norm_forward: LayerNorm needs both mean and b"
    );
    let p = plan::NormFwdPtrs {
        inp: input(l, inp, n * c, "norm_forward: inp"),
        w: input(l, w, c, "norm_forward: w"),
        b: ops::opt_input(l, b, c, "norm_forward: b"),
        out: output(l, &mut out, n * c, "norm_forward: out"),
        mean: ops::opt_output(l, &mut mean, n, "norm_forward: mean"),
        rstd: output(l, &mut rstd, n, "norm_forward: rstd"),
    };
    // SAFETY: every length was checked against N and C above.
    unsafe { ops::norm_forward(l, layer, p, n, c, eps) }
}

/// `ModelOps::layernorm_backward` (with `mean`) or `ModelOps::rmsnorm_backward` (without) on the
/// kernels: dinp and dw are added to.
#[allow(clippy::too_many_arguments)]
pub fn norm_backward<L: Launcher>(
    l: &L,
    mut dinp: L::ViewMut<'_>,
    mut dw: L::ViewMut<'_>,
    dout: L::View<'_>,
    inp: L::View<'_>,
    w: L::View<'_>,
    mean: Option<L::View<'_>>,
    rstd: L::View<'_>,
    n: usize,
    c: usize,
) -> Result<(), KernelError> {
    let p = plan::NormBwdPtrs {
        dinp: output(l, &mut dinp, n * c, "norm_backward: dinp"),
        dw: output(l, &mut dw, c, "norm_backward: dw"),
        dout: input(l, dout, n * c, "norm_backward: dout"),
        inp: input(l, inp, n * c, "norm_backward: inp"),
        w: input(l, w, c, "norm_backward: w"),
        mean: ops::opt_input(l, mean, n, "norm_backward: mean"),
        rstd: input(l, rstd, n, "norm_backward: rstd"),
    };
    // A null mean selects the RMSNorm kernels: an empty view's address may be null, but then
    // there is nothing to launch anyway.
    if n == 0 || c == 0 {
        return Ok(());
    }
    // SAFETY: every length was checked against N and C above.
    unsafe { ops::norm_backward(l, p, n, c) }
}

/// The forward's pointers; panics unless qkv, out and lse hold what `s` says.
fn attention_fwd_ptrs<L: Launcher>(
    l: &L,
    s: &AttnShape,
    qkv: L::View<'_>,
    out: &mut L::ViewMut<'_>,
    lse: &mut L::ViewMut<'_>,
) -> plan::AttnFwdPtrs {
    let n = s.b * s.t;
    plan::AttnFwdPtrs {
        qkv: input(l, qkv, n * s.qkv_width(), "attention_forward: qkv"),
        out: output(l, out, n * s.out_width(), "attention_forward: out"),
        lse: output(l, lse, s.b * s.n_head * s.t, "attention_forward: lse"),
    }
}

/// Whether the model's attention at this shape runs the tensor-core kernels, on bf16 copies of
/// its f32 activations; else the SIMT kernels run on the f32 activations themselves.
pub fn bf16_attention(s: &AttnShape) -> bool {
    AttnKernel::Auto.uses_tensor_cores(AttnDtype::Bf16, s.head_dim)
}

/// A bf16 copy of `n` f32 values at `x`, in scratch memory.
fn bf16_copy<L: Launcher>(l: &L, x: DevPtr, n: usize) -> Result<L::Scratch, KernelError> {
    let y = l.scratch(n.div_ceil(4))?;
    if n > 0 {
        // SAFETY: the caller vouches for n f32 values at x; y holds n bf16 values.
        unsafe { l.launch(&plans::to_bf16(x, n, l.scratch_ptr(&y)))? };
    }
    Ok(y)
}

/// `acc (+)= x` for n bf16 values `x` in scratch memory into f32 memory at `acc`.
///
/// # Safety
///
/// `acc` must address n writable f32 values and `x` hold n bf16 values.
unsafe fn widen_into<L: Launcher>(
    l: &L,
    acc: DevPtr,
    x: &L::Scratch,
    accumulate: bool,
    n: usize,
) -> Result<(), KernelError> {
    if n == 0 {
        return Ok(());
    }
    // SAFETY: forwarded from the caller.
    unsafe { l.launch(&plans::add_bf16(acc, l.scratch_ptr(x), accumulate, n)) }
}

/// `ModelOps::attention_forward` on the kernels: f32 activations, through bf16 copies on the
/// tensor cores where [`bf16_attention`] says so.
pub fn attention_forward<L: Launcher>(
    l: &L,
    mut out: L::ViewMut<'_>,
    mut lse: L::ViewMut<'_>,
    qkv: L::View<'_>,
    key_mask: &[bool],
    s: AttnShape,
) -> Result<(), KernelError> {
    let p = attention_fwd_ptrs(l, &s, qkv, &mut out, &mut lse);
    if !bf16_attention(&s) {
        // SAFETY: every length was checked against the shape above (the driver checks the mask).
        return unsafe { ops::attention_forward(l, AttnDtype::F32, p, key_mask, s) };
    }
    let n = s.b * s.t;
    let (nq, no) = (n * s.qkv_width(), n * s.out_width());
    let qkv16 = bf16_copy(l, p.qkv, nq)?;
    let out16 = l.scratch(no.div_ceil(4))?;
    let p16 = plan::AttnFwdPtrs {
        qkv: l.scratch_ptr(&qkv16),
        out: l.scratch_ptr(&out16),
        lse: p.lse,
    };
    // SAFETY: the bf16 copies hold as many values as the checked f32 views, lse is checked.
    unsafe {
        ops::attention_forward(l, AttnDtype::Bf16, p16, key_mask, s)?;
        widen_into(l, p.out, &out16, false, no)
    }
}

/// `ModelOps::attention_backward` on the kernels (dqkv is added to), as
/// [`attention_forward`] chose: f32 SIMT, or bf16 copies on the tensor cores.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<L: Launcher>(
    l: &L,
    mut dqkv: L::ViewMut<'_>,
    dout: L::View<'_>,
    qkv: L::View<'_>,
    out: L::View<'_>,
    lse: L::View<'_>,
    key_mask: &[bool],
    s: AttnShape,
) -> Result<(), KernelError> {
    let n = s.b * s.t;
    let (nq, no) = (n * s.qkv_width(), n * s.out_width());
    let p = plan::AttnBwdPtrs {
        dqkv: output(l, &mut dqkv, nq, "attention_backward: dqkv"),
        dout: input(l, dout, no, "attention_backward: dout"),
        qkv: input(l, qkv, nq, "attention_backward: qkv"),
        out: input(l, out, no, "attention_backward: out"),
        lse: input(l, lse, s.b * s.n_head * s.t, "attention_backward: lse"),
    };
    if !bf16_attention(&s) {
        // SAFETY: every length was checked against the shape above (the driver checks the mask).
        return unsafe { ops::attention_backward(l, AttnDtype::F32, p, key_mask, s) };
    }
    // The forward's bf16 output widened exactly to f32, so rounding it again gives it back.
    let (qkv16, out16, dout16) = (
        bf16_copy(l, p.qkv, nq)?,
        bf16_copy(l, p.out, no)?,
        bf16_copy(l, p.dout, no)?,
    );
    let dqkv16 = l.scratch(nq.div_ceil(4))?;
    let p16 = plan::AttnBwdPtrs {
        dqkv: l.scratch_ptr(&dqkv16),
        dout: l.scratch_ptr(&dout16),
        qkv: l.scratch_ptr(&qkv16),
        out: l.scratch_ptr(&out16),
        lse: p.lse,
    };
    // SAFETY: the bf16 copies hold as many values as the checked f32 views; the zeroed dqkv16
    // collects the gradient, which is then added to dqkv.
    unsafe {
        ops::attention_backward(l, AttnDtype::Bf16, p16, key_mask, s)?;
        widen_into(l, p.dqkv, &dqkv16, true, nq)
    }
}

/// `DecodeOps::attention_decode` on the kernels, f32 activations and cache.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode<L: Launcher>(
    l: &L,
    mut out: L::ViewMut<'_>,
    qkv: L::View<'_>,
    k_cache: L::View<'_>,
    v_cache: L::View<'_>,
    key_mask: &[bool],
    s: AttnShape,
    len: usize,
    t_max: usize,
) -> Result<(), KernelError> {
    let cache = s.b * s.n_kv_head * t_max * s.head_dim;
    let p = plan::AttnDecodePtrs {
        qkv: input(l, qkv, s.b * s.qkv_width(), "attention_decode: qkv"),
        k_cache: input(l, k_cache, cache, "attention_decode: k_cache"),
        v_cache: input(l, v_cache, cache, "attention_decode: v_cache"),
        out: output(l, &mut out, s.b * s.out_width(), "attention_decode: out"),
    };
    // SAFETY: every length was checked against the shape above (the driver checks the mask and
    // `len <= t_max`).
    unsafe { ops::attention_decode(l, AttnDtype::F32, p, key_mask, s, len, t_max) }
}

/// `ModelOps::logprobs_forward` on the kernels, f32 logits.
#[allow(clippy::too_many_arguments)]
pub fn logprobs_forward<L: Launcher>(
    l: &L,
    mut logp: L::ViewMut<'_>,
    entropy: Option<L::ViewMut<'_>>,
    mut lse: L::ViewMut<'_>,
    logits: L::View<'_>,
    targets: &[u32],
    n: usize,
    v: usize,
    temperature: f32,
) -> Result<(), KernelError> {
    let mut entropy = entropy;
    let p = plan::LogprobFwdPtrs {
        logits: input(l, logits, n * v, "logprobs_forward: logits"),
        logp: output(l, &mut logp, n, "logprobs_forward: logp"),
        entropy: ops::opt_output(l, &mut entropy, n, "logprobs_forward: entropy"),
        lse: output(l, &mut lse, n, "logprobs_forward: lse"),
    };
    // SAFETY: every length was checked against N and V above (the driver checks the targets).
    unsafe { ops::logprobs_forward(l, Dtype::F32, p, targets, n, v, temperature) }
}

/// `ModelOps::logprobs_backward` on the kernels, f32 logits (dlogits is added to).
#[allow(clippy::too_many_arguments)]
pub fn logprobs_backward<L: Launcher>(
    l: &L,
    mut dlogits: L::ViewMut<'_>,
    logits: L::View<'_>,
    targets: &[u32],
    lse: L::View<'_>,
    dlogp: L::View<'_>,
    dentropy: Option<L::View<'_>>,
    n: usize,
    v: usize,
    temperature: f32,
) -> Result<(), KernelError> {
    let p = plan::LogprobBwdPtrs {
        dlogits: output(l, &mut dlogits, n * v, "logprobs_backward: dlogits"),
        logits: input(l, logits, n * v, "logprobs_backward: logits"),
        lse: input(l, lse, n, "logprobs_backward: lse"),
        dlogp: input(l, dlogp, n, "logprobs_backward: dlogp"),
        dentropy: ops::opt_input(l, dentropy, n, "logprobs_backward: dentropy"),
    };
    // SAFETY: every length was checked against N and V above (the driver checks the targets).
    unsafe { ops::logprobs_backward(l, Dtype::F32, p, targets, n, v, temperature) }
}

/// `impl ModelOps` and `impl DecodeOps for $ty` by the view drivers of the kernels, with `$ty` as
/// the launcher; a launch failure panics, as the trait's ops are infallible. `[$($gen)*]` holds
/// the impl's generic parameters, if any: `model_ops_via_launcher!([] Emu)`,
/// `model_ops_via_launcher!([L: Launcher] Metered<L>)`.
#[macro_export]
macro_rules! model_ops_via_launcher {
    ([$($gen:tt)*] $ty:ty) => {
        $crate::model_ops_via_launcher!(@model [$($gen)*] $ty);
        $crate::model_ops_via_launcher!(@decode [$($gen)*] $ty);
    };
    (@model [$($gen:tt)*] $ty:ty) => {
        impl<$($gen)*> $crate::backend::ModelOps for $ty {
            fn embedding_forward(
                &self,
                out: Self::ViewMut<'_>,
                table: Self::View<'_>,
                ids: &[u32],
                c: usize,
                accumulate: bool,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::embedding_forward(
                        self, out, table, ids, c, accumulate,
                    ),
                )
            }
            fn embedding_backward(
                &self,
                dtable: Self::ViewMut<'_>,
                dout: Self::View<'_>,
                ids: &[u32],
                c: usize,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::embedding_backward(self, dtable, dout, ids, c),
                )
            }
            fn matmul_forward(
                &self,
                out: Self::ViewMut<'_>,
                inp: Self::View<'_>,
                w: Self::View<'_>,
                bias: Option<Self::View<'_>>,
                n: usize,
                c: usize,
                oc: usize,
            ) {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::matmul::matmul_forward(
                    self, out, inp, w, bias, n, c, oc,
                ))
            }
            fn matmul_backward(
                &self,
                dinp: Option<Self::ViewMut<'_>>,
                dw: Self::ViewMut<'_>,
                dout: Self::View<'_>,
                inp: Self::View<'_>,
                w: Self::View<'_>,
                n: usize,
                c: usize,
                oc: usize,
            ) {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::matmul::matmul_backward(
                    self, dinp, dw, dout, inp, w, n, c, oc,
                ))
            }
            fn bias_backward(
                &self,
                dbias: Self::ViewMut<'_>,
                dout: Self::View<'_>,
                n: usize,
                oc: usize,
            ) {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::matmul::bias_backward(
                    self, dbias, dout, n, oc,
                ))
            }
            fn layernorm_forward(
                &self,
                out: Self::ViewMut<'_>,
                mean: Self::ViewMut<'_>,
                rstd: Self::ViewMut<'_>,
                inp: Self::View<'_>,
                w: Self::View<'_>,
                b: Self::View<'_>,
                n: usize,
                c: usize,
                eps: f32,
            ) {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::model_ops::norm_forward(
                    self,
                    out,
                    Some(mean),
                    rstd,
                    inp,
                    w,
                    Some(b),
                    n,
                    c,
                    eps,
                ))
            }
            fn layernorm_backward(
                &self,
                dinp: Self::ViewMut<'_>,
                dw: Self::ViewMut<'_>,
                dout: Self::View<'_>,
                inp: Self::View<'_>,
                w: Self::View<'_>,
                mean: Self::View<'_>,
                rstd: Self::View<'_>,
                n: usize,
                c: usize,
            ) {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::model_ops::norm_backward(
                    self,
                    dinp,
                    dw,
                    dout,
                    inp,
                    w,
                    Some(mean),
                    rstd,
                    n,
                    c,
                ))
            }
            fn rmsnorm_forward(
                &self,
                out: Self::ViewMut<'_>,
                rstd: Self::ViewMut<'_>,
                inp: Self::View<'_>,
                w: Self::View<'_>,
                n: usize,
                c: usize,
                eps: f32,
            ) {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::model_ops::norm_forward(
                    self, out, None, rstd, inp, w, None, n, c, eps,
                ))
            }
            fn rmsnorm_backward(
                &self,
                dinp: Self::ViewMut<'_>,
                dw: Self::ViewMut<'_>,
                dout: Self::View<'_>,
                inp: Self::View<'_>,
                w: Self::View<'_>,
                rstd: Self::View<'_>,
                n: usize,
                c: usize,
            ) {
                $crate::backend::emu::ops::or_panic($crate::backend::emu::model_ops::norm_backward(
                    self, dinp, dw, dout, inp, w, None, rstd, n, c,
                ))
            }
            fn gelu_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::gelu_forward(self, out, inp),
                )
            }
            fn gelu_backward(
                &self,
                dinp: Self::ViewMut<'_>,
                inp: Self::View<'_>,
                dout: Self::View<'_>,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::gelu_backward(self, dinp, inp, dout),
                )
            }
            fn swiglu_forward(
                &self,
                out: Self::ViewMut<'_>,
                inp: Self::View<'_>,
                n: usize,
                i: usize,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::swiglu_forward(self, out, inp, n, i),
                )
            }
            fn swiglu_backward(
                &self,
                dinp: Self::ViewMut<'_>,
                inp: Self::View<'_>,
                dout: Self::View<'_>,
                n: usize,
                i: usize,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::swiglu_backward(self, dinp, inp, dout, n, i),
                )
            }
            fn rope_forward(
                &self,
                qkv: Self::ViewMut<'_>,
                pos: &[u32],
                shape: $crate::backend::AttnShape,
                theta: f32,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::rope_forward(self, qkv, pos, shape, theta),
                )
            }
            fn rope_backward(
                &self,
                dqkv: Self::ViewMut<'_>,
                pos: &[u32],
                shape: $crate::backend::AttnShape,
                theta: f32,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::rope_backward(self, dqkv, pos, shape, theta),
                )
            }
            fn attention_forward(
                &self,
                out: Self::ViewMut<'_>,
                lse: Self::ViewMut<'_>,
                qkv: Self::View<'_>,
                key_mask: &[bool],
                shape: $crate::backend::AttnShape,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::model_ops::attention_forward(
                        self, out, lse, qkv, key_mask, shape,
                    ),
                )
            }
            fn attention_backward(
                &self,
                dqkv: Self::ViewMut<'_>,
                dout: Self::View<'_>,
                qkv: Self::View<'_>,
                out: Self::View<'_>,
                lse: Self::View<'_>,
                key_mask: &[bool],
                shape: $crate::backend::AttnShape,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::model_ops::attention_backward(
                        self, dqkv, dout, qkv, out, lse, key_mask, shape,
                    ),
                )
            }
            fn add(&self, out: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::add(self, out, a, b),
                )
            }
            fn add_inplace(&self, acc: Self::ViewMut<'_>, x: Self::View<'_>) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::add_inplace(self, acc, x),
                )
            }
            fn scale(&self, x: Self::ViewMut<'_>, s: f32) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::scale(self, x, s),
                )
            }
            fn logprobs_forward(
                &self,
                logp: Self::ViewMut<'_>,
                entropy: Option<Self::ViewMut<'_>>,
                lse: Self::ViewMut<'_>,
                logits: Self::View<'_>,
                targets: &[u32],
                n: usize,
                v: usize,
                temperature: f32,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::model_ops::logprobs_forward(
                        self, logp, entropy, lse, logits, targets, n, v, temperature,
                    ),
                )
            }
            fn logprobs_backward(
                &self,
                dlogits: Self::ViewMut<'_>,
                logits: Self::View<'_>,
                targets: &[u32],
                lse: Self::View<'_>,
                dlogp: Self::View<'_>,
                dentropy: Option<Self::View<'_>>,
                n: usize,
                v: usize,
                temperature: f32,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::model_ops::logprobs_backward(
                        self, dlogits, logits, targets, lse, dlogp, dentropy, n, v, temperature,
                    ),
                )
            }
            fn sum_squares(&self, x: Self::View<'_>) -> f64 {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::sum_squares(self, x),
                )
            }
            fn adamw(
                &self,
                params: Self::ViewMut<'_>,
                grads: Self::View<'_>,
                m: Self::ViewMut<'_>,
                v: Self::ViewMut<'_>,
                h: $crate::backend::AdamW,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::adamw(self, params, grads, m, v, h),
                )
            }
        }
    };
    (@decode [$($gen:tt)*] $ty:ty) => {
        impl<$($gen)*> $crate::backend::DecodeOps for $ty {
            fn kv_cache_store(
                &self,
                k_cache: Self::ViewMut<'_>,
                v_cache: Self::ViewMut<'_>,
                qkv: Self::View<'_>,
                shape: $crate::backend::AttnShape,
                t0: usize,
                t_max: usize,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::elementwise::kv_cache_store(
                        self, k_cache, v_cache, qkv, shape, t0, t_max,
                    ),
                )
            }
            fn attention_decode(
                &self,
                out: Self::ViewMut<'_>,
                qkv: Self::View<'_>,
                k_cache: Self::View<'_>,
                v_cache: Self::View<'_>,
                key_mask: &[bool],
                shape: $crate::backend::AttnShape,
                len: usize,
                t_max: usize,
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::model_ops::attention_decode(
                        self, out, qkv, k_cache, v_cache, key_mask, shape, len, t_max,
                    ),
                )
            }
            fn sample_tokens(
                &self,
                logits: Self::View<'_>,
                rows: &[u32],
                v: usize,
                p: $crate::backend::SampleParams,
                uniforms: &[f64],
                ids: &mut [u32],
                logps: &mut [f32],
            ) {
                $crate::backend::emu::ops::or_panic(
                    $crate::backend::emu::sampling::sample_tokens(
                        self, logits, rows, v, p, uniforms, ids, logps,
                    ),
                )
            }
        }
    };
}
