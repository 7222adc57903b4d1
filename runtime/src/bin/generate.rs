//! `generate`: sample images from an exported DDPM U-Net with ONNX Runtime; `generate serve`: serve models over
//! HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use runtime::generator::{
    GenerateRequest, Generator, GeneratorOptions, GuidanceInterval, Images, InitImage, Inpaint, Interpolation,
    SampleOptions,
};
use runtime::images::Strip;
use runtime::onnx::{Provider, ProviderKind};
use runtime::sampler::{Request, SamplerKind, Spacing};
use runtime::serve::{Limits, ServeOptions};

#[derive(Parser)]
#[command(
    name = "generate",
    version,
    about = "Generate images from an exported DDPM U-Net (.onnx) with ONNX Runtime",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over HTTP: a JSON API (GET /v1/models, POST /v1/generate, POST /v1/generate/stream) and a
    /// web page (GET /).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct Args {
    /// The exported model (`trainer export`); everything else is read from its metadata.
    #[arg(long, required = true)]
    model: Option<PathBuf>,
    /// Number of images.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// ddim, ddpm (ancestral, the chain respaced to --steps, with the model's variance, learned or fixed) or
    /// dpm++ (DPM-Solver++(2M), good in 10-20 steps). Default: the model's recommended sampler (its metadata,
    /// as measured on its model card), else ddim.
    #[arg(long, value_enum)]
    sampler: Option<SamplerKind>,
    /// Sampling steps (ddpm: T is the original chain). Default: the model's recommended steps, else 50.
    #[arg(long)]
    steps: Option<usize>,
    /// DDIM eta (0: deterministic; 1: DDPM-like noise).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Timestep spacing (ddim, dpm++).
    #[arg(long, value_enum, default_value_t = Spacing::Trailing)]
    spacing: Spacing,
    /// Classifier-free guidance weight w (conditional models): eps = (1+w) eps(x,c) - w eps(x,null).
    /// Default: the model's recommended guidance, else 0.
    #[arg(long)]
    guidance: Option<f32>,
    /// Guide only at the timesteps LO..=HI, e.g. 82,579 (Kynkäänniemi et al. 2024: the same fidelity with
    /// more variety, and fewer model calls), or `all` for every step. Default: the model's recommendation, else all.
    #[arg(long, value_name = "LO,HI|all")]
    guidance_interval: Option<IntervalArg>,
    /// Class index or name (conditional models); without it the images cycle through the classes.
    #[arg(long)]
    class: Option<String>,
    /// An attribute of a multi-attribute model, NAME=VALUE (value by name or index), e.g. position=3; repeat
    /// for several. An attribute not given is unknown to the model.
    #[arg(long = "attr", value_name = "NAME=VALUE", value_parser = runtime::generator::parse_pair::<String>)]
    attrs: Vec<(String, String)>,
    /// The guidance weight of one attribute, NAME=W (default: --guidance); the labels' conditionals are
    /// composed (Liu et al. 2022): eps(null) + sum over labels of (1+w)(eps(label) - eps(null)).
    #[arg(long = "attr-guidance", value_name = "NAME=W", value_parser = runtime::generator::parse_pair::<f32>)]
    attr_guidance: Vec<(String, f32)>,
    /// Random seed: same seed, same images on the same provider.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per model call (memory is bounded by this, whatever --n).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// ONNX Runtime execution provider; auto tries TensorRT, then CUDA, then the CPU.
    #[arg(long, value_enum, default_value_t = ProviderKind::Cpu)]
    provider: ProviderKind,
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
    /// Image-to-image (SDEdit): start from this image (PNG/JPEG; resized to the model's size and converted to its
    /// channels, with a note) noised to --strength, instead of pure noise.
    #[arg(long, value_name = "IMAGE")]
    init: Option<PathBuf>,
    /// How much of --init is redrawn, in [0, 1]: the fraction of the sampler's steps that is run (0 returns the
    /// image, 1 ignores it).
    #[arg(long, default_value_t = 0.6)]
    strength: f32,
    /// Every image starts from one shared x_T (or --init's x_t): variations of one image with a stochastic
    /// sampler (--sampler ddpm, or ddim with --eta > 0).
    #[arg(long)]
    share_xt: bool,
    /// Inpainting (RePaint): keep this image where --mask is black and generate where it is white.
    #[arg(long, value_name = "IMAGE", requires = "mask")]
    inpaint: Option<PathBuf>,
    /// The inpainting mask, the size of the --inpaint image: white = generate, black = keep.
    #[arg(long, value_name = "MASK", requires = "inpaint")]
    mask: Option<PathBuf>,
    /// Interpolation (Ho et al. 2020, fig. 8): both images noised to --strength with the same noise, --frames
    /// mixes of the two latents denoised; the grid is one row from A to B. Every frame has --class, or without
    /// it none (the null class, no guidance).
    #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with_all = ["init", "inpaint"])]
    interpolate: Option<Vec<PathBuf>>,
    /// Interpolation between two seeds' starts x_T (slerp, Song et al. 2020, sec. 5.3): --frames images, the
    /// first and last those of `--seed A --share-xt` and `--seed B --share-xt` (with a deterministic sampler).
    #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with_all = ["init", "inpaint", "interpolate"])]
    interpolate_seeds: Option<Vec<u64>>,
    /// Frames of --interpolate and --interpolate-seeds (their --n).
    #[arg(long, default_value_t = 8)]
    frames: usize,
    /// RePaint resampling: passes over each block of --jump steps (1: none; RePaint used 10 with jumps of 10
    /// over 250 steps).
    #[arg(long, default_value_t = 1)]
    resample: usize,
    /// RePaint resampling: steps per block.
    #[arg(long, default_value_t = 10)]
    jump: usize,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// `generate serve`'s flags.
