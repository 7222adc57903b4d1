//! The samplers end to end against oracles that know the answer.

use super::editing::frames_of;
use super::*;
use crate::schedule::BetaSchedule;
use crate::schedule::VarianceType;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Knows the answer: returns the true eps for a fixed x0 (per image, chosen by label or index).
struct Oracle {
    sched: NoiseSchedule,
    x0: Vec<Vec<f32>>,
    calls: usize,
    batch_sizes: Vec<usize>,
}

impl Denoiser for Oracle {
    fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
        self.calls += 1;
        self.batch_sizes.push(shape[0]);
        let per = shape[1] * shape[2] * shape[3];
        let mut out = Vec::with_capacity(x.len());
        for i in 0..shape[0] {
            let which = y.map(|y| y[i] as usize).unwrap_or(0).min(self.x0.len() - 1);
            out.extend(self.sched.eps_from_x0(&x[i * per..(i + 1) * per], t[i] as usize, &self.x0[which]));
        }
        Ok(out)
    }
}

/// A deterministic denoiser whose answer depends on its input: x0 = half of the naive estimate
/// x_t / sqrt(a_bar_t).
struct Half(NoiseSchedule);

impl Denoiser for Half {
    fn eps(&mut self, x: &[f32], _: [usize; 4], t: &[i64], _: Option<&[i64]>) -> Result<Vec<f32>> {
        let t = t[0] as usize;
        let s = self.0.alphas_cumprod[t].sqrt() as f32;
        let x0: Vec<f32> = x.iter().map(|v| (0.5 * v / s).clamp(-1.0, 1.0)).collect();
        Ok(self.0.eps_from_x0(x, t, &x0))
    }
}

/// The oracle answering with the velocity v of its x0 instead of eps.
struct VOracle(Oracle);

impl Denoiser for VOracle {
    fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
        let eps = self.0.eps(x, shape, t, y)?;
        let per = eps.len() / shape[0];
        let sched = &self.0.sched;
        let mut out = Vec::with_capacity(eps.len());
        for (i, (e, x)) in eps.chunks(per).zip(x.chunks(per)).enumerate() {
            let x0 = sched.predict_x0_from_eps(x, t[i] as usize, e);
            out.extend(sched.v_from_eps(&x0, t[i] as usize, e));
        }
        Ok(out)
    }
    fn prediction(&self) -> Prediction {
        Prediction::V
    }
}

#[test]
fn a_v_predicting_model_samples_like_its_eps_twin() {
    for sched in [NoiseSchedule::new(BetaSchedule::LINEAR, 1000), NoiseSchedule::new(BetaSchedule::COSINE, 1000)] {
        for method in [
            Method::Ddim { steps: 10, eta: 0.0, spacing: Spacing::Trailing },
            Method::DpmSolverPP { steps: 10, spacing: Spacing::Trailing },
        ] {
            let req = Request::new(2, [1, 3, 4], method.clone());
            let eps = sample(&mut oracle(&sched, 12), &sched, &req, &mut |_| {}).unwrap();
            let v = sample(&mut VOracle(oracle(&sched, 12)), &sched, &req, &mut |_| {}).unwrap();
            assert!(max_err(&eps, &v) < 1e-3, "{method:?}: {}", max_err(&eps, &v));
            assert!(max_err(&v[..12], &oracle(&sched, 12).x0[0]) < 1e-2, "{method:?} finds x0");
        }
    }
}

