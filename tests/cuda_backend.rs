//! The CUDA backend's host logic, which needs no GPU: the kernel cache (key, directory, atomic
//! write and read back), the choice of compile target, the PTX-version message, argument
//! packing, the embedded kernel sources, and `--device` resolution where there is no driver.
//! With NVRTC present (`RLHF_NVRTC`, as CI sets it, or in the library path) the kernels are
//! compiled through the cache as a device open would; with a GPU present, device memory is
//! exercised too (the kernels themselves run in `tests/kernels_emu.rs`, `cuda::*`). What cannot
//! run here says SKIPPED on stderr (which the harness does not capture) and passes.

use half::bf16;
use rlhf::backend::cuda::cache::{self, KeyInputs};
use rlhf::backend::cuda::compile::{self, Image, Target, COMMON_CUH, SOURCES};
use rlhf::backend::cuda::nvrtc::{self, NvrtcError};
use rlhf::backend::cuda::{
    driver_present, fallback_notice, module_load_error, Cuda, CudaError, DeviceChoice, Selected,
};
use rlhf::backend::emu::plan::{self, pack_u32_words, Arg, DevPtr};
use rlhf::backend::loss::{Aggregation, PolicyLossCfg, Rows};
use rlhf::backend::Backend;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Says on stderr itself (libtest captures `eprintln!` of passing tests) that a part is skipped.
fn skip(what: &str, why: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED tests/cuda_backend.rs {what}: {why}"
    );
}

fn options() -> Vec<String> {
    Target::Sass(90).options()
}

#[test]
fn cache_key_changes_with_every_input() {
    let opts = options();
    let base = KeyInputs {
        file: "logprob.cu",
        source: "__global__ void k() {}",
        common: "// common",
        options: &opts,
        target: Target::Sass(90),
        nvrtc: (12, 9),
    };
    let key = cache::key(&base);
    assert_eq!(
        cache::key(&base),
        key,
        "the key is a function of its inputs"
    );
    let other_opts = vec![opts[0].clone(), "--std=c++20".to_string()];
    let fewer_opts = vec![opts[0].clone()];
    let variants = [
        (
            "file",
            KeyInputs {
                file: "kl.cu",
                ..base
            },
        ),
        (
            "source",
            KeyInputs {
                source: "__global__ void k() { }",
                ..base
            },
        ),
        (
            "common.cuh",
            KeyInputs {
                common: "// common.",
                ..base
            },
        ),
        (
            "options",
            KeyInputs {
                options: &other_opts,
                ..base
            },
        ),
        (
            "option count",
            KeyInputs {
                options: &fewer_opts,
                ..base
            },
        ),
        (
            "architecture",
            KeyInputs {
                target: Target::Sass(80),
                ..base
            },
        ),
        (
            "target kind",
            KeyInputs {
                target: Target::Ptx(90),
                ..base
            },
        ),
        (
            "NVRTC major",
            KeyInputs {
                nvrtc: (13, 9),
                ..base
            },
        ),
        (
            "NVRTC minor",
            KeyInputs {
                nvrtc: (12, 8),
                ..base
            },
        ),
    ];
    let mut seen = vec![key];
    for (what, k) in variants {
        let h = cache::key(&k);
        assert!(
            !seen.contains(&h),
            "changing the {what} must change the key"
        );
        seen.push(h);
    }
    // Fields are length-prefixed: moving bytes from one field to the next changes the key.
    let split = KeyInputs {
        source: "__global__ void k() {}// com",
        common: "mon",
        ..base
    };
    assert_ne!(cache::key(&split), key);

    let name = cache::entry_name(&base);
    assert_eq!(name, format!("logprob.sm_90.{key:016x}.cubin"));
    let ptx = KeyInputs {
        target: Target::Ptx(90),
        ..base
    };
    assert!(cache::entry_name(&ptx).starts_with("logprob.compute_90."));
    assert!(cache::entry_name(&ptx).ends_with(".ptx"));
}

