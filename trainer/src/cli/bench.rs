//! `trainer bench`: training steps and the sampler's model call timed on real data, as JSON.

use std::path::PathBuf;

use anyhow::Result;
use trainer::train::config::Config;
use trainer::train::{DeviceSpec, Engine};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Config file (its data is read; the model is freshly initialised).
    #[arg(long)]
    config: PathBuf,
    /// Override model.ch.
    #[arg(long)]
    ch: Option<usize>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Timed training steps (the median is reported).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Batch of the timed inference call (0: skip).
    #[arg(long, default_value_t = 64)]
    eval_batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
    /// Run the tape engine's whole batch with all threads on every op, instead of one slice of the batch per
    /// thread (the default; see `train/workers.rs`): to measure what the split gives.
    #[arg(long)]
    no_batch_split: bool,
    /// Then run the steps and calls once more with a profile on: the wall time of each op kind's forward and
    /// backward and of the step's other stages, per step (in the JSON, and as a table on stderr).
    #[arg(long)]
    profile: bool,
}

pub fn run_bench(a: BenchArgs) -> Result<()> {
    let mut cfg = Config::load(&a.config)?;
    if let Some(ch) = a.ch {
        cfg.model.ch = ch;
    }
    cfg.train.batch_size = a.batch_size;
    let device = a.device.open()?;
    let r =
        trainer::bench::run(cfg, device, (a.engine, !a.no_batch_split), (a.steps, a.warmup, a.eval_batch), a.profile)?;
    for (what, rows) in [("training step", &r.profile), ("sampler call", &r.eval_profile)] {
        if !rows.is_empty() {
            eprintln!("{what}:\n{}", trainer::bench::profile_table(rows));
        }
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
