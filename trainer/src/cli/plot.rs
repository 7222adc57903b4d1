//! `trainer plot`: noise schedules, forward-noising strips, reverse-process strips, loss curves.

use std::path::PathBuf;

use anyhow::{Context, Result};
use runtime::metadata::Weights;
use runtime::sampler::SamplerKind;
use trainer::train::config::Config;
use trainer::train::DeviceSpec;

#[derive(clap::Subcommand)]
pub enum PlotCmd {
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
        /// ddim, dpm++ or ddpm (Ho et al. Algorithm 2, the chain respaced to --steps; T: the original chain).
        #[arg(long, value_enum, default_value_t = SamplerKind::Ddim)]
        sampler: SamplerKind,
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
        device: DeviceSpec,
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

pub fn run_plot(cmd: PlotCmd) -> Result<()> {
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
            use runtime::metadata::class_index;
            use runtime::sampler::{Method, Spacing};
            anyhow::ensure!(rows >= 1 && cols >= 2, "--rows must be at least 1 and --cols at least 2");
            let device = device.open()?;
            let trainer::train::checkpoint::LoadedUnet { unet, state, passed_over } =
                trainer::train::checkpoint::load_unet(&run, &checkpoint, Weights::Ema, &device)?;
            for w in &passed_over {
                eprintln!("warning: passed over an unreadable checkpoint: {w}");
            }
            let cfg = &state.config;
            let sched = cfg.diffusion.schedule()?;
            let variance = cfg.diffusion.variance;
            let method = Method::new(sampler, steps, 0.0, Spacing::Trailing, variance, sched.num_timesteps())
                .map_err(|e| anyhow::anyhow!(e.cli_message()))?;
            let label = match &class {
                Some(c) => Some(
                    class_index(&state.class_names, cfg.model.num_classes, c)
                        .map_err(|e| anyhow::anyhow!(e.cli_message()))?,
                ),
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