fn oracle(sched: &NoiseSchedule, per: usize) -> Oracle {
    let a: Vec<f32> = (0..per).map(|i| ((i as f32) * 0.37).sin() * 0.8).collect();
    let b: Vec<f32> = (0..per).map(|i| ((i as f32) * 0.11).cos() * -0.5).collect();
    Oracle { sched: sched.clone(), x0: vec![a, b], calls: 0, batch_sizes: vec![] }
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn timestep_spacings() {
    assert_eq!(timesteps(1000, 4, Spacing::Leading).unwrap(), vec![750, 500, 250, 0]);
    assert_eq!(timesteps(1000, 4, Spacing::Trailing).unwrap(), vec![999, 749, 499, 249]);
    assert_eq!(timesteps(1000, 3, Spacing::Linspace).unwrap(), vec![999, 500, 0]);
    assert!(timesteps(10, 11, Spacing::Leading).is_err());
}

#[test]
fn ddim_eta0_recovers_x0() {
    for sched in [NoiseSchedule::new(BetaSchedule::LINEAR, 1000), NoiseSchedule::new(BetaSchedule::COSINE, 1000)] {
        let mut o = oracle(&sched, 12);
        for spacing in [Spacing::Leading, Spacing::Linspace, Spacing::Trailing] {
            let req = Request::new(3, [3, 2, 2], Method::Ddim { steps: 10, eta: 0.0, spacing });
            let out = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
            for img in out.chunks(12) {
                assert!(max_err(img, &o.x0[0]) < 1e-4, "{spacing:?}: {}", max_err(img, &o.x0[0]));
            }
        }
    }
}

#[test]
fn dpm_solver_and_ddim_with_noise_and_ddpm_recover_x0() {
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 200);
    let mut o = oracle(&sched, 8);
    for method in [
        Method::DpmSolverPP { steps: 20, spacing: Spacing::Trailing },
        Method::Ddim { steps: 50, eta: 1.0, spacing: Spacing::Leading },
        Method::Ddpm { steps: 200, spacing: Spacing::Trailing, variance: VarianceType::FixedSmall },
        Method::Ddpm { steps: 200, spacing: Spacing::Trailing, variance: VarianceType::FixedLarge },
        // respaced to 25 steps (Nichol & Dhariwal 2021, sec. 4)
        Method::Ddpm { steps: 25, spacing: Spacing::Linspace, variance: VarianceType::FixedLarge },
    ] {
        let req = Request::new(2, [2, 2, 2], method.clone());
        let out = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
        assert!(max_err(&out[..8], &o.x0[0]) < 2e-3, "{method:?}: {}", max_err(&out[..8], &o.x0[0]));
    }
}

#[test]
fn consistency_sampling_noises_each_x0_afresh_and_ends_on_it() {
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
    let mut o = oracle(&sched, 8);
    let mut seen = vec![];
    for steps in [1, 2, 4] {
        let req = Request::new(2, [2, 2, 2], Method::Consistency { steps, spacing: Spacing::Trailing });
        let mut xs = vec![];
        let out = sample(&mut o, &sched, &req, &mut |s| xs.push((s.t, s.x.to_vec(), s.x0.to_vec()))).unwrap();
        assert!(max_err(&out[..8], &o.x0[0]) < 1e-4, "{steps} steps: {}", max_err(&out[..8], &o.x0[0]));
        // between the steps, x is x0 noised to the next timestep: sqrt(a) x0 + sqrt(1 - a) z, z ~ N(0, 1)
        for w in xs.windows(2) {
            let a = sched.alphas_cumprod[w[1].0] as f32;
            let z: Vec<f32> =
                w[0].1.iter().zip(&w[0].2).map(|(x, x0)| (x - a.sqrt() * x0) / (1.0 - a).sqrt()).collect();
            assert!(z.iter().all(|v| v.abs() < 6.0) && z.iter().any(|v| v.abs() > 1e-3), "{steps} steps: {z:?}");
            seen.push(z);
        }
    }
    assert_eq!(seen.len(), 1 + 3);
}

/// An oracle that also returns a constant v, as a model with a learned variance does.
struct WithV(Oracle, f32);

impl Denoiser for WithV {
    fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
        self.0.eps(x, shape, t, y)
    }
    fn eps_and_v(
        &mut self,
        x: &[f32],
        shape: [usize; 4],
        t: &[i64],
        y: Option<&[i64]>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        Ok((self.0.eps(x, shape, t, y)?, Some(vec![self.1; x.len()])))
    }
}

