//! `generate`: sample images from an exported DDPM U-Net with ONNX Runtime.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use runtime::generator::{GenerateRequest, Generator, GeneratorOptions, Images};
use runtime::onnx::Provider;
use runtime::sampler::Strip;

#[derive(Parser)]
#[command(name = "generate", version, about = "Generate images from an exported DDPM U-Net (.onnx) with ONNX Runtime")]
struct Args {
    /// The exported model (`trainer export`); everything else is read from its metadata.
    #[arg(long)]
    model: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// ddim, ddpm (all T steps) or dpm++ (DPM-Solver++(2M), good in ~20 steps). Default: the model's
    /// recommended sampler (its metadata, as measured on its model card), else ddim.
    #[arg(long)]
    sampler: Option<String>,
    /// Sampling steps (ddim, dpm++). Default: the model's recommended steps, else 50.
    #[arg(long)]
    steps: Option<usize>,
    /// DDIM eta (0: deterministic; 1: DDPM-like noise).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Timestep spacing: leading, linspace or trailing.
    #[arg(long, default_value = "trailing")]
    spacing: String,
    /// Classifier-free guidance weight w (conditional models): eps = (1+w) eps(x,c) - w eps(x,null).
    /// Default: the model's recommended guidance, else 0.
    #[arg(long)]
    guidance: Option<f32>,
    /// Class index or name (conditional models); without it the images cycle through the classes.
    #[arg(long)]
    class: Option<String>,
    /// Random seed: same seed, same images on the same provider.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per model call (memory is bounded by this, whatever --n).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// cpu, cuda, tensorrt or auto (TensorRT, then CUDA, then CPU).
    #[arg(long, default_value = "cpu")]
    provider: String,
    /// GPU index for cuda/tensorrt.
    #[arg(long, default_value_t = 0)]
    device_id: i32,
    /// TensorRT engine cache folder.
    #[arg(long)]
    trt_cache: Option<PathBuf>,
    /// TensorRT fp16 kernels.
    #[arg(long)]
    trt_fp16: bool,
    /// ONNX Runtime intra-op threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Grid PNG.
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
    /// Also write each image as DIR/NNNNNN.png.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Reverse-process strip PNG: x_t (top) and predicted x0 (bottom) of the first images at 8 steps.
    #[arg(long)]
    strip: Option<PathBuf>,
    /// Do not clip the predicted x0 to [-1, 1].
    #[arg(long)]
    no_clip: bool,
    /// Dynamic thresholding percentile (e.g. 0.995) instead of plain clipping.
    #[arg(long)]
    dynamic_threshold: Option<f32>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

const STRIP_COLS: usize = 8;
const STRIP_ROWS: usize = 4;

fn run(a: Args) -> Result<()> {
    let provider = match Provider::from_name(&a.provider)? {
        Provider::Cuda { .. } => Provider::Cuda { device: a.device_id },
        Provider::TensorRt { .. } => {
            Provider::TensorRt { device: a.device_id, fp16: a.trt_fp16, cache_dir: a.trt_cache.clone() }
        }
        p => p,
    };
    let mut g = Generator::open(&a.model, &GeneratorOptions { provider, threads: a.threads })?;
    let rec = g.info().recommended.clone();
    let req = GenerateRequest {
        n: a.n,
        sampler: a.sampler.clone().or(rec.as_ref().map(|r| r.sampler.clone())).unwrap_or_else(|| "ddim".into()),
        steps: a.steps.or(rec.as_ref().map(|r| r.steps)).unwrap_or(50),
        eta: a.eta,
        spacing: a.spacing.clone(),
        class: a.class.clone(),
        guidance: a.guidance.or(rec.as_ref().map(|r| r.guidance)).unwrap_or(0.0),
        seed: a.seed,
        batch: a.batch,
        clip_x0: !a.no_clip,
        dynamic_threshold: a.dynamic_threshold,
    };
    let plan = g.plan(&req)?;
    let steps_per_chunk = plan.method.timesteps(g.schedule.num_timesteps())?.len();
    let chunks = req.n.div_ceil(plan.batch);
    let pb = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new((chunks * steps_per_chunk) as u64)
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps, ETA {eta}")
            .unwrap(),
    );
    let [c, h, w] = plan.shape;
    let mut strip = Strip::new(steps_per_chunk, STRIP_COLS, STRIP_ROWS.min(plan.batch), c * h * w);
    let start = Instant::now();
    let images = g.generate(&req, &mut |s| {
        pb.inc(1);
        if a.strip.is_some() {
            strip.record(s);
        }
    })?;
    let secs = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    images.save_grid(&a.out)?;
    if let Some(d) = &a.out_dir {
        images.save_each(d)?;
    }
    if let Some(p) = &a.strip {
        let (tiles, cols) = strip.tiles();
        Images::from_f32(&tiles, tiles.len() / (c * h * w), [c, h, w], None).save_grid_cols(p, Some(cols))?;
        eprintln!(
            "strip: {} (columns t = {})",
            p.display(),
            strip.timesteps().iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let steps_desc = format!("{steps_per_chunk} steps");
    let guidance = if plan.guidance != 0.0 { format!(", guidance {}", plan.guidance) } else { String::new() };
    println!(
        "provider {} | {} {}{} | {} images {}x{}x{} in {:.2} s | {:.2} images/s | {}",
        g.provider(),
        req.sampler,
        steps_desc,
        guidance,
        req.n,
        c,
        h,
        w,
        secs,
        req.n as f64 / secs,
        a.out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
