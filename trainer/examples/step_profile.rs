//! Splits one training step of a preset into forward, backward and optimiser time.
//! cargo run --release -p trainer --example step_profile -- trainer/configs/mnist-ch64.toml 32
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use candle_core::Device;
use trainer::model::random::{DropoutKeys, StepKeys};
use trainer::train::config::Config;
use trainer::train::{make_host_batch, Trainer};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = Config::load(std::path::Path::new(
        args.get(1).map(String::as_str).unwrap_or("trainer/configs/mnist-ch64.toml"),
    ))?;
    cfg.train.batch_size = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(32);
    let data = trainer::data::load(&cfg.data, cfg.model.image_size)?;
    let mut t = Trainer::new(cfg, data, Device::Cpu)?;
    for i in 0..args.get(3).map(|s| s.parse().unwrap()).unwrap_or(4) {
        let keys = StepKeys::new(0, i);
        let b = t.cfg.train.batch_size;
        let idx = t.order.batch(i, b);
        let s = Instant::now();
        let batch = make_host_batch(&t.data, &idx, 0, b, &t.cfg, &t.schedule, &t.timesteps, keys);
        let b = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let (_, loss, _) = t.loss(&batch, &mut DropoutKeys::new(keys, 0))?;
        let f = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let grads = loss.backward()?;
        let bw = s.elapsed().as_secs_f64();
        let s = Instant::now();
        t.opt.step(&trainer::train::optim::Grads::Candle(&grads), 1e-4, 1.0)?;
        t.ema.update(&t.vars)?;
        let o = s.elapsed().as_secs_f64();
        eprintln!("step {i}: batch {b:.3}s forward {f:.3}s backward {bw:.3}s optimiser+ema {o:.3}s");
    }
    Ok(())
}