#[test]
fn ddpm_step_mean_and_variance_match_the_closed_forms() {
    // One DDPM step at t from the sampler's own x_T, over 20,000 pixels: the residual against the
    // posterior mean mu~(x0, x_t) (Ho et al. 2020, eq. 7) has mean 0 and the chosen variance, on the
    // original chain (all t + 1 steps) and on the chain respaced to 4 steps, where the variances are
    // those of the respaced betas (Nichol & Dhariwal 2021, sec. 4) and a learned v = 0.5 sits 3/4 of the
    // way from log beta-tilde to log beta (eq. 15).
    let t = 300;
    let sub = NoiseSchedule::from_betas(BetaSchedule::LINEAR.betas(1000)[..=t].to_vec());
    let per = 20_000;
    let fixed = [VarianceType::FixedSmall, VarianceType::FixedLarge];
    let cases = fixed
        .iter()
        .map(|&v| (t + 1, v))
        .chain(fixed.iter().map(|&v| (4, v)))
        .chain([(4, VarianceType::LearnedRange), (t + 1, VarianceType::LearnedRange)]);
    for (steps, variance) in cases {
        let mut o = WithV(oracle(&sub, per), 0.5);
        let mut req = Request::new(1, [1, 1, per], Method::Ddpm { steps, spacing: Spacing::Trailing, variance });
        req.options.seed = 5;
        let ts = req.timesteps(t + 1).unwrap();
        assert_eq!(ts[0], t);
        let mut second: Option<Vec<f32>> = None;
        sample(&mut o, &sub, &req, &mut |s| {
            if s.step == 0 {
                second = Some(s.x.to_vec());
            }
        })
        .unwrap();
        let mut r = ChaCha8Rng::seed_from_u64(5);
        r.set_stream(0);
        let x_t: Vec<f32> = (0..per).map(|_| -> f32 { StandardNormal.sample(&mut r) }).collect();
        let chain = sub.respaced(&ts);
        let top = chain.num_timesteps() - 1;
        let mean = chain.posterior_mean(&o.0.x0[0], &x_t, top);
        let var = match variance {
            VarianceType::LearnedRange => {
                (0.75 * chain.betas[top].ln() + 0.25 * chain.posterior_variance[top].ln()).exp()
            }
            v => chain.reverse_variance(top, v).unwrap(),
        };
        if steps == t + 1 {
            // the original chain: the respaced betas are the betas
            assert!((chain.betas[top] / sub.betas[t] - 1.0).abs() < 1e-9);
        } else {
            assert!(chain.betas[top] > 10.0 * sub.betas[t], "{steps} steps");
        }
        let resid: Vec<f64> = second.unwrap().iter().zip(&mean).map(|(a, m)| (*a - *m) as f64).collect();
        let m = resid.iter().sum::<f64>() / per as f64;
        let v = resid.iter().map(|r| (r - m).powi(2)).sum::<f64>() / per as f64;
        assert!(m.abs() < 4.0 * (var / per as f64).sqrt(), "{variance:?} {steps}: residual mean {m}");
        assert!((v / var - 1.0).abs() < 0.05, "{variance:?} {steps}: variance {v} vs {var}");
    }
    // a learned variance needs the model's v
    let mut o = oracle(&sub, 4);
    let req = Request::new(
        1,
        [1, 1, 4],
        Method::Ddpm { steps: 4, spacing: Spacing::Trailing, variance: VarianceType::LearnedRange },
    );
    let e = sample(&mut o, &sub, &req, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("gave no v"), "{e}");
    // DDIM and DPM-Solver++ take eps alone from a learned-variance model
    let mut o = WithV(oracle(&sub, 4), 0.5);
    let req = Request::new(1, [1, 1, 4], Method::DpmSolverPP { steps: 10, spacing: Spacing::Trailing });
    assert!(max_err(&sample(&mut o, &sub, &req, &mut |_| {}).unwrap(), &o.0.x0[0]) < 2e-3);
}

#[test]
fn guidance_zero_is_the_conditional_output_and_calls_are_batched() {
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
    let mut o = oracle(&sched, 4);
    let mut req = Request::new(4, [1, 2, 2], Method::Ddim { steps: 5, eta: 0.0, spacing: Spacing::Leading });
    req.labels = Some(vec![1, 1, 1, 1]);
    req.null_class = Some(2);
    let plain = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
    assert!(max_err(&plain[..4], &o.x0[1]) < 1e-4);
    o.batch_sizes.clear();
    req.guidance = 3.0;
    let guided = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
    // one call of 2x the batch per step: conditional and unconditional halves together
    assert_eq!(o.batch_sizes, vec![8; 5]);
    // the oracle's null-class answer is image 1 too (index clamps), so guidance is a no-op here
    assert!(max_err(&guided, &plain) < 1e-4);
    req.guidance = 0.0;
    o.batch_sizes.clear();
    let again = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
    assert_eq!(again, plain);
    assert_eq!(o.batch_sizes, vec![4; 5]);
}

/// A guidance-distilled model: w is its input; it records each call's batch, labels and weights, and answers
/// eps = w + 0.1 y at every pixel.
#[derive(Default)]
struct TakesW(Vec<(usize, Vec<i64>, Vec<f32>)>);
impl Denoiser for TakesW {
    fn eps(&mut self, _: &[f32], _: [usize; 4], _: &[i64], _: Option<&[i64]>) -> Result<Vec<f32>> {
        panic!("a guidance-input model is asked through eps_w")
    }
    fn guidance_input(&self) -> bool {
        true
    }
    fn eps_w(&mut self, x: &[f32], shape: [usize; 4], _: &[i64], y: Option<&[i64]>, w: &[f32]) -> Result<Vec<f32>> {
        let y = y.expect("labels").to_vec();
        self.0.push((shape[0], y.clone(), w.to_vec()));
        let per = x.len() / shape[0];
        Ok(y.iter().zip(w).flat_map(|(&l, &w)| vec![w + 0.1 * l as f32; per]).collect())
    }
}

