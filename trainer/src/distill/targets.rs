//! The host arithmetic of progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast
//! sampling of diffusion models", Algorithm 2), shared by the training step and its tests. Notation:
//! alpha_t = sqrt(a_bar_t), sigma_t = sqrt(1 - a_bar_t), z_t = alpha_t x + sigma_t eps, v = alpha_t eps - sigma_t x
//! (their eq. 7 and appendix D), so x = alpha_t z - sigma_t v and eps = sigma_t z + alpha_t v. "The end" (None) is
//! t = -1: alpha = 1, sigma = 0.

use runtime::schedule::NoiseSchedule;

use crate::train::loss::Objective;

/// (alpha_t, sigma_t), or (1, 0) at the end.
pub fn alpha_sigma(sched: &NoiseSchedule, t: Option<usize>) -> (f64, f64) {
    let a = t.map_or(1.0, |t| sched.alphas_cumprod[t]);
    (a.sqrt(), (1.0 - a).sqrt())
}

/// One deterministic DDIM step (Song et al. 2020, eq. 12 with eta = 0) of one image from t to s, given the
/// model's eps: x~ = (z - sigma_t eps) / alpha_t (clipped to [-1, 1] when `clip`, eps then recomputed from it),
/// z_s = alpha_s x~ + sigma_s eps.
pub fn ddim(sched: &NoiseSchedule, z: &[f32], eps: &[f32], t: usize, s: Option<usize>, clip: bool) -> Vec<f32> {
    let (at, st) = alpha_sigma(sched, Some(t));
    let (as_, ss) = alpha_sigma(sched, s);
    z.iter()
        .zip(eps)
        .map(|(&z, &e)| {
            let (z, e) = (z as f64, e as f64);
            let mut x = (z - st * e) / at;
            let mut e = e;
            if clip {
                x = x.clamp(-1.0, 1.0);
                e = (z - at * x) / st;
            }
            (as_ * x + ss * e) as f32
        })
        .collect()
}

/// The x-target of one image (Salimans & Ho 2022, Algorithm 2, the line "x~ = ..."): the x whose single DDIM
/// step from (z_t, t) lands on the teacher's two-step result z2 at t2:
///
///   x~ = (z2 - (sigma_t2 / sigma_t) z_t) / (alpha_t2 - (sigma_t2 / sigma_t) alpha_t),   x~ = z2 at the end.
pub fn pd_target(sched: &NoiseSchedule, z: &[f32], t: usize, z2: &[f32], t2: Option<usize>) -> Vec<f32> {
    if t2.is_none() {
        return z2.to_vec();
    }
    let (at, st) = alpha_sigma(sched, Some(t));
    let (a2, s2) = alpha_sigma(sched, t2);
    let r = s2 / st;
    let den = a2 - r * at;
    z.iter().zip(z2).map(|(&z, &z2)| ((z2 as f64 - r * z as f64) / den) as f32).collect()
}

/// The truncated-SNR weight max(SNR_t, 1) of Salimans & Ho 2022, sec. 4 ("truncated SNR weighting"): the x
/// loss weighted this way is the eps loss at low noise and the x loss at high noise.
pub fn snr_trunc(sched: &NoiseSchedule, t: usize) -> f64 {
    sched.snr(t).max(1.0)
}

/// Per image of a v-predicting student's output: sigma_t and x^ - x~ with x^ = alpha_t z - sigma_t v^ (what
/// both objectives below measure; each pixel's x^ depends on its v^ through -sigma_t).
fn x_errors<'a>(
    sched: &'a NoiseSchedule,
    v_hat: &'a [f32],
    z: &'a [f32],
    t: &'a [u32],
    x_target: &'a [f32],
) -> impl Iterator<Item = (f64, Vec<f64>)> + 'a {
    let d = v_hat.len() / t.len().max(1);
    t.iter().enumerate().map(move |(i, &ti)| {
        let (a, s) = alpha_sigma(sched, Some(ti as usize));
        let r = i * d..(i + 1) * d;
        let diff = v_hat[r.clone()]
            .iter()
            .zip(z[r.clone()].iter().zip(&x_target[r]))
            .map(|(&v, (&z, &x))| a * z as f64 - s * v as f64 - x as f64)
            .collect();
        (s, diff)
    })
}

