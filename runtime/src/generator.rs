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
pub use crate::sampler::{Cancel, GuidanceInterval, InitImage, Inpaint, SampleOptions};
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
    /// Sampling steps, 1..=T (DDPM: the chain respaced to them; T is the original chain).
    pub steps: usize,
    /// DDIM's eta in [0, 1] (0: deterministic).
    pub eta: f64,
    pub spacing: Spacing,
    /// A class index or name; None on a conditional model cycles through the classes.
    pub class: Option<String>,
    /// Classifier-free guidance weight w >= 0 (0: none).
    pub guidance: f32,
    /// Attribute values of a multi-attribute model, by name (value by name or index), e.g. `("position",
    /// "3")`; an attribute not given is unknown (its null label).
    pub attributes: Vec<(String, String)>,
    /// Guidance weights of single attributes, by name; an attribute given a value and no weight here takes
    /// `guidance`. The labels are composed as in Liu et al. 2022 ([`sampler::AttrCond`]).
    pub attribute_guidance: Vec<(String, f32)>,
    /// Seed, images per model call (memory is bounded by it whatever n), clipping, the guidance interval and
    /// image-to-image (init, share_xt, inpaint): the sampler's own options, passed on as they are.
    pub options: SampleOptions,
    /// Interpolation: the `n` images are frames from one end to the other. Every frame has `class`; without
    /// one, on a conditional model, the null class (and so no guidance).
    pub interpolation: Option<Interpolation>,
}

/// What an interpolation runs between.
#[derive(Debug, Clone, PartialEq)]
pub enum Interpolation {
    /// Two images ([c, h, w] in [-1, 1]) noised to `strength` with the same noise and their latents mixed
    /// (Ho et al. 2020, fig. 8; [`sampler::interpolation`]): `strength` 1 keeps only the layout, small ones blend
    /// pixels (fig. 9).
    Images { a: Vec<f32>, b: Vec<f32>, strength: f32 },
    /// The starts x_T of two seeds, spherically interpolated (Song et al. 2020, sec. 5.3;
    /// [`sampler::seed_interpolation`]); `seed` is ignored.
    Seeds { a: u64, b: u64 },
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
            attributes: vec![],
            attribute_guidance: vec![],
            options: SampleOptions::default(),
            interpolation: None,
        }
    }
}

