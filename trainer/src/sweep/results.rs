//! A sweep's results, rewritten after every run: OUT/sweep.csv (one row per run), OUT/sweep-summary.csv (the mean
//! and spread over the seeds of each key's values), OUT/sweep-separation.csv (per key and measure, whether its
//! values differ beyond the seeds' spread: a one-way analysis of variance, `anova.rs`) and one figure per measure,
//! with one panel per key: sweep-score.png, sweep-fid.png, and sweep-fid-inception.png and sweep-c2st.png where
//! measured.

use std::path::Path;

use anyhow::Result;
use plotters::style::RGBColor;

use super::anova::one_way;
use super::{SweepRow, SweepSpec};
use crate::plot::{panel_plot, Panel, Series};
use crate::train::checkpoint;

/// Mean and sample standard deviation of the finite values (None when there are none).
pub fn mean_sd(v: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    Some((m, sd))
}

/// A measure of the summary and figures: its name, its file, how to read it (and its floor) from a row.
struct Measure {
    /// The summary's column prefix.
    column: &'static str,
    what: &'static str,
    file: &'static str,
    value: fn(&SweepRow) -> Option<f64>,
    floor: Option<fn(&SweepRow) -> Option<f64>>,
}

const MEASURES: [Measure; 4] = [
    Measure {
        column: "classifier_score",
        what: "classifier score",
        file: "sweep-score.png",
        value: |r| r.score,
        floor: None,
    },
    Measure {
        column: "fid_classifier",
        what: "FID (classifier features)",
        file: "sweep-fid.png",
        value: |r| r.fid_classifier,
        floor: Some(|r| r.fid_classifier_floor),
    },
    Measure {
        column: "fid_inception",
        what: "FID (Inception-v3 features)",
        file: "sweep-fid-inception.png",
        value: |r| r.fid_inception,
        floor: Some(|r| r.fid_inception_floor),
    },
    Measure {
        column: "c2st",
        what: "two-sample test accuracy",
        file: "sweep-c2st.png",
        value: |r| r.c2st,
        floor: Some(|r| r.c2st_floor),
    },
];

/// The mean and spread of one measure over the seeds of one key's value: (mean, sd) and the mean floor.
type Cell = (Option<(f64, f64)>, Option<f64>);

fn cell(m: &Measure, rows: &[&SweepRow]) -> Cell {
    let floor = m.floor.and_then(|f| mean_sd(rows.iter().filter_map(|r| f(r))).map(|d| d.0));
    (mean_sd(rows.iter().filter_map(|r| (m.value)(r))), floor)
}

