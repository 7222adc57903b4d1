//! `trainer fit` end to end on real MNIST: the loss falls, checkpoints and the loss curve are written,
//! a SIGKILLed run resumes from its last checkpoint to exactly the weights of an uninterrupted run, and
//! bad input stops with a message that names the problem.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use trainer::train::checkpoint;

fn trainer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "command failed: {err}");
    err
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "command should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn final_weights(run: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    let dir = checkpoint::resolve(run, "latest").unwrap();
    checkpoint::load(&dir, &candle_core::Device::Cpu, false).unwrap().model
}

#[test]
fn fit_lowers_the_loss_and_writes_checkpoint_and_curve() {
    data_dir("mnist");
    let dir = tmp_dir("fit");
    let mut cfg = tiny("mnist");
    cfg.train.checkpoint_every = 20;
    let conf = write_config(&cfg, &dir);
    let run = dir.join("run");
    run_ok(
        trainer()
            .args(["fit", "--config"])
            .arg(&conf)
            .args(["--steps", "60", "--batch-size", "16", "--out"])
            .arg(&run)
            .arg("-q"),
    );
    let losses = trainer::train::read_losses(&run.join("metrics.csv")).unwrap();
    assert_eq!(losses.len(), 60);
    let mean = |s: &[(usize, f64)]| s.iter().map(|x| x.1).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..15]), mean(&losses[45..]));
    assert!(last < 0.6 * first, "loss did not fall: first 15 steps {first:.4}, last 15 {last:.4}");
    let ck = checkpoint::list(&run).unwrap();
    assert_eq!(ck.last().unwrap().0, 60);
    for f in ["model.safetensors", "ema.safetensors", "optim.safetensors", "state.json"] {
        assert!(ck.last().unwrap().1.join(f).is_file(), "{f} missing");
    }
    let state = checkpoint::load_state(&ck.last().unwrap().1).unwrap();
    assert_eq!(state.step, 60);
    assert_eq!(state.class_names.len(), 10);
    assert_eq!(state.data_fingerprint.len(), 16);
    let png = std::fs::read(run.join("loss.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 5000);
    // an existing run is not overwritten without --force
    let err = run_err(trainer().args(["fit", "--config"]).arg(&conf).arg("--out").arg(&run).arg("-q"));
    assert!(err.contains("already exists") && err.contains("--resume"), "{err}");
    assert!(run.join("loss.png").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigkill_then_resume_reaches_the_uninterrupted_weights() {
    data_dir("mnist");
    let dir = tmp_dir("kill");
    let mut cfg = tiny("mnist");
    cfg.data.limit = 512;
    cfg.train.checkpoint_every = 2;
    cfg.train.steps = 8;
    let conf = write_config(&cfg, &dir);
    let (a, b) = (dir.join("a"), dir.join("b"));
    run_ok(trainer().args(["fit", "--config"]).arg(&conf).arg("--out").arg(&a).arg("-q"));

    // run b: SIGKILL as soon as its first checkpoint exists (it may be mid-way through the next one)
    let mut child = trainer()
        .args(["fit", "--config"])
        .arg(&conf)
        .arg("--out")
        .arg(&b)
        .arg("-q")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while checkpoint::list(&b).unwrap_or_default().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let killed_at = checkpoint::list(&b).unwrap().last().unwrap().0;
    assert!(killed_at < 8, "killed after the end");
    // the last complete checkpoint loads
    checkpoint::load(&checkpoint::resolve(&b, "latest").unwrap(), &candle_core::Device::Cpu, true).unwrap();

    let err = run_ok(trainer().args(["fit", "--resume"]).arg(&b));
    assert!(err.contains(&format!("from step {killed_at}")), "{err}");
    let (wa, wb) = (final_weights(&a), final_weights(&b));
    assert_eq!(wa.len(), wb.len());
    for (k, ta) in &wa {
        let d = (ta - &wb[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d == 0.0, "{k} differs by {d} after resume from step {killed_at}");
    }
    // metrics of the resumed run: one row per step, the same losses as the uninterrupted run
    let (la, lb) = (
        trainer::train::read_losses(&a.join("metrics.csv")).unwrap(),
        trainer::train::read_losses(&b.join("metrics.csv")).unwrap(),
    );
    assert_eq!(la, lb);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_checkpoint_that_cannot_be_written_names_its_folder_and_the_one_before_resumes() {
    use std::os::unix::process::CommandExt;
    data_dir("mnist");
    let dir = tmp_dir("fsize");
    let mut cfg = tiny("mnist");
    cfg.data.limit = 256;
    cfg.train.checkpoint_every = 2;
    cfg.train.steps = 4;
    let conf = write_config(&cfg, &dir);
    let run = dir.join("run");
    run_ok(trainer().args(["fit", "--config"]).arg(&conf).args(["--steps", "2", "--out"]).arg(&run).arg("-q"));
    let first = checkpoint::resolve(&run, "latest").unwrap();
    let tensor_bytes = std::fs::metadata(first.join("model.safetensors")).unwrap().len();
    // the disk "fills up" during the next checkpoint: no file may grow past half a weight file (RLIMIT_FSIZE;
    // metrics.csv and the loss curve stay below it)
    let limit = tensor_bytes / 2;
    let mut full = trainer();
    full.args(["fit", "--resume"]).arg(&run).args(["--steps", "4", "-q"]);
    unsafe {
        full.pre_exec(move || {
            let r = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let err = run_err(&mut full);
    let folder = checkpoint::checkpoints_dir(&run).display().to_string();
    assert!(err.contains("step-4 checkpoint") && err.contains(&folder) && err.contains("step 2"), "{err}");
    assert!(err.contains("File too large") || err.contains("os error 27"), "{err}");
    // nothing of the failed copy is left, the step-2 checkpoint is the newest and loads, and resuming (with
    // room on the disk again) continues from it to the end
    let left: Vec<_> = std::fs::read_dir(checkpoint::checkpoints_dir(&run))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(checkpoint::resolve(&run, "latest").unwrap(), first);
    checkpoint::load(&first, &candle_core::Device::Cpu, true).unwrap();
    let log = run_ok(trainer().args(["fit", "--resume"]).arg(&run).args(["--steps", "4"]));
    assert!(log.contains("from step 2"), "{log}");
    assert_eq!(checkpoint::list(&run).unwrap().last().unwrap().0, 4);
    assert_eq!(trainer::train::read_losses(&run.join("metrics.csv")).unwrap().len(), 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_named() {
    let dir = tmp_dir("bad");
    let conf = dir.join("bad.toml");
    std::fs::write(&conf, "[train]\nbatchsize = 3\n").unwrap();
    let err = run_err(trainer().args(["fit", "--config"]).arg(&conf).arg("--out").arg(dir.join("r")));
    assert!(err.contains("batchsize") && err.contains("bad.toml"), "{err}");

    let mut cfg = tiny("mnist");
    cfg.data.path = dir.join("nowhere");
    let conf = write_config(&cfg, &dir);
    let err = run_err(trainer().args(["fit", "--config"]).arg(&conf).arg("--out").arg(dir.join("r")));
    assert!(err.contains("nowhere") && err.contains("does not exist"), "{err}");

    let mut cfg = tiny("pokemon64");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::write(imgs.join("broken.png"), b"\x89PNG but not really").unwrap();
    cfg.data.path = imgs;
    let conf = write_config(&cfg, &dir);
    let err = run_err(trainer().args(["fit", "--config"]).arg(&conf).arg("--out").arg(dir.join("r")));
    assert!(err.contains("broken.png"), "{err}");

    let mut cfg = tiny("mnist");
    cfg.model.image_size = 27;
    let conf = write_config(&cfg, &dir);
    let err = run_err(trainer().args(["fit", "--config"]).arg(&conf).arg("--out").arg(dir.join("r")));
    assert!(err.contains("image size 27"), "{err}");
    assert!(!dir.join("r").exists(), "a failed start must not leave a run folder");

    let err = run_err(trainer().args(["fit", "--resume"]).arg(dir.join("absent")).args(["--lr", "0.1"]));
    assert!(err.contains("--lr cannot change a run being resumed"), "{err}");
    let err = run_err(trainer().args(["fit", "--resume"]).arg(dir.join("absent")));
    assert!(err.contains("does not exist"), "{err}");
    let err =
        run_err(trainer().args(["fit", "--config"]).arg(&conf).args(["--device", "cuda", "--out"]).arg(dir.join("r")));
    assert!(err.contains("without CUDA") || err.contains("image size"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
