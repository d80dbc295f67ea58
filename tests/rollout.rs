//! Rollouts on the CPU backend: G samples per prompt in consecutive groups, the completion
//! mask and every per-token vector aligned with the training forward's positions, sampling
//! log-probs equal to the training forward's, the missing-EOS penalty, and clear errors.

use rlhf::backend::cpu::Cpu;
use rlhf::backend::Backend;
use rlhf::builtin_task;
use rlhf::model::config::Head;
use rlhf::model::generate::{Finish, SamplingConfig};
use rlhf::model::tokenizer::Tokenizer;
use rlhf::model::{random_params, Config, Layout, Model};
use rlhf::reward::{RewardInput, RewardSource};
use rlhf::rng::Rng;
use rlhf::rollout::{rollout, sequence_logprobs, Rollout, RolloutConfig, RolloutPrompt};
use rlhf::Error;

/// Scores every completion 1 and records what it was asked to score.
#[derive(Default)]
struct Constant {
    seen: Vec<(String, String, Option<String>)>,
}

impl RewardSource for Constant {
    fn describe(&self) -> String {
        "constant 1".into()
    }
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> rlhf::Result<Vec<f32>> {
        self.seen.extend(inputs.iter().map(|i| {
            (
                i.prompt.to_string(),
                i.completion.to_string(),
                i.answer.map(str::to_string),
            )
        }));
        Ok(vec![1.0; inputs.len()])
    }
}

/// The built-in character tokenizer (EOS = 0, pad = 1).
fn tokenizer() -> (tempfile::TempDir, Tokenizer) {
    let dir = tempfile::tempdir().unwrap();
    builtin_task::write_tokenizer(dir.path()).unwrap();
    let tok = Tokenizer::load(dir.path()).unwrap();
    (dir, tok)
}

/// A random tiny model over the built-in tokenizer; std 0.3 makes its distributions far from
/// uniform, so log-prob mismatches would show.
fn model(family: &str, head: Head, seed: u64, vocab: usize) -> Model<Cpu> {
    let mut cfg = Config::builtin(family, vocab).unwrap();
    cfg.head = head;
    let params = random_params(&Layout::new(&cfg), 0.3, seed);
    Model::new(&Cpu, cfg, &params).unwrap()
}

fn prompts(tok: &Tokenizer) -> Vec<RolloutPrompt> {
    ["abc=", "hello=", "xy="]
        .iter()
        .enumerate()
        .map(|(i, p)| RolloutPrompt {
            text: p.to_string(),
            ids: tok.encode(p, true).unwrap(),
            answer: Some(format!("answer{i}")),
        })
        .collect()
}

fn config(max_new: usize, g: usize, penalty: Option<f32>) -> RolloutConfig {
    RolloutConfig {
        sampling: SamplingConfig {
            max_new_tokens: max_new,
            temperature: 0.8,
            eos_token_ids: vec![0],
            ..SamplingConfig::default()
        },
        group_size: g,
        missing_eos_penalty: penalty,
    }
}

/// Checks every row of a rollout against its completion: ids, mask, targets, log-probs.
fn check_layout(r: &Rollout) {
    let t = r.batch.t;
    for row in 0..r.len() {
        let (p, c) = (r.prompt_len[row], &r.completions[row]);
        let ids = &r.batch.ids[row * t..(row + 1) * t];
        assert_eq!(&ids[p..p + c.tokens.len()], &c.tokens[..], "row {row} ids");
        for j in 0..t {
            let i = row * t + j;
            let in_completion = j + 1 >= p && j + 1 < p + c.tokens.len();
            assert_eq!(
                r.completion_mask[i], in_completion as u8 as f32,
                "row {row} pos {j}"
            );
            if in_completion {
                let k = j + 1 - p;
                assert_eq!(r.targets[i], c.tokens[k], "row {row} target {j}");
                assert_eq!(r.old_logp[i], c.logprobs[k], "row {row} logp {j}");
            } else {
                assert_eq!(r.old_logp[i], 0.0);
            }
            assert_eq!(r.batch.mask[i], j < p + c.tokens.len());
        }
    }
}

