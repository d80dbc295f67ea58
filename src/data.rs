//! JSONL datasets with TRL's field names, and the batching every trainer shares.
//!
//! Readers: SFT examples (`{"prompt","completion"}` with optional per-token `"weights"`, or
//! conversational `{"messages": [...]}` rendered with the tokenizer's chat template),
//! prompts (`{"prompt"}` with an optional `"answer"`) and preference pairs
//! (`{"prompt","chosen","rejected"}`). Every error names its file and line.
//!
//! Batching: right-padded [`Batch`]es with per-position loss weights, a deterministic shuffle
//! per epoch, and a [`DataPosition`] that a checkpoint saves so a resumed run sees exactly the
//! batches the interrupted one would have.

use crate::model::tokenizer::Tokenizer;
use crate::model::{Batch, Config, Pad};
use crate::rng::Rng;
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// One non-blank line of a JSONL file: its 1-based line number and its JSON object.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// 1-based line number in the file.
    pub line: usize,
    /// The line's JSON object.
    pub fields: Map<String, Value>,
}

/// Reads a JSONL file of objects. Blank lines are skipped (a trailing newline is common); a
/// line that is not a JSON object is an error naming the file and line, and a file with no
/// object at all is [`Error::EmptyData`].
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| data_err(path, i + 1, msg);
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(fields)) => records.push(Record {
                line: i + 1,
                fields,
            }),
            Ok(other) => {
                return Err(bad(format!(
                    "expected a JSON object, found {}",
                    kind(&other)
                )))
            }
            Err(e) => return Err(bad(format!("invalid JSON: {e}"))),
        }
    }
    if records.is_empty() {
        return Err(Error::EmptyData {
            path: path.to_path_buf(),
        });
    }
    Ok(records)
}

fn data_err(path: &Path, line: usize, msg: String) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        msg,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A required string field, with the errors a user can act on.
fn string_field(path: &Path, rec: &Record, name: &str) -> Result<String> {
    match rec.fields.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        None => Err(data_err(path, rec.line, format!("missing \"{name}\""))),
        Some(v) => Err(data_err(
            path,
            rec.line,
            format!("\"{name}\" must be a string, found {}", kind(v)),
        )),
    }
}

/// An optional string field (`null` counts as absent).
fn optional_string(path: &Path, rec: &Record, name: &str) -> Result<Option<String>> {
    match rec.fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => string_field(path, rec, name).map(Some),
    }
}

/// A prompt for generation-based training (PPO, GRPO), with the reference answer rule rewards
/// compare against.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptExample {
    /// Source line, for messages.
    pub line: usize,
    pub prompt: String,
    /// The reference answer, when the line has one.
    pub answer: Option<String>,
}

/// Reads `{"prompt", "answer"?}` lines.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptExample>> {
    read_jsonl(path)?
        .iter()
        .map(|rec| {
            Ok(PromptExample {
                line: rec.line,
                prompt: string_field(path, rec, "prompt")?,
                answer: optional_string(path, rec, "answer")?,
            })
        })
        .collect()
}

/// A tokenised prompt for RL training (PPO, GRPO): the text reward sources see, the ids the
/// policy is prompted with, the reference answer, and the labelled completion (S-GRPO's
/// supervised target) when the line has one.
#[derive(Clone, Debug, PartialEq)]
pub struct RlPrompt {
    /// Source line, for messages.
    pub line: usize,
    /// The prompt as the policy sees it (rendered with the chat template when conversational).
    pub text: String,
    /// Its token ids.
    pub ids: Vec<u32>,
    /// The reference answer, when the line has one.
    pub answer: Option<String>,
    /// The labelled completion's token ids (EOS appended to a plain-text one, as [`load_sft`]
    /// does), when the line has one.
    pub completion: Option<Vec<u32>>,
}

