//! Hugging Face model directories in and out (config, safetensors weights with HF names,
//! sharded and half-precision files, typed errors) and the tokenizer, on the fixture models.

use rlhf::model::config::{Config, Head};
use rlhf::model::layout::Layout;
use rlhf::model::tokenizer::Tokenizer;
use rlhf::model::weights::{
    copy_tokenizer_files, hf_tensors, load_params, read_header, save_model, SaveDtype,
};
use rlhf::Error;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const MODELS: [&str; 3] = ["gpt2", "llama", "qwen2"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/models")
        .join(name)
}

/// One tensor of a safetensors file, owned.
#[derive(Clone, Debug)]
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl RawTensor {
    fn f32s(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32);
        self.bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn from_f32(shape: Vec<usize>, v: &[f32]) -> RawTensor {
        RawTensor {
            dtype: Dtype::F32,
            shape,
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

fn read_tensors(path: &Path) -> BTreeMap<String, RawTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(n, v)| {
            let t = RawTensor {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                bytes: v.data().to_vec(),
            };
            (n.to_string(), t)
        })
        .collect()
}

fn write_tensors(path: &Path, tensors: &BTreeMap<String, RawTensor>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, t)| {
            let v = TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap();
            (n.clone(), v)
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta)).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A scratch copy of a fixture's config (and optionally its tokenizer) without weights.
fn scratch_with_config(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture(name).join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    dir
}

fn load(name: &str) -> (Config, Layout, Vec<f32>) {
    let dir = fixture(name);
    let cfg = Config::load(&dir).unwrap();
    let layout = Layout::new(&cfg);
    let params = load_params(&dir, &cfg, &layout).unwrap();
    (cfg, layout, params)
}

fn load_from(dir: &Path, cfg: &Config) -> rlhf::Result<Vec<f32>> {
    load_params(dir, cfg, &Layout::new(cfg))
}

#[test]
fn table_covers_the_buffer_exactly_once() {
    for m in MODELS {
        let (cfg, layout, _) = load(m);
        let mut ranges: Vec<_> = hf_tensors(&cfg, &layout)
            .into_iter()
            .map(|t| t.range)
            .collect();
        ranges.sort_by_key(|r| r.start);
        let mut end = 0;
        for r in ranges {
            assert_eq!(r.start, end, "{m}: gap or overlap at {end}");
            end = r.end;
        }
        assert_eq!(end, layout.total, "{m}");
    }
}

#[test]
fn llama_and_qwen2_pack_qkv_and_gate_up_rows() {
    for m in ["llama", "qwen2"] {
        let (cfg, layout, p) = load(m);
        let file = read_tensors(&fixture(m).join("model.safetensors"));
        let get = |n: &str| file[n].f32s();
        let c = cfg.hidden_size;
        let (q, kv, i) = (
            cfg.n_head * cfg.head_dim,
            cfg.n_kv_head * cfg.head_dim,
            cfg.intermediate_size,
        );
        for (l, b) in layout.blocks.iter().enumerate() {
            let pre = format!("model.layers.{l}.");
            let qkv = &p[b.qkv_w.clone()];
            assert_eq!(&qkv[..q * c], get(&format!("{pre}self_attn.q_proj.weight")));
            assert_eq!(
                &qkv[q * c..(q + kv) * c],
                get(&format!("{pre}self_attn.k_proj.weight"))
            );
            assert_eq!(
                &qkv[(q + kv) * c..],
                get(&format!("{pre}self_attn.v_proj.weight"))
            );
            let fc = &p[b.fc_w.clone()];
            assert_eq!(&fc[..i * c], get(&format!("{pre}mlp.gate_proj.weight")));
            assert_eq!(&fc[i * c..], get(&format!("{pre}mlp.up_proj.weight")));
            assert_eq!(
                &p[b.proj_w.clone()],
                get(&format!("{pre}mlp.down_proj.weight"))
            );
            assert_eq!(
                &p[b.o_w.clone()],
                get(&format!("{pre}self_attn.o_proj.weight"))
            );
            assert_eq!(
                &p[b.ln2_w.clone()],
                get(&format!("{pre}post_attention_layernorm.weight"))
            );
            if m == "qwen2" {
                let qb = &p[b.qkv_b.clone().unwrap()];
                assert_eq!(&qb[..q], get(&format!("{pre}self_attn.q_proj.bias")));
                assert_eq!(&qb[q..q + kv], get(&format!("{pre}self_attn.k_proj.bias")));
                assert_eq!(&qb[q + kv..], get(&format!("{pre}self_attn.v_proj.bias")));
            } else {
                assert!(b.qkv_b.is_none());
            }
        }
        assert_eq!(&p[layout.embed.clone()], get("model.embed_tokens.weight"));
        assert_eq!(&p[layout.lm_head.clone().unwrap()], get("lm_head.weight"));
        assert_eq!(&p[layout.lnf_w.clone()], get("model.norm.weight"));
    }
}

