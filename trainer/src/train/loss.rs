//! The training objective, computed on the host from the U-Net's output so that both gradient engines share it:
//! L_simple (Ho et al. 2020, eq. 14) with Min-SNR-gamma weights, plus lambda L_vlb for a learned variance
//! (Nichol & Dhariwal 2021, eq. 16), each image weighted by the importance sampler's 1 / (T p_t) (sec. 3.3).
//! It returns the loss and its gradient with respect to the output, which seeds the backward pass.

use runtime::likelihood;
use runtime::schedule::NoiseSchedule;

use super::batch::HostBatch;
use super::config::{Config, Loss, Prediction};

/// The loss of one batch and what the backward pass and the importance sampler need of it.
pub struct Objective {
    /// The mean over the batch of each image's (weighted) loss.
    pub loss: f64,
    /// d loss / d output, the output's layout ([B, C or 2C, H, W]).
    pub grad: Vec<f32>,
    /// Each image's loss before the importance weight (what the sampler's history records).
    pub per_image: Vec<f64>,
}

/// Min-SNR-gamma weights (Hang et al. 2023, sec. 3.4): min(SNR_t, gamma) / SNR_t for eps-prediction,
/// min(SNR_t, gamma) / (SNR_t + 1) for v-prediction (both the x_0 loss's weight min(SNR_t, gamma) in that
/// target's units); all 1 when gamma is 0.
pub fn min_snr_weights(sched: &NoiseSchedule, gamma: f64, prediction: Prediction, t: &[u32]) -> Vec<f32> {
    t.iter()
        .map(|&t| {
            if gamma > 0.0 {
                let snr = sched.snr(t as usize);
                let per_unit = match prediction {
                    Prediction::Epsilon => snr,
                    Prediction::V => snr + 1.0,
                };
                (snr.min(gamma) / per_unit) as f32
            } else {
                1.0
            }
        })
        .collect()
}

