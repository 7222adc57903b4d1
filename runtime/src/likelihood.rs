//! The variational bound of a DDPM (Ho et al. 2020, eq. 5) term by term, in bits per dimension: the KL terms
//! L_t of the reverse steps, the discretised decoder at t = 0 and the prior term L_T. The trainer's hybrid
//! loss (Nichol & Dhariwal 2021, eq. 16) takes L_t with its derivative with respect to the model's
//! log-variance; [`nll_bits_per_dim`] sums every term over a test set, the negative log-likelihood that
//! Ho et al. (sec. 4.2, table 2) and Nichol & Dhariwal (table 1, 2) report.
//!
//! Written after improved-diffusion's `losses.py` and `_vb_terms_bpd`: the same approximation of the normal
//! CDF, the same clipping of the decoder's log-probabilities and of beta-tilde at t = 0.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};
use crate::sampler::{predict_eps, Denoiser};
use crate::schedule::{NoiseSchedule, VarianceType};

const LN2: f64 = std::f64::consts::LN_2;

/// KL(N(m1, e^lv1) || N(m2, e^lv2)) in nats (Nichol & Dhariwal 2021, sec. 2.1; improved DDPM's `normal_kl`)
/// and its derivative with respect to lv2.
pub fn normal_kl(m1: f64, lv1: f64, m2: f64, lv2: f64) -> (f64, f64) {
    let (r, d2) = ((lv1 - lv2).exp(), (m1 - m2).powi(2) * (-lv2).exp());
    (0.5 * (-1.0 + lv2 - lv1 + r + d2), 0.5 * (1.0 - r - d2))
}

/// The standard normal CDF by Page's tanh approximation (improved DDPM's `approx_standard_normal_cdf`), and
/// its derivative.
fn approx_cdf(x: f64) -> (f64, f64) {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let th = (k * (x + 0.044715 * x.powi(3))).tanh();
    (0.5 * (1.0 + th), 0.5 * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * x * x))
}

/// The standard normal CDF Phi(x), by the same approximation (absolute error below 2e-4).
pub fn approx_standard_normal_cdf(x: f64) -> f64 {
    approx_cdf(x).0
}

/// log N(x; mean, e^{2 log_scale}) integrated over x's 8-bit bin of [-1, 1] (Ho et al. 2020, eq. 13: the edge
/// bins reach to -inf and +inf), and its derivative with respect to `log_scale`.
pub fn discretized_gaussian_log_likelihood(x: f64, mean: f64, log_scale: f64) -> (f64, f64) {
    let inv = (-log_scale).exp();
    let (plus_in, min_in) = (inv * (x - mean + 1.0 / 255.0), inv * (x - mean - 1.0 / 255.0));
    let ((cdf_plus, pdf_plus), (cdf_min, pdf_min)) = (approx_cdf(plus_in), approx_cdf(min_in));
    // d(in)/d(log_scale) = -in
    let (dp, dm) = (-pdf_plus * plus_in, -pdf_min * min_in);
    const TINY: f64 = 1e-12;
    if x < -0.999 {
        if cdf_plus <= TINY {
            return (TINY.ln(), 0.0);
        }
        (cdf_plus.ln(), dp / cdf_plus)
    } else if x > 0.999 {
        let p = 1.0 - cdf_min;
        if p <= TINY {
            return (TINY.ln(), 0.0);
        }
        (p.ln(), -dm / p)
    } else {
        let p = cdf_plus - cdf_min;
        if p <= TINY {
            return (TINY.ln(), 0.0);
        }
        (p.ln(), (dp - dm) / p)
    }
}

/// The model's log-variance of every element at t: eq. 15 of Nichol & Dhariwal 2021 from `v` for a learned
/// variance, the fixed one otherwise (beta-tilde clipped at t = 0, as in the bound of the reference code).
pub fn model_log_variance(
    sched: &NoiseSchedule,
    t: usize,
    variance: VarianceType,
    v: Option<&[f32]>,
    len: usize,
) -> Vec<f64> {
    match (variance, v) {
        (VarianceType::LearnedRange, Some(v)) => v.iter().map(|&v| sched.learned_log_variance(t, v)).collect(),
        (VarianceType::FixedLarge, _) => {
            vec![sched.reverse_variance(t, VarianceType::FixedLarge).unwrap_or(1.0).ln(); len]
        }
        _ => vec![sched.posterior_log_variance_clipped(t); len],
    }
}

