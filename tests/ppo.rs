//! The PPO trainer end to end on the CPU backend: it raises the reward of a small rule task
//! (and does not at learning rate 0), it resumes bit-exactly (policy, critic, both optimizers,
//! the adaptive KL coefficient and the sampling RNG), its KL controller is TRL's, the truncated
//! importance-sampling correction logs a sampling/training log-prob gap of float rounding, and
//! bad configurations get clear errors.

use rlhf::algo::ppo::{self, CriticInit, KlController, PpoArgs, CRITIC_DIR};
use rlhf::algo::reward::score_model_from_lm;
use rlhf::algo::sft::{self, SftArgs};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::Backend;
use rlhf::builtin_task;
use rlhf::checkpoint::{latest_checkpoint, load_trainer_state, OPTIMIZER_FILE};
use rlhf::model::generate::{generate, SamplingConfig};
use rlhf::model::tokenizer::Tokenizer;
use rlhf::model::weights::{copy_tokenizer_files, SaveDtype};
use rlhf::model::{random_params, Config, Model};
use rlhf::reward::{RewardInput, RewardSource};
use rlhf::rng::Rng;
use std::path::{Path, PathBuf};

/// Partial credit for the built-in task (reverse the letters before `=`): the share of
/// positions where the completion has the right letter, over the longer of the completion and
/// the answer, so that rambling on costs too. Dense, so tens of PPO steps move it measurably.
struct ReversalReward;

fn reversal_score(completion: &str, answer: &str) -> f32 {
    let (c, a): (Vec<char>, Vec<char>) = (completion.chars().collect(), answer.chars().collect());
    let hits = c.iter().zip(&a).filter(|(x, y)| x == y).count();
    hits as f32 / c.len().max(a.len()).max(1) as f32
}

impl RewardSource for ReversalReward {
    fn describe(&self) -> String {
        "reversal partial credit".into()
    }
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> rlhf::Result<Vec<f32>> {
        Ok(inputs
            .iter()
            .map(|i| reversal_score(i.completion, i.answer.expect("every prompt has an answer")))
            .collect())
    }
}

/// Writes `{"prompt", field}` lines: SFT pairs (`completion`) or PPO prompts (`answer`).
fn write_jsonl(path: &Path, pairs: &[(String, String)], field: &str) {
    let text: String = pairs
        .iter()
        .map(|(p, c)| serde_json::json!({"prompt": p, field: c}).to_string() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

/// Prompts PPO trains on (and is scored on): few enough that each is sampled many times.
const TASK_PROMPTS: usize = 32;

/// The reversal pairs PPO trains on, apart from those SFT saw.
fn ppo_pairs() -> Vec<(String, String)> {
    builtin_task::pairs(7).0[4000..4000 + TASK_PROMPTS].to_vec()
}

/// A scratch directory holding gpt2-tiny SFT'd for 150 steps on the reversal task in `sft/`
/// (an HF directory with the tokenizer; it reverses about a quarter of the letters right), and
/// the PPO prompts with their answers in `prompts.jsonl`.
fn sft_start() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    builtin_task::write_tokenizer(&tok).unwrap();
    let sft_data = dir.path().join("sft.jsonl");
    write_jsonl(&sft_data, &builtin_task::pairs(7).0[..4000], "completion");
    let start = dir.path().join("sft");
    sft::train(
        &Cpu,
        &SftArgs {
            model: Some("gpt2-tiny".into()),
            tokenizer: Some(tok),
            data: Some(sft_data),
            out: Some(start.clone()),
            lr: Some(3e-3),
            batch_size: Some(32),
            max_steps: Some(150),
            eval_every: 0,
            save_every: 0,
            quiet: true,
            ..SftArgs::default()
        },
    )
    .unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    write_jsonl(&prompts, &ppo_pairs(), "answer");
    (dir, start, prompts)
}

/// Mean reversal score of a model over 8 samples of each task prompt at temperature 1, with
/// a fixed sampling seed: the same weights always give the same number.
fn sampled_score(model_dir: &Path) -> f64 {
    let tok = Tokenizer::load(model_dir).unwrap();
    let model = Model::load(&Cpu, model_dir).unwrap();
    let pairs = ppo_pairs();
    let prompts: Vec<Vec<u32>> = pairs
        .iter()
        .map(|(p, _)| tok.encode(p, true).unwrap())
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        eos_token_ids: model.cfg.eos_token_ids.clone(),
        ..SamplingConfig::default()
    };
    let mut rng = Rng::new(1234);
    let mut scores = Vec::new();
    for _ in 0..8 {
        let outs = generate(&Cpu, &model, &prompts, &cfg, None, &mut rng).unwrap();
        for ((_, answer), c) in pairs.iter().zip(&outs) {
            scores.push(reversal_score(&tok.decode(&c.tokens, true).unwrap(), answer) as f64);
        }
    }
    scores.iter().sum::<f64>() / scores.len() as f64
}