/// The objective of `cfg` for the model output `out` on `batch`, each image weighted by its importance weight
/// (1 for uniformly drawn timesteps).
///
/// Per image: w_snr ||eps - eps_theta||^2 / d (or the mean absolute error; v and v_theta for a v-predicting
/// model, Salimans & Ho 2022), and for a learned variance
/// plus lambda T L_t, where L_t is the variational-bound term at the image's t in bits per dimension with the
/// mean held fixed, so that it trains v alone (Nichol & Dhariwal 2021, sec. 3.1; lambda T is
/// improved-diffusion's T / 1000 for lambda = 0.001).
pub fn objective(cfg: &Config, sched: &NoiseSchedule, out: &[f32], batch: &HostBatch) -> Objective {
    let [b, c, h, w] = batch.dims;
    // the mean over the whole step's batch: a rank's share adds its part of it
    let n = batch.global;
    let per = c * h * w;
    let learned = cfg.diffusion.variance.is_learned();
    let out_per = if learned { 2 * per } else { per };
    assert_eq!(out.len(), b * out_per, "the model output does not fit the batch");
    let prediction = cfg.diffusion.prediction;
    let snr_w = min_snr_weights(sched, cfg.train.min_snr_gamma, prediction, &batch.t);
    let lambda_t = cfg.train.vlb_weight * sched.num_timesteps() as f64;
    let l1 = cfg.train.loss == Loss::L1;
    let mut grad = vec![0f32; out.len()];
    let mut per_image = Vec::with_capacity(b);
    let mut loss = 0.0;
    for i in 0..b {
        let o = &out[i * out_per..(i + 1) * out_per];
        let g = &mut grad[i * out_per..(i + 1) * out_per];
        let r = i * per..(i + 1) * per;
        let (eps_true, ws, iw) = (&batch.eps[r.clone()], snr_w[i] as f64, batch.importance[i]);
        let t = batch.t[i] as usize;
        let (x0, xt) = (&batch.x0[r.clone()], &batch.xt[r]);
        let v_true;
        let target = match prediction {
            Prediction::Epsilon => eps_true,
            Prediction::V => {
                v_true = sched.v_from_eps(x0, t, eps_true);
                &v_true
            }
        };
        // L_simple: the mean over the image's values, so the batch loss is the mean over all of them
        let mut simple = 0.0;
        for ((g, &p), &e) in g[..per].iter_mut().zip(&o[..per]).zip(target) {
            let d = (p - e) as f64;
            let (l, dl) = if l1 { (d.abs(), d.signum()) } else { (d * d, 2.0 * d) };
            simple += l;
            *g = (iw * ws * dl / (per * n) as f64) as f32;
        }
        let mut total = ws * simple / per as f64;
        if learned {
            let v = &o[per..];
            let lv: Vec<f64> = v.iter().map(|&v| sched.learned_log_variance(t, v)).collect();
            let mut eps_theta = o[..per].to_vec();
            if prediction == Prediction::V {
                sched.eps_from_v(xt, t, &mut eps_theta);
            }
            // the mean is held fixed (eps_theta gets no gradient from L_vlb): only d/dv is kept
            let (term, d_lv) = likelihood::vb_term(sched, x0, xt, t, &eps_theta, &lv, false);
            let slope = sched.learned_log_variance_slope(t);
            for (g, d) in g[per..].iter_mut().zip(&d_lv) {
                *g = (iw * lambda_t * d * slope / n as f64) as f32;
            }
            total += lambda_t * term;
        }
        per_image.push(total);
        loss += iw * total / n as f64;
    }
    Objective { loss, grad, per_image }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::{ScheduleKind, VarianceType};
    use runtime::schedule::BetaSchedule;

    fn batch(sched: &NoiseSchedule, t: &[u32], per: usize) -> HostBatch {
        let b = t.len();
        let x0: Vec<f32> = (0..b * per).map(|i| ((i * 37) % 256) as f32 / 127.5 - 1.0).collect();
        let eps: Vec<f32> = (0..b * per).map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0).collect();
        let xt = (0..b)
            .flat_map(|i| sched.q_sample(&x0[i * per..(i + 1) * per], t[i] as usize, &eps[i * per..(i + 1) * per]))
            .collect();
        HostBatch { dims: [b, 1, 1, per], x0, xt, eps, t: t.to_vec(), y: None, importance: vec![1.0; b], global: b }
    }

    #[test]
    fn the_hybrid_gradient_is_the_finite_difference_of_the_hybrid_loss() {
        let sched = NoiseSchedule::new(BetaSchedule::COSINE, 100);
        let mut cfg = Config::default();
        cfg.diffusion.variance = VarianceType::LearnedRange;
        cfg.train.min_snr_gamma = 5.0;
        let per = 6;
        let mut hb = batch(&sched, &[0, 3, 50, 99], per);
        hb.importance = vec![1.0, 0.5, 2.0, 1.0];
        let out: Vec<f32> = (0..4 * 2 * per).map(|i| ((i * 7) % 11) as f32 / 6.0 - 0.9).collect();
        let o = objective(&cfg, &sched, &out, &hb);
        assert_eq!(o.grad.len(), out.len());
        let h = 1e-3f32;
        for k in 0..out.len() {
            let mut a = out.clone();
            a[k] += h;
            let mut b = out.clone();
            b[k] -= h;
            let fd = (objective(&cfg, &sched, &a, &hb).loss - objective(&cfg, &sched, &b, &hb).loss) / (2.0 * h as f64);
            let is_eps = k % (2 * per) < per;
            if is_eps {
                // L_vlb holds the mean fixed: the eps gradient is L_simple's alone, so compare with that part
                let mut plain = cfg.clone();
                plain.diffusion.variance = VarianceType::FixedSmall;
                let strip = |x: &[f32]| -> Vec<f32> { x.chunks(2 * per).flat_map(|c| c[..per].to_vec()).collect() };
                let fd = (objective(&plain, &sched, &strip(&a), &hb).loss
                    - objective(&plain, &sched, &strip(&b), &hb).loss)
                    / (2.0 * h as f64);
                assert!((o.grad[k] as f64 - fd).abs() < 1e-3 * (1.0 + fd.abs()), "eps {k}: {} vs {fd}", o.grad[k]);
            } else {
                assert!((o.grad[k] as f64 - fd).abs() < 1e-3 * (1.0 + fd.abs()), "v {k}: {} vs {fd}", o.grad[k]);
            }
        }
        // the vlb term is there: the hybrid loss exceeds L_simple
        let mut plain = cfg.clone();
        plain.diffusion.variance = VarianceType::FixedSmall;
        let eps_only: Vec<f32> = out.chunks(2 * per).flat_map(|c| c[..per].to_vec()).collect();
        assert!(o.loss > objective(&plain, &sched, &eps_only, &hb).loss);
    }

    #[test]
    fn v_prediction_regresses_the_velocity_with_weights_in_its_units() {
        let sched = NoiseSchedule::new(BetaSchedule::named(ScheduleKind::Cosine, 100), 100);
        let mut cfg = Config::default();
        cfg.diffusion.prediction = Prediction::V;
        cfg.train.min_snr_gamma = 5.0;
        let (per, t) = (6, [1u32, 40, 99]);
        let hb = batch(&sched, &t, per);
        // the true velocity scores 0; the true eps does not
        let v: Vec<f32> = (0..3)
            .flat_map(|i| {
                sched.v_from_eps(&hb.x0[i * per..(i + 1) * per], t[i] as usize, &hb.eps[i * per..(i + 1) * per])
            })
            .collect();
        assert!(objective(&cfg, &sched, &v, &hb).loss < 1e-12);
        assert!(objective(&cfg, &sched, &hb.eps, &hb).loss > 1e-3);
        // Min-SNR in v units is the eps weight times alpha_bar: min(SNR, gamma) / (SNR + 1)
        let we = min_snr_weights(&sched, 5.0, Prediction::Epsilon, &t);
        let wv = min_snr_weights(&sched, 5.0, Prediction::V, &t);
        for (k, &t) in t.iter().enumerate() {
            let ab = sched.alphas_cumprod[t as usize];
            assert!((wv[k] as f64 - we[k] as f64 * ab).abs() < 1e-5, "t={t}: {} vs {}", wv[k], we[k]);
        }
        // with a learned variance the bound reads eps back from the velocity: the perfect v gives the
        // same L_vlb as the perfect eps of an eps-model
        let mut learned = cfg.clone();
        learned.diffusion.variance = VarianceType::LearnedRange;
        let mut eps_cfg = learned.clone();
        eps_cfg.diffusion.prediction = Prediction::Epsilon;
        let with_var = |first: &[f32]| -> Vec<f32> {
            first.chunks(per).flat_map(|c| c.iter().copied().chain(std::iter::repeat_n(0.3, per))).collect()
        };
        let lv = objective(&learned, &sched, &with_var(&v), &hb).loss;
        let le = objective(&eps_cfg, &sched, &with_var(&hb.eps), &hb).loss;
        assert!((lv - le).abs() < 1e-6 * (1.0 + le.abs()), "{lv} vs {le}");
    }
}
