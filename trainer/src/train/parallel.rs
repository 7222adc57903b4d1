//! Data parallelism: what a rank of an MPI job does beside a one-process run (`trainer fit --distributed`).
//!
//! `train.batch_size` stays the global batch; rank r builds positions [`dist::share`] of it, each image drawing
//! from the streams of its global position ([`crate::model::random::StepKeys`]), and its objective is its part of
//! the mean over the whole batch. The sum of the ranks' gradients (an all-reduce) is then one process's gradient,
//! and since every rank applies the same update to the same weights, the ranks stay equal without sending
//! weights again. Rank 0 alone writes the run folder.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::checkpoint::State;
use super::Trainer;
use crate::dist::{self, Collective};
use crate::model::profile;

/// Sums the ranks' gradients (by parameter name, from the tape) and losses in one all-reduce of a flat buffer.
/// A parameter has a gradient after it when any rank had one (an unused label row, for instance, has none).
pub fn all_reduce_host(
    comm: &dyn Collective,
    vars: &BTreeMap<String, Var>,
    grads: HashMap<String, Vec<f32>>,
    loss: f64,
) -> Result<(f64, HashMap<String, Vec<f32>>)> {
    if comm.size() == 1 {
        return Ok((loss, grads));
    }
    let total: usize = vars.values().map(|v| v.elem_count()).sum();
    // [every gradient in name order | one "has a gradient" flag per parameter | the loss]
    let mut flat = Vec::with_capacity(total + vars.len() + 1);
    let mut flags = Vec::with_capacity(vars.len());
    let mut grads = grads;
    for (name, v) in vars {
        match grads.remove(name) {
            Some(g) if g.len() == v.elem_count() => {
                flat.extend_from_slice(&g);
                flags.push(1.0);
            }
            Some(g) => bail!("the gradient of '{name}' has {} values, the parameter {}", g.len(), v.elem_count()),
            None => {
                flat.resize(flat.len() + v.elem_count(), 0.0);
                flags.push(0.0);
            }
        }
    }
    if let Some(name) = grads.keys().next() {
        bail!("a gradient for '{name}', which the model does not hold");
    }
    flat.extend_from_slice(&flags);
    // a loss of one rank's share is at most the mean over the batch: f32 keeps it to ~7 digits, as the log does
    flat.push(loss as f32);
    profile::timed("all-reduce", || comm.all_reduce_sum(&mut flat))?;
    let loss = flat[total + vars.len()] as f64;
    let mut out = HashMap::with_capacity(vars.len());
    let mut at = 0;
    for (i, (name, v)) in vars.iter().enumerate() {
        let n = v.elem_count();
        if flat[total + i] > 0.0 {
            out.insert(name.clone(), flat[at..at + n].to_vec());
        }
        at += n;
    }
    Ok((loss, out))
}

/// [`all_reduce_host`] for Candle's autograd (any device; NCCL keeps GPU gradients on the GPU): the summed
/// gradients by name, and the summed loss.
pub fn all_reduce_candle(
    comm: &dyn Collective,
    vars: &BTreeMap<String, Var>,
    grads: &GradStore,
    loss: f64,
) -> Result<(f64, HashMap<String, Tensor>)> {
    let mut out = HashMap::with_capacity(vars.len());
    let mut flags = Vec::with_capacity(vars.len() + 1);
    for (name, v) in vars {
        let g = match grads.get(v) {
            Some(g) => {
                flags.push(1.0);
                g.clone()
            }
            None => {
                flags.push(0.0);
                v.zeros_like()?
            }
        };
        out.insert(name.clone(), profile::timed("all-reduce", || comm.all_reduce_tensor(&g))?);
    }
    flags.push(loss as f32);
    comm.all_reduce_sum(&mut flags)?;
    for (i, name) in vars.keys().enumerate() {
        if flags[i] == 0.0 {
            out.remove(name);
        }
    }
    Ok((flags[vars.len()] as f64, out))
}

