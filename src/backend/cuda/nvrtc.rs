//! NVRTC, the CUDA runtime compiler, loaded at run time with `dlopen` (never linked), so the
//! crate builds and runs where it is absent. NVRTC runs on a CPU: the backend compiles the
//! kernels with it when it opens a device, and `tests/nvrtc.rs` checks every kernel file compiles
//! without a GPU.
//!
//! Which library: the path in `RLHF_NVRTC` if set (CI installs the `nvidia-cuda-nvrtc-cu12`
//! wheel and points it at `libnvrtc.so.12`), else `libnvrtc.so.12`, `libnvrtc.so.13` (CUDA 13
//! toolkits) or `libnvrtc.so` from the library path. It is loaded once per process and never
//! unloaded.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

/// `nvrtcResult`; 0 is `NVRTC_SUCCESS`.
type NvrtcResult = c_int;
/// `nvrtcProgram`.
type Program = *mut c_void;
/// The `nvrtcGet*Size` / `nvrtcGet*` pairs that read a program's log, PTX or CUBIN.
type SizeFn = unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult;
type GetFn = unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult;

/// Why NVRTC could not be used.
#[derive(Clone, Debug, thiserror::Error)]
pub enum NvrtcError {
    /// `RLHF_NVRTC` is unset and no NVRTC library is in the library path.
    #[error(
        "NVRTC not found ({0}); install the CUDA toolkit, or `pip install nvidia-cuda-nvrtc-cu12` \
         and set RLHF_NVRTC to its lib/libnvrtc.so.12"
    )]
    NotFound(String),
    /// `RLHF_NVRTC` names a library that does not load, or is not NVRTC.
    #[error("RLHF_NVRTC: {0}")]
    BadPath(String),
    /// An NVRTC call failed; a failed compile carries its log.
    #[error("{0}")]
    Failed(String),
}

/// What a compile produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// PTX text, for a `compute_XY` virtual architecture (the driver compiles it on load).
    Ptx,
    /// A CUBIN (machine code) for an `sm_XY` real architecture: loads without the driver's PTX
    /// compiler, so an NVRTC newer than the driver (same major version) still works.
    Cubin,
}

/// A successful compile.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The PTX text (without its NUL) or the CUBIN bytes.
    pub image: Vec<u8>,
    /// NVRTC's log: empty unless the compiler warned.
    pub log: String,
}

/// The NVRTC entry points used, resolved from the loaded library.
pub struct Nvrtc {
    library: String,
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult,
    error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
    num_archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult,
    log_size: SizeFn,
    log: GetFn,
    ptx_size: SizeFn,
    ptx: GetFn,
    cubin_size: SizeFn,
    cubin: GetFn,
    destroy: unsafe extern "C" fn(*mut Program) -> NvrtcResult,
}

/// The symbol `symbol` of the library `handle` (loaded from `lib`) as a function pointer `F`.
///
/// # Safety
///
/// `handle` must be a live `dlopen` handle and `F` the function-pointer type of that symbol.
unsafe fn sym<F: Copy>(handle: *mut c_void, lib: &str, symbol: &str) -> Result<F, String> {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    let c = CString::new(symbol).expect("symbol names have no NUL");
    // SAFETY: `handle` is live (the caller's promise) and `c` is a NUL-terminated name.
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    if p.is_null() {
        return Err(format!("{lib}: no symbol {symbol}"));
    }
    // SAFETY: `p` is the address of that function, and `F` its pointer type (the caller's
    // promise), of the same size as a data pointer on the platforms dlsym serves.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

/// The first of `names` that `dlopen` loads, or why none did.
fn dlopen_any(names: &[String]) -> Result<(*mut c_void, String), String> {
    let mut errors = Vec::new();
    for name in names {
        let c = CString::new(name.as_str()).map_err(|e| e.to_string())?;
        // SAFETY: `c` is a NUL-terminated path; dlopen runs the library's initialisers, which for
        // NVRTC only set up its own state.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            return Ok((handle, name.clone()));
        }
        // SAFETY: dlerror returns null or a NUL-terminated message owned by libc.
        let err = unsafe { libc::dlerror() };
        let msg = if err.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated (above).
            unsafe { CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned()
        };
        errors.push(format!("{name}: {msg}"));
    }
    Err(errors.join("; "))
}

