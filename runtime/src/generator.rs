//! The embeddable generator: open an exported model, generate images.
//!
//! ```no_run
//! use runtime::generator::{Generator, GeneratorOptions, GenerateRequest};
//! let mut g = Generator::open("models/mnist-cfg.onnx".as_ref(), &GeneratorOptions::default())?;
//! let req = GenerateRequest { n: 8, class: Some("7".into()), guidance: 2.0, ..Default::default() };
//! let images = g.generate(&req, &mut |_| {})?;
//! images.save_grid("sevens.png".as_ref())?;
//! # anyhow::Ok(())
//! ```

use std::path::Path;

use anyhow::{bail, Result};

pub use crate::images::{to_u8_nhwc, Images};
use crate::onnx::{ModelInfo, OrtDenoiser, Provider};
use crate::sampler::{self, Method, Request, Spacing, StepInfo};
use crate::schedule::NoiseSchedule;

#[derive(Debug, Clone)]
pub struct GeneratorOptions {
    pub provider: Provider,
    /// ONNX Runtime intra-op threads (None: its default).
    pub threads: Option<usize>,
}

impl Default for GeneratorOptions {
    fn default() -> Self {
        Self { provider: Provider::Cpu, threads: None }
    }
}

/// What to generate; the defaults are `generate`'s.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub n: usize,
    /// `ddim`, `ddpm` or `dpm++`.
    pub sampler: String,
    /// Sampling steps (DDIM, DPM-Solver++); DDPM always runs all T.
    pub steps: usize,
    pub eta: f64,
    pub spacing: String,
    /// A class index or name; None on a conditional model cycles through the classes.
    pub class: Option<String>,
    pub guidance: f32,
    pub seed: u64,
    pub batch: usize,
    pub clip_x0: bool,
    pub dynamic_threshold: Option<f32>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            n: 16,
            sampler: "ddim".into(),
            steps: 50,
            eta: 0.0,
            spacing: "trailing".into(),
            class: None,
            guidance: 0.0,
            seed: 0,
            batch: 16,
            clip_x0: true,
            dynamic_threshold: None,
        }
    }
}

pub struct Generator {
    pub denoiser: OrtDenoiser,
    pub schedule: NoiseSchedule,
}

impl Generator {
    pub fn open(path: &Path, options: &GeneratorOptions) -> Result<Self> {
        let denoiser = OrtDenoiser::open(path, &options.provider, options.threads)?;
        let schedule = denoiser.info.schedule();
        Ok(Self { denoiser, schedule })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.denoiser.info
    }

    /// The provider that runs the model (`cpu`, `cuda`, `tensorrt`).
    pub fn provider(&self) -> &str {
        &self.denoiser.provider
    }

    /// Checks a request against the model and turns it into the sampler's form.
    pub fn plan(&self, req: &GenerateRequest) -> Result<Request> {
        let info = self.info();
        if req.n == 0 {
            bail!("--n must be at least 1");
        }
        let spacing = Spacing::from_name(&req.spacing)?;
        let method =
            Method::from_name(&req.sampler, req.steps, req.eta, spacing, info.variance, self.schedule.num_timesteps())?;
        let labels = match (&req.class, info.num_classes) {
            (Some(c), _) => Some(vec![info.class_index(c)?; req.n]),
            (None, 0) => None,
            (None, k) => Some((0..req.n).map(|i| (i % k) as i64).collect()),
        };
        if req.guidance != 0.0 && info.num_classes == 0 {
            bail!("--guidance needs a class-conditional model; this one is unconditional");
        }
        if !req.guidance.is_finite() || req.guidance < 0.0 {
            bail!("--guidance must be a finite number >= 0, got {}", req.guidance);
        }
        let mut r = Request::new(req.n, [info.channels, info.image_size, info.image_size], method);
        r.labels = labels;
        r.null_class = info.null_class;
        r.guidance = req.guidance;
        r.seed = req.seed;
        r.batch = req.batch.max(1);
        r.clip_x0 = req.clip_x0;
        r.dynamic_threshold = req.dynamic_threshold;
        Ok(r)
    }

    pub fn generate(&mut self, req: &GenerateRequest, on_step: &mut dyn FnMut(&StepInfo)) -> Result<Images> {
        let plan = self.plan(req)?;
        let x = sampler::sample(&mut self.denoiser, &self.schedule, &plan, on_step)?;
        Ok(Images::from_f32(&x, req.n, plan.shape, plan.labels))
    }
}
