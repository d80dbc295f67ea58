//! Supervised fine-tuning: masked, optionally weighted next-token NLL on completion tokens, and
//! the `rlhf sft` training loop.
//!
//! Normalisation: each micro-batch's loss is its own weighted mean, `-Σ w·logp / Σ|w|` over its
//! tokens; with gradient accumulation the optimizer step uses the mean of the micro-batch
//! gradients (each scaled by `1/grad_accum`), as HF's Trainer does per micro-batch, so long
//! and short micro-batches count alike.

use crate::backend::cuda::DeviceChoice;
use crate::backend::ModelOps;
use crate::builtin_task;
use crate::checkpoint::{self, LrSchedule, Run, RunOptions, TrainerState};
use crate::data::{self, Batches, SftExample, SftTokenizing};
use crate::model::config::BUILTIN;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::shifted_targets;
use crate::model::{random_params, Batch, Config, Layout, Model};
use crate::optim::{grad_norm, OptimConfig};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Rows of logits computed at once by the LM head (bounds the head's memory to `chunk × V`).
pub const HEAD_CHUNK: usize = 1024;

/// Sums over the weighted tokens of a batch, which add up across batches: the weighted NLL
/// `Σ w·(-logp)`, the normaliser `Σ|w|`, and greedy next-token accuracy over tokens of
/// positive weight.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NllStats {
    /// `Σ w·(-logp)`.
    pub nll: f64,
    /// `Σ|w|`, the normaliser.
    pub weight: f64,
    /// Positive-weight tokens whose target is the argmax of the logits.
    pub correct: usize,
    /// Positive-weight tokens (those the model is taught to produce).
    pub counted: usize,
}

impl NllStats {
    /// The weighted mean NLL.
    pub fn loss(&self) -> f64 {
        self.nll / self.weight
    }

    /// The fraction of positive-weight tokens predicted right.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.counted.max(1) as f64
    }

    /// Sums two batches' statistics.
    pub fn add(&mut self, o: &NllStats) {
        self.nll += o.nll;
        self.weight += o.weight;
        self.correct += o.correct;
        self.counted += o.counted;
    }
}

/// Loss and gradient of the weighted next-token NLL `-Σ w·logp / Σ|w|` over a right-padded
/// batch. `weights[j]` weighs the prediction of token `j + 1` from position `j` (0 for prompt
/// and pad positions). Adds the gradient into `grads` and returns the loss.
pub fn nll_loss_and_grad<B: ModelOps>(
    be: &B,
    model: &Model<B>,
    batch: &Batch,
    weights: &[f32],
    grads: &mut B::Buf,
) -> Result<f32> {
    Ok(nll_stats(be, model, batch, weights, Some(grads), false)?.loss() as f32)
}

/// The weighted next-token NLL of a batch as [`NllStats`]; with `grads`, adds the gradient of
/// the batch's mean loss (`nll / Σ|w|`) into it; with `accuracy`, also counts greedy hits.
/// Normalising by `Σ|w|` rather than `Σw` keeps negative weights (token-weighted SFT's
/// negative feedback) from shrinking or flipping the normaliser; for non-negative weights the
/// two agree.
pub fn nll_stats<B: ModelOps>(
    be: &B,
    model: &Model<B>,
    batch: &Batch,
    weights: &[f32],
    grads: Option<&mut B::Buf>,
    accuracy: bool,
) -> Result<NllStats> {
    if weights.len() != batch.n() {
        return Err(Error::Invalid(format!(
            "{} loss weights for {} token positions",
            weights.len(),
            batch.n()
        )));
    }
    let total: f64 = weights.iter().map(|w| w.abs() as f64).sum();
    if total <= 0.0 {
        return Err(Error::Invalid(
            "the batch has no token to learn from".into(),
        ));
    }
    let acts = model.forward(be, batch)?;
    let targets = shifted_targets(batch);
    let logp = match grads {
        Some(grads) => {
            // The gradient w.r.t. each log-prob is known before the log-probs (it is the
            // weight), so one pass over the LM head gives both and its logits are computed once.
            let norm = total as f32;
            let dlogp: Vec<f32> = weights.iter().map(|w| -w / norm).collect();
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
            logp
        }
        None => {
            model
                .head_logprobs(be, &acts.hidden, &targets, 1.0, false, HEAD_CHUNK)?
                .0
        }
    };
    let nll = -logp
        .iter()
        .zip(weights)
        .map(|(l, w)| (l * w) as f64)
        .sum::<f64>();
    let (correct, counted) = if accuracy {
        greedy_hits(be, model, &acts.hidden, &targets, weights)
    } else {
        (0, 0)
    };
    model.recycle(acts);
    Ok(NllStats {
        nll,
        weight: total,
        correct,
        counted,
    })
}

