//! `trainer sweep` on real (tiny) MNIST runs: one run per value and seed, evaluated; the CSVs and plots; a
//! stopped sweep continues where it stopped, and other settings are refused.

mod common;

use std::process::Command;

use common::*;

#[test]
fn sweep_trains_each_value_and_seed_evaluates_them_and_continues_where_it_stopped() {
    data_dir("mnist");
    let dir = tmp_dir("sweep");
    let mut cfg = tiny("mnist");
    cfg.data.limit = 1000;
    cfg.train.checkpoint_every = 2;
    let config = write_config(&cfg, &dir);
    let out = dir.join("study");
    let sweep = || {
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["sweep", "-q", "--config"])
            .arg(&config)
            .args(["--key", "train.lr", "--values", "0.001,0.002", "--seeds", "2", "--steps", "3"])
            .args(["--n", "20", "--sample-steps", "2", "--batch", "20", "--cache"])
            .arg(dir.join("classifiers"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = sweep();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{csv}");
    for (row, (v, seed)) in rows.iter().zip([("0.001", 0), ("0.001", 1), ("0.002", 0), ("0.002", 1)]) {
        let f: Vec<&str> = row.split(',').collect();
        assert_eq!((f[0], f[1], f[2], f[3]), ("train.lr", v, &*seed.to_string(), "3"), "{row}");
        let score: f64 = f[5].parse().unwrap();
        assert!((0.0..=1.0).contains(&score) && f[6].parse::<f64>().unwrap() > 0.0, "{row}");
    }
    // the two seeds of a value are two different runs
    let fid = |r: &str| r.split(',').nth(6).unwrap().to_string();
    assert_ne!(fid(rows[0]), fid(rows[1]));
    let summary = std::fs::read_to_string(out.join("sweep-summary.csv")).unwrap();
    assert_eq!(summary.lines().count(), 3, "{summary}");
    assert!(summary.lines().nth(1).unwrap().starts_with("train.lr,0.001,2,"), "{summary}");
    for p in ["sweep-score.png", "sweep-fid.png"] {
        assert!(image::open(out.join(p)).unwrap().width() > 100, "{p}");
    }
    // continued: finished runs are kept; a run whose evaluation was lost is resumed from its checkpoint and
    // evaluated again, to the same figures
    let kept = out.join("train.lr=0.001/seed-0/eval.json");
    let before = std::fs::metadata(&kept).unwrap().modified().unwrap();
    std::fs::remove_file(out.join("train.lr=0.002/seed-1/eval.json")).unwrap();
    let o = sweep();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(&kept).unwrap().modified().unwrap(), before);
    assert_eq!(std::fs::read_to_string(out.join("sweep.csv")).unwrap(), csv);
    // other settings in the same folder are refused
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["sweep", "-q", "--config"])
        .arg(&config)
        .args(["--key", "train.lr", "--values", "0.001", "--seeds", "1", "--steps", "5", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("other settings"), "{err}");
    // a key the config does not have is named before anything trains
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["sweep", "-q", "--config"])
        .arg(&config)
        .args(["--key", "model.chh", "--values", "8", "--out"])
        .arg(dir.join("other"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no key model.chh"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
