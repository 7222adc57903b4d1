//! `trainer eval` on a real (tiny) MNIST run: a cached classifier with real test accuracy, the classifier
//! score, and FID in its feature space above the real-vs-real floor for an untrained model.

mod common;

use std::process::Command;

use common::*;

#[test]
fn eval_reports_accuracy_score_and_fid_with_floor() {
    data_dir("mnist");
    let dir = tmp_dir("eval");
    let mut cfg = tiny("mnist");
    cfg.data.limit = 3000;
    cfg.train.steps = 2;
    let run = fit_run(&cfg, &dir);
    let t = env!("CARGO_BIN_EXE_trainer");
    let cache = dir.join("classifiers");
    // `trainer eval` on the run with these arguments: its output, and its report when it succeeds
    let run_eval = |args: &[&str]| {
        Command::new(t).args(["eval", "-q", "--run"]).arg(&run).args(args).arg("--cache").arg(&cache).output().unwrap()
    };
    let eval = |args: &[&str]| {
        let out = run_eval(args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let small = ["--n", "40", "--steps", "3", "--batch", "40", "--features", "classifier"];
    let r = eval(&small);
    let acc = r["classifier_test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.8, "classifier accuracy on the 10k test images: {acc}");
    let score = r["classifier_score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
    assert_eq!(r["classifier_score_per_class"].as_array().unwrap().len(), 10);
    let (fid, floor) = (r["fid_classifier_features"].as_f64().unwrap(), r["fid_floor_train_vs_test"].as_f64().unwrap());
    assert!(floor.is_finite() && floor >= 0.0 && fid > floor, "fid {fid}, floor {floor}");
    // each class's FID against the reference images of that class: 4 samples a class (40 cycling 10), the
    // classes with at least 2 of the 40 random reference images in each set, every one above its own floor
    let per_class = r["fid_per_class"].as_array().unwrap();
    assert!((5..=10).contains(&per_class.len()), "{per_class:?}");
    for c in per_class {
        let (fid, floor) = (c["fid"].as_f64().unwrap(), c["floor"].as_f64().unwrap());
        assert!(c["space"] == "classifier" && c["samples"] == 4 && c["real"].as_u64().unwrap() >= 2, "{c}");
        assert!(floor.is_finite() && floor >= 0.0 && fid > floor, "{c}");
    }
    assert!(run.join("eval.json").is_file());
    // the classifier is cached by dataset fingerprint and reused
    let mut cached: Vec<String> =
        std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    cached.sort();
    assert_eq!(cached.len(), 2, "{cached:?}");
    assert_eq!(
        [cached[0].trim_end_matches(".onnx"), cached[1].trim_end_matches(".safetensors")],
        [cached[0].trim_end_matches(".onnx"), cached[0].trim_end_matches(".onnx")],
        "{cached:?}"
    );
    // again, with the memorisation check and the two-sample test: the same numbers, the nearest-neighbour grid
    // and distances; a 2-step sample of an untrained model is told from real digits, real from real is not
    let again = eval(&[&small[..], &["--nearest", "2", "--c2st"]].concat());
    let c2st = &again["c2st"];
    let (acc, floor) = (c2st["accuracy"].as_f64().unwrap(), c2st["real_vs_real"].as_f64().unwrap());
    assert!(c2st["images"] == 40 && acc > 0.9 && (0.2..0.8).contains(&floor), "{c2st}");
    // the real-vs-real floor depends on the real images alone: kept in the cache for the next evaluation
    let kept: Vec<f64> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("c2st-floor-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap().trim().parse().unwrap())
        .collect();
    assert_eq!(kept, [floor]);
    assert_eq!(again["classifier_test_accuracy"], r["classifier_test_accuracy"]);
    assert_eq!(again["fid_classifier_features"], r["fid_classifier_features"]);
    // asked for the reference images' own classes: each class as often as among the 40 real digits the samples
    // are scored against, so each class's FID compares as many samples as real images
    let mixed = eval(&[&small[..], &["--class-mix", "data"]].concat());
    assert!(mixed["class_mix"] == "data" && r.get("class_mix").is_none(), "{mixed}");
    let per_class = mixed["classifier_score_per_class"].as_array().unwrap();
    let counts: Vec<u64> = per_class.iter().map(|c| c["n"].as_u64().unwrap()).collect();
    assert!(counts.iter().sum::<u64>() == 40 && counts.iter().any(|&n| n != 4), "{counts:?}");
    for c in mixed["fid_per_class"].as_array().unwrap() {
        assert_eq!(c["samples"], c["real"], "{c}");
    }
    let near = &again["nearest"];
    assert_eq!((near["k"].as_u64(), near["n"].as_u64()), (Some(2), Some(40)));
    for space in ["pixel", "features"] {
        let d = |k: &str| near[space][k].as_f64().unwrap();
        assert!(d("samples_min") <= d("samples_p05") && d("samples_p05") <= d("samples_median"), "{near}");
        // a 2-step model draws noise: real test digits lie nearer the training digits than its samples do
        assert!(d("test_median") < d("samples_median"), "{space}: {near}");
    }
    let grid = image::open(run.join("nearest.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (5 * 28 + 6 * 2, 10 * 28 + 11 * 2), "10 rows: sample + 2 + 2");
    classifier_onnx_agrees(&cache, &cfg);

    // Inception-v3 FID beside the classifier's (16 images: Inception is slow on the CPU)
    let weights = root().join("data/inception/default_1.pt");
    let with_inception = ["--n", "16", "--steps", "3", "--batch", "16", "--features", "classifier,inception"];
    let inception_eval = || eval(&[&with_inception[..], &["--inception-weights", weights.to_str().unwrap()]].concat());
    let r = inception_eval();
    let (fid, floor) = (r["fid_inception"].as_f64().unwrap(), r["fid_inception_floor"].as_f64().unwrap());
    // an untrained model's noise is far from digits in Inception space too
    assert!(floor.is_finite() && floor > 0.0 && fid > 2.0 * floor, "inception fid {fid}, floor {floor}");
    // the real images' Inception features are cached (test and train subsets) and give the same figures
    let cached = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("inception-"))
        .count();
    assert_eq!(cached, 2);
    let again = inception_eval();
    assert_eq!((again["fid_inception"].as_f64(), again["fid_inception_floor"].as_f64()), (Some(fid), Some(floor)));

    // the model card of an evaluated run carries its metrics
    let onnx = dir.join("m.onnx");
    let st = Command::new(t).args(["export", "--card", "--run"]).arg(&run).arg("--out").arg(&onnx).status().unwrap();
    assert!(st.success());
    let card = std::fs::read_to_string(dir.join("m.md")).unwrap();
    assert!(card.contains(&format!("| FID, Inception-v3 pool3 (2048-d) | {fid:.3} | {floor:.3} |")), "{card}");
    let score = r["classifier_score"].as_f64().unwrap();
    assert!(card.contains(&format!("| {:.2}% |", 100.0 * score)), "{card}");

    // the exported f16 file sampled through ONNX Runtime: the same kind of report
    let f16 = dir.join("m16.onnx");
    let st =
        Command::new(t).args(["export", "--dtype", "f16", "--run"]).arg(&run).arg("--out").arg(&f16).status().unwrap();
    assert!(st.success());
    let mid = ["--n", "24", "--steps", "3", "--batch", "24", "--features", "classifier"];
    let onnx_eval = |model: &std::path::Path| {
        run_eval(&[&mid[..], &["--sampler", "dpm++", "--model", model.to_str().unwrap()]].concat())
    };
    let out = onnx_eval(&f16);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["model"].as_str(), f16.to_str());
    assert_eq!(r["sampler"], "dpm++ 3 steps, trailing");
    let s = r["classifier_score"].as_f64().unwrap();
    assert!(
        (0.0..=1.0).contains(&s) && r["fid_classifier_features"].as_f64() > r["fid_floor_train_vs_test"].as_f64(),
        "{r}"
    );
    // a model of another run (other data) is refused by name
    let out = onnx_eval(&root().join("fixtures/tiny-mnist-f32.onnx"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was trained on data"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // bad requests stop at once with the reason
    for (args, needle) in [
        (vec!["--features", "classifier", "--sampler", "euler"], "invalid value 'euler' for '--sampler"),
        (vec!["--features", "classifier", "--sweep-steps", "0,5"], "0 sampling steps"),
        (vec!["--features", "classifier,clip"], "invalid value 'clip' for '--features"),
        (vec!["--inception-weights", "/nonexistent/default_1.pt"], "scripts/fetch-data.sh inception"),
    ] {
        let out = run_eval(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{args:?}: {err}");
    }

    // sweeps over guidance and sampling steps: CSV rows and plots
    eval(&[&mid[..], &["--sweep-guidance", "0,3", "--sweep-steps", "2,4"]].concat());
    let csv = std::fs::read_to_string(run.join("sweep.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "sweep,guidance,steps,classifier_score,fid_classifier,fid_classifier_floor");
    assert_eq!(lines.len(), 5, "{csv}");
    assert!(lines[1].starts_with("guidance,0,3,") && lines[4].starts_with("steps,2,4,"), "{csv}");
    let fids: Vec<f64> = lines[1..]
        .iter()
        .map(|row| {
            let v: Vec<f64> = row.split(',').skip(3).map(|x| x.parse().unwrap()).collect();
            assert!(v.iter().all(|x| x.is_finite()) && (0.0..=1.0).contains(&v[0]), "{row}");
            v[1]
        })
        .collect();
    // different settings give different samples
    assert!(fids[0] != fids[1] && fids[2] != fids[3], "{csv}");
    for f in ["sweep-guidance-score.png", "sweep-guidance-fid.png", "sweep-steps-score.png", "sweep-steps-fid.png"] {
        let img = image::open(run.join(f)).unwrap();
        assert!(img.width() > 100, "{f}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An unlabelled colour set (a folder of Twemoji) has no classifier: `trainer eval` says so and measures FID in
/// Inception-v3's features against one half of the images, with the other half as the real-vs-real floor; the
/// likelihood bound is reported in bits per dimension.
#[test]
fn eval_of_an_unlabelled_folder_uses_inception_alone_and_reports_the_likelihood_bound() {
    data_dir("twemoji");
    let weights = root().join("data/inception/default_1.pt");
    assert!(weights.is_file(), "this test needs the Inception weights: scripts/fetch-data.sh inception");
    let dir = tmp_dir("eval-folder");
    let mut cfg = tiny("twemoji64");
    cfg.model.image_size = 32;
    cfg.model.attention_resolutions = vec![16];
    cfg.data.limit = 64;
    cfg.diffusion.timesteps = 50;
    cfg.train.steps = 2;
    cfg.train.batch_size = 4;
    let run = fit_run(&cfg, &dir);
    let eval = |features: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["eval", "-q", "--run"])
            .arg(&run)
            .args(["--n", "12", "--steps", "3", "--batch", "12", "--nll", "3", "--features", features])
            .arg("--inception-weights")
            .arg(&weights)
            .arg("--cache")
            .arg(dir.join("cache"))
            .args(extra)
            .output()
            .unwrap()
    };
    // --guidance is meaningless for an unconditional model: the report and the sweep rows say 0
    let out = eval("classifier,inception", &["--guidance", "3", "--sweep-steps", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r.get("classifier").is_none() && r.get("classifier_score").is_none_or(|v| v.is_null()), "{r}");
    assert!(r.get("fid_classifier_features").is_none(), "{r}");
    let (fid, floor) = (r["fid_inception"].as_f64().unwrap(), r["fid_inception_floor"].as_f64().unwrap());
    // two disjoint halves of 12 real images, and an untrained model far from them
    assert_eq!(r["fid_images"], 12);
    assert!(floor > 0.0 && fid > floor, "inception fid {fid}, floor {floor}");
    let nll = &r["nll"];
    let bpd = nll["bits_per_dim"].as_f64().unwrap();
    assert!(bpd.is_finite() && bpd > 0.0 && nll["images"] == 3 && nll["conditioning"] == "unconditional", "{nll}");
    assert_eq!(r["guidance"], 0.0, "{r}");
    let csv = std::fs::read_to_string(run.join("sweep.csv")).unwrap();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(row[..3], ["steps", "0", "2"], "{csv}");
    assert!(!dir
        .join("cache")
        .read_dir()
        .map(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "onnx")))
        .unwrap_or(false));
    // asked for the classifier alone, it is refused with the reason
    let out = eval("classifier", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("has no labels") && err.contains("--features inception"), "{err}");
    // and there is no guidance to sweep
    let out = eval("inception", &["--sweep-guidance", "1,2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--sweep-guidance") && err.contains("unconditional"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The cached classifier's ONNX twin (read by candle-onnx) predicts what the Candle classifier predicts.
fn classifier_onnx_agrees(cache: &std::path::Path, cfg: &trainer::train::config::Config) {
    use candle_core::{Device, Tensor};
    let st = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let onnx = candle_onnx::read_file(st.with_extension("onnx")).unwrap();
    let mut data = cfg.data.clone();
    data.split = trainer::data::Split::Test;
    data.limit = 64;
    let test = trainer::data::load(&data, 28).unwrap();
    let x: Vec<f32> = (0..64).flat_map(|i| test.image_f32(i)).collect();
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let mut src = trainer::model::params::TensorSource::new(&tensors, "classifier");
    let clf = trainer::eval::Classifier::new(1, 28, 10, &mut src).unwrap();
    let (_, ours) = trainer::eval::features(&clf, &x, [1, 28, 28], &Device::Cpu).unwrap();
    let xt = Tensor::from_vec(x, (64, 1, 28, 28), &Device::Cpu).unwrap();
    let out = candle_onnx::simple_eval(&onnx, [("x".to_string(), xt)].into_iter().collect()).unwrap();
    assert_eq!(out["features"].dims(), &[64, 128]);
    let theirs: Vec<u32> = out["logits"].argmax(1).unwrap().to_vec1().unwrap();
    assert_eq!(ours, theirs);
    let labels = test.labels.as_ref().unwrap();
    let right = theirs.iter().zip(labels).filter(|(p, l)| p == l).count();
    assert!(right >= 50, "the ONNX classifier gets {right}/64 test digits right");
}