/// Writes sweep.csv, sweep-summary.csv and the figures from the rows so far.
pub fn write(out: &Path, spec: &SweepSpec, rows: &[SweepRow]) -> Result<()> {
    let f = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
    let mut csv = String::from("key,value,seed,steps,train_seconds");
    for m in &MEASURES {
        csv += &format!(",{}", m.column);
        if m.floor.is_some() {
            csv += &format!(",{}_floor", m.column);
        }
    }
    csv += "\n";
    for r in rows {
        csv += &format!("{},{},{},{},{:.1}", r.key, r.value, r.seed, r.steps, r.train_seconds);
        for m in &MEASURES {
            csv += &format!(",{}", f((m.value)(r)));
            if let Some(fl) = m.floor {
                csv += &format!(",{}", f(fl(r)));
            }
        }
        csv += "\n";
    }
    checkpoint::write_atomic(&out.join("sweep.csv"), csv.as_bytes())?;

    // one summary line per key and value, in the order given; one panel per key in each figure
    let mut summary = String::from("key,value,runs");
    for m in &MEASURES {
        summary += &format!(",{0}_mean,{0}_sd", m.column);
        if m.floor.is_some() {
            summary += &format!(",{}_floor", m.column);
        }
    }
    summary += ",train_seconds_mean\n";
    let mut panels: Vec<Vec<Panel>> = MEASURES.iter().map(|_| vec![]).collect();
    for arm in &spec.arms {
        let numeric = arm.values.iter().all(|v| v.parse::<f64>().is_ok());
        let mut cells: Vec<Vec<(f64, Cell)>> = MEASURES.iter().map(|_| vec![]).collect();
        for (i, v) in arm.values.iter().enumerate() {
            let sel = runs_of(rows, &arm.key, v);
            if sel.is_empty() {
                continue;
            }
            summary += &format!("{},{v},{}", arm.key, sel.len());
            let x = if numeric { v.parse().expect("checked numeric") } else { i as f64 };
            for (m, cells) in MEASURES.iter().zip(&mut cells) {
                let c = cell(m, &sel);
                summary += &format!(",{},{}", f(c.0.map(|d| d.0)), f(c.0.map(|d| d.1)));
                if m.floor.is_some() {
                    summary += &format!(",{}", f(c.1));
                }
                cells.push((x, c));
            }
            summary += &format!(",{}\n", f(mean_sd(sel.iter().map(|r| r.train_seconds)).map(|d| d.0)));
        }
        let x_label = if numeric {
            arm.key.clone()
        } else {
            let named: Vec<String> = arm.values.iter().enumerate().map(|(i, v)| format!("{i}: {v}")).collect();
            format!("{} ({})", arm.key, named.join(", "))
        };
        for ((m, cells), panels) in MEASURES.iter().zip(&cells).zip(&mut panels) {
            if let Some(series) = band(cells) {
                panels.push(Panel {
                    title: format!("{} vs {} ({} seeds)", m.what, arm.key, spec.seeds),
                    x_label: x_label.clone(),
                    y_label: m.what.into(),
                    series,
                    log_y: false,
                });
            }
        }
    }
    checkpoint::write_atomic(&out.join("sweep-summary.csv"), summary.as_bytes())?;
    checkpoint::write_atomic(&out.join("sweep-separation.csv"), separation(spec, rows).as_bytes())?;
    for (m, panels) in MEASURES.iter().zip(&panels) {
        if !panels.is_empty() {
            panel_plot(&out.join(m.file), panels)?;
        }
    }
    Ok(())
}

/// The runs of one key's value.
fn runs_of<'a>(rows: &'a [SweepRow], key: &str, value: &str) -> Vec<&'a SweepRow> {
    rows.iter().filter(|r| r.key == key && r.value == value).collect()
}

/// Per key and measure: the one-way analysis of variance of its values' runs (F, its degrees of freedom and p, the
/// chance of so large a spread between the values if all trained alike); a line only where it is defined.
fn separation(spec: &SweepSpec, rows: &[SweepRow]) -> String {
    let mut csv = String::from("key,measure,values,runs,f,df_between,df_within,p\n");
    for arm in &spec.arms {
        for m in &MEASURES {
            let groups: Vec<Vec<f64>> = arm
                .values
                .iter()
                .map(|v| {
                    runs_of(rows, &arm.key, v).iter().filter_map(|r| (m.value)(r)).filter(|x| x.is_finite()).collect()
                })
                .collect();
            if let Some(a) = one_way(&groups) {
                // k values and n runs give df = (k - 1, n - k)
                let (values, runs) = (a.df.0 + 1, a.df.0 + a.df.1 + 1);
                csv += &format!("{},{},{values},{runs},{},{},{},{}\n", arm.key, m.column, a.f, a.df.0, a.df.1, a.p);
            }
        }
    }
    csv
}

