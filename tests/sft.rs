//! The SFT trainer end to end on the CPU backend: it learns, its loss is on completion tokens
//! only, it resumes bit-exactly, survives a crash mid-checkpoint, and stops on a non-finite
//! loss keeping the last good checkpoint.

use rlhf::algo::sft::{self, nll_stats, SftArgs};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::Backend;
use rlhf::builtin_task;
use rlhf::checkpoint::{checkpoints, latest_checkpoint, load_trainer_state};
use rlhf::data::{load_sft, sft_batch, SftTokenizing};
use rlhf::model::tokenizer::Tokenizer;
use rlhf::model::{random_params, Config, Layout, Model};
use rlhf::rng::Rng;
use rlhf::Error;
use std::path::{Path, PathBuf};

/// A scratch directory with the built-in character tokenizer in `tok/`.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    builtin_task::write_tokenizer(&tok).unwrap();
    (dir, tok)
}

/// Writes `{"prompt","completion"}` lines.
fn write_pairs(path: &Path, pairs: &[(String, String)]) {
    let text: String = pairs
        .iter()
        .map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

/// The first `n` training pairs of the built-in task.
fn task_pairs(n: usize) -> Vec<(String, String)> {
    builtin_task::pairs(7).0.into_iter().take(n).collect()
}

/// A quiet run of a random-init built-in model on `data`.
fn args(model: &str, tok: &Path, data: &Path, out: &Path) -> SftArgs {
    SftArgs {
        model: Some(model.into()),
        tokenizer: Some(tok.to_path_buf()),
        data: Some(data.to_path_buf()),
        out: Some(out.to_path_buf()),
        lr: Some(3e-3),
        batch_size: Some(4),
        eval_every: 0,
        save_every: 0,
        quiet: true,
        ..SftArgs::default()
    }
}

/// The final weights of a run directory, as bits.
fn weights_bits(dir: &Path) -> Vec<u32> {
    let m = Model::load(&Cpu, dir).unwrap();
    Cpu.download(Cpu.all(&m.params))
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// `(step, loss)` of every line of a run's metrics.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn builtin_task_loss_falls_below_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let base = SftArgs {
        out: Some(dir.path().join("run")),
        max_steps: Some(800),
        batch_size: Some(16),
        eval_every: 0,
        save_every: 0,
        quiet: true,
        ..SftArgs::default()
    };
    let a = builtin_task::prepare(&base).unwrap();
    let s = sft::train(&Cpu, &a).unwrap();
    let first = losses(&dir.path().join("run"))[0].1;
    let eval = s.last_eval_loss.unwrap();
    // ln(29) ≈ 3.37 nats at random init. Knowing which letters come but not their order
    // leaves about 1 nat per token; 0.6 needs the reversal itself.
    assert!(first > 3.0, "initial loss {first}");
    assert!(eval < 0.6, "held-out loss {eval} after 400 steps");
    assert!(s.last_accuracy.unwrap() > 0.8, "{s:?}");
    // The run directory is an HF model directory: it loads with its tokenizer.
    let run = dir.path().join("run");
    let tok = Tokenizer::load(&run).unwrap();
    let model = Model::load(&Cpu, &run).unwrap();
    assert_eq!(model.cfg.vocab_size, tok.vocab_size());
}

/// A tiny random model over the built-in tokenizer and a batch of examples whose prompts have
/// different lengths.
fn model_and_batch(family: &str) -> (Model<Cpu>, rlhf::model::Batch, Vec<f32>, Vec<usize>) {
    let (dir, tok_dir) = scratch();
    let tok = Tokenizer::load(&tok_dir).unwrap();
    let data = dir.path().join("d.jsonl");
    write_pairs(&data, &task_pairs(5));
    let ex = load_sft(
        &data,
        SftTokenizing {
            tok: &tok,
            eos: 0,
            max_len: 64,
        },
    )
    .unwrap();
    let (batch, w) = sft_batch(&ex, &[0, 1, 2, 3, 4], 1);
    let cfg = Config::builtin(family, tok.vocab_size()).unwrap();
    let params = random_params(&Layout::new(&cfg), 0.3, 11);
    let model = Model::new(&Cpu, cfg, &params).unwrap();
    (model, batch, w, ex.iter().map(|e| e.prompt_len).collect())
}

