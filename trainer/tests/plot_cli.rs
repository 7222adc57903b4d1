//! `trainer plot`: the seeds' figures are written (schedules, forward-noising strip + histograms, loss).

mod common;

use std::process::Command;

use common::*;

#[test]
fn plots_are_written() {
    data_dir("mnist");
    let dir = tmp_dir("plot");
    let t = env!("CARGO_BIN_EXE_trainer");
    let st = Command::new(t).args(["plot", "schedules", "--out"]).arg(dir.join("s.png")).status().unwrap();
    assert!(st.success());
    let conf = write_config(&tiny("mnist"), &dir);
    let st = Command::new(t)
        .args(["plot", "noising", "--config"])
        .arg(&conf)
        .args(["--t", "0,500,999", "--out"])
        .arg(dir.join("n.png"))
        .status()
        .unwrap();
    assert!(st.success());
    let strip = image::open(dir.join("n.png")).unwrap();
    assert_eq!((strip.width(), strip.height()), (3 * 28 + 4 * 2, 28 + 2 * 2));
    assert!(dir.join("n-hist-c0.png").is_file());
    let out = Command::new(t)
        .args(["plot", "noising", "--config"])
        .arg(&conf)
        .args(["--t", "0,1000", "--out"])
        .arg(dir.join("bad.png"))
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--t 1000"));
    std::fs::remove_dir_all(&dir).unwrap();
}
