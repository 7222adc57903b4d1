//! `trainer sweep`: a parameter study (seed 004's "average over multiple training runs"). One or several config
//! keys, each varied on its own around the base config (one parameter at a time), each setting trained R times
//! with seeds 0..R, within a step or wall-time budget, each run evaluated (classifier score, FID, optionally the
//! classifier two-sample test); one CSV row per run, a summary CSV and figures of the mean with its spread.
//!
//! Everything lives in the sweep folder: OUT/sweep.json (the settings, checked when the sweep is continued),
//! OUT/KEY=VALUE/seed-R/ (an ordinary run folder with its eval.json), OUT/sweep.csv, OUT/sweep-summary.csv and
//! the figures (`results.rs`). A setting that two keys share (each key's value that is the base's own) trains
//! once, in the folder of the first key that asks for it. A stopped sweep continues where it stopped: finished
//! runs (an eval.json) are kept, a run with a checkpoint is resumed, anything else starts again. A sweep can be
//! split between processes or machines sharing the folder ([`Shard`]): each trains its own share of the runs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use runtime::sampler::{SampleOptions, SamplerKind};
use serde::{Deserialize, Serialize};

use crate::eval::{EvalOptions, EvalReport};
use crate::progress::Progress;
use crate::train::checkpoint;
use crate::train::config::Config;
use crate::train::{fit, DeviceSpec, FitEvent, FitOptions};

mod anova;
mod results;

pub use results::mean_sd;

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
    /// The classifier two-sample test too (seed 004's real-against-generated CNN).
    #[serde(default)]
    pub c2st: bool,
}

/// One parameter of a study: a dotted config key (e.g. `model.ch`, `train.batch_size`) and its values, as TOML
/// values (a number, a quoted string, a list) or bare words (strings), every other key staying at the base's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    pub key: String,
    pub values: Vec<String>,
}

/// What a sweep is: its settings, written to OUT/sweep.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "SpecFile")]
pub struct SweepSpec {
    pub base: Config,
    /// The keys varied, each on its own.
    pub arms: Vec<Arm>,
    /// Runs per setting, with train.seed = 0..seeds.
    pub seeds: usize,
    /// train.steps of every run (None: the base config's).
    pub steps: Option<usize>,
    /// A wall-time budget per run, minutes (None: the step budget alone).
    pub minutes: Option<f64>,
    pub eval: SweepEval,
}

/// sweep.json as read: sweeps from before several keys name one `key` and its `values`.
#[derive(Deserialize)]
struct SpecFile {
    base: Config,
    #[serde(default)]
    arms: Vec<Arm>,
    key: Option<String>,
    #[serde(default)]
    values: Vec<String>,
    seeds: usize,
    steps: Option<usize>,
    minutes: Option<f64>,
    eval: SweepEval,
}

impl From<SpecFile> for SweepSpec {
    fn from(f: SpecFile) -> Self {
        let mut arms = f.arms;
        if let Some(key) = f.key {
            arms.insert(0, Arm { key, values: f.values });
        }
        Self { base: f.base, arms, seeds: f.seeds, steps: f.steps, minutes: f.minutes, eval: f.eval }
    }
}

