//! Batched generation with a KV cache: left-padded prompts, greedy or sampled (temperature,
//! top-k, top-p), stopping at EOS ids, stop strings or a token budget, seeded.
//!
//! Each sampled token's log-prob is recorded under the model's distribution at the sampling
//! temperature, before top-k/top-p truncation, as TRL computes it: RL needs exactly that number.
//!
//! Tokens are picked by the backend ([`DecodeOps::sample_tokens`]) where the logits are: only
//! the ids and log-probs of the rows still generating come back, not (B, V) logits.

use super::tokenizer::Tokenizer;
use super::transformer::{Batch, DecodeState, Model, Pad};
use crate::backend::cuda::DeviceChoice;
use crate::backend::{DecodeOps, SampleParams};
use crate::rng::Rng;
use crate::{Error, Result};

/// How to pick tokens and when to stop.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy (log-probs are then recorded at temperature 1).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: off).
    pub top_p: f32,
    /// Token ids that end a sequence (kept in the completion, as transformers does).
    pub eos_token_ids: Vec<u32>,
    /// Strings that end a sequence once the decoded completion contains one.
    pub stop_strings: Vec<String>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            eos_token_ids: vec![],
            stop_strings: vec![],
        }
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Eos,
    StopString,
    Length,
}

/// One generated continuation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Completion {
    /// New tokens, including the EOS token that ended it.
    pub tokens: Vec<u32>,
    /// Log-prob of each new token at the sampling temperature, before truncation.
    pub logprobs: Vec<f32>,
    pub finish: Finish,
}

/// What one step's sampling sends to the backend and gets back, allocated once per generation:
/// the rows still generating, one uniform each (none when greedy), and their picks.
struct Picks {
    rows: Vec<u32>,
    uniforms: Vec<f64>,
    ids: Vec<u32>,
    logps: Vec<f32>,
}

impl Picks {
    fn new(b: usize) -> Picks {
        Picks {
            rows: Vec::with_capacity(b),
            uniforms: Vec::with_capacity(b),
            ids: vec![0; b],
            logps: vec![0.0; b],
        }
    }
}

/// Generates a continuation of each prompt (a batch, left-padded internally).
/// `tokenizer` is needed only for stop strings.
pub fn generate<B: DecodeOps>(
    be: &B,
    model: &Model<B>,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    tokenizer: Option<&Tokenizer>,
    rng: &mut Rng,
) -> Result<Vec<Completion>> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Invalid(format!("prompt {i} is empty")));
    }
    if !cfg.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(Error::Invalid("stop strings need a tokenizer".into()));
    }
    let (b, v) = (prompts.len(), model.cfg.vocab_size);
    let mut out: Vec<Completion> = (0..b)
        .map(|_| Completion {
            tokens: Vec::with_capacity(cfg.max_new_tokens),
            logprobs: Vec::with_capacity(cfg.max_new_tokens),
            finish: Finish::Length,
        })
        .collect();
    if b == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let pad = model.cfg.pad_token_id.unwrap_or(0);
    let batch = Batch::new(prompts, pad, Pad::Left);
    let mut state = model.prefill(be, &batch, cfg.max_new_tokens)?;
    let mut picks = Picks::new(b);
    let mut next = vec![pad; b];
    let mut done = vec![false; b];
    // The loop runs inside the rayon pool: parallel ops started from a worker thread go to its
    // own deque, while ops started from outside go through the pool's injector queue, which
    // allocates a block every few dozen jobs.
    rayon::scope(|_| {
        for step in 0..cfg.max_new_tokens {
            sample_step(
                be, &state, &mut picks, v, cfg, rng, &mut next, &mut done, &mut out, tokenizer,
            )?;
            if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
                break;
            }
            model.decode_step(be, &mut state, &next)?;
        }
        Ok::<_, Error>(())
    })?;
    Ok(out)
}

