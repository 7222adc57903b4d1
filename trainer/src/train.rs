//! The training loop: Ho et al. 2020, Algorithm 1, with AdamW, warm-up, gradient clipping, EMA, label
//! dropout for classifier-free guidance, checkpoints, metrics and a loss curve.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use runtime::schedule::NoiseSchedule;

use crate::checkpoint::{self, RngState, State};
use crate::config::Config;
use crate::data::Dataset;
use crate::ops::CandleOps;
use crate::optim::{AdamW, Ema, Grads};
use crate::params::{InitSource, ParamSource, TensorSource};
use crate::tape::{Pool, Tape};
use crate::unet::UNet;

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize =
                s.strip_prefix("cuda:").map(|n| n.parse()).transpose().context("cuda:N needs a number")?.unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this trainer was built without CUDA; rebuild with `cargo build --release -p trainer --features cuda`");
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("unknown device '{other}' (cpu, cuda or cuda:N)"),
    }
}

/// The random numbers of one training step, all drawn from ChaCha8(seed), stream = step.
pub fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step as u64);
    rng
}

/// Epoch-wise shuffled sampling without replacement; position k of the whole run is a pure function of
/// (seed, k), so a resumed run sees the same batches.
pub struct Sampler {
    seed: u64,
    n: usize,
    epoch: usize,
    perm: Vec<usize>,
}

impl Sampler {
    pub fn new(seed: u64, n: usize) -> Self {
        let mut s = Self { seed, n, epoch: usize::MAX, perm: vec![] };
        s.set_epoch(0);
        s
    }
    fn set_epoch(&mut self, epoch: usize) {
        if self.epoch == epoch {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_da7a);
        rng.set_stream(epoch as u64);
        self.perm = (0..self.n).collect();
        self.perm.shuffle(&mut rng);
        self.epoch = epoch;
    }
    /// Dataset indices for step `step` at batch size `b`.
    pub fn batch(&mut self, step: usize, b: usize) -> Vec<usize> {
        (0..b)
            .map(|j| {
                let k = step * b + j;
                self.set_epoch(k / self.n);
                self.perm[k % self.n]
            })
            .collect()
    }
}

/// One step's inputs: x_t, t, labels and the target noise.
pub struct Batch {
    pub xt: Tensor,
    pub t: Tensor,
    pub y: Option<Tensor>,
    pub eps: Tensor,
}

/// The same inputs in host memory (the CPU engine reads them directly).
pub struct HostBatch {
    /// [B, C, H, W]
    pub dims: [usize; 4],
    pub xt: Vec<f32>,
    pub eps: Vec<f32>,
    pub t: Vec<u32>,
    pub y: Option<Vec<u32>>,
}

impl HostBatch {
    pub fn to_device(self, device: &Device) -> Result<Batch> {
        let b = self.dims[0];
        Ok(Batch {
            xt: Tensor::from_vec(self.xt, self.dims.to_vec(), device)?,
            eps: Tensor::from_vec(self.eps, self.dims.to_vec(), device)?,
            t: Tensor::from_vec(self.t, b, device)?,
            y: self.y.map(|y| Tensor::from_vec(y, b, device)).transpose()?,
        })
    }
}

