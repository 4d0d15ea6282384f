//! Training observability: `OUTPUT/metrics.jsonl` (one JSON object per logged step) and the
//! loss-curve image `OUTPUT/loss_curve.svg` (a self-contained SVG line chart, no dependencies).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub step: usize,
    /// Fractional epoch (`step / steps_per_epoch`).
    pub epoch: f64,
    /// Mean training loss of the steps since the previous line.
    pub loss: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    /// Target tokens trained on so far.
    pub tokens: u64,
    /// Input tokens per second (this session).
    pub tokens_per_s: f64,
    pub peak_rss_mib: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_device_mib: Option<f64>,
    pub elapsed_s: f64,
}

/// Appends [`MetricsRecord`]s to a JSONL file, one flushed line each.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path` for a run that starts after step `resume_step` (0: a new run). Lines of steps
    /// after `resume_step` (written by the interrupted run after its checkpoint) are dropped, so
    /// a resumed run's file equals an uninterrupted run's.
    /// An unterminated last line (the run was killed while appending it) is dropped too.
    pub fn open(path: &Path, resume_step: usize) -> Result<Self> {
        let keep: Vec<MetricsRecord> = if resume_step > 0 && path.exists() {
            Self::read_complete(path)?
                .into_iter()
                .filter(|r| r.step <= resume_step)
                .collect()
        } else {
            Vec::new()
        };
        let mut text = String::new();
        for r in &keep {
            text.push_str(&serde_json::to_string(r).expect("metrics serialize"));
            text.push('\n');
        }
        write_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record and flushes it to the OS (durable at the next [`MetricsLog::sync`]).
    pub fn write(&mut self, r: &MetricsRecord) -> Result<()> {
        let mut line = serde_json::to_string(r).expect("metrics serialize");
        line.push('\n');
        crate::durable::append(&mut self.file, &self.path, line.as_bytes())
    }

    /// Makes the lines written so far durable (`fsync`); called before each checkpoint.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }

    /// The file this log appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The records of the complete (newline-terminated) lines of a metrics file.
    fn read_complete(path: &Path) -> Result<Vec<MetricsRecord>> {
        let mut text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        Self::parse(&text, path)
    }

    /// Every record of a metrics file.
    pub fn read_all(path: &Path) -> Result<Vec<MetricsRecord>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<Vec<MetricsRecord>> {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| Error::bad_file(path, format!("line {}: {e}", i + 1)))
            })
            .collect()
    }
}

/// Replaces `path` by `bytes` atomically ([`crate::durable::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::durable::write_atomic(path, bytes)
}

/// About five "nice" tick values (1, 2 or 5 × 10ᵏ apart) covering `[lo, hi]`.
pub fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    };
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor() * step;
    let mut ticks = Vec::new();
    let mut k = 0.0;
    loop {
        let v = ((first / step).round() + k) * step;
        ticks.push(v);
        k += 1.0;
        if v >= hi - step * 1e-9 || ticks.len() > 12 {
            break;
        }
    }
    ticks
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

/// Canvas size and plot-area margins of [`loss_curve_svg`], in SVG pixels.
mod canvas {
    pub const W: f64 = 720.0;
    pub const H: f64 = 420.0;
    pub const L: f64 = 70.0; // plot area margins
    pub const R: f64 = 20.0;
    pub const T: f64 = 40.0;
    pub const B: f64 = 50.0;
}

/// A line chart of the training loss (and eval loss, if any) against the step, as SVG.
pub fn loss_curve_svg(train: &[(usize, f64)], eval: &[(usize, f64)], title: &str) -> String {
    let (x0, x1, y0, y1) = data_bounds(train, eval);
    let xt = nice_ticks(x0, x1);
    let yt = nice_ticks(y0, y1);
    let sc = Scale {
        xa: xt[0].min(x0),
        xb: xt[xt.len() - 1].max(x1),
        ya: yt[0].min(y0),
        yb: yt[yt.len() - 1].max(y1),
    };
    let mut s = String::new();
    svg_header(&mut s, title);
    svg_axes(&mut s, &xt, &yt, &sc);
    svg_series(&mut s, train, eval, &sc);
    s.push_str("</svg>\n");
    s
}

/// (x0, x1, y0, y1): the range of the finite points, or (0, 1, 0, 1) when there are none.
fn data_bounds(train: &[(usize, f64)], eval: &[(usize, f64)]) -> (f64, f64, f64, f64) {
    let pts: Vec<(f64, f64)> = train
        .iter()
        .chain(eval)
        .filter(|(_, y)| y.is_finite())
        .map(|&(x, y)| (x as f64, y))
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (0.0f64, 1.0f64, 0.0f64, 1.0f64);
    if !pts.is_empty() {
        x0 = pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        x1 = pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        y0 = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        y1 = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    }
    (x0, x1, y0, y1)
}

