//! `mpirun -np 2 trainer fit --distributed` on real MNIST (a build with `--features mpi` and OpenMPI's
//! `mpirun`): two ranks take the steps of one process, a run of two ranks resumes in one, a killed or hung rank
//! stops the job naming it with the last checkpoint intact, and ranks started with different configs refuse.
#![cfg(feature = "mpi")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::*;
use trainer::train::checkpoint;
use trainer::train::config::Config;

/// `mpirun -np N trainer ARGS`, one thread a rank (as root here and in CI: OpenMPI asks for consent).
fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &np.to_string(), env!("CARGO_BIN_EXE_trainer")])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1");
    c
}

fn one_process() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trainer"));
    c.env("RAYON_NUM_THREADS", "1");
    c
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = both(&out);
    assert!(out.status.success(), "command failed: {text}");
    text
}

fn both(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The tiny MNIST net with dropout on (its masks must be split like the batch) and a batch of 9 (shares of 4
/// and 5), checkpointing every 10 steps.
fn config() -> Config {
    data_dir("mnist");
    let mut cfg = tiny("mnist");
    cfg.data.limit = 1000;
    cfg.model.dropout = 0.1;
    cfg.train.batch_size = 9;
    cfg.train.steps = 20;
    cfg.train.checkpoint_every = 10;
    cfg
}

fn weights(run: &Path) -> HashMap<String, Tensor> {
    let ck = checkpoint::load(&checkpoint::resolve(run, "latest").unwrap(), &Device::Cpu, false).unwrap();
    assert_eq!(ck.state.step, 20, "{}", run.display());
    ck.model.into_iter().chain(ck.ema.into_iter().map(|(k, v)| (format!("ema.{k}"), v))).collect()
}

/// The largest and the mean absolute difference between two runs' weights and EMA weights.
fn weight_diff(a: &Path, b: &Path) -> (f32, f32) {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    let (mut max, mut sum, mut n) = (0f32, 0f64, 0usize);
    for (k, ta) in &wa {
        let d: Vec<f32> = (ta - &wb[k]).unwrap().abs().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        max = d.iter().fold(max, |m, &x| m.max(x));
        sum += d.iter().map(|&x| x as f64).sum::<f64>();
        n += d.len();
    }
    (max, (sum / n as f64) as f32)
}

/// Two runs of 20 steps end with the same weights up to f32 summation order: AdamW moves a weight by at most
/// ~lr a step, and a weight whose gradient is zero but for rounding (a per-channel bias in front of a GroupNorm
/// with one channel a group) moves by the sign of the rounding, so the largest difference is bounded by a small
/// part of 20 lr and the mean by far less.
fn assert_same_weights(a: &Path, b: &Path, lr: f64) {
    let (max, mean) = weight_diff(a, b);
    assert!(max as f64 <= 0.02 * 20.0 * lr, "{} and {} end {max} apart", a.display(), b.display());
    assert!(mean <= 1e-6, "{} and {} end {mean} apart on average", a.display(), b.display());
}

/// Steps' losses of two runs agree to f32 summation (the ranks add their shares in another order).
fn assert_same_losses(a: &Path, b: &Path) {
    let (la, lb) = (
        trainer::train::read_losses(&a.join("metrics.csv")).unwrap(),
        trainer::train::read_losses(&b.join("metrics.csv")).unwrap(),
    );
    assert_eq!(la.len(), 20, "{la:?}");
    assert_eq!(la.iter().map(|l| l.0).collect::<Vec<_>>(), lb.iter().map(|l| l.0).collect::<Vec<_>>());
    for ((s, x), (_, y)) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "step {s}: loss {x} alone, {y} over ranks");
    }
}

