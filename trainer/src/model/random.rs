//! Keyed random streams of a training step: each image of the global batch draws from a ChaCha8 stream of its
//! own, so a share of a batch (one rank's, in data-parallel training) draws what one process draws for it.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How a training step's random numbers are drawn; checkpoints record it (`state.json`, `rng.algorithm`).
pub const RNG_SCHEME: &str = "chacha8 keyed by (seed, step, image index in the global batch, purpose)";

/// What a stream of [`StepKeys::image`] is for: the batch's draws, or the dropout masks of the `k`-th dropout
/// call of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Augmentation, timestep, noise and label dropout, in that order (Ho et al. 2020, Algorithm 1).
    Batch,
    /// The mask of one image in the `k`-th dropout layer of a forward pass.
    Dropout(u64),
}

/// The random numbers of training step `step`. Each image of the global batch draws from a ChaCha8 stream of
/// its own, keyed by (seed, step, its index in the global batch, purpose): a process that builds a share of
/// the batch (a rank of a data-parallel run) draws for its images exactly what one process draws for the same
/// images, and so takes the same step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepKeys {
    pub seed: u64,
    pub step: u64,
}

impl StepKeys {
    pub fn new(seed: u64, step: usize) -> Self {
        Self { seed, step: step as u64 }
    }

    /// The stream of image `index` (in the global batch) for `purpose`: the 256-bit ChaCha key is the four
    /// words (seed, step, index, purpose).
    pub fn image(&self, index: usize, purpose: Purpose) -> ChaCha8Rng {
        let purpose = match purpose {
            Purpose::Batch => 0,
            Purpose::Dropout(k) => 1 + k,
        };
        let mut key = [0u8; 32];
        for (chunk, word) in key.chunks_exact_mut(8).zip([self.seed, self.step, index as u64, purpose]) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        ChaCha8Rng::from_seed(key)
    }
}

/// The dropout masks of one forward pass: image i of the pass (global index `first + i`) draws the mask of
/// the `k`-th dropout layer from [`StepKeys::image`] (`Purpose::Dropout(k)`), so a batch split over
/// processes gets the masks one process would draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKeys {
    pub keys: StepKeys,
    /// The global index of the pass's first image.
    pub first: usize,
    /// Dropout layers met so far in this pass.
    pub calls: u64,
}

impl DropoutKeys {
    pub fn new(keys: StepKeys, first: usize) -> Self {
        Self { keys, first, calls: 0 }
    }

    /// The factor of a kept element: 1 / (1 - p).
    pub fn scale(p: f64) -> f32 {
        (1.0 / (1.0 - p)) as f32
    }

    /// Fills `mask` (`batch` images, one after another) with inverted-dropout factors: 0 with probability p,
    /// else 1 / (1 - p); one u32 per element decides. Both gradient engines draw their masks here, so they
    /// train alike.
    pub fn fill(&mut self, p: f64, mask: &mut [f32], batch: usize) {
        let keep = 1.0 - p;
        let scale = Self::scale(p);
        // u < keep * 2^32 with probability keep
        let threshold = (keep * 4_294_967_296.0).min(u32::MAX as f64) as u32;
        let per = mask.len() / batch.max(1);
        let mut bits = [0u32; 1024];
        for (i, image) in mask.chunks_mut(per.max(1)).enumerate() {
            let mut rng = self.keys.image(self.first + i, Purpose::Dropout(self.calls));
            for chunk in image.chunks_mut(bits.len()) {
                let b = &mut bits[..chunk.len()];
                rng.fill(b);
                for (m, &u) in chunk.iter_mut().zip(b.iter()) {
                    *m = if u < threshold { scale } else { 0.0 };
                }
            }
        }
        self.calls += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_of_the_batch_draws_the_masks_the_whole_batch_draws_for_it() {
        let keys = StepKeys::new(3, 17);
        let (batch, per, p) = (5, 37, 0.3);
        let mut whole = vec![0f32; batch * per];
        let mut all = DropoutKeys::new(keys, 0);
        all.fill(p, &mut whole, batch);
        all.fill(p, &mut whole.clone(), batch);
        let mut second = vec![0f32; batch * per];
        all.fill(p, &mut second, batch);
        // images 2..5 alone, as a rank holding that share would draw them, layer after layer
        let mut share = DropoutKeys::new(keys, 2);
        let mut part = vec![0f32; 3 * per];
        share.fill(p, &mut part, 3);
        assert_eq!(part, whole[2 * per..]);
        share.fill(p, &mut part, 3);
        share.fill(p, &mut part, 3);
        assert_eq!(part, second[2 * per..], "the third layer's masks");
        assert_ne!(second, whole, "each layer draws anew");
        // inverted dropout: kept values scaled by 1 / (1 - p), about p of them dropped
        let dropped = whole.iter().filter(|&&m| m == 0.0).count() as f64 / whole.len() as f64;
        assert!(whole.iter().all(|&m| m == 0.0 || (m - 1.0 / 0.7).abs() < 1e-6));
        assert!((dropped - p).abs() < 0.1, "{dropped}");
    }

    #[test]
    fn streams_differ_by_seed_step_image_and_purpose() {
        let draw = |k: StepKeys, i, purpose| k.image(i, purpose).gen::<u64>();
        let base = draw(StepKeys::new(1, 2), 3, Purpose::Batch);
        assert_eq!(base, draw(StepKeys::new(1, 2), 3, Purpose::Batch));
        for other in [
            draw(StepKeys::new(9, 2), 3, Purpose::Batch),
            draw(StepKeys::new(1, 9), 3, Purpose::Batch),
            draw(StepKeys::new(1, 2), 9, Purpose::Batch),
            draw(StepKeys::new(1, 2), 3, Purpose::Dropout(0)),
        ] {
            assert_ne!(base, other);
        }
    }
}
