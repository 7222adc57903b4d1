//! The training loop: Ho et al. 2020, Algorithm 1, with AdamW, warm-up, gradient clipping, EMA, label
//! dropout for classifier-free guidance, checkpoints, metrics and a loss curve.

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod loss;
pub mod optim;
pub mod parallel;
pub mod post_hoc;
pub mod timesteps;
pub mod workers;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use runtime::schedule::NoiseSchedule;

use crate::dist::{Collective, Single};
use crate::model::random::{DropoutKeys, StepKeys, RNG_SCHEME};
pub use batch::{make_host_batch, step_rng, DataOrder, HostBatch};
use checkpoint::{RngState, State};
use config::{Config, LrSchedule};
pub use device::DeviceSpec;
use optim::{AdamW, Ema, Grads};
use timesteps::TimestepSampler;

use crate::data::Dataset;
use crate::model::ops::CandleOps;
use crate::model::params::{InitSource, ParamSource, TensorSource};
use crate::model::profile;
use crate::model::tape::Pool;
use crate::model::unet::UNet;

/// How gradients are computed. Both engines run the same forward pass and draw the same random numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The tape engine on the CPU, Candle's autograd elsewhere.
    #[default]
    Auto,
    /// The CPU tape engine ([`crate::model::tape`]); CPU only.
    Tape,
    /// Candle's autograd (any device).
    Candle,
}

/// Options of `trainer fit` that are not part of the config.
#[derive(Debug, Clone, Default)]
pub struct FitOptions {
    pub out: PathBuf,
    pub device: DeviceSpec,
    pub resume: bool,
    pub force: bool,
    /// Stop after this many steps of this invocation (for tests and time-boxed runs); the config's
    /// train.steps stays the target.
    pub max_steps_now: Option<usize>,
    /// Stop (with a checkpoint) once the run's training time reaches this many seconds, counting the time
    /// before a resume: a wall-time budget.
    pub max_seconds: Option<f64>,
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
    /// How timesteps are drawn (uniformly, or by importance with its loss history).
    pub timesteps: TimestepSampler,
    pub data: Dataset,
    pub order: DataOrder,
    pub step: usize,
    /// Steps skipped in a row for a non-finite loss or gradient norm.
    pub skipped_in_row: usize,
    pub elapsed_s: f64,
    pub recent_loss: f64,
    /// Buffers of the CPU engine, reused from step to step.
    pub pool: Pool,
    pub engine: Engine,
    /// Split the tape engine's batch over single-threaded workers, one per thread ([`workers`]); on by default.
    pub batch_split: bool,
    workers: Vec<crate::model::workers::Worker>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// The loss or the gradient norm was not finite: no update was made (train.max_skipped_steps in a row stop
    /// the run).
    pub skipped: bool,
}

impl Trainer {
    /// A fresh model for `cfg` on `data`.
    pub fn new(cfg: Config, data: Dataset, device: Device) -> Result<Self> {
        cfg.validate()?;
        let mut src = InitSource::new(cfg.train.seed, &device, DType::F32);
        let unet = UNet::new(cfg.unet(), &mut src)?;
        let vars = src.into_vars();
        Self::assemble(cfg, data, device, unet, vars, None)
    }

