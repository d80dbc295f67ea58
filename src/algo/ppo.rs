//! PPO for language models (`rlhf ppo`), as the last TRL 0.x `PPOTrainer` runs it, with a clean
//! completion mask.
//!
//! One step:
//! 1. **Rollout**: sample one completion per prompt from the policy ([`rollout`]), score it with
//!    the reward source (minus `missing_eos_penalty` when it never stops), and record the
//!    sampling log-probs, the frozen reference's log-probs and the critic's values, all at the
//!    sampling temperature and aligned with the completion mask.
//! 2. **Rewards**: per token, `-kl_coef · k(logp, logp_ref)` (k1 by default), plus the score on
//!    the last completion token. TRL 0.x put the score one position past the EOS (its
//!    `sequence_lengths_p1`); here it sits on the last token the policy produced, where the
//!    fixtures put it.
//! 3. **Advantages**: GAE (`γ`, `λ`) over each completion, bootstrapping 0 after its end;
//!    returns from the raw advantages, then advantages whitened over the whole rollout batch.
//! 4. **Optimisation**: `ppo_epochs` passes, each a fresh shuffle of the rollout's rows cut into
//!    `num_mini_batches` minibatches, one update per minibatch of the policy (clipped surrogate,
//!    token mean over the minibatch) and of the critic (clipped value loss × `vf_coef`).
//! 5. **KL controller**: with a target KL, the coefficient moves toward it (Ziegler et al. 2019,
//!    TRL 0.x's `AdaptiveKLController`), after the step whose rewards it shaped.
//!
//! With `--is-correction-cap C`, π_old is recomputed by the training forward after the rollout
//! (for the ratio and the KL penalty alike), and each token's clipped surrogate is weighted by
//! the truncated importance ratio `min(π_old / π_sampling, C)`, as GRPO does
//! ([`crate::algo::grpo::SamplingCorrection`]).
//!
//! The critic is a separate value model (a transformer with a scalar head read at every
//! position) with its own AdamW (same learning rate and schedule): initialised from the reward
//! model when the reward is one, or from the policy's body with a zero score head. TRL wraps
//! policy and critic in one module with one optimizer and one gradient clip; here each has its
//! own clip, so a large value gradient cannot shrink the policy's step. The learning rate
//! follows the crate's schedule (warmup, cosine) once per PPO step, where TRL decays linearly.

use crate::algo::grpo::{correct_sampling, is_correction_cap};
use crate::algo::reward::score_model_from_lm;
use crate::algo::sft::{self, HEAD_CHUNK};
use crate::backend::cuda::DeviceChoice;
use crate::backend::loss::{
    Advantages, Aggregation, GaeCfg, Grad, KlEstimator, KlInputs, KlRewardCfg, LossOps,
    PolicyLossCfg, PolicyLossGrad, PolicyLossInputs, ValueLossCfg, ValueLossInputs,
};
use crate::backend::DecodeOps;
use crate::checkpoint::{self, LrSchedule, Run, RunOptions, TrainerState};
use crate::data::{self, Batches};
use crate::model::config::Head;
use crate::model::generate::{eos_ids, SamplingConfig};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{copy_tokenizer_files, SaveDtype};
use crate::model::Model;
use crate::optim::{grad_norm, OptimConfig, Optimizer};
use crate::reward::{self, RewardSource};
use crate::rng::Rng;
use crate::rollout::{rollout, Rollout, RolloutConfig, RolloutPrompt};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the critic's initial weights come from.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CriticInit {
    /// The reward model (`--reward model=DIR`), score head included, as TRL's PPO example
    /// does: the reward model already reads the task.
    Reward,
    /// The policy's body with a zero-initialised score head.
    Policy,
}

/// The per-token KL estimator of the reward penalty (TRL 0.x's `kl_estimator`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PenaltyEstimator {
    /// `logp - logp_ref`: unbiased, can be negative per token (TRL's default).
    K1,
    /// `exp(logp_ref - logp) - (logp_ref - logp) - 1`: unbiased and never negative.
    K3,
}

impl PenaltyEstimator {
    fn op(self) -> KlEstimator {
        match self {
            PenaltyEstimator::K1 => KlEstimator::K1,
            PenaltyEstimator::K3 => KlEstimator::K3,
        }
    }
}