#[test]
fn two_ranks_take_the_steps_of_one_process_and_a_two_rank_run_resumes_in_one() {
    let dir = tmp_dir("dp-same");
    let conf = write_config(&config(), &dir);
    let (alone, ranks, resumed) = (dir.join("alone"), dir.join("ranks"), dir.join("resumed"));
    ok(one_process().args(["fit", "-q", "--config"]).arg(&conf).arg("--out").arg(&alone));
    ok(mpirun(2).args(["fit", "-q", "--distributed", "--config"]).arg(&conf).arg("--out").arg(&ranks));
    assert_same_losses(&alone, &ranks);
    let lr = config().train.lr;
    assert_same_weights(&alone, &ranks, lr);
    // only rank 0 wrote: one row per step
    assert_eq!(std::fs::read_to_string(ranks.join("metrics.csv")).unwrap().lines().count(), 21);

    // 10 steps over two ranks, the other 10 in one process: the same data order, noise and dropout masks
    ok(mpirun(2)
        .args(["fit", "-q", "--distributed", "--stop-after", "10", "--config"])
        .arg(&conf)
        .arg("--out")
        .arg(&resumed));
    assert_eq!(checkpoint::list(&resumed).unwrap().last().unwrap().0, 10);
    let log = ok(one_process().args(["fit", "--resume"]).arg(&resumed));
    assert!(log.contains("from step 10"), "{log}");
    assert_same_losses(&alone, &resumed);
    assert_same_weights(&alone, &resumed, lr);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn candle_autograd_and_importance_sampling_split_over_ranks_alike() {
    let dir = tmp_dir("dp-candle");
    let mut cfg = config();
    cfg.train.timestep_sampling = trainer::train::config::TimestepSampling::Importance;
    let conf = write_config(&cfg, &dir);
    let (alone, ranks) = (dir.join("alone"), dir.join("ranks"));
    let candle = ["--engine", "candle"];
    ok(one_process().args(["fit", "-q"]).args(candle).arg("--config").arg(&conf).arg("--out").arg(&alone));
    ok(mpirun(2).args(["fit", "-q", "--distributed"]).args(candle).arg("--config").arg(&conf).arg("--out").arg(&ranks));
    assert_same_losses(&alone, &ranks);
    assert_same_weights(&alone, &ranks, cfg.train.lr);
    // the importance sampler's loss history holds every image of every step, in batch order, on every rank
    let history = |run: &Path| {
        let ck = checkpoint::load(&checkpoint::resolve(run, "latest").unwrap(), &Device::Cpu, false).unwrap();
        ck.state.timestep_history.expect("an importance-sampled run keeps its history")
    };
    let (ha, hr) = (history(&alone), history(&ranks));
    assert_eq!(ha.iter().map(|h| h.len()).sum::<usize>(), 20 * 9);
    for (t, (a, r)) in ha.iter().zip(&hr).enumerate() {
        assert_eq!(a.len(), r.len(), "timestep {t}");
        for (x, y) in a.iter().zip(r) {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1e-3), "timestep {t}: {x} alone, {y} over ranks");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The process of rank `rank` of the job writing to `run` (OpenMPI gives each its rank in the environment).
fn rank_pid(run: &Path, rank: usize) -> Option<i32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has = |hay: &[u8], needle: &[u8]| hay.split(|&b| b == 0).any(|part| part == needle);
        let run_arg = run.to_string_lossy();
        if has(&cmdline, run_arg.as_bytes()) && has(&environ, want.as_bytes()) && !has(&cmdline, b"mpirun") {
            return Some(pid);
        }
    }
    None
}

/// A long job writing to DIR/run, started; returns once its first checkpoint exists.
fn start_long_job(dir: &Path, extra: &[&str]) -> (Child, PathBuf) {
    let mut cfg = config();
    cfg.train.steps = 100_000;
    let conf = write_config(&cfg, dir);
    let run = dir.join("run");
    let mut child = mpirun(2)
        .args(["fit", "-q", "--distributed"])
        .args(extra)
        .arg("--config")
        .arg(&conf)
        .arg("--out")
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while checkpoint::list(&run).unwrap_or_default().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the job ended early: {}",
            both(&child.wait_with_output().unwrap())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, run)
}

/// Waits (at most `limit`) for the job to end; its output and how long it took.
fn wait_for_end(child: Child, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let pid = child.id() as i32;
    let watchdog = std::thread::spawn(move || {
        while start.elapsed() < limit + Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(200));
        }
        // the test fails below; do not leave the job behind
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let out = child.wait_with_output().unwrap();
    drop(watchdog);
    (out, start.elapsed())
}

/// The job's last checkpoint loads and resumes in one process.
fn assert_resumable(run: &Path) {
    let ck = checkpoint::resolve(run, "latest").unwrap();
    checkpoint::load(&ck, &Device::Cpu, true).unwrap();
    ok(one_process().args(["fit", "-q", "--stop-after", "2", "--resume"]).arg(run));
}

#[test]
fn a_killed_rank_stops_the_job_naming_it_and_the_last_checkpoint_resumes() {
    let dir = tmp_dir("dp-kill");
    let (child, run) = start_long_job(&dir, &[]);
    let pid = rank_pid(&run, 1).expect("rank 1's process");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (out, took) = wait_for_end(child, Duration::from_secs(30));
    let text = both(&out);
    assert!(!out.status.success(), "{text}");
    assert!(took < Duration::from_secs(30), "the job took {took:?} to stop");
    assert!(text.contains("rank 1"), "mpirun names the rank: {text}");
    assert_resumable(&run);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_hung_rank_is_named_and_the_job_stops_within_the_timeout() {
    let dir = tmp_dir("dp-hang");
    let (child, run) = start_long_job(&dir, &["--rank-timeout", "5"]);
    let pid = rank_pid(&run, 1).expect("rank 1's process");
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let (out, took) = wait_for_end(child, Duration::from_secs(30));
    let text = both(&out);
    assert!(!out.status.success(), "{text}");
    assert!(took < Duration::from_secs(30), "the job took {took:?} to stop");
    assert!(text.contains("rank(s) 1 did not reach step") || text.contains("did not finish within 5 s"), "{text}");
    assert_resumable(&run);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ranks_started_with_different_configs_refuse_to_start() {
    let dir = tmp_dir("dp-configs");
    let a = write_config(&config(), &dir);
    let mut other = config();
    other.train.lr *= 2.0;
    let b = dir.join("other.toml");
    std::fs::write(&b, toml::to_string_pretty(&other).unwrap()).unwrap();
    let run = dir.join("run");
    let out = mpirun(1)
        .args(["fit", "-q", "--distributed", "--config"])
        .arg(&a)
        .arg("--out")
        .arg(&run)
        .args([":", "-np", "1", env!("CARGO_BIN_EXE_trainer"), "fit", "-q", "--distributed", "--config"])
        .arg(&b)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let text = both(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("the config (with its flags) of rank(s) 1 differ"), "{text}");
    assert!(!run.join("metrics.csv").exists(), "nothing is written before the ranks agree");
    std::fs::remove_dir_all(&dir).unwrap();
}
