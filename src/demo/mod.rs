//! `rlhf demo`: the whole pipeline on a built-in task, from nothing to a table. A tiny model
//! learns from SFT data in which it often flatters users who are wrong ("Is 17 + 25 = 43?" →
//! "Yes, that's right!"); a reward model learns from preference pairs that honesty wins; then
//! PPO (against the reward model), GRPO (against the rule checker) and DPO (on the pairs), each
//! from the SFT model, make it honest, and all four are judged on held-out claims.
//!
//! Every stage is an ordinary trainer run in its own directory under `--out`, marked complete
//! by a `stage.json` written last; a rerun skips complete stages and resumes an interrupted
//! one from its latest checkpoint, so Ctrl-C loses at most the stage under way's steps since
//! its last checkpoint.

pub mod eval;
pub mod judge;
pub mod task;

use crate::algo::{dpo, grpo, ppo, reward as rm, sft};
use crate::backend::cpu::Cpu;
use crate::checkpoint::{latest_checkpoint, read_json, RUN_CONFIG_FILE};
use crate::model::config::Config;
use crate::model::weights::{copy_tokenizer_files, write_atomic, SaveDtype};
use crate::model::{random_params, Layout, Model};
use crate::{Error, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use task::TaskConfig;

/// Arguments of `rlhf demo`.
#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DemoArgs {
    /// Run directory; rerunning with the same one skips the stages already complete.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Seed of the data, the initialisation and every stage.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Multiplies every stage's step count (2: train twice as long).
    #[arg(long, default_value_t = 1.0)]
    pub steps_scale: f64,
    /// A run small enough for CI: fewer claims, fewer steps, a smaller evaluation.
    #[arg(long)]
    pub quick: bool,
    /// No progress bars or notes (the table is still printed).
    #[arg(long)]
    pub quiet: bool,
}

/// Everything the demo's stages are given: the data's sizes, the model's shape, each
/// trainer's settings. Recorded in `demo_config.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// How the data is made.
    pub task: TaskConfig,
    /// The Llama's width, depth and heads.
    pub d_model: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// SFT: optimizer steps, sequences per step, peak learning rate.
    pub sft_steps: usize,
    pub sft_batch: usize,
    pub sft_lr: f32,
    /// Reward model: steps and peak learning rate.
    pub rm_steps: usize,
    pub rm_lr: f32,
    /// PPO: steps, prompts per step, peak learning rate.
    pub ppo_steps: usize,
    pub ppo_prompts: usize,
    pub ppo_lr: f32,
    /// The KL penalty's coefficient. With TRL's 0.05 PPO drifts into what the reward model
    /// scores well but cannot check (sums off by one, misquoted operands); 0.2 keeps it near
    /// the SFT model, which gets its sums right.
    pub ppo_kl_coef: f32,
    /// GRPO: steps, prompts per step (4 samples each), peak learning rate.
    pub grpo_steps: usize,
    pub grpo_prompts: usize,
    pub grpo_lr: f32,
    /// DPO: steps and peak learning rate.
    pub dpo_steps: usize,
    pub dpo_lr: f32,
    /// Samples per held-out claim at temperature 1.
    pub eval_samples: usize,
}

