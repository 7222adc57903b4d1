//! `trainer distill`: a trained model turned into a few-step student by progressive distillation (Salimans & Ho
//! 2022, "Progressive distillation for fast sampling of diffusion models", Algorithm 2), with classifier-free
//! guidance distilled into a guidance-weight input (Meng et al. 2023, "On distillation of guided diffusion
//! models", sec. 3: their two stages folded into the first halving, whose teacher is the guided original model).
//!
//! The student is the teacher's U-Net (initialised from its weights) plus the zero-initialised layer `wemb`, and
//! predicts v whatever the teacher predicted (Salimans & Ho, sec. 4: an eps-student cannot take the one big step
//! from pure noise, where x = (z - sigma eps) / alpha divides by alpha ~ 0.006). Each stage halves the steps:
//! for t on the student's trailing grid, the teacher takes two DDIM steps t -> t' -> t'' (its own grid has twice
//! the points), and the student learns the x whose one DDIM step lands there ([`targets::pd_target`]), with the
//! truncated-SNR weight. The next stage's teacher is this stage's student (its EMA weights, written to
//! RUN/distill/teacher-stage-S.safetensors at the stage's start so a resumed run finds it).
//!
//! Consistency distillation (`--method consistency`; Song et al. 2023, Algorithm 2, guided as LCM, Luo et al. 2023,
//! with the stop-gradient target of Geng et al. 2024) is the alternative: one stage on the teacher's grid, the
//! student's x0 at t made to agree with its own x0 (gradient stopped) one teacher DDIM step later, anchored at the
//! end by the teacher's x0; it samples by multistep consistency sampling in any number of steps.
//!
//! The run is an ordinary run folder (checkpoints, metrics.csv, `--resume`, `--max-minutes`); its config holds
//! a [distill] section, which `trainer export` turns into the student's metadata.

pub mod targets;
pub mod teacher;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::model::profile;
use crate::model::random::{DropoutKeys, StepKeys};
use crate::model::tape::Tape;
use crate::train::checkpoint;
use crate::train::config::{Config, DistillConfig, LrSchedule};
use crate::train::{
    check_new_run, create_run, step_rng, truncate_metrics, FitEvent, FitSummary, StepLog, StepStats, Trainer,
};
use runtime::metadata::Prediction;
use runtime::sampler::GuidanceInterval;
use teacher::{Kind, Teacher};

/// What `trainer distill` is asked.
#[derive(Debug, Clone)]
pub struct DistillOptions {
    /// The model to distil: an exported .onnx file or a run folder (None when resuming).
    pub teacher: Option<PathBuf>,
    /// A config whose [data] (and [train] seed, EMA, label dropout) the student uses; needed for an .onnx
    /// teacher, which names its data but cannot load it.
    pub config: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    pub force: bool,
    /// `progressive` or `consistency`.
    pub method: String,
    pub teacher_steps: usize,
    pub student_steps: usize,
    /// Optimiser steps over all stages.
    pub train_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub guidance_max: f32,
    /// The recommended guidance of the student (default: the teacher's recommended, else 2).
    pub guidance: Option<f32>,
    pub clip_teacher_x0: bool,
    pub checkpoint_every: usize,
    pub max_steps_now: Option<usize>,
    pub max_seconds: Option<f64>,
}

