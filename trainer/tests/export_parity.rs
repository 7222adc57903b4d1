//! The exported ONNX graph computes what the Candle model computes: ONNX Runtime (CPU, via the runtime
//! crate) and candle-onnx's simple_eval against Candle, f32 and f16, conditional and unconditional,
//! attention at two resolutions, scale-shift on and off, batch 1 and 7.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::ort;
use prost::Message;
use rand::{Rng, SeedableRng};
use runtime::metadata::{Dtype, Prediction, Weights};
use runtime::onnx::{OrtDenoiser, Provider};
use runtime::sampler::Denoiser;
use trainer::model::ops::CandleOps;
use trainer::model::params::{ShapeCounter, TensorSource};
use trainer::model::unet::{Attribute, UNet, UNetConfig};
use trainer::onnx::{build_model, candle_onnx_eval, candle_onnx_eval_w, metadata};
use trainer::train::checkpoint::{RngState, State};
use trainer::train::config::Config;

/// A U-Net whose every weight is random (the zero-initialised output layers would make parity trivial).
fn random_unet(cfg: &UNetConfig, seed: u64) -> UNet {
    let mut counter = ShapeCounter::default();
    UNet::new(cfg.clone(), &mut counter).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut map = HashMap::new();
    for (name, shape) in counter.shapes {
        let n: usize = shape.iter().product();
        let fan_in = if shape.len() > 1 { shape[1..].iter().product::<usize>() } else { 1 };
        let b = if name.ends_with("n1.weight")
            || name.contains(".n.weight")
            || name.ends_with("n2.weight")
            || name == "out.0.weight"
        {
            1.0
        } else {
            1.0 / (fan_in as f64).sqrt()
        };
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-b..b) as f32 + if b == 1.0 { 1.0 } else { 0.0 }).collect();
        map.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    }
    let mut src = TensorSource::new(&map, "random");
    let u = UNet::new(cfg.clone(), &mut src).unwrap();
    src.finish().unwrap();
    u
}

fn state_for(cfg: &UNetConfig) -> State {
    let mut c = Config { model: cfg.clone(), ..Default::default() };
    if cfg.learn_sigma {
        c.diffusion.variance = trainer::train::config::VarianceType::LearnedRange;
    }
    c.diffusion.prediction = cfg.prediction;
    if cfg.guidance_embed {
        // a guidance input comes with a distillation: a 4-step student of an 8-step teacher
        c.distill = Some(trainer::train::config::DistillConfig {
            method: "progressive".into(),
            teacher: "teacher.onnx".into(),
            teacher_sha256: "0".into(),
            teacher_steps: 8,
            student_steps: 4,
            guidance_max: 4.0,
            guidance: 2.0,
            guidance_interval: None,
            clip_teacher_x0: false,
        });
    }
    State {
        format_version: 1,
        trainer_version: "test".into(),
        step: 0,
        config: c,
        rng: RngState { algorithm: "test".into(), seed: 0, next_stream: 0 },
        data_fingerprint: "0".into(),
        data_description: "random weights".into(),
        class_names: (0..cfg.num_classes).map(|i| format!("c{i}")).collect(),
        num_params: 0,
        recent_loss: 0.0,
        elapsed_s: 0.0,
        device: "cpu".into(),
        timestep_history: None,
    }
}

