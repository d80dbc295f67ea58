//! Rollouts for RL: sample completions of a batch of prompts (G per prompt) with the KV-cache
//! generator, score them, and lay everything out as a right-padded training batch with the
//! per-token quantities the RL losses need (sampling log-probs, reference log-probs, critic
//! values), aligned with the training forward's next-token positions.
//!
//! Alignment: row `i` is `prompt_i ++ completion_i`, right-padded to `T`. Position `j` of a
//! row predicts token `j + 1` (the convention of [`shifted_targets`]), so the completion's
//! positions are `p_len - 1 .. p_len + c_len - 1`, where `completion_mask` is 1; every
//! per-token vector is 0 elsewhere. The sampling log-probs recorded by
//! [`generate`] are those the training forward computes at the same positions (same weights,
//! same temperature), so an on-policy first step sees a ratio of 1.

use crate::algo::sft::HEAD_CHUNK;
use crate::backend::loss::Rows;
use crate::backend::{DecodeOps, ModelOps};
use crate::model::generate::{generate, Completion, Finish, SamplingConfig};
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::shifted_targets;
use crate::model::{Batch, Model, Pad};
use crate::reward::{RewardInput, RewardSource};
use crate::rng::Rng;
use crate::{Error, Result};
use std::time::Instant;

/// How to sample a rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutConfig {
    /// Temperature, top-k/top-p, stop tokens and strings, the token budget.
    pub sampling: SamplingConfig,
    /// Completions sampled per prompt (`G`); rows of one prompt are consecutive.
    pub group_size: usize,
    /// Subtracted from the reward of completions that never stop (hit `max_new_tokens`), as
    /// TRL's `missing_eos_penalty`: it teaches the policy to end its answers.
    pub missing_eos_penalty: Option<f32>,
}

/// A prompt to roll out: its text (what reward sources see), its token ids (what the policy
/// sees), and the reference answer rule rewards compare against.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutPrompt {
    /// The prompt as text (rendered with the chat template when conversational).
    pub text: String,
    /// Its token ids.
    pub ids: Vec<u32>,
    /// The reference answer, for rule rewards.
    pub answer: Option<String>,
}

/// Where a rollout's time went, for throughput metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RolloutTiming {
    /// Seconds spent sampling.
    pub generate_s: f64,
    /// Seconds spent in the reward source.
    pub reward_s: f64,
    /// Seconds spent in the reference model's forward pass (0 without one).
    pub reference_s: f64,
    /// Seconds spent in the critic's forward pass (0 without one).
    pub critic_s: f64,
    /// Completion tokens sampled.
    pub generated_tokens: usize,
}

impl RolloutTiming {
    /// Sampled tokens per second of generation.
    pub fn tokens_per_s(&self) -> f64 {
        self.generated_tokens as f64 / self.generate_s.max(1e-9)
    }

    /// Seconds of the whole rollout.
    pub fn total_s(&self) -> f64 {
        self.generate_s + self.reward_s + self.reference_s + self.critic_s
    }
}

/// A batch of sampled sequences laid out for training: row `i` = `prompt_i ++ completion_i`,
/// right-padded. Per-token vectors are `B·T`, indexed like `targets` (position `j` predicts
/// token `j + 1`), and 0 wherever `completion_mask` is 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// Right-padded prompt + completion rows (`B` = prompts × G).
    pub batch: Batch,
    /// `shifted_targets(&batch)`.
    pub targets: Vec<u32>,
    /// 1 at position `j` iff token `j + 1` is a completion token.
    pub completion_mask: Vec<f32>,
    /// Sampling log-probs of the completion tokens at those positions.
    pub old_logp: Vec<f32>,
    /// The frozen reference model's log-probs (same temperature), when a reference was given.
    pub ref_logp: Option<Vec<f32>>,
    /// Critic values at those positions (the value of the state before generating token
    /// `j + 1`, TRL's convention), when a critic was given.
    pub values: Option<Vec<f32>>,
    /// Reward per sequence, after `missing_eos_penalty`.
    pub scores: Vec<f32>,
    /// Which prompt each row came from (its group).
    pub prompt_index: Vec<usize>,
    /// The sampled completions, with their finish reasons.
    pub completions: Vec<Completion>,
    /// Completions decoded without special tokens (what the reward source scored).
    pub completion_texts: Vec<String>,
    /// Completions that never stopped (hit `max_new_tokens`).
    pub truncated: Vec<bool>,
    /// Prompt tokens of each row (where its completion starts).
    pub prompt_len: Vec<usize>,
    /// The id filling pad positions (nothing reads it).
    pub pad_id: u32,
    /// The temperature log-probs are taken at (the sampling one; 1 for greedy decoding).
    pub temperature: f32,
    /// Where the time went.
    pub timing: RolloutTiming,
}

impl Rollout {
    /// Number of sequences `B`.
    pub fn len(&self) -> usize {
        self.batch.b
    }

    /// True when the rollout holds no sequence.
    pub fn is_empty(&self) -> bool {
        self.batch.b == 0
    }

