//! Parity with `transformers`: the fixtures' logits and log-probs (made with transformers 5.23,
//! f32) must be reproduced, in the library and through `rlhf logprobs`.

use rlhf::backend::cpu::Cpu;
use rlhf::model::transformer::shifted_targets;
use rlhf::model::{Batch, Model, Pad};
use safetensors::SafeTensors;
use std::path::PathBuf;

/// The fixtures' README: independent implementations agree within 2.6e-6, so 1e-4 absolute is
/// a fair tolerance for f32 with a different summation order.
const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/models")
        .join(name)
}

struct Reference {
    ids: Vec<Vec<u32>>,
    logits: Vec<f32>,
    logprobs: Vec<f32>,
}

fn reference(name: &str) -> Reference {
    let bytes = std::fs::read(fixture(name).join("reference_io.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |n: &str| -> Vec<f32> {
        let t = st.tensor(n).unwrap();
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let ids_t = st.tensor("input_ids").unwrap();
    let (b, t) = (ids_t.shape()[0], ids_t.shape()[1]);
    let flat: Vec<u32> = ids_t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    Reference {
        ids: (0..b).map(|r| flat[r * t..(r + 1) * t].to_vec()).collect(),
        logits: f32s("logits"),
        logprobs: f32s("logprobs"),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_family(name: &str) {
    let be = Cpu;
    let model = Model::load(&be, &fixture(name)).unwrap();
    let r = reference(name);
    let batch = Batch::new(&r.ids, 1, Pad::Right);
    let acts = model.forward(&be, &batch).unwrap();
    let logits = model.logits(&be, &acts.hidden, batch.n());
    let d = max_abs_diff(&logits, &r.logits);
    assert!(d < TOL, "{name}: logits differ from transformers by {d}");

    let lp: Vec<f32> = model.next_token_logprobs(&be, &batch).unwrap().concat();
    let d = max_abs_diff(&lp, &r.logprobs);
    assert!(d < TOL, "{name}: log-probs differ from transformers by {d}");

    // Chunking the LM head over rows changes nothing but the summation order (a chunk of a few
    // rows takes the skinny matmul, a large one gemm): agreement to a few f32 ulps.
    let targets = shifted_targets(&batch);
    let (chunked, _) = model
        .head_logprobs(&be, &acts.hidden, &targets, 1.0, false, 3)
        .unwrap();
    let (whole, _) = model
        .head_logprobs(&be, &acts.hidden, &targets, 1.0, false, 4096)
        .unwrap();
    let d = max_abs_diff(&chunked, &whole);
    assert!(
        d < 1e-5,
        "{name}: row chunking changed the log-probs by {d}"
    );
}

#[test]
fn gpt2_matches_transformers() {
    check_family("gpt2");
}

#[test]
fn llama_matches_transformers() {
    check_family("llama");
}

#[test]
fn qwen2_matches_transformers() {
    check_family("qwen2");
}

/// Rows of different lengths batched together (right- or left-padded) give each row exactly the
/// log-probs it gets alone, within float noise from the different batch shape.
#[test]
fn padded_rows_match_rows_alone() {
    let be = Cpu;
    for name in ["gpt2", "llama", "qwen2"] {
        let model = Model::load(&be, &fixture(name)).unwrap();
        let full = &reference(name).ids[0];
        let rows = vec![
            full[..16].to_vec(),
            full[..5].to_vec(),
            full[3..12].to_vec(),
            full[..2].to_vec(),
        ];
        for side in [Pad::Right, Pad::Left] {
            let batched = model
                .next_token_logprobs(&be, &Batch::new(&rows, 1, side))
                .unwrap();
            for (row, got) in rows.iter().zip(&batched) {
                let alone = model
                    .next_token_logprobs(&be, &Batch::new(std::slice::from_ref(row), 1, Pad::Right))
                    .unwrap();
                assert_eq!(got.len(), row.len() - 1);
                let d = max_abs_diff(got, &alone[0]);
                // Same math, different padding: only summation order may differ.
                assert!(
                    d < 1e-5,
                    "{name} {side:?}: padded row differs from the row alone by {d}"
                );
            }
        }
    }
}

#[test]
fn cli_logprobs_matches_transformers() {
    for name in ["gpt2", "llama"] {
        let r = reference(name);
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.json");
        std::fs::write(
            &input,
            serde_json::json!({ "input_ids": r.ids }).to_string(),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
            .args(["logprobs", "--model"])
            .arg(fixture(name))
            .arg("--input")
            .arg(&input)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let lp: Vec<f32> = v["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
            })
            .collect();
        let d = max_abs_diff(&lp, &r.logprobs);
        assert!(
            d < TOL,
            "{name}: rlhf logprobs differs from transformers by {d}"
        );
    }
}

#[test]
fn cli_rejects_token_beyond_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.json");
    std::fs::write(&input, r#"{"input_ids": [[3, 4, 512]]}"#).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["logprobs", "--model"])
        .arg(fixture("llama"))
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("token id 512 is out of range: the model's embedding has 512 rows"),
        "{err}"
    );
}
