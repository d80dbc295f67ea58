//! Reward-model training (`rlhf rm`): a scalar head read at each sequence's last token, trained
//! with the Bradley-Terry loss `-log σ(r_chosen - r_rejected - margin)` on preference pairs
//! (TRL's `RewardTrainer`), optionally with reward centering.
//!
//! A reward model is the policy's architecture with the LM head replaced by a `[1, C]` score
//! head ([`Head::Score`]), saved as an HF `*ForSequenceClassification` directory. Sequences are
//! tokenised as SFT tokenises them (prompt with special tokens, completion without, EOS
//! appended), so the score is read at the EOS that ends each completion.
//!
//! Normalisation: each micro-batch's loss is the mean over its pairs; with gradient
//! accumulation the step uses the mean of the micro-batch gradients, as in SFT.

use crate::algo::sft;
use crate::backend::cuda::DeviceChoice;
use crate::backend::loss::{BtCfg, BtGrad, LossOps};
use crate::backend::ModelOps;
use crate::checkpoint::{self, LrSchedule, Run, RunOptions, TrainerState};
use crate::data::{self, Batches, PreferencePair, SftTokenizing};
use crate::model::config::Head;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::Activations;
use crate::model::{Batch, Config, Layout, Model};
use crate::optim::{grad_norm, OptimConfig};
use crate::rng::Rng;
use crate::{Error, Result};
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `rlhf rm` (and the configuration recorded in `run_config.json`).
#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RmArgs {
    /// Model to start from: a Hugging Face directory holding a language model (its LM head is
    /// replaced by a fresh score head) or a reward model (trained further); or a built-in
    /// configuration (gpt2-tiny, llama-tiny, gpt2-6l-384) initialised at random, which needs
    /// --tokenizer.
    #[arg(long)]
    pub model: Option<String>,
    /// Tokenizer directory (tokenizer.json, tokenizer_config.json); defaults to --model's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Preference pairs, JSONL: {"prompt","chosen","rejected"} (strings, or TRL's
    /// conversational message lists), with an optional numeric "margin".
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out pairs in the same format, for eval_loss and eval_accuracy.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Run directory (checkpoints, metrics, final model) [default: runs/rm-<unix time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Passes over the training data (ignored with --max-steps). One by default: reward models
    /// overfit after one epoch (InstructGPT trains one).
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Optimizer steps to take, overriding --epochs.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Preference pairs per micro-batch (each pair is two sequences).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = DEFAULT_LR)]
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
    /// Coefficient of TRL's reward centering, `coef · mean((r_c + r_r)²)`, which keeps rewards
    /// near zero mean (0: off; TRL suggests 0.01).
    #[arg(long, default_value_t = 0.0)]
    pub center_rewards_coef: f32,
    /// Longest sequence allowed (prompt + completion); defaults to the model's context.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Evaluate on --eval-data every N steps (and after the last); 0: only after the last.
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Write a checkpoint every N steps (0: never).
    #[arg(long, default_value_t = 500)]
    pub save_every: usize,
    /// Checkpoints to keep (0: all).
    #[arg(long, default_value_t = 2)]
    pub save_total_limit: usize,
    /// Seed of the score head's initialisation (and a built-in model's) and the data order.
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

impl Default for RmArgs {
    /// The command line's defaults (one source of truth: clap's).
    fn default() -> Self {
        super::clap_defaults()
    }
}

/// The default peak learning rate: TRL's reward-model examples train at 1e-5.
pub const DEFAULT_LR: f32 = 1e-5;

/// Configuration keys that decide which batches come when, the schedule's length, or the
/// starting weights: a resumed run must keep them to continue exactly.
const FIXED_ON_RESUME: &[&str] = &[
    "model",
    "tokenizer",
    "data",
    "batch_size",
    "grad_accum",
    "epochs",
    "max_steps",
    "seed",
    "max_len",
];

