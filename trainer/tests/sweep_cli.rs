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

/// Seed 004's study in small: two keys, each varied on its own around the config, in one command, split between
/// two shards. The setting both ask for (lr 0.001, kernel 3: the config itself) trains once; each figure has a
/// panel per key. (The
/// two-sample test's columns: the results' unit test; `--c2st` trains a CNN twice per run.)
#[test]
fn a_study_of_two_keys_trains_their_shared_setting_once() {
    data_dir("mnist");
    let dir = tmp_dir("sweep-study");
    let mut cfg = tiny("mnist");
    cfg.data.limit = 1000;
    let config = write_config(&cfg, &dir);
    let out = dir.join("study");
    let sweep = |keys: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["sweep", "-q", "--config"])
            .arg(&config)
            .args(keys)
            .args(["--seeds", "1", "--steps", "3", "--n", "20", "--sample-steps", "2", "--batch", "20"])
            .arg("--cache")
            .arg(dir.join("classifiers"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let study = ["--key", "train.lr", "--values", "0.001,0.002", "--key", "model.kernel_size", "--values", "3,5"];
    let folders = || {
        let mut f: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        f.sort();
        f
    };
    // split in two shards: the three runs (lr 0.001 = kernel 3, lr 0.002, kernel 5) in training order, the first
    // and third for shard 1/2, the second for 2/2; then the whole sweep trains nothing and writes every row
    let o = sweep(&[&study[..], &["--shard", "1/2"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("3 of 4 rows are finished"));
    assert_eq!(folders(), ["model.kernel_size=5", "train.lr=0.001"]);
    let o = sweep(&[&study[..], &["--shard", "2/2"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let evals =
        ["model.kernel_size=5", "train.lr=0.001", "train.lr=0.002"].map(|f| out.join(f).join("seed-0/eval.json"));
    let stamps = evals.each_ref().map(|e| std::fs::metadata(e).unwrap().modified().unwrap());
    let o = sweep(&study);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(evals.each_ref().map(|e| std::fs::metadata(e).unwrap().modified().unwrap()), stamps);
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    let settings: Vec<(&str, &str)> = rows.iter().map(|r| (r[0], r[1])).collect();
    assert_eq!(
        settings,
        [("train.lr", "0.001"), ("train.lr", "0.002"), ("model.kernel_size", "3"), ("model.kernel_size", "5")],
        "{csv}"
    );
    assert_eq!(rows[0][2..], rows[2][2..], "the shared setting is one run: {csv}");
    assert_ne!(rows[0][6], rows[3][6], "kernel 5 is another network: {csv}");
    assert_eq!(folders(), ["model.kernel_size=5", "train.lr=0.001", "train.lr=0.002"]);
    for p in ["sweep-score.png", "sweep-fid.png"] {
        let img = image::open(out.join(p)).unwrap();
        assert!(img.width() > img.height() * 2, "{p}: two panels side by side, got {}x{}", img.width(), img.height());
    }
    // one --values per --key; a shard is K/N with 1 <= K <= N
    let o = sweep(&["--key", "train.lr", "--values", "0.001", "--key", "model.kernel_size"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("2 --key but 1 --values"), "{err}");
    let o = sweep(&[&study[..], &["--shard", "3/2"]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("1 <= K <= N"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