/// The student's configuration: the teacher's network and schedule with a guidance input and v-prediction, the
/// data of `base`, and the distillation's own optimisation settings.
fn student_config(opts: &DistillOptions, src: &teacher::Source, teacher: &Path) -> Result<Config> {
    if src.unet.guidance_embed && src.unet.prediction != Prediction::V {
        bail!("the teacher takes a guidance weight but does not predict v: not a student of trainer distill");
    }
    let mut cfg = match (&src.config, &opts.config) {
        (_, Some(p)) => Config::load(p)?,
        (Some(c), None) => c.clone(),
        (None, None) => bail!(
            "--config is needed with an .onnx teacher: the config it was trained with (its [data] names the images to distil on)"
        ),
    };
    if src.unet.learn_sigma {
        bail!("the teacher learns its variance (learned_range): distillation needs a fixed-variance model");
    }
    if !src.unet.attributes.is_empty() {
        bail!("the teacher has attributes beside its class: distilling their composed guidance is not supported");
    }
    let betas = cfg.diffusion.schedule()?.betas;
    if betas.len() != src.betas.len()
        || betas.iter().zip(&src.betas).any(|(a, b)| (a - b).abs() > 1e-9 * b.abs().max(1e-12))
    {
        bail!(
            "the config's diffusion schedule ({} {} steps) is not the teacher's ({} steps): use the config the teacher was trained with",
            format!("{:?}", cfg.diffusion.schedule).to_lowercase(),
            cfg.diffusion.timesteps,
            src.betas.len()
        );
    }
    let mut model = src.unet.clone();
    model.guidance_embed = model.num_classes > 0;
    model.dropout = 0.0;
    model.learn_sigma = false;
    model.prediction = Prediction::Epsilon;
    cfg.model = model;
    cfg.diffusion.prediction = Prediction::V;
    let t = &mut cfg.train;
    t.steps = opts.train_steps;
    t.batch_size = opts.batch_size;
    t.lr = opts.lr;
    t.warmup_steps = 0;
    t.lr_schedule = LrSchedule::Constant;
    t.checkpoint_every = opts.checkpoint_every;
    t.preview_every = 0;
    let rec = src.recommended.as_ref();
    let guidance = opts.guidance.or(rec.map(|r| r.guidance)).unwrap_or(2.0).min(opts.guidance_max);
    let d = DistillConfig {
        method: opts.method.clone(),
        teacher: teacher.display().to_string(),
        teacher_sha256: src.sha256.clone(),
        teacher_steps: opts.teacher_steps,
        student_steps: opts.student_steps,
        guidance_max: opts.guidance_max,
        guidance: if cfg.model.num_classes > 0 { guidance } else { 0.0 },
        guidance_interval: rec.and_then(|r| r.guidance_interval).map(|g| [g.lo, g.hi]),
        clip_teacher_x0: opts.clip_teacher_x0,
    };
    // every stage's checkpoints are kept (each is a student of its own step count)
    t.keep_checkpoints = t.keep_checkpoints.max(d.stages() + 2);
    cfg.distill = Some(d);
    cfg.validate()?;
    Ok(cfg)
}

/// The teacher of stage `s`: the original model (its file checked against the recorded hash), or the previous
/// stage's student from its teacher file.
fn stage_teacher(run: &Path, cfg: &Config, s: usize) -> Result<Teacher> {
    let d = cfg.distill.as_ref().context("not a distillation run")?;
    if s == 0 {
        let src = teacher::load(Path::new(&d.teacher))?;
        if src.sha256 != d.teacher_sha256 {
            bail!(
                "the teacher {} changed since this run started (sha256 {} then, {} now): resume with the same teacher",
                d.teacher,
                d.teacher_sha256,
                src.sha256
            );
        }
        // a student distilled further (a run of `trainer distill` as the teacher) takes w itself
        let kind = if src.unet.guidance_embed {
            Kind::Student
        } else {
            Kind::Original { interval: d.guidance_interval.map(|[lo, hi]| GuidanceInterval { lo, hi }) }
        };
        return Ok(Teacher::new(src.build()?, kind));
    }
    let file = teacher::stage_file(run, s);
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
        .with_context(|| format!("cannot read stage {s}'s teacher {}", file.display()))?;
    let mut src = crate::model::params::TensorSource::new(&tensors, file.display().to_string());
    let unet = crate::model::unet::UNet::new(cfg.unet(), &mut src)?;
    src.finish()?;
    Ok(Teacher::new(unet, Kind::Student))
}

