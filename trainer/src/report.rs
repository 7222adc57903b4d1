//! What `trainer eval` measured, as RUN/eval.json holds it: the report types alone, below both the evaluation
//! that writes them (`eval`) and the model card that reads them (`onnx::card`).

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The classifier score of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub class: String,
    /// Samples asked for this class.
    pub n: usize,
    /// The fraction of them the classifier recognises as this class.
    pub score: f64,
}

/// FID of the samples asked for one class against the real images of that class, in one feature space, beside
/// the class's own real-vs-real floor (its training images against the same real images). Few images per class
/// bias FID upwards, the floor as much: read the two together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassFid {
    pub class: String,
    /// "classifier" or "inception".
    pub space: String,
    /// Samples asked for the class, and the reference (test) images of it.
    pub samples: usize,
    pub real: usize,
    pub fid: f64,
    pub floor: f64,
}

/// What `trainer eval` measured: RUN/eval.json, and what the model card reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub run: String,
    /// The exported model sampled (None: the run's Candle weights).
    pub model: Option<String>,
    /// The weights sampled when not the checkpoint's EMA (`--post-hoc-ema`: an EMA rebuilt after training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    pub step: usize,
    pub samples: usize,
    /// e.g. "dpm++ 20 steps, trailing".
    pub sampler: String,
    pub guidance: f32,
    /// "data" when the samples were asked for the classes of the real reference images (not each in turn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_mix: Option<String>,
    /// The timesteps guidance was applied at, when limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_interval: Option<String>,
    /// The evaluation classifier (None for an unlabelled dataset, or without it in --features).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_onnx: Option<String>,
    /// The evaluation classifier's accuracy on the real test split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_test_accuracy: Option<f64>,
    /// The fraction of samples classified as the class asked for (conditional models).
    pub classifier_score: Option<f64>,
    pub classifier_score_per_class: Vec<ClassScore>,
    /// Real images in each FID set (train and test).
    pub fid_images: usize,
    /// FID in the classifier's 128-d feature space, and its real-vs-real (train vs test) floor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid_classifier_features: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid_floor_train_vs_test: Option<f64>,
    /// FID in Inception-v3's pool3 space and its floor, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid_inception: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid_inception_floor: Option<f64>,
    /// Each class's FID in every feature space (conditional models on labelled data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fid_per_class: Vec<ClassFid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep_csv: Option<String>,
    /// The memorisation check (`--nearest K`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nearest: Option<NearestReport>,
    /// The variational bound on the test set's negative log-likelihood (`--nll N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nll: Option<NllReport>,
    /// The classifier two-sample test (`--c2st`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c2st: Option<C2stReport>,
    /// The compositional-generalisation report (`--composition N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub composition: Option<CompositionReport>,
}

/// The classifier two-sample test (Lopez-Paz & Oquab 2017): a small CNN trained on half of each set to tell
/// real test images from samples, its accuracy on the other halves (50% = indistinguishable), and the same for
/// real training images against the real test images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct C2stReport {
    /// Images of each set (half trained on, half tested).
    pub images: usize,
    pub accuracy: f64,
    pub real_vs_real: f64,
}

/// The negative log-likelihood bound of test images in bits per dimension (Ho et al. 2020, sec. 4.2; Nichol &
/// Dhariwal 2021, table 1): every term of the bound over all T timesteps, one draw of x_t each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NllReport {
    pub images: usize,
    pub bits_per_dim: f64,
    /// The standard error of the mean over the images.
    pub stderr: f64,
    /// The decoder's term at t = 0 and the prior term L_T (means over the images).
    pub decoder_bits_per_dim: f64,
    pub prior_bits_per_dim: f64,
    /// The variance the bound was computed with (the model's).
    pub variance: String,
    /// What the model was conditioned on: "null class" (p(x) of a guided model), or "unconditional".
    pub conditioning: String,
}

impl EvalReport {
    /// RUN/eval.json if `trainer eval` wrote one; a file that does not parse is an error naming it.
    pub fn read(run: &Path) -> Result<Option<Self>> {
        let p = run.join("eval.json");
        match std::fs::read(&p) {
            Ok(b) => {
                Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{} is not an eval report", p.display()))?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot read {}", p.display()))),
        }
    }
}

/// One (class, position) pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub class: String,
    pub position: String,
    /// Whether training never showed this class at this position.
    pub held_out: bool,
    pub n: usize,
    /// Fractions of the samples whose ink sits in the asked quadrant; whose crop there is the asked class;
    /// both.
    pub at_position: f64,
    pub class_ok: f64,
    pub both: f64,
}

/// `trainer eval --composition N`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompositionReport {
    /// Samples per pair, and the class's guidance weight (reports older than `label_guidance` used it for
    /// every label).
    pub per_pair: usize,
    pub guidance: f32,
    /// The guidance weight of every label: the class, then the model's attributes.
    #[serde(default)]
    pub label_guidance: Vec<LabelWeight>,
    pub held_out_class: String,
    /// `both` of the held-out class at its held-out positions, at its trained positions, and of every other
    /// class at every position.
    pub held_out_pairs: f64,
    pub held_out_class_seen_pairs: f64,
    pub other_pairs: f64,
    pub cells: Vec<Cell>,
}

/// A label's guidance weight (`"class"` or an attribute's name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelWeight {
    pub label: String,
    pub guidance: f32,
}

/// Distances (L2) to the nearest training image: of the samples, and of as many real test images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distances {
    pub samples_min: f64,
    pub samples_p05: f64,
    pub samples_median: f64,
    pub test_min: f64,
    pub test_p05: f64,
    pub test_median: f64,
}

/// What `trainer eval --nearest K` adds to the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NearestReport {
    /// Neighbours shown per sample in the grid.
    pub k: usize,
    /// Samples (and test images) whose distances were measured.
    pub n: usize,
    /// In pixel space ([-1, 1] images).
    pub pixel: Distances,
    /// In the evaluation classifier's 128-d features.
    pub features: Distances,
    /// The grid: per row a sample, its k nearest training images in pixels, then in features.
    pub grid: String,
}
