//! The run directory every trainer writes, and its checkpoints.
//!
//! ```text
//! RUN/
//!   run_config.json        the full configuration, seed, engine version, resumes
//!   metrics.jsonl          one object per optimizer step
//!   tokenizer.json ...     the tokenizer files, copied in at the start
//!   config.json, model.safetensors   the final model (with the tokenizer files: an HF directory)
//!   checkpoint-STEP/       an HF directory + optimizer.safetensors + trainer_state.json
//! ```
//!
//! A checkpoint is written into `checkpoint-STEP.tmp/` and renamed into place only once
//! complete, so a crash mid-write leaves the previous checkpoints as they were; a directory
//! without `trainer_state.json` (written last) is never taken for a checkpoint. Only the last
//! few are kept, and old ones are removed only after the new one is in place.

use crate::backend::ModelOps;
use crate::data::DataPosition;
use crate::metrics::{MetricsLog, Progress};
use crate::model::weights::{copy_tokenizer_files, write_atomic, SaveDtype};
use crate::model::Model;
use crate::optim::{lr_at, OptimConfig, Optimizer};
use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The run's configuration record.
pub const RUN_CONFIG_FILE: &str = "run_config.json";
/// The per-step metrics log.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// A checkpoint's trainer state; written last, so its presence marks a complete checkpoint.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// A checkpoint's AdamW moments (`exp_avg`, `exp_avg_sq`, PyTorch's names) and step count.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// This engine's version: the crate version, and `git describe` of the source tree when the
/// binary runs beside it (a development checkout).
pub fn engine_version() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let git = std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty());
    match git {
        Some(g) => format!("{version} ({g})"),
        None => version.to_string(),
    }
}

/// A trainer's arguments as the configuration a run records (`run_config.json`, each
/// checkpoint's trainer state): everything but how this invocation runs (`resume`, `quiet`,
/// `stop_after_micro_steps`), which is not what the run is.
pub fn config_record<T: serde::Serialize>(args: &T) -> Value {
    let mut config = serde_json::to_value(args).expect("trainer arguments always serialise");
    if let Some(o) = config.as_object_mut() {
        for k in ["resume", "quiet", "stop_after_micro_steps"] {
            o.remove(k);
        }
    }
    config
}

/// The learning-rate schedule: linear warmup to `base`, then cosine decay to zero at `total`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub base: f32,
    /// Warmup steps.
    pub warmup: usize,
    /// Optimizer steps of the whole run.
    pub total: usize,
}

impl LrSchedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f32 {
        lr_at(self.base, step as usize, self.warmup, self.total)
    }
}

/// Everything besides weights and optimizer moments that a resumed run needs to continue
/// exactly where a checkpoint was taken.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Micro-batches consumed (`step · grad_accum`: checkpoints fall on step boundaries).
    pub micro_step: u64,
    /// Where the training data stream stands, including its shuffling RNG.
    pub data: DataPosition,
    /// Number of training examples and their total tokens, to notice changed data on resume.
    pub data_fingerprint: (usize, usize),
    /// The schedule the learning rate follows.
    pub lr: LrSchedule,
    /// AdamW's settings (the moments are in `optimizer.safetensors`).
    pub optimizer: OptimConfig,
    /// The trainer's configuration when the checkpoint was taken.
    pub config: Value,
    /// The engine version that wrote the checkpoint.
    pub engine: String,
    /// Trainer-specific state beyond the above (an RL trainer's KL coefficient, its sampling
    /// RNG, ...); `null` for SFT.
    #[serde(default)]
    pub extra: Value,
}

/// A run directory: its configuration record, metrics, progress display and checkpoints.
pub struct Run {
    /// The run directory.
    pub dir: PathBuf,
    /// [`engine_version`], looked up once.
    pub engine: String,
    metrics: MetricsLog,
    progress: Progress,
    keep: usize,
}