impl Plan {
    /// The settings for `args`: the default run, or the quick one, with step counts scaled.
    pub fn new(args: &DemoArgs) -> Result<Plan> {
        if !(args.steps_scale.is_finite() && args.steps_scale > 0.0) {
            return Err(Error::Invalid(format!(
                "--steps-scale must be a positive number, got {}",
                args.steps_scale
            )));
        }
        let mut p = Plan {
            task: TaskConfig {
                sft_examples: 40_000,
                preference_pairs: 4_000,
                rl_prompts: 4_000,
                eval_claims: 200,
                sycophancy: 0.5,
                wrong_share: 0.5,
                verdict_weight: 3.0,
            },
            d_model: 128,
            n_layer: 4,
            n_head: 8,
            sft_steps: 3000,
            sft_batch: 64,
            sft_lr: 3e-3,
            rm_steps: 300,
            rm_lr: 1e-3,
            ppo_steps: 100,
            ppo_prompts: 32,
            ppo_lr: 3e-4,
            ppo_kl_coef: 0.2,
            grpo_steps: 150,
            grpo_prompts: 16,
            grpo_lr: 3e-4,
            dpo_steps: 300,
            dpo_lr: 2e-4,
            eval_samples: 4,
        };
        if args.quick {
            p.task.sft_examples = 8_000;
            p.task.preference_pairs = 1_000;
            p.task.rl_prompts = 1_000;
            p.task.eval_claims = 64;
            p.d_model = 64;
            p.n_layer = 3;
            p.n_head = 4;
            p.sft_steps = 1200;
            p.rm_steps = 60;
            p.ppo_steps = 30;
            p.grpo_steps = 60;
            p.dpo_steps = 150;
        }
        let scale = |n: &mut usize| *n = ((*n as f64 * args.steps_scale).round() as usize).max(1);
        for n in [
            &mut p.sft_steps,
            &mut p.rm_steps,
            &mut p.ppo_steps,
            &mut p.grpo_steps,
            &mut p.dpo_steps,
        ] {
            scale(n);
        }
        Ok(p)
    }

