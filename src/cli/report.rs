//! `distil report RUN_DIR`: the training curves of a run as a PNG, and a summary table.

use crate::train::metrics;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Args)]
pub struct ReportArgs {
    /// A run's output directory (holding metrics.jsonl).
    pub run_dir: PathBuf,
    /// The image to write (default RUN_DIR/report.png).
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
}

/// One evaluation logged by the trainer.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPoint {
    pub step: u64,
    pub loss: f64,
    pub perplexity: Option<f64>,
    pub accuracy: Option<f64>,
}

/// The series of a metrics file.
#[derive(Debug, Default)]
pub struct Curves {
    pub loss: Vec<(f64, f64)>,
    pub learning_rate: Vec<(f64, f64)>,
    pub tokens_per_s: Vec<f64>,
    pub evals: Vec<EvalPoint>,
    /// `loss_*` parts, by name.
    pub parts: BTreeMap<String, Vec<(f64, f64)>>,
    /// Distillation schedules: `temperature`, `lambda`.
    pub schedules: BTreeMap<String, Vec<(f64, f64)>>,
    pub skipped_steps: u64,
}

fn is_part(k: &str) -> bool {
    k.starts_with("loss_")
}

/// Reads the curves from `metrics.jsonl` lines.
pub fn curves(lines: &[Value], path: &Path) -> Result<Curves> {
    let mut c = Curves::default();
    let mut evals: BTreeMap<u64, EvalPoint> = BTreeMap::new();
    for (i, v) in lines.iter().enumerate() {
        let obj = v
            .as_object()
            .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        let Some(step) = obj.get("step").and_then(Value::as_u64) else {
            bail!(
                "{}:{}: no \"step\" (a non-negative integer) in this line",
                path.display(),
                i + 1
            );
        };
        let x = step as f64;
        let num = |k: &str| obj.get(k).and_then(Value::as_f64);
        if obj.contains_key("skipped") {
            c.skipped_steps += 1;
            continue;
        }
        if let Some(l) = num("eval_loss") {
            evals.insert(
                step,
                EvalPoint {
                    step,
                    loss: l,
                    perplexity: num("eval_perplexity"),
                    accuracy: num("eval_accuracy"),
                },
            );
            continue;
        }
        if let Some(l) = num("loss") {
            c.loss.push((x, l));
            if let Some(lr) = num("learning_rate") {
                c.learning_rate.push((x, lr));
            }
            if let Some(t) = num("tokens_per_s") {
                c.tokens_per_s.push(t);
            }
            for (k, v) in obj {
                if let Some(y) = v.as_f64() {
                    if is_part(k) {
                        c.parts.entry(k.clone()).or_default().push((x, y));
                    } else if k == "temperature" || k == "lambda" {
                        c.schedules.entry(k.clone()).or_default().push((x, y));
                    }
                }
            }
        }
    }
    c.evals = evals.into_values().collect();
    Ok(c)
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

pub fn run(a: &ReportArgs) -> Result<String> {
    let dir = &a.run_dir;
    if !dir.is_dir() {
        bail!("{}: no such run directory", dir.display());
    }
    let path = dir.join("metrics.jsonl");
    if !path.is_file() {
        let mut hint = String::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            let mut subs: Vec<String> = rd
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("metrics.jsonl").is_file())
                .map(|e| e.path().display().to_string())
                .collect();
            subs.sort();
            if !subs.is_empty() {
                hint = format!("; runs found inside it: {}", subs.join(", "));
            }
        }
        bail!(
            "{}: no metrics.jsonl (is {} the output_dir of a run?){hint}",
            path.display(),
            dir.display()
        );
    }
    let lines = metrics::read(&path)?;
    let c = curves(&lines, &path)?;
    if c.loss.is_empty() {
        bail!(
            "{}: no training step logged yet (no line with \"step\" and \"loss\")",
            path.display()
        );
    }
    let out = a.out.clone().unwrap_or_else(|| dir.join("report.png"));
    if out
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("png"))
    {
        bail!(
            "--out {}: the report is a PNG image; give a .png file name",
            out.display()
        );
    }
    let title = format!("distil run: {}", dir.display());
    draw(&c, &out, &title).with_context(|| format!("cannot draw {}", out.display()))?;
    let mut s = summary(&c, dir)?;
    let _ = writeln!(s, "\ncurves drawn to {}", out.display());
    Ok(s)
}

