//! `rlhf bench`: this engine against PyTorch/transformers on the same work, run alternately in
//! one invocation so that machine drift hits both sides alike.

use crate::algo::sft::nll_loss_and_grad;
use crate::backend::cpu::Cpu;
use crate::backend::cuda::{Cuda, DeviceChoice, Selected};
use crate::backend::emu::ops;
use crate::backend::emu::plan::{AttnBwdPtrs, AttnDtype, AttnFwdPtrs, AttnKernel};
use crate::backend::emu::Emu;
use crate::backend::{AttnShape, ModelOps};
use crate::model::{random_params, Batch, Config, Layout, Model, Pad};
use crate::optim::{OptimConfig, Optimizer};
use crate::rng::Rng;
use anyhow::{Context, Result};
use half::bf16;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Arguments of `rlhf bench train`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Built-in configurations to run (`gpt2-6l-384`, `llama-tiny` = the llama fixture's shape).
    #[arg(long, value_delimiter = ',', default_value = "llama-tiny,gpt2-6l-384")]
    pub configs: Vec<String>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Timed training steps per round and side.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Alternating rounds (engine, PyTorch, engine, PyTorch, ...); the best round of each counts.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Python interpreter with torch and transformers installed.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Skip the PyTorch side (no Python needed).
    #[arg(long)]
    pub no_torch: bool,
    /// Where both sides run: `cpu` (PyTorch with 2 threads) or `cuda` (GPU 0; PyTorch with f32
    /// weights and bf16 autocast, the engine's precision there: bf16 products, f32 the rest).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
}

/// Peak resident memory of this process, in MiB (getrusage).
pub fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

