//! The EMA of another length, chosen after training (Karras et al. 2023, "Analyzing and Improving the Training
//! Dynamics of Diffusion Models", sec. 3.2 and appendix C.2).
//!
//! Every checkpoint of step t_k holds two averages of the weights theta_0 .. theta_{t_k} of the training so
//! far: its raw weights (all weight on theta_{t_k}) and its EMA. Any average is a *profile* p(s), the weight it
//! gives theta_s. The EMA the trainer keeps ([`super::optim::Ema`]) updates E_n = d_{n-1} E_{n-1} + (1 -
//! d_{n-1}) theta_n from E_0 = theta_0, with the decay of update n d_n = min(decay, (1 + n) / (10 + n)); so the
//! EMA of step t gives
//!
//!   p_t(s) = (1 - d_{s-1}) prod_{u=s}^{t-1} d_u   (s >= 1),   p_t(0) = prod_{u=0}^{t-1} d_u.
//!
//! The EMA of another decay D at step T has the profile q(s) of the same rule with D. As Karras et al. do, the
//! stored averages are combined with the weights w that bring sum_k w_k p_k closest to q; since every average
//! is linear in the thetas, sum_k w_k E_k is then that EMA up to the misfit. Two changes to their least squares
//! (eq. 24, on the profiles themselves), for exponential profiles of a fixed checkpoint spacing: the fit is of
//! the *cumulative* profiles P_k(s) = sum_{u<=s} p_k(u) against Q(s), and sum_k w_k = 1. The error of the
//! rebuilt weights is sum_s r(s) theta_s for the residual r = sum_k w_k p_k - q; with sum_s r(s) = 0 it is, by
//! parts, -sum_s R(s) (theta_{s+1} - theta_s) for the cumulative residual R: small when R is small and the
//! weights drift smoothly, whatever the detail of r between checkpoints. (Measured on a drifting, noisy scalar
//! with checkpoints every half e-folding length of the stored EMA, rebuilding one 3.3x longer: the pointwise
//! fit leaves 26% of the stored EMA's error, this one 0.1%.) The misfit reported is ||R|| / ||Q|| over
//! s = 0..=T. Checkpoints every few hundred steps with an EMA whose half-life is about as long rebuild any
//! longer EMA closely; a much shorter one only as well as the misfit says.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use runtime::metadata::Weights;

use super::checkpoint::{self, LoadedUnet};

/// One stored average: the checkpoint step and, for an EMA, its decay (`None`: the raw weights).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub step: usize,
    pub decay: Option<f64>,
}

/// The combination that rebuilds an EMA: a weight per snapshot, and how far its profile is from the target's.
#[derive(Debug, Clone)]
pub struct Fit {
    pub weights: Vec<f64>,
    /// ||R|| / ||Q|| over s = 0..=T: how far the combination's cumulative profile is from the target's.
    pub misfit: f64,
}

impl Fit {
    /// What the weights are, for a report or a model card.
    pub fn describe(&self, decay: f64, checkpoints: usize) -> String {
        format!(
            "an EMA of decay {decay} rebuilt after training from the raw and EMA weights of {checkpoints} checkpoint(s) \
             (Karras et al. 2023, sec. 3.2; cumulative-profile misfit {:.2}%)",
            100.0 * self.misfit
        )
    }
}

/// The decay of EMA update n (TensorFlow's num_updates rule, as [`super::optim::Ema::effective_decay`]).
fn decay_at(decay: f64, n: usize) -> f64 {
    decay.min((1.0 + n as f64) / (10.0 + n as f64))
}

/// ln prod_{u=0}^{t-1} d_u for t = 0..=last: products of decays as sums of logs (0.999^t underflows f64
/// only past t ~ 700,000, but ratios of such products are what is needed).
fn log_products(decay: f64, last: usize) -> Vec<f64> {
    let mut l = Vec::with_capacity(last + 1);
    let mut acc = 0.0;
    l.push(acc);
    for n in 0..last {
        acc += decay_at(decay, n).ln();
        l.push(acc);
    }
    l
}

