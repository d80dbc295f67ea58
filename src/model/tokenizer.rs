//! The tokenizer of a Hugging Face model directory: `tokenizer.json` through the `tokenizers`
//! crate, plus the special tokens and chat template of `tokenizer_config.json`.

use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// A model directory's tokenizer with its special-token ids resolved.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    /// The Jinja chat template, kept verbatim for whoever renders chats.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json` and, when present, `tokenizer_config.json` (BOS/EOS/PAD token
    /// strings, `chat_template`) and `chat_template.jinja` (where transformers >= 4.43 keeps
    /// the template) from a model directory.
    pub fn load(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut tok = Tokenizer {
            inner,
            bos: None,
            eos: None,
            pad: None,
            chat_template: None,
        };

        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
                path: cfg_path.clone(),
                msg: e.to_string(),
            })?;
            let id_of = |key: &str| -> Result<Option<u32>> {
                let Some(s) = token_string(&v[key]) else {
                    return Ok(None);
                };
                // A named special token the vocabulary lacks would silently break EOS
                // detection or padding; refuse it.
                tok.inner.token_to_id(s).map(Some).ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "{}: {key} `{s}` is not in the vocabulary of tokenizer.json",
                        cfg_path.display()
                    ))
                })
            };
            tok.bos = id_of("bos_token")?;
            tok.eos = id_of("eos_token")?;
            tok.pad = id_of("pad_token")?;
            tok.chat_template = chat_template(&v["chat_template"]);
        }
        if tok.chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                let t = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
                tok.chat_template = Some(t);
            }
        }
        Ok(tok)
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor
    /// (e.g. a BOS prefix), as transformers' `encode` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` drops special tokens such as EOS and PAD. An id outside
    /// the vocabulary is an error rather than silently dropped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(Error::Tokenizer(format!(
                "cannot decode token id {id}: the vocabulary has {n} tokens"
            )));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Vocabulary size including added tokens: the number of distinct ids the tokenizer can
    /// produce (the model's embedding may be larger, never smaller).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of `bos_token` from `tokenizer_config.json`.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Id of `eos_token` from `tokenizer_config.json`.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Id of `pad_token` from `tokenizer_config.json`.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Id of a token string (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The wrapped `tokenizers` tokenizer, for what this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// A special token as `tokenizer_config.json` spells it: a string, or (older files) an
/// AddedToken object with `content`; `null` means none.
fn token_string(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which `default` is the
/// one transformers applies when no name is given.
fn chat_template(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a
            .iter()
            .find(|t| t["name"].as_str() == Some("default"))
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}