#[test]
fn gpt2_transposes_conv1d() {
    let (cfg, layout, p) = load("gpt2");
    let file = read_tensors(&fixture("gpt2").join("model.safetensors"));
    let get = |n: &str| file[n].f32s();
    let c = cfg.hidden_size;
    // HF [in, out] at [i, o] must equal ours [out, in] at [o, i].
    let check_t = |ours: &[f32], hf: &[f32], rows_in: usize, cols_out: usize| {
        for i in 0..rows_in {
            for o in 0..cols_out {
                assert_eq!(ours[o * rows_in + i], hf[i * cols_out + o]);
            }
        }
    };
    for (l, b) in layout.blocks.iter().enumerate() {
        let pre = format!("transformer.h.{l}.");
        check_t(
            &p[b.qkv_w.clone()],
            &get(&format!("{pre}attn.c_attn.weight")),
            c,
            3 * c,
        );
        assert_eq!(
            &p[b.qkv_b.clone().unwrap()],
            get(&format!("{pre}attn.c_attn.bias"))
        );
        check_t(
            &p[b.o_w.clone()],
            &get(&format!("{pre}attn.c_proj.weight")),
            c,
            c,
        );
        let inter = cfg.intermediate_size;
        check_t(
            &p[b.fc_w.clone()],
            &get(&format!("{pre}mlp.c_fc.weight")),
            c,
            inter,
        );
        check_t(
            &p[b.proj_w.clone()],
            &get(&format!("{pre}mlp.c_proj.weight")),
            inter,
            c,
        );
        assert_eq!(
            &p[b.ln1_b.clone().unwrap()],
            get(&format!("{pre}ln_1.bias"))
        );
    }
    assert_eq!(&p[layout.embed.clone()], get("transformer.wte.weight"));
    assert_eq!(
        &p[layout.pos_embed.clone().unwrap()],
        get("transformer.wpe.weight")
    );
    assert!(layout.lm_head.is_none(), "gpt2 is tied");
}

#[test]
fn f32_save_round_trips_bitwise_with_hf_names_and_shapes() {
    for m in MODELS {
        let (cfg, layout, p) = load(m);
        let out = tempfile::tempdir().unwrap();
        save_model(out.path(), &cfg, &layout, &p, SaveDtype::F32).unwrap();

        // Same tensor names, shapes and dtypes as transformers wrote (gpt2: no lm_head added).
        let orig = read_header(&fixture(m).join("model.safetensors")).unwrap();
        let saved = read_header(&out.path().join("model.safetensors")).unwrap();
        assert_eq!(orig, saved, "{m}");
        // The file's bytes equal the original tensor by tensor.
        let (a, b) = (
            read_tensors(&fixture(m).join("model.safetensors")),
            read_tensors(&out.path().join("model.safetensors")),
        );
        for (n, t) in &a {
            assert_eq!(t.bytes, b[n].bytes, "{m}: {n}");
        }
        let bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");

        // config.json parses back to the same configuration.
        let cfg2 = Config::load(out.path()).unwrap();
        assert_eq!(cfg, cfg2, "{m}");
        let p2 = load_from(out.path(), &cfg2).unwrap();
        assert!(
            p.iter().zip(&p2).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{m}"
        );

        // Atomic writes leave no temporaries behind.
        let mut names: Vec<String> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["config.json", "model.safetensors"]);
    }
}

#[test]
fn bf16_save_loads_back_within_bf16_precision() {
    // bf16 keeps 8 significant bits; round-to-nearest errs by at most 2^-9 relative, so
    // 2^-8 leaves a factor two of margin.
    let tol = 2f32.powi(-8);
    for m in MODELS {
        let (cfg, layout, p) = load(m);
        let out = tempfile::tempdir().unwrap();
        save_model(out.path(), &cfg, &layout, &p, SaveDtype::Bf16).unwrap();
        let header = read_header(&out.path().join("model.safetensors")).unwrap();
        assert!(header.values().all(|(d, _)| *d == Dtype::BF16));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(v["dtype"], "bfloat16");
        assert_eq!(v["torch_dtype"], "bfloat16");
        let p2 = load_from(out.path(), &Config::load(out.path()).unwrap()).unwrap();
        for (i, (x, y)) in p.iter().zip(&p2).enumerate() {
            assert!((x - y).abs() <= tol * x.abs(), "{m}[{i}]: {x} vs {y}");
        }
    }
}

