//! What to sample: the sampler and its settings ([`Method`]), the labels and their guidance, the shared
//! [`SampleOptions`], and the checks of a request on its own terms.

use crate::error::{Error, Result};
use crate::schedule::VarianceType;

/// How the sub-sequence of timesteps is chosen for DDIM / DPM-Solver (Lin et al. 2024, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Spacing {
    Leading,
    Linspace,
    /// Starts at T - 1, so the first step sees pure noise (Lin et al. 2024's recommendation).
    #[default]
    Trailing,
}

crate::named_enum!(Spacing, "timestep spacing", {
    Leading => ["leading"],
    Linspace => ["linspace"],
    Trailing => ["trailing"],
});

/// The samplers by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SamplerKind {
    /// DDIM (Song et al. 2020), `steps` steps, noise set by eta.
    #[default]
    Ddim,
    /// Ancestral DDPM (Ho et al. 2020, Algorithm 2) over `steps` timesteps, the chain respaced to them.
    Ddpm,
    /// DPM-Solver++(2M) (Lu et al. 2022): good in 10-20 steps.
    DpmSolverPP,
    /// Multistep consistency sampling (Song et al. 2023, Algorithm 1), for consistency-distilled students: the
    /// model's x0 at each step, noised afresh to the next timestep.
    Consistency,
}

crate::named_enum!(SamplerKind, "sampler", {
    Ddim => ["ddim"],
    Ddpm => ["ddpm"],
    DpmSolverPP => ["dpm++", "dpmpp", "dpm-solver++"],
    Consistency => ["consistency", "cm"],
});

/// `steps` timesteps out of 0..T, in decreasing order.
pub fn timesteps(num_train: usize, steps: usize, spacing: Spacing) -> Result<Vec<usize>> {
    if steps == 0 || steps > num_train {
        return Err(Error::request("steps", format!("must be in 1..={num_train} for this model, got {steps}")));
    }
    let t = num_train;
    let mut v: Vec<usize> = match spacing {
        Spacing::Leading => (0..steps).map(|i| i * (t / steps)).collect(),
        Spacing::Linspace => {
            (0..steps).map(|i| ((i as f64) * (t - 1) as f64 / (steps - 1).max(1) as f64).round() as usize).collect()
        }
        Spacing::Trailing => {
            (1..=steps).map(|i| ((i as f64 * t as f64 / steps as f64).round() as usize).max(1) - 1).collect()
        }
    };
    v.sort_unstable();
    v.dedup();
    v.reverse();
    Ok(v)
}

/// A sampler with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// Ancestral sampling (Ho et al. 2020, Algorithm 2) over `steps` of the T timesteps: the chain respaced
    /// to them (Nichol & Dhariwal 2021, sec. 4); steps = T is the original chain.
    Ddpm { steps: usize, spacing: Spacing, variance: VarianceType },
    /// Song et al. 2020, eq. 12; eta = 0 is deterministic, eta = 1 matches DDPM's beta-tilde variance.
    Ddim { steps: usize, eta: f64, spacing: Spacing },
    /// Lu et al. 2022 (DPM-Solver++), the second-order multistep variant 2M.
    DpmSolverPP { steps: usize, spacing: Spacing },
    /// Song et al. 2023, Algorithm 1 (multistep consistency sampling).
    Consistency { steps: usize, spacing: Spacing },
}

impl Method {
    /// The sampler `kind` for a schedule of `num_train` steps; `steps` must be in 1..=T, `eta` (DDIM only) in
    /// [0, 1]; `variance` is DDPM's.
    pub fn new(
        kind: SamplerKind,
        steps: usize,
        eta: f64,
        spacing: Spacing,
        variance: VarianceType,
        num_train: usize,
    ) -> Result<Self> {
        if !(1..=num_train).contains(&steps) {
            return Err(Error::request("steps", format!("must be in 1..={num_train} for this model, got {steps}")));
        }
        if kind == SamplerKind::Ddim && !(0.0..=1.0).contains(&eta) {
            return Err(Error::request("eta", format!("must be in [0, 1], got {eta}")));
        }
        Ok(match kind {
            SamplerKind::Ddim => Method::Ddim { steps, eta, spacing },
            SamplerKind::Ddpm => Method::Ddpm { steps, spacing, variance },
            SamplerKind::DpmSolverPP => Method::DpmSolverPP { steps, spacing },
            SamplerKind::Consistency => Method::Consistency { steps, spacing },
        })
    }

