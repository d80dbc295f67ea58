//! The CUDA backend: the kernels of `kernels/` on a GPU through `cudarc`, loaded at run time so
//! the crate builds and runs without a driver or a toolkit (DESIGN.md principles 1 and 3).
//!
//! [`Cuda`] implements the loss family ([`LossOps`](super::LossOps)) and the log-prob kernels
//! ([`Cuda::logprobs_forward`], [`Cuda::logprobs_backward`]) through exactly the host code the
//! emulated backend runs: the launch plans of [`plan`] and the op drivers of [`ops`]. Only
//! [`Launcher::launch`] and [`Launcher::gemm`] differ — a driver or cuBLAS call here, the shim or
//! the host GEMM executor there — so the emulated tests cover everything but those calls.
//!
//! Opening a device ([`Cuda::open`]): the driver library must load (checked first: cudarc panics
//! where it is absent), then cuBLAS, for the linear layers' GEMMs (checked for the same reason;
//! one handle, bound to the backend's stream), then the kernel files are compiled by NVRTC for
//! the device's architecture ([`compile::Target`]) or read from the on-disk [`cache`], and
//! loaded. All work is queued on one stream, in order; reads back to the host wait for it.
//!
//! [`DeviceChoice`] is the `--device cpu|cuda|auto` of the commands that can use a GPU.

pub mod cache;
pub mod compile;
mod device;
pub mod nvrtc;

pub use compile::Target;
pub use device::{fallback_notice, DeviceChoice, Selected};

use super::emu::matmul::{Gemm, Trans};
use super::emu::ops::{self, or_panic, KernelError, Launcher};
use super::emu::plan::{self, DevPtr, Launch, LogitType};
use super::Backend;
use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{
    result, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

/// Why a CUDA device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No driver library (`libcuda.so`) loads: no NVIDIA driver on this machine.
    #[error("no CUDA driver found (libcuda.so could not be loaded)")]
    NoDriver,
    /// The device opened, but no cuBLAS library (`libcublas.so`) loads.
    #[error(
        "no cuBLAS found (libcublas.so.12 could not be loaded): install the CUDA toolkit's cuBLAS \
         (or `pip install nvidia-cublas-cu12` and put its lib directory on LD_LIBRARY_PATH)"
    )]
    NoCublas,
    /// Creating the cuBLAS handle failed.
    #[error("creating a cuBLAS handle: {0:?}")]
    Cublas(cublas::sys::cublasStatus_t),
    /// A driver call failed.
    #[error("{what}: {code:?}")]
    Driver {
        /// What was being done.
        what: String,
        /// The driver's error code, e.g. `CUDA_ERROR_NO_DEVICE`.
        code: CUresult,
    },
    /// NVRTC is missing or failed to compile a kernel file.
    #[error(transparent)]
    Nvrtc(#[from] nvrtc::NvrtcError),
    /// The compiled kernels do not suit the device or its driver.
    #[error("{0}")]
    Kernels(String),
}

/// The driver's name for an error, e.g. `CUDA_ERROR_OUT_OF_MEMORY`. Formatted from the code
/// alone: cudarc's `Display` asks the driver for a description, which would need it loaded.
fn code(e: DriverError) -> String {
    format!("{:?}", e.0)
}

fn driver_err(what: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
    let what = what.into();
    move |e| CudaError::Driver { what, code: e.0 }
}

impl CudaError {
    /// Whether the error means there is no GPU here — no driver, or a driver that sees no
    /// device — rather than a device that failed to open.
    pub fn is_no_device(&self) -> bool {
        match self {
            CudaError::NoDriver => true,
            CudaError::Driver { code, .. } => *code == CUresult::CUDA_ERROR_NO_DEVICE,
            _ => false,
        }
    }
}

/// Whether the CUDA driver library loads on this machine (a device may still be absent).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library and closes it again.
    unsafe { sys::is_culib_present() }
}

/// Whether the cuBLAS library loads on this machine.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen the cuBLAS library and closes it again.
    unsafe { cublas::sys::is_culib_present() }
}

