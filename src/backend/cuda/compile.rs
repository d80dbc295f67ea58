//! The kernel sources, embedded in the binary, and their compilation for a device: which
//! architecture to target, and NVRTC behind the on-disk [`cache`].

use super::cache::{self, KeyInputs};
use super::nvrtc::{Nvrtc, NvrtcError, Output};
use std::path::{Path, PathBuf};

/// `kernels/common.cuh`, the one header kernel files include (given to NVRTC in memory).
pub const COMMON_CUH: &str = include_str!("../../../kernels/common.cuh");

/// Every kernel file of `kernels/`, by the name [`Kernel::file`](crate::backend::emu::plan::Kernel)
/// gives it, with its source: embedded, so the binary compiles them wherever it runs.
pub const SOURCES: &[(&str, &str)] = &[
    (
        "attention.cu",
        include_str!("../../../kernels/attention.cu"),
    ),
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
    ),
    (
        "embedding.cu",
        include_str!("../../../kernels/embedding.cu"),
    ),
    ("kl.cu", include_str!("../../../kernels/kl.cu")),
    ("logprob.cu", include_str!("../../../kernels/logprob.cu")),
    ("matmul.cu", include_str!("../../../kernels/matmul.cu")),
    ("norm.cu", include_str!("../../../kernels/norm.cu")),
    ("optim.cu", include_str!("../../../kernels/optim.cu")),
    ("ppo_loss.cu", include_str!("../../../kernels/ppo_loss.cu")),
    (
        "pref_loss.cu",
        include_str!("../../../kernels/pref_loss.cu"),
    ),
    ("reduce.cu", include_str!("../../../kernels/reduce.cu")),
    ("rope.cu", include_str!("../../../kernels/rope.cu")),
    ("sampling.cu", include_str!("../../../kernels/sampling.cu")),
];

/// What the kernels are compiled to for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Machine code for `sm_XY`: what a device gets when NVRTC knows its architecture. Loading
    /// it needs no PTX compiler in the driver, so an NVRTC newer than the driver (same major
    /// version) still works.
    Sass(u32),
    /// PTX for `compute_XY`, the newest virtual architecture NVRTC knows that the device runs:
    /// for a device newer than NVRTC. The driver compiles it on load, and refuses PTX newer
    /// than itself.
    Ptx(u32),
}

impl Target {
    /// The target for a device of compute capability `arch` (`90` for 9.0) given the real
    /// architectures NVRTC supports; `None` if NVRTC knows none the device can run.
    pub fn choose(arch: u32, supported: &[u32]) -> Option<Target> {
        if supported.contains(&arch) {
            return Some(Target::Sass(arch));
        }
        // PTX of an older virtual architecture runs on any newer device.
        let older = supported.iter().copied().filter(|&a| a < arch).max()?;
        Some(Target::Ptx(older))
    }

    /// NVRTC's name for it: `sm_90` or `compute_90`.
    pub fn name(self) -> String {
        match self {
            Target::Sass(a) => format!("sm_{a}"),
            Target::Ptx(a) => format!("compute_{a}"),
        }
    }

    /// The extension of its cache entries.
    pub fn extension(self) -> &'static str {
        match self {
            Target::Sass(_) => "cubin",
            Target::Ptx(_) => "ptx",
        }
    }

    /// What NVRTC is asked to produce.
    pub fn output(self) -> Output {
        match self {
            Target::Sass(_) => Output::Cubin,
            Target::Ptx(_) => Output::Ptx,
        }
    }

    /// The NVRTC options the kernels are compiled with: the architecture and the C++ standard
    /// `tests/nvrtc.rs` checks them under. No fast-math: the kernels are validated against the
    /// CPU reference at 1e-5, which approximate `expf`/`logf` would not hold.
    pub fn options(self) -> Vec<String> {
        vec![
            format!("--gpu-architecture={}", self.name()),
            "--std=c++17".to_string(),
        ]
    }
}

