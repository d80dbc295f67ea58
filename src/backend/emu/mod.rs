//! The emulated CUDA backend: the kernels in `kernels/`, compiled by g++ against the emulation
//! shim (`kernels/emu/`, built by build.rs), run on the CPU (DESIGN.md principle 3).
//!
//! [`Emu`] implements the loss family ([`LossOps`](super::LossOps)) through exactly the host code
//! the device backend ([`super::cuda`]) uses — the launch plans in [`plan`] and the op drivers in
//! [`ops`] — with host memory standing in for device memory, so tests check the kernels and all
//! of that host code against the CPU reference without a GPU. The log-prob kernels are reached
//! through [`Emu::logprobs_forward`] and [`Emu::logprobs_backward`], which also take bf16 and f16
//! logits, and the attention kernels through [`Emu::attention_forward`],
//! [`Emu::attention_backward`] and [`Emu::attention_decode`], with f32 or bf16 activations.
//!
//! The shim runs one fiber per CUDA thread, blocks one after another, and resumes threads after
//! each barrier in an order drawn from [`Emu::with_seed`]'s seed; a correct kernel gives the same
//! bits for every seed. [`Emu::with_dropped_sync`] removes one `__syncthreads` from every thread,
//! to show that the shim catches the race that opens.

pub mod elementwise;
pub mod matmul;
pub mod model_ops;
pub mod ops;
pub mod plan;
pub mod sampling;
mod shim;

pub use ops::{KernelError, Launcher};
pub use shim::has_kernel;

use super::{AttnShape, Backend};
use plan::{AttnKernel, AttnType, DevPtr, Dtype, Launch};
use std::cell::Cell;
use std::ops::Range;

/// The emulated CUDA backend. Buffers are host `Vec<f32>`, as on the CPU backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emu {
    seed: u64,
    drop_sync: u32,
    f32_gemm: bool,
}

impl Default for Emu {
    fn default() -> Emu {
        Emu::with_seed(0x5eed)
    }
}

impl Emu {
    /// An emulator that orders threads after each barrier from `seed`.
    pub fn with_seed(seed: u64) -> Emu {
        Emu {
            seed,
            drop_sync: 0,
            f32_gemm: false,
        }
    }

    /// The same emulator with GEMMs in f32 instead of cuBLAS's bf16 operands: everything else in
    /// a model then matches the CPU reference to f32 rounding, which tests check tightly.
    pub fn with_f32_gemm(self) -> Emu {
        Emu {
            f32_gemm: true,
            ..self
        }
    }

    /// The same emulator with each thread's `k`-th `__syncthreads` (1-based) skipped, for tests
    /// that show a missing barrier is caught; 0 skips none.
    pub fn with_dropped_sync(self, k: u32) -> Emu {
        Emu {
            drop_sync: k,
            ..self
        }
    }