/// The best single-call sgemm rate (GFLOP/s) the `gemm` crate reaches here, square `size`.
pub fn sgemm_gflops(size: usize, reps: usize) -> f64 {
    let a = vec![1.0f32; size * size];
    let b = vec![0.5f32; size * size];
    let mut c = vec![0.0f32; size * size];
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        // SAFETY: all three matrices are size×size, row-major, and live for the call.
        unsafe {
            gemm::gemm(
                size,
                size,
                size,
                c.as_mut_ptr(),
                1,
                size as isize,
                false,
                a.as_ptr(),
                1,
                size as isize,
                b.as_ptr(),
                1,
                size as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (size as f64).powi(3) / best / 1e9
}

/// FLOPs of one training step (forward + backward ≈ 3× forward): every matmul, the LM head, and
/// causal attention (2·B·NH·T²·HD per layer forward, the FlashAttention convention).
pub fn train_step_flops(cfg: &Config, b: usize, t: usize) -> f64 {
    let layout = Layout::new(cfg);
    let n = (b * t) as f64;
    let matmul_params: usize = layout
        .params
        .iter()
        .filter(|p| p.shape.len() == 2 && p.name != "embed" && p.name != "pos_embed")
        .map(|p| p.range.len())
        .sum::<usize>()
        + if layout.lm_head.is_none() {
            cfg.vocab_size * cfg.hidden_size
        } else {
            0
        };
    let attn = 2.0 * (b * cfg.n_head * t * t * cfg.head_dim) as f64 * cfg.n_layer as f64;
    3.0 * (2.0 * n * matmul_params as f64 + attn)
}

struct Side {
    tokens_per_s: f64,
    peak_rss_mb: f64,
}

fn engine_round<B: ModelOps>(
    be: &B,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
    batch: &Batch,
    weights: &[f32],
    steps: usize,
) -> Result<f64> {
    let mut grads = be.zeros(model.layout.total);
    let t0 = Instant::now();
    for _ in 0..steps {
        be.fill(be.all_mut(&mut grads), 0.0);
        nll_loss_and_grad(be, model, batch, weights, &mut grads)?;
        opt.update(be, &model.layout, &mut model.params, &mut grads, 1e-4);
    }
    // On a GPU the last update may still be running: reading a weight back waits for it.
    be.download(be.view(&model.params, 0..1));
    Ok((batch.n() * steps) as f64 / t0.elapsed().as_secs_f64())
}

/// Runs one of the Python baselines in `benches/` and parses the JSON line it prints last.
fn run_python(python: &str, script: &str, args: &[String]) -> Result<serde_json::Value> {
    let path = format!("{}/benches/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .arg(&path)
        .args(args)
        .output()
        .with_context(|| format!("running {python} {path}"))?;
    anyhow::ensure!(
        out.status.success(),
        "the PyTorch baseline {script} failed (pass --no-torch to skip it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .with_context(|| format!("parsing the output of {script}: {text}"))
}

fn torch_round(args: &TrainArgs, config_dir: &std::path::Path) -> Result<Side> {
    let v = run_python(
        &args.python,
        "torch_baseline.py",
        &[
            "--device".into(),
            device_name(args.device),
            "--config-dir".into(),
            config_dir.display().to_string(),
            "--batch".into(),
            args.batch.to_string(),
            "--seq".into(),
            args.seq.to_string(),
            "--steps".into(),
            args.steps.to_string(),
        ],
    )?;
    Ok(Side {
        tokens_per_s: v["tokens_per_s"].as_f64().unwrap_or(0.0),
        peak_rss_mb: v["peak_rss_mb"].as_f64().unwrap_or(0.0),
    })
}

/// Runs `rlhf bench train`.
pub fn train(args: &TrainArgs) -> Result<()> {
    anyhow::ensure!(
        matches!(args.device, DeviceChoice::Cpu | DeviceChoice::Cuda),
        "rlhf bench train: --device cpu or cuda (where PyTorch runs too)"
    );
    crate::with_backend!(args.device, |be| train_on(be, args))
}

fn train_on<B: ModelOps>(be: &B, args: &TrainArgs) -> Result<()> {
    if args.device == DeviceChoice::Cpu {
        let peak = sgemm_gflops(1024, 5);
        println!(
            "sgemm (gemm crate, 1024³, {} threads): {peak:.1} GFLOP/s",
            rayon::current_num_threads()
        );
    }
    println!(
        "{:<12} {:>14} {:>14} {:>7} {:>10} {:>12} {:>12}",
        "config", "engine tok/s", "torch tok/s", "ratio", "GFLOP/s", "engine MiB", "torch MiB"
    );
    for name in &args.configs {
        let cfg = Config::builtin(name, 512)?;
        let layout = Layout::new(&cfg);
        let mut model = Model::new(be, cfg.clone(), &random_params(&layout, 0.02, 0))?;
        let mut opt = Optimizer::new(be, OptimConfig::default(), layout.total);
        let mut rng = Rng::new(1);
        let rows: Vec<Vec<u32>> = (0..args.batch)
            .map(|_| {
                (0..args.seq)
                    .map(|_| 2 + rng.below(cfg.vocab_size - 2) as u32)
                    .collect()
            })
            .collect();
        let batch = Batch::new(&rows, 1, Pad::Right);
        let mut weights = vec![1.0f32; batch.n()];
        weights
            .iter_mut()
            .skip(args.seq - 1)
            .step_by(args.seq)
            .for_each(|w| *w = 0.0);

        let dir = tempdir_for(name)?;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&cfg.to_json())?,
        )?;
        engine_round(be, &mut model, &mut opt, &batch, &weights, 1)?; // warm-up
        let (mut ours, mut theirs): (f64, Option<Side>) = (0.0, None);
        for _ in 0..args.rounds {
            ours = ours.max(engine_round(
                be, &mut model, &mut opt, &batch, &weights, args.steps,
            )?);
            if !args.no_torch {
                let s = torch_round(args, &dir)?;
                if theirs
                    .as_ref()
                    .is_none_or(|t| s.tokens_per_s > t.tokens_per_s)
                {
                    theirs = Some(s);
                }
            }
        }
        let gflops = train_step_flops(&cfg, args.batch, args.seq) * ours / batch.n() as f64 / 1e9;
        let (t_tok, t_mem, ratio) = match &theirs {
            Some(t) => (
                format!("{:.0}", t.tokens_per_s),
                format!("{:.0}", t.peak_rss_mb),
                format!("{:.2}x", ours / t.tokens_per_s),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<12} {:>14.0} {:>14} {:>7} {:>10.1} {:>12.0} {:>12}",
            name,
            ours,
            t_tok,
            ratio,
            gflops,
            peak_rss_mb(),
            t_mem
        );
        std::fs::remove_dir_all(&dir).ok();
    }
    Ok(())
}

fn tempdir_for(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("rlhf-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Arguments of `rlhf bench generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Built-in configurations to run.
    #[arg(long, value_delimiter = ',', default_value = "llama-tiny,gpt2-6l-384")]
    pub configs: Vec<String>,
    /// Prompts per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
    /// New tokens per prompt (no early stop).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Alternating rounds; the best of each side counts.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Python interpreter with torch and transformers installed.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Skip the transformers side.
    #[arg(long)]
    pub no_torch: bool,
}

/// Memory read bandwidth in GB/s: the best of a few parallel passes summing 256 MiB.
pub fn read_bandwidth_gbs() -> f64 {
    use rayon::prelude::*;
    let data = vec![1.0f32; 64 << 20];
    let mut best = f64::MAX;
    let mut sink = 0.0;
    for _ in 0..5 {
        let t = Instant::now();
        // Eight independent partial sums per chunk, so the adds vectorise and memory, not the
        // add latency, sets the pace.
        sink += data
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0.0f32; 8];
                for x in c.chunks_exact(8) {
                    for (a, v) in acc.iter_mut().zip(x) {
                        *a += v;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum::<f32>();
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (data.len() * 4) as f64 / best / 1e9
}

/// Bytes of weights one decode step reads: every matrix but the embedding tables, plus the LM
/// head (the embedding itself when tied).
pub fn decode_weight_bytes(cfg: &Config) -> usize {
    let layout = Layout::new(cfg);
    let lm = if layout.lm_head.is_none() {
        cfg.vocab_size * cfg.hidden_size
    } else {
        0
    };
    4 * (layout
        .params
        .iter()
        .filter(|p| p.name != "embed" && p.name != "pos_embed")
        .map(|p| p.range.len())
        .sum::<usize>()
        + lm)
}

/// Timed calls per round on each side of `rlhf bench generate`, after one warm-up call.
const GENERATE_REPS: usize = 2;

/// Runs `rlhf bench generate`.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    use crate::model::generate::{generate, SamplingConfig};
    let bw = read_bandwidth_gbs();
    println!(
        "memory read bandwidth ({} threads): {bw:.1} GB/s",
        rayon::current_num_threads()
    );
    println!(
        "{:<12} {:>14} {:>14} {:>7} {:>14} {:>9}",
        "config", "engine tok/s", "hf tok/s", "ratio", "bound tok/s", "of bound"
    );
    let be = Cpu;
    for name in &args.configs {
        let cfg = Config::builtin(name, 512)?;
        let layout = Layout::new(&cfg);
        let model = Model::new(&be, cfg.clone(), &random_params(&layout, 0.02, 0))?;
        let mut rng = Rng::new(1);
        let prompts: Vec<Vec<u32>> = (0..args.batch)
            .map(|_| {
                (0..args.prompt_len)
                    .map(|_| 2 + rng.below(cfg.vocab_size - 2) as u32)
                    .collect()
            })
            .collect();
        let sampling = SamplingConfig {
            max_new_tokens: args.new_tokens,
            temperature: 1.0,
            ..Default::default()
        };
        let dir = tempdir_for(name)?;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&cfg.to_json())?,
        )?;
        generate(&be, &model, &prompts, &sampling, None, &mut rng)?; // warm-up
        let new_tokens = (args.batch * args.new_tokens) as f64;
        let (mut ours, mut theirs) = (0.0f64, None::<f64>);
        for _ in 0..args.rounds {
            // The protocol of `torch_generate.py`: a warm-up call after the other side has run,
            // then the best of `GENERATE_REPS` timed calls.
            generate(&be, &model, &prompts, &sampling, None, &mut rng)?;
            for _ in 0..GENERATE_REPS {
                let t = Instant::now();
                generate(&be, &model, &prompts, &sampling, None, &mut rng)?;
                ours = ours.max(new_tokens / t.elapsed().as_secs_f64());
            }
            if !args.no_torch {
                let v = run_python(
                    &args.python,
                    "torch_generate.py",
                    &[
                        "--config-dir".into(),
                        dir.display().to_string(),
                        "--batch".into(),
                        args.batch.to_string(),
                        "--prompt-len".into(),
                        args.prompt_len.to_string(),
                        "--new-tokens".into(),
                        args.new_tokens.to_string(),
                        "--reps".into(),
                        GENERATE_REPS.to_string(),
                    ],
                )?;
                let tps = v["new_tokens_per_s"].as_f64().unwrap_or(0.0);
                theirs = Some(theirs.map_or(tps, |t: f64| t.max(tps)));
            }
        }
        let bound = args.batch as f64 * bw * 1e9 / decode_weight_bytes(&cfg) as f64;
        let (t, ratio) = match theirs {
            Some(t) => (format!("{t:.0}"), format!("{:.1}x", ours / t)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<12} {:>14.0} {:>14} {:>7} {:>14.0} {:>8.0}%",
            name,
            ours,
            t,
            ratio,
            bound,
            100.0 * ours / bound
        );
        std::fs::remove_dir_all(&dir).ok();
    }
    Ok(())
}

/// Arguments of `rlhf bench grpo`.
#[derive(clap::Args, Debug, Clone)]
pub struct GrpoBenchArgs {
    /// Built-in configurations to run (vocabulary 512, as the fixtures).
    #[arg(long, value_delimiter = ',', default_value = "llama-tiny,gpt2-6l-384")]
    pub configs: Vec<String>,
    /// KL coefficients to run (0 loads no reference model).
    #[arg(long, value_delimiter = ',', default_value = "0,0.04")]
    pub betas: Vec<f32>,
    /// Prompts per iteration.
    #[arg(long, default_value_t = 2)]
    pub prompts: usize,
    /// Generations per prompt.
    #[arg(long, default_value_t = 4)]
    pub generations: usize,
    /// Longest completion.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Timed iterations per side (after one warm-up iteration).
    #[arg(long, default_value_t = 4)]
    pub iterations: usize,
    /// Python interpreter with torch, transformers and trl installed.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Skip the TRL side.
    #[arg(long)]
    pub no_trl: bool,
    /// Internal: run one engine case in this directory and print its figures as JSON.
    #[arg(long, hide = true)]
    pub engine_case: Option<PathBuf>,
    /// Where the engine runs (`rlhf grpo --device`). TRL runs on the same device for `cpu` and
    /// `cuda` (there: f32 weights with bf16 autocast, the engine's precision), and is not
    /// compared with `emu` or `auto`.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
}

/// A word-level tokenizer with `v` tokens (specials, letters, then filler tokens), so that a
/// random model's vocabulary and its tokenizer's agree and EOS is as rare as any other token.
fn bench_tokenizer(dir: &std::path::Path, v: usize) -> Result<()> {
    use serde_json::json;
    let mut vocab = serde_json::Map::new();
    let specials = ["<|endoftext|>", "<|pad|>", "<|unk|>"];
    let letters = "abcdefghijklmnopqrstuvwxyz=".chars().map(String::from);
    let filler = (0..).map(|i| format!("<t{i}>"));
    for (i, t) in specials
        .iter()
        .map(|s| s.to_string())
        .chain(letters)
        .chain(filler)
        .take(v)
        .enumerate()
    {
        vocab.insert(t, json!(i));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(id, s)| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
        "post_processor": null, "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<|unk|>"},
    });
    let config = json!({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>", "model_max_length": 256});
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tokenizer)?,
    )?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string(&config)?,
    )?;
    Ok(())
}