/// One metric of every logged step of a run (NaN where absent or null).
fn metric(dir: &Path, name: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v[name].as_f64().unwrap_or(f64::NAN)
        })
        .collect()
}

/// The PPO learning run: 60 steps of 32 rollouts, 4 epochs of 4 minibatches each, a critic
/// from the policy, a small fixed KL coefficient. Returns the sampled score before and after,
/// and the run directory (inside the scratch directory, returned to keep it alive).
fn reversal_ppo(lr: f32) -> (f64, f64, PathBuf, tempfile::TempDir) {
    let (dir, start, prompts) = sft_start();
    let out = dir.path().join("ppo");
    let args = PpoArgs {
        model: Some(start.to_string_lossy().into_owned()),
        data: Some(prompts),
        out: Some(out.clone()),
        critic_init: Some(CriticInit::Policy),
        steps: 60,
        prompts_per_step: 32,
        num_mini_batches: 4,
        ppo_epochs: 4,
        lr,
        kl_coef: 0.01,
        max_new_tokens: 12,
        temperature: 1.0,
        save_every: 0,
        quiet: true,
        ..PpoArgs::default()
    };
    let s = ppo::train_with_reward(&Cpu, &args, &mut ReversalReward).unwrap();
    assert!(!s.interrupted && s.steps == 60, "{s:?}");
    (sampled_score(&start), sampled_score(&out), out, dir)
}

/// How much PPO must raise the sampled score (a share of letters right) of the SFT start,
/// about 0.25. Over six PPO seeds the gain ranged from 0.16 to 0.25, so half the smallest
/// leaves room for a different machine's rounding to take a different trajectory; a policy
/// that does not learn moves it by exactly 0 (same weights, same sampling seed).
const MARGIN: f64 = 0.08;

/// Every metric the trainer logs, by TRL's names.
const METRICS: &[&str] = &[
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl",
    "policy/clipfrac",
    "policy/entropy",
    "val/vf_loss",
    "val/clipfrac",
    "loss/policy_avg",
    "loss/value_avg",
    "completions/mean_length",
    "completions/clipped_ratio",
    "kl_coef",
    "learning_rate",
    "rollout_tokens_per_s",
    "train_tokens_per_s",
];

#[test]
fn ppo_raises_the_reward_of_a_rule_task() {
    let (before, after, out, _dir) = reversal_ppo(6e-4);
    eprintln!("sampled score {before:.4} -> {after:.4}");
    assert!(
        after - before >= MARGIN,
        "PPO moved the score from {before:.4} to {after:.4}, less than {MARGIN}"
    );
    for name in METRICS {
        let v = metric(&out, name);
        assert!(
            v.len() == 60 && v.iter().all(|x| x.is_finite()),
            "{name}: {v:?}"
        );
    }
    // On-policy, the first step's KL to the reference (the same weights) is 0 up to rounding;
    // then the policy moves away, and the KL shows it.
    let kl = metric(&out, "objective/kl");
    assert!(kl[0].abs() < 1e-4, "first-step KL {}", kl[0]);
    assert!(kl[59] > 0.05, "the policy moved, yet the KL is {}", kl[59]);
    // The critic learns the returns: its loss falls from its first steps to its last.
    let vf = metric(&out, "val/vf_loss");
    assert!(
        vf[50..].iter().sum::<f64>() < vf[..10].iter().sum::<f64>(),
        "value loss {vf:?}"
    );
    // The final critic is an HF directory of its own, beside the policy.
    let critic = Config::load(&out.join(CRITIC_DIR)).unwrap();
    assert_eq!(critic.head, rlhf::model::config::Head::Score);
}