/// One batch of a distillation step: noised images at timesteps of the stage's grid, their labels (dropped to
/// the null class with train.p_uncond) and guidance weights.
struct Batch {
    dims: [usize; 4],
    z: Vec<f32>,
    t: Vec<u32>,
    /// Progressive distillation: the teacher's midpoint t' between t and `next`.
    mid: Vec<u32>,
    /// The grid's next timestep after t (None: the end).
    next: Vec<Option<usize>>,
    y: Vec<u32>,
    w: Vec<f32>,
}

/// Draws step `tr.step`'s batch on the grid `g` (with `fine`, the grid of twice the points, for the midpoints).
fn draw_batch(tr: &mut Trainer, g: &[usize], fine: Option<&[usize]>, rng: &mut rand_chacha::ChaCha8Rng) -> Batch {
    let d = tr.cfg.distill.as_ref().expect("a distillation run");
    let idx = tr.order.batch(tr.step, tr.cfg.train.batch_size);
    let (c, sz, n) = (tr.data.channels, tr.data.size, tr.data.image_len());
    let null = tr.cfg.model.null_class().map(|v| v as u32).unwrap_or(0);
    let mut b =
        Batch { dims: [idx.len(), c, sz, sz], z: vec![], t: vec![], mid: vec![], next: vec![], y: vec![], w: vec![] };
    for &i in &idx {
        let mut x0 = tr.data.image_f32(i);
        tr.cfg.data.augment.apply(&mut x0, c, sz, rng);
        let j = rng.gen_range(0..g.len());
        let eps: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
        b.z.extend(tr.schedule.q_sample(&x0, g[j], &eps));
        b.t.push(g[j] as u32);
        if let Some(f) = fine {
            b.mid.push(f[2 * j + 1] as u32);
        }
        b.next.push(g.get(j + 1).copied());
        let drop = rng.gen::<f64>() < tr.cfg.train.p_uncond;
        b.y.push(match &tr.data.labels {
            Some(l) if !drop => l[i],
            _ => null,
        });
        b.w.push(rng.gen::<f32>() * d.guidance_max);
    }
    b
}

/// One DDIM step of every image of `z` from its `from` to its `to` with the (guided) teacher.
fn teacher_step(
    teacher: &mut Teacher,
    sched: &runtime::schedule::NoiseSchedule,
    b: &Batch,
    z: &[f32],
    from: &[u32],
    to: &[Option<usize>],
    clip: bool,
) -> Result<Vec<f32>> {
    let null = teacher.unet.cfg.null_class().map(|v| v as u32).unwrap_or(0);
    let e = teacher.guided_eps(sched, z, b.dims, from, &b.y, &b.w, null)?;
    let n = z.len() / b.dims[0];
    let mut out = Vec::with_capacity(z.len());
    for i in 0..b.dims[0] {
        let r = i * n..(i + 1) * n;
        out.extend(targets::ddim(sched, &z[r.clone()], &e[r], from[i] as usize, to[i], clip));
    }
    Ok(out)
}

/// Progressive distillation's target (Salimans & Ho 2022, Algorithm 2): two teacher steps t -> t' -> t'', and the
/// x whose one DDIM step from z_t lands where they did.
fn pd_targets(
    teacher: &mut Teacher,
    sched: &runtime::schedule::NoiseSchedule,
    b: &Batch,
    clip: bool,
) -> Result<Vec<f32>> {
    let mid: Vec<Option<usize>> = b.mid.iter().map(|&v| Some(v as usize)).collect();
    let z1 = teacher_step(teacher, sched, b, &b.z, &b.t, &mid, clip)?;
    let z2 = teacher_step(teacher, sched, b, &z1, &b.mid, &b.next, clip)?;
    let n = b.z.len() / b.dims[0];
    let mut x = Vec::with_capacity(b.z.len());
    for i in 0..b.dims[0] {
        let r = i * n..(i + 1) * n;
        x.extend(targets::pd_target(sched, &b.z[r.clone()], b.t[i] as usize, &z2[r], b.next[i]));
    }
    Ok(x)
}