/// The process's NVRTC, loaded on first use as the module docs say (a failure is remembered).
pub fn load() -> Result<&'static Nvrtc, NvrtcError> {
    static NVRTC: OnceLock<Result<Nvrtc, NvrtcError>> = OnceLock::new();
    NVRTC
        .get_or_init(Nvrtc::open)
        .as_ref()
        .map_err(Clone::clone)
}

impl Nvrtc {
    fn open() -> Result<Nvrtc, NvrtcError> {
        let explicit = std::env::var("RLHF_NVRTC").ok();
        let names = match &explicit {
            Some(path) => vec![path.clone()],
            None => ["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so"]
                .map(String::from)
                .to_vec(),
        };
        let (handle, name) = dlopen_any(&names).map_err(|e| match explicit {
            Some(_) => NvrtcError::BadPath(e),
            None => NvrtcError::NotFound(e),
        })?;
        let bad = |e: String| match explicit {
            Some(_) => NvrtcError::BadPath(e),
            None => NvrtcError::Failed(e),
        };
        // SAFETY (for every `sym` below): each field's type is the signature nvrtc.h gives the
        // function of that name, and the library stays loaded (never dlclosed) for the life of
        // the process.
        unsafe {
            Ok(Nvrtc {
                version: sym(handle, &name, "nvrtcVersion").map_err(bad)?,
                error_string: sym(handle, &name, "nvrtcGetErrorString").map_err(bad)?,
                num_archs: sym(handle, &name, "nvrtcGetNumSupportedArchs").map_err(bad)?,
                archs: sym(handle, &name, "nvrtcGetSupportedArchs").map_err(bad)?,
                create: sym(handle, &name, "nvrtcCreateProgram").map_err(bad)?,
                compile: sym(handle, &name, "nvrtcCompileProgram").map_err(bad)?,
                log_size: sym(handle, &name, "nvrtcGetProgramLogSize").map_err(bad)?,
                log: sym(handle, &name, "nvrtcGetProgramLog").map_err(bad)?,
                ptx_size: sym(handle, &name, "nvrtcGetPTXSize").map_err(bad)?,
                ptx: sym(handle, &name, "nvrtcGetPTX").map_err(bad)?,
                cubin_size: sym(handle, &name, "nvrtcGetCUBINSize").map_err(bad)?,
                cubin: sym(handle, &name, "nvrtcGetCUBIN").map_err(bad)?,
                destroy: sym(handle, &name, "nvrtcDestroyProgram").map_err(bad)?,
                library: name,
            })
        }
    }

    /// The library that was loaded (a path or a file name).
    pub fn library(&self) -> &str {
        &self.library
    }