/// Every image's (timestep, loss) of the whole batch in batch order, for the importance sampler's history
/// (which must be the same on every rank).
pub fn gather_losses(
    comm: &dyn Collective,
    batch: usize,
    t: &[u32],
    per_image: &[f64],
) -> Result<(Vec<u32>, Vec<f64>)> {
    if comm.size() == 1 {
        return Ok((t.to_vec(), per_image.to_vec()));
    }
    let per = dist::longest_share(batch, comm.size());
    let local: Vec<f64> = t.iter().map(|&t| t as f64).chain(std::iter::repeat_n(-1.0, per - t.len())).collect();
    let ts = comm.all_gather(&local, per)?;
    let ls = comm.all_gather(per_image, per)?;
    let mut out = (Vec::with_capacity(batch), Vec::with_capacity(batch));
    for r in 0..comm.size() {
        let n = dist::share(batch, comm.size(), r).len();
        out.0.extend(ts[r * per..r * per + n].iter().map(|&t| t as u32));
        out.1.extend_from_slice(&ls[r * per..r * per + n]);
    }
    Ok(out)
}

/// Rank 0's tensors on every rank (same names and shapes everywhere: the ranks run one config).
fn broadcast_tensors(comm: &dyn Collective, map: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    let mut flat: Vec<f32> = Vec::new();
    for n in &names {
        flat.extend(map[*n].flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    comm.broadcast(&mut flat)?;
    let mut out = HashMap::with_capacity(names.len());
    let mut at = 0;
    for n in names {
        let t = &map[n];
        let k = t.elem_count();
        out.insert(n.clone(), Tensor::from_slice(&flat[at..at + k], t.dims(), t.device())?.to_dtype(t.dtype())?);
        at += k;
    }
    Ok(out)
}

/// Rank 0's run state as JSON (its config, step, clocks, timestep history), on every rank.
pub fn broadcast_state(comm: &dyn Collective, state: Option<&State>) -> Result<State> {
    let mut bytes = match state {
        Some(s) => serde_json::to_vec(s)?,
        None => vec![],
    };
    comm.broadcast_bytes(&mut bytes)?;
    serde_json::from_slice(&bytes).context("the run state sent by rank 0")
}

/// Makes this rank's trainer rank 0's: its weights, EMA, AdamW moments and counters. `state` is rank 0's.
pub fn adopt_lead(comm: &dyn Collective, tr: &mut Trainer, state: &State) -> Result<()> {
    let weights: HashMap<String, Tensor> = tr.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let weights = broadcast_tensors(comm, &weights)?;
    for (k, v) in &tr.vars {
        v.set(&weights[k])?;
    }
    let ema = broadcast_tensors(comm, &tr.ema.as_map())?;
    for (k, v) in tr.ema.tensors.iter_mut() {
        *v = ema[k].clone();
    }
    let moments = broadcast_tensors(comm, &tr.opt.state_tensors())?;
    tr.opt.load_state(&moments, state.step)?;
    tr.ema.updates = state.step;
    tr.step = state.step;
    tr.elapsed_s = state.elapsed_s;
    tr.recent_loss = state.recent_loss;
    if let Some(h) = &state.timestep_history {
        tr.timesteps.history = h.clone();
    }
    Ok(())
}

/// Stops a job whose ranks' weights are no longer equal (checked at each checkpoint): a hash of every
/// weight's bits compared with rank 0's.
pub fn check_in_step(comm: &dyn Collective, vars: &BTreeMap<String, Var>, step: usize) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut h = dist::FNV_OFFSET;
    for v in vars.values() {
        let values: Vec<f32> = v.as_tensor().flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        h = dist::fnv1a_extend(h, &bytes);
    }
    dist::check_same(
        comm,
        &[&format!("the weights at step {step}")],
        &[h],
        "the ranks fell apart (a collective that does not give every rank the same sum?); resume from the last checkpoint",
    )
}
