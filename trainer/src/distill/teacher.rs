//! The teacher of a distillation stage: the trained model (an exported ONNX file or a run's EMA weights), asked
//! for guided eps; or, from the second halving on, the previous stage's student with its guidance input.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use runtime::metadata::{ModelMeta, Prediction, Recommended};
use runtime::sampler::GuidanceInterval;
use runtime::schedule::NoiseSchedule;
use sha2::Digest;

use crate::model::params::{ParamSource, ShapeCounter, TensorSource};
use crate::model::tape::{Pool, Tape};
use crate::model::unet::{UNet, UNetConfig};
use crate::train::checkpoint;
use crate::train::config::Config;

/// A trained model to distil, with what the student needs to know of it.
pub struct Source {
    /// Its weights by parameter name (f32).
    pub tensors: HashMap<String, Tensor>,
    /// Its network (with the prediction target and variance head).
    pub unet: UNetConfig,
    /// Its betas (the student keeps them).
    pub betas: Vec<f64>,
    /// Its run's configuration when it is a run folder.
    pub config: Option<Config>,
    /// How its card says to sample it (an exported file's metadata).
    pub recommended: Option<Recommended>,
    /// SHA-256 of the weight file (the ONNX file, or the checkpoint's ema.safetensors).
    pub sha256: String,
    /// The checkpoint step it was trained for.
    pub training_steps: Option<u64>,
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}

/// Reads a teacher: an exported `.onnx` file of this trainer, or a run folder (its newest checkpoint's EMA
/// weights).
pub fn load(path: &Path) -> Result<Source> {
    if path.is_dir() {
        let ck = checkpoint::load_which(path, "latest", &Device::Cpu, false)?;
        let file = ck.dir.join("ema.safetensors");
        let cfg = ck.state.config.clone();
        let tensors = ck.ema.iter().map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
        return Ok(Source {
            tensors,
            unet: cfg.unet(),
            betas: cfg.diffusion.schedule()?.betas,
            recommended: None,
            sha256: sha256_file(&file)?,
            training_steps: Some(ck.state.step as u64),
            config: Some(cfg),
        });
    }
    let model =
        candle_onnx::read_file(path).with_context(|| format!("cannot read the ONNX model {}", path.display()))?;
    let props = model.metadata_props.iter().map(|p| (p.key.clone(), p.value.clone())).collect();
    let meta =
        ModelMeta::from_props(&props).with_context(|| format!("{}: not a model of this toolkit", path.display()))?;
    let json = meta.model_config.as_deref().with_context(|| {
        format!(
            "{}: its metadata has no model_config (the trainer's network), so its weights cannot be read back",
            path.display()
        )
    })?;
    let mut unet: UNetConfig = serde_json::from_str(json)
        .with_context(|| format!("{}: diffusion.model_config is not a U-Net", path.display()))?;
    unet.prediction = meta.prediction;
    unet.learn_sigma = meta.variance.is_learned();
    let graph = model.graph.as_ref().context("the ONNX file has no graph")?;
    let inits: HashMap<&str, &candle_onnx::onnx::TensorProto> =
        graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    // every parameter is an initializer by its own name, or (stored in the shape it is used in) `name:bcast`
    let mut shapes = ShapeCounter::default();
    UNet::new(unet.clone(), &mut shapes)?;
    let mut tensors = HashMap::new();
    for (name, shape) in &shapes.shapes {
        let bcast = format!("{name}:bcast");
        let (key, proto) = match inits.get(name.as_str()) {
            Some(p) => (name.as_str(), *p),
            None => (
                bcast.as_str(),
                *inits.get(bcast.as_str()).with_context(|| format!("{}: no weight '{name}'", path.display()))?,
            ),
        };
        let t = candle_onnx::eval::get_tensor(proto, key)?.to_dtype(DType::F32)?;
        if t.elem_count() != shape.iter().product::<usize>() {
            bail!("{}: weight '{name}' has {} values, the network needs {shape:?}", path.display(), t.elem_count());
        }
        tensors.insert(name.clone(), t.reshape(shape.as_slice())?);
    }
    Ok(Source {
        tensors,
        unet,
        betas: meta.betas.clone(),
        config: None,
        recommended: meta.recommended.clone(),
        sha256: sha256_file(path)?,
        training_steps: meta.training_steps,
    })
}

impl Source {
    /// The network built from these weights.
    pub fn build(&self) -> Result<UNet> {
        let mut src = TensorSource::new(&self.tensors, "the teacher");
        let u = UNet::new(self.unet.clone(), &mut src as &mut dyn ParamSource)?;
        src.finish()?;
        Ok(u)
    }
}