/// How to open a [`Run`].
pub struct RunOptions<'a> {
    pub dir: &'a Path,
    /// The trainer's name (`sft`, `dpo`, ...), recorded in `run_config.json`.
    pub command: &'a str,
    /// The full configuration, as a JSON object.
    pub config: &'a Value,
    /// The run's seed, recorded at the top level of `run_config.json` for visibility.
    pub seed: u64,
    /// Configuration keys that must not change on resume: those that decide which batches
    /// come when, or the schedule's length. Other keys (learning rate, eval and save
    /// cadence, ...) may change, and the change is recorded.
    pub fixed_on_resume: &'a [&'a str],
    /// Resume from this state (the latest checkpoint's); `None` starts a fresh run.
    pub resume: Option<&'a TrainerState>,
    /// Optimizer steps the run takes in all, for the progress bar.
    pub total_steps: u64,
    /// Keep this many checkpoints (0: all).
    pub keep_checkpoints: usize,
    /// No progress bar, no notes.
    pub quiet: bool,
}

/// Refuses to start a fresh run where one already is: it would mix two runs' checkpoints
/// and metrics.
pub fn check_new_run_dir(dir: &Path) -> Result<()> {
    if dir.join(RUN_CONFIG_FILE).exists() {
        return Err(Error::Run {
            path: dir.to_path_buf(),
            msg: format!(
                "already holds a run ({RUN_CONFIG_FILE}); pass --resume to continue it, or choose \
                 another output directory"
            ),
        });
    }
    Ok(())
}

