//! The DPO trainer end to end on the CPU backend: it raises the held-out share of pairs the
//! policy ranks right, starts at the closed-form loss of policy == reference for every
//! variant, logs implicit rewards that agree with the saved weights, chains its gradient
//! correctly, resumes bit-exactly without the reference model, and refuses bad input clearly.

use rlhf::algo::dpo::{self, DpoArgs, DpoLossType, ReferenceLogps, REFERENCE_FILE};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::loss::{DpoCfg, DpoLoss};
use rlhf::backend::Backend;
use rlhf::builtin_task;
use rlhf::data::{load_preferences, preference_batch, PreferencePair, SftTokenizing};
use rlhf::model::tokenizer::Tokenizer;
use rlhf::model::weights::{copy_tokenizer_files, SaveDtype};
use rlhf::model::{random_params, Config, Layout, Model};
use rlhf::rng::Rng;
use rlhf::Error;
use std::path::{Path, PathBuf};

/// Pad id of the built-in character tokenizer.
const PAD: u32 = 1;

/// A random `family` language model over the built-in character tokenizer, saved as an HF
/// directory `dir/name` (weights N(0, std²)).
fn save_lm(dir: &Path, name: &str, family: &str, std: f32) -> PathBuf {
    let lm = dir.join(name);
    builtin_task::write_tokenizer(&lm).unwrap();
    let tok = Tokenizer::load(&lm).unwrap();
    let mut cfg = Config::builtin(family, tok.vocab_size()).unwrap();
    cfg.pad_token_id = tok.pad_id();
    let params = random_params(&Layout::new(&cfg), std, 1);
    Model::new(&Cpu, cfg, &params)
        .unwrap()
        .save(&Cpu, &lm, SaveDtype::F32)
        .unwrap();
    lm
}

/// `len` random letters from `alphabet`.
fn letters(rng: &mut Rng, len: usize, alphabet: &str) -> String {
    let a: Vec<char> = alphabet.chars().collect();
    (0..len).map(|_| a[rng.below(a.len())]).collect()
}

