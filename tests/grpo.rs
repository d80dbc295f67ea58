//! The GRPO trainer end to end on the CPU backend: it raises the reward of a small rule task
//! (and learning rate 0 does not), its first step on a fresh rollout is exactly on-policy, an
//! interrupted run resumes bit-exactly, S-GRPO's supervised term is a real SFT gradient, the
//! other estimators and aggregations run, the truncated importance-sampling correction logs a
//! sampling/training log-prob gap of float rounding and caps perturbed ratios, and bad input
//! gets clear errors.

use rlhf::algo::grpo::{self, is_correction_cap, GrpoArgs, SamplingCorrection};
use rlhf::algo::sft::{self, SftArgs};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::Backend;
use rlhf::builtin_task;
use rlhf::checkpoint::{checkpoints, LrSchedule};
use rlhf::data::{load_rl_prompts, load_sft, sft_batch, SftTokenizing};
use rlhf::model::config::Head;
use rlhf::model::generate::SamplingConfig;
use rlhf::model::tokenizer::Tokenizer;
use rlhf::model::weights::SaveDtype;
use rlhf::model::{random_params, Config, Layout, Model};
use rlhf::optim::{OptimConfig, Optimizer};
use rlhf::reward::{RewardInput, RewardSource};
use rlhf::rng::Rng;
use rlhf::rollout::{rollout, RolloutConfig, RolloutPrompt};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The letter-reversal task's reward: the fraction of positions where the completion has the
/// answer's letter (over the longer of the two, so padding an answer out does not pay).
struct Reversal;

impl RewardSource for Reversal {
    fn describe(&self) -> String {
        "reversal (positional match)".into()
    }
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> rlhf::Result<Vec<f32>> {
        Ok(inputs
            .iter()
            .map(|i| {
                let want: Vec<char> = i
                    .answer
                    .expect("every prompt has an answer")
                    .chars()
                    .collect();
                let got: Vec<char> = i.completion.chars().collect();
                let hits = want.iter().zip(&got).filter(|(a, b)| a == b).count();
                hits as f32 / want.len().max(got.len()) as f32
            })
            .collect())
    }
}

/// Scores every completion alike: zero advantages everywhere.
struct Constant;

impl RewardSource for Constant {
    fn describe(&self) -> String {
        "constant".into()
    }
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> rlhf::Result<Vec<f32>> {
        Ok(vec![0.5; inputs.len()])
    }
}

/// The task's prompts the GRPO tests train on (and the reward is measured on).
const PROMPTS: usize = 16;

/// A gpt2-tiny briefly SFT'd on letter reversal (500 steps, ~6 s): it reverses about 60% of
/// the letters in place, leaving room for GRPO to show. Trained afresh once per run of this
/// test binary, into Cargo's scratch directory for integration tests (so nothing piles up in
/// the system's temporary directory); the result is an HF model directory with the character
/// tokenizer.
fn sft_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpo-sft-model");
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        let tok = dir.join("tok");
        builtin_task::write_tokenizer(&tok).unwrap();
        builtin_task::write_data(&dir.join("data"), 7).unwrap();
        let args = SftArgs {
            model: Some("gpt2-tiny".into()),
            tokenizer: Some(tok),
            data: Some(dir.join("data/train.jsonl")),
            out: Some(dir.join("sft")),
            lr: Some(3e-3),
            batch_size: Some(16),
            max_steps: Some(500),
            eval_every: 0,
            save_every: 0,
            quiet: true,
            ..SftArgs::default()
        };
        sft::train(&Cpu, &args).unwrap();
        dir.join("sft")
    })
}

/// The first `n` training pairs of the task.
fn task_pairs(n: usize) -> Vec<(String, String)> {
    builtin_task::pairs(7).0.into_iter().take(n).collect()
}