/// Mean NLL of next tokens at positions `from(row)..` of each row, through the plain
/// `next_token_logprobs` path (no weights involved).
fn reference_loss(
    model: &Model<Cpu>,
    batch: &rlhf::model::Batch,
    from: impl Fn(usize) -> usize,
) -> f64 {
    let lp = model.next_token_logprobs(&Cpu, batch).unwrap();
    let (mut s, mut n) = (0.0, 0usize);
    for (r, row) in lp.iter().enumerate() {
        for &l in &row[from(r)..] {
            s -= l as f64;
            n += 1;
        }
    }
    s / n as f64
}

#[test]
fn loss_is_the_mean_nll_of_completion_tokens_only() {
    for family in ["gpt2-tiny", "llama-tiny"] {
        let (model, batch, w, prompt_lens) = model_and_batch(family);
        let got = nll_stats(&Cpu, &model, &batch, &w, None, false)
            .unwrap()
            .loss();
        // Row r's completion is predicted from position prompt_len - 1 on.
        let completion_only = reference_loss(&model, &batch, |r| prompt_lens[r] - 1);
        let all_tokens = reference_loss(&model, &batch, |_| 0);
        // Two f32 paths through the same ops; differences are rounding (~1e-7 relative).
        assert!(
            (got - completion_only).abs() < 1e-5 * completion_only,
            "{family}: {got} vs {completion_only}"
        );
        // The check discriminates: counting prompt tokens gives a clearly different number.
        assert!(
            (all_tokens - completion_only).abs() > 1e-2,
            "{family}: {all_tokens} vs {completion_only}"
        );
    }
}

/// The loss and its gradient, as bits, of one SFT step on `batch`.
fn step_bits(model: &Model<Cpu>, batch: &rlhf::model::Batch, w: &[f32]) -> (u64, Vec<u32>) {
    let mut grads = Cpu.zeros(model.layout.total);
    let s = nll_stats(&Cpu, model, batch, w, Some(&mut grads), true).unwrap();
    let bits = grads.iter().map(|g| g.to_bits()).collect();
    (s.loss().to_bits(), bits)
}

#[test]
fn a_step_on_recycled_activation_buffers_matches_a_fresh_model() {
    // The model reuses a step's buffers in the next without clearing them (and, in tests,
    // fills them with NaN first): any op that read what it should overwrite would show here.
    for family in ["gpt2-tiny", "llama-tiny"] {
        let (model, batch, w, _) = model_and_batch(family);
        let fresh = Model::new(
            &Cpu,
            model.cfg.clone(),
            &Cpu.download(Cpu.all(&model.params)),
        )
        .unwrap();
        let want = step_bits(&fresh, &batch, &w);
        assert!(
            f64::from_bits(want.0).is_finite()
                && want.1.iter().all(|&g| f32::from_bits(g).is_finite()),
            "{family}: a non-finite loss or gradient (an op read an output it did not write?)"
        );
        // Other rows in the same shape, then a smaller batch (a miss that empties the pool),
        // then the batch itself twice.
        let rows = |idx: &[usize]| -> Vec<Vec<u32>> {
            idx.iter()
                .map(|&r| batch.ids[r * batch.t..(r + 1) * batch.t].to_vec())
                .collect()
        };
        let shuffled = rlhf::model::Batch::new(&rows(&[4, 0, 3, 1, 2]), 1, rlhf::model::Pad::Right);
        let smaller = rlhf::model::Batch::new(&rows(&[2, 3]), 1, rlhf::model::Pad::Right);
        let ones = |b: &rlhf::model::Batch| vec![1.0; b.n()];
        step_bits(&model, &shuffled, &ones(&shuffled));
        step_bits(&model, &batch, &w);
        step_bits(&model, &smaller, &ones(&smaller));
        for round in 0..2 {
            assert!(
                step_bits(&model, &batch, &w) == want,
                "{family}: step {round} on recycled buffers differs from a fresh model's"
            );
        }
    }
}