/// Preference pairs: a random prompt, a chosen completion of letters from the first half of
/// the alphabet and a rejected one of the same length from the second half. Equal lengths
/// keep the comparison of sequence log-probs about letters, not length. Each seed gives
/// different strings, so held-out pairs are (all but surely) unseen.
fn write_task(path: &Path, n: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let text: String = (0..n)
        .map(|_| {
            let p = 3 + rng.below(4);
            let c = 3 + rng.below(4);
            let prompt = letters(&mut rng, p, "abcdefghijklmnopqrstuvwxyz") + "=";
            let chosen = letters(&mut rng, c, "abcdefghijklm");
            let rejected = letters(&mut rng, c, "nopqrstuvwxyz");
            serde_json::json!({"prompt": prompt, "chosen": chosen, "rejected": rejected})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

fn pairs(path: &Path, tok_dir: &Path) -> Vec<PreferencePair> {
    let tok = Tokenizer::load(tok_dir).unwrap();
    let how = SftTokenizing {
        tok: &tok,
        eos: tok.eos_id().unwrap(),
        max_len: 256,
    };
    load_preferences(path, how).unwrap()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn num(row: &serde_json::Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in {row}"))
}

/// The share of pairs whose chosen completion the model finds likelier.
fn share_right(model: &Model<Cpu>, set: &[PreferencePair]) -> f64 {
    let l = dpo::sequence_logps(&Cpu, model, set, 16, PAD).unwrap();
    let right = l
        .chosen
        .iter()
        .zip(&l.rejected)
        .filter(|(c, r)| c > r)
        .count();
    right as f64 / set.len() as f64
}

/// A quiet run of the model in `lm` on `data`.
fn args(lm: &Path, data: &Path, out: &Path) -> DpoArgs {
    DpoArgs {
        model: Some(lm.to_str().unwrap().into()),
        data: Some(data.to_path_buf()),
        out: Some(out.to_path_buf()),
        lr: 1e-3,
        batch_size: 8,
        save_every: 0,
        quiet: true,
        ..DpoArgs::default()
    }
}

#[test]
fn raises_the_held_out_share_of_pairs_ranked_right() {
    let dir = tempfile::tempdir().unwrap();
    let lm = save_lm(dir.path(), "lm", "gpt2-tiny", 0.02);
    let (train, eval) = (
        dir.path().join("train.jsonl"),
        dir.path().join("eval.jsonl"),
    );
    write_task(&train, 256, 1);
    write_task(&eval, 64, 2);
    let out = dir.path().join("run");
    let a = DpoArgs {
        eval_data: Some(eval.clone()),
        max_steps: Some(30),
        eval_every: 10,
        ..args(&lm, &train, &out)
    };
    let s = dpo::train(&Cpu, &a).unwrap();
    assert_eq!(s.steps, 30);

    let held_out = pairs(&eval, &lm);
    let start = Model::<Cpu>::load(&Cpu, &lm).unwrap();
    let end = Model::<Cpu>::load(&Cpu, &out).unwrap();
    let (before, after) = (share_right(&start, &held_out), share_right(&end, &held_out));
    // A near-uniform random model ranks about half the pairs right; 64 pairs, so chance
    // alone stays below 0.75 (4 standard deviations) and the trained share must clear it by
    // 0.25 as well as reach 0.9.
    assert!(before < 0.75, "starting share {before}");
    assert!(
        after >= 0.9 && after >= before + 0.25,
        "held-out share {before} -> {after}"
    );

    let m = metrics(&out);
    // Step 1 sees policy == reference: every log-ratio is 0 and the loss is log 2. The two
    // sides come from separate forward passes over differently composed batches; on the CPU
    // backend a row's numbers do not depend on its batch-mates, so the ratios are 0 to the
    // bit, and 1e-6 only leaves room for a sum rounded differently (~1e-5 absolute, times
    // β·σ'(0) = 0.025).
    let first = num(&m[0], "loss");
    assert!((first - 2f64.ln()).abs() < 1e-6, "first loss {first}");
    assert!(num(&m[0], "rewards/chosen").abs() < 1e-6, "{}", m[0]);
    for row in &m {
        let (c, r, g) = (
            num(row, "rewards/chosen"),
            num(row, "rewards/rejected"),
            num(row, "rewards/margins"),
        );
        assert!((c - r - g).abs() < 1e-9 * (1.0 + g.abs()), "{row}");
        assert!(
            (0.0..=1.0).contains(&num(row, "rewards/accuracies")),
            "{row}"
        );
    }

    // The last held-out metrics are those of the saved weights against the starting ones:
    // rewards are β·(π - ref) of the sequence log-probs, logps are the policy's.
    let last = m.last().unwrap();
    let pol = dpo::sequence_logps(&Cpu, &end, &held_out, 8, PAD).unwrap();
    let refs = dpo::sequence_logps(&Cpu, &start, &held_out, 8, PAD).unwrap();
    let n = held_out.len() as f64;
    let mean = |x: &[f32]| x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let rw = |p: &[f32], r: &[f32]| -> Vec<f32> {
        p.iter().zip(r).map(|(p, r)| 0.1 * (p - r)).collect()
    };
    let (rc, rr) = (
        rw(&pol.chosen, &refs.chosen),
        rw(&pol.rejected, &refs.rejected),
    );
    let acc = rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64 / n;
    // The same f32 numbers through f32 (here) and f64 (the loss op) subtractions.
    let close = |a: f64, b: f64| (a - b).abs() < 1e-5 * (1.0 + b.abs());
    for (key, want) in [
        ("eval_logps/chosen", mean(&pol.chosen)),
        ("eval_logps/rejected", mean(&pol.rejected)),
        ("eval_rewards/chosen", mean(&rc)),
        ("eval_rewards/rejected", mean(&rr)),
        ("eval_rewards/accuracies", acc),
    ] {
        assert!(
            close(num(last, key), want),
            "{key}: {} vs {want}",
            last[key]
        );
    }
    // The saved reference log-probs are the starting model's, bit for bit.
    let saved = ReferenceLogps::load(&out.join(REFERENCE_FILE)).unwrap();
    assert_eq!(saved.eval.unwrap(), refs);
    assert_eq!(
        saved.train,
        dpo::sequence_logps(&Cpu, &start, &pairs(&train, &lm), 8, PAD).unwrap()
    );
}

#[test]
fn every_loss_variant_starts_at_its_closed_form_value() {
    let dir = tempfile::tempdir().unwrap();
    let lm = save_lm(dir.path(), "lm", "llama-tiny", 0.02);
    let data = dir.path().join("train.jsonl");
    write_task(&data, 16, 3);
    // β as the loss op sees it (an f32), so IPO's 1/(2β) matches to the last bit.
    let (beta, eps) = (0.1f32 as f64, 0.2f64);
    // At policy == reference every log-ratio is 0: sigmoid with label smoothing gives
    // (1-ε)·log 2 + ε·log 2 = log 2, robust ((1-ε) - ε)·log 2 / (1-2ε) = log 2, hinge
    // relu(1 - 0) = 1, IPO (0 - 1/(2β))² = 25.
    for (loss_type, want) in [
        (DpoLossType::Sigmoid, 2f64.ln()),
        (DpoLossType::Robust, 2f64.ln()),
        (DpoLossType::Hinge, 1.0),
        (DpoLossType::Ipo, (1.0 / (2.0 * beta)).powi(2)),
    ] {
        let out = dir.path().join(format!("{loss_type:?}"));
        let a = DpoArgs {
            loss_type,
            label_smoothing: eps as f32,
            beta: beta as f32,
            max_steps: Some(3),
            ..args(&lm, &data, &out)
        };
        dpo::train(&Cpu, &a).unwrap();
        let m = metrics(&out);
        let first = num(&m[0], "loss");
        // Exact on the CPU backend (see above); 1e-6 relative leaves room for rounding.
        assert!(
            (first - want).abs() < 1e-6 * want,
            "{loss_type:?}: {first} vs {want}"
        );
        assert!(
            m.iter().all(|r| num(r, "loss").is_finite()),
            "{loss_type:?}"
        );
    }
}

#[test]
fn sequence_logps_sum_the_completion_tokens_only() {
    let dir = tempfile::tempdir().unwrap();
    let lm = save_lm(dir.path(), "lm", "gpt2-tiny", 0.3);
    let data = dir.path().join("d.jsonl");
    write_task(&data, 6, 4);
    let set = pairs(&data, &lm);
    let model = Model::<Cpu>::load(&Cpu, &lm).unwrap();
    let got = dpo::sequence_logps(&Cpu, &model, &set, 4, PAD).unwrap();
    // The plain next-token path, one row at a time: entry j of a row predicts token j + 1, so
    // the completion starts at entry prompt_len - 1.
    for (i, p) in set.iter().enumerate() {
        for (ids, want) in [(&p.chosen, got.chosen[i]), (&p.rejected, got.rejected[i])] {
            let b =
                rlhf::model::Batch::new(std::slice::from_ref(ids), PAD, rlhf::model::Pad::Right);
            let lp = model.next_token_logprobs(&Cpu, &b).unwrap().remove(0);
            let sum: f64 = lp[p.prompt_len - 1..].iter().map(|&x| x as f64).sum();
            let all: f64 = lp.iter().map(|&x| x as f64).sum();
            // f32 sums of under 20 terms of size ~3.
            assert!(
                (sum - want as f64).abs() < 1e-4,
                "pair {i}: {sum} vs {want}"
            );
            assert!(
                (all - want as f64).abs() > 0.1,
                "pair {i}: the prompt is not counted"
            );
        }
    }
}

#[test]
fn gradient_matches_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let lm = save_lm(dir.path(), "lm", "llama-tiny", 0.3);
    let data = dir.path().join("d.jsonl");
    write_task(&data, 4, 5);
    let set = pairs(&data, &lm);
    let model = Model::<Cpu>::load(&Cpu, &lm).unwrap();
    let idx = [0, 1, 2, 3];
    let (batch, mask) = preference_batch(&set, &idx, PAD);
    // Reference log-probs off the policy's, so the loss is away from its flat middle.
    let start = dpo::sequence_logps(&Cpu, &model, &set, 4, PAD).unwrap();
    let rc: Vec<f32> = start.chosen.iter().map(|x| x + 3.0).collect();
    let rr: Vec<f32> = start.rejected.iter().map(|x| x - 1.0).collect();
    for loss in [DpoLoss::Sigmoid, DpoLoss::Ipo] {
        let cfg = DpoCfg {
            beta: 0.5,
            label_smoothing: 0.0,
            loss,
        };
        let loss_at = |theta: &[f32]| -> f64 {
            let m = Model::new(&Cpu, model.cfg.clone(), theta).unwrap();
            dpo::dpo_stats(&Cpu, &m, &batch, &mask, &rc, &rr, &cfg, None)
                .unwrap()
                .mean_loss()
        };
        let mut grads = Cpu.zeros(model.layout.total);
        dpo::dpo_stats(
            &Cpu,
            &model,
            &batch,
            &mask,
            &rc,
            &rr,
            &cfg,
            Some(&mut grads),
        )
        .unwrap();
        let theta = Cpu.download(Cpu.all(&model.params));
        let mut rng = Rng::new(7);
        for _ in 0..2 {
            // A random unit direction; Richardson-extrapolated central differences (error
            // O(h⁴)). h = 0.02 moves the loss by ~1e-3, far above the ~1e-7 rounding of the
            // f32 forward, so 2% covers rounding and truncation together.
            let mut u: Vec<f32> = (0..theta.len()).map(|_| rng.normal() as f32).collect();
            let norm = u.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt() as f32;
            u.iter_mut().for_each(|x| *x /= norm);
            let along = |h: f32| {
                let at =
                    |s: f32| -> Vec<f32> { theta.iter().zip(&u).map(|(t, d)| t + s * d).collect() };
                (loss_at(&at(h)) - loss_at(&at(-h))) / (2.0 * h as f64)
            };
            let fd = (4.0 * along(0.02) - along(0.04)) / 3.0;
            let analytic: f64 = grads.iter().zip(&u).map(|(a, b)| (a * b) as f64).sum();
            assert!(
                (analytic - fd).abs() < 0.02 * fd.abs().max(1e-2),
                "{loss:?}: analytic {analytic} vs numeric {fd}"
            );
        }
    }
}

#[test]
fn resume_after_interruption_is_bitwise_identical_without_the_reference_model() {
    let dir = tempfile::tempdir().unwrap();
    let lm = save_lm(dir.path(), "lm", "llama-tiny", 0.02);
    let data = dir.path().join("train.jsonl");
    let eval = dir.path().join("eval.jsonl");
    // 5 batches of 4 per epoch; 6 steps of 2 micro-batches cross two epoch boundaries.
    write_task(&data, 20, 6);
    write_task(&eval, 8, 7);
    let base = |out: &str, reference: &Path| DpoArgs {
        ref_model: Some(reference.to_path_buf()),
        eval_data: Some(eval.clone()),
        max_steps: Some(6),
        batch_size: 4,
        grad_accum: 2,
        save_every: 2,
        eval_every: 2,
        warmup_steps: 2,
        weight_decay: 0.1,
        ..args(&lm, &data, &dir.path().join(out))
    };
    // The reference differs from the policy's start, so a resumed run that mistook the
    // policy for the reference would drift.
    let reference = save_lm(dir.path(), "ref", "llama-tiny", 0.05);
    dpo::train(&Cpu, &base("full", &reference)).unwrap();
    let cut_ref = dir.path().join("cut-ref");
    copy_dir(&reference, &cut_ref);
    // Killed inside step 4 (micro-batches 7 and 8), after the checkpoint of step 2.
    let s = dpo::train(
        &Cpu,
        &DpoArgs {
            stop_after_micro_steps: Some(7),
            ..base("cut", &cut_ref)
        },
    )
    .unwrap();
    assert!(s.interrupted && s.steps == 3, "{s:?}");
    // The resumed run reads the saved reference log-probs: the reference model is gone.
    std::fs::remove_dir_all(&cut_ref).unwrap();
    let s = dpo::train(
        &Cpu,
        &DpoArgs {
            resume: true,
            ..base("cut", &cut_ref)
        },
    )
    .unwrap();
    assert!(!s.interrupted && s.steps == 6, "{s:?}");
    let bits = |d: &str| -> Vec<u32> {
        let m = Model::<Cpu>::load(&Cpu, &dir.path().join(d)).unwrap();
        Cpu.download(Cpu.all(&m.params))
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    assert!(bits("full") == bits("cut"), "weights differ after resume");
    // The metrics read as one run, the same to the bit (tokens/s aside).
    let strip = |d: &str| -> Vec<serde_json::Value> {
        metrics(&dir.path().join(d))
            .into_iter()
            .map(|mut v| {
                v.as_object_mut().unwrap().remove("tokens_per_s");
                v
            })
            .collect()
    };
    assert_eq!(strip("full"), strip("cut"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn bad_input_gets_a_clear_error_before_the_run_starts() {
    let dir = tempfile::tempdir().unwrap();
    let lm = save_lm(dir.path(), "lm", "gpt2-tiny", 0.02);
    let data = dir.path().join("prefs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"ab=\", \"chosen\": \"abc\", \"rejected\": \"xyz\"}\n\
         {\"prompt\": \"cd=\", \"chosen\": \"abc\"}\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let e = dpo::train(&Cpu, &args(&lm, &data, &out)).unwrap_err();
    assert!(matches!(e, Error::Data { line: 2, .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!("{}:2: missing \"rejected\"", data.display())
    );
    assert!(!out.exists());

    // A reference whose tokenizer is not the policy's: same vocabulary size, other tokens.
    let good = dir.path().join("good.jsonl");
    write_task(&good, 4, 8);
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/models/gpt2");
    let other = dir.path().join("other");
    let cfg = Config::load(&fixture).unwrap();
    let params = random_params(&Layout::new(&cfg), 0.02, 2);
    Model::new(&Cpu, cfg, &params)
        .unwrap()
        .save(&Cpu, &other, SaveDtype::F32)
        .unwrap();
    copy_tokenizer_files(&lm, &other).unwrap();
    let e = dpo::train(
        &Cpu,
        &DpoArgs {
            ref_model: Some(other.clone()),
            ..args(&fixture, &good, &out)
        },
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("tokenizer differs from the policy's"),
        "{e}"
    );
    assert!(!out.exists());
    // A reference with another vocabulary size.
    let e = dpo::train(
        &Cpu,
        &DpoArgs {
            ref_model: Some(fixture.clone()),
            ..args(&lm, &good, &out)
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("a vocabulary of 512 tokens"), "{e}");
    assert!(!out.exists());
}
