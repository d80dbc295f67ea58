//! GRPO and its relatives (RLOO, REINFORCE++, S-GRPO), and the `rlhf grpo` training loop.
//!
//! One iteration: take `prompts_per_step` prompts, sample `G` completions of each
//! ([`crate::rollout`]), score them, turn the scores into advantages (group-normalised for
//! GRPO, leave-one-out for RLOO, KL-shaped and globally whitened returns for REINFORCE++), then
//! take `num_iterations` optimizer steps on that batch, each over `grad_accum` micro-batches,
//! with the clipped surrogate loss and, for GRPO and RLOO, the β·k3 KL term to the frozen
//! reference in the loss (REINFORCE++ puts the KL into the reward instead, as OpenRLHF does).
//!
//! Normalisation follows TRL's `loss_type`: `dapo` divides every micro-batch's token sum by
//! the completion tokens of the whole accumulated batch, so the micro-batch losses add up to
//! the batch's token mean; the other aggregations are per micro-batch, and the step takes the
//! mean of the micro-batch gradients, as HF's Trainer does.
//!
//! S-GRPO (`--sft-coef λ`) adds λ times the mean, over the step's prompts, of each prompt's
//! per-token NLL of its labelled `completion` (at temperature 1, the policy's own
//! distribution): a supervised gradient from the first step, whatever the rewards say.
//!
//! With `--is-correction-cap C` the ratio's π_old is the training forward's, recomputed after
//! each rollout, and each token's clipped surrogate is weighted by the truncated importance
//! ratio `min(π_old / π_sampling, C)` ([`SamplingCorrection`], TRL's
//! `vllm_importance_sampling_correction`): the sampler's log-probs need not match the training
//! forward's to the bit.
//!
//! Checkpoints fall on rollout boundaries (the step after which a new batch is sampled), so a
//! resumed run re-samples from the saved RNG state and continues exactly.

use crate::algo::sft::HEAD_CHUNK;
use crate::backend::cuda::DeviceChoice;
use crate::backend::loss::{
    Advantages, Aggregation, GroupAdvCfg, GroupBaseline, GroupScale, KlEstimator, KlRewardCfg,
    PolicyLossCfg, PolicyLossGrad, PolicyLossInputs, PolicyLossStats,
};
use crate::backend::{DecodeOps, LossOps, ModelOps};
use crate::checkpoint::{self, LrSchedule, Run, RunOptions, TrainerState};
use crate::data::{self, Batches, RlPrompt};
use crate::model::generate::{eos_ids, SamplingConfig};
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::shifted_targets;
use crate::model::{Batch, Model, Pad};
use crate::optim::{grad_norm, OptimConfig};
use crate::reward::{self, RewardSource};
use crate::rng::Rng;
use crate::rollout::{rollout, sequence_logprobs, Rollout, RolloutConfig, RolloutPrompt};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How per-token losses become one scalar (TRL's `loss_type`).
#[derive(
    clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean per sequence, then over sequences (the original GRPO; biased towards short
    /// correct answers).
    Grpo,
    /// Token mean over each micro-batch.
    Bnpo,
    /// Token mean over the whole accumulated batch (TRL's default).
    Dapo,
    /// Token sum over `B × max_new_tokens` (Dr. GRPO: no length bias).
    #[value(name = "dr_grpo")]
    DrGrpo,
}

/// What group-relative advantages are divided by (TRL's `scale_rewards`).
#[derive(
    clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// The group's reward std.
    Group,
    /// The std of every reward of the batch.
    Batch,
    /// Nothing (Dr. GRPO; RLOO's usual setting).
    None,
}

/// How scores become advantages.
#[derive(
    clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// Reward minus the group mean, scaled per `--scale-rewards`.
    Grpo,
    /// Reward minus the mean of the group's other rewards (leave-one-out).
    Rloo,
    /// REINFORCE++: per-token rewards (−β·k1 to the reference on every token, the score on
    /// the last), returns whitened over the whole batch; the KL lives in the reward, not the
    /// loss.
    #[value(name = "reinforce_pp")]
    ReinforcePp,
}

