//! `rlhf plot`: the reward and KL curves of a run's RL stages, drawn into one PNG, because a
//! curve is read at a glance where `metrics.jsonl` has to be read line by line.
//!
//! A run directory is either `rlhf demo`'s, with one directory per stage (`ppo/`, `grpo/`,
//! `dpo/`, each with its `metrics.jsonl`; `sft/` and `rm/` are not RL stages and are left
//! out), or a single trainer's (`rlhf grpo --out X`), with `metrics.jsonl` at its top. Each
//! stage gets a row of two panels: its reward and its KL to the reference, against the
//! optimizer step. DPO samples nothing, so it has no sampled KL: its row shows the implicit
//! reward margin and the preference accuracy instead. Held-out (`eval_`) values, which DPO
//! logs, are drawn beside the training ones.

use crate::checkpoint::METRICS_FILE;
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The file `rlhf plot` writes into the run directory unless told otherwise.
pub const PLOT_FILE: &str = "curves.png";

/// DejaVu Sans cut down to Latin-1 and Greek (see `assets/fonts/README.md`), embedded so that
/// text is drawn without any system font library: plotters' default text support goes through
/// font-kit, which needs fontconfig and freetype installed to build and to run. Licence: the
/// Bitstream Vera and Arev font licences (permissive; `assets/fonts/DejaVuSans-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-subset.ttf");

/// Arguments of `rlhf plot`.
#[derive(clap::Args, Debug, Clone)]
pub struct PlotArgs {
    /// A run directory: `rlhf demo`'s (stage directories ppo/, grpo/, dpo/, each with a
    /// metrics.jsonl) or a single PPO, GRPO or DPO run's (metrics.jsonl at its top).
    pub run_dir: PathBuf,
    /// The PNG to write [default: RUN_DIR/curves.png].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `rlhf plot`: draws the curves and prints the path of the PNG written.
pub fn run(args: &PlotArgs) -> anyhow::Result<()> {
    let path = plot_run(&args.run_dir, args.out.as_deref())?;
    println!("{}", path.display());
    Ok(())
}

/// One curve of a panel: the metric it plots and how the panel describes it.
struct Curve {
    key: &'static str,
    title: &'static str,
    y_desc: &'static str,
}

/// What a row shows for one trainer: a reward curve on the left and a KL curve (for DPO, the
/// preference accuracy) on the right, with the names and units that trainer logs them in.
struct Kind {
    /// The stage directory `rlhf demo` writes this trainer's run to.
    stage: &'static str,
    name: &'static str,
    left: Curve,
    right: Curve,
}

/// The RL trainers, in the order their rows are drawn. Their left keys tell them apart in a
/// single run's metrics (each trainer logs only its own); the units follow the trainers: PPO's
/// KL is summed over a sequence's tokens, GRPO's is a mean over tokens (k3 estimator).
const KINDS: [Kind; 3] = [
    Kind {
        stage: "ppo",
        name: "PPO",
        left: Curve {
            key: "objective/scores",
            title: "reward-model score",
            y_desc: "mean score",
        },
        right: Curve {
            key: "objective/kl",
            title: "KL to the reference",
            y_desc: "KL per sequence (nats)",
        },
    },
    Kind {
        stage: "grpo",
        name: "GRPO",
        left: Curve {
            key: "reward",
            title: "mean sample reward",
            y_desc: "mean reward",
        },
        right: Curve {
            key: "objective/kl",
            title: "k3 KL to the reference",
            y_desc: "KL per token (nats)",
        },
    },
    Kind {
        stage: "dpo",
        name: "DPO",
        left: Curve {
            key: "rewards/margins",
            title: "implicit reward margin",
            y_desc: "chosen − rejected",
        },
        right: Curve {
            key: "rewards/accuracies",
            title: "preference accuracy (no sampled KL)",
            y_desc: "pairs ranked right",
        },
    },
];

/// One metric's points in file order: (step, value), the value `None` where it was logged as
/// `null` (non-finite).
type Points = Vec<(u64, Option<f64>)>;

/// One `metrics.jsonl`, as a series per metric name.
struct Metrics {
    series: HashMap<String, Points>,
}

impl Metrics {
    /// Reads `path`. A malformed line is an error naming the file and line, except a last line
    /// with no newline: that is one being written while we read (plotting a live run) or cut
    /// short by a crash, and is left out as the trainers do when they resume.
    fn read(path: &Path) -> Result<Metrics> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        let mut series: HashMap<String, Points> = HashMap::new();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |msg: String| Error::Data {
                path: path.to_path_buf(),
                line: i + 1,
                msg,
            };
            let obj = match serde_json::from_str::<serde_json::Value>(line) {
                Ok(serde_json::Value::Object(obj)) => obj,
                Ok(_) => return Err(bad("expected a JSON object {\"step\": N, ...}".into())),
                Err(_) if i + 1 == lines.len() && !complete => break,
                Err(e) => return Err(bad(format!("invalid JSON: {e}"))),
            };
            let step = obj
                .get("step")
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| bad("expected a non-negative integer \"step\"".into()))?;
            for (name, v) in obj.iter().filter(|(k, _)| *k != "step") {
                // Only numbers are plotted; `null` is a non-finite value, kept as a gap.
                if v.is_number() || v.is_null() {
                    series
                        .entry(name.clone())
                        .or_default()
                        .push((step, v.as_f64()));
                }
            }
        }
        Ok(Metrics { series })
    }

    fn get(&self, key: &str) -> &[(u64, Option<f64>)] {
        self.series.get(key).map_or(&[], Vec::as_slice)
    }
}