/// The benchmark's reward: the number of `a`s in the completion (the TRL side uses the same).
struct CountA;

impl crate::reward::RewardSource for CountA {
    fn describe(&self) -> String {
        "count of 'a'".into()
    }
    fn score(&mut self, inputs: &[crate::reward::RewardInput<'_>]) -> crate::Result<Vec<f32>> {
        Ok(inputs
            .iter()
            .map(|i| i.completion.matches('a').count() as f32)
            .collect())
    }
}

/// Resident memory of this process now, in MiB (`/proc/self/statm`; 0 where unavailable).
fn current_rss_mb() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|x| x.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    pages * page / (1024.0 * 1024.0)
}

/// One engine case of `rlhf bench grpo`, run in a child process of its own so that its peak
/// memory is its own: GRPO on `config` with `beta`; prints the per-phase means as JSON.
fn grpo_engine_case(
    args: &GrpoBenchArgs,
    beta: f32,
    dir: &std::path::Path,
) -> Result<serde_json::Value> {
    use crate::algo::grpo::{train as grpo_train, GrpoArgs};
    let idle = current_rss_mb();
    let model_dir = dir.join("model");
    let prompts: String = (0..args.prompts * (args.iterations + 1))
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"prompt": &"abcdefgh"[..3 + i % 5]})
            )
        })
        .collect();
    let data = dir.join("prompts.jsonl");
    std::fs::write(&data, prompts)?;
    let gargs = GrpoArgs {
        model: Some(model_dir),
        data: Some(data),
        out: Some(dir.join(format!("run-{beta}"))),
        num_generations: args.generations,
        prompts_per_step: args.prompts,
        steps: Some(args.iterations + 1),
        max_new_tokens: args.max_new_tokens,
        beta,
        lr: 1e-5,
        save_every: 0,
        quiet: true,
        ..GrpoArgs::default()
    };
    crate::with_backend!(args.device, |be| grpo_train(be, &gargs, &mut CountA))?;
    // Per-step metrics, the warm-up step left out.
    let text = std::fs::read_to_string(dir.join(format!("run-{beta}/metrics.jsonl")))?;
    let steps: Vec<serde_json::Value> = text
        .lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mean = |k: &str| {
        steps.iter().filter_map(|s| s[k].as_f64()).sum::<f64>() / steps.len().max(1) as f64
    };
    Ok(serde_json::json!({
        "generate_s": mean("time/generate_s"),
        "reward_s": mean("time/reward_s"),
        "reference_s": mean("time/reference_s"),
        "train_s": mean("time/train_s"),
        "rollout_tokens_per_s": mean("rollout_tokens_per_s"),
        "train_tokens_per_s": mean("train_tokens_per_s"),
        "peak_rss_growth_mb": peak_rss_mb() - idle,
    }))
}