/// A reward model initialised from a language model: every parameter the two share is copied
/// by name, and the score head (which the LM lacks) is drawn from N(0, 1/(C+1)), the value
/// head initialisation of OpenAI's summarisation RLHF and TRL's PPO: rewards start small but
/// not all equal, so the backbone gets a gradient from the first step. The LM head, if untied,
/// is dropped.
pub fn score_model_from_lm<B: ModelOps>(be: &B, lm: &Model<B>, seed: u64) -> Result<Model<B>> {
    if lm.cfg.head != Head::Lm {
        return Err(Error::Invalid(
            "score_model_from_lm: the model has a score head already".into(),
        ));
    }
    let cfg = Config {
        head: Head::Score,
        ..lm.cfg.clone()
    };
    let layout = Layout::new(&cfg);
    let src = be.download(be.all(&lm.params));
    let mut params = vec![0.0; layout.total];
    let mut rng = Rng::new(seed);
    let std = 1.0 / ((cfg.hidden_size + 1) as f64).sqrt();
    for p in &layout.params {
        let dst = &mut params[p.range.clone()];
        if layout.score.as_ref() == Some(&p.range) {
            dst.iter_mut()
                .for_each(|x| *x = (rng.normal() * std) as f32);
            continue;
        }
        let q = lm
            .layout
            .get(&p.name)
            .filter(|q| q.shape == p.shape)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "score_model_from_lm: the language model has no parameter `{}` of shape {:?}",
                    p.name, p.shape
                ))
            })?;
        dst.copy_from_slice(&src[q.range.clone()]);
    }
    Model::new(be, cfg, &params)
}

/// Sums over the pairs of one or more batches, which add up across batches.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairStats {
    /// Σ of the per-batch loss times the batch's pair count.
    pub loss: f64,
    /// Pairs whose chosen reward exceeds the rejected one (margin not applied).
    pub correct: f64,
    /// Σ r_chosen.
    pub chosen: f64,
    /// Σ r_rejected.
    pub rejected: f64,
    /// Pairs counted.
    pub pairs: usize,
}

impl PairStats {
    /// Adds another batch's sums.
    pub fn add(&mut self, o: &PairStats) {
        self.loss += o.loss;
        self.correct += o.correct;
        self.chosen += o.chosen;
        self.rejected += o.rejected;
        self.pairs += o.pairs;
    }

    fn mean(&self, x: f64) -> f64 {
        x / self.pairs.max(1) as f64
    }

    /// Mean loss per pair.
    pub fn loss(&self) -> f64 {
        self.mean(self.loss)
    }

    /// Preference accuracy: the fraction of pairs ranked right.
    pub fn accuracy(&self) -> f64 {
        self.mean(self.correct)
    }

    /// Mean chosen reward.
    pub fn chosen(&self) -> f64 {
        self.mean(self.chosen)
    }

    /// Mean rejected reward.
    pub fn rejected(&self) -> f64 {
        self.mean(self.rejected)
    }

    /// Mean of `r_chosen - r_rejected`.
    pub fn margin(&self) -> f64 {
        self.mean(self.chosen - self.rejected)
    }
}

/// The reward of each row of a right-padded batch: the score head at the row's last real
/// token. Returns the forward pass's activations, the flat index of each row's last token, and
/// the rewards.
pub fn rewards<B: ModelOps>(
    be: &B,
    model: &Model<B>,
    batch: &Batch,
) -> Result<(Activations<B>, Vec<usize>, Vec<f32>)> {
    let acts = model.forward(be, batch)?;
    let values = be.download(be.all(&model.values(be, &acts.hidden, batch.n())?));
    let last: Vec<usize> = (0..batch.b)
        .map(|r| {
            let len = batch.mask[r * batch.t..(r + 1) * batch.t]
                .iter()
                .filter(|&&m| m)
                .count();
            r * batch.t + len.max(1) - 1
        })
        .collect();
    let r = last.iter().map(|&j| values[j]).collect();
    Ok((acts, last, r))
}