#[test]
fn a_guidance_input_model_is_asked_once_per_step_with_w_and_the_conditional_labels() {
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
    let mut req = Request::new(3, [1, 2, 2], Method::Ddim { steps: 4, eta: 0.0, spacing: Spacing::Trailing });
    req.labels = Some(vec![7, 1, 7]);
    req.null_class = Some(10);
    req.guidance = 2.5;
    let mut den = TakesW::default();
    let x = vec![0.0; 12];
    let (eps, _) = Guided::new(&mut den, &sched, &req).eps(&x, 3, 50, req.labels.as_deref(), false).unwrap();
    // one call of the 3 images (no null half), their own labels, w = the request's guidance
    assert_eq!(den.0, vec![(3, vec![7, 1, 7], vec![2.5; 3])]);
    assert!(max_err(&eps[..4], &[3.2; 4]) < 1e-6 && max_err(&eps[4..8], &[2.6; 4]) < 1e-6);
    // a whole run: one call per step; no guidance means w = 0
    den.0.clear();
    req.guidance = 0.0;
    sample(&mut den, &sched, &req, &mut |_| {}).unwrap();
    assert_eq!(den.0.len(), 4);
    assert!(den.0.iter().all(|(n, _, w)| *n == 3 && w == &vec![0.0; 3]));
}

/// eps = 0.1 y_0 + 0.01 y_1 at every pixel: each label's share is known, so the composition can be checked.
struct Labelled(Vec<usize>);
impl Denoiser for Labelled {
    fn eps(&mut self, x: &[f32], shape: [usize; 4], _t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
        let y = y.expect("labels");
        let per = x.len() / shape[0];
        assert_eq!(y.len(), 2 * shape[0], "two labels per image");
        self.0.push(shape[0]);
        Ok(y.chunks(2).flat_map(|l| vec![0.1 * l[0] as f32 + 0.01 * l[1] as f32; per]).collect())
    }
}

#[test]
fn attributes_are_guided_by_composing_one_conditional_per_label() {
    let mut req = Request::new(2, [1, 1, 2], Method::Ddim { steps: 5, eta: 0.0, spacing: Spacing::Leading });
    // nulls: class 5, attribute 3; image 0: class 2, attribute 1; image 1: class 4, attribute unknown
    req.labels = Some(vec![2, 1, 4, 3]);
    req.null_class = Some(5);
    req.guidance = 1.0;
    req.attributes = vec![AttrCond { null: 3, guidance: 3.0 }];
    let mut den = Labelled(vec![]);
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
    let x = vec![0.0; 4];
    let (eps, v) = Guided::new(&mut den, &sched, &req).eps(&x, 2, 10, req.labels.as_deref(), false).unwrap();
    // one call of 3 x 2 rows: null, class alone, attribute alone
    assert_eq!((den.0.clone(), v), (vec![6], None));
    // Liu et al. eq. 10: eps(null) + (1 + w_c)(eps(c) - eps(null)) + (1 + w_a)(eps(a) - eps(null))
    let null = 0.1 * 5.0 + 0.01 * 3.0;
    let img0 = null + 2.0 * (0.1 * (2.0 - 5.0)) + 4.0 * (0.01 * (1.0 - 3.0));
    let img1 = null + 2.0 * (0.1 * (4.0 - 5.0));
    assert!(max_err(&eps, &[img0, img0, img1, img1]) < 1e-6, "{eps:?}");
    // unguided: every label at once, one evaluation per image
    (req.guidance, req.attributes[0].guidance) = (0.0, 0.0);
    let (eps, _) = Guided::new(&mut den, &sched, &req).eps(&x, 2, 10, req.labels.as_deref(), false).unwrap();
    assert_eq!(den.0.last(), Some(&2));
    assert!(max_err(&eps, &[0.21, 0.21, 0.43, 0.43]) < 1e-6, "{eps:?}");
    // the labels of a chunk are whole images, and an interpolation repeats the first image's pair
    req.options.batch = 1;
    sample(&mut den, &NoiseSchedule::new(BetaSchedule::LINEAR, 100), &req, &mut |_| {}).unwrap();
    assert_eq!(req.class_labels(), Some(vec![2, 4]));
    let frames = frames_of(req.clone(), 3).unwrap();
    assert_eq!(frames.labels, Some(vec![2, 1, 2, 1, 2, 1]));
    req.labels = Some(vec![2, 1, 4]);
    assert!(req.validate().unwrap_err().to_string().contains("3 labels for 2 images (2 per image)"));
    req.labels = None;
    assert!(req.validate().unwrap_err().to_string().contains("attributes"));
}

