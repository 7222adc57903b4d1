//! The samplers, written once against [`Denoiser`]: DDPM ancestral sampling, DDIM, DPM-Solver++(2M), and
//! classifier-free guidance. ONNX Runtime (deployment) and the trainer's Candle model (previews,
//! evaluation) both implement `Denoiser`, so the same code path is exercised by both.
//!
//! All sampler arithmetic is f32 on the host whatever the model's dtype. Every image draws its noise from
//! its own ChaCha8 stream (seed, image index), so results do not depend on how `n` is split into batches.

use anyhow::{bail, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::schedule::{NoiseSchedule, VarianceType};

/// A noise-prediction model: eps_theta(x_t, t, y).
pub trait Denoiser {
    /// `x` is [n, c, h, w] row-major, `t` and `y` have n entries. Returns eps, the same size as x.
    /// `y` is None for unconditional models; the null class means "no class".
    fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>>;
}

/// How the sub-sequence of timesteps is chosen for DDIM / DPM-Solver (Lin et al. 2024, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Linspace,
    Trailing,
}

impl Spacing {
    pub fn from_name(s: &str) -> Result<Self> {
        Ok(match s {
            "leading" => Spacing::Leading,
            "linspace" => Spacing::Linspace,
            "trailing" => Spacing::Trailing,
            o => bail!("unknown timestep spacing '{o}' (leading, linspace, trailing)"),
        })
    }
}