/// Which weights a [`Teacher`] is.
pub enum Kind {
    /// The trained model: guided by two calls per image (conditional and null class, Ho & Salimans 2022, eq. 6),
    /// at the timesteps of `interval` only when one is given.
    Original { interval: Option<GuidanceInterval> },
    /// A previous stage's student: one call with the guidance weight as its input.
    Student,
}

/// A teacher on the CPU engine, with buffers of its own (the student's tape keys gradients by parameter name, so
/// the two never share one).
pub struct Teacher {
    pub unet: UNet,
    pub kind: Kind,
    pool: Pool,
}

impl Teacher {
    pub fn new(unet: UNet, kind: Kind) -> Self {
        Self { unet, kind, pool: Pool::default() }
    }

    /// The raw output for `x` [n, C, H, W] at per-image timesteps and labels (and guidance weights).
    fn call(&mut self, x: &[f32], dims: [usize; 4], t: &[u32], y: &[u32], w: Option<&[f32]>) -> Result<Vec<f32>> {
        let n = dims[0];
        let mut tape = Tape::new(&mut self.pool, None);
        let xs = tape.input(x, &dims)?;
        let ts = tape.input(&t.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[n])?;
        let ys = tape.input(&y.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[n])?;
        let ws = w.map(|w| tape.input(w, &[n])).transpose()?;
        let out = self.unet.forward_w(&mut tape, &xs, &ts, Some(&ys), ws.as_ref())?;
        let per = x.len() / n;
        let data = tape.data(out);
        // a learned-variance head's second half is not used: DDIM needs eps alone
        let c = data.len() / n;
        Ok(data.chunks(c).flat_map(|img| img[..per].iter().copied()).collect())
    }

    /// Guided eps for each image of `z` at its timestep `t`, class `y` and guidance weight `w`: eps~ = (1 + w)
    /// eps(z, y) - w eps(z, null), or eps(z, y) where the teacher does not guide (outside its interval, or y is
    /// the null class). A v-predicting model's output is turned into eps = sigma_t z + alpha_t v.
    #[allow(clippy::too_many_arguments)]
    pub fn guided_eps(
        &mut self,
        sched: &NoiseSchedule,
        z: &[f32],
        dims: [usize; 4],
        t: &[u32],
        y: &[u32],
        w: &[f32],
        null: u32,
    ) -> Result<Vec<f32>> {
        let per = z.len() / dims[0];
        let mut eps = match &self.kind {
            Kind::Student => self.call(z, dims, t, y, Some(w))?,
            Kind::Original { interval } => {
                // the null half only for the images that are guided: one batched call
                let guided: Vec<usize> = (0..dims[0])
                    .filter(|&i| y[i] != null && w[i] != 0.0 && interval.is_none_or(|g| g.contains(t[i] as usize)))
                    .collect();
                let n = dims[0] + guided.len();
                let mut x2 = z.to_vec();
                let (mut t2, mut y2) = (t.to_vec(), y.to_vec());
                for &i in &guided {
                    x2.extend_from_slice(&z[i * per..(i + 1) * per]);
                    t2.push(t[i]);
                    y2.push(null);
                }
                let mut out = self.call(&x2, [n, dims[1], dims[2], dims[3]], &t2, &y2, None)?;
                self.to_eps(sched, &x2, &t2, &mut out);
                let (cond, unc) = out.split_at_mut(z.len());
                for (k, &i) in guided.iter().enumerate() {
                    let wi = w[i];
                    let u = &unc[k * per..(k + 1) * per];
                    for (c, u) in cond[i * per..(i + 1) * per].iter_mut().zip(u) {
                        *c = (1.0 + wi) * *c - wi * u;
                    }
                }
                out.truncate(z.len());
                return Ok(out);
            }
        };
        self.to_eps(sched, z, t, &mut eps);
        Ok(eps)
    }

    /// Turns a v-predicting model's outputs into eps (Salimans & Ho 2022, sec. 4), image by image.
    fn to_eps(&self, sched: &NoiseSchedule, x: &[f32], t: &[u32], out: &mut [f32]) {
        if self.unet.cfg.prediction != Prediction::V {
            return;
        }
        let per = x.len() / t.len();
        for (i, &ti) in t.iter().enumerate() {
            sched.eps_from_v(&x[i * per..(i + 1) * per], ti as usize, &mut out[i * per..(i + 1) * per]);
        }
    }
}

/// The weights of a student as a stage's teacher file: RUN/distill/teacher-stage-S.safetensors.
pub fn stage_file(run: &Path, stage: usize) -> std::path::PathBuf {
    run.join("distill").join(format!("teacher-stage-{stage}.safetensors"))
}