    /// The batch geometry the loss ops take.
    pub fn rows(&self) -> Rows {
        Rows {
            b: self.batch.b,
            t: self.batch.t,
        }
    }

    /// Tokens of row `r` (prompt and completion).
    fn row_len(&self, r: usize) -> usize {
        self.prompt_len[r] + self.completions[r].tokens.len()
    }

    /// A per-token vector of this rollout (`B·T`, such as per-token advantages) laid out as
    /// [`Rollout::select`] lays out the same rows: width the longest of them.
    pub fn take_tokens(&self, v: &[f32], rows: &[usize]) -> Vec<f32> {
        let t_old = self.batch.t;
        let t = rows.iter().map(|&r| self.row_len(r)).max().unwrap_or(0);
        let mut out = vec![0.0; rows.len() * t];
        for (k, &r) in rows.iter().enumerate() {
            out[k * t..(k + 1) * t].copy_from_slice(&v[r * t_old..r * t_old + t]);
        }
        out
    }

    /// Completion tokens of the whole rollout (the mask sum).
    pub fn completion_tokens(&self) -> usize {
        self.completions.iter().map(|c| c.tokens.len()).sum()
    }

    /// Mean completion length in tokens.
    pub fn mean_length(&self) -> f64 {
        self.completion_tokens() as f64 / self.len().max(1) as f64
    }

    /// Fraction of completions that never stopped (TRL's `completions/clipped_ratio`).
    pub fn clipped_ratio(&self) -> f64 {
        self.truncated.iter().filter(|&&t| t).count() as f64 / self.len().max(1) as f64
    }

    /// The sub-rollout of the given rows, in that order, re-padded to their longest row: for
    /// micro-batches, and for dropping groups. Per-token vectors keep their alignment.
    pub fn select(&self, rows: &[usize]) -> Rollout {
        let t_old = self.batch.t;
        let ids: Vec<Vec<u32>> = rows
            .iter()
            .map(|&r| self.batch.ids[r * t_old..r * t_old + self.row_len(r)].to_vec())
            .collect();
        let batch = Batch::new(&ids, self.pad_id, Pad::Right);
        let take = |v: &[f32]| self.take_tokens(v, rows);
        let pick = |v: &[usize]| rows.iter().map(|&r| v[r]).collect::<Vec<_>>();
        Rollout {
            targets: shifted_targets(&batch),
            completion_mask: take(&self.completion_mask),
            old_logp: take(&self.old_logp),
            ref_logp: self.ref_logp.as_deref().map(take),
            values: self.values.as_deref().map(take),
            scores: rows.iter().map(|&r| self.scores[r]).collect(),
            prompt_index: pick(&self.prompt_index),
            completions: rows.iter().map(|&r| self.completions[r].clone()).collect(),
            completion_texts: rows
                .iter()
                .map(|&r| self.completion_texts[r].clone())
                .collect(),
            truncated: rows.iter().map(|&r| self.truncated[r]).collect(),
            prompt_len: pick(&self.prompt_len),
            pad_id: self.pad_id,
            temperature: self.temperature,
            timing: self.timing,
            batch,
        }
    }
}

/// The temperature log-probs are recorded at for a sampling configuration: the sampling one,
/// or 1 for greedy decoding (as [`generate`] records them).
pub fn logprob_temperature(sampling: &SamplingConfig) -> f32 {
    if sampling.temperature > 0.0 {
        sampling.temperature
    } else {
        1.0
    }
}

