#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use trainer::config::Config;
use trainer::train::{fit, FitOptions};

#[derive(Parser)]
#[command(name = "trainer", version, about = "Train DDPM noise-prediction U-Nets with Candle and export them to ONNX")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model (or continue a run with --resume).
    Fit(FitArgs),
    /// Write a run's model as a self-describing ONNX file.
    Export(ExportArgs),
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Run folder.
    #[arg(long)]
    run: PathBuf,
    /// `latest` or a step number.
    #[arg(long, default_value = "latest")]
    checkpoint: String,
    /// `ema` (default) or `raw` weights.
    #[arg(long, default_value = "ema")]
    weights: String,
    /// `f32` or `f16` (GroupNorm statistics and softmax stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// ONNX opset (17..=21; 17 is readable by candle-onnx).
    #[arg(long, default_value_t = 17)]
    opset: i64,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct FitArgs {
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
    device: String,
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
    /// No progress bar or log lines.
    #[arg(long, short)]
    quiet: bool,
}

fn run_fit(a: FitArgs) -> Result<()> {
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
    let opts = FitOptions {
        out: a.resume.clone().unwrap_or(a.out.clone()),
        device: a.device.clone(),
        resume: a.resume.is_some(),
        force: a.force,
        max_steps_now: a.stop_after,
        quiet: a.quiet,
    };
    if opts.resume && a.config.is_some() {
        anyhow::bail!("--resume continues a run with its own saved config; drop --config (use --steps to extend it)");
    }
    fit(cfg, &opts).with_context(|| format!("trainer fit ({})", opts.out.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Fit(a) => run_fit(a),
        Cmd::Export(a) => trainer::export::export(&trainer::export::ExportOptions {
            run: &a.run,
            checkpoint: &a.checkpoint,
            weights: &a.weights,
            dtype: &a.dtype,
            opset: a.opset,
            out: &a.out,
            force: a.force,
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
