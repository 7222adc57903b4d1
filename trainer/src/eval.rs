//! `trainer eval`: the seeds' classifier score and FID in a classifier's feature space.
//!
//! A small CNN is trained once per dataset (cached by the dataset fingerprint) on the training split; its
//! penultimate layer gives the features. It is written against [`Ops`] like the U-Net, so it exports to ONNX
//! with the same writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
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

fn batch_tensor(data: &Dataset, idx: &[usize], dev: &Device) -> Result<Tensor> {
    let n = data.image_len();
    let mut v = Vec::with_capacity(idx.len() * n);
    for &i in idx {
        v.extend(data.image_f32(i));
    }
    Ok(Tensor::from_vec(v, (idx.len(), data.channels, data.size, data.size), dev)?)
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
    for step in 0..steps {
        let idx = sampler.batch(step, bs);
        let x = batch_tensor(train, &idx, dev)?;
        let y = Tensor::from_vec(idx.iter().map(|i| labels[*i]).collect::<Vec<u32>>(), idx.len(), dev)?;
        let mut ops = CandleOps::inference(dev, DType::F32);
        let (_, logits) = clf.forward(&mut ops, &x)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-3, 1.0)?;
        pb.inc(1);
        pb.set_message(format!("loss {:.4}", loss.to_scalar::<f32>()?));
    }
    pb.finish_and_clear();
    Ok(vars.iter().map(|(k, v): (&String, &Var)| (k.clone(), v.as_tensor().clone())).collect())
}

/// Loads the cached classifier for this training set, training and caching it first if needed.
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
    let mut mu = vec![0.0; d];
    for r in f {
        for j in 0..d {
            mu[j] += r[j] / n as f64;
        }
    }
    let mut cov = vec![0.0; d * d];
    for r in f {
        for i in 0..d {
            let a = r[i] - mu[i];
            for j in i..d {
                cov[i * d + j] += a * (r[j] - mu[j]);
            }
        }
    }
    for i in 0..d {
        for j in i..d {
            let v = cov[i * d + j] / (n as f64 - 1.0).max(1.0);
            cov[i * d + j] = v;
            cov[j * d + i] = v;
        }
    }
    (mu, cov)
}

/// Eigenvalues and eigenvectors (columns) of a symmetric matrix, cyclic Jacobi.
pub fn sym_eigen(a: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0.0; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |j| *j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j].powi(2))
            .sum();
        let norm: f64 = a.iter().map(|x| x * x).sum();
        if off <= 1e-22 * norm.max(1e-300) {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut c = vec![0.0; d * d];
    for i in 0..d {
        for k in 0..d {
            let aik = a[i * d + k];
            for j in 0..d {
                c[i * d + j] += aik * b[k * d + j];
            }
        }
    }
    c
}

/// Frechet distance between N(mu1, s1) and N(mu2, s2) (Heusel et al. 2017, eq. 6):
/// |mu1 - mu2|^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2)), with Tr((s1 s2)^(1/2)) = sum sqrt(eig(s1^(1/2) s2 s1^(1/2))).
pub fn frechet_distance(mu1: &[f64], s1: &[f64], mu2: &[f64], s2: &[f64]) -> f64 {
    let d = mu1.len();
    let (e, v) = sym_eigen(s1, d);
    // s1^(1/2) = V diag(sqrt(e)) V^T
    let mut half = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            half[i * d + j] = (0..d).map(|k| v[i * d + k] * e[k].max(0.0).sqrt() * v[j * d + k]).sum();
        }
    }
    let m = matmul(&matmul(&half, s2, d), &half, d);
    let (em, _) = sym_eigen(&m, d);
    let tr_sqrt: f64 = em.iter().map(|x| x.max(0.0).sqrt()).sum();
    let diff: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b).powi(2)).sum();
    let tr: f64 = (0..d).map(|i| s1[i * d + i] + s2[i * d + i]).sum();
    diff + tr - 2.0 * tr_sqrt
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
    pub guidance: f32,
    pub seed: u64,
    pub batch: usize,
    pub cache: PathBuf,
    pub quiet: bool,
}

