//! Reward sources: rule rewards on examples, the external command's protocol and failure
//! modes, and a tiny reward model scored through the source and through a direct forward.

use rlhf::backend::cpu::Cpu;
use rlhf::model::config::Head;
use rlhf::model::tokenizer::Tokenizer;
use rlhf::model::weights::{copy_tokenizer_files, SaveDtype};
use rlhf::model::{random_params, Batch, Config, Layout, Model, Pad};
use rlhf::reward::{
    encode_pair, from_specs, score_ids, CommandReward, RewardInput, RewardModel, RewardSource,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const GPT2: &str = "/work/shared/fixtures/models/gpt2";

fn input<'a>(completion: &'a str, answer: Option<&'a str>) -> RewardInput<'a> {
    RewardInput {
        prompt: "Q: what is it?",
        completion,
        answer,
    }
}

fn source(specs: &[&str]) -> Box<dyn RewardSource> {
    let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
    from_specs(&specs, None).unwrap()
}

fn spec_error(specs: &[&str]) -> String {
    let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
    match from_specs(&specs, None) {
        Ok(s) => panic!("expected an error, got a source: {}", s.describe()),
        Err(e) => e.to_string(),
    }
}

fn scores(src: &mut dyn RewardSource, inputs: &[RewardInput<'_>]) -> Vec<f32> {
    src.score(inputs).unwrap()
}

#[test]
fn exact_match_last_number() {
    let mut src = source(&["exact_match"]);
    assert_eq!(src.describe(), "exact_match");
    let cases = [
        ("The answer is 42.", "42", 1.0),
        ("so we get 42, final", "42", 1.0),
        ("x = -3", "-3", 1.0),
        ("x = -3", "3", 0.0),
        ("first 41, then 42", "42", 1.0),
        // The last number counts, not any number.
        ("42 or maybe 41", "42", 0.0),
        ("it is 42.0", "42", 1.0),
        ("it is 2.5 units", "2.50", 1.0),
        ("no number here", "42", 0.0),
        ("7", " 7 \n", 1.0),
        // A non-numeric answer is compared as a string with what was extracted.
        ("answer: 12", "twelve", 0.0),
    ];
    let inputs: Vec<_> = cases.iter().map(|(c, a, _)| input(c, Some(a))).collect();
    let want: Vec<f32> = cases.iter().map(|c| c.2).collect();
    assert_eq!(scores(src.as_mut(), &inputs), want);
}

#[test]
fn exact_match_custom_regex() {
    let mut src = source(&["exact_match=<answer>(.*?)</answer>"]);
    assert_eq!(src.describe(), "exact_match=<answer>(.*?)</answer>");
    let inputs = [
        input("<answer>Paris</answer>", Some("Paris")),
        input("<answer> Paris </answer>", Some("Paris")),
        input(
            "<answer>Lyon</answer> then <answer>Paris</answer>",
            Some("Paris"),
        ),
        input("Paris", Some("Paris")),
        input("<answer>0.50</answer>", Some(".5")),
    ];
    assert_eq!(scores(src.as_mut(), &inputs), vec![1.0, 1.0, 1.0, 0.0, 1.0]);

    // Without a capture group the whole match is compared.
    let mut src = source(&["exact_match=[A-Z][a-z]+"]);
    let inputs = [
        input("the city is Paris", Some("Paris")),
        input("Paris, said Bob", Some("Paris")),
    ];
    assert_eq!(scores(src.as_mut(), &inputs), vec![1.0, 0.0]);

    let err = spec_error(&["exact_match=(a)(b)"]);
    assert!(err.contains("2 capture groups"), "{err}");
    let err = spec_error(&["exact_match=(unclosed"]);
    assert!(err.contains("invalid regex"), "{err}");
}

#[test]
fn exact_match_without_answer_is_an_error() {
    let mut src = source(&["exact_match"]);
    let inputs = [
        input("42", Some("42")),
        RewardInput {
            prompt: "What is six times seven?",
            completion: "42",
            answer: None,
        },
    ];
    let err = src.score(&inputs).unwrap_err().to_string();
    assert!(err.contains("input 1"), "{err}");
    assert!(err.contains("What is six times seven?"), "{err}");
    assert!(err.contains("answer"), "{err}");
}

#[test]
fn format_check() {
    let mut src = source(&[r"format=^(Yes|No)\b"]);
    let inputs = [
        input("Yes, because", None),
        input("No", None),
        input("Nope", None),
        input("Well, yes", None),
    ];
    assert_eq!(scores(src.as_mut(), &inputs), vec![1.0, 1.0, 0.0, 0.0]);
    // A `*` inside the regex is part of it, not a weight.
    let mut src = source(&["format=^a*b$"]);
    assert_eq!(src.describe(), "format=^a*b$");
    assert_eq!(
        scores(src.as_mut(), &[input("aaab", None), input("aac", None)]),
        vec![1.0, 0.0]
    );
}

#[test]
fn length_penalty() {
    let mut src = source(&["length=10"]);
    let (thirty, accented) = ("x".repeat(30), "é".repeat(12));
    let inputs = [
        input("", None),
        input("0123456789", None),
        input("0123456789abcde", None),
        input(&thirty, None),
        // Characters, not bytes: 12 two-byte characters are 12 characters.
        input(&accented, None),
    ];
    assert_eq!(
        scores(src.as_mut(), &inputs),
        vec![0.0, 0.0, -0.5, -2.0, -0.2]
    );
    for bad in ["length=0", "length=abc", "length=-3", "length"] {
        let err = spec_error(&[bad]);
        assert!(err.contains(bad), "{err}");
    }
}

#[test]
fn weighted_sum() {
    let mut src = source(&["exact_match", "0.5*format=^Answer:", "2*length=10"]);
    let desc = src.describe();
    assert_eq!(desc, "1*exact_match + 0.5*format=^Answer: + 2*length=10");
    let inputs = [
        input("Answer: 42", Some("42")),
        input("Answer: 41", Some("42")),
        input("42", Some("42")),
        // 20 characters: length penalty -1, weighted -2.
        input("Answer: it is 42....", Some("42")),
    ];
    assert_eq!(scores(src.as_mut(), &inputs), vec![1.5, 0.5, 1.0, -0.5]);
    // A single weighted spec is still scaled.
    let mut src = source(&["2*exact_match"]);
    assert_eq!(scores(src.as_mut(), &[input("42", Some("42"))]), vec![2.0]);
    assert_eq!(src.describe(), "2*exact_match");
}

#[test]
fn bad_specs_are_clear_errors() {
    let err = spec_error(&[]);
    assert!(err.contains("no reward source"), "{err}");
    let err = spec_error(&["bleu"]);
    assert!(err.contains("unknown kind `bleu`"), "{err}");
    let err = spec_error(&["format"]);
    assert!(err.contains("format=REGEX"), "{err}");
    let err = spec_error(&["1e999*exact_match"]);
    assert!(err.contains("not a finite number"), "{err}");
    let err = spec_error(&["command=  "]);
    assert!(err.contains("empty"), "{err}");
    let err = spec_error(&["model=/nonexistent/reward-model"]);
    assert!(err.contains("/nonexistent/reward-model"), "{err}");
}

fn command(cmd: &str) -> CommandReward {
    CommandReward::new(cmd, Duration::from_secs(30))
}

#[test]
fn command_scores_jsonl() {
    // Scores each line by its completion's length, plus 100 when an answer is present, so the
    // test sees both the fields and the order.
    let script = r#"python3 -c '
import json, sys
for line in sys.stdin:
    o = json.loads(line)
    assert o["prompt"].startswith("Q:")
    print(len(o["completion"]) + (100 if "answer" in o else 0))
'"#;
    let mut src = command(script);
    let inputs = [
        input("ab", None),
        input("abcd", Some("x")),
        input("", None),
        input("\"quoted\"\nnewline", Some("y")),
    ];
    assert_eq!(scores(&mut src, &inputs), vec![2.0, 104.0, 0.0, 116.0]);
    assert!(src.describe().contains("python3"));
    assert_eq!(scores(&mut src, &[]), Vec::<f32>::new());
}

#[test]
fn command_large_batch_does_not_deadlock() {
    // Megabytes of input and an answer per line written while input is still arriving:
    // both pipes fill unless stdin is written from its own thread.
    let long = "y".repeat(2000);
    let inputs: Vec<_> = (0..3000).map(|_| input(&long, None)).collect();
    let mut src = command("awk '{ print NR }'");
    let got = scores(&mut src, &inputs);
    let want: Vec<f32> = (1..=3000).map(|i| i as f32).collect();
    assert_eq!(got, want);
}

#[test]
fn command_crash_names_status_and_stderr() {
    let mut src = command("cat > /dev/null; echo 'Traceback: boom' >&2; exit 3");
    let err = src.score(&[input("a", None)]).unwrap_err().to_string();
    assert!(err.contains("exit status: 3"), "{err}");
    assert!(err.contains("Traceback: boom"), "{err}");
    // A command that dies without reading its input is reported by its exit status, not
    // by the broken pipe.
    let mut src = command("exit 7");
    let err = src.score(&[input("a", None)]).unwrap_err().to_string();
    assert!(err.contains("exit status: 7"), "{err}");
    assert!(err.contains("stderr was empty"), "{err}");
}

#[test]
fn command_wrong_line_count() {
    let mut src = command("cat > /dev/null; echo 1");
    let err = src
        .score(&[input("a", None), input("b", None)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected 2 scores, got 1"), "{err}");
    let mut src = command("cat > /dev/null; printf '1\\n2\\n3\\n'");
    let err = src
        .score(&[input("a", None), input("b", None)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected 2 scores, got 3"), "{err}");
}

#[test]
fn command_non_numeric_line() {
    let mut src = command("cat > /dev/null; echo 0.5; echo 'score: 1'");
    let err = src
        .score(&[input("a", None), input("b", None)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("score: 1"), "{err}");
    let mut src = command("cat > /dev/null; echo nan");
    let err = src.score(&[input("a", None)]).unwrap_err().to_string();
    assert!(err.contains("not a finite number"), "{err}");
}

#[test]
fn command_timeout_kills_it() {
    // `sleep` runs as a child of `sh` (more commands follow it), so only killing the whole
    // process group ends it before 5 s.
    let mut src = CommandReward::new("sleep 5; echo 1", Duration::from_secs(1));
    let start = Instant::now();
    let err = src.score(&[input("a", None)]).unwrap_err().to_string();
    let took = start.elapsed();
    assert!(err.contains("timed out after 1s"), "{err}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn command_timeout_from_env() {
    // The only test that touches this variable, so parallel tests do not race on it.
    let env = rlhf::reward::COMMAND_TIMEOUT_ENV;
    std::env::remove_var(env);
    assert_eq!(
        source(&["command=cat"]).describe(),
        "command=cat (timeout 60s)"
    );
    std::env::set_var(env, "0.5");
    let mut src = source(&["command=sleep 3"]);
    assert_eq!(src.describe(), "command=sleep 3 (timeout 0.5s)");
    let err = src.score(&[input("a", None)]).unwrap_err().to_string();
    assert!(err.contains("timed out after 0.5s"), "{err}");
    std::env::set_var(env, "soon");
    let err = spec_error(&["command=cat"]);
    assert!(err.contains("soon"), "{err}");
    std::env::remove_var(env);
}

/// A tiny GPT-2 reward model with random weights and the fixture's tokenizer.
fn tiny_reward_model(dir: &Path) {
    let mut cfg = Config::builtin("gpt2-tiny", 512).unwrap();
    cfg.head = Head::Score;
    let params = random_params(&Layout::new(&cfg), 0.2, 7);
    let model = Model::new(&Cpu, cfg, &params).unwrap();
    model.save(&Cpu, dir, SaveDtype::F32).unwrap();
    copy_tokenizer_files(Path::new(GPT2), dir).unwrap();
}

#[test]
fn reward_model_scores_at_the_last_token() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_reward_model(tmp.path());
    let mut rm = RewardModel::load(tmp.path(), None).unwrap();
    assert_eq!(rm.describe(), format!("model={}", tmp.path().display()));
    let texts = [
        ("What is 2 + 3?", "5"),
        (
            "Name a colour.",
            "Blue, like the sky on a clear summer day.",
        ),
        ("Hi", ""),
    ];
    let inputs: Vec<_> = texts
        .iter()
        .map(|(p, c)| RewardInput {
            prompt: p,
            completion: c,
            answer: None,
        })
        .collect();
    let batched = rm.score(&inputs).unwrap();

    let tok = Tokenizer::load(tmp.path()).unwrap();
    let eos = tok.eos_id().unwrap();
    for (i, (p, c)) in texts.iter().enumerate() {
        // A direct forward of the same tokens: prompt with special tokens, completion
        // without, then EOS.
        let mut ids = tok.encode(p, true).unwrap();
        ids.extend(tok.encode(c, false).unwrap());
        ids.push(eos);
        assert_eq!(ids, encode_pair(&tok, p, c, eos).unwrap());
        let batch = Batch::new(std::slice::from_ref(&ids), rm.pad_id(), Pad::Right);
        let acts = rm.model().forward(&Cpu, &batch).unwrap();
        let values = rm.model().values(&Cpu, &acts.hidden, batch.n()).unwrap();
        let direct = values[ids.len() - 1];

        let alone = rm.score(&inputs[i..i + 1]).unwrap()[0];
        assert_eq!(
            alone, direct,
            "input {i}: the source and a direct forward differ"
        );
        assert_eq!(
            score_ids(&Cpu, rm.model(), &[ids], rm.pad_id()).unwrap()[0],
            direct
        );
        // Right padding leaves a row's score as it is alone, up to the rounding of
        // differently shaped matrix products (values are O(1); f32 epsilon is 1.2e-7).
        assert!(
            (batched[i] - alone).abs() <= 1e-5,
            "input {i}: batched {} vs alone {alone}",
            batched[i]
        );
    }
    // The texts differ, so a model that ignored them (or read a pad position) would tie.
    assert!(batched[0] != batched[1] && batched[1] != batched[2]);
}

#[test]
fn language_model_is_not_a_reward_model() {
    let err = match from_specs(&[format!("model={GPT2}")], None) {
        Ok(_) => panic!("an LM loaded as a reward model"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("not a reward model"), "{err}");
    assert!(err.contains("score.weight"), "{err}");
}

/// A directory holding only a tokenizer.json: the fixture's, edited by `edit`.
fn edited_tokenizer(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let text = std::fs::read_to_string(Path::new(GPT2).join("tokenizer.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut v);
    std::fs::write(dir.join("tokenizer.json"), v.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn mismatched_tokenizers_are_an_error() {
    let rm_dir = tempfile::tempdir().unwrap();
    tiny_reward_model(rm_dir.path());
    let spec = [format!("model={}", rm_dir.path().display())];

    // The same tokenizer passes.
    let same = Tokenizer::load(Path::new(GPT2)).unwrap();
    assert!(from_specs(&spec, Some(&same)).is_ok());

    // One more token.
    let bigger_dir = tempfile::tempdir().unwrap();
    edited_tokenizer(bigger_dir.path(), |v| {
        v["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": 512, "content": "<|extra|>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
    });
    let bigger = Tokenizer::load(bigger_dir.path()).unwrap();
    let err = from_specs(&spec, Some(&bigger)).err().unwrap().to_string();
    assert!(err.contains("different tokenizers"), "{err}");
    assert!(err.contains("513") && err.contains("512"), "{err}");

    // Same size, two ids swapped: only comparing the vocabularies catches it.
    let swapped_dir = tempfile::tempdir().unwrap();
    edited_tokenizer(swapped_dir.path(), |v| {
        let vocab = v["model"]["vocab"].as_object_mut().unwrap();
        let name = |id: u64| {
            vocab
                .iter()
                .find(|(_, i)| i.as_u64() == Some(id))
                .map(|(k, _)| k.clone())
                .unwrap()
        };
        let (a, b) = (name(300), name(301));
        vocab.insert(a, 301.into());
        vocab.insert(b, 300.into());
    });
    let swapped = Tokenizer::load(swapped_dir.path()).unwrap();
    let err = from_specs(&spec, Some(&swapped)).err().unwrap().to_string();
    assert!(err.contains("different tokenizers"), "{err}");
    assert!(err.contains("id 300"), "{err}");
}
