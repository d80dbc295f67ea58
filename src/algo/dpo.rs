//! Direct preference optimisation (`rlhf dpo`): the policy is trained on preference pairs
//! against a frozen reference, `-log σ(β·[(π_c - ref_c) - (π_r - ref_r)])` and its IPO, hinge
//! and robust variants (TRL's `DPOTrainer`), where `π` and `ref` are sequence log-probs: sums
//! of the completion tokens' log-probs at temperature 1.
//!
//! The reference never changes, so its log-probs are computed once, before the first step, for
//! every training and held-out pair; the reference model is then dropped, and a training step
//! costs one policy forward and backward. They are saved in the run directory
//! ([`REFERENCE_FILE`]), so a resumed run reads them back instead of needing the reference
//! weights (which, when the reference is the policy's own starting point, no longer exist).
//!
//! Normalisation: each micro-batch's loss is the mean over its pairs; with gradient
//! accumulation the step uses the mean of the micro-batch gradients, as in SFT.

use crate::algo::sft::{self, HEAD_CHUNK};
use crate::backend::cuda::DeviceChoice;
use crate::backend::loss::{DpoCfg, DpoGrad, DpoInputs, DpoLoss, DpoOutputs, LossOps, Rows};
use crate::backend::ModelOps;
use crate::checkpoint::{self, LrSchedule, Run, RunOptions, TrainerState};
use crate::data::{self, Batches, PreferencePair, SftTokenizing};
use crate::model::config::Head;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::{shifted_targets, Activations};
use crate::model::weights::write_atomic;
use crate::model::{Batch, Model};
use crate::optim::{grad_norm, OptimConfig};
use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The DPO loss variants, as `--loss-type` names them (TRL's `loss_type` values).
#[derive(
    clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    /// `-log σ(β d)`, with label smoothing cDPO.
    Sigmoid,
    /// `(d' - 1/(2β))²` on length-normalised log-ratios.
    Ipo,
    /// `relu(1 - β d)` (SLiC).
    Hinge,
    /// Robust DPO, unbiased under label noise `--label-smoothing`.
    Robust,
}

impl From<DpoLossType> for DpoLoss {
    fn from(t: DpoLossType) -> DpoLoss {
        match t {
            DpoLossType::Sigmoid => DpoLoss::Sigmoid,
            DpoLossType::Ipo => DpoLoss::Ipo,
            DpoLossType::Hinge => DpoLoss::Hinge,
            DpoLossType::Robust => DpoLoss::Robust,
        }
    }
}

/// Arguments of `rlhf dpo` (and the configuration recorded in `run_config.json`).
#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpoArgs {
    /// Policy to train, usually an SFT'd model: a Hugging Face directory, or a built-in
    /// configuration (gpt2-tiny, llama-tiny, gpt2-6l-384) initialised at random, which needs
    /// --tokenizer. Without --ref-model it is also the frozen reference.
    #[arg(long)]
    pub model: Option<String>,
    /// The frozen reference model's directory [default: --model's starting weights].
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// Tokenizer directory (tokenizer.json, tokenizer_config.json); defaults to --model's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Preference pairs, JSONL: {"prompt","chosen","rejected"} (strings, or TRL's
    /// conversational message lists).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out pairs in the same format, for the eval_ metrics.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Run directory (checkpoints, metrics, final model) [default: runs/dpo-<unix time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// β: the strength of the implicit KL constraint to the reference.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f32,
    /// Loss variant.
    #[arg(long, value_enum, default_value_t = DpoLossType::Sigmoid)]
    pub loss_type: DpoLossType,
    /// Label smoothing ε (sigmoid: cDPO; robust: the assumed label-noise rate), below 0.5.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f32,
    /// Passes over the training data (ignored with --max-steps).
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
    /// Peak learning rate (TRL's DPO default).
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
    /// Seed of the data order (and of a built-in model's initialisation).
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

impl Default for DpoArgs {
    /// The command line's defaults (one source of truth: clap's).
    fn default() -> Self {
        super::clap_defaults()
    }
}

