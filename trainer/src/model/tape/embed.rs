//! Embedding lookup: rows of a parameter table picked by integer ids (class labels, attributes).

use anyhow::{bail, Result};

use super::{Gradients, Op, ParamSlot, Tape, Val};
use crate::model::kernels;
use crate::model::params::Param;

/// y [B, D] = table[ids]; backward adds each row's gradient into its table row.
pub(super) struct Embedding {
    ids: usize,
    table: ParamSlot,
}

impl Embedding {
    /// The node the backward pass reads: the ids.
    pub(super) fn ids(&self) -> usize {
        self.ids
    }

    /// [`crate::model::ops::Ops::embedding`]: ids are f32 on the tape.
    pub(super) fn forward(tape: &mut Tape, ids: &Val, table: &Param) -> Result<Val> {
        let (rows, d) = table.value.dims2()?;
        let slot = tape.param(table)?;
        let idv: Vec<usize> = tape.values(ids.0).iter().map(|&v| v as usize).collect();
        if let Some(bad) = idv.iter().find(|&&i| i >= rows) {
            bail!("embedding: id {bad} is out of range for {} with {rows} rows", table.name);
        }
        let mut y = tape.pool.take(idv.len() * d);
        kernels::with_f32(&slot.tensor, |ts| {
            for (r, &id) in idv.iter().enumerate() {
                y[r * d..(r + 1) * d].copy_from_slice(&ts[id * d..(id + 1) * d]);
            }
        })?;
        Ok(tape.push(vec![idv.len(), d], y, Op::Embedding(Embedding { ids: ids.0, table: slot }), true))
    }

    pub(super) fn backward(&self, tape: &mut Tape, out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let d = tape.nodes[out].dims[1];
        let rows = self.table.tensor.dim(0)?;
        let mut dt = vec![0f32; rows * d];
        for (r, &id) in tape.values(self.ids).iter().enumerate() {
            let id = id as usize;
            dt[id * d..(id + 1) * d].iter_mut().zip(&g[r * d..(r + 1) * d]).for_each(|(a, b)| *a += b);
        }
        grads.accumulate_param_grad(self.table.slot, dt);
        Ok(())
    }
}