/// A `--device` value as the command line spells it.
fn device_name(d: DeviceChoice) -> String {
    use clap::ValueEnum;
    d.to_possible_value()
        .expect("every choice has a name")
        .get_name()
        .to_string()
}

/// Runs `rlhf bench grpo`.
pub fn grpo(args: &GrpoBenchArgs) -> Result<()> {
    if let Some(dir) = &args.engine_case {
        let v = grpo_engine_case(args, args.betas[0], dir)?;
        println!("{v}");
        return Ok(());
    }
    println!(
        "GRPO iteration: {} prompts x {} generations, up to {} new tokens; rollout, reward, reference pass, one optimizer step",
        args.prompts, args.generations, args.max_new_tokens
    );
    let trl_device = match args.device {
        DeviceChoice::Cpu | DeviceChoice::Cuda if !args.no_trl => Some(device_name(args.device)),
        _ => None,
    };
    match &trl_device {
        Some(d) if d != "cpu" => println!("engine and TRL on --device {d}"),
        Some(_) => {}
        None => println!(
            "engine on --device {}; TRL not compared",
            device_name(args.device)
        ),
    }
    println!(
        "{:<12} {:>5} {:>11} {:>11} {:>7} {:>13} {:>12} {:>26} {:>10} {:>10}",
        "config",
        "beta",
        "engine s/it",
        "trl s/it",
        "ratio",
        "rollout tok/s",
        "train tok/s",
        "gen/reward/ref/train %",
        "engine MiB",
        "trl MiB"
    );
    let be = Cpu;
    for name in &args.configs {
        for &beta in &args.betas {
            let cfg = Config::builtin(name, 512)?;
            let layout = Layout::new(&cfg);
            let dir = tempdir_for(&format!("grpo-{name}-{beta}"))?;
            let model_dir = dir.join("model");
            let model = Model::new(&be, cfg.clone(), &random_params(&layout, 0.02, 0))?;
            model.save(&be, &model_dir, crate::model::weights::SaveDtype::F32)?;
            bench_tokenizer(&model_dir, cfg.vocab_size)?;
            let me = std::env::current_exe()?;
            let out = Command::new(me)
                .args([
                    "bench",
                    "grpo",
                    "--configs",
                    name,
                    "--betas",
                    &beta.to_string(),
                ])
                .args([
                    "--prompts",
                    &args.prompts.to_string(),
                    "--generations",
                    &args.generations.to_string(),
                ])
                .args([
                    "--max-new-tokens",
                    &args.max_new_tokens.to_string(),
                    "--iterations",
                    &args.iterations.to_string(),
                ])
                .args(["--device", &device_name(args.device)])
                .arg("--engine-case")
                .arg(&dir)
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "engine case failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let e: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let phases = ["generate_s", "reward_s", "reference_s", "train_s"]
                .map(|k| e[k].as_f64().unwrap_or(0.0));
            let ours: f64 = phases.iter().sum();
            let share = phases
                .iter()
                .map(|p| format!("{:.0}", 100.0 * p / ours))
                .collect::<Vec<_>>()
                .join("/");
            let trl = match &trl_device {
                None => None,
                Some(device) => Some(run_python(
                    &args.python,
                    "trl_grpo.py",
                    &[
                        "--device".into(),
                        device.clone(),
                        "--model-dir".into(),
                        model_dir.display().to_string(),
                        "--prompts".into(),
                        args.prompts.to_string(),
                        "--generations".into(),
                        args.generations.to_string(),
                        "--max-new-tokens".into(),
                        args.max_new_tokens.to_string(),
                        "--beta".into(),
                        beta.to_string(),
                        "--iterations".into(),
                        args.iterations.to_string(),
                    ],
                )?),
            };
            let (t_it, ratio, t_mem) = match &trl {
                Some(v) => {
                    let it = v["iteration_s"].as_f64().unwrap_or(f64::NAN);
                    (
                        format!("{it:.3}"),
                        format!("{:.1}x", it / ours),
                        format!(
                            "{:.0}",
                            v["peak_rss_growth_mb"].as_f64().unwrap_or(f64::NAN)
                        ),
                    )
                }
                None => ("-".into(), "-".into(), "-".into()),
            };
            println!(
                "{:<12} {:>5} {:>11.3} {:>11} {:>7} {:>13.0} {:>12.0} {:>26} {:>10.0} {:>10}",
                name,
                beta,
                ours,
                t_it,
                ratio,
                e["rollout_tokens_per_s"].as_f64().unwrap_or(0.0),
                e["train_tokens_per_s"].as_f64().unwrap_or(0.0),
                share,
                e["peak_rss_growth_mb"].as_f64().unwrap_or(0.0),
                t_mem
            );
            std::fs::remove_dir_all(&dir).ok();
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// rlhf bench attention
// ------------------------------------------------------------------------------------------------

/// FLOPs of an attention backward per forward FLOP, as FlashAttention-2 counts them: S and dP,
/// then dV, dK and dQ are five products of the forward's two's size.
const ATTN_BACKWARD_FLOPS_PER_FORWARD: f64 = 2.5;

/// FlashAttention-2's published causal forward throughput on an A100, TFLOP/s (bf16).
pub const FA2_A100_TFLOPS: f64 = 230.0;
/// FlashAttention-2's published causal forward throughput on an H100, TFLOP/s (bf16).
pub const FA2_H100_TFLOPS: f64 = 335.0;

/// The first line of `rlhf bench attention` when the kernels run on the emulator.
pub const ATTENTION_EMU_NOTICE: &str = "no GPU: the emulated kernels (CPU shim) on a small shape; \
     their times and TFLOP/s say nothing about a GPU's speed";

/// Arguments of `rlhf bench attention`.
#[derive(clap::Args, Debug, Clone)]
pub struct AttentionArgs {
    /// `cuda`: the sweep on a GPU (head dims 64 and 128, T = 1024 to 8192, bf16); `emu`: the
    /// emulated kernels on a small shape (checks that they run, no speed figure); `cpu`: the CPU
    /// reference op (f32) on small shapes; `auto`: cuda where a device opens, else emu.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Timed runs per case and kernel, after a warm-up; the fastest counts.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
}

/// One case: `b` sequences of `t` tokens, `h` query heads (and as many key/value heads) of dim `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnCase {
    /// Sequences.
    pub b: usize,
    /// Heads.
    pub h: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Head dim.
    pub d: usize,
}

impl AttnCase {
    fn shape(self) -> AttnShape {
        AttnShape {
            b: self.b,
            t: self.t,
            n_head: self.h,
            n_kv_head: self.h,
            head_dim: self.d,
        }
    }

    /// FLOPs of the causal forward as the issue (and FlashAttention-2's benchmarks) count them:
    /// 2·B·H·T²·D, the two T x T x D products of the full square halved by causality.
    pub fn flops(self) -> f64 {
        2.0 * (self.b * self.h) as f64 * (self.t as f64).powi(2) * self.d as f64
    }
}

/// The GPU sweep: head dims 64 and 128, T = 1024 to 8192, 16 heads, and B = 16k / T sequences,
/// so that every case holds 16k tokens (B·H·T = 256k) and does enough work to time.
pub fn attention_gpu_cases() -> Vec<AttnCase> {
    let mut cases = Vec::new();
    for d in [64, 128] {
        for t in [1024, 2048, 4096, 8192] {
            cases.push(AttnCase {
                b: 16_384 / t,
                h: 16,
                t,
                d,
            });
        }
    }
    cases
}

/// `rlhf bench attention`: the fused causal attention forward alone, the tensor-core and the SIMT
/// kernel, in ms and TFLOP/s ([`AttnCase::flops`]) against FlashAttention-2's published figures.
pub fn attention(args: &AttentionArgs) -> Result<()> {
    anyhow::ensure!(args.repeats > 0, "--repeats must be at least 1");
    match args.device {
        DeviceChoice::Cpu => attention_on_cpu(args.repeats),
        DeviceChoice::Emu => attention_on_emu(),
        DeviceChoice::Cuda | DeviceChoice::Auto => match args.device.select().context(
            "--device cuda: no CUDA device to run on (--device emu runs the emulated kernels)",
        )? {
            Selected::Cuda(cuda) => attention_on_cuda(&cuda, args.repeats),
            Selected::Cpu | Selected::Emu => attention_on_emu(),
        },
    }
}

fn attention_header() {
    println!(
        "{:<12} {:>4} {:>5} {:>6} {:>10} {:>9} {:>12} {:>12}",
        "kernel", "D", "T", "B x H", "ms", "TFLOP/s", "/ FA2 A100", "/ FA2 H100"
    );
}

fn attention_row(kernel: &str, c: AttnCase, secs: f64) {
    let tflops = c.flops() / secs / 1e12;
    println!(
        "{:<12} {:>4} {:>5} {:>6} {:>10.3} {:>9.3} {:>12.3} {:>12.3}",
        kernel,
        c.d,
        c.t,
        format!("{}x{}", c.b, c.h),
        secs * 1e3,
        tflops,
        tflops / FA2_A100_TFLOPS,
        tflops / FA2_H100_TFLOPS
    );
}

/// The fastest of `repeats` runs of `f`, after one untimed warm-up run.
fn fastest(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// `n` N(0, 1) values as bf16 (the scores then spread over a few units, as in a trained model).
fn random_bf16(rng: &mut Rng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.normal() as f32))
        .collect()
}

/// The two forward kernels by the names the table gives them ([`AttnKernel::Auto`] is the
/// tensor-core kernel at the head dims benchmarked).
const ATTN_KERNELS: [(&str, AttnKernel); 2] = [
    ("tensor-core", AttnKernel::Auto),
    ("simt", AttnKernel::Simt),
];

/// Both kernels on the emulator, once each, on a small shape per head dim: T = 96 spans two query
/// blocks of the tensor-core kernel, the second partly filled.
fn attention_on_emu() -> Result<()> {
    println!("{ATTENTION_EMU_NOTICE}");
    attention_header();
    let emu = Emu::default();
    let mut rng = Rng::new(0xa77e);
    for d in [64, 128] {
        let c = AttnCase {
            b: 1,
            h: 2,
            t: 96,
            d,
        };
        let s = c.shape();
        let qkv = random_bf16(&mut rng, s.b * s.t * s.qkv_width());
        let mask = vec![true; s.b * s.t];
        let mut out = vec![bf16::ZERO; s.b * s.t * s.out_width()];
        let mut lse = vec![0.0f32; s.b * s.n_head * s.t];
        for (name, kernel) in ATTN_KERNELS {
            let start = Instant::now();
            emu.attention_forward_with(kernel, &mut out, &mut lse, &qkv, &mask, s);
            attention_row(name, c, start.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

/// The CPU reference op (f32, rayon over sequences and heads) on shapes a CPU does in seconds.
fn attention_on_cpu(repeats: usize) -> Result<()> {
    println!("the CPU reference op (f32), not the kernels");
    attention_header();
    let mut rng = Rng::new(0xa77e);
    for d in [64, 128] {
        for t in [512, 1024] {
            let c = AttnCase { b: 1, h: 16, t, d };
            let s = c.shape();
            let qkv: Vec<f32> = (0..s.b * s.t * s.qkv_width())
                .map(|_| rng.normal() as f32)
                .collect();
            let mask = vec![true; s.b * s.t];
            let mut out = vec![0.0f32; s.b * s.t * s.out_width()];
            let mut lse = vec![0.0f32; s.b * s.n_head * s.t];
            let secs = fastest(repeats, || {
                Cpu.attention_forward(&mut out, &mut lse, &qkv, &mask, s);
                Ok(())
            })?;
            attention_row("cpu", c, secs);
        }
    }
    Ok(())
}

/// The GPU sweep ([`attention_gpu_cases`]), both kernels, bf16, every key visible. Each case
/// holds 16k tokens, so one qkv buffer per head dim serves every T.
fn attention_on_cuda(cuda: &Cuda, repeats: usize) -> Result<()> {
    println!("{}", cuda.info());
    attention_header();
    let mut rng = Rng::new(0xa77e);
    let cases = attention_gpu_cases();
    // (kernel, case, seconds) of each backward, printed after the forwards.
    let mut backward = Vec::new();
    for d in [64, 128] {
        let of_d: Vec<AttnCase> = cases.iter().copied().filter(|c| c.d == d).collect();
        let s = of_d[0].shape();
        let qkv = cuda.upload_slice(&random_bf16(&mut rng, s.b * s.t * s.qkv_width()))?;
        let dout = cuda.upload_slice(&random_bf16(&mut rng, s.b * s.t * s.out_width()))?;
        let mut out = cuda.alloc_zeros::<bf16>(s.b * s.t * s.out_width())?;
        let mut lse = cuda.alloc_zeros::<f32>(s.b * s.n_head * s.t)?;
        let mut dqkv = cuda.alloc_zeros::<bf16>(s.b * s.t * s.qkv_width())?;
        let p = AttnFwdPtrs {
            qkv: qkv.view().ptr(),
            out: out.view_mut().ptr(),
            lse: lse.view_mut().ptr(),
        };
        let pb = AttnBwdPtrs {
            dqkv: dqkv.view_mut().ptr(),
            dout: dout.view().ptr(),
            qkv: p.qkv,
            out: p.out,
            lse: p.lse,
        };
        for c in of_d {
            let s = c.shape();
            let mask = vec![true; s.b * s.t];
            for (name, kernel) in ATTN_KERNELS {
                // SAFETY (both calls): qkv, dqkv, out, dout and lse hold B·T·qkv_width,
                // B·T·NH·HD and B·NH·T values (B·T = 16k for every case of this head dim) and
                // outlive the calls, which synchronise before returning.
                let forward = || unsafe {
                    ops::attention_forward_with(cuda, AttnDtype::Bf16, kernel, p, &mask, s)
                };
                let secs = fastest(repeats, || {
                    forward()?;
                    cuda.synchronize_stream()?;
                    Ok(())
                })?;
                attention_row(name, c, secs);
                // The backward reads this kernel's own output and lse, which the last forward
                // left; it adds into dqkv, whose values do not matter here.
                let secs = fastest(repeats, || {
                    unsafe {
                        ops::attention_backward_with(cuda, AttnDtype::Bf16, kernel, pb, &mask, s)
                    }?;
                    cuda.synchronize_stream()?;
                    Ok(())
                })?;
                backward.push((name, c, secs));
            }
        }
    }
    println!(
        "TFLOP/s = 2*B*H*T^2*D / time (causal forward); FlashAttention-2's published forward: \
         {FA2_A100_TFLOPS} TFLOP/s on an A100, {FA2_H100_TFLOPS} on an H100"
    );
    println!("\nbackward (D = rowsum(dO*O), dQ, dK, dV), the same cases:");
    println!(
        "{:<12} {:>4} {:>5} {:>6} {:>10} {:>9}",
        "kernel", "D", "T", "B x H", "ms", "TFLOP/s"
    );
    for (name, c, secs) in backward {
        println!(
            "{:<12} {:>4} {:>5} {:>6} {:>10.3} {:>9.3}",
            name,
            c.d,
            c.t,
            format!("{}x{}", c.b, c.h),
            secs * 1e3,
            ATTN_BACKWARD_FLOPS_PER_FORWARD * c.flops() / secs / 1e12
        );
    }
    println!(
        "backward TFLOP/s = 2.5 x the forward's FLOPs / time (FlashAttention-2's count: five \
         products of the forward's size, against two)"
    );
    Ok(())
}
