//! `trainer export` on a real (tiny) run: the written model carries the metadata `generate` needs, and bad
//! requests stop with a clear message without writing anything.

mod common;

use std::process::Command;

use common::*;
use runtime::metadata::{Dtype, Recommended, Weights};
use runtime::onnx::{OrtDenoiser, Provider};
use runtime::sampler::{GuidanceInterval, SamplerKind};

fn trainer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
}

fn fails_with(cmd: &mut Command, needle: &str) {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail with '{needle}'");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

#[test]
fn export_writes_self_describing_models_and_refuses_bad_requests() {
    ort();
    data_dir("mnist");
    let dir = tmp_dir("export");
    let mut cfg = tiny("mnist");
    cfg.data.limit = 256;
    cfg.train.steps = 2;
    let run = dir.join("run");
    let out = dir.join("m.onnx");

    // a run folder without a checkpoint
    std::fs::create_dir_all(&run).unwrap();
    fails_with(trainer().args(["export", "--run"]).arg(&run).arg("--out").arg(&out), "has no checkpoint yet");
    std::fs::remove_dir_all(&run).unwrap();

    assert_eq!(fit_run(&cfg, &dir), run);
    for dtype in ["f32", "f16"] {
        let p = dir.join(format!("m-{dtype}.onnx"));
        let st = trainer()
            .args(["export", "--card", "--run"])
            .arg(&run)
            .args(["--dtype", dtype, "--out"])
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        // the model card names the file's hash, the training and the data
        use sha2::Digest;
        let card = std::fs::read_to_string(p.with_extension("md")).unwrap();
        let sum = format!("{:x}", sha2::Sha256::digest(std::fs::read(&p).unwrap()));
        assert!(card.contains(&format!("sha256 {sum}")), "{card}");
        assert!(card.contains("| training | 2 steps, batch 8,") && card.contains("mnist (train)"), "{card}");
        let want: Dtype = dtype.parse().unwrap();
        assert!(card.contains(&format!("| file | {want}, ema weights")), "{card}");
        let den = OrtDenoiser::open(&p, &Provider::Cpu, Some(1)).unwrap();
        let info = den.info();
        assert_eq!((info.num_classes, info.null_class, info.class_names[7].as_str()), (10, Some(10), "7"));
        assert_eq!((info.betas.len(), info.dtype), (1000, want));
        assert_eq!(
            (info.training_steps, info.weights, info.ema_decay),
            (Some(2), Some(Weights::Ema), Some(cfg.train.ema_decay))
        );
        assert_eq!(info.schedule, Some(runtime::schedule::BetaSchedule::LINEAR));
        assert!(info.dataset_fingerprint.is_some() && info.exporter.is_some() && info.model_config.is_some());
        // everything the file says is in the schema (nothing written beside it)
        assert!(info.extra.is_empty(), "{:?}", info.extra);
    }
    // the recommended way of sampling goes into the metadata and the card
    let rec = dir.join("rec.onnx");
    let st = trainer()
        .args(["export", "--card", "--run"])
        .arg(&run)
        .args(["--sampler", "dpm++", "--steps", "20", "--guidance", "2", "--guidance-interval", "5,40", "--out"])
        .arg(&rec)
        .status()
        .unwrap();
    assert!(st.success());
    let den = OrtDenoiser::open(&rec, &Provider::Cpu, Some(1)).unwrap();
    let interval = Some(GuidanceInterval { lo: 5, hi: 40 });
    let want = Recommended { sampler: SamplerKind::DpmSolverPP, steps: 20, guidance: 2.0, guidance_interval: interval };
    assert_eq!(den.info().recommended, Some(want));
    let card = std::fs::read_to_string(rec.with_extension("md")).unwrap();
    assert!(card.contains("recommends dpm++ with 20 steps, guidance 2 at timesteps 5..=40 only"), "{card}");
    // an interval past the model's T is refused before anything is written
    let t = den.info().num_timesteps();
    fails_with(
        trainer()
            .args(["export", "--run"])
            .arg(&run)
            .args(["--sampler", "dpm++", "--steps", "9", "--guidance", "1", "--guidance-interval"])
            .arg(format!("5,{t}"))
            .arg("--out")
            .arg(dir.join("x.onnx")),
        &format!("timesteps run 0..={}", t - 1),
    );
    assert!(!dir.join("x.onnx").exists());
    fails_with(
        trainer()
            .args(["export", "--run"])
            .arg(&run)
            .args(["--sampler", "euler", "--steps", "9", "--guidance", "1", "--out"])
            .arg(dir.join("x.onnx")),
        "invalid value 'euler' for '--sampler",
    );
    assert!(!dir.join("x.onnx").exists());
    // `--model`: an exported file re-recommended (here in place, with its card) is byte for byte the file a
    // fresh export with that recommendation writes, and its card gets that file's hash and sentence
    let again = ["--sampler", "ddim", "--steps", "12", "--guidance", "3"];
    let direct = dir.join("direct.onnx");
    assert!(trainer()
        .args(["export", "--run"])
        .arg(&run)
        .args(again)
        .arg("--out")
        .arg(&direct)
        .status()
        .unwrap()
        .success());
    let in_place = || {
        let mut c = trainer();
        c.args(["export", "--card", "--model"]).arg(&rec).args(again).arg("--out").arg(&rec);
        c
    };
    fails_with(&mut in_place(), "rec.onnx already exists; use --force");
    assert!(in_place().arg("--force").status().unwrap().success());
    let bytes = std::fs::read(&rec).unwrap();
    assert!(bytes == std::fs::read(&direct).unwrap(), "re-recommended file differs from a fresh export");
    let card2 = std::fs::read_to_string(rec.with_extension("md")).unwrap();
    use sha2::Digest;
    assert!(card2.contains(&format!("sha256 {:x}", sha2::Sha256::digest(&bytes))), "{card2}");
    assert!(card2.contains("The file recommends ddim with 12 steps, guidance 3 (its metadata"), "{card2}");
    assert!(!card2.contains("5..=40") && card2.contains("| training | 2 steps, batch 8,"), "{card2}");
    // a file without our metadata, a file that is not ONNX, a recommendation the model cannot take: nothing written
    let x = dir.join("x.onnx");
    let recommend = |model: &std::path::Path| {
        let mut c = trainer();
        c.args(["export", "--model"]).arg(model).args(again).arg("--out").arg(&x);
        c
    };
    let foreign = dir.join("foreign.onnx");
    let mut proto = <candle_onnx::onnx::ModelProto as prost::Message>::decode(bytes.as_slice()).unwrap();
    proto.metadata_props.clear();
    std::fs::write(&foreign, prost::Message::encode_to_vec(&proto)).unwrap();
    fails_with(&mut recommend(&foreign), "diffusion.format_version");
    std::fs::write(dir.join("text.onnx"), b"not a model").unwrap();
    fails_with(&mut recommend(&dir.join("text.onnx")), "text.onnx is not an ONNX model");
    fails_with(recommend(&rec).args(["--guidance-interval", "0,1000"]), "timesteps run 0..=999");
    fails_with(recommend(&rec).args(["--dtype", "float16"]), "cannot be used with");
    assert!(!x.exists());
    // an existing model card is kept without --force (and nothing else is written)
    let fresh = dir.join("fresh.onnx");
    std::fs::write(dir.join("fresh.md"), b"hand-written card").unwrap();
    fails_with(
        trainer().args(["export", "--card", "--run"]).arg(&run).arg("--out").arg(&fresh),
        "fresh.md already exists",
    );
    assert!(!fresh.exists());
    assert_eq!(std::fs::read(dir.join("fresh.md")).unwrap(), b"hand-written card");
    // a run's eval.json that is not an eval report stops the export before anything is written
    std::fs::write(run.join("eval.json"), b"{\"samples\": \"many\"}").unwrap();
    fails_with(
        trainer().args(["export", "--card", "--run"]).arg(&run).arg("--out").arg(&fresh).arg("--force"),
        "eval.json is not an eval report",
    );
    assert!(!fresh.exists());
    std::fs::remove_file(run.join("eval.json")).unwrap();
    // an existing output is kept without --force
    std::fs::write(&out, b"precious").unwrap();
    fails_with(trainer().args(["export", "--run"]).arg(&run).arg("--out").arg(&out), "--force");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    // unknown dtype, unknown step, bad weights: nothing written
    let new = dir.join("new.onnx");
    fails_with(
        trainer().args(["export", "--run"]).arg(&run).args(["--dtype", "f64", "--out"]).arg(&new),
        "invalid value 'f64' for '--dtype",
    );
    fails_with(
        trainer().args(["export", "--run"]).arg(&run).args(["--checkpoint", "5", "--out"]).arg(&new),
        "no checkpoint at step 5",
    );
    fails_with(
        trainer().args(["export", "--run"]).arg(&run).args(["--weights", "best", "--out"]).arg(&new),
        "--weights",
    );
    assert!(!new.exists());
    // a checkpoint whose config does not match its tensors
    let ck = trainer::train::checkpoint::resolve(&run, "latest").unwrap();
    let sp = ck.join("state.json");
    let text = std::fs::read_to_string(&sp).unwrap().replacen("\"ch\": 32", "\"ch\": 64", 1);
    std::fs::write(&sp, text).unwrap();
    fails_with(trainer().args(["export", "--run"]).arg(&run).arg("--out").arg(&new), "do not match");
    assert!(!new.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
