//! `generate` end to end on the fixture model (fixtures/tiny-mnist-*.onnx, made by scripts/make-fixtures.sh),
//! and its error messages.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("generate-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn generate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_generate"))
}

fn png_size(p: &Path) -> (u32, u32, image::ColorType) {
    let img = image::open(p).unwrap();
    (img.width(), img.height(), img.color())
}

#[test]
fn writes_a_grid_of_the_right_size_from_f32_and_f16_models() {
    let d = tmp("grid");
    for (model, sampler) in [("tiny-mnist-f32.onnx", "ddim"), ("tiny-mnist-f16.onnx", "dpm++")] {
        let out = d.join(format!("{model}.png"));
        let o = generate()
            .args(["--model"])
            .arg(fixture(model))
            .args(["--n", "16", "--steps", "10", "--sampler", sampler, "-q", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // 4 x 4 grid of 28x28 with 2-pixel borders: 4*28 + 5*2 = 122
        assert_eq!(png_size(&out), (122, 122, image::ColorType::L8));
        assert!(
            stdout.contains("provider cpu") && stdout.contains("16 images") && stdout.contains("images/s"),
            "{stdout}"
        );
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn same_seed_same_bytes_and_per_image_files_and_strip() {
    let d = tmp("seed");
    let run = |seed: &str, out: &Path, extra: &[&str]| {
        let o = generate()
            .arg("--model")
            .arg(fixture("tiny-mnist-f32.onnx"))
            .args([
                "--n",
                "5",
                "--steps",
                "8",
                "--batch",
                "2",
                "--class",
                "7",
                "--guidance",
                "2",
                "--seed",
                seed,
                "-q",
                "--out",
            ])
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (a, b, c) = (d.join("a.png"), d.join("b.png"), d.join("c.png"));
    let each = d.join("each");
    let strip = d.join("strip.png");
    run("3", &a, &["--out-dir", each.to_str().unwrap(), "--strip", strip.to_str().unwrap()]);
    run("3", &b, &[]);
    run("4", &c, &[]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
    assert_eq!(std::fs::read_dir(&each).unwrap().count(), 5);
    assert_eq!(png_size(&each.join("000004.png")).0, 28);
    // strip: 8 columns, 2 rows (x_t, x0) for each of the first 2 images of the first batch
    assert_eq!(png_size(&strip), (8 * 28 + 9 * 2, 4 * 28 + 5 * 2, image::ColorType::L8));
    std::fs::remove_dir_all(&d).unwrap();
}

fn err_of(args: &[&str], model: &Path) -> String {
    let o = generate().arg("--model").arg(model).args(args).arg("-q").output().unwrap();
    assert!(!o.status.success(), "should fail: {args:?}");
    assert_eq!(o.status.code(), Some(1), "a clean error exit, not a panic");
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn bad_input_gives_clear_errors() {
    let d = tmp("errors");
    let m = fixture("tiny-mnist-f32.onnx");
    let out = d.join("x.png");
    let o = out.to_str().unwrap();
    assert!(err_of(&["--n", "0", "--out", o], &m).contains("--n must be at least 1"));
    assert!(err_of(&["--class", "giraffe", "--out", o], &m).contains("unknown class 'giraffe'"));
    assert!(err_of(&["--provider", "quantum", "--out", o], &m).contains("unknown provider"));
    assert!(err_of(&["--sampler", "euler", "--out", o], &m).contains("unknown sampler"));
    assert!(err_of(&["--steps", "5000", "--out", o], &m).contains("--steps must be in 1..=1000"));
    let txt = d.join("notes.onnx");
    std::fs::write(&txt, "this is not a model").unwrap();
    let e = err_of(&["--out", o], &txt);
    assert!(e.contains("notes.onnx") && e.contains("cannot load"), "{e}");
    let bytes = std::fs::read(&m).unwrap();
    let cut = d.join("truncated.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    assert!(err_of(&["--out", o], &cut).contains("truncated.onnx"));
    assert!(err_of(&["--out", o], &d.join("missing.onnx")).contains("missing.onnx"));
    assert!(!out.exists(), "nothing is written on error");
    std::fs::remove_dir_all(&d).unwrap();
}