/// The Bradley-Terry loss of a batch from [`data::preference_batch`] (chosen rows, then
/// rejected rows) as [`PairStats`]; with `grads`, adds the gradient of the batch's mean loss
/// into it. The score head runs over every position (a `[N, C] × [C]` product, negligible next
/// to the backbone), and the backward pass scatters each pair's reward gradient to its two
/// last-token positions only.
pub fn bt_stats<B: ModelOps + LossOps>(
    be: &B,
    model: &Model<B>,
    batch: &Batch,
    margins: Option<&[f32]>,
    cfg: &BtCfg,
    grads: Option<&mut B::Buf>,
) -> Result<PairStats> {
    let p = batch.b / 2;
    let (acts, last, r) = rewards(be, model, batch)?;
    let (chosen, rejected) = (be.upload(&r[..p]), be.upload(&r[p..]));
    let margins = margins.map(|m| be.upload(m));
    let (mut dc, mut dr) = (be.zeros(p), be.zeros(p));
    let s = be.bt_loss(
        be.all(&chosen),
        be.all(&rejected),
        margins.as_ref().map(|m| be.all(m)),
        p,
        cfg,
        grads.is_some().then(|| BtGrad {
            dchosen: be.all_mut(&mut dc),
            drejected: be.all_mut(&mut dr),
            dloss: 1.0,
        }),
    );
    if let Some(grads) = grads {
        let d: Vec<f32> = be
            .download(be.all(&dc))
            .into_iter()
            .chain(be.download(be.all(&dr)))
            .collect();
        let mut dvalues = vec![0.0; batch.n()];
        for (&j, &d) in last.iter().zip(&d) {
            dvalues[j] = d;
        }
        let dvalues = be.upload(&dvalues);
        let dhidden = model.values_backward(be, &acts.hidden, &dvalues, batch.n(), grads)?;
        model.backward(be, &acts, &dhidden, grads);
    }
    model.recycle(acts);
    let sum = |x: &[f32]| x.iter().map(|&v| v as f64).sum::<f64>();
    Ok(PairStats {
        loss: s.loss * p as f64,
        correct: (s.accuracy * p as f64).round(),
        chosen: sum(&r[..p]),
        rejected: sum(&r[p..]),
        pairs: p,
    })
}

/// The margins of `pairs[idx]` when the data has any (a pair without one gets 0).
fn batch_margins(pairs: &[PreferencePair], idx: &[usize], use_margin: bool) -> Option<Vec<f32>> {
    use_margin.then(|| {
        idx.iter()
            .map(|&i| pairs[i].margin.unwrap_or(0.0))
            .collect()
    })
}

/// The Bradley-Terry loss and preference accuracy of a whole preference set, in file order.
pub fn evaluate<B: ModelOps + LossOps>(
    be: &B,
    model: &Model<B>,
    pairs: &[PreferencePair],
    batch_size: usize,
    pad: u32,
    cfg: &BtCfg,
) -> Result<PairStats> {
    let use_margin = pairs.iter().any(|p| p.margin.is_some());
    let idx: Vec<usize> = (0..pairs.len()).collect();
    let mut total = PairStats::default();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (batch, _) = data::preference_batch(pairs, chunk, pad);
        let m = batch_margins(pairs, chunk, use_margin);
        total.add(&bt_stats(be, model, &batch, m.as_deref(), cfg, None)?);
    }
    Ok(total)
}

/// How a reward-model run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct RmSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimizer steps completed.
    pub steps: u64,
    /// Optimizer steps the run takes in all.
    pub total_steps: u64,
    /// Stopped early by `stop_after_micro_steps` (nothing saved after the last checkpoint).
    pub interrupted: bool,
    /// The last step's training loss.
    pub last_loss: Option<f64>,
    /// The last step's preference accuracy.
    pub last_accuracy: Option<f64>,
    /// The last evaluation's loss.
    pub last_eval_loss: Option<f64>,
    /// The last evaluation's preference accuracy: the share of held-out pairs ranked right.
    pub last_eval_accuracy: Option<f64>,
}

/// The data seed, apart from the score head's (which is `seed` itself).
fn data_seed(seed: u64) -> u64 {
    seed ^ 0xDA7A_5EED_0000_0002
}