#[test]
fn sharded_checkpoint_loads_identically() {
    for m in MODELS {
        let (cfg, _, p) = load(m);
        let dir = scratch_with_config(m);
        let tensors = read_tensors(&fixture(m).join("model.safetensors"));
        let half = tensors.len() / 2;
        let mut weight_map = serde_json::Map::new();
        let mut shards = [BTreeMap::new(), BTreeMap::new()];
        for (k, (n, t)) in tensors.into_iter().enumerate() {
            let s = usize::from(k >= half);
            let file = format!("model-0000{}-of-00002.safetensors", s + 1);
            weight_map.insert(n.clone(), file.into());
            shards[s].insert(n, t);
        }
        for (s, shard) in shards.iter().enumerate() {
            write_tensors(
                &dir.path()
                    .join(format!("model-0000{}-of-00002.safetensors", s + 1)),
                shard,
            );
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let p2 = load_from(dir.path(), &cfg).unwrap();
        assert!(
            p.iter().zip(&p2).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{m}"
        );

        // A shard the index names but the directory lacks is an I/O error naming the shard.
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let e = load_from(dir.path(), &cfg).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(
            e.to_string().contains("model-00002-of-00002.safetensors"),
            "{e}"
        );
    }
}

#[test]
fn f16_checkpoint_loads() {
    for m in MODELS {
        let (cfg, _, p) = load(m);
        let dir = scratch_with_config(m);
        let tensors: BTreeMap<String, RawTensor> =
            read_tensors(&fixture(m).join("model.safetensors"))
                .into_iter()
                .map(|(n, t)| {
                    let bytes = t
                        .f32s()
                        .iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .collect();
                    (
                        n,
                        RawTensor {
                            dtype: Dtype::F16,
                            shape: t.shape,
                            bytes,
                        },
                    )
                })
                .collect();
        write_tensors(&dir.path().join("model.safetensors"), &tensors);
        let p2 = load_from(dir.path(), &cfg).unwrap();
        // f16 → f32 is exact, so the result is exactly the f16 rounding of the original.
        for (x, y) in p.iter().zip(&p2) {
            assert_eq!(
                half::f16::from_f32(*x).to_f32().to_bits(),
                y.to_bits(),
                "{m}"
            );
        }
    }
}

#[test]
fn unprefixed_gpt2_and_tied_lm_head_in_file_load() {
    let (cfg, _, p) = load("gpt2");
    let tensors = read_tensors(&fixture("gpt2").join("model.safetensors"));

    // `GPT2Model.save_pretrained` (and the original openai-community checkpoints) store the
    // body without the `transformer.` prefix.
    let dir = scratch_with_config("gpt2");
    let bare: BTreeMap<_, _> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.strip_prefix("transformer.").unwrap().to_string(),
                t.clone(),
            )
        })
        .collect();
    write_tensors(&dir.path().join("model.safetensors"), &bare);
    assert_eq!(load_from(dir.path(), &cfg).unwrap(), p);

    // A tied model whose file nonetheless holds lm_head.weight (and unused extras) is fine.
    let dir = scratch_with_config("gpt2");
    let mut extra = tensors.clone();
    extra.insert(
        "lm_head.weight".into(),
        tensors["transformer.wte.weight"].clone(),
    );
    extra.insert(
        "transformer.h.0.attn.masked_bias".into(),
        RawTensor {
            dtype: Dtype::U8,
            shape: vec![1],
            bytes: vec![0],
        },
    );
    write_tensors(&dir.path().join("model.safetensors"), &extra);
    assert_eq!(load_from(dir.path(), &cfg).unwrap(), p);
}

/// A deterministic, non-trivial parameter buffer (no RNG dependency).
fn pattern(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 0.2)
        .collect()
}

