//! The timesteps of a training batch: drawn uniformly (Ho et al. 2020, Algorithm 1), by importance from the
//! recent losses at each timestep (Nichol & Dhariwal 2021, sec. 3.3), or from EDM's log-normal distribution of
//! noise levels (Karras et al. 2022, Table 1).

use std::collections::VecDeque;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use runtime::likelihood::approx_standard_normal_cdf;
use runtime::schedule::NoiseSchedule;
use serde::{Deserialize, Serialize};

use super::config::{TimestepSampling, TrainConfig};

/// How many recent losses per timestep the importance sampler keeps (Nichol & Dhariwal 2021, sec. 3.3).
pub const HISTORY: usize = 10;
/// The share of uniform sampling mixed into the importance sampler (improved-diffusion's `uniform_prob`).
const UNIFORM_SHARE: f64 = 0.001;

/// Draws the training timesteps: uniformly, or by importance, p_t ∝ sqrt(E[L_t^2]) over the last
/// [`HISTORY`] losses at t once every t has that many (Nichol & Dhariwal 2021, sec. 3.3, eq. 18), with weights
/// 1 / (T p_t) that keep the loss an unbiased estimate. Its history is part of a checkpoint.
/// A fixed distribution (log-normal) draws by its probabilities with weight 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimestepSampler {
    pub importance: bool,
    /// The last losses seen at each timestep (empty unless importance sampling).
    pub history: Vec<VecDeque<f64>>,
    /// The probabilities of a fixed distribution (log-normal), None for uniform or importance sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed: Option<Vec<f64>>,
}

impl TimestepSampler {
    pub fn new(num_timesteps: usize, importance: bool) -> Self {
        let history = if importance { vec![VecDeque::new(); num_timesteps] } else { vec![] };
        Self { importance, history, fixed: None }
    }

    /// The sampler `train.timestep_sampling` asks for on `schedule`.
    pub fn for_config(tc: &TrainConfig, schedule: &NoiseSchedule) -> Self {
        let n = schedule.num_timesteps();
        match tc.timestep_sampling {
            TimestepSampling::Uniform => Self::new(n, false),
            TimestepSampling::Importance => Self::new(n, true),
            TimestepSampling::LogNormal => {
                Self { fixed: Some(lognormal_probabilities(schedule, tc.p_mean, tc.p_std)), ..Self::new(n, false) }
            }
        }
    }

    /// The sampling probabilities: a fixed distribution's, or the importance sampler's (None while some
    /// timestep has fewer than [`HISTORY`] losses); None for uniform sampling.
    pub fn probabilities(&self) -> Option<Vec<f64>> {
        if self.fixed.is_some() {
            return self.fixed.clone();
        }
        if !self.importance || self.history.iter().any(|h| h.len() < HISTORY) {
            return None;
        }
        let w: Vec<f64> =
            self.history.iter().map(|h| (h.iter().map(|l| l * l).sum::<f64>() / h.len() as f64).sqrt()).collect();
        let sum: f64 = w.iter().sum();
        if !(sum.is_finite() && sum > 0.0) {
            return None;
        }
        let n = w.len() as f64;
        Some(w.iter().map(|w| w / sum * (1.0 - UNIFORM_SHARE) + UNIFORM_SHARE / n).collect())
    }

    /// One timestep and its weight, from `rng`: 1 / (T p_t) for importance sampling, else 1.
    pub fn draw(&self, probs: Option<&[f64]>, num_timesteps: usize, rng: &mut ChaCha8Rng) -> (usize, f64) {
        let Some(p) = probs else { return (rng.gen_range(0..num_timesteps), 1.0) };
        let u: f64 = rng.gen();
        let mut acc = 0.0;
        let mut t = p.len() - 1;
        for (i, pi) in p.iter().enumerate() {
            acc += pi;
            if u < acc {
                t = i;
                break;
            }
        }
        (t, if self.importance { 1.0 / (p.len() as f64 * p[t]) } else { 1.0 })
    }

    /// Records a batch's per-image losses at their timesteps (non-finite ones are left out).
    pub fn record(&mut self, t: &[u32], losses: &[f64]) {
        if !self.importance {
            return;
        }
        for (&t, &l) in t.iter().zip(losses) {
            if let (Some(h), true) = (self.history.get_mut(t as usize), l.is_finite()) {
                if h.len() == HISTORY {
                    h.pop_front();
                }
                h.push_back(l);
            }
        }
    }
}

