//! The sampling loop: per chunk of images, the start, then at every timestep the (guided) model's eps, x0
//! formed and clipped, and one step of the request's sampler.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::editing::{keep_known, renoise, start};
use super::guidance::Guided;
use super::request::{Method, Request};
use super::steps::{consistency_step, ddim_step, ddpm_step, dpmpp_2m_step, threshold_x0, History};
use super::Denoiser;
use crate::error::Result;
use crate::schedule::NoiseSchedule;

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

/// Generates `req.n` images `req.options.batch` at a time, handing each chunk (in [-1, 1], clipped, [k, c, h, w]) to
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
        let k = req.options.batch.min(req.n - start);
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
            let mut r = ChaCha8Rng::seed_from_u64(req.options.seed);
            r.set_stream(i as u64);
            r
        })
        .collect();
    let ts = req.timesteps(sched.num_timesteps())?;
    if ts.is_empty() {
        // strength 0: nothing to denoise
        let init = req.options.init.as_ref().expect("only a strength of 0 visits no timestep");
        return Ok((start_index..start_index + k).flat_map(|i| init.image(i, per).to_vec()).collect());
    }
    let mut x = start(req, sched, &ts, &mut rngs, start_index, per);
    let mut stepper = Stepper::new(&req.method, sched, &ts);
    let num_steps = req.num_steps(sched.num_timesteps())?;
    let mut model = Guided::new(den, sched, req);
    let mut passes = vec![1usize; ts.len() + 1];
    let (mut i, mut count) = (0, 0);
    while i < ts.len() {
        let (t, t_next) = (ts[i], ts.get(i + 1).copied());
        if req.options.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            return Err(crate::Error::Cancelled);
        }
        let (eps, v) = model.eps(&x, k, t, labels, stepper.wants_v())?;
        let mut x0 = sched.predict_x0_from_eps(&x, t, &eps);
        threshold_x0(&mut x0, per, &req.options);
        x = stepper.step(&x, &x0, &ts, i, v.as_deref(), &mut rngs);
        if let Some(p) = &req.options.inpaint {
            keep_known(&mut x, p, sched, t_next, &mut rngs);
        }
        on_step(&StepInfo { chunk_start: start_index, step: count, num_steps, t, x: &x, x0: &x0 });
        count += 1;
        let end = i + 1;
        match &req.options.inpaint {
            // a block of `jump` steps is done and has passes left: noise back to its start and redo it
            Some(p) if end < ts.len() && end >= p.jump && end % p.jump == 0 && passes[end] < p.resample => {
                passes[end] += 1;
                x = renoise(sched, &x, ts[end], ts[end - p.jump], &mut rngs);
                // a multistep solver's history belongs to the path it came down
                stepper.forget();
                i = end - p.jump;
            }
            _ => i += 1,
        }
    }
    Ok(x)
}

/// The request's sampler over one chunk's timesteps, with what it carries from step to step: DDPM's chain
/// respaced to the timesteps (all T: the original chain), DPM-Solver++'s previous step.
struct Stepper<'a> {
    method: &'a Method,
    sched: &'a NoiseSchedule,
    chain: Option<NoiseSchedule>,
    history: Option<History>,
}

impl<'a> Stepper<'a> {
    fn new(method: &'a Method, sched: &'a NoiseSchedule, ts: &[usize]) -> Self {
        let chain = matches!(method, Method::Ddpm { .. }).then(|| sched.respaced(ts));
        Self { method, sched, chain, history: None }
    }

    /// Whether the step needs the model's v: DDPM with a learned variance.
    fn wants_v(&self) -> bool {
        matches!(self.method, Method::Ddpm { variance, .. } if variance.is_learned())
    }

    /// From x at `ts[i]` with its predicted x0 to x at the next timestep.
    fn step(
        &mut self,
        x: &[f32],
        x0: &[f32],
        ts: &[usize],
        i: usize,
        v: Option<&[f32]>,
        rngs: &mut [ChaCha8Rng],
    ) -> Vec<f32> {
        let (t, t_next) = (ts[i], ts.get(i + 1).copied());
        match self.method {
            Method::Ddpm { variance, .. } => {
                let chain = self.chain.as_ref().expect("a DDPM chain");
                ddpm_step(chain, x, x0, ts.len() - 1 - i, *variance, v, rngs)
            }
            Method::Ddim { eta, .. } => ddim_step(self.sched, x, x0, t, t_next, *eta, rngs),
            Method::Consistency { .. } => consistency_step(self.sched, x0, t_next, rngs),
            Method::DpmSolverPP { .. } => {
                // The order rule: first order on the first step (no history yet) and on the step that lands
                // on the final timestep ("lower order final" in DPM-Solver++'s reference code and diffusers:
                // few-step sampling is more stable without the second-order correction there); the last
                // step then returns x0.
                let lands_on_final = i + 2 == ts.len();
                let prev = self.history.as_ref().filter(|_| !lands_on_final);
                let (next, h) = dpmpp_2m_step(self.sched, x, x0, t, t_next, prev);
                self.history = Some(History { x0: x0.to_vec(), h });
                next
            }
        }
    }

    /// Drops the multistep history (after a jump back up the chain).
    fn forget(&mut self) {
        self.history = None;
    }
}
