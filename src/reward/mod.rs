//! Reward sources: what turns a sampled completion into the scalar PPO and GRPO maximise.
//!
//! Three kinds, all behind [`RewardSource`]:
//! - rule rewards ([`rules`]): exact match against the example's `answer`, a regex format
//!   check, a length penalty, and their weighted sum;
//! - an external command ([`command`]) that reads JSONL on stdin and prints one score a line;
//! - a reward model checkpoint ([`model`]): a transformer with a scalar head, read at the last
//!   token of prompt + completion.
//!
//! The CLI describes sources with the spec strings that [`from_specs`] parses.

pub mod command;
pub mod model;
pub mod rules;

use crate::model::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::time::Duration;

pub use command::CommandReward;
pub use model::{check_same_tokenizer, encode_pair, last_tokens, score_ids, RewardModel};
pub use rules::{ExactMatch, FormatMatch, LengthPenalty, Weighted};

/// One completion to score.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RewardInput<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    /// The example's reference answer, for rewards that compare against one.
    pub answer: Option<&'a str>,
}

/// Anything that scores completions.
pub trait RewardSource {
    /// A short description for logs and run_config.json.
    fn describe(&self) -> String;
    /// One score per input, in order.
    fn score(&mut self, inputs: &[RewardInput<'_>]) -> crate::Result<Vec<f32>>;
}

/// Environment variable that overrides the external command's timeout, in seconds.
pub const COMMAND_TIMEOUT_ENV: &str = "RLHF_REWARD_TIMEOUT";

/// How long an external reward command may run on one batch unless
/// [`COMMAND_TIMEOUT_ENV`] says otherwise: generous for a script that starts an interpreter,
/// short enough that a hung scorer does not stall a run unnoticed.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Parses the CLI's reward specification(s) into one source; several are combined as a
/// weighted sum ([`Weighted`]).
///
/// One spec per `--reward` flag (repeatable), each optionally prefixed by `WEIGHT*` (a
/// number, default 1). The weight goes first because the spec may end in a regex or a shell
/// command, where a trailing `*W` would be ambiguous; a kind name never starts with a digit,
/// sign or dot, so a leading number followed by `*` is always a weight.
///
/// - `exact_match`: 1.0 when the last number in the completion (`-?\d+(?:\.\d+)?`, so
///   "-3", "42." and "42," all give the number) equals the input's `answer`, else 0.0.
/// - `exact_match=REGEX`: the same, comparing what REGEX extracts from its last match in the
///   completion: its capture group if it has one (at most one), else the whole match.
///   Values are compared as numbers when both parse as finite numbers ("42.0" equals "42"),
///   else as whitespace-trimmed strings. No match scores 0.0; an input without an answer
///   is an error naming it.
/// - `format=REGEX`: 1.0 when REGEX matches anywhere in the completion (anchor it with `^`
///   and `$` to require a whole-completion match), else 0.0.
/// - `length=TARGET`: `-max(0, chars - TARGET) / TARGET`, with `chars` the completion's
///   Unicode scalar count: no penalty up to TARGET characters, then -1 per TARGET extra.
/// - `model=DIR`: a reward model checkpoint (an HF directory with a scalar head
///   `score.weight`), read at the last token of prompt + completion + EOS. Given
///   `policy_tokenizer`, a reward model with a different vocabulary is an error.
/// - `command=SHELL COMMAND`: run through `sh -c` once per batch, fed JSONL
///   `{"prompt","completion","answer"?}` on stdin, printing one number a line; it times out
///   after [`COMMAND_TIMEOUT_ENV`] seconds (default 60).
///
/// Regexes use the `regex` crate's syntax (no look-around or backreferences).
/// Example: `--reward exact_match --reward '0.5*format=^(Yes|No)\b'`.
pub fn from_specs(
    specs: &[String],
    policy_tokenizer: Option<&Tokenizer>,
) -> crate::Result<Box<dyn RewardSource>> {
    let mut parts = specs
        .iter()
        .map(|s| parse_spec(s, policy_tokenizer))
        .collect::<Result<Vec<_>>>()?;
    match parts.len() {
        0 => Err(Error::Reward(
            "no reward source given (e.g. --reward exact_match)".into(),
        )),
        // A lone unweighted source needs no wrapper, and its description stays the plain spec.
        1 if parts[0].0 == 1.0 => Ok(parts.pop().expect("one part").1),
        _ => Ok(Box::new(Weighted(parts))),
    }
}

/// One spec: its weight and its source.
fn parse_spec(
    spec: &str,
    policy_tokenizer: Option<&Tokenizer>,
) -> Result<(f32, Box<dyn RewardSource>)> {
    let bad = |msg: String| Error::Reward(format!("invalid reward spec `{spec}`: {msg}"));
    let (weight, body) = split_weight(spec).map_err(bad)?;
    let (kind, arg) = match body.split_once('=') {
        Some((k, a)) => (k.trim(), Some(a)),
        None => (body.trim(), None),
    };
    let need = |what: &str| arg.ok_or_else(|| bad(format!("`{kind}` needs `{kind}={what}`")));
    let source: Box<dyn RewardSource> = match kind {
        "exact_match" => Box::new(match arg {
            None => ExactMatch::last_number(),
            Some(re) => ExactMatch::with_regex(re).map_err(bad)?,
        }),
        "format" => Box::new(FormatMatch::new(need("REGEX")?).map_err(bad)?),
        "length" => {
            let target = need("TARGET")?;
            let target = target
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|&t| t > 0)
                .ok_or_else(|| {
                    bad(format!(
                        "TARGET must be a positive whole number of characters, found `{target}`"
                    ))
                })?;
            Box::new(LengthPenalty::new(target))
        }
        "model" => Box::new(RewardModel::load(
            std::path::Path::new(need("DIR")?),
            policy_tokenizer,
        )?),
        "command" => {
            let cmd = need("SHELL COMMAND")?;
            if cmd.trim().is_empty() {
                return Err(bad("the command is empty".into()));
            }
            Box::new(CommandReward::new(cmd, command_timeout()?))
        }
        other => {
            return Err(bad(format!(
                "unknown kind `{other}` (expected exact_match, format, length, model or command)"
            )))
        }
    };
    Ok((weight, source))
}

/// Splits an optional leading `WEIGHT*` off a spec.
fn split_weight(spec: &str) -> std::result::Result<(f32, &str), String> {
    let Some((head, rest)) = spec.split_once('*') else {
        return Ok((1.0, spec));
    };
    // Only a prefix that looks like a number is a weight: `format=a*b` keeps its `*`.
    let looks_numeric = head
        .trim()
        .starts_with(|c: char| c.is_ascii_digit() || matches!(c, '-' | '+' | '.'));
    if !looks_numeric {
        return Ok((1.0, spec));
    }
    match head.trim().parse::<f32>() {
        Ok(w) if w.is_finite() => Ok((w, rest)),
        _ => Err(format!("weight `{head}` is not a finite number")),
    }
}

/// The external command's timeout: [`COMMAND_TIMEOUT_ENV`] when set, else the default.
fn command_timeout() -> Result<Duration> {
    match std::env::var(COMMAND_TIMEOUT_ENV) {
        Err(_) => Ok(DEFAULT_COMMAND_TIMEOUT),
        Ok(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|t| t.is_finite() && *t > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                Error::Reward(format!(
                    "{COMMAND_TIMEOUT_ENV}=`{s}`: expected a positive number of seconds"
                ))
            }),
    }
}