/// p_t = the mass of N(p_mean, p_std^2) over the ln sigma that round to timestep t: between the midpoints of
/// ln sigma_t to its neighbours (the first and last t reach to -inf and +inf), sigma_t^2 = 1 / SNR_t.
pub fn lognormal_probabilities(schedule: &NoiseSchedule, p_mean: f64, p_std: f64) -> Vec<f64> {
    let n = schedule.num_timesteps();
    let ln_sigma: Vec<f64> = (0..n).map(|t| -0.5 * schedule.snr(t).ln()).collect();
    let cdf = |i: usize| -> f64 {
        // the edge between t = i - 1 and t = i
        match i {
            0 => 0.0,
            i if i == n => 1.0,
            i => approx_standard_normal_cdf((0.5 * (ln_sigma[i - 1] + ln_sigma[i]) - p_mean) / p_std),
        }
    };
    let mut p: Vec<f64> = (0..n).map(|t| (cdf(t + 1) - cdf(t)).max(0.0)).collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|p| *p /= sum);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_importance_sampler_is_uniform_until_warm_then_favours_high_loss_timesteps() {
        let mut s = TimestepSampler::new(4, true);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert!(s.probabilities().is_none());
        for _ in 0..HISTORY {
            s.record(&[0, 1, 2, 3], &[0.1, 0.1, 0.1, 1.0]);
        }
        let p = s.probabilities().unwrap();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p[3] > 0.7 && p[0] < 0.1, "{p:?}");
        // the weights keep the estimate unbiased: E[w] = sum_t p_t / (T p_t) = 1
        let n = 20_000;
        let (mut hits, mut wsum) = (0, 0.0);
        for _ in 0..n {
            let (t, w) = s.draw(Some(&p), 4, &mut rng);
            hits += (t == 3) as usize;
            wsum += w;
        }
        assert!((hits as f64 / n as f64 - p[3]).abs() < 0.02);
        assert!((wsum / n as f64 - 1.0).abs() < 0.05, "{}", wsum / n as f64);
        // a uniform sampler keeps no history
        let mut u = TimestepSampler::new(4, false);
        u.record(&[0], &[1.0]);
        assert!(u.history.is_empty() && u.probabilities().is_none());
    }

    #[test]
    fn the_lognormal_sampler_follows_edms_noise_levels_without_reweighting() {
        use runtime::schedule::{BetaSchedule, ScheduleKind};
        let sched = NoiseSchedule::new(BetaSchedule::named(ScheduleKind::Cosine, 1000), 1000);
        let tc = TrainConfig { timestep_sampling: TimestepSampling::LogNormal, ..TrainConfig::default() };
        let s = TimestepSampler::for_config(&tc, &sched);
        let p = s.probabilities().unwrap();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12 && p.iter().all(|&p| p >= 0.0));
        // the mass below sigma = exp(p_mean) is one half, and one standard deviation holds ~68%
        let sigma = |t: usize| (1.0 / sched.snr(t)).sqrt();
        let mass = |lo: f64, hi: f64| (0..1000).filter(|&t| sigma(t) > lo && sigma(t) <= hi).map(|t| p[t]).sum::<f64>();
        let (m, sd) = (tc.p_mean, tc.p_std);
        assert!((mass(0.0, m.exp()) - 0.5).abs() < 0.01, "{}", mass(0.0, m.exp()));
        assert!((mass((m - sd).exp(), (m + sd).exp()) - 0.683).abs() < 0.01);
        // EDM's sampler starts at sigma = 80, beyond which the distribution has next to no mass
        assert!(mass(80.0, f64::INFINITY) < 1e-4, "{}", mass(80.0, f64::INFINITY));
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let draws: Vec<(usize, f64)> = (0..20_000).map(|_| s.draw(Some(&p), 1000, &mut rng)).collect();
        assert!(draws.iter().all(|&(_, w)| w == 1.0));
        let near = draws.iter().filter(|&&(t, _)| sigma(t) <= m.exp()).count() as f64 / 20_000.0;
        assert!((near - 0.5).abs() < 0.02, "{near}");
    }
}