/// Consistency distillation's target (Song et al. 2023, Algorithm 2, with the guided teacher of LCM, Luo et al.
/// 2023): one teacher DDIM step t -> s, then the student's own x0 there with its gradient stopped (theta^- =
/// theta, as Geng et al. 2024); at the end (s = none) the teacher's x0 itself, the boundary condition.
fn cd_targets(
    teacher: &mut Teacher,
    tr: &mut Trainer,
    pool: &mut crate::model::tape::Pool,
    b: &Batch,
    clip: bool,
) -> Result<Vec<f32>> {
    let sched = tr.schedule.clone();
    let zs = teacher_step(teacher, &sched, b, &b.z, &b.t, &b.next, clip)?;
    let inner: Vec<usize> = (0..b.dims[0]).filter(|&i| b.next[i].is_some()).collect();
    let mut x = zs.clone();
    if inner.is_empty() {
        return Ok(x);
    }
    let n = b.z.len() / b.dims[0];
    let pick = |v: &[f32]| -> Vec<f32> { inner.iter().flat_map(|&i| v[i * n..(i + 1) * n].to_vec()).collect() };
    let s: Vec<f32> = inner.iter().map(|&i| b.next[i].unwrap() as f32).collect();
    let y: Vec<f32> = inner.iter().map(|&i| b.y[i] as f32).collect();
    let w: Vec<f32> = inner.iter().map(|&i| b.w[i]).collect();
    let k = inner.len();
    let v = {
        let mut tape = Tape::new(pool, None);
        let xs = tape.input(&pick(&zs), &[k, b.dims[1], b.dims[2], b.dims[3]])?;
        let ts = tape.input(&s, &[k])?;
        let ys = if tr.unet.cfg.num_classes > 0 { Some(tape.input(&y, &[k])?) } else { None };
        let ws = if tr.unet.cfg.guidance_embed { Some(tape.input(&w, &[k])?) } else { None };
        let out = tr.unet.forward_w(&mut tape, &xs, &ts, ys.as_ref(), ws.as_ref())?;
        tape.data(out).to_vec()
    };
    for (j, &i) in inner.iter().enumerate() {
        let (a, sg) = targets::alpha_sigma(&sched, b.next[i]);
        for (p, (&z, &v)) in
            x[i * n..(i + 1) * n].iter_mut().zip(zs[i * n..(i + 1) * n].iter().zip(&v[j * n..(j + 1) * n]))
        {
            *p = (a * z as f64 - sg * v as f64) as f32;
        }
    }
    Ok(x)
}