    /// The model's configuration: a small Llama (RMSNorm, RoPE, SwiGLU) over the task's
    /// vocabulary.
    fn model_config(
        &self,
        vocab_size: usize,
        tok: &crate::model::tokenizer::Tokenizer,
    ) -> Result<Config> {
        let base = Config::builtin("llama-tiny", vocab_size)?;
        let cfg = Config {
            hidden_size: self.d_model,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_kv_head: self.n_head,
            head_dim: self.d_model / self.n_head,
            intermediate_size: self.d_model * 8 / 3 / 16 * 16,
            max_position: 64,
            bos_token_id: tok.bos_id(),
            eos_token_ids: tok.eos_id().into_iter().collect(),
            pad_token_id: tok.pad_id(),
            ..base
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The file that marks a stage complete, with its wall time.
const STAGE_FILE: &str = "stage.json";

/// Runs `train` in `RUN/name` unless `stage.json` says it is complete. `train` gets the
/// directory and whether to resume (an earlier run was interrupted after a checkpoint); a
/// directory interrupted before its first checkpoint is cleared and started afresh. Returns the
/// stage's wall time in seconds, from the run that completed it.
fn stage(
    root: &Path,
    name: &str,
    quiet: bool,
    train: impl FnOnce(&Path, bool) -> Result<()>,
) -> Result<f64> {
    let dir = root.join(name);
    let marker = dir.join(STAGE_FILE);
    if marker.is_file() {
        let v: Value = read_json(&marker)?;
        if !quiet {
            println!("[{name}] complete in an earlier run: skipped");
        }
        return Ok(v["seconds"].as_f64().unwrap_or(f64::NAN));
    }
    let resume = dir.join(RUN_CONFIG_FILE).is_file() && latest_checkpoint(&dir)?.is_some();
    if dir.exists() && !resume {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    if !quiet {
        println!(
            "[{name}] {}",
            if resume {
                "resuming from its latest checkpoint"
            } else {
                "starting"
            }
        );
    }
    let t0 = Instant::now();
    train(&dir, resume)?;
    let seconds = t0.elapsed().as_secs_f64();
    write_atomic(
        &marker,
        serde_json::to_string_pretty(
            &json!({ "stage": name, "seconds": seconds, "resumed": resume }),
        )
        .expect("JSON values serialise")
        .as_bytes(),
    )?;
    Ok(seconds)
}

/// Writes the data, the tokenizer and the randomly initialised model (`RUN/init`), unless an
/// earlier run did.
fn prepare(be: &Cpu, root: &Path, plan: &Plan, seed: u64) -> Result<()> {
    let init = root.join("init");
    if init.join("model.safetensors").is_file() {
        return Ok(());
    }
    let data = task::make(&plan.task, seed);
    task::write_tokenizer(&root.join("data"))?;
    let tok = crate::model::tokenizer::Tokenizer::load(&root.join("data"))?;
    task::write(&data, &plan.task, &tok, &root.join("data"))?;
    let cfg = plan.model_config(tok.vocab_size(), &tok)?;
    let layout = Layout::new(&cfg);
    let model = Model::new(be, cfg, &random_params(&layout, 0.02, seed))?;
    copy_tokenizer_files(&root.join("data"), &init)?;
    model.save(be, &init, SaveDtype::F32)
}

/// `rlhf demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let be = Cpu;
    let plan = Plan::new(args)?;
    let root = args.out.as_path();
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    // What decides the results: a rerun must match it to reuse completed stages. (`--quiet`
    // and `--out` do not count.)
    let settings =
        json!({ "seed": args.seed, "steps_scale": args.steps_scale, "quick": args.quick });
    let record = json!({ "settings": settings, "plan": plan, "engine": crate::checkpoint::engine_version() });
    let record_path = root.join("demo_config.json");
    if record_path.is_file() {
        let old: Value = read_json(&record_path)?;
        anyhow::ensure!(
            old["settings"] == record["settings"] && old["plan"] == record["plan"],
            "{} holds a demo run with other settings ({}: {}); rerun with those, or choose \
             another --out",
            root.display(),
            record_path.display(),
            old["settings"]
        );
    } else {
        write_atomic(
            &record_path,
            serde_json::to_string_pretty(&record)?.as_bytes(),
        )?;
    }
    prepare(&be, root, &plan, args.seed)?;
    let data = root.join("data");
    let init = root.join("init").display().to_string();
    let mut times = Vec::new();

    let sft_dir = root.join("sft");
    times.push(stage(root, "sft", args.quiet, |out, resume| {
        let a = sft::SftArgs {
            model: Some(init.clone()),
            data: Some(data.join("sft.jsonl")),
            out: Some(out.to_path_buf()),
            max_steps: Some(plan.sft_steps),
            batch_size: Some(plan.sft_batch),
            lr: Some(plan.sft_lr),
            warmup_steps: plan.sft_steps / 20,
            weight_decay: 0.1,
            eval_every: 0,
            save_every: 250,
            seed: args.seed,
            resume,
            quiet: args.quiet,
            ..sft::SftArgs::default()
        };
        sft::train(&be, &a).map(|_| ())
    })?);
    let sft_model = sft_dir.display().to_string();

    let rm_dir = root.join("rm");
    times.push(stage(root, "rm", args.quiet, |out, resume| {
        let a = rm::RmArgs {
            model: Some(sft_model.clone()),
            data: Some(data.join("preferences.jsonl")),
            out: Some(out.to_path_buf()),
            max_steps: Some(plan.rm_steps),
            batch_size: 32,
            lr: plan.rm_lr,
            eval_every: 0,
            save_every: 100,
            seed: args.seed,
            resume,
            quiet: args.quiet,
            ..rm::RmArgs::default()
        };
        rm::train(&be, &a).map(|_| ())
    })?);

    times.push(stage(root, "ppo", args.quiet, |out, resume| {
        let a = ppo::PpoArgs {
            model: Some(sft_model.clone()),
            data: Some(data.join("prompts.jsonl")),
            reward: vec![format!("model={}", rm_dir.display())],
            critic_init: Some(ppo::CriticInit::Reward),
            out: Some(out.to_path_buf()),
            steps: plan.ppo_steps,
            prompts_per_step: plan.ppo_prompts,
            lr: plan.ppo_lr,
            kl_coef: plan.ppo_kl_coef,
            max_new_tokens: eval::MAX_NEW_TOKENS,
            temperature: 1.0,
            save_every: 20,
            seed: args.seed,
            resume,
            quiet: args.quiet,
            ..ppo::PpoArgs::default()
        };
        ppo::train(&be, &a).map(|_| ())
    })?);

    times.push(stage(root, "grpo", args.quiet, |out, resume| {
        let a = grpo::GrpoArgs {
            model: Some(sft_dir.clone()),
            data: Some(data.join("prompts.jsonl")),
            reward: vec!["demo honesty judge".into()],
            out: Some(out.to_path_buf()),
            steps: Some(plan.grpo_steps),
            prompts_per_step: plan.grpo_prompts,
            num_generations: 4,
            lr: plan.grpo_lr,
            max_new_tokens: eval::MAX_NEW_TOKENS,
            save_every: 20,
            seed: args.seed,
            resume,
            quiet: args.quiet,
            ..grpo::GrpoArgs::default()
        };
        grpo::train(&be, &a, &mut judge::HonestyReward).map(|_| ())
    })?);

    times.push(stage(root, "dpo", args.quiet, |out, resume| {
        let a = dpo::DpoArgs {
            model: Some(sft_model.clone()),
            data: Some(data.join("preferences.jsonl")),
            out: Some(out.to_path_buf()),
            max_steps: Some(plan.dpo_steps),
            batch_size: 16,
            lr: plan.dpo_lr,
            eval_every: 0,
            save_every: 100,
            seed: args.seed,
            resume,
            quiet: args.quiet,
            ..dpo::DpoArgs::default()
        };
        dpo::train(&be, &a).map(|_| ())
    })?);

    let rows = evaluate_all(&be, root, &plan, args, &times)?;
    print_table(&rows);
    let summary = json!({
        "seed": args.seed,
        "eval_claims": plan.task.eval_claims,
        "samples_per_claim": plan.eval_samples,
        "models": rows.iter().map(|r| json!({"model": r.name, "scores": r.scores, "seconds": r.seconds})).collect::<Vec<_>>(),
    });
    write_atomic(
        &root.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let png = crate::plot::plot_run(root, None)?;
    println!(
        "Summary: {}; reward and KL curves: {}",
        root.join("summary.json").display(),
        png.display()
    );
    Ok(())
}

/// One row of the closing table.
struct Row {
    name: &'static str,
    scores: eval::Scores,
    seconds: f64,
}

/// Judges the SFT model and the three RL models on the held-out claims; each model's scores
/// are kept in `RUN/eval/NAME.json`, so a rerun does not judge it again.
fn evaluate_all(
    be: &Cpu,
    root: &Path,
    plan: &Plan,
    args: &DemoArgs,
    times: &[f64],
) -> Result<Vec<Row>> {
    let tok = crate::model::tokenizer::Tokenizer::load(&root.join("data"))?;
    let claims: Vec<task::Claim> = task::read_eval(&root.join("data").join("eval.jsonl"))?;
    let sft = Model::load(be, &root.join("sft"))?;
    let eval_dir = root.join("eval");
    std::fs::create_dir_all(&eval_dir).map_err(|e| Error::io(&eval_dir, e))?;
    // Wall time: SFT's own, and each RL model's on top of what it started from (the RM for PPO).
    let names = ["sft", "ppo", "grpo", "dpo"];
    let secs = [times[0], times[1] + times[2], times[3], times[4]];
    let mut rows = Vec::new();
    for (name, seconds) in names.into_iter().zip(secs) {
        let path = eval_dir.join(format!("{name}.json"));
        let scores = if path.is_file() {
            read_json(&path)?
        } else {
            if !args.quiet {
                println!("[eval] judging {name} on {} held-out claims", claims.len());
            }
            let model = Model::load(be, &root.join(name))?;
            let s = eval::evaluate(
                be,
                &model,
                &sft,
                &tok,
                &claims,
                plan.eval_samples,
                args.seed,
            )?;
            write_atomic(
                &path,
                serde_json::to_string_pretty(&s)
                    .expect("JSON values serialise")
                    .as_bytes(),
            )?;
            s
        };
        rows.push(Row {
            name,
            scores,
            seconds,
        });
    }
    Ok(rows)
}

/// Prints the closing table.
fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<6} {:>14} {:>14} {:>16} {:>16} {:>8} {:>10} {:>8}",
        "model",
        "honest|wrong",
        "honest|right",
        "greedy h|wrong",
        "greedy h|right",
        "length",
        "KL to SFT",
        "time"
    );
    for r in rows {
        let s = &r.scores;
        println!(
            "{:<6} {:>13.1}% {:>13.1}% {:>15.1}% {:>15.1}% {:>8.1} {:>10.3} {:>7.0}s",
            r.name,
            100.0 * s.honest_wrong,
            100.0 * s.honest_right,
            100.0 * s.greedy_honest_wrong,
            100.0 * s.greedy_honest_right,
            s.mean_length,
            s.kl_to_sft,
            r.seconds
        );
    }
}