/// One image's term of the variational bound at t, in bits per dimension (the mean over its values): for
/// t > 0, L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (Ho et al. 2020, eq. 5); at t = 0, the
/// decoder's -log p(x_0 | x_1) (eq. 13). The model's mean comes from `eps` (eq. 11 through x0, clipped to
/// [-1, 1] when `clip`), its log-variance is `log_var`. Returns the term and its derivative with respect to
/// each element's log-variance (the mean held fixed: Nichol & Dhariwal 2021, sec. 3.1's stop-gradient).
pub fn vb_term(
    sched: &NoiseSchedule,
    x0: &[f32],
    xt: &[f32],
    t: usize,
    eps: &[f32],
    log_var: &[f64],
    clip: bool,
) -> (f64, Vec<f64>) {
    let mut x0_pred = sched.predict_x0_from_eps(xt, t, eps);
    if clip {
        x0_pred.iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0));
    }
    let (c1, c2) = (sched.posterior_mean_coef1[t], sched.posterior_mean_coef2[t]);
    let n = x0.len() as f64;
    let true_lv = sched.posterior_log_variance_clipped(t);
    let mut total = 0.0;
    let mut grad = Vec::with_capacity(x0.len());
    for i in 0..x0.len() {
        let mean = c1 * x0_pred[i] as f64 + c2 * xt[i] as f64;
        let (term, d) = if t == 0 {
            // Ho et al. 2020, eq. 13 with log_scale = log_var / 2
            let (ll, dls) = discretized_gaussian_log_likelihood(x0[i] as f64, mean, 0.5 * log_var[i]);
            (-ll, -0.5 * dls)
        } else {
            let true_mean = c1 * x0[i] as f64 + c2 * xt[i] as f64;
            normal_kl(true_mean, true_lv, mean, log_var[i])
        };
        total += term;
        grad.push(d / (n * LN2));
    }
    (total / (n * LN2), grad)
}

/// L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension (Ho et al. 2020, eq. 5): constant in the model,
/// close to 0 for a schedule that ends in noise.
pub fn prior_bits_per_dim(sched: &NoiseSchedule, x0: &[f32]) -> f64 {
    let (a, b) = sched.q_sample_coefs(sched.num_timesteps() - 1);
    let lv = 2.0 * b.ln();
    x0.iter().map(|&x| normal_kl(a * x as f64, lv, 0.0, 0.0).0).sum::<f64>() / (x0.len() as f64 * LN2)
}

/// The bound of every image of a test set, in bits per dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct Nll {
    /// The whole bound of each image: sum over t of its terms plus the prior term.
    pub bits_per_dim: Vec<f64>,
    /// Mean over the images of each t's term (index t; t = 0 is the decoder).
    pub terms: Vec<f64>,
    /// Mean over the images of the prior term L_T.
    pub prior: f64,
}

impl Nll {
    /// The mean bound and its standard error over the images.
    pub fn mean_and_stderr(&self) -> (f64, f64) {
        let n = self.bits_per_dim.len() as f64;
        let m = self.bits_per_dim.iter().sum::<f64>() / n;
        let var = self.bits_per_dim.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        (m, (var / n).sqrt())
    }
}