/// One row of the figure: a trainer's metrics and how to draw them.
struct Row {
    title: String,
    kind: &'static Kind,
    metrics: Metrics,
}

/// Draws the reward and KL curves of every RL stage found under `run_dir` into a PNG at `out`
/// (default `run_dir/curves.png`), one row per stage, and returns the path written. The file
/// is written whole under a temporary name then renamed, so a viewer never sees half a plot.
pub fn plot_run(run_dir: &Path, out: Option<&Path>) -> Result<PathBuf> {
    if !run_dir.is_dir() {
        return Err(Error::Run {
            path: run_dir.to_path_buf(),
            msg: "no such run directory".into(),
        });
    }
    let out = out.map_or_else(|| run_dir.join(PLOT_FILE), Path::to_path_buf);
    // The encoder picks the format from the extension; anything else would not be a PNG.
    if !out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    {
        return Err(Error::Invalid(format!(
            "{}: the plot is a PNG; name a file ending in .png",
            out.display()
        )));
    }
    let rows = find_rows(run_dir)?;
    register_font()?;
    let name = out
        .file_name()
        .map_or_else(|| PLOT_FILE.into(), |n| n.to_string_lossy().into_owned());
    let tmp = out.with_file_name(format!(".{name}.tmp.png"));
    let title = format!("{}: reward and KL per step", run_dir.display());
    draw(&tmp, &title, &rows).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(&out, std::io::Error::other(e.to_string()))
    })?;
    std::fs::rename(&tmp, &out).map_err(|e| Error::io(&out, e))?;
    Ok(out)
}

/// The rows to draw: the run's own `metrics.jsonl` if it has one (a single trainer's run),
/// else those of its RL stage directories.
fn find_rows(run_dir: &Path) -> Result<Vec<Row>> {
    let top = run_dir.join(METRICS_FILE);
    if top.is_file() {
        let metrics = Metrics::read(&top)?;
        let kind = KINDS
            .iter()
            .find(|k| metrics.series.contains_key(k.left.key))
            .ok_or_else(|| Error::Run {
                path: top.clone(),
                msg: format!(
                    "none of the metrics plotted ({}): not a PPO, GRPO or DPO run",
                    KINDS.map(|k| k.left.key).join(", ")
                ),
            })?;
        let dir_name = run_dir.file_name().map_or_else(
            || run_dir.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        return Ok(vec![Row {
            title: format!("{} ({dir_name})", kind.name),
            kind,
            metrics,
        }]);
    }
    let mut rows = Vec::new();
    for kind in &KINDS {
        let path = run_dir.join(kind.stage).join(METRICS_FILE);
        if path.is_file() {
            rows.push(Row {
                title: kind.name.to_string(),
                kind,
                metrics: Metrics::read(&path)?,
            });
        }
    }
    if rows.is_empty() {
        return Err(Error::Invalid(format!(
            "no {METRICS_FILE} under {} or its stage directories ({})",
            run_dir.display(),
            KINDS.map(|k| format!("{}/", k.stage)).join(", ")
        )));
    }
    Ok(rows)
}

/// Registers the embedded font as plotters' sans-serif, once per process.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(
            "the font embedded for plot labels does not parse".into(),
        ))
    }
}

// The figure's geometry in pixels: wide enough that two panels side by side keep readable
// tick labels, a row tall enough to see the shape of a curve.
const WIDTH: u32 = 1400;
const ROW_HEIGHT: u32 = 420;
const TITLE_HEIGHT: u32 = 50;