#[derive(clap::Args)]
struct ServeArgs {
    /// The models to serve, each named by its file stem: `--model models/*.onnx`.
    #[arg(long, num_args = 1.., required = true)]
    model: Vec<PathBuf>,
    /// Address to listen on. Anything but a loopback address needs a token.
    #[arg(long, default_value = "127.0.0.1:8787")]
    addr: SocketAddr,
    /// The bearer token every request must carry (Authorization: Bearer TOKEN). Default: the environment
    /// variable GENERATE_TOKEN.
    #[arg(long)]
    token: Option<String>,
    /// Images per request, at most.
    #[arg(long, default_value_t = Limits::default().max_n)]
    max_n: usize,
    /// Sampling steps per request, at most.
    #[arg(long, default_value_t = Limits::default().max_steps)]
    max_steps: usize,
    /// Bytes of a request body, at most (more: 413).
    #[arg(long, default_value_t = Limits::default().max_body)]
    max_body: usize,
    /// Requests waiting for a worker, at most: one more is answered 503 with Retry-After.
    #[arg(long, default_value_t = Limits::default().queue)]
    queue: usize,
    /// Seconds a request may take from its arrival to its last image (then it is stopped and answered 503).
    #[arg(long, default_value_t = Limits::default().request_time.as_secs_f64())]
    timeout: f64,
    /// Seconds a client has to send a request's headers, and then its body.
    #[arg(long, default_value_t = Limits::default().read_time.as_secs_f64())]
    read_timeout: f64,
    /// Open connections, at most: more are closed as they come.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Sampling workers, each with its own copy of the models. Default: one per core.
    #[arg(long)]
    workers: Option<usize>,
    /// ONNX Runtime threads per worker.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// ONNX Runtime execution provider; auto tries TensorRT, then CUDA, then the CPU.
    #[arg(long, value_enum, default_value_t = ProviderKind::Cpu)]
    provider: ProviderKind,
    /// GPU index for cuda/tensorrt.
    #[arg(long, default_value_t = 0)]
    device_id: i32,
}

/// `--guidance-interval`: every step, or an interval.
#[derive(Debug, Clone, Copy)]
enum IntervalArg {
    All,
    Only(GuidanceInterval),
}

impl std::str::FromStr for IntervalArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            s => s.parse().map(Self::Only),
        }
    }
}

const STRIP_COLS: usize = 8;
const STRIP_ROWS: usize = 4;

/// A library error in the command line's words: a request field is named as its flag.
fn flags(e: runtime::Error) -> anyhow::Error {
    anyhow::anyhow!(e.cli_message())
}

/// Programs built in the checkout find the ONNX Runtime that scripts/setup.sh installed.
fn find_onnx_runtime() {
    runtime::onnx::add_library_candidate(runtime::onnx::setup_library_path(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(std::path::Path::new(".")),
    ));
}

