//! Compositional generalisation on shifted digits ([`crate::data::shifted`]): every (class, position) pair is
//! asked for, guided by the composition of the two labels (Liu et al. 2022), and judged on its own: the
//! position by the centre of mass of the ink, the class by the plain dataset's classifier on the crop of that
//! quadrant. The pairs held out of training (the seeds' "7 only at positions 0 and 1") say whether the model
//! composes what it never saw together.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use runtime::sampler::{sample, AttrCond, Denoiser, Method, SampleOptions};

use super::classifier::{classifier_for, features};
use crate::data::shifted::{crop_quadrant, position_of};
use crate::model::unet::UNetConfig;
use crate::progress::Progress;
pub use crate::report::{Cell, CompositionReport, LabelWeight};
use crate::train::config::Config;

/// The weight of every label of `m` (the class, then each attribute): `guidance`, or an attribute's own weight
/// from `own` (`--attr-guidance NAME=W`). An unknown name or a weight that is not finite and >= 0 is an error.
pub fn label_weights(m: &UNetConfig, guidance: f32, own: &[(String, f32)]) -> Result<Vec<LabelWeight>> {
    let mut w: Vec<LabelWeight> = std::iter::once("class")
        .chain(m.attributes.iter().map(|a| a.name.as_str()))
        .map(|label| LabelWeight { label: label.into(), guidance })
        .collect();
    for (name, g) in own {
        if !(g.is_finite() && *g >= 0.0) {
            bail!("--attr-guidance {name}={g}: a guidance weight must be finite and >= 0");
        }
        let Some(i) = m.attributes.iter().position(|a| a.name == *name) else {
            let names: Vec<&str> = m.attributes.iter().map(|a| a.name.as_str()).collect();
            bail!("--attr-guidance {name}: the model has no attribute {name} (its attributes: {})", names.join(", "));
        };
        w[1 + i].guidance = *g;
    }
    Ok(w)
}

/// Samples `per_pair` images of every (class, position) pair from `den` and judges them.
#[allow(clippy::too_many_arguments)]
pub fn composition(
    den: &mut dyn Denoiser,
    cfg: &Config,
    method: Method,
    per_pair: usize,
    weights: &[LabelWeight],
    seed: u64,
    batch: usize,
    cache: &std::path::Path,
    dev: &Device,
    progress: &dyn Progress,
) -> Result<CompositionReport> {
    let Some(shift) = &cfg.data.shifted else {
        bail!("--composition needs a run on shifted digits (data.shifted) with a position attribute");
    };
    let m = &cfg.model;
    let Some(pos_attr) = m.attributes.iter().position(|a| a.name == "position") else {
        bail!("--composition needs a model with the position attribute (model.attributes)");
    };
    if weights.len() != 1 + m.attributes.len() {
        bail!("{} guidance weights for the class and {} attributes", weights.len(), m.attributes.len());
    }
    // the judge: the classifier of the plain (unshifted) dataset
    let mut plain = cfg.data.clone();
    (plain.shifted, plain.augment) = (None, Default::default());
    let plain_train = crate::data::load(&plain, 28)
        .context("the judge of --composition is the classifier of the unshifted 28x28 set")?;
    let (clf, _) = classifier_for(&plain_train, cache, dev, progress)?;
    let s = plain_train.size;
    let canvas = m.image_size;
    let classes = &plain_train.class_names;
    let values = &m.attributes[pos_attr].values;
    let (labels, pairs) = pair_labels(m, pos_attr, per_pair);
    let n = labels.len() / m.label_columns();
    let mut req = runtime::sampler::Request::new(n, [1, canvas, canvas], method);
    req.labels = Some(labels);
    req.null_class = m.null_class().map(|c| c as i64);
    req.guidance = weights[0].guidance;
    req.attributes = m
        .attributes
        .iter()
        .zip(&weights[1..])
        .map(|(a, w)| AttrCond { null: a.null(), guidance: w.guidance })
        .collect();
    req.options = SampleOptions { seed, batch, ..Default::default() };
    let sched = cfg.diffusion.schedule()?;
    let steps = req.num_steps(sched.num_timesteps())?;
    progress.begin("composition samples", (n.div_ceil(batch) * steps) as u64);
    let mut x = sample(den, &sched, &req, &mut |_| progress.advance(1, None))?;
    progress.end();
    super::quantize(&mut x);
    let per = canvas * canvas;
    let found: Vec<usize> = x.chunks(per).map(|img| position_of(img, canvas)).collect();
    let crops: Vec<f32> = x.chunks(per).zip(&found).flat_map(|(img, &p)| crop_quadrant(img, canvas, p, s)).collect();
    let (_, pred) = features(&clf, &crops, [1, s, s], dev)?;
    let judged = Judged { found: &found, pred: &pred, classes, values };
    Ok(judged.report(&pairs, per_pair, weights, shift))
}

