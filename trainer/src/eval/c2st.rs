//! A classifier two-sample test (Lopez-Paz & Oquab 2017, "Revisiting classifier two-sample tests"): the small
//! CNN of the evaluation classifier trained to tell real images from generated ones on one half of each, and
//! its accuracy on the other half. 50% means the two sets cannot be told apart; 100% that every generated
//! image gives itself away. The same test of real training images against real test images is its floor.

use anyhow::{bail, Result};
use candle_core::Device;

use super::classifier::{features, train_classifier, Classifier};
use crate::data::Dataset;
use crate::model::params::TensorSource;
use crate::progress::Progress;

/// Image presentations the test's classifier trains for, whatever the number of images (at least 2 epochs).
const PRESENTATIONS: usize = 40_000;

/// The two-sample test's accuracy of sets `a` and `b` (images [c, h, w] in [-1, 1] on the 8-bit grid), the
/// same number of each (the larger set is cut), the first half of each to train on, the second to test.
pub fn accuracy(
    a: &[f32],
    b: &[f32],
    shape: [usize; 3],
    seed: u64,
    dev: &Device,
    progress: &dyn Progress,
) -> Result<f64> {
    let per: usize = shape.iter().product();
    let n = (a.len() / per).min(b.len() / per);
    let half = n / 2;
    if half < 2 {
        bail!("the two-sample test needs at least 4 images of each set, got {n}");
    }
    let to_u8 =
        |x: &[f32]| -> Vec<u8> { x.iter().map(|v| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8).collect() };
    let mut images = to_u8(&a[..half * per]);
    images.extend(to_u8(&b[..half * per]));
    let labels: Vec<u32> = (0..2 * half).map(|i| (i >= half) as u32).collect();
    let names = vec!["a".to_string(), "b".to_string()];
    let train = Dataset::new(images, Some(labels), names, shape[0], shape[1], "two-sample test".into())?;
    let epochs = PRESENTATIONS.div_ceil(train.len).max(2);
    let tensors = train_classifier(&train, epochs, seed, dev, progress)?;
    let mut src = TensorSource::new(&tensors, "two-sample classifier");
    let clf = Classifier::new(shape[0], shape[1], 2, &mut src)?;
    src.finish()?;
    let (_, pa) = features(&clf, &a[half * per..n * per], shape, dev)?;
    let (_, pb) = features(&clf, &b[half * per..n * per], shape, dev)?;
    let right = pa.iter().filter(|p| **p == 0).count() + pb.iter().filter(|p| **p == 1).count();
    Ok(right as f64 / (pa.len() + pb.len()) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;

    #[test]
    fn the_test_tells_apart_what_differs_and_not_what_does_not() {
        // 16x16 images: a bright square on the left half or on the right half, each over its own noise
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut img = |right: bool| -> Vec<f32> {
            (0..256)
                .map(|i| {
                    let (y, x) = (i / 16, i % 16);
                    let on = (4..12).contains(&y) && if right { x >= 9 } else { x < 7 } && rng.gen::<f32>() < 0.8;
                    let v: f32 = if on { 0.8 } else { -0.6 };
                    v + rng.gen_range(-0.3..0.3)
                })
                .collect()
        };
        // on the 8-bit grid, as samples are
        let mut set = |right: bool| -> Vec<f32> {
            let mut x: Vec<f32> = (0..200).flat_map(|_| img(right)).collect();
            crate::eval::quantize(&mut x);
            x
        };
        let (left, right, other_left) = (set(false), set(true), set(false));
        let shape = [1, 16, 16];
        let differ = accuracy(&left, &right, shape, 0, &Device::Cpu, &Silent).unwrap();
        let same = accuracy(&left, &other_left, shape, 0, &Device::Cpu, &Silent).unwrap();
        assert!(differ > 0.95, "different sets: {differ}");
        assert!((same - 0.5).abs() < 0.12, "one distribution: {same}");
        assert!(accuracy(&left[..3 * 256], &right, shape, 0, &Device::Cpu, &Silent).is_err());
    }
}
