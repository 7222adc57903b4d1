//! Progressive distillation on a tiny net: after fitting, the student's one DDIM step reproduces the guided
//! teacher's two, for every guidance weight it was given.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runtime::schedule::{BetaSchedule, NoiseSchedule, ScheduleKind};

use super::targets::{alpha_sigma, ddim, grid, pd_objective, pd_target};
use super::teacher::{Kind, Teacher};
use crate::model::params::{InitSource, ParamSource, TensorSource};
use crate::model::tape::{Pool, Tape};
use crate::model::unet::{UNet, UNetConfig};
use crate::train::optim::AdamW;

fn tiny(guidance_embed: bool, prediction: runtime::metadata::Prediction) -> UNetConfig {
    UNetConfig {
        channels: 1,
        image_size: 8,
        ch: 8,
        ch_mult: vec![1],
        num_res_blocks: 1,
        attention_resolutions: vec![],
        num_heads: 1,
        dropout: 0.0,
        use_scale_shift_norm: true,
        num_classes: 2,
        attributes: vec![],
        guidance_embed,
        norm_groups: 4,
        kernel_size: 3,
        embed_dim: None,
        learn_sigma: false,
        prediction,
    }
}

/// The student's v for fixed inputs, on a fresh tape.
fn student_v(unet: &UNet, pool: &mut Pool, z: &[f32], t: &[u32], y: &[u32], w: &[f32]) -> Vec<f32> {
    let b = t.len();
    let mut tape = Tape::new(pool, None);
    let xs = tape.input(z, &[b, 1, 8, 8]).unwrap();
    let ts = tape.input(&t.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[b]).unwrap();
    let ys = tape.input(&y.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[b]).unwrap();
    let ws = tape.input(w, &[b]).unwrap();
    let out = unet.forward_w(&mut tape, &xs, &ts, Some(&ys), Some(&ws)).unwrap();
    tape.data(out).to_vec()
}

/// A tiny guided teacher with every weight drawn from `seed` (zero-initialised output layers would make eps = 0),
/// and its student: the same weights plus a zero guidance embedding, predicting v, with an optimiser over its variables.
fn teacher_and_student(seed: u64) -> (Teacher, UNet, AdamW) {
    use runtime::metadata::Prediction;
    let dev = Device::Cpu;
    let mut src = InitSource::new(3, &dev, DType::F32);
    UNet::new(tiny(false, Prediction::Epsilon), &mut src).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, (k, v)) in src.into_vars().iter().enumerate() {
        let shift = if i % 3 == 0 { 0.2 } else { 0.0 };
        let values: Vec<f32> = (0..v.elem_count())
            .map(|_| 0.3 * rand_distr::Distribution::<f32>::sample(&rand_distr::StandardNormal, &mut rng) + shift)
            .collect();
        tensors.insert(k.clone(), Tensor::from_vec(values, v.dims(), &dev).unwrap());
    }
    let teacher_net = {
        let mut s = TensorSource::new(&tensors, "teacher");
        UNet::new(tiny(false, Prediction::Epsilon), &mut s as &mut dyn ParamSource).unwrap()
    };
    let teacher = Teacher::new(teacher_net, Kind::Original { interval: None });
    super::add_guidance_layer(&mut tensors, 8, &dev).unwrap();
    let mut s = TensorSource::new(&tensors, "student").as_vars();
    let student = UNet::new(tiny(true, Prediction::V), &mut s).unwrap();
    let vars = s.finish().unwrap();
    let opt = AdamW::new(&vars, 0.9, 0.999, 1e-8, 0.0).unwrap();
    (teacher, student, opt)
}

