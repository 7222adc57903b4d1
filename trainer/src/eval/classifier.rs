//! The evaluation classifier: a small CNN trained once per dataset (cached by the dataset fingerprint) on the
//! training split. Its accuracy on the test split, the classifier score of samples, and its penultimate
//! layer's features for FID. It is written against [`Ops`] like the U-Net, so it exports to ONNX with the same
//! writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_onnx::onnx::ModelProto;
use runtime::metadata::Dtype;

use crate::data::Dataset;
use crate::model::ops::{CandleOps, Ops};
use crate::model::params::{Init, InitSource, Param, ParamSource, TensorSource};
use crate::progress::Progress;
use crate::train::optim::AdamW;

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
    progress: &dyn Progress,
) -> Result<HashMap<String, Tensor>> {
    let labels = train.labels.as_ref().context("the classifier needs a labelled dataset")?;
    let mut src = InitSource::new(seed, dev, DType::F32);
    let clf = Classifier::new(train.channels, train.size, train.num_classes(), &mut src)?;
    let vars = src.into_vars();
    let mut opt = AdamW::new(&vars, 0.9, 0.999, 1e-8, 0.0)?;
    let bs = 128;
    let steps = epochs * train.len.div_ceil(bs);
    let mut order = crate::train::DataOrder::new(seed, train.len);
    progress.begin("classifier training", steps as u64);
    let mut pool = crate::model::tape::Pool::default();
    for step in 0..steps {
        let idx = order.batch(step, bs);
        let y: Vec<u32> = idx.iter().map(|i| labels[*i]).collect();
        let loss = if dev.is_cpu() {
            // the CPU engine: cross-entropy's gradient w.r.t. the logits is (softmax - one-hot) / B
            let x = batch_host(train, &idx);
            let mut tape = crate::model::tape::Tape::new(&mut pool, None);
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
            opt.step(&crate::train::optim::Grads::Candle(&grads), 1e-3, 1.0)?;
            loss.to_scalar::<f32>()? as f64
        };
        progress.advance(1, Some(&format!("loss {loss:.4}")));
    }
    progress.end();
    Ok(vars.iter().map(|(k, v): (&String, &Var)| (k.clone(), v.as_tensor().clone())).collect())
}

/// The classifier as an ONNX model: input `x` [B, C, S, S] in [-1, 1]; outputs `features` [B, 128], `logits`.
pub fn classifier_onnx(clf: &Classifier, channels: usize, size: usize, classes: &[String]) -> Result<ModelProto> {
    use crate::onnx::{finish_model, onnx_type, value_info, Graph, OnnxOps};
    let mut o = OnnxOps::new(Dtype::F32);
    let (f, logits) = clf.forward(&mut o, &"x".to_string())?;
    let (c, s) = (channels as i64, size as i64);
    let g = Graph {
        name: "eval_classifier",
        inputs: vec![value_info("x", onnx_type(Dtype::F32), &[None, Some(c), Some(s), Some(s)])],
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
pub fn classifier_for(
    train: &Dataset,
    cache: &Path,
    dev: &Device,
    progress: &dyn Progress,
) -> Result<(Classifier, PathBuf)> {
    let path = cache.join(format!("classifier-{}.safetensors", train.fingerprint));
    let tensors = if path.is_file() {
        candle_core::safetensors::load(&path, dev)?
    } else {
        progress.note(&format!(
            "training the evaluation classifier on {} ({} images, 2 epochs); cached as {}",
            train.description,
            train.len,
            path.display()
        ));
        let t = train_classifier(train, 2, 0, dev, progress)?;
        std::fs::create_dir_all(cache)?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id())); // two evaluations at once
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
        crate::train::checkpoint::write_atomic(&onnx, &prost::Message::encode_to_vec(&model))?;
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