#[test]
fn a_guidance_interval_guides_only_its_timesteps() {
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
    let mut o = oracle(&sched, 4);
    // leading spacing, 5 steps: t = 80, 60, 40, 20, 0
    let mut req = Request::new(4, [1, 2, 2], Method::Ddim { steps: 5, eta: 0.0, spacing: Spacing::Leading });
    req.labels = Some(vec![1, 1, 1, 1]);
    req.null_class = Some(2);
    req.guidance = 2.0;
    req.options.guidance_interval = Some("20,60".parse().unwrap());
    sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
    assert_eq!(o.batch_sizes, vec![4, 8, 8, 8, 4]);
    o.batch_sizes.clear();
    req.options.guidance_interval = Some(GuidanceInterval { lo: 0, hi: 99 });
    sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
    assert_eq!(o.batch_sizes, vec![8; 5]);
    o.batch_sizes.clear();
    req.options.guidance_interval = Some(GuidanceInterval { lo: 81, hi: 99 });
    sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
    assert_eq!(o.batch_sizes, vec![4; 5]);
    req.options.guidance_interval = Some(GuidanceInterval { lo: 60, hi: 20 });
    let e = sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { field: "guidance_interval", .. }), "{e}");
    assert_eq!("100, 700".parse::<GuidanceInterval>().unwrap(), GuidanceInterval { lo: 100, hi: 700 });
    assert_eq!(GuidanceInterval { lo: 100, hi: 700 }.to_string(), "100,700");
    for bad in ["700,100", "100", "a,b", "-1,5", ""] {
        assert!(bad.parse::<GuidanceInterval>().is_err(), "{bad:?}");
    }
}

#[test]
fn chunked_equals_unchunked_and_seeds_are_reproducible() {
    let sched = NoiseSchedule::new(BetaSchedule::COSINE, 50);
    let mut o = oracle(&sched, 4);
    let mut req = Request::new(7, [1, 2, 2], Method::Ddim { steps: 10, eta: 1.0, spacing: Spacing::Leading });
    req.options.clip_x0 = false;
    req.options.batch = 7;
    let whole = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
    req.options.batch = 3;
    let chunked = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
    assert_eq!(whole, chunked);
    assert_eq!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap(), chunked);
    req.options.seed = 1;
    assert_ne!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap(), chunked);
}

#[test]
fn names_and_settings_are_checked_with_the_field_named() {
    assert_eq!("dpmpp".parse::<SamplerKind>().unwrap(), SamplerKind::DpmSolverPP);
    assert_eq!(SamplerKind::DpmSolverPP.to_string(), "dpm++");
    let e = "euler".parse::<SamplerKind>().unwrap_err().to_string();
    assert_eq!(e, "unknown sampler 'euler' (expected one of: ddim, ddpm, dpm++, consistency)");
    let v = VarianceType::FixedSmall;
    let e = Method::new(SamplerKind::Ddim, 0, 0.0, Spacing::Trailing, v, 1000).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { field: "steps", .. }), "{e}");
    assert_eq!(e.cli_message(), "--steps must be in 1..=1000 for this model, got 0");
    let e = Method::new(SamplerKind::Ddim, 10, 1.5, Spacing::Trailing, v, 1000).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { field: "eta", .. }), "{e}");
    // DDPM runs `steps` of the chain, respaced; all T is the original chain
    let m = Method::new(SamplerKind::Ddpm, 10, 0.0, Spacing::Trailing, v, 10).unwrap();
    assert_eq!(m.timesteps(10).unwrap().len(), 10);
    assert_eq!(m.kind(), SamplerKind::Ddpm);
    assert_eq!(
        Method::new(SamplerKind::Ddpm, 4, 0.0, Spacing::Trailing, v, 10).unwrap().timesteps(10).unwrap(),
        [9, 7, 4, 2]
    );
    let e = Method::new(SamplerKind::Ddpm, 11, 0.0, Spacing::Trailing, v, 10).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { field: "steps", .. }), "{e}");
}

