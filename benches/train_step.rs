//! One training step (forward + backward + AdamW + EMA) of the mnist preset at batch 32 on the CPU,
//! on real MNIST (scripts/fetch-data.sh mnist). Run: cargo bench -p trainer --bench train_step

use std::path::Path;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use trainer::train::config::Config;
use trainer::train::Trainer;

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut cfg = Config::load(&root.join("trainer/configs/mnist-ch64.toml")).unwrap();
    cfg.data.path = root.join("data/mnist");
    cfg.train.batch_size = 32;
    let data = trainer::data::load(&cfg.data, cfg.model.image_size)
        .expect("needs real MNIST: run scripts/fetch-data.sh mnist");
    let mut t = Trainer::new(cfg, data, Device::Cpu).unwrap();
    let params: usize = t.vars.values().map(|v| v.elem_count()).sum();
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    g.bench_function(format!("mnist preset ({:.2}M params), batch 32, cpu", params as f64 / 1e6), |b| {
        b.iter(|| t.train_step().unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
