//! The C example compiles against include/diffusion.h and libruntime.so with cc, and runs.

use std::path::Path;
use std::process::Command;

#[test]
fn c_example_compiles_and_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // the cdylib of this crate, built by `cargo test --release` next to the test binary's folder
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap();
    let lib = target.join("libruntime.so");
    // `cargo test` builds the rlib the tests link, not always the cdylib: build it, so a stale one is not tested
    let st = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "runtime", "--lib"])
        .current_dir(root)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(lib.is_file(), "{} missing", lib.display());
    let dir = std::env::temp_dir().join(format!("capi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("generate_c");
    let cc = Command::new("cc")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(root.join("runtime/include"))
        .arg(root.join("runtime/examples/c/generate.c"))
        .arg("-L")
        .arg(target)
        .arg("-lruntime")
        .arg("-o")
        .arg(&bin)
        .output()
        .unwrap();
    assert!(cc.status.success(), "cc failed: {}", String::from_utf8_lossy(&cc.stderr));
    let out = dir.join("first.pgm");
    let ort = runtime::onnx::setup_library_path(root);
    let run = Command::new(&bin)
        .arg(root.join("fixtures/tiny-mnist-f32.onnx"))
        .arg(&out)
        .env("LD_LIBRARY_PATH", target)
        .env("ORT_DYLIB_PATH", &ort)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("ok: 4 images 1x28x28, classes 10") && stdout.contains("are needed"), "{stdout}");
    assert!(stdout.contains("inpaint: left half kept"), "{stdout}");
    assert!(stdout.contains("interpolate: ends kept"), "{stdout}");
    assert!(stdout.contains("interpolate seeds: first frame matches"), "{stdout}");
    assert!(stdout.contains("attributes: []"), "{stdout}");
    assert!(
        stdout.contains(
            "attribute refused: dr_request.attributes unknown attribute 'position': this model has no attributes"
        ),
        "{stdout}"
    );
    let pgm = std::fs::read(&out).unwrap();
    assert!(pgm.starts_with(b"P5\n28 28\n255\n") && pgm.len() == 13 + 784);
    // a bad path is an error message through dr_last_error, not a crash
    let bad = Command::new(&bin)
        .arg(dir.join("nope.onnx"))
        .arg(&out)
        .env("LD_LIBRARY_PATH", target)
        .env("ORT_DYLIB_PATH", &ort)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nope.onnx"));
    std::fs::remove_dir_all(&dir).unwrap();
}
