//! `rlhf bench`: this engine against PyTorch/transformers on the same work, run alternately in
//! one invocation so that machine drift hits both sides alike.

use crate::algo::sft::nll_loss_and_grad;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::model::{random_params, Batch, Config, Layout, Model, Pad};
use crate::optim::{OptimConfig, Optimizer};
use crate::rng::Rng;
use anyhow::{Context, Result};
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
                size, size, size,
                c.as_mut_ptr(), 1, size as isize, false,
                a.as_ptr(), 1, size as isize,
                b.as_ptr(), 1, size as isize,
                0.0, 1.0, false, false, false,
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
        + if layout.lm_head.is_none() { cfg.vocab_size * cfg.hidden_size } else { 0 };
    let attn = 2.0 * (b * cfg.n_head * t * t * cfg.head_dim) as f64 * cfg.n_layer as f64;
    3.0 * (2.0 * n * matmul_params as f64 + attn)
}

struct Side {
    tokens_per_s: f64,
    peak_rss_mb: f64,
}

fn engine_round(model: &mut Model<Cpu>, opt: &mut Optimizer<Cpu>, batch: &Batch, weights: &[f32], steps: usize) -> Result<f64> {
    let be = Cpu;
    let mut grads = be.zeros(model.layout.total);
    let t0 = Instant::now();
    for _ in 0..steps {
        be.fill(be.all_mut(&mut grads), 0.0);
        nll_loss_and_grad(&be, model, batch, weights, &mut grads)?;
        opt.update(&be, &model.layout, &mut model.params, &mut grads, 1e-4);
    }
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
    let peak = sgemm_gflops(1024, 5);
    println!("sgemm (gemm crate, 1024³, {} threads): {peak:.1} GFLOP/s", rayon::current_num_threads());
    println!(
        "{:<12} {:>14} {:>14} {:>7} {:>10} {:>12} {:>12}",
        "config", "engine tok/s", "torch tok/s", "ratio", "GFLOP/s", "engine MiB", "torch MiB"
    );
    for name in &args.configs {
        let cfg = Config::builtin(name, 512)?;
        let layout = Layout::new(&cfg);
        let be = Cpu;
        let mut model = Model::new(&be, cfg.clone(), &random_params(&layout, 0.02, 0))?;
        let mut opt = Optimizer::new(&be, OptimConfig::default(), layout.total);
        let mut rng = Rng::new(1);
        let rows: Vec<Vec<u32>> = (0..args.batch)
            .map(|_| (0..args.seq).map(|_| 2 + rng.below(cfg.vocab_size - 2) as u32).collect())
            .collect();
        let batch = Batch::new(&rows, 1, Pad::Right);
        let mut weights = vec![1.0f32; batch.n()];
        weights.iter_mut().skip(args.seq - 1).step_by(args.seq).for_each(|w| *w = 0.0);

        let dir = tempdir_for(name)?;
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg.to_json())?)?;
        engine_round(&mut model, &mut opt, &batch, &weights, 1)?; // warm-up
        let (mut ours, mut theirs): (f64, Option<Side>) = (0.0, None);
        for _ in 0..args.rounds {
            ours = ours.max(engine_round(&mut model, &mut opt, &batch, &weights, args.steps)?);
            if !args.no_torch {
                let s = torch_round(args, &dir)?;
                if theirs.as_ref().is_none_or(|t| s.tokens_per_s > t.tokens_per_s) {
                    theirs = Some(s);
                }
            }
        }
        let gflops = train_step_flops(&cfg, args.batch, args.seq) * ours / batch.n() as f64 / 1e9;
        let (t_tok, t_mem, ratio) = match &theirs {
            Some(t) => (format!("{:.0}", t.tokens_per_s), format!("{:.0}", t.peak_rss_mb), format!("{:.2}x", ours / t.tokens_per_s)),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<12} {:>14.0} {:>14} {:>7} {:>10.1} {:>12.0} {:>12}",
            name, ours, t_tok, ratio, gflops, peak_rss_mb(), t_mem
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
            let t = Instant::now();
            generate(&be, &model, &prompts, &sampling, None, &mut rng)?;
            ours = ours.max(new_tokens / t.elapsed().as_secs_f64());
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