impl GenerateRequest {
    /// The defaults with the sampler, steps and guidance the model recommends (if it does).
    pub fn recommended(info: &ModelMeta) -> Self {
        let mut r = Self::default();
        if let Some(rec) = &info.recommended {
            (r.sampler, r.steps, r.guidance, r.options.guidance_interval) =
                (rec.sampler, rec.steps, rec.guidance, rec.guidance_interval);
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
        plan(self.info(), req)
    }

    /// Runs a planned request: images in [-1, 1], [n, c, h, w].
    pub fn sample(&mut self, plan: &Request, on_step: &mut dyn FnMut(&StepInfo)) -> Result<Vec<f32>> {
        sampler::sample(&mut self.denoiser, &self.schedule, plan, on_step)
    }

    /// Runs a planned request chunk by chunk ([`sampler::sample_chunks`]): memory bounded by `plan.options.batch`.
    pub fn sample_chunks(
        &mut self,
        plan: &Request,
        on_step: &mut dyn FnMut(&StepInfo),
        on_chunk: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        sampler::sample_chunks(&mut self.denoiser, &self.schedule, plan, on_step, on_chunk)
    }

    /// Plans and runs a request: 8-bit images with their labels.
    pub fn generate(&mut self, req: &GenerateRequest, on_step: &mut dyn FnMut(&StepInfo)) -> Result<Images> {
        let plan = self.plan(req)?;
        let x = self.sample(&plan, on_step)?;
        Ok(Images::from_f32(&x, req.n, plan.shape, plan.class_labels()))
    }
}

/// A request against a model's metadata in the sampler's form ([`Generator::plan`]).
pub fn plan(info: &ModelMeta, req: &GenerateRequest) -> Result<Request> {
    if info.student.is_some() || info.guidance_input.is_some() {
        student_request(info, req)?;
    }
    let method = Method::new(req.sampler, req.steps, req.eta, req.spacing, info.variance, info.num_timesteps())?;
    let labels = match (&req.class, info.num_classes) {
        (Some(c), _) => Some(vec![info.class_index(c)?; req.n]),
        (None, 0) => None,
        // no class: every frame of an interpolation unconditional, else the images cycle through the classes
        (None, _) if req.interpolation.is_some() => info.null_class.map(|n| vec![n; req.n]),
        (None, k) => Some((0..req.n).map(|i| (i % k) as i64).collect()),
    };
    let mut r = Request::new(req.n, [info.channels, info.image_size, info.image_size], method);
    r.null_class = info.null_class;
    r.guidance = if req.interpolation.is_some() && req.class.is_none() { 0.0 } else { req.guidance };
    r.labels = labels;
    if !info.attributes.is_empty() || !req.attributes.is_empty() || !req.attribute_guidance.is_empty() {
        with_attributes(info, req, &mut r)?;
    }
    if let Some(g) = req.options.guidance_interval.filter(|g| g.hi >= info.num_timesteps()) {
        return Err(crate::Error::request(
            "guidance_interval",
            format!("{g}: the model's timesteps run 0..={}", info.num_timesteps() - 1),
        ));
    }
    r.options = req.options.clone();
    r = match &req.interpolation {
        None => r,
        Some(_) if req.options.init.is_some() || req.options.inpaint.is_some() || req.options.share_xt => {
            return Err(crate::Error::request(
                "interpolation",
                "cannot be combined with init, inpaint or share_xt (it sets the starts itself)",
            ));
        }
        Some(Interpolation::Images { a, b, strength }) => sampler::interpolation(r, a, b, *strength, req.n)?,
        Some(Interpolation::Seeds { a, b }) => sampler::seed_interpolation(r, *a, *b, req.n)?,
    };
    r.validate()?;
    Ok(r)
}

/// What a distilled student can be asked: DDIM (eta 0, trailing) in exactly the steps it was distilled for (its
/// grid: other steps fall between the points it learned), guidance in the range it was trained on and at every
/// step (its interval, if its teacher had one, is inside it), no image-to-image.
fn student_request(info: &ModelMeta, req: &GenerateRequest) -> Result<()> {
    let bad = |field: &'static str, why: String| Err(crate::Error::request(field, why));
    if let Some(st) = &info.student {
        let how = match st.sampler {
            SamplerKind::Consistency => format!(
                "this model is a consistency student: sample it with the consistency sampler (trailing; {} steps recommended)",
                st.steps
            ),
            k => format!("this model is a {}-step student: sample it with {k} in {} steps (trailing)", st.steps, st.steps),
        };
        if req.sampler != st.sampler {
            return bad("sampler", format!("{}: {how}", req.sampler));
        }
        if req.steps != st.steps && st.sampler != SamplerKind::Consistency {
            return bad("steps", format!("{}: {how}", req.steps));
        }
        if req.spacing != Spacing::Trailing {
            return bad("spacing", format!("{}: {how}", req.spacing));
        }
        if req.eta != 0.0 {
            return bad("eta", format!("{}: {how} (eta 0)", req.eta));
        }
        if req.options.init.is_some()
            || req.options.inpaint.is_some()
            || matches!(req.interpolation, Some(Interpolation::Images { .. }))
        {
            return bad("init", "image-to-image, inpainting and image interpolation need a many-step model; this one is a few-step student".into());
        }
    }
    if let Some((lo, hi)) = info.guidance_input {
        if req.options.guidance_interval.is_some() {
            return bad("guidance_interval", "this model takes the guidance weight as an input and guides where it was distilled to; it has no interval to set".into());
        }
        if !(lo..=hi).contains(&req.guidance) {
            return bad(
                "guidance",
                format!("{}: this model was distilled for guidance weights {lo}..={hi}", req.guidance),
            );
        }
        if !req.attribute_guidance.is_empty() {
            return bad("attribute_guidance", "this model takes one guidance weight as an input".into());
        }
    }
    Ok(())
}

/// NAME=VALUE as the command lines take attributes and their weights (`--attr position=3`, `--attr-guidance
/// position=4`).
pub fn parse_pair<T: std::str::FromStr>(s: &str) -> std::result::Result<(String, T), String>
where
    T::Err: std::fmt::Display,
{
    let (k, v) = s.split_once('=').ok_or_else(|| format!("'{s}' is not NAME=VALUE"))?;
    let v = v.trim().parse().map_err(|e| format!("'{v}' in '{s}': {e}"))?;
    Ok((k.trim().to_string(), v))
}

/// Widens the plan's class labels to [class, attribute..] per image, with the attributes' nulls and weights.
fn with_attributes(info: &ModelMeta, req: &GenerateRequest, r: &mut Request) -> Result<()> {
    let mut values: Vec<i64> = info.attributes.iter().map(|a| a.null()).collect();
    for (name, v) in &req.attributes {
        let (i, a) = info.attribute(name)?;
        values[i] = a.index(v)?;
    }
    let mut weights: Vec<f32> =
        values.iter().zip(&info.attributes).map(|(&v, a)| if v == a.null() { 0.0 } else { r.guidance }).collect();
    for (name, w) in &req.attribute_guidance {
        weights[info.attribute(name)?.0] = *w;
    }
    r.attributes = info
        .attributes
        .iter()
        .zip(weights)
        .map(|(a, guidance)| sampler::AttrCond { null: a.null(), guidance })
        .collect();
    let class = r.labels.take().unwrap_or_else(|| vec![info.null_class.unwrap_or(0); r.n]);
    r.labels = Some(class.iter().flat_map(|&c| std::iter::once(c).chain(values.iter().copied())).collect());
    Ok(())
}

#[cfg(test)]
mod tests {
    //! `plan` needs an open model; the request checks it shares with the sampler are tested in sampler.rs and
    //! end to end (a real model) in tests/generate_cli.rs. Here: the recommended defaults.
    use super::*;
    use crate::metadata::{Dtype, Prediction, Recommended};
    use crate::schedule::{BetaSchedule, VarianceType};