#[test]
fn cache_directory_follows_the_environment() {
    let os = |s: &str| Some(OsString::from(s));
    let kernels = |p: &str| Some(PathBuf::from(p).join("kernels"));
    assert_eq!(cache::dir_from(os("/r"), os("/x"), os("/h")), kernels("/r"));
    assert_eq!(
        cache::dir_from(None, os("/x"), os("/h")),
        kernels("/x/rlhf")
    );
    assert_eq!(
        cache::dir_from(None, None, os("/h")),
        kernels("/h/.cache/rlhf")
    );
    // Empty values count as unset, as XDG says.
    assert_eq!(
        cache::dir_from(os(""), os(""), os("/h")),
        kernels("/h/.cache/rlhf")
    );
    assert_eq!(cache::dir_from(None, None, None), None);
}

#[test]
fn cache_write_then_read_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/kernels");
    assert_eq!(
        cache::read(&dir, "x.cubin"),
        None,
        "a missing entry is a miss"
    );
    cache::write(&dir, "x.cubin", b"\x7fELF first").unwrap();
    assert_eq!(
        cache::read(&dir, "x.cubin").as_deref(),
        Some(&b"\x7fELF first"[..])
    );
    // Rewriting replaces the whole entry, and no temporary file is left behind.
    cache::write(&dir, "x.cubin", b"second").unwrap();
    assert_eq!(
        cache::read(&dir, "x.cubin").as_deref(),
        Some(&b"second"[..])
    );
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![OsString::from("x.cubin")]);
    // A directory that cannot be created is an error, not a panic.
    let blocked = tmp.path().join("file");
    std::fs::write(&blocked, b"").unwrap();
    assert!(cache::write(&blocked.join("kernels"), "x.cubin", b"y").is_err());
}

#[test]
fn target_is_machine_code_where_nvrtc_knows_the_device() {
    let archs = [75, 80, 86, 89, 90];
    assert_eq!(Target::choose(90, &archs), Some(Target::Sass(90)));
    assert_eq!(Target::choose(86, &archs), Some(Target::Sass(86)));
    // A device newer than NVRTC gets PTX of the newest architecture it runs.
    assert_eq!(Target::choose(120, &archs), Some(Target::Ptx(90)));
    assert_eq!(Target::choose(87, &archs), Some(Target::Ptx(86)));
    assert_eq!(Target::choose(70, &archs), None);
    assert_eq!(Target::Sass(90).name(), "sm_90");
    assert_eq!(Target::Ptx(90).name(), "compute_90");
    assert!(Target::Sass(90)
        .options()
        .contains(&"--gpu-architecture=sm_90".to_string()));
}

