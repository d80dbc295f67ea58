//! `--device` on the trainers and `rlhf generate`: the same training loop runs on the CPU and on
//! the CUDA kernels (here on the emulator, the GPU code path without a GPU), and a device that
//! is not there is a clear error.

use rlhf::algo::sft::{self, SftArgs};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::cuda::driver_present;
use rlhf::backend::emu::Emu;
use rlhf::builtin_task;
use std::path::Path;
use std::process::Command;

/// The loss of every line of a run's metrics.
fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loss"].as_f64().unwrap()
        })
        .collect()
}

/// Six SFT steps of a random llama-tiny on the built-in task, on the CPU and on the emulated
/// kernels: the same loop, so the same losses up to bf16 GEMM rounding (the whole-step parity
/// test bounds one step's gradient to a few 2^-9; over six steps the losses stay within 1%),
/// and both learn.
#[test]
fn sft_on_the_emulated_kernels_tracks_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    builtin_task::write_tokenizer(&tok).unwrap();
    let data = dir.path().join("train.jsonl");
    let text: String = builtin_task::pairs(7)
        .0
        .into_iter()
        .take(24)
        .map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string() + "\n")
        .collect();
    std::fs::write(&data, text).unwrap();
    let args = |out: &str| SftArgs {
        model: Some("llama-tiny".into()),
        tokenizer: Some(tok.clone()),
        data: Some(data.clone()),
        out: Some(dir.path().join(out)),
        lr: Some(3e-3),
        batch_size: Some(4),
        max_steps: Some(6),
        eval_every: 0,
        save_every: 0,
        quiet: true,
        ..SftArgs::default()
    };
    sft::train(&Cpu, &args("cpu")).unwrap();
    sft::train(&Emu::default(), &args("emu")).unwrap();
    let (cpu, emu) = (
        losses(&dir.path().join("cpu")),
        losses(&dir.path().join("emu")),
    );
    assert_eq!(cpu.len(), 6);
    assert_eq!(emu.len(), 6);
    for (i, (c, e)) in cpu.iter().zip(&emu).enumerate() {
        assert!(
            (c - e).abs() < 0.01 * c,
            "step {i}: CPU loss {c}, emulated {e}"
        );
    }
    assert!(
        emu[5] < emu[0] - 0.1,
        "the emulated run did not learn: {emu:?}"
    );
}

/// `--device cuda` where there is no GPU names the flag, says what is missing and how to run
/// anyway; `--device emu` runs the command on the emulated kernels.
#[test]
fn generate_device_flag() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/models/llama");
    let run = |device: &str| {
        Command::new(env!("CARGO_BIN_EXE_rlhf"))
            .args(["generate", "--model"])
            .arg(&model)
            .args([
                "--prompt",
                "hi",
                "--max-new-tokens",
                "3",
                "--device",
                device,
            ])
            .output()
            .unwrap()
    };
    let emu = run("emu");
    assert!(
        emu.status.success(),
        "{}",
        String::from_utf8_lossy(&emu.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&emu.stdout).unwrap();
    assert_eq!(line["tokens"].as_array().unwrap().len(), 3);
    assert!(String::from_utf8_lossy(&emu.stderr).contains("emulator"));
    if !driver_present() {
        let cuda = run("cuda");
        assert!(!cuda.status.success());
        let err = String::from_utf8_lossy(&cuda.stderr);
        assert!(
            err.contains("--device")
                && err.contains("no CUDA driver")
                && err.contains("--device cpu"),
            "{err}"
        );
    }
}

/// The GRPO iteration benchmark runs its engine on the emulated kernels where no GPU is lent
/// (the "its emulated run completes"), leaving out TRL, which runs on the CPU.
#[test]
fn grpo_benchmark_runs_on_the_emulator() {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args([
            "bench",
            "grpo",
            "--device",
            "emu",
            "--configs",
            "llama-tiny",
        ])
        .args(["--betas", "0.04", "--prompts", "2", "--generations", "2"])
        .args(["--max-new-tokens", "8", "--iterations", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("engine on --device emu; TRL not compared"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("llama-tiny"))
        .unwrap_or_else(|| panic!("no llama-tiny row: {text}"));
    let secs: f64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(secs > 0.0, "{row}");
}

/// `rlhf bench train` runs both sides on one device, so it takes only devices PyTorch has too.
#[test]
fn train_benchmark_refuses_the_emulator() {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["bench", "train", "--device", "emu", "--no-torch"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--device cpu or cuda"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
