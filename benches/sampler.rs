//! Runtime benches: sampler overhead per step without a model (a zero denoiser), and ONNX Runtime CPU
//! image-evaluations/s of the fixture model at batch 1, 16 and 64.
//! Run: cargo bench -p runtime --bench sampler

use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use runtime::onnx::{OrtDenoiser, Provider};
use runtime::sampler::{sample, Denoiser, Method, Request, Spacing};
use runtime::schedule::{BetaSchedule, NoiseSchedule};

struct Zero;
impl Denoiser for Zero {
    fn eps(&mut self, x: &[f32], _: [usize; 4], _: &[i64], _: Option<&[i64]>) -> runtime::Result<Vec<f32>> {
        Ok(vec![0.0; x.len()])
    }
}

fn sampler_overhead(c: &mut Criterion) {
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
    let mut g = c.benchmark_group("sampler_overhead_50_steps");
    // a whole 50-step run over 64 images of 3x32x32 with a free (zero) denoiser: divide by 50 for one step
    g.throughput(Throughput::Elements(64));
    for (name, method) in [
        ("ddim", Method::Ddim { steps: 50, eta: 0.0, spacing: Spacing::Trailing }),
        ("ddim_eta1", Method::Ddim { steps: 50, eta: 1.0, spacing: Spacing::Trailing }),
        ("dpm++", Method::DpmSolverPP { steps: 50, spacing: Spacing::Trailing }),
    ] {
        let mut req = Request::new(64, [3, 32, 32], method);
        req.options.batch = 64;
        g.bench_function(name, |b| b.iter(|| sample(&mut Zero, &sched, &req, &mut |_| {}).unwrap()));
    }
    g.finish();
}

fn ort_cpu(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut g = c.benchmark_group("ort_cpu_tiny_mnist_f32");
    g.sample_size(10);
    let mut den = OrtDenoiser::open(&root.join("fixtures/tiny-mnist-f32.onnx"), &Provider::Cpu, None).unwrap();
    for b in [1usize, 16, 64] {
        let x = vec![0.1f32; b * 28 * 28];
        let t: Vec<i64> = (0..b as i64).map(|i| i * 7 % 1000).collect();
        let y: Vec<i64> = (0..b as i64).map(|i| i % 11).collect();
        g.throughput(Throughput::Elements(b as u64));
        g.bench_with_input(BenchmarkId::from_parameter(b), &b, |bn, &b| {
            bn.iter(|| den.eps(&x, [b, 1, 28, 28], &t, Some(&y)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, sampler_overhead, ort_cpu);
criterion_main!(benches);