/// Arguments of `rlhf ppo` (and the configuration recorded in `run_config.json`). Defaults are
/// TRL 0.x `PPOConfig`'s.
#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PpoArgs {
    /// Policy to train: a Hugging Face directory with a language-model head (usually an SFT
    /// model), or a built-in configuration initialised at random, which needs --tokenizer.
    #[arg(long)]
    pub model: Option<String>,
    /// Frozen reference model for the KL penalty [default: --model's initial weights].
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// Tokenizer directory (tokenizer.json, tokenizer_config.json); defaults to --model's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Prompts, JSONL: {"prompt", "answer"?}; a prompt may be a TRL message list, rendered with
    /// the chat template.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Reward source, repeatable (summed, each optionally weighted `W*SPEC`): `model=DIR`,
    /// `exact_match[=REGEX]`, `format=REGEX`, `length=CHARS`, `command=SHELL COMMAND`.
    #[arg(long)]
    pub reward: Vec<String>,
    /// Critic initialisation [default: reward when a `model=DIR` reward is given, else policy].
    #[arg(long, value_enum)]
    pub critic_init: Option<CriticInit>,
    /// Run directory (checkpoints, metrics, final policy; the critic in critic/)
    /// [default: runs/ppo-<unix time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// PPO steps: each one rollout batch and its optimisation epochs.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Prompts sampled per step (the rollout batch; one completion each).
    #[arg(long, default_value_t = 8)]
    pub prompts_per_step: usize,
    /// Minibatches each rollout batch is cut into (one update of each model per minibatch).
    #[arg(long, default_value_t = 1)]
    pub num_mini_batches: usize,
    /// Passes over each rollout batch.
    #[arg(long, default_value_t = 4)]
    pub ppo_epochs: usize,
    /// Peak learning rate of both the policy and the critic.
    #[arg(long, default_value_t = 3e-6)]
    pub lr: f32,
    /// Steps of linear warmup before the cosine decay (over PPO steps).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Clip each model's global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// AdamW weight decay (not applied to biases and norms).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// KL penalty coefficient: fixed, or the adaptive controller's initial value.
    #[arg(long, default_value_t = 0.05)]
    pub kl_coef: f32,
    /// Adapt the KL coefficient toward this KL per sequence (nats); unset: fixed coefficient.
    #[arg(long)]
    pub target_kl: Option<f32>,
    /// Horizon of the adaptive KL controller, in sequences.
    #[arg(long, default_value_t = 10000.0)]
    pub kl_horizon: f32,
    /// Per-token KL estimator of the penalty.
    #[arg(long, value_enum, default_value_t = PenaltyEstimator::K1)]
    pub kl_estimator: PenaltyEstimator,
    /// GAE discount γ.
    #[arg(long, default_value_t = 1.0)]
    pub gamma: f32,
    /// GAE λ.
    #[arg(long, default_value_t = 0.95)]
    pub lam: f32,
    /// Policy ratio clip ε.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange: f32,
    /// Value prediction clip ε_v around the rollout's values.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange_value: f32,
    /// Coefficient of the value loss.
    #[arg(long, default_value_t = 0.1)]
    pub vf_coef: f32,
    /// Truncated importance-sampling correction with cap C (TRL's
    /// vllm_importance_sampling_correction): after each rollout, π_old (for the ratio and the
    /// KL penalty) is recomputed by the training forward (one extra forward pass over the
    /// batch) and each token's policy loss is weighted by min(π_old / π_sampling, C); logs the
    /// sampling/training log-prob gap. Absent or 0: off.
    #[arg(long)]
    pub is_correction_cap: Option<f32>,
    /// Subtracted from the score of completions that never produce EOS.
    #[arg(long)]
    pub missing_eos_penalty: Option<f32>,
    /// Completion token budget.
    #[arg(long, default_value_t = 53)]
    pub max_new_tokens: usize,
    /// Sampling temperature; log-probs (old, reference, new) are all taken at it, as TRL does.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Write a checkpoint every N steps (0: never).
    #[arg(long, default_value_t = 50)]
    pub save_every: usize,
    /// Checkpoints to keep (0: all).
    #[arg(long, default_value_t = 2)]
    pub save_total_limit: usize,
    /// Seed of prompt order, sampling, minibatch shuffles and a fresh critic head.
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
    /// Stop (as if killed) before minibatch update N+1: for testing --resume.
    #[arg(long, hide = true)]
    pub stop_after_micro_steps: Option<u64>,
}

impl Default for PpoArgs {
    /// The command line's defaults (one source of truth: clap's).
    fn default() -> Self {
        super::clap_defaults()
    }
}

/// Configuration keys that decide which prompts, samples and minibatches come when, or the
/// schedule's length: a resumed run must keep them to continue exactly.
const FIXED_ON_RESUME: &[&str] = &[
    "model",
    "ref_model",
    "tokenizer",
    "data",
    "reward",
    "critic_init",
    "steps",
    "prompts_per_step",
    "num_mini_batches",
    "ppo_epochs",
    "seed",
];

/// The KL penalty's coefficient: fixed, or adapted toward a target (Ziegler et al. 2019, TRL
/// 0.x's `AdaptiveKLController`): `value *= 1 + clip(kl/target - 1, ±0.2) · n/horizon` after
/// each batch of `n` sequences whose mean KL was `kl`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KlController {
    /// The coefficient the next rollout's rewards are shaped with.
    pub value: f64,
    /// The KL per sequence to steer toward; `None` keeps `value` fixed.
    pub target: Option<f64>,
    /// How many sequences a full proportional correction takes.
    pub horizon: f64,
}