/// The message for a compiled kernel file the driver would not load. A PTX-version refusal is
/// the known pitfall of an NVRTC newer than the driver, so it says which versions disagree and
/// how to fix it; other failures name the versions too, as the likely cause.
pub fn module_load_error(
    file: &str,
    target: Target,
    err: CUresult,
    driver: (i32, i32),
    nvrtc: (i32, i32),
    ptx_isa: Option<&str>,
) -> String {
    let (d, n) = (
        format!("{}.{}", driver.0, driver.1),
        format!("{}.{}", nvrtc.0, nvrtc.1),
    );
    let isa = ptx_isa.map_or(String::new(), |v| format!(" (PTX ISA {v})"));
    if err == CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
        format!(
            "kernels/{file}: the driver (CUDA {d}) does not accept the {} code from NVRTC \
             {n}{isa}, which is newer than the driver: use an NVRTC no newer than CUDA {d} (e.g. \
             `pip install 'nvidia-cuda-nvrtc-cu12=={d}.*'` and RLHF_NVRTC), or update the driver",
            target.name()
        )
    } else {
        format!(
            "kernels/{file}: loading the {} code from NVRTC {n}{isa} with driver CUDA {d}: {err:?}",
            target.name()
        )
    }
}

/// What was opened, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device ordinal.
    pub ordinal: usize,
    /// The device's name.
    pub name: String,
    /// Its compute capability as `major * 10 + minor`.
    pub arch: u32,
    /// The driver's CUDA version (major, minor).
    pub driver: (i32, i32),
    /// NVRTC's version (major, minor).
    pub nvrtc: (i32, i32),
    /// What the kernels were compiled to.
    pub target: Target,
    /// Kernel files read from the cache (the others were compiled now).
    pub cached_files: usize,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CUDA device {}: {} (sm_{}), driver CUDA {}.{}, kernels compiled by NVRTC {}.{} for {} \
             ({} of {} files from the cache)",
            self.ordinal,
            self.name,
            self.arch,
            self.driver.0,
            self.driver.1,
            self.nvrtc.0,
            self.nvrtc.1,
            self.target.name(),
            self.cached_files,
            compile::SOURCES.len()
        )
    }
}

/// A CUDA device with the kernels loaded.
pub struct Cuda {
    // Declared before `stream` and `ctx`, so the modules unload first.
    functions: HashMap<&'static str, CudaFunction>,
    // Destroyed before the stream it is bound to.
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda").field("info", &self.info).finish()
    }
}

impl Cuda {
    /// Opens device `ordinal` and loads every kernel, compiled for its architecture (or read
    /// from the cache). Errors say what is missing: the driver, the device, NVRTC, or a kernel
    /// the driver would not load.
    pub fn open(ordinal: usize) -> Result<Cuda, CudaError> {
        // cudarc panics on the first driver call where the library is absent: check first.
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(driver_err(format!("opening CUDA device {ordinal}")))?;
        // SAFETY: all of this backend's work goes to one stream, in order, so cudarc's
        // per-allocation events, which order work across streams, are not needed; without them
        // an allocation is one driver call instead of three.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        // cudarc panics on the first cuBLAS call where the library is absent: check first.
        if !cublas_present() {
            return Err(CudaError::NoCublas);
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Cublas(e.0))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("reading the compute capability"))?;
        let name = ctx.name().map_err(driver_err("reading the device name"))?;
        let mut version = 0;
        // SAFETY: a valid out-pointer.
        unsafe { sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(driver_err("reading the driver version"))?;
        let driver = (version / 1000, version % 1000 / 10);

        let nv = nvrtc::load()?;
        let nvrtc_version = nv.version()?;
        let arch = (major * 10 + minor) as u32;
        let supported = nv.supported_archs()?;
        let target = Target::choose(arch, &supported).ok_or_else(|| {
            CudaError::Kernels(format!(
                "NVRTC {}.{} ({}) compiles for none of the architectures sm_{arch} runs \
                 (it supports {supported:?})",
                nvrtc_version.0,
                nvrtc_version.1,
                nv.library()
            ))
        })?;
        let dir = cache::dir();
        let mut functions = HashMap::new();
        let mut cached_files = 0;
        for &(file, source) in compile::SOURCES {
            let load = |use_cache: bool| -> Result<_, CudaError> {
                let image = compile::image(
                    nv,
                    nvrtc_version,
                    file,
                    source,
                    target,
                    dir.as_deref(),
                    use_cache,
                )?;
                let ptx = match target {
                    Target::Sass(_) => cudarc::nvrtc::Ptx::from_binary(image.bytes.clone()),
                    Target::Ptx(_) => cudarc::nvrtc::Ptx::from_src(
                        String::from_utf8_lossy(&image.bytes).into_owned(),
                    ),
                };
                let module = ctx.load_module(ptx).map_err(|e| {
                    CudaError::Kernels(module_load_error(
                        file,
                        target,
                        e.0,
                        driver,
                        nvrtc_version,
                        compile::ptx_isa(&image.bytes).as_deref(),
                    ))
                });
                Ok((module, image.cached))
            };
            let module = match load(true)? {
                (Ok(m), cached) => {
                    cached_files += cached as usize;
                    m
                }
                // A cache entry the driver refuses (a damaged file) is compiled afresh.
                (Err(_), true) => load(false)?.0?,
                (Err(e), false) => return Err(e),
            };
            for k in plan::ALL.iter().filter(|k| k.file == file) {
                let f = module
                    .load_function(k.name)
                    .map_err(driver_err(format!("kernels/{file}: loading {}", k.name)))?;
                functions.insert(k.name, f);
            }
        }
        Ok(Cuda {
            functions,
            blas,
            stream,
            ctx,
            info: DeviceInfo {
                ordinal,
                name,
                arch,
                driver,
                nvrtc: nvrtc_version,
                target,
                cached_files,
            },
        })
    }