/// Configuration keys a resumed run must keep: those that decide which batches come when,
/// the schedule's length or the starting weights, and those the saved reference log-probs
/// were computed for (the reference, the held-out file).
const FIXED_ON_RESUME: &[&str] = &[
    "model",
    "ref_model",
    "tokenizer",
    "data",
    "eval_data",
    "batch_size",
    "grad_accum",
    "epochs",
    "max_steps",
    "seed",
    "max_len",
];

/// The reference log-probs of a run, in its directory.
pub const REFERENCE_FILE: &str = "reference_logps.safetensors";

/// Sequence log-probs (sums over completion tokens) of each pair of a preference set, in
/// file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SequenceLogps {
    /// Of each chosen completion.
    pub chosen: Vec<f32>,
    /// Of each rejected completion.
    pub rejected: Vec<f32>,
}

/// The reference model's sequence log-probs of a run's training and held-out pairs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReferenceLogps {
    /// Of the training pairs.
    pub train: SequenceLogps,
    /// Of the held-out pairs, when the run has them.
    pub eval: Option<SequenceLogps>,
}

impl ReferenceLogps {
    /// Writes the log-probs as safetensors (`train.chosen`, `train.rejected`, and `eval.*`),
    /// atomically: f32 bits, so a resumed run uses exactly the numbers the first one did.
    pub fn save(&self, path: &Path) -> Result<()> {
        let st_err = |e: safetensors::SafeTensorError| Error::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        let bytes = |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|f| f.to_le_bytes()).collect() };
        let mut named: Vec<(String, Vec<u8>)> = Vec::new();
        for (set, logps) in [("train", Some(&self.train)), ("eval", self.eval.as_ref())] {
            if let Some(l) = logps {
                named.push((format!("{set}.chosen"), bytes(&l.chosen)));
                named.push((format!("{set}.rejected"), bytes(&l.rejected)));
            }
        }
        let tensors = named
            .iter()
            .map(|(name, b)| {
                TensorView::new(Dtype::F32, vec![b.len() / 4], b)
                    .map(|t| (name.as_str(), t))
                    .map_err(st_err)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = safetensors::serialize(tensors, None).map_err(st_err)?;
        write_atomic(path, &out)
    }

    /// Reads what [`ReferenceLogps::save`] wrote.
    pub fn load(path: &Path) -> Result<ReferenceLogps> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let tensor = |name: &str| -> Option<Vec<f32>> {
            let t = st.tensor(name).ok()?;
            Some(
                t.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            )
        };
        let set = |name: &str| -> Option<SequenceLogps> {
            Some(SequenceLogps {
                chosen: tensor(&format!("{name}.chosen"))?,
                rejected: tensor(&format!("{name}.rejected"))?,
            })
        };
        Ok(ReferenceLogps {
            train: set("train").ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                name: "train.chosen".into(),
            })?,
            eval: set("eval"),
        })
    }
}

/// One forward pass over a batch from [`data::preference_batch`], kept for the backward.
struct Forward<B: ModelOps> {
    acts: Activations<B>,
    targets: Vec<u32>,
    /// The completion mask, on the device.
    mask: B::Buf,
    rows: Rows,
    /// (2P) sequence log-probs: chosen rows, then rejected rows.
    sums: B::Buf,
    /// (2P) completion lengths in tokens.
    counts: B::Buf,
}

/// Runs the policy over the batch and sums each row's completion-token log-probs.
fn forward<B: ModelOps + LossOps>(
    be: &B,
    model: &Model<B>,
    batch: &Batch,
    mask: &[f32],
) -> Result<Forward<B>> {
    let acts = model.forward(be, batch)?;
    let targets = shifted_targets(batch);
    let (logp, _) = model.head_logprobs(be, &acts.hidden, &targets, 1.0, false, HEAD_CHUNK)?;
    let rows = Rows {
        b: batch.b,
        t: batch.t,
    };
    let (logp, mask) = (be.upload(&logp), be.upload(mask));
    let (mut sums, mut counts) = (be.zeros(rows.b), be.zeros(rows.b));
    be.masked_row_sum(
        be.all_mut(&mut sums),
        Some(be.all_mut(&mut counts)),
        be.all(&logp),
        be.all(&mask),
        rows,
    );
    Ok(Forward {
        acts,
        targets,
        mask,
        rows,
        sums,
        counts,
    })
}