/// The training curve's colour, and the held-out one's (drawn dashed).
const TRAIN: RGBColor = RGBColor(31, 119, 180);
const HELD_OUT: RGBColor = RGBColor(255, 127, 14);

/// Below this many points a curve also gets a marker per point, so that a short run (or the
/// few steps a held-out evaluation ran at) shows where its values are.
const MARKERS_BELOW: usize = 60;

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// The whole figure: a title strip, then a row of two panels per stage.
fn draw(path: &Path, title: &str, rows: &[Row]) -> DrawResult {
    let height = TITLE_HEIGHT + ROW_HEIGHT * rows.len() as u32;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(TITLE_HEIGHT);
    top.draw_text(
        title,
        &("sans-serif", 26)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center)),
        (WIDTH as i32 / 2, TITLE_HEIGHT as i32 / 2),
    )?;
    let panels = body.split_evenly((rows.len(), 2));
    for (row, pair) in rows.iter().zip(panels.chunks(2)) {
        for (curve, area) in [&row.kind.left, &row.kind.right].into_iter().zip(pair) {
            panel(area, &row.title, curve, &row.metrics)?;
        }
    }
    root.present()?;
    Ok(())
}

/// One panel: a curve's training values and, where logged, its held-out (`eval_`) values.
fn panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    row_title: &str,
    curve: &Curve,
    metrics: &Metrics,
) -> DrawResult {
    let eval_key = format!("eval_{}", curve.key);
    let series = [
        ("train", metrics.get(curve.key), TRAIN),
        ("held-out", metrics.get(&eval_key), HELD_OUT),
    ];
    let caption = format!("{row_title}: {} · {}", curve.title, curve.key);
    // JSON numbers are always finite (a non-finite value was logged as `null`).
    let values = || {
        series
            .iter()
            .flat_map(|s| s.1)
            .filter_map(|&(x, y)| Some((x, y?)))
    };
    if values().next().is_none() {
        // A stage just started, or a metric this run does not log (GRPO's KL with beta 0).
        let inner = area
            .margin(10, 10, 10, 10)
            .titled(&caption, ("sans-serif", 20))?;
        let (w, h) = inner.dim_in_pixel();
        inner.draw_text(
            &format!("no values of {} logged", curve.key),
            &("sans-serif", 18)
                .into_font()
                .color(&RGBColor(110, 110, 110))
                .pos(Pos::new(HPos::Center, VPos::Center)),
            (w as i32 / 2, h as i32 / 2),
        )?;
        return Ok(());
    }
    let (x_lo, x_hi) = values().fold((u64::MAX, 0), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
    // Steps are whole numbers, so the axis is an integer one (no "20.0" ticks); one step
    // alone is widened to three so that the axis has a length.
    let xs = if x_lo == x_hi {
        (x_lo.saturating_sub(1), x_hi + 1)
    } else {
        (x_lo, x_hi)
    };
    let ys = span(values().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(&caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(curve.y_desc)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(RGBColor(243, 243, 243))
        .draw()?;
    let mut labelled = 0;
    for (label, points, color) in series {
        if points.iter().all(|p| p.1.is_none()) {
            continue;
        }
        let style = color.stroke_width(2);
        // A null value breaks the line rather than being drawn as a value it never had.
        for segment in points.split(|p| p.1.is_none()) {
            let xy = segment.iter().filter_map(|&(x, y)| Some((x, y?)));
            if label == "train" {
                chart.draw_series(LineSeries::new(xy, style))?;
            } else {
                chart.draw_series(DashedLineSeries::new(xy, 8, 5, style))?;
            }
        }
        if points.len() < MARKERS_BELOW {
            let dots = points.iter().filter_map(|&(x, y)| Some((x, y?)));
            chart.draw_series(dots.map(|p| Circle::new(p, 3, color.filled())))?;
        }
        // The legend entry rides on an empty series so that it is added once per curve, not
        // once per segment.
        chart
            .draw_series(std::iter::empty::<Circle<(u64, f64), i32>>())?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        labelled += 1;
    }
    // One curve needs no legend: the caption names it.
    if labelled > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()?;
    }
    Ok(())
}

/// An axis range holding every value with a 5% margin, widened around a single value (one
/// step, or a constant curve) so that the axis still has a length.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if hi - lo > 1e-12 * hi.abs().max(lo.abs()).max(1.0) {
        let pad = 0.05 * (hi - lo);
        (lo - pad, hi + pad)
    } else {
        let pad = 0.1 * lo.abs().max(1.0);
        (lo - pad, hi + pad)
    }
}
