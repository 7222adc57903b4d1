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
    let conf = write_config(&cfg, &dir);
    let run = dir.join("run");
    let t = env!("CARGO_BIN_EXE_trainer");
    assert!(Command::new(t)
        .args(["fit", "--config"])
        .arg(&conf)
        .arg("--out")
        .arg(&run)
        .arg("-q")
        .status()
        .unwrap()
        .success());
    let cache = dir.join("classifiers");
    let eval = || {
        let out = Command::new(t)
            .args(["eval", "--run"])
            .arg(&run)
            .args(["--n", "40", "--steps", "3", "--batch", "40", "-q", "--cache"])
            .arg(&cache)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let r = eval();
    let acc = r["classifier_test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.8, "classifier accuracy on the 10k test images: {acc}");
    let score = r["classifier_score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
    assert_eq!(r["classifier_score_per_class"].as_array().unwrap().len(), 10);
    let (fid, floor) = (r["fid_classifier_features"].as_f64().unwrap(), r["fid_floor_train_vs_test"].as_f64().unwrap());
    assert!(floor.is_finite() && floor >= 0.0 && fid > floor, "fid {fid}, floor {floor}");
    assert!(run.join("eval.json").is_file());
    // the classifier is cached by dataset fingerprint and reused
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
    let again = eval();
    assert_eq!(again["classifier_test_accuracy"], r["classifier_test_accuracy"]);
    assert_eq!(again["fid_classifier_features"], r["fid_classifier_features"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