/// Reads and tokenises RL prompts: `{"prompt", "answer"?, "completion"?}` lines.
///
/// - A string `prompt` is encoded with the tokenizer's special tokens; a string `completion`
///   without, then EOS is appended, exactly as [`load_sft`] tokenises `{"prompt","completion"}`
///   (so S-GRPO's supervised term sees what SFT saw).
/// - A TRL conversational `prompt` (a list of `{"role","content"}` messages) is rendered with
///   the chat template and `add_generation_prompt`, and encoded without special tokens (the
///   template writes them); its `completion`, if any, must be a message list too, and is what
///   the template renders after the prompt (no EOS appended: the template ends the turn).
///
/// A prompt that encodes to nothing is an error naming its line; lengths are checked by the
/// caller, who knows the generation budget.
pub fn load_rl_prompts(path: &Path, tok: &Tokenizer, eos: u32) -> Result<Vec<RlPrompt>> {
    let records = read_jsonl(path)?;
    let mut template = None;
    records
        .iter()
        .map(|rec| {
            let bad = |msg: String| data_err(path, rec.line, msg);
            let completion = rec.fields.get("completion").filter(|v| !v.is_null());
            let (text, ids, completion) = match rec.fields.get("prompt") {
                Some(Value::Array(_)) => {
                    if template.is_none() {
                        template = Some(
                            ChatTemplate::from_tokenizer(tok).map_err(|e| bad(e.to_string()))?,
                        );
                    }
                    let t = template.as_ref().expect("set just above");
                    let prompt = &rec.fields["prompt"];
                    let text = t.render(prompt, true).map_err(|e| bad(e.to_string()))?;
                    let completion = match completion {
                        None => None,
                        Some(Value::Array(c)) => {
                            let mut conv = prompt.as_array().expect("matched an array").clone();
                            conv.extend(c.iter().cloned());
                            let (p, c) = split_chat(t, &Value::Array(conv)).map_err(bad)?;
                            if p != text {
                                return Err(bad(
                                    "\"completion\" must be the assistant's reply that follows \
                                     the \"prompt\" messages"
                                        .into(),
                                ));
                            }
                            Some(tok.encode(&c, false)?)
                        }
                        Some(v) => {
                            return Err(bad(format!(
                                "\"completion\" must be a list of messages when \"prompt\" is \
                                 one, found {}",
                                kind(v)
                            )))
                        }
                    };
                    let ids = tok.encode(&text, false)?;
                    (text, ids, completion)
                }
                _ => {
                    let text = string_field(path, rec, "prompt")?;
                    let completion = match completion {
                        None => None,
                        Some(_) => {
                            let mut ids =
                                tok.encode(&string_field(path, rec, "completion")?, false)?;
                            ids.push(eos);
                            Some(ids)
                        }
                    };
                    let ids = tok.encode(&text, true)?;
                    (text, ids, completion)
                }
            };
            if ids.is_empty() {
                return Err(bad(
                    "the prompt encodes to no tokens: nothing to generate from".into(),
                ));
            }
            if completion.as_ref().is_some_and(Vec::is_empty) {
                return Err(bad(
                    "the completion encodes to no tokens: nothing to learn".into()
                ));
            }
            Ok(RlPrompt {
                line: rec.line,
                text,
                ids,
                answer: optional_string(path, rec, "answer")?,
                completion,
            })
        })
        .collect()
}

/// A preference pair (reward model, DPO): two completions of one prompt, `chosen` preferred.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceExample {
    /// Source line, for messages.
    pub line: usize,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// Reads `{"prompt", "chosen", "rejected"}` lines.
pub fn read_preferences(path: &Path) -> Result<Vec<PreferenceExample>> {
    read_jsonl(path)?
        .iter()
        .map(|rec| {
            Ok(PreferenceExample {
                line: rec.line,
                prompt: string_field(path, rec, "prompt")?,
                chosen: string_field(path, rec, "chosen")?,
                rejected: string_field(path, rec, "rejected")?,
            })
        })
        .collect()
}

