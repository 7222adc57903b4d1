//! Multi-attribute conditioning end to end on a real (tiny) shifted-digits run: `trainer fit` on the two
//! labels, `trainer export` writes the attribute schema, the library and the C ABI take attributes by name,
//! and `trainer eval --composition` reports every (class, position) pair with the held-out ones marked.

mod common;

use std::ffi::{CStr, CString};
use std::process::Command;

use common::*;
use runtime::generator::{GenerateRequest, Generator, GeneratorOptions};

#[test]
fn a_two_label_model_is_trained_exported_sampled_by_name_and_scored_for_composition() {
    ort();
    data_dir("mnist");
    let dir = tmp_dir("attributes");
    let mut cfg = tiny("shifted-mnist");
    cfg.data.limit = 2000;
    cfg.train.steps = 20;
    let run = fit_run(&cfg, &dir);
    let model = dir.join("m.onnx");
    let st = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["export", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&model)
        .status()
        .unwrap();
    assert!(st.success());

    // the library: the schema from the metadata, attributes by name
    let mut g = Generator::open(&model, &GeneratorOptions::default()).unwrap();
    let names: Vec<&str> = g.info().attributes.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["position"]);
    assert_eq!(g.info().attributes[0].values[3], "bottom-right");
    let req = GenerateRequest {
        n: 2,
        steps: 3,
        class: Some("7".into()),
        guidance: 2.0,
        attributes: vec![("position".into(), "bottom-right".into())],
        ..Default::default()
    };
    let images = g.generate(&req, &mut |_| {}).unwrap();
    assert_eq!((images.n, images.labels.as_deref()), (2, Some(&[7i64, 7][..])));
    let bad = GenerateRequest { attributes: vec![("colour".into(), "red".into())], ..req.clone() };
    let e = g.generate(&bad, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("unknown attribute 'colour': this model's attributes are position"), "{e}");

    // the C ABI: the schema as JSON, attributes as "name=value"
    unsafe {
        use runtime::capi::*;
        let path = CString::new(model.to_str().unwrap()).unwrap();
        let h = dr_open(path.as_ptr(), std::ptr::null());
        assert!(!h.is_null());
        let schema = CStr::from_ptr(dr_model_attributes(h)).to_str().unwrap().to_string();
        assert!(schema.starts_with("[{\"name\":\"position\"") && schema.contains("\"bottom-left\""), "{schema}");
        let mut r: DrRequest = std::mem::zeroed();
        r.size = std::mem::size_of::<DrRequest>() as u32;
        (r.n, r.steps, r.class_index, r.guidance, r.batch) = (2, 3, 7, 2.0, 2);
        let attrs = CString::new("position=3").unwrap();
        let weights = CString::new("position=1.5").unwrap();
        (r.attributes, r.attribute_guidance) = (attrs.as_ptr(), weights.as_ptr());
        let mut out = vec![0u8; 2 * 32 * 32];
        assert_eq!(dr_generate(h, &r, out.as_mut_ptr(), out.len()), 0);
        assert!(out.iter().any(|&p| p > 0));
        let wrong = CString::new("position=9").unwrap();
        r.attributes = wrong.as_ptr();
        assert_eq!(dr_generate(h, &r, out.as_mut_ptr(), out.len()), -1);
        let e = CStr::from_ptr(dr_last_error()).to_str().unwrap().to_string();
        assert!(e.contains("dr_request.attributes") && e.contains("unknown value '9' of position"), "{e}");
        dr_free(h);
    }

    // the composition report: every pair, 7 at positions 2 and 3 held out
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["eval", "-q", "--run"])
        .arg(&run)
        .args(["--n", "20", "--steps", "2", "--sampler", "ddim", "--features", "classifier"])
        .args(["--composition", "2", "--guidance", "1", "--attr-guidance", "position=3", "--cache"])
        .arg(dir.join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &r["composition"];
    let cells = c["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 40);
    let held: Vec<(String, String)> = cells
        .iter()
        .filter(|c| c["held_out"].as_bool().unwrap())
        .map(|c| (c["class"].as_str().unwrap().into(), c["position"].as_str().unwrap().into()))
        .collect();
    assert_eq!(held, [("7".into(), "bottom-left".into()), ("7".into(), "bottom-right".into())]);
    // each label weighed on its own: the class at --guidance, the position at its own weight
    assert_eq!(c["guidance"], 1.0);
    assert_eq!(
        c["label_guidance"],
        serde_json::json!([{ "label": "class", "guidance": 1.0 }, { "label": "position", "guidance": 3.0 }])
    );
    // a weight for an attribute the model does not have is refused before any sampling, naming the ones it has
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["eval", "-q", "--run"])
        .arg(&run)
        .args(["--n", "20", "--features", "classifier", "--composition", "2", "--attr-guidance", "colour=2"])
        .arg("--cache")
        .arg(dir.join("cache"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("no attribute colour (its attributes: position)"), "{e}");
    for k in ["held_out_pairs", "held_out_class_seen_pairs", "other_pairs"] {
        let v = c[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    // a run without positions has nothing to compose
    let plain = dir.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let mut mnist = tiny("mnist");
    (mnist.data.limit, mnist.train.steps) = (256, 1);
    let prun = fit_run(&mnist, &plain);
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["eval", "-q", "--run"])
        .arg(&prun)
        .args(["--n", "4", "--composition", "2", "--features", "classifier"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--composition needs a run on shifted digits"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