/// The profile of an EMA of `decay` stored at step t, at s (0 beyond t); `l` = [`log_products`] of `decay`.
fn ema_profile(decay: f64, l: &[f64], t: usize, s: usize) -> f64 {
    if s > t {
        return 0.0;
    }
    let arrive = if s == 0 { 1.0 } else { 1.0 - decay_at(decay, s - 1) };
    arrive * (l[t] - l[s]).exp()
}

/// The weights of `snapshots` whose combination is closest to the EMA of `decay` at step `target`.
pub fn fit(snapshots: &[Snapshot], decay: f64, target: usize) -> Result<Fit> {
    if !(decay > 0.0 && decay < 1.0) {
        bail!("the EMA decay must be in (0, 1), got {decay}");
    }
    if snapshots.is_empty() {
        bail!("no checkpoint at or before step {target} to rebuild an EMA from");
    }
    if let Some(s) = snapshots.iter().find(|s| s.step > target) {
        bail!("the checkpoint of step {} is after the target step {target}", s.step);
    }
    let mut logs: Vec<(u64, Vec<f64>)> = vec![];
    let mut log_of = |d: f64| -> usize {
        match logs.iter().position(|(b, _)| *b == d.to_bits()) {
            Some(i) => i,
            None => {
                logs.push((d.to_bits(), log_products(d, target)));
                logs.len() - 1
            }
        }
    };
    let which: Vec<Option<usize>> = snapshots.iter().map(|s| s.decay.map(&mut log_of)).collect();
    let target_log = log_of(decay);
    // normal equations G w = b of the cumulative profiles, accumulated over s without storing the profiles
    let k = snapshots.len();
    let (mut g, mut b, mut qq) = (vec![0.0; k * k], vec![0.0; k], 0.0);
    let (mut c, mut cq) = (vec![0.0; k], 0.0);
    for s in 0..=target {
        for (i, snap) in snapshots.iter().enumerate() {
            c[i] += match (snap.decay, which[i]) {
                (Some(d), Some(l)) => ema_profile(d, &logs[l].1, snap.step, s),
                _ => f64::from(u8::from(s == snap.step)),
            };
        }
        cq += ema_profile(decay, &logs[target_log].1, target, s);
        qq += cq * cq;
        for i in 0..k {
            if c[i] == 0.0 {
                continue;
            }
            b[i] += c[i] * cq;
            for j in 0..k {
                g[i * k + j] += c[i] * c[j];
            }
        }
    }
    // min ||C w - Q|| subject to sum w = 1: w = x - y (1.x - 1) / (1.y) with G x = b, G y = 1
    let chol = Cholesky::new(&g, k)?;
    let x = chol.solve(&b);
    let y = chol.solve(&vec![1.0; k]);
    let excess = (x.iter().sum::<f64>() - 1.0) / y.iter().sum::<f64>();
    let weights: Vec<f64> = x.iter().zip(&y).map(|(x, y)| x - y * excess).collect();
    // ||C w - Q||^2 = w^T G w - 2 w^T b + Q^T Q
    let mut r2 = qq;
    for i in 0..k {
        r2 -= 2.0 * weights[i] * b[i];
        for j in 0..k {
            r2 += weights[i] * g[i * k + j] * weights[j];
        }
    }
    Ok(Fit { weights, misfit: (r2.max(0.0) / qq).sqrt() })
}

/// The Cholesky factor L (row-major, k x k) of a symmetric positive semi-definite Gram matrix.
struct Cholesky {
    l: Vec<f64>,
    k: usize,
}

