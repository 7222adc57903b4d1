//! The trained models in models/ do what their cards say: sampled the way their metadata recommends (the
//! library path `generate` takes), the project's evaluation classifier recognises the digit asked for, the
//! colour model draws emoji on white; and ONNX Runtime, candle-onnx and Python's onnx/onnxruntime read each
//! file alike.

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::*;
use runtime::generator::{GenerateRequest, Generator, GeneratorOptions, SampleOptions};
use runtime::onnx::{OrtDenoiser, Provider};
use runtime::sampler::Denoiser;
use trainer::train::config::Config;

/// (file in models/, preset that made it, minimum fraction recognised, and in every class)
const SHIPPED: [(&str, &str, f64, f64); 4] = [
    ("mnist.onnx", "mnist", 0.90, 0.0),
    ("fashion-mnist.onnx", "fashion-mnist", 0.90, 0.0),
    // the distilled students, in their own steps (one model call each, guidance an input)
    ("mnist-fast.onnx", "mnist", 0.90, 0.90),
    ("fashion-mnist-fast.onnx", "fashion-mnist", 0.90, 0.0),
];

fn model(name: &str) -> PathBuf {
    let p = root().join("models").join(name);
    assert!(p.is_file(), "{} is missing: the shipped models are committed in models/", p.display());
    p
}

/// The project's evaluation classifier of a dataset (trained once, cached in data/classifiers/).
fn eval_classifier(ds: &trainer::data::Dataset) -> trainer::eval::Classifier {
    let cache = root().join("data/classifiers");
    trainer::eval::classifier_for(ds, &cache, &Device::Cpu, &trainer::progress::Silent).unwrap().0
}

#[test]
fn shipped_models_draw_the_classes_asked_for() {
    ort();
    for (file, preset, min, min_class) in SHIPPED {
        let mut cfg = Config::load(&root().join("trainer/configs").join(format!("{preset}.toml"))).unwrap();
        cfg.data.path = root().join(&cfg.data.path);
        data_dir(cfg.data.path.file_name().unwrap().to_str().unwrap());
        let train = trainer::data::load(&cfg.data, cfg.model.image_size).unwrap();
        let mut g =
            Generator::open(&model(file), &GeneratorOptions { provider: Provider::Cpu, threads: None }).unwrap();
        let info = g.info().clone();
        assert_eq!(
            info.dataset_fingerprint.as_deref(),
            Some(train.fingerprint.as_str()),
            "{file} was not trained on this preset's data"
        );
        let rec = info.recommended.clone().expect("a shipped model recommends how to sample it");
        let k = info.num_classes;
        let req = GenerateRequest {
            n: 20 * k,
            sampler: rec.sampler,
            steps: rec.steps,
            guidance: rec.guidance,
            options: SampleOptions { batch: 50, ..Default::default() },
            ..Default::default()
        };
        let plan = g.plan(&req).unwrap();
        let labels = plan.labels.clone().expect("classes cycle");
        let mut x = g.sample(&plan, &mut |_| {}).unwrap();
        trainer::eval::quantize(&mut x);
        let clf = eval_classifier(&train);
        let [c, s, _] = plan.shape;
        let (_, preds) = trainer::eval::features(&clf, &x, [c, s, s], &Device::Cpu).unwrap();
        let mut per_class = vec![0usize; k];
        for (p, l) in preds.iter().zip(&labels) {
            if *p as i64 == *l {
                per_class[*l as usize] += 1;
            }
        }
        let hit = per_class.iter().sum::<usize>() as f64 / labels.len() as f64;
        eprintln!(
            "{file}: {:.1}% recognised ({} {} steps, guidance {}); per class {per_class:?} of 20",
            100.0 * hit,
            rec.sampler,
            rec.steps,
            rec.guidance
        );
        assert!(
            hit >= min,
            "{file}: only {:.1}% of its images show the class asked for (per class {per_class:?})",
            100.0 * hit
        );
        let worst = *per_class.iter().min().unwrap() as f64 / 20.0;
        assert!(worst >= min_class, "{file}: a class is recognised in {worst} of its images (per class {per_class:?})");
    }
}