/// The distillation loss of a v-predicting student: per image, w_t ||x^ - x~||^2 / d with x^ = alpha_t z - sigma_t
/// v^ and w_t = max(SNR_t, 1), averaged over the batch; the gradient is with respect to v^.
pub fn pd_objective(sched: &NoiseSchedule, v_hat: &[f32], z: &[f32], t: &[u32], x_target: &[f32]) -> Objective {
    let b = t.len();
    let d = v_hat.len() / b.max(1);
    let mut grad = Vec::with_capacity(v_hat.len());
    let mut per_image = Vec::with_capacity(b);
    for ((s, diff), &ti) in x_errors(sched, v_hat, z, t, x_target).zip(t) {
        let w = snr_trunc(sched, ti as usize);
        // d/dv of w (diff^2) / (d b)
        grad.extend(diff.iter().map(|df| (-2.0 * w * s * df / (d * b) as f64) as f32));
        per_image.push(w * diff.iter().map(|df| df * df).sum::<f64>() / d as f64);
    }
    let loss = per_image.iter().sum::<f64>() / b.max(1) as f64;
    Objective { loss, grad, per_image }
}

/// The consistency-distillation loss of a v-predicting student (Song et al. 2023, eq. 7, with the pseudo-Huber
/// metric of Song & Dhariwal 2023, "Improved techniques for training consistency models", sec. 3.3): per image
/// d(x^, x~) = sqrt(||x^ - x~||^2 + c^2) - c with x^ = f(z_t, t) = alpha_t z - sigma_t v^ and x~ the
/// (stop-gradient) target, averaged over the batch; the gradient is with respect to v^.
pub fn cd_objective(sched: &NoiseSchedule, v_hat: &[f32], z: &[f32], t: &[u32], x_target: &[f32], c: f64) -> Objective {
    let b = t.len();
    let mut grad = Vec::with_capacity(v_hat.len());
    let mut per_image = Vec::with_capacity(b);
    for (s, diff) in x_errors(sched, v_hat, z, t, x_target) {
        let norm = (diff.iter().map(|v| v * v).sum::<f64>() + c * c).sqrt();
        grad.extend(diff.iter().map(|df| (-s * df / norm / b as f64) as f32));
        per_image.push(norm - c);
    }
    let loss = per_image.iter().sum::<f64>() / b.max(1) as f64;
    Objective { loss, grad, per_image }
}

