//! `rlhf plot`: a PNG of the reward and KL curves from a run directory's metrics, and clear
//! errors for a directory without metrics or with a malformed line.

use rlhf::plot::{plot_run, PLOT_FILE};
use std::path::Path;

/// Writes `stage/metrics.jsonl` under `dir` (or `metrics.jsonl` itself with `stage = ""`), one
/// line per step from `line(step)`.
fn write_metrics(dir: &Path, stage: &str, steps: u64, line: impl Fn(u64) -> String) {
    let stage_dir = dir.join(stage);
    std::fs::create_dir_all(&stage_dir).unwrap();
    let text: String = (1..=steps).map(|s| line(s) + "\n").collect();
    std::fs::write(stage_dir.join("metrics.jsonl"), text).unwrap();
}

/// The (width, height) of a PNG, after checking its signature and that its first chunk is the
/// header, as every PNG decoder does first.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.len() > 33,
        "{} is too short for a PNG",
        path.display()
    );
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG signature");
    assert_eq!(
        &bytes[8..16],
        b"\x00\x00\x00\x0dIHDR",
        "first chunk is not IHDR"
    );
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

/// A demo-style run with PPO and GRPO stages, plus SFT (not an RL stage, so no row of its
/// own). GRPO's KL has a `null` (non-finite) value, which must leave a gap, not fail.
fn fake_demo_run(dir: &Path) {
    write_metrics(dir, "sft", 5, |s| {
        format!(r#"{{"step":{s},"loss":{}}}"#, 2.0 / s as f64)
    });
    write_metrics(dir, "ppo", 40, |s| {
        let x = s as f64;
        format!(
            r#"{{"step":{s},"objective/kl":{},"objective/scores":{},"kl_coef":0.05}}"#,
            0.02 * x,
            (x / 10.0).tanh()
        )
    });
    write_metrics(dir, "grpo", 30, |s| {
        let kl = if s == 12 {
            "null".to_string()
        } else {
            (0.001 * s as f64).to_string()
        };
        format!(
            r#"{{"step":{s},"reward":{},"reward_std":0.3,"objective/kl":{kl}}}"#,
            s as f64 / 30.0
        )
    });
}

#[test]
fn plots_ppo_and_grpo_stages_into_a_png() {
    let tmp = tempfile::tempdir().unwrap();
    fake_demo_run(tmp.path());
    let out = plot_run(tmp.path(), None).unwrap();
    assert_eq!(out, tmp.path().join(PLOT_FILE));
    let (w, h) = png_size(&out);
    // A title strip, then a row of panels per RL stage: ppo and grpo, not sft.
    assert_eq!(w, 1400);
    assert_eq!(h, 50 + 2 * 420, "one row per RL stage");
    // Written under a temporary name then renamed: nothing else is left behind.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    assert_eq!(names, [PLOT_FILE]);
}

#[test]
fn plots_a_single_trainer_run_to_a_chosen_file() {
    let tmp = tempfile::tempdir().unwrap();
    // `rlhf dpo --out X` with held-out metrics every other step; the last line is still being
    // written (no newline), as when plotting a live run, and is left out.
    write_metrics(tmp.path(), "", 8, |s| {
        let eval = if s % 2 == 0 {
            format!(
                r#","eval_rewards/margins":{},"eval_rewards/accuracies":0.6"#,
                0.1 * s as f64
            )
        } else {
            String::new()
        };
        format!(
            r#"{{"step":{s},"loss":0.6,"rewards/margins":{},"rewards/accuracies":0.7{eval}}}"#,
            0.2 * s as f64
        )
    });
    let metrics = tmp.path().join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str(r#"{"step":9,"loss":0."#);
    std::fs::write(&metrics, text).unwrap();
    let want = tmp.path().join("dpo.png");
    let out = plot_run(tmp.path(), Some(&want)).unwrap();
    assert_eq!(out, want);
    assert_eq!(png_size(&out), (1400, 50 + 420));
    assert!(!tmp.path().join(PLOT_FILE).exists());
}

#[test]
fn a_directory_without_metrics_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    // Only non-RL stages: nothing to plot.
    write_metrics(tmp.path(), "sft", 3, |s| {
        format!(r#"{{"step":{s},"loss":1.0}}"#)
    });
    let err = plot_run(tmp.path(), None).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "no metrics.jsonl under {} or its stage directories",
            tmp.path().display()
        )),
        "{err}"
    );
    assert!(!tmp.path().join(PLOT_FILE).exists());

    // A single run's metrics that none of the RL trainers wrote (an SFT run's).
    let sft = tmp.path().join("sft");
    let err = plot_run(&sft, None).unwrap_err().to_string();
    assert!(err.contains("not a PPO, GRPO or DPO run"), "{err}");

    let missing = tmp.path().join("nope");
    let err = plot_run(&missing, None).unwrap_err().to_string();
    assert!(
        err.contains("nope") && err.contains("no such run directory"),
        "{err}"
    );
}

#[test]
fn a_malformed_line_names_its_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    fake_demo_run(tmp.path());
    let path = tmp.path().join("grpo/metrics.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines[2] = r#"{"step":3,"reward":"#.into();
    lines[5] = r#"{"reward":0.5}"#.into();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let err = plot_run(tmp.path(), None).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{}:3:", path.display())) && err.contains("invalid JSON"),
        "{err}"
    );

    // A line without its step is malformed too.
    lines[2] = r#"{"step":3,"reward":0.1}"#.into();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let err = plot_run(tmp.path(), None).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{}:6:", path.display())) && err.contains("\"step\""),
        "{err}"
    );
    assert!(!tmp.path().join(PLOT_FILE).exists());
}

#[test]
fn the_cli_prints_the_path_written() {
    let tmp = tempfile::tempdir().unwrap();
    fake_demo_run(tmp.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .arg("plot")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed.trim(),
        tmp.path().join(PLOT_FILE).display().to_string()
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["plot", "--out"])
        .arg(tmp.path().join("curves.svg"))
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ending in .png"), "{err}");
}
