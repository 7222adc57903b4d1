//! Mutation fuzzing of the files the runtime reads from elsewhere: images (model inputs, masks; the trainer's
//! image folders decode through the same `images::decode`) and model files. Smoke runs here; longer ones:
//! `IMAGE_FUZZ_CASES=100000 MODEL_FUZZ_CASES=2000 cargo test --release -p runtime --test fuzz_inputs -- --nocapture`.
//! Every input is answered with a result or an error, never a panic, and the largest single allocation it
//! causes stays within the documented image limit, whatever size a header declares.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use runtime::fuzz::{largest_allocation, mutate_bytes, report, Probe};
use runtime::images::{load_image, load_mask, MAX_IMAGE_BYTES};

#[global_allocator]
static ALLOC: Probe = Probe;

fn cases(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("runtime-fuzz-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// CRC-32 (IEEE), as PNG chunks carry it: a hostile header with a good checksum reaches the decoder's sizing.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// Sets a PNG's declared width and height (IHDR) and fixes the chunk's CRC.
fn png_declare(png: &mut [u8], w: u32, h: u32) {
    // signature (8), IHDR length (4), "IHDR" (4), then width, height
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
}

/// Sets a JPEG's declared height and width (the first SOF0 marker).
fn jpeg_declare(jpeg: &mut [u8], w: u16, h: u16) {
    if let Some(i) = jpeg.windows(2).position(|m| m == [0xFF, 0xC0]) {
        jpeg[i + 5..i + 7].copy_from_slice(&h.to_be_bytes());
        jpeg[i + 7..i + 9].copy_from_slice(&w.to_be_bytes());
    }
}

#[test]
fn image_fuzz_mutated_png_and_jpeg_files_decode_or_are_refused_within_the_limit() {
    let dir = tmp("image");
    let grey = image::GrayImage::from_fn(28, 28, |x, y| image::Luma([(x * 9 + y * 3) as u8]));
    let rgba = image::RgbaImage::from_fn(20, 10, |x, y| image::Rgba([x as u8 * 12, y as u8 * 25, 90, 200]));
    let rgb = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 16, y as u8 * 16, 128]));
    let seeds = [
        (encode(grey.into(), image::ImageFormat::Png), true),
        (encode(rgba.into(), image::ImageFormat::Png), true),
        (encode(rgb.into(), image::ImageFormat::Jpeg), false),
    ];
    let sides = [0u32, 1, 4096, 4097, 16_384, 16_385, 65_535, 1 << 24, u32::MAX];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let (mut ok, mut refused, mut largest) = (0, 0, 0);
    let n = cases("IMAGE_FUZZ_CASES", 1500);
    for case in 0..n {
        let (seed, png) = &seeds[rng.gen_range(0..seeds.len())];
        let mut f = seed.clone();
        for _ in 0..rng.gen_range(1..=2) {
            match rng.gen_range(0..5) {
                0..=2 => mutate_bytes(&mut f, &mut rng, 64),
                // hostile declared sizes: the pixels would not fit in the file, or in memory
                _ if f.len() > 40 => {
                    let (w, h) = (sides[rng.gen_range(0..sides.len())], sides[rng.gen_range(0..sides.len())]);
                    if *png {
                        png_declare(&mut f, w, h);
                    } else {
                        jpeg_declare(&mut f, w.min(65_535) as u16, h.min(65_535) as u16);
                    }
                }
                _ => {}
            }
        }
        let p = dir.join(format!("in{}.img", case % 4));
        std::fs::write(&p, &f).unwrap();
        // as a model input (grey or RGB, resized), and as a mask of a 28x28 image
        let ((input, mask), bytes) = largest_allocation(|| {
            (load_image(&p, 1 + 2 * (case % 2), 28, Some([255, 255, 255])).map(|(x, _)| x), load_mask(&p, (28, 28), 28))
        });
        largest = largest.max(bytes);
        match input {
            Ok(x) => {
                ok += 1;
                assert_eq!(x.len(), (1 + 2 * (case % 2)) * 28 * 28);
                assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)));
            }
            Err(e) => {
                refused += 1;
                let e = e.to_string();
                assert!(e.contains(&p.display().to_string()), "the error names the file: {e}");
            }
        }
        if let Ok(m) = mask {
            assert!(m.len() == 28 * 28 && m.iter().all(|v| *v == 0.0 || *v == 1.0));
        }
    }
    report("image", ok, refused, largest);
    assert!(ok > 0 && refused > 0, "{ok} decoded, {refused} refused");
    assert!(largest as u64 <= MAX_IMAGE_BYTES, "a {largest}-byte allocation for a file of under 2 KiB");

    // the minimal hostile file: a valid 28x28 PNG declaring 16,384 x 16,384 (256 MiB of grey pixels)
    let mut bomb = seeds[0].0.clone();
    png_declare(&mut bomb, 16_384, 16_384);
    let p = dir.join("bomb.png");
    std::fs::write(&p, &bomb).unwrap();
    let (res, bytes) = largest_allocation(|| load_image(&p, 1, 28, None));
    let e = res.unwrap_err().to_string();
    assert!(e.contains("bomb.png") && e.to_lowercase().contains("limit"), "{e}");
    assert!((bytes as u64) < 1 << 20, "refused before allocating: {bytes} bytes");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn model_fuzz_mutated_onnx_files_open_or_are_refused() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    runtime::onnx::add_library_candidate(runtime::onnx::setup_library_path(root));
    let good = std::fs::read(root.join("fixtures/tiny-mnist-f32.onnx")).unwrap();
    let dir = tmp("model");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(33);
    let (mut ok, mut refused, mut largest) = (0, 0, 0);
    let n = cases("MODEL_FUZZ_CASES", 40);
    // the metadata entries sit at the end of our files: mutate there most of the time
    let tail = good.len().saturating_sub(64 << 10);
    for case in 0..n {
        let mut f = good.clone();
        match rng.gen_range(0..4) {
            0 => f.truncate(rng.gen_range(0..f.len())),
            1 => {
                for _ in 0..rng.gen_range(1..8) {
                    let i = rng.gen_range(0..f.len());
                    f[i] = rng.gen();
                }
            }
            _ => {
                for _ in 0..rng.gen_range(1..8) {
                    let i = rng.gen_range(tail..f.len());
                    f[i] = rng.gen();
                }
            }
        }
        let p = dir.join(format!("m{}.onnx", case % 2));
        std::fs::write(&p, &f).unwrap();
        let (res, bytes) =
            largest_allocation(|| runtime::onnx::OrtDenoiser::open(&p, &runtime::onnx::Provider::Cpu, Some(1)));
        largest = largest.max(bytes);
        match res {
            Ok(_) => ok += 1,
            Err(e) => {
                refused += 1;
                assert!(e.to_string().contains(&p.display().to_string()), "the error names the file: {e}");
            }
        }
    }
    // Rust-side allocations only: ONNX Runtime's own allocator is not seen by the probe
    report("model (Rust side)", ok, refused, largest);
    assert!(refused > 0, "{ok} opened, {refused} refused");
    assert!(largest <= 2 * good.len(), "{largest} bytes for a {}-byte file", good.len());
    std::fs::remove_dir_all(&dir).unwrap();
}
