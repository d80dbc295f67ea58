//! The reward-model trainer end to end on the CPU backend: it learns a separable preference
//! task to a held-out accuracy, saves an HF sequence-classification directory, and names the
//! file and line of a malformed preference.

use rlhf::algo::reward::{self, score_model_from_lm, RmArgs};
use rlhf::backend::cpu::Cpu;
use rlhf::backend::loss::BtCfg;
use rlhf::backend::Backend;
use rlhf::builtin_task;
use rlhf::data::{load_preferences, SftTokenizing};
use rlhf::model::config::Head;
use rlhf::model::tokenizer::Tokenizer;
use rlhf::model::weights::{copy_tokenizer_files, SaveDtype};
use rlhf::model::{random_params, Config, Layout, Model};
use rlhf::rng::Rng;
use rlhf::Error;
use std::path::{Path, PathBuf};

/// A scratch directory holding a random `family` language model with the built-in character
/// tokenizer, as an HF directory in `lm/`.
fn scratch(family: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let lm = dir.path().join("lm");
    builtin_task::write_tokenizer(&lm).unwrap();
    let tok = Tokenizer::load(&lm).unwrap();
    let mut cfg = Config::builtin(family, tok.vocab_size()).unwrap();
    cfg.pad_token_id = tok.pad_id();
    let params = random_params(&Layout::new(&cfg), 0.02, 1);
    Model::new(&Cpu, cfg, &params)
        .unwrap()
        .save(&Cpu, &lm, SaveDtype::F32)
        .unwrap();
    (dir, lm)
}

/// `n` random strings of 3 to 6 letters drawn from `alphabet`.
fn strings(rng: &mut Rng, n: usize, alphabet: &str) -> Vec<String> {
    let letters: Vec<char> = alphabet.chars().collect();
    (0..n)
        .map(|_| {
            let len = 3 + rng.below(4);
            (0..len)
                .map(|_| letters[rng.below(letters.len())])
                .collect()
        })
        .collect()
}