/// The sequence log-probs of every pair of `pairs` under `model`, in file order, `batch_size`
/// pairs at a time.
pub fn sequence_logps<B: ModelOps + LossOps>(
    be: &B,
    model: &Model<B>,
    pairs: &[PreferencePair],
    batch_size: usize,
    pad: u32,
) -> Result<SequenceLogps> {
    let idx: Vec<usize> = (0..pairs.len()).collect();
    let mut out = SequenceLogps::default();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (batch, mask) = data::preference_batch(pairs, chunk, pad);
        let sums = be.download(be.all(&forward(be, model, &batch, &mask)?.sums));
        out.chosen.extend_from_slice(&sums[..chunk.len()]);
        out.rejected.extend_from_slice(&sums[chunk.len()..]);
    }
    Ok(out)
}

/// Sums over pairs of the DPO metrics, which add up across batches.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DpoTotals {
    /// Σ per-pair loss.
    pub loss: f64,
    /// Σ implicit chosen reward `β·(π_c - ref_c)`.
    pub chosen_reward: f64,
    /// Σ implicit rejected reward.
    pub rejected_reward: f64,
    /// Pairs whose chosen reward exceeds the rejected one.
    pub correct: f64,
    /// Σ policy log-prob of the chosen completions.
    pub logps_chosen: f64,
    /// Σ policy log-prob of the rejected completions.
    pub logps_rejected: f64,
    /// Pairs counted.
    pub pairs: usize,
}

impl DpoTotals {
    /// Adds another batch's sums.
    pub fn add(&mut self, o: &DpoTotals) {
        self.loss += o.loss;
        self.chosen_reward += o.chosen_reward;
        self.rejected_reward += o.rejected_reward;
        self.correct += o.correct;
        self.logps_chosen += o.logps_chosen;
        self.logps_rejected += o.logps_rejected;
        self.pairs += o.pairs;
    }

    /// The metrics as TRL names them, means over pairs, each name prefixed with `prefix`
    /// (`""` or `"eval_"`).
    pub fn metrics(&self, prefix: &str) -> Vec<(String, f64)> {
        let n = self.pairs.max(1) as f64;
        [
            ("loss", self.loss),
            ("rewards/chosen", self.chosen_reward),
            ("rewards/rejected", self.rejected_reward),
            ("rewards/accuracies", self.correct),
            ("rewards/margins", self.chosen_reward - self.rejected_reward),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v / n))
        .collect()
    }

    /// Mean loss per pair.
    pub fn mean_loss(&self) -> f64 {
        self.loss / self.pairs.max(1) as f64
    }
}

