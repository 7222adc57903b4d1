//! "Shifted digits" (the seeds' multi-attribute experiment): every digit of a grey labelled set, downscaled to
//! half the canvas and placed in one of its four quadrants, with the quadrant as a second label ("position",
//! 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right). Part of the position labels are withheld
//! (unknown), and one class can be kept out of some positions altogether, to test whether a model composes a
//! class and a position it never saw together.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Dataset, UNKNOWN};
use runtime::metadata::Attribute;

/// The names of the four positions.
pub const POSITIONS: [&str; 4] = ["top-left", "top-right", "bottom-left", "bottom-right"];

/// `[data.shifted]` in a config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShiftedConfig {
    /// Side of the canvas in pixels (even); the digit is scaled to half of it.
    pub canvas: usize,
    /// Fraction of the images whose position label is withheld (the image still shows its position).
    pub unlabelled: f64,
    /// A class (name) that is never placed at `holdout_positions`; empty: none.
    pub holdout_class: String,
    pub holdout_positions: Vec<usize>,
    /// Seed of the placements and of which labels are withheld.
    pub seed: u64,
}

impl Default for ShiftedConfig {
    fn default() -> Self {
        Self { canvas: 32, unlabelled: 0.5, holdout_class: "7".into(), holdout_positions: vec![2, 3], seed: 0 }
    }
}

/// The attribute this transform adds.
pub fn position_attribute() -> Attribute {
    Attribute { name: "position".into(), values: POSITIONS.iter().map(|s| s.to_string()).collect() }
}

/// The quadrant `p`'s top-left corner on a `canvas` of side s: (x, y).
pub fn corner(p: usize, canvas: usize) -> (usize, usize) {
    let h = canvas / 2;
    ((p % 2) * h, (p / 2) * h)
}

/// Which quadrant holds most of a [s, s] image's ink (centre of mass of the brightness above the background,
/// the images in [-1, 1] with -1 background).
pub fn position_of(img: &[f32], s: usize) -> usize {
    let (mut m, mut mx, mut my) = (0f64, 0f64, 0f64);
    for (i, &v) in img.iter().enumerate() {
        let w = (v as f64 + 1.0).max(0.0);
        m += w;
        mx += w * (i % s) as f64;
        my += w * (i / s) as f64;
    }
    if m == 0.0 {
        return 0;
    }
    let half = (s as f64 - 1.0) / 2.0;
    (mx / m > half) as usize + 2 * (my / m > half) as usize
}

/// Area-averaged resize of a [s, s] u8 image to [d, d].
fn downscale(img: &[u8], s: usize, d: usize) -> Vec<u8> {
    let mut out = vec![0u8; d * d];
    let f = s as f64 / d as f64;
    for y in 0..d {
        for x in 0..d {
            let (x0, x1, y0, y1) = (x as f64 * f, (x + 1) as f64 * f, y as f64 * f, (y + 1) as f64 * f);
            let (mut acc, mut area) = (0f64, 0f64);
            for sy in y0.floor() as usize..(y1.ceil() as usize).min(s) {
                let wy = (y1.min(sy as f64 + 1.0) - y0.max(sy as f64)).max(0.0);
                for sx in x0.floor() as usize..(x1.ceil() as usize).min(s) {
                    let wx = (x1.min(sx as f64 + 1.0) - x0.max(sx as f64)).max(0.0);
                    acc += wx * wy * img[sy * s + sx] as f64;
                    area += wx * wy;
                }
            }
            out[y * d + x] = (acc / area).round() as u8;
        }
    }
    out
}

/// The quadrant `p` of a [canvas, canvas] image in [-1, 1], resized (bilinear) to [size, size]: what the digit
/// classifier judges.
pub fn crop_quadrant(img: &[f32], canvas: usize, p: usize, size: usize) -> Vec<f32> {
    let h = canvas / 2;
    let (cx, cy) = corner(p, canvas);
    let mut out = vec![0f32; size * size];
    let f = h as f32 / size as f32;
    for y in 0..size {
        for x in 0..size {
            let sx = ((x as f32 + 0.5) * f - 0.5).clamp(0.0, (h - 1) as f32);
            let sy = ((y as f32 + 0.5) * f - 0.5).clamp(0.0, (h - 1) as f32);
            let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(h - 1), (y0 + 1).min(h - 1));
            let (ax, ay) = (sx - x0 as f32, sy - y0 as f32);
            let at = |xx: usize, yy: usize| img[(cy + yy) * canvas + cx + xx];
            out[y * size + x] = (1.0 - ay) * ((1.0 - ax) * at(x0, y0) + ax * at(x1, y0))
                + ay * ((1.0 - ax) * at(x0, y1) + ax * at(x1, y1));
        }
    }
    out
}

