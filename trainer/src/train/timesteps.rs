//! The timesteps of a training batch: drawn uniformly (Ho et al. 2020, Algorithm 1) or by importance from the
//! recent losses at each timestep (Nichol & Dhariwal 2021, sec. 3.3).

use std::collections::VecDeque;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How many recent losses per timestep the importance sampler keeps (Nichol & Dhariwal 2021, sec. 3.3).
pub const HISTORY: usize = 10;
/// The share of uniform sampling mixed into the importance sampler (improved-diffusion's `uniform_prob`).
const UNIFORM_SHARE: f64 = 0.001;

/// Draws the training timesteps: uniformly, or by importance, p_t ∝ sqrt(E[L_t^2]) over the last
/// [`HISTORY`] losses at t once every t has that many (Nichol & Dhariwal 2021, sec. 3.3, eq. 18), with weights
/// 1 / (T p_t) that keep the loss an unbiased estimate. Its history is part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimestepSampler {
    pub importance: bool,
    /// The last losses seen at each timestep (empty for uniform sampling).
    pub history: Vec<VecDeque<f64>>,
}

impl TimestepSampler {
    pub fn new(num_timesteps: usize, importance: bool) -> Self {
        Self { importance, history: if importance { vec![VecDeque::new(); num_timesteps] } else { vec![] } }
    }

    /// The sampling probabilities, None while some timestep has fewer than [`HISTORY`] losses (or uniform).
    pub fn probabilities(&self) -> Option<Vec<f64>> {
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

    /// One timestep and its importance weight, from `rng`.
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
        (t, 1.0 / (p.len() as f64 * p[t]))
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
}