    /// What was opened.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Bytes of device memory (free, total).
    pub fn memory(&self) -> Result<(usize, usize), KernelError> {
        self.ctx
            .mem_get_info()
            .map_err(fail("device memory", "querying"))
    }

    /// A zero-filled device buffer of `n` elements.
    pub fn alloc_zeros<T: Elem>(&self, n: usize) -> Result<CudaBuf<T>, KernelError> {
        let slice = self
            .stream
            .alloc_zeros::<T>(n)
            .map_err(fail("device memory", &format!("allocating {n} values")))?;
        Ok(self.wrap(slice))
    }

    /// A device buffer holding a copy of `data`.
    pub fn upload_slice<T: Elem>(&self, data: &[T]) -> Result<CudaBuf<T>, KernelError> {
        let slice = self
            .stream
            .clone_htod(data)
            .map_err(fail("copy to device", &format!("{} values", data.len())))?;
        Ok(self.wrap(slice))
    }

    fn wrap<T>(&self, slice: CudaSlice<T>) -> CudaBuf<T> {
        let ptr = slice.device_ptr(&self.stream).0;
        CudaBuf { slice, ptr }
    }

    /// Copies host values into a device view of the same length.
    pub fn copy_to_device<T: Elem>(
        &self,
        dst: DevViewMut<'_, T>,
        src: &[T],
    ) -> Result<(), KernelError> {
        assert_eq!(dst.len, src.len(), "copy_to_device: lengths differ");
        self.bind("copy to device")?;
        // SAFETY: `dst` addresses `src.len()` values of T on this stream's device (a view's
        // promise); a copy from pageable memory has read `src` when the call returns.
        unsafe { result::memcpy_htod_async(dst.ptr, src, self.stream.cu_stream()) }
            .map_err(fail("copy to device", &format!("{} values", src.len())))
    }

    /// A host copy of a device view, once the work queued before is done.
    pub fn download_slice<T: Elem>(&self, v: DevView<'_, T>) -> Result<Vec<T>, KernelError> {
        let mut host = vec![T::default(); v.len];
        self.copy_to_host(v, &mut host)?;
        Ok(host)
    }