/// The DPO loss of a batch from [`data::preference_batch`] against the reference log-probs of
/// its pairs (`ref_chosen[k]`, `ref_rejected[k]` for row pair `k`), as [`DpoTotals`]; with
/// `grads`, adds the gradient of the batch's mean loss into it, chained from the pair losses
/// through the sequence sums and the fused log-prob head to the weights.
#[allow(clippy::too_many_arguments)]
pub fn dpo_stats<B: ModelOps + LossOps>(
    be: &B,
    model: &Model<B>,
    batch: &Batch,
    mask: &[f32],
    ref_chosen: &[f32],
    ref_rejected: &[f32],
    cfg: &DpoCfg,
    grads: Option<&mut B::Buf>,
) -> Result<DpoTotals> {
    let p = batch.b / 2;
    let f = forward(be, model, batch, mask)?;
    let (rc, rr) = (be.upload(ref_chosen), be.upload(ref_rejected));
    let (mut dc, mut dr) = (be.zeros(p), be.zeros(p));
    let inputs = DpoInputs {
        policy_chosen: be.view(&f.sums, 0..p),
        policy_rejected: be.view(&f.sums, p..2 * p),
        ref_chosen: be.all(&rc),
        ref_rejected: be.all(&rr),
        chosen_len: Some(be.view(&f.counts, 0..p)),
        rejected_len: Some(be.view(&f.counts, p..2 * p)),
        pairs: p,
    };
    let s = be.dpo_loss(
        &inputs,
        cfg,
        DpoOutputs::default(),
        grads.is_some().then(|| DpoGrad {
            dchosen: be.all_mut(&mut dc),
            drejected: be.all_mut(&mut dr),
            dloss: 1.0,
        }),
    );
    if let Some(grads) = grads {
        let mut dsums = be.zeros(2 * p);
        be.copy(be.view_mut(&mut dsums, 0..p), be.all(&dc));
        be.copy(be.view_mut(&mut dsums, p..2 * p), be.all(&dr));
        let mut dlogp = be.zeros(f.rows.n());
        be.masked_row_sum_backward(
            be.all_mut(&mut dlogp),
            be.all(&dsums),
            be.all(&f.mask),
            f.rows,
        );
        let dlogp = be.download(be.all(&dlogp));
        let (dhidden, _) = model.head_logprobs_backward(
            be,
            &f.acts.hidden,
            &f.targets,
            1.0,
            &dlogp,
            None,
            HEAD_CHUNK,
            grads,
        )?;
        model.backward(be, &f.acts, &dhidden, grads);
    }
    let sums = be.download(be.all(&f.sums));
    model.recycle(f.acts);
    let total = |x: &[f32]| x.iter().map(|&v| v as f64).sum::<f64>();
    let pf = p as f64;
    Ok(DpoTotals {
        loss: s.loss * pf,
        chosen_reward: s.chosen_reward * pf,
        rejected_reward: s.rejected_reward * pf,
        correct: (s.accuracy * pf).round(),
        logps_chosen: total(&sums[..p]),
        logps_rejected: total(&sums[p..]),
        pairs: p,
    })
}

/// The DPO metrics of a whole preference set against its reference log-probs, in file order.
pub fn evaluate<B: ModelOps + LossOps>(
    be: &B,
    model: &Model<B>,
    pairs: &[PreferencePair],
    reference: &SequenceLogps,
    batch_size: usize,
    pad: u32,
    cfg: &DpoCfg,
) -> Result<DpoTotals> {
    let idx: Vec<usize> = (0..pairs.len()).collect();
    let mut total = DpoTotals::default();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (batch, mask) = data::preference_batch(pairs, chunk, pad);
        let (rc, rr) = refs_of(reference, chunk);
        total.add(&dpo_stats(be, model, &batch, &mask, &rc, &rr, cfg, None)?);
    }
    Ok(total)
}

/// The reference log-probs of the pairs `idx`.
fn refs_of(reference: &SequenceLogps, idx: &[usize]) -> (Vec<f32>, Vec<f32>) {
    (
        idx.iter().map(|&i| reference.chosen[i]).collect(),
        idx.iter().map(|&i| reference.rejected[i]).collect(),
    )
}

/// How a DPO run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct DpoSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimizer steps completed.
    pub steps: u64,
    /// Optimizer steps the run takes in all.
    pub total_steps: u64,
    /// Stopped early by `stop_after_micro_steps` (nothing saved after the last checkpoint).
    pub interrupted: bool,
    /// The last step's training sums ([`DpoTotals::metrics`] gives the means).
    pub last: Option<DpoTotals>,
    /// The last evaluation's sums.
    pub last_eval: Option<DpoTotals>,
}

/// The data seed, apart from a built-in model's initialisation (which is `seed` itself).
fn data_seed(seed: u64) -> u64 {
    seed ^ 0xDA7A_5EED_0000_0003
}

/// Checks the settings `args` give the loss.
fn loss_cfg(args: &DpoArgs) -> Result<DpoCfg> {
    if !(args.beta.is_finite() && args.beta > 0.0) {
        return Err(Error::Invalid(format!(
            "--beta {} must be positive",
            args.beta
        )));
    }
    if !(0.0..0.5).contains(&args.label_smoothing) {
        return Err(Error::Invalid(format!(
            "--label-smoothing {} must be in [0, 0.5)",
            args.label_smoothing
        )));
    }
    Ok(DpoCfg {
        beta: args.beta,
        label_smoothing: args.label_smoothing,
        loss: args.loss_type.into(),
    })
}

