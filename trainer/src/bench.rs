//! `trainer bench`: the speed and memory of a training step and of the sampler's model call, on real data.
//!
//! benches/train_speed.py runs it beside benches/torch_unet.py (the same network and step in PyTorch) and
//! prints the ratio; see benches/RESULTS.md.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use runtime::sampler::Denoiser;
use serde::Serialize;

use crate::denoise::CandleDenoiser;
use crate::model::profile;
use crate::train::config::Config;
use crate::train::{Engine, Trainer};

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub engine: String,
    pub threads: usize,
    pub params: usize,
    pub batch: usize,
    /// Median over the timed steps.
    pub train_s_per_step: f64,
    pub train_img_per_s: f64,
    /// The process's peak resident set after the training steps (VmHWM).
    pub peak_rss_mib: f64,
    pub eval_batch: usize,
    /// Image-evaluations per second of the model call the samplers make (EMA weights, no gradients).
    pub eval_img_evals_per_s: Option<f64>,
    /// With `--profile`: where a training step's time goes, and a sampler call's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<ProfileRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub eval_profile: Vec<ProfileRow>,
}

/// One part of a profile: milliseconds per step (or call), share of the whole, and calls per step.
#[derive(Debug, Serialize)]
pub struct ProfileRow {
    pub part: String,
    pub ms: f64,
    pub share: f64,
    pub calls: f64,
}

/// The profile of `reps` runs that took `total_s` in all: each part per run, and what no part holds as "other".
fn profile_rows(reps: usize, total_s: f64) -> Vec<ProfileRow> {
    let parts = profile::take();
    let counted: f64 = parts.iter().map(|(_, p)| p.seconds).sum();
    let per = |s: f64| 1e3 * s / reps as f64;
    let mut rows: Vec<ProfileRow> = parts
        .into_iter()
        .map(|(part, p)| ProfileRow {
            part,
            ms: per(p.seconds),
            share: p.seconds / total_s,
            calls: p.calls as f64 / reps as f64,
        })
        .collect();
    let other = (total_s - counted).max(0.0);
    rows.push(ProfileRow { part: "other (untimed glue)".into(), ms: per(other), share: other / total_s, calls: 0.0 });
    rows
}

/// A profile as a Markdown table.
pub fn profile_table(rows: &[ProfileRow]) -> String {
    let mut s = String::from("| part | ms | share | calls |\n| --- | --- | --- | --- |\n");
    for r in rows {
        s += &format!("| {} | {:.1} | {:.1}% | {} |\n", r.part, r.ms, 100.0 * r.share, r.calls);
    }
    s
}

/// Runs `f` `reps` times with the profile on; its rows per run.
fn profiled(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<ProfileRow>> {
    profile::enable(true);
    let start = Instant::now();
    let r = (0..reps).try_for_each(|_| f());
    let total = start.elapsed().as_secs_f64();
    let rows = profile_rows(reps, total);
    profile::enable(false);
    r.map(|_| rows)
}

/// Peak resident set size of this process in MiB (Linux), 0 where unknown.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `steps` training steps (after `warmup` untimed ones) of `cfg` on its real data, then the
/// denoiser call at `eval_batch` (0: skip); with `profile`, runs both once more with the profile on.
pub fn run(
    cfg: Config,
    device: Device,
    (engine, batch_split): (Engine, bool),
    (steps, warmup, eval_batch): (usize, usize, usize),
    profile: bool,
) -> Result<BenchReport> {
    anyhow::ensure!(steps >= 1, "bench needs at least one timed step");
    let data = crate::data::load(&cfg.data, cfg.model.image_size).context("bench trains on the config's data")?;
    let batch = cfg.train.batch_size;
    let mut t = Trainer::new(cfg, data, device.clone())?;
    t.engine = engine;
    t.batch_split = batch_split;
    let params = t.vars.values().map(|v| v.elem_count()).sum();
    let mut times = vec![];
    for i in 0..warmup + steps {
        let s = Instant::now();
        t.train_step()?;
        if i >= warmup {
            times.push(s.elapsed().as_secs_f64());
        }
    }
    let peak = peak_rss_mib();
    let per_step = median(times);
    let train_profile = if profile { profiled(steps, || t.train_step().map(|_| ()))? } else { vec![] };
    let (mut eval, mut eval_profile) = (None, vec![]);
    if eval_batch > 0 {
        let unet = t.ema_unet()?;
        let m = &t.cfg.model;
        let shape = [eval_batch, m.channels, m.image_size, m.image_size];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let x: Vec<f32> = (0..shape.iter().product()).map(|_| StandardNormal.sample(&mut rng)).collect();
        let ts: Vec<i64> = (0..eval_batch).map(|_| rng.gen_range(0..1000)).collect();
        let ys: Vec<i64> = (0..eval_batch).map(|_| rng.gen_range(0..=m.num_classes as i64)).collect();
        let y = (m.num_classes > 0).then_some(&ys[..]);
        let mut den = CandleDenoiser::new(&unet, &device);
        den.split = batch_split;
        let calls = 4.max(steps / 2);
        let mut times = vec![];
        for i in 0..calls + 1 {
            let s = Instant::now();
            den.eps(&x, shape, &ts, y)?;
            if i > 0 {
                times.push(s.elapsed().as_secs_f64());
            }
        }
        eval = Some(eval_batch as f64 / median(times));
        if profile {
            eval_profile = profiled(calls, || Ok(den.eps(&x, shape, &ts, y).map(|_| ())?))?;
        }
    }
    Ok(BenchReport {
        engine: format!("trainer ({engine:?} engine, {device:?})"),
        threads: rayon::current_num_threads(),
        params,
        batch,
        train_s_per_step: per_step,
        train_img_per_s: batch as f64 / per_step,
        peak_rss_mib: peak,
        eval_batch,
        eval_img_evals_per_s: eval,
        profile: train_profile,
        eval_profile,
    })
}