/// `steps` timesteps out of 0..T, in decreasing order.
pub fn timesteps(num_train: usize, steps: usize, spacing: Spacing) -> Result<Vec<usize>> {
    if steps == 0 || steps > num_train {
        bail!("the number of sampling steps must be in 1..={num_train}, got {steps}");
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

#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2).
    Ddpm { variance: VarianceType },
    /// Song et al. 2020, eq. 12; eta = 0 is deterministic, eta = 1 matches DDPM's beta-tilde variance.
    Ddim { steps: usize, eta: f64, spacing: Spacing },
    /// Lu et al. 2022 (DPM-Solver++), the second-order multistep variant 2M.
    DpmSolverPP { steps: usize, spacing: Spacing },
}

impl Method {
    /// A sampler by name (`ddim`, `ddpm`, `dpm++`) for a schedule of `num_train` steps; `steps` (not used by
    /// DDPM, which visits all T) must be in 1..=T.
    pub fn from_name(
        name: &str,
        steps: usize,
        eta: f64,
        spacing: Spacing,
        variance: VarianceType,
        num_train: usize,
    ) -> Result<Self> {
        let method = match name {
            "ddim" => Method::Ddim { steps, eta, spacing },
            "ddpm" => Method::Ddpm { variance },
            "dpm++" | "dpmpp" | "dpm-solver++" => Method::DpmSolverPP { steps, spacing },
            o => bail!("unknown sampler '{o}' (ddim, ddpm, dpm++)"),
        };
        if !matches!(method, Method::Ddpm { .. }) && !(1..=num_train).contains(&steps) {
            bail!("--steps must be in 1..={num_train} for this model, got {steps}");
        }
        Ok(method)
    }

    /// The timesteps this method visits, decreasing (DDPM: all T).
    pub fn timesteps(&self, num_train: usize) -> Result<Vec<usize>> {
        match self {
            Method::Ddpm { .. } => Ok((0..num_train).rev().collect()),
            Method::Ddim { steps, spacing, .. } | Method::DpmSolverPP { steps, spacing } => {
                timesteps(num_train, *steps, *spacing)
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Method::Ddpm { .. } => "ddpm",
            Method::Ddim { .. } => "ddim",
            Method::DpmSolverPP { .. } => "dpm++",
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
    /// One label per image for conditional models (None: unconditional, or all null).
    pub labels: Option<Vec<i64>>,
    /// The null class index of a conditional model (needed for guidance).
    pub null_class: Option<i64>,
    /// Guidance weight w: eps = (1 + w) eps(x, c) - w eps(x, null) (Ho & Salimans 2022, eq. 6). 0 = none.
    pub guidance: f32,
    pub seed: u64,
    /// Images per denoiser call (the guided call evaluates 2x this).
    pub batch: usize,
    /// Clip the predicted x0 to [-1, 1] (on by default).
    pub clip_x0: bool,
    /// Dynamic thresholding percentile (Saharia et al. 2022, sec. 2.3), e.g. 0.995; None = off.
    pub dynamic_threshold: Option<f32>,
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
            seed: 0,
            batch: 16,
            clip_x0: true,
            dynamic_threshold: None,
        }
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
        bail!("--class {s}: this model is unconditional (it has no classes)");
    }
    if let Some(i) = names.iter().position(|n| n == s) {
        return Ok(i as i64);
    }
    match s.parse::<usize>() {
        Ok(i) if i < num_classes => Ok(i as i64),
        _ => bail!("unknown class '{s}': this model's classes are 0..{} ({})", num_classes - 1, names.join(", ")),
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

fn noise(rngs: &mut [ChaCha8Rng], per: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rngs.len() * per);
    for r in rngs.iter_mut() {
        v.extend((0..per).map(|_| -> f32 { StandardNormal.sample(r) }));
    }
    v
}

/// Generates `req.n` images in [-1, 1] (clipped), [n, c, h, w].
pub fn sample(
    den: &mut dyn Denoiser,
    sched: &NoiseSchedule,
    req: &Request,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<Vec<f32>> {
    if req.n == 0 {
        bail!("nothing to generate: n must be at least 1");
    }
    if req.batch == 0 {
        bail!("batch must be at least 1");
    }
    if let Some(l) = &req.labels {
        if l.len() != req.n {
            bail!("{} labels for {} images", l.len(), req.n);
        }
    }
    if req.guidance != 0.0 && (req.null_class.is_none() || req.labels.is_none()) {
        bail!("guidance needs a class-conditional model and a class to guide towards");
    }
    let per: usize = req.shape.iter().product();
    let mut out = Vec::with_capacity(req.n * per);
    let mut start = 0;
    while start < req.n {
        let k = req.batch.min(req.n - start);
        let labels = req.labels.as_ref().map(|l| &l[start..start + k]);
        out.extend(sample_chunk(den, sched, req, start, k, labels, on_step)?);
        start += k;
    }
    Ok(out.into_iter().map(|v| v.clamp(-1.0, 1.0)).collect())
}

/// eps for a chunk, with classifier-free guidance batched into one call.
fn guided_eps(
    den: &mut dyn Denoiser,
    req: &Request,
    x: &[f32],
    k: usize,
    t: usize,
    labels: Option<&[i64]>,
) -> Result<Vec<f32>> {
    let [c, h, w] = req.shape;
    match (req.guidance != 0.0, labels, req.null_class) {
        (true, Some(l), Some(null)) => {
            let mut x2 = Vec::with_capacity(2 * x.len());
            x2.extend_from_slice(x);
            x2.extend_from_slice(x);
            let mut y2 = l.to_vec();
            y2.extend(std::iter::repeat_n(null, k));
            let e = den.eps(&x2, [2 * k, c, h, w], &vec![t as i64; 2 * k], Some(&y2))?;
            let (cond, unc) = e.split_at(x.len());
            let wt = req.guidance;
            // Ho & Salimans 2022, eq. 6: eps~ = (1 + w) eps(z, c) - w eps(z)
            Ok(cond.iter().zip(unc).map(|(a, b)| (1.0 + wt) * a - wt * b).collect())
        }
        _ => den.eps(x, [k, c, h, w], &vec![t as i64; k], labels),
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

fn sample_chunk(
    den: &mut dyn Denoiser,
    sched: &NoiseSchedule,
    req: &Request,
    start: usize,
    k: usize,
    labels: Option<&[i64]>,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<Vec<f32>> {
    let per: usize = req.shape.iter().product();
    let mut rngs: Vec<ChaCha8Rng> = (start..start + k)
        .map(|i| {
            let mut r = ChaCha8Rng::seed_from_u64(req.seed);
            r.set_stream(i as u64);
            r
        })
        .collect();
    // x_T ~ N(0, I)
    let mut x = noise(&mut rngs, per);
    let ts = req.method.timesteps(sched.num_timesteps())?;
    let ab = |t: Option<usize>| t.map(|t| sched.alphas_cumprod[t]).unwrap_or(1.0);
    let mut prev_x0: Option<Vec<f32>> = None;
    let mut prev_h = 0.0f64;
    for (i, &t) in ts.iter().enumerate() {
        let t_next = ts.get(i + 1).copied();
        let eps = guided_eps(den, req, &x, k, t, labels)?;
        let mut x0 = sched.predict_x0_from_eps(&x, t, &eps);
        threshold_x0(&mut x0, per, req);
        match &req.method {
            Method::Ddpm { variance } => {
                // Ho et al. 2020, Algorithm 2 via eq. 7: x_{t-1} = mu~(x_t, x0) + sigma_t z
                let mean = sched.posterior_mean(&x0, &x, t);
                let sd = if t > 0 { sched.reverse_variance(t, *variance).sqrt() as f32 } else { 0.0 };
                x = if sd > 0.0 {
                    let z = noise(&mut rngs, per);
                    mean.iter().zip(&z).map(|(m, z)| m + sd * z).collect()
                } else {
                    mean
                };
            }
            Method::Ddim { eta, .. } => {
                let (a_t, a_prev) = (ab(Some(t)), ab(t_next));
                // eps consistent with the (possibly clipped) x0
                let eps = sched.eps_from_x0(&x, t, &x0);
                // Song et al. 2020, eq. 16: sigma = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)
                let sigma = eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).sqrt();
                let dir = (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
                // Song et al. 2020, eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
                let (sa, dir, sg) = (a_prev.sqrt() as f32, dir as f32, sigma as f32);
                x = x0.iter().zip(&eps).map(|(x0, e)| sa * x0 + dir * e).collect();
                if sigma > 0.0 {
                    let z = noise(&mut rngs, per);
                    x.iter_mut().zip(&z).for_each(|(x, z)| *x += sg * z);
                }
            }
            Method::DpmSolverPP { .. } => {
                let lambda = |a: f64| 0.5 * (a / (1.0 - a)).ln(); // log(alpha_t / sigma_t)
                match t_next {
                    None => x = x0.clone(),
                    Some(tn) => {
                        let (a_t, a_n) = (ab(Some(t)), ab(Some(tn)));
                        let h = lambda(a_n) - lambda(a_t);
                        let (sig_t, sig_n, alpha_n) = ((1.0 - a_t).sqrt(), (1.0 - a_n).sqrt(), a_n.sqrt());
                        // Lu et al. 2022 (DPM-Solver++), Algorithm 2: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}
                        let d: Vec<f32> = match &prev_x0 {
                            Some(p) if i + 1 < ts.len() - 1 || ts.len() <= 2 => {
                                let r = prev_h / h;
                                let (c1, c2) = ((1.0 + 0.5 / r) as f32, (0.5 / r) as f32);
                                x0.iter().zip(p).map(|(a, b)| c1 * a - c2 * b).collect()
                            }
                            _ => x0.clone(),
                        };
                        // x_{i} = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h} - 1) D
                        let (c1, c2) = ((sig_n / sig_t) as f32, (alpha_n * ((-h).exp() - 1.0)) as f32);
                        x = x.iter().zip(&d).map(|(x, d)| c1 * x - c2 * d).collect();
                        prev_h = h;
                    }
                }
                prev_x0 = Some(x0.clone());
            }
        }
        on_step(&StepInfo { chunk_start: start, step: i, num_steps: ts.len(), t, x: &x, x0: &x0 });
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
            Method::Ddpm { variance: VarianceType::FixedSmall },
            Method::Ddpm { variance: VarianceType::FixedLarge },
        ] {
            let req = Request::new(2, [2, 2, 2], method.clone());
            let out = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
            assert!(max_err(&out[..8], &o.x0[0]) < 2e-3, "{method:?}: {}", max_err(&out[..8], &o.x0[0]));
        }
    }

    #[test]
    fn ddpm_step_mean_and_variance_match_the_closed_forms() {
        // One DDPM step at t from the sampler's own x_T, over 20,000 pixels: the residual against the
        // posterior mean mu~(x0, x_t) (Ho et al. 2020, eq. 7) has mean 0 and the chosen variance.
        let t = 300;
        let sub = NoiseSchedule::from_betas(BetaSchedule::LINEAR.betas(1000)[..=t].to_vec());
        let per = 20_000;
        let mut o = oracle(&sub, per);
        for variance in [VarianceType::FixedSmall, VarianceType::FixedLarge] {
            let mut req = Request::new(1, [1, 1, per], Method::Ddpm { variance });
            req.seed = 5;
            let mut first: Option<Vec<f32>> = None;
            sample(&mut o, &sub, &req, &mut |s| {
                if s.step == 0 {
                    assert_eq!(s.t, t);
                    first = Some(s.x.to_vec());
                }
            })
            .unwrap();
            let mut r = ChaCha8Rng::seed_from_u64(5);
            r.set_stream(0);
            let x_t: Vec<f32> = (0..per).map(|_| -> f32 { StandardNormal.sample(&mut r) }).collect();
            let mean = sub.posterior_mean(&o.x0[0], &x_t, t);
            let var = sub.reverse_variance(t, variance);
            let resid: Vec<f64> = first.unwrap().iter().zip(&mean).map(|(a, m)| (*a - *m) as f64).collect();
            let m = resid.iter().sum::<f64>() / per as f64;
            let v = resid.iter().map(|r| (r - m).powi(2)).sum::<f64>() / per as f64;
            assert!(m.abs() < 4.0 * (var / per as f64).sqrt(), "{variance:?}: residual mean {m}");
            assert!((v / var - 1.0).abs() < 0.05, "{variance:?}: variance {v} vs {var}");
        }
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
    fn bad_requests_are_refused() {
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 10);
        let mut o = oracle(&sched, 4);
        let req = Request::new(0, [1, 2, 2], Method::Ddpm { variance: VarianceType::FixedSmall });
        assert!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().to_string().contains("at least 1"));
        let mut req = Request::new(1, [1, 2, 2], Method::Ddpm { variance: VarianceType::FixedSmall });
        req.guidance = 2.0;
        assert!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().to_string().contains("guidance"));
    }
}
