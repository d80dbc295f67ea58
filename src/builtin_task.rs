//! The built-in task `rlhf sft` trains when given no data: reverse a short string of letters.
//!
//! Everything is made in code from the seed: a character-level tokenizer (saved as
//! `tokenizer.json`, so the trained run directory is a complete HF model directory), and
//! disjoint training and held-out sets written as ordinary SFT JSONL under `RUN/data/`, which
//! then go through the same path as user data. A 2-layer, d=64 model learns the task in a
//! minute or two on 2 CPU cores; reversal needs attention to the mirrored position, so a
//! model that has not learned shows it plainly.

use crate::algo::sft::SftArgs;
use crate::backend::DecodeOps;
use crate::checkpoint::check_new_run_dir;
use crate::data::read_jsonl;
use crate::model::config::BUILTIN;
use crate::model::generate::{generate, SamplingConfig};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::write_atomic;
use crate::model::Model;
use crate::rng::Rng;
use crate::{Error, Result};
use serde_json::json;
use std::collections::HashSet;
use std::path::Path;

/// What the task is, for the user.
pub const DESCRIPTION: &str = "reverse a string of 3 to 10 letters \
     (prompt \"abcd=\", completion \"dcba\"); the loss is on the completion only";
/// The alphabet of the strings.
const LETTERS: &str = "abcdefghijklmnopqrstuvwxyz";
/// Marks the end of the prompt.
const SEP: char = '=';
/// String lengths, inclusive.
const LENGTHS: (usize, usize) = (3, 10);
/// Examples in the training and held-out sets.
pub const TRAIN_EXAMPLES: usize = 20000;
pub const EVAL_EXAMPLES: usize = 64;
/// The model trained when `--model` is not given.
pub const DEFAULT_MODEL: &str = "gpt2-tiny";
/// Peak learning rate, micro-batch size and step count when not given: enough for the
/// default model to reverse nearly every held-out string.
pub const DEFAULT_LR: f32 = 3e-3;
pub const DEFAULT_BATCH_SIZE: usize = 32;
pub const DEFAULT_STEPS: usize = 1500;

/// Special tokens, at the ids the built-in configurations expect.
pub(crate) const EOS: &str = "<|endoftext|>";
pub(crate) const PAD: &str = "<|pad|>";
/// Stands for any character outside the alphabet, so that encoding arbitrary text works.
pub(crate) const UNK: &str = "<|unk|>";

/// The tokenizer's `tokenizer.json` and `tokenizer_config.json`: one token per character
/// (a WordLevel model over single characters), `<|endoftext|>` = 0 (EOS), `<|pad|>` = 1,
/// `<|unk|>` = 2 for characters outside the task's alphabet.
pub fn tokenizer_files() -> (String, String) {
    let specials = [EOS, PAD, UNK];
    let mut vocab = serde_json::Map::new();
    for (i, t) in specials
        .iter()
        .map(|s| s.to_string())
        .chain(LETTERS.chars().chain([SEP]).map(String::from))
        .enumerate()
    {
        vocab.insert(t, json!(i));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(id, s)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK},
    });
    let s = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("JSON values serialise");
    (s(&tokenizer), s(&tokenizer_config(256)))
}

/// `tokenizer_config.json` of a built-in tokenizer with [`EOS`], [`PAD`] and [`UNK`]: the demo's
/// tokenizer uses the same special tokens.
pub(crate) fn tokenizer_config(model_max_length: usize) -> serde_json::Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        // GPT-2's convention: BOS is EOS, and the tokenizer does not prepend it.
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "model_max_length": model_max_length,
    })
}

/// Writes the tokenizer files into `dir`.
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (tokenizer, config) = tokenizer_files();
    write_atomic(&dir.join("tokenizer.json"), tokenizer.as_bytes())?;
    write_atomic(&dir.join("tokenizer_config.json"), config.as_bytes())
}

/// A `(prompt, completion)` pair of the task.
pub type Pair = (String, String);