/// A Hugging Face chat template, compiled once, rendered with HF's semantics: `messages`,
/// `add_generation_prompt`, and the tokenizer's `bos_token` / `eos_token` strings; blocks are
/// trimmed as transformers configures Jinja (`trim_blocks`, `lstrip_blocks`), and
/// `raise_exception` is defined.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: Option<String>,
    eos: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl ChatTemplate {
    /// The tokenizer's template; a tokenizer without one is an error, since guessing a chat
    /// format would train the model on a format it will never be prompted with.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<ChatTemplate> {
        let source = tok.chat_template.clone().ok_or_else(|| {
            Error::Tokenizer(
                "the tokenizer has no chat template (`chat_template` in tokenizer_config.json, or \
                 chat_template.jinja): conversational data cannot be rendered"
                    .into(),
            )
        })?;
        let tmpl_err = |e: minijinja::Error| Error::Tokenizer(format!("chat template: {e:#}"));
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(tmpl_err)?;
        env.set_syntax(syntax);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.set_unknown_method_callback(python_methods);
        env.add_template_owned("chat", source).map_err(tmpl_err)?;
        let name = |id: Option<u32>| id.and_then(|id| tok.inner().id_to_token(id));
        Ok(ChatTemplate {
            env,
            bos: name(tok.bos_id()),
            eos: name(tok.eos_id()),
        })
    }

    /// Renders `messages` (a JSON array of `{"role", "content"}` objects). Special tokens the
    /// tokenizer lacks are left undefined, as transformers leaves them.
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let mut ctx = std::collections::BTreeMap::new();
        ctx.insert("messages", to_jinja(messages));
        ctx.insert("add_generation_prompt", add_generation_prompt.into());
        if let Some(b) = &self.bos {
            ctx.insert("bos_token", b.as_str().into());
        }
        if let Some(e) = &self.eos {
            ctx.insert("eos_token", e.as_str().into());
        }
        let tmpl = self
            .env
            .get_template("chat")
            .expect("the template was added in from_tokenizer");
        tmpl.render(ctx)
            .map_err(|e| Error::Tokenizer(format!("rendering the chat template: {e:#}")))
    }
}

fn to_jinja(v: &Value) -> minijinja::Value {
    use minijinja::Value as J;
    match v {
        Value::Null => J::from(()),
        Value::Bool(b) => J::from(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => J::from(i),
            None => J::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => J::from(s.as_str()),
        Value::Array(a) => J::from(a.iter().map(to_jinja).collect::<Vec<_>>()),
        Value::Object(o) => J::from(
            o.iter()
                .map(|(k, v)| (k.clone(), to_jinja(v)))
                .collect::<std::collections::BTreeMap<_, _>>(),
        ),
    }
}

/// The few Python methods HF chat templates call on strings and dicts (Jinja runs in Python
/// there, so templates use `content.strip()`, `content.startswith(...)`, `message.get(...)`).
fn python_methods(
    _state: &mut minijinja::State,
    value: &minijinja::Value,
    method: &str,
    args: &[minijinja::Value],
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    use minijinja::value::{from_args, ValueKind};
    use minijinja::{Error as JErr, ErrorKind, Value as J};
    if let Some(s) = value.as_str() {
        let strip_set = |args: &[J]| -> std::result::Result<Option<String>, JErr> {
            let (chars,): (Option<String>,) = from_args(args)?;
            Ok(chars)
        };
        let in_set = |set: &Option<String>, c: char| match set {
            Some(set) => set.contains(c),
            None => c.is_whitespace(),
        };
        return match method {
            "strip" => {
                let set = strip_set(args)?;
                Ok(J::from(s.trim_matches(|c| in_set(&set, c))))
            }
            "lstrip" => {
                let set = strip_set(args)?;
                Ok(J::from(s.trim_start_matches(|c| in_set(&set, c))))
            }
            "rstrip" => {
                let set = strip_set(args)?;
                Ok(J::from(s.trim_end_matches(|c| in_set(&set, c))))
            }
            "startswith" => {
                let (p,): (String,) = from_args(args)?;
                Ok(J::from(s.starts_with(&p)))
            }
            "endswith" => {
                let (p,): (String,) = from_args(args)?;
                Ok(J::from(s.ends_with(&p)))
            }
            _ => Err(JErr::from(ErrorKind::UnknownMethod)),
        };
    }
    if value.kind() == ValueKind::Map && method == "get" {
        let (key, default): (J, Option<J>) = from_args(args)?;
        let v = value.get_item(&key)?;
        return Ok(if v.is_undefined() {
            default.unwrap_or(J::from(()))
        } else {
            v
        });
    }
    Err(JErr::from(ErrorKind::UnknownMethod))
}

/// A tokenised SFT sequence: prompt then completion, and the loss weight of each next-token
/// prediction (`weights[j]` weighs predicting `ids[j + 1]` from position `j`, the convention of
/// [`crate::algo::sft::nll_loss_and_grad`]): 0 over the prompt and on the last position, the
/// completion token's weight elsewhere.
#[derive(Clone, Debug, PartialEq)]
pub struct SftExample {
    /// Line of the source file, for messages about this example.
    pub line: usize,
    /// Prompt tokens, then completion tokens.
    pub ids: Vec<u32>,
    /// One loss weight per position of `ids`.
    pub weights: Vec<f32>,
    /// Number of prompt tokens at the start of `ids`.
    pub prompt_len: usize,
}

/// How SFT text becomes tokens.
#[derive(Clone, Copy, Debug)]
pub struct SftTokenizing<'a> {
    /// The model's tokenizer (and chat template).
    pub tok: &'a Tokenizer,
    /// Appended to every `{"prompt","completion"}` completion so the model learns to stop.
    pub eos: u32,
    /// Longest allowed sequence (the model's context, or less).
    pub max_len: usize,
}