    /// Copies a device view into host memory the caller owns (same length), once the work queued
    /// before is done.
    pub fn copy_to_host<T: Elem>(
        &self,
        v: DevView<'_, T>,
        dst: &mut [T],
    ) -> Result<(), KernelError> {
        assert_eq!(
            v.len,
            dst.len(),
            "copy_to_host: view and destination differ in length"
        );
        if v.len > 0 {
            self.bind("copy to host")?;
            // SAFETY: `v` addresses `v.len` values of T (a view's promise) and `dst` holds as
            // many; the stream is synchronised before `dst` is read.
            unsafe { result::memcpy_dtoh_async(dst, v.ptr, self.stream.cu_stream()) }
                .map_err(fail("copy to host", &format!("{} values", v.len)))?;
        }
        self.synchronize_stream()
    }

    /// `dst = src` on the device (views of the same length).
    pub fn copy_on_device<T: Elem>(
        &self,
        dst: DevViewMut<'_, T>,
        src: DevView<'_, T>,
    ) -> Result<(), KernelError> {
        assert_eq!(dst.len, src.len, "copy_on_device: lengths differ");
        let bytes = src.len * std::mem::size_of::<T>();
        self.bind("copy on device")?;
        // SAFETY: both views address `bytes` bytes on this device (a view's promise); they do
        // not overlap, as one is borrowed mutably.
        unsafe { result::memcpy_dtod_async(dst.ptr, src.ptr, bytes, self.stream.cu_stream()) }
            .map_err(fail("copy on device", &format!("{bytes} bytes")))
    }

    /// Sets every value of an f32 view to `value`.
    pub fn fill_f32(&self, v: DevViewMut<'_, f32>, value: f32) -> Result<(), KernelError> {
        self.bind("fill")?;
        // SAFETY: `v` addresses `v.len` 4-byte values (a view's promise), which a 32-bit memset
        // of that count writes exactly.
        unsafe { sys::cuMemsetD32Async(v.ptr, value.to_bits(), v.len, self.stream.cu_stream()) }
            .result()
            .map_err(fail("fill", &format!("{} values", v.len)))
    }

    /// Makes the device's context current on this thread, as every driver call needs (cudarc's
    /// own calls do this themselves; the raw ones here call it first). Threads share a `Cuda`.
    fn bind(&self, op: &'static str) -> Result<(), KernelError> {
        self.ctx
            .bind_to_thread()
            .map_err(fail(op, "making the device's context current"))
    }

    /// Waits until the work queued so far is done; reports an error a kernel raised.
    pub fn synchronize_stream(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(fail("device", "waiting for queued work"))
    }

    /// `ModelOps::logprobs_forward` on the device, with logits of any [`LogitType`]:
    /// logp, lse: (N); entropy: (N) if wanted; logits: (N, V); targets: (N) host ids `< V`.
    #[allow(clippy::too_many_arguments)]
    pub fn logprobs_forward<T: Elem>(
        &self,
        logp: DevViewMut<'_>,
        entropy: Option<DevViewMut<'_>>,
        lse: DevViewMut<'_>,
        logits: DevView<'_, T>,
        targets: &[u32],
        n: usize,
        v: usize,
        temperature: f32,
    ) -> Result<(), KernelError> {
        assert_eq!(logits.len, n * v, "logprobs_forward: logits is not N·V");
        assert!(
            logp.len == n && lse.len == n,
            "logprobs_forward: logp and lse must be N"
        );
        let entropy = entropy.map_or(DevPtr::NULL, |e| {
            assert_eq!(e.len, n, "logprobs_forward: entropy must be N");
            e.ptr()
        });
        let p = plan::LogprobFwdPtrs {
            logits: logits.ptr(),
            logp: logp.ptr(),
            entropy,
            lse: lse.ptr(),
        };
        // SAFETY: every view's length was checked against N and V above (the driver checks the
        // targets), and the views' buffers outlive the queued launch (a buffer's memory is freed
        // in stream order, after the work queued before).
        unsafe { ops::logprobs_forward(self, T::DTYPE, p, targets, n, v, temperature) }
    }