impl Cholesky {
    /// Factors G (k x k) with a ridge of 1e-12 of its mean diagonal, so that snapshots with the same profile
    /// (a run's raw and EMA weights at step 0, say) share their weight instead of failing.
    fn new(g: &[f64], k: usize) -> Result<Self> {
        let ridge = 1e-12 * (0..k).map(|i| g[i * k + i]).sum::<f64>() / k as f64;
        let mut l = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..=i {
                let mut sum = g[i * k + j] + if i == j { ridge } else { 0.0 };
                for m in 0..j {
                    sum -= l[i * k + m] * l[j * k + m];
                }
                if i == j {
                    if sum <= 0.0 {
                        bail!("the checkpoints' averaging profiles are degenerate (no weight at all on some of them)");
                    }
                    l[i * k + i] = sum.sqrt();
                } else {
                    l[i * k + j] = sum / l[j * k + j];
                }
            }
        }
        Ok(Self { l, k })
    }

    /// x with L L^T x = b.
    fn solve(&self, b: &[f64]) -> Vec<f64> {
        let (l, k) = (&self.l, self.k);
        let mut y = vec![0.0; k];
        for i in 0..k {
            y[i] = (b[i] - (0..i).map(|m| l[i * k + m] * y[m]).sum::<f64>()) / l[i * k + i];
        }
        let mut x = vec![0.0; k];
        for i in (0..k).rev() {
            x[i] = (y[i] - (i + 1..k).map(|m| l[m * k + i] * x[m]).sum::<f64>()) / l[i * k + i];
        }
        x
    }
}

/// An EMA rebuilt by [`ema_weights`]: its weights, the fit that made them, how many checkpoints it combined, and
/// the state of the checkpoint it stands for.
pub struct Rebuilt {
    pub tensors: HashMap<String, Tensor>,
    pub fit: Fit,
    pub checkpoints: usize,
    pub state: checkpoint::State,
}

/// The weights an EMA of `decay` would have had at the checkpoint `which` (`latest` or a step), rebuilt from
/// that checkpoint and all earlier ones of the run.
pub fn ema_weights(run: &Path, which: &str, decay: f64, device: &Device) -> Result<Rebuilt> {
    let last = checkpoint::resolve(run, which)?;
    let state = checkpoint::load_state(&last)?;
    if state.config.distill.is_some() {
        bail!(
            "{} is a distillation run: its EMA restarts with every stage, which the profiles here do not model",
            run.display()
        );
    }
    let target = state.step;
    let dirs: Vec<_> = checkpoint::list(run)?.into_iter().filter(|(s, _)| *s <= target).collect();
    let mut snapshots = vec![];
    for (step, dir) in &dirs {
        let state = checkpoint::load_state(dir)?;
        snapshots.push(Snapshot { step: *step, decay: None });
        snapshots.push(Snapshot { step: *step, decay: Some(state.config.train.ema_decay) });
    }
    let fit = fit(&snapshots, decay, target)?;
    let mut sum: HashMap<String, Tensor> = HashMap::new();
    for (i, (_, dir)) in dirs.iter().enumerate() {
        let ck = checkpoint::load(dir, device, false)?;
        for (tensors, w) in [(&ck.model, fit.weights[2 * i]), (&ck.ema, fit.weights[2 * i + 1])] {
            for (name, t) in tensors {
                let term = (t.to_dtype(DType::F64)? * w)?;
                let acc = match sum.remove(name) {
                    Some(acc) => (acc + term)?,
                    None if i == 0 => term,
                    None => bail!("{}: '{name}' is in no earlier checkpoint (the network changed?)", dir.display()),
                };
                sum.insert(name.clone(), acc);
            }
        }
    }
    let tensors = sum.into_iter().map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
    Ok(Rebuilt { tensors, fit, checkpoints: dirs.len(), state })
}