#[test]
fn at_learning_rate_zero_the_reward_does_not_clear_the_margin() {
    let (before, after, out, _dir) = reversal_ppo(0.0);
    assert!(
        after - before < MARGIN,
        "at lr 0 the score moved from {before:.4} to {after:.4}"
    );
    // The weights never move, so every rollout is on the reference policy: KL 0 up to rounding.
    let kl = metric(&out, "objective/kl");
    assert!(kl.iter().all(|k| k.abs() < 1e-4), "KL at lr 0: {kl:?}");
}

/// A random-init built-in model saved as an HF directory with the built-in tokenizer, and a
/// reward model (the same body, a random score head) likewise.
fn random_policy_and_rm(family: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let tok_dir = dir.join("tok");
    builtin_task::write_tokenizer(&tok_dir).unwrap();
    let tok = Tokenizer::load(&tok_dir).unwrap();
    let mut cfg = Config::builtin(family, tok.vocab_size()).unwrap();
    cfg.eos_token_ids = tok.eos_id().into_iter().collect();
    cfg.pad_token_id = tok.pad_id();
    let params = random_params(&rlhf::model::Layout::new(&cfg), 0.02, 3);
    let policy = Model::new(&Cpu, cfg, &params).unwrap();
    let (pdir, rdir) = (dir.join("policy"), dir.join("rm"));
    policy.save(&Cpu, &pdir, SaveDtype::F32).unwrap();
    score_model_from_lm(&Cpu, &policy, 5)
        .unwrap()
        .save(&Cpu, &rdir, SaveDtype::F32)
        .unwrap();
    for d in [&pdir, &rdir] {
        copy_tokenizer_files(&tok_dir, d).unwrap();
    }
    (pdir, rdir)
}

