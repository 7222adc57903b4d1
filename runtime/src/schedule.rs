//! Noise schedules and the closed forms of the DDPM forward process.
//!
//! Everything here is plain `f64` arithmetic over `Vec`s: no tensor library, so the trainer (Candle) and the
//! deployment runtime (ONNX Runtime) share one definition of the diffusion process.
//!
//! Notation (Ho et al. 2020, "DDPM"): beta_t is the variance added at step t, alpha_t = 1 - beta_t,
//! alpha_bar_t = prod_{s<=t} alpha_s. Timesteps are 0-based here: index `t` in `0..T` is the paper's t+1.

use serde::{Deserialize, Serialize};

/// How the betas are laid out over the T steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Linearly spaced betas (Ho et al. 2020, sec. 4: 1e-4 .. 0.02 for T = 1000).
    Linear { beta_start: f64, beta_end: f64 },
    /// alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2) (Nichol & Dhariwal 2021, eq. 17), betas clipped at `max_beta`.
    Cosine { s: f64, max_beta: f64 },
}

impl BetaSchedule {
    /// The DDPM paper's linear schedule, 1e-4 .. 0.02.
    pub const LINEAR: BetaSchedule = BetaSchedule::Linear { beta_start: 1e-4, beta_end: 0.02 };
    /// The improved-DDPM cosine schedule, s = 0.008, betas clipped at 0.999.
    pub const COSINE: BetaSchedule = BetaSchedule::Cosine { s: 0.008, max_beta: 0.999 };

    /// The named schedule for a chain of `num_timesteps`: the linear one is Ho et al.'s 1e-4 .. 0.02 at T = 1000,
    /// both ends scaled by 1000 / T (Nichol & Dhariwal 2021's code, `get_named_beta_schedule`), so that x_T is
    /// noise whatever T: unscaled, T = 100 ends at alpha-bar_T = 0.37 and sampling from N(0, I) goes wrong. The
    /// ends are capped below 1 (T < 20). The cosine schedule is defined for any T as it stands.
    pub fn named(kind: ScheduleKind, num_timesteps: usize) -> Self {
        match kind {
            ScheduleKind::Linear => {
                let scale = 1000.0 / num_timesteps.max(1) as f64;
                BetaSchedule::Linear { beta_start: (1e-4 * scale).min(0.999), beta_end: (0.02 * scale).min(0.999) }
            }
            ScheduleKind::Cosine => Self::COSINE,
        }
    }

    pub fn kind(&self) -> ScheduleKind {
        match self {
            BetaSchedule::Linear { .. } => ScheduleKind::Linear,
            BetaSchedule::Cosine { .. } => ScheduleKind::Cosine,
        }
    }

    /// The T betas of this schedule.
    pub fn betas(&self, num_timesteps: usize) -> Vec<f64> {
        assert!(num_timesteps > 0, "a schedule needs at least one timestep");
        let n = num_timesteps as f64;
        match *self {
            BetaSchedule::Linear { beta_start, beta_end } => {
                if num_timesteps == 1 {
                    return vec![beta_start];
                }
                (0..num_timesteps).map(|i| beta_start + (beta_end - beta_start) * i as f64 / (n - 1.0)).collect()
            }
            BetaSchedule::Cosine { s, max_beta } => {
                // Nichol & Dhariwal 2021, eq. 17: f(t) = cos^2(((t/T + s)/(1+s)) * pi/2), alpha_bar_t = f(t)/f(0).
                let f = |t: f64| (((t / n + s) / (1.0 + s)) * std::f64::consts::FRAC_PI_2).cos().powi(2);
                // Nichol & Dhariwal 2021, sec. 3.2: beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped to <= 0.999.
                (0..num_timesteps).map(|i| (1.0 - f(i as f64 + 1.0) / f(i as f64)).min(max_beta)).collect()
            }
        }
    }
}

/// The kind of beta schedule a configuration names (`linear`, `cosine`); [`BetaSchedule::named`] gives its betas for a T.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScheduleKind {
    #[default]
    Linear,
    Cosine,
}