/// Writes `{"prompt","answer","completion"}` lines (the answer is the labelled completion).
fn write_prompts(path: &Path, pairs: &[(String, String)]) {
    let text: String = pairs
        .iter()
        .map(|(p, c)| {
            serde_json::json!({"prompt": p, "answer": c, "completion": c}).to_string() + "\n"
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

/// A quiet GRPO run of `model` on `data` into `out`, with the task's settings.
fn args(model: &Path, data: &Path, out: &Path) -> GrpoArgs {
    GrpoArgs {
        model: Some(model.to_path_buf()),
        data: Some(data.to_path_buf()),
        out: Some(out.to_path_buf()),
        num_generations: 8,
        prompts_per_step: 8,
        max_new_tokens: 12,
        lr: 1e-3,
        save_every: 0,
        quiet: true,
        ..GrpoArgs::default()
    }
}

/// Mean reward of a model on the task's prompts: 16 samples of each at temperature 1, from a
/// fixed seed, so the same weights always measure the same (about ±0.015 of sampling noise).
fn mean_reward(model_dir: &Path, pairs: &[(String, String)]) -> f64 {
    let tok = Tokenizer::load(model_dir).unwrap();
    let model = Model::load(&Cpu, model_dir).unwrap();
    let prompts: Vec<RolloutPrompt> = pairs
        .iter()
        .map(|(p, c)| RolloutPrompt {
            text: p.clone(),
            ids: tok.encode(p, true).unwrap(),
            answer: Some(c.clone()),
        })
        .collect();
    let cfg = RolloutConfig {
        sampling: SamplingConfig {
            max_new_tokens: 12,
            temperature: 1.0,
            eos_token_ids: vec![0],
            ..SamplingConfig::default()
        },
        group_size: 16,
        missing_eos_penalty: None,
    };
    let r = rollout(
        &Cpu,
        &model,
        None,
        None,
        &prompts,
        &mut Reversal,
        &tok,
        &cfg,
        &mut Rng::new(99),
    )
    .unwrap();
    r.scores.iter().map(|&s| s as f64).sum::<f64>() / r.len() as f64
}

/// Every line of a run's metrics.
fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The final weights of a run directory.
fn weights(dir: &Path) -> Vec<f32> {
    let m = Model::load(&Cpu, dir).unwrap();
    Cpu.download(Cpu.all(&m.params))
}

fn bits(w: &[f32]) -> Vec<u32> {
    w.iter().map(|x| x.to_bits()).collect()
}

/// 40 GRPO steps (β = 0.04) at learning rate `lr` on the task's prompts; returns the mean
/// reward before and after, and the run's metrics.
fn grpo_on_task(lr: f32) -> (f64, f64, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let pairs = task_pairs(PROMPTS);
    let data = dir.path().join("prompts.jsonl");
    write_prompts(&data, &pairs);
    let out = dir.path().join("run");
    let a = GrpoArgs {
        steps: Some(40),
        lr,
        ..args(sft_model(), &data, &out)
    };
    let s = grpo::train(&Cpu, &a, &mut Reversal).unwrap();
    assert_eq!((s.steps, s.interrupted, s.skipped_steps), (40, false, 0));
    (
        mean_reward(sft_model(), &pairs),
        mean_reward(&out, &pairs),
        metrics(&out),
    )
}

/// GRPO on this seed raises the mean reward from about 0.59 to 0.76; the margin asserted is
/// half that gain, five times the measurement's sampling noise.
const MARGIN: f64 = 0.08;

#[test]
fn grpo_raises_the_task_reward() {
    let (before, after, m) = grpo_on_task(1e-3);
    assert!(after - before > MARGIN, "reward {before:.3} -> {after:.3}");
    assert_eq!(m.len(), 40);
    let kl: Vec<f64> = m
        .iter()
        .map(|v| v["objective/kl"].as_f64().unwrap())
        .collect();
    assert!(kl.iter().all(|k| k.is_finite() && *k >= 0.0), "{kl:?}");
    // The policy starts as the reference, and moves away from it.
    assert_eq!(kl[0], 0.0);
    assert!(kl[39] > 1e-3, "KL {}", kl[39]);
    for key in [
        "loss",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "objective/entropy",
        "policy/clipfrac",
        "policy/approxkl",
        "completions/mean_length",
        "completions/clipped_ratio",
        "learning_rate",
        "grad_norm",
        "rollout_tokens_per_s",
        "train_tokens_per_s",
    ] {
        assert!(m[0][key].as_f64().unwrap().is_finite(), "{key}: {}", m[0]);
    }
}

#[test]
fn learning_rate_zero_does_not_clear_the_margin() {
    let (before, after, m) = grpo_on_task(0.0);
    assert!(
        after - before <= MARGIN,
        "reward {before:.3} -> {after:.3} at lr 0"
    );
    // Nothing moved at all: the policy is still the reference.
    assert!(m.iter().all(|v| v["objective/kl"].as_f64().unwrap() == 0.0));
}

/// The first optimisation step on a fresh rollout sees ratio 1 (the sampling log-probs are the
/// training forward's within 1e-5 per token, `tests/rollout.rs`): approx-KL
/// `mean ½(logp - logp_old)²` is then below ½·(1e-5)² and nothing is clipped. The second step
/// on the same batch (`num_iterations` 2) is off-policy and shows it.
#[test]
fn first_step_on_a_rollout_is_on_policy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prompts.jsonl");
    write_prompts(&data, &task_pairs(PROMPTS));
    let out = dir.path().join("run");
    let a = GrpoArgs {
        steps: Some(4),
        num_iterations: 2,
        grad_accum: 2,
        lr: 1e-2,
        ..args(sft_model(), &data, &out)
    };
    grpo::train(&Cpu, &a, &mut Reversal).unwrap();
    let m = metrics(&out);
    for step in [0, 2] {
        let approx = m[step]["policy/approxkl"].as_f64().unwrap();
        assert!(approx <= 0.5e-10, "step {}: approx-KL {approx}", step + 1);
        assert_eq!(m[step]["policy/clipfrac"].as_f64().unwrap(), 0.0);
    }
    for step in [1, 3] {
        let approx = m[step]["policy/approxkl"].as_f64().unwrap();
        assert!(
            approx > 1e-6,
            "step {}: approx-KL {approx} after an update",
            step + 1
        );
    }
}

/// An interrupted run (killed mid-rollout-batch, after its step-4 checkpoint) resumed with
/// `--resume` ends bit-for-bit where the uninterrupted run ends, and logs the same numbers.
#[test]
fn interrupted_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prompts.jsonl");
    write_prompts(&data, &task_pairs(PROMPTS));
    let base = |out: &Path| GrpoArgs {
        steps: Some(7),
        num_iterations: 2,
        grad_accum: 2,
        save_every: 2,
        missing_eos_penalty: Some(0.1),
        entropy_coef: 0.01,
        ..args(sft_model(), &data, out)
    };
    let whole = dir.path().join("whole");
    grpo::train(&Cpu, &base(&whole), &mut Reversal).unwrap();

    let cut = dir.path().join("cut");
    let stop = GrpoArgs {
        // Micro-batch 11 of 14 is the second of step 6: the second step on the rollout
        // sampled after step 4's checkpoint.
        stop_after_micro_steps: Some(11),
        ..base(&cut)
    };
    let s = grpo::train(&Cpu, &stop, &mut Reversal).unwrap();
    assert!(s.interrupted && s.steps == 5, "{s:?}");
    let steps: Vec<u64> = checkpoints(&cut).unwrap().iter().map(|c| c.0).collect();
    assert_eq!(steps, vec![2, 4]);
    let resumed = GrpoArgs {
        resume: true,
        ..base(&cut)
    };
    let s = grpo::train(&Cpu, &resumed, &mut Reversal).unwrap();
    assert!(!s.interrupted && s.steps == 7, "{s:?}");
    assert_eq!(bits(&weights(&cut)), bits(&weights(&whole)));
    let (a, b) = (metrics(&whole), metrics(&cut));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for key in [
            "step",
            "loss",
            "reward",
            "objective/kl",
            "grad_norm",
            "policy/approxkl",
        ] {
            assert_eq!(x[key], y[key], "{key} differs: {x} vs {y}");
        }
    }
}