/// A model directory's weights, as bits.
fn weights_bits(dir: &Path) -> Vec<u32> {
    let m = Model::load(&Cpu, dir).unwrap();
    Cpu.download(Cpu.all(&m.params))
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn resume_after_interruption_is_bitwise_identical() {
    for family in ["gpt2-tiny", "llama-tiny"] {
        let dir = tempfile::tempdir().unwrap();
        let (policy, rm) = random_policy_and_rm(family, dir.path());
        let prompts = dir.path().join("prompts.jsonl");
        write_jsonl(&prompts, &builtin_task::pairs(7).0[..24], "answer");
        // 3 batches of 8 prompts per epoch: 5 steps cross an epoch boundary. A reward model
        // source and a critic from it (the default with `model=DIR`), an adaptive KL
        // coefficient with a short horizon so that it moves every step, a warmup.
        let base = |out: &str| PpoArgs {
            model: Some(policy.to_string_lossy().into_owned()),
            data: Some(prompts.clone()),
            reward: vec![format!("model={}", rm.display())],
            out: Some(dir.path().join(out)),
            steps: 5,
            prompts_per_step: 8,
            num_mini_batches: 2,
            ppo_epochs: 2,
            lr: 1e-3,
            warmup_steps: 2,
            weight_decay: 0.1,
            target_kl: Some(0.5),
            kl_horizon: 50.0,
            max_new_tokens: 6,
            temperature: 1.0,
            save_every: 2,
            quiet: true,
            ..PpoArgs::default()
        };
        let full = ppo::train(&Cpu, &base("full")).unwrap();
        assert!(full.kl_coef != 0.05, "the KL coefficient never moved");

        // Killed after 10 minibatch updates (4 per step): inside step 3, past the checkpoint
        // of step 2, before that of step 4.
        let cut = PpoArgs {
            stop_after_micro_steps: Some(10),
            ..base("cut")
        };
        let s = ppo::train(&Cpu, &cut).unwrap();
        assert!(s.interrupted && s.steps == 2, "{s:?}");
        let run = dir.path().join("cut");
        let ck = latest_checkpoint(&run).unwrap().unwrap();
        assert_eq!(ck, run.join("checkpoint-2"));
        assert!(ck.join(CRITIC_DIR).join(OPTIMIZER_FILE).is_file());
        let state = load_trainer_state(&ck).unwrap();
        assert_eq!((state.step, state.micro_step), (2, 8));
        assert!(state.extra["kl_coef_bits"].is_u64() && state.extra["rng"].is_array());

        let resumed = ppo::train(
            &Cpu,
            &PpoArgs {
                resume: true,
                ..base("cut")
            },
        )
        .unwrap();
        assert!(!resumed.interrupted && resumed.steps == 5, "{resumed:?}");
        assert_eq!(
            resumed.kl_coef.to_bits(),
            full.kl_coef.to_bits(),
            "{family}"
        );

        let full_dir = dir.path().join("full");
        assert!(
            weights_bits(&full_dir) == weights_bits(&run),
            "{family}: policy weights differ after resume"
        );
        assert!(
            weights_bits(&full_dir.join(CRITIC_DIR)) == weights_bits(&run.join(CRITIC_DIR)),
            "{family}: critic weights differ after resume"
        );
        // The metrics read as one run: steps 1..5 once each, the same numbers to the bit.
        for name in [
            "objective/scores",
            "objective/kl",
            "kl_coef",
            "loss/value_avg",
        ] {
            let (a, b) = (metric(&full_dir, name), metric(&run, name));
            assert!(
                a.len() == 5 && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{family} {name}: {a:?} vs {b:?}"
            );
        }
    }
}

#[test]
fn adaptive_kl_controller_follows_trls_formula() {
    // TRL 0.x AdaptiveKLController(init_kl_coef=0.2, target=6, horizon=10000).
    let mut c = KlController {
        value: 0.2,
        target: Some(6.0),
        horizon: 10000.0,
    };
    // KL 8 over 256 sequences: error 8/6 - 1 = 0.333, clipped to 0.2;
    // value = 0.2 · (1 + 0.2 · 256/10000) = 0.2 · 1.00512 = 0.201024.
    c.update(8.0, 256);
    assert!((c.value - 0.201024).abs() < 1e-15, "{}", c.value);
    // KL 5.4 over 64: error 5.4/6 - 1 = -0.1 (inside the clip);
    // value = 0.201024 · (1 - 0.1 · 64/10000) = 0.201024 · 0.99936 = 0.20089534464.
    c.update(5.4, 64);
    assert!((c.value - 0.200_895_344_64).abs() < 1e-15, "{}", c.value);
    // KL 0 over 100: error -1, clipped to -0.2; value · (1 - 0.2 · 0.01) = value · 0.998.
    c.update(0.0, 100);
    assert!(
        (c.value - 0.200_895_344_64 * 0.998).abs() < 1e-15,
        "{}",
        c.value
    );
    // Without a target the coefficient is fixed.
    let mut fixed = KlController {
        value: 0.05,
        target: None,
        horizon: 10000.0,
    };
    fixed.update(100.0, 1000);
    assert_eq!(fixed.value, 0.05);
}

#[test]
fn bad_configurations_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, rm) = random_policy_and_rm("gpt2-tiny", dir.path());
    let prompts = dir.path().join("prompts.jsonl");
    write_jsonl(&prompts, &builtin_task::pairs(7).0[..8], "answer");
    let base = |out: &str| PpoArgs {
        model: Some(policy.to_string_lossy().into_owned()),
        data: Some(prompts.clone()),
        reward: vec!["exact_match=^([a-z]+)$".into()],
        out: Some(dir.path().join(out)),
        steps: 1,
        max_new_tokens: 4,
        quiet: true,
        ..PpoArgs::default()
    };
    let err = |a: PpoArgs| ppo::train(&Cpu, &a).unwrap_err().to_string();

    // A critic from the reward model needs a reward model.
    let e = err(PpoArgs {
        critic_init: Some(CriticInit::Reward),
        ..base("a")
    });
    assert!(
        e.contains("--critic-init reward needs exactly one `model=DIR`"),
        "{e}"
    );
    // The policy must be a language model.
    let e = err(PpoArgs {
        model: Some(rm.to_string_lossy().into_owned()),
        ..base("b")
    });
    assert!(e.contains("PPO needs a language model"), "{e}");
    // More minibatches than sequences.
    let e = err(PpoArgs {
        prompts_per_step: 2,
        num_mini_batches: 4,
        ..base("c")
    });
    assert!(e.contains("a minibatch would be empty"), "{e}");
    // Nothing was started by a failed run.
    for out in ["a", "b", "c"] {
        assert!(!dir.path().join(out).join("run_config.json").exists());
    }
    // A good configuration runs.
    ppo::train(&Cpu, &base("d")).unwrap();
}

