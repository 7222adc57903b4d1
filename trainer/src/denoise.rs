//! The trainer's Candle U-Net as a [`runtime::sampler::Denoiser`]: previews during `trainer fit` and
//! evaluation run the runtime crate's samplers, the same code that serves ONNX Runtime.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use runtime::images::Images;
use runtime::metadata::Prediction;
use runtime::sampler::{self, Denoiser, Method, Request, Spacing};
use runtime::schedule::NoiseSchedule;

use crate::model::ops::CandleOps;
use crate::model::tape::{Pool, Tape};
use crate::model::unet::{UNet, UNetConfig};
use crate::model::workers;

pub struct CandleDenoiser<'a> {
    pub unet: &'a UNet,
    pub device: Device,
    /// Buffers of the CPU engine, reused between calls.
    pool: Pool,
    /// The images of a call split over single-threaded workers, one per thread ([`workers`]); on by default.
    pub split: bool,
    workers: Vec<workers::Worker>,
}

impl<'a> CandleDenoiser<'a> {
    pub fn new(unet: &'a UNet, device: &Device) -> Self {
        Self { unet, device: device.clone(), pool: Pool::default(), split: true, workers: vec![] }
    }
}

impl Denoiser for CandleDenoiser<'_> {
    fn prediction(&self) -> Prediction {
        self.unet.cfg.prediction
    }

    fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> runtime::Result<Vec<f32>> {
        Ok(self.eps_and_v(x, shape, t, y)?.0)
    }

    fn guidance_input(&self) -> bool {
        self.unet.cfg.guidance_embed
    }

    fn eps_w(
        &mut self,
        x: &[f32],
        shape: [usize; 4],
        t: &[i64],
        y: Option<&[i64]>,
        w: &[f32],
    ) -> runtime::Result<Vec<f32>> {
        self.output(x, shape, t, y, Some(w)).map_err(runtime::Error::denoiser)
    }

    fn eps_and_v(
        &mut self,
        x: &[f32],
        shape: [usize; 4],
        t: &[i64],
        y: Option<&[i64]>,
    ) -> runtime::Result<(Vec<f32>, Option<Vec<f32>>)> {
        // a guidance-input model asked without a weight: the conditional model alone (w = 0)
        let zeros = self.unet.cfg.guidance_embed.then(|| vec![0f32; shape[0]]);
        let out = self.output(x, shape, t, y, zeros.as_deref()).map_err(runtime::Error::denoiser)?;
        if !self.unet.cfg.learn_sigma {
            return Ok((out, None));
        }
        let (eps, v) = sampler::split_eps_v(&out, shape[0], x.len() / shape[0].max(1));
        Ok((eps, Some(v)))
    }
}

impl CandleDenoiser<'_> {
    /// The U-Net's output: [n, C, H, W], or [n, 2C, H, W] (eps, then v) for a learned variance.
    fn output(
        &mut self,
        x: &[f32],
        shape: [usize; 4],
        t: &[i64],
        y: Option<&[i64]>,
        w: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let labels = self.unet.cfg.full_labels(y, t.len())?;
        let ydims = self.unet.cfg.label_dims(t.len());
        if self.device.is_cpu() {
            // the CPU engine (the kernels training uses; buffers reused between sampler steps), its images split
            // over single-threaded workers
            let (n, unet) = (t.len(), self.unet);
            let (per_x, per_y) = (x.len() / n.max(1), ydims.iter().skip(1).product::<usize>());
            let part = |pool: &mut Pool, r: std::ops::Range<usize>| -> Result<Vec<f32>> {
                let mut tape = Tape::new(pool, None);
                let m = r.len();
                let xs = tape.input(&x[r.start * per_x..r.end * per_x], &[m, shape[1], shape[2], shape[3]])?;
                let ts = tape.input(&t[r.clone()].iter().map(|&v| v as f32).collect::<Vec<_>>(), &[m])?;
                let ys = match &labels {
                    Some(y) => {
                        let rows = &y[r.start * per_y..r.end * per_y];
                        let dims: Vec<usize> = std::iter::once(m).chain(ydims.iter().skip(1).copied()).collect();
                        Some(tape.input(&rows.iter().map(|&v| v as f32).collect::<Vec<_>>(), &dims)?)
                    }
                    None => None,
                };
                let ws = w.map(|w| tape.input(&w[r.clone()], &[m])).transpose()?;
                let out = unet.forward_w(&mut tape, &xs, &ts, ys.as_ref(), ws.as_ref())?;
                Ok(tape.data(out).to_vec())
            };
            let k = if self.split { workers::count(n) } else { 1 };
            if k == 1 {
                return part(&mut self.pool, 0..n);
            }
            return Ok(workers::run(&mut self.workers, k, n, part)?.concat());
        }
        let xs = Tensor::from_slice(x, shape.to_vec(), &self.device)?;
        let ts = Tensor::from_slice(t, t.len(), &self.device)?;
        let ys = labels.map(|y| Tensor::from_vec(y, ydims, &self.device)).transpose()?;
        let ws = w.map(|w| Tensor::from_slice(w, w.len(), &self.device)).transpose()?;
        let mut ops = CandleOps::inference(&self.device, DType::F32);
        let eps = self.unet.forward_w(&mut ops, &xs, &ts, ys.as_ref(), ws.as_ref())?;
        Ok(eps.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }
}

/// A DDIM sample grid from `unet` (classes cycle on conditional models), written to `path`.
pub fn preview(
    unet: &UNet,
    sched: &NoiseSchedule,
    device: &Device,
    n: usize,
    steps: usize,
    seed: u64,
    path: &Path,
) -> Result<()> {
    let cfg = &unet.cfg;
    let req = request(cfg, n, Method::Ddim { steps, eta: 0.0, spacing: Spacing::Trailing }, None, 0.0, seed);
    let mut den = CandleDenoiser::new(unet, device);
    let x = sampler::sample(&mut den, sched, &req, &mut |_| {})?;
    let (c, s) = (cfg.channels, cfg.image_size);
    let images = Images::from_f32(&x, n, [c, s, s], req.labels);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    Ok(images.save_grid(path)?)
}

/// A sampling request in `cfg`'s image shape. Conditional models draw `label`, or cycle through the classes,
/// guided with weight `guidance` against the null class; unconditional models ignore both.
pub fn request(cfg: &UNetConfig, n: usize, method: Method, label: Option<i64>, guidance: f32, seed: u64) -> Request {
    let mut req = Request::new(n, [cfg.channels, cfg.image_size, cfg.image_size], method);
    req.options.seed = seed;
    if cfg.num_classes > 0 {
        req.labels = Some((0..n).map(|i| label.unwrap_or((i % cfg.num_classes) as i64)).collect());
        req.null_class = cfg.null_class().map(|c| c as i64);
        req.guidance = guidance;
    }
    req
}

/// The reverse process of `unet` for `req` as a strip: for each image of the first chunk, x_t and the predicted
/// x0 at `cols` evenly spaced steps. Returns (tiles, columns, timesteps of the columns).
pub fn reverse_strip(
    unet: &UNet,
    sched: &NoiseSchedule,
    device: &Device,
    req: &Request,
    cols: usize,
) -> Result<(Vec<f32>, usize, Vec<usize>)> {
    let steps = req.num_steps(sched.num_timesteps())?;
    let mut strip = runtime::images::Strip::new(steps, cols, req.n, req.shape.iter().product());
    let mut den = CandleDenoiser::new(unet, device);
    sampler::sample(&mut den, sched, req, &mut |s| strip.record(s))?;
    let (tiles, cols) = strip.tiles();
    Ok((tiles, cols, strip.timesteps()))
}