/// The reference log-probs of a fresh run: from `--ref-model`, whose tokenizer must be the
/// policy's, or else from the policy's starting weights. The reference model, when loaded,
/// lives only inside this function.
fn reference_logps<B: ModelOps + LossOps>(
    be: &B,
    args: &DpoArgs,
    policy: &Model<B>,
    tok: &Tokenizer,
    sets: (&[PreferencePair], Option<&[PreferencePair]>),
    pad: u32,
) -> Result<ReferenceLogps> {
    let loaded;
    let reference = match &args.ref_model {
        None => policy,
        Some(dir) => {
            loaded = Model::load(be, dir)?;
            let bad = |msg: String| Error::Invalid(format!("--ref-model {}: {msg}", dir.display()));
            if loaded.cfg.head != Head::Lm {
                return Err(bad("a score-head model, not a language model".into()));
            }
            if loaded.cfg.vocab_size != policy.cfg.vocab_size {
                return Err(bad(format!(
                    "a vocabulary of {} tokens, the policy's has {}",
                    loaded.cfg.vocab_size, policy.cfg.vocab_size
                )));
            }
            if dir.join("tokenizer.json").is_file()
                && Tokenizer::load(dir)?.inner().get_vocab(true) != tok.inner().get_vocab(true)
            {
                return Err(bad(
                    "its tokenizer differs from the policy's: the two models would score \
                     different token sequences"
                        .into(),
                ));
            }
            &loaded
        }
    };
    Ok(ReferenceLogps {
        train: sequence_logps(be, reference, sets.0, args.batch_size, pad)?,
        eval: sets
            .1
            .map(|e| sequence_logps(be, reference, e, args.batch_size, pad))
            .transpose()?,
    })
}