    fn check(&self, what: &str, r: NvrtcResult) -> Result<(), NvrtcError> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.error_string)(r)) };
        Err(NvrtcError::Failed(format!(
            "{what}: {}",
            msg.to_string_lossy()
        )))
    }

    /// NVRTC's (major, minor) version.
    pub fn version(&self) -> Result<(i32, i32), NvrtcError> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        self.check("nvrtcVersion", unsafe {
            (self.version)(&mut major, &mut minor)
        })?;
        Ok((major, minor))
    }

    /// The real architectures NVRTC compiles for, as `sm_XY` numbers (`90` for sm_90).
    pub fn supported_archs(&self) -> Result<Vec<u32>, NvrtcError> {
        let mut n: c_int = 0;
        // SAFETY: a valid out-pointer.
        self.check("nvrtcGetNumSupportedArchs", unsafe {
            (self.num_archs)(&mut n)
        })?;
        let mut archs = vec![0 as c_int; n.max(0) as usize];
        // SAFETY: `archs` holds the `n` values NVRTC said it will write.
        self.check("nvrtcGetSupportedArchs", unsafe {
            (self.archs)(archs.as_mut_ptr())
        })?;
        Ok(archs.into_iter().map(|a| a as u32).collect())
    }

    /// Compiles `source`, named `name` in messages, with in-memory `headers` (include name,
    /// contents) and `options`; returns the image and any warnings, or the log of a failed
    /// compile.
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        headers: &[(&str, &str)],
        options: &[String],
        output: Output,
    ) -> Result<Compiled, NvrtcError> {
        let cstr =
            |s: &str| CString::new(s).map_err(|e| NvrtcError::Failed(format!("{name}: {e}")));
        let src = cstr(source)?;
        let cname = cstr(name)?;
        let header_names = headers
            .iter()
            .map(|h| cstr(h.0))
            .collect::<Result<Vec<_>, _>>()?;
        let header_sources = headers
            .iter()
            .map(|h| cstr(h.1))
            .collect::<Result<Vec<_>, _>>()?;
        let options = options
            .iter()
            .map(|o| cstr(o))
            .collect::<Result<Vec<_>, _>>()?;
        let ptrs = |v: &[CString]| v.iter().map(|c| c.as_ptr()).collect::<Vec<_>>();
        let (hn, hs, opts) = (ptrs(&header_names), ptrs(&header_sources), ptrs(&options));
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: valid out-pointer; NUL-terminated source and name; `hs` and `hn` hold
        // `headers.len()` NUL-terminated strings each, all outliving the call.
        let r = unsafe {
            (self.create)(
                &mut prog,
                src.as_ptr(),
                cname.as_ptr(),
                headers.len() as c_int,
                hs.as_ptr(),
                hn.as_ptr(),
            )
        };
        self.check("nvrtcCreateProgram", r)?;
        // SAFETY: `prog` was created above; the option strings outlive the call.
        let compiled = unsafe { (self.compile)(prog, opts.len() as c_int, opts.as_ptr()) };
        let result = self.read(prog, self.log_size, self.log).and_then(|log| {
            let log = until_nul(&log).trim().to_string();
            if let Err(e) = self.check("nvrtcCompileProgram", compiled) {
                return Err(NvrtcError::Failed(format!("{name}: {e}\n{log}")));
            }
            let image = match output {
                Output::Ptx => self.read(prog, self.ptx_size, self.ptx)?,
                Output::Cubin => self.read(prog, self.cubin_size, self.cubin)?,
            };
            Ok(Compiled { image, log })
        });
        // SAFETY: `prog` is live and destroyed once.
        unsafe { (self.destroy)(&mut prog) };
        let mut c = result?;
        if output == Output::Ptx {
            // PTX comes NUL-terminated; a CUBIN is binary and keeps every byte.
            c.image = until_nul(&c.image).into_bytes();
        }
        Ok(c)
    }

    /// Reads a size-then-contents output of a program (its log, PTX or CUBIN); text outputs
    /// keep their NUL, which callers strip.
    fn read(&self, prog: Program, size: SizeFn, get: GetFn) -> Result<Vec<u8>, NvrtcError> {
        let mut n = 0usize;
        // SAFETY: `prog` is live; `n` is a valid out-pointer.
        self.check("nvrtc size query", unsafe { size(prog, &mut n) })?;
        let mut buf = vec![0u8; n.max(1)];
        // SAFETY: `buf` holds the `n` bytes NVRTC said it will write.
        self.check("nvrtc read", unsafe {
            get(prog, buf.as_mut_ptr() as *mut c_char)
        })?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// The text before the first NUL of an NVRTC output (its log or PTX).
fn until_nul(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}