/// A run's U-Net as `trainer eval` and `trainer export` load it: the checkpoint's own `weights`
/// ([`checkpoint::load_unet`]), or with `post_hoc_ema` the EMA of that decay rebuilt by [`ema_weights`] and what
/// the weights are ([`Fit::describe`]). A rebuilt EMA's state is the checkpoint's with that decay as its
/// train.ema_decay: it describes the weights returned (an exported file's metadata and card name that decay).
pub fn load_unet(
    run: &Path,
    which: &str,
    weights: Weights,
    post_hoc_ema: Option<f64>,
    device: &Device,
) -> Result<(LoadedUnet, Option<String>)> {
    let Some(decay) = post_hoc_ema else {
        return Ok((checkpoint::load_unet(run, which, weights, device)?, None));
    };
    let Rebuilt { tensors, fit, checkpoints, mut state } = ema_weights(run, which, decay, device)?;
    let origin = format!("the EMA of decay {decay} rebuilt from the checkpoints of {}", run.display());
    let unet = checkpoint::unet_from(&state, &tensors, origin)?;
    state.config.train.ema_decay = decay;
    Ok((LoadedUnet { unet, state, passed_over: vec![] }, Some(fit.describe(decay, checkpoints))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Averages of a scalar "training" theta_s, kept as the trainer keeps them.
    fn emas(thetas: &[f64], decay: f64) -> Vec<f64> {
        let mut e = thetas[0];
        let mut out = vec![e];
        for (n, th) in thetas.iter().enumerate().skip(1) {
            let d = decay_at(decay, n - 1);
            e = d * e + (1.0 - d) * th;
            out.push(e);
        }
        out
    }

    #[test]
    fn a_stored_ema_is_rebuilt_by_itself() {
        let snaps: Vec<Snapshot> = [200, 400, 600]
            .iter()
            .flat_map(|&step| [Snapshot { step, decay: None }, Snapshot { step, decay: Some(0.99) }])
            .collect();
        let fit = fit(&snaps, 0.99, 600).unwrap();
        assert!(fit.misfit < 1e-6, "{fit:?}");
        assert!((fit.weights[5] - 1.0).abs() < 1e-4, "{fit:?}");
        assert!(fit.weights[..5].iter().all(|w| w.abs() < 1e-4), "{fit:?}");
    }

    #[test]
    fn a_longer_ema_is_rebuilt_from_checkpoints_of_a_shorter_one() {
        // a noisy, drifting scalar "weight": the long EMA averages the noise away, the short one does not
        let mut state = 1u64;
        let mut noise = || {
            // Knuth's MMIX linear congruential generator, its top 53 bits as a uniform number in [-1, 1)
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        };
        let thetas: Vec<f64> = (0..=6000).map(|s| (s as f64 / 700.0).sin() + 0.3 * noise()).collect();
        // past their warm-up (update 890 for 0.99, 2,990 for 0.997), the two differ
        let short = emas(&thetas, 0.99);
        let long = emas(&thetas, 0.997);
        let steps: Vec<usize> = (1..=120).map(|k| k * 50).collect();
        let snaps: Vec<Snapshot> = steps
            .iter()
            .flat_map(|&step| [Snapshot { step, decay: None }, Snapshot { step, decay: Some(0.99) }])
            .collect();
        let f = fit(&snaps, 0.997, 6000).unwrap();
        let rebuilt: f64 = steps
            .iter()
            .enumerate()
            .map(|(i, &s)| f.weights[2 * i] * thetas[s] + f.weights[2 * i + 1] * short[s])
            .sum();
        let (want, stored) = (long[6000], short[6000]);
        assert!(f.misfit < 0.1, "misfit {}", f.misfit);
        assert!(
            (rebuilt - want).abs() < 0.03 * (stored - want).abs(),
            "rebuilt {rebuilt}, long EMA {want}, short {stored}"
        );
        assert!((f.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9, "the weights keep the scale: {f:?}");
        // a much shorter EMA has detail between the checkpoints: the misfit says so
        let short_fit = fit(&snaps, 0.9, 6000).unwrap();
        assert!(short_fit.misfit > 0.3, "{}", short_fit.misfit);
    }

    #[test]
    fn bad_targets_are_refused() {
        let s = [Snapshot { step: 10, decay: Some(0.9) }];
        assert!(fit(&s, 1.0, 10).unwrap_err().to_string().contains("(0, 1)"));
        assert!(fit(&s, 0.9, 5).unwrap_err().to_string().contains("after the target step"));
        assert!(fit(&[], 0.9, 5).unwrap_err().to_string().contains("no checkpoint"));
    }
}
