//! Every kernel file compiles under NVRTC for sm_80 and sm_90 (DESIGN.md principle 3): NVRTC runs
//! on a CPU, so this needs no GPU. Files: `kernels/*.cu` and the shim's self-tests
//! `kernels/emu/*.cu` (held to what the real compiler accepts, like the kernels).
//!
//! NVRTC is loaded at run time, not linked: from the path in `RLHF_NVRTC` if set (CI installs the
//! `nvidia-cuda-nvrtc-cu12` wheel and points it at `libnvrtc.so.12`), else `libnvrtc.so.12` or
//! `libnvrtc.so` from the library path. If `RLHF_NVRTC` is set, failing to load it fails the test;
//! if it is not set and no library is found, the test says SKIPPED (on stderr, which the test
//! harness does not capture) and passes. A compile that fails, or that warns, fails the test with
//! NVRTC's log.
//!
//! With `RLHF_PTX_OUT=dir` the PTX is written to `dir/<file>.<arch>.ptx` (`scripts/ptxas_report.sh`
//! feeds it to `ptxas -v`).

use rlhf::backend::emu::plan;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `nvrtcResult`; 0 is `NVRTC_SUCCESS`.
type NvrtcResult = c_int;
/// `nvrtcProgram`.
type Program = *mut c_void;

/// The NVRTC entry points this test calls, resolved from the loaded library.
struct Nvrtc {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult,
    error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    log: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
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

impl Nvrtc {
    /// Loads NVRTC as the module comment says: `Ok(None)` means absent (skip), `Err` means
    /// `RLHF_NVRTC` names something that does not load (fail).
    fn load() -> Result<Option<(Nvrtc, String)>, String> {
        let explicit = std::env::var("RLHF_NVRTC").ok();
        let names = match &explicit {
            Some(path) => vec![path.clone()],
            None => vec!["libnvrtc.so.12".to_string(), "libnvrtc.so".to_string()],
        };
        let (handle, name) = match dlopen_any(&names) {
            Ok(h) => h,
            Err(e) if explicit.is_some() => return Err(format!("RLHF_NVRTC: {e}")),
            Err(e) => {
                skip(&format!("libnvrtc not found ({e}); set RLHF_NVRTC=path"));
                return Ok(None);
            }
        };
        // SAFETY (for every `sym` below): each field's type is the signature nvrtc.h gives the
        // function of that name, and the library stays loaded (never dlclosed) for the life of
        // the process.
        let nvrtc = unsafe {
            Nvrtc {
                version: sym(handle, &name, "nvrtcVersion")?,
                error_string: sym(handle, &name, "nvrtcGetErrorString")?,
                create: sym(handle, &name, "nvrtcCreateProgram")?,
                compile: sym(handle, &name, "nvrtcCompileProgram")?,
                log_size: sym(handle, &name, "nvrtcGetProgramLogSize")?,
                log: sym(handle, &name, "nvrtcGetProgramLog")?,
                ptx_size: sym(handle, &name, "nvrtcGetPTXSize")?,
                ptx: sym(handle, &name, "nvrtcGetPTX")?,
                destroy: sym(handle, &name, "nvrtcDestroyProgram")?,
            }
        };
        Ok(Some((nvrtc, name)))
    }

