//! One `trainer eval`: a session that holds the run, its data and the feature spaces, with one function a section
//! of the report (the main sampler setting, the two-sample test, nearest neighbours, sweeps, composition, the
//! likelihood bound).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use runtime::metadata::Weights;
use runtime::onnx::OrtDenoiser;
use runtime::sampler::{sample, Denoiser, Method, Spacing};

use super::classifier::{classifier_for, features, Classifier};
use super::fid::{fid_features, subset};
use super::sweeps::write_sweeps;
use super::{
    c2st, compose, nearest, quantize, ClassMix, ClassifierFeatures, EvalOptions, FeatureExtractor, Outcome, Space,
};
use crate::data::Dataset;
use crate::model::unet::UNet;
use crate::progress::Progress;
use crate::report::{C2stReport, ClassFid, ClassScore, EvalReport, LabelWeight, NllReport};
use crate::train::checkpoint::{LoadedUnet, State};
use crate::train::config::Config;
use crate::train::post_hoc;

/// The model the evaluation samples: the exported file through ONNX Runtime (what ships), or the run's Candle
/// weights. The one place that chooses.
struct Model {
    unet: UNet,
    onnx: Option<OrtDenoiser>,
    dev: Device,
}

impl Model {
    fn with_denoiser<R>(&mut self, f: impl FnOnce(&mut dyn Denoiser) -> R) -> R {
        match self.onnx.as_mut() {
            Some(den) => f(den),
            None => f(&mut crate::denoise::CandleDenoiser::new(&self.unet, &self.dev)),
        }
    }
}

/// The real images the FIDs and the two-sample test compare against: m test images and m training images (a
/// set without a test split is cut into two disjoint halves), with the names their cached features go by.
struct References {
    m: usize,
    test_x: Vec<f32>,
    train_x: Vec<f32>,
    /// Their classes (labelled data).
    test_labels: Option<Vec<u32>>,
    train_labels: Option<Vec<u32>>,
    names: (&'static str, &'static str),
}

/// Everything a report section needs.
struct Session<'a> {
    o: &'a EvalOptions,
    progress: &'a dyn Progress,
    state: &'a State,
    train: &'a Dataset,
    test: &'a Dataset,
    clf: Option<&'a (Classifier, PathBuf)>,
    refs: References,
    spaces: Vec<Space<'a>>,
    shape: [usize; 3],
    /// The weights sampled when not the checkpoint's EMA (`--post-hoc-ema`).
    weights: Option<String>,
}