#[test]
fn dpm_solver_uses_the_second_order_correction_except_where_the_order_rule_says() {
    // One image through 4 steps: with the oracle's exact eps every order lands on x0, so use a denoiser
    // whose x0 estimate drifts with t; then DPM-Solver++(2M) must differ from the first-order (DDIM) path
    // exactly from its second step on, and its final-step rule must make steps 3 -> 4 first order.
    struct Drift(NoiseSchedule);
    impl Denoiser for Drift {
        fn eps(&mut self, x: &[f32], _: [usize; 4], t: &[i64], _: Option<&[i64]>) -> Result<Vec<f32>> {
            let x0: Vec<f32> = vec![t[0] as f32 / 1000.0; x.len()];
            Ok(self.0.eps_from_x0(x, t[0] as usize, &x0))
        }
    }
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
    let run = |method: Method| {
        let mut xs = vec![];
        let req = Request::new(1, [1, 1, 4], method);
        sample(&mut Drift(sched.clone()), &sched, &req, &mut |s| xs.push(s.x.to_vec())).unwrap();
        xs
    };
    let dpm = run(Method::DpmSolverPP { steps: 4, spacing: Spacing::Trailing });
    let ddim = run(Method::Ddim { steps: 4, eta: 0.0, spacing: Spacing::Trailing });
    // the first step is first order: DDIM's step (the same formula written differently: within rounding)
    assert!(max_err(&dpm[0], &ddim[0]) < 1e-6, "{}", max_err(&dpm[0], &ddim[0]));
    assert!(max_err(&dpm[1], &ddim[1]) > 1e-4, "the second step uses the previous x0");
    // the step onto the final timestep (499 -> 249) is first order: the DDIM step from the same x_t
    let (a_t, a_n) = (sched.alphas_cumprod[499], sched.alphas_cumprod[249]);
    let first: Vec<f32> = dpm[1]
        .iter()
        .map(|&x| {
            let eps = (x as f64 - a_t.sqrt() * 0.499) / (1.0 - a_t).sqrt();
            (a_n.sqrt() * 0.499 + (1.0 - a_n).sqrt() * eps) as f32
        })
        .collect();
    assert!(max_err(&dpm[2], &first) < 1e-5, "{}", max_err(&dpm[2], &first));
    // the last step returns the predicted x0 in both
    assert!(max_err(&dpm[3], &[0.249; 4]) < 1e-6 && max_err(&ddim[3], &[0.249; 4]) < 1e-6);
}

#[test]
fn sdedit_strength_0_returns_the_image_1_is_plain_sampling_and_between_runs_part_of_the_steps() {
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
    let mut o = oracle(&sched, 4);
    let image: Vec<f32> = vec![0.5, -0.25, 0.0, 1.0];
    let method = Method::DpmSolverPP { steps: 10, spacing: Spacing::Trailing };
    let mut req = Request::new(3, [1, 2, 2], method);
    req.options.seed = 4;
    let plain = sample(&mut o, &sched, &req, &mut |_| {}).unwrap();
    for (strength, calls) in [(0.0, 0), (0.5, 5), (1.0, 10)] {
        req.options.init = Some(InitImage { x0: image.clone(), strength });
        o.calls = 0;
        let mut seen = 0;
        let out = sample(&mut o, &sched, &req, &mut |s| {
            assert_eq!(s.num_steps, calls);
            seen += 1;
        })
        .unwrap();
        assert_eq!((o.calls, seen), (calls, calls), "strength {strength}");
        match strength {
            0.0 => assert_eq!(out, image.repeat(3)),
            1.0 => assert_eq!(out, plain),
            // from t = 499 the oracle still pulls every image to its own x0
            _ => assert!(max_err(&out[..4], &o.x0[0]) < 1e-4),
        }
    }
    // the half-way start is the image noised to the first visited timestep
    req.options.init = Some(InitImage { x0: image.clone(), strength: 0.5 });
    assert_eq!(req.timesteps(1000).unwrap()[0], 499);
    let mut first_x0 = vec![];
    sample(&mut o, &sched, &req, &mut |s| {
        if s.step == 0 {
            first_x0 = s.x0[..4].to_vec();
        }
    })
    .unwrap();
    assert!(max_err(&first_x0, &o.x0[0]) < 1e-4, "the oracle sees x_499 and predicts its own x0");
    req.options.init = Some(InitImage { x0: image.clone(), strength: 1.5 });
    let e = sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { field: "strength", .. }), "{e}");
    req.options.init = Some(InitImage { x0: vec![0.0; 3], strength: 0.5 });
    assert!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().to_string().contains("has 3 values"));
}