/// The summary table.
pub fn summary(c: &Curves, dir: &Path) -> Result<String> {
    let mut s = String::new();
    let (first_step, first) = c.loss[0];
    let (last_step, last) = *c.loss.last().unwrap();
    let (min_step, min) = c
        .loss
        .iter()
        .copied()
        .filter(|(_, l)| l.is_finite())
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((last_step, last));
    let w = 24;
    let _ = writeln!(s, "run: {}", dir.display());
    let _ = writeln!(s, "{:<w$} {}", "steps", last_step as u64);
    let _ = writeln!(
        s,
        "{:<w$} {first:.4} (step {})",
        "first training loss", first_step as u64
    );
    let _ = writeln!(
        s,
        "{:<w$} {last:.4} (step {})",
        "last training loss", last_step as u64
    );
    let _ = writeln!(
        s,
        "{:<w$} {min:.4} (step {})",
        "min training loss", min_step as u64
    );
    if let Some((_, lr)) = c.learning_rate.last() {
        let _ = writeln!(s, "{:<w$} {lr:.3e}", "final learning rate");
    }
    if let Some(t) = median(&c.tokens_per_s) {
        let _ = writeln!(s, "{:<w$} {t:.0}", "tokens/s (median)");
    }
    for (k, v) in &c.parts {
        if let Some((_, y)) = v.last() {
            let _ = writeln!(s, "{:<w$} {y:.4}", format!("last {k}"));
        }
    }
    if c.skipped_steps > 0 {
        let _ = writeln!(s, "{:<w$} {}", "skipped (non-finite)", c.skipped_steps);
    }
    if c.evals.is_empty() {
        let _ = writeln!(s, "\nno evaluation logged (the run has no held-out split)");
    } else {
        let _ = writeln!(s, "\nevaluations (held-out):");
        let _ = writeln!(
            s,
            "| {:>8} | {:>10} | {:>12} | {:>9} |",
            "step", "MLM loss", "perplexity", "accuracy"
        );
        let _ = writeln!(s, "|---------:|-----------:|-------------:|----------:|");
        for e in &c.evals {
            let ppl = e.perplexity.unwrap_or(e.loss.exp());
            let acc = e
                .accuracy
                .map(|a| format!("{:.2}%", 100.0 * a))
                .unwrap_or_else(|| "–".into());
            let _ = writeln!(
                s,
                "| {:>8} | {:>10.4} | {:>12.2} | {:>9} |",
                e.step, e.loss, ppl, acc
            );
        }
    }
    let er = dir.join("eval_results.json");
    if er.is_file() {
        let text = std::fs::read_to_string(&er)
            .with_context(|| format!("cannot read {}", er.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", er.display()))?;
        let _ = writeln!(s, "\neval_results.json:");
        let e = v.get("eval").unwrap_or(&v);
        let f = |k: &str| e.get(k).and_then(Value::as_f64);
        match (f("loss"), f("perplexity"), f("accuracy")) {
            (Some(l), Some(p), Some(a)) => {
                let step = v
                    .get("step")
                    .and_then(Value::as_u64)
                    .map(|s| format!("step {s}: "))
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "  {step}MLM loss {l:.4}, perplexity {p:.2}, masked-token accuracy {:.2}%{}",
                    100.0 * a,
                    e.get("masked_tokens")
                        .and_then(Value::as_u64)
                        .map(|n| format!(" ({n} masked tokens)"))
                        .unwrap_or_default()
                );
            }
            _ => {
                let _ = writeln!(s, "{}", serde_json::to_string_pretty(&v)?);
            }
        }
    }
    let cmp = dir.join("comparison.md");
    if cmp.is_file() {
        let text = std::fs::read_to_string(&cmp)
            .with_context(|| format!("cannot read {}", cmp.display()))?;
        let _ = writeln!(
            s,
            "\ncomparison.md (teacher and student):\n{}",
            text.trim_end()
        );
    }
    Ok(s)
}

/// Registers the embedded DejaVu Sans as plotters' `sans-serif` (once).
fn fonts() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            plotters::style::register_font("sans-serif", style, dejavu::sans::regular())
                .map_err(|_| "the embedded DejaVu Sans font is not a valid font".to_string())?;
        }
        Ok(())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// A named series of (step, value) points and its colour.
type Series<'a> = (String, &'a [(f64, f64)], RGBColor);

