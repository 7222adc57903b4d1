//! `trainer eval`'s costs on the CPU: Inception-v3 pool3 features (real MNIST digits resized to 299x299) and
//! FID in 2048-d space by both paths (sample space for n < d, d x d covariances otherwise).
//! Needs `scripts/fetch-data.sh mnist inception`. Run: cargo bench -p trainer --bench eval

use std::path::Path;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use trainer::eval::fid_features;
use trainer::eval::inception::{InceptionV3, FEATURES};

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let net = InceptionV3::load(&root.join("data/inception/default_1.pt"), &Device::Cpu)
        .expect("needs the Inception weights: scripts/fetch-data.sh inception");
    let mut cfg = trainer::train::config::Config::load(&root.join("trainer/configs/mnist.toml")).unwrap();
    cfg.data.path = root.join("data/mnist");
    cfg.data.limit = 16;
    let data = trainer::data::load(&cfg.data, 28).expect("needs real MNIST: scripts/fetch-data.sh mnist");
    let x: Vec<f32> = (0..16).flat_map(|i| data.image_f32(i)).collect();
    let mut g = c.benchmark_group("eval");
    g.sample_size(10);
    g.bench_function("inception features, 16 MNIST digits, batch 16", |b| {
        b.iter(|| net.features(&x, [1, 28, 28], 16).unwrap())
    });
    let feats = |n: usize, s: f64| -> Vec<Vec<f64>> {
        (0..n).map(|i| (0..FEATURES).map(|j| ((i * 7 + j * 3) as f64 * s).sin().abs()).collect()).collect()
    };
    let (a, b) = (feats(1000, 0.37), feats(1000, 0.91));
    g.bench_function("fid 2048-d, 1000 vs 1000 (sample space)", |bch| bch.iter(|| fid_features(&a, &b)));
    let (a, b) = (feats(2100, 0.37), feats(2100, 0.91));
    g.bench_function("fid 2048-d, 2100 vs 2100 (covariances)", |bch| bch.iter(|| fid_features(&a, &b)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