    /// The timesteps this method visits, decreasing.
    pub fn timesteps(&self, num_train: usize) -> Result<Vec<usize>> {
        match self {
            Method::Ddpm { steps, spacing, .. }
            | Method::Ddim { steps, spacing, .. }
            | Method::DpmSolverPP { steps, spacing }
            | Method::Consistency { steps, spacing } => timesteps(num_train, *steps, *spacing),
        }
    }

    pub fn kind(&self) -> SamplerKind {
        match self {
            Method::Ddpm { .. } => SamplerKind::Ddpm,
            Method::Ddim { .. } => SamplerKind::Ddim,
            Method::DpmSolverPP { .. } => SamplerKind::DpmSolverPP,
            Method::Consistency { .. } => SamplerKind::Consistency,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Request {
    pub n: usize,
    /// [c, h, w]
    pub shape: [usize; 3],
    pub method: Method,
    /// The labels of conditional models (None: unconditional, or all null): one per image, or with attributes
    /// `1 + attributes.len()` per image (the class, then each attribute), image by image.
    pub labels: Option<Vec<i64>>,
    /// The null class index of a conditional model (needed for guidance).
    pub null_class: Option<i64>,
    /// Guidance weight w: eps = (1 + w) eps(x, c) - w eps(x, null) (Ho & Salimans 2022, eq. 6). 0 = none.
    /// With attributes, the class's weight in the composition (see [`AttrCond`]).
    pub guidance: f32,
    /// The label columns beside the class of a multi-attribute model; empty for a class-only model.
    pub attributes: Vec<AttrCond>,
    /// Seed, batch, clipping, the guidance interval and the image-to-image parts: the options every caller
    /// shares (the library's request, `generate`, the C ABI, `trainer eval`).
    pub options: SampleOptions,
    /// The x_T of every image, [n, c, h, w], in place of the seed's draws (see [`seed_interpolation`](super::seed_interpolation)); the
    /// seed still drives the noise of later steps.
    pub start_noise: Option<Vec<f32>>,
}

/// How a request is sampled beyond the sampler and the labels: one struct for the sampler's [`Request`], the
/// library's `GenerateRequest`, the `generate` command line, the C ABI and `trainer eval`, so that no caller
/// copies these fields one by one.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOptions {
    /// Guide only at the timesteps of this interval, the conditional eps alone elsewhere (Kynkäänniemi et al.
    /// 2024); None: at every step.
    pub guidance_interval: Option<GuidanceInterval>,
    pub seed: u64,
    /// Images per denoiser call (the guided call evaluates 2x this).
    pub batch: usize,
    /// Clip the predicted x0 to [-1, 1] (on by default).
    pub clip_x0: bool,
    /// Dynamic thresholding percentile (Saharia et al. 2022, sec. 2.3), e.g. 0.995; None = off.
    pub dynamic_threshold: Option<f32>,
    /// Start from an image instead of pure noise (SDEdit); None: x_T ~ N(0, I).
    pub init: Option<InitImage>,
    /// Every image starts from the same x_T (or x_t of `init`): with a stochastic sampler (DDPM, DDIM with
    /// eta > 0) the images are variations of one another (Ho et al. 2020, sec. 4.3).
    pub share_xt: bool,
    /// Keep the known pixels of an image and generate the rest (RePaint).
    pub inpaint: Option<Inpaint>,
    /// Stops the run between two model calls once raised (a server's client went away, a time limit passed).
    pub cancel: Option<Cancel>,
}

impl Default for SampleOptions {
    /// Seed 0, 16 images per call, x0 clipped, guidance at every step, plain sampling from noise.
    fn default() -> Self {
        Self {
            guidance_interval: None,
            seed: 0,
            batch: 16,
            clip_x0: true,
            dynamic_threshold: None,
            init: None,
            share_xt: false,
            inpaint: None,
            cancel: None,
        }
    }
}

/// A flag another thread raises to stop a sampling run: the run checks it before each model call and returns
/// [`Error::Cancelled`](crate::Error::Cancelled) once it is up. Clones share the flag; two are equal when they
/// share it.
#[derive(Debug, Clone, Default)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the flag (every clone sees it).
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl PartialEq for Cancel {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// One attribute's part in a request: its null label and its guidance weight. A multi-attribute model is guided
/// by composing one conditional per attribute (Liu et al. 2022, "Compositional Visual Generation with
/// Composable Diffusion Models", eq. 10): eps~ = eps(x, null) + sum_i (1 + w_i) (eps(x, c_i) - eps(x, null)),
/// c_i the image's label i with every other label null; a null label's term is 0. With one label (the class)
/// this is Ho & Salimans' eq. 6. Unguided (all w 0, or outside the guidance interval) the model sees every
/// label at once, one evaluation per image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttrCond {
    pub null: i64,
    pub guidance: f32,
}

/// The timesteps, inclusive, at which classifier-free guidance is applied (Kynkäänniemi et al. 2024, "Applying
/// guidance in a limited interval improves sample and distribution quality"): guidance at high noise levels
/// pulls every sample of a class towards the same layout (it costs variety, and FID), at low noise levels it
/// does little; applied in between it keeps its fidelity at much less cost in variety. Outside it the sampler
/// takes the conditional eps alone, one model evaluation per image instead of two. Written `LO,HI`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuidanceInterval {
    pub lo: usize,
    pub hi: usize,
}

impl GuidanceInterval {
    pub fn contains(&self, t: usize) -> bool {
        (self.lo..=self.hi).contains(&t)
    }
}

impl std::fmt::Display for GuidanceInterval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{}", self.lo, self.hi)
    }
}