/// Samples one token for every unfinished row from `state.logits` on the backend, records it,
/// and marks rows that stop. Finished rows keep feeding the pad token, which nothing reads. One
/// uniform is drawn per unfinished row in row order (none when greedy): the draws generation has
/// always made, so seeded runs keep their tokens.
#[allow(clippy::too_many_arguments)]
fn sample_step<B: DecodeOps>(
    be: &B,
    state: &DecodeState<B>,
    picks: &mut Picks,
    v: usize,
    cfg: &SamplingConfig,
    rng: &mut Rng,
    next: &mut [u32],
    done: &mut [bool],
    out: &mut [Completion],
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    let p = SampleParams {
        temperature: cfg.temperature,
        top_k: cfg.top_k,
        top_p: cfg.top_p,
    };
    picks.rows.clear();
    picks
        .rows
        .extend((0..state.b as u32).filter(|&r| !done[r as usize]));
    picks.uniforms.clear();
    if !p.is_greedy() {
        picks
            .uniforms
            .extend(picks.rows.iter().map(|_| rng.uniform()));
    }
    let n = picks.rows.len();
    let (ids, logps) = (&mut picks.ids[..n], &mut picks.logps[..n]);
    be.sample_tokens(
        be.all(&state.logits),
        &picks.rows,
        v,
        p,
        &picks.uniforms,
        ids,
        logps,
    );
    for (&r, (&id, &lp)) in picks.rows.iter().zip(ids.iter().zip(logps.iter())) {
        let r = r as usize;
        next[r] = id;
        out[r].tokens.push(id);
        out[r].logprobs.push(lp);
        if cfg.eos_token_ids.contains(&id) {
            (done[r], out[r].finish) = (true, Finish::Eos);
        } else if let (Some(tok), false) = (tokenizer, cfg.stop_strings.is_empty()) {
            let text = tok.decode(&out[r].tokens, true)?;
            if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                (done[r], out[r].finish) = (true, Finish::StopString);
            }
        }
    }
    Ok(())
}

/// Arguments of `rlhf generate`.
#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompts"])))]
pub struct GenerateArgs {
    /// A Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// One prompt (repeat the flag for several).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// JSONL file of `{"prompt": ...}` lines.
    #[arg(long)]
    pub prompts: Option<std::path::PathBuf>,
    /// Write completions here instead of stdout.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Sample from the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample from the smallest set of tokens holding this much probability (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Stop a completion once it contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// Prompts generated together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to run: the CPU backend (the reference), a CUDA device, the CUDA kernels on the
    /// CPU emulator (slow; checks the GPU path without a GPU), or auto (a CUDA device where one
    /// opens, else the CPU).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
}

/// EOS ids for generation: `generation_config.json`'s `eos_token_id` (one id or a list) when
/// present, else the model config's, else the tokenizer's.
pub fn eos_ids(dir: &std::path::Path, cfg: &super::Config, tok: &Tokenizer) -> Vec<u32> {
    let from_gen = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| match &v["eos_token_id"] {
            serde_json::Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            _ => vec![],
        })
        .unwrap_or_default();
    if !from_gen.is_empty() {
        from_gen
    } else if !cfg.eos_token_ids.is_empty() {
        cfg.eos_token_ids.clone()
    } else {
        tok.eos_id().into_iter().collect()
    }
}

/// Runs `rlhf generate` on the backend `--device` selects: one JSONL line per completion, written as each
/// batch finishes.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    crate::with_backend!(args.device, |be| run_on(be, args))
}

fn run_on<B: DecodeOps>(be: &B, args: &GenerateArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let model = Model::load(be, &args.model)?;
    let tok = Tokenizer::load(&args.model)?;
    let texts: Vec<String> = match &args.prompts {
        Some(path) => crate::data::read_prompts(path)?
            .into_iter()
            .map(|p| p.prompt)
            .collect(),
        None => args.prompt.clone(),
    };
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        eos_token_ids: eos_ids(&args.model, &model.cfg, &tok),
        stop_strings: args.stop.clone(),
    };
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::fs::File::create(p).map_err(|e| Error::io(p, e))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut rng = Rng::new(args.seed);
    let jobs: Vec<&String> = texts
        .iter()
        .flat_map(|t| std::iter::repeat_n(t, args.num_samples.max(1)))
        .collect();
    for chunk in jobs.chunks(args.batch_size.max(1)) {
        let ids = chunk
            .iter()
            .map(|t| tok.encode(t, true))
            .collect::<Result<Vec<_>>>()?;
        for (text, c) in chunk
            .iter()
            .zip(generate(be, &model, &ids, &cfg, Some(&tok), &mut rng)?)
        {
            let line = serde_json::json!({
                "prompt": text,
                "completion": tok.decode(&c.tokens, true)?,
                "tokens": c.tokens,
                "logprobs": c.logprobs,
                "finish_reason": c.finish,
            });
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    Ok(())
}