/// Arguments of `rlhf grpo` (and the configuration recorded in `run_config.json`).
#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GrpoArgs {
    /// The policy to train (a Hugging Face model directory with its tokenizer); also the
    /// frozen reference unless --ref-model is given.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The frozen reference model for the KL term [default: --model's initial weights].
    /// Not loaded with --beta 0.
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// Prompts, JSONL: {"prompt", "answer"?}, "prompt" a string or a list of chat messages;
    /// with --sft-coef also "completion" (the labelled response).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Reward source spec (repeatable; several add up, each with an optional `WEIGHT*`
    /// prefix): exact_match[=REGEX], format=REGEX, length=N, model=DIR, command=CMD.
    #[arg(long)]
    pub reward: Vec<String>,
    /// Run directory (checkpoints, metrics, final model) [default: runs/grpo-<unix time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Completions sampled per prompt (the group size G).
    #[arg(long, default_value_t = 4)]
    pub num_generations: usize,
    /// Prompts sampled per rollout batch (each optimizer step sees prompts × G completions).
    #[arg(long, default_value_t = 2)]
    pub prompts_per_step: usize,
    /// Micro-batches the rollout batch is split into for each optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Optimizer steps per rollout batch (μ), each reusing the sampling log-probs.
    #[arg(long, default_value_t = 1)]
    pub num_iterations: usize,
    /// Optimizer steps to take [default: one pass over the prompts × --num-iterations].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Longest completion, in tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature (log-probs, for the ratio and the KL, are taken at it too).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Sample from the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample from the smallest set of tokens holding this much probability (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// KL coefficient β (0 loads no reference model).
    #[arg(long, default_value_t = 0.04)]
    pub beta: f32,
    /// Lower clip ε: the ratio is clipped at 1 - ε (and at 1 + ε without --epsilon-high).
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f32,
    /// Upper clip ε_high (DAPO's clip-higher) [default: --epsilon].
    #[arg(long)]
    pub epsilon_high: Option<f32>,
    /// Dual-clip constant c > 1: caps the loss of negative-advantage tokens at -A·c.
    #[arg(long)]
    pub delta: Option<f32>,
    /// Truncated importance-sampling correction with cap C (TRL's
    /// vllm_importance_sampling_correction): after each rollout, π_old is recomputed by the
    /// training forward (one extra forward pass over the batch) and each token's policy loss is
    /// weighted by min(π_old / π_sampling, C); logs the sampling/training log-prob gap.
    /// Absent or 0: off.
    #[arg(long)]
    pub is_correction_cap: Option<f32>,
    /// Entropy bonus coefficient.
    #[arg(long, default_value_t = 0.0)]
    pub entropy_coef: f32,
    /// Loss aggregation.
    #[arg(long, value_enum, default_value_t = LossType::Dapo)]
    pub loss_type: LossType,
    /// Advantage scaling [default: group for grpo, none for rloo]; ignored by reinforce_pp.
    #[arg(long, value_enum)]
    pub scale_rewards: Option<ScaleRewards>,
    /// Advantage estimator.
    #[arg(long, value_enum, default_value_t = AdvantageEstimator::Grpo)]
    pub advantage: AdvantageEstimator,
    /// Leave completions that never stopped out of the loss (their rewards still count in
    /// their group's baseline).
    #[arg(long)]
    pub mask_truncated_completions: bool,
    /// Drop groups whose rewards all agree (they carry no signal); a batch with none left
    /// skips its update.
    #[arg(long)]
    pub dynamic_sampling: bool,
    /// Subtract this from the reward of completions that never stop.
    #[arg(long)]
    pub missing_eos_penalty: Option<f32>,
    /// S-GRPO: add this times the NLL of each prompt's labelled "completion" to the loss.
    #[arg(long, default_value_t = 0.0)]
    pub sft_coef: f32,
    /// Peak learning rate (TRL's GRPO default).
    #[arg(long, default_value_t = 1e-6)]
    pub lr: f32,
    /// Steps of linear warmup before the cosine decay.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// AdamW weight decay (not applied to biases and norms).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Write a checkpoint every N steps (0: never); it is taken at the first rollout boundary
    /// at or after each multiple of N.
    #[arg(long, default_value_t = 500)]
    pub save_every: usize,
    /// Checkpoints to keep (0: all).
    #[arg(long, default_value_t = 2)]
    pub save_total_limit: usize,
    /// Seed of the prompt order and the sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where to run: the CPU backend (the reference), a CUDA device, the CUDA kernels on the
    /// CPU emulator (slow; checks the GPU path without a GPU), or auto (a CUDA device where one
    /// opens, else the CPU).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
    /// Continue the run in --out from its latest complete checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar or notes.
    #[arg(long)]
    pub quiet: bool,
    /// Stop (as if killed) before micro-batch N+1: for testing --resume.
    #[arg(long, hide = true)]
    pub stop_after_micro_steps: Option<u64>,
}

impl Default for GrpoArgs {
    /// The command line's defaults (one source of truth: clap's).
    fn default() -> Self {
        super::clap_defaults()
    }
}

/// Configuration keys that decide which prompts come when, how steps group into rollouts, or
/// the schedule's length: a resumed run must keep them to continue exactly.
const FIXED_ON_RESUME: &[&str] = &[
    "model",
    "ref_model",
    "data",
    "num_generations",
    "prompts_per_step",
    "grad_accum",
    "num_iterations",
    "steps",
    "seed",
];

/// How a GRPO run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimizer steps completed (skipped ones included).
    pub steps: u64,
    /// Optimizer steps the run takes in all.
    pub total_steps: u64,
    /// Stopped early by `stop_after_micro_steps` (nothing saved after the last checkpoint).
    pub interrupted: bool,
    /// Steps this invocation skipped because dynamic sampling left nothing to learn from.
    pub skipped_steps: u64,
    /// The last step's mean reward.
    pub last_reward: Option<f64>,
    /// The last step's mean k3 KL to the reference (`None` without a reference, β = 0).
    pub last_kl: Option<f64>,
}

/// The prompt-order seed, apart from the sampling seed, so the two streams differ.
fn data_seed(seed: u64) -> u64 {
    seed ^ 0xDA7A_5EED_0000_0002
}

/// The sampling RNG's seed.
fn sampling_seed(seed: u64) -> u64 {
    seed ^ 0x5A3B_1E00_0000_0003
}

/// One micro-batch of a prepared rollout: its rows and their advantages.
struct Micro {
    roll: Rollout,
    /// One per row, or one per token (`B·T`, REINFORCE++).
    adv: Vec<f32>,
    per_token: bool,
    /// Truncated importance-sampling weights (`B·T`), with `--is-correction-cap`.
    is_weight: Option<Vec<f32>>,
}