impl KlController {
    /// Moves the coefficient after a batch of `n_sequences` whose mean KL per sequence was
    /// `current`. The error is clipped to ±20% so one odd batch moves it little.
    pub fn update(&mut self, current: f64, n_sequences: usize) {
        if let Some(target) = self.target {
            let error = (current / target - 1.0).clamp(-0.2, 0.2);
            self.value *= 1.0 + error * n_sequences as f64 / self.horizon;
        }
    }
}

/// Trainer state a checkpoint keeps beyond weights, moments and data position.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct PpoExtra {
    /// The KL coefficient, for people reading the file.
    kl_coef: f64,
    /// The same, exactly: a JSON float need not parse back to the same bits.
    kl_coef_bits: u64,
    /// The sampling and minibatch-shuffle RNG.
    rng: [u64; 4],
}

/// How a PPO run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct PpoSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// PPO steps completed.
    pub steps: u64,
    /// PPO steps of the whole run (`--steps`).
    pub total_steps: u64,
    /// Stopped early by `stop_after_micro_steps` (nothing saved after the last checkpoint).
    pub interrupted: bool,
    /// The last step's mean score (`objective/scores`).
    pub last_score: Option<f64>,
    /// The last step's mean KL per sequence (`objective/kl`).
    pub last_kl: Option<f64>,
    /// The KL coefficient the next step would use.
    pub kl_coef: f64,
}

/// Seeds of the independent random streams, apart from one another and from the seed itself.
fn data_seed(seed: u64) -> u64 {
    seed ^ 0xDA7A_5EED_0000_0001
}
fn rollout_seed(seed: u64) -> u64 {
    seed ^ 0x9B0_5EED_0000_0002
}

/// The directories of the `model=DIR` reward specs (each optionally weighted, `W*model=DIR`).
fn reward_model_dirs(specs: &[String]) -> Vec<PathBuf> {
    specs
        .iter()
        .filter_map(|s| {
            let body = match s.split_once('*') {
                Some((w, rest)) if w.trim().parse::<f32>().is_ok() => rest,
                _ => s.as_str(),
            };
            body.trim_start().strip_prefix("model=").map(PathBuf::from)
        })
        .collect()
}

/// Trains with PPO as `args` say, on backend `be`, with the reward source that `args.reward`
/// describes. `args.model`, `args.data` and `args.out` must be set.
pub fn train<B: DecodeOps + LossOps>(be: &B, args: &PpoArgs) -> Result<PpoSummary> {
    let tok = Tokenizer::load(&tokenizer_dir(args)?)?;
    let mut source = reward::from_specs(&args.reward, Some(&tok))?;
    train_with_reward(be, args, source.as_mut())
}

/// Where a run's tokenizer comes from: the run directory when resuming (it was copied there),
/// else `--tokenizer`, else the `--model` directory.
fn tokenizer_dir(args: &PpoArgs) -> Result<PathBuf> {
    match (&args.out, args.resume, &args.tokenizer, &args.model) {
        (Some(out), true, _, _) => Ok(out.clone()),
        (_, _, Some(t), _) => Ok(t.clone()),
        (_, _, None, Some(m)) if Path::new(m).is_dir() => Ok(PathBuf::from(m)),
        (_, _, None, Some(m)) => Err(Error::Invalid(format!(
            "--model {m} is not a model directory; a built-in configuration needs --tokenizer DIR"
        ))),
        (_, _, None, None) => Err(Error::Invalid("ppo: no model (--model)".into())),
    }
}

/// Checks the numeric settings, so that a bad one fails before any work.
fn validate(args: &PpoArgs) -> Result<()> {
    let bad = |msg: String| Err(Error::Invalid(msg));
    let non_negative = |x: f32| x.is_finite() && x >= 0.0;
    if args.prompts_per_step == 0 || args.num_mini_batches == 0 || args.ppo_epochs == 0 {
        return bad(
            "--prompts-per-step, --num-mini-batches and --ppo-epochs must be at least 1".into(),
        );
    }
    if args.num_mini_batches > args.prompts_per_step {
        return bad(format!(
            "--num-mini-batches {} exceeds --prompts-per-step {}: a minibatch would be empty",
            args.num_mini_batches, args.prompts_per_step
        ));
    }
    if args.max_new_tokens == 0 {
        return bad("--max-new-tokens must be at least 1".into());
    }
    if !(args.temperature.is_finite() && args.temperature > 0.0) {
        return bad(format!(
            "--temperature {} must be positive: PPO learns from samples of the policy itself",
            args.temperature
        ));
    }
    for (name, x) in [
        ("--lr", args.lr),
        ("--kl-coef", args.kl_coef),
        ("--cliprange", args.cliprange),
        ("--cliprange-value", args.cliprange_value),
        ("--vf-coef", args.vf_coef),
        ("--max-grad-norm", args.max_grad_norm),
        ("--weight-decay", args.weight_decay),
    ] {
        if !non_negative(x) {
            return bad(format!("{name} {x} must be a non-negative number"));
        }
    }
    for (name, x) in [("--gamma", args.gamma), ("--lam", args.lam)] {
        if !(0.0..=1.0).contains(&x) {
            return bad(format!("{name} {x} must lie in [0, 1]"));
        }
    }
    if let Some(t) = args.target_kl {
        if !(t.is_finite() && t > 0.0) {
            return bad(format!("--target-kl {t} must be positive"));
        }
        if !(args.kl_horizon.is_finite() && args.kl_horizon > 0.0) {
            return bad(format!("--kl-horizon {} must be positive", args.kl_horizon));
        }
    }
    if let Some(p) = args.missing_eos_penalty {
        if !p.is_finite() {
            return bad(format!("--missing-eos-penalty {p} is not a number"));
        }
    }
    is_correction_cap(args.is_correction_cap)?;
    Ok(())
}