crate::named_enum!(ScheduleKind, "beta schedule", { Linear => ["linear"], Cosine => ["cosine"] });

/// Which reverse-process variance sigma_t^2 a DDPM step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VarianceType {
    /// sigma_t^2 = beta-tilde_t, the posterior variance (Ho et al. 2020, sec. 3.2, "fixed small").
    #[default]
    FixedSmall,
    /// sigma_t^2 = beta_t (Ho et al. 2020, sec. 3.2, "fixed large").
    FixedLarge,
    /// Learned by the model: log sigma_t^2 = v log beta_t + (1 - v) log beta-tilde_t per pixel, with the model's
    /// second output v (Nichol & Dhariwal 2021, eq. 15; the network's v in [-1, 1] is mapped to [0, 1]).
    LearnedRange,
}

crate::named_enum!(VarianceType, "variance type", {
    FixedSmall => ["fixed_small", "beta_tilde"],
    FixedLarge => ["fixed_large", "beta"],
    LearnedRange => ["learned_range", "learned"],
});

impl VarianceType {
    /// The model has a second output (v) that sets the variance.
    pub fn is_learned(self) -> bool {
        self == VarianceType::LearnedRange
    }
}

/// What the network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prediction {
    /// The noise eps (Ho et al. 2020, eq. 14's eps_theta).
    #[default]
    Epsilon,
    /// The velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, sec. 4): well
    /// conditioned at every noise level, where eps-prediction turns small errors into large ones in x_0 as
    /// alpha_bar -> 0. The samplers turn it into eps.
    V,
}

crate::named_enum!(Prediction, "prediction type", { Epsilon => ["epsilon"], V => ["v", "v_prediction"] });

impl Prediction {
    /// The name of an exported model's first output: `eps`, or `velocity` for a v-predicting model.
    pub fn output_name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "eps",
            Prediction::V => "velocity",
        }
    }
}

/// A discrete noise schedule with every coefficient of the forward process and its posterior precomputed.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    /// beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (Ho et al. 2020, eq. 7).
    pub posterior_variance: Vec<f64>,
    /// The coefficient of x_0 in mu-tilde_t (Ho et al. 2020, eq. 7).
    pub posterior_mean_coef1: Vec<f64>,
    /// The coefficient of x_t in mu-tilde_t (Ho et al. 2020, eq. 7).
    pub posterior_mean_coef2: Vec<f64>,
}

impl NoiseSchedule {
    pub fn new(kind: BetaSchedule, num_timesteps: usize) -> Self {
        Self::from_betas(kind.betas(num_timesteps))
    }

    /// Builds every coefficient from an explicit beta list (e.g. the one stored in an ONNX model's metadata).
    pub fn from_betas(betas: Vec<f64>) -> Self {
        assert!(!betas.is_empty(), "a schedule needs at least one beta");
        assert!(betas.iter().all(|b| *b > 0.0 && *b < 1.0), "betas must lie in (0, 1)");
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut acc = 1.0;
        for a in &alphas {
            acc *= a;
            alphas_cumprod.push(acc);
        }
        let alphas_cumprod_prev: Vec<f64> =
            std::iter::once(1.0).chain(alphas_cumprod[..alphas_cumprod.len() - 1].iter().copied()).collect();
        let n = betas.len();
        let mut posterior_variance = Vec::with_capacity(n);
        let mut posterior_mean_coef1 = Vec::with_capacity(n);
        let mut posterior_mean_coef2 = Vec::with_capacity(n);
        for t in 0..n {
            let (b, a, ab, ab_prev) = (betas[t], alphas[t], alphas_cumprod[t], alphas_cumprod_prev[t]);
            // Ho et al. 2020, eq. 7: beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t
            posterior_variance.push(b * (1.0 - ab_prev) / (1.0 - ab));
            // Ho et al. 2020, eq. 7: mu-tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0 + ...
            posterior_mean_coef1.push(ab_prev.sqrt() * b / (1.0 - ab));
            // ... + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
            posterior_mean_coef2.push(a.sqrt() * (1.0 - ab_prev) / (1.0 - ab));
        }
        Self {
            betas,
            alphas,
            alphas_cumprod,
            alphas_cumprod_prev,
            posterior_variance,
            posterior_mean_coef1,
            posterior_mean_coef2,
        }
    }

