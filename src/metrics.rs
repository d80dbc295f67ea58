//! What a run reports while it trains: `metrics.jsonl`, one JSON object per optimizer step,
//! written line by line so that a crash loses nothing already logged, and a progress bar with
//! the latest values for a person watching a terminal.

use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

/// An append-only JSONL metrics file.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path` for appending, creating it. With `keep_through = Some(step)` (a resumed
    /// run), lines of later steps are dropped first: the resumed run logs those steps again,
    /// and the file should read as one run.
    pub fn open(path: &Path, keep_through: Option<u64>) -> Result<MetricsLog> {
        if let (Some(step), true) = (keep_through, path.is_file()) {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    // A line torn by a crash does not parse; it is dropped with the rest.
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                })
                .flat_map(|l| [l, "\n"])
                .collect();
            crate::model::weights::write_atomic(path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends `{"step": step, name: value, ...}` as one line, in the order given. Non-finite
    /// values are written as `null` (JSON has no NaN).
    pub fn write(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut line = format!("{{\"step\":{step}");
        for (name, v) in values {
            let name = serde_json::to_string(name).expect("a string always serialises");
            let v = serde_json::to_string(v).expect("an f64 always serialises");
            line.push_str(&format!(",{name}:{v}"));
        }
        line.push_str("}\n");
        // One write per line: after it the line is the kernel's, and survives a crash of
        // this process.
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// A progress bar over optimizer steps showing the latest metrics, drawn on stderr only when
/// it is a terminal and the run is not quiet. Notes print above the bar (or plainly to stderr
/// without one), unless quiet.
pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Progress {
    /// A bar for steps `start..total`.
    pub fn new(total: u64, start: u64, quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                    .expect("the template is valid")
                    .progress_chars("=> "),
            );
            bar.set_position(start);
            bar
        });
        Progress { bar, quiet }
    }

    /// Moves the bar to `step` and shows `values`.
    pub fn update(&self, step: u64, values: &[(&str, f64)]) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format_values(values));
        }
    }

    /// Prints a line for the user (above the bar when there is one).
    pub fn note(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None if !self.quiet => eprintln!("{msg}"),
            None => {}
        }
    }
}

impl Drop for Progress {
    /// Removes the bar however the run ends (done, interrupted, or failed), leaving the
    /// terminal clean for what follows.
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `name value` pairs, compactly: 4 significant digits, scientific for small or large values.
fn format_values(values: &[(&str, f64)]) -> String {
    values
        .iter()
        .map(|(name, v)| {
            let a = v.abs();
            if a != 0.0 && !(1e-3..1e5).contains(&a) {
                format!("{name} {v:.3e}")
            } else {
                format!("{name} {v:.4}")
            }
        })
        .collect::<Vec<_>>()
        .join("  ")
}
