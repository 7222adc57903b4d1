//! The shipped few-step student (models/mnist-fast.onnx, `trainer distill`) used with nothing but the file: the
//! library's recommended request and the C ABI's steps 0 draw the same images in the student's own steps, one
//! model call each with the guidance weight as an input; what it was not distilled for is refused by name.

use std::ffi::{CStr, CString};
use std::path::Path;

use runtime::capi::{dr_free, dr_generate, dr_last_error, dr_open, DrRequest};
use runtime::generator::{GenerateRequest, Generator, GeneratorOptions};

fn student() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    runtime::onnx::add_library_candidate(runtime::onnx::setup_library_path(root));
    let p = root.join("models/mnist-fast.onnx");
    assert!(p.is_file(), "{} is missing: the shipped models are committed in models/", p.display());
    p
}

#[test]
fn the_library_and_the_c_abi_sample_the_student_in_its_own_steps() {
    let path = student();
    let mut g = Generator::open(&path, &GeneratorOptions::default()).unwrap();
    let info = g.info().clone();
    let st = info.student.clone().expect("mnist-fast.onnx is a student");
    let rec = info.recommended.clone().expect("a student recommends its own sampling");
    assert_eq!((rec.sampler, rec.steps), (st.sampler, st.steps));
    assert!(info.takes_guidance() && rec.guidance > 0.0);
    let req = GenerateRequest { n: 8, class: Some("7".into()), ..GenerateRequest::recommended(&info) };
    let mut steps = 0;
    let lib = g.generate(&req, &mut |_| steps += 1).unwrap();
    assert_eq!(steps, st.steps);

    // C: no sampler and steps 0 are the model's own
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    let h = unsafe { dr_open(cpath.as_ptr(), std::ptr::null()) };
    assert!(!h.is_null());
    let mut r: DrRequest = unsafe { std::mem::zeroed() };
    r.size = std::mem::size_of::<DrRequest>() as u32;
    (r.n, r.steps, r.class_index, r.guidance, r.seed, r.batch) = (8, 0, 7, rec.guidance, 0, 16);
    let mut out = vec![0u8; 8 * 28 * 28];
    let rc = unsafe { dr_generate(h, &r, out.as_mut_ptr(), out.len()) };
    let err = || unsafe { CStr::from_ptr(dr_last_error()) }.to_string_lossy().into_owned();
    assert_eq!(rc, 0, "{}", err());
    assert_eq!(out, lib.pixels, "the C ABI's own sampling differs from the library's");
    // another step count is refused with the field named
    r.steps = 10;
    assert_ne!(unsafe { dr_generate(h, &r, out.as_mut_ptr(), out.len()) }, 0);
    assert!(err().contains("steps"), "{}", err());
    unsafe { dr_free(h) };

    // the guidance weight is an input: w 0 and the recommended one give different images, both in range
    let plain = g.generate(&GenerateRequest { guidance: 0.0, ..req.clone() }, &mut |_| {}).unwrap();
    assert_ne!(plain.pixels, lib.pixels);
    let (_, hi) = info.guidance_input.unwrap();
    let e = g.generate(&GenerateRequest { guidance: hi + 1.0, ..req }, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("distilled for guidance weights"), "{e}");
}