/// S-GRPO's supervised term is a real SFT gradient: with rewards that all agree (zero
/// advantages) and β = 0 the GRPO part contributes nothing, so one step with `--sft-coef`
/// makes the same update as one AdamW step on the mean per-example NLL of the labelled
/// completions; without `--sft-coef` the same step changes nothing.
#[test]
fn sft_coef_adds_the_supervised_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prompts.jsonl");
    let pairs = task_pairs(6);
    write_prompts(&data, &pairs);
    let model = sft_model();
    let one_step = |out: &Path, sft_coef: f32| GrpoArgs {
        steps: Some(1),
        prompts_per_step: pairs.len(),
        num_generations: 2,
        grad_accum: 2,
        beta: 0.0,
        sft_coef,
        max_grad_norm: 0.0,
        ..args(model, &data, out)
    };
    let initial = weights(model);

    let plain = dir.path().join("plain");
    grpo::train(&Cpu, &one_step(&plain, 0.0), &mut Constant).unwrap();
    assert_eq!(
        bits(&weights(&plain)),
        bits(&initial),
        "zero advantages moved the weights"
    );

    let sgrpo = dir.path().join("sgrpo");
    grpo::train(&Cpu, &one_step(&sgrpo, 1.0), &mut Constant).unwrap();
    let got = weights(&sgrpo);

    // The same step by hand: mean over examples of each one's token-mean NLL (weights
    // 1/len on each completion, which nll_loss_and_grad normalises by their sum, the count).
    let tok = Tokenizer::load(model).unwrap();
    let how = SftTokenizing {
        tok: &tok,
        eos: 0,
        max_len: 256,
    };
    let mut examples = load_sft(&data, how).unwrap();
    for e in &mut examples {
        let n = e.weights.iter().filter(|&&w| w > 0.0).count() as f32;
        e.weights
            .iter_mut()
            .filter(|w| **w > 0.0)
            .for_each(|w| *w = 1.0 / n);
    }
    let idx: Vec<usize> = (0..examples.len()).collect();
    let (batch, w) = sft_batch(&examples, &idx, 1);
    let mut m = Model::load(&Cpu, model).unwrap();
    let mut grads = Cpu.zeros(m.layout.total);
    let nll = sft::nll_loss_and_grad(&Cpu, &m, &batch, &w, &mut grads).unwrap();
    let cfg = OptimConfig {
        lr: 1e-3,
        max_grad_norm: 0.0,
        ..OptimConfig::default()
    };
    let lr = LrSchedule {
        base: 1e-3,
        warmup: 0,
        total: 1,
    }
    .at(0);
    // No clipping: the update leaves the gradient as it was, for the comparison below.
    Optimizer::new(&Cpu, cfg, m.layout.total).update(
        &Cpu,
        &m.layout,
        &mut m.params,
        &mut grads,
        lr,
    );
    let want = Cpu.download(Cpu.all(&m.params));

    // The first AdamW step moves each weight by lr·g/(|g| + 1e-8). The two gradients differ
    // only in summation order (the batches hold the examples in different orders), which
    // shows in the step only where |g| is within a few orders of 1e-8: every weight whose SFT
    // gradient exceeds 1e-6 must move the same to 0.1% of a step, and no weight may differ
    // by more than a step.
    let g = Cpu.download(Cpu.all(&grads));
    let (mut checked, mut worst) = (0usize, 0.0f32);
    for i in 0..want.len() {
        let diff = (got[i] - want[i]).abs();
        assert!(diff <= lr, "weight {i}: {} vs {}", got[i], want[i]);
        if g[i].abs() > 1e-6 {
            checked += 1;
            worst = worst.max(diff);
        }
    }
    assert!(
        worst <= 1e-3 * lr,
        "S-GRPO step differs from the SFT step by {worst}"
    );
    assert!(
        checked > want.len() / 2,
        "only {checked} weights have a gradient"
    );
    let logged = metrics(&sgrpo)[0]["sft_loss"].as_f64().unwrap();
    assert!(
        (logged - nll as f64).abs() < 1e-5,
        "sft_loss {logged} vs {nll}"
    );
}