    /// `ModelOps::logprobs_backward` on the device; `dlogits` (added to) has the logits' type.
    /// dlogits, logits: (N, V); targets (host), lse, dlogp, dentropy: (N).
    #[allow(clippy::too_many_arguments)]
    pub fn logprobs_backward<T: Elem>(
        &self,
        dlogits: DevViewMut<'_, T>,
        logits: DevView<'_, T>,
        targets: &[u32],
        lse: DevView<'_>,
        dlogp: DevView<'_>,
        dentropy: Option<DevView<'_>>,
        n: usize,
        v: usize,
        temperature: f32,
    ) -> Result<(), KernelError> {
        assert_eq!(logits.len, n * v, "logprobs_backward: logits is not N·V");
        assert_eq!(dlogits.len, n * v, "logprobs_backward: dlogits is not N·V");
        assert!(
            lse.len == n && dlogp.len == n,
            "logprobs_backward: lse and dlogp must be N"
        );
        let dentropy = dentropy.map_or(DevPtr::NULL, |d| {
            assert_eq!(d.len, n, "logprobs_backward: dentropy must be N");
            d.ptr()
        });
        let p = plan::LogprobBwdPtrs {
            dlogits: dlogits.ptr(),
            logits: logits.ptr(),
            lse: lse.ptr(),
            dlogp: dlogp.ptr(),
            dentropy,
        };
        // SAFETY: as in `logprobs_forward`.
        unsafe { ops::logprobs_backward(self, T::DTYPE, p, targets, n, v, temperature) }
    }
}

/// A device error as a [`KernelError`] naming the operation.
fn fail<'a>(op: &'static str, what: &'a str) -> impl FnOnce(DriverError) -> KernelError + 'a {
    move |e| KernelError {
        kernel: op,
        msg: format!("{what}: {}", code(e)),
    }
}

/// An element type of device buffers: the types the kernels read (f32, bf16, f16).
pub trait Elem: LogitType + DeviceRepr + ValidAsZeroBits + Default {}

impl<T: LogitType + DeviceRepr + ValidAsZeroBits + Default> Elem for T {}

/// A device buffer of `T` (f32 by default: the backend's [`Backend::Buf`]).
pub struct CudaBuf<T = f32> {
    slice: CudaSlice<T>,
    /// The address of element 0, kept so views need no driver call.
    ptr: u64,
}

impl<T> std::fmt::Debug for CudaBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf({} values at {:#x})", self.slice.len(), self.ptr)
    }
}

impl<T> CudaBuf<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// True for a buffer of no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The address of element `i` of `r`, after checking `r` lies inside the buffer.
    fn at(&self, r: &Range<usize>) -> u64 {
        assert!(
            r.start <= r.end && r.end <= self.len(),
            "range {r:?} out of a buffer of {}",
            self.len()
        );
        self.ptr + (r.start * std::mem::size_of::<T>()) as u64
    }

    /// A view of `self[r]`.
    pub fn slice(&self, r: Range<usize>) -> DevView<'_, T> {
        DevView {
            ptr: self.at(&r),
            len: r.len(),
            _buf: PhantomData,
        }
    }

    /// A writable view of `self[r]`.
    pub fn slice_mut(&mut self, r: Range<usize>) -> DevViewMut<'_, T> {
        DevViewMut {
            ptr: self.at(&r),
            len: r.len(),
            _buf: PhantomData,
        }
    }

    /// A view of the whole buffer.
    pub fn view(&self) -> DevView<'_, T> {
        self.slice(0..self.len())
    }

    /// A writable view of the whole buffer.
    pub fn view_mut(&mut self) -> DevViewMut<'_, T> {
        let n = self.len();
        self.slice_mut(0..n)
    }
}

/// A read-only view of part of a [`CudaBuf`]: its address and length, borrowed from the buffer
/// so that the memory outlives it.
#[derive(Debug)]
pub struct DevView<'a, T = f32> {
    ptr: u64,
    len: usize,
    _buf: PhantomData<&'a [T]>,
}

impl<T> Clone for DevView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for DevView<'_, T> {}

impl<T> DevView<'_, T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a view of no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first element.
    pub fn ptr(&self) -> DevPtr {
        DevPtr(self.ptr)
    }
}

/// A writable view of part of a [`CudaBuf`], borrowed mutably from the buffer.
#[derive(Debug)]
pub struct DevViewMut<'a, T = f32> {
    ptr: u64,
    len: usize,
    _buf: PhantomData<&'a mut [T]>,
}