/// The negative log-likelihood bound of `x0` (`n` images [c, h, w] in [-1, 1], on the 8-bit grid) under the
/// model, in bits per dimension: every one of the T terms, each at its own draw of x_t ~ q(x_t | x_0), plus
/// the prior (improved DDPM's `calc_bpd_loop`, x0 clipped). One model call per timestep and batch of
/// `batch` images; `labels` conditions the model (None: unconditional, or the null class). `on_t` hears of
/// every timestep done. Image i draws its noise from ChaCha8(seed) stream i.
#[allow(clippy::too_many_arguments)]
pub fn nll_bits_per_dim(
    den: &mut dyn Denoiser,
    sched: &NoiseSchedule,
    variance: VarianceType,
    x0: &[f32],
    shape: [usize; 3],
    labels: Option<&[i64]>,
    seed: u64,
    batch: usize,
    on_t: &mut dyn FnMut(usize),
) -> Result<Nll> {
    let per: usize = shape.iter().product();
    if per == 0 || x0.is_empty() || !x0.len().is_multiple_of(per) {
        return Err(Error::request("x0", format!("{} values are not whole {shape:?} images", x0.len())));
    }
    let n = x0.len() / per;
    if labels.is_some_and(|l| l.len() != n) {
        return Err(Error::request("labels", format!("{} labels for {n} images", labels.map_or(0, |l| l.len()))));
    }
    let batch = batch.max(1);
    let tn = sched.num_timesteps();
    let mut rngs: Vec<ChaCha8Rng> = (0..n)
        .map(|i| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            r.set_stream(i as u64);
            r
        })
        .collect();
    let mut bits: Vec<f64> = (0..n).map(|i| prior_bits_per_dim(sched, &x0[i * per..(i + 1) * per])).collect();
    let prior = bits.iter().sum::<f64>() / n as f64;
    let mut terms = vec![0.0; tn];
    let [c, h, w] = shape;
    for t in (0..tn).rev() {
        for start in (0..n).step_by(batch) {
            let k = batch.min(n - start);
            let imgs = &x0[start * per..(start + k) * per];
            let mut xt = Vec::with_capacity(imgs.len());
            for (j, img) in imgs.chunks(per).enumerate() {
                let z: Vec<f32> = (0..per).map(|_| StandardNormal.sample(&mut rngs[start + j])).collect();
                xt.extend(sched.q_sample(img, t, &z));
            }
            let y = labels.map(|l| &l[start..start + k]);
            let (eps, v) = predict_eps(den, sched, &xt, [k, c, h, w], t, y, variance.is_learned())?;
            for j in 0..k {
                let r = j * per..(j + 1) * per;
                let lv = model_log_variance(sched, t, variance, v.as_ref().map(|v| &v[r.clone()]), per);
                let (term, _) = vb_term(sched, &imgs[r.clone()], &xt[r.clone()], t, &eps[r], &lv, true);
                bits[start + j] += term;
                terms[t] += term / n as f64;
            }
        }
        on_t(t);
    }
    Ok(Nll { bits_per_dim: bits, terms, prior })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::BetaSchedule;

    #[test]
    fn kl_is_zero_for_equal_gaussians_and_its_derivative_is_the_finite_difference() {
        assert!(normal_kl(0.3, -1.0, 0.3, -1.0).0.abs() < 1e-15);
        // the closed form against the textbook one: log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2
        let (m1, lv1, m2, lv2) = (0.2f64, -2.0f64, -0.1f64, -1.5f64);
        let (s1, s2) = ((0.5 * lv1).exp(), (0.5 * lv2).exp());
        let want = (s2 / s1).ln() + (s1 * s1 + (m1 - m2).powi(2)) / (2.0 * s2 * s2) - 0.5;
        let (kl, d) = normal_kl(m1, lv1, m2, lv2);
        assert!((kl - want).abs() < 1e-12);
        let h = 1e-6;
        let fd = (normal_kl(m1, lv1, m2, lv2 + h).0 - normal_kl(m1, lv1, m2, lv2 - h).0) / (2.0 * h);
        assert!((d - fd).abs() < 1e-8, "{d} vs {fd}");
    }

    #[test]
    fn the_discretised_decoder_is_a_distribution_and_its_derivative_is_the_finite_difference() {
        // over the 256 bins of [-1, 1] the probabilities sum to 1, for any mean and scale
        for (mean, ls) in [(0.0, -3.0), (0.7, -5.0), (-0.99, -1.0), (0.2, 0.5)] {
            let total: f64 =
                (0..256).map(|k| discretized_gaussian_log_likelihood(k as f64 / 127.5 - 1.0, mean, ls).0.exp()).sum();
            assert!((total - 1.0).abs() < 1e-9, "mean {mean} log-scale {ls}: {total}");
        }
        // h large enough that the cancellation of 1 + tanh in the tails (a CDF near 0) stays below the tolerance
        let h = 1e-4;
        for x in [-1.0, -0.5, 0.0, 0.3, 1.0] {
            for ls in [-4.0, -2.0, 0.0] {
                let f = |s| discretized_gaussian_log_likelihood(x, 0.1, s).0;
                let d = discretized_gaussian_log_likelihood(x, 0.1, ls).1;
                let fd = (f(ls + h) - f(ls - h)) / (2.0 * h);
                assert!((d - fd).abs() < 1e-5 * (1.0 + fd.abs()), "x {x} ls {ls}: {d} vs {fd}");
            }
        }
    }

    #[test]
    fn the_true_posterior_makes_every_kl_term_zero_and_the_gradient_points_to_the_true_variance() {
        let s = NoiseSchedule::new(BetaSchedule::COSINE, 100);
        let x0 = [0.5f32, -0.25, 1.0, -1.0];
        let eps = [0.3f32, -1.2, 0.8, 0.1];
        for t in 1..100 {
            let xt = s.q_sample(&x0, t, &eps);
            // the model that knows eps and uses beta-tilde has L_t = 0 (up to f32 rounding of x0)
            let lv = vec![s.posterior_log_variance_clipped(t); 4];
            let (term, grad) = vb_term(&s, &x0, &xt, t, &eps, &lv, false);
            assert!(term.abs() < 1e-6, "t={t}: {term}");
            assert!(grad.iter().all(|g| g.abs() < 1e-5), "t={t}: {grad:?}");
            // a larger variance than the truth costs bits, and its gradient says to lower it
            let big = vec![s.betas[t].ln() + 1.0; 4];
            let (term, grad) = vb_term(&s, &x0, &xt, t, &eps, &big, false);
            assert!(term > 0.0 && grad.iter().all(|g| *g > 0.0), "t={t}");
        }
    }

    #[test]
    fn the_prior_term_is_near_zero_for_the_papers_schedules() {
        let x0: Vec<f32> = (0..784).map(|i| (i % 256) as f32 / 127.5 - 1.0).collect();
        for kind in [BetaSchedule::LINEAR, BetaSchedule::COSINE] {
            let p = prior_bits_per_dim(&NoiseSchedule::new(kind, 1000), &x0);
            assert!((0.0..1e-3).contains(&p), "{kind:?}: {p}");
        }
    }

    /// Knows the true eps of every x_t of one fixed image: the bound's KL terms are then 0.
    struct Oracle {
        sched: NoiseSchedule,
        x0: Vec<f32>,
        v: Option<f32>,
    }

    impl Denoiser for Oracle {
        fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
            Ok(self.eps_and_v(x, shape, t, y)?.0)
        }
        fn eps_and_v(
            &mut self,
            x: &[f32],
            _: [usize; 4],
            t: &[i64],
            _: Option<&[i64]>,
        ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
            let per = self.x0.len();
            let eps =
                x.chunks(per).zip(t).flat_map(|(x, &t)| self.sched.eps_from_x0(x, t as usize, &self.x0)).collect();
            Ok((eps, self.v.map(|v| vec![v; x.len()])))
        }
    }

    #[test]
    fn the_bound_of_a_model_that_knows_the_image_is_its_decoder_term_and_a_worse_variance_costs_bits() {
        let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 50);
        let x0: Vec<f32> = (0..16).map(|i| (i * 17 % 256) as f32 / 127.5 - 1.0).collect();
        let mut exact = Oracle { sched: sched.clone(), x0: x0.clone(), v: Some(-1.0) };
        let two = [x0.clone(), x0.clone()].concat();
        let nll =
            nll_bits_per_dim(&mut exact, &sched, VarianceType::LearnedRange, &two, [1, 4, 4], None, 3, 1, &mut |_| {})
                .unwrap();
        assert_eq!(nll.bits_per_dim.len(), 2);
        assert!(nll.terms[1..].iter().all(|t| t.abs() < 1e-4), "{:?}", &nll.terms[..5]);
        // what is left is the decoder at t = 0: its sd sqrt(beta-tilde_1) = 0.009 is wider than a bin (1/255),
        // so the right bin gets about a third of the mass, i.e. about 1.6 bits
        assert!(nll.terms[0] > 1.0 && nll.terms[0] < 2.0, "{}", nll.terms[0]);
        let (m, _) = nll.mean_and_stderr();
        assert!((m - nll.terms.iter().sum::<f64>() - nll.prior).abs() < 1e-9);
        // v = 1 (beta) is the wrong variance for a model that knows x0: every KL term grows
        let mut wide = Oracle { v: Some(1.0), ..exact };
        let worse =
            nll_bits_per_dim(&mut wide, &sched, VarianceType::LearnedRange, &x0, [1, 4, 4], None, 3, 4, &mut |_| {})
                .unwrap();
        assert!(worse.mean_and_stderr().0 > m + 0.1, "{} vs {m}", worse.mean_and_stderr().0);
        // a fixed-variance model is scored without v; a learned one that gives none is refused
        let mut fixed = Oracle { v: None, ..wide };
        let f = nll_bits_per_dim(&mut fixed, &sched, VarianceType::FixedSmall, &x0, [1, 4, 4], None, 3, 4, &mut |_| {});
        assert!((f.unwrap().mean_and_stderr().0 - m).abs() < 1e-3);
        let e =
            nll_bits_per_dim(&mut fixed, &sched, VarianceType::LearnedRange, &x0, [1, 4, 4], None, 3, 4, &mut |_| {});
        assert!(e.unwrap_err().to_string().contains("gave no v"));
    }
}
