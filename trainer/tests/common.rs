//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use trainer::train::config::Config;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A dataset fetched by scripts/fetch-data.sh; these tests need it and say so.
pub fn data_dir(name: &str) -> PathBuf {
    let d = root().join("data").join(name);
    assert!(
        d.join(".ok").is_file(),
        "this test needs the real {name} data: run `scripts/fetch-data.sh {name}` first (.ci/run does)"
    );
    d
}

pub fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trainer-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A preset shrunk to test size: the preset's data and diffusion settings, a small U-Net.
pub fn tiny(preset: &str) -> Config {
    let mut cfg = Config::load(&root().join("trainer/configs").join(format!("{preset}.toml"))).unwrap();
    cfg.data.path = root().join(&cfg.data.path);
    cfg.model.ch = 32;
    cfg.model.ch_mult = cfg.model.ch_mult.iter().take(2).map(|m| (*m).min(2)).collect();
    cfg.model.num_res_blocks = 1;
    cfg.model.attention_resolutions = vec![cfg.model.image_size / 2];
    cfg.model.num_heads = 2;
    cfg.model.dropout = 0.0;
    cfg.train.batch_size = 8;
    cfg.train.lr = 1e-3;
    cfg.train.warmup_steps = 10;
    cfg.train.ema_decay = 0.99;
    cfg.train.checkpoint_every = 1000;
    cfg.train.preview_images = 0;
    cfg
}

/// Trains `cfg` with `trainer fit -q` into DIR/run (its config written to DIR) and returns the run folder.
pub fn fit_run(cfg: &Config, dir: &Path) -> PathBuf {
    let run = dir.join("run");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["fit", "-q", "--config"])
        .arg(write_config(cfg, dir))
        .arg("--out")
        .arg(&run)
        .status()
        .unwrap();
    assert!(st.success(), "trainer fit failed");
    run
}

pub fn write_config(cfg: &Config, dir: &Path) -> PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(&p, toml::to_string_pretty(cfg).unwrap()).unwrap();
    p
}

/// Lets in-process users of ONNX Runtime (OrtDenoiser, Generator) find the library scripts/setup.sh installed.
pub fn ort() {
    runtime::onnx::add_library_candidate(runtime::onnx::setup_library_path(&root()));
}
