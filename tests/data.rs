//! JSONL datasets: tokenisation and loss weights of SFT examples, chat templates, the generic
//! readers, batching and its resumable shuffle, and the errors bad files get.

use rlhf::builtin_task;
use rlhf::data::{
    load_sft, read_jsonl, read_preferences, read_prompts, sft_batch, Batches, ChatTemplate,
    SftTokenizing,
};
use rlhf::model::tokenizer::Tokenizer;
use rlhf::Error;
use std::path::{Path, PathBuf};

/// The built-in character tokenizer (one token per character, EOS = 0, PAD = 1).
fn char_tokenizer(dir: &Path) -> Tokenizer {
    builtin_task::write_tokenizer(dir).unwrap();
    Tokenizer::load(dir).unwrap()
}

/// The GPT-2 fixture's byte-level BPE tokenizer in a scratch copy, optionally with a chat
/// template added to its `tokenizer_config.json`.
fn bpe_tokenizer(dir: &Path, template: Option<&str>) -> Tokenizer {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/models/gpt2");
    std::fs::copy(fixture.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    if let Some(t) = template {
        cfg["chat_template"] = t.into();
    }
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    Tokenizer::load(dir).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn how(tok: &Tokenizer, max_len: usize) -> SftTokenizing<'_> {
    SftTokenizing {
        tok,
        eos: tok.eos_id().unwrap(),
        max_len,
    }
}

/// The error of loading `text` as SFT data, as a string.
fn sft_error(tok: &Tokenizer, dir: &Path, text: &str, max_len: usize) -> String {
    let p = write(dir, "train.jsonl", text);
    load_sft(&p, how(tok, max_len)).unwrap_err().to_string()
}

#[test]
fn prompt_completion_tokens_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let tok = char_tokenizer(dir.path());
    let p = write(
        dir.path(),
        "d.jsonl",
        "{\"prompt\": \"abc=\", \"completion\": \"cba\"}\n\n",
    );
    let ex = load_sft(&p, how(&tok, 64)).unwrap();
    assert_eq!(ex.len(), 1, "the blank line is skipped");
    let id = |s: &str| tok.encode(s, false).unwrap();
    let mut want = id("abc=");
    want.extend(id("cba"));
    want.push(0);
    assert_eq!(ex[0].ids, want, "prompt, completion, EOS");
    assert_eq!(ex[0].prompt_len, 4);
    // weights[j] weighs predicting ids[j+1]: c, b, a and EOS are predicted from positions 3..=6.
    assert_eq!(ex[0].weights, [0., 0., 0., 1., 1., 1., 1., 0.]);
    assert_eq!(ex[0].line, 1);
}

#[test]
fn per_token_weights() {
    let dir = tempfile::tempdir().unwrap();
    let tok = char_tokenizer(dir.path());
    let p = write(
        dir.path(),
        "d.jsonl",
        concat!(
            "{\"prompt\": \"ab=\", \"completion\": \"ba\", \"weights\": [0.5, -1]}\n",
            "{\"prompt\": \"ab=\", \"completion\": \"ba\", \"weights\": [0.5, -1, 2]}\n",
        ),
    );
    let ex = load_sft(&p, how(&tok, 64)).unwrap();
    // One weight per completion token: EOS takes the last one's; one more: EOS's own.
    assert_eq!(ex[0].weights, [0., 0., 0.5, -1., -1., 0.]);
    assert_eq!(ex[1].weights, [0., 0., 0.5, -1., 2., 0.]);

    let e = sft_error(
        &tok,
        dir.path(),
        "{\"prompt\": \"ab=\", \"completion\": \"ba\", \"weights\": [1]}",
        64,
    );
    assert!(e.ends_with("train.jsonl:1: \"weights\" has 1 values; the completion has 2 tokens (3 with the EOS appended)"), "{e}");
    let e = sft_error(
        &tok,
        dir.path(),
        "{\"prompt\": \"a=\", \"completion\": \"a\", \"weights\": [0, 0]}",
        64,
    );
    assert!(e.contains(":1: \"weights\" are all zero"), "{e}");
    let e = sft_error(
        &tok,
        dir.path(),
        "{\"prompt\": \"a=\", \"completion\": \"a\", \"weights\": [1, \"x\"]}",
        64,
    );
    assert!(e.contains("\"weights\"[1] must be a finite number"), "{e}");
}

