//! The EMA chosen after training (`--post-hoc-ema`) on real training runs: the EMA of a longer decay rebuilt
//! from the checkpoints of a run is checked against a second run, identical but for that decay, that kept
//! it while training (the EMA does not change the training itself).

mod common;

use std::collections::HashMap;
use std::process::Command;

use candle_core::{Device, Tensor};
use common::*;
use trainer::train::{checkpoint, post_hoc};

/// sqrt(sum (a - b)^2) over every tensor of two weight sets.
fn distance(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, x)| {
            let d: Vec<f32> = (x - &b[k]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            d.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
        })
        .sum::<f64>()
        .sqrt()
}

#[test]
fn a_longer_ema_rebuilt_from_checkpoints_matches_the_one_kept_in_training() {
    data_dir("mnist");
    let dir = tmp_dir("post-hoc");
    let mut cfg = tiny("mnist");
    cfg.data.limit = 64;
    (cfg.model.ch, cfg.model.norm_groups, cfg.model.attention_resolutions) = (16, 8, vec![]);
    cfg.train.batch_size = 4;
    // the EMA's warm-up (decay (1 + n) / (10 + n) while below the set one) ends at update 35 for 0.8 and
    // 170 for 0.95: the runs are long enough for the two to differ
    cfg.train.steps = 240;
    cfg.train.checkpoint_every = 6;
    cfg.train.keep_checkpoints = 0;
    cfg.train.ema_decay = 0.8;
    let folder = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let short = fit_run(&cfg, &folder("short"));
    cfg.train.ema_decay = 0.95;
    let long = fit_run(&cfg, &folder("long"));

    let dev = Device::Cpu;
    let stored = |run: &std::path::Path| checkpoint::load_which(run, "latest", &dev, false).unwrap();
    let (s, l) = (stored(&short), stored(&long));
    assert!(distance(&s.model, &l.model) < 1e-4, "the two runs trained alike");
    let post_hoc::Rebuilt { tensors: rebuilt, fit, checkpoints: n, .. } =
        post_hoc::ema_weights(&short, "latest", 0.95, &dev).unwrap();
    assert_eq!(n, 40);
    let (err, before) = (distance(&rebuilt, &l.ema), distance(&s.ema, &l.ema));
    assert!(fit.misfit < 0.05, "{fit:?}");
    eprintln!("the EMA 0.95 rebuilt is off by {err}, the stored EMA 0.8 by {before}; misfit {}", fit.misfit);
    assert!(err < 0.01 * before, "rebuilt EMA 0.95 off by {err}, the stored EMA 0.8 by {before}");
    // the run's own decay gives back its own EMA
    let post_hoc::Rebuilt { tensors: same, fit, .. } = post_hoc::ema_weights(&short, "latest", 0.8, &dev).unwrap();
    assert!(fit.misfit < 1e-4 && distance(&same, &s.ema) < 1e-3 * before, "{fit:?}");
    // up to an earlier checkpoint: only the checkpoints before it
    let n = post_hoc::ema_weights(&short, "120", 0.95, &dev).unwrap().checkpoints;
    assert_eq!(n, 20);

    // the export names the decay in its metadata and says how the weights were made in its card
    common::ort();
    let out = dir.join("m.onnx");
    let st = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["export", "--card", "--post-hoc-ema", "0.95", "--run"])
        .arg(&short)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let card = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(
        card.contains("EMA 0.95,") && card.contains("rebuilt after training from the raw and EMA weights of 40"),
        "{card}"
    );
    let den = runtime::onnx::OrtDenoiser::open(&out, &runtime::onnx::Provider::Cpu, Some(1)).unwrap();
    assert_eq!(den.info().ema_decay, Some(0.95));
    // a decay that is not one is refused before anything is written
    let out2 = dir.join("bad.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["export", "--post-hoc-ema", "1.5", "--run"])
        .arg(&short)
        .arg("--out")
        .arg(&out2)
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("must be in (0, 1)"));
    assert!(!out2.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