/// Builds the batch of Algorithm 1 (Ho et al. 2020): x_0 ~ data, t ~ U{0..T-1}, eps ~ N(0, I),
/// x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
pub fn make_host_batch(
    data: &Dataset,
    idx: &[usize],
    cfg: &Config,
    schedule: &NoiseSchedule,
    rng: &mut ChaCha8Rng,
) -> HostBatch {
    let (c, s) = (data.channels, data.size);
    let n = data.image_len();
    let b = idx.len();
    let mut xt = Vec::with_capacity(b * n);
    let mut eps_all = Vec::with_capacity(b * n);
    let mut ts = Vec::with_capacity(b);
    let mut ys = Vec::with_capacity(b);
    let null = cfg.model.null_class();
    for &i in idx {
        let mut x0 = data.image_f32(i);
        cfg.data.augment.apply(&mut x0, c, s, rng);
        let t = rng.gen_range(0..schedule.num_timesteps());
        let eps: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut *rng)).collect();
        xt.extend(schedule.q_sample(&x0, t, &eps));
        eps_all.extend(eps);
        ts.push(t as u32);
        if let (Some(null), Some(labels)) = (null, &data.labels) {
            // Ho & Salimans 2022, Algorithm 1: drop the label with probability p_uncond
            ys.push(if rng.gen::<f64>() < cfg.train.p_uncond { null as u32 } else { labels[i] });
        }
    }
    HostBatch { dims: [b, c, s, s], xt, eps: eps_all, t: ts, y: if ys.is_empty() { None } else { Some(ys) } }
}

/// [`make_host_batch`] as tensors on `device`.
pub fn make_batch(
    data: &Dataset,
    idx: &[usize],
    cfg: &Config,
    schedule: &NoiseSchedule,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<Batch> {
    make_host_batch(data, idx, cfg, schedule, rng).to_device(device)
}

/// How gradients are computed. Both engines run the same forward pass and draw the same random numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The tape engine on the CPU, Candle's autograd elsewhere.
    #[default]
    Auto,
    /// The CPU tape engine ([`crate::tape`]); CPU only.
    Tape,
    /// Candle's autograd (any device).
    Candle,
}

/// Options of `trainer fit` that are not part of the config.
#[derive(Debug, Clone, Default)]
pub struct FitOptions {
    pub out: PathBuf,
    pub device: String,
    pub resume: bool,
    pub force: bool,
    /// Stop after this many steps of this invocation (for tests and time-boxed runs); the config's
    /// train.steps stays the target.
    pub max_steps_now: Option<usize>,
    pub quiet: bool,
    pub engine: Engine,
}

pub struct Trainer {
    pub cfg: Config,
    pub device: Device,
    pub unet: UNet,
    pub vars: BTreeMap<String, Var>,
    pub opt: AdamW,
    pub ema: Ema,
    pub schedule: NoiseSchedule,
    pub data: Dataset,
    pub sampler: Sampler,
    pub step: usize,
    pub elapsed_s: f64,
    pub recent_loss: f64,
    /// Buffers of the CPU engine, reused from step to step.
    pub pool: Pool,
    pub engine: Engine,
}

pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

impl Trainer {
    /// A fresh model for `cfg` on `data`.
    pub fn new(cfg: Config, data: Dataset, device: Device) -> Result<Self> {
        cfg.validate()?;
        let mut src = InitSource::new(cfg.train.seed, &device, DType::F32);
        let unet = UNet::new(cfg.model.clone(), &mut src)?;
        let vars = src.into_vars();
        Self::assemble(cfg, data, device, unet, vars, None)
    }

    /// Continues from a checkpoint.
    pub fn from_checkpoint(ck: checkpoint::Checkpoint, cfg: Config, data: Dataset, device: Device) -> Result<Self> {
        if ck.state.data_fingerprint != data.fingerprint {
            bail!(
                "the data changed since this run started (fingerprint {} at step {}, now {}): resume with the same dataset",
                ck.state.data_fingerprint,
                ck.state.step,
                data.fingerprint
            );
        }
        let origin = format!("{}/model.safetensors", ck.dir.display());
        let mut src = TensorSource::new(&ck.model, origin).as_vars().with_dtype(DType::F32);
        let unet = UNet::new(cfg.model.clone(), &mut src)?;
        let vars = src.finish()?;
        let mut t = Self::assemble(cfg, data, device, unet, vars, Some(&ck))?;
        t.step = ck.state.step;
        t.elapsed_s = ck.state.elapsed_s;
        t.recent_loss = ck.state.recent_loss;
        Ok(t)
    }