#[test]
fn gradient_is_that_of_the_completion_only_loss() {
    let (model, batch, w, prompt_lens) = model_and_batch("gpt2-tiny");
    let mut grads = Cpu.zeros(model.layout.total);
    nll_stats(&Cpu, &model, &batch, &w, Some(&mut grads), false).unwrap();
    let g = Cpu.download(Cpu.all(&grads));
    let theta = Cpu.download(Cpu.all(&model.params));
    let loss_at = |t: &[f32], from: &dyn Fn(usize) -> usize| {
        let m = Model::new(&Cpu, model.cfg.clone(), t).unwrap();
        reference_loss(&m, &batch, from)
    };
    let mut rng = Rng::new(5);
    for _ in 0..3 {
        // A random unit direction; the directional derivative by Richardson-extrapolated central
        // differences (error O(h⁴)). h = 0.05 moves the loss by ~1e-3, far above the ~1e-7
        // rounding of the f32 forward, so 2% is ample for rounding and truncation together.
        let mut u: Vec<f32> = (0..theta.len()).map(|_| rng.normal() as f32).collect();
        let norm = u.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt() as f32;
        u.iter_mut().for_each(|x| *x /= norm);
        let along = |h: f32, from: &dyn Fn(usize) -> usize| {
            let at =
                |s: f32| -> Vec<f32> { theta.iter().zip(&u).map(|(t, d)| t + s * d).collect() };
            (loss_at(&at(h), from) - loss_at(&at(-h), from)) / (2.0 * h as f64)
        };
        let fd = |from: &dyn Fn(usize) -> usize| (4.0 * along(0.05, from) - along(0.1, from)) / 3.0;
        let analytic: f64 = g.iter().zip(&u).map(|(a, b)| (a * b) as f64).sum();
        let completion = fd(&|r| prompt_lens[r] - 1);
        let all = fd(&|_| 0);
        assert!(
            (analytic - completion).abs() < 0.02 * completion.abs().max(1e-2),
            "{analytic} vs {completion}"
        );
        assert!(
            (analytic - all).abs() > 0.1 * all.abs().max(completion.abs()),
            "{analytic} vs all-token {all}"
        );
    }
}

#[test]
fn random_prompt_tokens_are_not_trained_on() {
    // Completion: the prompt's last letter. Clean prompts pad it with a fixed string; poisoned
    // prompts with 7 uniformly random letters, which no model can predict: each costs ln 26 nats.
    let (dir, tok) = scratch();
    let letters: Vec<char> = "abcdefghijklmnopqrstuvwxyz".chars().collect();
    let mut rng = Rng::new(3);
    let mut make = |n: usize, poison: bool| -> Vec<(String, String)> {
        (0..n)
            .map(|_| {
                let pad: String = (0..7)
                    .map(|_| if poison { letters[rng.below(26)] } else { 'q' })
                    .collect();
                let x = letters[rng.below(26)];
                (format!("{pad}{x}="), x.to_string())
            })
            .collect()
    };
    for poison in [false, true] {
        let sub = dir.path().join(format!("poison-{poison}"));
        std::fs::create_dir_all(&sub).unwrap();
        write_pairs(&sub.join("train.jsonl"), &make(512, poison));
        write_pairs(&sub.join("eval.jsonl"), &make(64, poison));
        let a = SftArgs {
            eval_data: Some(sub.join("eval.jsonl")),
            max_steps: Some(400),
            batch_size: Some(16),
            ..args(
                "gpt2-tiny",
                &tok,
                &sub.join("train.jsonl"),
                &sub.join("run"),
            )
        };
        let s = sft::train(&Cpu, &a).unwrap();
        // Were prompt tokens in the loss, the poisoned run could not go below
        // 7·ln 26 / 10 predictions ≈ 2.3 nats per token.
        let eval = s.last_eval_loss.unwrap();
        assert!(eval < 0.1, "poison={poison}: held-out loss {eval}");
    }
}

#[test]
fn resume_after_interruption_is_bitwise_identical() {
    for family in ["gpt2-tiny", "llama-tiny"] {
        let (dir, tok) = scratch();
        let data = dir.path().join("train.jsonl");
        // 10 batches of 4 per epoch; 8 steps of 3 micro-batches cross two epoch boundaries.
        write_pairs(&data, &task_pairs(40));
        let base = |out: &str| SftArgs {
            max_steps: Some(8),
            grad_accum: 3,
            save_every: 3,
            warmup_steps: 2,
            weight_decay: 0.1,
            ..args(family, &tok, &data, &dir.path().join(out))
        };
        let full = base("full");
        sft::train(&Cpu, &full).unwrap();

        // Killed after 16 micro-batches: inside step 6 (micro-batches 16..18), past the
        // checkpoint of step 3, before that of step 6.
        let cut = SftArgs {
            stop_after_micro_steps: Some(16),
            ..base("cut")
        };
        let s = sft::train(&Cpu, &cut).unwrap();
        assert!(s.interrupted && s.steps == 5, "{s:?}");
        let run = dir.path().join("cut");
        assert_eq!(
            latest_checkpoint(&run).unwrap().unwrap(),
            run.join("checkpoint-3")
        );
        let s = sft::train(
            &Cpu,
            &SftArgs {
                resume: true,
                ..base("cut")
            },
        )
        .unwrap();
        assert!(!s.interrupted && s.steps == 8, "{s:?}");

        assert!(
            weights_bits(&dir.path().join("full")) == weights_bits(&run),
            "{family}: weights differ after resume"
        );
        // The metrics read as one run: steps 1..8 once each, the same losses to the bit.
        assert_eq!(losses(&dir.path().join("full")), losses(&run), "{family}");
        let state = load_trainer_state(&run.join("checkpoint-6")).unwrap();
        assert_eq!((state.step, state.micro_step), (6, 18));
    }
}