/// Reads and tokenises an SFT file.
///
/// - `{"prompt", "completion"}`: the prompt is encoded with the tokenizer's special tokens
///   (a BOS where it adds one), the completion without, then EOS is appended. Prompt and
///   completion are encoded separately, so the boundary between them is exact.
/// - `"weights"` (optional, with `prompt`/`completion`): one finite weight per completion
///   token, for token-weighted SFT (negative weights push probability away). Either one per
///   completion token, the appended EOS taking the last one's weight, or one more, for the EOS.
///   Weights that are all zero are refused: such an example teaches nothing.
/// - `{"messages": [{"role", "content"}, ...]}`: rendered with the chat template; the loss is
///   on the **last assistant message only** (everything before it is the prompt, rendered
///   with `add_generation_prompt`). No EOS is appended: the template ends the turn itself.
///
/// A sequence longer than `max_len` is an error, never silently truncated.
pub fn load_sft(path: &Path, how: SftTokenizing<'_>) -> Result<Vec<SftExample>> {
    let records = read_jsonl(path)?;
    let mut template = None;
    records
        .iter()
        .map(|rec| {
            let bad = |msg: String| data_err(path, rec.line, msg);
            let (prompt, completion, given) = if let Some(messages) = rec.fields.get("messages") {
                if rec.fields.contains_key("weights") {
                    return Err(bad("\"weights\" applies to prompt/completion examples, not \"messages\"".into()));
                }
                if template.is_none() {
                    template = Some(ChatTemplate::from_tokenizer(how.tok).map_err(|e| bad(e.to_string()))?);
                }
                let t = template.as_ref().expect("set just above");
                let (p, c) = split_chat(t, messages).map_err(bad)?;
                (how.tok.encode(&p, false)?, how.tok.encode(&c, false)?, None)
            } else {
                let p = string_field(path, rec, "prompt")?;
                let c = string_field(path, rec, "completion")?;
                let mut c_ids = how.tok.encode(&c, false)?;
                let given = weights_field(rec).map_err(bad)?;
                let n = c_ids.len();
                c_ids.push(how.eos);
                let w = match given {
                    None => None,
                    Some(w) if w.len() == n + 1 => Some(w),
                    Some(mut w) if w.len() == n && n > 0 => {
                        w.push(w[n - 1]);
                        Some(w)
                    }
                    Some(w) => {
                        return Err(bad(format!(
                            "\"weights\" has {} values; the completion has {n} tokens ({} with the EOS \
                             appended)",
                            w.len(),
                            n + 1
                        )))
                    }
                };
                (how.tok.encode(&p, true)?, c_ids, w)
            };
            if prompt.is_empty() {
                return Err(bad("the prompt encodes to no tokens: nothing to condition the completion on".into()));
            }
            if completion.is_empty() {
                return Err(bad("the completion encodes to no tokens: nothing to learn".into()));
            }
            let len = prompt.len() + completion.len();
            if len > how.max_len {
                let what = if prompt.len() >= how.max_len {
                    format!("the prompt alone is {} tokens", prompt.len())
                } else {
                    format!("prompt + completion is {len} tokens")
                };
                return Err(bad(format!(
                    "{what}, longer than the maximum of {} (the model's context, or --max-len)",
                    how.max_len
                )));
            }
            let mut weights = vec![0.0; len];
            match given {
                Some(w) => weights[prompt.len() - 1..len - 1].copy_from_slice(&w),
                None => weights[prompt.len() - 1..len - 1].fill(1.0),
            }
            if weights.iter().all(|&w| w == 0.0) {
                return Err(bad("\"weights\" are all zero: the example teaches nothing".into()));
            }
            let prompt_len = prompt.len();
            let mut ids = prompt;
            ids.extend(completion);
            Ok(SftExample { line: rec.line, ids, weights, prompt_len })
        })
        .collect()
}