#[test]
fn the_students_one_step_reproduces_two_guided_teacher_steps_after_fitting() {
    let sched = NoiseSchedule::new(BetaSchedule::named(ScheduleKind::Linear, 100), 100);
    let (mut teacher, student, mut opt) = teacher_and_student(1);

    // fixed inputs on the 2-step grid (t in {99, 49}); the teacher's 4-step grid gives the midpoints. The teacher's
    // x0 is clipped as at sampling: a random net's eps is no noise estimate, and x0 = (z - sigma eps) / alpha_99
    // would be ~150 times it
    let (g, g2) = (grid(100, 2), grid(100, 4));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let n = 64;
    let b = 8;
    let z: Vec<f32> =
        (0..b * n).map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng)).collect();
    let j: Vec<usize> = (0..b).map(|i| i % 2).collect();
    let t: Vec<u32> = j.iter().map(|&j| g[j] as u32).collect();
    let t1: Vec<u32> = j.iter().map(|&j| g2[2 * j + 1] as u32).collect();
    let t2: Vec<Option<usize>> = j.iter().map(|&j| g.get(j + 1).copied()).collect();
    let y: Vec<u32> = (0..b).map(|i| [0, 1, 2, 0][i % 4]).collect(); // 2 is the null class
    let w: Vec<f32> = (0..b).map(|i| [0.0, 1.5, 3.0][i % 3]).collect();
    let dims = [b, 1, 8, 8];
    let e1 = teacher.guided_eps(&sched, &z, dims, &t, &y, &w, 2).unwrap();
    let mut z1 = vec![];
    for i in 0..b {
        z1.extend(ddim(
            &sched,
            &z[i * n..(i + 1) * n],
            &e1[i * n..(i + 1) * n],
            t[i] as usize,
            Some(t1[i] as usize),
            true,
        ));
    }
    let e2 = teacher.guided_eps(&sched, &z1, dims, &t1, &y, &w, 2).unwrap();
    let (mut z2, mut x_target) = (vec![], vec![]);
    for i in 0..b {
        let r = i * n..(i + 1) * n;
        let two = ddim(&sched, &z1[r.clone()], &e2[r.clone()], t1[i] as usize, t2[i], true);
        x_target.extend(pd_target(&sched, &z[r], t[i] as usize, &two, t2[i]));
        z2.extend(two);
    }

    // the student's one DDIM step against the teacher's two, as a fraction of the latter's size
    let one_step_error = |unet: &UNet, pool: &mut Pool| -> f32 {
        let v = student_v(unet, pool, &z, &t, &y, &w);
        let mut worst = 0f32;
        for i in 0..b {
            let r = i * n..(i + 1) * n;
            let (a, s) = alpha_sigma(&sched, Some(t[i] as usize));
            let x: Vec<f32> =
                z[r.clone()].iter().zip(&v[r.clone()]).map(|(&z, &v)| (a * z as f64 - s * v as f64) as f32).collect();
            let eps: Vec<f32> =
                z[r.clone()].iter().zip(&x).map(|(&z, &x)| ((z as f64 - a * x as f64) / s) as f32).collect();
            let one = ddim(&sched, &z[r.clone()], &eps, t[i] as usize, t2[i], false);
            let err: f32 = one.iter().zip(&z2[r.clone()]).map(|(p, q)| (p - q).powi(2)).sum::<f32>().sqrt();
            let size: f32 = z2[r].iter().map(|q| q * q).sum::<f32>().sqrt();
            worst = worst.max(err / size);
        }
        worst
    };
    let mut pool = Pool::default();
    let before = one_step_error(&student, &mut pool);
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..400 {
        let mut tape = Tape::new(&mut pool, None);
        let xs = tape.input(&z, &dims).unwrap();
        let ts = tape.input(&t.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[b]).unwrap();
        let ys = tape.input(&y.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[b]).unwrap();
        let ws = tape.input(&w, &[b]).unwrap();
        let out = student.forward_w(&mut tape, &xs, &ts, Some(&ys), Some(&ws)).unwrap();
        let o = pd_objective(&sched, tape.data(out), &z, &t, &x_target);
        let grads = tape.backward(out, o.grad).unwrap();
        opt.step_host(grads, 3e-3, 0.0).unwrap();
        first.get_or_insert(o.loss);
        last = o.loss;
    }
    let after = one_step_error(&student, &mut pool);
    let first = first.unwrap();
    assert!(last < first / 50.0, "the distillation loss fell from {first} to {last} only");
    assert!(
        after < 0.05 && after < before / 5.0,
        "one student step is {after} off two teacher steps (before: {before})"
    );
    // the weight is an input that matters: the same image and class at w 0 and 3 give different outputs
    let v0 = student_v(&student, &mut pool, &z[..n], &t[..1], &[0], &[0.0]);
    let v3 = student_v(&student, &mut pool, &z[..n], &t[..1], &[0], &[3.0]);
    let d: f32 = v0.iter().zip(&v3).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(d > 1e-3, "w changes the student's output by {d} only");
}
