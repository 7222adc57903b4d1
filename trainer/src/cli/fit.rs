//! `trainer fit`: train a model, or continue a run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use trainer::train::config::Config;
use trainer::train::{fit, DeviceSpec, Engine, FitEvent, FitOptions, FitSummary};

#[derive(clap::Args)]
pub struct FitArgs {
    /// Config file (TOML; presets in trainer/configs/). Not needed with --resume.
    #[arg(long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in this folder from its latest checkpoint.
    #[arg(long, value_name = "RUN", conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Run folder for checkpoints, metrics and figures.
    #[arg(long, value_name = "RUN_DIR", default_value = "runs/default")]
    out: PathBuf,
    /// Replace an existing run folder.
    #[arg(long)]
    force: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Total training steps (overrides train.steps; with --resume, extends the run).
    #[arg(long)]
    steps: Option<usize>,
    /// Batch size (overrides train.batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Random seed (overrides train.seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Peak learning rate (overrides train.lr).
    #[arg(long)]
    lr: Option<f64>,
    /// Base channel count (overrides model.ch).
    #[arg(long)]
    ch: Option<usize>,
    /// Dataset folder (overrides data.path).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Use at most this many images (overrides data.limit).
    #[arg(long)]
    limit: Option<usize>,
    /// Checkpoint every N steps (overrides train.checkpoint_every).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Warm-up steps (overrides train.warmup_steps).
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Stop after N steps of this invocation, checkpointing (the run can be resumed).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Stop once the run has trained this many minutes in all (resumed runs count their earlier time),
    /// checkpointing: a wall-time budget.
    #[arg(long, value_name = "MINUTES")]
    max_minutes: Option<f64>,
    /// How gradients are computed: auto (the CPU tape engine on the CPU, Candle's autograd elsewhere), tape,
    /// candle.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
    /// Data-parallel training as one rank of an MPI job: `mpirun -np N trainer fit --distributed ...` (a build
    /// with `--features mpi`). train.batch_size stays the whole batch, shared by the ranks; rank 0 writes the
    /// run. Threads per rank: RAYON_NUM_THREADS, or the machine's cores over the ranks on it.
    #[arg(long)]
    distributed: bool,
    /// With --distributed: how long a rank waits for the others at a step before it stops the job, naming the
    /// ranks that did not come (dead or hung).
    #[arg(long, value_name = "SECONDS", default_value_t = trainer::dist::DEFAULT_TIMEOUT.as_secs_f64())]
    rank_timeout: f64,
    /// No progress bar or log lines.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run_fit(a: FitArgs) -> Result<()> {
    if a.resume.is_some() {
        refuse_changes_on_resume(&a)?;
    }
    let cfg = config(&a)?;
    let opts = FitOptions {
        out: a.resume.clone().unwrap_or(a.out.clone()),
        device: a.device,
        resume: a.resume.is_some(),
        force: a.force,
        max_steps_now: a.stop_after,
        max_seconds: a.max_minutes.map(|m| m * 60.0),
        engine: a.engine,
    };
    if opts.resume && a.config.is_some() {
        anyhow::bail!("--resume continues a run with its own saved config; drop --config (use --steps to extend it)");
    }
    if a.distributed {
        return distributed::run(cfg, &opts, a.rank_timeout, a.quiet);
    }
    let log = |msg: String| {
        if !a.quiet {
            eprintln!("{msg}");
        }
    };
    let pb = progress_bar(a.quiet);
    let summary = fit(cfg, &opts, &mut |event| report(event, &opts.out, opts.device, &pb, a.quiet));
    pb.finish_and_clear();
    let summary = summary.with_context(|| format!("trainer fit ({})", opts.out.display()))?;
    log(summary_line(&summary));
    Ok(())
}

/// `trainer fit --distributed`: one rank of an MPI job.
mod distributed {
    use super::*;

    #[cfg(not(feature = "mpi"))]
    pub fn run(_cfg: Option<Config>, _opts: &FitOptions, _timeout: f64, _quiet: bool) -> Result<()> {
        anyhow::bail!(
            "--distributed needs a trainer built with MPI: install OpenMPI (scripts/setup.sh does), then \
             cargo build --release -p trainer --features mpi"
        )
    }

    #[cfg(feature = "mpi")]
    pub fn run(cfg: Option<Config>, opts: &FitOptions, timeout: f64, quiet: bool) -> Result<()> {
        use trainer::dist::mpi::MpiCollective;
        use trainer::dist::Collective;
        if !(timeout.is_finite() && timeout > 0.0) {
            anyhow::bail!("--rank-timeout must be a positive number of seconds, not {timeout}");
        }
        let mpi = MpiCollective::init(std::time::Duration::from_secs_f64(timeout))?;
        let (rank, size, (local, local_rank), host) = (mpi.rank(), mpi.size(), mpi.local(), mpi.host());
        // one rank per core by default: the machine's cores shared by the ranks on it
        let threads = match std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()) {
            Some(n) if n > 0 => n,
            _ => (std::thread::available_parallelism().map_or(1, |n| n.get()) / local.max(1)).max(1),
        };
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
        // one GPU per rank: --device cuda:N gives the ranks of a machine GPUs N, N + 1, ...
        let mut opts = opts.clone();
        if let DeviceSpec::Cuda(n) = opts.device {
            opts.device = DeviceSpec::Cuda(n + local_rank);
        }
        let comm = collective(mpi, &opts)?;
        let lead = rank == 0;
        let quiet = quiet || !lead;
        if !quiet {
            eprintln!("data-parallel: {size} ranks ({local} on this machine, {host}), {threads} thread(s) each");
        }
        let pb = progress_bar(quiet);
        let out = opts.out.clone();
        let r = trainer::train::fit_on(cfg, &opts, comm.as_ref(), &mut |event| {
            report(event, &out, opts.device, &pb, quiet)
        });
        pb.finish_and_clear();
        match r {
            Ok(summary) => {
                if !quiet {
                    let (calls, reduce_s, gate_s) = comm.costs();
                    eprintln!(
                        "rank 0: {calls} all-reduces took {reduce_s:.2} s ({:.1} ms each); {gate_s:.2} s went on waiting \
                         for the other ranks at the steps' gates",
                        1e3 * reduce_s / calls.max(1) as f64
                    );
                    eprintln!("{}", summary_line(&summary));
                }
                Ok(())
            }
            // one rank's error ends the whole job at once (the others would wait for it at the next step)
            Err(e) => comm.abort(&format!("error: rank {rank}: trainer fit ({}): {e:#}", opts.out.display())),
        }
    }

    /// MPI, with NCCL for the gradients of GPU ranks in a build with `nccl`.
    #[cfg(feature = "mpi")]
    fn collective(
        mpi: trainer::dist::mpi::MpiCollective,
        opts: &FitOptions,
    ) -> Result<Box<dyn trainer::dist::Collective>> {
        #[cfg(feature = "nccl")]
        if matches!(opts.device, DeviceSpec::Cuda(_)) {
            let device = opts.device.open()?;
            return Ok(Box::new(trainer::dist::nccl::NcclCollective::init(mpi, &device)?));
        }
        let _ = opts;
        Ok(Box::new(mpi))
    }
}