    fn assemble(
        cfg: Config,
        data: Dataset,
        device: Device,
        unet: UNet,
        vars: BTreeMap<String, Var>,
        ck: Option<&checkpoint::Checkpoint>,
    ) -> Result<Self> {
        let tc = &cfg.train;
        let mut opt = AdamW::new(&vars, tc.adam_beta1, tc.adam_beta2, tc.adam_eps, tc.weight_decay)?;
        let mut ema = Ema::new(&vars, tc.ema_decay)?;
        if let Some(ck) = ck {
            opt.load_state(&ck.optim, ck.state.step)?;
            for (k, v) in ema.tensors.iter_mut() {
                let e = ck.ema.get(k).with_context(|| format!("{}: EMA has no '{k}'", ck.dir.display()))?;
                *v = e.to_dtype(DType::F32)?;
            }
            ema.updates = ck.state.step;
        }
        let schedule = cfg.diffusion.schedule()?;
        if cfg.model.num_classes > 0 && data.num_classes() != cfg.model.num_classes {
            bail!(
                "model.num_classes is {} but the data has {} classes ({}); set model.num_classes = {} (or 0 for an unconditional model)",
                cfg.model.num_classes,
                data.num_classes(),
                data.class_names.join(", "),
                data.num_classes()
            );
        }
        if cfg.model.channels != data.channels {
            bail!("model.channels is {} but the images have {} channel(s)", cfg.model.channels, data.channels);
        }
        let sampler = Sampler::new(cfg.train.seed, data.len);
        Ok(Self {
            cfg,
            device,
            unet,
            vars,
            opt,
            ema,
            schedule,
            data,
            sampler,
            step: 0,
            elapsed_s: 0.0,
            recent_loss: 0.0,
            pool: Pool::default(),
            engine: Engine::Auto,
        })
    }