/// Where NVRTC finds the CUDA headers a kernel file includes besides common.cuh: `mma.h` (the
/// wmma API of the tensor-core attention) and what it includes (`crt/mma.h`, `cuda_bf16.h`, ...),
/// none of which NVRTC has built in. `RLHF_CUDA_INCLUDE` (directories separated by `:`) if set;
/// else those of `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include` and, when
/// `nvrtc_library` is the `nvidia-cuda-nvrtc-cu12` wheel's (`.../nvidia/cuda_nvrtc/lib/...`), the
/// `include` directories of the `nvidia-cuda-runtime-cu12` and `nvidia-cuda-nvcc-cu12` wheels
/// beside it, that exist.
pub fn cuda_include_dirs(nvrtc_library: &str) -> Vec<PathBuf> {
    if let Some(list) = std::env::var_os("RLHF_CUDA_INCLUDE") {
        return std::env::split_paths(&list).collect();
    }
    let mut dirs: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|d| PathBuf::from(d).join("include"))
        .collect();
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    if let Some(nvidia) = Path::new(nvrtc_library).ancestors().nth(3) {
        for wheel in ["cuda_runtime", "cuda_nvcc"] {
            dirs.push(nvidia.join(wheel).join("include"));
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// NVRTC's `--include-path` options for [`cuda_include_dirs`].
pub fn include_options(nvrtc_library: &str) -> Vec<String> {
    cuda_include_dirs(nvrtc_library)
        .iter()
        .map(|d| format!("--include-path={}", d.display()))
        .collect()
}

/// A compiled kernel file.
#[derive(Clone, Debug)]
pub struct Image {
    /// PTX text or CUBIN bytes, as [`Target::output`] says.
    pub bytes: Vec<u8>,
    /// Whether it came from the cache rather than NVRTC.
    pub cached: bool,
}

/// The PTX ISA version a PTX image declares (its `.version` line), for messages.
pub fn ptx_isa(ptx: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(ptx).ok()?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix(".version "))
        .map(|v| v.trim().to_string())
}

/// `file` compiled for `target`: from the cache in `dir` if there and `use_cache`, else from
/// NVRTC, then written to the cache. A cache that cannot be written costs a warning, not the
/// device.
pub fn image(
    nvrtc: &Nvrtc,
    nvrtc_version: (i32, i32),
    file: &str,
    source: &str,
    target: Target,
    dir: Option<&Path>,
    use_cache: bool,
) -> Result<Image, NvrtcError> {
    let mut options = target.options();
    options.extend(include_options(nvrtc.library()));
    let key = KeyInputs {
        file,
        source,
        common: COMMON_CUH,
        options: &options,
        target,
        nvrtc: nvrtc_version,
    };
    let name = cache::entry_name(&key);
    if let Some(bytes) = dir
        .filter(|_| use_cache)
        .and_then(|d| cache::read(d, &name))
    {
        return Ok(Image {
            bytes,
            cached: true,
        });
    }
    let compiled = nvrtc
        .compile(
            &format!("kernels/{file}"),
            source,
            &[("common.cuh", COMMON_CUH)],
            &options,
            target.output(),
        )
        .map_err(|e| {
            // The one header a file may need from outside: say where it is looked for.
            let hint = if options.iter().any(|o| o.starts_with("--include-path=")) {
                ""
            } else {
                " (no CUDA include directory found for <mma.h>: set RLHF_CUDA_INCLUDE or \
                 CUDA_HOME, or pip install nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12)"
            };
            NvrtcError::Failed(format!("compiling for {}: {e}{hint}", target.name()))
        })?;
    if let Some(d) = dir {
        if let Err(e) = cache::write(d, &name, &compiled.image) {
            eprintln!(
                "warning: kernel cache {}: {e}; kernels will be compiled again next time",
                d.display()
            );
        }
    }
    Ok(Image {
        bytes: compiled.image,
        cached: false,
    })
}