    /// T, the number of diffusion steps.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)): x_t = a x_0 + b eps (Ho et al. 2020, eq. 4).
    pub fn q_sample_coefs(&self, t: usize) -> (f64, f64) {
        let ab = self.alphas_cumprod[t];
        (ab.sqrt(), (1.0 - ab).sqrt())
    }

    /// x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4), element-wise.
    pub fn q_sample(&self, x0: &[f32], t: usize, noise: &[f32]) -> Vec<f32> {
        assert_eq!(x0.len(), noise.len(), "x0 and noise must have the same length");
        let (a, b) = self.q_sample_coefs(t);
        x0.iter().zip(noise).map(|(x, e)| (a * *x as f64 + b * *e as f64) as f32).collect()
    }

    /// x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (Ho et al. 2020, eq. 4 solved for x_0).
    pub fn predict_x0_from_eps(&self, xt: &[f32], t: usize, eps: &[f32]) -> Vec<f32> {
        let (a, b) = self.q_sample_coefs(t);
        xt.iter().zip(eps).map(|(x, e)| ((*x as f64 - b * *e as f64) / a) as f32).collect()
    }

    /// eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t) (Ho et al. 2020, eq. 4 solved for eps).
    pub fn eps_from_x0(&self, xt: &[f32], t: usize, x0: &[f32]) -> Vec<f32> {
        let (a, b) = self.q_sample_coefs(t);
        xt.iter().zip(x0).map(|(x, x0)| ((*x as f64 - a * *x0 as f64) / b) as f32).collect()
    }

    /// The velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4), the
    /// target of a v-predicting model.
    pub fn v_from_eps(&self, x0: &[f32], t: usize, eps: &[f32]) -> Vec<f32> {
        let (a, b) = self.q_sample_coefs(t);
        x0.iter().zip(eps).map(|(x0, e)| (a * *e as f64 - b * *x0 as f64) as f32).collect()
    }

    /// eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t (Salimans & Ho 2022, sec. 4, solved for eps), in
    /// place: `v` becomes eps.
    pub fn eps_from_v(&self, xt: &[f32], t: usize, v: &mut [f32]) {
        let (a, b) = self.q_sample_coefs(t);
        for (v, x) in v.iter_mut().zip(xt) {
            *v = (a * *v as f64 + b * *x as f64) as f32;
        }
    }

    /// The mean mu-tilde_t(x_t, x_0) of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7).
    pub fn posterior_mean(&self, x0: &[f32], xt: &[f32], t: usize) -> Vec<f32> {
        let (c1, c2) = (self.posterior_mean_coef1[t], self.posterior_mean_coef2[t]);
        x0.iter().zip(xt).map(|(a, b)| (c1 * *a as f64 + c2 * *b as f64) as f32).collect()
    }

    /// sigma_t^2 of the reverse step at t for a fixed variance type (None for a learned one, which needs the
    /// model's v: [`NoiseSchedule::learned_log_variance`]). At t = 0 beta-tilde is 0.
    pub fn reverse_variance(&self, t: usize, variance: VarianceType) -> Option<f64> {
        match variance {
            VarianceType::FixedSmall => Some(self.posterior_variance[t]),
            // Ho et al. 2020 / improved DDPM: the "fixed large" variance uses beta-tilde_1 at the first step
            // so that the log-variance stays finite; beta_t otherwise.
            VarianceType::FixedLarge => Some(if t == 0 { self.posterior_variance_clipped(0) } else { self.betas[t] }),
            VarianceType::LearnedRange => None,
        }
    }

