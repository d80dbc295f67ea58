//! Every kernel file compiles under NVRTC for sm_80 and sm_90 (DESIGN.md principle 3): NVRTC runs
//! on a CPU, so this needs no GPU. Files: `kernels/*.cu` and the shim's self-tests
//! `kernels/emu/*.cu` (held to what the real compiler accepts, like the kernels).
//!
//! NVRTC is loaded at run time by the CUDA backend's loader (`rlhf::backend::cuda::nvrtc`): from
//! the path in `RLHF_NVRTC` if set (CI installs the `nvidia-cuda-nvrtc-cu12` wheel and points it
//! at `libnvrtc.so.12`), else `libnvrtc.so.12`, `libnvrtc.so.13` or `libnvrtc.so` from the
//! library path. If `RLHF_NVRTC` is set, failing to load it fails the test; if it is not set and
//! no library is found, the test says SKIPPED (on stderr, which the test harness does not
//! capture) and passes.
//! A compile that fails, or that warns, fails the test with NVRTC's log.
//!
//! With `RLHF_PTX_OUT=dir` the PTX is written to `dir/<file>.<arch>.ptx` (`scripts/ptxas_report.sh`
//! feeds it to `ptxas -v`).

use rlhf::backend::cuda::compile;
use rlhf::backend::cuda::nvrtc::{self, Nvrtc, NvrtcError, Output};
use rlhf::backend::emu::plan;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The library's NVRTC as the module comment says: `None` means absent (skip); `RLHF_NVRTC`
/// naming something that does not load fails the test.
fn load() -> Option<&'static Nvrtc> {
    match nvrtc::load() {
        Ok(n) => Some(n),
        Err(NvrtcError::NotFound(e)) => {
            skip(&format!("libnvrtc not found ({e}); set RLHF_NVRTC=path"));
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Compiles a kernel file from disk (its directory as the include path) for `arch`; the PTX, or
/// the log of a compile that failed or warned.
fn compile(
    nvrtc: &Nvrtc,
    name: &str,
    source: &str,
    include: &Path,
    arch: &str,
) -> Result<String, String> {
    // CUDA's headers first: `<mma.h>` is CUDA's, not the shim's beside emu/selftest.cu.
    let mut options = compile::include_options(nvrtc.library());
    options.extend([
        format!("--gpu-architecture={arch}"),
        format!("--include-path={}", include.display()),
        "--std=c++17".to_string(),
    ]);
    let c = nvrtc
        .compile(name, source, &[], &options, Output::Ptx)
        .map_err(|e| format!("{name} ({arch}): {e}"))?;
    if !c.log.is_empty() {
        return Err(format!(
            "{name} ({arch}) compiled with warnings:\n{}",
            c.log
        ));
    }
    String::from_utf8(c.image).map_err(|e| format!("{name} ({arch}): PTX is not UTF-8: {e}"))
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

/// Kernel sources include nothing but common.cuh and CUDA's `<mma.h>` (the wmma API, which the
/// shim provides as kernels/emu/mma.h): checked without NVRTC.
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
                line.trim() == "#include <mma.h>"
                    || Path::new(target)
                        .file_name()
                        .is_some_and(|f| f == "common.cuh"),
                "{}: `{line}`: kernels include only common.cuh and <mma.h>",
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
    let Some(nvrtc) = load() else { return };
    let name = nvrtc.library();
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
            match compile(nvrtc, &rel, &source, &include, arch) {
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