    fn check(&self, what: &str, r: NvrtcResult) -> Result<(), String> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.error_string)(r)) };
        Err(format!("{what}: {}", msg.to_string_lossy()))
    }

    fn version(&self) -> Result<(i32, i32), String> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        self.check("nvrtcVersion", unsafe {
            (self.version)(&mut major, &mut minor)
        })?;
        Ok((major, minor))
    }

    /// Compiles `source` (named `name`, with `include` as its include directory) for `arch`;
    /// returns the PTX, or the log of a failed or warning compile.
    fn compile(
        &self,
        name: &str,
        source: &str,
        include: &Path,
        arch: &str,
    ) -> Result<String, String> {
        let src = CString::new(source).map_err(|e| format!("{name}: {e}"))?;
        let cname = CString::new(name).map_err(|e| format!("{name}: {e}"))?;
        let options: Vec<CString> = [
            format!("--gpu-architecture={arch}"),
            format!("--include-path={}", include.display()),
            "--std=c++17".to_string(),
        ]
        .into_iter()
        .map(|o| CString::new(o).expect("options have no NUL"))
        .collect();
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: valid out-pointer, NUL-terminated source and name, no headers (null arrays
        // with a count of 0).
        let r = unsafe {
            (self.create)(
                &mut prog,
                src.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        self.check("nvrtcCreateProgram", r)?;
        // SAFETY: `prog` was created above; the option strings outlive the call.
        let compiled =
            unsafe { (self.compile)(prog, option_ptrs.len() as c_int, option_ptrs.as_ptr()) };
        let log = self.read(prog, self.log_size, self.log);
        let result = match (self.check("nvrtcCompileProgram", compiled), log) {
            (Ok(()), Ok(log)) if log.trim().is_empty() => self.read(prog, self.ptx_size, self.ptx),
            (Ok(()), Ok(log)) => Err(format!("{name} ({arch}) compiled with warnings:\n{log}")),
            (Err(e), Ok(log)) => Err(format!("{name} ({arch}): {e}\n{log}")),
            (_, Err(e)) => Err(e),
        };
        // SAFETY: `prog` is live and destroyed once.
        unsafe { (self.destroy)(&mut prog) };
        result
    }

    /// Reads a size-then-contents string (the log or the PTX) of a program.
    fn read(
        &self,
        prog: Program,
        size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
        get: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    ) -> Result<String, String> {
        let mut n = 0usize;
        // SAFETY: `prog` is live; `n` is a valid out-pointer.
        self.check("size query", unsafe { size(prog, &mut n) })?;
        let mut buf = vec![0u8; n.max(1)];
        // SAFETY: `buf` holds the `n` bytes (NUL included) NVRTC said it will write.
        self.check("read", unsafe {
            get(prog, buf.as_mut_ptr() as *mut c_char)
        })?;
        let text = CStr::from_bytes_until_nul(&buf).map_err(|e| e.to_string())?;
        Ok(text.to_string_lossy().into_owned())
    }
}

/// Says the test is skipped, on stderr itself: libtest captures `eprintln!` of passing tests.
fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED tests/nvrtc.rs: {why}");
}

/// The kernel files, with the include directory each is compiled with.
fn kernel_files() -> Vec<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files = Vec::new();
    for dir in [root.clone(), root.join("emu")] {
        let mut cu: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        cu.sort();
        files.extend(cu.into_iter().map(|f| (f, dir.clone())));
    }
    files
}

/// A kernel file's name relative to `kernels/`, as `plan::Kernel::file` spells it.
fn relative(file: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    file.strip_prefix(&root)
        .expect("under kernels/")
        .to_string_lossy()
        .into_owned()
}

/// Kernel sources include nothing but common.cuh (DESIGN.md layout): checked without NVRTC.
#[test]
fn kernels_include_only_common_cuh() {
    for (file, _) in kernel_files() {
        let src = std::fs::read_to_string(&file).expect("readable");
        for line in src
            .lines()
            .filter(|l| l.trim_start().starts_with("#include"))
        {
            let target = line.split('"').nth(1).unwrap_or("");
            assert!(
                Path::new(target)
                    .file_name()
                    .is_some_and(|f| f == "common.cuh"),
                "{}: `{line}`: kernels include only common.cuh",
                file.display()
            );
        }
    }
    let common = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/common.cuh");
    let src = std::fs::read_to_string(common).expect("readable");
    assert!(
        !src.lines().any(|l| l.trim_start().starts_with("#include")),
        "common.cuh includes nothing"
    );
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let (nvrtc, name) = match Nvrtc::load() {
        Ok(Some(n)) => n,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    let (major, minor) = nvrtc.version().unwrap_or_else(|e| panic!("{e}"));
    let out = std::env::var_os("RLHF_PTX_OUT").map(PathBuf::from);
    if let Some(dir) = &out {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    let mut failures = Vec::new();
    let mut entries: Vec<(String, String)> = Vec::new();
    for (file, include) in kernel_files() {
        let rel = relative(&file);
        let source = std::fs::read_to_string(&file).expect("readable");
        for arch in ["compute_80", "compute_90"] {
            match nvrtc.compile(&rel, &source, &include, arch) {
                Ok(ptx) => {
                    for line in ptx.lines() {
                        if let Some(rest) = line.trim_start().strip_prefix(".visible .entry ") {
                            let entry = rest.split('(').next().unwrap_or("").trim();
                            entries.push((rel.clone(), entry.to_string()));
                        }
                    }
                    if let Some(dir) = &out {
                        let stem = rel.trim_end_matches(".cu").replace('/', "_");
                        let path = dir.join(format!("{stem}.{arch}.ptx"));
                        std::fs::write(&path, &ptx)
                            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    }
                }
                Err(log) => failures.push(log),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "NVRTC {major}.{minor} ({name}):\n{}",
        failures.join("\n\n")
    );
    // Every kernel the host code launches is an unmangled entry of the file it names.
    for k in plan::ALL {
        assert!(
            entries.iter().any(|(f, e)| f == k.file && e == k.name),
            "{} is not an entry of kernels/{}",
            k.name,
            k.file
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "tests/nvrtc.rs: {} kernel files compiled for compute_80 and compute_90 with NVRTC \
         {major}.{minor} ({name})",
        kernel_files().len()
    );
}
