//! A reward model checkpoint as a reward source: a transformer with a scalar head
//! (`score.weight`, HF's `*ForSequenceClassification` with one label), read at the last
//! non-pad token of prompt + completion, as transformers and TRL read it.

use super::rules::preview;
use super::{RewardInput, RewardSource};
use crate::backend::cpu::Cpu;
use crate::backend::ModelOps;
use crate::data;
use crate::model::config::Head;
use crate::model::tokenizer::Tokenizer;
use crate::model::{Batch, Config, Model, Pad};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Rows per forward pass: bounds the activations a large rollout batch would otherwise
/// allocate at once. Right-padded rows score the same in any batch, so the split is
/// invisible in the scores.
const MAX_ROWS: usize = 16;

/// Strings both tokenizers must encode identically: equal vocabularies with different merges
/// or normalisers would still tokenize differently. They mix words, digits, whitespace runs,
/// punctuation and non-ASCII text, where tokenizers tend to differ.
const PROBES: &[&str] = &[
    "The quick brown fox jumps over the lazy dog.",
    "  12345 + 678 = 13023\n\tdone?",
    "naïve café — 東京 🙂",
];

/// A reward model on the CPU backend, with its tokenizer.
pub struct RewardModel {
    model: Model<Cpu>,
    tok: Tokenizer,
    eos: u32,
    pad: u32,
    dir: PathBuf,
}

impl RewardModel {
    /// Loads a reward model directory (`config.json` with a scalar head, `model.safetensors`,
    /// `tokenizer.json`). Given `policy_tokenizer`, a reward model whose tokenizer differs
    /// from the policy's is an error: the two must agree on what a token id means.
    pub fn load(dir: &Path, policy_tokenizer: Option<&Tokenizer>) -> Result<RewardModel> {
        let cfg = Config::load(dir)?;
        if cfg.head != Head::Score {
            return Err(Error::Reward(format!(
                "{}: not a reward model: config.json describes a language model; a reward model \
                 has a scalar head `score.weight` (architecture *ForSequenceClassification with \
                 num_labels 1)",
                dir.display()
            )));
        }
        let tok = Tokenizer::load(dir)?;
        if tok.vocab_size() > cfg.vocab_size {
            return Err(Error::Reward(format!(
                "{}: the tokenizer has {} tokens but the model's embedding only {} rows",
                dir.display(),
                tok.vocab_size(),
                cfg.vocab_size
            )));
        }
        if let Some(policy) = policy_tokenizer {
            check_same_tokenizer(policy, &tok)?;
        }
        // The EOS ends every scored row, as it ended every training row.
        let (eos, pad) = data::special_ids(&tok, &cfg)
            .map_err(|e| Error::Reward(format!("{}: {e}", dir.display())))?;
        let model = Model::load(&Cpu, dir)?;
        Ok(RewardModel {
            model,
            tok,
            eos,
            pad,
            dir: dir.to_path_buf(),
        })
    }

    /// The loaded model.
    pub fn model(&self) -> &Model<Cpu> {
        &self.model
    }

    /// The reward model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// The EOS id appended to every completion.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The id padded rows are filled with.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }
}

impl RewardSource for RewardModel {
    fn describe(&self) -> String {
        format!("model={}", self.dir.display())
    }

    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<f32>> {
        let max = self.model.cfg.max_position;
        let rows = inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| {
                let ids = encode_pair(&self.tok, inp.prompt, inp.completion, self.eos)?;
                // Past its trained context a model's score means nothing (and learned
                // positions have no row for it): name the input rather than fail mid-batch.
                if ids.len() > max {
                    return Err(Error::Reward(format!(
                        "reward model {}: input {i} (prompt {:?}) is {} tokens, more than the \
                         model's {max} positions",
                        self.dir.display(),
                        preview(inp.prompt),
                        ids.len()
                    )));
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut scores = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(MAX_ROWS) {
            scores.extend(score_ids(&Cpu, &self.model, chunk, self.pad)?);
        }
        Ok(scores)
    }
}

/// The token row a reward model sees for one prompt and completion: the prompt encoded with
/// the tokenizer's special tokens (a BOS where it adds one), the completion without, then
/// `eos`, as `data::load_sft` tokenizes `{"prompt","completion"}` examples. Training and
/// scoring must share it, since the score is read at the row's last token.
pub fn encode_pair(tok: &Tokenizer, prompt: &str, completion: &str, eos: u32) -> Result<Vec<u32>> {
    let mut ids = tok.encode(prompt, true)?;
    ids.extend(tok.encode(completion, false)?);
    ids.push(eos);
    Ok(ids)
}

/// Flat indices (into the batch's `B·T` rows) of each row's last real token, whatever side
/// the padding is on. A row with no token at all is an error: it has nothing to score.
pub fn last_tokens(batch: &Batch) -> Result<Vec<usize>> {
    (0..batch.b)
        .map(|r| {
            let row = &batch.mask[r * batch.t..(r + 1) * batch.t];
            row.iter()
                .rposition(|&m| m)
                .map(|j| r * batch.t + j)
                .ok_or_else(|| Error::Invalid(format!("row {r} of the batch has no tokens")))
        })
        .collect()
}

/// Scores already-tokenized rows with a scalar-head model in one forward pass: the rows are
/// right-padded with `pad_id` and each row's value is read at its last token.
pub fn score_ids<B: ModelOps>(
    be: &B,
    model: &Model<B>,
    rows: &[Vec<u32>],
    pad_id: u32,
) -> Result<Vec<f32>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let batch = Batch::new(rows, pad_id, Pad::Right);
    let last = last_tokens(&batch)?;
    let acts = model.forward(be, &batch)?;
    let values = model.values(be, &acts.hidden, batch.n())?;
    let values = be.download(be.all(&values));
    Ok(last.into_iter().map(|i| values[i]).collect())
}

/// Checks that two tokenizers map the same strings to the same ids: same vocabulary (added
/// tokens included) and the same encodings of a few probe strings.
pub fn check_same_tokenizer(policy: &Tokenizer, reward: &Tokenizer) -> Result<()> {
    let differ = |msg: String| {
        Error::Reward(format!(
            "policy and reward model use different tokenizers: {msg}"
        ))
    };
    if policy.vocab_size() != reward.vocab_size() {
        return Err(differ(format!(
            "the policy's vocabulary has {} tokens, the reward model's {}",
            policy.vocab_size(),
            reward.vocab_size()
        )));
    }
    let (pv, rv) = (
        policy.inner().get_vocab(true),
        reward.inner().get_vocab(true),
    );
    // Report the lowest differing id, so the message does not depend on hash order.
    let first_diff = pv
        .iter()
        .filter(|(tok, id)| rv.get(*tok) != Some(*id))
        .min_by_key(|(_, id)| **id);
    if let Some((tok, id)) = first_diff {
        let theirs = rv
            .get(tok)
            .map_or("does not have it".to_string(), |r| format!("has id {r}"));
        return Err(differ(format!(
            "token {tok:?} has id {id} for the policy; the reward model {theirs}"
        )));
    }
    for probe in PROBES {
        let (p, r) = (policy.encode(probe, true)?, reward.encode(probe, true)?);
        if p != r {
            return Err(differ(format!(
                "{probe:?} encodes as {p:?} for the policy and {r:?} for the reward model"
            )));
        }
    }
    Ok(())
}