/// The labels of `per_pair` images of every (class, position) pair, and the pairs in that order.
fn pair_labels(m: &UNetConfig, pos_attr: usize, per_pair: usize) -> (Vec<i64>, Vec<(usize, usize)>) {
    let mut labels = vec![];
    let mut pairs = vec![];
    for c in 0..m.num_classes {
        for p in 0..m.attributes[pos_attr].values.len() {
            pairs.push((c, p));
            for _ in 0..per_pair {
                let mut y = m.label_nulls();
                y[0] = c as i64;
                y[1 + pos_attr] = p as i64;
                labels.extend(y);
            }
        }
    }
    (labels, pairs)
}

/// What the judges found in every sample: the quadrant of its ink, and the class of its crop there.
struct Judged<'a> {
    found: &'a [usize],
    pred: &'a [u32],
    classes: &'a [String],
    values: &'a [String],
}

impl Judged<'_> {
    /// One cell per pair, and the mean of `both` over the held-out pairs, the held-out class's trained pairs and
    /// every other pair.
    fn report(
        &self,
        pairs: &[(usize, usize)],
        per_pair: usize,
        weights: &[LabelWeight],
        shift: &crate::data::shifted::ShiftedConfig,
    ) -> CompositionReport {
        let (found, pred, classes, values) = (self.found, self.pred, self.classes, self.values);
        let holdout = classes.iter().position(|n| *n == shift.holdout_class);
        let mut cells = vec![];
        let (mut sums, mut counts) = ([0f64; 3], [0usize; 3]);
        for (k, &(c, p)) in pairs.iter().enumerate() {
            let r = k * per_pair..(k + 1) * per_pair;
            let at = found[r.clone()].iter().filter(|&&f| f == p).count();
            let ok = pred[r.clone()].iter().filter(|&&q| q as usize == c).count();
            let both = r.clone().filter(|&i| found[i] == p && pred[i] as usize == c).count();
            let held_out = Some(c) == holdout && shift.holdout_positions.contains(&p);
            let frac = |v: usize| v as f64 / per_pair as f64;
            let group = if held_out {
                0
            } else if Some(c) == holdout {
                1
            } else {
                2
            };
            sums[group] += frac(both);
            counts[group] += 1;
            cells.push(Cell {
                class: classes[c].clone(),
                position: values[p].clone(),
                held_out,
                n: per_pair,
                at_position: frac(at),
                class_ok: frac(ok),
                both: frac(both),
            });
        }
        let mean = |g: usize| if counts[g] == 0 { f64::NAN } else { sums[g] / counts[g] as f64 };
        CompositionReport {
            per_pair,
            guidance: weights[0].guidance,
            label_guidance: weights.to_vec(),
            held_out_class: shift.holdout_class.clone(),
            held_out_pairs: mean(0),
            held_out_class_seen_pairs: mean(1),
            other_pairs: mean(2),
            cells,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_weights_take_guidance_unless_an_attribute_has_its_own() {
        let m = UNetConfig {
            num_classes: 10,
            attributes: vec![crate::data::shifted::position_attribute()],
            ..Default::default()
        };
        let w = label_weights(&m, 2.0, &[]).unwrap();
        assert_eq!(
            w.iter().map(|w| (w.label.as_str(), w.guidance)).collect::<Vec<_>>(),
            [("class", 2.0), ("position", 2.0)]
        );
        let w = label_weights(&m, 2.0, &[("position".into(), 6.0)]).unwrap();
        assert_eq!((w[0].guidance, w[1].guidance), (2.0, 6.0));
        for bad in [-1.0, f32::NAN, f32::INFINITY] {
            let e = label_weights(&m, 2.0, &[("position".into(), bad)]).unwrap_err().to_string();
            assert!(e.contains("must be finite and >= 0"), "{e}");
        }
    }
}