#[test]
fn a_torn_checkpoint_directory_is_ignored_and_removed() {
    let (dir, tok) = scratch();
    let data = dir.path().join("train.jsonl");
    write_pairs(&data, &task_pairs(24));
    let base = |out: &str| SftArgs {
        max_steps: Some(12),
        save_every: 3,
        save_total_limit: 2,
        ..args("gpt2-tiny", &tok, &data, &dir.path().join(out))
    };
    sft::train(&Cpu, &base("full")).unwrap();
    let run = dir.path().join("cut");
    sft::train(
        &Cpu,
        &SftArgs {
            stop_after_micro_steps: Some(7),
            ..base("cut")
        },
    )
    .unwrap();
    let steps: Vec<u64> = checkpoints(&run).unwrap().iter().map(|c| c.0).collect();
    assert_eq!(steps, [3, 6]);

    // The process died while writing checkpoint 9: its temporary directory holds a torn
    // weights file and no trainer state.
    let torn = run.join("checkpoint-9.tmp");
    std::fs::create_dir(&torn).unwrap();
    let weights = std::fs::read(run.join("checkpoint-6/model.safetensors")).unwrap();
    std::fs::write(
        torn.join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    std::fs::copy(
        run.join("checkpoint-6/config.json"),
        torn.join("config.json"),
    )
    .unwrap();

    let latest = latest_checkpoint(&run).unwrap().unwrap();
    assert_eq!(latest, run.join("checkpoint-6"));
    Model::<Cpu>::load(&Cpu, &latest).unwrap();

    let s = sft::train(
        &Cpu,
        &SftArgs {
            resume: true,
            ..base("cut")
        },
    )
    .unwrap();
    assert_eq!(s.steps, 12);
    assert!(
        !torn.exists(),
        "the torn checkpoint is cleaned up on resume"
    );
    assert!(weights_bits(&dir.path().join("full")) == weights_bits(&run));
    // Only the last two checkpoints are kept.
    let steps: Vec<u64> = checkpoints(&run).unwrap().iter().map(|c| c.0).collect();
    assert_eq!(steps, [9, 12]);
}

#[test]
fn non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let (dir, tok) = scratch();
    let data = dir.path().join("train.jsonl");
    write_pairs(&data, &task_pairs(24));
    let out = dir.path().join("run");
    let base = SftArgs {
        max_steps: Some(30),
        save_every: 3,
        ..args("gpt2-tiny", &tok, &data, &out)
    };
    sft::train(
        &Cpu,
        &SftArgs {
            stop_after_micro_steps: Some(7),
            ..base.clone()
        },
    )
    .unwrap();
    // Resumed with an absurd learning rate: one update sends the weights to ~1e30 and the
    // next forward pass overflows.
    let e = sft::train(
        &Cpu,
        &SftArgs {
            resume: true,
            lr: Some(1e30),
            ..base
        },
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::NonFinite { .. }), "{msg}");
    assert!(
        msg.contains("non-finite") && msg.contains("checkpoint-6") && msg.contains("--resume"),
        "{msg}"
    );
    // The last good checkpoint is still there, loads, and holds finite weights.
    let latest = latest_checkpoint(&out).unwrap().unwrap();
    assert_eq!(latest, out.join("checkpoint-6"));
    let m = Model::load(&Cpu, &latest).unwrap();
    assert!(Cpu
        .download(Cpu.all(&m.params))
        .iter()
        .all(|x| x.is_finite()));
}

