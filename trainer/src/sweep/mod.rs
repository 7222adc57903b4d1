//! `trainer sweep`: a parameter study (seed 004's "average over multiple training runs"). One config per value of
//! a named key, each trained R times with seeds 0..R, within a step or wall-time budget, each run evaluated
//! (classifier score, FID); one CSV row per run, a summary CSV and plots of the mean with its spread.
//!
//! Everything lives in the sweep folder: OUT/sweep.json (the settings, checked when the sweep is continued),
//! OUT/KEY=VALUE/seed-R/ (an ordinary run folder with its eval.json), OUT/sweep.csv, OUT/sweep-summary.csv and
//! OUT/sweep-score.png, OUT/sweep-fid.png (and OUT/sweep-fid-inception.png with Inception). A stopped sweep
//! continues where it stopped: finished runs (an eval.json) are kept, a run with a checkpoint is resumed,
//! anything else starts again.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use runtime::sampler::{SampleOptions, SamplerKind};
use serde::{Deserialize, Serialize};

use crate::eval::{EvalOptions, EvalReport};
use crate::progress::Progress;
use crate::train::checkpoint;
use crate::train::config::Config;
use crate::train::{fit, DeviceSpec, FitEvent, FitOptions};

/// How each run of a sweep is evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepEval {
    pub n: usize,
    pub sampler: SamplerKind,
    pub steps: usize,
    pub guidance: f32,
    pub batch: usize,
    /// Inception weights, for FID in Inception-v3's features too.
    pub inception: Option<PathBuf>,
    /// Where the evaluation classifier is cached.
    pub cache: PathBuf,
}

/// What a sweep is: its settings, written to OUT/sweep.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSpec {
    pub base: Config,
    /// A dotted config key, e.g. `model.ch` or `train.batch_size`.
    pub key: String,
    /// Its values, as TOML values (a number, a quoted string, a list) or bare words (strings).
    pub values: Vec<String>,
    /// Runs per value, with train.seed = 0..seeds.
    pub seeds: usize,
    /// train.steps of every run (None: the base config's).
    pub steps: Option<usize>,
    /// A wall-time budget per run, minutes (None: the step budget alone).
    pub minutes: Option<f64>,
    pub eval: SweepEval,
}

/// The config of one value of the key: `base` with `key` set to `value`, read back through the config's own
/// checks (unknown keys, typed names).
pub fn set_key(base: &Config, key: &str, value: &str) -> Result<Config> {
    let mut root = toml::Value::try_from(base).context("the base config cannot be written as TOML")?;
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let (last, path) = parts.split_last().context("an empty key")?;
    let mut table = root.as_table_mut().expect("a config is a table");
    for p in path {
        table = match table.get_mut(*p) {
            Some(toml::Value::Table(t)) => t,
            _ => bail!("the config has no section [{p}] (key {key})"),
        };
    }
    let Some(old) = table.get(*last) else {
        let mut keys: Vec<&String> = table.keys().collect();
        keys.sort();
        let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        bail!("the config has no key {key}; its neighbours are: {}", keys.join(", "));
    };
    // an integer where the config holds a float (lr = 1 -> 1.0)
    let parsed = match (old, parsed) {
        (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
        (_, p) => p,
    };
    table.insert(last.to_string(), parsed);
    let cfg: Config = root.try_into().with_context(|| format!("{key} = {value} is not a valid value"))?;
    cfg.validate().with_context(|| format!("{key} = {value}"))?;
    Ok(cfg)
}

/// Splits `--values` at its top-level commas: those inside `[...]`, `{...}` or quotes belong to a value
/// (`[1,2,2],[1,2,2,2]` is two lists). Empty values and unbalanced brackets are refused.
pub fn split_values(text: &str) -> Result<Vec<String>> {
    let (mut values, mut cur, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None);
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                values.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        if depth < 0 {
            bail!("--values {text:?}: a closing bracket without its opening one");
        }
        cur.push(c);
    }
    if depth != 0 || quote.is_some() {
        bail!("--values {text:?}: an unclosed bracket or quote");
    }
    values.push(cur);
    let values: Vec<String> = values.into_iter().map(|v| v.trim().to_string()).collect();
    if values.iter().any(|v| v.is_empty()) {
        bail!("--values {text:?}: an empty value (two commas in a row, or one at an end)");
    }
    Ok(values)
}

/// A value as a folder name: letters, digits, '.', '-' and '_' kept, anything else '_'.
fn folder_name(key: &str, value: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' }).collect()
    };
    format!("{}={}", clean(key), clean(value))
}