/// The bar of a training run (hidden with -q): steps, speed, ETA, and the last step's loss.
pub fn progress_bar(quiet: bool) -> ProgressBar {
    let pb = if quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {per_sec} ETA {eta} {msg}")
            .unwrap(),
    );
    pb
}

/// The line a finished (or stopped) run ends with.
pub fn summary_line(s: &FitSummary) -> String {
    format!(
        "step {} of {}: loss {:.4} (mean of last 20); checkpoint {}; loss curve {}",
        s.step,
        s.total,
        s.recent_loss,
        s.checkpoint.display(),
        s.loss_curve.display()
    )
}

/// A resumed run continues with its saved config: only --steps may change it.
fn refuse_changes_on_resume(a: &FitArgs) -> Result<()> {
    let changed = [
        ("--batch-size", a.batch_size.is_some()),
        ("--seed", a.seed.is_some()),
        ("--lr", a.lr.is_some()),
        ("--ch", a.ch.is_some()),
        ("--data", a.data.is_some()),
        ("--limit", a.limit.is_some()),
        ("--checkpoint-every", a.checkpoint_every.is_some()),
        ("--warmup-steps", a.warmup_steps.is_some()),
    ];
    if let Some((flag, _)) = changed.iter().find(|(_, set)| *set) {
        anyhow::bail!(
            "{flag} cannot change a run being resumed (it continues with its saved config); only --steps can"
        );
    }
    Ok(())
}

/// The config file with the flags laid over it; with --resume, None (the run's own) or only a new target.
fn config(a: &FitArgs) -> Result<Option<Config>> {
    let mut cfg = match &a.config {
        Some(p) => Some(Config::load(p)?),
        None => None,
    };
    if let Some(c) = cfg.as_mut() {
        macro_rules! set {
            ($flag:expr, $field:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = v;
                }
            };
        }
        set!(a.steps, c.train.steps);
        set!(a.batch_size, c.train.batch_size);
        set!(a.seed, c.train.seed);
        set!(a.lr, c.train.lr);
        set!(a.ch, c.model.ch);
        set!(a.data, c.data.path);
        set!(a.limit, c.data.limit);
        set!(a.checkpoint_every, c.train.checkpoint_every);
        set!(a.warmup_steps, c.train.warmup_steps);
    } else if let Some(steps) = a.steps {
        // --resume RUN --steps N: only the target may change
        let mut c = Config::default();
        c.train.steps = steps;
        cfg = Some(c);
    }
    Ok(cfg)
}

/// Shows one event of the run: the progress bar, and log lines unless quiet.
pub fn report(event: FitEvent, out: &std::path::Path, device: DeviceSpec, pb: &ProgressBar, quiet: bool) {
    let log = |msg: String| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    match event {
        FitEvent::Started { resumed_from, step, total, data, num_params } => {
            if let Some(dir) = resumed_from {
                log(format!("resuming {} from step {step} ({})", out.display(), dir.display()));
            }
            log(format!(
                "data: {} images {}x{}x{} ({} classes) from {}; model: {:.2}M parameters; device {}",
                data.len,
                data.channels,
                data.size,
                data.size,
                data.num_classes(),
                data.description,
                num_params as f64 / 1e6,
                device
            ));
            pb.set_length(total as u64);
            pb.set_position(step as u64);
        }
        FitEvent::Step { step, total, stats, elapsed_s } => {
            pb.set_position(step as u64);
            pb.set_message(format!("loss {:.4} | grad {:.3} | lr {:.1e}", stats.loss, stats.grad_norm, stats.lr));
            // without a terminal (nohup, CI logs): a line every 5% instead of the bar
            if pb.is_hidden() && !quiet && step % (total / 20).max(1) == 0 {
                eprintln!(
                    "step {step}/{total} loss {:.4} ({:.2} steps/s)",
                    stats.loss,
                    step as f64 / elapsed_s.max(1e-9)
                );
            }
        }
        FitEvent::Warning(w) => pb.suspend(|| log(format!("warning: {w}"))),
        FitEvent::Note(n) => pb.suspend(|| log(n.to_string())),
        FitEvent::Preview(p) => pb.suspend(|| log(format!("samples (EMA weights, DDIM): {}", p.display()))),
    }
}