/// Classifier accuracy, classifier score (fraction of samples classified as the requested class, per class
/// and overall), FID in the classifier's feature space (and Inception-v3's with `inception`) with their
/// real-vs-real floors; optional sweeps over guidance and DDIM steps. Writes RUN/eval.json, and for sweeps
/// RUN/sweep.csv with RUN/sweep-{guidance,steps}-{score,fid}.png.
pub fn evaluate(o: &EvalOptions, progress: &dyn Progress) -> Result<EvalReport> {
    let dev = o.device.clone();
    if o.post_hoc_ema.is_some() && o.model.is_some() {
        bail!("--post-hoc-ema rebuilds the run's weights, --model samples an exported file: give one of them");
    }
    let (LoadedUnet { unet, state, passed_over }, weights) =
        post_hoc::load_unet(&o.run, &o.checkpoint, Weights::Ema, o.post_hoc_ema, &dev)?;
    if let Some(what) = &weights {
        progress.note(&format!("weights: {what}"));
    }
    for w in &passed_over {
        progress.note(&format!("warning: passed over an unreadable checkpoint: {w}"));
    }
    check_options(o, &state.config)?;
    let label_weights = compose::label_weights(&state.config.model, o.guidance, &o.attribute_guidance)?;
    let (train, test) = load_data(o, &state.config, progress)?;
    // a model or weights that cannot be used stop the evaluation before any long work
    let onnx = o.model.as_deref().map(|p| open_model(p, &state, &dev)).transpose()?;
    let mut model = Model { unet, onnx, dev };
    let inception = match &o.inception {
        Some(p) => Some(super::inception::InceptionV3::load(p, &model.dev).with_context(|| {
            format!("cannot load the Inception weights {} (scripts/fetch-data.sh inception fetches them)", p.display())
        })?),
        None => None,
    };
    let labelled = train.labels.is_some() && test.labels.is_some();
    let clf =
        if labelled && o.classifier { Some(classifier_for(&train, &o.cache, &model.dev, progress)?) } else { None };
    let shape = [train.channels, train.size, train.size];
    let accuracy = test_accuracy(clf.as_ref(), &test, shape, &model.dev)?;
    let refs = References::new(o, &train, &test)?;
    let mut extractors: Vec<Box<dyn FeatureExtractor + '_>> = vec![];
    if let Some((clf, _)) = &clf {
        extractors.push(Box::new(ClassifierFeatures(clf, model.dev.clone())));
    }
    if let Some(inc) = inception {
        extractors.push(Box::new(inc));
    }
    let mut s = Session {
        o,
        progress,
        state: &state,
        train: &train,
        test: &test,
        clf: clf.as_ref(),
        refs,
        spaces: vec![],
        shape,
        weights,
    };
    s.spaces = s.feature_spaces(extractors)?;
    let report = s.report(&mut model, accuracy, &label_weights)?;
    crate::train::checkpoint::write_atomic(
        &o.run.join("eval.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

/// The options checked against the run before any work.
fn check_options(o: &EvalOptions, cfg: &Config) -> Result<()> {
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
    Ok(())
}

/// The run's training set and its test split, and what an unlabelled set can be judged by.
fn load_data(o: &EvalOptions, cfg: &Config, progress: &dyn Progress) -> Result<(Dataset, Dataset)> {
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
    Ok((train, test))
}

/// The images of `ds` at `idx`, [n, c, h, w] in [-1, 1].
fn real(ds: &Dataset, idx: &[usize]) -> Vec<f32> {
    idx.iter().flat_map(|i| ds.image_f32(*i)).collect()
}

/// The evaluation classifier's accuracy on the whole test split.
fn test_accuracy(
    clf: Option<&(Classifier, PathBuf)>,
    test: &Dataset,
    shape: [usize; 3],
    dev: &Device,
) -> Result<Option<f64>> {
    match (clf, &test.labels) {
        (Some((clf, _)), Some(tl)) => {
            let all: Vec<usize> = (0..test.len).collect();
            let (_, test_p) = features(clf, &real(test, &all), shape, dev)?;
            Ok(Some(test_p.iter().zip(tl).filter(|(p, l)| p == l).count() as f64 / test.len as f64))
        }
        _ => Ok(None),
    }
}

impl References {
    /// n test images; the floor: n training images against them. A set without a test split (a folder) is cut
    /// in two halves instead, so that the floor compares disjoint images.
    fn new(o: &EvalOptions, train: &Dataset, test: &Dataset) -> Result<Self> {
        let seed = o.sample.seed;
        let (m, test_idx, train_idx, names) = if test.fingerprint == train.fingerprint {
            let m = o.n.min(train.len / 2);
            let both = subset(train.len, 2 * m, seed ^ 1);
            (m, both[..m].to_vec(), both[m..].to_vec(), ("half-a", "half-b"))
        } else {
            let m = o.n.min(test.len);
            (m, subset(test.len, m, seed ^ 1), subset(train.len, m, seed ^ 2), ("test", "train"))
        };
        if m < 2 {
            bail!("{}: too few images for FID reference statistics", train.description);
        }
        let labels = |ds: &Dataset, idx: &[usize]| ds.labels.as_ref().map(|l| idx.iter().map(|&i| l[i]).collect());
        Ok(Self {
            m,
            test_x: real(test, &test_idx),
            train_x: real(train, &train_idx),
            test_labels: labels(test, &test_idx),
            train_labels: labels(train, &train_idx),
            names,
        })
    }
}

impl<'a> Session<'a> {
    /// Each extractor with the features of the reference test images and its real-vs-real floor.
    fn feature_spaces(&self, extractors: Vec<Box<dyn FeatureExtractor + 'a>>) -> Result<Vec<Space<'a>>> {
        let (o, refs) = (self.o, &self.refs);
        let mut spaces = vec![];
        for ext in extractors {
            self.progress.begin("real-image features", 0);
            let test_f =
                self.real_features(&*ext, &refs.test_x, refs.names.0, &self.test.fingerprint, o.sample.seed ^ 1)?;
            let train_f =
                self.real_features(&*ext, &refs.train_x, refs.names.1, &self.train.fingerprint, o.sample.seed ^ 2)?;
            let floor = fid_features(&train_f, &test_f);
            self.progress.end();
            spaces.push(Space { ext, test: test_f, train: train_f, floor });
        }
        Ok(spaces)
    }

    /// Features of real images, from the cache when the extractor is worth caching: the same images (dataset
    /// fingerprint, split, count, subset seed) give the same features.
    fn real_features(
        &self,
        ext: &dyn FeatureExtractor,
        x: &[f32],
        split: &str,
        fp: &str,
        seed: u64,
    ) -> Result<Vec<Vec<f64>>> {
        if !ext.cacheable() {
            return ext.features(x, self.shape, self.progress);
        }
        let cache = &self.o.cache;
        let path = cache.join(format!("{}-{fp}-{split}-n{}-s{seed}.safetensors", ext.name(), self.refs.m));
        if let Ok(t) = candle_core::safetensors::load(&path, &Device::Cpu) {
            if let Some(f) = t.get("features") {
                return Ok(f.to_dtype(DType::F64)?.to_vec2()?);
            }
        }
        let f = ext.features(x, self.shape, self.progress)?;
        let rows: Vec<f32> = f.iter().flatten().map(|v| *v as f32).collect();
        let t = Tensor::from_vec(rows, (f.len(), f[0].len()), &Device::Cpu)?;
        std::fs::create_dir_all(cache)?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id())); // two evaluations at once
        candle_core::safetensors::save(&[("features", t)].into_iter().collect(), &tmp)?;
        std::fs::rename(&tmp, &path)?;
        Ok(f)
    }

    /// The guidance the model is sampled with: an unconditional model has none, whatever --guidance says.
    fn guidance(&self) -> f32 {
        if self.state.config.model.num_classes > 0 {
            self.o.guidance
        } else {
            0.0
        }
    }

    /// The whole report, section by section.
    fn report(&self, model: &mut Model, accuracy: Option<f64>, label_weights: &[LabelWeight]) -> Result<EvalReport> {
        let (o, k) = (self.o, self.state.config.model.num_classes);
        let main = self.setting(model, self.guidance(), o.steps)?;
        let fid = |name: &str| {
            let i = self.spaces.iter().position(|sp| sp.ext.name() == name)?;
            Some((main.fid[i].1, self.spaces[i].floor))
        };
        let mut report = EvalReport {
            run: o.run.display().to_string(),
            model: o.model.as_ref().map(|p| p.display().to_string()),
            weights: self.weights.clone(),
            step: self.state.step,
            samples: o.n,
            sampler: format!("{} {} steps, trailing", o.sampler, o.steps),
            guidance: self.guidance(),
            class_mix: (k > 0 && o.class_mix == ClassMix::Data).then(|| o.class_mix.to_string()),
            guidance_interval: o.sample.guidance_interval.filter(|_| k > 0).map(|g| g.to_string()),
            classifier: self.clf.map(|c| c.1.display().to_string()),
            classifier_onnx: self.clf.map(|c| c.1.with_extension("onnx").display().to_string()),
            classifier_test_accuracy: accuracy,
            classifier_score: main.score,
            classifier_score_per_class: main.per_class.clone(),
            fid_images: self.refs.m,
            fid_classifier_features: fid("classifier").map(|f| f.0),
            fid_floor_train_vs_test: fid("classifier").map(|f| f.1),
            fid_inception: fid("inception").map(|f| f.0),
            fid_inception_floor: fid("inception").map(|f| f.1),
            fid_per_class: main.class_fid.clone(),
            sweep_csv: None,
            nearest: None,
            nll: None,
            c2st: None,
            composition: None,
        };
        if o.c2st {
            report.c2st = Some(self.c2st(&main.images)?);
        }
        if o.nearest > 0 {
            let clf = &self.clf.expect("checked above: --nearest needs the classifier").0;
            let grid = o.run.join("nearest.png");
            let (train, test, p) = (self.train, self.test, self.progress);
            report.nearest = Some(nearest::check(&main.images, train, test, clf, o.nearest, 10, &grid, p)?);
        }
        if !o.sweep_guidance.is_empty() || !o.sweep_steps.is_empty() {
            report.sweep_csv = Some(self.sweeps(model)?);
        }
        // after the sweeps: their sampler holds the model until then
        if o.composition > 0 {
            report.composition = Some(self.composition(model, label_weights)?);
        }
        if o.nll > 0 {
            report.nll = Some(self.nll(model)?);
        }
        Ok(report)
    }

    /// The sampler of `steps` steps (trailing spacing, DDIM's eta 0).
    fn method(&self, steps: usize) -> Result<Method> {
        let d = &self.state.config.diffusion;
        Ok(Method::new(self.o.sampler, steps, 0.0, Spacing::Trailing, d.variance, d.timesteps)?)
    }

    /// Samples `o.n` images at one guidance weight and step count, and scores them.
    fn setting(&self, model: &mut Model, guidance: f32, steps: usize) -> Result<Outcome> {
        let (o, cfg) = (self.o, &self.state.config);
        let method = self.method(steps)?;
        let num_steps = method.timesteps(cfg.diffusion.timesteps)?.len();
        let mut req = crate::denoise::request(&cfg.model, o.n, method, None, guidance, o.sample.seed);
        req.options = o.sample.clone();
        if let (ClassMix::Data, Some(real), Some(labels)) = (o.class_mix, &self.refs.test_labels, &mut req.labels) {
            *labels = (0..o.n).map(|i| real[i % real.len()] as i64).collect();
        }
        let sched = cfg.diffusion.schedule()?;
        self.progress.begin("sampling", (o.n.div_ceil(o.sample.batch) * num_steps) as u64);
        let mut x = model.with_denoiser(|den| sample(den, &sched, &req, &mut |_| self.progress.advance(1, None)))?;
        self.progress.end();
        quantize(&mut x);
        let (score, per_class) = self.classifier_score(&x, req.labels.as_deref())?;
        let (mut fid, mut class_fid) = (vec![], vec![]);
        self.progress.begin("sample features", 0);
        for sp in &self.spaces {
            let f = sp.ext.features(&x, self.shape, self.progress)?;
            fid.push((sp.ext.name(), fid_features(&f, &sp.test)));
            if let Some(labels) = &req.labels {
                class_fid.extend(self.class_fids(sp, &f, labels));
            }
        }
        self.progress.end();
        Ok(Outcome { images: x, score, per_class, fid, class_fid })
    }

    /// Each class's FID in one space: its samples against the reference test images of the class, and the
    /// class's reference training images against the same (its floor). Classes with fewer than two images in
    /// any of the three sets have no covariance, so no FID, and are left out.
    fn class_fids(&self, sp: &Space, samples: &[Vec<f64>], labels: &[i64]) -> Vec<ClassFid> {
        let (Some(test_l), Some(train_l)) = (&self.refs.test_labels, &self.refs.train_labels) else { return vec![] };
        let of = |f: &[Vec<f64>], l: &mut dyn Iterator<Item = usize>, c: usize| -> Vec<Vec<f64>> {
            f.iter().zip(l).filter(|(_, l)| *l == c).map(|(f, _)| f.clone()).collect()
        };
        let mut out = vec![];
        for (c, class) in self.train.class_names.iter().enumerate() {
            let gen = of(samples, &mut labels.iter().map(|&l| l as usize), c);
            let test = of(&sp.test, &mut test_l.iter().map(|&l| l as usize), c);
            let train = of(&sp.train, &mut train_l.iter().map(|&l| l as usize), c);
            if gen.len() < 2 || test.len() < 2 || train.len() < 2 {
                continue;
            }
            out.push(ClassFid {
                class: class.clone(),
                space: sp.ext.name().into(),
                samples: gen.len(),
                real: test.len(),
                fid: fid_features(&gen, &test),
                floor: fid_features(&train, &test),
            });
        }
        out
    }

    /// The fraction of samples the classifier reads as the class asked for, overall and per class.
    fn classifier_score(&self, x: &[f32], labels: Option<&[i64]>) -> Result<(Option<f64>, Vec<ClassScore>)> {
        let k = self.state.config.model.num_classes;
        let (mut per_class, mut hits) = (vec![], 0);
        if let (Some(labels), Some((clf, _))) = (labels, self.clf) {
            let (_, gen_p) = features(clf, x, self.shape, &self.o.device)?;
            for c in 0..k {
                let (mut n, mut h) = (0, 0);
                for (p, l) in gen_p.iter().zip(labels) {
                    if *l as usize == c {
                        n += 1;
                        h += (*p as usize == c) as usize;
                    }
                }
                hits += h;
                let class = self.train.class_names[c].clone();
                per_class.push(ClassScore { class, n, score: h as f64 / n.max(1) as f64 });
            }
        }
        let score = (k > 0 && self.clf.is_some()).then_some(hits as f64 / self.o.n as f64);
        Ok((score, per_class))
    }

    /// The classifier two-sample test of the samples against real test images, and its real-vs-real floor.
    fn c2st(&self, images: &[f32]) -> Result<C2stReport> {
        let (o, refs, p) = (self.o, &self.refs, self.progress);
        p.note("two-sample test: a CNN learns to tell samples from real test images (and training from test images)");
        let accuracy = c2st::accuracy(&refs.test_x, images, self.shape, o.sample.seed, &o.device, p)?;
        let real_vs_real = self.c2st_floor()?;
        Ok(C2stReport { images: refs.m.min(o.n), accuracy, real_vs_real })
    }

    /// The two-sample test of real training images against the real test images, from the cache when it was
    /// run before: it depends on the real images alone (both fingerprints, their count, the subset seed) and the
    /// device, and its CNN costs as much to train as the test's own (a sweep asks for it once per run).
    fn c2st_floor(&self) -> Result<f64> {
        let (o, refs) = (self.o, &self.refs);
        let device = if o.device.is_cpu() { "cpu" } else { "gpu" };
        let name = format!(
            "c2st-floor-{}-{}-n{}-s{}-{device}.txt",
            self.test.fingerprint, self.train.fingerprint, refs.m, o.sample.seed
        );
        let path = o.cache.join(name);
        if let Some(v) = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<f64>().ok()) {
            return Ok(v);
        }
        let v = c2st::accuracy(&refs.test_x, &refs.train_x, self.shape, o.sample.seed, &o.device, self.progress)?;
        std::fs::create_dir_all(&o.cache)?;
        crate::train::checkpoint::write_atomic(&path, format!("{v}\n").as_bytes())?;
        Ok(v)
    }

    /// The guidance and steps sweeps: RUN/sweep.csv and its plots; returns the CSV's path.
    fn sweeps(&self, model: &mut Model) -> Result<String> {
        let o = self.o;
        let mut rows = vec![];
        for &w in &o.sweep_guidance {
            rows.push(("guidance", w, o.steps, self.setting(model, w, o.steps)?));
        }
        for &st in &o.sweep_steps {
            rows.push(("steps", self.guidance(), st, self.setting(model, self.guidance(), st)?));
        }
        write_sweeps(&o.run, &self.spaces, &rows)?;
        Ok(o.run.join("sweep.csv").display().to_string())
    }

    /// The compositional-generalisation report on shifted digits.
    fn composition(&self, model: &mut Model, weights: &[LabelWeight]) -> Result<compose::CompositionReport> {
        let o = self.o;
        let method = self.method(o.steps)?;
        let (cfg, n, seed, batch) = (&self.state.config, o.composition, o.sample.seed, o.sample.batch);
        model.with_denoiser(|den| {
            compose::composition(den, cfg, method, n, weights, seed, batch, &o.cache, &o.device, self.progress)
        })
    }

    /// The negative log-likelihood bound of test images, in bits per dimension.
    fn nll(&self, model: &mut Model) -> Result<NllReport> {
        let (o, cfg) = (self.o, &self.state.config);
        let idx = subset(self.test.len, o.nll.min(self.test.len), o.sample.seed ^ 3);
        let x0 = real(self.test, &idx);
        let null = cfg.model.null_class().map(|n| vec![n as i64; idx.len()]);
        let sched = cfg.diffusion.schedule()?;
        let variance = cfg.diffusion.variance;
        self.progress.begin("likelihood bound (timesteps)", cfg.diffusion.timesteps as u64);
        let mut tick = |_: usize| self.progress.advance(1, None);
        let (seed, batch, shape) = (o.sample.seed, o.sample.batch, self.shape);
        let nll = model.with_denoiser(|den| {
            runtime::likelihood::nll_bits_per_dim(
                den,
                &sched,
                variance,
                &x0,
                shape,
                null.as_deref(),
                seed,
                batch,
                &mut tick,
            )
        })?;
        self.progress.end();
        let (bits_per_dim, stderr) = nll.mean_and_stderr();
        Ok(NllReport {
            images: idx.len(),
            bits_per_dim,
            stderr,
            decoder_bits_per_dim: nll.terms[0],
            prior_bits_per_dim: nll.prior,
            variance: variance.to_string(),
            conditioning: if null.is_some() { "null class" } else { "unconditional" }.into(),
        })
    }
}

/// Opens an exported model for sampling and checks that it is this run's model (data and schedule).
fn open_model(path: &Path, state: &State, dev: &Device) -> Result<OrtDenoiser> {
    use runtime::onnx::Provider;
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