#[test]
fn bad_files_get_errors_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let tok = char_tokenizer(dir.path());
    let ok = "{\"prompt\": \"ab=\", \"completion\": \"ba\"}\n";

    let e = sft_error(
        &tok,
        dir.path(),
        &format!("{ok}{ok}{{\"prompt\": \"ab=\", \"completion\": \n{ok}"),
        64,
    );
    assert!(e.contains("train.jsonl:3: invalid JSON"), "{e}");

    let e = sft_error(
        &tok,
        dir.path(),
        &format!("{ok}{{\"prompt\": \"ab=\"}}\n"),
        64,
    );
    assert!(e.ends_with("train.jsonl:2: missing \"completion\""), "{e}");
    let e = sft_error(&tok, dir.path(), "{\"completion\": \"ab\"}\n", 64);
    assert!(e.ends_with("train.jsonl:1: missing \"prompt\""), "{e}");
    let e = sft_error(
        &tok,
        dir.path(),
        "{\"prompt\": \"ab=\", \"completion\": 3}\n",
        64,
    );
    assert!(
        e.ends_with(":1: \"completion\" must be a string, found a number"),
        "{e}"
    );
    let e = sft_error(&tok, dir.path(), "[1, 2]\n", 64);
    assert!(
        e.ends_with(":1: expected a JSON object, found an array"),
        "{e}"
    );

    for empty in ["", "\n  \n"] {
        let p = write(dir.path(), "empty.jsonl", empty);
        let e = load_sft(&p, how(&tok, 64)).unwrap_err();
        assert!(matches!(e, Error::EmptyData { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("empty.jsonl: the file holds no examples"),
            "{e}"
        );
    }

    let e = load_sft(&dir.path().join("missing.jsonl"), how(&tok, 64)).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("missing.jsonl"),
        "{e}"
    );
}

#[test]
fn sequences_longer_than_the_context_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok = char_tokenizer(dir.path());
    // 4 prompt + 3 completion + EOS = 8 tokens.
    let line = "{\"prompt\": \"abc=\", \"completion\": \"cba\"}\n";
    assert_eq!(
        load_sft(&write(dir.path(), "d.jsonl", line), how(&tok, 8)).unwrap()[0]
            .ids
            .len(),
        8
    );
    let e = sft_error(&tok, dir.path(), &format!("{line}{line}"), 7);
    assert!(
        e.ends_with("train.jsonl:1: prompt + completion is 8 tokens, longer than the maximum of 7 (the model's context, or --max-len)"),
        "{e}"
    );
    let e = sft_error(
        &tok,
        dir.path(),
        &format!(
            "{{\"prompt\": \"{}=\", \"completion\": \"a\"}}",
            "a".repeat(20)
        ),
        7,
    );
    assert!(
        e.contains(":1: the prompt alone is 21 tokens, longer than the maximum of 7"),
        "{e}"
    );
}

/// A ChatML-like template using what HF templates use: `bos_token`, `raise_exception`, a
/// Python string method, and `add_generation_prompt`.
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}\
{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}\
<|im_start|>{{ m['role'] }}\n{{ m['content'].strip() }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[test]
fn conversations_render_with_the_chat_template_and_train_on_the_last_reply() {
    let dir = tempfile::tempdir().unwrap();
    let tok = bpe_tokenizer(dir.path(), Some(TEMPLATE));
    let t = ChatTemplate::from_tokenizer(&tok).unwrap();
    let msgs = serde_json::json!([
        {"role": "user", "content": " hi "},
        {"role": "assistant", "content": "hello"},
    ]);
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "<|endoftext|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    );

    let line = serde_json::json!({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "hello there"},
    ]});
    let p = write(dir.path(), "chat.jsonl", &format!("{line}\n"));
    let ex = load_sft(&p, how(&tok, 512)).unwrap().remove(0);
    let prompt = "<|endoftext|><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
                  <|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n";
    let completion = "hello there<|im_end|>\n";
    let p_ids = tok.encode(prompt, false).unwrap();
    assert_eq!(ex.prompt_len, p_ids.len());
    assert_eq!(&ex.ids[..ex.prompt_len], p_ids.as_slice());
    assert_eq!(
        tok.decode(&ex.ids[ex.prompt_len..], false).unwrap(),
        completion,
        "no EOS appended: the template ends the turn"
    );
    // Loss on the last assistant message only: the earlier reply "yo" is prompt.
    let trained = ex.weights.iter().filter(|&&w| w == 1.0).count();
    assert_eq!(trained, ex.ids.len() - ex.prompt_len);
    assert!(ex.weights[..ex.prompt_len - 1].iter().all(|&w| w == 0.0));

    let bad = |line: serde_json::Value| {
        let p = write(
            dir.path(),
            "bad.jsonl",
            &format!("{{\"prompt\":\"a\",\"completion\":\"b\"}}\n{line}\n"),
        );
        load_sft(&p, how(&tok, 128)).unwrap_err().to_string()
    };
    let e = bad(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}));
    assert!(
        e.contains("bad.jsonl:2: the last message must be the assistant's"),
        "{e}"
    );
    let e = bad(
        serde_json::json!({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
    );
    assert!(
        e.contains("bad.jsonl:2:") && e.contains("unknown role robot"),
        "{e}"
    );
    let e = bad(serde_json::json!({"messages": []}));
    assert!(
        e.contains("bad.jsonl:2: \"messages\" must be a non-empty array"),
        "{e}"
    );
}

#[test]
fn conversations_without_a_chat_template_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let tok = bpe_tokenizer(dir.path(), None);
    let line = serde_json::json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]});
    let p = write(dir.path(), "chat.jsonl", &format!("{line}\n"));
    let e = load_sft(&p, how(&tok, 128)).unwrap_err().to_string();
    assert!(
        e.contains("chat.jsonl:1:") && e.contains("no chat template"),
        "{e}"
    );
}