fn write_onnx(unet: &UNet, dtype: Dtype, tag: &str) -> (PathBuf, candle_onnx::onnx::ModelProto) {
    let md = metadata(&state_for(&unet.cfg), Weights::Raw, dtype, None).unwrap().to_props();
    let model = build_model(unet, dtype, 17, &md).unwrap();
    let p = std::env::temp_dir().join(format!("parity-{tag}-{}.onnx", std::process::id()));
    std::fs::write(&p, model.encode_to_vec()).unwrap();
    (p, model)
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

struct Case {
    name: &'static str,
    cfg: UNetConfig,
}

fn cases() -> Vec<Case> {
    let base = UNetConfig {
        channels: 3,
        image_size: 16,
        ch: 32,
        ch_mult: vec![1, 2, 2],
        num_res_blocks: 1,
        attention_resolutions: vec![8, 4],
        num_heads: 2,
        dropout: 0.1,
        use_scale_shift_norm: false,
        num_classes: 0,
        attributes: vec![],
        guidance_embed: false,
        norm_groups: 8,
        kernel_size: 3,
        embed_dim: None,
        learn_sigma: false,
        prediction: Prediction::Epsilon,
    };
    vec![
        Case { name: "uncond-attn8,4-add", cfg: base.clone() },
        Case {
            name: "cond-attn16,8-scaleshift",
            cfg: UNetConfig {
                channels: 1,
                num_classes: 5,
                use_scale_shift_norm: true,
                attention_resolutions: vec![16, 8],
                num_heads: 1,
                ..base.clone()
            },
        },
        // a learned variance: 2C output channels, exported as the outputs eps and v
        Case { name: "cond-learned-sigma", cfg: UNetConfig { num_classes: 3, learn_sigma: true, ..base.clone() } },
        // multi-attribute conditioning: y [B, 3], one embedding per column
        Case {
            name: "cond-attributes",
            cfg: UNetConfig {
                num_classes: 3,
                attributes: vec![
                    Attribute { name: "position".into(), values: ["0", "1", "2", "3"].map(String::from).to_vec() },
                    Attribute { name: "size".into(), values: ["small", "large"].map(String::from).to_vec() },
                ],
                ..base.clone()
            },
        },
        // seed 004's shape keys: 5x5 convolutions (the stride-2 one included) and a narrower embedding
        Case {
            name: "cond-kernel5-embed48",
            cfg: UNetConfig { num_classes: 4, kernel_size: 5, embed_dim: Some(48), ..base.clone() },
        },
        // v-prediction with a learned variance: the outputs velocity and v, read back by the runtime by name
        Case {
            name: "uncond-v-learned-sigma",
            cfg: UNetConfig { learn_sigma: true, prediction: Prediction::V, ..base },
        },
    ]
}

/// eps and v of each image one after the other, as the U-Net outputs them.
fn joined(eps: Vec<f32>, v: Option<Vec<f32>>, per: usize) -> Vec<f32> {
    match v {
        Some(v) => eps.chunks(per).zip(v.chunks(per)).flat_map(|(e, v)| [e, v].concat()).collect(),
        None => eps,
    }
}

fn inputs(cfg: &UNetConfig, b: usize, seed: u64) -> (Vec<f32>, Vec<i64>, Vec<i64>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = b * cfg.channels * cfg.image_size * cfg.image_size;
    let x = (0..n).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
    let t = (0..b).map(|_| rng.gen_range(0..1000)).collect();
    let nulls = cfg.label_nulls();
    let y = (0..b).flat_map(|_| nulls.iter().map(|&k| rng.gen_range(0..=k)).collect::<Vec<_>>()).collect();
    (x, t, y)
}

fn candle_eps(unet: &UNet, x: &[f32], t: &[i64], y: &[i64]) -> Vec<f32> {
    let cfg = &unet.cfg;
    let b = t.len();
    let xs = Tensor::from_vec(x.to_vec(), (b, cfg.channels, cfg.image_size, cfg.image_size), &Device::Cpu).unwrap();
    let ts = Tensor::from_vec(t.to_vec(), b, &Device::Cpu).unwrap();
    let ys = (cfg.num_classes > 0).then(|| Tensor::from_vec(y.to_vec(), cfg.label_dims(b), &Device::Cpu).unwrap());
    let mut ops = CandleOps::inference(&Device::Cpu, DType::F32);
    let yo = ys.as_ref();
    unet.forward(&mut ops, &xs, &ts, yo).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn onnx_runtime_and_candle_onnx_match_candle() {
    ort();
    for case in cases() {
        let unet = random_unet(&case.cfg, 7);
        let (p32, model32) = write_onnx(&unet, Dtype::F32, &format!("{}-f32", case.name));
        let (p16, _) = write_onnx(&unet, Dtype::F16, &format!("{}-f16", case.name));
        let mut ort32 = OrtDenoiser::open(&p32, &Provider::Cpu, Some(2)).unwrap();
        let mut ort16 = OrtDenoiser::open(&p16, &Provider::Cpu, Some(2)).unwrap();
        let cfg = &case.cfg;
        for b in [1usize, 7] {
            let (x, t, y) = inputs(cfg, b, b as u64);
            let reference = candle_eps(&unet, &x, &t, &y);
            assert!(reference.iter().any(|v| v.abs() > 1e-3), "{}: degenerate output", case.name);
            let shape = [b, cfg.channels, cfg.image_size, cfg.image_size];
            let yo = (cfg.num_classes > 0).then_some(&y[..]);
            let per = cfg.channels * cfg.image_size * cfg.image_size;
            let (e32, v32) = ort32.eps_and_v(&x, shape, &t, yo).unwrap();
            assert_eq!(v32.is_some(), cfg.learn_sigma, "{}: v output", case.name);
            // eps alone is the first half of each image's output
            let eps_ref: Vec<f32> =
                reference.chunks(cfg.out_channels() * per / cfg.channels).flat_map(|o| o[..per].to_vec()).collect();
            assert_eq!(ort32.eps(&x, shape, &t, yo).unwrap(), e32);
            let e32 = joined(e32, v32, per);
            let r = rel_err(&e32, &reference);
            assert!(r <= 1e-4, "{} b{b}: ORT f32 relative error {r}", case.name);
            let (e16, v16) = ort16.eps_and_v(&x, shape, &t, yo).unwrap();
            let r16 = rel_err(&joined(e16, v16, per), &reference);
            assert!(r16 <= 2e-2, "{} b{b}: ORT f16 relative error {r16}", case.name);
            // candle-onnx reads the f32 export independently
            let xs = Tensor::from_vec(x.clone(), shape.to_vec(), &Device::Cpu).unwrap();
            let ts = Tensor::from_vec(t.clone(), b, &Device::Cpu).unwrap();
            let ys =
                (cfg.num_classes > 0).then(|| Tensor::from_vec(y.clone(), cfg.label_dims(b), &Device::Cpu).unwrap());
            let co = candle_onnx_eval(&model32, &xs, &ts, ys.as_ref()).unwrap();
            let co: Vec<f32> = co.flatten_all().unwrap().to_vec1().unwrap();
            let rc = rel_err(&co, &eps_ref);
            assert!(rc <= 1e-4, "{} b{b}: candle-onnx relative error {rc}", case.name);
            eprintln!("{} b{b}: ort f32 {r:.2e}, ort f16 {r16:.2e}, candle-onnx {rc:.2e}", case.name);
        }
        std::fs::remove_file(p32).unwrap();
        std::fs::remove_file(p16).unwrap();
    }
}

/// A distilled student: the guidance weight w is a fourth input (f32 in f16 files too), read by ONNX Runtime and
/// candle-onnx as Candle computes it, and the metadata says what the file is.
#[test]
fn a_students_guidance_input_matches_candle_in_onnx_runtime_and_candle_onnx() {
    ort();
    let cfg = UNetConfig {
        num_classes: 5,
        guidance_embed: true,
        prediction: Prediction::V,
        channels: 1,
        use_scale_shift_norm: true,
        ..cases()[0].cfg.clone()
    };
    let unet = random_unet(&cfg, 11);
    let (p32, model32) = write_onnx(&unet, Dtype::F32, "student-f32");
    let (p16, _) = write_onnx(&unet, Dtype::F16, "student-f16");
    let mut ort32 = OrtDenoiser::open(&p32, &Provider::Cpu, Some(2)).unwrap();
    let mut ort16 = OrtDenoiser::open(&p16, &Provider::Cpu, Some(2)).unwrap();
    let info = ort32.info().clone();
    assert_eq!((info.guidance_input, info.student.as_ref().map(|s| s.steps)), (Some((0.0, 4.0)), Some(4)));
    assert!(ort32.guidance_input());
    let rec = info.recommended.unwrap();
    assert_eq!((rec.sampler.to_string().as_str(), rec.steps, rec.guidance), ("ddim", 4, 2.0));
    let b = 6;
    let (x, t, y) = inputs(&cfg, b, 3);
    let w: Vec<f32> = (0..b).map(|i| 0.8 * i as f32).collect();
    let shape = [b, 1, cfg.image_size, cfg.image_size];
    let dev = &Device::Cpu;
    let xs = Tensor::from_vec(x.clone(), shape.to_vec(), dev).unwrap();
    let ts = Tensor::from_vec(t.clone(), b, dev).unwrap();
    let ys = Tensor::from_vec(y.clone(), b, dev).unwrap();
    let ws = Tensor::from_vec(w.clone(), b, dev).unwrap();
    let mut ops = CandleOps::inference(dev, DType::F32);
    let reference: Vec<f32> =
        unet.forward_w(&mut ops, &xs, &ts, Some(&ys), Some(&ws)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let e32 = ort32.eps_w(&x, shape, &t, Some(&y), &w).unwrap();
    let r = rel_err(&e32, &reference);
    assert!(r <= 1e-4, "ORT f32 relative error {r}");
    let r16 = rel_err(&ort16.eps_w(&x, shape, &t, Some(&y), &w).unwrap(), &reference);
    assert!(r16 <= 2e-2, "ORT f16 relative error {r16}");
    let co = candle_onnx_eval_w(&model32, &xs, &ts, Some(&ys), Some(&ws)).unwrap();
    let rc = rel_err(&co.flatten_all().unwrap().to_vec1().unwrap(), &reference);
    assert!(rc <= 1e-4, "candle-onnx relative error {rc}");
    // w is an input that matters, and no weight is w = 0
    let zero = ort32.eps_w(&x, shape, &t, Some(&y), &vec![0.0; b]).unwrap();
    assert!(rel_err(&zero, &e32) > 1e-3);
    assert_eq!(ort32.eps(&x, shape, &t, Some(&y)).unwrap(), zero);
    eprintln!("student: ort f32 {r:.2e}, ort f16 {r16:.2e}, candle-onnx {rc:.2e}");
    std::fs::remove_file(p32).unwrap();
    std::fs::remove_file(p16).unwrap();
}

#[test]
fn f16_export_has_no_nan_or_inf_at_any_timestep() {
    ort();
    let case = &cases()[1];
    let unet = random_unet(&case.cfg, 3);
    let (p16, _) = write_onnx(&unet, Dtype::F16, "nan");
    let mut ort16 = OrtDenoiser::open(&p16, &Provider::Cpu, Some(2)).unwrap();
    let cfg = &case.cfg;
    let b = 100;
    for chunk in 0..10 {
        let (mut x, _, y) = inputs(cfg, b, 100 + chunk);
        // include large inputs, as at t near T
        for v in x.iter_mut().step_by(5) {
            *v *= 3.0;
        }
        let t: Vec<i64> = (0..b as i64).map(|i| chunk as i64 * 100 + i).collect();
        let e = ort16.eps(&x, [b, cfg.channels, cfg.image_size, cfg.image_size], &t, Some(&y)).unwrap();
        assert!(e.iter().all(|v| v.is_finite()), "non-finite eps at t in {:?}..", t[0]);
    }
    std::fs::remove_file(p16).unwrap();
}

#[test]
fn runtime_refuses_foreign_models_and_impossible_requests() {
    ort();
    use runtime::generator::{GenerateRequest, Generator, GeneratorOptions};
    let case = &cases()[0]; // unconditional
    let unet = random_unet(&case.cfg, 1);
    let dir = std::env::temp_dir().join(format!("foreign-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // no metadata: the missing keys are named
    let bare = build_model(&unet, Dtype::F32, 17, &Default::default()).unwrap();
    let p = dir.join("bare.onnx");
    std::fs::write(&p, bare.encode_to_vec()).unwrap();
    let e = format!("{:#}", OrtDenoiser::open(&p, &Provider::Cpu, Some(1)).err().unwrap());
    assert!(e.contains("not exported by `trainer export`") && e.contains("diffusion.betas"), "{e}");
    // other input names
    let md = metadata(&state_for(&unet.cfg), Weights::Raw, Dtype::F32, None).unwrap().to_props();
    let mut renamed = build_model(&unet, Dtype::F32, 17, &md).unwrap();
    let g = renamed.graph.as_mut().unwrap();
    g.input[0].name = "sample".into();
    for n in g.node.iter_mut() {
        for i in n.input.iter_mut().filter(|i| *i == "x") {
            *i = "sample".into();
        }
    }
    let p2 = dir.join("renamed.onnx");
    std::fs::write(&p2, renamed.encode_to_vec()).unwrap();
    let e = format!("{:#}", OrtDenoiser::open(&p2, &Provider::Cpu, Some(1)).err().unwrap());
    assert!(e.contains("inputs are") && e.contains("sample"), "{e}");
    // an unconditional model: no --class, no --guidance
    let (p3, _) = write_onnx(&unet, Dtype::F32, "uncond-gen");
    let g = Generator::open(&p3, &GeneratorOptions::default()).unwrap();
    let e = g.plan(&GenerateRequest { class: Some("3".into()), ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("unconditional"), "{e}");
    let e = g.plan(&GenerateRequest { guidance: 2.0, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("guidance needs a class-conditional model"), "{e}");
    // a provider that cannot load is an error with the reason, not a fall-back to the CPU
    let e = format!(
        "{:#}",
        Generator::open(&p3, &GeneratorOptions { provider: Provider::Cuda { device: 0 }, threads: None })
            .err()
            .unwrap()
    );
    assert!(e.contains("CUDA provider cannot be used") || e.contains("CUDA"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(p3).unwrap();
}

#[test]
fn python_onnx_checker_and_onnxruntime_agree_with_candle() {
    ort();
    let py = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        py.is_file(),
        "this test needs the Python venv with onnx and onnxruntime: run scripts/setup.sh (.ci/run does)"
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_onnx.py");
    for (case, dtype, tol) in
        [(&cases()[1], Dtype::F32, 1e-4), (&cases()[1], Dtype::F16, 2e-2), (&cases()[0], Dtype::F32, 1e-4)]
    {
        let unet = random_unet(&case.cfg, 11);
        let (p, _) = write_onnx(&unet, dtype, &format!("py-{}-{dtype:?}", case.name));
        let cfg = &case.cfg;
        let (x, t, y) = inputs(cfg, 3, 5);
        let eps = candle_eps(&unet, &x, &t, &y);
        let reference = serde_json::json!({
            "shape": [3, cfg.channels, cfg.image_size, cfg.image_size],
            "x": x, "t": t, "y": if cfg.num_classes > 0 { Some(y) } else { None }, "eps": eps,
        });
        let rp = p.with_extension("json");
        std::fs::write(&rp, reference.to_string()).unwrap();
        let out = std::process::Command::new(&py).arg(&script).arg(&p).arg(&rp).arg(tol.to_string()).output().unwrap();
        let msg = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{msg}");
        eprintln!("{msg}");
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(rp).unwrap();
    }
}

#[test]
fn the_same_sampler_gives_the_same_images_through_candle_and_onnx_runtime() {
    ort();
    use runtime::sampler::{sample, Method, Request, Spacing};
    use trainer::denoise::CandleDenoiser;
    let case = &cases()[1];
    let unet = random_unet(&case.cfg, 21);
    let (p, _) = write_onnx(&unet, Dtype::F32, "same-sampler");
    let mut ort = OrtDenoiser::open(&p, &Provider::Cpu, Some(1)).unwrap();
    let mut candle = CandleDenoiser::new(&unet, &Device::Cpu);
    let sched = runtime::schedule::NoiseSchedule::new(runtime::schedule::BetaSchedule::LINEAR, 1000);
    let cfg = &case.cfg;
    let mut req = Request::new(
        3,
        [cfg.channels, cfg.image_size, cfg.image_size],
        Method::DpmSolverPP { steps: 6, spacing: Spacing::Trailing },
    );
    req.labels = Some(vec![0, 2, 4]);
    req.null_class = Some(cfg.num_classes as i64);
    req.guidance = 1.5;
    req.options.seed = 9;
    let a = sample(&mut candle, &sched, &req, &mut |_| {}).unwrap();
    let b = sample(&mut ort, &sched, &req, &mut |_| {}).unwrap();
    let d = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-3, "Candle and ONNX Runtime samples differ by {d}");
    std::fs::remove_file(p).unwrap();
}

/// A learned-variance model: DDPM respaced to 8 steps uses v, through Candle and ONNX Runtime alike; a v that
/// differs changes the images, and DPM-Solver++ takes eps alone.
#[test]
fn ddpm_with_a_learned_variance_samples_alike_through_candle_and_onnx_runtime() {
    ort();
    use runtime::sampler::{sample, Method, Request, Spacing};
    use runtime::schedule::VarianceType;
    use trainer::denoise::CandleDenoiser;
    let case = &cases()[2];
    assert!(case.cfg.learn_sigma);
    let unet = random_unet(&case.cfg, 22);
    let (p, _) = write_onnx(&unet, Dtype::F32, "learned-sampler");
    let mut ort = OrtDenoiser::open(&p, &Provider::Cpu, Some(1)).unwrap();
    assert!(ort.info().variance.is_learned());
    let mut candle = CandleDenoiser::new(&unet, &Device::Cpu);
    let sched = runtime::schedule::NoiseSchedule::new(runtime::schedule::BetaSchedule::LINEAR, 1000);
    let cfg = &case.cfg;
    let shape = [cfg.channels, cfg.image_size, cfg.image_size];
    let run = |den: &mut dyn Denoiser, variance| {
        let mut req = Request::new(2, shape, Method::Ddpm { steps: 8, spacing: Spacing::Trailing, variance });
        req.labels = Some(vec![0, 2]);
        req.null_class = Some(cfg.num_classes as i64);
        req.guidance = 1.0;
        req.options.seed = 4;
        sample(den, &sched, &req, &mut |_| {}).unwrap()
    };
    let a = run(&mut candle, VarianceType::LearnedRange);
    let b = run(&mut ort, VarianceType::LearnedRange);
    let d = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-3, "Candle and ONNX Runtime samples differ by {d}");
    let fixed = run(&mut ort, VarianceType::FixedLarge);
    assert!(a.iter().zip(&fixed).any(|(x, y)| (x - y).abs() > 1e-2), "the learned variance was not used");
    let mut req = Request::new(2, shape, Method::DpmSolverPP { steps: 5, spacing: Spacing::Trailing });
    req.options.seed = 4;
    let (c, o) =
        (sample(&mut candle, &sched, &req, &mut |_| {}).unwrap(), sample(&mut ort, &sched, &req, &mut |_| {}).unwrap());
    assert!(c.iter().zip(&o).all(|(x, y)| (x - y).abs() < 1e-3));
    std::fs::remove_file(p).unwrap();
}

/// A multi-attribute model: composed guidance (one conditional per label) samples alike through Candle and
/// ONNX Runtime; the attribute's value and weight change the images; a class-only request still works (the
/// attributes unknown), as does an unguided one.
#[test]
fn composed_attribute_guidance_samples_alike_through_candle_and_onnx_runtime() {
    ort();
    use runtime::sampler::{sample, AttrCond, Method, Request, Spacing};
    use trainer::denoise::CandleDenoiser;
    let case = &cases()[3];
    let unet = random_unet(&case.cfg, 23);
    let (p, _) = write_onnx(&unet, Dtype::F32, "attr-sampler");
    let mut ort = OrtDenoiser::open(&p, &Provider::Cpu, Some(1)).unwrap();
    assert_eq!(ort.info().attributes, case.cfg.attributes);
    let mut candle = CandleDenoiser::new(&unet, &Device::Cpu);
    let sched = runtime::schedule::NoiseSchedule::new(runtime::schedule::BetaSchedule::LINEAR, 1000);
    let cfg = &case.cfg;
    let base = || {
        let mut req = Request::new(
            2,
            [cfg.channels, cfg.image_size, cfg.image_size],
            Method::DpmSolverPP { steps: 5, spacing: Spacing::Trailing },
        );
        req.null_class = Some(3);
        req.options.seed = 5;
        req
    };
    let attrs = |wp: f32| vec![AttrCond { null: 4, guidance: wp }, AttrCond { null: 2, guidance: 0.0 }];
    let run = |den: &mut dyn Denoiser, labels: Vec<i64>, g: f32, wp: f32| {
        let mut req = base();
        (req.labels, req.guidance, req.attributes) = (Some(labels), g, attrs(wp));
        sample(den, &sched, &req, &mut |_| {}).unwrap()
    };
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    // image 0: class 1 at position 3, size unknown; image 1: class 2, position unknown, size 0
    let labels = vec![1, 3, 2, 2, 4, 0];
    let a = run(&mut candle, labels.clone(), 1.5, 1.0);
    let b = run(&mut ort, labels.clone(), 1.5, 1.0);
    assert!(diff(&a, &b) < 1e-3, "Candle and ONNX Runtime differ by {}", diff(&a, &b));
    let moved = run(&mut ort, vec![1, 0, 2, 2, 4, 0], 1.5, 1.0);
    assert!(diff(&a, &moved) > 1e-2, "the position changed nothing");
    let weighted = run(&mut ort, labels.clone(), 1.5, 3.0);
    let d0 = diff(&a[..a.len() / 2], &weighted[..a.len() / 2]);
    assert!(d0 > 1e-2, "the position's weight changed nothing");
    // image 1 has no position: its weight changes nothing there (but rounding: equal rows at other places in
    // the batch)
    let d1 = diff(&a[a.len() / 2..], &weighted[a.len() / 2..]);
    assert!(d1 < d0 / 20.0, "image 1 moved by {d1} (image 0 by {d0})");
    let unguided_c = run(&mut candle, labels.clone(), 0.0, 0.0);
    let unguided_o = run(&mut ort, labels, 0.0, 0.0);
    assert!(diff(&unguided_c, &unguided_o) < 1e-3);
    // a class-only request (the attributes null) through both
    let mut req = base();
    (req.labels, req.guidance) = (Some(vec![1, 2]), 2.0);
    let (c, o) =
        (sample(&mut candle, &sched, &req, &mut |_| {}).unwrap(), sample(&mut ort, &sched, &req, &mut |_| {}).unwrap());
    assert!(diff(&c, &o) < 1e-3);
    req.labels = Some(vec![1, 2, 3]);
    assert!(sample(&mut ort, &sched, &req, &mut |_| {}).unwrap_err().to_string().contains("3 labels for 2 images"));
    std::fs::remove_file(p).unwrap();
}
