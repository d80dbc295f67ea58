//! Bad model directories and inputs through the binary: a clear message on stderr and a
//! non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/models")
        .join(name)
}

/// A writable copy of a fixture model directory.
fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

/// Runs `rlhf logprobs` on `model` with one short row; returns (success, stderr).
fn logprobs(model: &Path, input: &str) -> (bool, String) {
    let tmp = tempfile::tempdir().unwrap();
    let inp = tmp.path().join("in.json");
    std::fs::write(&inp, input).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["logprobs", "--model"])
        .arg(model)
        .arg("--input")
        .arg(&inp)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "the binary panicked: {err}");
    (out.status.success(), err)
}

const ROW: &str = r#"{"input_ids": [[3, 4, 5]]}"#;

/// Rewrites a safetensors file keeping every tensor but those `edit` drops or reshapes.
fn rewrite(path: &Path, edit: impl Fn(&str, Vec<usize>) -> Option<Vec<usize>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(shape) = edit(&name, view.shape().to_vec()) {
            kept.push((
                name,
                safetensors::tensor::TensorView::new(view.dtype(), shape, view.data()).unwrap(),
            ));
        }
    }
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_model("llama");
    rewrite(&dir.path().join("model.safetensors"), |n, s| {
        (n != "model.layers.1.mlp.up_proj.weight").then_some(s)
    });
    let (ok, err) = logprobs(dir.path(), ROW);
    assert!(!ok);
    assert!(
        err.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
        "{err}"
    );
}

#[test]
fn shape_mismatch_says_expected_and_found() {
    let dir = copy_model("llama");
    rewrite(&dir.path().join("model.safetensors"), |n, s| {
        Some(if n == "model.layers.0.self_attn.k_proj.weight" {
            vec![s[1], s[0]]
        } else {
            s
        })
    });
    let (ok, err) = logprobs(dir.path(), ROW);
    assert!(!ok);
    assert!(
        err.contains(
            "`model.layers.0.self_attn.k_proj.weight` has shape [64, 32], expected [32, 64]"
        ),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = copy_model("gpt2");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, err) = logprobs(dir.path(), ROW);
    assert!(!ok);
    assert!(
        err.contains("corrupt or truncated safetensors file"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture_and_rope_scaling_are_refused() {
    let dir = copy_model("llama");
    let cfg_path = dir.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("\"model_type\": \"llama\"", "\"model_type\": \"mamba\""),
    )
    .unwrap();
    let (ok, err) = logprobs(dir.path(), ROW);
    assert!(!ok);
    assert!(
        err.contains("unsupported model: model_type `mamba`"),
        "{err}"
    );

    std::fs::write(
        &cfg_path,
        cfg.replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\""),
    )
    .unwrap();
    let (ok, err) = logprobs(dir.path(), ROW);
    assert!(!ok);
    assert!(err.contains("rope_type `yarn`"), "{err}");
}

#[test]
fn bad_input_files_are_reported() {
    let (ok, err) = logprobs(&fixture("gpt2"), "{\"ids\": [[1, 2]]}");
    assert!(!ok);
    assert!(err.contains("expected JSON {\"input_ids\""), "{err}");
    let (ok, err) = logprobs(&fixture("gpt2"), r#"{"input_ids": [[3, 4], []]}"#);
    assert!(!ok);
    assert!(err.contains("row 1 of input_ids is empty"), "{err}");
    let (ok, err) = logprobs(
        &fixture("gpt2"),
        &format!("{{\"input_ids\": [{:?}]}}", vec![5u32; 129]),
    );
    assert!(!ok);
    assert!(err.contains("exceeds the model's 128 positions"), "{err}");
    let (ok, err) = logprobs(Path::new("/nonexistent/model"), ROW);
    assert!(!ok);
    assert!(err.contains("/nonexistent/model/config.json"), "{err}");
}

/// Trainers: a preference file missing `rejected`, an SFT file missing `completion`, a malformed
/// line: each names its file and line, and the process exits non-zero.
#[test]
fn trainers_name_the_bad_line() {
    let tmp = tempfile::tempdir().unwrap();
    let prefs = tmp.path().join("prefs.jsonl");
    std::fs::write(
        &prefs,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": \"b\"}\n",
    )
    .unwrap();
    let sft = tmp.path().join("sft.jsonl");
    std::fs::write(
        &sft,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"\n",
    )
    .unwrap();
    let cases = [
        ("rm", &prefs, "prefs.jsonl:2: missing \"rejected\""),
        ("dpo", &prefs, "prefs.jsonl:2: missing \"rejected\""),
        ("sft", &sft, "sft.jsonl:2:"),
    ];
    for (cmd, data, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
            .args([cmd, "--model"])
            .arg(fixture("gpt2"))
            .arg("--data")
            .arg(data)
            .arg("--out")
            .arg(tmp.path().join(format!("run-{cmd}")))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} accepted a bad file");
        assert!(err.contains(want), "{cmd}: {err}");
        assert!(!err.contains("panicked"), "{cmd} panicked: {err}");
    }
}