/// How many positive-weight positions have their target as the logits' argmax, and how many
/// such positions there are. Only those rows' logits are computed, a bounded number at a time.
fn greedy_hits<B: ModelOps>(
    be: &B,
    model: &Model<B>,
    hidden: &B::Buf,
    targets: &[u32],
    weights: &[f32],
) -> (usize, usize) {
    let (c, v) = (model.cfg.hidden_size, model.cfg.vocab_size);
    let rows: Vec<usize> = (0..weights.len()).filter(|&j| weights[j] > 0.0).collect();
    // The logits come to the host for the argmax: keep each chunk near 64 MB.
    let chunk = ((16 << 20) / v).clamp(1, HEAD_CHUNK);
    let mut correct = 0;
    for rows in rows.chunks(chunk) {
        let m = rows.len();
        let mut h = be.zeros(m * c);
        // Copy runs of consecutive rows at once: a right-padded batch's completion is one run.
        let mut k = 0;
        while k < m {
            let mut e = k + 1;
            while e < m && rows[e] == rows[e - 1] + 1 {
                e += 1;
            }
            be.copy(
                be.view_mut(&mut h, k * c..e * c),
                be.view(hidden, rows[k] * c..(rows[e - 1] + 1) * c),
            );
            k = e;
        }
        let logits = be.download(be.all(&model.logits(be, &h, m)));
        for (r, &j) in rows.iter().enumerate() {
            correct += (argmax(&logits[r * v..(r + 1) * v]) == targets[j] as usize) as usize;
        }
    }
    (correct, rows.len())
}

/// Index of the first largest value.
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Arguments of `rlhf sft` (and the configuration recorded in `run_config.json`).
#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SftArgs {
    /// Model to train: a Hugging Face directory, or a built-in configuration (gpt2-tiny,
    /// llama-tiny, gpt2-6l-384) initialised at random, which needs --tokenizer. Without --data,
    /// the built-in task's model (default gpt2-tiny).
    #[arg(long)]
    pub model: Option<String>,
    /// Tokenizer directory (tokenizer.json, tokenizer_config.json); defaults to --model's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Training data, JSONL: {"prompt","completion"} (optional "weights") or {"messages": [...]}.
    /// Without it, trains on the built-in task (see the README).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out JSONL in the same format, for eval_loss.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Run directory (checkpoints, metrics, final model) [default: runs/sft-<unix time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Passes over the training data (ignored with --max-steps).
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Optimizer steps to take, overriding --epochs.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Sequences per micro-batch [default: 8; the built-in task: 32].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate [default: 2e-5; the built-in task: 3e-3].
    #[arg(long)]
    pub lr: Option<f32>,
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
    /// Seed of the initialisation, data order and built-in task.
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

impl Default for SftArgs {
    /// The command line's defaults (one source of truth: clap's).
    fn default() -> Self {
        super::clap_defaults()
    }
}

/// Configuration keys that decide which batches come when, or the schedule's length: a
/// resumed run must keep them to continue exactly.
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

/// The default peak learning rate (TRL's SFT default).
pub const DEFAULT_LR: f32 = 2e-5;
/// The default micro-batch size (TRL's per-device default).
pub const DEFAULT_BATCH_SIZE: usize = 8;

/// How a training run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct SftSummary {
    pub run_dir: PathBuf,
    /// Optimizer steps completed.
    pub steps: u64,
    pub total_steps: u64,
    /// Stopped early by `stop_after_micro_steps` (nothing saved after the last checkpoint).
    pub interrupted: bool,
    /// The last step's training loss and accuracy.
    pub last_loss: Option<f64>,
    pub last_accuracy: Option<f64>,
    /// The last evaluation's loss.
    pub last_eval_loss: Option<f64>,
}