impl<T> DevViewMut<'_, T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a view of no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first element.
    pub fn ptr(&self) -> DevPtr {
        DevPtr(self.ptr)
    }

    /// A read-only view of the same elements, for as long as this one is borrowed.
    pub fn as_view(&self) -> DevView<'_, T> {
        DevView {
            ptr: self.ptr,
            len: self.len,
            _buf: PhantomData,
        }
    }

    /// The same view, reborrowed for a shorter time (to pass it on and keep it).
    pub fn reborrow(&mut self) -> DevViewMut<'_, T> {
        DevViewMut {
            ptr: self.ptr,
            len: self.len,
            _buf: PhantomData,
        }
    }
}

// The trait's memory ops are infallible: a device that fails one (memory exhausted, device lost)
// leaves nothing to continue with, so they panic with the driver's error.
impl Backend for Cuda {
    type Buf = CudaBuf<f32>;
    type View<'a> = DevView<'a, f32>;
    type ViewMut<'a> = DevViewMut<'a, f32>;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn zeros(&self, n: usize) -> CudaBuf {
        or_panic(self.alloc_zeros(n))
    }
    fn upload(&self, data: &[f32]) -> CudaBuf {
        or_panic(self.upload_slice(data))
    }
    fn download(&self, v: DevView<'_>) -> Vec<f32> {
        or_panic(self.download_slice(v))
    }
    fn len(&self, b: &CudaBuf) -> usize {
        b.len()
    }
    fn view<'a>(&self, b: &'a CudaBuf, r: Range<usize>) -> DevView<'a> {
        b.slice(r)
    }
    fn view_mut<'a>(&self, b: &'a mut CudaBuf, r: Range<usize>) -> DevViewMut<'a> {
        b.slice_mut(r)
    }
    fn fill(&self, v: DevViewMut<'_>, value: f32) {
        or_panic(self.fill_f32(v, value))
    }
    fn copy(&self, dst: DevViewMut<'_>, src: DevView<'_>) {
        or_panic(self.copy_on_device(dst, src))
    }
}

// SAFETY: a view's address and length come from a live buffer it borrows (`CudaBuf::slice`
// checks the range), and scratch is a `CudaSlice` of exactly the words asked for. Everything is
// queued on one stream and cudarc frees device memory in stream order (or after synchronising),
// so memory a queued kernel uses stays allocated until that kernel is done, even if its buffer
// or scratch is dropped first.
unsafe impl Launcher for Cuda {
    type Scratch = CudaSlice<u64>;