/// The optional `"weights"` array: finite numbers.
fn weights_field(rec: &Record) -> std::result::Result<Option<Vec<f32>>, String> {
    let Some(v) = rec.fields.get("weights") else {
        return Ok(None);
    };
    let arr = v
        .as_array()
        .ok_or_else(|| format!("\"weights\" must be an array of numbers, found {}", kind(v)))?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| match x.as_f64() {
            Some(f) if (f as f32).is_finite() => Ok(f as f32),
            _ => Err(format!(
                "\"weights\"[{i}] must be a finite number, found {x}"
            )),
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Some)
}

/// Splits a conversation into prompt text (everything before the last message, with the
/// generation prompt) and completion text (the rest of the full rendering).
fn split_chat(t: &ChatTemplate, messages: &Value) -> std::result::Result<(String, String), String> {
    let msgs = messages
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            "\"messages\" must be a non-empty array of {\"role\", \"content\"} objects".to_string()
        })?;
    for (i, m) in msgs.iter().enumerate() {
        for key in ["role", "content"] {
            if m.get(key).and_then(Value::as_str).is_none() {
                return Err(format!("\"messages\"[{i}] has no string \"{key}\""));
            }
        }
    }
    let last = msgs.last().expect("non-empty");
    if last["role"] != "assistant" {
        return Err(
            "the last message must be the assistant's: it is the completion trained on".into(),
        );
    }
    let head = Value::Array(msgs[..msgs.len() - 1].to_vec());
    let prompt = t.render(&head, true).map_err(|e| e.to_string())?;
    let full = t.render(messages, false).map_err(|e| e.to_string())?;
    match full.strip_prefix(&prompt) {
        Some(c) => Ok((prompt, c.to_string())),
        None => Err(
            "the chat template renders the conversation without its last message as something \
                     other than a prefix of the whole, so the completion cannot be told apart"
                .into(),
        ),
    }
}

/// The right-padded batch of `examples[idx]` and its loss weights (0 on padding).
pub fn sft_batch(examples: &[SftExample], idx: &[usize], pad_id: u32) -> (Batch, Vec<f32>) {
    let rows: Vec<Vec<u32>> = idx.iter().map(|&i| examples[i].ids.clone()).collect();
    let batch = Batch::new(&rows, pad_id, Pad::Right);
    let mut weights = vec![0.0; batch.n()];
    for (r, &i) in idx.iter().enumerate() {
        let w = &examples[i].weights;
        weights[r * batch.t..r * batch.t + w.len()].copy_from_slice(w);
    }
    (batch, weights)
}

/// The token appended to completions (EOS) and the one padding batches: the tokenizer's, else
/// the model configuration's; without a pad token, EOS pads (GPT-2's convention). Padding is
/// masked, so its id only has to be in range.
pub fn special_ids(tok: &Tokenizer, cfg: &Config) -> Result<(u32, u32)> {
    let eos = tok
        .eos_id()
        .or(cfg.eos_token_ids.first().copied())
        .ok_or_else(|| {
            Error::Tokenizer(
                "no EOS token (eos_token in tokenizer_config.json or eos_token_id in config.json)"
                    .into(),
            )
        })?;
    Ok((eos, tok.pad_id().or(cfg.pad_token_id).unwrap_or(eos)))
}

/// A tokenised preference pair (reward model, DPO): the prompt followed by each completion,
/// tokenised as [`load_sft`] tokenises an SFT example, so a model sees the same sequences in
/// every stage of a pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    /// Line of the source file, for messages about this pair.
    pub line: usize,
    /// Prompt tokens, then the chosen completion's.
    pub chosen: Vec<u32>,
    /// Prompt tokens, then the rejected completion's.
    pub rejected: Vec<u32>,
    /// Number of prompt tokens at the start of both.
    pub prompt_len: usize,
    /// The optional `"margin"` field: how far the chosen reward should exceed the rejected one
    /// in the Bradley-Terry loss (TRL's `margin` column).
    pub margin: Option<f32>,
}

