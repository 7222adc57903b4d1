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

#[test]
fn a_guidance_interval_limits_guidance_to_its_timesteps() {
    let d = tmp("interval");
    // DDIM 4 steps, trailing: t = 249, 499, 749, 999 of the fixture's T = 1000
    let run = |name: &str, extra: &[&str]| -> (Vec<u8>, String) {
        let out = d.join(format!("{name}.png"));
        let o = generate()
            .arg("--model")
            .arg(fixture("tiny-mnist-f32.onnx"))
            .args(["--n", "4", "--steps", "4", "--class", "3", "--seed", "5", "-q", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (std::fs::read(&out).unwrap(), String::from_utf8_lossy(&o.stdout).to_string())
    };
    let (plain, _) = run("plain", &["--guidance", "0"]);
    let (guided, _) = run("guided", &["--guidance", "4"]);
    let (all, _) = run("all", &["--guidance", "4", "--guidance-interval", "all"]);
    let (every, _) = run("every", &["--guidance", "4", "--guidance-interval", "0,999"]);
    let (none, _) = run("none", &["--guidance", "4", "--guidance-interval", "250,498"]);
    let (some, said) = run("some", &["--guidance", "4", "--guidance-interval", "400,800"]);
    assert_ne!(plain, guided);
    assert_eq!(all, guided);
    assert_eq!(every, guided);
    // an interval between the visited timesteps guides none of them
    assert_eq!(none, plain);
    assert!(some != plain && some != guided);
    assert!(said.contains("guidance 4 at t 400..=800"), "{said}");
    let o = d.join("x.png");
    let m = fixture("tiny-mnist-f32.onnx");
    // a malformed interval is refused by the argument parser (exit 2), one past T by the model (exit 1)
    let bad = generate().arg("--model").arg(&m).args(["--guidance-interval", "800,400", "-q"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("above the second"));
    let e = err_of(&["--guidance", "2", "--guidance-interval", "5,1000", "--out", o.to_str().unwrap()], &m);
    assert!(e.contains("--guidance-interval 5,1000: the model's timesteps run 0..=999"), "{e}");
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
    let e = err_of(&["--attr", "position=3", "--out", o], &m);
    assert!(e.contains("unknown attribute 'position': this model has no attributes besides its class"), "{e}");
    // flags that do not parse: a usage error (exit 2) naming the flag's value
    for (args, needle) in [
        (["--attr", "position"], "'position' is not NAME=VALUE"),
        (["--attr-guidance", "position=x"], "'x' in 'position=x'"),
    ] {
        let out = generate().arg("--model").arg(&m).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle), "{args:?}");
    }
    assert!(err_of(&["--batch", "0", "--out", o], &m).contains("--batch must be at least 1"));
    // names are checked by the argument parser, before the model loads, and --help lists them
    for (flag, bad, choices) in
        [("--provider", "quantum", "cpu, cuda, tensorrt, auto"), ("--sampler", "euler", "ddim, ddpm, dpm++")]
    {
        let o = generate().arg("--model").arg(&m).args([flag, bad]).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "a usage error");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(&format!("invalid value '{bad}' for '{flag}")) && e.contains(choices), "{e}");
    }
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

/// The images of `--out-dir`, as 8-bit grey pixels.
fn read_dir_images(d: &Path, n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| image::open(d.join(format!("{i:06}.png"))).unwrap().to_luma8().into_raw()).collect()
}