#[test]
fn score_head_models_save_and_load() {
    for (m, arch, body) in [
        ("llama", "LlamaForSequenceClassification", "model."),
        ("qwen2", "Qwen2ForSequenceClassification", "model."),
        ("gpt2", "GPT2ForSequenceClassification", "transformer."),
    ] {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(m).join("config.json")).unwrap())
                .unwrap();
        v["architectures"] = serde_json::json!([arch]);
        let cfg = Config::from_json(&v).unwrap();
        assert_eq!(cfg.head, Head::Score);
        let layout = Layout::new(&cfg);
        let p = pattern(layout.total);
        let out = tempfile::tempdir().unwrap();
        save_model(out.path(), &cfg, &layout, &p, SaveDtype::F32).unwrap();

        let header = read_header(&out.path().join("model.safetensors")).unwrap();
        let c = cfg.hidden_size;
        assert_eq!(header["score.weight"].1, vec![1, c], "{m}");
        assert!(!header.contains_key("lm_head.weight"), "{m}");
        // Everything but the head keeps the causal-LM names.
        let orig = read_header(&fixture(m).join("model.safetensors")).unwrap();
        let body_orig: Vec<_> = orig.keys().filter(|k| k.starts_with(body)).collect();
        let body_saved: Vec<_> = header.keys().filter(|k| k.starts_with(body)).collect();
        assert_eq!(body_orig, body_saved, "{m}");
        assert_eq!(header.len(), body_saved.len() + 1, "{m}");

        let cfg2 = Config::load(out.path()).unwrap();
        assert_eq!(cfg2.head, Head::Score);
        assert_eq!(load_from(out.path(), &cfg2).unwrap(), p, "{m}");
    }
}