/// RLOO, REINFORCE++, the other aggregations, clip-higher, dual-clip, masking truncated
/// completions and dynamic sampling all run and report finite numbers; dynamic sampling with
/// rewards that all agree skips every update and leaves the weights alone.
#[test]
fn estimators_and_options_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prompts.jsonl");
    write_prompts(&data, &task_pairs(PROMPTS));
    let parse = |flags: &[&str]| -> GrpoArgs {
        use clap::{Args, FromArgMatches};
        let cmd = GrpoArgs::augment_args(clap::Command::new("grpo").no_binary_name(true));
        GrpoArgs::from_arg_matches(&cmd.get_matches_from(flags)).unwrap()
    };
    let variants: [&[&str]; 4] = [
        &[
            "--advantage",
            "rloo",
            "--loss-type",
            "grpo",
            "--max-new-tokens",
            "12",
        ],
        &[
            "--advantage",
            "reinforce_pp",
            "--loss-type",
            "bnpo",
            "--num-generations",
            "1",
            "--max-new-tokens",
            "12",
        ],
        &[
            "--loss-type",
            "dr_grpo",
            "--epsilon-high",
            "0.28",
            "--delta",
            "3",
            "--scale-rewards",
            "batch",
            "--max-new-tokens",
            "12",
        ],
        &[
            "--mask-truncated-completions",
            "--dynamic-sampling",
            "--max-new-tokens",
            "3",
        ],
    ];
    for (k, flags) in variants.iter().enumerate() {
        let out = dir.path().join(format!("v{k}"));
        let a = GrpoArgs {
            model: Some(sft_model().to_path_buf()),
            data: Some(data.clone()),
            out: Some(out.clone()),
            steps: Some(2),
            lr: 1e-3,
            quiet: true,
            save_every: 0,
            ..parse(flags)
        };
        let s = grpo::train(&Cpu, &a, &mut Reversal).unwrap();
        assert_eq!(s.steps, 2, "{flags:?}");
        for v in metrics(&out) {
            for (key, x) in v.as_object().unwrap() {
                assert!(x.as_f64().unwrap().is_finite(), "{flags:?}: {key} = {x}");
            }
        }
    }

    let out = dir.path().join("agree");
    let a = GrpoArgs {
        steps: Some(2),
        dynamic_sampling: true,
        ..args(sft_model(), &data, &out)
    };
    let s = grpo::train(&Cpu, &a, &mut Constant).unwrap();
    assert_eq!(s.skipped_steps, 2);
    assert!(metrics(&out)
        .iter()
        .all(|v| v["skipped"] == 1.0 && v["frac_groups_kept"] == 0.0));
    assert_eq!(bits(&weights(&out)), bits(&weights(sft_model())));
}