/// The critic a fresh run starts from.
fn initial_critic<B: DecodeOps>(
    be: &B,
    args: &PpoArgs,
    policy: &Model<B>,
    tok: &Tokenizer,
) -> Result<Model<B>> {
    let rm_dirs = reward_model_dirs(&args.reward);
    let init = args.critic_init.unwrap_or(if rm_dirs.len() == 1 {
        CriticInit::Reward
    } else {
        CriticInit::Policy
    });
    match init {
        CriticInit::Policy => {
            // A zero score head: values start at 0, so the first advantages are the whitened
            // returns (a plain baseline) rather than the noise of a random head, which would
            // steer the policy until the critic caught up. The body gets a gradient from the
            // second update on, once the head is no longer zero. (The seed only draws the head
            // this overwrites.)
            let mut critic = score_model_from_lm(be, policy, args.seed)?;
            let head = critic
                .layout
                .score
                .clone()
                .expect("a score model has a score head");
            be.fill(be.view_mut(&mut critic.params, head), 0.0);
            Ok(critic)
        }
        CriticInit::Reward => {
            let [dir] = rm_dirs.as_slice() else {
                return Err(Error::Invalid(format!(
                    "--critic-init reward needs exactly one `model=DIR` reward; {} given",
                    rm_dirs.len()
                )));
            };
            let critic = Model::load(be, dir)?;
            if critic.cfg.head != Head::Score {
                return Err(Error::Invalid(format!(
                    "{}: --critic-init reward needs a reward model (a scalar head), found a \
                     language model",
                    dir.display()
                )));
            }
            // The critic reads the policy's token rows; `from_specs` has checked that the two
            // tokenizers agree, and the embedding must hold every id.
            if critic.cfg.vocab_size < tok.vocab_size() {
                return Err(Error::Invalid(format!(
                    "{}: the critic's embedding has {} rows, the policy's tokenizer {} tokens",
                    dir.display(),
                    critic.cfg.vocab_size,
                    tok.vocab_size()
                )));
            }
            Ok(critic)
        }
    }
}

/// The rows of per-token vectors laid out `t_old` wide, re-laid `t_new` wide: the alignment
/// [`Rollout::select`] gives its own vectors (every nonzero lies inside a row's tokens).
fn take_rows(v: &[f32], rows: &[usize], t_old: usize, t_new: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows.len() * t_new];
    for (k, &r) in rows.iter().enumerate() {
        out[k * t_new..(k + 1) * t_new].copy_from_slice(&v[r * t_old..r * t_old + t_new]);
    }
    out
}