#[test]
fn run_directories_are_guarded() {
    let (dir, tok) = scratch();
    let data = dir.path().join("train.jsonl");
    write_pairs(&data, &task_pairs(8));
    let out = dir.path().join("run");
    let a = SftArgs {
        max_steps: Some(2),
        save_every: 1,
        ..args("gpt2-tiny", &tok, &data, &out)
    };

    // Bad data fails before the run directory exists, so the next attempt is not blocked.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"ab=\"}\n").unwrap();
    let e = sft::train(
        &Cpu,
        &SftArgs {
            data: Some(bad.clone()),
            ..a.clone()
        },
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("bad.jsonl:1: missing \"completion\""),
        "{e}"
    );
    assert!(!out.exists());

    sft::train(&Cpu, &a).unwrap();
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run_config.json")).unwrap())
            .unwrap();
    assert_eq!(record["command"], "sft");
    assert_eq!(record["seed"], 42);
    assert_eq!(record["config"]["batch_size"], 4);
    assert!(record["engine"]["version"]
        .as_str()
        .unwrap()
        .starts_with(env!("CARGO_PKG_VERSION")));

    // A second fresh run into the same directory is refused.
    let e = sft::train(&Cpu, &a).unwrap_err();
    assert!(
        e.to_string().contains("already holds a run") && e.to_string().contains("--resume"),
        "{e}"
    );
    // Resuming with a different batch size could not continue exactly: refused, named.
    let e = sft::train(
        &Cpu,
        &SftArgs {
            resume: true,
            batch_size: Some(2),
            ..a.clone()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("--batch-size was 4, now 2"), "{e}");
    // Nothing to resume in an empty directory.
    let empty = dir.path().join("empty");
    let e = sft::train(
        &Cpu,
        &SftArgs {
            resume: true,
            out: Some(empty),
            ..a
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("no complete checkpoint"), "{e}");
}

#[test]
fn the_cli_entry_point_runs_the_builtin_task_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let a = SftArgs {
        out: Some(out.clone()),
        max_steps: Some(20),
        save_every: 10,
        quiet: true,
        ..SftArgs::default()
    };
    sft::run(&a).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "run_config.json",
        "metrics.jsonl",
        "data/train.jsonl",
        "data/eval.jsonl",
        "checkpoint-20/optimizer.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert_eq!(losses(&out).len(), 20);
    // The CLI's errors come back as Err (the binary turns them into a non-zero exit).
    let e = sft::run(&a).unwrap_err();
    assert!(e.to_string().contains("already holds a run"), "{e}");
}

/// Environment variable carrying a child process's training arguments (JSON).
const CHILD_ARGS: &str = "RLHF_SFT_TEST_CHILD_ARGS";

/// Not a test of its own: the training process that `killed_while_writing_a_checkpoint` starts
/// and kills. Does nothing unless that test set its arguments.
#[test]
#[ignore]
fn child_training_process() {
    if let Ok(json) = std::env::var(CHILD_ARGS) {
        sft::train(&Cpu, &serde_json::from_str(&json).unwrap()).unwrap();
    }
}

#[test]
fn killed_while_writing_a_checkpoint() {
    let (dir, tok) = scratch();
    let data = dir.path().join("train.jsonl");
    write_pairs(&data, &task_pairs(24));
    // A 6-layer d=384 model: 43 MB of weights and 86 MB of moments per checkpoint, so the
    // process spends most of its time inside a checkpoint's temporary directory.
    let base = |out: &str| SftArgs {
        max_steps: Some(5),
        ..args("gpt2-6l-384", &tok, &data, &dir.path().join(out))
    };
    let run = dir.path().join("cut");
    let json = serde_json::to_string(&SftArgs {
        save_every: 1,
        ..base("cut")
    })
    .unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_training_process", "--exact", "--ignored", "--quiet"])
        .env(CHILD_ARGS, json)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it (SIGKILL) as soon as a checkpoint after the first is being written.
    let t0 = std::time::Instant::now();
    let torn = loop {
        let tmp = (2..5)
            .map(|s| run.join(format!("checkpoint-{s}.tmp")))
            .find(|p| p.exists());
        if let Some(tmp) = tmp {
            child.kill().unwrap();
            break tmp;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child finished before it could be killed"
        );
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint was started");
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    child.wait().unwrap();
    assert!(torn.exists(), "killed inside {}", torn.display());

    // The checkpoints before it are complete and load; resuming uses the latest of them and
    // ends where an uninterrupted run ends, to the bit.
    let latest = latest_checkpoint(&run).unwrap().unwrap();
    assert!(latest < torn, "{} vs {}", latest.display(), torn.display());
    Model::<Cpu>::load(&Cpu, &latest).unwrap();
    sft::train(
        &Cpu,
        &SftArgs {
            resume: true,
            ..base("cut")
        },
    )
    .unwrap();
    assert!(!torn.exists());
    sft::train(&Cpu, &base("full")).unwrap();
    assert!(weights_bits(&dir.path().join("full")) == weights_bits(&run));
}
