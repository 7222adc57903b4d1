//! The step functions, one a sampler, each with its equation: x_t and the predicted x0 at t -> x at the next
//! timestep. Also the x0 clipping every sampler applies first, and the per-image noise streams.

use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::request::SampleOptions;
use crate::schedule::{NoiseSchedule, VarianceType};

/// Clipping / dynamic thresholding of a predicted x0, per image.
pub(super) fn threshold_x0(x0: &mut [f32], per: usize, opts: &SampleOptions) {
    if let Some(p) = opts.dynamic_threshold {
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
    } else if opts.clip_x0 {
        for v in x0.iter_mut() {
            *v = v.clamp(-1.0, 1.0);
        }
    }
}

/// One N(0, I) draw per value, each image from its own stream.
pub(super) fn noise(rngs: &mut [ChaCha8Rng], per: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rngs.len() * per);
    for r in rngs.iter_mut() {
        v.extend((0..per).map(|_| -> f32 { StandardNormal.sample(r) }));
    }
    v
}

/// alpha_bar at a timestep; 1 past the end of the chain (no noise left).
pub(super) fn alpha_bar(sched: &NoiseSchedule, t: Option<usize>) -> f64 {
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
pub(super) fn ddpm_step(
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
        (None, None) => unreachable!("predict_eps refuses a learned variance without v"),
    }
    out
}

/// DDIM (Song et al. 2020, eq. 12), from t to the next timestep `t_next` (None: the end, a_bar = 1):
///
///   x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
///   sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)   (eq. 16)
///
/// where eps is recomputed from the (possibly clipped) x0 so that the two agree.
pub(super) fn ddim_step(
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

/// Multistep consistency sampling (Song et al. 2023, Algorithm 1, line 5): the model's x0 noised afresh to the
/// next timestep, x_next = sqrt(a_next) x0 + sqrt(1 - a_next) z; the end returns x0.
pub(super) fn consistency_step(
    sched: &NoiseSchedule,
    x0: &[f32],
    t_next: Option<usize>,
    rngs: &mut [ChaCha8Rng],
) -> Vec<f32> {
    let Some(tn) = t_next else {
        return x0.to_vec();
    };
    let a = sched.alphas_cumprod[tn];
    let (sa, sn) = (a.sqrt() as f32, (1.0 - a).sqrt() as f32);
    let z = noise(rngs, x0.len() / rngs.len());
    x0.iter().zip(&z).map(|(x, z)| sa * x + sn * z).collect()
}

/// The previous DPM-Solver++ step: its predicted x0 and its step size h in log-SNR.
pub(super) struct History {
    pub(super) x0: Vec<f32>,
    pub(super) h: f64,
}

/// DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), from t to `t_next`, with lambda = log(alpha / sigma):
///
///   h = lambda_next - lambda_t,  D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev,  r = h_prev / h
///   x_next = (sigma_next / sigma_t) x_t - alpha_next (e^{-h} - 1) D
///
/// `prev` None makes it first order (D = x0_t: the DDIM step). The last step (`t_next` None, sigma = 0)
/// returns x0 itself. Returns x_next and h.
pub(super) fn dpmpp_2m_step(
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
