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
/// denoiser call at `eval_batch` (0: skip).
pub fn run(
    cfg: Config,
    device: Device,
    engine: Engine,
    steps: usize,
    warmup: usize,
    eval_batch: usize,
) -> Result<BenchReport> {
    anyhow::ensure!(steps >= 1, "bench needs at least one timed step");
    let data = crate::data::load(&cfg.data, cfg.model.image_size).context("bench trains on the config's data")?;
    let batch = cfg.train.batch_size;
    let mut t = Trainer::new(cfg, data, device.clone())?;
    t.engine = engine;
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
    let eval = if eval_batch > 0 {
        let unet = t.ema_unet()?;
        let m = &t.cfg.model;
        let shape = [eval_batch, m.channels, m.image_size, m.image_size];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let x: Vec<f32> = (0..shape.iter().product()).map(|_| StandardNormal.sample(&mut rng)).collect();
        let ts: Vec<i64> = (0..eval_batch).map(|_| rng.gen_range(0..1000)).collect();
        let ys: Vec<i64> = (0..eval_batch).map(|_| rng.gen_range(0..=m.num_classes as i64)).collect();
        let y = (m.num_classes > 0).then_some(&ys[..]);
        let mut den = CandleDenoiser::new(&unet, &device);
        let mut times = vec![];
        for i in 0..4.max(steps / 2) + 1 {
            let s = Instant::now();
            den.eps(&x, shape, &ts, y)?;
            if i > 0 {
                times.push(s.elapsed().as_secs_f64());
            }
        }
        Some(eval_batch as f64 / median(times))
    } else {
        None
    };
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
    })
}
