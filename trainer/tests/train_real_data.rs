//! Training on the real datasets fetched by scripts/fetch-data.sh (these tests need them).

mod common;

use candle_core::Device;
use common::*;
use rand::{Rng, SeedableRng};
use trainer::data;
use trainer::train::{Engine, Trainer};

fn train_steps(mut cfg: trainer::train::config::Config, steps: usize) -> Vec<f64> {
    cfg.train.steps = steps;
    let ds = data::load(&cfg.data, cfg.model.image_size).unwrap();
    let mut t = Trainer::new(cfg, ds, Device::Cpu).unwrap();
    (0..steps).map(|_| t.train_step().unwrap().loss).collect()
}

#[test]
fn mnist_full_training_set_loads_and_trains() {
    data_dir("mnist");
    let cfg = tiny("mnist");
    let ds = data::load(&cfg.data, 28).unwrap();
    assert_eq!((ds.len, ds.channels, ds.size, ds.num_classes()), (60_000, 1, 28, 10));
    // the official training labels: 5923 zeros ... 5949 nines
    let count = |c: u32| ds.labels.as_ref().unwrap().iter().filter(|l| **l == c).count();
    assert_eq!((count(0), count(9)), (5923, 5949));
    let mut test_cfg = cfg.data.clone();
    test_cfg.split = trainer::data::Split::Test;
    assert_eq!(data::load(&test_cfg, 28).unwrap().len, 10_000);
    let losses = train_steps(cfg, 3);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
}

#[test]
fn fashion_mnist_loads_gz_and_trains() {
    data_dir("fashion-mnist");
    let cfg = tiny("fashion-mnist");
    let ds = data::load(&cfg.data, 28).unwrap();
    assert_eq!((ds.len, ds.num_classes()), (60_000, 10));
    assert_eq!(ds.class_names[9], "ankle-boot");
    // Fashion-MNIST is balanced: 6000 images per class
    assert!(ds.labels.as_ref().unwrap().iter().filter(|l| **l == 3).count() == 6000);
    let losses = train_steps(cfg, 3);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
}

#[test]
fn sprite_folder_loads_at_64_and_trains_with_augmentation() {
    data_dir("pokemon");
    let mut cfg = tiny("pokemon64");
    cfg.data.limit = 64;
    cfg.train.batch_size = 4;
    let ds = data::load(&cfg.data, 64).unwrap();
    assert_eq!((ds.len, ds.channels, ds.size, ds.num_classes()), (64, 3, 64, 0));
    // transparent sprite backgrounds are composited onto white: the corners are white
    let img = ds.image_f32(0);
    assert_eq!(img[0], 1.0);
    assert!(!cfg.data.augment.is_off());
    let losses = train_steps(cfg.clone(), 2);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    // the full set: 1,332 sprites, and grayscale (the cat-faces case) gives one channel
    cfg.data.limit = 0;
    cfg.data.grayscale = true;
    let gray = data::load(&cfg.data, 64).unwrap();
    assert_eq!((gray.len, gray.channels), (1332, 1));
}

#[test]
fn twemoji_folder_loads() {
    data_dir("twemoji");
    let mut cfg = tiny("twemoji64");
    cfg.data.limit = 16;
    let ds = data::load(&cfg.data, 64).unwrap();
    assert_eq!((ds.len, ds.channels, ds.size), (16, 3, 64));
}

/// The CPU tape engine and Candle's autograd take the same steps on real MNIST: same losses, same weights
/// (dropout, label dropout, Min-SNR weighting and a cosine schedule included).
#[test]
fn tape_engine_and_candle_autograd_train_alike_on_mnist() {
    data_dir("mnist");
    let mut cfg = tiny("mnist");
    cfg.model.dropout = 0.1;
    cfg.train.min_snr_gamma = 5.0;
    cfg.train.lr_schedule = trainer::train::config::LrSchedule::Cosine;
    cfg.train.steps = 12;
    cfg.train.warmup_steps = 2;
    let run = |engine| {
        let ds = data::load(&cfg.data, cfg.model.image_size).unwrap();
        let mut t = Trainer::new(cfg.clone(), ds, Device::Cpu).unwrap();
        t.engine = engine;
        let losses: Vec<f64> = (0..4).map(|_| t.train_step().unwrap().loss).collect();
        let w: Vec<f32> = t.vars["down.0.0.c1.weight"].as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        (losses, w)
    };
    let (l_tape, w_tape) = run(Engine::Tape);
    let (l_candle, w_candle) = run(Engine::Candle);
    for (a, b) in l_tape.iter().zip(&l_candle) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1e-3), "losses differ: {l_tape:?} vs {l_candle:?}");
    }
    let d = w_tape.iter().zip(&w_candle).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d < 1e-5, "weights differ by {d} after 4 steps");
    // and training moved them
    assert!(l_tape[0] > 0.0 && w_tape.iter().zip(&w_candle).any(|(a, _)| *a != 0.0));
}