#[test]
fn groups_layout_and_missing_eos_penalty() {
    let (_d, tok) = tokenizer();
    let policy = model("gpt2-tiny", Head::Lm, 3, tok.vocab_size());
    let ps = prompts(&tok);
    let mut reward = Constant::default();
    let cfg = config(6, 4, Some(0.5));
    let r = rollout(
        &Cpu,
        &policy,
        None,
        None,
        &ps,
        &mut reward,
        &tok,
        &cfg,
        &mut Rng::new(1),
    )
    .unwrap();
    assert_eq!(r.len(), 12);
    assert_eq!(r.prompt_index, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
    for (row, &p) in r.prompt_index.iter().enumerate() {
        assert_eq!(r.prompt_len[row], ps[p].ids.len());
        // The reward source saw the prompt text, the decoded completion and the answer.
        assert_eq!(reward.seen[row].0, ps[p].text);
        assert_eq!(reward.seen[row].1, r.completion_texts[row]);
        assert_eq!(reward.seen[row].2, ps[p].answer);
    }
    check_layout(&r);
    // The penalty falls on exactly the completions that never stopped.
    let truncated = r.truncated.iter().filter(|&&t| t).count();
    assert!(
        truncated > 0 && truncated < r.len(),
        "{truncated} of {} truncated: need both kinds",
        r.len()
    );
    for row in 0..r.len() {
        let stopped = r.completions[row].finish == Finish::Eos;
        assert_eq!(r.truncated[row], !stopped);
        assert_eq!(r.scores[row], if stopped { 1.0 } else { 0.5 }, "row {row}");
    }
    assert_eq!(r.clipped_ratio(), truncated as f64 / 12.0);
    assert!(r.timing.generated_tokens == r.completion_tokens() && r.timing.tokens_per_s() > 0.0);
    // No penalty configured: every score is the reward's.
    let r = rollout(
        &Cpu,
        &policy,
        None,
        None,
        &ps,
        &mut reward,
        &tok,
        &config(6, 4, None),
        &mut Rng::new(1),
    )
    .unwrap();
    assert!(r.scores.iter().all(|&s| s == 1.0));

    // A sub-rollout keeps every row's alignment.
    let sub = r.select(&[7, 2, 9]);
    check_layout(&sub);
    assert_eq!(sub.prompt_index, vec![1, 0, 2]);
    assert_eq!(sub.completions[0], r.completions[7]);
}

/// The requirement: the log-probs recorded while sampling equal what the training
/// forward computes for the same weights, within 1e-5 per token, so an on-policy first step
/// sees a ratio of exactly 1 to that precision. Checked for both families (learned positions
/// and RoPE), with left-padded generation of prompts of different lengths against
/// right-padded training rows, and through a sub-rollout (a micro-batch) too.
#[test]
fn sampling_logprobs_equal_training_forward() {
    const TOL: f32 = 1e-5;
    let (_d, tok) = tokenizer();
    for family in ["gpt2-tiny", "llama-tiny"] {
        let policy = model(family, Head::Lm, 5, tok.vocab_size());
        let mut reward = Constant::default();
        let cfg = config(12, 3, None);
        let r = rollout(
            &Cpu,
            &policy,
            Some(&policy),
            None,
            &prompts(&tok),
            &mut reward,
            &tok,
            &cfg,
            &mut Rng::new(2),
        )
        .unwrap();
        assert!(r.completion_tokens() > 20, "too few tokens to test");
        let train = sequence_logprobs(&Cpu, &policy, &r.batch, &r.targets, r.temperature).unwrap();
        let reference = r.ref_logp.as_ref().unwrap();
        let mut worst = 0.0f32;
        for i in 0..r.batch.n() {
            if r.completion_mask[i] == 1.0 {
                worst = worst.max((train[i] - r.old_logp[i]).abs());
                // The reference pass is the same computation: the same number exactly.
                assert_eq!(reference[i], train[i]);
                // The ratio the first optimisation step sees.
                let ratio = (train[i] - r.old_logp[i]).exp();
                assert!(
                    (ratio - 1.0).abs() < 2.0 * TOL,
                    "{family}: ratio {ratio} at {i}"
                );
            } else {
                assert_eq!(reference[i], 0.0);
            }
        }
        assert!(
            worst <= TOL,
            "{family}: sampling vs training log-prob differ by {worst}"
        );
        let sub = r.select(&[8, 0, 4]);
        let train =
            sequence_logprobs(&Cpu, &policy, &sub.batch, &sub.targets, sub.temperature).unwrap();
        let rows = train.iter().zip(&sub.old_logp).zip(&sub.completion_mask);
        for (i, ((&lp, &old), &m)) in rows.enumerate() {
            if m == 1.0 {
                assert!(
                    (lp - old).abs() <= TOL,
                    "{family}: micro-batch, position {i}"
                );
            }
        }
    }
}

/// A critic's values sit at the positions of the completion mask: the value of the state
/// before each completion token (TRL's convention), from the critic's forward over the row.
#[test]
fn critic_values_align_with_the_completion_mask() {
    let (_d, tok) = tokenizer();
    let policy = model("gpt2-tiny", Head::Lm, 3, tok.vocab_size());
    let critic = model("gpt2-tiny", Head::Score, 4, tok.vocab_size());
    let mut reward = Constant::default();
    let r = rollout(
        &Cpu,
        &policy,
        None,
        Some(&critic),
        &prompts(&tok),
        &mut reward,
        &tok,
        &config(5, 2, None),
        &mut Rng::new(3),
    )
    .unwrap();
    let values = r.values.as_ref().unwrap();
    for row in 0..r.len() {
        // The critic alone over this row's real tokens.
        let n = r.prompt_len[row] + r.completions[row].tokens.len();
        let ids = r.batch.ids[row * r.batch.t..row * r.batch.t + n].to_vec();
        let b = rlhf::model::Batch::new(&[ids], 1, rlhf::model::Pad::Right);
        let acts = critic.forward(&Cpu, &b).unwrap();
        let alone = Cpu.download(Cpu.all(&critic.values(&Cpu, &acts.hidden, n).unwrap()));
        let span = row * r.batch.t..(row + 1) * r.batch.t;
        for (j, (&v, &m)) in values[span.clone()]
            .iter()
            .zip(&r.completion_mask[span])
            .enumerate()
        {
            if m == 1.0 {
                assert!((v - alone[j]).abs() < 1e-5, "row {row} pos {j}");
            } else {
                assert_eq!(v, 0.0);
            }
        }
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (_d, tok) = tokenizer();
    let policy = model("gpt2-tiny", Head::Lm, 3, tok.vocab_size());
    let mut reward = Constant::default();
    let mut rng = Rng::new(0);
    let err = |e: Error| e.to_string();

    let e = rollout(
        &Cpu,
        &policy,
        None,
        None,
        &[],
        &mut reward,
        &tok,
        &config(4, 2, None),
        &mut rng,
    )
    .unwrap_err();
    assert!(err(e).contains("at least one prompt"));

    let long = RolloutPrompt {
        text: "a".repeat(250),
        ids: vec![3; 250],
        answer: None,
    };
    let e = rollout(
        &Cpu,
        &policy,
        None,
        None,
        &[long],
        &mut reward,
        &tok,
        &config(10, 2, None),
        &mut rng,
    )
    .unwrap_err();
    let msg = err(e);
    assert!(
        msg.contains("250 tokens") && msg.contains("context of 256"),
        "{msg}"
    );

    let empty = RolloutPrompt {
        text: String::new(),
        ids: vec![],
        answer: None,
    };
    let e = rollout(
        &Cpu,
        &policy,
        None,
        None,
        &[empty],
        &mut reward,
        &tok,
        &config(4, 2, None),
        &mut rng,
    )
    .unwrap_err();
    assert!(err(e).contains("encodes to no tokens"));

    let e = rollout(
        &Cpu,
        &policy,
        None,
        None,
        &prompts(&tok),
        &mut reward,
        &tok,
        &config(4, 0, None),
        &mut rng,
    )
    .unwrap_err();
    assert!(err(e).contains("at least 1"));

    /// A reward source that miscounts.
    struct Short;
    impl RewardSource for Short {
        fn describe(&self) -> String {
            "short".into()
        }
        fn score(&mut self, inputs: &[RewardInput<'_>]) -> rlhf::Result<Vec<f32>> {
            Ok(vec![0.0; inputs.len() - 1])
        }
    }
    let e = rollout(
        &Cpu,
        &policy,
        None,
        None,
        &prompts(&tok),
        &mut Short,
        &tok,
        &config(4, 2, None),
        &mut rng,
    )
    .unwrap_err();
    assert!(err(e).contains("returned 5 scores for 6 completions"));
}
