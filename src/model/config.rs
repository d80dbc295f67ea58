//! Model configuration: the few switches that tell Llama, Qwen2 and GPT-2 apart, read from a
//! Hugging Face `config.json` (transformers 4 and 5 spellings).

use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Normalisation layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    LayerNorm,
    RmsNorm,
}

/// MLP activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// GELU, tanh form; MLP is `proj(gelu(fc(x)))`.
    Gelu,
    /// SwiGLU; MLP is `down(silu(gate(x)) · up(x))`.
    SwiGlu,
}

/// Position encoding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pos {
    /// Learned absolute positions (`wpe`), GPT-2.
    Learned,
    /// Rotary embedding with base `theta`, HF's rotate-half layout.
    Rope { theta: f32 },
}

/// Which head sits on top of the final norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// Language-model head over the vocabulary (`*ForCausalLM`).
    Lm,
    /// Scalar head, `score.weight` of shape [1, C] (`*ForSequenceClassification`, num_labels 1).
    Score,
}

/// Model families this engine implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Gpt2,
}

impl Family {
    /// The `model_type` string of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Gpt2 => "gpt2",
        }
    }
}

/// Everything the transformer needs to know about its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub family: Family,
    pub head: Head,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// MLP inner width (`I`; SwiGLU's gate and up are each this wide).
    pub intermediate_size: usize,
    pub max_position: usize,
    pub norm: Norm,
    pub norm_eps: f32,
    pub act: Act,
    pub pos: Pos,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// EOS ids (`eos_token_id` may be one id or a list).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl Config {
    /// Reads `config.json` from a model directory.
    pub fn load(dir: &Path) -> Result<Config> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Config::from_json(&v).map_err(|e| match e {
            Error::Invalid(msg) => Error::Invalid(format!("{}: {msg}", path.display())),
            e => e,
        })
    }

    /// Parses a `config.json` value.
    pub fn from_json(v: &Value) -> Result<Config> {
        let model_type = v["model_type"].as_str().unwrap_or("");
        let family = match model_type {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "gpt2" => Family::Gpt2,
            other => {
                return Err(Error::Unsupported(format!(
                    "model_type `{other}` (supported: llama, qwen2, gpt2)"
                )))
            }
        };
        let archs: Vec<&str> = v["architectures"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let head = if archs
            .iter()
            .any(|a| a.ends_with("ForSequenceClassification"))
        {
            let labels = v
                .get("num_labels")
                .and_then(Value::as_u64)
                .or_else(|| v["id2label"].as_object().map(|m| m.len() as u64))
                .unwrap_or(1);
            if labels != 1 {
                return Err(Error::Unsupported(format!(
                    "a sequence-classification head with {labels} labels (only 1, a scalar score)"
                )));
            }
            Head::Score
        } else if archs.is_empty()
            || archs
                .iter()
                .any(|a| a.ends_with("LMHeadModel") || a.ends_with("ForCausalLM"))
        {
            Head::Lm
        } else {
            return Err(Error::Unsupported(format!("architecture {archs:?}")));
        };
        let ids = |key: &str| -> Vec<u32> {
            match &v[key] {
                Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|x| x as u32))
                    .collect(),
                _ => vec![],
            }
        };
        let bos_token_id = ids("bos_token_id").first().copied();
        let pad_token_id = ids("pad_token_id").first().copied();
        let eos_token_ids = ids("eos_token_id");
        // transformers' Llama and Qwen2 configs default to untied embeddings.
        let tie_embeddings = v["tie_word_embeddings"].as_bool().unwrap_or(false);

        let cfg = match family {
            Family::Gpt2 => {
                let c = req(v, "n_embd")?;
                let n_head = req(v, "n_head")?;
                let act = v["activation_function"].as_str().unwrap_or("gelu_new");
                if !matches!(act, "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") {
                    return Err(Error::Unsupported(format!(
                        "activation_function `{act}` (only the tanh GELU: gelu_new, gelu_pytorch_tanh)"
                    )));
                }
                if v["scale_attn_by_inverse_layer_idx"].as_bool() == Some(true)
                    || v["reorder_and_upcast_attn"].as_bool() == Some(true)
                    || v["scale_attn_weights"].as_bool() == Some(false)
                {
                    return Err(Error::Unsupported(
                        "GPT-2 attention scaling variants (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, scale_attn_weights=false)".into(),
                    ));
                }
                Config {
                    family,
                    head,
                    vocab_size: req(v, "vocab_size")?,
                    hidden_size: c,
                    n_layer: req(v, "n_layer")?,
                    n_head,
                    n_kv_head: n_head,
                    head_dim: c / n_head,
                    intermediate_size: v["n_inner"].as_u64().map(|x| x as usize).unwrap_or(4 * c),
                    max_position: req(v, "n_positions")?,
                    norm: Norm::LayerNorm,
                    norm_eps: v["layer_norm_epsilon"].as_f64().unwrap_or(1e-5) as f32,
                    act: Act::Gelu,
                    pos: Pos::Learned,
                    qkv_bias: true,
                    o_bias: true,
                    mlp_bias: true,
                    tie_embeddings: true,
                    bos_token_id,
                    eos_token_ids,
                    pad_token_id,
                }
            }
            Family::Llama | Family::Qwen2 => {
                let c = req(v, "hidden_size")?;
                let n_head = req(v, "num_attention_heads")?;
                let act = v["hidden_act"].as_str().unwrap_or("silu");
                if act != "silu" {
                    return Err(Error::Unsupported(format!(
                        "hidden_act `{act}` (only silu)"
                    )));
                }
                let theta = rope_theta(v)?;
                let attention_bias = v["attention_bias"].as_bool().unwrap_or(false);
                let (qkv_bias, o_bias) = match family {
                    Family::Qwen2 => (true, false),
                    _ => (attention_bias, attention_bias),
                };
                if family == Family::Qwen2 && v["use_sliding_window"].as_bool() == Some(true) {
                    return Err(Error::Unsupported("Qwen2 sliding-window attention".into()));
                }
                Config {
                    family,
                    head,
                    vocab_size: req(v, "vocab_size")?,
                    hidden_size: c,
                    n_layer: req(v, "num_hidden_layers")?,
                    n_head,
                    n_kv_head: v["num_key_value_heads"]
                        .as_u64()
                        .map(|x| x as usize)
                        .unwrap_or(n_head),
                    head_dim: v["head_dim"]
                        .as_u64()
                        .map(|x| x as usize)
                        .unwrap_or(c / n_head),
                    intermediate_size: req(v, "intermediate_size")?,
                    max_position: req(v, "max_position_embeddings")?,
                    norm: Norm::RmsNorm,
                    norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
                    act: Act::SwiGlu,
                    pos: Pos::Rope { theta },
                    qkv_bias,
                    o_bias,
                    mlp_bias: v["mlp_bias"].as_bool().unwrap_or(false),
                    tie_embeddings,
                    bos_token_id,
                    eos_token_ids,
                    pad_token_id,
                }
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the dimensions fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.n_head == 0 || self.n_kv_head == 0 || !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.n_head, self.n_kv_head
            ));
        }
        if self.head_dim == 0
            || (matches!(self.pos, Pos::Rope { .. }) && !self.head_dim.is_multiple_of(2))
        {
            return bad(format!(
                "head_dim {} must be positive (and even with RoPE)",
                self.head_dim
            ));
        }
        if self.family == Family::Gpt2 && self.hidden_size != self.n_head * self.head_dim {
            return bad(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.hidden_size, self.n_head
            ));
        }
        if self.vocab_size == 0 || self.n_layer == 0 || self.hidden_size == 0 {
            return bad("vocab_size, hidden size and layer count must be positive".into());
        }
        Ok(())
    }

    /// The `config.json` value transformers writes for this configuration (transformers 5
    /// spelling; 4.x reads it too, since it ignores unknown keys and `rope_theta` is also set).
    pub fn to_json(&self) -> Value {
        use serde_json::json;
        let arch = match (self.family, self.head) {
            (Family::Gpt2, Head::Lm) => "GPT2LMHeadModel",
            (Family::Gpt2, Head::Score) => "GPT2ForSequenceClassification",
            (Family::Llama, Head::Lm) => "LlamaForCausalLM",
            (Family::Llama, Head::Score) => "LlamaForSequenceClassification",
            (Family::Qwen2, Head::Lm) => "Qwen2ForCausalLM",
            (Family::Qwen2, Head::Score) => "Qwen2ForSequenceClassification",
        };
        let mut v = match self.family {
            Family::Gpt2 => json!({
                "activation_function": "gelu_new",
                "n_embd": self.hidden_size,
                "n_head": self.n_head,
                "n_inner": self.intermediate_size,
                "n_layer": self.n_layer,
                "n_positions": self.max_position,
                "layer_norm_epsilon": self.norm_eps,
                "tie_word_embeddings": true,
            }),
            Family::Llama | Family::Qwen2 => {
                let theta = match self.pos {
                    Pos::Rope { theta } => theta,
                    Pos::Learned => 10000.0,
                };
                json!({
                    "hidden_size": self.hidden_size,
                    "num_attention_heads": self.n_head,
                    "num_key_value_heads": self.n_kv_head,
                    "head_dim": self.head_dim,
                    "intermediate_size": self.intermediate_size,
                    "num_hidden_layers": self.n_layer,
                    "max_position_embeddings": self.max_position,
                    "rms_norm_eps": self.norm_eps,
                    "hidden_act": "silu",
                    "rope_theta": theta,
                    "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
                    "attention_bias": self.family == Family::Llama && self.qkv_bias,
                    "mlp_bias": self.mlp_bias,
                    "tie_word_embeddings": self.tie_embeddings,
                })
            }
        };
        let o = v.as_object_mut().expect("object");
        o.insert("architectures".into(), json!([arch]));
        o.insert("model_type".into(), json!(self.family.model_type()));
        o.insert("vocab_size".into(), json!(self.vocab_size));
        o.insert("dtype".into(), json!("float32"));
        o.insert("torch_dtype".into(), json!("float32"));
        if self.head == Head::Score {
            o.insert("num_labels".into(), json!(1));
            o.insert("id2label".into(), json!({"0": "LABEL_0"}));
            o.insert("label2id".into(), json!({"LABEL_0": 0}));
        }
        if let Some(b) = self.bos_token_id {
            o.insert("bos_token_id".into(), json!(b));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [e] => {
                o.insert("eos_token_id".into(), json!(e));
            }
            es => {
                o.insert("eos_token_id".into(), json!(es));
            }
        }
        if let Some(p) = self.pad_token_id {
            o.insert("pad_token_id".into(), json!(p));
        }
        v
    }
}

