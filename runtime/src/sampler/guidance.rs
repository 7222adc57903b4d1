//! Classifier-free guidance as a wrapper around a [`Denoiser`], as k-diffusion's `CFGDenoiser` wraps a model:
//! the sampling loop asks the wrapper for eps at a timestep and steps; the wrapper decides whether to guide
//! (the request's weights and guidance interval), batches the conditional and null halves into one call, and
//! composes them.

use super::request::Request;
use super::{predict_eps, predict_eps_w, Denoiser};
use crate::error::Result;
use crate::schedule::NoiseSchedule;

/// eps and, for a learned variance, v: what the wrapper answers.
type EpsAndV = (Vec<f32>, Option<Vec<f32>>);

/// A denoiser guided as a request says (Ho & Salimans 2022; with attributes, Liu et al. 2022).
pub struct Guided<'a> {
    den: &'a mut dyn Denoiser,
    sched: &'a NoiseSchedule,
    req: &'a Request,
}

impl<'a> Guided<'a> {
    pub fn new(den: &'a mut dyn Denoiser, sched: &'a NoiseSchedule, req: &'a Request) -> Self {
        Self { den, sched, req }
    }

    /// eps at timestep `t` for the `k` images `x` with their `labels`, guided where the request guides, and the
    /// model's v when `want_v` (a learned variance: the conditional half's, as in GLIDE's reference sampler;
    /// guidance moves the mean only).
    pub fn eps(&mut self, x: &[f32], k: usize, t: usize, labels: Option<&[i64]>, want_v: bool) -> Result<EpsAndV> {
        let req = self.req;
        let guides = req.guided() && req.options.guidance_interval.is_none_or(|g| g.contains(t));
        if self.den.guidance_input() {
            // a guidance-distilled student: w is an input, one call whatever it is (Meng et al. 2023)
            let wt = if guides { req.guidance } else { 0.0 };
            let [c, h, w] = req.shape;
            let ws = vec![wt; k];
            return predict_eps_w(self.den, self.sched, x, [k, c, h, w], t, labels, want_v, Some(&ws));
        }
        match (guides, labels, req.null_class) {
            (true, Some(l), Some(null)) if !req.attributes.is_empty() => self.composed(x, k, t, l, null, want_v),
            (true, Some(l), Some(null)) => self.class_guided(x, k, t, l, null, want_v),
            _ => self.call(x, k, t, labels, want_v),
        }
    }

    /// The model's eps (and v) for `n` images, one batched call.
    fn call(&mut self, x: &[f32], n: usize, t: usize, y: Option<&[i64]>, want_v: bool) -> Result<EpsAndV> {
        let [c, h, w] = self.req.shape;
        predict_eps(self.den, self.sched, x, [n, c, h, w], t, y, want_v)
    }

    /// Ho & Salimans 2022, eq. 6: eps~ = (1 + w) eps(z, c) - w eps(z), both halves in one call.
    fn class_guided(&mut self, x: &[f32], k: usize, t: usize, l: &[i64], null: i64, want_v: bool) -> Result<EpsAndV> {
        let mut x2 = Vec::with_capacity(2 * x.len());
        x2.extend_from_slice(x);
        x2.extend_from_slice(x);
        let mut y2 = l.to_vec();
        y2.extend(std::iter::repeat_n(null, k));
        let (e, mut v) = self.call(&x2, 2 * k, t, Some(&y2), want_v)?;
        let (cond, unc) = e.split_at(x.len());
        let wt = self.req.guidance;
        if let Some(v) = v.as_mut() {
            v.truncate(x.len());
        }
        Ok((cond.iter().zip(unc).map(|(a, b)| (1.0 + wt) * a - wt * b).collect(), v))
    }

    /// Liu et al. 2022, eq. 10, batched: eps~ = eps(x, null) + sum_i (1 + w_i) (eps(x, c_i) - eps(x, null)), the
    /// rows [null | c_0 | c_1 | ..] in one call, c_i label i alone (every other label null).
    fn composed(&mut self, x: &[f32], k: usize, t: usize, l: &[i64], null: i64, want_v: bool) -> Result<EpsAndV> {
        let req = self.req;
        let cols = req.label_columns();
        let nulls: Vec<i64> = std::iter::once(null).chain(req.attributes.iter().map(|a| a.null)).collect();
        let mut ys = Vec::with_capacity((cols + 1) * k * cols);
        for part in 0..=cols {
            for img in l.chunks(cols) {
                ys.extend((0..cols).map(|c| if part == c + 1 { img[c] } else { nulls[c] }));
            }
        }
        let xs: Vec<f32> = (0..=cols).flat_map(|_| x.iter().copied()).collect();
        let (e, v) = self.call(&xs, (cols + 1) * k, t, Some(&ys), want_v)?;
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
}
