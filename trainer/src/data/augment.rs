//! Train-time augmentation on [-1, 1] CHW float images, each switchable, driven by a seeded RNG.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// `[data.augment]` in a config. Everything is off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Mirror left-right with probability 0.5.
    pub hflip: bool,
    /// Rotate by a uniform angle in [-d, d] degrees (e.g. 10).
    pub rotate_degrees: f64,
    /// Brightness factor uniform in [1 - b, 1 + b].
    pub brightness: f64,
    /// Contrast factor uniform in [1 - c, 1 + c] (blend with the mean gray).
    pub contrast: f64,
    /// Saturation factor uniform in [1 - s, 1 + s] (blend with the grayscale image; colour images only).
    pub saturation: f64,
    /// Random zoom/crop: crop a square of side uniform in [min_scale, 1] of the image at a random position,
    /// resized back (e.g. 0.8). 1 or 0 disables it.
    pub crop_min_scale: f64,
}

impl AugmentConfig {
    pub fn is_off(&self) -> bool {
        !self.hflip
            && self.rotate_degrees == 0.0
            && self.brightness == 0.0
            && self.contrast == 0.0
            && self.saturation == 0.0
            && (self.crop_min_scale == 0.0 || self.crop_min_scale >= 1.0)
    }

    /// Augments one image in place. `img` is [c, s, s] in [-1, 1].
    pub fn apply<R: Rng>(&self, img: &mut [f32], c: usize, s: usize, rng: &mut R) {
        if self.is_off() {
            return;
        }
        let geometric = self.rotate_degrees > 0.0 || (self.crop_min_scale > 0.0 && self.crop_min_scale < 1.0);
        if geometric {
            let angle = if self.rotate_degrees > 0.0 {
                rng.gen_range(-self.rotate_degrees..=self.rotate_degrees).to_radians()
            } else {
                0.0
            };
            let (scale, ox, oy) = if self.crop_min_scale > 0.0 && self.crop_min_scale < 1.0 {
                let sc = rng.gen_range(self.crop_min_scale..=1.0);
                let slack = (1.0 - sc) * s as f64 / 2.0;
                (sc, rng.gen_range(-slack..=slack), rng.gen_range(-slack..=slack))
            } else {
                (1.0, 0.0, 0.0)
            };
            warp(img, c, s, angle, scale, ox, oy);
        }
        if self.hflip && rng.gen_bool(0.5) {
            for ch in img.chunks_mut(s * s) {
                for row in ch.chunks_mut(s) {
                    row.reverse();
                }
            }
        }
        if self.brightness > 0.0 {
            let f = rng.gen_range(1.0 - self.brightness..=1.0 + self.brightness) as f32;
            // brightness scales intensities in [0, 1]
            for v in img.iter_mut() {
                *v = (((*v + 1.0) * 0.5 * f).clamp(0.0, 1.0)) * 2.0 - 1.0;
            }
        }
        if self.contrast > 0.0 {
            let f = rng.gen_range(1.0 - self.contrast..=1.0 + self.contrast) as f32;
            let mean = img.iter().sum::<f32>() / img.len() as f32;
            for v in img.iter_mut() {
                *v = (mean + (*v - mean) * f).clamp(-1.0, 1.0);
            }
        }
        if self.saturation > 0.0 && c == 3 {
            let f = rng.gen_range(1.0 - self.saturation..=1.0 + self.saturation) as f32;
            let n = s * s;
            for i in 0..n {
                let g = 0.299 * img[i] + 0.587 * img[n + i] + 0.114 * img[2 * n + i];
                for ch in 0..3 {
                    let v = &mut img[ch * n + i];
                    *v = (g + (*v - g) * f).clamp(-1.0, 1.0);
                }
            }
        }
    }
}

/// Resamples each channel through a rotation by `angle` and a zoom by 1/`scale` about the centre shifted by
/// (ox, oy) pixels, bilinear, edges replicated.
fn warp(img: &mut [f32], c: usize, s: usize, angle: f64, scale: f64, ox: f64, oy: f64) {
    let (sin, cos) = angle.sin_cos();
    let mid = (s as f64 - 1.0) / 2.0;
    let src_all = img.to_vec();
    for ch in 0..c {
        let src = &src_all[ch * s * s..(ch + 1) * s * s];
        let at =
            |x: isize, y: isize| src[(y.clamp(0, s as isize - 1) as usize) * s + x.clamp(0, s as isize - 1) as usize];
        for y in 0..s {
            for x in 0..s {
                let (dx, dy) = ((x as f64 - mid) * scale, (y as f64 - mid) * scale);
                let sx = cos * dx - sin * dy + mid + ox;
                let sy = sin * dx + cos * dy + mid + oy;
                let (x0, y0) = (sx.floor(), sy.floor());
                let (fx, fy) = ((sx - x0) as f32, (sy - y0) as f32);
                let (x0, y0) = (x0 as isize, y0 as isize);
                let v = at(x0, y0) * (1.0 - fx) * (1.0 - fy)
                    + at(x0 + 1, y0) * fx * (1.0 - fy)
                    + at(x0, y0 + 1) * (1.0 - fx) * fy
                    + at(x0 + 1, y0 + 1) * fx * fy;
                img[ch * s * s + y * s + x] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ramp(s: usize) -> Vec<f32> {
        (0..s * s).map(|i| (i % s) as f32 / (s - 1) as f32 * 2.0 - 1.0).collect()
    }

    #[test]
    fn off_is_identity_and_seeded_is_reproducible() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut img = ramp(8);
        AugmentConfig::default().apply(&mut img, 1, 8, &mut rng);
        assert_eq!(img, ramp(8));
        let cfg = AugmentConfig {
            hflip: true,
            rotate_degrees: 10.0,
            brightness: 0.2,
            contrast: 0.2,
            saturation: 0.2,
            crop_min_scale: 0.8,
        };
        let run = |seed| {
            let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut im: Vec<f32> = ramp(8).into_iter().chain(ramp(8)).chain(ramp(8)).collect();
            cfg.apply(&mut im, 3, 8, &mut r);
            im
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        assert!(run(7).iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn hflip_mirrors_and_small_rotation_preserves_mean() {
        let cfg = AugmentConfig { hflip: true, ..Default::default() };
        let mut flipped = false;
        for seed in 0..8 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut img = ramp(8);
            cfg.apply(&mut img, 1, 8, &mut rng);
            if img != ramp(8) {
                assert_eq!(img[0], 1.0);
                assert_eq!(img[7], -1.0);
                flipped = true;
            }
        }
        assert!(flipped, "p = 0.5 should flip at least once in 8 draws");
        // a zero-angle, unit-scale warp is the identity
        let mut img = ramp(8);
        warp(&mut img, 1, 8, 0.0, 1.0, 0.0, 0.0);
        assert!(img.iter().zip(ramp(8)).all(|(a, b)| (a - b).abs() < 1e-6));
        // a 90 degree rotation turns the horizontal ramp into a vertical one
        let mut img = ramp(8);
        warp(&mut img, 1, 8, std::f64::consts::FRAC_PI_2, 1.0, 0.0, 0.0);
        assert!((img[0] - img[7]).abs() < 1e-5 && (img[0] - img[56]).abs() > 1.9);
    }
}