/// `--is-correction-cap 2` on the CPU, at the default temperature 0.7: the training forward's
/// π_old and the decode path's sampling log-probs agree to float rounding (within 1e-5 per
/// token, `tests/rollout.rs`), so the logged gap stays below 1e-4, the weights within 1e-4 of 1
/// and none is capped; with weights and π_old that close, each step's policy gradient norm is
/// the uncorrected run's within 1e-3 (relative). A negative cap is refused before anything runs.
#[test]
fn importance_sampling_correction_logs_a_float_rounding_gap() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, rm) = random_policy_and_rm("llama-tiny", dir.path());
    let prompts = dir.path().join("prompts.jsonl");
    write_jsonl(&prompts, &builtin_task::pairs(7).0[..16], "answer");
    let base = |out: &str, cap: Option<f32>| PpoArgs {
        model: Some(policy.to_string_lossy().into_owned()),
        data: Some(prompts.clone()),
        reward: vec![format!("model={}", rm.display())],
        out: Some(dir.path().join(out)),
        steps: 2,
        prompts_per_step: 8,
        num_mini_batches: 2,
        ppo_epochs: 2,
        lr: 1e-3,
        max_new_tokens: 6,
        is_correction_cap: cap,
        save_every: 0,
        quiet: true,
        ..PpoArgs::default()
    };
    ppo::train(&Cpu, &base("is", Some(2.0))).unwrap();
    ppo::train(&Cpu, &base("plain", None)).unwrap();
    let (is_dir, plain_dir) = (dir.path().join("is"), dir.path().join("plain"));
    let gap = metric(&is_dir, "sampling_logp_gap_mean");
    let gap_max = metric(&is_dir, "sampling_logp_gap_max");
    let w = metric(&is_dir, "is_weight_mean");
    let capped = metric(&is_dir, "is_capped_frac");
    assert_eq!(gap.len(), 2);
    for s in 0..2 {
        assert!(
            gap[s] <= gap_max[s] && gap_max[s] < 1e-4,
            "step {s}: gap {} max {}",
            gap[s],
            gap_max[s]
        );
        assert!((w[s] - 1.0).abs() < 1e-4, "step {s}: mean weight {}", w[s]);
        assert_eq!(capped[s], 0.0, "step {s}");
    }
    assert!(metric(&plain_dir, "sampling_logp_gap_mean")[0].is_nan());
    let (with, without) = (
        metric(&is_dir, "policy/grad_norm"),
        metric(&plain_dir, "policy/grad_norm"),
    );
    for s in 0..2 {
        assert!(
            without[s] > 0.0 && (with[s] - without[s]).abs() <= 1e-3 * without[s],
            "step {s}: policy gradient norm {} with the correction, {} without",
            with[s],
            without[s]
        );
    }

    let e = ppo::train(&Cpu, &base("bad", Some(-1.0)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--is-correction-cap -1"), "{e}");
    assert!(!dir.path().join("bad").join("run_config.json").exists());
}