impl SweepSpec {
    /// The keys, for messages: `model.ch, train.lr`.
    fn keys(&self) -> String {
        self.arms.iter().map(|a| a.key.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// The config of one value of the key: `base` with `key` set to `value`, read back through the config's own
/// checks (unknown keys, typed names, ranges, and the network's own: a `model.ch` that `model.norm_groups` does
/// not divide is refused naming both). A key the base leaves at its default unwritten (`model.kernel_size`) is
/// set all the same.
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
    let neighbours = {
        let mut keys: Vec<&str> = table.keys().map(|k| k.as_str()).collect();
        keys.sort();
        keys.join(", ")
    };
    // an integer where the config holds a float (lr = 1 -> 1.0)
    let parsed = match (table.get(*last), parsed) {
        (Some(toml::Value::Float(_)), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
        (_, p) => p,
    };
    let known = table.insert(last.to_string(), parsed).is_some();
    let cfg: Config = match root.try_into() {
        Ok(c) => c,
        Err(e) if !known && e.to_string().contains("unknown field") => {
            bail!("the config has no key {key}; its neighbours are: {neighbours}")
        }
        Err(e) => return Err(anyhow::Error::from(e).context(format!("{key} = {value} is not a valid value"))),
    };
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
    pub key: String,
    pub value: String,
    pub seed: usize,
    pub steps: usize,
    pub train_seconds: f64,
    pub score: Option<f64>,
    pub fid_classifier: Option<f64>,
    pub fid_classifier_floor: Option<f64>,
    pub fid_inception: Option<f64>,
    pub fid_inception_floor: Option<f64>,
    /// The two-sample test's accuracy, and its real-against-real floor.
    pub c2st: Option<f64>,
    pub c2st_floor: Option<f64>,
}

/// One setting of the sweep: a key's value, its config, and the folder it trains in (shared with an earlier key
/// whose setting is the same config).
#[derive(Debug, Clone)]
pub struct Setting {
    pub key: String,
    pub value: String,
    pub cfg: Config,
    pub folder: String,
}

/// Every setting, each config built and checked before anything trains. Settings with the same config share the
/// first one's folder; two different configs whose values clean to the same folder name are refused.
pub fn plan(spec: &SweepSpec) -> Result<Vec<Setting>> {
    if spec.arms.is_empty() || spec.arms.iter().any(|a| a.values.is_empty()) || spec.seeds == 0 {
        bail!("a sweep needs at least one key, one value of each key and one seed");
    }
    if let Some(dup) = spec.arms.iter().enumerate().find(|(i, a)| spec.arms[..*i].iter().any(|b| b.key == a.key)) {
        bail!("the key {} is given twice: list all its values once", dup.1.key);
    }
    let mut settings: Vec<Setting> = vec![];
    for arm in &spec.arms {
        for v in &arm.values {
            let mut cfg = set_key(&spec.base, &arm.key, v)?;
            if let Some(s) = spec.steps {
                cfg.train.steps = s;
            }
            let own = folder_name(&arm.key, v);
            let folder = match settings.iter().find(|s| same_run(&s.cfg, &cfg)) {
                Some(same) => same.folder.clone(),
                None => {
                    if let Some(clash) = settings.iter().find(|s| s.folder == own) {
                        bail!(
                            "{} = {v} and {} = {} would share the folder {own}: write one of the values differently",
                            arm.key,
                            clash.key,
                            clash.value
                        );
                    }
                    own
                }
            };
            settings.push(Setting { key: arm.key.clone(), value: v.clone(), cfg, folder });
        }
    }
    Ok(settings)
}

/// Whether two configs train the same run (the same network however written, everything else equal).
fn same_run(a: &Config, b: &Config) -> bool {
    let canonical = |c: &Config| Config { model: c.model.canonical(), ..c.clone() };
    canonical(a) == canonical(b)
}

/// The run folder of a setting's seed.
pub fn run_dir(out: &Path, setting: &Setting, seed: usize) -> PathBuf {
    out.join(&setting.folder).join(format!("seed-{seed}"))
}

/// One process's share of a sweep's runs: the k-th of every n (k = 0..n) in the order the sweep would train
/// them, a run that two settings share counted once. Shards of one sweep run side by side on one folder (one per
/// core, or per machine on a shared disk); each writes the tables of the finished runs up to the one it trains,
/// and a last run of the same sweep without a shard writes them whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl Shard {
    /// Every run.
    pub const ALL: Shard = Shard { k: 0, n: 1 };

    fn takes(self, run: usize) -> bool {
        run % self.n == self.k
    }
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    /// `K/N` with K = 1..N, as a user counts (`--shard 1/2`, `--shard 2/2`).
    fn from_str(s: &str) -> Result<Self> {
        let parsed =
            s.split_once('/').and_then(|(k, n)| Some((k.trim().parse::<usize>().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((k, n)) if (1..=n).contains(&k) => Ok(Shard { k: k - 1, n }),
            _ => bail!("--shard {s:?}: write K/N with 1 <= K <= N, e.g. 1/2 and 2/2 for two processes"),
        }
    }
}

/// Runs the sweep (or continues it) and writes its CSVs and figures: all of it, or `shard`'s runs (the rows then
/// hold every finished run up to the one it trains, whichever shard trained it). `progress` hears of every
/// training step and evaluation phase.
pub fn sweep(
    spec: &SweepSpec,
    out: &Path,
    shard: Shard,
    device: DeviceSpec,
    progress: &dyn Progress,
) -> Result<Vec<SweepRow>> {
    if spec.minutes.is_some_and(|m| !(m > 0.0 && m.is_finite())) {
        bail!("the time budget must be a positive number of minutes");
    }
    let settings = plan(spec)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let spec_path = out.join("sweep.json");
    if let Ok(text) = std::fs::read_to_string(&spec_path) {
        let old: SweepSpec = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a sweep's settings", spec_path.display()))?;
        let same = |a: &SweepSpec, b: &SweepSpec| {
            let keys = |s: &SweepSpec| s.arms.iter().map(|a| a.key.clone()).collect::<Vec<_>>();
            (&a.base, keys(a), a.steps, a.minutes, &a.eval) == (&b.base, keys(b), b.steps, b.minutes, &b.eval)
        };
        if !same(&old, spec) {
            bail!(
                "{} holds a sweep of other settings (keys {}, budget or evaluation differ): continue it with the same \
                 ones, or use another --out",
                out.display(),
                old.keys()
            );
        }
    }
    checkpoint::write_atomic(&spec_path, serde_json::to_string_pretty(spec)?.as_bytes())?;
    let mut rows = vec![];
    let mut runs: Vec<PathBuf> = vec![]; // each run once, in training order: what the shards divide
    for s in &settings {
        for seed in 0..spec.seeds {
            let run = run_dir(out, s, seed);
            let nth = runs.iter().position(|r| *r == run).unwrap_or_else(|| {
                runs.push(run.clone());
                runs.len() - 1
            });
            let mut cfg = s.cfg.clone();
            cfg.train.seed = seed as u64;
            if EvalReport::read(&run)?.is_none() {
                if !shard.takes(nth) {
                    continue;
                }
                progress.note(&format!("{} = {}, seed {seed}: {}", s.key, s.value, run.display()));
                train_one(&cfg, &run, device, spec.minutes, progress)?;
                evaluate_one(&run, spec, device, progress)?;
            }
            rows.push(row(&run, s, seed)?);
            results::write(out, spec, &rows)?;
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
        post_hoc_ema: None,
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
        c2st: e.c2st,
        composition: 0,
        attribute_guidance: vec![],
    };
    crate::eval::evaluate(&o, progress).with_context(|| format!("evaluating {}", run.display()))?;
    Ok(())
}

/// The row of a finished run, from its eval.json and metrics.csv.
fn row(run: &Path, s: &Setting, seed: usize) -> Result<SweepRow> {
    let r = EvalReport::read(run)?.with_context(|| format!("{} has no eval.json", run.display()))?;
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap_or_default();
    let train_seconds =
        metrics.lines().last().and_then(|l| l.split(',').nth(4)).and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    Ok(SweepRow {
        key: s.key.clone(),
        value: s.value.clone(),
        seed,
        steps: r.step,
        train_seconds,
        score: r.classifier_score,
        fid_classifier: r.fid_classifier_features,
        fid_classifier_floor: r.fid_floor_train_vs_test,
        fid_inception: r.fid_inception,
        fid_inception_floor: r.fid_inception_floor,
        c2st: r.c2st.as_ref().map(|c| c.accuracy),
        c2st_floor: r.c2st.as_ref().map(|c| c.real_vs_real),
    })
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

    /// A sweep of `arms` (key, values) over the default config, one seed, 10 steps.
    pub(super) fn spec(arms: &[(&str, &[&str])]) -> SweepSpec {
        SweepSpec {
            base: Config::default(),
            arms: arms
                .iter()
                .map(|(k, v)| Arm { key: k.to_string(), values: v.iter().map(|v| v.to_string()).collect() })
                .collect(),
            seeds: 1,
            steps: Some(10),
            minutes: None,
            eval: SweepEval {
                n: 10,
                sampler: SamplerKind::DpmSolverPP,
                steps: 2,
                guidance: 0.0,
                batch: 10,
                inception: None,
                cache: "c".into(),
                c2st: false,
            },
        }
    }

    #[test]
    fn a_study_of_several_keys_trains_the_shared_setting_once_and_checks_every_config_first() {
        // Config::default(): ch 128, norm_groups 32, kernel 3, dropout 0.1, embedding 4 x 128
        let s = spec(&[
            ("model.ch", &["64", "128"]),
            ("model.kernel_size", &["3", "5"]),
            ("model.embed_dim", &["256", "512"]),
        ]);
        let plan = plan(&s).unwrap();
        let folders: Vec<&str> = plan.iter().map(|p| p.folder.as_str()).collect();
        // ch 128, kernel 3 and embedding 512 (= 4 x 128, the default) are the base: one folder, the first key's
        assert_eq!(
            folders,
            [
                "model.ch=64",
                "model.ch=128",
                "model.ch=128",
                "model.kernel_size=5",
                "model.embed_dim=256",
                "model.ch=128"
            ]
        );
        assert_eq!(plan[3].cfg.model.kernel_size, 5);
        assert_eq!(plan[4].cfg.model.embed_dim, Some(256));
        assert!(plan.iter().all(|p| p.cfg.train.steps == 10));
        // a shape key against the config's others: both named, before anything trains
        let e =
            format!("{:#}", super::plan(&spec(&[("train.lr", &["1e-3"]), ("model.ch", &["64", "48"])])).unwrap_err());
        assert!(e.contains("model.ch = 48") && e.contains("norm_groups 32"), "{e}");
        let e = format!("{:#}", super::plan(&spec(&[("model.kernel_size", &["4"])])).unwrap_err());
        assert!(e.contains("kernel_size must be 3, 5 or 7"), "{e}");
        let e = format!("{:#}", super::plan(&spec(&[("model.ch", &["64"]), ("model.ch", &["32"])])).unwrap_err());
        assert!(e.contains("model.ch is given twice"), "{e}");
        let e = format!("{:#}", super::plan(&spec(&[("model.kernel_sise", &["5"])])).unwrap_err());
        assert!(e.contains("no key model.kernel_sise") && e.contains("ch_mult"), "{e}");
        // two settings whose values clean to one folder name
        let e = format!("{:#}", super::plan(&spec(&[("data.path", &["\"a b\"", "\"a_b\""])])).unwrap_err());
        assert!(e.contains("would share the folder"), "{e}");
        // settings written before several keys (key, values) read as one key
        let mut old = serde_json::to_value(spec(&[])).unwrap();
        let o = old.as_object_mut().unwrap();
        o.remove("arms");
        o.insert("key".into(), "train.lr".into());
        o.insert("values".into(), serde_json::json!(["0.001", "0.002"]));
        o.get_mut("eval").unwrap().as_object_mut().unwrap().remove("c2st");
        let read: SweepSpec = serde_json::from_value(old).unwrap();
        assert_eq!(read.arms, [Arm { key: "train.lr".into(), values: vec!["0.001".into(), "0.002".into()] }]);
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
