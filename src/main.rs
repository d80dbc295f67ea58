//! The `rlhf` command line: parses arguments, then calls the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rlhf::backend::cpu::Cpu;
use rlhf::model::{Batch, Model, Pad};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "rlhf",
    version,
    about = "Single-node RLHF training engine (SFT, reward model, PPO, GRPO, DPO)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole pipeline on a built-in task: SFT, reward model, PPO, GRPO and DPO cure a
    /// sycophantic model; ends with a table of honest rates on held-out claims.
    Demo(rlhf::demo::DemoArgs),
    /// Print the log-prob of every next token of some token rows, as JSON on stdout.
    Logprobs {
        /// A Hugging Face model directory (config.json, model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// JSON file `{"input_ids": [[...], ...]}`; rows may differ in length.
        #[arg(long)]
        input: PathBuf,
    },
    /// Generate completions with a KV cache, as JSONL (prompt, completion, tokens, logprobs).
    Generate(rlhf::model::generate::GenerateArgs),
    /// Supervised fine-tuning (with no --data: a tiny model on a built-in task).
    Sft(rlhf::algo::sft::SftArgs),
    /// Train a reward model (Bradley-Terry on preference pairs).
    Rm(rlhf::algo::reward::RmArgs),
    /// Direct preference optimisation on preference pairs.
    Dpo(rlhf::algo::dpo::DpoArgs),
    /// GRPO: group-normalised advantages over G samples per prompt (also RLOO, REINFORCE++, S-GRPO).
    Grpo(rlhf::algo::grpo::GrpoArgs),
    /// PPO: policy, frozen reference, reward source and critic; KL-shaped rewards, GAE, clipped losses.
    Ppo(rlhf::algo::ppo::PpoArgs),
    /// Draw the reward and KL curves of a run's RL stages into a PNG.
    Plot(rlhf::plot::PlotArgs),
    /// Run every CUDA kernel against the CPU reference over a sweep of shapes (emulated without a GPU).
    Validate(rlhf::validate::ValidateArgs),
    /// Benchmarks against PyTorch / transformers baselines.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Training step (forward + backward + AdamW, causal-LM loss) against PyTorch, on the CPU or
    /// a GPU (`--device`).
    Train(rlhf::bench::TrainArgs),
    /// Batched KV-cache generation against transformers' `generate` on the CPU.
    Generate(rlhf::bench::GenerateArgs),
    /// A GRPO iteration (rollout, reward, reference pass, optimizer step) against TRL's GRPOTrainer.
    Grpo(rlhf::bench::GrpoBenchArgs),
    /// Each CUDA kernel against its CPU reference op, with its workspace (emulated without a GPU).
    Kernels(rlhf::validate::BenchKernelsArgs),
    /// The fused causal attention forward alone (tensor-core and SIMT kernels) in TFLOP/s against
    /// FlashAttention-2's published figures (emulated without a GPU).
    Attention(rlhf::bench::AttentionArgs),
}

fn main() {
    keep_freed_memory();
    die_quietly_on_closed_pipe();
    let cli = Cli::parse();
    // The whole command runs on a rayon worker: a parallel op started there pushes work to its own
    // deque and runs half inline, where one started from the main thread is injected into the
    // pool and the main thread sleeps until a worker finishes it. At the llama fixture's size a
    // training step is hundreds of small ops, and that wake-up made it 30% slower.
    if let Err(e) = rayon::scope(|_| run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Rust ignores SIGPIPE, so `rlhf ... | head -1` panicked at the next print once `head` had
/// exited. The default action ends the process quietly, as other command-line tools do.
fn die_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: resetting a signal to its default action, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A training step allocates its activations and gradients afresh (hundreds of MB). By default
/// glibc serves blocks that large with fresh mmaps and adjusts its thresholds as it goes, so
/// steps can keep paying page faults on all of it: the 6-layer benchmark step ran at 55% of
/// its speed after a smaller model had run in the same process. Fixed thresholds keep freed
/// memory in the heap for reuse, as PyTorch's caching allocator does.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's largest allowed value
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Demo(args) => rlhf::demo::run(&args),
        Cmd::Logprobs { model, input } => logprobs(&model, &input),
        Cmd::Generate(args) => rlhf::model::generate::run(&args),
        Cmd::Sft(args) => rlhf::algo::sft::run(&args),
        Cmd::Rm(args) => rlhf::algo::reward::run(&args),
        Cmd::Dpo(args) => rlhf::algo::dpo::run(&args),
        Cmd::Grpo(args) => rlhf::algo::grpo::run(&args),
        Cmd::Ppo(args) => rlhf::algo::ppo::run(&args),
        Cmd::Plot(args) => rlhf::plot::run(&args),
        Cmd::Validate(args) => rlhf::validate::validate(&args),
        Cmd::Bench { what } => match what {
            BenchCmd::Train(args) => rlhf::bench::train(&args),
            BenchCmd::Generate(args) => rlhf::bench::generate(&args),
            BenchCmd::Grpo(args) => rlhf::bench::grpo(&args),
            BenchCmd::Kernels(args) => rlhf::validate::bench_kernels(&args),
            BenchCmd::Attention(args) => rlhf::bench::attention(&args),
        },
    }
}

fn logprobs(model_dir: &std::path::Path, input: &std::path::Path) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Input {
        input_ids: Vec<Vec<u32>>,
    }
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let inp: Input = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected JSON {{\"input_ids\": [[...], ...]}}",
            input.display()
        )
    })?;
    if let Some(r) = inp.input_ids.iter().position(Vec::is_empty) {
        bail!("{}: row {r} of input_ids is empty", input.display());
    }
    let be = Cpu;
    let model = Model::load(&be, model_dir)?;
    let pad = model.cfg.pad_token_id.unwrap_or(0);
    let batch = Batch::new(&inp.input_ids, pad, Pad::Right);
    let logprobs = model.next_token_logprobs(&be, &batch)?;
    println!("{}", serde_json::json!({ "logprobs": logprobs }));
    Ok(())
}