/// The mean over the seeds, mean +- one standard deviation, and the floor where there is one; None when nothing
/// was measured.
fn band(cells: &[(f64, Cell)]) -> Option<Vec<Series<'static>>> {
    let pts: Vec<(f64, (f64, f64))> = cells.iter().filter_map(|(x, (d, _))| d.map(|d| (*x, d))).collect();
    if pts.is_empty() {
        return None;
    }
    let blue = RGBColor(31, 119, 180);
    let light = RGBColor(158, 202, 225);
    let mut series = vec![
        Series { name: "mean over seeds", points: pts.iter().map(|(x, (m, _))| (*x, *m)).collect(), color: blue },
        Series { name: "mean + sd", points: pts.iter().map(|(x, (m, s))| (*x, m + s)).collect(), color: light },
        Series { name: "mean - sd", points: pts.iter().map(|(x, (m, s))| (*x, m - s)).collect(), color: light },
    ];
    let floor: Vec<(f64, f64)> = cells.iter().filter_map(|(x, (_, fl))| fl.map(|fl| (*x, fl))).collect();
    if !floor.is_empty() {
        series.push(Series { name: "real-vs-real floor", points: floor, color: RGBColor(214, 39, 40) });
    }
    Some(series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_has_each_keys_values_with_the_two_sample_test_its_separation_and_a_panel_per_key() {
        let dir = std::env::temp_dir().join(format!("sweep-results-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut spec = crate::sweep::tests::spec(&[("model.kernel_size", &["3", "5"]), ("model.dropout", &["0.0"])]);
        (spec.seeds, spec.eval.c2st) = (2, true);
        let row = |key: &str, value: &str, seed, c2st| SweepRow {
            key: key.into(),
            value: value.into(),
            seed,
            steps: 10,
            train_seconds: 1.0,
            score: Some(0.5),
            fid_classifier: Some(100.0),
            fid_classifier_floor: Some(10.0),
            fid_inception: None,
            fid_inception_floor: None,
            c2st: Some(c2st),
            c2st_floor: Some(0.5),
        };
        let rows = [
            row("model.kernel_size", "3", 0, 0.9),
            row("model.kernel_size", "3", 1, 0.7),
            row("model.kernel_size", "5", 0, 0.6),
            row("model.dropout", "0.0", 0, 0.9),
        ];
        write(&dir, &spec, &rows).unwrap();
        let summary = std::fs::read_to_string(dir.join("sweep-summary.csv")).unwrap();
        let lines: Vec<Vec<&str>> = summary.lines().map(|l| l.split(',').collect()).collect();
        let col = |name: &str| lines[0].iter().position(|h| *h == name).unwrap();
        assert_eq!(lines.len(), 4, "{summary}");
        let k3 = &lines[1];
        assert_eq!((k3[0], k3[1], k3[2]), ("model.kernel_size", "3", "2"));
        let c2st: f64 = k3[col("c2st_mean")].parse().unwrap();
        let sd: f64 = k3[col("c2st_sd")].parse().unwrap();
        assert!((c2st - 0.8).abs() < 1e-12 && (sd - 0.02f64.sqrt()).abs() < 1e-12, "{summary}");
        assert_eq!(k3[col("c2st_floor")], "0.5");
        assert_eq!(k3[col("fid_inception_mean")], "", "not measured: empty");
        assert_eq!((lines[3][0], lines[3][2]), ("model.dropout", "1"));
        // the analysis of variance only where it is defined: kernel size's two-sample test (3: 0.9, 0.7; 5: 0.6),
        // not the measures without spread, not dropout's single value
        let sep = std::fs::read_to_string(dir.join("sweep-separation.csv")).unwrap();
        let sep: Vec<Vec<&str>> = sep.lines().skip(1).map(|l| l.split(',').collect()).collect();
        assert_eq!(sep.len(), 1, "{sep:?}");
        assert_eq!(sep[0][..4], ["model.kernel_size", "c2st", "2", "3"]);
        let (f, p): (f64, f64) = (sep[0][4].parse().unwrap(), sep[0][7].parse().unwrap());
        // between 2 (0.8 - 0.7333)^2 + (0.6 - 0.7333)^2 = 0.02667 over 1, within 0.02 over 1; F(1, 1)'s tail is
        // (2 / pi) asin(sqrt(1 / (1 + F)))
        assert!((f - 4.0 / 3.0).abs() < 1e-9 && (sep[0][5], sep[0][6]) == ("1", "1"), "{sep:?}");
        let want = 2.0 / std::f64::consts::PI * (1.0 / (1.0 + f)).sqrt().asin();
        assert!((p - want).abs() < 1e-9, "p {p}, want {want}");
        // one panel per key, side by side; nothing drawn for what was not measured
        let img = image::open(dir.join("sweep-c2st.png")).unwrap();
        assert!(img.width() > 2 * img.height(), "{}x{}", img.width(), img.height());
        assert!(!dir.join("sweep-fid-inception.png").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
