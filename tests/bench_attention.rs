//! `rlhf bench attention` where no GPU is lent: the emulated run completes and prints its table,
//! one row per kernel and head dim, under a notice that its figures are not speed figures.

use std::process::Command;

/// Runs `rlhf bench attention` with `args`; returns (success, stdout, stderr).
fn bench(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["bench", "attention"])
        .args(args)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn emulated_run_prints_its_table() {
    let (ok, out, err) = bench(&["--device", "emu"]);
    assert!(ok, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], rlhf::bench::ATTENTION_EMU_NOTICE);
    assert!(lines[1].starts_with("kernel"), "no table header: {out}");
    let rows: Vec<Vec<&str>> = lines[2..]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let kinds: Vec<(&str, &str)> = rows.iter().map(|r| (r[0], r[1])).collect();
    assert_eq!(
        kinds,
        [
            ("tensor-core", "64"),
            ("simt", "64"),
            ("tensor-core", "128"),
            ("simt", "128")
        ],
        "{out}"
    );
    for r in &rows {
        let ms: f64 = r[4].parse().unwrap();
        assert!(ms > 0.0, "{r:?}");
    }
}

#[test]
fn rejects_zero_repeats() {
    let (ok, _, err) = bench(&["--device", "emu", "--repeats", "0"]);
    assert!(!ok);
    assert!(err.contains("--repeats must be at least 1"), "{err}");
}
