//! The tape engine's batches split over single-threaded workers when the process has several threads: a training
//! step's share of the batch (each worker builds its images, runs the forward and backward pass of its part alone,
//! its kernels taking their sequential paths, and the parts' gradients are summed) and the images of a sampler's
//! model call (`crate::denoise::CandleDenoiser`, through `crate::model::workers::run`). On 2 cores this beat two threads
//! working together on every op, whose fork-join points come several hundred times a step: two MPI ranks of one
//! thread ran the same nets 1.1-1.3x faster than one process of two (benches/RESULTS.md, 2026-12-07). Each image
//! draws from its own keyed streams ([`crate::model::random`]), so the split changes no random number, only the
//! order in which the gradient is summed.

use std::collections::HashMap;
use std::ops::Range;

use anyhow::{Context, Result};
use runtime::schedule::NoiseSchedule;

use super::batch::make_host_batch;
use super::config::Config;
use super::{loss, HostBatch, Trainer};
use crate::model::profile;
use crate::model::random::{DropoutKeys, StepKeys};
use crate::model::tape::{Pool, Tape};
use crate::model::unet::UNet;
use crate::model::workers::{count, run};

/// Gradients by parameter name.
pub type HostGrads = HashMap<String, Vec<f32>>;

/// A share's loss, gradients, and each image's timestep and loss (in batch order).
pub type ShareResult = (f64, HostGrads, Vec<u32>, Vec<f64>);

/// The loss of [`Trainer::loss`], the gradient of every parameter by name and the per-image losses of `batch`,
/// through the tape, on the calling thread's rayon pool.
pub fn tape_loss_and_grads(
    unet: &UNet,
    cfg: &Config,
    schedule: &NoiseSchedule,
    pool: &mut Pool,
    batch: &HostBatch,
    dropout: &mut DropoutKeys,
) -> Result<(f64, HostGrads, Vec<f64>)> {
    let mut tape = Tape::new(pool, Some(dropout));
    let b = batch.dims[0];
    let x = tape.input(&batch.xt, &batch.dims)?;
    let t = tape.input(&batch.t.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[b])?;
    let y = match &batch.y {
        Some(y) => Some(tape.input(&y.iter().map(|&v| v as f32).collect::<Vec<_>>(), &unet.cfg.label_dims(b))?),
        None => None,
    };
    let out = unet.forward(&mut tape, &x, &t, y.as_ref())?;
    let o = profile::timed("objective", || loss::objective(cfg, schedule, tape.data(out), batch));
    let grads = tape.backward(out, o.grad)?;
    Ok((o.loss, grads, o.per_image))
}

impl Trainer {
    /// How many workers a share of `images` is split over ([`count`]; 1 when `batch_split` is off).
    pub fn workers_for(&self, images: usize) -> usize {
        if self.batch_split {
            count(images)
        } else {
            1
        }
    }

    /// The tape's step on the images `idx` at global positions `positions` of step `keys`: the loss, the
    /// gradients and each image's (t, loss), split over [`Trainer::workers_for`] workers.
    pub(super) fn tape_share(&mut self, idx: &[usize], positions: Range<usize>, keys: StepKeys) -> Result<ShareResult> {
        let n = self.workers_for(idx.len());
        let global = self.cfg.train.batch_size;
        let (unet, cfg, schedule, data, sampler) = (&self.unet, &self.cfg, &self.schedule, &self.data, &self.timesteps);
        let part = |pool: &mut Pool, part: Range<usize>| -> Result<ShareResult> {
            let first = positions.start + part.start;
            let batch = profile::timed("batch: data, augmentation, noise", || {
                make_host_batch(data, &idx[part], first, global, cfg, schedule, sampler, keys)
            });
            let mut dropout = DropoutKeys::new(keys, first);
            let (loss, grads, per_image) = tape_loss_and_grads(unet, cfg, schedule, pool, &batch, &mut dropout)?;
            Ok((loss, grads, batch.t, per_image))
        };
        if n == 1 {
            return part(&mut self.pool, 0..idx.len());
        }
        let parts = run(&mut self.workers, n, idx.len(), part)?;
        profile::timed("workers: sum of the gradients", || {
            let mut parts = parts.into_iter();
            let (mut loss, mut grads, mut t, mut per_image) = parts.next().context("no worker")?;
            for (l, g, ts, ls) in parts {
                loss += l;
                for (name, d) in g {
                    match grads.get_mut(&name) {
                        Some(acc) => acc.iter_mut().zip(&d).for_each(|(a, b)| *a += b),
                        None => {
                            grads.insert(name, d);
                        }
                    }
                }
                t.extend(ts);
                per_image.extend(ls);
            }
            Ok((loss, grads, t, per_image))
        })
    }
}