fn run(a: Args) -> Result<()> {
    find_onnx_runtime();
    let mut g = open(&a)?;
    let req = request(&a, &g)?;
    let plan = g.plan(&req).map_err(flags)?;
    let steps_per_chunk = plan.num_steps(g.schedule().num_timesteps())?;
    let start = Instant::now();
    let (images, strip) = sample(&a, &mut g, &plan, steps_per_chunk)?;
    let secs = start.elapsed().as_secs_f64();
    save(&a, &images, &strip, plan.shape)?;
    println!("{}", summary(&a, &g, &req, &plan, steps_per_chunk, secs));
    Ok(())
}

/// `generate serve`: until SIGTERM or Ctrl-C.
fn serve(a: ServeArgs) -> Result<()> {
    find_onnx_runtime();
    let seconds = |flag: &str, s: f64| {
        Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| format!("--{flag} must be a positive number of seconds, not {s}"))
    };
    let limits = Limits {
        max_n: a.max_n,
        max_steps: a.max_steps,
        max_body: a.max_body,
        queue: a.queue,
        request_time: seconds("timeout", a.timeout)?,
        read_time: seconds("read-timeout", a.read_timeout)?,
        max_connections: a.max_connections.max(1),
    };
    let options = ServeOptions {
        addr: a.addr,
        token: a.token.or_else(|| std::env::var("GENERATE_TOKEN").ok()),
        limits,
        workers: a.workers.unwrap_or(ServeOptions::default().workers).max(1),
        generator: GeneratorOptions {
            provider: provider(a.provider, a.device_id, None, false),
            threads: Some(a.threads),
        },
    };
    let names: Vec<String> =
        a.model.iter().map(|p| p.file_stem().unwrap_or_default().to_string_lossy().into_owned()).collect();
    runtime::serve::run(&a.model, &options, |addr| {
        // one line on stdout, for people and for scripts that start the server on port 0
        let w = options.workers;
        println!("serving {} on http://{addr}/ ({w} worker{})", names.join(", "), if w == 1 { "" } else { "s" });
    })?;
    Ok(())
}

/// The provider of a kind, on a device.
fn provider(kind: ProviderKind, device: i32, cache_dir: Option<PathBuf>, fp16: bool) -> Provider {
    match Provider::of_kind(kind) {
        Provider::Cuda { .. } => Provider::Cuda { device },
        Provider::TensorRt { .. } => Provider::TensorRt { device, fp16, cache_dir },
        p => p,
    }
}

/// The model on the provider the flags ask for.
fn open(a: &Args) -> Result<Generator> {
    let provider = provider(a.provider, a.device_id, a.trt_cache.clone(), a.trt_fp16);
    let model = a.model.as_deref().context("--model is required")?;
    let g = Generator::open(model, &GeneratorOptions { provider, threads: a.threads })?;
    for note in g.provider_notes() {
        eprintln!("auto: {note}");
    }
    Ok(g)
}

/// The library's request from the flags, the model's recommended sampling where a flag is not given, and the
/// input images read for the model (with a note for each conversion).
fn request(a: &Args, g: &Generator) -> Result<GenerateRequest> {
    let (c, size, bg) = (g.info().channels, g.info().image_size, g.info().background);
    let load = |p: &PathBuf| -> Result<Vec<f32>> {
        let (x, notes) = runtime::images::load_image(p, c, size, bg)?;
        notes.iter().for_each(|n| eprintln!("note: {n}"));
        Ok(x)
    };
    let init = match &a.init {
        Some(p) => Some(InitImage { x0: load(p)?, strength: a.strength }),
        None => None,
    };
    let inpaint = match (&a.inpaint, &a.mask) {
        (Some(p), Some(m)) => {
            let mask = runtime::images::load_mask(m, runtime::images::image_size(p)?, size).map_err(flags)?;
            Some(Inpaint { x0: load(p)?, mask, resample: a.resample, jump: a.jump })
        }
        _ => None,
    };
    let interpolation = match (&a.interpolate, &a.interpolate_seeds) {
        (Some(ab), _) => Some(Interpolation::Images { a: load(&ab[0])?, b: load(&ab[1])?, strength: a.strength }),
        (_, Some(s)) => Some(Interpolation::Seeds { a: s[0], b: s[1] }),
        _ => None,
    };
    let rec = GenerateRequest::recommended(g.info());
    Ok(GenerateRequest {
        n: if interpolation.is_some() { a.frames } else { a.n },
        sampler: a.sampler.unwrap_or(rec.sampler),
        steps: a.steps.unwrap_or(rec.steps),
        eta: a.eta,
        spacing: a.spacing,
        class: a.class.clone(),
        guidance: a.guidance.unwrap_or(rec.guidance),
        attributes: a.attrs.clone(),
        attribute_guidance: a.attr_guidance.clone(),
        options: SampleOptions {
            guidance_interval: match a.guidance_interval {
                None => rec.options.guidance_interval,
                Some(IntervalArg::All) => None,
                Some(IntervalArg::Only(g)) => Some(g),
            },
            seed: a.seed,
            batch: a.batch,
            clip_x0: !a.no_clip,
            dynamic_threshold: a.dynamic_threshold,
            init,
            share_xt: a.share_xt,
            inpaint,
            cancel: None,
        },
        interpolation,
    })
}