impl Run {
    /// Creates or reopens a run directory and records the configuration. A fresh run needs a
    /// directory without a run in it; a resumed run checks the fixed keys against the
    /// recorded ones, drops metrics logged after the checkpoint, and removes the remains of
    /// checkpoints a crash interrupted.
    pub fn open(o: RunOptions<'_>) -> Result<Run> {
        let dir = o.dir;
        let run_err = |msg: String| Error::Run {
            path: dir.to_path_buf(),
            msg,
        };
        let record_path = dir.join(RUN_CONFIG_FILE);
        let engine = engine_version();
        let mut record = serde_json::json!({
            "command": o.command,
            "engine": { "name": env!("CARGO_PKG_NAME"), "version": &engine },
            "seed": o.seed,
            "config": o.config,
            "resumes": [],
        });
        let mut notes = Vec::new();
        match o.resume {
            None => {
                check_new_run_dir(dir)?;
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            Some(state) => {
                let old: Value = read_json(&record_path)?;
                let changed = config_changes(&old["config"], o.config);
                if let Some((key, was, now)) = changed
                    .iter()
                    .find(|(k, _, _)| o.fixed_on_resume.contains(&k.as_str()))
                {
                    return Err(run_err(format!(
                        "cannot resume exactly: {} was {was}, now {now}; resume with the run's value",
                        flag(key)
                    )));
                }
                for (key, was, now) in &changed {
                    notes.push(format!(
                        "resuming with {} changed: {was} -> {now}",
                        flag(key)
                    ));
                }
                let changes: serde_json::Map<String, Value> = changed
                    .into_iter()
                    .map(|(k, was, now)| (k, serde_json::json!([was, now])))
                    .collect();
                let mut resumes = old["resumes"].as_array().cloned().unwrap_or_default();
                resumes.push(
                    serde_json::json!({ "step": state.step, "engine": &engine, "changed": changes }),
                );
                record["resumes"] = Value::Array(resumes);
                remove_partial_checkpoints(dir)?;
            }
        }
        let text = serde_json::to_string_pretty(&record).expect("a JSON value always serialises");
        write_atomic(&record_path, text.as_bytes())?;
        let metrics = MetricsLog::open(&dir.join(METRICS_FILE), o.resume.map(|s| s.step))?;
        let progress = Progress::new(o.total_steps, o.resume.map_or(0, |s| s.step), o.quiet);
        for n in notes {
            progress.note(&n);
        }
        Ok(Run {
            dir: dir.to_path_buf(),
            engine,
            metrics,
            progress,
            keep: o.keep_checkpoints,
        })
    }

    /// Logs one optimizer step's metrics to `metrics.jsonl` and the progress bar.
    pub fn log(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        self.progress.update(step, values);
        self.metrics.write(step, values)
    }

    /// Prints a line for the user, above the progress bar.
    pub fn note(&self, msg: &str) {
        self.progress.note(msg);
    }

    /// Writes `checkpoint-STEP/` atomically and removes checkpoints beyond the kept number.
    /// The trained model and its optimizer go at the top level (an HF directory); `others`
    /// (a PPO critic, say) each go into a subdirectory of that name, model and optimizer alike.
    /// Weights that are not all finite are refused: a checkpoint is a good state to resume.
    pub fn checkpoint<B: ModelOps>(
        &self,
        be: &B,
        model: &Model<B>,
        opt: &Optimizer<B>,
        state: &TrainerState,
        others: &[(&str, &Model<B>, &Optimizer<B>)],
    ) -> Result<PathBuf> {
        let all_finite = std::iter::once(model)
            .chain(others.iter().map(|o| o.1))
            .all(|m| be.sum_squares(be.all(&m.params)).is_finite());
        if !all_finite {
            return Err(self.non_finite("weights", state.step));
        }
        let name = format!("checkpoint-{}", state.step);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let dst = self.dir.join(&name);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        model.save(be, &tmp, SaveDtype::F32)?;
        copy_tokenizer_files(&self.dir, &tmp)?;
        save_optimizer(be, opt, &tmp.join(OPTIMIZER_FILE))?;
        for (sub, m, o) in others {
            let dir = tmp.join(sub);
            m.save(be, &dir, SaveDtype::F32)?;
            save_optimizer(be, o, &dir.join(OPTIMIZER_FILE))?;
        }
        let text =
            serde_json::to_string_pretty(state).expect("the trainer state always serialises");
        write_atomic(&tmp.join(TRAINER_STATE_FILE), text.as_bytes())?;
        if dst.exists() {
            // Left by an abandoned attempt at this same step (a resume from an earlier one).
            std::fs::remove_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
        }
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        sync_dir(&self.dir);
        if self.keep > 0 {
            let all = checkpoints(&self.dir)?;
            for (_, old) in &all[..all.len().saturating_sub(self.keep)] {
                std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
            }
        }
        Ok(dst)
    }

    /// The optimizer, step and micro-step a run starts from: restored from the checkpoint in
    /// `resume` (its trainer state and directory), or fresh, with the tokenizer files of
    /// `tok_dir` copied into the new run directory so that it is a complete HF directory.
    pub fn start_optimizer<B: ModelOps>(
        &self,
        be: &B,
        resume: Option<&(TrainerState, PathBuf)>,
        cfg: OptimConfig,
        n: usize,
        tok_dir: &Path,
    ) -> Result<(Optimizer<B>, u64, u64)> {
        match resume {
            Some((state, ck)) => {
                self.note(&format!(
                    "resuming from {} (step {})",
                    ck.display(),
                    state.step
                ));
                Ok((
                    load_optimizer(be, ck, cfg, n)?,
                    state.step,
                    state.micro_step,
                ))
            }
            None => {
                if tok_dir != self.dir {
                    copy_tokenizer_files(tok_dir, &self.dir)?;
                }
                Ok((Optimizer::new(be, cfg, n), 0, 0))
            }
        }
    }

    /// Saves the final model into the run directory itself, which holds the tokenizer files
    /// already: the run directory is then an HF model directory.
    pub fn save_final<B: ModelOps>(&self, be: &B, model: &Model<B>) -> Result<()> {
        model.save(be, &self.dir, SaveDtype::F32)
    }

    /// The error that stops a run on a NaN or infinity, saying which checkpoint survives.
    pub fn non_finite(&self, what: &str, step: u64) -> Error {
        let kept = match latest_checkpoint(&self.dir) {
            Ok(Some(ck)) => format!(
                "The last good checkpoint, {}, is kept; --resume continues from it (lower the learning \
                 rate or fix the data first).",
                ck.display()
            ),
            _ => "No checkpoint had been written yet.".to_string(),
        };
        Error::NonFinite {
            what: what.to_string(),
            step,
            kept,
        }
    }
}

/// `--flag-name` for a configuration key.
fn flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// Keys whose values differ between two configuration objects, with both values.
fn config_changes(old: &Value, new: &Value) -> Vec<(String, Value, Value)> {
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (
                old.get(k).unwrap_or(&Value::Null),
                new.get(k).unwrap_or(&Value::Null),
            );
            (a != b).then(|| (k.clone(), a.clone(), b.clone()))
        })
        .collect()
}