    /// A model with the given weights (by parameter name; the config's network must take them all) and a fresh
    /// optimiser.
    pub fn from_tensors(
        cfg: Config,
        data: Dataset,
        device: Device,
        tensors: &HashMap<String, Tensor>,
        origin: &str,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut src = TensorSource::new(tensors, origin).as_vars().with_dtype(DType::F32);
        let unet = UNet::new(cfg.unet(), &mut src)?;
        let vars = src.finish()?;
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
        let unet = UNet::new(cfg.unet(), &mut src)?;
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
        // a new run's file and a resumed run's state.json pass the same checks
        cfg.validate()?;
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
        if cfg.model.attributes != data.attributes && (cfg.model.num_classes > 0 || !cfg.model.attributes.is_empty()) {
            let toml: Vec<String> = data
                .attributes
                .iter()
                .map(|a| format!("{{ name = \"{}\", values = {:?} }}", a.name, a.values))
                .collect();
            bail!(
                "model.attributes do not match the data's ({}); set model.attributes = [{}]",
                if data.attributes.is_empty() {
                    "none".to_string()
                } else {
                    data.attributes.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
                },
                toml.join(", ")
            );
        }
        let order = DataOrder::new(cfg.train.seed, data.len);
        let mut timesteps = TimestepSampler::for_config(&cfg.train, &schedule);
        let importance = timesteps.importance;
        if let Some(h) = ck.and_then(|ck| ck.state.timestep_history.as_ref()).filter(|_| importance) {
            if h.len() != schedule.num_timesteps() {
                bail!(
                    "the checkpoint's timestep history has {} timesteps, the schedule {}",
                    h.len(),
                    schedule.num_timesteps()
                );
            }
            timesteps.history = h.clone();
        }
        Ok(Self {
            cfg,
            device,
            unet,
            vars,
            opt,
            ema,
            schedule,
            timesteps,
            data,
            order,
            step: 0,
            skipped_in_row: 0,
            elapsed_s: 0.0,
            recent_loss: 0.0,
            pool: Pool::default(),
            engine: Engine::Auto,
            batch_split: true,
            workers: vec![],
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
        match tc.lr_schedule {
            LrSchedule::Cosine => {
                let p = ((step - w) as f64 / (tc.steps.saturating_sub(w)).max(1) as f64).min(1.0);
                tc.lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
            LrSchedule::Constant => tc.lr,
        }
    }

    /// Per-image loss weights: Min-SNR-gamma (Hang et al. 2023) for the run's prediction target
    /// ([`loss::min_snr_weights`]); all 1 when train.min_snr_gamma is 0.
    pub fn loss_weights(&self, t: &[u32]) -> Vec<f32> {
        loss::min_snr_weights(&self.schedule, self.cfg.train.min_snr_gamma, self.cfg.diffusion.prediction, t)
    }

    /// The objective ([`loss::objective`]) of one batch through Candle's autograd: the loss, a scalar whose
    /// gradient is the loss's (the output times the objective's gradient, held constant), and the
    /// per-image losses.
    pub fn loss(&self, batch: &HostBatch, dropout: &mut DropoutKeys) -> Result<(f64, Tensor, Vec<f64>)> {
        let b = batch.dims[0];
        let xt = Tensor::from_slice(&batch.xt, batch.dims.to_vec(), &self.device)?;
        let t = Tensor::from_slice(&batch.t, b, &self.device)?;
        let y =
            batch.y.as_ref().map(|y| Tensor::from_slice(y, self.unet.cfg.label_dims(b), &self.device)).transpose()?;
        let mut ops = CandleOps::training(&self.device, DType::F32, dropout);
        let pred = self.unet.forward(&mut ops, &xt, &t, y.as_ref())?;
        let host: Vec<f32> = pred.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let o = loss::objective(&self.cfg, &self.schedule, &host, batch);
        let g = Tensor::from_vec(o.grad, pred.shape(), &self.device)?.to_dtype(pred.dtype())?;
        Ok((o.loss, (pred * g)?.sum_all()?, o.per_image))
    }

    /// One optimisation step (forward, backward, AdamW, EMA): on the CPU through the tape engine
    /// ([`crate::model::tape`]), elsewhere through Candle's autograd. Both draw the same random numbers.
    pub fn train_step(&mut self) -> Result<StepStats> {
        self.train_step_on(&Single)
    }

    /// [`Trainer::train_step`] as one rank of a data-parallel job: this rank's share of the batch, the
    /// gradients summed over the ranks before the update ([`parallel`]).
    pub fn train_step_on(&mut self, comm: &dyn Collective) -> Result<StepStats> {
        let keys = StepKeys::new(self.cfg.train.seed, self.step);
        let global = self.cfg.train.batch_size;
        let share = crate::dist::share(global, comm.size(), comm.rank());
        let idx = self.order.batch(self.step, global)[share.clone()].to_vec();
        let lr = self.lr();
        let tape = match self.engine {
            Engine::Auto => self.device.is_cpu(),
            Engine::Tape if !self.device.is_cpu() => bail!("the tape engine runs on the CPU only"),
            Engine::Tape => true,
            Engine::Candle => false,
        };
        let clip = self.cfg.train.grad_clip;
        // a non-finite loss updates nothing; a non-finite gradient norm is refused by the optimiser
        let (loss, grad_norm, t, per_image) = if tape {
            let (loss, grads, t, per_image) = self.tape_share(&idx, share, keys)?;
            // every rank has its gradients: a rank that died or hangs is named here, not waited for
            comm.gate(self.step, false)?;
            let (loss, grads) = parallel::all_reduce_host(comm, &self.vars, grads, loss)?;
            let opt = &mut self.opt;
            let norm = profile::timed("optimiser: clip, AdamW", || {
                if loss.is_finite() {
                    opt.step_host(grads, lr, clip)
                } else {
                    Ok(f64::NAN)
                }
            })?;
            (loss, norm, t, per_image)
        } else {
            let batch = profile::timed("batch: data, augmentation, noise", || {
                make_host_batch(&self.data, &idx, share.start, global, &self.cfg, &self.schedule, &self.timesteps, keys)
            });
            let mut dropout = DropoutKeys::new(keys, share.start);
            let (loss, surrogate, per_image) = self.loss(&batch, &mut dropout)?;
            let grads = surrogate.backward()?;
            let (loss, named) = if comm.size() > 1 {
                comm.gate(self.step, false)?;
                let (loss, named) = parallel::all_reduce_candle(comm, &self.vars, &grads, loss)?;
                (loss, Some(named))
            } else {
                (loss, None)
            };
            let grads = match &named {
                Some(named) => Grads::Named(named),
                None => Grads::Candle(&grads),
            };
            let norm = if loss.is_finite() { self.opt.step(&grads, lr, clip)? } else { f64::NAN };
            (loss, norm, batch.t, per_image)
        };
        if self.timesteps.importance {
            let (t, losses) = parallel::gather_losses(comm, global, &t, &per_image)?;
            self.timesteps.record(&t, &losses);
        }
        self.finish_step(loss, grad_norm, lr)
    }

    /// After the optimiser's update (or its refusal): the EMA, the step count, and the stop after
    /// train.max_skipped_steps non-finite steps in a row.
    pub fn finish_step(&mut self, loss: f64, grad_norm: f64, lr: f64) -> Result<StepStats> {
        let skipped = !(loss.is_finite() && grad_norm.is_finite());
        if skipped {
            self.skipped_in_row += 1;
        } else {
            profile::timed("EMA", || self.ema.update(&self.vars))?;
            self.skipped_in_row = 0;
        }
        self.step += 1;
        let max = self.cfg.train.max_skipped_steps;
        if self.skipped_in_row >= max {
            bail!(
                "{max} steps in a row (up to step {}) had a non-finite loss or gradient norm (loss {loss}, norm \
                 {grad_norm}): training diverged; lower train.lr or keep train.grad_clip on, and resume from the last \
                 checkpoint, which holds the weights before them",
                self.step
            );
        }
        Ok(StepStats { loss, grad_norm, lr, skipped })
    }

    /// The loss of [`Trainer::loss`], the gradient of every parameter by name, and the per-image losses,
    /// through the CPU engine.
    #[allow(clippy::type_complexity)]
    pub fn cpu_loss_and_grads(
        &mut self,
        batch: &HostBatch,
        dropout: &mut DropoutKeys,
    ) -> Result<(f64, HashMap<String, Vec<f32>>, Vec<f64>)> {
        workers::tape_loss_and_grads(&self.unet, &self.cfg, &self.schedule, &mut self.pool, batch, dropout)
    }

    pub fn state(&self, device: DeviceSpec) -> Result<State> {
        Ok(State {
            format_version: checkpoint::FORMAT_VERSION,
            trainer_version: env!("CARGO_PKG_VERSION").to_string(),
            step: self.step,
            config: self.cfg.clone(),
            rng: RngState { algorithm: RNG_SCHEME.into(), seed: self.cfg.train.seed, next_stream: self.step as u64 },
            data_fingerprint: self.data.fingerprint.clone(),
            data_description: self.data.description.clone(),
            class_names: self.data.class_names.clone(),
            num_params: self.vars.values().map(|v| v.elem_count()).sum(),
            recent_loss: self.recent_loss,
            elapsed_s: self.elapsed_s,
            device: device.to_string(),
            timestep_history: self.timesteps.importance.then(|| self.timesteps.history.clone()),
        })
    }

    /// Writes a checkpoint; weights that are not all finite are refused (the previous checkpoint stays the
    /// newest).
    pub fn save_checkpoint(&self, run: &Path, device: DeviceSpec) -> Result<PathBuf> {
        let model: HashMap<String, Tensor> =
            self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        for (what, tensors) in [("weight", &model), ("EMA weight", &self.ema.as_map())] {
            for (name, t) in tensors {
                if t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().any(|v| !v.is_finite()) {
                    bail!("{what} '{name}' is not finite at step {}: no checkpoint written", self.step);
                }
            }
        }
        checkpoint::save(
            run,
            &self.state(device)?,
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
        self.workers.iter_mut().for_each(crate::model::workers::Worker::release);
        crate::denoise::preview(&unet, &self.schedule, &self.device, tc.preview_images, steps, tc.seed, &path)?;
        Ok(Some(path))
    }

    /// The EMA weights as a model (for previews, evaluation and export).
    pub fn ema_unet(&self) -> Result<UNet> {
        let map = self.ema.as_map();
        let mut src = TensorSource::new(&map, "EMA weights");
        let u = UNet::new(self.cfg.unet(), &mut src as &mut dyn ParamSource)?;
        src.finish()?;
        Ok(u)
    }
}

/// metrics.csv: one row per step.
pub const METRICS_HEADER: &str = "step,loss,grad_norm,lr,elapsed_s,skipped";

/// Keeps the metric rows up to `step` (a killed run may have logged past its last checkpoint, or written
/// half a line).
pub fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let mut out = String::from(METRICS_HEADER);
    out.push('\n');
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        // a whole row (runs before the `skipped` column wrote 5 fields) of a step the checkpoint has
        let whole = (5..=METRICS_HEADER.split(',').count()).contains(&f.len());
        if whole && f.iter().all(|x| x.parse::<f64>().is_ok()) && f[0].parse::<usize>().is_ok_and(|s| s <= step) {
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

/// Refuses to start a new run in a folder that holds something, unless `force` (the folder is then replaced by
/// [`create_run`]).
pub fn check_new_run(run: &Path, force: bool) -> Result<()> {
    if run.exists() && std::fs::read_dir(run)?.next().is_some() && !force {
        bail!(
            "run folder {} already exists; use --resume {} to continue it, or --force to replace it",
            run.display(),
            run.display()
        );
    }
    Ok(())
}

/// A new run folder (replacing an existing one, which [`check_new_run`] allowed): config.toml and the header of
/// metrics.csv.
pub fn create_run(run: &Path, cfg: &Config) -> Result<()> {
    if run.exists() {
        std::fs::remove_dir_all(run).with_context(|| format!("cannot remove {}", run.display()))?;
    }
    std::fs::create_dir_all(run).with_context(|| format!("cannot create run folder {}", run.display()))?;
    checkpoint::write_atomic(&run.join("config.toml"), toml::to_string_pretty(cfg)?.as_bytes())?;
    checkpoint::write_atomic(&run.join("metrics.csv"), format!("{METRICS_HEADER}\n").as_bytes())
}

/// metrics.csv as a run goes (one row per step) and the mean loss of the last 20 finite steps.
pub struct StepLog {
    run: PathBuf,
    /// None on the ranks of a data-parallel job other than 0, which write nothing.
    file: Option<std::fs::File>,
    window: std::collections::VecDeque<f64>,
    started: Instant,
    base_elapsed: f64,
}

impl StepLog {
    /// Appends to RUN/metrics.csv; the trainer's wall time counts on from its `elapsed_s`.
    pub fn open(run: &Path, tr: &Trainer) -> Result<Self> {
        let file = std::fs::OpenOptions::new().append(true).create(true).open(run.join("metrics.csv"))?;
        let window = std::collections::VecDeque::with_capacity(20);
        Ok(Self {
            run: run.to_path_buf(),
            file: Some(file),
            window,
            started: Instant::now(),
            base_elapsed: tr.elapsed_s,
        })
    }

    /// Keeps the clock and the recent loss, writes nothing.
    pub fn silent(tr: &Trainer) -> Self {
        let window = std::collections::VecDeque::with_capacity(20);
        Self { run: PathBuf::new(), file: None, window, started: Instant::now(), base_elapsed: tr.elapsed_s }
    }

    /// After a step: the trainer's wall time and recent loss, and the step's row.
    pub fn record(&mut self, tr: &mut Trainer, s: &StepStats) -> Result<()> {
        tr.elapsed_s = self.base_elapsed + self.started.elapsed().as_secs_f64();
        let (step, elapsed, skipped) = (tr.step, tr.elapsed_s, s.skipped as u8);
        if let Some(f) = self.file.as_mut() {
            writeln!(f, "{step},{:.6},{:.4},{:.3e},{elapsed:.2},{skipped}", s.loss, s.grad_norm, s.lr)?;
        }
        if !s.skipped {
            if self.window.len() == 20 {
                self.window.pop_front();
            }
            self.window.push_back(s.loss);
            tr.recent_loss = self.window.iter().sum::<f64>() / self.window.len() as f64;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        if let Some(f) = self.file.as_mut() {
            f.flush()?;
        }
        Ok(())
    }

    /// The run's loss curve from metrics.csv: RUN/loss.png, titled "<run name> <what>".
    pub fn loss_curve(&mut self, what: &str) -> Result<PathBuf> {
        self.flush()?;
        let losses = read_losses(&self.run.join("metrics.csv"))?;
        let out = self.run.join("loss.png");
        let name = self.run.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        crate::plot::loss_curve(&losses, &out, &format!("{name} {what}"))?;
        Ok(out)
    }
}

/// What [`fit`] reports as it goes; the command line turns it into log lines and a progress bar.
pub enum FitEvent<'a> {
    /// Before the first step of this invocation.
    Started {
        /// The checkpoint a resumed run continues from.
        resumed_from: Option<&'a Path>,
        step: usize,
        total: usize,
        data: &'a Dataset,
        num_params: usize,
    },
    /// After every step.
    Step { step: usize, total: usize, stats: &'a StepStats, elapsed_s: f64 },
    /// A preview grid was written.
    Preview(&'a Path),
    /// A change of phase the user may want to see (e.g. a distillation stage begins).
    Note(&'a str),
    /// Something the user should know (e.g. a newer checkpoint that could not be read was passed over).
    Warning(&'a str),
}

/// What [`fit`] leaves behind.
pub struct FitSummary {
    pub step: usize,
    pub total: usize,
    /// Mean loss of the last 20 steps.
    pub recent_loss: f64,
    pub checkpoint: PathBuf,
    pub loss_curve: PathBuf,
}

/// Trains a new run (`cfg`) or continues one (`opts.resume`; `cfg` may then only change train.steps):
/// checkpoints every train.checkpoint_every steps and at the end, one metrics.csv row per step, previews,
/// and the loss curve.
pub fn fit(cfg: Option<Config>, opts: &FitOptions, on: &mut dyn FnMut(FitEvent)) -> Result<FitSummary> {
    fit_on(cfg, opts, &Single, on)
}

/// [`fit`] as one rank of a data-parallel job (`comm`; [`Single`] for one process). Rank 0 opens the run (new
/// or resumed) and alone writes to its folder; the other ranks build the same trainer from rank 0's state and
/// weights, after checking that every rank was started with the same config, data and binary.
pub fn fit_on(
    cfg: Option<Config>,
    opts: &FitOptions,
    comm: &dyn Collective,
    on: &mut dyn FnMut(FitEvent),
) -> Result<FitSummary> {
    let run = &opts.out;
    let device = opts.device.open()?;
    let lead = comm.rank() == 0;
    if comm.size() > 1 {
        let asked = cfg.as_ref().map(toml::to_string).transpose()?.unwrap_or_default();
        let asked = format!("{asked}\nresume: {}", opts.resume);
        crate::dist::check_same(
            comm,
            &["the config (with its flags)", "the trainer's version"],
            &[crate::dist::fnv1a(asked.as_bytes()), crate::dist::fnv1a(env!("CARGO_PKG_VERSION").as_bytes())],
            "start every rank with the same command, binary and config file",
        )?;
    }
    let mut resumed_from = None;
    let mut lead_trainer = None;
    if lead {
        let mut trainer = open_run(cfg, opts, &device, on)?;
        if opts.resume {
            resumed_from = Some(trainer.1);
        }
        trainer.0.engine = opts.engine;
        lead_trainer = Some(trainer.0);
    }
    let mut trainer = if comm.size() == 1 {
        lead_trainer.context("one process is rank 0")?
    } else {
        join_lead(comm, lead_trainer, opts, &device)?
    };
    let total = trainer.cfg.train.steps;
    on(FitEvent::Started {
        resumed_from: resumed_from.as_deref(),
        step: trainer.step,
        total,
        data: &trainer.data,
        num_params: trainer.vars.values().map(|v| v.elem_count()).sum(),
    });
    let stop = opts.max_steps_now.map(|n| (trainer.step + n).min(total)).unwrap_or(total);
    let mut log = if lead { StepLog::open(run, &trainer)? } else { StepLog::silent(&trainer) };
    let every = trainer.cfg.train.checkpoint_every;
    while trainer.step < stop {
        // the wall-time budget is rank 0's clock, so that all ranks stop at the same step
        let out_of_time = opts.max_seconds.is_some_and(|m| trainer.elapsed_s >= m);
        if comm.gate(trainer.step, out_of_time)? {
            break;
        }
        let s = trainer.train_step_on(comm)?;
        log.record(&mut trainer, &s)?;
        on(FitEvent::Step { step: trainer.step, total, stats: &s, elapsed_s: trainer.elapsed_s });
        if trainer.step % every == 0 && trainer.step < stop {
            parallel::check_in_step(comm, &trainer.vars, trainer.step)?;
            if lead {
                log.flush()?;
                trainer.save_checkpoint(run, opts.device)?;
            }
        }
        let pe = trainer.cfg.train.preview_every;
        if lead && pe > 0 && trainer.step % pe == 0 && trainer.step < stop {
            if let Some(p) = trainer.preview(run)? {
                on(FitEvent::Preview(&p));
            }
        }
    }
    parallel::check_in_step(comm, &trainer.vars, trainer.step)?;
    let checkpoint = checkpoint::step_dir(run, trainer.step);
    if !lead {
        // rank 0 writes the checkpoint, the preview and the loss curve
        let loss_curve = run.join("loss.png");
        return Ok(FitSummary { step: trainer.step, total, recent_loss: trainer.recent_loss, checkpoint, loss_curve });
    }
    log.flush()?;
    let checkpoint = trainer.save_checkpoint(run, opts.device)?;
    if let Some(p) = trainer.preview(run)? {
        on(FitEvent::Preview(&p));
    }
    let loss_curve = log.loss_curve("loss")?;
    Ok(FitSummary { step: trainer.step, total, recent_loss: trainer.recent_loss, checkpoint, loss_curve })
}

/// The trainer of a new run, or of a resumed one with the checkpoint it continues from.
fn open_run(
    cfg: Option<Config>,
    opts: &FitOptions,
    device: &Device,
    on: &mut dyn FnMut(FitEvent),
) -> Result<(Trainer, PathBuf)> {
    let run = &opts.out;
    if opts.resume {
        let ck = checkpoint::load_which(run, "latest", device, true)?;
        for w in &ck.passed_over {
            on(FitEvent::Warning(&format!("passed over an unreadable checkpoint: {w}")));
        }
        if ck.state.rng.algorithm != RNG_SCHEME {
            on(FitEvent::Warning(&format!(
                "this run was started by an older trainer whose random numbers were drawn as \"{}\"; it continues \
                 with \"{RNG_SCHEME}\" (statistically the same, but not the draws the older trainer would have made)",
                ck.state.rng.algorithm
            )));
        }
        let dir = ck.dir.clone();
        // the run's own config, with a changed step target if one was given
        let mut rcfg = ck.state.config.clone();
        if let Some(c) = &cfg {
            if c.train.steps != rcfg.train.steps {
                rcfg.train.steps = c.train.steps;
            }
        }
        let data = crate::data::load(&rcfg.data, rcfg.model.image_size)?;
        let t = Trainer::from_checkpoint(ck, rcfg, data, device.clone())?;
        truncate_metrics(&run.join("metrics.csv"), t.step)?;
        Ok((t, dir))
    } else {
        let cfg = cfg.context("a config is needed for a new run")?;
        cfg.validate()?;
        check_new_run(run, opts.force)?;
        // the data is read before an existing folder is replaced: a data error leaves it as it was
        let data = crate::data::load(&cfg.data, cfg.model.image_size)?;
        create_run(run, &cfg)?;
        Ok((Trainer::new(cfg, data, device.clone())?, run.clone()))
    }
}

/// Every rank's trainer made rank 0's (`lead` is rank 0's own, None elsewhere): the others load the data of
/// rank 0's config (each from its own disk; the fingerprints must match) and take its weights and counters.
fn join_lead(comm: &dyn Collective, lead: Option<Trainer>, opts: &FitOptions, device: &Device) -> Result<Trainer> {
    // the others wait here (at most the timeout) while rank 0 reads the data or the checkpoint
    comm.gate(0, false)?;
    let state = parallel::broadcast_state(comm, lead.as_ref().map(|t| t.state(opts.device)).transpose()?.as_ref())?;
    let batch = state.config.train.batch_size;
    if batch < comm.size() {
        bail!("train.batch_size is {batch}, fewer images than the {} ranks of this job", comm.size());
    }
    let mut trainer = match lead {
        Some(t) => t,
        None => {
            let data = crate::data::load(&state.config.data, state.config.model.image_size)?;
            let mut t = Trainer::new(state.config.clone(), data, device.clone())?;
            t.engine = opts.engine;
            t
        }
    };
    crate::dist::check_same(
        comm,
        &["the data"],
        &[crate::dist::fnv1a(trainer.data.fingerprint.as_bytes())],
        "every rank must read the same images (copy the data set to each machine)",
    )?;
    parallel::adopt_lead(comm, &mut trainer, &state)?;
    Ok(trainer)
}