/// The data seed, apart from the initialisation's (which is `seed` itself), so the two
/// streams are not the same numbers.
fn data_seed(seed: u64) -> u64 {
    seed ^ 0xDA7A_5EED_0000_0001
}

/// Trains with SFT as `args` say, on backend `be`. `args.out` and `args.data` must be set (the
/// CLI's [`run`] fills them in for the built-in task). Returns when the run is done, or
/// interrupted by `stop_after_micro_steps`; a non-finite loss or gradient is
/// [`Error::NonFinite`], raised before the bad update, with the checkpoints kept.
pub fn train<B: ModelOps>(be: &B, args: &SftArgs) -> Result<SftSummary> {
    let out = args
        .out
        .clone()
        .ok_or_else(|| Error::Invalid("sft: no output directory (--out)".into()))?;
    let data_path = args
        .data
        .clone()
        .ok_or_else(|| Error::Invalid("sft: no training data (--data)".into()))?;
    let lr = args.lr.unwrap_or(DEFAULT_LR);
    let batch_size = args.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
    if batch_size == 0 || args.grad_accum == 0 {
        return Err(Error::Invalid(
            "--batch-size and --grad-accum must be at least 1".into(),
        ));
    }
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::Invalid(format!("--lr {lr} is not a learning rate")));
    }

    // Everything that can fail on bad input happens before the run directory is touched, so
    // a failed start leaves nothing that blocks the next attempt.
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
    let tok_dir = match &resume_from {
        Some(_) => out.clone(),
        None => tokenizer_dir(args)?,
    };
    let tok = Tokenizer::load(&tok_dir)?;
    let mut model = match &resume_from {
        Some((_, ck)) => Model::load(be, ck)?,
        None => initial_model(be, args, &tok)?,
    };
    let cfg = &model.cfg;
    let eos = tok
        .eos_id()
        .or(cfg.eos_token_ids.first().copied())
        .ok_or_else(|| {
            Error::Tokenizer(
                "no EOS token (eos_token in tokenizer_config.json or eos_token_id in config.json)"
                    .into(),
            )
        })?;
    let pad = tok.pad_id().or(cfg.pad_token_id).unwrap_or(eos);
    let how = SftTokenizing {
        tok: &tok,
        eos,
        max_len: args.max_len.unwrap_or(usize::MAX).min(cfg.max_position),
    };
    let train_set = data::load_sft(&data_path, how)?;
    let eval_set = args
        .eval_data
        .as_deref()
        .map(|p| data::load_sft(p, how))
        .transpose()?;
    let fingerprint = (train_set.len(), train_set.iter().map(|e| e.ids.len()).sum());

    let mut batches = match &resume_from {
        Some((state, _)) => {
            if state.data_fingerprint != fingerprint {
                return Err(Error::Run {
                    path: out.clone(),
                    msg: format!(
                        "cannot resume exactly: the training data changed ({} examples of {} tokens, now {} of {})",
                        state.data_fingerprint.0, state.data_fingerprint.1, fingerprint.0, fingerprint.1
                    ),
                });
            }
            Batches::at(train_set.len(), batch_size, state.data)?
        }
        None => Batches::new(train_set.len(), batch_size, data_seed(args.seed))?,
    };
    let total_steps = match args.max_steps {
        Some(s) => s,
        None => (args.epochs * batches.per_epoch() / args.grad_accum).max(1),
    };
    let schedule = LrSchedule {
        base: lr,
        warmup: args.warmup_steps,
        total: total_steps,
    };
    let ocfg = OptimConfig {
        lr,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        ..OptimConfig::default()
    };
    let resolved = SftArgs {
        lr: Some(lr),
        batch_size: Some(batch_size),
        ..args.clone()
    };
    let mut config = serde_json::to_value(resolved).expect("the arguments always serialise");
    if let Some(o) = config.as_object_mut() {
        // How this invocation runs, not what the run is: kept out of the record.
        for k in ["resume", "quiet", "stop_after_micro_steps"] {
            o.remove(k);
        }
    }
    let mut run = Run::open(RunOptions {
        dir: &out,
        command: "sft",
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
    let mut summary = SftSummary {
        run_dir: out.clone(),
        steps: step,
        total_steps: total_steps as u64,
        interrupted: false,
        last_loss: None,
        last_accuracy: None,
        last_eval_loss: None,
    };
    while step < total_steps as u64 {
        let t0 = Instant::now();
        be.fill(be.all_mut(&mut grads), 0.0);
        let (mut loss_sum, mut hits, mut tokens) = (0.0, NllStats::default(), 0usize);
        for _ in 0..accum {
            if args.stop_after_micro_steps == Some(micro) {
                summary.interrupted = true;
                return Ok(summary);
            }
            let idx = batches.next_batch();
            let (batch, w) = data::sft_batch(&train_set, &idx, pad);
            let s = nll_stats(be, &model, &batch, &w, Some(&mut grads), true)?;
            micro += 1;
            if !s.loss().is_finite() {
                return Err(run.non_finite(
                    &format!("loss ({}) in micro-batch {micro}", s.loss()),
                    step + 1,
                ));
            }
            loss_sum += s.loss();
            hits.add(&s);
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
            ("mean_token_accuracy", hits.accuracy()),
            ("learning_rate", lr_now as f64),
            ("grad_norm", norm as f64),
            ("tokens_per_s", tokens as f64 / elapsed),
        ];
        summary.last_loss = Some(loss);
        summary.last_accuracy = Some(hits.accuracy());
        let eval_now = (args.eval_every > 0 && step % args.eval_every as u64 == 0)
            || step == total_steps as u64;
        if let (Some(eval_set), true) = (&eval_set, eval_now) {
            let e = evaluate(be, &model, eval_set, batch_size, pad)?;
            values.push(("eval_loss", e.loss()));
            values.push(("eval_mean_token_accuracy", e.accuracy()));
            summary.last_eval_loss = Some(e.loss());
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

/// The weighted NLL and accuracy of a whole dataset, in file order, summed over all its
/// tokens (not averaged per batch).
pub fn evaluate<B: ModelOps>(
    be: &B,
    model: &Model<B>,
    examples: &[SftExample],
    batch_size: usize,
    pad: u32,
) -> Result<NllStats> {
    let mut total = NllStats::default();
    let idx: Vec<usize> = (0..examples.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (batch, w) = data::sft_batch(examples, chunk, pad);
        total.add(&nll_stats(be, model, &batch, &w, None, true)?);
    }
    Ok(total)
}

/// Where a fresh run's tokenizer comes from: `--tokenizer`, else the `--model` directory.
fn tokenizer_dir(args: &SftArgs) -> Result<PathBuf> {
    match (&args.tokenizer, &args.model) {
        (Some(t), _) => Ok(t.clone()),
        (None, Some(m)) if Path::new(m).is_dir() => Ok(PathBuf::from(m)),
        (None, Some(m)) => Err(Error::Invalid(format!(
            "--model {m} is not a model directory; a built-in configuration needs --tokenizer DIR"
        ))),
        (None, None) => Err(Error::Invalid("sft: no model (--model)".into())),
    }
}

/// The model a fresh run starts from: an HF directory's weights, or a built-in configuration
/// sized to the tokenizer, initialised at random from the seed (as transformers does:
/// N(0, 0.02²) matrices).
pub fn initial_model<B: ModelOps>(be: &B, args: &SftArgs, tok: &Tokenizer) -> Result<Model<B>> {
    let name = args
        .model
        .as_deref()
        .ok_or_else(|| Error::Invalid("sft: no model (--model)".into()))?;
    let model = if Path::new(name).is_dir() {
        Model::load(be, Path::new(name))?
    } else if BUILTIN.contains(&name) {
        let mut cfg = Config::builtin(name, tok.vocab_size())?;
        // The built-in shapes carry placeholder special ids; the tokenizer's are the real ones.
        cfg.bos_token_id = tok.bos_id();
        cfg.eos_token_ids = tok.eos_id().into_iter().collect();
        cfg.pad_token_id = tok.pad_id();
        let layout = Layout::new(&cfg);
        let params = random_params(&layout, 0.02, args.seed);
        Model::new(be, cfg, &params)?
    } else {
        return Err(Error::Invalid(format!(
            "--model {name}: neither a model directory nor a built-in configuration ({})",
            BUILTIN.join(", ")
        )));
    };
    if tok.vocab_size() > model.cfg.vocab_size {
        return Err(Error::Invalid(format!(
            "the tokenizer has {} tokens but the model's embedding only {} rows",
            tok.vocab_size(),
            model.cfg.vocab_size
        )));
    }
    Ok(model)
}

/// The starting model of a fresh run of any trainer, with its tokenizer and the directory the
/// tokenizer was read from (whose files the run directory copies): `model` is a Hugging Face
/// directory or a built-in configuration initialised from `seed` (see [`initial_model`]); the
/// tokenizer is `tokenizer`, else the model directory's.
pub fn starting_model<B: ModelOps>(
    be: &B,
    model: &str,
    tokenizer: Option<&Path>,
    seed: u64,
) -> Result<(Model<B>, Tokenizer, PathBuf)> {
    let args = SftArgs {
        model: Some(model.to_string()),
        tokenizer: tokenizer.map(Path::to_path_buf),
        seed,
        ..SftArgs::default()
    };
    let dir = tokenizer_dir(&args)?;
    let tok = Tokenizer::load(&dir)?;
    let m = initial_model(be, &args, &tok)?;
    Ok((m, tok, dir))
}

/// `rlhf sft`: trains on the backend `--device` selects. Without `--data`, trains the built-in task (see
/// [`builtin_task`]) and prints sample generations before and after.
pub fn run(args: &SftArgs) -> anyhow::Result<()> {
    crate::with_backend!(args.device, |be| run_on(be, args))
}

fn run_on<B: crate::backend::DecodeOps>(be: &B, args: &SftArgs) -> anyhow::Result<()> {
    let mut args = args.clone();
    if args.out.is_none() {
        anyhow::ensure!(
            !args.resume,
            "--resume needs --out RUN_DIR: the run to continue"
        );
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        args.out = Some(PathBuf::from(format!("runs/sft-{secs}")));
    }
    let out = args.out.clone().expect("set above");
    if args.data.is_some() {
        let s = train(be, &args)?;
        report(&s);
        return Ok(());
    }

    let args = builtin_task::prepare(&args)?;
    println!("Built-in task: {}", builtin_task::DESCRIPTION);
    println!(
        "Run directory: {} ({} training and {} held-out examples in data/)",
        out.display(),
        builtin_task::TRAIN_EXAMPLES,
        builtin_task::EVAL_EXAMPLES
    );
    if !args.resume {
        let tok = Tokenizer::load(&out)?;
        let model = initial_model(be, &args, &tok)?;
        let c = &model.cfg;
        println!(
            "Model: {} ({} layers, d={}, {} heads), {} parameters, random init (seed {})",
            args.model.as_deref().unwrap_or_default(),
            c.n_layer,
            c.hidden_size,
            c.n_head,
            model.layout.total,
            args.seed
        );
        println!("Before training (greedy decoding of held-out prompts):");
        builtin_task::show_samples(be, &model, &tok, &builtin_task::eval_pairs(&args)?)?;
    }
    let s = train(be, &args)?;
    if !s.interrupted {
        let tok = Tokenizer::load(&out)?;
        let model = Model::load(be, &out)?;
        println!("After training ({} steps):", s.steps);
        builtin_task::show_samples(be, &model, &tok, &builtin_task::eval_pairs(&args)?)?;
    }
    report(&s);
    Ok(())
}

/// The closing lines of a run, for the user.
fn report(s: &SftSummary) {
    let fmt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.4}"));
    if s.interrupted {
        println!(
            "Stopped after step {} of {}; --resume continues from the last checkpoint.",
            s.steps, s.total_steps
        );
    } else {
        println!(
            "Done: {} steps, loss {}, token accuracy {}, eval loss {}.",
            s.steps,
            fmt(s.last_loss),
            fmt(s.last_accuracy),
            fmt(s.last_eval_loss)
        );
        println!(
            "Model (HF directory): {d}; metrics: {d}/{m}; config: {d}/{c}",
            d = s.run_dir.display(),
            m = checkpoint::METRICS_FILE,
            c = checkpoint::RUN_CONFIG_FILE
        );
    }
}