/// Trains a reward model as `args` say, on backend `be`. `args.model`, `args.data` and
/// `args.out` must be set. Returns when the run is done, or interrupted by
/// `stop_after_micro_steps`; a non-finite loss or gradient is [`Error::NonFinite`], raised
/// before the bad update, with the checkpoints kept.
pub fn train<B: ModelOps + LossOps>(be: &B, args: &RmArgs) -> Result<RmSummary> {
    let need =
        |x: Option<PathBuf>, what: &str| x.ok_or_else(|| Error::Invalid(format!("rm: no {what}")));
    let out = need(args.out.clone(), "output directory (--out)")?;
    let data_path = need(args.data.clone(), "training data (--data)")?;
    let model_name = args
        .model
        .clone()
        .ok_or_else(|| Error::Invalid("rm: no model (--model)".into()))?;
    if args.batch_size == 0 || args.grad_accum == 0 {
        return Err(Error::Invalid(
            "--batch-size and --grad-accum must be at least 1".into(),
        ));
    }
    if !(args.lr.is_finite() && args.lr >= 0.0) {
        return Err(Error::Invalid(format!(
            "--lr {} is not a learning rate",
            args.lr
        )));
    }
    if !(args.center_rewards_coef.is_finite() && args.center_rewards_coef >= 0.0) {
        return Err(Error::Invalid(format!(
            "--center-rewards-coef {} must be a non-negative number",
            args.center_rewards_coef
        )));
    }

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
    let (mut model, tok, tok_dir) = match &resume_from {
        Some((_, ck)) => (Model::load(be, ck)?, Tokenizer::load(&out)?, out.clone()),
        None => {
            let (m, tok, dir) =
                sft::starting_model(be, &model_name, args.tokenizer.as_deref(), args.seed)?;
            let m = match m.cfg.head {
                Head::Lm => score_model_from_lm(be, &m, args.seed)?,
                Head::Score => m,
            };
            (m, tok, dir)
        }
    };
    let (eos, pad) = data::special_ids(&tok, &model.cfg)?;
    // transformers' *ForSequenceClassification finds each row's last token through the pad id.
    model.cfg.pad_token_id = Some(pad);
    let how = SftTokenizing {
        tok: &tok,
        eos,
        max_len: args
            .max_len
            .unwrap_or(usize::MAX)
            .min(model.cfg.max_position),
    };
    let train_set = data::load_preferences(&data_path, how)?;
    let eval_set = args
        .eval_data
        .as_deref()
        .map(|p| data::load_preferences(p, how))
        .transpose()?;
    let use_margin = train_set.iter().any(|p| p.margin.is_some());
    let fingerprint = (
        train_set.len(),
        train_set
            .iter()
            .map(|p| p.chosen.len() + p.rejected.len())
            .sum(),
    );

    let mut batches = match &resume_from {
        Some((state, _)) => {
            if state.data_fingerprint != fingerprint {
                return Err(Error::Run {
                    path: out.clone(),
                    msg: format!(
                        "cannot resume exactly: the training data changed ({} pairs of {} tokens, now {} of {})",
                        state.data_fingerprint.0, state.data_fingerprint.1, fingerprint.0, fingerprint.1
                    ),
                });
            }
            Batches::at(train_set.len(), args.batch_size, state.data)?
        }
        None => Batches::new(train_set.len(), args.batch_size, data_seed(args.seed))?,
    };
    let total_steps = match args.max_steps {
        Some(s) => s,
        None => (args.epochs * batches.per_epoch() / args.grad_accum).max(1),
    };
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
    let bt = BtCfg {
        center_coef: args.center_rewards_coef,
    };
    let config = checkpoint::config_record(args);
    let mut run = Run::open(RunOptions {
        dir: &out,
        command: "rm",
        config: &config,
        seed: args.seed,
        fixed_on_resume: FIXED_ON_RESUME,
        resume: resume_from.as_ref().map(|(s, _)| s),
        total_steps: total_steps as u64,
        keep_checkpoints: args.save_total_limit,
        quiet: args.quiet,
    })?;
    let (mut opt, mut step, mut micro) =
        run.start_optimizer(be, resume_from.as_ref(), ocfg, model.layout.total, &tok_dir)?;

    let accum = args.grad_accum;
    let mut grads = be.zeros(model.layout.total);
    let mut summary = RmSummary {
        run_dir: out.clone(),
        steps: step,
        total_steps: total_steps as u64,
        interrupted: false,
        last_loss: None,
        last_accuracy: None,
        last_eval_loss: None,
        last_eval_accuracy: None,
    };
    while step < total_steps as u64 {
        let t0 = Instant::now();
        be.fill(be.all_mut(&mut grads), 0.0);
        let (mut loss_sum, mut stats, mut tokens) = (0.0, PairStats::default(), 0usize);
        for _ in 0..accum {
            if args.stop_after_micro_steps == Some(micro) {
                summary.interrupted = true;
                return Ok(summary);
            }
            let idx = batches.next_batch();
            let (batch, _) = data::preference_batch(&train_set, &idx, pad);
            let m = batch_margins(&train_set, &idx, use_margin);
            let s = bt_stats(be, &model, &batch, m.as_deref(), &bt, Some(&mut grads))?;
            micro += 1;
            if !s.loss().is_finite() {
                return Err(run.non_finite(
                    &format!("loss ({}) in micro-batch {micro}", s.loss()),
                    step + 1,
                ));
            }
            loss_sum += s.loss();
            stats.add(&s);
            tokens += batch.mask.iter().filter(|&&m| m).count();
        }
        if accum > 1 {
            be.scale(be.all_mut(&mut grads), 1.0 / accum as f32);
        }
        // Checked before the update, so the weights stay as they were.
        let norm = grad_norm(be, &grads);
        if !norm.is_finite() {
            return Err(run.non_finite(&format!("gradient norm ({norm})"), step + 1));
        }
        let lr_now = schedule.at(step);
        opt.update(be, &model.layout, &mut model.params, &mut grads, lr_now);
        step += 1;
        let elapsed = t0.elapsed().as_secs_f64();

        let loss = loss_sum / accum as f64;
        let mut values = vec![
            ("loss", loss),
            ("accuracy", stats.accuracy()),
            ("rewards/chosen", stats.chosen()),
            ("rewards/rejected", stats.rejected()),
            ("rewards/margins", stats.margin()),
            ("learning_rate", lr_now as f64),
            ("grad_norm", norm as f64),
            ("tokens_per_s", tokens as f64 / elapsed),
        ];
        summary.last_loss = Some(loss);
        summary.last_accuracy = Some(stats.accuracy());
        let eval_now = (args.eval_every > 0 && step % args.eval_every as u64 == 0)
            || step == total_steps as u64;
        if let (Some(eval_set), true) = (&eval_set, eval_now) {
            let e = evaluate(be, &model, eval_set, args.batch_size, pad, &bt)?;
            values.extend([
                ("eval_loss", e.loss()),
                ("eval_accuracy", e.accuracy()),
                ("eval_rewards/chosen", e.chosen()),
                ("eval_rewards/rejected", e.rejected()),
                ("eval_rewards/margins", e.margin()),
            ]);
            summary.last_eval_loss = Some(e.loss());
            summary.last_eval_accuracy = Some(e.accuracy());
        }
        run.log(step, &values)?;
        summary.steps = step;
        if args.save_every > 0 && step % args.save_every as u64 == 0 {
            let state = TrainerState {
                step,
                micro_step: micro,
                data: batches.position(),
                data_fingerprint: fingerprint,
                lr: schedule,
                optimizer: ocfg,
                config: config.clone(),
                engine: run.engine.clone(),
                extra: serde_json::Value::Null,
            };
            run.checkpoint(be, &model, &opt, &state, &[])?;
        }
    }
    run.save_final(be, &model)?;
    Ok(summary)
}

