//! `trainer distill` end to end on real MNIST: a tiny teacher run distilled in two halvings; a run stopped in
//! its second stage resumes to exactly the weights of an uninterrupted one; the export is a student that the
//! runtime samples with nothing but the file; a consistency student samples in any number of steps; bad
//! requests are named.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::{data_dir, fit_run, ort, tiny, tmp_dir};
use runtime::generator::{GenerateRequest, Generator, GeneratorOptions};

fn trainer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn weights(run: &Path) -> HashMap<String, candle_core::Tensor> {
    let ck = trainer::train::checkpoint::load_which(run, "latest", &candle_core::Device::Cpu, false).unwrap();
    ck.model
}

/// Distils `teacher` (4 teacher steps -> 1 student step: two stages of 4 steps) into `out`.
fn distill(teacher: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut c = trainer();
    c.args(["distill", "-q", "--teacher"]).arg(teacher).arg("--out").arg(out);
    c.args([
        "--teacher-steps",
        "4",
        "--steps",
        "1",
        "--train-steps",
        "8",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "3",
    ]);
    run(c.args(extra))
}

#[test]
fn a_distilled_student_resumes_exactly_exports_and_samples_in_its_own_steps() {
    data_dir("mnist");
    let dir = tmp_dir("distill");
    let mut cfg = tiny("mnist");
    cfg.train.steps = 20;
    let teacher = fit_run(&cfg, &dir);

    let whole = dir.join("whole");
    let (ok, log) = distill(&teacher, &whole, &[]);
    assert!(ok, "{log}");
    // stage 1's student (2 steps) became stage 2's teacher; each stage ends with a checkpoint
    assert!(whole.join("distill/teacher-stage-1.safetensors").is_file());
    let steps: Vec<usize> = trainer::train::checkpoint::list(&whole).unwrap().into_iter().map(|(s, _)| s).collect();
    assert!(steps.contains(&4) && steps.contains(&8), "{steps:?}");

    // stopped inside stage 2, resumed: the same weights and losses as the uninterrupted run
    let cut = dir.join("cut");
    let (ok, log) = distill(&teacher, &cut, &["--stop-after", "6"]);
    assert!(ok, "{log}");
    let (ok, log) = run(trainer().args(["distill", "-q", "--resume"]).arg(&cut));
    assert!(ok, "{log}");
    let (a, b) = (weights(&whole), weights(&cut));
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        let d = (v - &b[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d == 0.0, "{k} differs by {d} after the resume");
    }
    let losses = |r: &Path| -> Vec<String> {
        std::fs::read_to_string(r.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').nth(1).unwrap().to_string())
            .collect()
    };
    assert_eq!(losses(&whole), losses(&cut));

    // the export: a 1-step student with the guidance input; the stage-1 checkpoint is a 2-step one
    ort();
    let file = dir.join("student.onnx");
    let (ok, log) = run(trainer().args(["export", "--run"]).arg(&whole).arg("--out").arg(&file));
    assert!(ok, "{log}");
    let mut g = Generator::open(&file, &GeneratorOptions::default()).unwrap();
    let info = g.info().clone();
    assert_eq!(info.student.as_ref().map(|s| (s.steps, s.teacher_steps)), Some((1, 4)));
    assert_eq!(info.guidance_input, Some((0.0, 4.0)));
    let req = GenerateRequest { n: 3, class: Some("7".into()), ..GenerateRequest::recommended(&info) };
    let mut calls = 0;
    let images = g.generate(&req, &mut |_| calls += 1).unwrap();
    assert_eq!((calls, images.n, req.steps), (1, 3, 1));
    let e = g.generate(&GenerateRequest { steps: 4, ..req.clone() }, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("1-step student"), "{e}");
    let two = dir.join("student-2.onnx");
    let (ok, log) = run(trainer().args(["export", "--run"]).arg(&whole).args(["--checkpoint", "4", "--out"]).arg(&two));
    assert!(ok, "{log}");
    let g2 = Generator::open(&two, &GeneratorOptions::default()).unwrap();
    assert_eq!(g2.info().student.as_ref().map(|s| s.steps), Some(2));
    let (ok, log) = run(trainer()
        .args(["export", "--run"])
        .arg(&whole)
        .args(["--sampler", "dpm++", "--steps", "10", "--guidance", "2", "--out"])
        .arg(dir.join("x.onnx")));
    assert!(!ok && log.contains("1-step student"), "{log}");

    // consistency distillation: one stage on the teacher's grid; its student samples in any number of steps
    let cd = dir.join("cd");
    let mut c = trainer();
    c.args(["distill", "-q", "--method", "consistency", "--teacher"]).arg(&teacher).arg("--out").arg(&cd);
    let (ok, log) = run(c.args(["--teacher-steps", "4", "--steps", "2", "--train-steps", "3", "--batch-size", "4"]));
    assert!(ok, "{log}");
    let cd_file = dir.join("cd.onnx");
    let (ok, log) = run(trainer().args(["export", "--run"]).arg(&cd).arg("--out").arg(&cd_file));
    assert!(ok, "{log}");
    let mut g = Generator::open(&cd_file, &GeneratorOptions::default()).unwrap();
    let info = g.info().clone();
    let st = info.student.clone().unwrap();
    assert_eq!((st.method.as_str(), st.sampler.to_string().as_str(), st.steps), ("consistency", "consistency", 2));
    let req = GenerateRequest { n: 2, class: Some("3".into()), ..GenerateRequest::recommended(&info) };
    for steps in [1, 2, 4] {
        let mut calls = 0;
        g.generate(&GenerateRequest { steps, ..req.clone() }, &mut |_| calls += 1).unwrap();
        assert_eq!(calls, steps);
    }
    let ddim = GenerateRequest { sampler: runtime::sampler::SamplerKind::Ddim, ..req };
    assert!(g.generate(&ddim, &mut |_| {}).unwrap_err().to_string().contains("consistency student"));

    // bad input is named, and nothing on disk is lost
    let (ok, log) = distill(&teacher, &whole, &[]);
    assert!(!ok && log.contains("already exists"), "{log}");
    let (ok, log) = run(trainer().args(["distill", "--teacher"]).arg(&file).arg("--out").arg(dir.join("y")));
    assert!(!ok && log.contains("--config is needed"), "{log}");
    let mut odd = trainer();
    odd.args(["distill", "--teacher"]).arg(&teacher).arg("--out").arg(dir.join("z"));
    let (ok, log) = run(odd.args(["--teacher-steps", "6", "--steps", "1"]));
    assert!(!ok && log.contains("power of two") && !dir.join("z").exists(), "{log}");
    let (ok, log) = run(trainer().args(["distill", "--resume"]).arg(&teacher));
    assert!(!ok && log.contains("is not a distillation run"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}
