//! Sampling that starts from or keeps an image: SDEdit's noised start, variations from one shared x_T,
//! interpolation of latents and of seeds' starts, and RePaint's inpainting with its resampling jumps.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::request::{InitImage, Inpaint, Request};
use super::steps::noise;
use crate::error::{Error, Result};
use crate::schedule::NoiseSchedule;

/// RePaint (Lugmayr et al. 2022, eq. 8): x_next = m x_next^known + (1 - m) x_next^unknown with
/// x_next^known ~ q(x_{t_next} | x0), and x0 itself after the last step.
pub(super) fn keep_known(
    x: &mut [f32],
    p: &Inpaint,
    sched: &NoiseSchedule,
    t_next: Option<usize>,
    rngs: &mut [ChaCha8Rng],
) {
    let per = p.x0.len();
    let hw = p.mask.len();
    let known: Vec<f32> = match t_next {
        Some(tn) => {
            let z = noise(rngs, per);
            z.chunks(per).flat_map(|z| sched.q_sample(&p.x0, tn, z)).collect()
        }
        None => p.x0.repeat(rngs.len()),
    };
    for (i, (v, k)) in x.iter_mut().zip(&known).enumerate() {
        let m = p.mask[i % per % hw];
        *v = m * k + (1.0 - m) * *v;
    }
}

/// Noises x at timestep `t_now` back up to the earlier (noisier) `t_back`: q(x_back | x_now) =
/// N(sqrt(a_bar_back / a_bar_now) x_now, (1 - a_bar_back / a_bar_now) I) (RePaint, Algorithm 1, line 13).
pub(super) fn renoise(
    sched: &NoiseSchedule,
    x: &[f32],
    t_now: usize,
    t_back: usize,
    rngs: &mut [ChaCha8Rng],
) -> Vec<f32> {
    let a = sched.alphas_cumprod[t_back] / sched.alphas_cumprod[t_now];
    let (c1, c2) = (a.sqrt() as f32, (1.0 - a).sqrt() as f32);
    let z = noise(rngs, x.len() / rngs.len());
    x.iter().zip(&z).map(|(x, z)| c1 * x + c2 * z).collect()
}

impl InitImage {
    /// The start image of image `i`.
    pub(super) fn image(&self, i: usize, per: usize) -> &[f32] {
        if self.x0.len() == per {
            &self.x0
        } else {
            &self.x0[i * per..(i + 1) * per]
        }
    }
}

/// Interpolation between two images through their diffused latents (Ho et al. 2020, sec. 4.3 and fig. 8):
/// both are noised by q(x_t | x0) to the timestep at `strength` with the same noise, and each of `frames` linear
/// mixes x_t = (1 - l) x_t(a) + l x_t(b), l evenly spaced in [0, 1], is denoised by the request's sampler. With
/// shared noise the mix of latents is the mix of images noised, so this sets `init` to the mixed images and
/// `share_xt`; frame 0 is exactly the image-to-image result of `a` with a shared x_t (and the last of `b`).
/// `strength` sets coarse (1: only the layout survives) to fine (small: pixel blends) (fig. 9). Every frame is
/// drawn with the request's first label.
pub fn interpolation(req: Request, a: &[f32], b: &[f32], strength: f32, frames: usize) -> Result<Request> {
    let mut req = frames_of(req, frames)?;
    if a.len() != b.len() {
        return Err(Error::request("init", "the two images differ in size"));
    }
    let mut x0 = Vec::with_capacity(frames * a.len());
    for f in 0..frames {
        let l = f as f32 / (frames - 1) as f32;
        x0.extend(a.iter().zip(b).map(|(a, b)| (1.0 - l) * a + l * b));
    }
    req.options.init = Some(InitImage { x0, strength });
    req.options.share_xt = true;
    Ok(req)
}

/// The request as `frames` frames of an interpolation (at least 2), every one with the request's first label.
pub(super) fn frames_of(mut req: Request, frames: usize) -> Result<Request> {
    if frames < 2 {
        return Err(Error::request("frames", format!("must be at least 2, got {frames}")));
    }
    req.n = frames;
    let cols = req.label_columns();
    if let Some(labels) = req.labels.as_mut().filter(|l| l.len() >= cols) {
        let first = labels[..cols].to_vec();
        *labels = (0..frames).flat_map(|_| first.iter().copied()).collect();
    }
    Ok(req)
}

/// The draw of x_T that `share_xt` gives every image of a request with this seed.
fn shared_noise(seed: u64, per: usize) -> Vec<f32> {
    let mut shared = ChaCha8Rng::seed_from_u64(seed);
    shared.set_stream(u64::MAX);
    noise(std::slice::from_mut(&mut shared), per)
}

/// Interpolation between the starts of two seeds (Song et al. 2020, sec. 5.3): frame l starts from the
/// spherical interpolation slerp(z_a, z_b, l) of the two seeds' shared x_T (the start `share_xt` gives a
/// request of that seed), so with a deterministic sampler (DDIM eta 0, DPM-Solver++) the first and last frames
/// are those seeds' images and the frames between change smoothly. Every frame has the request's first label.
pub fn seed_interpolation(req: Request, seed_a: u64, seed_b: u64, frames: usize) -> Result<Request> {
    let mut req = frames_of(req, frames)?;
    let per: usize = req.shape.iter().product();
    let (a, b) = (shared_noise(seed_a, per), shared_noise(seed_b, per));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let theta = (dot / (norm(&a) * norm(&b))).clamp(-1.0, 1.0).acos();
    let mut z = Vec::with_capacity(frames * per);
    for f in 0..frames {
        let l = f as f64 / (frames - 1) as f64;
        // slerp(a, b, l) = sin((1 - l) theta) / sin(theta) a + sin(l theta) / sin(theta) b (lerp when theta ~ 0)
        let (ca, cb) = if theta.sin().abs() < 1e-6 {
            (1.0 - l, l)
        } else {
            (((1.0 - l) * theta).sin() / theta.sin(), (l * theta).sin() / theta.sin())
        };
        z.extend(a.iter().zip(&b).map(|(x, y)| (ca * *x as f64 + cb * *y as f64) as f32));
    }
    req.start_noise = Some(z);
    req.options.seed = seed_a;
    Ok(req)
}

/// The start of the reverse process: x_T ~ N(0, I) per image (or one draw shared by all), or the init image
/// diffused to the first timestep (SDEdit, Meng et al. 2021: x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps).
pub(super) fn start(
    req: &Request,
    sched: &NoiseSchedule,
    ts: &[usize],
    rngs: &mut [ChaCha8Rng],
    first: usize,
    per: usize,
) -> Vec<f32> {
    // the per-image draws come first whatever the options, so the later draws of each stream stay in step
    let own = noise(rngs, per);
    let eps = if let Some(z) = &req.start_noise {
        z[first * per..(first + rngs.len()) * per].to_vec()
    } else if req.options.share_xt {
        shared_noise(req.options.seed, per).repeat(rngs.len())
    } else {
        own
    };
    match &req.options.init {
        Some(init) if init.strength < 1.0 => eps
            .chunks(per)
            .enumerate()
            .flat_map(|(i, e)| sched.q_sample(init.image(first + i, per), ts[0], e))
            .collect(),
        _ => eps,
    }
}