/// Samples the plan with a progress bar, chunk by chunk: only 8-bit pixels are kept (the grid's), and --out-dir
/// files are written as they come, so memory beyond the grid does not grow with --n.
fn sample(a: &Args, g: &mut Generator, plan: &Request, steps_per_chunk: usize) -> Result<(Images, Strip)> {
    let chunks = plan.n.div_ceil(plan.options.batch);
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
    let mut strip = Strip::new(steps_per_chunk, STRIP_COLS, STRIP_ROWS.min(plan.options.batch), c * h * w);
    let mut images = Images::from_f32(&[], 0, plan.shape, plan.class_labels());
    images.pixels.reserve(plan.n.saturating_mul(c * h * w));
    g.sample_chunks(
        plan,
        &mut |s| {
            pb.inc(1);
            if a.strip.is_some() {
                strip.record(s);
            }
        },
        &mut |first, x| {
            let chunk = Images::from_f32(x, x.len() / (c * h * w), plan.shape, None);
            if let Some(d) = &a.out_dir {
                chunk.save_each_from(d, first)?;
            }
            images.append(&chunk);
            Ok(())
        },
    )
    .map_err(flags)?;
    pb.finish_and_clear();
    Ok((images, strip))
}

/// The grid (one row per interpolation) and the strip, when asked for.
fn save(a: &Args, images: &Images, strip: &Strip, shape: [usize; 3]) -> Result<()> {
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let interpolating = a.interpolate.is_some() || a.interpolate_seeds.is_some();
    images.save_grid_cols(&a.out, interpolating.then_some(a.frames))?;
    if let Some(p) = &a.strip {
        let (tiles, cols) = strip.tiles();
        let per: usize = shape.iter().product();
        Images::from_f32(&tiles, tiles.len() / per, shape, None).save_grid_cols(p, Some(cols))?;
        eprintln!(
            "strip: {} (columns t = {})",
            p.display(),
            strip.timesteps().iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// The summary line: provider, sampling, images and time.
fn summary(a: &Args, g: &Generator, req: &GenerateRequest, plan: &Request, steps: usize, secs: f64) -> String {
    let guidance = match (plan.guidance, plan.options.guidance_interval) {
        (0.0, _) => String::new(),
        (w, None) => format!(", guidance {w}"),
        (w, Some(g)) => format!(", guidance {w} at t {}..={}", g.lo, g.hi),
    };
    // the attributes weighed on their own (--attr-guidance)
    let own: Vec<String> = req.attribute_guidance.iter().map(|(name, w)| format!("{name} {w}")).collect();
    let guidance = if own.is_empty() { guidance } else { format!("{guidance} ({})", own.join(", ")) };
    let [c, h, w] = plan.shape;
    format!(
        "provider {} | {} {steps} steps{} | {} images {}x{}x{} in {:.2} s | {:.2} images/s | {}",
        g.provider(),
        req.sampler,
        guidance,
        req.n,
        c,
        h,
        w,
        secs,
        req.n as f64 / secs,
        a.out.display()
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Serve(a)) => serve(a),
        None => run(cli.args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
