//! Training on the real datasets fetched by scripts/fetch-data.sh (these tests need them).

mod common;

use candle_core::Device;
use common::*;
use trainer::data;
use trainer::train::Trainer;

fn train_steps(mut cfg: trainer::config::Config, steps: usize) -> Vec<f64> {
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
    test_cfg.split = "test".into();
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