/// Per-sequence sums of a per-token vector over each row.
fn row_sums(v: &[f32], t: usize) -> Vec<f64> {
    v.chunks(t.max(1))
        .map(|r| r.iter().map(|&x| x as f64).sum())
        .collect()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// What one rollout batch's rewards, advantages and returns are, with the step's objective
/// metrics (TRL's `objective/*`, per sequence then averaged over the batch).
struct Shaped {
    advantages: Vec<f32>,
    returns: Vec<f32>,
    /// Mean over sequences of the summed per-token KL estimate.
    kl: f64,
    /// Mean over sequences of `Σ -logp` of the sampled tokens (TRL's `objective/entropy`).
    entropy: f64,
    /// Mean over sequences of the summed KL penalty.
    non_score_reward: f64,
    /// Mean score.
    scores: f64,
}

/// Steps 2 and 3 of a PPO step: KL-shaped token rewards, then GAE with whitening.
fn shape<B: LossOps>(be: &B, ro: &Rollout, args: &PpoArgs, kl_coef: f64) -> Result<Shaped> {
    let rows = ro.rows();
    let n = rows.n();
    let missing = |what: &str| Error::Invalid(format!("ppo: the rollout has no {what}"));
    let logp = be.upload(&ro.old_logp);
    let logp_ref = be.upload(
        ro.ref_logp
            .as_deref()
            .ok_or_else(|| missing("reference log-probs"))?,
    );
    let values = be.upload(
        ro.values
            .as_deref()
            .ok_or_else(|| missing("critic values"))?,
    );
    let mask = be.upload(&ro.completion_mask);
    let scores = be.upload(&ro.scores);
    let estimator = args.kl_estimator.op();

    let mut kl_tok = be.zeros(n);
    be.kl(
        &KlInputs {
            logp: be.all(&logp),
            logp_ref: be.all(&logp_ref),
            mask: be.all(&mask),
            rows,
        },
        estimator,
        Aggregation::Bnpo,
        Some(be.all_mut(&mut kl_tok)),
        None,
    );
    let mut rewards = be.zeros(n);
    be.kl_shaped_rewards(
        be.all_mut(&mut rewards),
        be.all(&logp),
        be.all(&logp_ref),
        be.all(&scores),
        be.all(&mask),
        rows,
        &KlRewardCfg {
            kl_coef: kl_coef as f32,
            estimator,
        },
    );
    let (mut adv, mut ret) = (be.zeros(n), be.zeros(n));
    be.gae(
        be.all_mut(&mut adv),
        be.all_mut(&mut ret),
        be.all(&rewards),
        be.all(&values),
        be.all(&mask),
        rows,
        &GaeCfg {
            gamma: args.gamma,
            lam: args.lam,
            whiten: true,
        },
    );

    let kl_seq = row_sums(&be.download(be.all(&kl_tok)), rows.t);
    let neg_logp: Vec<f32> = ro.old_logp.iter().map(|&l| -l).collect();
    let kl = mean(&kl_seq);
    Ok(Shaped {
        advantages: be.download(be.all(&adv)),
        returns: be.download(be.all(&ret)),
        kl,
        entropy: mean(&row_sums(&neg_logp, rows.t)),
        non_score_reward: -kl_coef * kl,
        scores: mean(&ro.scores.iter().map(|&s| s as f64).collect::<Vec<_>>()),
    })
}

/// One minibatch update's statistics (TRL logs their means over the step as `*_avg`).
#[derive(Clone, Copy, Debug, Default)]
struct UpdateStats {
    policy_loss: f64,
    clipfrac: f64,
    approx_kl: f64,
    /// Token mean of the policy's entropy at the sampling temperature.
    entropy: f64,
    value_loss: f64,
    value_clipfrac: f64,
    policy_grad_norm: f64,
    value_grad_norm: f64,
    /// Sequence tokens through a forward and backward pass (of each model).
    tokens: usize,
}

impl UpdateStats {
    fn add(&mut self, o: &UpdateStats) {
        self.policy_loss += o.policy_loss;
        self.clipfrac += o.clipfrac;
        self.approx_kl += o.approx_kl;
        self.entropy += o.entropy;
        self.value_loss += o.value_loss;
        self.value_clipfrac += o.value_clipfrac;
        self.policy_grad_norm += o.policy_grad_norm;
        self.value_grad_norm += o.value_grad_norm;
        self.tokens += o.tokens;
    }
}

/// The gradients of one minibatch's losses: the policy's clipped surrogate (weighted per token
/// by `is_weight` when given) into `pgrads` and `vf_coef ×` the critic's clipped value loss
/// into `cgrads`. Returns the minibatch's statistics (gradient norms left for the caller, who
/// takes them after both backward passes).
#[allow(clippy::too_many_arguments)]
fn minibatch_grads<B: DecodeOps + LossOps>(
    be: &B,
    policy: &Model<B>,
    critic: &Model<B>,
    mb: &Rollout,
    advantages: &[f32],
    returns: &[f32],
    is_weight: Option<&[f32]>,
    args: &PpoArgs,
    pgrads: &mut B::Buf,
    cgrads: &mut B::Buf,
) -> Result<UpdateStats> {
    let rows = mb.rows();
    let n = rows.n();
    let mask = be.upload(&mb.completion_mask);

    let acts = policy.forward(be, &mb.batch)?;
    let (logp, entropy) = policy.head_logprobs(
        be,
        &acts.hidden,
        &mb.targets,
        mb.temperature,
        true,
        HEAD_CHUNK,
    )?;
    let (logp_b, old_b, adv_b) = (
        be.upload(&logp),
        be.upload(&mb.old_logp),
        be.upload(advantages),
    );
    let is_weight = is_weight.map(|w| be.upload(w));
    let mut dlogp = be.zeros(n);
    let p = be.policy_loss(
        &PolicyLossInputs {
            logp: be.all(&logp_b),
            logp_old: be.all(&old_b),
            advantages: Advantages::PerToken(be.all(&adv_b)),
            logp_ref: None,
            entropy: None,
            is_weight: is_weight.as_ref().map(|w| be.all(w)),
            mask: be.all(&mask),
            rows,
        },
        &PolicyLossCfg {
            clip_low: args.cliprange,
            clip_high: args.cliprange,
            dual_clip: None,
            // The KL is in the reward, not the loss.
            kl_coef: 0.0,
            entropy_coef: 0.0,
            agg: Aggregation::Bnpo,
        },
        None,
        Some(PolicyLossGrad {
            dlogp: be.all_mut(&mut dlogp),
            dentropy: None,
            dloss: 1.0,
        }),
    );
    let dlogp = be.download(be.all(&dlogp));
    let (dhidden, _) = policy.head_logprobs_backward(
        be,
        &acts.hidden,
        &mb.targets,
        mb.temperature,
        &dlogp,
        None,
        HEAD_CHUNK,
        pgrads,
    )?;
    policy.backward(be, &acts, &dhidden, pgrads);
    policy.recycle(acts);

    let cacts = critic.forward(be, &mb.batch)?;
    let vpred = critic.values(be, &cacts.hidden, n)?;
    let old_values = be.upload(
        mb.values
            .as_deref()
            .ok_or_else(|| Error::Invalid("ppo: the rollout has no critic values".into()))?,
    );
    let ret_b = be.upload(returns);
    let mut dv = be.zeros(n);
    let v = be.value_loss(
        &ValueLossInputs {
            values: be.all(&vpred),
            values_old: be.all(&old_values),
            returns: be.all(&ret_b),
            mask: be.all(&mask),
            rows,
        },
        &ValueLossCfg {
            clip: Some(args.cliprange_value),
            agg: Aggregation::Bnpo,
        },
        None,
        Some(Grad {
            dx: be.all_mut(&mut dv),
            dloss: args.vf_coef,
        }),
    );
    let dhidden = critic.values_backward(be, &cacts.hidden, &dv, n, cgrads)?;
    critic.backward(be, &cacts, &dhidden, cgrads);
    critic.recycle(cacts);

    let entropy = entropy.expect("asked for");
    let completion_tokens = mb.completion_mask.iter().filter(|&&m| m != 0.0).count();
    let entropy_sum: f64 = entropy
        .iter()
        .zip(&mb.completion_mask)
        .filter(|(_, &m)| m != 0.0)
        .map(|(&e, _)| e as f64)
        .sum();
    Ok(UpdateStats {
        policy_loss: p.loss,
        clipfrac: p.clipfrac,
        approx_kl: p.approx_kl,
        entropy: entropy_sum / completion_tokens.max(1) as f64,
        value_loss: v.loss,
        value_clipfrac: v.clipfrac,
        tokens: mb.batch.mask.iter().filter(|&&m| m).count(),
        ..UpdateStats::default()
    })
}

/// Trains with PPO as `args` say, on backend `be`, scoring completions with `reward` (which
/// `args.reward` then only records). Returns when the run is done, or interrupted by
/// `stop_after_micro_steps`; a non-finite loss or gradient is [`Error::NonFinite`], raised before
/// the bad update, with the checkpoints kept.
pub fn train_with_reward<B: DecodeOps + LossOps>(
    be: &B,
    args: &PpoArgs,
    reward: &mut dyn RewardSource,
) -> Result<PpoSummary> {
    validate(args)?;
    let out = args
        .out
        .clone()
        .ok_or_else(|| Error::Invalid("ppo: no output directory (--out)".into()))?;
    let data_path = args
        .data
        .clone()
        .ok_or_else(|| Error::Invalid("ppo: no prompts (--data)".into()))?;
    let model_name = args
        .model
        .clone()
        .ok_or_else(|| Error::Invalid("ppo: no model (--model)".into()))?;

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
    // The reference is the starting policy (or --ref-model), whether fresh or resumed.
    let (initial, start_tok, tok_dir) =
        sft::starting_model(be, &model_name, args.tokenizer.as_deref(), args.seed)?;
    let reference = match &args.ref_model {
        Some(dir) => Model::load(be, dir)?,
        None => Model::new(
            be,
            initial.cfg.clone(),
            &be.download(be.all(&initial.params)),
        )?,
    };
    for (what, m) in [("--model", &initial), ("--ref-model", &reference)] {
        if m.cfg.head != Head::Lm {
            return Err(Error::Invalid(format!(
                "{what}: PPO needs a language model, found a model with a scalar head"
            )));
        }
    }
    let (tok, mut policy, mut critic) = match &resume_from {
        Some((_, ck)) => (
            Tokenizer::load(&out)?,
            Model::load(be, ck)?,
            Model::load(be, &ck.join(CRITIC_DIR))?,
        ),
        None => {
            let critic = initial_critic(be, args, &initial, &start_tok)?;
            (start_tok, initial, critic)
        }
    };
    let (eos, _) = data::special_ids(&tok, &policy.cfg)?;
    let prompts = data::load_rl_prompts(&data_path, &tok, eos)?;
    let fingerprint = (prompts.len(), prompts.iter().map(|p| p.ids.len()).sum());
    let sampling = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        eos_token_ids: eos_ids(Path::new(&model_name), &policy.cfg, &tok),
        ..SamplingConfig::default()
    };
    let rcfg = RolloutConfig {
        sampling,
        group_size: 1,
        missing_eos_penalty: args.missing_eos_penalty,
    };
    let is_cap = is_correction_cap(args.is_correction_cap)?;

    let mut batches = match &resume_from {
        Some((state, _)) => {
            if state.data_fingerprint != fingerprint {
                return Err(Error::Run {
                    path: out.clone(),
                    msg: format!(
                        "cannot resume exactly: the prompts changed ({} prompts of {} tokens, now {} of {})",
                        state.data_fingerprint.0, state.data_fingerprint.1, fingerprint.0, fingerprint.1
                    ),
                });
            }
            Batches::at(prompts.len(), args.prompts_per_step, state.data)?
        }
        None => Batches::new(prompts.len(), args.prompts_per_step, data_seed(args.seed))?,
    };
    let schedule = LrSchedule {
        base: args.lr,
        warmup: args.warmup_steps,
        total: args.steps,
    };
    let ocfg = OptimConfig {
        lr: args.lr,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        ..OptimConfig::default()
    };
    let config = checkpoint::config_record(args);
    let mut run = Run::open(RunOptions {
        dir: &out,
        command: "ppo",
        config: &config,
        seed: args.seed,
        fixed_on_resume: FIXED_ON_RESUME,
        resume: resume_from.as_ref().map(|(s, _)| s),
        total_steps: args.steps as u64,
        keep_checkpoints: args.save_total_limit,
        quiet: args.quiet,
    })?;
    let mut kl_ctl = KlController {
        value: args.kl_coef as f64,
        target: args.target_kl.map(f64::from),
        horizon: args.kl_horizon as f64,
    };
    let (mut popt, mut copt, mut step, mut micro, mut rng) = match &resume_from {
        Some((state, ck)) => {
            run.note(&format!(
                "resuming from {} (step {})",
                ck.display(),
                state.step
            ));
            let extra: PpoExtra =
                serde_json::from_value(state.extra.clone()).map_err(|e| Error::Run {
                    path: ck.clone(),
                    msg: format!("not a PPO checkpoint (trainer_state.json extra: {e})"),
                })?;
            // An adaptive coefficient continues where it was; a fixed one is what was asked.
            if kl_ctl.target.is_some() {
                kl_ctl.value = f64::from_bits(extra.kl_coef_bits);
            }
            (
                checkpoint::load_optimizer(be, ck, ocfg, policy.layout.total)?,
                checkpoint::load_optimizer(be, &ck.join(CRITIC_DIR), ocfg, critic.layout.total)?,
                state.step,
                state.micro_step,
                Rng::from_state(extra.rng),
            )
        }
        None => {
            if tok_dir != out {
                copy_tokenizer_files(&tok_dir, &out)?;
            }
            (
                Optimizer::new(be, ocfg, policy.layout.total),
                Optimizer::new(be, ocfg, critic.layout.total),
                0,
                0,
                Rng::new(rollout_seed(args.seed)),
            )
        }
    };

    let mut pgrads = be.zeros(policy.layout.total);
    let mut cgrads = be.zeros(critic.layout.total);
    let mut summary = PpoSummary {
        run_dir: out.clone(),
        steps: step,
        total_steps: args.steps as u64,
        interrupted: false,
        last_score: None,
        last_kl: None,
        kl_coef: kl_ctl.value,
    };
    while step < args.steps as u64 {
        let idx = batches.next_batch();
        let batch_prompts: Vec<RolloutPrompt> = idx
            .iter()
            .map(|&i| RolloutPrompt {
                text: prompts[i].text.clone(),
                ids: prompts[i].ids.clone(),
                answer: prompts[i].answer.clone(),
            })
            .collect();
        let mut ro = rollout(
            be,
            &policy,
            Some(&reference),
            Some(&critic),
            &batch_prompts,
            reward,
            &tok,
            &rcfg,
            &mut rng,
        )?;
        // Before the rewards are shaped, so the KL penalty reads the training forward's π_old too.
        let correction = is_cap
            .map(|cap| correct_sampling(be, &policy, &mut ro, cap))
            .transpose()?;
        let kl_coef = kl_ctl.value;
        let shaped = shape(be, &ro, args, kl_coef)?;
        if !shaped.kl.is_finite() {
            return Err(run.non_finite(&format!("KL ({})", shaped.kl), step + 1));
        }

        let t_train = Instant::now();
        let lr_now = schedule.at(step);
        let (mut stats, mut updates) = (UpdateStats::default(), 0usize);
        let b = ro.len();
        let mb_size = b.div_ceil(args.num_mini_batches);
        for _ in 0..args.ppo_epochs {
            let mut order: Vec<usize> = (0..b).collect();
            rng.shuffle(&mut order);
            for rows in order.chunks(mb_size) {
                if args.stop_after_micro_steps == Some(micro) {
                    summary.interrupted = true;
                    return Ok(summary);
                }
                let mb = ro.select(rows);
                let (t_old, t_new) = (ro.batch.t, mb.batch.t);
                let adv = take_rows(&shaped.advantages, rows, t_old, t_new);
                let ret = take_rows(&shaped.returns, rows, t_old, t_new);
                let is_weight = correction
                    .as_ref()
                    .map(|c| take_rows(&c.weights, rows, t_old, t_new));
                be.fill(be.all_mut(&mut pgrads), 0.0);
                be.fill(be.all_mut(&mut cgrads), 0.0);
                let mut u = minibatch_grads(
                    be,
                    &policy,
                    &critic,
                    &mb,
                    &adv,
                    &ret,
                    is_weight.as_deref(),
                    args,
                    &mut pgrads,
                    &mut cgrads,
                )?;
                micro += 1;
                if !(u.policy_loss.is_finite() && u.value_loss.is_finite()) {
                    return Err(run.non_finite(
                        &format!(
                            "loss (policy {}, value {}) in minibatch update {micro}",
                            u.policy_loss, u.value_loss
                        ),
                        step + 1,
                    ));
                }
                // Checked before the updates, so the weights stay as they were.
                let (pn, cn) = (grad_norm(be, &pgrads), grad_norm(be, &cgrads));
                if !(pn.is_finite() && cn.is_finite()) {
                    return Err(run.non_finite(
                        &format!("gradient norm (policy {pn}, critic {cn})"),
                        step + 1,
                    ));
                }
                popt.update(be, &policy.layout, &mut policy.params, &mut pgrads, lr_now);
                copt.update(be, &critic.layout, &mut critic.params, &mut cgrads, lr_now);
                (u.policy_grad_norm, u.value_grad_norm) = (pn as f64, cn as f64);
                stats.add(&u);
                updates += 1;
            }
        }
        let train_s = t_train.elapsed().as_secs_f64();
        kl_ctl.update(shaped.kl, b);
        step += 1;

        let u = updates.max(1) as f64;
        let mut values = vec![
            ("objective/kl", shaped.kl),
            ("objective/entropy", shaped.entropy),
            ("objective/non_score_reward", shaped.non_score_reward),
            (
                "objective/rlhf_reward",
                shaped.scores + shaped.non_score_reward,
            ),
            ("objective/scores", shaped.scores),
            ("policy/approxkl", stats.approx_kl / u),
            ("policy/clipfrac", stats.clipfrac / u),
            ("policy/entropy", stats.entropy / u),
            ("policy/grad_norm", stats.policy_grad_norm / u),
            ("val/vf_loss", stats.value_loss / u),
            ("val/clipfrac", stats.value_clipfrac / u),
            ("val/grad_norm", stats.value_grad_norm / u),
            ("loss/policy_avg", stats.policy_loss / u),
            ("loss/value_avg", stats.value_loss / u),
            ("completions/mean_length", ro.mean_length()),
            ("completions/clipped_ratio", ro.clipped_ratio()),
            ("kl_coef", kl_coef),
            ("learning_rate", lr_now as f64),
            ("rollout_tokens_per_s", ro.timing.tokens_per_s()),
            (
                "train_tokens_per_s",
                stats.tokens as f64 / train_s.max(1e-9),
            ),
        ];
        if let Some(c) = &correction {
            values.extend(c.metrics());
        }
        run.log(step, &values)?;
        summary.steps = step;
        summary.last_score = Some(shaped.scores);
        summary.last_kl = Some(shaped.kl);
        summary.kl_coef = kl_ctl.value;
        if args.save_every > 0 && step % args.save_every as u64 == 0 {
            let extra = PpoExtra {
                kl_coef: kl_ctl.value,
                kl_coef_bits: kl_ctl.value.to_bits(),
                rng: rng.state(),
            };
            let state = TrainerState {
                step,
                micro_step: micro,
                data: batches.position(),
                data_fingerprint: fingerprint,
                lr: schedule,
                optimizer: ocfg,
                config: config.clone(),
                engine: run.engine.clone(),
                extra: serde_json::to_value(extra).expect("the PPO state always serialises"),
            };
            run.checkpoint(be, &policy, &popt, &state, &[(CRITIC_DIR, &critic, &copt)])?;
        }
    }
    run.save_final(be, &policy)?;
    let critic_dir = out.join(CRITIC_DIR);
    critic.save(be, &critic_dir, SaveDtype::F32)?;
    copy_tokenizer_files(&out, &critic_dir)?;
    Ok(summary)
}