/// `(prompt, completion)` pairs of the task: a training set and a disjoint held-out set,
/// drawn from the seed.
pub fn pairs(seed: u64) -> (Vec<Pair>, Vec<Pair>) {
    let mut rng = Rng::new(seed ^ 0x7A5C_0000_0000_0001);
    let letters: Vec<char> = LETTERS.chars().collect();
    let mut draw = || -> String {
        let len = LENGTHS.0 + rng.below(LENGTHS.1 - LENGTHS.0 + 1);
        (0..len)
            .map(|_| letters[rng.below(letters.len())])
            .collect()
    };
    let eval: Vec<String> = (0..EVAL_EXAMPLES).map(|_| draw()).collect();
    let held_out: HashSet<&String> = eval.iter().collect();
    let mut train = Vec::with_capacity(TRAIN_EXAMPLES);
    while train.len() < TRAIN_EXAMPLES {
        let s = draw();
        if !held_out.contains(&s) {
            train.push(s);
        }
    }
    let pair = |s: &String| (format!("{s}{SEP}"), s.chars().rev().collect());
    (
        train.iter().map(pair).collect(),
        eval.iter().map(pair).collect(),
    )
}

/// Writes `train.jsonl` and `eval.jsonl` (`{"prompt","completion"}`) into `dir`.
pub fn write_data(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (train, eval) = pairs(seed);
    for (name, set) in [("train.jsonl", train), ("eval.jsonl", eval)] {
        let text: String = set
            .iter()
            .map(|(p, c)| json!({"prompt": p, "completion": c}).to_string() + "\n")
            .collect();
        write_atomic(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}

/// Fills in a run of the built-in task: writes the tokenizer (into the run directory) and the
/// data (into `RUN/data/`) for a fresh run, and returns the arguments with the model,
/// tokenizer, data and the task's default learning rate and step count set. `args.out` must
/// be set.
pub fn prepare(args: &SftArgs) -> Result<SftArgs> {
    let out = args
        .out
        .clone()
        .ok_or_else(|| Error::Invalid("the built-in task needs --out".into()))?;
    let model = args.model.clone().unwrap_or_else(|| DEFAULT_MODEL.into());
    if !BUILTIN.contains(&model.as_str()) {
        return Err(Error::Invalid(format!(
            "without --data, --model must be a built-in configuration ({}): the built-in task \
             brings its own tokenizer",
            BUILTIN.join(", ")
        )));
    }
    if args.tokenizer.is_some() {
        return Err(Error::Invalid(
            "without --data, the built-in task brings its own tokenizer: drop --tokenizer".into(),
        ));
    }
    let data = out.join("data");
    if !args.resume {
        check_new_run_dir(&out)?;
        write_tokenizer(&out)?;
        write_data(&data, args.seed)?;
    }
    Ok(SftArgs {
        model: Some(model),
        tokenizer: Some(out.clone()),
        data: Some(data.join("train.jsonl")),
        eval_data: Some(
            args.eval_data
                .clone()
                .unwrap_or_else(|| data.join("eval.jsonl")),
        ),
        lr: Some(args.lr.unwrap_or(DEFAULT_LR)),
        batch_size: Some(args.batch_size.unwrap_or(DEFAULT_BATCH_SIZE)),
        max_steps: Some(args.max_steps.unwrap_or(DEFAULT_STEPS)),
        ..args.clone()
    })
}

/// The held-out `(prompt, completion)` pairs of a prepared run, read back from its eval file.
pub fn eval_pairs(args: &SftArgs) -> Result<Vec<Pair>> {
    let path = args
        .eval_data
        .as_ref()
        .ok_or_else(|| Error::Invalid("no eval data".into()))?;
    read_jsonl(path)?
        .iter()
        .map(|r| {
            let get = |k: &str| {
                r.fields
                    .get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            Ok((get("prompt"), get("completion")))
        })
        .collect()
}

/// Prints a few held-out samples and the exact-match rate over all of them.
pub fn show_samples<B: DecodeOps>(
    be: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    eval: &[Pair],
) -> Result<()> {
    let prompts = eval
        .iter()
        .map(|(p, _)| tok.encode(p, true))
        .collect::<Result<Vec<_>>>()?;
    let cfg = SamplingConfig {
        max_new_tokens: LENGTHS.1 + 2,
        temperature: 0.0,
        eos_token_ids: model.cfg.eos_token_ids.clone(),
        ..Default::default()
    };
    let completions = generate(be, model, &prompts, &cfg, None, &mut Rng::new(0))?;
    let mut right = 0;
    for (i, ((p, want), c)) in eval.iter().zip(&completions).enumerate() {
        let got = tok.decode(&c.tokens, true)?;
        right += (&got == want) as usize;
        if i < 4 {
            println!(
                "  {:<14} -> {:<14} (want {want:?})",
                format!("{p:?}"),
                format!("{got:?}")
            );
        }
    }
    println!(
        "  exact match on {} held-out prompts: {:.1}%",
        eval.len(),
        100.0 * right as f64 / eval.len().max(1) as f64
    );
    Ok(())
}
