//! The samplers, written once against [`Denoiser`]: DDPM ancestral sampling, DDIM, DPM-Solver++(2M), and
//! classifier-free guidance. ONNX Runtime (deployment) and the trainer's Candle model (previews,
//! evaluation) both implement `Denoiser`, so the same code path is exercised by both.
//!
//! Each sampler is one step function (x_t and the predicted x0 at t -> x at the next timestep) with its
//! equation in the doc comment; [`sample`] drives them all with one loop: draw x_T, then at every timestep ask
//! the denoiser for eps (guided), turn it into x0, clip, step.
//!
//! All sampler arithmetic is f32 on the host whatever the model's dtype. Every image draws its noise from
//! its own ChaCha8 stream (seed, image index), so results do not depend on how `n` is split into batches.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};
use crate::metadata::Prediction;
use crate::schedule::{NoiseSchedule, VarianceType};

/// A noise-prediction model: eps_theta(x_t, t, y).
pub trait Denoiser {
    /// `x` is [n, c, h, w] row-major, `t` has n entries, `y` n (the class) or, for a multi-attribute model,
    /// n x (1 + A) (the class, then each attribute, image by image). Returns eps, the same size as x.
    /// `y` is None for unconditional models; a null label means "unknown". An implementation wraps its own
    /// failures with [`Error::denoiser`].
    fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>>;

    /// eps and, for a model that learns its variance, its second output v (the same size as x; Nichol &
    /// Dhariwal 2021, eq. 15). The default is [`Denoiser::eps`] with no v: a fixed-variance model.
    fn eps_and_v(
        &mut self,
        x: &[f32],
        shape: [usize; 4],
        t: &[i64],
        y: Option<&[i64]>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        Ok((self.eps(x, shape, t, y)?, None))
    }

    /// What the first output is: eps (the default), or the velocity of a v-predicting model, which
    /// [`predict_eps`] turns into eps for the samplers.
    fn prediction(&self) -> Prediction {
        Prediction::Epsilon
    }
}

/// The denoiser's eps at timestep `t` for the `shape[0]` images `x`, and for a learned variance (`want_v`) its
/// v output: the model's first output as it is, or, from a v-predicting model, turned into eps
/// (Salimans & Ho 2022, sec. 4). The samplers and the likelihood ask the model through this one function.
pub fn predict_eps(
    den: &mut dyn Denoiser,
    sched: &NoiseSchedule,
    x: &[f32],
    shape: [usize; 4],
    t: usize,
    y: Option<&[i64]>,
    want_v: bool,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let ts = vec![t as i64; shape[0]];
    let (mut out, v) = if want_v {
        match den.eps_and_v(x, shape, &ts, y)? {
            (_, None) => return Err(Error::denoiser("the model learns its variance but gave no v output")),
            out => out,
        }
    } else {
        (den.eps(x, shape, &ts, y)?, None)
    };
    if den.prediction() == Prediction::V {
        sched.eps_from_v(x, t, &mut out);
    }
    Ok((out, v))
}

/// Splits a model output of 2C channels per image, [n, 2c, h, w], into eps and v, each [n, c, h, w].
pub fn split_eps_v(out: &[f32], n: usize, per: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut eps, mut v) = (Vec::with_capacity(n * per), Vec::with_capacity(n * per));
    for img in out.chunks(2 * per).take(n) {
        eps.extend_from_slice(&img[..per]);
        v.extend_from_slice(&img[per..]);
    }
    (eps, v)
}

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
}