    fn info() -> ModelMeta {
        ModelMeta {
            betas: BetaSchedule::LINEAR.betas(10),
            prediction: Prediction::Epsilon,
            variance: VarianceType::FixedSmall,
            image_size: 2,
            channels: 1,
            num_classes: 2,
            class_names: vec![],
            null_class: Some(2),
            attributes: vec![],
            dtype: Dtype::F32,
            schedule: None,
            weights: None,
            training_steps: None,
            ema_decay: None,
            dataset: None,
            dataset_fingerprint: None,
            model_config: None,
            exporter: None,
            background: None,
            recommended: None,
            student: None,
            guidance_input: None,
            extra: Default::default(),
        }
    }

    #[test]
    fn recommended_requests_take_the_models_sampling_and_default_otherwise() {
        let mut info = info();
        let d = GenerateRequest::recommended(&info);
        assert_eq!((d.sampler, d.steps, d.guidance, d.options.guidance_interval), (SamplerKind::Ddim, 50, 0.0, None));
        let interval = Some(GuidanceInterval { lo: 2, hi: 6 });
        info.recommended = Some(Recommended {
            sampler: SamplerKind::DpmSolverPP,
            steps: 10,
            guidance: 1.5,
            guidance_interval: interval,
        });
        let r = GenerateRequest::recommended(&info);
        assert_eq!((r.sampler, r.steps, r.guidance, r.n), (SamplerKind::DpmSolverPP, 10, 1.5, 16));
        assert_eq!(
            plan(&info, &GenerateRequest { steps: 5, ..r.clone() }).unwrap().options.guidance_interval,
            interval
        );
        let options =
            SampleOptions { guidance_interval: Some(GuidanceInterval { lo: 2, hi: 10 }), ..r.options.clone() };
        let past_t = GenerateRequest { steps: 5, options, ..r };
        let e = plan(&info, &past_t).unwrap_err();
        assert!(e.to_string().contains("timesteps run 0..=9"), "{e}");
    }

    #[test]
    fn a_student_is_planned_in_its_own_steps_and_guidance_range_only() {
        let mut info = info();
        info.student = Some(crate::metadata::Student {
            method: "progressive".into(),
            sampler: SamplerKind::Ddim,
            steps: 2,
            teacher_steps: 8,
            teacher: "t.onnx".into(),
            teacher_sha256: "ab".into(),
        });
        info.guidance_input = Some((0.0, 4.0));
        info.recommended =
            Some(Recommended { sampler: SamplerKind::Ddim, steps: 2, guidance: 2.0, guidance_interval: None });
        let r = GenerateRequest::recommended(&info);
        let p = plan(&info, &r).unwrap();
        assert_eq!((p.method, p.guidance), (Method::Ddim { steps: 2, eta: 0.0, spacing: Spacing::Trailing }, 2.0));
        let field = |req: GenerateRequest| match plan(&info, &req).unwrap_err() {
            crate::Error::InvalidRequest { field, reason } => {
                assert!(!reason.is_empty());
                field
            }
            e => panic!("{e}"),
        };
        assert_eq!(field(GenerateRequest { steps: 10, ..r.clone() }), "steps");
        assert_eq!(field(GenerateRequest { sampler: SamplerKind::DpmSolverPP, ..r.clone() }), "sampler");
        assert_eq!(field(GenerateRequest { spacing: Spacing::Leading, ..r.clone() }), "spacing");
        assert_eq!(field(GenerateRequest { eta: 1.0, ..r.clone() }), "eta");
        assert_eq!(field(GenerateRequest { guidance: 4.5, ..r.clone() }), "guidance");
        let interval =
            SampleOptions { guidance_interval: Some(GuidanceInterval { lo: 2, hi: 6 }), ..r.options.clone() };
        assert_eq!(field(GenerateRequest { options: interval, ..r.clone() }), "guidance_interval");
        let init =
            SampleOptions { init: Some(sampler::InitImage { x0: vec![0.0; 4], strength: 0.5 }), ..r.options.clone() };
        assert_eq!(field(GenerateRequest { options: init, ..r.clone() }), "init");
        // every weight of its range, 0 included
        assert!(plan(&info, &GenerateRequest { guidance: 4.0, ..r.clone() }).is_ok());
        assert!(plan(&info, &GenerateRequest { guidance: 0.0, ..r }).is_ok());
    }