/// TRL's conversational prompts: message lists rendered with the chat template and the
/// generation prompt; the labelled completion is what the template renders after it.
#[test]
fn conversational_prompts_render_with_the_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    builtin_task::write_tokenizer(dir.path()).unwrap();
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}={% endif %}{% endfor %}{% if add_generation_prompt %}{% endif %}".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let tok = Tokenizer::load(dir.path()).unwrap();
    let data = dir.path().join("chat.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"prompt": [{"role": "user", "content": "abc"}], "completion": [{"role": "assistant", "content": "cba"}], "answer": "cba"}"#,
            "\n",
            r#"{"prompt": "xyz=", "completion": "zyx"}"#,
            "\n"
        ),
    )
    .unwrap();
    let p = load_rl_prompts(&data, &tok, 0).unwrap();
    assert_eq!(p[0].text, "abc=");
    assert_eq!(p[0].ids, tok.encode("abc=", false).unwrap());
    assert_eq!(p[0].completion, Some(tok.encode("cba", false).unwrap()));
    assert_eq!(p[0].answer.as_deref(), Some("cba"));
    // Plain text: the completion gets SFT's EOS.
    assert_eq!(
        p[1].completion,
        Some([tok.encode("zyx", false).unwrap(), vec![0]].concat())
    );
    assert_eq!(p[1].answer, None);

    std::fs::write(
        &data,
        r#"{"prompt": [{"role": "user", "content": "abc"}], "completion": "cba"}"#,
    )
    .unwrap();
    let e = load_rl_prompts(&data, &tok, 0).unwrap_err().to_string();
    assert!(
        e.contains("chat.jsonl:1") && e.contains("must be a list of messages"),
        "{e}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = sft_model();
    let out = dir.path().join("run");

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let e = grpo::train(&Cpu, &args(model, &empty, &out), &mut Reversal)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("empty.jsonl") && e.contains("no examples"),
        "{e}"
    );
    assert!(!out.exists(), "a failed start left a run directory");

    let no_completion = dir.path().join("prompts.jsonl");
    std::fs::write(
        &no_completion,
        "{\"prompt\": \"abc=\"}\n{\"prompt\": \"de=\"}\n",
    )
    .unwrap();
    let a = GrpoArgs {
        sft_coef: 0.1,
        ..args(model, &no_completion, &out)
    };
    let e = grpo::train(&Cpu, &a, &mut Reversal)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prompts.jsonl:1") && e.contains("--sft-coef needs a labelled \"completion\""),
        "{e}"
    );

    let long = dir.path().join("long.jsonl");
    std::fs::write(&long, format!("{{\"prompt\": \"{}=\"}}\n", "a".repeat(250))).unwrap();
    let e = grpo::train(&Cpu, &args(model, &long, &out), &mut Reversal)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("long.jsonl:1") && e.contains("context of 256"),
        "{e}"
    );

    let a = GrpoArgs {
        num_generations: 1,
        ..args(model, &no_completion, &out)
    };
    let e = grpo::train(&Cpu, &a, &mut Reversal)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2 completions per prompt"), "{e}");

    // A reward model with another tokenizer than the policy's: refused by the reward source
    // before anything runs.
    let rm = dir.path().join("rm");
    let tok = Tokenizer::load(model).unwrap();
    let mut cfg = Config::builtin("gpt2-tiny", tok.vocab_size()).unwrap();
    cfg.head = Head::Score;
    let rm_model = Model::new(
        &Cpu,
        cfg.clone(),
        &random_params(&Layout::new(&cfg), 0.02, 1),
    )
    .unwrap();
    rm_model.save(&Cpu, &rm, SaveDtype::F32).unwrap();
    builtin_task::write_tokenizer(&rm).unwrap();
    let a = GrpoArgs {
        model: Some(PathBuf::from("/work/shared/fixtures/models/gpt2")),
        reward: vec![format!("model={}", rm.display())],
        ..args(model, &no_completion, &out)
    };
    let e = grpo::run(&a).unwrap_err().to_string();
    assert!(e.contains("different tokenizers"), "{e}");
}