#[test]
fn shipped_models_read_alike_in_onnx_runtime_candle_onnx_and_python() {
    ort();
    let py = root().join(".venv/bin/python");
    assert!(
        py.is_file(),
        "this test needs the Python venv with onnx and onnxruntime: run scripts/setup.sh (.ci/run does)"
    );
    for file in SHIPPED.iter().map(|s| s.0).chain(["twemoji.onnx", "twemoji64.onnx"]) {
        let path = model(file);
        let mut ort = OrtDenoiser::open(&path, &Provider::Cpu, Some(2)).unwrap();
        let info = ort.info().clone();
        let (b, c, s) = (5usize, info.channels, info.image_size);
        let n = b * c * s * s;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5).collect();
        let t: Vec<i64> = vec![0, 250, 500, 750, 999];
        let y: Vec<i64> = (0..b as i64).map(|i| i % (info.num_classes as i64 + 1)).collect();
        let yo = (info.num_classes > 0).then_some(&y[..]);
        // a student's guidance weight, one per image
        let w: Option<Vec<f32>> = info.takes_guidance().then(|| (0..b).map(|i| i as f32).collect());
        let eps = match &w {
            Some(w) => ort.eps_w(&x, [b, c, s, s], &t, yo, w).unwrap(),
            None => ort.eps(&x, [b, c, s, s], &t, yo).unwrap(),
        };
        assert!(eps.iter().all(|v| v.is_finite()) && eps.iter().any(|v| v.abs() > 1e-2));
        // candle-onnx, an independent reader
        let proto = candle_onnx::read_file(&path).unwrap();
        let xs = Tensor::from_vec(x.clone(), (b, c, s, s), &Device::Cpu).unwrap();
        let ts = Tensor::from_vec(t.clone(), b, &Device::Cpu).unwrap();
        let ys = Tensor::from_vec(y.clone(), b, &Device::Cpu).unwrap();
        let ws = w.as_ref().map(|w| Tensor::from_vec(w.clone(), b, &Device::Cpu).unwrap());
        let co = trainer::onnx::candle_onnx_eval_w(&proto, &xs, &ts, yo.map(|_| &ys), ws.as_ref()).unwrap();
        let co: Vec<f32> = co.flatten_all().unwrap().to_vec1().unwrap();
        let num: f32 = co.iter().zip(&eps).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        let den: f32 = eps.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(num / den <= 1e-4, "{file}: candle-onnx and ONNX Runtime differ by {}", num / den);
        // Python: onnx.checker (full check) and onnxruntime against ONNX Runtime's answer from Rust
        let reference = serde_json::json!({ "shape": [b, c, s, s], "x": x, "t": t, "y": yo, "w": w, "eps": eps });
        let rp = std::env::temp_dir().join(format!("shipped-{file}-{}.json", std::process::id()));
        std::fs::write(&rp, reference.to_string()).unwrap();
        let out = std::process::Command::new(&py)
            .arg(root().join("scripts/check_onnx.py"))
            .arg(&path)
            .arg(&rp)
            .arg("1e-4")
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&rp);
        let msg = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{file}: {msg}");
    }
}

/// The shipped shifted-digits model (two labels, `trainer/configs/shifted-mnist.toml`) draws the digit asked for
/// in the quadrant asked for, both given by name through the library, as `generate --class 3 --attr
/// position=bottom-right` does, judged as `trainer eval --composition` judges (the centre of mass of the ink for
/// the position, the plain MNIST classifier on that quadrant for the digit). 3 was seen at every position: the
/// recommended sampling must get it right. 7 was seen only at the top two: its bottom pairs are compositions
/// the model never saw, which its card measures at about half right with the position guided at 8; here they
/// must at least land in the quadrant asked for and show a 7 in a quarter of the samples.
#[test]
fn shipped_shifted_digits_model_puts_the_digit_where_asked() {
    use trainer::data::shifted::{crop_quadrant, position_of, POSITIONS};
    ort();
    let mut plain = Config::load(&root().join("trainer/configs/mnist.toml")).unwrap();
    plain.data.path = data_dir("mnist");
    let plain = trainer::data::load(&plain.data, 28).unwrap();
    let clf = eval_classifier(&plain);
    let mut g =
        Generator::open(&model("shifted-mnist.onnx"), &GeneratorOptions { provider: Provider::Cpu, threads: None })
            .unwrap();
    let info = g.info().clone();
    let attr = info.attributes.iter().find(|a| a.name == "position").expect("the position attribute in the metadata");
    assert_eq!(attr.values, POSITIONS.map(String::from).to_vec());
    let rec = info.recommended.clone().expect("a shipped model recommends how to sample it");
    let s = info.image_size;
    let n = 12;
    for digit in ["3", "7"] {
        let class = plain.class_names.iter().position(|c| c == digit).unwrap() as u32;
        for (p, pos) in POSITIONS.iter().enumerate() {
            let held_out = digit == "7" && p >= 2;
            let req = GenerateRequest {
                n,
                sampler: rec.sampler,
                steps: rec.steps,
                guidance: rec.guidance,
                class: Some(digit.into()),
                attributes: vec![("position".into(), pos.to_string())],
                attribute_guidance: if held_out { vec![("position".into(), 8.0)] } else { vec![] },
                options: SampleOptions { batch: n, ..Default::default() },
                ..Default::default()
            };
            let plan = g.plan(&req).unwrap();
            let mut x = g.sample(&plan, &mut |_| {}).unwrap();
            trainer::eval::quantize(&mut x);
            let found: Vec<usize> = x.chunks(s * s).map(|img| position_of(img, s)).collect();
            let crops: Vec<f32> = x.chunks(s * s).flat_map(|img| crop_quadrant(img, s, p, 28)).collect();
            let (_, preds) = trainer::eval::features(&clf, &crops, [1, 28, 28], &Device::Cpu).unwrap();
            let at = found.iter().filter(|&&f| f == p).count();
            let both = found.iter().zip(&preds).filter(|(&f, &d)| f == p && d == class).count();
            eprintln!(
                "{digit} at {pos} (held out: {held_out}): {at}/{n} in that quadrant, {both}/{n} also read as {digit}"
            );
            assert!(at * 10 >= n * 8, "{digit} at {pos}: only {at}/{n} drawn in that quadrant");
            let need = if held_out { n / 4 } else { n * 8 / 10 };
            assert!(both >= need, "{digit} at {pos}: only {both}/{n} read as {digit} there (need {need})");
        }
    }
}

