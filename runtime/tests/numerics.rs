//! Sampling stays finite: f32 and f16 models, every sampler, guidance from 0 to 10.

use std::path::Path;

use runtime::generator::{GenerateRequest, Generator, GeneratorOptions, SampleOptions};
use runtime::sampler::SamplerKind;

#[test]
fn every_sampler_gives_finite_images_at_any_guidance_in_f32_and_f16() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    runtime::onnx::add_library_candidate(runtime::onnx::setup_library_path(root));
    for model in ["tiny-mnist-f32.onnx", "tiny-mnist-f16.onnx"] {
        let options = GeneratorOptions { threads: Some(2), ..Default::default() };
        let mut g = Generator::open(&root.join("fixtures").join(model), &options).unwrap();
        for sampler in [SamplerKind::Ddim, SamplerKind::DpmSolverPP, SamplerKind::Ddpm] {
            // DDPM runs the chain respaced to the 20 steps, as the others do
            let (n, guidances): (usize, &[f32]) = (4, &[0.0, 1.0, 3.0, 10.0]);
            for &guidance in guidances {
                let req = GenerateRequest {
                    n,
                    sampler,
                    steps: 20,
                    guidance,
                    eta: 0.5,
                    options: SampleOptions { batch: 4, ..Default::default() },
                    ..Default::default()
                };
                let x = g.sample(&g.plan(&req).unwrap(), &mut |_| {}).unwrap();
                let bad = x.iter().filter(|v| !v.is_finite()).count();
                assert_eq!(bad, 0, "{model} {sampler} guidance {guidance}: {bad} non-finite values");
            }
        }
    }
}