struct Panel<'a> {
    title: &'a str,
    y_desc: &'a str,
    series: Vec<Series<'a>>,
    points: bool,
    scientific: bool,
    log_when_spread: bool,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn draw(c: &Curves, out: &Path, title: &str) -> Result<()> {
    fonts()?;
    let evals: Vec<(f64, f64)> = c.evals.iter().map(|e| (e.step as f64, e.loss)).collect();
    let mut panels = vec![
        Panel {
            title: "Training loss",
            y_desc: "loss",
            series: vec![("training loss".into(), &c.loss[..], COLORS[0])],
            points: false,
            scientific: false,
            log_when_spread: false,
        },
        Panel {
            title: "Learning rate",
            y_desc: "learning rate",
            series: vec![("learning rate".into(), &c.learning_rate[..], COLORS[2])],
            points: false,
            scientific: true,
            log_when_spread: false,
        },
        Panel {
            title: "Held-out MLM loss",
            y_desc: "eval loss",
            series: vec![("eval loss".into(), &evals[..], COLORS[1])],
            points: true,
            scientific: false,
            log_when_spread: false,
        },
    ];
    // A part that is the whole loss (pretraining's loss_mlm alone) would repeat the first panel.
    let parts: Vec<(&String, &Vec<(f64, f64)>)> = c
        .parts
        .iter()
        .filter(|(_, v)| v.as_slice() != c.loss.as_slice())
        .collect();
    if !parts.is_empty() {
        panels.push(Panel {
            title: "Loss parts",
            y_desc: "loss",
            series: parts
                .into_iter()
                .enumerate()
                .map(|(i, (k, v))| (k.clone(), &v[..], COLORS[(i + 3) % COLORS.len()]))
                .collect(),
            points: false,
            scientific: false,
            log_when_spread: true,
        });
    }
    if !c.schedules.is_empty() {
        panels.push(Panel {
            title: "Distillation schedule",
            y_desc: "value",
            series: c
                .schedules
                .iter()
                .enumerate()
                .map(|(i, (k, v))| (k.clone(), &v[..], COLORS[(i + 5) % COLORS.len()]))
                .collect(),
            points: false,
            scientific: false,
            log_when_spread: false,
        });
    }
    let cols = 2usize;
    let rows = panels.len().div_ceil(cols);
    let (w, h) = (1400u32, 60 + 440 * rows as u32);
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let err = |e: &dyn std::fmt::Display| anyhow!("{e}");
    {
        let root = BitMapBackend::new(out, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = root
            .titled(title, ("sans-serif", 26))
            .map_err(|e| err(&e))?;
        let areas = root.split_evenly((rows, cols));
        let x_max = c.loss.last().map(|p| p.0).unwrap_or(1.0).max(1.0);
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(panel, area, x_max).map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    p: &Panel<'_>,
    area: &DrawingArea<DB, plotters::coord::Shift>,
    x_max: f64,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let ys: Vec<f64> = p
        .series
        .iter()
        .flat_map(|(_, v, _)| v.iter().map(|q| q.1))
        .filter(|y| y.is_finite())
        .collect();
    let mut chart = ChartBuilder::on(area);
    chart
        .caption(p.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(80);
    if ys.is_empty() {
        area.draw(&Text::new(
            p.title,
            (area.dim_in_pixel().0 as i32 / 2 - 80, 20),
            ("sans-serif", 22).into_font(),
        ))?;
        area.draw(&Text::new(
            "nothing logged",
            (
                area.dim_in_pixel().0 as i32 / 2 - 60,
                area.dim_in_pixel().1 as i32 / 2,
            ),
            ("sans-serif", 20).into_font().color(&BLACK.mix(0.6)),
        ))?;
        return Ok(());
    }
    let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // Parts of very different sizes (a distillation's soft, hard and cosine losses) share a
    // panel on a log10 axis.
    let log = p.log_when_spread && lo > 0.0 && hi / lo > 20.0;
    let tf = |y: f64| if log { y.log10() } else { y };
    let (lo, hi) = (tf(lo), tf(hi));
    let pad = if hi > lo {
        (hi - lo) * 0.08
    } else {
        lo.abs().max(1e-12) * 0.1
    };
    let y0 = if lo >= 0.0 && lo - pad < 0.0 {
        0.0
    } else {
        lo - pad
    };
    // Room at the top for the legend.
    let mut ch = chart.build_cartesian_2d(0f64..x_max, y0..hi + 2.5 * pad)?;
    // Enough decimals to tell the ticks (about ten) apart.
    let span = (hi + 2.5 * pad - y0).abs().max(1e-12);
    let decimals = ((-(span / 10.0).log10()).ceil().max(0.0) as usize).min(8);
    let sci = |v: &f64| format!("{v:.1e}");
    let plain = move |v: &f64| format!("{v:.decimals$}");
    let pow10 = |v: &f64| {
        let y = 10f64.powf(*v);
        if y >= 1.0 {
            format!("{y:.1}")
        } else {
            format!("{y:.1e}")
        }
    };
    let mut mesh = ch.configure_mesh();
    mesh.x_desc("step")
        .y_desc(p.y_desc)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        // Steps are whole numbers: no label between them (short runs).
        .x_labels(10.min(x_max as usize + 1))
        .x_label_formatter(&|v| {
            if v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                String::new()
            }
        })
        .light_line_style(WHITE.mix(0.0));
    if log {
        mesh.y_label_formatter(&pow10)
            .y_desc(format!("{} (log scale)", p.y_desc));
    } else if p.scientific {
        mesh.y_label_formatter(&sci);
    } else {
        mesh.y_label_formatter(&plain);
    }
    mesh.draw()?;
    for (name, v, color) in &p.series {
        let pts: Vec<(f64, f64)> = v
            .iter()
            .copied()
            .filter(|q| q.1.is_finite() && (!log || q.1 > 0.0))
            .map(|(x, y)| (x, tf(y)))
            .collect();
        let style = ShapeStyle::from(*color).stroke_width(2);
        let color = *color;
        ch.draw_series(LineSeries::new(pts.clone(), style))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))
            });
        if p.points || pts.len() == 1 {
            ch.draw_series(pts.iter().map(|&q| Circle::new(q, 4, color.filled())))?;
        }
    }
    ch.configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}