/// A rollout batch ready to optimise on, reused for `num_iterations` steps.
struct Prepared {
    /// `grad_accum` slots; `None` where dynamic sampling left too few rows to fill it.
    micro: Vec<Option<Micro>>,
    /// Unmasked completion tokens of every kept row (`dapo`'s normaliser).
    num_items: f64,
    /// S-GRPO: for each slot, `(prompt_ids, completion_ids)` of its share of the prompts.
    sft: Vec<Vec<(Vec<u32>, Vec<u32>)>>,
    /// Number of prompts of the batch (the S-GRPO mean's denominator).
    prompts: usize,
    /// Rollout-level metrics, logged with every step on this batch.
    metrics: Vec<(&'static str, f64)>,
}

/// `0..n` cut into `k` consecutive, nearly equal chunks (empty ones when `n < k`).
fn split(n: usize, k: usize) -> Vec<std::ops::Range<usize>> {
    let size = n.div_ceil(k.max(1)).max(1);
    (0..k)
        .map(|i| (i * size).min(n)..((i + 1) * size).min(n))
        .collect()
}

/// The trainer's settings, resolved and checked once.
struct Settings {
    group: usize,
    scale: GroupScale,
    loss: PolicyLossCfg,
    /// The truncated importance-sampling cap; `None`: no correction.
    is_cap: Option<f32>,
}

impl Settings {
    fn new(args: &GrpoArgs) -> Result<Settings> {
        let bad = |msg: String| Err(Error::Invalid(msg));
        if args.num_generations == 0
            || args.prompts_per_step == 0
            || args.grad_accum == 0
            || args.num_iterations == 0
        {
            return bad("--num-generations, --prompts-per-step, --grad-accum and --num-iterations must be at least 1".into());
        }
        if args.num_generations < 2 && args.advantage != AdvantageEstimator::ReinforcePp {
            return bad(format!(
                "--num-generations {}: group-relative advantages need at least 2 completions per prompt",
                args.num_generations
            ));
        }
        if args.max_new_tokens == 0 {
            return bad("--max-new-tokens must be at least 1".into());
        }
        if !(args.lr.is_finite() && args.lr >= 0.0) {
            return bad(format!("--lr {} is not a learning rate", args.lr));
        }
        let eps_high = args.epsilon_high.unwrap_or(args.epsilon);
        if !(args.epsilon >= 0.0 && args.epsilon < 1.0 && eps_high >= 0.0) {
            return bad(format!(
                "--epsilon {} / --epsilon-high {eps_high}: need 0 <= epsilon < 1 and epsilon-high >= 0",
                args.epsilon
            ));
        }
        if let Some(c) = args.delta.filter(|c| c.is_nan() || *c <= 1.0) {
            return bad(format!("--delta {c}: the dual-clip constant must exceed 1"));
        }
        for (name, v) in [
            ("--beta", args.beta),
            ("--entropy-coef", args.entropy_coef),
            ("--sft-coef", args.sft_coef),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} {v} must be a finite number >= 0"));
            }
        }
        let scale = match (args.scale_rewards, args.advantage) {
            (Some(ScaleRewards::Group), _) => GroupScale::Group,
            (Some(ScaleRewards::Batch), _) => GroupScale::Batch,
            (Some(ScaleRewards::None), _) => GroupScale::None,
            (None, AdvantageEstimator::Rloo) => GroupScale::None,
            (None, _) => GroupScale::Group,
        };
        let agg = match args.loss_type {
            LossType::Grpo => Aggregation::Grpo,
            LossType::Bnpo => Aggregation::Bnpo,
            // The normaliser is set per rollout batch.
            LossType::Dapo => Aggregation::Dapo { num_items: 1.0 },
            LossType::DrGrpo => Aggregation::DrGrpo {
                max_completion_length: args.max_new_tokens,
            },
        };
        Ok(Settings {
            is_cap: is_correction_cap(args.is_correction_cap)?,
            group: args.num_generations,
            scale,
            loss: PolicyLossCfg {
                clip_low: args.epsilon,
                clip_high: eps_high,
                dual_clip: args.delta,
                kl_coef: match args.advantage {
                    AdvantageEstimator::ReinforcePp => 0.0,
                    _ => args.beta,
                },
                entropy_coef: args.entropy_coef,
                agg,
            },
        })
    }
}