    #[test]
    fn attributes_are_planned_by_name_with_their_nulls_and_weights() {
        use crate::metadata::Attribute;
        let mut info = info();
        info.attributes = vec![
            Attribute { name: "position".into(), values: ["tl", "tr", "bl", "br"].map(String::from).to_vec() },
            Attribute { name: "size".into(), values: ["small", "large"].map(String::from).to_vec() },
        ];
        let req = GenerateRequest {
            n: 2,
            steps: 4,
            class: Some("1".into()),
            guidance: 2.0,
            attributes: vec![("position".into(), "br".into())],
            ..Default::default()
        };
        let p = plan(&info, &req).unwrap();
        // class, position, size (unknown: its null) per image
        assert_eq!(p.labels.as_deref(), Some(&[1, 3, 2, 1, 3, 2][..]));
        let w: Vec<(i64, f32)> = p.attributes.iter().map(|a| (a.null, a.guidance)).collect();
        assert_eq!(w, vec![(4, 2.0), (2, 0.0)], "a given attribute takes --guidance, an unknown one none");
        let weighted = GenerateRequest { attribute_guidance: vec![("position".into(), 0.5)], ..req.clone() };
        assert_eq!(plan(&info, &weighted).unwrap().attributes[0].guidance, 0.5);
        let by_index = GenerateRequest { attributes: vec![("size".into(), "1".into())], ..req.clone() };
        assert_eq!(plan(&info, &by_index).unwrap().labels.as_deref(), Some(&[1, 4, 1, 1, 4, 1][..]));
        for (bad, needle) in [
            (("colour", "red"), "unknown attribute 'colour': this model's attributes are position, size"),
            (("position", "middle"), "unknown value 'middle' of position: its values are 0..3 (tl, tr, bl, br)"),
            (("size", "2"), "its values are 0..1"),
        ] {
            let r = GenerateRequest { attributes: vec![(bad.0.into(), bad.1.into())], ..req.clone() };
            let e = plan(&info, &r).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        // a class-only model has none to take
        let e = plan(&self::info(), &req).unwrap_err().to_string();
        assert!(e.contains("this model has no attributes besides its class"), "{e}");
    }

    #[test]
    fn interpolations_are_planned_as_frames_with_one_label() {
        let info = info();
        let (a, b) = (vec![-1.0; 4], vec![1.0; 4]);
        let images = Interpolation::Images { a: a.clone(), b: b.clone(), strength: 0.5 };
        let req = GenerateRequest { n: 5, steps: 4, guidance: 2.0, interpolation: Some(images), ..Default::default() };
        // no class: every frame takes the null class, unguided
        let p = plan(&info, &req).unwrap();
        assert_eq!((p.n, p.labels.as_deref(), p.guidance, p.options.share_xt), (5, Some(&[2i64; 5][..]), 0.0, true));
        let init = p.options.init.unwrap();
        assert_eq!((&init.x0[..4], &init.x0[16..], init.strength), (&a[..], &b[..], 0.5));
        assert_eq!(init.x0[8..12], [0.0; 4]);
        // a class: every frame has it, guided
        let p = plan(&info, &GenerateRequest { class: Some("1".into()), ..req.clone() }).unwrap();
        assert_eq!((p.labels.as_deref(), p.guidance), (Some(&[1i64; 5][..]), 2.0));
        let seeds = GenerateRequest { interpolation: Some(Interpolation::Seeds { a: 3, b: 4 }), ..req.clone() };
        let p = plan(&info, &seeds).unwrap();
        assert_eq!((p.options.seed, p.start_noise.map(|z| z.len())), (3, Some(20)));
        let one = GenerateRequest { n: 1, ..req.clone() };
        assert!(plan(&info, &one).unwrap_err().to_string().contains("frames"));
        let both = GenerateRequest { options: SampleOptions { share_xt: true, ..Default::default() }, ..req };
        assert!(plan(&info, &both).unwrap_err().to_string().contains("cannot be combined"));
    }
}