/// The shipped 32x32 Twemoji model (class-conditional on the emoji's category, v-prediction;
/// `trainer/configs/twemoji32-categories.toml`) draws on the white the training images lie on, not the background-less
/// colour squares the eps-predicting run of the twemoji32 recipe drew (benches/RESULTS.md; 1 of 24 on white), and the
/// category asked for by name: of 4 samples a category drawn the recommended way, at least half must lie on white (27
/// of 36 do) and the evaluation classifier of the categories must read at least 30% as the category asked for (21 of 36
/// are; chance is 1/9). Also checked: it was trained on this data, predicts v, and its metadata names the white
/// background `generate` lays input images' transparency on.
#[test]
fn shipped_twemoji_model_draws_the_category_asked_for() {
    assert_draws_categories("twemoji32-categories", "twemoji.onnx");
}

/// The shipped 64x64 Twemoji model (`trainer/configs/twemoji64-categories.toml`), as the 32x32 one above: of 4
/// samples a category, at least half must lie on white (28 of 36 do) and at least 30% be read as the category
/// asked for (20 of 36 are; 17 for the file before). An untrained or broken file draws noise or flat colour,
/// neither on white nor of a category.
#[test]
fn shipped_twemoji64_model_draws_the_category_asked_for() {
    assert_draws_categories("twemoji64-categories", "twemoji64.onnx");
}

/// The percentage of a Twemoji model's samples the classifier must read as the category asked for.
const MIN_CATEGORY_HITS: usize = 30;

/// Draws 4 samples of each category from models/`file` the recommended way (after checking that the file was
/// trained on `preset`'s data, predicts v, lays transparency on white and names the categories as the data does)
/// and asserts that at least half lie on white and that the evaluation classifier of the categories (trained once,
/// cached) reads at least MIN_CATEGORY_HITS% as the category asked for.
fn assert_draws_categories(preset: &str, file: &str) {
    ort();
    let mut cfg = Config::load(&root().join("trainer/configs").join(format!("{preset}.toml"))).unwrap();
    data_dir("twemoji");
    cfg.data.path = root().join(&cfg.data.path);
    let s = cfg.model.image_size;
    let train = trainer::data::load(&cfg.data, s).unwrap();
    let mut g = Generator::open(&model(file), &GeneratorOptions { provider: Provider::Cpu, threads: None }).unwrap();
    let info = g.info().clone();
    assert_eq!(
        info.dataset_fingerprint.as_deref(),
        Some(train.fingerprint.as_str()),
        "{file}: not trained on this data"
    );
    assert_eq!(info.prediction, runtime::metadata::Prediction::V);
    assert_eq!((info.image_size, info.background), (s, Some([255, 255, 255])));
    assert_eq!(info.class_names, train.class_names);
    assert_eq!(info.class_index("animals-nature").unwrap(), 1);
    let rec = info.recommended.clone().expect("a shipped model recommends how to sample it");
    let n = 4 * info.num_classes;
    let req = GenerateRequest {
        n,
        sampler: rec.sampler,
        steps: rec.steps,
        guidance: rec.guidance,
        options: SampleOptions { batch: 12, ..Default::default() },
        ..Default::default()
    };
    let plan = g.plan(&req).unwrap();
    let labels = plan.labels.clone().expect("classes cycle");
    let mut x = g.sample(&plan, &mut |_| {}).unwrap();
    let white = on_white(&x, s);
    trainer::eval::quantize(&mut x);
    let (_, preds) = trainer::eval::features(&eval_classifier(&train), &x, [3, s, s], &Device::Cpu).unwrap();
    let hits = preds.iter().zip(&labels).filter(|(p, l)| **p as i64 == **l).count();
    eprintln!("{file}: {white}/{n} on white, {hits} read as the category asked for");
    assert!(white >= n / 2, "{file}: only {white}/{n} samples lie on white");
    assert!(hits >= n * MIN_CATEGORY_HITS / 100, "{file}: only {hits}/{n} read as the category asked for");
}

/// How many of the RGB images `x` ([n, 3, s, s] in [-1, 1]) are mostly white in their border ring (2 pixels):
/// white is every channel above 0.7 (85% of full intensity).
fn on_white(x: &[f32], s: usize) -> usize {
    let ring: Vec<usize> = (0..s * s).filter(|&i| (i / s).min(i % s) < 2 || (i / s).max(i % s) >= s - 2).collect();
    x.chunks(3 * s * s)
        .filter(|img| {
            let white = ring.iter().filter(|&&i| (0..3).all(|c| img[c * s * s + i] > 0.7)).count();
            2 * white > ring.len()
        })
        .count()
}
