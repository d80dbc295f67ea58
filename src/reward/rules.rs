//! Rule rewards: exact match against the reference answer, a regex format check, a length
//! penalty, and a weighted sum of any sources.

use super::{RewardInput, RewardSource};
use crate::{Error, Result};
use regex::Regex;

/// The default extraction: a decimal number, optionally negative. The fraction needs digits
/// after the point, so a sentence-ending "42." extracts "42".
const LAST_NUMBER: &str = r"-?\d+(?:\.\d+)?";

/// 1.0 when the value extracted from the completion equals the input's `answer`, else 0.0.
///
/// The value is taken from the regex's last match (a final answer usually comes last): its
/// capture group when the regex has one, else the whole match. Both sides are compared as
/// numbers when both parse as finite numbers, else as whitespace-trimmed strings.
#[derive(Clone, Debug)]
pub struct ExactMatch {
    regex: Regex,
    /// The user's pattern, `None` for the default last-number extraction.
    pattern: Option<String>,
}

impl ExactMatch {
    /// Compares the last number in the completion with the answer.
    pub fn last_number() -> ExactMatch {
        ExactMatch {
            regex: Regex::new(LAST_NUMBER).expect("the built-in pattern is valid"),
            pattern: None,
        }
    }

    /// Compares what `pattern` extracts (its capture group, or the whole match when it has
    /// none) from its last match in the completion. More than one capture group is an error:
    /// which one holds the answer would be a guess.
    pub fn with_regex(pattern: &str) -> std::result::Result<ExactMatch, String> {
        if pattern.is_empty() {
            return Err("the extraction regex is empty".into());
        }
        let regex = compile(pattern)?;
        let groups = regex.captures_len() - 1;
        if groups > 1 {
            return Err(format!(
                "the extraction regex has {groups} capture groups; use one (and `(?:...)` for \
                 the others)"
            ));
        }
        Ok(ExactMatch {
            regex,
            pattern: Some(pattern.to_string()),
        })
    }

    /// The value extracted from `completion`, if the regex matches at all.
    pub fn extract<'t>(&self, completion: &'t str) -> Option<&'t str> {
        let caps = self.regex.captures_iter(completion).last()?;
        // Group 1 when the pattern has one (it may not participate: then nothing was found).
        if self.regex.captures_len() > 1 {
            caps.get(1).map(|m| m.as_str())
        } else {
            caps.get(0).map(|m| m.as_str())
        }
    }
}

/// Equal as finite numbers when both parse as numbers, else as trimmed strings.
fn same_answer(found: &str, answer: &str) -> bool {
    let (found, answer) = (found.trim(), answer.trim());
    let num = |s: &str| s.parse::<f64>().ok().filter(|x| x.is_finite());
    match (num(found), num(answer)) {
        (Some(a), Some(b)) => a == b,
        _ => found == answer,
    }
}

impl RewardSource for ExactMatch {
    fn describe(&self) -> String {
        match &self.pattern {
            None => "exact_match".into(),
            Some(p) => format!("exact_match={p}"),
        }
    }

    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<f32>> {
        inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| {
                // Scoring a missing answer as 0 would silently train towards nothing.
                let answer = inp.answer.ok_or_else(|| {
                    Error::Reward(format!(
                        "exact_match: input {i} (prompt {:?}) has no \"answer\" to compare with",
                        preview(inp.prompt)
                    ))
                })?;
                let hit = self
                    .extract(inp.completion)
                    .is_some_and(|found| same_answer(found, answer));
                Ok(if hit { 1.0 } else { 0.0 })
            })
            .collect()
    }
}

/// 1.0 when the regex matches anywhere in the completion, else 0.0.
#[derive(Clone, Debug)]
pub struct FormatMatch {
    regex: Regex,
}

impl FormatMatch {
    /// A format check with `pattern` (unanchored: anchor it to require a whole match).
    pub fn new(pattern: &str) -> std::result::Result<FormatMatch, String> {
        Ok(FormatMatch {
            regex: compile(pattern)?,
        })
    }
}

impl RewardSource for FormatMatch {
    fn describe(&self) -> String {
        format!("format={}", self.regex.as_str())
    }

    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<f32>> {
        Ok(inputs
            .iter()
            .map(|inp| {
                if self.regex.is_match(inp.completion) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect())
    }
}

/// `-max(0, chars - target) / target`: free up to `target` characters (Unicode scalars),
/// then -1 per `target` characters beyond, so the penalty's scale does not depend on the
/// target and short completions are never rewarded for being short.
#[derive(Clone, Copy, Debug)]
pub struct LengthPenalty {
    target: usize,
}

impl LengthPenalty {
    /// A penalty on characters beyond `target`.
    ///
    /// Panics if `target` is 0: the penalty divides by it ([`super::from_specs`] rejects 0
    /// with a message).
    pub fn new(target: usize) -> LengthPenalty {
        assert!(target > 0, "length penalty target must be positive");
        LengthPenalty { target }
    }
}

impl RewardSource for LengthPenalty {
    fn describe(&self) -> String {
        format!("length={}", self.target)
    }

    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<f32>> {
        let t = self.target as f64;
        Ok(inputs
            .iter()
            .map(|inp| {
                let len = inp.completion.chars().count() as f64;
                (-(len - t).max(0.0) / t) as f32
            })
            .collect())
    }
}

/// A weighted sum of sources: `Σ wᵢ · sourceᵢ(input)`. Each source scores the whole batch
/// once, so a command or model runs one batch, not one call per input.
pub struct Weighted(pub Vec<(f32, Box<dyn RewardSource>)>);

impl RewardSource for Weighted {
    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(w, s)| format!("{w}*{}", s.describe()))
            .collect::<Vec<_>>()
            .join(" + ")
    }

    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<f32>> {
        let mut total = vec![0.0f32; inputs.len()];
        for (w, source) in &mut self.0 {
            let scores = source.score(inputs)?;
            // A source that miscounts would misalign every later reward; refuse it here too.
            if scores.len() != inputs.len() {
                return Err(Error::Reward(format!(
                    "{}: expected {} scores, got {}",
                    source.describe(),
                    inputs.len(),
                    scores.len()
                )));
            }
            total.iter_mut().zip(scores).for_each(|(t, s)| *t += *w * s);
        }
        Ok(total)
    }
}

fn compile(pattern: &str) -> std::result::Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("invalid regex: {e}"))
}

/// The start of a text, for error messages that must name an input without printing a
/// whole prompt.
pub(crate) fn preview(text: &str) -> String {
    const MAX: usize = 60;
    match text.char_indices().nth(MAX) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}...", &text[..cut]),
    }
}