fn run_ok(args: &[&str], paths: &[(&str, &Path)]) -> String {
    let mut c = generate();
    c.arg("--model").arg(fixture("tiny-mnist-f32.onnx")).args(args).arg("-q");
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    if !paths.iter().any(|(flag, _)| *flag == "--out") {
        // the grid is always written: keep it out of the working directory
        c.arg("--out").arg(std::env::temp_dir().join(format!("generate-test-grid-{}.png", std::process::id())));
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn image_to_image_and_inpainting_from_files() {
    let d = tmp("img2img");
    // a 28x28 grey image: a bright square on a dark gradient
    let img = image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([if (8..20).contains(&x) && (8..20).contains(&y) { 230 } else { (x * 4) as u8 }])
    });
    let input = d.join("in.png");
    img.save(&input).unwrap();
    let common = ["--n", "3", "--sampler", "ddim", "--steps", "10", "--seed", "5"];
    let dir = |tag: &str| d.join(tag);
    // strength 0 gives the input back, 1 is plain sampling with the same seed
    run_ok(&[&common[..], &["--strength", "0"]].concat(), &[("--init", &input), ("--out-dir", &dir("s0"))]);
    assert!(read_dir_images(&dir("s0"), 3).iter().all(|p| p == img.as_raw()));
    run_ok(&[&common[..], &["--strength", "1"]].concat(), &[("--init", &input), ("--out-dir", &dir("s1"))]);
    run_ok(&common, &[("--out-dir", &dir("plain"))]);
    assert_eq!(read_dir_images(&dir("s1"), 3), read_dir_images(&dir("plain"), 3));
    // half way: the output keeps more of the input than plain samples do
    run_ok(&[&common[..], &["--strength", "0.3"]].concat(), &[("--init", &input), ("--out-dir", &dir("s03"))]);
    let dist = |a: &[u8]| a.iter().zip(img.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>();
    let (near, far) = (read_dir_images(&dir("s03"), 3), read_dir_images(&dir("plain"), 3));
    assert!(near.iter().map(|p| dist(p)).sum::<f64>() < far.iter().map(|p| dist(p)).sum::<f64>());

    // inpainting: the left half is kept (black in the mask), the right half generated (white)
    let mask = image::GrayImage::from_fn(28, 28, |x, _| image::Luma([if x < 14 { 0 } else { 255 }]));
    let mask_path = d.join("mask.png");
    mask.save(&mask_path).unwrap();
    run_ok(&common, &[("--inpaint", &input), ("--mask", &mask_path), ("--out-dir", &dir("inpaint"))]);
    for out in read_dir_images(&dir("inpaint"), 3) {
        let (mut kept, mut changed) = (true, 0);
        for (i, (o, x)) in out.iter().zip(img.as_raw()).enumerate() {
            if i % 28 < 14 {
                kept &= o == x;
            } else {
                changed += (o != x) as usize;
            }
        }
        assert!(kept, "the known pixels are the input's");
        assert!(changed > 100, "the masked region is generated ({changed} of 392 pixels differ)");
    }
    // with RePaint's resampling the known pixels stay too
    run_ok(
        &[&common[..], &["--resample", "2", "--jump", "3"]].concat(),
        &[("--inpaint", &input), ("--mask", &mask_path), ("--out-dir", &dir("repaint"))],
    );
    assert!(read_dir_images(&dir("repaint"), 3)
        .iter()
        .all(|p| (0..784).filter(|i| i % 28 < 14).all(|i| p[i] == img.as_raw()[i])));

    // interpolation: frame 0 is the first image's own image-to-image result with a shared x_t, the last the
    // second's; the grid is one row
    let flipped = d.join("flipped.png");
    image::imageops::flip_horizontal(&img).save(&flipped).unwrap();
    let ends =
        ["--sampler", "ddim", "--steps", "10", "--seed", "5", "--strength", "0.5", "--class", "3", "--batch", "1"];
    let mut c = generate();
    c.arg("--model").arg(fixture("tiny-mnist-f32.onnx")).args(ends).args(["--frames", "4", "-q", "--interpolate"]);
    let o = c.arg(&input).arg(&flipped).arg("--out-dir").arg(dir("lerp")).arg("--out").arg(d.join("lerp.png")).output();
    assert!(o.unwrap().status.success());
    assert_eq!(png_size(&d.join("lerp.png")).0, 4 * 28 + 5 * 2, "one row of 4 frames");
    let frames = read_dir_images(&dir("lerp"), 4);
    for (k, (x0, frame)) in [(&input, &frames[0]), (&flipped, &frames[3])].into_iter().enumerate() {
        let tag = format!("alone-{k}");
        run_ok(&[&ends[..], &["--n", "1", "--share-xt"]].concat(), &[("--init", x0), ("--out-dir", &dir(&tag))]);
        assert_eq!(&read_dir_images(&dir(&tag), 1)[0], frame);
    }
    assert_ne!(frames[1], frames[0]);
    // between two seeds: the ends are those seeds' images from a shared x_T
    let seeds = ["--sampler", "ddim", "--steps", "10", "--class", "3", "--batch", "1"];
    let mut c = generate();
    c.arg("--model").arg(fixture("tiny-mnist-f32.onnx")).args(seeds).args(["--frames", "3", "-q"]);
    let st =
        c.args(["--interpolate-seeds", "11", "12", "--out-dir"]).arg(dir("slerp")).arg("--out").arg(d.join("s.png"));
    assert!(st.output().unwrap().status.success());
    let frames = read_dir_images(&dir("slerp"), 3);
    for (k, seed) in [(0, "11"), (2, "12")] {
        let tag = format!("seed-{seed}");
        run_ok(&[&seeds[..], &["--n", "1", "--share-xt", "--seed", seed]].concat(), &[("--out-dir", &dir(&tag))]);
        assert_eq!(read_dir_images(&dir(&tag), 1)[0], frames[k], "frame {k} is seed {seed}'s");
    }

    // an RGB image of another size is converted and resized, and says so
    let rgb = d.join("rgb.png");
    image::RgbImage::from_pixel(40, 30, image::Rgb([200, 10, 10])).save(&rgb).unwrap();
    let notes = run_ok(&common, &[("--init", &rgb), ("--out", &d.join("rgb-out.png"))]);
    assert!(notes.contains("40x30 resized to the model's 28x28") && notes.contains("colour converted"), "{notes}");
    // bad input: a mask of another size, a strength outside [0, 1], an unreadable file
    let small = d.join("small.png");
    image::GrayImage::new(10, 10).save(&small).unwrap();
    let o = d.join("x.png");
    let o = o.to_str().unwrap();
    let m = fixture("tiny-mnist-f32.onnx");
    let e = err_of(&["--inpaint", input.to_str().unwrap(), "--mask", small.to_str().unwrap(), "--out", o], &m);
    assert!(e.contains("--mask") && e.contains("is 10x10, the image it masks 28x28"), "{e}");
    let e = err_of(&["--init", input.to_str().unwrap(), "--strength", "1.5", "--out", o], &m);
    assert!(e.contains("--strength must be in [0, 1]"), "{e}");
    let e = err_of(&["--init", mask_path.with_extension("nope").to_str().unwrap(), "--out", o], &m);
    assert!(e.contains("mask.nope") && e.contains("cannot read"), "{e}");
    assert!(!Path::new(o).exists());
    std::fs::remove_dir_all(&d).unwrap();
}