/// `rlhf rm`: trains a reward model on the backend `--device` selects.
pub fn run(args: &RmArgs) -> anyhow::Result<()> {
    crate::with_backend!(args.device, |be| run_on(be, args))
}

fn run_on<B: crate::backend::DecodeOps + crate::backend::LossOps>(
    be: &B,
    args: &RmArgs,
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
        args.out = Some(PathBuf::from(format!("runs/rm-{secs}")));
    }
    anyhow::ensure!(args.model.is_some(), "rm needs --model (a model directory)");
    anyhow::ensure!(
        args.data.is_some(),
        "rm needs --data (preference pairs, JSONL)"
    );
    let s = train(be, &args)?;
    let fmt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.4}"));
    if s.interrupted {
        println!(
            "Stopped after step {} of {}; --resume continues from the last checkpoint.",
            s.steps, s.total_steps
        );
    } else {
        println!(
            "Done: {} steps, loss {}, accuracy {}, eval loss {}, eval accuracy {}.",
            s.steps,
            fmt(s.last_loss),
            fmt(s.last_accuracy),
            fmt(s.last_eval_loss),
            fmt(s.last_eval_accuracy)
        );
        println!(
            "Reward model (HF *ForSequenceClassification directory): {d}; metrics: {d}/{m}",
            d = s.run_dir.display(),
            m = checkpoint::METRICS_FILE
        );
    }
    Ok(())
}