/// The shifted set of a labelled grey dataset: class labels kept, position labels added ([`UNKNOWN`] where
/// withheld).
pub fn shift(ds: Dataset, cfg: &ShiftedConfig) -> Result<Dataset> {
    let (s, canvas) = (ds.size, cfg.canvas);
    if ds.channels != 1 {
        bail!("data.shifted needs a grey dataset; {} has {} channels", ds.description, ds.channels);
    }
    let Some(labels) = ds.labels.clone() else {
        bail!("data.shifted needs class labels; {} has none", ds.description);
    };
    if canvas < 4 || !canvas.is_multiple_of(2) {
        bail!("data.shifted.canvas must be even and at least 4, got {canvas}");
    }
    if !(0.0..=1.0).contains(&cfg.unlabelled) {
        bail!("data.shifted.unlabelled must lie in [0, 1], got {}", cfg.unlabelled);
    }
    if let Some(p) = cfg.holdout_positions.iter().find(|&&p| p >= 4) {
        bail!("data.shifted.holdout_positions: {p} is not a position (0..3)");
    }
    let holdout = match cfg.holdout_class.as_str() {
        "" => None,
        c => match ds.class_names.iter().position(|n| n == c) {
            Some(i) => Some(i as u32),
            None => {
                bail!("data.shifted.holdout_class: unknown class '{c}'; the classes are {}", ds.class_names.join(", "))
            }
        },
    };
    let allowed_for_holdout: Vec<usize> = (0..4).filter(|p| !cfg.holdout_positions.contains(p)).collect();
    if holdout.is_some() && allowed_for_holdout.is_empty() {
        bail!("data.shifted.holdout_positions leave the held-out class no position");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (half, per) = (canvas / 2, canvas * canvas);
    let mut images = vec![0u8; ds.len * per];
    let mut positions = Vec::with_capacity(ds.len);
    for (i, &label) in labels.iter().enumerate() {
        let p = if Some(label) == holdout {
            allowed_for_holdout[rng.gen_range(0..allowed_for_holdout.len())]
        } else {
            rng.gen_range(0..4)
        };
        let small = downscale(&ds.images[i * s * s..(i + 1) * s * s], s, half);
        let (cx, cy) = corner(p, canvas);
        let img = &mut images[i * per..(i + 1) * per];
        for y in 0..half {
            img[(cy + y) * canvas + cx..(cy + y) * canvas + cx + half]
                .copy_from_slice(&small[y * half..(y + 1) * half]);
        }
        positions.push(if rng.gen_bool(cfg.unlabelled) { UNKNOWN } else { p as u32 });
    }
    let desc = format!("{} shifted to {canvas}x{canvas}", ds.description);
    Dataset::new(images, Some(labels), ds.class_names, 1, canvas, desc)?
        .with_attributes(vec![position_attribute()], vec![positions])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits() -> Dataset {
        // 40 8x8 "digits": a bright 4x4 square in the middle, labels 0..3 cycling, class names a..d
        let mut images = vec![0u8; 40 * 64];
        for i in 0..40 {
            for y in 2..6 {
                for x in 2..6 {
                    images[i * 64 + y * 8 + x] = 255;
                }
            }
        }
        let labels = (0..40).map(|i| i % 4).collect();
        Dataset::new(images, Some(labels), ["a", "b", "c", "d"].map(String::from).to_vec(), 1, 8, "toy".into()).unwrap()
    }

    #[test]
    fn digits_land_in_their_quadrant_labels_are_withheld_and_the_held_out_pairs_never_occur() {
        let cfg = ShiftedConfig { canvas: 16, unlabelled: 0.5, holdout_class: "b".into(), ..Default::default() };
        let ds = shift(digits(), &cfg).unwrap();
        assert_eq!((ds.size, ds.len, ds.attributes[0].name.as_str()), (16, 40, "position"));
        let pos = &ds.attr_labels[0];
        let unknown = pos.iter().filter(|&&p| p == UNKNOWN).count();
        assert!((8..=32).contains(&unknown), "{unknown} of 40 withheld");
        let mut seen_b = [0; 4];
        for (i, &label) in pos.iter().enumerate() {
            let img = ds.image_f32(i);
            let p = position_of(&img, 16);
            if label != UNKNOWN {
                assert_eq!(p, label as usize, "image {i}: its label is where its ink is");
            }
            if ds.labels.as_ref().unwrap()[i] == 1 {
                seen_b[p] += 1;
            }
            // the crop of its quadrant holds the whole square, scaled back up
            let crop = crop_quadrant(&img, 16, p, 8);
            assert!(crop[3 * 8 + 3] > 0.9 && crop[0] < -0.9, "image {i}");
        }
        assert_eq!((seen_b[2], seen_b[3]), (0, 0), "class b never at the held-out positions");
        assert!(seen_b[0] + seen_b[1] == 10);
        // another seed places them differently; the same seed the same
        assert_eq!(shift(digits(), &cfg).unwrap().images, ds.images);
        assert_ne!(shift(digits(), &ShiftedConfig { seed: 1, ..cfg.clone() }).unwrap().images, ds.images);
        let bad = ShiftedConfig { holdout_class: "z".into(), ..cfg };
        assert!(shift(digits(), &bad).unwrap_err().to_string().contains("unknown class 'z'"));
    }
}
