//! What one training step sees: the data order, and a batch (x_t, t, labels, target noise) drawn from it.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use runtime::schedule::NoiseSchedule;

use super::config::Config;
use super::timesteps::TimestepSampler;
use crate::data::{Dataset, UNKNOWN};
use crate::model::random::{Purpose, StepKeys};

/// One stream for all the random numbers of a step: ChaCha8(seed), stream = step (distillation's batches).
pub fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step as u64);
    rng
}

/// Epoch-wise shuffled sampling without replacement; position k of the whole run is a pure function of
/// (seed, k), so a resumed run sees the same batches.
pub struct DataOrder {
    seed: u64,
    n: usize,
    epoch: usize,
    perm: Vec<usize>,
}

impl DataOrder {
    pub fn new(seed: u64, n: usize) -> Self {
        let mut s = Self { seed, n, epoch: usize::MAX, perm: vec![] };
        s.set_epoch(0);
        s
    }
    fn set_epoch(&mut self, epoch: usize) {
        if self.epoch == epoch {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_da7a);
        rng.set_stream(epoch as u64);
        self.perm = (0..self.n).collect();
        self.perm.shuffle(&mut rng);
        self.epoch = epoch;
    }
    /// Dataset indices for step `step` at batch size `b`.
    pub fn batch(&mut self, step: usize, b: usize) -> Vec<usize> {
        (0..b)
            .map(|j| {
                let k = step * b + j;
                self.set_epoch(k / self.n);
                self.perm[k % self.n]
            })
            .collect()
    }
}

/// One step's inputs in host memory: x_0, x_t, t, labels, the target noise and the importance weights.
pub struct HostBatch {
    /// [B, C, H, W]
    pub dims: [usize; 4],
    /// The (augmented) images x_0: the variational bound's true posterior needs them.
    pub x0: Vec<f32>,
    pub xt: Vec<f32>,
    pub eps: Vec<f32>,
    pub t: Vec<u32>,
    pub y: Option<Vec<u32>>,
    /// Each image's importance weight 1 / (T p_t) (1 for uniformly drawn timesteps).
    pub importance: Vec<f64>,
    /// The size of the whole step's batch (this batch's own size unless it is a rank's share): the objective is
    /// the mean over it, so the ranks' gradients add up to one process's.
    pub global: usize,
}

/// Builds the batch of Algorithm 1 (Ho et al. 2020): x_0 ~ data, t ~ U{0..T-1} (or by importance, `sampler`),
/// eps ~ N(0, I), x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. `idx` are the dataset indices of
/// the images at global batch positions `first..`, each drawing from its own stream of `keys`; `global` is
/// the size of the whole batch, the objective's denominator.
#[allow(clippy::too_many_arguments)]
pub fn make_host_batch(
    data: &Dataset,
    idx: &[usize],
    first: usize,
    global: usize,
    cfg: &Config,
    schedule: &NoiseSchedule,
    sampler: &TimestepSampler,
    keys: StepKeys,
) -> HostBatch {
    let (c, s) = (data.channels, data.size);
    let n = data.image_len();
    let b = idx.len();
    let mut xt = Vec::with_capacity(b * n);
    let mut x0_all = Vec::with_capacity(b * n);
    let mut importance = Vec::with_capacity(b);
    let probs = sampler.probabilities();
    let mut eps_all = Vec::with_capacity(b * n);
    let mut ts = Vec::with_capacity(b);
    let mut ys = Vec::with_capacity(b);
    let null = cfg.model.null_class();
    for (j, &i) in idx.iter().enumerate() {
        let rng = &mut keys.image(first + j, Purpose::Batch);
        let mut x0 = data.image_f32(i);
        cfg.data.augment.apply(&mut x0, c, s, rng);
        let (t, w) = sampler.draw(probs.as_deref(), schedule.num_timesteps(), rng);
        let eps: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut *rng)).collect();
        xt.extend(schedule.q_sample(&x0, t, &eps));
        x0_all.extend(x0);
        eps_all.extend(eps);
        importance.push(w);
        ts.push(t as u32);
        if let (Some(null), Some(labels)) = (null, &data.labels) {
            // Ho & Salimans 2022, Algorithm 1: drop the label with probability p_uncond
            ys.push(if rng.gen::<f64>() < cfg.train.p_uncond { null as u32 } else { labels[i] });
            // each attribute dropped on its own (and unknown where the data withholds it)
            for (a, l) in cfg.model.attributes.iter().zip(&data.attr_labels) {
                let drop = rng.gen::<f64>() < cfg.train.p_uncond;
                ys.push(if drop || l[i] == UNKNOWN { a.null() as u32 } else { l[i] });
            }
        }
    }
    let y = if ys.is_empty() { None } else { Some(ys) };
    HostBatch { dims: [b, c, s, s], x0: x0_all, xt, eps: eps_all, t: ts, y, importance, global }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_of_the_data_order_is_a_permutation_and_resuming_repeats_it() {
        let (n, b) = (10, 3);
        let mut order = DataOrder::new(7, n);
        // 40 steps of 3 = 12 epochs; every epoch visits every image once
        let all: Vec<usize> = (0..40).flat_map(|s| order.batch(s, b)).collect();
        let epochs: Vec<Vec<usize>> = all.chunks(n).map(|e| e.to_vec()).collect();
        for e in &epochs {
            let mut sorted = e.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        }
        assert!(epochs.windows(2).any(|w| w[0] != w[1]), "epochs are reshuffled");
        // a run resumed at step 23 (a fresh order, as after a restart) sees the same batches
        let mut resumed = DataOrder::new(7, n);
        assert_eq!(resumed.batch(23, b), all[23 * b..24 * b]);
        assert_ne!(DataOrder::new(8, n).batch(0, n), all[..n], "the seed changes the order");
    }
}