    /// Learning rate at the current step: linear warm-up, then constant (Ho et al. 2020, appendix B) or a
    /// half cosine down to 0 at train.steps (`lr_schedule = "cosine"`).
    pub fn lr(&self) -> f64 {
        let tc = &self.cfg.train;
        let (w, step) = (tc.warmup_steps, self.step);
        if step < w {
            return tc.lr * (step + 1) as f64 / w as f64;
        }
        match tc.lr_schedule.as_str() {
            "cosine" => {
                let p = ((step - w) as f64 / (tc.steps.saturating_sub(w)).max(1) as f64).min(1.0);
                tc.lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
            _ => tc.lr,
        }
    }

    /// Per-image loss weights: Min-SNR-gamma (Hang et al. 2023) for eps-prediction, min(SNR_t, gamma) / SNR_t;
    /// all 1 when train.min_snr_gamma is 0.
    pub fn loss_weights(&self, t: &[u32]) -> Vec<f32> {
        let g = self.cfg.train.min_snr_gamma;
        t.iter()
            .map(|&t| {
                if g > 0.0 {
                    let snr = self.schedule.snr(t as usize);
                    (snr.min(g) / snr) as f32
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// The loss of Algorithm 1 for one batch: || eps - eps_theta(x_t, t, y) ||^2 (Ho et al. 2020, eq. 14).
    pub fn loss(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let mut ops = CandleOps::training(&self.device, DType::F32, rng);
        let pred = self.unet.forward(&mut ops, &batch.xt, &batch.t, batch.y.as_ref())?;
        let diff = (pred - &batch.eps)?;
        let per_elem = match self.cfg.train.loss.as_str() {
            "l1" => diff.abs()?,
            _ => diff.sqr()?,
        };
        if self.cfg.train.min_snr_gamma <= 0.0 {
            return Ok(per_elem.mean_all()?);
        }
        let b = per_elem.dim(0)?;
        let w = self.loss_weights(&batch.t.to_vec1::<u32>()?);
        let w = Tensor::from_vec(w, b, per_elem.device())?;
        Ok(per_elem.flatten_from(1)?.mean(1)?.mul(&w)?.mean_all()?)
    }

    /// One optimisation step (forward, backward, AdamW, EMA): on the CPU through the tape engine
    /// ([`crate::tape`]), elsewhere through Candle's autograd. Both draw the same random numbers.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let mut rng = step_rng(self.cfg.train.seed, self.step);
        let idx = self.sampler.batch(self.step, self.cfg.train.batch_size);
        let batch = make_host_batch(&self.data, &idx, &self.cfg, &self.schedule, &mut rng);
        let lr = self.lr();
        let tape = match self.engine {
            Engine::Auto => self.device.is_cpu(),
            Engine::Tape if !self.device.is_cpu() => bail!("the tape engine runs on the CPU only"),
            Engine::Tape => true,
            Engine::Candle => false,
        };
        let (loss, grad_norm) = if tape {
            let (loss, grads) = self.cpu_loss_and_grads(&batch, &mut rng)?;
            (loss, self.opt.step_host(grads, lr, self.cfg.train.grad_clip)?)
        } else {
            let batch = batch.to_device(&self.device)?;
            let loss = self.loss(&batch, &mut rng)?;
            let grads = loss.backward()?;
            let norm = self.opt.step(&Grads::Candle(&grads), lr, self.cfg.train.grad_clip)?;
            (loss.to_scalar::<f32>()? as f64, norm)
        };
        self.ema.update(&self.vars)?;
        self.step += 1;
        if !loss.is_finite() {
            bail!("loss is {loss} at step {}: training diverged", self.step);
        }
        Ok(StepStats { loss, grad_norm, lr })
    }

    /// The loss of [`Trainer::loss`] and the gradient of every parameter, by name, through the CPU engine.
    pub fn cpu_loss_and_grads(
        &mut self,
        batch: &HostBatch,
        rng: &mut ChaCha8Rng,
    ) -> Result<(f64, HashMap<String, Vec<f32>>)> {
        let weights = self.loss_weights(&batch.t);
        let mut tape = Tape::new(&mut self.pool, Some(rng));
        let b = batch.dims[0];
        let x = tape.input(&batch.xt, &batch.dims)?;
        let t = tape.input(&batch.t.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[b])?;
        let y = match &batch.y {
            Some(y) => Some(tape.input(&y.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[b])?),
            None => None,
        };
        let out = self.unet.forward(&mut tape, &x, &t, y.as_ref())?;
        let pred = tape.data(out);
        let n = pred.len() as f64;
        let per_image = pred.len() / b;
        let l1 = self.cfg.train.loss == "l1";
        let mut loss = 0f64;
        let mut seed = vec![0f32; pred.len()];
        for (i, w) in weights.iter().enumerate() {
            let r = i * per_image..(i + 1) * per_image;
            let w = *w as f64;
            for ((s, &p), &e) in seed[r.clone()].iter_mut().zip(&pred[r.clone()]).zip(&batch.eps[r]) {
                let d = (p - e) as f64;
                if l1 {
                    loss += w * d.abs();
                    *s = (w * d.signum() / n) as f32;
                } else {
                    loss += w * d * d;
                    *s = (2.0 * w * d / n) as f32;
                }
            }
        }
        let grads = tape.backward(out, seed)?;
        Ok((loss / n, grads))
    }

    pub fn state(&self, device_name: &str) -> Result<State> {
        Ok(State {
            format_version: checkpoint::FORMAT_VERSION,
            trainer_version: env!("CARGO_PKG_VERSION").to_string(),
            step: self.step,
            config: self.cfg.clone(),
            rng: RngState {
                algorithm: "chacha8; step s draws from stream s".into(),
                seed: self.cfg.train.seed,
                next_stream: self.step as u64,
            },
            data_fingerprint: self.data.fingerprint.clone(),
            data_description: self.data.description.clone(),
            class_names: self.data.class_names.clone(),
            num_params: self.vars.values().map(|v| v.elem_count()).sum(),
            recent_loss: self.recent_loss,
            elapsed_s: self.elapsed_s,
            device: device_name.to_string(),
        })
    }

    pub fn save_checkpoint(&self, run: &Path, device_name: &str) -> Result<PathBuf> {
        let model = self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        checkpoint::save(
            run,
            &self.state(device_name)?,
            &model,
            &self.ema.as_map(),
            &self.opt.state_tensors(),
            self.cfg.train.keep_checkpoints,
        )
    }

    /// A sample grid from the EMA weights: RUN/samples/step-N.png (None when previews are off).
    pub fn preview(&mut self, run: &Path) -> Result<Option<PathBuf>> {
        let tc = &self.cfg.train;
        if tc.preview_images == 0 || tc.preview_steps == 0 {
            return Ok(None);
        }
        let path = run.join("samples").join(format!("step-{:08}.png", self.step));
        let unet = self.ema_unet()?;
        let steps = tc.preview_steps.min(self.schedule.num_timesteps());
        // the sampler gets buffers of its own: release the training step's meanwhile (peak memory)
        self.pool = Pool::default();
        crate::denoise::preview(&unet, &self.schedule, &self.device, tc.preview_images, steps, tc.seed, &path)?;
        Ok(Some(path))
    }

    /// The EMA weights as a model (for previews, evaluation and export).
    pub fn ema_unet(&self) -> Result<UNet> {
        let map = self.ema.as_map();
        let mut src = TensorSource::new(&map, "EMA weights");
        let u = UNet::new(self.cfg.model.clone(), &mut src as &mut dyn ParamSource)?;
        src.finish()?;
        Ok(u)
    }
}

/// metrics.csv: one row per step.
pub const METRICS_HEADER: &str = "step,loss,grad_norm,lr,elapsed_s";

/// Keeps the metric rows up to `step` (a killed run may have logged past its last checkpoint, or written
/// half a line).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let mut out = String::from(METRICS_HEADER);
    out.push('\n');
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() == 5 && f.iter().all(|x| x.parse::<f64>().is_ok()) && f[0].parse::<usize>().is_ok_and(|s| s <= step)
        {
            out.push_str(line);
            out.push('\n');
        }
    }
    checkpoint::write_atomic(path, out.as_bytes())
}

/// Reads (step, loss) from metrics.csv.
pub fn read_losses(path: &Path) -> Result<Vec<(usize, f64)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect())
}