/// Reads and tokenises a preference file.
///
/// - Standard format `{"prompt", "chosen", "rejected"}` (strings): the prompt is encoded with
///   the tokenizer's special tokens, each completion without, and EOS is appended to each
///   completion, as in [`load_sft`] (and as TRL's DPO and reward trainers do).
/// - Conversational format (TRL's): `"chosen"` and `"rejected"` are message lists, each one
///   assistant message after an explicit `"prompt"` message list, or whole conversations that
///   differ only in their last message (implicit prompt). Rendered with the chat template;
///   the completion is the last message, and no EOS is appended (the template ends the turn).
/// - `"margin"` (optional): a finite number, see [`PreferencePair::margin`].
///
/// A sequence longer than `max_len` is an error, never silently truncated.
pub fn load_preferences(path: &Path, how: SftTokenizing<'_>) -> Result<Vec<PreferencePair>> {
    let records = read_jsonl(path)?;
    let mut template = None;
    records
        .iter()
        .map(|rec| {
            let bad = |msg: String| data_err(path, rec.line, msg);
            let present = |name: &str| {
                rec.fields
                    .get(name)
                    .filter(|v| !v.is_null())
                    .ok_or_else(|| bad(format!("missing \"{name}\"")))
            };
            let (chosen, rejected) = (present("chosen")?, present("rejected")?);
            let (prompt, chosen, rejected) = if chosen.is_string() || rejected.is_string() {
                let p = string_field(path, rec, "prompt")?;
                let c = string_field(path, rec, "chosen")?;
                let r = string_field(path, rec, "rejected")?;
                let completion = |text: &str| -> Result<Vec<u32>> {
                    let mut ids = how.tok.encode(text, false)?;
                    ids.push(how.eos);
                    Ok(ids)
                };
                (how.tok.encode(&p, true)?, completion(&c)?, completion(&r)?)
            } else {
                if template.is_none() {
                    template = Some(
                        ChatTemplate::from_tokenizer(how.tok).map_err(|e| bad(e.to_string()))?,
                    );
                }
                let t = template.as_ref().expect("set just above");
                let prompt = rec.fields.get("prompt");
                let split = |v: &Value, name: &str| {
                    preference_conversation(prompt, v, name).and_then(|conv| split_chat(t, &conv))
                };
                let (pc, c) = split(chosen, "chosen").map_err(bad)?;
                let (pr, r) = split(rejected, "rejected").map_err(bad)?;
                if pc != pr {
                    return Err(bad(
                        "\"chosen\" and \"rejected\" render different prompts: the two \
                         conversations must differ only in their last message"
                            .into(),
                    ));
                }
                (
                    how.tok.encode(&pc, false)?,
                    how.tok.encode(&c, false)?,
                    how.tok.encode(&r, false)?,
                )
            };
            if prompt.is_empty() {
                return Err(bad(
                    "the prompt encodes to no tokens: nothing to condition the completions on"
                        .into(),
                ));
            }
            for (name, c) in [("chosen", &chosen), ("rejected", &rejected)] {
                if c.is_empty() {
                    return Err(bad(format!("the {name} completion encodes to no tokens")));
                }
                let len = prompt.len() + c.len();
                if len > how.max_len {
                    return Err(bad(format!(
                        "prompt + {name} is {len} tokens, longer than the maximum of {} (the \
                         model's context, or --max-len)",
                        how.max_len
                    )));
                }
            }
            let margin = match rec.fields.get("margin") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_f64() {
                    Some(m) if (m as f32).is_finite() => Some(m as f32),
                    _ => {
                        return Err(bad(format!(
                            "\"margin\" must be a finite number, found {v}"
                        )))
                    }
                },
            };
            let row = |completion: Vec<u32>| {
                let mut ids = prompt.clone();
                ids.extend(completion);
                ids
            };
            Ok(PreferencePair {
                line: rec.line,
                chosen: row(chosen),
                rejected: row(rejected),
                prompt_len: prompt.len(),
                margin,
            })
        })
        .collect()
}