/// Where the final critic goes, inside the run directory (an HF directory of its own); also its
/// name inside each checkpoint.
pub const CRITIC_DIR: &str = "critic";

/// `rlhf ppo`: trains on the backend `--device` selects.
pub fn run(args: &PpoArgs) -> anyhow::Result<()> {
    crate::with_backend!(args.device, |be| run_on(be, args))
}

fn run_on<B: crate::backend::DecodeOps + crate::backend::LossOps>(
    be: &B,
    args: &PpoArgs,
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
        args.out = Some(PathBuf::from(format!("runs/ppo-{secs}")));
    }
    let s = train(be, &args)?;
    let fmt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.4}"));
    if s.interrupted {
        println!(
            "Stopped after step {} of {}; --resume continues from the last checkpoint.",
            s.steps, s.total_steps
        );
    } else {
        println!(
            "Done: {} steps, mean score {}, KL {}, KL coefficient {:.4}.",
            s.steps,
            fmt(s.last_score),
            fmt(s.last_kl),
            s.kl_coef
        );
        println!(
            "Policy (HF directory): {d}; critic: {d}/{CRITIC_DIR}; metrics: {d}/{m}",
            d = s.run_dir.display(),
            m = checkpoint::METRICS_FILE
        );
    }
    Ok(())
}