    /// beta-tilde_t with beta-tilde_1 in place of the 0 at t = 0 (improved DDPM's clipped posterior variance).
    fn posterior_variance_clipped(&self, t: usize) -> f64 {
        if t == 0 {
            self.posterior_variance.get(1).copied().unwrap_or(self.betas[0])
        } else {
            self.posterior_variance[t]
        }
    }

    /// log beta-tilde_t with beta-tilde_1 in place of the 0 at t = 0 (improved DDPM's
    /// `posterior_log_variance_clipped`): the lower end of the learned range, and the true posterior's
    /// log-variance in the variational bound.
    pub fn posterior_log_variance_clipped(&self, t: usize) -> f64 {
        self.posterior_variance_clipped(t).ln()
    }

    /// Nichol & Dhariwal 2021, eq. 15: log Sigma = f log beta_t + (1 - f) log beta-tilde_t, f = (v + 1) / 2 for the
    /// model's output v (improved DDPM's `learned_range`); d(log Sigma)/dv is half the width of the range.
    pub fn learned_log_variance(&self, t: usize, v: f32) -> f64 {
        let (lo, hi) = (self.posterior_log_variance_clipped(t), self.betas[t].ln());
        let f = (v as f64 + 1.0) / 2.0;
        f * hi + (1.0 - f) * lo
    }

    /// d(log Sigma)/dv of [`NoiseSchedule::learned_log_variance`].
    pub fn learned_log_variance_slope(&self, t: usize) -> f64 {
        0.5 * (self.betas[t].ln() - self.posterior_log_variance_clipped(t))
    }

    /// The schedule of a shorter chain over the kept timesteps (Nichol & Dhariwal 2021, sec. 4, "respacing"):
    /// beta_i = 1 - alpha_bar_{S_i} / alpha_bar_{S_{i-1}} from the kept alpha-bars, so that the marginals
    /// q(x_{S_i} | x_0) are unchanged. `kept` is any set of distinct timesteps; index i of the result is the
    /// i-th smallest. Keeping all T timesteps gives the schedule back.
    pub fn respaced(&self, kept: &[usize]) -> NoiseSchedule {
        let mut k = kept.to_vec();
        k.sort_unstable();
        k.dedup();
        let mut prev = 1.0;
        let betas = k
            .iter()
            .map(|&t| {
                let ab = self.alphas_cumprod[t];
                let b = 1.0 - ab / prev;
                prev = ab;
                b
            })
            .collect();
        NoiseSchedule::from_betas(betas)
    }