#[test]
fn module_load_errors_name_the_driver_and_nvrtc_versions() {
    use cudarc::driver::sys::CUresult;
    let msg = module_load_error(
        "logprob.cu",
        Target::Ptx(90),
        CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION,
        (12, 2),
        (12, 9),
        Some("8.8"),
    );
    for want in [
        "kernels/logprob.cu",
        "CUDA 12.2",
        "NVRTC 12.9",
        "PTX ISA 8.8",
        "nvidia-cuda-nvrtc-cu12==12.2.*",
        "update the driver",
    ] {
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
    let msg = module_load_error(
        "kl.cu",
        Target::Sass(90),
        CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU,
        (12, 4),
        (13, 0),
        None,
    );
    for want in [
        "kernels/kl.cu",
        "sm_90",
        "CUDA 12.4",
        "NVRTC 13.0",
        "CUDA_ERROR_NO_BINARY_FOR_GPU",
    ] {
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
    assert_eq!(
        compile::ptx_isa(b"//\n.version 8.8\n.target sm_90\n").as_deref(),
        Some("8.8")
    );
    assert_eq!(compile::ptx_isa(b"\x7fELF"), None);
}

#[test]
fn args_pack_into_eight_byte_slots_in_parameter_order() {
    let l = plan::Launch {
        kernel: plan::KL_F32,
        grid: [1, 1, 1],
        block: [32, 1, 1],
        shared_bytes: 0,
        args: vec![
            Arg::Ptr(DevPtr(0x7f00_dead_beef)),
            Arg::I32(-1),
            Arg::F32(1.5),
            Arg::F64(-2.25),
            Arg::Ptr(DevPtr::NULL),
        ],
    };
    // A parameter reads its own size from the start of its slot, little-endian: an int -1 is
    // 0xffffffff in the low half (the high half, never read, is 0).
    assert_eq!(
        l.param_slots(),
        vec![
            0x7f00_dead_beef,
            0xffff_ffff,
            1.5f32.to_bits() as u64,
            (-2.25f64).to_bits(),
            0
        ]
    );
    assert_eq!(l.signature(), "pifdp");

    // A real plan: one slot per argument, in the kernel's parameter order.
    let p = plan::PolicyPtrs {
        logp: DevPtr(0x1000),
        logp_old: DevPtr(0x2000),
        adv: DevPtr(0x3000),
        adv_per_seq: true,
        logp_ref: DevPtr::NULL,
        entropy: DevPtr::NULL,
        mask: DevPtr(0x4000),
        counts: DevPtr(0x5000),
        per_token: DevPtr::NULL,
        dlogp: DevPtr(0x6000),
        dentropy: DevPtr::NULL,
        partials: DevPtr(0x7000),
        is_weight: DevPtr::NULL,
    };
    let cfg = PolicyLossCfg {
        clip_low: 0.2,
        clip_high: 0.28,
        dual_clip: None,
        kl_coef: 0.0,
        entropy_coef: 0.0,
        agg: Aggregation::Dapo { num_items: 12.0 },
    };
    let l = plan::policy_loss(p, Rows { b: 3, t: 5 }, &cfg, 0.5);
    let slots = l.param_slots();
    assert_eq!(slots.len(), 24);
    assert_eq!(&slots[..4], &[0x1000, 0x2000, 0x3000, 1]);
    assert_eq!(&slots[8..10], &[3, 5], "B and T");
    assert_eq!(slots[10], 0.8f32.to_bits() as u64, "clip_lo = 1 - 0.2");
    assert_eq!(&slots[16..18], &[2, 12f64.to_bits()], "dapo and num_items");
    assert_eq!(slots[22], 0x7000);
    assert_eq!(l.grid, [3, 1, 1], "one block per row");

    // Token ids reach a kernel two to an 8-byte word, as a `u32*` reads them.
    assert_eq!(
        pack_u32_words(&[1, 2, 0xffff_ffff]),
        vec![(2 << 32) | 1, 0xffff_ffff]
    );
    assert!(pack_u32_words(&[]).is_empty());
}

#[test]
fn every_kernel_file_is_embedded() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut on_disk: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let embedded: Vec<String> = SOURCES.iter().map(|s| s.0.to_string()).collect();
    assert_eq!(
        embedded, on_disk,
        "compile::SOURCES lists every kernels/*.cu"
    );
    for (file, source) in SOURCES {
        assert_eq!(*source, std::fs::read_to_string(root.join(file)).unwrap());
    }
    assert_eq!(
        COMMON_CUH,
        std::fs::read_to_string(root.join("common.cuh")).unwrap()
    );
    for k in plan::ALL {
        assert!(
            SOURCES.iter().any(|s| s.0 == k.file),
            "{} is planned from kernels/{}, which is not embedded",
            k.name,
            k.file
        );
    }
}

#[test]
fn device_auto_falls_back_to_the_cpu_without_a_driver() {
    assert_eq!(
        fallback_notice(&CudaError::NoDriver),
        "no CUDA driver found (libcuda.so could not be loaded); running on the CPU"
    );
    assert!(CudaError::NoDriver.is_no_device());
    assert!(matches!(DeviceChoice::Cpu.select(), Ok(Selected::Cpu)));
    assert_eq!(DeviceChoice::default(), DeviceChoice::Auto);
    if driver_present() {
        skip(
            "device_auto_falls_back_to_the_cpu_without_a_driver",
            "a CUDA driver is present",
        );
        return;
    }
    assert!(matches!(Cuda::open(0), Err(CudaError::NoDriver)));
    assert!(matches!(DeviceChoice::Auto.select(), Ok(Selected::Cpu)));
    let err = DeviceChoice::Cuda.select().unwrap_err();
    assert_eq!(
        err.to_string(),
        "no CUDA driver found (libcuda.so could not be loaded)"
    );
}

/// The commands: `--device cuda` fails with a message naming the flag and the cause, and
/// `--device auto` prints the one-line notice and runs emulated.
#[test]
fn cli_device_flag_without_a_driver() {
    if driver_present() {
        skip(
            "cli_device_flag_without_a_driver",
            "a CUDA driver is present",
        );
        return;
    }
    let rlhf = env!("CARGO_BIN_EXE_rlhf");
    for args in [
        &["validate", "--quick", "--device", "cuda"][..],
        &["bench", "kernels", "--quick", "--device", "cuda"][..],
    ] {
        let out = Command::new(rlhf).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded without a driver");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--device cuda")
                && stderr.contains("no CUDA driver found (libcuda.so could not be loaded)"),
            "{args:?}: {stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "{args:?} ran something: {:?}",
            out.stdout
        );
    }
    let out = Command::new(rlhf)
        .args([
            "bench",
            "kernels",
            "--quick",
            "--repeats",
            "1",
            "--device",
            "auto",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        ["no CUDA driver found (libcuda.so could not be loaded); running on the CPU"]
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("no GPU: running the emulated kernels"),
        "{stdout}"
    );
}

