//! PNG figures drawn with plotters: loss curves, line plots and figures of several line plots.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// DejaVu Sans Mono (free licence, see assets/DejaVu-LICENSE.txt), embedded so figures need no system font.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            panic!("the embedded font is not a valid TrueType font");
        }
    });
}

/// Series with at most this many points are drawn with a marker at each.
const MARKED_POINTS: usize = 32;

/// One named line of a plot.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
}

/// One chart of a figure: its title, axis labels and lines.
pub struct Panel<'a> {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series<'a>>,
    /// A logarithmic y axis.
    pub log_y: bool,
}

/// A line plot with axes, labels and a legend. `log_y` uses a logarithmic y axis.
pub fn line_plot(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series], log_y: bool) -> Result<()> {
    register_font();
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    draw_chart(&root, title, x_label, y_label, series, log_y).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Several line plots in one figure, two to a row (a study's parameters side by side).
pub fn panel_plot(path: &Path, panels: &[Panel]) -> Result<()> {
    register_font();
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let cols = panels.len().clamp(1, 2);
    let rows = panels.len().div_ceil(cols).max(1);
    let root = BitMapBackend::new(path, (720 * cols as u32, 450 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    for (area, p) in root.split_evenly((rows, cols)).iter().zip(panels) {
        draw_chart(area, &p.title, &p.x_label, &p.y_label, &p.series, p.log_y)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Draws one chart (axes, labels, lines, legend) into `area`.
fn draw_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    // the points the axes can show: finite, and positive on a log axis
    let drawable = |(_, y): &(f64, f64)| y.is_finite() && (!log_y || *y > 0.0);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| drawable(p));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(*x), x1.max(*x), y0.min(*y), y1.max(*y));
    }
    if x0 > x1 {
        return Err(anyhow!("nothing to plot in {title:?}"));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 * 1.1 + 1e-6;
    }
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {title:?}: {e}");
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .x_label_formatter(&|v| fmt_num(*v))
                .y_label_formatter(&|v| fmt_num(*v))
                .draw()
                .map_err(|e| err(&e))?;
            for s in series {
                let c = s.color;
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied().filter(drawable), c.stroke_width(2)))
                    .map_err(|e| err(&e))?
                    .label(s.name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
                // a few points (a sweep's values) get markers, so a lone point shows too
                if s.points.len() <= MARKED_POINTS {
                    let marked = s.points.iter().copied().filter(drawable).map(|p| Circle::new(p, 3, c.filled()));
                    chart.draw_series(marked).map_err(|e| err(&e))?;
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    let mut builder = ChartBuilder::on(area);
    builder.caption(title, ("sans-serif", 22)).margin(12).x_label_area_size(40).y_label_area_size(70);
    if log_y {
        draw!(builder.build_cartesian_2d(x0..x1, (y0 * 0.9..y1 * 1.1).log_scale()).map_err(|e| err(&e))?);
    } else {
        let pad = (y1 - y0) * 0.05;
        draw!(builder.build_cartesian_2d(x0..x1, y0 - pad..y1 + pad).map_err(|e| err(&e))?);
    }
    Ok(())
}

/// Axis labels: integers as integers, other values with 3 significant digits.
fn fmt_num(v: f64) -> String {
    if v == v.round() && v.abs() < 1e9 {
        format!("{}", v as i64)
    } else if v.abs() >= 1e-3 && v.abs() < 1e4 {
        let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
        format!("{v:.digits$}")
    } else {
        format!("{v:.2e}")
    }
}

/// The loss curve of a run: raw per-step loss and its exponential moving average, log scale.
pub fn loss_curve(losses: &[(usize, f64)], path: &Path, title: &str) -> Result<()> {
    let raw: Vec<(f64, f64)> = losses.iter().map(|(s, l)| (*s as f64, *l)).collect();
    let alpha = 2.0 / (1.0 + (losses.len() as f64 / 20.0).clamp(5.0, 200.0));
    let mut smooth = Vec::with_capacity(raw.len());
    let mut m = f64::NAN;
    for (s, l) in &raw {
        m = if m.is_nan() { *l } else { m + alpha * (l - m) };
        smooth.push((*s, m));
    }
    line_plot(
        path,
        title,
        "step",
        "loss",
        &[
            Series { name: "loss", points: raw, color: RGBColor(170, 190, 230) },
            Series { name: "smoothed", points: smooth, color: RGBColor(20, 60, 160) },
        ],
        true,
    )
}

/// alpha-bar_t of the linear and cosine schedules over T steps (the improved-DDPM figure 5 comparison).
pub fn schedules(num_timesteps: usize, path: &Path) -> Result<()> {
    use runtime::schedule::{BetaSchedule, NoiseSchedule, ScheduleKind};
    let curve = |k: BetaSchedule| -> Vec<(f64, f64)> {
        let s = NoiseSchedule::new(k, num_timesteps);
        s.alphas_cumprod.iter().enumerate().map(|(t, a)| (t as f64 / (num_timesteps - 1) as f64, *a)).collect()
    };
    line_plot(
        path,
        &format!("alpha-bar over diffusion time (T = {num_timesteps})"),
        "t / T",
        "alpha-bar",
        &[
            Series {
                name: "linear (Ho et al. 2020)",
                points: curve(BetaSchedule::named(ScheduleKind::Linear, num_timesteps)),
                color: RGBColor(200, 60, 40),
            },
            Series {
                name: "cosine (Nichol & Dhariwal 2021)",
                points: curve(BetaSchedule::COSINE),
                color: RGBColor(20, 60, 160),
            },
        ],
        false,
    )
}

/// Per-channel histograms of x_t at several t, as lines over [-4, 4] (one PNG per channel).
pub fn histograms(
    samples: &[(usize, Vec<f32>)],
    channels: usize,
    path_for: impl Fn(usize) -> std::path::PathBuf,
) -> Result<Vec<std::path::PathBuf>> {
    let colors = [
        RGBColor(20, 20, 20),
        RGBColor(200, 60, 40),
        RGBColor(40, 150, 60),
        RGBColor(20, 60, 160),
        RGBColor(150, 60, 170),
    ];
    let bins = 64;
    let mut out = vec![];
    for c in 0..channels {
        let mut series = vec![];
        for (k, (t, x)) in samples.iter().enumerate() {
            let n = x.len() / channels;
            let vals = &x[c * n..(c + 1) * n];
            let mut h = vec![0f64; bins];
            for v in vals {
                let b = (((*v as f64 + 4.0) / 8.0) * bins as f64).floor();
                if (0.0..bins as f64).contains(&b) {
                    h[b as usize] += 1.0;
                }
            }
            let pts: Vec<(f64, f64)> = h
                .iter()
                .enumerate()
                .map(|(i, c)| (-4.0 + (i as f64 + 0.5) * 8.0 / bins as f64, c / n as f64))
                .collect();
            let name = format!("t = {t}");
            series.push((name, pts, colors[k % colors.len()]));
        }
        let s: Vec<Series> = series.iter().map(|(n, p, c)| Series { name: n, points: p.clone(), color: *c }).collect();
        let p = path_for(c);
        line_plot(&p, &format!("pixel histogram of x_t, channel {c}"), "value", "fraction", &s, false)?;
        out.push(p);
    }
    Ok(out)
}