    fn ptr(&self, v: DevView<'_>) -> DevPtr {
        v.ptr()
    }
    fn ptr_mut(&self, v: &mut DevViewMut<'_>) -> DevPtr {
        v.ptr()
    }
    fn view_len(&self, v: DevView<'_>) -> usize {
        v.len
    }
    fn view_mut_len(&self, v: &DevViewMut<'_>) -> usize {
        v.len
    }
    fn scratch(&self, len: usize) -> Result<CudaSlice<u64>, KernelError> {
        self.stream.alloc_zeros::<u64>(len).map_err(fail(
            "device memory",
            &format!("allocating {len} scratch words"),
        ))
    }
    fn scratch_u32(&self, data: &[u32]) -> Result<CudaSlice<u64>, KernelError> {
        self.stream
            .clone_htod(&plan::pack_u32_words(data))
            .map_err(fail("copy to device", &format!("{} token ids", data.len())))
    }
    fn scratch_ptr(&self, s: &CudaSlice<u64>) -> DevPtr {
        let (ptr, _no_event) = s.device_ptr(&self.stream);
        DevPtr(ptr)
    }
    fn read_f64(&self, s: &CudaSlice<u64>, len: usize) -> Result<Vec<f64>, KernelError> {
        assert!(len <= s.len(), "read_f64: {len} of {} words", s.len());
        let mut words = vec![0u64; len];
        if len > 0 {
            self.bind("copy to host")?;
            let (ptr, _no_event) = s.device_ptr(&self.stream);
            // SAFETY: `s` holds at least `len` words and `words` exactly `len`; the stream is
            // synchronised before `words` is read.
            unsafe { result::memcpy_dtoh_async(&mut words, ptr, self.stream.cu_stream()) }
                .map_err(fail("copy to host", &format!("{len} results")))?;
        }
        self.synchronize_stream()?;
        Ok(words.into_iter().map(f64::from_bits).collect())
    }
    fn synchronize(&self) -> Result<(), KernelError> {
        self.synchronize_stream()
    }
    unsafe fn launch(&self, l: &Launch) -> Result<(), KernelError> {
        if l.is_empty() {
            return Ok(());
        }
        let fail = |msg: String| KernelError {
            kernel: l.kernel.name,
            msg,
        };
        let f = self.functions.get(l.kernel.name).ok_or_else(|| {
            fail(format!(
                "not loaded (kernels/{} is not among the compiled sources)",
                l.kernel.file
            ))
        })?;
        let slots = l.param_slots();
        let mut args = self.stream.launch_builder(f);
        for slot in &slots {
            args.arg(slot);
        }
        let cfg = LaunchConfig {
            grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
            block_dim: (l.block[0], l.block[1], l.block[2]),
            shared_mem_bytes: l.shared_bytes,
        };
        // SAFETY: parameter `i` points at `slots[i]`, which holds argument `i`'s bytes at its
        // start (`Launch::param_slots`) and lives until the launch has read it; the plan's
        // argument types are the kernel's (the emulator checks every plan's signature against
        // the kernel source), and the caller vouches for the memory the pointers address.
        unsafe { args.launch(cfg) }.map_err(|e| fail(code(e)))?;
        Ok(())
    }
    unsafe fn gemm(&self, g: &Gemm) -> Result<(), KernelError> {
        g.validate().map_err(gemm_error)?;
        if g.is_empty() {
            return Ok(());
        }
        let int = |x: usize, what: &str| {
            i32::try_from(x).map_err(|_| gemm_error(format!("{what} = {x} exceeds a 32-bit int")))
        };
        let long = |x: usize, what: &str| {
            i64::try_from(x).map_err(|_| gemm_error(format!("{what} = {x} exceeds a 64-bit int")))
        };
        let f32_type = cublas::sys::cudaDataType::CUDA_R_32F;
        self.bind(GEMM)?;
        // SAFETY: the handle is bound to this backend's stream, so the GEMM is queued after the
        // work before it; alpha and beta are read from the host during the call (the handle's
        // default pointer mode); the caller vouches for the operands' memory.
        unsafe {
            cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                operation(g.transa),
                operation(g.transb),
                int(g.m, "m")?,
                int(g.n, "n")?,
                int(g.k, "k")?,
                (&g.alpha as *const f32).cast(),
                g.a.0 as *const std::ffi::c_void,
                f32_type,
                int(g.lda, "lda")?,
                long(g.stride_a, "stride_a")?,
                g.b.0 as *const std::ffi::c_void,
                f32_type,
                int(g.ldb, "ldb")?,
                long(g.stride_b, "stride_b")?,
                (&g.beta as *const f32).cast(),
                g.c.0 as *mut std::ffi::c_void,
                f32_type,
                int(g.ldc, "ldc")?,
                long(g.stride_c, "stride_c")?,
                int(g.batch, "batch")?,
                // Tensor cores on operands rounded to bf16, accumulating in f32: the f32 master
                // weights are read as they are, with no bf16 copy kept.
                cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
                cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| gemm_error(format!("{:?}", e.0)))
    }
}

/// The cuBLAS call every [`Gemm`] is.
const GEMM: &str = "cublasGemmStridedBatchedEx";

fn gemm_error(msg: String) -> KernelError {
    KernelError { kernel: GEMM, msg }
}

/// [`Trans`] as cuBLAS's operation.
fn operation(t: Trans) -> cublas::sys::cublasOperation_t {
    match t {
        Trans::N => cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        Trans::T => cublas::sys::cublasOperation_t::CUBLAS_OP_T,
    }
}

// The loss family through the shared drivers, with the device as launcher.
crate::loss_ops_via_launcher!([] Cuda);
// The model and decode families through the same drivers.
crate::model_ops_via_launcher!([] Cuda);