/// The kernels through NVRTC and the cache, as a device open compiles them: machine code for
/// sm_90 and PTX for compute_90 (a device newer than NVRTC), the second time from the cache.
#[test]
fn kernels_compile_through_the_cache() {
    let nv = match nvrtc::load() {
        Ok(n) => n,
        Err(NvrtcError::NotFound(e)) => {
            skip(
                "kernels_compile_through_the_cache",
                &format!("no NVRTC ({e})"),
            );
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let version = nv.version().unwrap();
    let supported = nv.supported_archs().unwrap();
    assert!(
        supported.contains(&90),
        "NVRTC {version:?} supports {supported:?}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("kernels");
    let (file, source) = SOURCES
        .iter()
        .find(|s| s.0 == "logprob.cu")
        .expect("logprob.cu is embedded");
    for target in [Target::Sass(90), Target::Ptx(90)] {
        let image = |use_cache| -> Image {
            compile::image(nv, version, file, source, target, Some(&dir), use_cache)
                .unwrap_or_else(|e| panic!("{}: {e}", target.name()))
        };
        let first = image(true);
        assert!(
            !first.cached,
            "{}: a fresh cache holds nothing",
            target.name()
        );
        let again = image(true);
        assert!(
            again.cached,
            "{}: the second open reads the cache",
            target.name()
        );
        assert_eq!(again.bytes, first.bytes);
        let fresh = image(false);
        assert!(!fresh.cached);
        match target {
            Target::Sass(_) => assert_eq!(&first.bytes[..4], b"\x7fELF", "a CUBIN is ELF"),
            Target::Ptx(_) => {
                let ptx = String::from_utf8(first.bytes.clone()).unwrap();
                assert!(ptx.contains(".target sm_90"), "PTX for compute_90");
                assert!(ptx.contains(".visible .entry logprob_fwd_bf16("));
                assert!(compile::ptx_isa(&first.bytes).is_some());
            }
        }
    }
    let entries = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(entries, 2, "one entry per target, nothing else");
}

/// Device memory through the `Backend` interface, where a GPU is present.
#[test]
fn device_memory_round_trips() {
    let cuda = match Cuda::open(0) {
        Ok(c) => c,
        Err(e) if e.is_no_device() => {
            skip("device_memory_round_trips", &e.to_string());
            return;
        }
        Err(e) => panic!("a CUDA driver is present but the backend does not open: {e}"),
    };
    let _ = writeln!(std::io::stderr(), "tests/cuda_backend.rs: {}", cuda.info());
    let data: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let mut b = cuda.upload(&data);
    assert_eq!(cuda.len(&b), 1000);
    assert_eq!(cuda.download(cuda.all(&b)), data);
    assert_eq!(cuda.download(cuda.view(&b, 10..13)), &data[10..13]);
    cuda.fill(cuda.view_mut(&mut b, 100..200), -3.5);
    let mut want = data.clone();
    want[100..200].fill(-3.5);
    assert_eq!(cuda.download(cuda.all(&b)), want);
    let src = cuda.upload(&[1.0, 2.0, 3.0]);
    cuda.copy(cuda.view_mut(&mut b, 0..3), cuda.all(&src));
    want[..3].copy_from_slice(&[1.0, 2.0, 3.0]);
    assert_eq!(cuda.download(cuda.all(&b)), want);
    let z = cuda.zeros(5);
    assert_eq!(cuda.download(cuda.all(&z)), vec![0.0; 5]);
    let empty = cuda.zeros(0);
    assert!(cuda.download(cuda.all(&empty)).is_empty());
    let half: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
    let hb = cuda.upload_slice(&half).unwrap();
    assert_eq!(cuda.download_slice(hb.view()).unwrap(), half);
}