/// The conversation whose last message is `completion`'s: the explicit `prompt` messages then
/// the one completion message, or `completion` itself when the prompt is implicit (absent).
fn preference_conversation(
    prompt: Option<&Value>,
    completion: &Value,
    name: &str,
) -> std::result::Result<Value, String> {
    let msgs = completion.as_array().ok_or_else(|| {
        format!(
            "\"{name}\" must be a string or a list of messages, found {}",
            kind(completion)
        )
    })?;
    match prompt {
        None | Some(Value::Null) => Ok(completion.clone()),
        Some(Value::Array(p)) if msgs.len() == 1 => {
            Ok(Value::Array(p.iter().chain(msgs).cloned().collect()))
        }
        Some(Value::Array(_)) => Err(format!(
            "\"{name}\" must hold exactly one (assistant) message after the \"prompt\" messages, \
             found {}",
            msgs.len()
        )),
        Some(other) => Err(format!(
            "\"prompt\" must be a list of messages when \"{name}\" is one, found {}",
            kind(other)
        )),
    }
}

/// The right-padded batch of the pairs `pairs[idx]`, chosen rows first then rejected rows in
/// the same order (row `k` and row `idx.len() + k` are one pair), and the completion mask:
/// 1.0 at each position whose next token is a completion token (the convention of
/// [`SftExample::weights`]), 0.0 elsewhere.
pub fn preference_batch(pairs: &[PreferencePair], idx: &[usize], pad_id: u32) -> (Batch, Vec<f32>) {
    let ids: Vec<Vec<u32>> = idx
        .iter()
        .map(|&i| pairs[i].chosen.clone())
        .chain(idx.iter().map(|&i| pairs[i].rejected.clone()))
        .collect();
    let batch = Batch::new(&ids, pad_id, Pad::Right);
    let mut mask = vec![0.0; batch.n()];
    let prompt_lens = idx.iter().chain(idx).map(|&i| pairs[i].prompt_len);
    for (r, (row, p)) in ids.iter().zip(prompt_lens).enumerate() {
        mask[r * batch.t + p - 1..r * batch.t + row.len() - 1].fill(1.0);
    }
    (batch, mask)
}

/// Where a [`Batches`] stream stands: the epoch, how many batches of it were taken, and the
/// shuffling RNG's state at the start of the epoch (from which the epoch's order is rebuilt).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    /// Epochs completed before the current one.
    pub epoch: u64,
    /// Batches of the current epoch already taken.
    pub index: usize,
    /// The shuffling RNG's state before this epoch's shuffle.
    pub rng: [u64; 4],
}

/// An endless stream of batches of example indices: each epoch is a fresh shuffle of all
/// examples cut into batches of `batch_size` (the last one may be short), epoch after epoch.
#[derive(Clone, Debug)]
pub struct Batches {
    n: usize,
    batch_size: usize,
    order: Vec<usize>,
    pos: DataPosition,
    /// The RNG after this epoch's shuffle: the next epoch shuffles with it.
    rng: Rng,
}

impl Batches {
    /// The stream from its start; the order depends on `seed` only.
    pub fn new(n: usize, batch_size: usize, seed: u64) -> Result<Batches> {
        let pos = DataPosition {
            epoch: 0,
            index: 0,
            rng: Rng::new(seed).state(),
        };
        Batches::at(n, batch_size, pos)
    }

    /// The stream at a saved position: the same batches follow as would have followed it.
    pub fn at(n: usize, batch_size: usize, pos: DataPosition) -> Result<Batches> {
        if n == 0 || batch_size == 0 {
            return Err(Error::Invalid(format!(
                "cannot batch {n} examples in batches of {batch_size}"
            )));
        }
        let per_epoch = n.div_ceil(batch_size);
        if pos.index > per_epoch {
            return Err(Error::Invalid(format!(
                "data position {} is past the {per_epoch} batches of an epoch (did the data change?)",
                pos.index
            )));
        }
        let mut rng = Rng::from_state(pos.rng);
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        Ok(Batches {
            n,
            batch_size,
            order,
            pos,
            rng,
        })
    }

    /// Batches in one epoch.
    pub fn per_epoch(&self) -> usize {
        self.n.div_ceil(self.batch_size)
    }

    /// The position to save: restoring it with [`Batches::at`] continues this stream exactly.
    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// The next batch's example indices.
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.pos.index == self.per_epoch() {
            self.pos = DataPosition {
                epoch: self.pos.epoch + 1,
                index: 0,
                rng: self.rng.state(),
            };
            self.order = (0..self.n).collect();
            self.rng.shuffle(&mut self.order);
        }
        let start = self.pos.index * self.batch_size;
        self.pos.index += 1;
        self.order[start..(start + self.batch_size).min(self.n)].to_vec()
    }
}
