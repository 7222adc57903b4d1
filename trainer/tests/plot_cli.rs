//! `trainer plot`: the seeds' figures are written (schedules, forward-noising strip + histograms, reverse-process
//! strips, loss).

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

#[test]
fn reverse_process_strip_goes_from_noise_to_the_sample() {
    data_dir("mnist");
    let dir = tmp_dir("plot-reverse");
    let t = env!("CARGO_BIN_EXE_trainer");
    let mut cfg = tiny("mnist");
    cfg.train.steps = 2;
    let run = fit_run(&cfg, &dir);
    let plot = |extra: &[&str], out: &str| {
        Command::new(t)
            .args(["plot", "reverse", "--run"])
            .arg(&run)
            .args(["--rows", "2", "--cols", "5", "--steps", "10"])
            .args(extra)
            .arg("--out")
            .arg(dir.join(out))
            .output()
            .unwrap()
    };
    let o = plot(&["--class", "7"], "r.png");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("columns t = 999,"), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(dir.join("r.png")).unwrap().to_luma8();
    // 5 columns; 2 images x (x_t row, x0 row)
    assert_eq!((img.width(), img.height()), (5 * 28 + 6 * 2, 4 * 28 + 5 * 2));
    let tile = |row: u32, col: u32| -> Vec<u8> {
        let (x0, y0) = (2 + col * 30, 2 + row * 30);
        (0..28).flat_map(|y| (0..28).map(move |x| (x, y))).map(|(x, y)| img.get_pixel(x0 + x, y0 + y)[0]).collect()
    };
    let spread = |v: &[u8]| {
        let m = v.iter().map(|p| *p as f64).sum::<f64>() / v.len() as f64;
        (v.iter().map(|p| (*p as f64 - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    // the first column of x_t is the starting Gaussian noise: wide spread, about half the pixels clipped
    assert!(spread(&tile(0, 0)) > 80.0, "x_T spread {}", spread(&tile(0, 0)));
    // after the last DDIM step x_t is the predicted x0
    assert_eq!(tile(0, 4), tile(1, 4));
    assert_eq!(tile(2, 4), tile(3, 4));
    let o = plot(&["--class", "eleven"], "bad.png");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unknown class 'eleven'"));
    assert!(!dir.join("bad.png").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
