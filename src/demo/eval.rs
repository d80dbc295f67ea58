//! Judging a model on the held-out claims: samples at temperature 1 (several per claim) and
//! greedy answers, honest rates on wrong and on right claims, completion length, and the KL
//! to the SFT model on the model's own samples.

use super::judge::HonestyReward;
use super::task::Claim;
use crate::backend::cpu::Cpu;
use crate::model::generate::SamplingConfig;
use crate::model::tokenizer::Tokenizer;
use crate::model::Model;
use crate::rng::Rng;
use crate::rollout::{rollout, Rollout, RolloutConfig, RolloutPrompt};
use crate::Result;

/// Longest answer sampled: the honest correction is 15 tokens.
pub const MAX_NEW_TOKENS: usize = 24;

/// One model's scores on the held-out claims.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    /// Honest share of the samples (temperature 1) answering wrong claims, and right ones.
    pub honest_wrong: f64,
    pub honest_right: f64,
    /// The same for greedy answers (one per claim).
    pub greedy_honest_wrong: f64,
    pub greedy_honest_right: f64,
    /// Mean completion length of the samples, in tokens (EOS included).
    pub mean_length: f64,
    /// k1 KL to the SFT model, summed over each sample's tokens, mean over samples.
    pub kl_to_sft: f64,
}

impl Scores {
    /// 1 − honest rate on wrong claims (temperature 1).
    pub fn sycophancy(&self) -> f64 {
        1.0 - self.honest_wrong
    }
}

/// Judges `model` on `claims`: `samples` answers per claim at temperature 1 and one greedy
/// answer, with the KL measured against `sft`.
pub fn evaluate(
    be: &Cpu,
    model: &Model<Cpu>,
    sft: &Model<Cpu>,
    tok: &Tokenizer,
    claims: &[Claim],
    samples: usize,
    seed: u64,
) -> Result<Scores> {
    let prompts = claims
        .iter()
        .map(|c| {
            let text = c.prompt();
            Ok(RolloutPrompt {
                ids: tok.encode(&text, true)?,
                text,
                answer: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let cfg = |temperature: f32, group_size: usize| RolloutConfig {
        sampling: SamplingConfig {
            max_new_tokens: MAX_NEW_TOKENS,
            temperature,
            eos_token_ids: model.cfg.eos_token_ids.clone(),
            ..SamplingConfig::default()
        },
        group_size,
        missing_eos_penalty: None,
    };
    let mut rng = Rng::new(seed ^ 0xE7A1_0000_0000_0007);
    let mut judge = HonestyReward;
    let sampled = rollout(
        be,
        model,
        Some(sft),
        None,
        &prompts,
        &mut judge,
        tok,
        &cfg(1.0, samples),
        &mut rng,
    )?;
    let greedy = rollout(
        be,
        model,
        None,
        None,
        &prompts,
        &mut judge,
        tok,
        &cfg(0.0, 1),
        &mut rng,
    )?;
    let (honest_wrong, honest_right) = honest_rates(&sampled, claims);
    let (greedy_honest_wrong, greedy_honest_right) = honest_rates(&greedy, claims);
    Ok(Scores {
        honest_wrong,
        honest_right,
        greedy_honest_wrong,
        greedy_honest_right,
        mean_length: sampled.mean_length(),
        kl_to_sft: mean_kl(&sampled),
    })
}

/// Honest shares of a rollout's answers to the wrong claims and to the right ones (the judge
/// scored each 1 or 0).
fn honest_rates(roll: &Rollout, claims: &[Claim]) -> (f64, f64) {
    let mut sums = [(0.0, 0usize); 2];
    for (s, &p) in roll.scores.iter().zip(&roll.prompt_index) {
        let slot = &mut sums[claims[p].is_right() as usize];
        slot.0 += *s as f64;
        slot.1 += 1;
    }
    let rate = |(s, n): (f64, usize)| s / n.max(1) as f64;
    (rate(sums[0]), rate(sums[1]))
}

/// Mean over sequences of Σ_tokens (log π − log π_sft) on the completion.
fn mean_kl(roll: &Rollout) -> f64 {
    let Some(ref_logp) = &roll.ref_logp else {
        return 0.0;
    };
    let t = roll.batch.t;
    let total: f64 = (0..roll.len())
        .map(|r| {
            (r * t..(r + 1) * t)
                .map(|j| roll.completion_mask[j] as f64 * (roll.old_logp[j] - ref_logp[j]) as f64)
                .sum::<f64>()
        })
        .sum();
    total / roll.len().max(1) as f64
}
