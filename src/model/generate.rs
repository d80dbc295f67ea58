//! Batched generation with a KV cache: left-padded prompts, greedy or sampled (temperature,
//! top-k, top-p), stopping at EOS ids, stop strings or a token budget, seeded.
//!
//! Each sampled token's log-prob is recorded under the model's distribution at the sampling
//! temperature, before top-k/top-p truncation, as TRL computes it: RL needs exactly that number.

use super::tokenizer::Tokenizer;
use super::transformer::{Batch, DecodeState, Model, Pad};
use crate::backend::DecodeOps;
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

/// Host-side scratch for sampling, allocated once per generation.
struct Sampler {
    logits: Vec<f32>,
    /// Candidate token ids, sorted or partitioned in place for top-k/top-p.
    order: Vec<u32>,
    probs: Vec<f32>,
}

impl Sampler {
    /// Picks a token from one row of logits; returns it with its log-prob at temperature `t`.
    fn pick(&mut self, row: usize, v: usize, cfg: &SamplingConfig, rng: &mut Rng) -> (u32, f32) {
        let z = &self.logits[row * v..(row + 1) * v];
        let t = if cfg.temperature > 0.0 {
            cfg.temperature
        } else {
            1.0
        };
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let sum: f64 = z.iter().map(|&x| (((x - max) / t) as f64).exp()).sum();
        let lse = max / t + sum.ln() as f32;
        let logp = |id: u32| z[id as usize] / t - lse;
        if cfg.temperature <= 0.0 {
            // First maximum, as torch.argmax.
            let id = z
                .iter()
                .enumerate()
                .fold(0, |best, (i, &x)| if x > z[best] { i } else { best })
                as u32;
            return (id, logp(id));
        }
        let probs = &mut self.probs[..v];
        for (p, &x) in probs.iter_mut().zip(z) {
            *p = ((x - max) / t).exp();
        }
        let order = &mut self.order[..v];
        for (i, o) in order.iter_mut().enumerate() {
            *o = i as u32;
        }
        let by_prob = |a: &u32, b: &u32| {
            probs[*b as usize]
                .total_cmp(&probs[*a as usize])
                .then(a.cmp(b))
        };
        let mut keep = v;
        if cfg.top_k > 0 && cfg.top_k < v {
            order.select_nth_unstable_by(cfg.top_k - 1, by_prob);
            keep = cfg.top_k;
        }
        if cfg.top_p < 1.0 {
            order[..keep].sort_unstable_by(by_prob);
            let total: f32 = order[..keep].iter().map(|&i| probs[i as usize]).sum();
            let mut acc = 0.0;
            for (n, &i) in order[..keep].iter().enumerate() {
                acc += probs[i as usize] / total;
                // transformers keeps tokens until the cumulative mass first exceeds top_p.
                if acc >= cfg.top_p {
                    keep = n + 1;
                    break;
                }
            }
        }
        let kept = &order[..keep];
        let total: f64 = kept.iter().map(|&i| probs[i as usize] as f64).sum();
        let mut u = rng.uniform() * total;
        let mut id = kept[keep - 1];
        for &i in kept {
            u -= probs[i as usize] as f64;
            if u < 0.0 {
                id = i;
                break;
            }
        }
        (id, logp(id))
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
    let mut sampler = Sampler {
        logits: vec![0.0; b * v],
        order: vec![0; v],
        probs: vec![0.0; v],
    };
    let mut next = vec![pad; b];
    let mut done = vec![false; b];
    // The loop runs inside the rayon pool: parallel ops started from a worker thread go to its
    // own deque, while ops started from outside go through the pool's injector queue, which
    // allocates a block every few dozen jobs.
    rayon::scope(|_| {
        for step in 0..cfg.max_new_tokens {
            sample_step(
                be,
                &mut state,
                &mut sampler,
                cfg,
                rng,
                &mut next,
                &mut done,
                &mut out,
                tokenizer,
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

/// Samples one token for every unfinished row from `state.logits`, records it, and marks rows
/// that stop. Finished rows keep feeding the pad token, which nothing reads.
#[allow(clippy::too_many_arguments)]
fn sample_step<B: DecodeOps>(
    be: &B,
    state: &mut DecodeState<B>,
    sampler: &mut Sampler,
    cfg: &SamplingConfig,
    rng: &mut Rng,
    next: &mut [u32],
    done: &mut [bool],
    out: &mut [Completion],
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    let v = sampler.logits.len() / state.b;
    be.download_into(be.all(&state.logits), &mut sampler.logits);
    for r in 0..state.b {
        if done[r] {
            continue;
        }
        let (id, lp) = sampler.pick(r, v, cfg, rng);
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

/// Runs `rlhf generate` on the CPU backend: one JSONL line per completion, written as each
/// batch finishes.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    use crate::backend::cpu::Cpu;
    use std::io::Write;
    let be = Cpu;
    let model = Model::load(&be, &args.model)?;
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
            .zip(generate(&be, &model, &ids, &cfg, Some(&tok), &mut rng)?)
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