/// The data range shown on each axis ([xa, xb] × [ya, yb]), mapped onto the plot area.
struct Scale {
    xa: f64,
    xb: f64,
    ya: f64,
    yb: f64,
}

impl Scale {
    /// The SVG x coordinate of step `x`.
    fn sx(&self, x: f64) -> f64 {
        use canvas::{L, R, W};
        L + (x - self.xa) / (self.xb - self.xa).max(1e-12) * (W - L - R)
    }

    /// The SVG y coordinate of loss `y`.
    fn sy(&self, y: f64) -> f64 {
        use canvas::{B, H, T};
        H - B - (y - self.ya) / (self.yb - self.ya).max(1e-12) * (H - T - B)
    }
}

/// Appends the `<svg>` opening, the white background and the title.
fn svg_header(s: &mut String, title: &str) {
    use canvas::{H, W};
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        xml_escape(title)
    );
}

/// Appends the grid lines and tick labels at `xt` / `yt`, the plot frame and the axis names.
fn svg_axes(s: &mut String, xt: &[f64], yt: &[f64], sc: &Scale) {
    use canvas::{B, H, L, R, T, W};
    for &v in yt {
        let y = sc.sy(v);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - R,
            L - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
    }
    for &v in xt {
        let x = sc.sx(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            H - B,
            H - B + 18.0,
            fmt_tick(v)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        W - L - R,
        H - T - B
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text><text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">loss</text>"#,
        (L + W - R) / 2.0,
        H - 10.0,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    );
}

/// Appends the train and eval polylines (eval points marked) with their legend entries.
fn svg_series(s: &mut String, train: &[(usize, f64)], eval: &[(usize, f64)], sc: &Scale) {
    use canvas::{R, T, W};
    let mut legend_y = T + 16.0;
    for (series, colour, name) in [(train, "#1f77b4", "train"), (eval, "#d62728", "eval")] {
        let p: Vec<String> = series
            .iter()
            .filter(|(_, y)| y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sc.sx(x as f64), sc.sy(y)))
            .collect();
        if p.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{}"/>"#,
            p.join(" ")
        );
        if name == "eval" {
            for q in &p {
                let (x, y) = q.split_once(',').expect("formatted above");
                let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"#);
            }
        }
        let lx = W - R - 90.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            lx + 20.0,
            lx + 26.0,
            legend_y + 4.0
        );
        legend_y += 18.0;
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_range() {
        for (lo, hi) in [
            (0.0, 1.0),
            (1.234, 1.9),
            (3.0, 3.0),
            (0.0, 1234.0),
            (2.41, 2.43),
        ] {
            let t = nice_ticks(lo, hi);
            assert!(t.len() >= 2 && t.len() <= 13, "{lo}..{hi}: {t:?}");
            assert!(t[0] <= lo && *t.last().unwrap() >= hi, "{lo}..{hi}: {t:?}");
            assert!(t.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn svg_has_one_polyline_per_series() {
        let train: Vec<(usize, f64)> = (1..=30).map(|s| (s, 3.0 - s as f64 * 0.05)).collect();
        let s = loss_curve_svg(&train, &[(10, 2.6), (20, 2.2)], "a <run>");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(!s.contains("NaN") && s.contains("a &lt;run&gt;"));
        let one = loss_curve_svg(&[(1, 2.0)], &[], "t");
        assert_eq!(one.matches("<polyline").count(), 1);
        assert!(!one.contains("NaN"));
        let none = loss_curve_svg(&[], &[], "t");
        assert_eq!(none.matches("<polyline").count(), 0);
    }

    #[test]
    fn resumed_log_drops_lines_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let rec = |step| MetricsRecord {
            step,
            epoch: 0.0,
            loss: 1.0,
            eval_loss: None,
            lr: 1e-4,
            grad_norm: 0.1,
            tokens: 10,
            tokens_per_s: 5.0,
            peak_rss_mib: 1.0,
            peak_device_mib: None,
            elapsed_s: 1.0,
        };
        let mut log = MetricsLog::open(&p, 0).unwrap();
        for s in 1..=5 {
            log.write(&rec(s)).unwrap();
        }
        drop(log);
        let mut log = MetricsLog::open(&p, 3).unwrap();
        log.write(&rec(4)).unwrap();
        let steps: Vec<usize> = MetricsLog::read_all(&p)
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        // A run killed while appending leaves a torn last line: a resumed run drops it.
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("{\"step\":5,\"epo");
        std::fs::write(&p, text).unwrap();
        assert!(MetricsLog::read_all(&p).is_err());
        drop(MetricsLog::open(&p, 4).unwrap());
        assert_eq!(MetricsLog::read_all(&p).unwrap().len(), 4);
    }
}