#[test]
fn missing_tensor_is_named() {
    let (cfg, _, _) = load("llama");
    let dir = scratch_with_config("llama");
    let mut t = read_tensors(&fixture("llama").join("model.safetensors"));
    t.remove("model.layers.1.mlp.up_proj.weight");
    write_tensors(&dir.path().join("model.safetensors"), &t);
    let e = load_from(dir.path(), &cfg).unwrap_err();
    match &e {
        Error::MissingTensor { name, path } => {
            assert_eq!(name, "model.layers.1.mlp.up_proj.weight");
            assert!(path.ends_with("model.safetensors"));
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
        "{msg}"
    );
    assert!(msg.contains("model.safetensors"), "{msg}");

    // An untied model without lm_head.weight is missing its head.
    t = read_tensors(&fixture("llama").join("model.safetensors"));
    t.remove("lm_head.weight");
    write_tensors(&dir.path().join("model.safetensors"), &t);
    let e = load_from(dir.path(), &cfg).unwrap_err();
    assert!(
        matches!(&e, Error::MissingTensor { name, .. } if name == "lm_head.weight"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_says_expected_and_found() {
    let (cfg, _, _) = load("qwen2");
    let dir = scratch_with_config("qwen2");
    let mut t = read_tensors(&fixture("qwen2").join("model.safetensors"));
    // Same element count, transposed: only the shape check can catch it.
    let k = t["model.layers.0.self_attn.k_proj.weight"].f32s();
    t.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        RawTensor::from_f32(vec![64, 32], &k),
    );
    write_tensors(&dir.path().join("model.safetensors"), &t);
    let e = load_from(dir.path(), &cfg).unwrap_err();
    match &e {
        Error::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "model.layers.0.self_attn.k_proj.weight");
            assert_eq!(expected, &vec![32, 64]);
            assert_eq!(found, &vec![64, 32]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("shape [64, 32], expected [32, 64]"), "{msg}");
}

#[test]
fn corrupt_files_give_the_safetensors_error() {
    let (cfg, _, _) = load("gpt2");
    let orig = std::fs::read(fixture("gpt2").join("model.safetensors")).unwrap();
    let cases: [(&str, Vec<u8>); 4] = [
        ("truncated", orig[..orig.len() / 2].to_vec()),
        (
            "garbage",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
                .collect(),
        ),
        ("shorter than the length prefix", vec![1, 2, 3]),
        ("empty", vec![]),
    ];
    for (what, bytes) in cases {
        let dir = scratch_with_config("gpt2");
        std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
        let e = load_from(dir.path(), &cfg).unwrap_err();
        assert!(matches!(e, Error::Safetensors { .. }), "{what}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("corrupt or truncated safetensors file"),
            "{what}: {msg}"
        );
        assert!(msg.contains("model.safetensors"), "{what}: {msg}");
    }
}

#[test]
fn unsupported_dtype_and_missing_weights_are_clear() {
    let (cfg, _, _) = load("llama");
    let dir = scratch_with_config("llama");
    let e = load_from(dir.path(), &cfg).unwrap_err();
    match &e {
        Error::Io { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
        other => panic!("expected Io NotFound, got {other:?}"),
    }
    assert!(e.to_string().contains("no model.safetensors"), "{e}");

    let mut t = read_tensors(&fixture("llama").join("model.safetensors"));
    let norm = t["model.norm.weight"].clone();
    t.insert(
        "model.norm.weight".into(),
        RawTensor {
            dtype: Dtype::F64,
            shape: norm.shape,
            bytes: vec![0; 64 * 8],
        },
    );
    write_tensors(&dir.path().join("model.safetensors"), &t);
    let e = load_from(dir.path(), &cfg).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    assert!(
        e.to_string().contains("model.norm.weight") && e.to_string().contains("F64"),
        "{e}"
    );
}

#[test]
fn unsupported_architectures_are_refused() {
    let edit = |m: &str, f: &dyn Fn(&mut serde_json::Value)| -> Error {
        let dir = tempfile::tempdir().unwrap();
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(m).join("config.json")).unwrap())
                .unwrap();
        f(&mut v);
        std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
        Config::load(dir.path()).unwrap_err()
    };
    let e = edit("llama", &|v| v["model_type"] = "mamba".into());
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    assert!(e.to_string().contains("mamba"), "{e}");
    let e = edit(
        "qwen2",
        &|v| {
            v["rope_parameters"] =
                serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
        },
    );
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    assert!(e.to_string().contains("yarn"), "{e}");
}

#[test]
fn tokenizer_round_trips_and_knows_its_special_tokens() {
    for m in MODELS {
        let tok = Tokenizer::load(&fixture(m)).unwrap();
        assert_eq!(tok.vocab_size(), 512);
        assert_eq!(tok.eos_id(), Some(0));
        assert_eq!(tok.bos_id(), Some(0));
        assert_eq!(tok.pad_id(), Some(1));
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
        assert_eq!(tok.token_to_id("<|pad|>"), Some(1));
        assert_eq!(tok.token_to_id("no such token at all"), None);

        for text in [
            "Hello world, this is a test.",
            "  spaces\tand\nnewlines ",
            "héllo 世界 🙂",
            "",
        ] {
            let ids = tok.encode(text, false).unwrap();
            assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{m}");
        }
        // Special tokens in the text are recognised as such, and skipped on request.
        let ids = tok.encode("The end.<|endoftext|>", false).unwrap();
        assert_eq!(ids.last(), Some(&0));
        assert_eq!(tok.decode(&ids, true).unwrap(), "The end.");
        assert_eq!(tok.decode(&ids, false).unwrap(), "The end.<|endoftext|>");

        let e = tok.decode(&[5, 512], false).unwrap_err();
        assert!(
            matches!(e, Error::Tokenizer(_)) && e.to_string().contains("512"),
            "{e}"
        );
    }
}

#[test]
fn tokenizer_files_are_copied_and_errors_are_typed() {
    let out = tempfile::tempdir().unwrap();
    copy_tokenizer_files(&fixture("llama"), out.path()).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.path().join(f)).unwrap(),
            std::fs::read(fixture("llama").join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!out.path().join("special_tokens_map.json").exists());
    let tok = Tokenizer::load(out.path()).unwrap();
    assert_eq!(tok.pad_id(), Some(1));

    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Tokenizer::load(empty.path()).unwrap_err(),
        Error::Io { .. }
    ));

    std::fs::write(empty.path().join("tokenizer.json"), "{not json").unwrap();
    let e = Tokenizer::load(empty.path()).unwrap_err();
    assert!(
        matches!(e, Error::Tokenizer(_)) && e.to_string().contains("tokenizer.json"),
        "{e}"
    );

    // A special token the vocabulary lacks is refused rather than silently dropped.
    std::fs::copy(
        fixture("llama").join("tokenizer.json"),
        empty.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        empty.path().join("tokenizer_config.json"),
        r#"{"eos_token": "</s>"}"#,
    )
    .unwrap();
    let e = Tokenizer::load(empty.path()).unwrap_err();
    assert!(e.to_string().contains("eos_token `</s>`"), "{e}");

    // Object-spelled tokens (older files) and a chat template kept verbatim.
    let cfg = r#"{"eos_token": {"content": "<|endoftext|>", "special": true}, "pad_token": null,
                  "chat_template": "{{ messages }}"}"#;
    std::fs::write(empty.path().join("tokenizer_config.json"), cfg).unwrap();
    let tok = Tokenizer::load(empty.path()).unwrap();
    assert_eq!((tok.eos_id(), tok.pad_id()), (Some(0), None));
    assert_eq!(tok.chat_template.as_deref(), Some("{{ messages }}"));
}