/// Reads and parses a JSON file, naming it in the error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Best effort: makes a rename in `dir` durable. Some filesystems refuse directory fsync;
/// the files themselves are synced already.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Complete checkpoints in a run directory, oldest first.
pub fn checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let path = entry.path();
        if path.join(TRAINER_STATE_FILE).is_file() {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint of a run directory.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(dir)?.pop().map(|(_, p)| p))
}

/// Removes `checkpoint-*.tmp` directories: checkpoints whose writing a crash interrupted.
fn remove_partial_checkpoints(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("checkpoint-") && name.ends_with(".tmp") {
            let p = entry.path();
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// Reads a checkpoint's trainer state.
pub fn load_trainer_state(ckpt: &Path) -> Result<TrainerState> {
    read_json(&ckpt.join(TRAINER_STATE_FILE))
}

fn save_optimizer<B: ModelOps>(be: &B, opt: &Optimizer<B>, path: &Path) -> Result<()> {
    let m = be.download(be.all(&opt.m));
    let v = be.download(be.all(&opt.v));
    let st_err = |e: safetensors::SafeTensorError| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let bytes = |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|f| f.to_le_bytes()).collect() };
    let (mb, vb) = (bytes(&m), bytes(&v));
    let tensors = [
        (
            "exp_avg",
            TensorView::new(Dtype::F32, vec![m.len()], &mb).map_err(st_err)?,
        ),
        (
            "exp_avg_sq",
            TensorView::new(Dtype::F32, vec![v.len()], &vb).map_err(st_err)?,
        ),
    ];
    let meta = HashMap::from([("step".to_string(), opt.step.to_string())]);
    let out = safetensors::serialize(tensors, Some(meta)).map_err(st_err)?;
    write_atomic(path, &out)
}

/// Restores an optimizer from a checkpoint: its moments and step count, with the settings
/// `cfg` (which a resumed run may have changed, such as the learning rate).
pub fn load_optimizer<B: ModelOps>(
    be: &B,
    ckpt: &Path,
    cfg: OptimConfig,
    n: usize,
) -> Result<Optimizer<B>> {
    let path = ckpt.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let st_err = |msg: String| Error::Safetensors {
        path: path.clone(),
        msg,
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| st_err(e.to_string()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| st_err("no `step` in the metadata".into()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| st_err(e.to_string()))?;
    let tensor = |name: &str| -> Result<B::Buf> {
        let t = st.tensor(name).map_err(|_| Error::MissingTensor {
            path: path.clone(),
            name: name.into(),
        })?;
        if t.dtype() != Dtype::F32 || t.shape() != [n] {
            return Err(Error::ShapeMismatch {
                path: path.clone(),
                name: name.into(),
                expected: vec![n],
                found: t.shape().to_vec(),
            });
        }
        let host: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(be.upload(&host))
    };
    Ok(Optimizer {
        cfg,
        m: tensor("exp_avg")?,
        v: tensor("exp_avg_sq")?,
        step,
    })
}
