//! `trainer distill`: a few-step student of a trained model (progressive distillation, guidance as an input).

use std::path::PathBuf;

use anyhow::{Context, Result};
use trainer::distill::{distill, DistillOptions};
use trainer::train::DeviceSpec;

#[derive(clap::Args)]
pub struct DistillArgs {
    /// The model to distil: an exported .onnx file of this trainer (with --config) or a run folder (its newest
    /// checkpoint's EMA weights).
    #[arg(long, required_unless_present = "resume")]
    teacher: Option<PathBuf>,
    /// The config the teacher was trained with: its [data] is what the student learns on. Needed with an .onnx
    /// teacher; a run folder brings its own.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run folder of the student (checkpoints, metrics, loss curve); `trainer export --run` writes its ONNX file.
    #[arg(long, value_name = "RUN_DIR", default_value = "runs/distill")]
    out: PathBuf,
    /// Continue the distillation in this folder from its latest checkpoint.
    #[arg(long, value_name = "RUN", conflicts_with_all = ["out", "teacher", "config"])]
    resume: Option<PathBuf>,
    /// Replace an existing run folder.
    #[arg(long)]
    force: bool,
    /// progressive (Salimans & Ho 2022: halvings of the teacher's DDIM steps) or consistency (Song et al. 2023:
    /// one stage on the teacher's grid; the student then samples in any number of steps that divides it).
    #[arg(long, default_value = "progressive", value_parser = ["progressive", "consistency"])]
    method: String,
    /// Steps the student samples in (one model call each); a consistency student's recommended steps.
    #[arg(long = "steps", default_value_t = 2)]
    student_steps: usize,
    /// DDIM steps of the teacher: the first halving's (a power of two times --steps), or the consistency grid (a
    /// multiple of --steps).
    #[arg(long, default_value_t = 8)]
    teacher_steps: usize,
    /// Optimiser steps over all the stages (each halving gets an equal share).
    #[arg(long, default_value_t = 3000)]
    train_steps: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Learning rate at the start of each stage, falling linearly to 0 over it.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Guidance weights are drawn from U[0, this] per image: the student serves any w in that range.
    #[arg(long, default_value_t = 4.0)]
    guidance_max: f32,
    /// The guidance weight the exported student recommends (default: the teacher's recommended, else 2).
    #[arg(long)]
    guidance: Option<f32>,
    /// Clip the teacher's predicted x0 to [-1, 1] in its DDIM steps.
    #[arg(long)]
    clip_teacher_x0: bool,
    /// Checkpoint every N steps (and at every stage's end).
    #[arg(long, default_value_t = 250)]
    checkpoint_every: usize,
    /// Stop after N steps of this invocation, checkpointing (the run can be resumed).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Stop once the distillation has run this many minutes in all (resumed runs count their earlier time).
    #[arg(long, value_name = "MINUTES")]
    max_minutes: Option<f64>,
    /// No progress bar or log lines.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run_distill(a: DistillArgs) -> Result<()> {
    let opts = DistillOptions {
        teacher: a.teacher.clone(),
        config: a.config.clone(),
        out: a.resume.clone().unwrap_or(a.out.clone()),
        resume: a.resume.is_some(),
        force: a.force,
        method: a.method.clone(),
        teacher_steps: a.teacher_steps,
        student_steps: a.student_steps,
        train_steps: a.train_steps,
        batch_size: a.batch_size,
        lr: a.lr,
        guidance_max: a.guidance_max,
        guidance: a.guidance,
        clip_teacher_x0: a.clip_teacher_x0,
        checkpoint_every: a.checkpoint_every,
        max_steps_now: a.stop_after,
        max_seconds: a.max_minutes.map(|m| m * 60.0),
    };
    let pb = super::fit::progress_bar(a.quiet);
    let summary = distill(&opts, &mut |event| super::fit::report(event, &opts.out, DeviceSpec::Cpu, &pb, a.quiet));
    pb.finish_and_clear();
    let summary = summary.with_context(|| format!("trainer distill ({})", opts.out.display()))?;
    if !a.quiet {
        eprintln!("{}", super::fit::summary_line(&summary));
    }
    Ok(())
}
