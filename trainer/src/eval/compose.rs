//! Compositional generalisation on shifted digits ([`crate::data::shifted`]): every (class, position) pair is
//! asked for, guided by the composition of the two labels (Liu et al. 2022), and judged on its own: the
//! position by the centre of mass of the ink, the class by the plain dataset's classifier on the crop of that
//! quadrant. The pairs held out of training (the seeds' "7 only at positions 0 and 1") say whether the model
//! composes what it never saw together.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use runtime::sampler::{sample, AttrCond, Denoiser, Method};
use serde::{Deserialize, Serialize};

use super::classifier::{classifier_for, features};
use crate::data::shifted::{crop_quadrant, position_of};
use crate::model::unet::UNetConfig;
use crate::progress::Progress;
use crate::train::config::Config;

/// One (class, position) pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub class: String,
    pub position: String,
    /// Whether training never showed this class at this position.
    pub held_out: bool,
    pub n: usize,
    /// Fractions of the samples whose ink sits in the asked quadrant; whose crop there is the asked class;
    /// both.
    pub at_position: f64,
    pub class_ok: f64,
    pub both: f64,
}

/// `trainer eval --composition N`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompositionReport {
    /// Samples per pair, and the class's guidance weight (reports older than `label_guidance` used it for
    /// every label).
    pub per_pair: usize,
    pub guidance: f32,
    /// The guidance weight of every label: the class, then the model's attributes.
    #[serde(default)]
    pub label_guidance: Vec<LabelWeight>,
    pub held_out_class: String,
    /// `both` of the held-out class at its held-out positions, at its trained positions, and of every other
    /// class at every position.
    pub held_out_pairs: f64,
    pub held_out_class_seen_pairs: f64,
    pub other_pairs: f64,
    pub cells: Vec<Cell>,
}

/// A label's guidance weight (`"class"` or an attribute's name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelWeight {
    pub label: String,
    pub guidance: f32,
}

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
    let cols = m.label_columns();
    let mut labels = vec![];
    let mut pairs = vec![];
    for c in 0..m.num_classes {
        for p in 0..values.len() {
            pairs.push((c, p));
            for _ in 0..per_pair {
                let mut y = m.label_nulls();
                y[0] = c as i64;
                y[1 + pos_attr] = p as i64;
                labels.extend(y);
            }
        }
    }
    let n = labels.len() / cols;
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
    req.seed = seed;
    req.batch = batch;
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
    Ok(CompositionReport {
        per_pair,
        guidance: weights[0].guidance,
        label_guidance: weights.to_vec(),
        held_out_class: shift.holdout_class.clone(),
        held_out_pairs: mean(0),
        held_out_class_seen_pairs: mean(1),
        other_pairs: mean(2),
        cells,
    })
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