/// The tape's batch split over one single-threaded worker per thread (the default) takes the steps of the whole
/// batch on every thread, and the sampler's model call split the same way gives the same outputs.
#[test]
fn a_batch_split_over_workers_trains_and_samples_like_the_whole_batch() {
    data_dir("mnist");
    let mut cfg = tiny("mnist");
    cfg.model.dropout = 0.1;
    cfg.train.batch_size = 9;
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let run = |split: bool| {
        let ds = data::load(&cfg.data, cfg.model.image_size).unwrap();
        let mut t = Trainer::new(cfg.clone(), ds, Device::Cpu).unwrap();
        t.batch_split = split;
        assert_eq!(two.install(|| t.workers_for(9)), if split { 2 } else { 1 });
        let losses: Vec<f64> = two.install(|| (0..4).map(|_| t.train_step().unwrap().loss).collect());
        (losses, t)
    };
    let ((l_split, t_split), (l_whole, t_whole)) = (run(true), run(false));
    for (a, b) in l_split.iter().zip(&l_whole) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "losses differ: {l_split:?} vs {l_whole:?}");
    }
    let mut diff = 0f32;
    for (k, v) in &t_whole.vars {
        let (a, b) = (v.as_tensor(), t_split.vars[k].as_tensor());
        diff = diff.max((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap());
    }
    // AdamW steps of at most ~lr: rounding-level gradients (a bias before a one-channel GroupNorm) may differ
    assert!(diff <= 0.05 * 4.0 * cfg.train.lr as f32, "weights differ by {diff} after 4 steps");
    // the sampler's call on 7 images (3 + 4 over the workers) against all 7 on one tape
    let unet = t_whole.ema_unet().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let x: Vec<f32> = (0..7 * 28 * 28).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let (t, y): (Vec<i64>, Vec<i64>) = (0..7).map(|i| (i * 131 % 1000, i % 11)).unzip();
    let eps = |split: bool| {
        let mut den = trainer::denoise::CandleDenoiser::new(&unet, &Device::Cpu);
        den.split = split;
        two.install(|| runtime::sampler::Denoiser::eps(&mut den, &x, [7, 1, 28, 28], &t, Some(&y)).unwrap())
    };
    let (a, b) = (eps(true), eps(false));
    let d = a.iter().zip(&b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(d <= 1e-5, "the split call differs by {d}");
}

#[test]
fn cosine_schedule_warms_up_then_decays_to_zero() {
    data_dir("mnist");
    let mut cfg = tiny("mnist");
    cfg.data.limit = 64;
    cfg.train.lr = 1e-3;
    cfg.train.warmup_steps = 10;
    cfg.train.steps = 110;
    cfg.train.lr_schedule = trainer::train::config::LrSchedule::Cosine;
    let ds = data::load(&cfg.data, cfg.model.image_size).unwrap();
    let mut t = Trainer::new(cfg, ds, Device::Cpu).unwrap();
    let mut at = |s| {
        t.step = s;
        t.lr()
    };
    assert!((at(0) - 1e-4).abs() < 1e-12 && (at(9) - 1e-3).abs() < 1e-12);
    assert!((at(10) - 1e-3).abs() < 1e-12, "peak right after warm-up");
    assert!((at(60) - 0.5e-3).abs() < 1e-9, "half way down the cosine");
    assert!(at(110) < 1e-12 && at(109) > 0.0);
    // Min-SNR-5 weights: 1 where SNR <= 5 (noisy t), 5 / SNR at small t
    let w = t.loss_weights(&[0, 999]);
    let snr0 = t.schedule.snr(0);
    assert!((w[0] as f64 - 1.0f64.min(5.0 / snr0)).abs() < 1e-6 && w[1] == 1.0, "{w:?}");
}

/// A step whose loss is not finite updates nothing and is counted; a few in a row stop the run; weights that are
/// not finite are never checkpointed.
#[test]
fn non_finite_steps_are_skipped_counted_and_stop_the_run_when_they_persist() {
    data_dir("mnist");
    let mut cfg = tiny("mnist");
    cfg.data.limit = 256;
    cfg.train.steps = 50;
    cfg.train.max_skipped_steps = 3;
    let ds = data::load(&cfg.data, cfg.model.image_size).unwrap();
    let mut t = Trainer::new(cfg, ds, Device::Cpu).unwrap();
    assert!(!t.train_step().unwrap().skipped);
    let name = "down.0.0.c1.weight";
    let good = t.vars[name].as_tensor().copy().unwrap();
    let mut poisoned: Vec<f32> = good.flatten_all().unwrap().to_vec1().unwrap();
    poisoned[0] = f32::NAN;
    t.vars[name].set(&candle_core::Tensor::from_vec(poisoned, good.dims(), &Device::Cpu).unwrap()).unwrap();
    let ema_before = t.ema.tensors[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // two poisoned steps are skipped: no optimiser step, no EMA update
    for _ in 0..2 {
        let s = t.train_step().unwrap();
        assert!(s.skipped && !s.loss.is_finite(), "loss {}", s.loss);
    }
    assert_eq!((t.step, t.skipped_in_row, t.opt.t), (3, 2, 1));
    assert_eq!(t.ema.tensors[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(), ema_before);
    // a checkpoint of non-finite weights is refused
    let dir = tmp_dir("nonfinite");
    let e = t.save_checkpoint(&dir, trainer::train::DeviceSpec::Cpu).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("not finite"), "{e}");
    assert!(trainer::train::checkpoint::list(&dir).unwrap().is_empty());
    // a good step in between resets the count
    t.vars[name].set(&good).unwrap();
    assert!(!t.train_step().unwrap().skipped);
    assert_eq!((t.skipped_in_row, t.opt.t), (0, 2));
    // three in a row stop the run, naming the cause
    t.vars[name].set(&candle_core::Tensor::full(f32::NAN, good.dims(), &Device::Cpu).unwrap()).unwrap();
    t.train_step().unwrap();
    t.train_step().unwrap();
    let e = t.train_step().unwrap_err().to_string();
    assert!(e.contains("3 steps in a row") && e.contains("non-finite"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A learned variance (Nichol & Dhariwal 2021): the hybrid loss takes the same steps in both engines, and with
/// importance-sampled timesteps (sec. 3.3) a run resumed from a checkpoint continues exactly as the run that
/// was not stopped (the loss history is part of the checkpoint).
#[test]
fn learned_variance_trains_alike_in_both_engines_and_importance_sampling_resumes_exactly() {
    use trainer::train::config::{TimestepSampling, VarianceType};
    data_dir("mnist");
    let mut cfg = tiny("mnist");
    cfg.diffusion.variance = VarianceType::LearnedRange;
    cfg.diffusion.timesteps = 10;
    cfg.train.min_snr_gamma = 5.0;
    cfg.train.steps = 40;
    cfg.data.limit = 512;
    let weights =
        |t: &Trainer| -> Vec<f32> { t.vars["out.2.weight"].as_tensor().flatten_all().unwrap().to_vec1().unwrap() };
    let fresh = |cfg: &trainer::train::config::Config| {
        Trainer::new(cfg.clone(), data::load(&cfg.data, 28).unwrap(), Device::Cpu).unwrap()
    };
    let mut a = fresh(&cfg);
    // the output layer has eps and v channels
    assert_eq!(a.vars["out.2.weight"].as_tensor().dims()[0], 2);
    let mut b = fresh(&cfg);
    b.engine = Engine::Candle;
    for _ in 0..4 {
        let (la, lb) = (a.train_step().unwrap().loss, b.train_step().unwrap().loss);
        assert!((la - lb).abs() <= 1e-4 * lb.abs(), "losses differ: {la} vs {lb}");
    }
    let d = weights(&a).iter().zip(&weights(&b)).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-5, "weights differ by {d}");

    cfg.train.timestep_sampling = TimestepSampling::Importance;
    let mut whole = fresh(&cfg);
    for _ in 0..40 {
        whole.train_step().unwrap();
    }
    // 40 steps of 8 images over 10 timesteps: every t has its 10 losses, the sampler is no longer uniform
    let p = whole.timesteps.probabilities().expect("the importance sampler is warm");
    assert!(p.iter().any(|&p| (p - 0.1).abs() > 0.01), "{p:?}");
    let dir = tmp_dir("importance");
    let mut cut = fresh(&cfg);
    for _ in 0..30 {
        cut.train_step().unwrap();
    }
    cut.save_checkpoint(&dir, trainer::train::DeviceSpec::Cpu).unwrap();
    let ck = trainer::train::checkpoint::load_which(&dir, "latest", &Device::Cpu, true).unwrap();
    let ds = data::load(&cfg.data, 28).unwrap();
    let mut resumed = Trainer::from_checkpoint(ck, cfg.clone(), ds, Device::Cpu).unwrap();
    assert_eq!(resumed.timesteps, cut.timesteps);
    for _ in 0..10 {
        resumed.train_step().unwrap();
    }
    assert_eq!(weights(&resumed), weights(&whole), "the resumed run took other steps");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Shifted digits: the 60,000 digits on 32x32 canvases with a position label (half withheld, 7s never at
/// positions 2 and 3); a two-label model trains alike in both engines, its position embedding learns, and a
/// model without the data's attributes is refused with the lines to write.
#[test]
fn shifted_digits_load_and_a_two_label_model_trains_alike_in_both_engines() {
    use trainer::data::UNKNOWN;
    data_dir("mnist");
    let mut cfg = tiny("shifted-mnist");
    let ds = data::load(&cfg.data, 32).unwrap();
    assert_eq!((ds.len, ds.size, ds.attributes.len()), (60_000, 32, 1));
    let (classes, pos) = (ds.labels.as_ref().unwrap(), &ds.attr_labels[0]);
    let withheld = pos.iter().filter(|&&p| p == UNKNOWN).count();
    assert!((29_000..31_000).contains(&withheld), "{withheld} position labels withheld");
    let mut sevens = [0usize; 4];
    for i in 0..ds.len {
        let p = trainer::data::shifted::position_of(&ds.image_f32(i), 32);
        if pos[i] != UNKNOWN {
            assert_eq!(p as u32, pos[i], "image {i}'s ink is not where its label says");
        }
        if classes[i] == 7 {
            sevens[p] += 1;
        }
    }
    assert_eq!((sevens[2], sevens[3]), (0, 0), "7s at the held-out positions: {sevens:?}");
    assert!(sevens[0] > 2500 && sevens[1] > 2500, "{sevens:?}");

    cfg.data.limit = 512;
    let fresh = |cfg: &trainer::train::config::Config| {
        Trainer::new(cfg.clone(), data::load(&cfg.data, 32).unwrap(), Device::Cpu).unwrap()
    };
    let table = |t: &Trainer| -> Vec<f32> {
        t.vars["attr.position.weight"].as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    };
    let mut a = fresh(&cfg);
    let before = table(&a);
    assert_eq!(before.len(), 5 * 4 * cfg.model.ch, "4 positions and the null, one row each");
    let mut b = fresh(&cfg);
    b.engine = Engine::Candle;
    for _ in 0..3 {
        let (la, lb) = (a.train_step().unwrap().loss, b.train_step().unwrap().loss);
        assert!((la - lb).abs() <= 1e-4 * lb.abs(), "losses differ: {la} vs {lb}");
    }
    let (ta, tb) = (table(&a), table(&b));
    assert!(ta.iter().zip(&before).any(|(x, y)| x != y), "the position embedding did not learn");
    let d = ta.iter().zip(&tb).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-5, "the engines' position embeddings differ by {d}");

    cfg.model.attributes.clear();
    let e = Trainer::new(cfg.clone(), data::load(&cfg.data, 32).unwrap(), Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("model.attributes do not match") && e.contains("name = \"position\""), "{e}");
}