/// `--is-correction-cap 2` on the CPU: the training forward's π_old and the decode path's
/// sampling log-probs agree to float rounding (`tests/rollout.rs` bounds the gap by 1e-5 per
/// token), so the logged gap stays below 1e-4, every weight is within 1e-4 of 1 and none is
/// capped; the first step on each rollout is still on-policy (approx-KL as in
/// [`first_step_on_a_rollout_is_on_policy`]). Dynamic sampling and two micro-batches re-lay the
/// weights twice: were they misaligned with their tokens, completion tokens would get the 0 of
/// the prompt positions, and the first step's gradient would differ from the run without the
/// flag by far more than the 1e-3 (relative) allowed for weights and ratios within 1e-4 of 1.
#[test]
fn importance_sampling_correction_logs_a_float_rounding_gap() {
    use clap::{Args, FromArgMatches};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prompts.jsonl");
    write_prompts(&data, &task_pairs(PROMPTS));
    let out = dir.path().join("run");
    let cmd = GrpoArgs::augment_args(clap::Command::new("grpo").no_binary_name(true));
    let flags =
        GrpoArgs::from_arg_matches(&cmd.get_matches_from(["--is-correction-cap", "2"])).unwrap();
    assert_eq!(flags.is_correction_cap, Some(2.0));
    let a = GrpoArgs {
        steps: Some(4),
        num_iterations: 2,
        grad_accum: 2,
        dynamic_sampling: true,
        is_correction_cap: flags.is_correction_cap,
        ..args(sft_model(), &data, &out)
    };
    let s = grpo::train(&Cpu, &a, &mut Reversal).unwrap();
    assert_eq!((s.steps, s.skipped_steps), (4, 0));
    let m = metrics(&out);
    for (step, v) in m.iter().enumerate() {
        let get = |k: &str| {
            v[k].as_f64()
                .unwrap_or_else(|| panic!("step {step}: no {k}"))
        };
        let (gap, gap_max) = (get("sampling_logp_gap_mean"), get("sampling_logp_gap_max"));
        assert!(
            gap <= gap_max && gap_max < 1e-4,
            "step {step}: gap {gap}, max {gap_max}"
        );
        let w = get("is_weight_mean");
        assert!((w - 1.0).abs() < 1e-4, "step {step}: mean weight {w}");
        assert_eq!(get("is_capped_frac"), 0.0, "step {step}");
        assert!(get("loss").is_finite());
    }
    for step in [0, 2] {
        let approx = m[step]["policy/approxkl"].as_f64().unwrap();
        assert!(approx <= 0.5e-10, "step {}: approx-KL {approx}", step + 1);
    }
    // The same run without the flag: no training forward's π_old, so no gap to log.
    let plain = dir.path().join("plain");
    let b = GrpoArgs {
        is_correction_cap: None,
        out: Some(plain.clone()),
        ..a
    };
    grpo::train(&Cpu, &b, &mut Reversal).unwrap();
    let p = metrics(&plain);
    assert!(p[0].get("sampling_logp_gap_mean").is_none());
    let norm = |v: &Value| v["grad_norm"].as_f64().unwrap();
    let (with, without) = (norm(&m[0]), norm(&p[0]));
    assert!(
        without > 0.0 && (with - without).abs() <= 1e-3 * without,
        "first step's gradient norm {with} with the correction, {without} without"
    );
}