impl std::str::FromStr for GuidanceInterval {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("a guidance interval is two timesteps LO,HI (e.g. 100,700), got {s:?}");
        let (lo, hi) = s.split_once(',').ok_or_else(bad)?;
        let (lo, hi) = (lo.trim().parse().map_err(|_| bad())?, hi.trim().parse().map_err(|_| bad())?);
        if lo > hi {
            return Err(format!("guidance interval {s:?}: the first timestep is above the second"));
        }
        Ok(Self { lo, hi })
    }
}

/// SDEdit (Meng et al. 2021): the image is diffused by q(x_t | x0) to the timestep `strength` of the way to T and
/// denoised from there by the request's sampler, so the result keeps the image's layout and loses its detail
/// as the strength grows.
#[derive(Debug, Clone, PartialEq)]
pub struct InitImage {
    /// [c, h, w] in [-1, 1], the start of every image; or [n, c, h, w], one per image (see [`interpolation`](super::interpolation)).
    pub x0: Vec<f32>,
    /// In [0, 1]: the fraction of the sampler's steps that is run. 0 returns x0 unchanged; 1 starts from pure
    /// noise, as plain sampling does (the same images for the same seed).
    pub strength: f32,
}

/// RePaint (Lugmayr et al. 2022): after every reverse step the known pixels are replaced by a draw of
/// q(x_{t_next} | x0) (at the end, by x0 itself); the others are generated. With `resample` r > 1, every `jump`
/// steps the process is noised back `jump` steps and those steps are redone, r passes in all, which lets the
/// generated region agree with the known one (RePaint, Algorithm 1 and sec. 4.2).
#[derive(Debug, Clone, PartialEq)]
pub struct Inpaint {
    /// [c, h, w] in [-1, 1].
    pub x0: Vec<f32>,
    /// [h, w]: 1 where x0 is known and kept, 0 where the image is generated (values between blend).
    pub mask: Vec<f32>,
    /// Passes over each block of `jump` steps (1: no resampling).
    pub resample: usize,
    pub jump: usize,
}

impl Request {
    pub fn new(n: usize, shape: [usize; 3], method: Method) -> Self {
        Self {
            n,
            shape,
            method,
            labels: None,
            null_class: None,
            guidance: 0.0,
            attributes: vec![],
            options: SampleOptions::default(),
            start_noise: None,
        }
    }

    /// Labels per image: the class and each attribute.
    pub fn label_columns(&self) -> usize {
        1 + self.attributes.len()
    }

    /// The class of every image (the first label column).
    pub fn class_labels(&self) -> Option<Vec<i64>> {
        self.labels.as_ref().map(|l| l.iter().step_by(self.label_columns()).copied().collect())
    }