crate::named_enum!(SamplerKind, "sampler", {
    Ddim => ["ddim"],
    Ddpm => ["ddpm"],
    DpmSolverPP => ["dpm++", "dpmpp", "dpm-solver++"],
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
        })
    }

    /// The timesteps this method visits, decreasing.
    pub fn timesteps(&self, num_train: usize) -> Result<Vec<usize>> {
        match self {
            Method::Ddpm { steps, spacing, .. }
            | Method::Ddim { steps, spacing, .. }
            | Method::DpmSolverPP { steps, spacing } => timesteps(num_train, *steps, *spacing),
        }
    }

    pub fn kind(&self) -> SamplerKind {
        match self {
            Method::Ddpm { .. } => SamplerKind::Ddpm,
            Method::Ddim { .. } => SamplerKind::Ddim,
            Method::DpmSolverPP { .. } => SamplerKind::DpmSolverPP,
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
    /// The x_T of every image, [n, c, h, w], in place of the seed's draws (see [`seed_interpolation`]); the
    /// seed still drives the noise of later steps.
    pub start_noise: Option<Vec<f32>>,
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
    /// [c, h, w] in [-1, 1], the start of every image; or [n, c, h, w], one per image (see [`interpolation`]).
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
            guidance_interval: None,
            seed: 0,
            batch: 16,
            clip_x0: true,
            dynamic_threshold: None,
            init: None,
            share_xt: false,
            inpaint: None,
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
    fn guided(&self) -> bool {
        self.guidance != 0.0 || self.attributes.iter().any(|a| a.guidance != 0.0)
    }

    /// The timesteps the reverse process visits, decreasing: the method's, cut to the strength of `init`.
    pub fn timesteps(&self, num_train: usize) -> Result<Vec<usize>> {
        let ts = self.method.timesteps(num_train)?;
        Ok(match &self.init {
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
        Ok(match &self.inpaint {
            Some(p) if p.resample > 1 && p.jump >= 1 => {
                let blocks = (p.jump..len).filter(|end| end % p.jump == 0).count();
                len + (p.resample - 1) * p.jump * blocks
            }
            _ => len,
        })
    }

    /// Checks the request on its own terms (counts, labels, guidance, the image-to-image parts against the
    /// shape); [`sample`] runs it first.
    pub fn validate(&self) -> Result<()> {
        if self.n == 0 {
            return Err(Error::request("n", "must be at least 1"));
        }
        if self.batch == 0 {
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
        if let Some(g) = &self.guidance_interval {
            if g.lo > g.hi {
                return Err(Error::request(
                    "guidance_interval",
                    format!("{g}: the first timestep is above the second"),
                ));
            }
        }
        let per: usize = self.shape.iter().product();
        let hw = self.shape[1] * self.shape[2];
        if let Some(init) = &self.init {
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
        if let Some(p) = &self.inpaint {
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

/// Progress reported after each denoising step of each chunk.
pub struct StepInfo<'a> {
    /// First image index of this chunk.
    pub chunk_start: usize,
    pub step: usize,
    pub num_steps: usize,
    pub t: usize,
    /// The current x_t (after the step) and the predicted x0 of this step, [k, c, h, w].
    pub x: &'a [f32],
    pub x0: &'a [f32],
}

/// A class given as an index or a name, for a model with `num_classes` classes named `names`.
pub fn class_index(names: &[String], num_classes: usize, s: &str) -> Result<i64> {
    if num_classes == 0 {
        return Err(Error::request("class", format!("{s}: this model is unconditional (it has no classes)")));
    }
    if let Some(i) = names.iter().position(|n| n == s) {
        return Ok(i as i64);
    }
    match s.parse::<usize>() {
        Ok(i) if i < num_classes => Ok(i as i64),
        _ => Err(Error::request(
            "class",
            format!("unknown class '{s}': this model's classes are 0..{} ({})", num_classes - 1, names.join(", ")),
        )),
    }
}

/// Records a reverse-process strip: x_t and the predicted x0 of the first `rows` images of the first chunk at
/// `cols` evenly spaced steps. Feed it every [`StepInfo`]; [`Strip::tiles`] lays the frames out row-major.
pub struct Strip {
    rows: usize,
    per: usize,
    want: Vec<usize>,
    /// (t, x_t, x0) per captured step.
    frames: Vec<(usize, Vec<f32>, Vec<f32>)>,
}

impl Strip {
    /// `num_steps`: the sampler's steps per chunk; `per`: values per image; `rows` is capped by the caller's
    /// batch (only the first chunk is recorded).
    pub fn new(num_steps: usize, cols: usize, rows: usize, per: usize) -> Self {
        let cols = cols.clamp(1, num_steps.max(1));
        let want = (0..cols).map(|k| k * (num_steps.max(1) - 1) / (cols - 1).max(1)).collect();
        Self { rows, per, want, frames: vec![] }
    }

    pub fn record(&mut self, s: &StepInfo) {
        let rows = self.rows.min(s.x.len() / self.per);
        if s.chunk_start == 0 && self.want.contains(&s.step) && self.frames.len() < self.want.len() {
            self.frames.push((s.t, s.x[..rows * self.per].to_vec(), s.x0[..rows * self.per].to_vec()));
        }
    }

    /// The timestep of each column.
    pub fn timesteps(&self) -> Vec<usize> {
        self.frames.iter().map(|f| f.0).collect()
    }

    /// (tiles, columns): for each image a row of x_t then a row of predicted x0, one column per captured step.
    pub fn tiles(&self) -> (Vec<f32>, usize) {
        let rows = self.frames.first().map_or(0, |f| f.1.len() / self.per);
        let mut tiles = vec![];
        for i in 0..rows {
            for which in 0..2 {
                for (_, x, x0) in &self.frames {
                    let src = if which == 0 { x } else { x0 };
                    tiles.extend_from_slice(&src[i * self.per..(i + 1) * self.per]);
                }
            }
        }
        (tiles, self.frames.len())
    }
}

/// Generates `req.n` images in [-1, 1] (clipped), [n, c, h, w].
pub fn sample(
    den: &mut dyn Denoiser,
    sched: &NoiseSchedule,
    req: &Request,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    sample_chunks(den, sched, req, on_step, &mut |_, x| {
        // sized once the request has passed `validate` (a hostile n is refused, not allocated)
        if out.is_empty() {
            out.reserve_exact(req.n * req.shape.iter().product::<usize>());
        }
        out.extend_from_slice(x);
        Ok(())
    })?;
    Ok(out)
}

/// Generates `req.n` images `req.batch` at a time, handing each chunk (in [-1, 1], clipped, [k, c, h, w]) to
/// `on_chunk` with the index of its first image: the working memory is one chunk's, whatever `n` (the images
/// are the same as [`sample`]'s). An error from `on_chunk` stops the sampling and is returned.
pub fn sample_chunks(
    den: &mut dyn Denoiser,
    sched: &NoiseSchedule,
    req: &Request,
    on_step: &mut dyn FnMut(&StepInfo),
    on_chunk: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    req.validate()?;
    let mut start = 0;
    while start < req.n {
        let k = req.batch.min(req.n - start);
        let cols = req.label_columns();
        let labels = req.labels.as_ref().map(|l| &l[start * cols..(start + k) * cols]);
        let mut x = sample_chunk(den, sched, req, start, k, labels, on_step)?;
        for v in x.iter_mut() {
            *v = v.clamp(-1.0, 1.0);
        }
        on_chunk(start, &x)?;
        start += k;
    }
    Ok(())
}

/// eps for a chunk, with classifier-free guidance batched into one call, and the model's v when `want_v` (a
/// learned variance: the conditional half's, as in GLIDE's reference sampler; guidance moves the mean only).
#[allow(clippy::too_many_arguments)]
fn guided_eps(
    den: &mut dyn Denoiser,
    sched: &NoiseSchedule,
    req: &Request,
    x: &[f32],
    k: usize,
    t: usize,
    labels: Option<&[i64]>,
    want_v: bool,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let [c, h, w] = req.shape;
    let guides = req.guided() && req.guidance_interval.is_none_or(|g| g.contains(t));
    let mut call = |x: &[f32], n: usize, y: Option<&[i64]>| predict_eps(den, sched, x, [n, c, h, w], t, y, want_v);
    match (guides, labels, req.null_class) {
        (true, Some(l), Some(null)) if !req.attributes.is_empty() => {
            // Liu et al. 2022, eq. 10, batched: rows [null | c_0 | c_1 | ..], c_i label i alone
            let cols = req.label_columns();
            let nulls: Vec<i64> = std::iter::once(null).chain(req.attributes.iter().map(|a| a.null)).collect();
            let mut ys = Vec::with_capacity((cols + 1) * k * cols);
            for part in 0..=cols {
                for img in l.chunks(cols) {
                    ys.extend((0..cols).map(|c| if part == c + 1 { img[c] } else { nulls[c] }));
                }
            }
            let xs: Vec<f32> = (0..=cols).flat_map(|_| x.iter().copied()).collect();
            let (e, v) = call(&xs, (cols + 1) * k, Some(&ys))?;
            let parts: Vec<&[f32]> = e.chunks(x.len()).collect();
            let weights: Vec<f32> =
                std::iter::once(req.guidance).chain(req.attributes.iter().map(|a| a.guidance)).collect();
            let mut out = parts[0].to_vec();
            for (c, w) in weights.iter().enumerate() {
                for (o, (a, b)) in out.iter_mut().zip(parts[c + 1].iter().zip(parts[0])) {
                    *o += (1.0 + w) * (a - b);
                }
            }
            // the variance of the class's conditional, as with one label
            Ok((out, v.map(|v| v[x.len()..2 * x.len()].to_vec())))
        }
        (true, Some(l), Some(null)) => {
            let mut x2 = Vec::with_capacity(2 * x.len());
            x2.extend_from_slice(x);
            x2.extend_from_slice(x);
            let mut y2 = l.to_vec();
            y2.extend(std::iter::repeat_n(null, k));
            let (e, mut v) = call(&x2, 2 * k, Some(&y2))?;
            let (cond, unc) = e.split_at(x.len());
            let wt = req.guidance;
            if let Some(v) = v.as_mut() {
                v.truncate(x.len());
            }
            // Ho & Salimans 2022, eq. 6: eps~ = (1 + w) eps(z, c) - w eps(z)
            Ok((cond.iter().zip(unc).map(|(a, b)| (1.0 + wt) * a - wt * b).collect(), v))
        }
        _ => call(x, k, labels),
    }
}

/// Clipping / dynamic thresholding of a predicted x0, per image.
fn threshold_x0(x0: &mut [f32], per: usize, req: &Request) {
    if let Some(p) = req.dynamic_threshold {
        for img in x0.chunks_mut(per) {
            // Saharia et al. 2022, sec. 2.3: s = max(1, percentile(|x0|, p)); x0 = clip(x0, -s, s) / s
            let mut a: Vec<f32> = img.iter().map(|v| v.abs()).collect();
            let idx = ((p as f64 * (a.len() - 1) as f64).round() as usize).min(a.len() - 1);
            let s = *a.select_nth_unstable_by(idx, |x, y| x.total_cmp(y)).1;
            let s = s.max(1.0);
            for v in img.iter_mut() {
                *v = v.clamp(-s, s) / s;
            }
        }
    } else if req.clip_x0 {
        for v in x0.iter_mut() {
            *v = v.clamp(-1.0, 1.0);
        }
    }
}

/// One N(0, I) draw per value, each image from its own stream.
fn noise(rngs: &mut [ChaCha8Rng], per: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rngs.len() * per);
    for r in rngs.iter_mut() {
        v.extend((0..per).map(|_| -> f32 { StandardNormal.sample(r) }));
    }
    v
}

/// alpha_bar at a timestep; 1 past the end of the chain (no noise left).
fn alpha_bar(sched: &NoiseSchedule, t: Option<usize>) -> f64 {
    t.map_or(1.0, |t| sched.alphas_cumprod[t])
}

/// DDPM (Ho et al. 2020, Algorithm 2, line 4, with the posterior mean of eq. 7) at index `i` of the
/// (respaced) chain `chain`:
///
///   x_{i-1} = mu~_i(x_i, x0) + sigma_i z,
///   mu~_i = sqrt(a_bar_{i-1}) beta_i / (1 - a_bar_i) x0 + sqrt(a_i) (1 - a_bar_{i-1}) / (1 - a_bar_i) x_i
///
/// with sigma_i^2 = beta~_i or beta_i (`variance`), or per pixel from the model's `v` (Nichol & Dhariwal
/// 2021, eq. 15, on the respaced bounds), and no noise on the last step (i = 0).
fn ddpm_step(
    chain: &NoiseSchedule,
    x: &[f32],
    x0: &[f32],
    i: usize,
    variance: VarianceType,
    v: Option<&[f32]>,
    rngs: &mut [ChaCha8Rng],
) -> Vec<f32> {
    let mut out = chain.posterior_mean(x0, x, i);
    if i == 0 {
        return out;
    }
    let z = noise(rngs, x.len() / rngs.len());
    match (chain.reverse_variance(i, variance), v) {
        (Some(var), _) => {
            let sd = var.sqrt() as f32;
            out.iter_mut().zip(&z).for_each(|(m, z)| *m += sd * z);
        }
        (None, Some(v)) => {
            for ((m, z), v) in out.iter_mut().zip(&z).zip(v) {
                *m += (0.5 * chain.learned_log_variance(i, *v)).exp() as f32 * z;
            }
        }
        (None, None) => unreachable!("guided_eps refuses a learned variance without v"),
    }
    out
}

/// DDIM (Song et al. 2020, eq. 12), from t to the next timestep `t_next` (None: the end, a_bar = 1):
///
///   x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
///   sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)   (eq. 16)
///
/// where eps is recomputed from the (possibly clipped) x0 so that the two agree.
fn ddim_step(
    sched: &NoiseSchedule,
    x: &[f32],
    x0: &[f32],
    t: usize,
    t_next: Option<usize>,
    eta: f64,
    rngs: &mut [ChaCha8Rng],
) -> Vec<f32> {
    let (a_t, a_prev) = (alpha_bar(sched, Some(t)), alpha_bar(sched, t_next));
    let eps = sched.eps_from_x0(x, t, x0);
    let sigma = eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).sqrt();
    let dir = (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
    let (sa, dir, sg) = (a_prev.sqrt() as f32, dir as f32, sigma as f32);
    let mut out: Vec<f32> = x0.iter().zip(&eps).map(|(x0, e)| sa * x0 + dir * e).collect();
    if sigma > 0.0 {
        let z = noise(rngs, x.len() / rngs.len());
        out.iter_mut().zip(&z).for_each(|(o, z)| *o += sg * z);
    }
    out
}

/// The previous DPM-Solver++ step: its predicted x0 and its step size h in log-SNR.
struct History {
    x0: Vec<f32>,
    h: f64,
}

/// DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), from t to `t_next`, with lambda = log(alpha / sigma):
///
///   h = lambda_next - lambda_t,  D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev,  r = h_prev / h
///   x_next = (sigma_next / sigma_t) x_t - alpha_next (e^{-h} - 1) D
///
/// `prev` None makes it first order (D = x0_t: the DDIM step). The last step (`t_next` None, sigma = 0)
/// returns x0 itself. Returns x_next and h.
fn dpmpp_2m_step(
    sched: &NoiseSchedule,
    x: &[f32],
    x0: &[f32],
    t: usize,
    t_next: Option<usize>,
    prev: Option<&History>,
) -> (Vec<f32>, f64) {
    let Some(tn) = t_next else {
        return (x0.to_vec(), 0.0);
    };
    let lambda = |a: f64| 0.5 * (a / (1.0 - a)).ln();
    let (a_t, a_n) = (alpha_bar(sched, Some(t)), alpha_bar(sched, Some(tn)));
    let h = lambda(a_n) - lambda(a_t);
    let (sig_t, sig_n, alpha_n) = ((1.0 - a_t).sqrt(), (1.0 - a_n).sqrt(), a_n.sqrt());
    let d: Vec<f32> = match prev {
        Some(p) => {
            let r = p.h / h;
            let (c1, c2) = ((1.0 + 0.5 / r) as f32, (0.5 / r) as f32);
            x0.iter().zip(&p.x0).map(|(a, b)| c1 * a - c2 * b).collect()
        }
        None => x0.to_vec(),
    };
    let (c1, c2) = ((sig_n / sig_t) as f32, (alpha_n * ((-h).exp() - 1.0)) as f32);
    (x.iter().zip(&d).map(|(x, d)| c1 * x - c2 * d).collect(), h)
}

/// RePaint (Lugmayr et al. 2022, eq. 8): x_next = m x_next^known + (1 - m) x_next^unknown with
/// x_next^known ~ q(x_{t_next} | x0), and x0 itself after the last step.
fn keep_known(x: &mut [f32], p: &Inpaint, sched: &NoiseSchedule, t_next: Option<usize>, rngs: &mut [ChaCha8Rng]) {
    let per = p.x0.len();
    let hw = p.mask.len();
    let known: Vec<f32> = match t_next {
        Some(tn) => {
            let z = noise(rngs, per);
            z.chunks(per).flat_map(|z| sched.q_sample(&p.x0, tn, z)).collect()
        }
        None => p.x0.repeat(rngs.len()),
    };
    for (i, (v, k)) in x.iter_mut().zip(&known).enumerate() {
        let m = p.mask[i % per % hw];
        *v = m * k + (1.0 - m) * *v;
    }
}

/// Noises x at timestep `t_now` back up to the earlier (noisier) `t_back`: q(x_back | x_now) =
/// N(sqrt(a_bar_back / a_bar_now) x_now, (1 - a_bar_back / a_bar_now) I) (RePaint, Algorithm 1, line 13).
fn renoise(sched: &NoiseSchedule, x: &[f32], t_now: usize, t_back: usize, rngs: &mut [ChaCha8Rng]) -> Vec<f32> {
    let a = sched.alphas_cumprod[t_back] / sched.alphas_cumprod[t_now];
    let (c1, c2) = (a.sqrt() as f32, (1.0 - a).sqrt() as f32);
    let z = noise(rngs, x.len() / rngs.len());
    x.iter().zip(&z).map(|(x, z)| c1 * x + c2 * z).collect()
}

impl InitImage {
    /// The start image of image `i`.
    fn image(&self, i: usize, per: usize) -> &[f32] {
        if self.x0.len() == per {
            &self.x0
        } else {
            &self.x0[i * per..(i + 1) * per]
        }
    }
}

/// Interpolation between two images through their diffused latents (Ho et al. 2020, sec. 4.3 and fig. 8):
/// both are noised by q(x_t | x0) to the timestep at `strength` with the same noise, and each of `frames` linear
/// mixes x_t = (1 - l) x_t(a) + l x_t(b), l evenly spaced in [0, 1], is denoised by the request's sampler. With
/// shared noise the mix of latents is the mix of images noised, so this sets `init` to the mixed images and
/// `share_xt`; frame 0 is exactly the image-to-image result of `a` with a shared x_t (and the last of `b`).
/// `strength` sets coarse (1: only the layout survives) to fine (small: pixel blends) (fig. 9). Every frame is
/// drawn with the request's first label.
pub fn interpolation(req: Request, a: &[f32], b: &[f32], strength: f32, frames: usize) -> Result<Request> {
    let mut req = frames_of(req, frames)?;
    if a.len() != b.len() {
        return Err(Error::request("init", "the two images differ in size"));
    }
    let mut x0 = Vec::with_capacity(frames * a.len());
    for f in 0..frames {
        let l = f as f32 / (frames - 1) as f32;
        x0.extend(a.iter().zip(b).map(|(a, b)| (1.0 - l) * a + l * b));
    }
    req.init = Some(InitImage { x0, strength });
    req.share_xt = true;
    Ok(req)
}

/// The request as `frames` frames of an interpolation (at least 2), every one with the request's first label.
fn frames_of(mut req: Request, frames: usize) -> Result<Request> {
    if frames < 2 {
        return Err(Error::request("frames", format!("must be at least 2, got {frames}")));
    }
    req.n = frames;
    let cols = req.label_columns();
    if let Some(labels) = req.labels.as_mut().filter(|l| l.len() >= cols) {
        let first = labels[..cols].to_vec();
        *labels = (0..frames).flat_map(|_| first.iter().copied()).collect();
    }
    Ok(req)
}

/// The draw of x_T that `share_xt` gives every image of a request with this seed.
fn shared_noise(seed: u64, per: usize) -> Vec<f32> {
    let mut shared = ChaCha8Rng::seed_from_u64(seed);
    shared.set_stream(u64::MAX);
    noise(std::slice::from_mut(&mut shared), per)
}

/// Interpolation between the starts of two seeds (Song et al. 2020, sec. 5.3): frame l starts from the
/// spherical interpolation slerp(z_a, z_b, l) of the two seeds' shared x_T (the start `share_xt` gives a
/// request of that seed), so with a deterministic sampler (DDIM eta 0, DPM-Solver++) the first and last frames
/// are those seeds' images and the frames between change smoothly. Every frame has the request's first label.
pub fn seed_interpolation(req: Request, seed_a: u64, seed_b: u64, frames: usize) -> Result<Request> {
    let mut req = frames_of(req, frames)?;
    let per: usize = req.shape.iter().product();
    let (a, b) = (shared_noise(seed_a, per), shared_noise(seed_b, per));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let theta = (dot / (norm(&a) * norm(&b))).clamp(-1.0, 1.0).acos();
    let mut z = Vec::with_capacity(frames * per);
    for f in 0..frames {
        let l = f as f64 / (frames - 1) as f64;
        // slerp(a, b, l) = sin((1 - l) theta) / sin(theta) a + sin(l theta) / sin(theta) b (lerp when theta ~ 0)
        let (ca, cb) = if theta.sin().abs() < 1e-6 {
            (1.0 - l, l)
        } else {
            (((1.0 - l) * theta).sin() / theta.sin(), (l * theta).sin() / theta.sin())
        };
        z.extend(a.iter().zip(&b).map(|(x, y)| (ca * *x as f64 + cb * *y as f64) as f32));
    }
    req.start_noise = Some(z);
    req.seed = seed_a;
    Ok(req)
}

/// The start of the reverse process: x_T ~ N(0, I) per image (or one draw shared by all), or the init image
/// diffused to the first timestep (SDEdit, Meng et al. 2021: x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps).
fn start(
    req: &Request,
    sched: &NoiseSchedule,
    ts: &[usize],
    rngs: &mut [ChaCha8Rng],
    first: usize,
    per: usize,
) -> Vec<f32> {
    // the per-image draws come first whatever the options, so the later draws of each stream stay in step
    let own = noise(rngs, per);
    let eps = if let Some(z) = &req.start_noise {
        z[first * per..(first + rngs.len()) * per].to_vec()
    } else if req.share_xt {
        shared_noise(req.seed, per).repeat(rngs.len())
    } else {
        own
    };
    match &req.init {
        Some(init) if init.strength < 1.0 => eps
            .chunks(per)
            .enumerate()
            .flat_map(|(i, e)| sched.q_sample(init.image(first + i, per), ts[0], e))
            .collect(),
        _ => eps,
    }
}

/// One chunk of `k` images (indices start..start + k): the start (noise, or a noised image), then one step per
/// timestep, the known pixels of an inpainting request kept after each, with RePaint's resampling jumps.
fn sample_chunk(
    den: &mut dyn Denoiser,
    sched: &NoiseSchedule,
    req: &Request,
    start_index: usize,
    k: usize,
    labels: Option<&[i64]>,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<Vec<f32>> {
    let per: usize = req.shape.iter().product();
    let mut rngs: Vec<ChaCha8Rng> = (start_index..start_index + k)
        .map(|i| {
            let mut r = ChaCha8Rng::seed_from_u64(req.seed);
            r.set_stream(i as u64);
            r
        })
        .collect();
    let ts = req.timesteps(sched.num_timesteps())?;
    if ts.is_empty() {
        // strength 0: nothing to denoise
        let init = req.init.as_ref().expect("only a strength of 0 visits no timestep");
        return Ok((start_index..start_index + k).flat_map(|i| init.image(i, per).to_vec()).collect());
    }
    let mut x = start(req, sched, &ts, &mut rngs, start_index, per);
    // DDPM runs the chain respaced to its timesteps (all T: the original chain)
    let chain = matches!(req.method, Method::Ddpm { .. }).then(|| sched.respaced(&ts));
    let want_v = matches!(req.method, Method::Ddpm { variance, .. } if variance.is_learned());
    let num_steps = req.num_steps(sched.num_timesteps())?;
    let mut history: Option<History> = None;
    let mut passes = vec![1usize; ts.len() + 1];
    let (mut i, mut count) = (0, 0);
    while i < ts.len() {
        let (t, t_next) = (ts[i], ts.get(i + 1).copied());
        let (eps, v) = guided_eps(den, sched, req, &x, k, t, labels, want_v)?;
        let mut x0 = sched.predict_x0_from_eps(&x, t, &eps);
        threshold_x0(&mut x0, per, req);
        x = match &req.method {
            Method::Ddpm { variance, .. } => {
                let chain = chain.as_ref().expect("a DDPM chain");
                ddpm_step(chain, &x, &x0, ts.len() - 1 - i, *variance, v.as_deref(), &mut rngs)
            }
            Method::Ddim { eta, .. } => ddim_step(sched, &x, &x0, t, t_next, *eta, &mut rngs),
            Method::DpmSolverPP { .. } => {
                // The order rule: first order on the first step (no history yet) and on the step that lands
                // on the final timestep ("lower order final" in DPM-Solver++'s reference code and diffusers:
                // few-step sampling is more stable without the second-order correction there); the last
                // step then returns x0.
                let lands_on_final = i + 2 == ts.len();
                let prev = history.as_ref().filter(|_| !lands_on_final);
                let (next, h) = dpmpp_2m_step(sched, &x, &x0, t, t_next, prev);
                history = Some(History { x0: x0.clone(), h });
                next
            }
        };
        if let Some(p) = &req.inpaint {
            keep_known(&mut x, p, sched, t_next, &mut rngs);
        }
        on_step(&StepInfo { chunk_start: start_index, step: count, num_steps, t, x: &x, x0: &x0 });
        count += 1;
        let end = i + 1;
        match &req.inpaint {
            // a block of `jump` steps is done and has passes left: noise back to its start and redo it
            Some(p) if end < ts.len() && end >= p.jump && end % p.jump == 0 && passes[end] < p.resample => {
                passes[end] += 1;
                x = renoise(sched, &x, ts[end], ts[end - p.jump], &mut rngs);
                // a multistep solver's history belongs to the path it came down
                history = None;
                i = end - p.jump;
            }
            _ => i += 1,
        }
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::BetaSchedule;

    /// Knows the answer: returns the true eps for a fixed x0 (per image, chosen by label or index).
    struct Oracle {
        sched: NoiseSchedule,
        x0: Vec<Vec<f32>>,
        calls: usize,
        batch_sizes: Vec<usize>,
    }

    impl Denoiser for Oracle {
        fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
            self.calls += 1;
            self.batch_sizes.push(shape[0]);
            let per = shape[1] * shape[2] * shape[3];
            let mut out = Vec::with_capacity(x.len());
            for i in 0..shape[0] {
                let which = y.map(|y| y[i] as usize).unwrap_or(0).min(self.x0.len() - 1);
                out.extend(self.sched.eps_from_x0(&x[i * per..(i + 1) * per], t[i] as usize, &self.x0[which]));
            }
            Ok(out)
        }
    }

    /// A deterministic denoiser whose answer depends on its input: x0 = half of the naive estimate
    /// x_t / sqrt(a_bar_t).
    struct Half(NoiseSchedule);

    impl Denoiser for Half {
        fn eps(&mut self, x: &[f32], _: [usize; 4], t: &[i64], _: Option<&[i64]>) -> Result<Vec<f32>> {
            let t = t[0] as usize;
            let s = self.0.alphas_cumprod[t].sqrt() as f32;
            let x0: Vec<f32> = x.iter().map(|v| (0.5 * v / s).clamp(-1.0, 1.0)).collect();
            Ok(self.0.eps_from_x0(x, t, &x0))
        }
    }

    /// The oracle answering with the velocity v of its x0 instead of eps.
    struct VOracle(Oracle);

    impl Denoiser for VOracle {
        fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
            let eps = self.0.eps(x, shape, t, y)?;
            let per = eps.len() / shape[0];
            let sched = &self.0.sched;
            let mut out = Vec::with_capacity(eps.len());
            for (i, (e, x)) in eps.chunks(per).zip(x.chunks(per)).enumerate() {
                let x0 = sched.predict_x0_from_eps(x, t[i] as usize, e);
                out.extend(sched.v_from_eps(&x0, t[i] as usize, e));
            }
            Ok(out)
        }
        fn prediction(&self) -> Prediction {
            Prediction::V
        }
    }

    #[test]
    fn a_v_predicting_model_samples_like_its_eps_twin() {
        for sched in [NoiseSchedule::new(BetaSchedule::LINEAR, 1000), NoiseSchedule::new(BetaSchedule::COSINE, 1000)] {
            for method in [
                Method::Ddim { steps: 10, eta: 0.0, spacing: Spacing::Trailing },
                Method::DpmSolverPP { steps: 10, spacing: Spacing::Trailing },
            ] {
                let req = Request::new(2, [1, 3, 4], method.clone());
                let eps = sample(&mut oracle(&sched, 12), &sched, &req, &mut |_| {}).unwrap();
                let v = sample(&mut VOracle(oracle(&sched, 12)), &sched, &req, &mut |_| {}).unwrap();
                assert!(max_err(&eps, &v) < 1e-3, "{method:?}: {}", max_err(&eps, &v));
                assert!(max_err(&v[..12], &oracle(&sched, 12).x0[0]) < 1e-2, "{method:?} finds x0");
            }
        }
    }

    fn oracle(sched: &NoiseSchedule, per: usize) -> Oracle {
        let a: Vec<f32> = (0..per).map(|i| ((i as f32) * 0.37).sin() * 0.8).collect();
        let b: Vec<f32> = (0..per).map(|i| ((i as f32) * 0.11).cos() * -0.5).collect();
        Oracle { sched: sched.clone(), x0: vec![a, b], calls: 0, batch_sizes: vec![] }
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn timestep_spacings() {
        assert_eq!(timesteps(1000, 4, Spacing::Leading).unwrap(), vec![750, 500, 250, 0]);
        assert_eq!(timesteps(1000, 4, Spacing::Trailing).unwrap(), vec![999, 749, 499, 249]);
        assert_eq!(timesteps(1000, 3, Spacing::Linspace).unwrap(), vec![999, 500, 0]);
        assert!(timesteps(10, 11, Spacing::Leading).is_err());
    }

    #[test]
    fn ddim_eta0_recovers_x0() {
        for sched in [NoiseSchedule::new(BetaSchedule::LINEAR, 1000), NoiseSchedule::new(BetaSchedule::COSINE, 1000)] {
            let mut o = oracle(&sched, 12);
            for spacing in [Spacing::Leading, Spacing::Linspace, Spacing::Trailing] {
                let req = Request::new(3, [3, 2, 2], Method::Ddim { steps: 10, eta: 0.0, spacing });
                let out = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
                for img in out.chunks(12) {
                    assert!(max_err(img, &o.x0[0]) < 1e-4, "{spacing:?}: {}", max_err(img, &o.x0[0]));
                }
            }
        }
    }

    #[test]
    fn dpm_solver_and_ddim_with_noise_and_ddpm_recover_x0() {
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 200);
        let mut o = oracle(&sched, 8);
        for method in [
            Method::DpmSolverPP { steps: 20, spacing: Spacing::Trailing },
            Method::Ddim { steps: 50, eta: 1.0, spacing: Spacing::Leading },
            Method::Ddpm { steps: 200, spacing: Spacing::Trailing, variance: VarianceType::FixedSmall },
            Method::Ddpm { steps: 200, spacing: Spacing::Trailing, variance: VarianceType::FixedLarge },
            // respaced to 25 steps (Nichol & Dhariwal 2021, sec. 4)
            Method::Ddpm { steps: 25, spacing: Spacing::Linspace, variance: VarianceType::FixedLarge },
        ] {
            let req = Request::new(2, [2, 2, 2], method.clone());
            let out = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
            assert!(max_err(&out[..8], &o.x0[0]) < 2e-3, "{method:?}: {}", max_err(&out[..8], &o.x0[0]));
        }
    }

    /// An oracle that also returns a constant v, as a model with a learned variance does.
    struct WithV(Oracle, f32);

    impl Denoiser for WithV {
        fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
            self.0.eps(x, shape, t, y)
        }
        fn eps_and_v(
            &mut self,
            x: &[f32],
            shape: [usize; 4],
            t: &[i64],
            y: Option<&[i64]>,
        ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
            Ok((self.0.eps(x, shape, t, y)?, Some(vec![self.1; x.len()])))
        }
    }

    #[test]
    fn ddpm_step_mean_and_variance_match_the_closed_forms() {
        // One DDPM step at t from the sampler's own x_T, over 20,000 pixels: the residual against the
        // posterior mean mu~(x0, x_t) (Ho et al. 2020, eq. 7) has mean 0 and the chosen variance, on the
        // original chain (all t + 1 steps) and on the chain respaced to 4 steps, where the variances are
        // those of the respaced betas (Nichol & Dhariwal 2021, sec. 4) and a learned v = 0.5 sits 3/4 of the
        // way from log beta-tilde to log beta (eq. 15).
        let t = 300;
        let sub = NoiseSchedule::from_betas(BetaSchedule::LINEAR.betas(1000)[..=t].to_vec());
        let per = 20_000;
        let fixed = [VarianceType::FixedSmall, VarianceType::FixedLarge];
        let cases = fixed
            .iter()
            .map(|&v| (t + 1, v))
            .chain(fixed.iter().map(|&v| (4, v)))
            .chain([(4, VarianceType::LearnedRange), (t + 1, VarianceType::LearnedRange)]);
        for (steps, variance) in cases {
            let mut o = WithV(oracle(&sub, per), 0.5);
            let mut req = Request::new(1, [1, 1, per], Method::Ddpm { steps, spacing: Spacing::Trailing, variance });
            req.seed = 5;
            let ts = req.timesteps(t + 1).unwrap();
            assert_eq!(ts[0], t);
            let mut second: Option<Vec<f32>> = None;
            sample(&mut o, &sub, &req, &mut |s| {
                if s.step == 0 {
                    second = Some(s.x.to_vec());
                }
            })
            .unwrap();
            let mut r = ChaCha8Rng::seed_from_u64(5);
            r.set_stream(0);
            let x_t: Vec<f32> = (0..per).map(|_| -> f32 { StandardNormal.sample(&mut r) }).collect();
            let chain = sub.respaced(&ts);
            let top = chain.num_timesteps() - 1;
            let mean = chain.posterior_mean(&o.0.x0[0], &x_t, top);
            let var = match variance {
                VarianceType::LearnedRange => {
                    (0.75 * chain.betas[top].ln() + 0.25 * chain.posterior_variance[top].ln()).exp()
                }
                v => chain.reverse_variance(top, v).unwrap(),
            };
            if steps == t + 1 {
                // the original chain: the respaced betas are the betas
                assert!((chain.betas[top] / sub.betas[t] - 1.0).abs() < 1e-9);
            } else {
                assert!(chain.betas[top] > 10.0 * sub.betas[t], "{steps} steps");
            }
            let resid: Vec<f64> = second.unwrap().iter().zip(&mean).map(|(a, m)| (*a - *m) as f64).collect();
            let m = resid.iter().sum::<f64>() / per as f64;
            let v = resid.iter().map(|r| (r - m).powi(2)).sum::<f64>() / per as f64;
            assert!(m.abs() < 4.0 * (var / per as f64).sqrt(), "{variance:?} {steps}: residual mean {m}");
            assert!((v / var - 1.0).abs() < 0.05, "{variance:?} {steps}: variance {v} vs {var}");
        }
        // a learned variance needs the model's v
        let mut o = oracle(&sub, 4);
        let req = Request::new(
            1,
            [1, 1, 4],
            Method::Ddpm { steps: 4, spacing: Spacing::Trailing, variance: VarianceType::LearnedRange },
        );
        let e = sample(&mut o, &sub, &req, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("gave no v"), "{e}");
        // DDIM and DPM-Solver++ take eps alone from a learned-variance model
        let mut o = WithV(oracle(&sub, 4), 0.5);
        let req = Request::new(1, [1, 1, 4], Method::DpmSolverPP { steps: 10, spacing: Spacing::Trailing });
        assert!(max_err(&sample(&mut o, &sub, &req, &mut |_| {}).unwrap(), &o.0.x0[0]) < 2e-3);
    }

    #[test]
    fn guidance_zero_is_the_conditional_output_and_calls_are_batched() {
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
        let mut o = oracle(&sched, 4);
        let mut req = Request::new(4, [1, 2, 2], Method::Ddim { steps: 5, eta: 0.0, spacing: Spacing::Leading });
        req.labels = Some(vec![1, 1, 1, 1]);
        req.null_class = Some(2);
        let plain = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
        assert!(max_err(&plain[..4], &o.x0[1]) < 1e-4);
        o.batch_sizes.clear();
        req.guidance = 3.0;
        let guided = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
        // one call of 2x the batch per step: conditional and unconditional halves together
        assert_eq!(o.batch_sizes, vec![8; 5]);
        // the oracle's null-class answer is image 1 too (index clamps), so guidance is a no-op here
        assert!(max_err(&guided, &plain) < 1e-4);
        req.guidance = 0.0;
        o.batch_sizes.clear();
        let again = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
        assert_eq!(again, plain);
        assert_eq!(o.batch_sizes, vec![4; 5]);
    }

    /// eps = 0.1 y_0 + 0.01 y_1 at every pixel: each label's share is known, so the composition can be checked.
    struct Labelled(Vec<usize>);
    impl Denoiser for Labelled {
        fn eps(&mut self, x: &[f32], shape: [usize; 4], _t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
            let y = y.expect("labels");
            let per = x.len() / shape[0];
            assert_eq!(y.len(), 2 * shape[0], "two labels per image");
            self.0.push(shape[0]);
            Ok(y.chunks(2).flat_map(|l| vec![0.1 * l[0] as f32 + 0.01 * l[1] as f32; per]).collect())
        }
    }

    #[test]
    fn attributes_are_guided_by_composing_one_conditional_per_label() {
        let mut req = Request::new(2, [1, 1, 2], Method::Ddim { steps: 5, eta: 0.0, spacing: Spacing::Leading });
        // nulls: class 5, attribute 3; image 0: class 2, attribute 1; image 1: class 4, attribute unknown
        req.labels = Some(vec![2, 1, 4, 3]);
        req.null_class = Some(5);
        req.guidance = 1.0;
        req.attributes = vec![AttrCond { null: 3, guidance: 3.0 }];
        let mut den = Labelled(vec![]);
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
        let x = vec![0.0; 4];
        let (eps, v) = guided_eps(&mut den, &sched, &req, &x, 2, 10, req.labels.as_deref(), false).unwrap();
        // one call of 3 x 2 rows: null, class alone, attribute alone
        assert_eq!((den.0.clone(), v), (vec![6], None));
        // Liu et al. eq. 10: eps(null) + (1 + w_c)(eps(c) - eps(null)) + (1 + w_a)(eps(a) - eps(null))
        let null = 0.1 * 5.0 + 0.01 * 3.0;
        let img0 = null + 2.0 * (0.1 * (2.0 - 5.0)) + 4.0 * (0.01 * (1.0 - 3.0));
        let img1 = null + 2.0 * (0.1 * (4.0 - 5.0));
        assert!(max_err(&eps, &[img0, img0, img1, img1]) < 1e-6, "{eps:?}");
        // unguided: every label at once, one evaluation per image
        (req.guidance, req.attributes[0].guidance) = (0.0, 0.0);
        let (eps, _) = guided_eps(&mut den, &sched, &req, &x, 2, 10, req.labels.as_deref(), false).unwrap();
        assert_eq!(den.0.last(), Some(&2));
        assert!(max_err(&eps, &[0.21, 0.21, 0.43, 0.43]) < 1e-6, "{eps:?}");
        // the labels of a chunk are whole images, and an interpolation repeats the first image's pair
        req.batch = 1;
        sample(&mut den, &NoiseSchedule::new(BetaSchedule::LINEAR, 100), &req, &mut |_| {}).unwrap();
        assert_eq!(req.class_labels(), Some(vec![2, 4]));
        let frames = frames_of(req.clone(), 3).unwrap();
        assert_eq!(frames.labels, Some(vec![2, 1, 2, 1, 2, 1]));
        req.labels = Some(vec![2, 1, 4]);
        assert!(req.validate().unwrap_err().to_string().contains("3 labels for 2 images (2 per image)"));
        req.labels = None;
        assert!(req.validate().unwrap_err().to_string().contains("attributes"));
    }

    #[test]
    fn a_guidance_interval_guides_only_its_timesteps() {
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
        let mut o = oracle(&sched, 4);
        // leading spacing, 5 steps: t = 80, 60, 40, 20, 0
        let mut req = Request::new(4, [1, 2, 2], Method::Ddim { steps: 5, eta: 0.0, spacing: Spacing::Leading });
        req.labels = Some(vec![1, 1, 1, 1]);
        req.null_class = Some(2);
        req.guidance = 2.0;
        req.guidance_interval = Some("20,60".parse().unwrap());
        sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
        assert_eq!(o.batch_sizes, vec![4, 8, 8, 8, 4]);
        o.batch_sizes.clear();
        req.guidance_interval = Some(GuidanceInterval { lo: 0, hi: 99 });
        sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
        assert_eq!(o.batch_sizes, vec![8; 5]);
        o.batch_sizes.clear();
        req.guidance_interval = Some(GuidanceInterval { lo: 81, hi: 99 });
        sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
        assert_eq!(o.batch_sizes, vec![4; 5]);
        req.guidance_interval = Some(GuidanceInterval { lo: 60, hi: 20 });
        let e = sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { field: "guidance_interval", .. }), "{e}");
        assert_eq!("100, 700".parse::<GuidanceInterval>().unwrap(), GuidanceInterval { lo: 100, hi: 700 });
        assert_eq!(GuidanceInterval { lo: 100, hi: 700 }.to_string(), "100,700");
        for bad in ["700,100", "100", "a,b", "-1,5", ""] {
            assert!(bad.parse::<GuidanceInterval>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunked_equals_unchunked_and_seeds_are_reproducible() {
        let sched = NoiseSchedule::new(BetaSchedule::COSINE, 50);
        let mut o = oracle(&sched, 4);
        let mut req = Request::new(7, [1, 2, 2], Method::Ddim { steps: 10, eta: 1.0, spacing: Spacing::Leading });
        req.clip_x0 = false;
        req.batch = 7;
        let whole = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
        req.batch = 3;
        let chunked = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
        assert_eq!(whole, chunked);
        assert_eq!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap(), chunked);
        req.seed = 1;
        assert_ne!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap(), chunked);
    }

    #[test]
    fn strip_records_evenly_spaced_steps_of_the_first_chunk() {
        let mut strip = Strip::new(50, 8, 2, 3);
        for chunk_start in [0, 4] {
            for step in 0..50 {
                // 4 images of 3 values; value = step (x) and -step (x0), + image index / 10
                let x: Vec<f32> = (0..12).map(|i| step as f32 + (i / 3) as f32 / 10.0).collect();
                let x0: Vec<f32> = x.iter().map(|v| -v).collect();
                strip.record(&StepInfo { chunk_start, step, num_steps: 50, t: 1000 - 20 * step, x: &x, x0: &x0 });
            }
        }
        let ts = strip.timesteps();
        assert_eq!(ts.len(), 8);
        assert_eq!((ts[0], ts[7]), (1000, 1000 - 20 * 49));
        let (tiles, cols) = strip.tiles();
        assert_eq!((tiles.len(), cols), (2 * 2 * 8 * 3, 8));
        // row 0: image 0's x_t at step 0..49; row 1: its x0; row 2: image 1's x_t
        assert_eq!((tiles[0], tiles[7 * 3]), (0.0, 49.0));
        assert_eq!(tiles[8 * 3 + 7 * 3], -49.0);
        assert!((tiles[16 * 3] - 0.1).abs() < 1e-6);
        // fewer steps than columns: one column per step
        assert_eq!(Strip::new(3, 8, 1, 1).want, vec![0, 1, 2]);
    }

    #[test]
    fn names_and_settings_are_checked_with_the_field_named() {
        assert_eq!("dpmpp".parse::<SamplerKind>().unwrap(), SamplerKind::DpmSolverPP);
        assert_eq!(SamplerKind::DpmSolverPP.to_string(), "dpm++");
        let e = "euler".parse::<SamplerKind>().unwrap_err().to_string();
        assert_eq!(e, "unknown sampler 'euler' (expected one of: ddim, ddpm, dpm++)");
        let v = VarianceType::FixedSmall;
        let e = Method::new(SamplerKind::Ddim, 0, 0.0, Spacing::Trailing, v, 1000).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { field: "steps", .. }), "{e}");
        assert_eq!(e.cli_message(), "--steps must be in 1..=1000 for this model, got 0");
        let e = Method::new(SamplerKind::Ddim, 10, 1.5, Spacing::Trailing, v, 1000).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { field: "eta", .. }), "{e}");
        // DDPM runs `steps` of the chain, respaced; all T is the original chain
        let m = Method::new(SamplerKind::Ddpm, 10, 0.0, Spacing::Trailing, v, 10).unwrap();
        assert_eq!(m.timesteps(10).unwrap().len(), 10);
        assert_eq!(m.kind(), SamplerKind::Ddpm);
        assert_eq!(
            Method::new(SamplerKind::Ddpm, 4, 0.0, Spacing::Trailing, v, 10).unwrap().timesteps(10).unwrap(),
            [9, 7, 4, 2]
        );
        let e = Method::new(SamplerKind::Ddpm, 11, 0.0, Spacing::Trailing, v, 10).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { field: "steps", .. }), "{e}");
    }

    #[test]
    fn dpm_solver_uses_the_second_order_correction_except_where_the_order_rule_says() {
        // One image through 4 steps: with the oracle's exact eps every order lands on x0, so use a denoiser
        // whose x0 estimate drifts with t; then DPM-Solver++(2M) must differ from the first-order (DDIM) path
        // exactly from its second step on, and its final-step rule must make steps 3 -> 4 first order.
        struct Drift(NoiseSchedule);
        impl Denoiser for Drift {
            fn eps(&mut self, x: &[f32], _: [usize; 4], t: &[i64], _: Option<&[i64]>) -> Result<Vec<f32>> {
                let x0: Vec<f32> = vec![t[0] as f32 / 1000.0; x.len()];
                Ok(self.0.eps_from_x0(x, t[0] as usize, &x0))
            }
        }
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
        let run = |method: Method| {
            let mut xs = vec![];
            let req = Request::new(1, [1, 1, 4], method);
            sample(&mut Drift(sched.clone()), &sched, &req, &mut |s| xs.push(s.x.to_vec())).unwrap();
            xs
        };
        let dpm = run(Method::DpmSolverPP { steps: 4, spacing: Spacing::Trailing });
        let ddim = run(Method::Ddim { steps: 4, eta: 0.0, spacing: Spacing::Trailing });
        // the first step is first order: DDIM's step (the same formula written differently: within rounding)
        assert!(max_err(&dpm[0], &ddim[0]) < 1e-6, "{}", max_err(&dpm[0], &ddim[0]));
        assert!(max_err(&dpm[1], &ddim[1]) > 1e-4, "the second step uses the previous x0");
        // the step onto the final timestep (499 -> 249) is first order: the DDIM step from the same x_t
        let (a_t, a_n) = (sched.alphas_cumprod[499], sched.alphas_cumprod[249]);
        let first: Vec<f32> = dpm[1]
            .iter()
            .map(|&x| {
                let eps = (x as f64 - a_t.sqrt() * 0.499) / (1.0 - a_t).sqrt();
                (a_n.sqrt() * 0.499 + (1.0 - a_n).sqrt() * eps) as f32
            })
            .collect();
        assert!(max_err(&dpm[2], &first) < 1e-5, "{}", max_err(&dpm[2], &first));
        // the last step returns the predicted x0 in both
        assert!(max_err(&dpm[3], &[0.249; 4]) < 1e-6 && max_err(&ddim[3], &[0.249; 4]) < 1e-6);
    }

    #[test]
    fn sdedit_strength_0_returns_the_image_1_is_plain_sampling_and_between_runs_part_of_the_steps() {
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
        let mut o = oracle(&sched, 4);
        let image: Vec<f32> = vec![0.5, -0.25, 0.0, 1.0];
        let method = Method::DpmSolverPP { steps: 10, spacing: Spacing::Trailing };
        let mut req = Request::new(3, [1, 2, 2], method);
        req.seed = 4;
        let plain = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
        for (strength, calls) in [(0.0, 0), (0.5, 5), (1.0, 10)] {
            req.init = Some(InitImage { x0: image.clone(), strength });
            o.calls = 0;
            let mut seen = 0;
            let out = sample(&mut o, &sched, &req, &mut |s| {
                assert_eq!(s.num_steps, calls);
                seen += 1;
            })
            .unwrap();
            assert_eq!((o.calls, seen), (calls, calls), "strength {strength}");
            match strength {
                0.0 => assert_eq!(out, image.repeat(3)),
                1.0 => assert_eq!(out, plain),
                // from t = 499 the oracle still pulls every image to its own x0
                _ => assert!(max_err(&out[..4], &o.x0[0]) < 1e-4),
            }
        }
        // the half-way start is the image noised to the first visited timestep
        req.init = Some(InitImage { x0: image.clone(), strength: 0.5 });
        assert_eq!(req.timesteps(1000).unwrap()[0], 499);
        let mut first_x0 = vec![];
        sample(&mut o, &sched, &req, &mut |s| {
            if s.step == 0 {
                first_x0 = s.x0[..4].to_vec();
            }
        })
        .unwrap();
        assert!(max_err(&first_x0, &o.x0[0]) < 1e-4, "the oracle sees x_499 and predicts its own x0");
        req.init = Some(InitImage { x0: image.clone(), strength: 1.5 });
        let e = sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { field: "strength", .. }), "{e}");
        req.init = Some(InitImage { x0: vec![0.0; 3], strength: 0.5 });
        assert!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().to_string().contains("has 3 values"));
    }

    #[test]
    fn sample_chunks_draws_what_sample_draws_in_memory_that_does_not_grow_with_n() {
        use crate::fuzz::peak_memory;
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
        let per = 28 * 28;
        let run = |n: usize| {
            let mut req = Request::new(n, [1, 28, 28], Method::Ddim { steps: 2, eta: 0.0, spacing: Spacing::Trailing });
            req.batch = 16;
            let mut sums = vec![0f64; n];
            let ((), peak) = peak_memory(|| {
                sample_chunks(&mut Half(sched.clone()), &sched, &req, &mut |_| {}, &mut |first, x| {
                    for (i, img) in x.chunks(per).enumerate() {
                        sums[first + i] = img.iter().map(|v| *v as f64).sum();
                    }
                    Ok(())
                })
                .unwrap()
            });
            (req, sums, peak)
        };
        let (req, sums, small) = run(64);
        let whole = sample(&mut Half(sched.clone()), &sched, &req, &mut |_| {}).unwrap();
        let want: Vec<f64> = whole.chunks(per).map(|img| img.iter().map(|v| *v as f64).sum()).collect();
        assert_eq!(sums, want, "chunks are the images of `sample`");
        // 64x more images: the same working memory (one chunk's), beyond the caller's 8 bytes per image
        let (_, _, large) = run(4096);
        assert!(large < small + small / 2 + 4096 * 8, "peak {large} bytes for 4,096 images, {small} for 64");
        // the collecting form holds them all (the probe sees growth where there is growth)
        let mut req = req;
        req.n = 4096;
        let ((), all) = peak_memory(|| drop(sample(&mut Half(sched.clone()), &sched, &req, &mut |_| {}).unwrap()));
        assert!(all >= 4096 * per * 4, "{all}");
    }

    #[test]
    fn a_shared_x_t_gives_one_start_for_every_image_and_does_not_depend_on_chunks() {
        // a denoiser that predicts x0 = 0 keeps DDIM (eta 0) a deterministic function of the start
        struct Zero(NoiseSchedule);
        impl Denoiser for Zero {
            fn eps(&mut self, x: &[f32], _: [usize; 4], t: &[i64], _: Option<&[i64]>) -> Result<Vec<f32>> {
                Ok(self.0.eps_from_x0(x, t[0] as usize, &vec![0.0; x.len()]))
            }
        }
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
        let mut req = Request::new(5, [1, 1, 3], Method::Ddim { steps: 5, eta: 0.0, spacing: Spacing::Trailing });
        req.clip_x0 = false;
        let first_step = |req: &Request| {
            let mut xs = vec![];
            sample(&mut Zero(sched.clone()), &sched, req, &mut |s| {
                if s.step == 0 {
                    xs.extend_from_slice(s.x);
                }
            })
            .unwrap();
            xs
        };
        let own = first_step(&req);
        assert_ne!(own[..3], own[3..6], "each image has its own noise");
        req.share_xt = true;
        req.batch = 2;
        let shared = first_step(&req);
        assert!(shared.chunks(3).all(|c| c == &shared[..3]), "{shared:?}");
        req.batch = 5;
        assert_eq!(first_step(&req), shared);
    }

    #[test]
    fn inpainting_keeps_the_known_pixels_and_resampling_redoes_blocks_of_steps() {
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 200);
        let mut o = oracle(&sched, 8);
        // 2 channels of 2x2: the left column is known
        let known: Vec<f32> = vec![0.9, -0.4, 0.3, 0.1, -0.7, 0.6, 0.2, -0.2];
        let mask = vec![1.0, 0.0, 1.0, 0.0];
        for method in [
            Method::DpmSolverPP { steps: 12, spacing: Spacing::Trailing },
            Method::Ddim { steps: 12, eta: 0.5, spacing: Spacing::Leading },
        ] {
            for (resample, jump, calls) in [(1, 1, 12), (3, 4, 12 + 2 * 4 * 2)] {
                let mut req = Request::new(2, [2, 2, 2], method.clone());
                req.inpaint = Some(Inpaint { x0: known.clone(), mask: mask.clone(), resample, jump });
                o.calls = 0;
                let mut seen = vec![];
                let out = sample(&mut o, &sched, &req, &mut |s| seen.push((s.step, s.num_steps))).unwrap();
                assert_eq!(o.calls, calls, "{method:?} r={resample}");
                assert_eq!(seen.last(), Some(&(calls - 1, calls)));
                for img in out.chunks(8) {
                    for (i, v) in img.iter().enumerate() {
                        // known pixels are the image's; the others come from the model (the oracle's x0)
                        let want = if mask[i % 4] == 1.0 { known[i] } else { o.x0[0][i] };
                        assert!((v - want).abs() < 1e-3, "{method:?} r={resample} pixel {i}: {v} vs {want}");
                    }
                }
            }
        }
        let mut req = Request::new(
            1,
            [2, 2, 2],
            Method::Ddpm { steps: 200, spacing: Spacing::Trailing, variance: VarianceType::FixedSmall },
        );
        req.inpaint = Some(Inpaint { x0: known.clone(), mask: vec![1.0; 3], resample: 1, jump: 1 });
        let e = sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { field: "mask", .. }), "{e}");
    }

    #[test]
    fn interpolation_frames_end_at_the_two_images_own_image_to_image_results() {
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
        let (a, b) = (vec![0.8f32, -0.6, 0.2, 0.0], vec![-0.5f32, 0.5, 0.9, -0.9]);
        let mut base = Request::new(1, [1, 2, 2], Method::Ddim { steps: 20, eta: 0.0, spacing: Spacing::Trailing });
        base.seed = 3;
        base.batch = 2;
        let req = interpolation(base.clone(), &a, &b, 0.6, 5).unwrap();
        let frames = sample(&mut Half(sched.clone()), &sched, &req, &mut |_| {}).unwrap();
        assert_eq!(frames.len(), 5 * 4);
        let alone = |x0: &[f32]| {
            let mut r = base.clone();
            (r.init, r.share_xt) = (Some(InitImage { x0: x0.to_vec(), strength: 0.6 }), true);
            sample(&mut Half(sched.clone()), &sched, &r, &mut |_| {}).unwrap()
        };
        assert_eq!(frames[..4], alone(&a)[..]);
        assert_eq!(frames[16..], alone(&b)[..]);
        assert!(max_err(&frames[8..12], &frames[..4]) > 1e-3 && max_err(&frames[8..12], &frames[16..]) > 1e-3);
        assert!(interpolation(base.clone(), &a, &b, 0.6, 1).unwrap_err().to_string().contains("frames"));
    }

    #[test]
    fn seed_interpolation_starts_at_the_two_seeds_shared_starts() {
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
        let base = Request::new(1, [1, 3, 3], Method::DpmSolverPP { steps: 8, spacing: Spacing::Trailing });
        let req = seed_interpolation(base.clone(), 7, 8, 6).unwrap();
        let z = req.start_noise.clone().unwrap();
        // slerp keeps the norm of two independent draws roughly (a lerp would shrink the middle)
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm(&z[18..27]) / norm(&z[..9]) - 1.0).abs() < 0.5, "{} vs {}", norm(&z[18..27]), norm(&z[..9]));
        let frames = sample(&mut Half(sched.clone()), &sched, &req, &mut |_| {}).unwrap();
        for (seed, frame) in [(7, &frames[..9]), (8, &frames[45..])] {
            let mut r = base.clone();
            (r.seed, r.share_xt) = (seed, true);
            assert_eq!(sample(&mut Half(sched.clone()), &sched, &r, &mut |_| {}).unwrap(), frame);
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 10);
        let mut o = oracle(&sched, 4);
        let ddpm = Method::Ddpm { steps: 10, spacing: Spacing::Trailing, variance: VarianceType::FixedSmall };
        let req = Request::new(0, [1, 2, 2], ddpm.clone());
        assert!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().to_string().contains("at least 1"));
        let mut req = Request::new(1, [1, 2, 2], ddpm);
        req.guidance = 2.0;
        assert!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().to_string().contains("guidance"));
        req.guidance = f32::NAN;
        let e = sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { field: "guidance", .. }), "{e}");
        req.guidance = 0.0;
        req.batch = 0;
        assert_eq!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().cli_message(), "--batch must be at least 1");
        req.batch = 1;
        req.labels = Some(vec![0, 1]);
        assert!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().to_string().contains("2 labels for 1 images"));
    }
}