    /// Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021, eq. 2 in DDPM notation).
    pub fn snr(&self, t: usize) -> f64 {
        let ab = self.alphas_cumprod[t];
        ab / (1.0 - ab)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn linear_betas_are_the_paper_endpoints_and_evenly_spaced() {
        let b = BetaSchedule::LINEAR.betas(1000);
        assert_eq!(b.len(), 1000);
        assert!(close(b[0], 1e-4, 1e-12));
        assert!(close(b[999], 0.02, 1e-12));
        let d = b[1] - b[0];
        for w in b.windows(2) {
            assert!(close(w[1] - w[0], d, 1e-9));
        }
    }

    #[test]
    fn linear_alpha_bar_matches_product_closed_form() {
        // alpha_bar_T for the DDPM schedule: prod (1 - beta_t), computed independently in log space.
        let s = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
        let log_ab: f64 = (0..1000).map(|i| (1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0)).ln()).sum();
        assert!(close(s.alphas_cumprod[999], log_ab.exp(), 1e-9));
        // the paper's schedule ends very close to pure noise: alpha_bar_T ~ 4.0e-5
        assert!(s.alphas_cumprod[999] > 3e-5 && s.alphas_cumprod[999] < 5e-5);
        assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn cosine_alpha_bar_is_the_cos_squared_closed_form() {
        for &n in &[10usize, 100, 1000, 4000] {
            let s = NoiseSchedule::new(BetaSchedule::COSINE, n);
            let f = |t: f64| (((t / n as f64 + 0.008) / 1.008) * std::f64::consts::FRAC_PI_2).cos().powi(2);
            for t in 0..n {
                let beta_unclipped = 1.0 - f(t as f64 + 1.0) / f(t as f64);
                if beta_unclipped < 0.999 {
                    // where no beta up to t is clipped, alpha_bar_t = f(t+1)/f(0) exactly
                    if s.betas[..=t].iter().all(|b| *b < 0.999) {
                        assert!(close(s.alphas_cumprod[t], f(t as f64 + 1.0) / f(0.0), 1e-9), "n={n} t={t}");
                    }
                }
            }
            assert!(s.betas.iter().all(|b| *b <= 0.999 && *b > 0.0));
            // the last beta is the clipped one
            assert!(close(s.betas[n - 1], 0.999, 1e-12), "n={n} last beta {}", s.betas[n - 1]);
        }
    }

    #[test]
    fn posterior_coefficients_match_ho_eq7() {
        let s = NoiseSchedule::new(BetaSchedule::LINEAR, 50);
        // at t=0 (paper t=1) alpha_bar_prev = 1: beta-tilde = 0, coef1 = 1, coef2 = 0
        assert_eq!(s.posterior_variance[0], 0.0);
        assert!(close(s.posterior_mean_coef1[0], 1.0, 1e-12));
        assert!(close(s.posterior_mean_coef2[0], 0.0, 1e-12));
        for t in 1..50 {
            let (b, ab, abp) = (s.betas[t], s.alphas_cumprod[t], s.alphas_cumprod[t - 1]);
            assert!(close(s.posterior_variance[t], b * (1.0 - abp) / (1.0 - ab), 1e-12));
            // beta-tilde <= beta always
            assert!(s.posterior_variance[t] <= s.betas[t]);
            // mean coefficients: a consistent x_t = sqrt(ab) x0 (no noise) must map to sqrt(abp) x0
            let (c1, c2) = (s.posterior_mean_coef1[t], s.posterior_mean_coef2[t]);
            assert!(close(c1 + c2 * ab.sqrt(), abp.sqrt(), 1e-12));
        }
    }

    #[test]
    fn posterior_is_the_bayes_product_of_forward_gaussians() {
        // q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precision and mean from the Gaussian product.
        let s = NoiseSchedule::new(BetaSchedule::COSINE, 200);
        let (x0, xt) = (0.3f64, -1.2f64);
        for t in 1..200 {
            let (a, b, abp) = (s.alphas[t], s.betas[t], s.alphas_cumprod_prev[t]);
            let prec = a / b + 1.0 / (1.0 - abp);
            let mean = (a.sqrt() * xt / b + abp.sqrt() * x0 / (1.0 - abp)) / prec;
            assert!(close(s.posterior_variance[t], 1.0 / prec, 1e-9), "t={t}");
            let m = s.posterior_mean(&[x0 as f32], &[xt as f32], t)[0] as f64;
            assert!(close(m, mean, 1e-5), "t={t}: {m} vs {mean}");
        }
    }

    #[test]
    fn q_sample_and_inverses_round_trip() {
        let s = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
        let x0 = [0.5f32, -1.0, 0.0, 0.9];
        let eps = [1.0f32, -0.3, 2.0, 0.1];
        for &t in &[0usize, 10, 500, 999] {
            let xt = s.q_sample(&x0, t, &eps);
            let ab = s.alphas_cumprod[t];
            assert!(close(xt[0] as f64, ab.sqrt() * 0.5 + (1.0 - ab).sqrt() * 1.0, 1e-6));
            let back = s.predict_x0_from_eps(&xt, t, &eps);
            let e = s.eps_from_x0(&xt, t, &x0);
            for i in 0..4 {
                assert!((back[i] - x0[i]).abs() < 2e-3, "t={t}");
                assert!((e[i] - eps[i]).abs() < 1e-4, "t={t}");
            }
        }
    }

    #[test]
    fn v_prediction_round_trips_to_eps_and_x0() {
        // v = sqrt(ab) eps - sqrt(1 - ab) x0 gives back eps from x_t, and x0 = sqrt(ab) x_t - sqrt(1 - ab) v
        let s = NoiseSchedule::new(BetaSchedule::COSINE, 1000);
        let x0 = [0.5f32, -1.0, 0.0, 0.9];
        let eps = [1.0f32, -0.3, 2.0, 0.1];
        for &t in &[0usize, 10, 500, 990] {
            let xt = s.q_sample(&x0, t, &eps);
            let mut out = s.v_from_eps(&x0, t, &eps);
            let (a, b) = s.q_sample_coefs(t);
            let x0_from_v: Vec<f64> = xt.iter().zip(&out).map(|(x, v)| a * *x as f64 - b * *v as f64).collect();
            s.eps_from_v(&xt, t, &mut out);
            for i in 0..4 {
                assert!((out[i] - eps[i]).abs() < 1e-5, "t={t}: eps {} vs {}", out[i], eps[i]);
                assert!((x0_from_v[i] - x0[i] as f64).abs() < 1e-5, "t={t}");
            }
        }
        // at alpha-bar ~ 0 the velocity is -x0
        let v = s.v_from_eps(&x0, 999, &eps);
        assert!(v.iter().zip(&x0).all(|(v, x)| (v + x).abs() < 1e-3));
    }

    #[test]
    fn q_sample_has_the_forward_marginal_moments() {
        // Empirical check of q(x_t|x_0) = N(sqrt(ab) x0, (1 - ab) I) with a deterministic Box-Muller stream.
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let s = NoiseSchedule::new(BetaSchedule::COSINE, 1000);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let n = 200_000;
        let noise: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        let x0 = vec![0.7f32; n];
        let t = 400;
        let xt = s.q_sample(&x0, t, &noise);
        let mean = xt.iter().map(|v| *v as f64).sum::<f64>() / n as f64;
        let var = xt.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let ab = s.alphas_cumprod[t];
        assert!((mean - ab.sqrt() * 0.7).abs() < 0.01, "mean {mean}");
        assert!((var - (1.0 - ab)).abs() < 0.01, "var {var}");
    }

    #[test]
    fn the_named_linear_schedule_ends_in_noise_whatever_t() {
        // Unscaled, 1e-4 .. 0.02 over T = 100 leaves alpha-bar_T = 0.37: x_T still holds 61% of the image.
        let unscaled = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
        assert!(*unscaled.alphas_cumprod.last().unwrap() > 0.3);
        // T = 1000 is the paper's schedule exactly
        assert_eq!(BetaSchedule::named(ScheduleKind::Linear, 1000), BetaSchedule::LINEAR);
        for t in [20, 100, 300, 1000, 4000] {
            let s = NoiseSchedule::new(BetaSchedule::named(ScheduleKind::Linear, t), t);
            let end = *s.alphas_cumprod.last().unwrap();
            assert!(end < 1e-4, "T = {t}: alpha-bar_T = {end}");
            // the same noise level at the same fraction of the chain, as for T = 1000 (up to the coarse grid)
            let half = s.alphas_cumprod[t / 2 - 1];
            assert!(
                t < 100
                    || (half.ln() / NoiseSchedule::new(BetaSchedule::LINEAR, 1000).alphas_cumprod[499].ln() - 1.0)
                        .abs()
                        < 0.06,
                "T = {t}: {half}"
            );
        }
        // below T = 20 the ends are capped below 1
        let b = BetaSchedule::named(ScheduleKind::Linear, 10).betas(10);
        assert!(b.iter().all(|b| *b > 0.0 && *b < 1.0), "{b:?}");
        assert_eq!(BetaSchedule::named(ScheduleKind::Cosine, 100), BetaSchedule::COSINE);
    }

    #[test]
    fn reverse_variance_kinds() {
        let s = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
        assert_eq!(s.reverse_variance(0, VarianceType::FixedSmall), Some(0.0));
        assert_eq!(s.reverse_variance(50, VarianceType::FixedLarge), Some(s.betas[50]));
        assert_eq!(s.reverse_variance(0, VarianceType::FixedLarge), Some(s.posterior_variance[1]));
        assert_eq!(s.reverse_variance(50, VarianceType::FixedSmall), Some(s.posterior_variance[50]));
        assert_eq!(s.reverse_variance(50, VarianceType::LearnedRange), None);
    }

    #[test]
    fn the_learned_range_spans_beta_tilde_to_beta() {
        // Nichol & Dhariwal 2021, eq. 15: v = -1 is beta-tilde, v = 1 is beta, v = 0 their geometric mean
        let s = NoiseSchedule::new(BetaSchedule::COSINE, 1000);
        for t in [1usize, 10, 500, 999] {
            let (lo, hi) = (s.posterior_variance[t], s.betas[t]);
            assert!(close(s.learned_log_variance(t, -1.0), lo.ln(), 1e-12), "t={t}");
            assert!(close(s.learned_log_variance(t, 1.0), hi.ln(), 1e-12), "t={t}");
            assert!(close(s.learned_log_variance(t, 0.0), 0.5 * (lo * hi).ln(), 1e-12), "t={t}");
            let d = (s.learned_log_variance(t, 0.25) - s.learned_log_variance(t, -0.25)) / 0.5;
            assert!(close(d, s.learned_log_variance_slope(t), 1e-9), "t={t}");
        }
        // at t = 0 beta-tilde is 0: the range starts at beta-tilde_1 instead
        assert!(close(s.learned_log_variance(0, -1.0), s.posterior_variance[1].ln(), 1e-12));
    }

    #[test]
    fn respacing_keeps_the_marginals_and_all_timesteps_give_the_schedule_back() {
        let s = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
        let all: Vec<usize> = (0..1000).rev().collect();
        let same = s.respaced(&all);
        for t in 0..1000 {
            assert!(close(same.betas[t], s.betas[t], 1e-9), "t={t}");
        }
        let kept = [999usize, 749, 499, 249, 0];
        let r = s.respaced(&kept);
        assert_eq!(r.num_timesteps(), 5);
        for (i, &t) in [0usize, 249, 499, 749, 999].iter().enumerate() {
            // q(x_{S_i} | x_0) is the original chain's at S_i
            assert!(close(r.alphas_cumprod[i], s.alphas_cumprod[t], 1e-12), "i={i}");
        }
        // the respaced betas are far larger than the original ones, beta-tilde stays below beta
        assert!(r.betas[2] > 20.0 * s.betas[499]);
        assert!((1..5).all(|i| r.posterior_variance[i] < r.betas[i]));
    }

    #[test]
    fn names_parse_once_with_aliases_and_refuse_unknown_ones() {
        assert_eq!(BetaSchedule::named("cosine".parse().unwrap(), 1000), BetaSchedule::COSINE);
        assert_eq!(BetaSchedule::COSINE.kind().to_string(), "cosine");
        let e = "sigmoid".parse::<ScheduleKind>().unwrap_err().to_string();
        assert_eq!(e, "unknown beta schedule 'sigmoid' (expected one of: linear, cosine)");
        assert_eq!("beta".parse::<VarianceType>().unwrap(), VarianceType::FixedLarge);
        // serde writes the canonical name and reads aliases; an unknown name is refused with the choices
        assert_eq!(serde_json::to_string(&VarianceType::FixedSmall).unwrap(), "\"fixed_small\"");
        assert_eq!(serde_json::from_str::<VarianceType>("\"beta_tilde\"").unwrap(), VarianceType::FixedSmall);
        assert_eq!(serde_json::from_str::<VarianceType>("\"learned\"").unwrap(), VarianceType::LearnedRange);
        let e = serde_json::from_str::<VarianceType>("\"trainable\"").unwrap_err().to_string();
        assert!(e.contains("unknown variance type 'trainable'") && e.contains("fixed_small, fixed_large"), "{e}");
    }
}