#[test]
fn sample_chunks_draws_what_sample_draws_in_memory_that_does_not_grow_with_n() {
    use crate::fuzz::peak_memory;
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
    let per = 28 * 28;
    let run = |n: usize| {
        let mut req = Request::new(n, [1, 28, 28], Method::Ddim { steps: 2, eta: 0.0, spacing: Spacing::Trailing });
        req.options.batch = 16;
        let mut sums = vec![0f64; n];
        let ((), peak) = peak_memory(|| {
            sample_chunks(&mut Half(sched.clone()), &sched, &req, &mut |_| {}, &mut |first, x| {
                for (i, img) in x.chunks(per).enumerate() {
                    sums[first + i] = img.iter().map(|v| *v as f64).sum();
                }
                Ok(())
            })
            .unwrap()
        });
        (req, sums, peak)
    };
    let (req, sums, small) = run(64);
    let whole = sample(&mut Half(sched.clone()), &sched, &req, &mut |_| {}).unwrap();
    let want: Vec<f64> = whole.chunks(per).map(|img| img.iter().map(|v| *v as f64).sum()).collect();
    assert_eq!(sums, want, "chunks are the images of `sample`");
    // 64x more images: the same working memory (one chunk's), beyond the caller's 8 bytes per image
    let (_, _, large) = run(4096);
    assert!(large < small + small / 2 + 4096 * 8, "peak {large} bytes for 4,096 images, {small} for 64");
    // the collecting form holds them all (the probe sees growth where there is growth)
    let mut req = req;
    req.n = 4096;
    let ((), all) = peak_memory(|| drop(sample(&mut Half(sched.clone()), &sched, &req, &mut |_| {}).unwrap()));
    assert!(all >= 4096 * per * 4, "{all}");
}

#[test]
fn a_shared_x_t_gives_one_start_for_every_image_and_does_not_depend_on_chunks() {
    // a denoiser that predicts x0 = 0 keeps DDIM (eta 0) a deterministic function of the start
    struct Zero(NoiseSchedule);
    impl Denoiser for Zero {
        fn eps(&mut self, x: &[f32], _: [usize; 4], t: &[i64], _: Option<&[i64]>) -> Result<Vec<f32>> {
            Ok(self.0.eps_from_x0(x, t[0] as usize, &vec![0.0; x.len()]))
        }
    }
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
    let mut req = Request::new(5, [1, 1, 3], Method::Ddim { steps: 5, eta: 0.0, spacing: Spacing::Trailing });
    req.options.clip_x0 = false;
    let first_step = |req: &Request| {
        let mut xs = vec![];
        sample(&mut Zero(sched.clone()), &sched, req, &mut |s| {
            if s.step == 0 {
                xs.extend_from_slice(s.x);
            }
        })
        .unwrap();
        xs
    };
    let own = first_step(&req);
    assert_ne!(own[..3], own[3..6], "each image has its own noise");
    req.options.share_xt = true;
    req.options.batch = 2;
    let shared = first_step(&req);
    assert!(shared.chunks(3).all(|c| c == &shared[..3]), "{shared:?}");
    req.options.batch = 5;
    assert_eq!(first_step(&req), shared);
}

#[test]
fn inpainting_keeps_the_known_pixels_and_resampling_redoes_blocks_of_steps() {
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 200);
    let mut o = oracle(&sched, 8);
    // 2 channels of 2x2: the left column is known
    let known: Vec<f32> = vec![0.9, -0.4, 0.3, 0.1, -0.7, 0.6, 0.2, -0.2];
    let mask = vec![1.0, 0.0, 1.0, 0.0];
    for method in [
        Method::DpmSolverPP { steps: 12, spacing: Spacing::Trailing },
        Method::Ddim { steps: 12, eta: 0.5, spacing: Spacing::Leading },
    ] {
        for (resample, jump, calls) in [(1, 1, 12), (3, 4, 12 + 2 * 4 * 2)] {
            let mut req = Request::new(2, [2, 2, 2], method.clone());
            req.options.inpaint = Some(Inpaint { x0: known.clone(), mask: mask.clone(), resample, jump });
            o.calls = 0;
            let mut seen = vec![];
            let out = sample(&mut o, &sched, &req, &mut |s| seen.push((s.step, s.num_steps))).unwrap();
            assert_eq!(o.calls, calls, "{method:?} r={resample}");
            assert_eq!(seen.last(), Some(&(calls - 1, calls)));
            for img in out.chunks(8) {
                for (i, v) in img.iter().enumerate() {
                    // known pixels are the image's; the others come from the model (the oracle's x0)
                    let want = if mask[i % 4] == 1.0 { known[i] } else { o.x0[0][i] };
                    assert!((v - want).abs() < 1e-3, "{method:?} r={resample} pixel {i}: {v} vs {want}");
                }
            }
        }
    }
    let mut req = Request::new(
        1,
        [2, 2, 2],
        Method::Ddpm { steps: 200, spacing: Spacing::Trailing, variance: VarianceType::FixedSmall },
    );
    req.options.inpaint = Some(Inpaint { x0: known.clone(), mask: vec![1.0; 3], resample: 1, jump: 1 });
    let e = sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { field: "mask", .. }), "{e}");
}

