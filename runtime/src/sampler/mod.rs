//! The samplers, written once against [`Denoiser`]: DDPM ancestral sampling, DDIM, DPM-Solver++(2M), and
//! classifier-free guidance. ONNX Runtime (deployment) and the trainer's Candle model (previews,
//! evaluation) both implement `Denoiser`, so the same code path is exercised by both.
//!
//! Each sampler is one step function (x_t and the predicted x0 at t -> x at the next timestep) with its
//! equation in the doc comment; [`sample`] drives them all with one loop: draw x_T, then at every timestep ask
//! the denoiser for eps (guided), turn it into x0, clip, step.
//!
//! - `request`: what to sample ([`Request`], [`Method`], the shared [`SampleOptions`]) and its checks;
//! - `run`: the loop ([`sample`], [`sample_chunks`]);
//! - `steps`: the step functions (DDPM, DDIM, DPM-Solver++(2M)) and x0 clipping;
//! - `guidance`: classifier-free guidance as a wrapper around a [`Denoiser`] ([`Guided`]);
//! - `editing`: image-to-image, variations, interpolation and inpainting.
//!
//! All sampler arithmetic is f32 on the host whatever the model's dtype. Every image draws its noise from
//! its own ChaCha8 stream (seed, image index), so results do not depend on how `n` is split into batches.

mod editing;
mod guidance;
mod request;
mod run;
mod steps;
#[cfg(test)]
mod tests;

pub use editing::{interpolation, seed_interpolation};
pub use guidance::Guided;
pub use request::{
    timesteps, AttrCond, Cancel, GuidanceInterval, InitImage, Inpaint, Method, Request, SampleOptions, SamplerKind,
    Spacing,
};
pub use run::{sample, sample_chunks, StepInfo};

use crate::error::{Error, Result};
use crate::schedule::{NoiseSchedule, Prediction};

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

    /// Whether the model takes the guidance weight as an input (a guidance-distilled student, Meng et al. 2023):
    /// [`Guided`] then asks [`Denoiser::eps_w`] once per step instead of a conditional and a null call.
    fn guidance_input(&self) -> bool {
        false
    }

    /// The first output of a guidance-input model for weights `w` (one per image).
    fn eps_w(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>, w: &[f32]) -> Result<Vec<f32>> {
        let _ = (x, shape, t, y, w);
        Err(Error::denoiser("this model takes no guidance weight"))
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
    predict_eps_w(den, sched, x, shape, t, y, want_v, None)
}

/// [`predict_eps`] with the guidance weights of a guidance-input model (`w`, one per image; None for any other).
#[allow(clippy::too_many_arguments)]
pub fn predict_eps_w(
    den: &mut dyn Denoiser,
    sched: &NoiseSchedule,
    x: &[f32],
    shape: [usize; 4],
    t: usize,
    y: Option<&[i64]>,
    want_v: bool,
    w: Option<&[f32]>,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let ts = vec![t as i64; shape[0]];
    let (mut out, v) = if let Some(w) = w {
        (den.eps_w(x, shape, &ts, y, w)?, None)
    } else if want_v {
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