/// Steps of a trailing grid of `steps` on T = `num_timesteps`, high to low (the runtime's spacing, so a student
/// distilled on it is sampled with `--spacing trailing`). Halving keeps every other point: grid(2S)[2j] =
/// grid(S)[j].
pub fn grid(num_timesteps: usize, steps: usize) -> Vec<usize> {
    runtime::sampler::timesteps(num_timesteps, steps, runtime::sampler::Spacing::Trailing)
        .expect("a grid of 1..=T steps")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use runtime::schedule::{BetaSchedule, ScheduleKind};

    fn schedules() -> Vec<NoiseSchedule> {
        [ScheduleKind::Linear, ScheduleKind::Cosine]
            .into_iter()
            .map(|k| NoiseSchedule::new(BetaSchedule::named(k, 1000), 1000))
            .collect()
    }

    fn randn(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, rng)).collect()
    }

    #[test]
    fn one_ddim_step_to_the_target_lands_on_the_teachers_two_steps() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for sched in schedules() {
            for (t, t1, t2) in [(999, 874, Some(749)), (499, 374, Some(249)), (249, 124, None), (999, 499, None)] {
                let z = randn(&mut rng, 64);
                let (e1, e2) = (randn(&mut rng, 64), randn(&mut rng, 64));
                let z1 = ddim(&sched, &z, &e1, t, Some(t1), false);
                let z2 = match t2 {
                    Some(_) => ddim(&sched, &z1, &e2, t1, t2, false),
                    None => ddim(&sched, &z1, &e2, t1, None, false),
                };
                let x = pd_target(&sched, &z, t, &z2, t2);
                // one DDIM step from z with x0 = x: its eps is (z - alpha x) / sigma
                let (a, s) = alpha_sigma(&sched, Some(t));
                let eps: Vec<f32> = z.iter().zip(&x).map(|(&z, &x)| ((z as f64 - a * x as f64) / s) as f32).collect();
                let one = ddim(&sched, &z, &eps, t, t2, false);
                let scale = z2.iter().map(|v| v.abs()).fold(1f32, f32::max);
                for (p, q) in one.iter().zip(&z2) {
                    assert!((p - q).abs() < 1e-4 * scale, "t {t} -> {t2:?}: {p} vs {q}");
                }
            }
        }
    }

    #[test]
    fn the_objective_gradient_matches_finite_differences() {
        let sched = &schedules()[0];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (b, d) = (3, 5);
        let t = vec![999u32, 500, 20];
        let z = randn(&mut rng, b * d);
        let x = randn(&mut rng, b * d);
        let v = randn(&mut rng, b * d);
        let o = pd_objective(sched, &v, &z, &t, &x);
        for k in 0..b * d {
            let h = 1e-2f32;
            let (mut p, mut m) = (v.clone(), v.clone());
            p[k] += h;
            m[k] -= h;
            let fd = (pd_objective(sched, &p, &z, &t, &x).loss - pd_objective(sched, &m, &z, &t, &x).loss)
                / (2.0 * h as f64);
            let g = o.grad[k] as f64;
            assert!((fd - g).abs() <= 1e-3 * g.abs().max(1.0), "element {k}: {g} vs {fd}");
        }
        // a perfect prediction (x^ = x~) has zero loss
        let v_star: Vec<f32> = (0..b * d)
            .map(|k| {
                let (a, s) = alpha_sigma(sched, Some(t[k / d] as usize));
                ((a * z[k] as f64 - x[k] as f64) / s) as f32
            })
            .collect();
        assert!(pd_objective(sched, &v_star, &z, &t, &x).loss < 1e-6);
    }

    #[test]
    fn the_consistency_gradient_matches_finite_differences() {
        let sched = &schedules()[1];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let (b, d) = (3, 6);
        let t = vec![999u32, 300, 0];
        let (z, x, v) = (randn(&mut rng, b * d), randn(&mut rng, b * d), randn(&mut rng, b * d));
        for c in [0.0, 0.05] {
            let o = cd_objective(sched, &v, &z, &t, &x, c);
            for k in 0..b * d {
                let h = 1e-3f32;
                let (mut p, mut m) = (v.clone(), v.clone());
                p[k] += h;
                m[k] -= h;
                let fd = (cd_objective(sched, &p, &z, &t, &x, c).loss - cd_objective(sched, &m, &z, &t, &x, c).loss)
                    / (2.0 * h as f64);
                let g = o.grad[k] as f64;
                assert!((fd - g).abs() <= 2e-3 * g.abs().max(1e-2), "c {c}, element {k}: {g} vs {fd}");
            }
        }
    }

    #[test]
    fn halving_a_trailing_grid_keeps_every_other_step() {
        for t in [1000, 4000, 20] {
            for s in 1..=8usize {
                if 2 * s > t {
                    continue;
                }
                let (g, g2) = (grid(t, s), grid(t, 2 * s));
                assert_eq!(g.len(), s);
                for (j, &v) in g.iter().enumerate() {
                    assert_eq!(g2[2 * j], v, "T {t}, {s} -> {} steps", 2 * s);
                }
                // and a consistency student's grid of K steps lies on its teacher's grid of N = K m
                let g3 = grid(t, (3 * s).min(t));
                if (3 * s) <= t {
                    assert!(g.iter().all(|v| g3.contains(v)), "T {t}: {s} steps inside {}", 3 * s);
                }
            }
        }
    }
}