/// The weights on hand-made log-probs: a sampler that under-rates a token by ln 3 gives a
/// ratio of 3, truncated to the cap of 2; one that over-rates it keeps its ratio below 1 (the
/// truncation is one-sided, as TRL's `clamp(max=cap)`); masked tokens count nowhere, however
/// far apart; and the flag's 0 means off.
#[test]
fn truncated_importance_weights_cap_perturbed_ratios() {
    let train = [-1.0f32, -2.0, -0.5, -3.0, -0.25, 0.0];
    let mut sampling = train;
    sampling[1] -= 3f32.ln(); // ratio 3: capped
    sampling[2] += 0.5; // ratio e^-0.5
    sampling[4] = -40.0; // masked: ignored
    let mask = [1.0f32, 1.0, 1.0, 1.0, 0.0, 0.0];
    let c = SamplingCorrection::new(&train, &sampling, &mask, 2.0);
    let r2 = (-0.5f64).exp();
    let want_w = [1.0, 2.0, r2, 1.0, 0.0, 0.0];
    for (i, (&got, &want)) in c.weights.iter().zip(&want_w).enumerate() {
        assert!(
            (got as f64 - want).abs() < 1e-6,
            "w[{i}] = {got}, want {want}"
        );
    }
    // The gaps are f32 differences widened, so they carry f32 rounding (≤ 1e-7 here).
    let ln3 = (train[1] as f64 - sampling[1] as f64).abs();
    assert!((ln3 - 3f64.ln()).abs() < 1e-6);
    assert!((c.gap_mean - (ln3 + 0.5) / 4.0).abs() < 1e-6, "{c:?}");
    assert!((c.gap_max - ln3).abs() < 1e-12, "{c:?}");
    assert!((c.weight_mean - (4.0 + r2) / 4.0).abs() < 1e-6, "{c:?}");
    assert_eq!(c.capped_frac, 0.25);
    // Without the perturbation every weight is 1 and nothing is capped.
    let same = SamplingCorrection::new(&train, &train, &mask, 2.0);
    assert_eq!(
        (same.gap_max, same.weight_mean, same.capped_frac),
        (0.0, 1.0, 0.0)
    );

    assert_eq!(is_correction_cap(None).unwrap(), None);
    assert_eq!(is_correction_cap(Some(0.0)).unwrap(), None);
    assert_eq!(is_correction_cap(Some(2.0)).unwrap(), Some(2.0));
    for bad in [-1.0, f32::NAN, f32::INFINITY] {
        let e = is_correction_cap(Some(bad)).unwrap_err().to_string();
        assert!(e.contains("--is-correction-cap"), "{e}");
    }
}