/// One distillation step of stage `s`: a batch on the stage's grid, the teacher's target, the student's loss and
/// update. `pool` holds the buffers of the student's stop-gradient pass (consistency distillation).
fn distill_step(
    tr: &mut Trainer,
    teacher: &mut Teacher,
    pool: &mut crate::model::tape::Pool,
    s: usize,
) -> Result<StepStats> {
    let d = tr.cfg.distill.clone().context("not a distillation run")?;
    let total = tr.cfg.train.steps;
    let mut rng = step_rng(tr.cfg.train.seed, tr.step);
    let sched = tr.schedule.clone();
    let big_t = sched.num_timesteps();
    let b = if d.consistency() {
        let g = targets::grid(big_t, d.teacher_steps);
        profile::timed("batch: data, augmentation, noise", || draw_batch(tr, &g, None, &mut rng))
    } else {
        let k = d.teacher_steps >> (s + 1);
        let (g, fine) = (targets::grid(big_t, k), targets::grid(big_t, 2 * k));
        profile::timed("batch: data, augmentation, noise", || draw_batch(tr, &g, Some(&fine), &mut rng))
    };
    let x_target = profile::timed("teacher: targets", || {
        if d.consistency() {
            cd_targets(teacher, tr, pool, &b, d.clip_teacher_x0)
        } else {
            pd_targets(teacher, &sched, &b, d.clip_teacher_x0)
        }
    })?;
    // the student, on the training tape
    let bs = b.dims[0];
    let (loss, grads) = {
        let mut dropout = DropoutKeys::new(StepKeys::new(tr.cfg.train.seed, tr.step), 0);
        let mut tape = Tape::new(&mut tr.pool, Some(&mut dropout));
        let xs = tape.input(&b.z, &b.dims)?;
        let ts = tape.input(&b.t.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[bs])?;
        let cond = tr.unet.cfg.num_classes > 0;
        let ys = if cond { Some(tape.input(&b.y.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[bs])?) } else { None };
        let ws = if tr.unet.cfg.guidance_embed { Some(tape.input(&b.w, &[bs])?) } else { None };
        let out = tr.unet.forward_w(&mut tape, &xs, &ts, ys.as_ref(), ws.as_ref())?;
        let o = if d.consistency() {
            // the pseudo-Huber constant of Song & Dhariwal 2023: 0.00054 sqrt(d)
            let c = 0.00054 * ((b.z.len() / bs) as f64).sqrt();
            targets::cd_objective(&sched, tape.data(out), &b.z, &b.t, &x_target, c)
        } else {
            targets::pd_objective(&sched, tape.data(out), &b.z, &b.t, &x_target)
        };
        (o.loss, tape.backward(out, o.grad)?)
    };
    // the learning rate falls linearly to 0 over each stage (Salimans & Ho 2022, appendix E)
    let (start, end) = (d.stage_start(s, total), d.stage_start(s + 1, total));
    let lr = tr.cfg.train.lr * (1.0 - (tr.step - start) as f64 / (end - start).max(1) as f64);
    let clip = tr.cfg.train.grad_clip;
    let norm = profile::timed("optimiser: clip, AdamW", || {
        if loss.is_finite() {
            tr.opt.step_host(grads, lr, clip)
        } else {
            Ok(f64::NAN)
        }
    })?;
    tr.finish_step(loss, norm, lr)
}

/// Starts stage `s` at the current step: the previous stage's student (EMA weights) becomes the teacher (written
/// once; a resumed run reads the same file), and the EMA restarts from the current weights.
fn begin_stage(tr: &mut Trainer, run: &Path, s: usize) -> Result<()> {
    if s > 0 {
        let file = teacher::stage_file(run, s);
        if !file.exists() {
            std::fs::create_dir_all(file.parent().unwrap())?;
            let tmp = file.with_extension("tmp");
            let map: HashMap<String, Tensor> = tr.ema.as_map();
            candle_core::safetensors::save(&map, &tmp)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &file)?;
        }
    }
    for (k, v) in tr.ema.tensors.iter_mut() {
        *v = tr.vars[k].as_tensor().copy()?.detach();
    }
    tr.ema.updates = 0;
    Ok(())
}

/// The student's trainer: a resumed run from its latest checkpoint (with the checkpoint's folder), or a new run
/// initialised from the teacher (plus a zero guidance embedding).
fn open_run(opts: &DistillOptions, on: &mut dyn FnMut(FitEvent)) -> Result<(Trainer, Option<PathBuf>)> {
    let run = &opts.out;
    let device = Device::Cpu;
    if opts.resume {
        let ck = checkpoint::load_which(run, "latest", &device, true)?;
        for w in &ck.passed_over {
            on(FitEvent::Warning(&format!("passed over an unreadable checkpoint: {w}")));
        }
        let cfg = ck.state.config.clone();
        let d = cfg
            .distill
            .clone()
            .with_context(|| format!("{} is not a distillation run (use trainer fit --resume)", run.display()))?;
        let dir = ck.dir.clone();
        let data = crate::data::load(&cfg.data, cfg.model.image_size)?;
        let mut t = Trainer::from_checkpoint(ck, cfg, data, device.clone())?;
        // the EMA restarts with every stage
        t.ema.updates = t.step - d.stage_start(d.stage_of(t.step, t.cfg.train.steps), t.cfg.train.steps);
        truncate_metrics(&run.join("metrics.csv"), t.step)?;
        return Ok((t, Some(dir)));
    }
    let tpath = opts.teacher.as_ref().context("--teacher is needed for a new distillation")?;
    let src = teacher::load(tpath)?;
    let cfg = student_config(opts, &src, tpath)?;
    check_new_run(run, opts.force)?;
    let data = crate::data::load(&cfg.data, cfg.model.image_size)?;
    let mut tensors = src.tensors;
    if cfg.model.guidance_embed && !src.unet.guidance_embed {
        add_guidance_layer(&mut tensors, cfg.model.ch, &device)?;
    }
    create_run(run, &cfg)?;
    Ok((Trainer::from_tensors(cfg, data, device, &tensors, &tpath.display().to_string())?, None))
}

