//! The trainer's Candle U-Net as a [`runtime::sampler::Denoiser`]: previews during `trainer fit` and
//! evaluation run the runtime crate's samplers, the same code that serves ONNX Runtime.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use runtime::images::Images;
use runtime::sampler::{self, Denoiser, Method, Request, Spacing};
use runtime::schedule::NoiseSchedule;

use crate::ops::CandleOps;
use crate::unet::UNet;

pub struct CandleDenoiser<'a> {
    pub unet: &'a UNet,
    pub device: Device,
}

impl Denoiser for CandleDenoiser<'_> {
    fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
        let xs = Tensor::from_slice(x, shape.to_vec(), &self.device)?;
        let ts = Tensor::from_slice(t, t.len(), &self.device)?;
        let ys = match (y, self.unet.cfg.null_class()) {
            (Some(y), Some(_)) => Some(Tensor::from_slice(y, y.len(), &self.device)?),
            (None, Some(null)) => Some(Tensor::from_vec(vec![null as i64; t.len()], t.len(), &self.device)?),
            _ => None,
        };
        let mut ops = CandleOps::inference(&self.device, DType::F32);
        let eps = self.unet.forward(&mut ops, &xs, &ts, ys.as_ref())?;
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
    let mut req = Request::new(
        n,
        [cfg.channels, cfg.image_size, cfg.image_size],
        Method::Ddim { steps, eta: 0.0, spacing: Spacing::Trailing },
    );
    req.seed = seed;
    if cfg.num_classes > 0 {
        req.labels = Some((0..n).map(|i| (i % cfg.num_classes) as i64).collect());
        req.null_class = cfg.null_class().map(|c| c as i64);
    }
    let mut den = CandleDenoiser { unet, device: device.clone() };
    let x = sampler::sample(&mut den, sched, &req, &mut |_| {})?;
    let (c, s) = (cfg.channels, cfg.image_size);
    let images = Images::from_f32(&x, n, [c, s, s], req.labels);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    images.save_grid(path)
}