/// `trainer fit`: creates or resumes a run folder and trains to cfg.train.steps.
pub fn fit(cfg: Option<Config>, opts: &FitOptions) -> Result<()> {
    let run = &opts.out;
    let device = parse_device(&opts.device)?;
    let mut trainer = if opts.resume {
        let dir = checkpoint::resolve(run, "latest")?;
        let ck = checkpoint::load(&dir, &device, true)?;
        // the run's own config, with a changed step target if one was given
        let mut rcfg = ck.state.config.clone();
        if let Some(c) = &cfg {
            if c.train.steps != rcfg.train.steps {
                rcfg.train.steps = c.train.steps;
            }
        }
        let data = crate::data::load(&rcfg.data, rcfg.model.image_size)?;
        log(opts, &format!("resuming {} from step {} ({})", run.display(), ck.state.step, dir.display()));
        let t = Trainer::from_checkpoint(ck, rcfg, data, device.clone())?;
        truncate_metrics(&run.join("metrics.csv"), t.step)?;
        t
    } else {
        let cfg = cfg.context("a config is needed for a new run")?;
        cfg.validate()?;
        if run.exists() && std::fs::read_dir(run)?.next().is_some() {
            if !opts.force {
                bail!(
                    "run folder {} already exists; use --resume {} to continue it, or --force to replace it",
                    run.display(),
                    run.display()
                );
            }
            std::fs::remove_dir_all(run).with_context(|| format!("cannot remove {}", run.display()))?;
        }
        let data = crate::data::load(&cfg.data, cfg.model.image_size)?;
        std::fs::create_dir_all(run).with_context(|| format!("cannot create run folder {}", run.display()))?;
        checkpoint::write_atomic(&run.join("config.toml"), toml::to_string_pretty(&cfg)?.as_bytes())?;
        checkpoint::write_atomic(&run.join("metrics.csv"), format!("{METRICS_HEADER}\n").as_bytes())?;
        Trainer::new(cfg, data, device.clone())?
    };
    trainer.engine = opts.engine;
    let params: usize = trainer.vars.values().map(|v| v.elem_count()).sum();
    log(
        opts,
        &format!(
            "data: {} images {}x{}x{} ({} classes) from {}; model: {:.2}M parameters; device {}",
            trainer.data.len,
            trainer.data.channels,
            trainer.data.size,
            trainer.data.size,
            trainer.data.num_classes(),
            trainer.data.description,
            params as f64 / 1e6,
            opts.device
        ),
    );
    let total = trainer.cfg.train.steps;
    let stop = opts.max_steps_now.map(|n| (trainer.step + n).min(total)).unwrap_or(total);
    let metrics_path = run.join("metrics.csv");
    let mut metrics = std::fs::OpenOptions::new().append(true).create(true).open(&metrics_path)?;
    let pb = progress_bar(opts, total as u64, trainer.step as u64);
    let started = Instant::now();
    let base_elapsed = trainer.elapsed_s;
    let mut window = std::collections::VecDeque::with_capacity(20);
    let every = trainer.cfg.train.checkpoint_every;
    while trainer.step < stop {
        let s = trainer.train_step()?;
        trainer.elapsed_s = base_elapsed + started.elapsed().as_secs_f64();
        writeln!(metrics, "{},{:.6},{:.4},{:.3e},{:.2}", trainer.step, s.loss, s.grad_norm, s.lr, trainer.elapsed_s)?;
        if window.len() == 20 {
            window.pop_front();
        }
        window.push_back(s.loss);
        trainer.recent_loss = window.iter().sum::<f64>() / window.len() as f64;
        pb.set_position(trainer.step as u64);
        pb.set_message(format!("loss {:.4} | grad {:.3} | lr {:.1e}", s.loss, s.grad_norm, s.lr));
        if trainer.step % every == 0 && trainer.step < stop {
            metrics.flush()?;
            trainer.save_checkpoint(run, &opts.device)?;
        }
        let pe = trainer.cfg.train.preview_every;
        if pe > 0 && trainer.step % pe == 0 && trainer.step < stop {
            pb.suspend(|| trainer.preview(run))?;
        }
        if pb.is_hidden() && !opts.quiet && (trainer.step % (total / 20).max(1) == 0) {
            eprintln!(
                "step {}/{} loss {:.4} ({:.2} steps/s)",
                trainer.step,
                total,
                s.loss,
                trainer.step as f64 / trainer.elapsed_s.max(1e-9)
            );
        }
    }
    metrics.flush()?;
    let ck = trainer.save_checkpoint(run, &opts.device)?;
    pb.finish_and_clear();
    if let Some(p) = trainer.preview(run)? {
        log(opts, &format!("samples (EMA weights, DDIM {} steps): {}", trainer.cfg.train.preview_steps, p.display()));
    }
    let losses = read_losses(&metrics_path)?;
    crate::plot::loss_curve(
        &losses,
        &run.join("loss.png"),
        &format!("{} loss", run.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()),
    )?;
    log(
        opts,
        &format!(
            "step {} of {}: loss {:.4} (mean of last 20); checkpoint {}; loss curve {}",
            trainer.step,
            total,
            trainer.recent_loss,
            ck.display(),
            run.join("loss.png").display()
        ),
    );
    Ok(())
}

fn log(opts: &FitOptions, msg: &str) {
    if !opts.quiet {
        eprintln!("{msg}");
    }
}

fn progress_bar(opts: &FitOptions, total: u64, pos: u64) -> indicatif::ProgressBar {
    if opts.quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {per_sec} ETA {eta} {msg}",
        )
        .unwrap(),
    );
    pb.set_position(pos);
    pb
}