    /// Whether any label is guided.
    pub(crate) fn guided(&self) -> bool {
        self.guidance != 0.0 || self.attributes.iter().any(|a| a.guidance != 0.0)
    }

    /// The timesteps the reverse process visits, decreasing: the method's, cut to the strength of `init`.
    pub fn timesteps(&self, num_train: usize) -> Result<Vec<usize>> {
        let ts = self.method.timesteps(num_train)?;
        Ok(match &self.options.init {
            Some(init) => {
                let k = ((init.strength as f64 * ts.len() as f64).round() as usize).min(ts.len());
                ts[ts.len() - k..].to_vec()
            }
            None => ts,
        })
    }

    /// Denoiser calls (per chunk) of the reverse process, resampling jumps included.
    pub fn num_steps(&self, num_train: usize) -> Result<usize> {
        let len = self.timesteps(num_train)?.len();
        Ok(match &self.options.inpaint {
            Some(p) if p.resample > 1 && p.jump >= 1 => {
                let blocks = (p.jump..len).filter(|end| end % p.jump == 0).count();
                len + (p.resample - 1) * p.jump * blocks
            }
            _ => len,
        })
    }

    /// Checks the request on its own terms (counts, labels, guidance, the image-to-image parts against the
    /// shape); [`sample`](super::sample) runs it first.
    pub fn validate(&self) -> Result<()> {
        if self.n == 0 {
            return Err(Error::request("n", "must be at least 1"));
        }
        if self.options.batch == 0 {
            return Err(Error::request("batch", "must be at least 1"));
        }
        if let Some(l) = &self.labels {
            let cols = self.label_columns();
            if l.len() != self.n * cols {
                let per = if cols > 1 { format!(" ({cols} per image)") } else { String::new() };
                return Err(Error::request("labels", format!("{} labels for {} images{per}", l.len(), self.n)));
            }
        }
        for w in std::iter::once(self.guidance).chain(self.attributes.iter().map(|a| a.guidance)) {
            if !w.is_finite() || w < 0.0 {
                return Err(Error::request("guidance", format!("must be a finite number >= 0, got {w}")));
            }
        }
        if !self.attributes.is_empty() && (self.labels.is_none() || self.null_class.is_none()) {
            return Err(Error::request("attributes", "need a conditional model with a null class, and labels"));
        }
        if self.guidance != 0.0 && self.labels.is_none() {
            return Err(Error::request("guidance", "needs a class-conditional model and a class to guide towards"));
        }
        if self.guidance != 0.0 && self.null_class.is_none() {
            return Err(Error::request("guidance", "needs a model trained with a null class; this one has none"));
        }
        if let Some(g) = &self.options.guidance_interval {
            if g.lo > g.hi {
                return Err(Error::request(
                    "guidance_interval",
                    format!("{g}: the first timestep is above the second"),
                ));
            }
        }
        let per: usize = self.shape.iter().product();
        let hw = self.shape[1] * self.shape[2];
        if let Some(init) = &self.options.init {
            if init.x0.len() != per && init.x0.len() != self.n * per {
                return Err(Error::request(
                    "init",
                    format!("has {} values: one image has {per}, {} images {}", init.x0.len(), self.n, self.n * per),
                ));
            }
            if !(0.0..=1.0).contains(&init.strength) {
                return Err(Error::request("strength", format!("must be in [0, 1], got {}", init.strength)));
            }
        }
        if let Some(z) = &self.start_noise {
            if z.len() != self.n * per {
                return Err(Error::request(
                    "start_noise",
                    format!("has {} values, {} images {}", z.len(), self.n, self.n * per),
                ));
            }
        }
        if let Some(p) = &self.options.inpaint {
            if p.x0.len() != per {
                return Err(Error::request("inpaint", format!("has {} values, the model's images {per}", p.x0.len())));
            }
            if p.mask.len() != hw {
                return Err(Error::request(
                    "mask",
                    format!("has {} values, the model's images {hw} pixels", p.mask.len()),
                ));
            }
            if p.mask.iter().any(|m| !(0.0..=1.0).contains(m)) {
                return Err(Error::request("mask", "values must lie in [0, 1] (1 = known)"));
            }
            if p.resample == 0 || p.jump == 0 {
                return Err(Error::request("resample", "resample and jump must be at least 1"));
            }
        }
        Ok(())
    }
}
