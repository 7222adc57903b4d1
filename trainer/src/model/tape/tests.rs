//! The tape against Candle's autograd over whole U-Nets that use every primitive (the broadcasting binary ops
//! are also checked on their own, in `elementwise.rs`).

use super::{Pool, Tape};
use crate::model::ops::CandleOps;
use crate::model::params::InitSource;
use crate::model::random::{DropoutKeys, StepKeys};
use crate::model::unet::{Attribute, UNet, UNetConfig};
use candle_core::{DType, Device, Tensor};

/// The tape's output and every parameter gradient against Candle's autograd over the same forward pass
/// (same weights, same dropout draws), for a U-Net that uses every primitive.
fn check_against_candle(cfg: UNetConfig, batch: usize) {
    let dev = Device::Cpu;
    let mut src = InitSource::new(5, &dev, DType::F32);
    let unet = UNet::new(cfg.clone(), &mut src).unwrap();
    let vars = src.into_vars();
    // zero-initialised layers would hide the gradients behind them: draw every weight
    for (i, v) in vars.values().enumerate() {
        let t = Tensor::randn(0f32, 0.3, v.dims(), &dev).unwrap();
        v.set(&(t + if i % 3 == 0 { 0.2 } else { 0.0 }).unwrap()).unwrap();
    }
    let s = cfg.image_size;
    let x = Tensor::randn(0f32, 1.0, (batch, cfg.channels, s, s), &dev).unwrap();
    let ts: Vec<u32> = (0..batch).map(|i| (i * 137 % 1000) as u32).collect();
    let nulls = if cfg.num_classes > 0 { cfg.label_nulls() } else { vec![0] };
    let ys: Vec<u32> = (0..batch).flat_map(|i| nulls.iter().map(move |&k| (i % (k as usize + 1)) as u32)).collect();
    let t = Tensor::from_vec(ts.clone(), batch, &dev).unwrap();
    let ydims = if cfg.num_classes > 0 { cfg.label_dims(batch) } else { vec![batch] };
    let y = Tensor::from_vec(ys.clone(), ydims.clone(), &dev).unwrap();
    let cond = cfg.num_classes > 0;
    // a guidance-weight input (distilled students): w per image
    let ws: Vec<f32> = (0..batch).map(|i| 0.7 * i as f32).collect();
    let w = Tensor::from_vec(ws.clone(), batch, &dev).unwrap();

    let keys = DropoutKeys::new(StepKeys::new(9, 0), 0);
    let mut dropout = keys;
    let mut ops = CandleOps::training(&dev, DType::F32, &mut dropout);
    let pred = unet.forward_w(&mut ops, &x, &t, cond.then_some(&y), cfg.guidance_embed.then_some(&w)).unwrap();
    let probe = Tensor::randn(0f32, 1.0, pred.dims(), &dev).unwrap();
    let reference = (&pred * &probe).unwrap().sum_all().unwrap().backward().unwrap();

    let mut pool = Pool::default();
    let mut dropout = keys;
    let mut tape = Tape::new(&mut pool, Some(&mut dropout));
    let xv = tape.input(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), x.dims()).unwrap();
    let tv = tape.input(&ts.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[batch]).unwrap();
    let yv = tape.input(&ys.iter().map(|&v| v as f32).collect::<Vec<_>>(), &ydims).unwrap();
    let wv = tape.input(&ws, &[batch]).unwrap();
    let out = unet.forward_w(&mut tape, &xv, &tv, cond.then_some(&yv), cfg.guidance_embed.then_some(&wv)).unwrap();
    let ours = tape.data(out).to_vec();
    let want = pred.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let d = ours.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d <= 1e-4 * scale, "forward differs by {d} (scale {scale})");
    let grads = tape.backward(out, probe.flatten_all().unwrap().to_vec1::<f32>().unwrap()).unwrap();
    for (name, v) in &vars {
        let want = reference.get(v).unwrap_or_else(|| panic!("candle has no gradient for {name}"));
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = grads.get(name).unwrap_or_else(|| panic!("no gradient for {name}"));
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let d = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d <= 2e-4 * scale, "{name}: gradient differs by {d} (scale {scale})");
    }
    assert_eq!(grads.len(), vars.len());
}

