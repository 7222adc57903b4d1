//! `trainer export`: a run's model as a self-describing ONNX file, and its model card.

use std::path::PathBuf;

use anyhow::Result;
use runtime::metadata::{Dtype, Recommended, Weights};
use runtime::sampler::{GuidanceInterval, SamplerKind};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["run", "model"])))]
pub struct ExportArgs {
    /// Run folder.
    #[arg(long)]
    run: Option<PathBuf>,
    /// Instead of a run: an exported model whose recommended sampling (--sampler, --steps, --guidance,
    /// --guidance-interval) is replaced, graph and weights kept; with --card, the card beside OUT (or beside
    /// MODEL) gets the new hash and recommendation. OUT may be MODEL itself, with --force.
    #[arg(long, requires = "sampler", conflicts_with_all = ["checkpoint", "weights", "dtype", "opset"])]
    model: Option<PathBuf>,
    /// `latest` or a step number.
    #[arg(long, default_value = "latest")]
    checkpoint: String,
    /// Which weights: the EMA (what DDPM samples from) or the optimiser's.
    #[arg(long, value_enum, default_value_t = Weights::Ema)]
    weights: Weights,
    /// Export an EMA of this decay rebuilt after training from the run's checkpoints (up to --checkpoint), as
    /// `trainer eval --post-hoc-ema` measures it; the metadata and card name this decay.
    #[arg(long, value_name = "DECAY", conflicts_with = "weights")]
    post_hoc_ema: Option<f64>,
    /// The model's float type (in float16, GroupNorm statistics and softmax stay float32).
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
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
    #[arg(long, value_enum, requires_all = ["steps", "guidance"])]
    sampler: Option<SamplerKind>,
    /// Recommended sampling steps (with --sampler).
    #[arg(long, requires = "sampler")]
    steps: Option<usize>,
    /// Recommended guidance weight (with --sampler).
    #[arg(long, requires = "sampler")]
    guidance: Option<f32>,
    /// Recommended guidance interval LO,HI: guidance only at these timesteps (with --sampler).
    #[arg(long, value_name = "LO,HI", requires = "sampler")]
    guidance_interval: Option<GuidanceInterval>,
}

pub fn run_export(a: ExportArgs) -> Result<()> {
    let recommended = match (a.sampler, a.steps, a.guidance) {
        (Some(sampler), Some(steps), Some(guidance)) => {
            Some(Recommended { sampler, steps, guidance, guidance_interval: a.guidance_interval })
        }
        _ => None,
    };
    if let (Some(model), Some(recommended)) = (&a.model, &recommended) {
        let opts = trainer::onnx::RecommendOptions {
            model,
            out: &a.out,
            force: a.force,
            card: a.card,
            recommended: recommended.clone(),
        };
        let done = trainer::onnx::recommend(&opts)?;
        if let Some(p) = &done.card {
            eprintln!("wrote {}", p.display());
        }
        eprintln!("wrote {} ({:.1} MB, recommended sampling replaced)", a.out.display(), done.bytes as f64 / 1e6);
        return Ok(());
    }
    let opts = trainer::onnx::ExportOptions {
        run: a.run.as_deref().expect("clap requires --run or --model"),
        checkpoint: &a.checkpoint,
        weights: a.weights,
        post_hoc_ema: a.post_hoc_ema,
        dtype: a.dtype,
        opset: a.opset,
        out: &a.out,
        force: a.force,
        card: a.card,
        recommended,
    };
    let done = trainer::onnx::export(&opts)?;
    for w in &done.passed_over {
        eprintln!("warning: passed over an unreadable checkpoint: {w}");
    }
    if let Some(p) = &done.card {
        eprintln!("wrote {}", p.display());
    }
    eprintln!(
        "wrote {} ({:.1} MB, {}, opset {}, {} weights of step {})",
        a.out.display(),
        done.bytes as f64 / 1e6,
        a.dtype,
        a.opset,
        a.weights,
        done.step
    );
    Ok(())
}