/// One run's outcome: a row of sweep.csv.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRow {
    pub value: String,
    pub seed: usize,
    pub steps: usize,
    pub train_seconds: f64,
    pub score: Option<f64>,
    pub fid_classifier: Option<f64>,
    pub fid_classifier_floor: Option<f64>,
    pub fid_inception: Option<f64>,
    pub fid_inception_floor: Option<f64>,
}

/// The run folder of (value, seed).
pub fn run_dir(out: &Path, spec: &SweepSpec, value: &str, seed: usize) -> PathBuf {
    out.join(folder_name(&spec.key, value)).join(format!("seed-{seed}"))
}

/// Runs the sweep (or continues it) and writes its CSVs and plots. `progress` hears of every training step and
/// evaluation phase.
pub fn sweep(spec: &SweepSpec, out: &Path, device: DeviceSpec, progress: &dyn Progress) -> Result<Vec<SweepRow>> {
    if spec.values.is_empty() || spec.seeds == 0 {
        bail!("a sweep needs at least one value and one seed");
    }
    if spec.minutes.is_some_and(|m| !(m > 0.0 && m.is_finite())) {
        bail!("the time budget must be a positive number of minutes");
    }
    // every config is built (and checked) before anything trains
    let mut cfgs = vec![];
    for v in &spec.values {
        let mut cfg = set_key(&spec.base, &spec.key, v)?;
        if let Some(s) = spec.steps {
            cfg.train.steps = s;
        }
        cfgs.push(cfg);
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let spec_path = out.join("sweep.json");
    if let Ok(text) = std::fs::read_to_string(&spec_path) {
        let old: SweepSpec = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a sweep's settings", spec_path.display()))?;
        let same = |a: &SweepSpec, b: &SweepSpec| {
            (&a.base, &a.key, a.steps, a.minutes, &a.eval) == (&b.base, &b.key, b.steps, b.minutes, &b.eval)
        };
        if !same(&old, spec) {
            bail!(
                "{} holds a sweep of other settings (key {}, budget or evaluation differ): continue it with the same \
                 ones, or use another --out",
                out.display(),
                old.key
            );
        }
    }
    checkpoint::write_atomic(&spec_path, serde_json::to_string_pretty(spec)?.as_bytes())?;
    let mut rows = vec![];
    for (v, cfg) in spec.values.iter().zip(&cfgs) {
        for seed in 0..spec.seeds {
            let run = run_dir(out, spec, v, seed);
            let mut cfg = cfg.clone();
            cfg.train.seed = seed as u64;
            if EvalReport::read(&run)?.is_none() {
                progress.note(&format!("{} = {v}, seed {seed}: {}", spec.key, run.display()));
                train_one(&cfg, &run, device, spec.minutes, progress)?;
                evaluate_one(&run, spec, device, progress)?;
            }
            rows.push(row(&run, v, seed)?);
            write_results(out, spec, &rows)?;
        }
    }
    Ok(rows)
}

/// Trains one run to its step target or time budget: resumed from its newest checkpoint when it has one.
fn train_one(
    cfg: &Config,
    run: &Path,
    device: DeviceSpec,
    minutes: Option<f64>,
    progress: &dyn Progress,
) -> Result<()> {
    let resume = checkpoint::list(run).map(|c| !c.is_empty()).unwrap_or(false);
    let opts = FitOptions {
        out: run.to_path_buf(),
        device,
        resume,
        force: !resume,
        max_steps_now: None,
        max_seconds: minutes.map(|m| m * 60.0),
        engine: Default::default(),
    };
    progress.begin("training", cfg.train.steps as u64);
    let r = fit(Some(cfg.clone()), &opts, &mut |e| match e {
        FitEvent::Started { step, .. } => progress.advance(step as u64, None),
        FitEvent::Step { stats, .. } => progress.advance(1, Some(&format!("loss {:.4}", stats.loss))),
        FitEvent::Warning(w) | FitEvent::Note(w) => progress.note(w),
        FitEvent::Preview(_) => {}
    });
    progress.end();
    r.with_context(|| format!("training {}", run.display()))?;
    Ok(())
}

fn evaluate_one(run: &Path, spec: &SweepSpec, device: DeviceSpec, progress: &dyn Progress) -> Result<()> {
    let e = &spec.eval;
    let o = EvalOptions {
        run: run.to_path_buf(),
        checkpoint: "latest".into(),
        n: e.n,
        steps: e.steps,
        sampler: e.sampler,
        guidance: e.guidance,
        class_mix: Default::default(),
        sample: SampleOptions { seed: 0, batch: e.batch, ..Default::default() },
        cache: e.cache.clone(),
        inception: e.inception.clone(),
        classifier: true,
        sweep_guidance: vec![],
        sweep_steps: vec![],
        nearest: 0,
        device: device.open()?,
        model: None,
        nll: 0,
        c2st: false,
        composition: 0,
        attribute_guidance: vec![],
    };
    crate::eval::evaluate(&o, progress).with_context(|| format!("evaluating {}", run.display()))?;
    Ok(())
}

/// The row of a finished run, from its eval.json and metrics.csv.
fn row(run: &Path, value: &str, seed: usize) -> Result<SweepRow> {
    let r = EvalReport::read(run)?.with_context(|| format!("{} has no eval.json", run.display()))?;
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap_or_default();
    let train_seconds =
        metrics.lines().last().and_then(|l| l.split(',').nth(4)).and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    Ok(SweepRow {
        value: value.to_string(),
        seed,
        steps: r.step,
        train_seconds,
        score: r.classifier_score,
        fid_classifier: r.fid_classifier_features,
        fid_classifier_floor: r.fid_floor_train_vs_test,
        fid_inception: r.fid_inception,
        fid_inception_floor: r.fid_inception_floor,
    })
}

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

/// sweep.csv, sweep-summary.csv and the plots (score; FID in the classifier's and in Inception's features, where
/// measured), from the rows so far.
fn write_results(out: &Path, spec: &SweepSpec, rows: &[SweepRow]) -> Result<()> {
    let f = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
    let mut csv = String::from(
        "key,value,seed,steps,train_seconds,classifier_score,fid_classifier,fid_classifier_floor,fid_inception,fid_inception_floor\n",
    );
    for r in rows {
        csv += &format!(
            "{},{},{},{},{:.1},{},{},{},{},{}\n",
            spec.key,
            r.value,
            r.seed,
            r.steps,
            r.train_seconds,
            f(r.score),
            f(r.fid_classifier),
            f(r.fid_classifier_floor),
            f(r.fid_inception),
            f(r.fid_inception_floor)
        );
    }
    checkpoint::write_atomic(&out.join("sweep.csv"), csv.as_bytes())?;
    // one summary line per value, in the order given
    let numeric = spec.values.iter().all(|v| v.parse::<f64>().is_ok());
    let x_of = |i: usize, v: &str| if numeric { v.parse().unwrap() } else { i as f64 };
    let mut summary = String::from(
        "key,value,runs,score_mean,score_sd,fid_classifier_mean,fid_classifier_sd,fid_classifier_floor,\
         fid_inception_mean,fid_inception_sd,fid_inception_floor,train_seconds_mean\n",
    );
    let (mut score, mut fid, mut floor, mut fid_inc, mut floor_inc) = (vec![], vec![], vec![], vec![], vec![]);
    for (i, v) in spec.values.iter().enumerate() {
        let sel: Vec<&SweepRow> = rows.iter().filter(|r| &r.value == v).collect();
        if sel.is_empty() {
            continue;
        }
        let s = mean_sd(sel.iter().filter_map(|r| r.score));
        let d = mean_sd(sel.iter().filter_map(|r| r.fid_classifier));
        let fl = mean_sd(sel.iter().filter_map(|r| r.fid_classifier_floor));
        let di = mean_sd(sel.iter().filter_map(|r| r.fid_inception));
        let fli = mean_sd(sel.iter().filter_map(|r| r.fid_inception_floor));
        let secs = mean_sd(sel.iter().map(|r| r.train_seconds));
        summary += &format!(
            "{},{v},{},{},{},{},{},{},{},{},{},{}\n",
            spec.key,
            sel.len(),
            f(s.map(|s| s.0)),
            f(s.map(|s| s.1)),
            f(d.map(|d| d.0)),
            f(d.map(|d| d.1)),
            f(fl.map(|d| d.0)),
            f(di.map(|d| d.0)),
            f(di.map(|d| d.1)),
            f(fli.map(|d| d.0)),
            f(secs.map(|d| d.0))
        );
        let x = x_of(i, v);
        score.extend(s.map(|s| (x, s)));
        fid.extend(d.map(|d| (x, d)));
        floor.extend(fl.map(|d| (x, d.0)));
        fid_inc.extend(di.map(|d| (x, d)));
        floor_inc.extend(fli.map(|d| (x, d.0)));
    }
    checkpoint::write_atomic(&out.join("sweep-summary.csv"), summary.as_bytes())?;
    let x_label = if numeric {
        spec.key.clone()
    } else {
        format!(
            "{} ({})",
            spec.key,
            spec.values.iter().enumerate().map(|(i, v)| format!("{i}: {v}")).collect::<Vec<_>>().join(", ")
        )
    };
    let runs = format!("{} seeds", spec.seeds);
    let plots = [
        ("sweep-score.png", "classifier score", "classifier score", &score, None),
        ("sweep-fid.png", "FID (classifier features)", "FID", &fid, Some(&floor)),
        ("sweep-fid-inception.png", "FID (Inception-v3 features)", "FID", &fid_inc, Some(&floor_inc)),
    ];
    for (file, what, y_label, pts, floor) in plots {
        band_plot(
            &out.join(file),
            &format!("{what} vs {} ({runs})", spec.key),
            &x_label,
            y_label,
            pts,
            floor.map(|f| &f[..]),
        )?;
    }
    Ok(())
}

/// A value's x and its (mean, sd) over the seeds.
type Band = (f64, (f64, f64));

/// Mean and mean +- one standard deviation over the seeds (and a floor line), when there is something to draw.
fn band_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    pts: &[Band],
    floor: Option<&[(f64, f64)]>,
) -> Result<()> {
    use crate::plot::{line_plot, Series};
    use plotters::style::RGBColor;
    if pts.is_empty() {
        return Ok(());
    }
    let blue = RGBColor(31, 119, 180);
    let light = RGBColor(158, 202, 225);
    let mut series = vec![
        Series { name: "mean over seeds", points: pts.iter().map(|(x, (m, _))| (*x, *m)).collect(), color: blue },
        Series { name: "mean + sd", points: pts.iter().map(|(x, (m, s))| (*x, m + s)).collect(), color: light },
        Series { name: "mean - sd", points: pts.iter().map(|(x, (m, s))| (*x, m - s)).collect(), color: light },
    ];
    if let Some(f) = floor {
        series.push(Series { name: "real-vs-real floor", points: f.to_vec(), color: RGBColor(214, 39, 40) });
    }
    line_plot(path, title, x_label, y_label, &series, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_set_through_the_configs_own_checks() {
        let base = Config::default();
        assert_eq!(set_key(&base, "model.ch", "64").unwrap().model.ch, 64);
        assert_eq!(set_key(&base, "train.lr", "1").unwrap().train.lr, 1.0);
        assert_eq!(set_key(&base, "model.ch_mult", "[1, 2]").unwrap().model.ch_mult, vec![1, 2]);
        let c = set_key(&base, "diffusion.schedule", "cosine").unwrap();
        assert_eq!(c.diffusion.schedule, runtime::schedule::ScheduleKind::Cosine);
        let e = format!("{:#}", set_key(&base, "model.chh", "3").unwrap_err());
        assert!(e.contains("no key model.chh") && e.contains("ch_mult"), "{e}");
        let e = format!("{:#}", set_key(&base, "modle.ch", "3").unwrap_err());
        assert!(e.contains("no section [modle]"), "{e}");
        let e = format!("{:#}", set_key(&base, "diffusion.schedule", "sigmoid").unwrap_err());
        assert!(e.contains("unknown beta schedule 'sigmoid'"), "{e}");
        let e = format!("{:#}", set_key(&base, "train.batch_size", "0").unwrap_err());
        assert!(e.contains("batch_size"), "{e}");
        assert_eq!(folder_name("model.ch", "[1, 2]"), "model.ch=_1__2_");
    }

    #[test]
    fn values_split_at_top_level_commas_only() {
        let v = split_values("[1,2,2], [1,2,2,2],{hflip=true, rotate_degrees=10},\"a,b\",cosine").unwrap();
        assert_eq!(v, ["[1,2,2]", "[1,2,2,2]", "{hflip=true, rotate_degrees=10}", "\"a,b\"", "cosine"]);
        let base = Config::default();
        let c = set_key(&base, "data.augment", &v[2]).unwrap();
        assert!(c.data.augment.hflip && c.data.augment.rotate_degrees == 10.0 && c.data.augment.brightness == 0.0);
        for bad in ["1,,2", "[1,2", "1,2]", "{a=1", "1,"] {
            assert!(split_values(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mean_and_spread_over_seeds() {
        assert_eq!(mean_sd([1.0, 3.0].into_iter()), Some((2.0, 2f64.sqrt())));
        assert_eq!(mean_sd([5.0, f64::NAN].into_iter()), Some((5.0, 0.0)));
        assert_eq!(mean_sd(std::iter::empty()), None);
    }
}