#[test]
fn interpolation_frames_end_at_the_two_images_own_image_to_image_results() {
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 1000);
    let (a, b) = (vec![0.8f32, -0.6, 0.2, 0.0], vec![-0.5f32, 0.5, 0.9, -0.9]);
    let mut base = Request::new(1, [1, 2, 2], Method::Ddim { steps: 20, eta: 0.0, spacing: Spacing::Trailing });
    base.options.seed = 3;
    base.options.batch = 2;
    let req = interpolation(base.clone(), &a, &b, 0.6, 5).unwrap();
    let frames = sample(&mut Half(sched.clone()), &sched, &req, &mut |_| {}).unwrap();
    assert_eq!(frames.len(), 5 * 4);
    let alone = |x0: &[f32]| {
        let mut r = base.clone();
        (r.options.init, r.options.share_xt) = (Some(InitImage { x0: x0.to_vec(), strength: 0.6 }), true);
        sample(&mut Half(sched.clone()), &sched, &r, &mut |_| {}).unwrap()
    };
    assert_eq!(frames[..4], alone(&a)[..]);
    assert_eq!(frames[16..], alone(&b)[..]);
    assert!(max_err(&frames[8..12], &frames[..4]) > 1e-3 && max_err(&frames[8..12], &frames[16..]) > 1e-3);
    assert!(interpolation(base.clone(), &a, &b, 0.6, 1).unwrap_err().to_string().contains("frames"));
}

#[test]
fn seed_interpolation_starts_at_the_two_seeds_shared_starts() {
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 100);
    let base = Request::new(1, [1, 3, 3], Method::DpmSolverPP { steps: 8, spacing: Spacing::Trailing });
    let req = seed_interpolation(base.clone(), 7, 8, 6).unwrap();
    let z = req.start_noise.clone().unwrap();
    // slerp keeps the norm of two independent draws roughly (a lerp would shrink the middle)
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm(&z[18..27]) / norm(&z[..9]) - 1.0).abs() < 0.5, "{} vs {}", norm(&z[18..27]), norm(&z[..9]));
    let frames = sample(&mut Half(sched.clone()), &sched, &req, &mut |_| {}).unwrap();
    for (seed, frame) in [(7, &frames[..9]), (8, &frames[45..])] {
        let mut r = base.clone();
        (r.options.seed, r.options.share_xt) = (seed, true);
        assert_eq!(sample(&mut Half(sched.clone()), &sched, &r, &mut |_| {}).unwrap(), frame);
    }
}

#[test]
fn bad_requests_are_refused() {
    let sched = NoiseSchedule::new(BetaSchedule::LINEAR, 10);
    let mut o = oracle(&sched, 4);
    let ddpm = Method::Ddpm { steps: 10, spacing: Spacing::Trailing, variance: VarianceType::FixedSmall };
    let req = Request::new(0, [1, 2, 2], ddpm.clone());
    assert!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().to_string().contains("at least 1"));
    let mut req = Request::new(1, [1, 2, 2], ddpm);
    req.guidance = 2.0;
    assert!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().to_string().contains("guidance"));
    req.guidance = f32::NAN;
    let e = sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { field: "guidance", .. }), "{e}");
    req.guidance = 0.0;
    req.options.batch = 0;
    assert_eq!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().cli_message(), "--batch must be at least 1");
    req.options.batch = 1;
    req.labels = Some(vec![0, 1]);
    assert!(sample(&mut o, &sched, &req, &mut |_| {}).unwrap_err().to_string().contains("2 labels for 1 images"));
}

#[test]
fn a_raised_cancel_stops_the_run_before_its_next_model_call() {
    let sched = NoiseSchedule::new(BetaSchedule::COSINE, 1000);
    let mut req = Request::new(2, [1, 3, 4], Method::DpmSolverPP { steps: 10, spacing: Spacing::Trailing });
    let cancel = Cancel::new();
    req.options.cancel = Some(cancel.clone());
    let mut model = oracle(&sched, 12);
    let e = sample(&mut model, &sched, &req, &mut |s| {
        if s.step == 2 {
            cancel.cancel();
        }
    })
    .unwrap_err();
    assert!(matches!(e, Error::Cancelled), "{e}");
    assert_eq!(model.calls, 3, "steps 0, 1 and 2 ran, step 3 did not");
    // a flag that stays down changes nothing
    req.options.cancel = Some(Cancel::new());
    let plain = Request { options: SampleOptions { cancel: None, ..req.options.clone() }, ..req.clone() };
    assert_eq!(
        sample(&mut oracle(&sched, 12), &sched, &req, &mut |_| {}).unwrap(),
        sample(&mut oracle(&sched, 12), &sched, &plain, &mut |_| {}).unwrap()
    );
}
