#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "trainer", version, about = "Train DDPM noise-prediction U-Nets with Candle and export them to ONNX")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model (or continue a run with --resume).
    Fit(cli::fit::FitArgs),
    /// Write a run's model as a self-describing ONNX file.
    Export(cli::export::ExportArgs),
    /// Classifier score, FID in the classifier's and Inception-v3's feature spaces (with real-vs-real floors),
    /// sweeps over guidance and sampling steps.
    Eval(cli::eval::EvalArgs),
    /// Figures: noise schedules, forward-noising strips with histograms, reverse-process strips, loss curves.
    #[command(subcommand)]
    Plot(cli::plot::PlotCmd),
    /// Time training steps and the sampler's model call on the config's real data; prints JSON (seconds per
    /// step, images/s, peak RSS). benches/train_speed.py puts it beside PyTorch.
    Bench(cli::bench::BenchArgs),
    /// A parameter study: one run per value of one or several config keys (each varied on its own) and seed,
    /// each evaluated; sweep.csv, a summary with the mean and spread over seeds, and figures. A stopped sweep
    /// continues where it stopped.
    Sweep(cli::sweep::SweepArgs),
    /// Distil a trained model into a few-step student (progressive distillation, Salimans & Ho 2022) that takes
    /// the guidance weight as an input (Meng et al. 2023): one model call per step.
    Distill(cli::distill::DistillArgs),
}

fn main() -> ExitCode {
    // a file-size limit (ulimit -f) reached while writing: an error naming the file (EFBIG) instead of the
    // signal's default, which kills the process without a word
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // `trainer eval --model` finds the ONNX Runtime that scripts/setup.sh installed in this checkout
    runtime::onnx::add_library_candidate(runtime::onnx::setup_library_path(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(std::path::Path::new(".")),
    ));
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Fit(a) => cli::fit::run_fit(a),
        Cmd::Plot(p) => cli::plot::run_plot(p),
        Cmd::Eval(a) => cli::eval::run_eval(a),
        Cmd::Bench(a) => cli::bench::run_bench(a),
        Cmd::Export(a) => cli::export::run_export(a),
        Cmd::Sweep(a) => cli::sweep::run_sweep(a),
        Cmd::Distill(a) => cli::distill::run_distill(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