/// Samples `cfg.group_size` completions of every prompt with `policy`, scores them with
/// `reward`, and lays them out for training, with the reference model's log-probs and the
/// critic's values when those models are given. Rows of one prompt are consecutive.
#[allow(clippy::too_many_arguments)]
pub fn rollout<B: DecodeOps>(
    be: &B,
    policy: &Model<B>,
    reference: Option<&Model<B>>,
    critic: Option<&Model<B>>,
    prompts: &[RolloutPrompt],
    reward: &mut dyn RewardSource,
    tok: &Tokenizer,
    cfg: &RolloutConfig,
    rng: &mut Rng,
) -> Result<Rollout> {
    if prompts.is_empty() {
        return Err(Error::Invalid("a rollout needs at least one prompt".into()));
    }
    if cfg.group_size == 0 {
        return Err(Error::Invalid(
            "the number of completions per prompt must be at least 1".into(),
        ));
    }
    let context = policy.cfg.max_position;
    let budget = cfg.sampling.max_new_tokens;
    for (i, p) in prompts.iter().enumerate() {
        if p.ids.is_empty() {
            return Err(Error::Invalid(format!(
                "prompt {i} ({:?}) encodes to no tokens",
                p.text
            )));
        }
        if p.ids.len() + budget > context {
            return Err(Error::Invalid(format!(
                "prompt {i} is {} tokens; with {budget} new tokens that exceeds the model's \
                 context of {context} (shorten the prompt or lower --max-new-tokens)",
                p.ids.len()
            )));
        }
    }
    let g = cfg.group_size;
    let prompt_index: Vec<usize> = (0..prompts.len())
        .flat_map(|p| std::iter::repeat_n(p, g))
        .collect();
    let ids: Vec<Vec<u32>> = prompt_index
        .iter()
        .map(|&p| prompts[p].ids.clone())
        .collect();

    let t0 = Instant::now();
    let completions = generate(be, policy, &ids, &cfg.sampling, Some(tok), rng)?;
    let mut timing = RolloutTiming {
        generate_s: t0.elapsed().as_secs_f64(),
        generated_tokens: completions.iter().map(|c| c.tokens.len()).sum(),
        ..RolloutTiming::default()
    };

    let t0 = Instant::now();
    let completion_texts = completions
        .iter()
        .map(|c| tok.decode(&c.tokens, true))
        .collect::<Result<Vec<_>>>()?;
    let inputs: Vec<RewardInput<'_>> = prompt_index
        .iter()
        .zip(&completion_texts)
        .map(|(&p, c)| RewardInput {
            prompt: &prompts[p].text,
            completion: c,
            answer: prompts[p].answer.as_deref(),
        })
        .collect();
    let mut scores = reward.score(&inputs)?;
    drop(inputs);
    if scores.len() != completions.len() {
        return Err(Error::Invalid(format!(
            "the reward source ({}) returned {} scores for {} completions",
            reward.describe(),
            scores.len(),
            completions.len()
        )));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::Invalid(format!(
            "the reward source ({}) scored completion {i} ({:?}) as {}",
            reward.describe(),
            completion_texts[i],
            scores[i]
        )));
    }
    let truncated: Vec<bool> = completions
        .iter()
        .map(|c| c.finish == Finish::Length)
        .collect();
    if let Some(pen) = cfg.missing_eos_penalty {
        for (s, _) in scores.iter_mut().zip(&truncated).filter(|(_, &t)| t) {
            *s -= pen;
        }
    }
    timing.reward_s = t0.elapsed().as_secs_f64();

    // The training layout: prompt ++ completion, right-padded.
    let rows: Vec<Vec<u32>> = ids
        .iter()
        .zip(&completions)
        .map(|(p, c)| p.iter().chain(&c.tokens).copied().collect())
        .collect();
    let pad = policy
        .cfg
        .pad_token_id
        .or(cfg.sampling.eos_token_ids.first().copied())
        .unwrap_or(0);
    let batch = Batch::new(&rows, pad, Pad::Right);
    let targets = shifted_targets(&batch);
    let t = batch.t;
    let mut completion_mask = vec![0.0; batch.n()];
    let mut old_logp = vec![0.0; batch.n()];
    for (r, (p, c)) in ids.iter().zip(&completions).enumerate() {
        let start = r * t + p.len() - 1;
        completion_mask[start..start + c.tokens.len()].fill(1.0);
        old_logp[start..start + c.logprobs.len()].copy_from_slice(&c.logprobs);
    }
    let temperature = logprob_temperature(&cfg.sampling);
    let only_completions = |mut v: Vec<f32>| {
        for (x, &m) in v.iter_mut().zip(&completion_mask) {
            if m == 0.0 {
                *x = 0.0;
            }
        }
        v
    };
    let ref_logp = match reference {
        Some(r) => {
            let t0 = Instant::now();
            let lp = sequence_logprobs(be, r, &batch, &targets, temperature)?;
            timing.reference_s = t0.elapsed().as_secs_f64();
            Some(only_completions(lp))
        }
        None => None,
    };
    let values = match critic {
        Some(c) => {
            let t0 = Instant::now();
            let acts = c.forward(be, &batch)?;
            let v = be.download(be.all(&c.values(be, &acts.hidden, batch.n())?));
            timing.critic_s = t0.elapsed().as_secs_f64();
            Some(only_completions(v))
        }
        None => None,
    };
    Ok(Rollout {
        targets,
        completion_mask,
        old_logp,
        ref_logp,
        values,
        scores,
        prompt_index,
        prompt_len: ids.iter().map(Vec::len).collect(),
        pad_id: pad,
        completions,
        completion_texts,
        truncated,
        temperature,
        timing,
        batch,
    })
}

/// Log-probs (`B·T`) of `targets` under `model` for a batch, at `temperature`, with the LM
/// head chunked so the logits never exist whole: the reference pass, and what a trainer
/// compares with the sampling log-probs.
pub fn sequence_logprobs<B: ModelOps>(
    be: &B,
    model: &Model<B>,
    batch: &Batch,
    targets: &[u32],
    temperature: f32,
) -> Result<Vec<f32>> {
    let acts = model.forward(be, batch)?;
    let (logp, _) =
        model.head_logprobs(be, &acts.hidden, targets, temperature, false, HEAD_CHUNK)?;
    // Not recycled: a reference model's pool would keep a whole pass's activations alive
    // beside the policy's training step (47 MiB more at the 6-layer config's GRPO peak).
    Ok(logp)
}