#[test]
fn unet_matches_candle_autograd_with_scale_shift_attention_classes_and_an_attribute() {
    check_against_candle(
        UNetConfig {
            channels: 1,
            image_size: 12,
            ch: 16,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            attention_resolutions: vec![6],
            num_heads: 2,
            dropout: 0.2,
            use_scale_shift_norm: true,
            num_classes: 3,
            attributes: vec![Attribute { name: "position".into(), values: vec!["a".into(), "b".into()] }],
            guidance_embed: true,
            norm_groups: 8,
            kernel_size: 3,
            embed_dim: None,
            learn_sigma: false,
            prediction: Default::default(),
        },
        3,
    );
}

#[test]
fn unet_matches_candle_autograd_without_scale_shift_on_odd_shapes() {
    // batch 1, 7x7 maps at the lower level, channels not a multiple of 8, RGB, unconditional, 6 output
    // channels (a learned variance), 5x5 convolutions and a 20-wide embedding
    check_against_candle(
        UNetConfig {
            channels: 3,
            image_size: 14,
            ch: 12,
            ch_mult: vec![1, 2],
            num_res_blocks: 2,
            attention_resolutions: vec![14],
            num_heads: 3,
            dropout: 0.0,
            use_scale_shift_norm: false,
            num_classes: 0,
            attributes: vec![],
            guidance_embed: false,
            norm_groups: 4,
            kernel_size: 5,
            embed_dim: Some(20),
            learn_sigma: true,
            prediction: Default::default(),
        },
        1,
    );
}

/// A training step returns to the pool what it took from it and nothing more: the seed gradient the caller
/// hands to `backward` is its own Vec, and put into the pool it made a run's memory grow by one output's size a
/// step (0.4 MiB a step on twemoji32, 2 GB over a 90-minute run).
#[test]
fn the_pool_holds_as_many_buffers_after_each_step() {
    let mut pool = Pool::default();
    let mut held = vec![];
    for _ in 0..4 {
        {
            let mut tape = Tape::new(&mut pool, None);
            let x = tape.input(&[0.5; 12], &[3, 4]).unwrap();
            tape.backward(x, vec![1.0; 12]).unwrap();
        }
        held.push(pool.free.values().map(Vec::len).sum::<usize>());
    }
    assert_eq!(held[1..], [held[0]; 3], "buffers held by the pool after each step: {held:?}");
}

/// `Ops::release`: a value that no backward pass reads goes back to the pool at once, one that a backward pass
/// reads stays (the whole U-Nets above run with the U-Net's own releases, so their gradients check that none is
/// freed too early), and a released value read again is refused rather than read from a reused buffer.
#[test]
fn release_frees_only_the_values_no_backward_pass_reads() {
    use crate::model::ops::Ops;
    let mut pool = Pool::default();
    let mut tape = Tape::new(&mut pool, None);
    let a = tape.input(&[1.0, -2.0, 3.0], &[3]).unwrap();
    tape.nodes[a.0].needs_grad = true;
    let s = tape.silu(&a).unwrap(); // silu's backward reads a
    let b = tape.affine(&s, 2.0, 0.5).unwrap(); // affine's reads nothing: s is the forward's alone
    let y = tape.mul(&b, &b).unwrap(); // the product's reads b
    for v in [&a, &s, &b] {
        tape.release(v);
    }
    let held = |t: &Tape, v: super::Val| t.bufs[t.nodes[v.0].buf].len();
    assert_eq!((held(&tape, a), held(&tape, s), held(&tape, b)), (3, 0, 3));
    assert_eq!(tape.pool.free.get(&3).map(Vec::len), Some(1), "the released buffer is in the pool");
    let fresh = tape.affine(&a, 1.0, 0.0).unwrap(); // served by the released buffer
    assert_eq!(tape.data(fresh), [1.0, -2.0, 3.0]);
    tape.backward(y, vec![1.0; 3]).unwrap();
}

#[test]
#[should_panic(expected = "was released and read again")]
fn a_released_value_read_again_is_refused() {
    use crate::model::ops::Ops;
    let mut pool = Pool::default();
    let mut tape = Tape::new(&mut pool, None);
    let a = tape.input(&[1.0, 2.0], &[2]).unwrap();
    let b = tape.affine(&a, 2.0, 0.0).unwrap();
    tape.release(&b);
    let _ = tape.silu(&b);
}