/// Trains with GRPO as `args` say, on backend `be`, scoring completions with `reward`.
/// `args.out`, `args.model` and `args.data` must be set (the CLI's [`run`] fills in `out`).
/// Returns when the run is done, or interrupted by `stop_after_micro_steps`; a non-finite loss
/// or gradient is [`Error::NonFinite`], raised before the bad update, with the checkpoints
/// kept.
pub fn train<B: DecodeOps + LossOps>(
    be: &B,
    args: &GrpoArgs,
    reward: &mut dyn RewardSource,
) -> Result<GrpoSummary> {
    let out = args
        .out
        .clone()
        .ok_or_else(|| Error::Invalid("grpo: no output directory (--out)".into()))?;
    let model_dir = args
        .model
        .clone()
        .ok_or_else(|| Error::Invalid("grpo: no model (--model DIR)".into()))?;
    let data_path = args
        .data
        .clone()
        .ok_or_else(|| Error::Invalid("grpo: no prompts (--data)".into()))?;
    let settings = Settings::new(args)?;

    // Everything that can fail on bad input happens before the run directory is touched.
    let resume_from = if args.resume {
        let ck = checkpoint::latest_checkpoint(&out)?.ok_or_else(|| Error::Run {
            path: out.clone(),
            msg: "no complete checkpoint to resume from".into(),
        })?;
        Some((checkpoint::load_trainer_state(&ck)?, ck))
    } else {
        checkpoint::check_new_run_dir(&out)?;
        None
    };
    let tok = Tokenizer::load(&model_dir)?;
    let mut model = match &resume_from {
        Some((_, ck)) => Model::load(be, ck)?,
        None => Model::load(be, &model_dir)?,
    };
    if tok.vocab_size() > model.cfg.vocab_size {
        return Err(Error::Invalid(format!(
            "the tokenizer has {} tokens but the model's embedding only {} rows",
            tok.vocab_size(),
            model.cfg.vocab_size
        )));
    }
    // The EOS appended to labelled completions and the pad id are SFT's, so S-GRPO's
    // supervised term sees the sequences SFT saw; sampling stops at generation's EOS ids.
    let (eos, pad) = data::special_ids(&tok, &model.cfg)?;
    let mut stop_ids = eos_ids(&model_dir, &model.cfg, &tok);
    if stop_ids.is_empty() {
        stop_ids.push(eos);
    }
    let prompts = data::load_rl_prompts(&data_path, &tok, eos)?;
    check_prompts(&prompts, &data_path, args, model.cfg.max_position)?;
    // The reference starts where the policy started (or is --ref-model), not at a checkpoint.
    let needs_reference = args.beta > 0.0;
    let reference = if needs_reference {
        let dir = args.ref_model.as_deref().unwrap_or(&model_dir);
        let r = Model::load(be, dir)?;
        if r.cfg.vocab_size != model.cfg.vocab_size {
            return Err(Error::Invalid(format!(
                "the reference model {} has a vocabulary of {}, the policy {}",
                dir.display(),
                r.cfg.vocab_size,
                model.cfg.vocab_size
            )));
        }
        Some(r)
    } else {
        None
    };
    // Prompt and labelled-completion tokens: either changing breaks an exact resume.
    let tokens = prompts
        .iter()
        .map(|p| p.ids.len() + p.completion.as_ref().map_or(0, Vec::len))
        .sum();
    let fingerprint = (prompts.len(), tokens);

    let mut batches = match &resume_from {
        Some((state, _)) => {
            if state.data_fingerprint != fingerprint {
                return Err(Error::Run {
                    path: out.clone(),
                    msg: format!(
                        "cannot resume exactly: the prompts changed ({} lines of {} tokens, now {} of {})",
                        state.data_fingerprint.0, state.data_fingerprint.1, fingerprint.0, fingerprint.1
                    ),
                });
            }
            Batches::at(prompts.len(), args.prompts_per_step, state.data)?
        }
        None => Batches::new(prompts.len(), args.prompts_per_step, data_seed(args.seed))?,
    };
    let mut sample_rng =
        match &resume_from {
            Some((state, _)) => {
                let s: [u64; 4] = serde_json::from_value(state.extra["rollout_rng"].clone())
                    .map_err(|e| Error::Run {
                        path: out.clone(),
                        msg: format!("the checkpoint has no valid sampling RNG state: {e}"),
                    })?;
                Rng::from_state(s)
            }
            None => Rng::new(sampling_seed(args.seed)),
        };
    let mu = args.num_iterations;
    let total_steps = args.steps.unwrap_or(batches.per_epoch() * mu);
    let schedule = LrSchedule {
        base: args.lr,
        warmup: args.warmup_steps,
        total: total_steps,
    };
    let ocfg = OptimConfig {
        lr: args.lr,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        ..OptimConfig::default()
    };
    let mut config = serde_json::to_value(args).expect("the arguments always serialise");
    if let Some(o) = config.as_object_mut() {
        // How this invocation runs, not what the run is: kept out of the record.
        for k in ["resume", "quiet", "stop_after_micro_steps"] {
            o.remove(k);
        }
        o.insert("reward_source".into(), reward.describe().into());
    }
    let mut run = Run::open(RunOptions {
        dir: &out,
        command: "grpo",
        config: &config,
        seed: args.seed,
        fixed_on_resume: FIXED_ON_RESUME,
        resume: resume_from.as_ref().map(|(s, _)| s),
        total_steps: total_steps as u64,
        keep_checkpoints: args.save_total_limit,
        quiet: args.quiet,
    })?;
    let (mut opt, mut step, mut micro) = run.start_optimizer(
        be,
        resume_from.as_ref(),
        ocfg,
        model.layout.total,
        &model_dir,
    )?;

    let rcfg = RolloutConfig {
        sampling: SamplingConfig {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            eos_token_ids: stop_ids,
            stop_strings: vec![],
        },
        group_size: args.num_generations,
        missing_eos_penalty: args.missing_eos_penalty,
    };
    let mut summary = GrpoSummary {
        run_dir: out.clone(),
        steps: step,
        total_steps: total_steps as u64,
        interrupted: false,
        skipped_steps: 0,
        last_reward: None,
        last_kl: None,
    };
    let mut grads = be.zeros(model.layout.total);
    let mut last_save = step;
    let mut current: Option<Prepared> = None;
    while step < total_steps as u64 {
        if current.is_none() || step % mu as u64 == 0 {
            let idx = batches.next_batch();
            let batch_prompts: Vec<RolloutPrompt> = idx
                .iter()
                .map(|&i| RolloutPrompt {
                    text: prompts[i].text.clone(),
                    ids: prompts[i].ids.clone(),
                    answer: prompts[i].answer.clone(),
                })
                .collect();
            let mut roll = rollout(
                be,
                &model,
                reference.as_ref(),
                None,
                &batch_prompts,
                reward,
                &tok,
                &rcfg,
                &mut sample_rng,
            )?;
            let sft: Vec<(Vec<u32>, Vec<u32>)> = if args.sft_coef > 0.0 {
                idx.iter()
                    .map(|&i| {
                        let c = prompts[i].completion.clone().expect("checked at load");
                        (prompts[i].ids.clone(), c)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let correction = settings
                .is_cap
                .map(|cap| correct_sampling(be, &model, &mut roll, cap))
                .transpose()?;
            current = Some(prepare(be, roll, correction, sft, args, &settings)?);
        }
        let prep = current.as_ref().expect("prepared above");

        let t0 = Instant::now();
        be.fill(be.all_mut(&mut grads), 0.0);
        let mut cfg = settings.loss;
        if let Aggregation::Dapo { num_items } = &mut cfg.agg {
            *num_items = prep.num_items;
        }
        let filled = prep.micro.iter().flatten().count();
        let dloss = match cfg.agg {
            Aggregation::Dapo { .. } => 1.0,
            _ => 1.0 / filled.max(1) as f32,
        };
        let learns = filled > 0 || !prep.sft.iter().all(Vec::is_empty);
        let (mut loss, mut sft_loss, mut tokens) = (0.0f64, 0.0f64, 0usize);
        let mut sums = StatSums::default();
        for k in 0..args.grad_accum {
            if args.stop_after_micro_steps == Some(micro) {
                summary.interrupted = true;
                return Ok(summary);
            }
            micro += 1;
            if let Some(m) = &prep.micro[k] {
                let s = policy_micro(be, &model, m, &cfg, dloss, &mut grads)?;
                if !s.loss.is_finite() {
                    return Err(run.non_finite(
                        &format!("loss ({}) in micro-batch {micro}", s.loss),
                        step + 1,
                    ));
                }
                loss += s.loss * dloss as f64;
                sums.add(&s);
                tokens += m.roll.batch.mask.iter().filter(|&&x| x).count();
            }
            if !prep.sft[k].is_empty() {
                let nll = sft_micro(
                    be,
                    &model,
                    &prep.sft[k],
                    prep.prompts,
                    args.sft_coef,
                    pad,
                    &mut grads,
                )?;
                if !nll.is_finite() {
                    return Err(run.non_finite(
                        &format!("supervised NLL ({nll}) in micro-batch {micro}"),
                        step + 1,
                    ));
                }
                sft_loss += nll;
            }
        }
        loss += args.sft_coef as f64 * sft_loss;
        let lr_now = schedule.at(step);
        let mut values: Vec<(&str, f64)> = Vec::new();
        if learns {
            // Checked before the update, so the weights stay as they were.
            let norm = grad_norm(be, &grads);
            if !norm.is_finite() {
                return Err(run.non_finite(&format!("gradient norm ({norm})"), step + 1));
            }
            opt.update(be, &model.layout, &mut model.params, &mut grads, lr_now);
            values.extend([("loss", loss), ("grad_norm", norm as f64)]);
        } else {
            summary.skipped_steps += 1;
            run.note(&format!(
                "step {}: every group's rewards agree; nothing to learn, no update",
                step + 1
            ));
            values.push(("skipped", 1.0));
        }
        step += 1;
        let elapsed = t0.elapsed().as_secs_f64();
        values.extend(prep.metrics.iter().copied());
        if filled > 0 {
            values.extend(sums.means(reference.is_some()));
        }
        if args.sft_coef > 0.0 {
            values.push(("sft_loss", sft_loss));
        }
        values.extend([
            ("learning_rate", lr_now as f64),
            ("train_tokens_per_s", tokens as f64 / elapsed.max(1e-9)),
            ("time/train_s", elapsed),
        ]);
        summary.last_reward = values.iter().find(|v| v.0 == "reward").map(|v| v.1);
        summary.last_kl = (reference.is_some() && filled > 0).then(|| sums.mean(sums.kl));
        run.log(step, &values)?;
        summary.steps = step;
        let boundary = step % mu as u64 == 0;
        if args.save_every > 0
            && boundary
            && step / args.save_every as u64 > last_save / args.save_every as u64
        {
            let state = TrainerState {
                step,
                micro_step: micro,
                data: batches.position(),
                data_fingerprint: fingerprint,
                lr: schedule,
                optimizer: ocfg,
                config: config.clone(),
                engine: run.engine.clone(),
                extra: serde_json::json!({ "rollout_rng": sample_rng.state() }),
            };
            run.checkpoint(be, &model, &opt, &state, &[])?;
            last_save = step;
        }
    }
    run.save_final(be, &model)?;
    Ok(summary)
}

/// Refuses prompts the run could not use: too long for the context with the generation
/// budget, or (S-GRPO) without a labelled completion, or with one too long.
fn check_prompts(prompts: &[RlPrompt], path: &Path, args: &GrpoArgs, context: usize) -> Result<()> {
    for p in prompts {
        let bad = |msg: String| Error::Data {
            path: path.to_path_buf(),
            line: p.line,
            msg,
        };
        if p.ids.len() + args.max_new_tokens > context {
            return Err(bad(format!(
                "the prompt is {} tokens; with --max-new-tokens {} that exceeds the model's context \
                 of {context}",
                p.ids.len(),
                args.max_new_tokens
            )));
        }
        if args.sft_coef > 0.0 {
            let c = p.completion.as_ref().ok_or_else(|| {
                bad("--sft-coef needs a labelled \"completion\" on every line".into())
            })?;
            if p.ids.len() + c.len() > context {
                return Err(bad(format!(
                    "prompt + completion is {} tokens, longer than the model's context of {context}",
                    p.ids.len() + c.len()
                )));
            }
        }
    }
    Ok(())
}

/// Turns a fresh rollout into micro-batches with advantages: logs its reward statistics (and
/// the sampling correction's, when there is one), drops agreeing groups (dynamic sampling),
/// masks truncated completions if asked, computes the advantages over the kept rows, and
/// splits rows, importance weights and S-GRPO examples into `grad_accum` slots.
fn prepare<B: LossOps>(
    be: &B,
    roll: Rollout,
    correction: Option<SamplingCorrection>,
    sft: Vec<(Vec<u32>, Vec<u32>)>,
    args: &GrpoArgs,
    s: &Settings,
) -> Result<Prepared> {
    let n = roll.len();
    let g = s.group;
    // Group statistics over every sampled row, as TRL logs them.
    let mut adv = be.zeros(n);
    let mut stds = be.zeros(n);
    let scores = be.upload(&roll.scores);
    let stats = be.group_advantages(
        be.all_mut(&mut adv),
        None,
        Some(be.all_mut(&mut stds)),
        be.all(&scores),
        n,
        &GroupAdvCfg {
            group: g,
            baseline: GroupBaseline::Mean,
            scale: GroupScale::None,
            eps: 1e-4,
        },
    );
    let stds = be.download(be.all(&stds));
    let mut metrics = vec![
        ("reward", mean(&roll.scores)),
        ("reward_std", mean(&stds)),
        ("frac_reward_zero_std", stats.frac_zero_std),
        ("completions/mean_length", roll.mean_length()),
        ("completions/clipped_ratio", roll.clipped_ratio()),
        ("rollout_tokens_per_s", roll.timing.tokens_per_s()),
        ("time/generate_s", roll.timing.generate_s),
        ("time/reward_s", roll.timing.reward_s),
        ("time/reference_s", roll.timing.reference_s),
    ];
    if let Some(c) = &correction {
        metrics.extend(c.metrics());
    }
    let is_weight = correction.map(|c| c.weights);

    let (mut roll, is_weight) = if args.dynamic_sampling {
        // A group's std is 0 exactly when its rewards all agree (TRL's isclose tolerance).
        let kept: Vec<usize> = (0..n).filter(|&i| stds[i] > 1e-8).collect();
        metrics.push(("frac_groups_kept", kept.len() as f64 / n.max(1) as f64));
        let w = is_weight.map(|w| roll.take_tokens(&w, &kept));
        (roll.select(&kept), w)
    } else {
        (roll, is_weight)
    };
    if args.mask_truncated_completions {
        let t = roll.batch.t;
        for (r, _) in roll.truncated.iter().enumerate().filter(|(_, &tr)| tr) {
            roll.completion_mask[r * t..(r + 1) * t].fill(0.0);
        }
    }
    let n = roll.len();
    let num_items = roll.completion_mask.iter().map(|&m| m as f64).sum();

    let (adv, per_token) = if n == 0 {
        (Vec::new(), false)
    } else if args.advantage == AdvantageEstimator::ReinforcePp {
        let rows = roll.rows();
        let mask = be.upload(&roll.completion_mask);
        let old = be.upload(&roll.old_logp);
        // Without a reference (β = 0) the KL penalty is zero: compare the policy with itself.
        let refl = roll.ref_logp.as_deref().map(|r| be.upload(r));
        let scores = be.upload(&roll.scores);
        let mut rewards = be.zeros(rows.n());
        be.kl_shaped_rewards(
            be.all_mut(&mut rewards),
            be.all(&old),
            be.all(refl.as_ref().unwrap_or(&old)),
            be.all(&scores),
            be.all(&mask),
            rows,
            &KlRewardCfg {
                kl_coef: args.beta,
                estimator: KlEstimator::K1,
            },
        );
        let (mut adv, mut returns) = (be.zeros(rows.n()), be.zeros(rows.n()));
        be.reinforce_pp(
            be.all_mut(&mut adv),
            be.all_mut(&mut returns),
            be.all(&rewards),
            be.all(&mask),
            rows,
            1.0,
        );
        (be.download(be.all(&adv)), true)
    } else {
        let mut adv = be.zeros(n);
        let scores = be.upload(&roll.scores);
        be.group_advantages(
            be.all_mut(&mut adv),
            None,
            None,
            be.all(&scores),
            n,
            &GroupAdvCfg {
                group: g,
                baseline: match args.advantage {
                    AdvantageEstimator::Rloo => GroupBaseline::LeaveOneOut,
                    _ => GroupBaseline::Mean,
                },
                scale: s.scale,
                eps: 1e-4,
            },
        );
        (be.download(be.all(&adv)), false)
    };

    let micro = split(n, args.grad_accum)
        .into_iter()
        .map(|r| {
            if r.is_empty() {
                return None;
            }
            let rows: Vec<usize> = r.collect();
            let adv = if per_token {
                roll.take_tokens(&adv, &rows)
            } else {
                rows.iter().map(|&i| adv[i]).collect()
            };
            Some(Micro {
                roll: roll.select(&rows),
                adv,
                per_token,
                is_weight: is_weight.as_ref().map(|w| roll.take_tokens(w, &rows)),
            })
        })
        .collect();
    let prompts = sft.len();
    let mut sft = sft.into_iter();
    let sft = split(prompts, args.grad_accum)
        .into_iter()
        .map(|r| sft.by_ref().take(r.len()).collect())
        .collect();
    Ok(Prepared {
        micro,
        num_items,
        sft,
        prompts,
        metrics,
    })
}

fn mean(xs: &[f32]) -> f64 {
    xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len().max(1) as f64
}

/// The cap a `--is-correction-cap` flag asks for: `None` (no correction) when absent or 0.
pub fn is_correction_cap(flag: Option<f32>) -> Result<Option<f32>> {
    match flag {
        None | Some(0.0) => Ok(None),
        Some(c) if c.is_finite() && c > 0.0 => Ok(Some(c)),
        Some(c) => Err(Error::Invalid(format!(
            "--is-correction-cap {c} must be a finite number > 0 (or 0: off)"
        ))),
    }
}

/// Truncated importance-sampling correction of a rollout's sampling log-probs (TRL's
/// `vllm_importance_sampling_correction`, `token_truncate` mode): the training forward's π_old
/// and the sampler's log-probs can disagree (on a GPU: a bf16 decode kernel against the
/// full-sequence kernel), so each completion token's policy loss is weighted by
/// `w = min(π_old / π_sampling, cap)`, with the gap logged.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingCorrection {
    /// Per-token weights (`B·T`, laid out as the rollout), 0 off the completion.
    pub weights: Vec<f32>,
    /// Mean over completion tokens of `|logp_train - logp_sampling|`.
    pub gap_mean: f64,
    /// Largest `|logp_train - logp_sampling|` over completion tokens (0 without one).
    pub gap_max: f64,
    /// Mean weight over completion tokens.
    pub weight_mean: f64,
    /// Fraction of completion tokens whose ratio exceeds the cap (their weight is the cap).
    pub capped_frac: f64,
}

impl SamplingCorrection {
    /// The weights and gap statistics over the tokens where `mask` is nonzero, all views
    /// `B·T`. TRL's `grpo_trainer.py`: `importance_sampling_ratio =
    /// torch.exp(old_per_token_logps - sampling_per_token_logps)`, then
    /// `torch.clamp(importance_sampling_ratio, max=vllm_importance_sampling_cap)`: truncated at
    /// the top only, per token; a ratio below 1 is kept.
    pub fn new(
        logp_train: &[f32],
        logp_sampling: &[f32],
        mask: &[f32],
        cap: f32,
    ) -> SamplingCorrection {
        assert_eq!(logp_train.len(), mask.len());
        assert_eq!(logp_sampling.len(), mask.len());
        let cap = cap as f64;
        let mut weights = vec![0.0f32; mask.len()];
        let (mut tokens, mut gap_sum, mut gap_max, mut w_sum, mut capped) =
            (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (i, &m) in mask.iter().enumerate() {
            if m == 0.0 {
                continue;
            }
            let d = logp_train[i] as f64 - logp_sampling[i] as f64;
            let ratio = d.exp();
            let w = ratio.min(cap);
            weights[i] = w as f32;
            tokens += 1.0;
            gap_sum += d.abs();
            gap_max = gap_max.max(d.abs());
            w_sum += w;
            capped += (ratio > cap) as u8 as f64;
        }
        let n = tokens.max(1.0);
        SamplingCorrection {
            weights,
            gap_mean: gap_sum / n,
            gap_max,
            weight_mean: w_sum / n,
            capped_frac: capped / n,
        }
    }

    /// The per-rollout metrics, by the names the metrics log gives them.
    pub fn metrics(&self) -> [(&'static str, f64); 4] {
        [
            ("sampling_logp_gap_mean", self.gap_mean),
            ("sampling_logp_gap_max", self.gap_max),
            ("is_weight_mean", self.weight_mean),
            ("is_capped_frac", self.capped_frac),
        ]
    }
}

/// Recomputes π_old of a fresh rollout with the training forward (full sequence,
/// teacher-forced, at the rollout's temperature), puts it in `roll.old_logp` in place of the
/// sampling log-probs, and returns the correction of the latter with `cap`.
pub fn correct_sampling<B: ModelOps>(
    be: &B,
    model: &Model<B>,
    roll: &mut Rollout,
    cap: f32,
) -> Result<SamplingCorrection> {
    let mut train = sequence_logprobs(be, model, &roll.batch, &roll.targets, roll.temperature)?;
    // A rollout's per-token vectors are 0 off the completion.
    for (x, &m) in train.iter_mut().zip(&roll.completion_mask) {
        if m == 0.0 {
            *x = 0.0;
        }
    }
    let c = SamplingCorrection::new(&train, &roll.old_logp, &roll.completion_mask, cap);
    roll.old_logp = train;
    Ok(c)
}

/// Token-weighted sums of the policy-loss diagnostics over a step's micro-batches.
#[derive(Default)]
struct StatSums {
    tokens: f64,
    kl: f64,
    entropy: f64,
    clipfrac: f64,
    approx_kl: f64,
}

impl StatSums {
    fn add(&mut self, s: &PolicyLossStats) {
        self.tokens += s.tokens;
        self.kl += s.kl * s.tokens;
        self.entropy += s.entropy * s.tokens;
        self.clipfrac += s.clipfrac * s.tokens;
        self.approx_kl += s.approx_kl * s.tokens;
    }

    fn mean(&self, sum: f64) -> f64 {
        sum / self.tokens.max(1.0)
    }

    /// The step's token means, with TRL's names; the KL only where there is a reference.
    fn means(&self, with_kl: bool) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("objective/entropy", self.mean(self.entropy)),
            ("policy/clipfrac", self.mean(self.clipfrac)),
            ("policy/approxkl", self.mean(self.approx_kl)),
        ];
        if with_kl {
            v.push(("objective/kl", self.mean(self.kl)));
        }
        v
    }
}

/// Forward, clipped-surrogate loss and backward of one micro-batch; adds its gradient (scaled
/// by `dloss`) into `grads`.
fn policy_micro<B: ModelOps + LossOps>(
    be: &B,
    model: &Model<B>,
    m: &Micro,
    cfg: &PolicyLossCfg,
    dloss: f32,
    grads: &mut B::Buf,
) -> Result<PolicyLossStats> {
    let r = &m.roll;
    let n = r.batch.n();
    let acts = model.forward(be, &r.batch)?;
    // Entropy is always taken: it is a metric users watch for collapse, and cheap beside the
    // head's matmul.
    let (logp, entropy) = model.head_logprobs(
        be,
        &acts.hidden,
        &r.targets,
        r.temperature,
        true,
        HEAD_CHUNK,
    )?;
    let up = |v: &[f32]| be.upload(v);
    let (logp, old, mask, adv) = (
        up(&logp),
        up(&r.old_logp),
        up(&r.completion_mask),
        up(&m.adv),
    );
    let reference = r.ref_logp.as_deref().map(up);
    let entropy = entropy.as_deref().map(up);
    let is_weight = m.is_weight.as_deref().map(up);
    let mut dlogp = be.zeros(n);
    let mut dentropy = (cfg.entropy_coef != 0.0).then(|| be.zeros(n));
    let inputs = PolicyLossInputs {
        logp: be.all(&logp),
        logp_old: be.all(&old),
        advantages: if m.per_token {
            Advantages::PerToken(be.all(&adv))
        } else {
            Advantages::PerSequence(be.all(&adv))
        },
        logp_ref: reference.as_ref().map(|b| be.all(b)),
        entropy: entropy.as_ref().map(|b| be.all(b)),
        is_weight: is_weight.as_ref().map(|b| be.all(b)),
        mask: be.all(&mask),
        rows: r.rows(),
    };
    let stats = be.policy_loss(
        &inputs,
        cfg,
        None,
        Some(PolicyLossGrad {
            dlogp: be.all_mut(&mut dlogp),
            dentropy: dentropy.as_mut().map(|d| be.all_mut(d)),
            dloss,
        }),
    );
    let dlogp = be.download(be.all(&dlogp));
    let dentropy = dentropy.map(|d| be.download(be.all(&d)));
    let (dhidden, _) = model.head_logprobs_backward(
        be,
        &acts.hidden,
        &r.targets,
        r.temperature,
        &dlogp,
        dentropy.as_deref(),
        HEAD_CHUNK,
        grads,
    )?;
    model.backward(be, &acts, &dhidden, grads);
    model.recycle(acts);
    Ok(stats)
}

/// S-GRPO's supervised term on one slot's examples: each example's per-token NLL of its
/// labelled completion, divided by `prompts` (so the slots add up to the mean over the step's
/// prompts); adds `coef` times its gradient into `grads` and returns the slot's share of the
/// mean NLL.
fn sft_micro<B: ModelOps>(
    be: &B,
    model: &Model<B>,
    examples: &[(Vec<u32>, Vec<u32>)],
    prompts: usize,
    coef: f32,
    pad: u32,
    grads: &mut B::Buf,
) -> Result<f64> {
    let rows: Vec<Vec<u32>> = examples
        .iter()
        .map(|(p, c)| p.iter().chain(c).copied().collect())
        .collect();
    let batch = Batch::new(&rows, pad, Pad::Right);
    let t = batch.t;
    let mut w = vec![0.0f32; batch.n()];
    for (r, (p, c)) in examples.iter().enumerate() {
        let start = r * t + p.len() - 1;
        w[start..start + c.len()].fill(1.0 / (c.len() * prompts) as f32);
    }
    let targets = shifted_targets(&batch);
    let acts = model.forward(be, &batch)?;
    // The gradient w.r.t. each log-prob is known before the log-probs: one pass over the LM
    // head gives both.
    let dlogp: Vec<f32> = w.iter().map(|&w| -coef * w).collect();
    let (dhidden, logp) = model.head_logprobs_backward(
        be,
        &acts.hidden,
        &targets,
        1.0,
        &dlogp,
        None,
        HEAD_CHUNK,
        grads,
    )?;
    model.backward(be, &acts, &dhidden, grads);
    model.recycle(acts);
    let nll = -logp
        .iter()
        .zip(&w)
        .map(|(&l, &w)| (l * w) as f64)
        .sum::<f64>();
    Ok(nll)
}

/// `rlhf grpo`: trains on the backend `--device` selects, scoring with the `--reward` sources.
pub fn run(args: &GrpoArgs) -> anyhow::Result<()> {
    crate::with_backend!(args.device, |be| run_on(be, args))
}

fn run_on<B: crate::backend::DecodeOps + crate::backend::LossOps>(
    be: &B,
    args: &GrpoArgs,
) -> anyhow::Result<()> {
    let mut args = args.clone();
    if args.out.is_none() {
        anyhow::ensure!(
            !args.resume,
            "--resume needs --out RUN_DIR: the run to continue"
        );
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        args.out = Some(PathBuf::from(format!("runs/grpo-{secs}")));
    }
    anyhow::ensure!(
        !args.reward.is_empty(),
        "grpo needs a reward: --reward SPEC (exact_match, format=REGEX, length=N, model=DIR, command=CMD)"
    );
    let model_dir = args.model.clone().ok_or_else(|| {
        anyhow::anyhow!("grpo needs --model DIR (a Hugging Face model directory)")
    })?;
    let tok = Tokenizer::load(&model_dir)?;
    let mut reward = reward::from_specs(&args.reward, Some(&tok))?;
    let s = train(be, &args, reward.as_mut())?;
    if s.interrupted {
        println!(
            "Stopped after step {} of {}; --resume continues from the last checkpoint.",
            s.steps, s.total_steps
        );
    } else {
        let fmt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.4}"));
        println!(
            "Done: {} steps ({} skipped), last reward {}, KL {}.",
            s.steps,
            s.skipped_steps,
            fmt(s.last_reward),
            fmt(s.last_kl)
        );
        println!(
            "Model (HF directory): {d}; metrics: {d}/{m}; config: {d}/{c}",
            d = s.run_dir.display(),
            m = checkpoint::METRICS_FILE,
            c = checkpoint::RUN_CONFIG_FILE
        );
    }
    Ok(())
}
