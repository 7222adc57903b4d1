//! The embeddable generator: open an exported model, generate images.
//!
//! ```no_run
//! use runtime::generator::{GenerateRequest, Generator, GeneratorOptions};
//! let mut g = Generator::open("models/mnist.onnx".as_ref(), &GeneratorOptions::default())?;
//! // the model's recommended sampler, steps and guidance, 8 sevens
//! let req = GenerateRequest { n: 8, class: Some("7".into()), ..GenerateRequest::recommended(g.info()) };
//! let images = g.generate(&req, &mut |_step| {})?;
//! images.save_grid("sevens.png".as_ref())?;
//! # Ok::<(), runtime::Error>(())
//! ```

use std::path::Path;

use crate::error::Result;
pub use crate::images::{to_u8_nhwc, Images};
use crate::metadata::ModelMeta;
use crate::onnx::{OrtDenoiser, Provider, ProviderKind};
use crate::sampler::{self, Method, Request, SamplerKind, Spacing, StepInfo};
pub use crate::sampler::{InitImage, Inpaint};
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

/// What to generate. Errors about it name these fields.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Number of images (>= 1).
    pub n: usize,
    pub sampler: SamplerKind,
    /// Sampling steps (DDIM, DPM-Solver++), 1..=T; DDPM always runs all T.
    pub steps: usize,
    /// DDIM's eta in [0, 1] (0: deterministic).
    pub eta: f64,
    pub spacing: Spacing,
    /// A class index or name; None on a conditional model cycles through the classes.
    pub class: Option<String>,
    /// Classifier-free guidance weight w >= 0 (0: none).
    pub guidance: f32,
    pub seed: u64,
    /// Images per model call (>= 1); memory is bounded by it whatever n.
    pub batch: usize,
    pub clip_x0: bool,
    pub dynamic_threshold: Option<f32>,
    /// Image-to-image: start from this image noised to a strength (SDEdit) instead of pure noise.
    pub init: Option<InitImage>,
    /// Every image starts from the same x_T / x_t (variations, with a stochastic sampler).
    pub share_xt: bool,
    /// Inpainting: keep the known pixels of this image, generate the rest (RePaint).
    pub inpaint: Option<Inpaint>,
}

impl Default for GenerateRequest {
    /// 16 images, DDIM 50 steps (trailing), no guidance, seed 0, batch 16.
    fn default() -> Self {
        Self {
            n: 16,
            sampler: SamplerKind::Ddim,
            steps: 50,
            eta: 0.0,
            spacing: Spacing::Trailing,
            class: None,
            guidance: 0.0,
            seed: 0,
            batch: 16,
            clip_x0: true,
            dynamic_threshold: None,
            init: None,
            share_xt: false,
            inpaint: None,
        }
    }
}

impl GenerateRequest {
    /// The defaults with the sampler, steps and guidance the model recommends (if it does).
    pub fn recommended(info: &ModelMeta) -> Self {
        let mut r = Self::default();
        if let Some(rec) = &info.recommended {
            (r.sampler, r.steps, r.guidance) = (rec.sampler, rec.steps, rec.guidance);
        }
        r
    }
}

/// An open model and its noise schedule.
///
/// Threads: a `Generator` is `Send` (it can move to another thread); `generate` takes `&mut self`, so threads
/// share one behind a `Mutex` (calls then run one at a time) or open one each (ONNX Runtime's environment is
/// shared by the process; each session has its own threads). Either way a seed gives the same images as on one
/// thread (tests/threads.rs).
pub struct Generator {
    denoiser: OrtDenoiser,
    schedule: NoiseSchedule,
}

impl Generator {
    pub fn open(path: &Path, options: &GeneratorOptions) -> Result<Self> {
        let denoiser = OrtDenoiser::open(path, &options.provider, options.threads)?;
        let schedule = denoiser.info().noise_schedule();
        Ok(Self { denoiser, schedule })
    }

    /// What the model's metadata says about it.
    pub fn info(&self) -> &ModelMeta {
        self.denoiser.info()
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The provider that runs the model.
    pub fn provider(&self) -> ProviderKind {
        self.denoiser.provider()
    }

    /// Why faster providers were passed over (`Provider::Auto`); empty otherwise.
    pub fn provider_notes(&self) -> &[String] {
        self.denoiser.provider_notes()
    }

    /// Checks a request against the model and turns it into the sampler's form ([`Request::validate`]).
    pub fn plan(&self, req: &GenerateRequest) -> Result<Request> {
        let info = self.info();
        let method =
            Method::new(req.sampler, req.steps, req.eta, req.spacing, info.variance, self.schedule.num_timesteps())?;
        let labels = match (&req.class, info.num_classes) {
            (Some(c), _) => Some(vec![info.class_index(c)?; req.n]),
            (None, 0) => None,
            (None, k) => Some((0..req.n).map(|i| (i % k) as i64).collect()),
        };
        let mut r = Request::new(req.n, [info.channels, info.image_size, info.image_size], method);
        r.labels = labels;
        r.null_class = info.null_class;
        r.guidance = req.guidance;
        r.seed = req.seed;
        r.batch = req.batch;
        r.clip_x0 = req.clip_x0;
        r.dynamic_threshold = req.dynamic_threshold;
        r.init = req.init.clone();
        r.share_xt = req.share_xt;
        r.inpaint = req.inpaint.clone();
        r.validate()?;
        Ok(r)
    }

    /// Runs a planned request: images in [-1, 1], [n, c, h, w].
    pub fn sample(&mut self, plan: &Request, on_step: &mut dyn FnMut(&StepInfo)) -> Result<Vec<f32>> {
        sampler::sample(&mut self.denoiser, &self.schedule, plan, on_step)
    }

    /// Plans and runs a request: 8-bit images with their labels.
    pub fn generate(&mut self, req: &GenerateRequest, on_step: &mut dyn FnMut(&StepInfo)) -> Result<Images> {
        let plan = self.plan(req)?;
        let x = self.sample(&plan, on_step)?;
        Ok(Images::from_f32(&x, req.n, plan.shape, plan.labels))
    }
}

#[cfg(test)]
mod tests {
    //! `plan` needs an open model; the request checks it shares with the sampler are tested in sampler.rs and
    //! end to end (a real model) in tests/generate_cli.rs. Here: the recommended defaults.
    use super::*;
    use crate::metadata::{Dtype, Prediction, Recommended};
    use crate::schedule::{BetaSchedule, VarianceType};

    #[test]
    fn recommended_requests_take_the_models_sampling_and_default_otherwise() {
        let mut info = ModelMeta {
            betas: BetaSchedule::LINEAR.betas(10),
            prediction: Prediction::Epsilon,
            variance: VarianceType::FixedSmall,
            image_size: 8,
            channels: 1,
            num_classes: 2,
            class_names: vec![],
            null_class: Some(2),
            dtype: Dtype::F32,
            schedule: None,
            weights: None,
            training_steps: None,
            ema_decay: None,
            dataset: None,
            dataset_fingerprint: None,
            model_config: None,
            exporter: None,
            recommended: None,
            extra: Default::default(),
        };
        let d = GenerateRequest::recommended(&info);
        assert_eq!((d.sampler, d.steps, d.guidance), (SamplerKind::Ddim, 50, 0.0));
        info.recommended = Some(Recommended { sampler: SamplerKind::DpmSolverPP, steps: 10, guidance: 1.5 });
        let r = GenerateRequest::recommended(&info);
        assert_eq!((r.sampler, r.steps, r.guidance, r.n), (SamplerKind::DpmSolverPP, 10, 1.5, 16));
    }
}
