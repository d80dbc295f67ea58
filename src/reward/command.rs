//! An external reward command: any program that reads JSONL `{"prompt","completion","answer"?}`
//! on stdin and prints one number a line on stdout, run once per batch.
//!
//! Every way it can go wrong is an error, never a silent zero: a non-zero exit (with its
//! stderr), a timeout, an output line that is not a finite number, or a wrong line count.

use super::rules::preview;
use super::{RewardInput, RewardSource, COMMAND_TIMEOUT_ENV};
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// How much of a failed command's stderr goes into the error: its end, where the traceback's
/// last line is, without flooding the log.
const STDERR_TAIL: usize = 4000;

/// A reward computed by a shell command (`sh -c COMMAND`), one process per batch.
#[derive(Clone, Debug)]
pub struct CommandReward {
    command: String,
    timeout: Duration,
}

impl CommandReward {
    /// A source running `command` through `sh -c`, killed (with every process it started)
    /// when one batch takes longer than `timeout`.
    pub fn new(command: &str, timeout: Duration) -> CommandReward {
        CommandReward {
            command: command.to_string(),
            timeout,
        }
    }

    fn err(&self, msg: String) -> Error {
        Error::Reward(format!("reward command `{}`: {msg}", self.command))
    }

    /// Runs the command on `payload` and returns its stdout.
    fn run(&self, payload: String) -> Result<Vec<u8>> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills the pipelines and children `sh`
            // started too: killing `sh` alone would leave them holding stdout open.
            .process_group(0)
            .spawn()
            .map_err(|e| self.err(format!("cannot start `sh`: {e}")))?;
        let pgid = child.id() as libc::pid_t;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let (done, finished) = mpsc::channel::<()>();
        let timeout = self.timeout;

        let (out, status, err_bytes, written, timed_out) = std::thread::scope(|s| {
            let killer = s.spawn(move || match finished.recv_timeout(timeout) {
                Err(RecvTimeoutError::Timeout) => {
                    // SAFETY: kill(2) with a negative pid signals the process group the child
                    // leads; it touches no memory of ours.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                    true
                }
                _ => false,
            });
            // stdin and stderr get their own threads: a command that writes before it has
            // read everything would otherwise fill one pipe while we block on another.
            let writer = s.spawn(move || stdin.write_all(payload.as_bytes()));
            let err_reader = s.spawn(move || {
                let mut b = Vec::new();
                stderr.read_to_end(&mut b).map(|_| b)
            });
            let mut out = Vec::new();
            let read = stdout.read_to_end(&mut out).map(|_| out);
            let status = child.wait();
            let err_bytes = err_reader.join().expect("stderr reader does not panic");
            let written = writer.join().expect("stdin writer does not panic");
            // Stop the killer only once every pipe is closed: a straggler that keeps stdout
            // open past the deadline is killed too.
            let _ = done.send(());
            let timed_out = killer.join().expect("killer does not panic");
            (read, status, err_bytes, written, timed_out)
        });

        if timed_out {
            return Err(self.err(format!(
                "timed out after {}s and was killed (set {COMMAND_TIMEOUT_ENV} to allow longer)",
                self.timeout.as_secs_f64()
            )));
        }
        let status = status.map_err(|e| self.err(format!("waiting for it failed: {e}")))?;
        if !status.success() {
            let stderr = err_bytes.unwrap_or_default();
            let text = String::from_utf8_lossy(&stderr);
            let text = text.trim();
            let tail = match text.char_indices().rev().nth(STDERR_TAIL) {
                Some((cut, _)) => format!("...{}", &text[cut..]),
                None => text.to_string(),
            };
            let stderr_msg = if tail.is_empty() {
                "its stderr was empty".to_string()
            } else {
                format!("stderr:\n{tail}")
            };
            return Err(self.err(format!("failed ({status}); {stderr_msg}")));
        }
        // A command that exits successfully without reading all its input closes the pipe
        // early; its output count decides whether that matters, so only other errors count.
        if let Err(e) = written {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(self.err(format!("writing its stdin failed: {e}")));
            }
        }
        out.map_err(|e| self.err(format!("reading its stdout failed: {e}")))
    }
}

/// One JSONL line per input; `answer` only where the input has one.
fn jsonl(inputs: &[RewardInput<'_>]) -> String {
    let mut payload = String::new();
    for inp in inputs {
        let mut obj = Map::new();
        obj.insert("prompt".into(), Value::from(inp.prompt));
        obj.insert("completion".into(), Value::from(inp.completion));
        if let Some(a) = inp.answer {
            obj.insert("answer".into(), Value::from(a));
        }
        payload.push_str(&Value::Object(obj).to_string());
        payload.push('\n');
    }
    payload
}

impl RewardSource for CommandReward {
    fn describe(&self) -> String {
        format!(
            "command={} (timeout {}s)",
            self.command,
            self.timeout.as_secs_f64()
        )
    }

    fn score(&mut self, inputs: &[RewardInput<'_>]) -> Result<Vec<f32>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let out = self.run(jsonl(inputs))?;
        let text = String::from_utf8_lossy(&out);
        let scores = text
            .lines()
            .enumerate()
            .map(|(i, line)| {
                line.trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| {
                        self.err(format!(
                            "line {} of its output is not a finite number: {:?}",
                            i + 1,
                            preview(line)
                        ))
                    })
            })
            .collect::<Result<Vec<f32>>>()?;
        if scores.len() != inputs.len() {
            return Err(self.err(format!(
                "expected {} scores, got {} (one number a line, in input order)",
                inputs.len(),
                scores.len()
            )));
        }
        Ok(scores)
    }
}