/// Trains a policy with DPO as `args` say, on backend `be`. `args.model`, `args.data` and
/// `args.out` must be set. Returns when the run is done, or interrupted by
/// `stop_after_micro_steps`; a non-finite loss or gradient is [`Error::NonFinite`], raised
/// before the bad update, with the checkpoints kept.
pub fn train<B: ModelOps + LossOps>(be: &B, args: &DpoArgs) -> Result<DpoSummary> {
    let need =
        |x: Option<PathBuf>, what: &str| x.ok_or_else(|| Error::Invalid(format!("dpo: no {what}")));
    let out = need(args.out.clone(), "output directory (--out)")?;
    let data_path = need(args.data.clone(), "training data (--data)")?;
    let model_name = args
        .model
        .clone()
        .ok_or_else(|| Error::Invalid("dpo: no model (--model)".into()))?;
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
    let cfg = loss_cfg(args)?;

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
        None => sft::starting_model(be, &model_name, args.tokenizer.as_deref(), args.seed)?,
    };
    if model.cfg.head != Head::Lm {
        return Err(Error::Invalid(format!(
            "--model {model_name}: a score-head (reward) model; DPO trains a language model"
        )));
    }
    let (eos, pad) = data::special_ids(&tok, &model.cfg)?;
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
    let fingerprint = (
        train_set.len(),
        train_set
            .iter()
            .map(|p| p.chosen.len() + p.rejected.len())
            .sum(),
    );
    let reference_path = out.join(REFERENCE_FILE);
    let reference = match &resume_from {
        Some(_) => {
            let r = ReferenceLogps::load(&reference_path)?;
            let (n_train, n_eval) = (
                r.train.chosen.len(),
                r.eval.as_ref().map(|e| e.chosen.len()),
            );
            if n_train != train_set.len() || n_eval != eval_set.as_ref().map(Vec::len) {
                return Err(Error::Run {
                    path: out.clone(),
                    msg: format!(
                        "cannot resume exactly: {REFERENCE_FILE} holds reference log-probs of \
                         {n_train} training and {n_eval:?} held-out pairs, the data has {} and {:?}",
                        train_set.len(),
                        eval_set.as_ref().map(Vec::len)
                    ),
                });
            }
            r
        }
        None => reference_logps(
            be,
            args,
            &model,
            &tok,
            (&train_set, eval_set.as_deref()),
            pad,
        )?,
    };

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
    let config = checkpoint::config_record(args);
    let mut run = Run::open(RunOptions {
        dir: &out,
        command: "dpo",
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
    if resume_from.is_none() {
        // Written before any checkpoint, so every checkpoint can be resumed from.
        reference.save(&reference_path)?;
    }

    let accum = args.grad_accum;
    let mut grads = be.zeros(model.layout.total);
    let mut summary = DpoSummary {
        run_dir: out.clone(),
        steps: step,
        total_steps: total_steps as u64,
        interrupted: false,
        last: None,
        last_eval: None,
    };
    while step < total_steps as u64 {
        let t0 = Instant::now();
        be.fill(be.all_mut(&mut grads), 0.0);
        let (mut loss_sum, mut stats, mut tokens) = (0.0, DpoTotals::default(), 0usize);
        for _ in 0..accum {
            if args.stop_after_micro_steps == Some(micro) {
                summary.interrupted = true;
                return Ok(summary);
            }
            let idx = batches.next_batch();
            let (batch, mask) = data::preference_batch(&train_set, &idx, pad);
            let (rc, rr) = refs_of(&reference.train, &idx);
            let s = dpo_stats(be, &model, &batch, &mask, &rc, &rr, &cfg, Some(&mut grads))?;
            micro += 1;
            if !s.mean_loss().is_finite() {
                return Err(run.non_finite(
                    &format!("loss ({}) in micro-batch {micro}", s.mean_loss()),
                    step + 1,
                ));
            }
            loss_sum += s.mean_loss();
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

        // The logged loss is the mean of the micro-batch losses, as the gradient weighs them;
        // the other metrics are means over all the step's pairs.
        let mut values = stats.metrics("");
        if let Some(loss) = values.iter_mut().find(|(k, _)| k == "loss") {
            loss.1 = loss_sum / accum as f64;
        }
        values.extend([
            ("learning_rate".to_string(), lr_now as f64),
            ("grad_norm".to_string(), norm as f64),
            ("tokens_per_s".to_string(), tokens as f64 / elapsed),
        ]);
        summary.last = Some(stats);
        let eval_now = (args.eval_every > 0 && step % args.eval_every as u64 == 0)
            || step == total_steps as u64;
        if let (Some(eval_set), Some(eval_ref), true) = (&eval_set, &reference.eval, eval_now) {
            let e = evaluate(be, &model, eval_set, eval_ref, args.batch_size, pad, &cfg)?;
            values.extend(e.metrics("eval_"));
            summary.last_eval = Some(e);
        }
        let named: Vec<(&str, f64)> = values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        run.log(step, &named)?;
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
                extra: serde_json::json!({ "reference_logps": REFERENCE_FILE }),
            };
            run.checkpoint(be, &model, &opt, &state, &[])?;
        }
    }
    run.save_final(be, &model)?;
    Ok(summary)
}

/// `rlhf dpo`: trains a policy with DPO on the backend `--device` selects.
pub fn run(args: &DpoArgs) -> anyhow::Result<()> {
    crate::with_backend!(args.device, |be| run_on(be, args))
}

fn run_on<B: crate::backend::DecodeOps + crate::backend::LossOps>(
    be: &B,
    args: &DpoArgs,
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
        args.out = Some(PathBuf::from(format!("runs/dpo-{secs}")));
    }
    anyhow::ensure!(args.model.is_some(), "dpo needs --model (the policy)");
    anyhow::ensure!(
        args.data.is_some(),
        "dpo needs --data (preference pairs, JSONL)"
    );
    let s = train(be, &args)?;
    if s.interrupted {
        println!(
            "Stopped after step {} of {}; --resume continues from the last checkpoint.",
            s.steps, s.total_steps
        );
        return Ok(());
    }
    let show = |t: &DpoTotals, prefix: &str| -> String {
        t.metrics(prefix)
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("Done: {} steps.", s.steps);
    if let Some(t) = &s.last {
        println!("Last step: {}", show(t, ""));
    }
    if let Some(e) = &s.last_eval {
        println!("Held out: {}", show(e, "eval_"));
    }
    println!(
        "Policy (HF directory): {d}; metrics: {d}/{m}",
        d = s.run_dir.display(),
        m = checkpoint::METRICS_FILE
    );
    Ok(())
}