/// Classifier accuracy, classifier score (fraction of samples classified as the requested class, per class
/// and overall), FID in the classifier's feature space and its real-vs-real floor. Writes RUN/eval.json.
pub fn evaluate(o: &EvalOptions) -> Result<serde_json::Value> {
    use runtime::sampler::{sample, Method, Request, Spacing};
    let dev = Device::Cpu;
    let (unet, state) = crate::export::load_unet(&o.run, &o.checkpoint, "ema")?;
    let cfg = &state.config;
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
    let (clf, clf_path) = classifier_for(&train, &o.cache, &dev, o.quiet)?;
    let shape = [train.channels, train.size, train.size];
    let real = |ds: &Dataset, idx: &[usize]| -> Vec<f32> { idx.iter().flat_map(|i| ds.image_f32(*i)).collect() };
    // accuracy on the whole test split
    let all: Vec<usize> = (0..test.len).collect();
    let (test_f, test_p) = features(&clf, &real(&test, &all), shape, &dev)?;
    let tl = test.labels.as_ref().unwrap();
    let accuracy = test_p.iter().zip(tl).filter(|(p, l)| p == l).count() as f64 / test.len as f64;
    // samples
    let k = cfg.model.num_classes;
    let mut req = Request::new(o.n, shape, Method::Ddim { steps: o.steps, eta: 0.0, spacing: Spacing::Trailing });
    req.seed = o.seed;
    req.batch = o.batch;
    if k > 0 {
        req.labels = Some((0..o.n).map(|i| (i % k) as i64).collect());
        req.null_class = cfg.model.null_class().map(|c| c as i64);
        req.guidance = o.guidance;
    }
    let sched = cfg.diffusion.schedule()?;
    let mut den = crate::denoise::CandleDenoiser { unet: &unet, device: dev.clone() };
    let pb = if o.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new((o.n.div_ceil(o.batch) * o.steps) as u64)
    };
    let x = sample(&mut den, &sched, &req, &mut |_| pb.inc(1))?;
    pb.finish_and_clear();
    let (gen_f, gen_p) = features(&clf, &x, shape, &dev)?;
    let mut per_class = vec![];
    let mut hits = 0;
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
            per_class
                .push(serde_json::json!({"class": train.class_names[c], "n": n, "score": h as f64 / n.max(1) as f64}));
        }
    }
    // FID against n test images; the floor: n training images against the same test images
    let m = o.n.min(test.len);
    let test_idx = subset(test.len, m, o.seed ^ 1);
    let tf: Vec<Vec<f64>> = test_idx.iter().map(|i| test_f[*i].clone()).collect();
    let (mu_t, s_t) = moments(&tf);
    let (mu_g, s_g) = moments(&gen_f);
    let fid = frechet_distance(&mu_g, &s_g, &mu_t, &s_t);
    let train_idx = subset(train.len, m, o.seed ^ 2);
    let (train_f, _) = features(&clf, &real(&train, &train_idx), shape, &dev)?;
    let (mu_r, s_r) = moments(&train_f);
    let floor = frechet_distance(&mu_r, &s_r, &mu_t, &s_t);
    let report = serde_json::json!({
        "run": o.run.display().to_string(),
        "step": state.step,
        "samples": o.n,
        "sampler": format!("ddim {} steps, trailing", o.steps),
        "guidance": if k > 0 { o.guidance } else { 0.0 },
        "classifier": clf_path.display().to_string(),
        "classifier_test_accuracy": accuracy,
        "classifier_score": if k > 0 { Some(hits as f64 / o.n as f64) } else { None },
        "classifier_score_per_class": per_class,
        "fid_classifier_features": fid,
        "fid_floor_train_vs_test": floor,
        "fid_images": m,
    });
    crate::checkpoint::write_atomic(&o.run.join("eval.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn jacobi_eigen_reconstructs() {
        let a = [4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 1.0];
        let (e, v) = sym_eigen(&a, 3);
        for i in 0..3 {
            for j in 0..3 {
                let r: f64 = (0..3).map(|k| v[i * 3 + k] * e[k] * v[j * 3 + k]).sum();
                assert!((r - a[i * 3 + j]).abs() < 1e-10);
            }
        }
    }
}