    /// `ModelOps::logprobs_forward` on the kernels, with logits of any [`Logits`] type.
    /// logp, lse: (N); entropy: (N) if wanted; logits: (N, V); targets: (N) ids `< V`.
    #[allow(clippy::too_many_arguments)]
    pub fn logprobs_forward(
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
        assert_eq!(logits.len(), n * v, "logprobs_forward: logits is not N·V");
        assert!(
            logp.len() == n && lse.len() == n,
            "logprobs_forward: logp and lse must be N"
        );
        let entropy = entropy.map_or(DevPtr::NULL, |e| {
            assert_eq!(e.len(), n, "logprobs_forward: entropy must be N");
            mut_ptr(e)
        });
        let p = plan::LogprobFwdPtrs {
            logits: logits.ptr(),
            logp: mut_ptr(logp),
            entropy,
            lse: mut_ptr(lse),
        };
        // SAFETY: every tensor's length was checked against N and V above (the driver checks the
        // targets), and the slices outlive the call, which runs the kernel to completion.
        unsafe { ops::logprobs_forward(self, logits.dtype(), p, targets, n, v, temperature) }
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// `ModelOps::logprobs_backward` on the kernels; `dlogits` has the logits' type.
    /// dlogits, logits: (N, V); targets, lse, dlogp, dentropy: (N).
    #[allow(clippy::too_many_arguments)]
    pub fn logprobs_backward(
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
        let dtype = logits.dtype();
        assert_eq!(
            dlogits.dtype(),
            dtype,
            "logprobs_backward: dlogits and logits differ in type"
        );
        assert_eq!(logits.len(), n * v, "logprobs_backward: logits is not N·V");
        assert_eq!(
            dlogits.len(),
            n * v,
            "logprobs_backward: dlogits is not N·V"
        );
        assert!(
            lse.len() == n && dlogp.len() == n,
            "logprobs_backward: lse and dlogp must be N"
        );
        let dentropy = dentropy.map_or(DevPtr::NULL, |d| {
            assert_eq!(d.len(), n, "logprobs_backward: dentropy must be N");
            ptr(d)
        });
        let p = plan::LogprobBwdPtrs {
            dlogits: dlogits.ptr(),
            logits: logits.ptr(),
            lse: ptr(lse),
            dlogp: ptr(dlogp),
            dentropy,
        };
        // SAFETY: every tensor's length was checked against N and V above (the driver checks the
        // targets), and the slices outlive the call, which runs the kernel to completion.
        unsafe { ops::logprobs_backward(self, dtype, p, targets, n, v, temperature) }
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// `ModelOps::attention_forward` on the kernels, with activations of any [`AttnType`] (f32 or
    /// bf16; lse is f32): the tensor-core forward for bf16 at head dims 64 and 128, else the SIMT
    /// one ([`AttnKernel::Auto`]). out: (B·T, NH·HD), lse: (B, NH, T), qkv: (B·T, qkv_width),
    /// key_mask: (B·T).
    pub fn attention_forward<E: AttnType>(
        &self,
        out: &mut [E],
        lse: &mut [f32],
        qkv: &[E],
        key_mask: &[bool],
        shape: AttnShape,
    ) {
        self.attention_forward_with(AttnKernel::Auto, out, lse, qkv, key_mask, shape)
    }

    /// [`Emu::attention_forward`] on the forward `kernel` selects ([`AttnKernel::Simt`] forces
    /// the SIMT kernel, for comparison).
    pub fn attention_forward_with<E: AttnType>(
        &self,
        kernel: AttnKernel,
        out: &mut [E],
        lse: &mut [f32],
        qkv: &[E],
        key_mask: &[bool],
        shape: AttnShape,
    ) {
        check_attention_lens("attention_forward", &shape, qkv.len(), out.len(), lse.len());
        let p = plan::AttnFwdPtrs {
            qkv: ptr(qkv),
            out: mut_ptr(out),
            lse: mut_ptr(lse),
        };
        // SAFETY: every tensor's length was checked against the shape above (the driver checks the
        // shape and the mask), and the slices outlive the call, which runs the kernel to
        // completion.
        unsafe { ops::attention_forward_with(self, E::ATTN, kernel, p, key_mask, shape) }
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// `ModelOps::attention_backward` on the kernels: `dqkv += ∂loss/∂qkv`, all activations of one
    /// [`AttnType`]; the tensor-core kernels for bf16 at head dims 64 and 128, else the SIMT ones
    /// ([`AttnKernel::Auto`]). dqkv, qkv: (B·T, qkv_width), dout, out: (B·T, NH·HD), lse:
    /// (B, NH, T) from the forward, key_mask: (B·T).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<E: AttnType>(
        &self,
        dqkv: &mut [E],
        dout: &[E],
        qkv: &[E],
        out: &[E],
        lse: &[f32],
        key_mask: &[bool],
        shape: AttnShape,
    ) {
        let kernel = AttnKernel::Auto;
        self.attention_backward_with(kernel, dqkv, dout, qkv, out, lse, key_mask, shape)
    }

    /// [`Emu::attention_backward`] on the kernels `kernel` selects ([`AttnKernel::Simt`] forces
    /// the SIMT ones, for comparison).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward_with<E: AttnType>(
        &self,
        kernel: AttnKernel,
        dqkv: &mut [E],
        dout: &[E],
        qkv: &[E],
        out: &[E],
        lse: &[f32],
        key_mask: &[bool],
        shape: AttnShape,
    ) {
        let op = "attention_backward";
        check_attention_lens(op, &shape, qkv.len(), out.len(), lse.len());
        assert_eq!(dqkv.len(), qkv.len(), "{op}: dqkv and qkv differ in length");
        assert_eq!(dout.len(), out.len(), "{op}: dout and out differ in length");
        let p = plan::AttnBwdPtrs {
            dqkv: mut_ptr(dqkv),
            dout: ptr(dout),
            qkv: ptr(qkv),
            out: ptr(out),
            lse: ptr(lse),
        };
        // SAFETY: as in `attention_forward_with`.
        unsafe { ops::attention_backward_with(self, E::ATTN, kernel, p, key_mask, shape) }
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// `DecodeOps::attention_decode` on the kernels, activations and cache of one [`AttnType`]:
    /// one query row per sequence against cache columns `0..len`. out: (B, NH·HD),
    /// qkv: (B, qkv_width), k_cache, v_cache: (B, KVH, t_max, HD), key_mask: (B·t_max).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode<E: AttnType>(
        &self,
        out: &mut [E],
        qkv: &[E],
        k_cache: &[E],
        v_cache: &[E],
        key_mask: &[bool],
        shape: AttnShape,
        len: usize,
        t_max: usize,
    ) {
        let op = "attention_decode";
        let s = &shape;
        assert_eq!(
            qkv.len(),
            s.b * s.qkv_width(),
            "{op}: qkv is not B·qkv_width"
        );
        assert_eq!(out.len(), s.b * s.out_width(), "{op}: out is not B·NH·HD");
        let cache = s.b * s.n_kv_head * t_max * s.head_dim;
        assert!(
            k_cache.len() == cache && v_cache.len() == cache,
            "{op}: caches are not B·KVH·TMAX·HD"
        );
        let p = plan::AttnDecodePtrs {
            qkv: ptr(qkv),
            k_cache: ptr(k_cache),
            v_cache: ptr(v_cache),
            out: mut_ptr(out),
        };
        // SAFETY: as in `attention_forward` (the driver also checks `len <= t_max`).
        unsafe { ops::attention_decode(self, E::ATTN, p, key_mask, shape, len, t_max) }
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Panics unless qkv, out and lse hold what `s` says (the CPU op's messages).
fn check_attention_lens(op: &str, s: &AttnShape, qkv: usize, out: usize, lse: usize) {
    let n = s.b * s.t;
    assert_eq!(qkv, n * s.qkv_width(), "{op}: qkv is not B·T·qkv_width");
    assert_eq!(out, n * s.out_width(), "{op}: out is not B·T·NH·HD");
    assert_eq!(lse, s.b * s.n_head * s.t, "{op}: lse is not B·NH·T");
}

/// Logits for the log-prob kernels, of any of the types they read.
#[derive(Clone, Copy, Debug)]
pub enum Logits<'a> {
    /// f32 logits.
    F32(&'a [f32]),
    /// bf16 logits.
    Bf16(&'a [half::bf16]),
    /// f16 logits.
    F16(&'a [half::f16]),
}

impl Logits<'_> {
    fn len(&self) -> usize {
        match self {
            Logits::F32(x) => x.len(),
            Logits::Bf16(x) => x.len(),
            Logits::F16(x) => x.len(),
        }
    }
    fn dtype(&self) -> Dtype {
        match self {
            Logits::F32(_) => Dtype::F32,
            Logits::Bf16(_) => Dtype::Bf16,
            Logits::F16(_) => Dtype::F16,
        }
    }
    fn ptr(&self) -> DevPtr {
        match self {
            Logits::F32(x) => DevPtr(x.as_ptr() as u64),
            Logits::Bf16(x) => DevPtr(x.as_ptr() as u64),
            Logits::F16(x) => DevPtr(x.as_ptr() as u64),
        }
    }
}

/// Writable logit gradients for [`Emu::logprobs_backward`].
#[derive(Debug)]
pub enum LogitsMut<'a> {
    /// f32 gradients.
    F32(&'a mut [f32]),
    /// bf16 gradients.
    Bf16(&'a mut [half::bf16]),
    /// f16 gradients.
    F16(&'a mut [half::f16]),
}

impl LogitsMut<'_> {
    fn len(&self) -> usize {
        match self {
            LogitsMut::F32(x) => x.len(),
            LogitsMut::Bf16(x) => x.len(),
            LogitsMut::F16(x) => x.len(),
        }
    }
    fn dtype(&self) -> Dtype {
        match self {
            LogitsMut::F32(_) => Dtype::F32,
            LogitsMut::Bf16(_) => Dtype::Bf16,
            LogitsMut::F16(_) => Dtype::F16,
        }
    }
    fn ptr(self) -> DevPtr {
        match self {
            LogitsMut::F32(x) => DevPtr(x.as_mut_ptr() as u64),
            LogitsMut::Bf16(x) => DevPtr(x.as_mut_ptr() as u64),
            LogitsMut::F16(x) => DevPtr(x.as_mut_ptr() as u64),
        }
    }
}

fn ptr<T>(x: &[T]) -> DevPtr {
    DevPtr(x.as_ptr() as u64)
}

fn mut_ptr<T>(x: &mut [T]) -> DevPtr {
    DevPtr(x.as_mut_ptr() as u64)
}

impl Backend for Emu {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> &'static str {
        "emu"
    }
    fn zeros(&self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn download(&self, v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn len(&self, b: &Vec<f32>) -> usize {
        b.len()
    }
    fn view<'a>(&self, b: &'a Vec<f32>, r: Range<usize>) -> &'a [f32] {
        &b[r]
    }
    fn view_mut<'a>(&self, b: &'a mut Vec<f32>, r: Range<usize>) -> &'a mut [f32] {
        &mut b[r]
    }
    fn fill(&self, v: &mut [f32], value: f32) {
        v.fill(value)
    }
    fn copy(&self, dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src)
    }
}

// SAFETY: views are slices, whose pointers and lengths are exactly what the trait asks for, and
// scratch is an owned boxed slice of 8-byte cells (interior mutability: the kernels write through
// pointers taken from a shared borrow). Launches run to completion before `launch` returns, so
// everything a kernel touches is still borrowed while it runs.
unsafe impl Launcher for Emu {
    type Scratch = Box<[Cell<u64>]>;

    fn ptr(&self, v: &[f32]) -> DevPtr {
        ptr(v)
    }
    fn ptr_mut(&self, v: &mut &mut [f32]) -> DevPtr {
        mut_ptr(v)
    }
    fn view_len(&self, v: &[f32]) -> usize {
        v.len()
    }
    fn view_mut_len(&self, v: &&mut [f32]) -> usize {
        v.len()
    }
    fn scratch(&self, len: usize) -> Result<Self::Scratch, KernelError> {
        Ok((0..len).map(|_| Cell::new(0)).collect())
    }
    fn scratch_u32(&self, data: &[u32]) -> Result<Self::Scratch, KernelError> {
        Ok(plan::pack_u32_words(data)
            .into_iter()
            .map(Cell::new)
            .collect())
    }
    fn scratch_ptr(&self, s: &Self::Scratch) -> DevPtr {
        DevPtr(s.as_ptr() as u64)
    }
    fn read_f64(&self, s: &Self::Scratch, len: usize) -> Result<Vec<f64>, KernelError> {
        Ok(s[..len].iter().map(|c| f64::from_bits(c.get())).collect())
    }
    fn synchronize(&self) -> Result<(), KernelError> {
        // Every launch ran to completion before `launch` returned.
        Ok(())
    }
    unsafe fn launch(&self, l: &Launch) -> Result<(), KernelError> {
        // SAFETY: forwarded from the caller.
        unsafe { shim::launch(l, self.seed, self.drop_sync) }
    }
    unsafe fn gemm(&self, g: &matmul::Gemm) -> Result<(), KernelError> {
        // SAFETY: forwarded from the caller (host memory stands in for device memory).
        unsafe { matmul::run_on_host(g, !self.f32_gemm) }
    }
}

// The loss family through the shared drivers, with the emulator as launcher.
crate::loss_ops_via_launcher!([] Emu);
// The model and decode families through the same drivers.
crate::model_ops_via_launcher!([] Emu);