#[test]
fn prompt_and_preference_readers() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "p.jsonl",
        "{\"prompt\": \"2+2=\", \"answer\": \"4\"}\n{\"prompt\": \"hi\"}\n",
    );
    let ps = read_prompts(&p).unwrap();
    assert_eq!(
        (ps[0].prompt.as_str(), ps[0].answer.as_deref()),
        ("2+2=", Some("4"))
    );
    assert_eq!((ps[1].line, ps[1].answer.as_deref()), (2, None));
    let p = write(dir.path(), "p.jsonl", "{\"answer\": \"4\"}\n");
    assert!(read_prompts(&p)
        .unwrap_err()
        .to_string()
        .ends_with("p.jsonl:1: missing \"prompt\""));

    let p = write(
        dir.path(),
        "pref.jsonl",
        "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n",
    );
    let pr = read_preferences(&p).unwrap();
    assert_eq!((pr[0].chosen.as_str(), pr[0].rejected.as_str()), ("a", "b"));
    let p = write(
        dir.path(),
        "pref.jsonl",
        "{\"prompt\": \"q\", \"chosen\": \"a\"}\n",
    );
    assert!(read_preferences(&p)
        .unwrap_err()
        .to_string()
        .ends_with("pref.jsonl:1: missing \"rejected\""));
    assert_eq!(
        read_jsonl(&write(dir.path(), "r.jsonl", "\n{\"x\": 1}\n")).unwrap()[0].line,
        2
    );
}

#[test]
fn batches_are_right_padded_with_zero_weights_on_padding() {
    let dir = tempfile::tempdir().unwrap();
    let tok = char_tokenizer(dir.path());
    let p = write(
        dir.path(),
        "d.jsonl",
        "{\"prompt\": \"a=\", \"completion\": \"a\"}\n{\"prompt\": \"abc=\", \"completion\": \"cba\"}\n",
    );
    let ex = load_sft(&p, how(&tok, 64)).unwrap();
    let (batch, w) = sft_batch(&ex, &[0, 1], 1);
    assert_eq!((batch.b, batch.t), (2, 8));
    assert_eq!(
        &batch.ids[..8],
        &[ex[0].ids.clone(), vec![1; 4]].concat()[..]
    );
    assert_eq!(
        &batch.mask[..8],
        &[true, true, true, true, false, false, false, false]
    );
    assert_eq!(&w[..8], &[0., 1., 1., 0., 0., 0., 0., 0.]);
    assert_eq!(&w[8..], ex[1].weights.as_slice());
}

#[test]
fn shuffling_is_deterministic_and_resumes_from_a_position() {
    let take = |b: &mut Batches, n: usize| (0..n).map(|_| b.next_batch()).collect::<Vec<_>>();
    let mut a = Batches::new(10, 3, 9).unwrap();
    assert_eq!(a.per_epoch(), 4);
    let stream = take(&mut a, 12);
    // Each epoch covers every example once, in batches of 3, 3, 3 and 1.
    for epoch in stream.chunks(4) {
        let mut all: Vec<usize> = epoch.concat();
        assert_eq!(epoch.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 3, 1]);
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }
    assert_ne!(stream[..4], stream[4..8], "each epoch is shuffled afresh");
    assert_eq!(
        stream,
        take(&mut Batches::new(10, 3, 9).unwrap(), 12),
        "same seed, same order"
    );
    assert_ne!(stream, take(&mut Batches::new(10, 3, 10).unwrap(), 12));

    // Restoring a saved position, mid-epoch or at an epoch's end, continues the same stream.
    for cut in [2, 4, 5, 8] {
        let mut b = Batches::new(10, 3, 9).unwrap();
        take(&mut b, cut);
        let pos = b.position();
        let json = serde_json::to_string(&pos).unwrap();
        let mut r = Batches::at(10, 3, serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(take(&mut r, 12 - cut), stream[cut..], "cut at {cut}");
    }
    let past = rlhf::data::DataPosition {
        index: 5,
        ..Batches::new(10, 3, 9).unwrap().position()
    };
    assert!(Batches::at(10, 3, past)
        .unwrap_err()
        .to_string()
        .contains("did the data change"));
}