/// The student's guidance layer `wemb` (ch -> ch), zero-initialised, so that the student starts as its teacher
/// whatever its guidance input.
pub(crate) fn add_guidance_layer(tensors: &mut HashMap<String, Tensor>, ch: usize, device: &Device) -> Result<()> {
    tensors.insert("wemb.weight".into(), Tensor::zeros((ch, ch), DType::F32, device)?);
    tensors.insert("wemb.bias".into(), Tensor::zeros(ch, DType::F32, device)?);
    Ok(())
}

/// Distils a teacher into a new run (or continues one, `opts.resume`): checkpoints every `checkpoint_every`
/// steps, at every stage's end and at the end, one metrics.csv row per step, and the loss curve.
pub fn distill(opts: &DistillOptions, on: &mut dyn FnMut(FitEvent)) -> Result<FitSummary> {
    let run = &opts.out;
    let (mut tr, resumed_from) = open_run(opts, on)?;
    let d = tr.cfg.distill.clone().context("not a distillation run")?;
    let total = tr.cfg.train.steps;
    on(FitEvent::Started {
        resumed_from: resumed_from.as_deref(),
        step: tr.step,
        total,
        data: &tr.data,
        num_params: tr.vars.values().map(|v| v.elem_count()).sum(),
    });
    let stop = opts.max_steps_now.map(|n| (tr.step + n).min(total)).unwrap_or(total);
    let mut log = StepLog::open(run, &tr)?;
    let every = tr.cfg.train.checkpoint_every;
    let mut current: Option<(usize, Teacher)> = None;
    let mut target_pool = crate::model::tape::Pool::default();
    while tr.step < stop {
        if opts.max_seconds.is_some_and(|m| tr.elapsed_s >= m) {
            break;
        }
        let s = d.stage_of(tr.step, total);
        if tr.step == d.stage_start(s, total) && current.as_ref().is_none_or(|(cs, _)| *cs != s) {
            begin_stage(&mut tr, run, s)?;
        }
        if current.as_ref().is_none_or(|(cs, _)| *cs != s) {
            let k = d.teacher_steps >> s;
            on(FitEvent::Note(&if d.consistency() {
                format!("consistency distillation on the teacher's {}-step grid, steps 0..{total}", d.teacher_steps)
            } else {
                format!(
                    "stage {} of {}: {k} teacher steps -> {} student steps, steps {}..{}",
                    s + 1,
                    d.stages(),
                    k / 2,
                    d.stage_start(s, total),
                    d.stage_start(s + 1, total)
                )
            }));
            current = Some((s, stage_teacher(run, &tr.cfg, s)?));
        }
        let teacher = &mut current.as_mut().expect("a teacher for this stage").1;
        let st = distill_step(&mut tr, teacher, &mut target_pool, s)?;
        log.record(&mut tr, &st)?;
        let (step, elapsed) = (tr.step, tr.elapsed_s);
        on(FitEvent::Step { step, total, stats: &st, elapsed_s: elapsed });
        let stage_end = d.stage_of(step, total) != s || step == total;
        if (step % every == 0 || stage_end) && step < stop {
            log.flush()?;
            tr.save_checkpoint(run, crate::train::DeviceSpec::Cpu)?;
        }
    }
    log.flush()?;
    let checkpoint = tr.save_checkpoint(run, crate::train::DeviceSpec::Cpu)?;
    let loss_curve = log.loss_curve("distillation loss")?;
    Ok(FitSummary { step: tr.step, total, recent_loss: tr.recent_loss, checkpoint, loss_curve })
}