/// Preference pairs of the separable task: a random prompt, and two completions of random
/// letters of the same length, of which the chosen one has the marker letter `z` somewhere
/// and the rejected one has none. Only the marker tells them apart, wherever it sits, so the
/// score at the last token must gather it over the completion. Each seed gives different
/// strings, so held-out pairs are (all but surely) unseen.
fn write_task(path: &Path, n: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let prompts = strings(&mut rng, n, "abcdefghijklmnopqrstuvwxyz");
    let text: String = prompts
        .iter()
        .map(|p| {
            let rejected = strings(&mut rng, 1, "abcdefghijklmnopqrstuvwxy").remove(0);
            let mut chosen: Vec<char> = (0..rejected.len())
                .map(|_| (b'a' + rng.below(25) as u8) as char)
                .collect();
            chosen[rng.below(rejected.len())] = 'z';
            let chosen: String = chosen.into_iter().collect();
            serde_json::json!({"prompt": format!("{p}="), "chosen": chosen, "rejected": rejected})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn reaches_held_out_preference_accuracy_on_a_separable_task() {
    let (dir, lm) = scratch("gpt2-tiny");
    let (train, eval) = (
        dir.path().join("train.jsonl"),
        dir.path().join("eval.jsonl"),
    );
    write_task(&train, 256, 1);
    write_task(&eval, 64, 2);
    let out = dir.path().join("run");
    let args = RmArgs {
        model: Some(lm.to_str().unwrap().into()),
        data: Some(train),
        eval_data: Some(eval.clone()),
        out: Some(out.clone()),
        max_steps: Some(40),
        batch_size: 8,
        lr: 1e-3,
        eval_every: 10,
        save_every: 0,
        quiet: true,
        ..RmArgs::default()
    };
    let s = reward::train(&Cpu, &args).unwrap();
    let m = metrics(&out);
    let acc = s.last_eval_accuracy.unwrap();
    // The task is separable by the marker; 64 held-out pairs, so 0.95 allows three mistakes.
    assert!(acc >= 0.95, "held-out accuracy {acc}");
    // The logged reward metrics agree with one another.
    for row in &m {
        let (c, r, g) = (
            row["rewards/chosen"].as_f64().unwrap(),
            row["rewards/rejected"].as_f64().unwrap(),
            row["rewards/margins"].as_f64().unwrap(),
        );
        assert!((c - r - g).abs() < 1e-9 * (1.0 + g.abs()), "{row}");
    }

    // The run directory is an HF sequence-classification directory; the saved model scores
    // the held-out set exactly as the last evaluation did.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "GPT2ForSequenceClassification");
    assert_eq!(config["num_labels"], 1);
    let tok = Tokenizer::load(&out).unwrap();
    assert_eq!(config["pad_token_id"], tok.pad_id().unwrap());
    let model = Model::load(&Cpu, &out).unwrap();
    assert_eq!(model.cfg.head, Head::Score);
    let pairs = load_preferences(
        &eval,
        SftTokenizing {
            tok: &tok,
            eos: tok.eos_id().unwrap(),
            max_len: 256,
        },
    )
    .unwrap();
    let bt = BtCfg { center_coef: 0.0 };
    let e = reward::evaluate(&Cpu, &model, &pairs, 8, tok.pad_id().unwrap(), &bt).unwrap();
    assert_eq!(e.accuracy(), acc);
    assert!((e.loss() - s.last_eval_loss.unwrap()).abs() < 1e-9);
    // The threshold means something: the initial reward model (the same head draw) ranks
    // the held-out pairs at about chance.
    let initial = score_model_from_lm(&Cpu, &Model::load(&Cpu, &lm).unwrap(), args.seed).unwrap();
    let before = reward::evaluate(&Cpu, &initial, &pairs, 8, tok.pad_id().unwrap(), &bt)
        .unwrap()
        .accuracy();
    assert!(before < 0.8, "initial held-out accuracy {before}");
}

#[test]
fn score_model_from_lm_copies_the_backbone_and_draws_the_head() {
    for family in ["gpt2-tiny", "llama-tiny"] {
        let (_dir, lm_dir) = scratch(family);
        let lm = Model::<Cpu>::load(&Cpu, &lm_dir).unwrap();
        let rm = score_model_from_lm(&Cpu, &lm, 3).unwrap();
        assert_eq!(rm.cfg.head, Head::Score);
        let (src, dst) = (
            Cpu.download(Cpu.all(&lm.params)),
            Cpu.download(Cpu.all(&rm.params)),
        );
        for p in &rm.layout.params {
            match lm.layout.get(&p.name) {
                Some(q) => assert_eq!(
                    src[q.range.clone()],
                    dst[p.range.clone()],
                    "{family} {}",
                    p.name
                ),
                None => {
                    assert_eq!(p.name, "score");
                    // N(0, 1/(C+1)): the sample std of C = 64 draws is near 1/sqrt(65) ≈ 0.124.
                    let w = &dst[p.range.clone()];
                    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
                    assert!((0.08..0.17).contains(&std), "{family}: score std {std}");
                }
            }
        }
        // Only the LM head (untied in llama) is left behind.
        let dropped: Vec<&str> = lm
            .layout
            .params
            .iter()
            .filter(|q| rm.layout.get(&q.name).is_none())
            .map(|q| q.name.as_str())
            .collect();
        let want: &[&str] = if family == "llama-tiny" {
            &["lm_head"]
        } else {
            &[]
        };
        assert_eq!(dropped, want);
        assert!(score_model_from_lm(&Cpu, &rm, 3).is_err());
    }
}

#[test]
fn a_pair_missing_rejected_names_the_file_and_line() {
    let (dir, lm) = scratch("gpt2-tiny");
    let data = dir.path().join("prefs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"ab=\", \"chosen\": \"abc\", \"rejected\": \"xyz\"}\n\
         {\"prompt\": \"cd=\", \"chosen\": \"abc\"}\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let e = reward::train(
        &Cpu,
        &RmArgs {
            model: Some(lm.to_str().unwrap().into()),
            data: Some(data.clone()),
            out: Some(out.clone()),
            quiet: true,
            ..RmArgs::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::Data { line: 2, .. }), "{e}");
    let msg = e.to_string();
    assert_eq!(msg, format!("{}:2: missing \"rejected\"", data.display()));
    // Bad input is refused before the run directory is touched.
    assert!(!out.exists());
}

/// A short run interrupted mid-way and resumed ends with the weights of an uninterrupted one.
#[test]
fn resume_after_interruption_is_bitwise_identical() {
    let (dir, lm) = scratch("llama-tiny");
    let data = dir.path().join("train.jsonl");
    write_task(&data, 20, 3);
    let base = |out: &str| RmArgs {
        model: Some(lm.to_str().unwrap().into()),
        data: Some(data.clone()),
        out: Some(dir.path().join(out)),
        max_steps: Some(6),
        batch_size: 4,
        grad_accum: 2,
        lr: 1e-3,
        save_every: 2,
        center_rewards_coef: 0.01,
        quiet: true,
        ..RmArgs::default()
    };
    reward::train(&Cpu, &base("full")).unwrap();
    // Killed inside step 4, after the checkpoint of step 2.
    let s = reward::train(
        &Cpu,
        &RmArgs {
            stop_after_micro_steps: Some(7),
            ..base("cut")
        },
    )
    .unwrap();
    assert!(s.interrupted && s.steps == 3, "{s:?}");
    let s = reward::train(
        &Cpu,
        &RmArgs {
            resume: true,
            ..base("cut")
        },
    )
    .unwrap();
    assert_eq!(s.steps, 6);
    let bits = |d: &str| -> Vec<u32> {
        let m = Model::<Cpu>::load(&Cpu, &dir.path().join(d)).unwrap();
        Cpu.download(Cpu.all(&m.params))
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    assert!(bits("full") == bits("cut"), "weights differ after resume");
    let losses = |d: &str| -> Vec<f64> {
        metrics(&dir.path().join(d))
            .iter()
            .map(|v| v["loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses("full"), losses("cut"));
}

/// A reward model's directory is accepted as --model and trained further as it is, with no
/// new head drawn.
#[test]
fn a_reward_model_directory_trains_further() {
    let (dir, lm) = scratch("gpt2-tiny");
    let lm_model = Model::<Cpu>::load(&Cpu, &lm).unwrap();
    let rm_dir = dir.path().join("rm");
    let rm = score_model_from_lm(&Cpu, &lm_model, 9).unwrap();
    rm.save(&Cpu, &rm_dir, SaveDtype::F32).unwrap();
    copy_tokenizer_files(&lm, &rm_dir).unwrap();
    let data = dir.path().join("train.jsonl");
    write_task(&data, 8, 4);
    let out = dir.path().join("run");
    reward::train(
        &Cpu,
        &RmArgs {
            model: Some(rm_dir.to_str().unwrap().into()),
            data: Some(data),
            out: Some(out.clone()),
            max_steps: Some(1),
            lr: 0.0,
            quiet: true,
            ..RmArgs::default()
        },
    )
    .unwrap();
    // At learning rate 0 the saved model is the given one, score head included.
    let after = Model::<Cpu>::load(&Cpu, &out).unwrap();
    assert_eq!(
        Cpu.download(Cpu.all(&after.params)),
        Cpu.download(Cpu.all(&rm.params))
    );
}

#[test]
fn conversational_pairs_render_with_the_chat_template() {
    let (dir, lm) = scratch("gpt2-tiny");
    // A template in the character vocabulary: role initial, content, '=' after each message.
    std::fs::write(
        lm.join("chat_template.jinja"),
        "{% for m in messages %}{{ m.role[0] }}{{ m.content }}={% endfor %}\
         {% if add_generation_prompt %}a{% endif %}",
    )
    .unwrap();
    let tok = Tokenizer::load(&lm).unwrap();
    let how = SftTokenizing {
        tok: &tok,
        eos: tok.eos_id().unwrap(),
        max_len: 256,
    };
    let load = |line: serde_json::Value| {
        let path = dir.path().join("conv.jsonl");
        std::fs::write(&path, line.to_string() + "\n").unwrap();
        load_preferences(&path, how)
    };
    let user = serde_json::json!({"role": "user", "content": "abc"});
    let said = |c: &str| serde_json::json!({"role": "assistant", "content": c});
    let explicit = load(serde_json::json!({
        "prompt": [user], "chosen": [said("xy")], "rejected": [said("zz")], "margin": 0.5
    }))
    .unwrap();
    let implicit = load(serde_json::json!({
        "chosen": [user, said("xy")], "rejected": [user, said("zz")]
    }))
    .unwrap();
    let enc = |s: &str| tok.encode(s, false).unwrap();
    // The prompt ends with the generation prompt; the completion is the rest of the full
    // rendering, with no EOS appended (the template ends the turn).
    let p = &explicit[0];
    assert_eq!(p.prompt_len, enc("uabc=a").len());
    assert_eq!(p.chosen, enc("uabc=axy="));
    assert_eq!(p.rejected, enc("uabc=azz="));
    assert_eq!(p.margin, Some(0.5));
    assert_eq!(
        (
            &implicit[0].chosen,
            &implicit[0].rejected,
            implicit[0].prompt_len
        ),
        (&p.chosen, &p.rejected, p.prompt_len)
    );
    // Conversations that differ before their last message share no prompt.
    let other = serde_json::json!({"role": "user", "content": "abd"});
    let e =
        load(serde_json::json!({"chosen": [user, said("xy")], "rejected": [other, said("zz")]}))
            .unwrap_err();
    assert!(e.to_string().contains("render different prompts"), "{e}");
    let e = load(
        serde_json::json!({"prompt": "abc", "chosen": [said("xy")], "rejected": [said("zz")]}),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("\"prompt\" must be a list of messages"),
        "{e}"
    );
}