fn req(v: &Value, key: &str) -> Result<usize> {
    v[key]
        .as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| Error::Invalid(format!("config.json lacks the integer field `{key}`")))
}

/// RoPE base from either spelling; any scaling or non-default rope type is refused, never
/// approximated.
fn rope_theta(v: &Value) -> Result<f32> {
    let params = &v["rope_parameters"];
    let scaling = &v["rope_scaling"];
    for p in [params, scaling] {
        if let Some(t) = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
        {
            if t != "default" {
                return Err(Error::Unsupported(format!(
                    "rope_type `{t}` (only the default rotary embedding is implemented)"
                )));
            }
        }
    }
    if scaling.is_object() && scaling.get("factor").is_some() {
        return Err(Error::Unsupported("rope_scaling with a factor".into()));
    }
    Ok(params
        .get("rope_theta")
        .or_else(|| v.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10000.0) as f32)
}

/// Names of the built-in configurations (`--model NAME` with `--tokenizer`).
pub const BUILTIN: &[&str] = &["gpt2-tiny", "llama-tiny", "gpt2-6l-384", "llama-16l-1024"];

impl Config {
    /// A built-in configuration by name, sized for a vocabulary of `vocab_size` tokens:
    /// `gpt2-tiny` and `llama-tiny` (2 layers, d=64, the fixtures' shapes), `gpt2-6l-384`
    /// (6 layers, d=384, 6 heads: the benchmark's GPT-2-like model) and `llama-16l-1024` (16
    /// layers, d=1024, 16 heads of 64 sharing 8 key/value heads, about 190M parameters besides
    /// the embeddings: a size that gives a GPU work to do, for `rlhf bench train --device cuda`).
    pub fn builtin(name: &str, vocab_size: usize) -> Result<Config> {
        let gpt2 = |n_layer, c, n_head| Config {
            family: Family::Gpt2,
            head: Head::Lm,
            vocab_size,
            hidden_size: c,
            n_layer,
            n_head,
            n_kv_head: n_head,
            head_dim: c / n_head,
            intermediate_size: 4 * c,
            max_position: 256,
            norm: Norm::LayerNorm,
            norm_eps: 1e-5,
            act: Act::Gelu,
            pos: Pos::Learned,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            tie_embeddings: true,
            bos_token_id: Some(0),
            eos_token_ids: vec![0],
            pad_token_id: Some(1),
        };
        let cfg = match name {
            "gpt2-tiny" => gpt2(2, 64, 4),
            "gpt2-6l-384" => gpt2(6, 384, 6),
            "llama-tiny" => Config {
                family: Family::Llama,
                n_kv_head: 2,
                head_dim: 16,
                intermediate_size: 176,
                norm: Norm::RmsNorm,
                act: Act::SwiGlu,
                pos: Pos::Rope { theta: 10000.0 },
                qkv_bias: false,
                o_bias: false,
                mlp_bias: false,
                tie_embeddings: false,
                ..gpt2(2, 64, 4)
            },
            "llama-16l-1024" => Config {
                hidden_size: 1024,
                n_layer: 16,
                n_head: 16,
                n_kv_head: 8,
                head_dim: 64,
                intermediate_size: 2816,
                max_position: 2048,
                ..Config::builtin("llama-tiny", vocab_size)?
            },
            other => {
                return Err(Error::Invalid(format!(
                    "unknown built-in model `{other}` (built-in: {})",
                    BUILTIN.join(", ")
                )))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
