//! The attention block's ops: batched matrix products and the scaled softmax (the fused kernel of
//! [`crate::model::kernels`]).

use anyhow::{ensure, Result};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{numel, Gradients, Op, Tape, Val};
use crate::model::kernels;

/// Runs `f(batch index, output slice)` over `batch` contiguous outputs of `len` elements, in parallel.
fn batched(out: &mut [f32], len: usize, batch: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    debug_assert_eq!(out.len(), len * batch);
    if len == 0 {
        return;
    }
    out.par_chunks_mut(len).enumerate().for_each(|(bi, dst)| f(bi, dst));
}

/// C = A B over the last two axes, batched over the leading ones.
pub(super) struct MatMul {
    a: usize,
    b: usize,
}

impl MatMul {
    /// The nodes the backward pass reads: both factors.
    pub(super) fn reads(&self) -> Vec<usize> {
        vec![self.a, self.b]
    }

    /// [`crate::model::ops::Ops::matmul`].
    pub(super) fn forward(tape: &mut Tape, a: &Val, b: &Val) -> Result<Val> {
        let (ad, bd) = (tape.nodes[a.0].dims.clone(), tape.nodes[b.0].dims.clone());
        let r = ad.len();
        ensure!(
            r >= 2 && bd.len() == r && ad[..r - 2] == bd[..r - 2] && ad[r - 1] == bd[r - 2],
            "matmul of {ad:?} and {bd:?}"
        );
        let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
        let batch = numel(&ad[..r - 2]);
        let mut y = tape.pool.take(batch * m * n);
        let (as_, bs) = (tape.values(a.0), tape.values(b.0));
        batched(&mut y, m * n, batch, |bi, dst| {
            let ab = &as_[bi * m * k..(bi + 1) * m * k];
            let bb = &bs[bi * k * n..(bi + 1) * k * n];
            kernels::gemm_into(dst, false, (m, n, k), ab, (k, 1), bb, (n, 1), Parallelism::None);
        });
        let mut od = ad;
        od[r - 1] = n;
        let needs_grad = tape.needs_grad(a.0) || tape.needs_grad(b.0);
        Ok(tape.push(od, y, Op::MatMul(MatMul { a: a.0, b: b.0 }), needs_grad))
    }

    pub(super) fn backward(&self, tape: &mut Tape, _out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let (a, b) = (self.a, self.b);
        let (ad, bd) = (tape.nodes[a].dims.clone(), tape.nodes[b].dims.clone());
        let r = ad.len();
        let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
        let batch = numel(&ad[..r - 2]);
        if tape.needs_grad(a) {
            // dA = dC B^T
            let mut da = tape.pool.take(batch * m * k);
            let bs = tape.values(b);
            batched(&mut da, m * k, batch, |bi, dst| {
                let gb = &g[bi * m * n..(bi + 1) * m * n];
                let bb = &bs[bi * k * n..(bi + 1) * k * n];
                kernels::gemm_into(dst, false, (m, k, n), gb, (n, 1), bb, (1, n), Parallelism::None);
            });
            tape.accumulate_grad(grads, a, da);
        }
        if tape.needs_grad(b) {
            // dB = A^T dC
            let mut db = tape.pool.take(batch * k * n);
            let as_ = tape.values(a);
            batched(&mut db, k * n, batch, |bi, dst| {
                let ab = &as_[bi * m * k..(bi + 1) * m * k];
                let gb = &g[bi * m * n..(bi + 1) * m * n];
                kernels::gemm_into(dst, false, (k, n, m), ab, (1, k), gb, (n, 1), Parallelism::None);
            });
            tape.accumulate_grad(grads, b, db);
        }
        Ok(())
    }
}

/// y = softmax(scale x) over the last axis; backward reads the output y.
pub(super) struct Softmax {
    x: usize,
    scale: f32,
}

impl Softmax {
    /// [`crate::model::ops::Ops::softmax_last_scaled`].
    pub(super) fn forward(tape: &mut Tape, x: &Val, scale: f64) -> Result<Val> {
        let xd = tape.nodes[x.0].dims.clone();
        let n = *xd.last().unwrap_or(&1);
        let mut y = tape.pool.take(numel(&xd));
        if n > 0 {
            kernels::softmax_forward(tape.values(x.0), &mut y, n, scale as f32);
        }
        let needs_grad = tape.needs_grad(x.0);
        Ok(tape.push(xd, y, Op::Softmax(Softmax { x: x.0, scale: scale as f32 }), needs_grad))
    }

    pub(super) fn backward(&self, tape: &mut Tape, out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let n = *tape.nodes[out].dims.last().unwrap_or(&1);
        let mut dx = tape.pool.take(g.len());
        if n > 0 {
            kernels::softmax_backward(tape.values(out), g, &mut dx, n, self.scale);
        }
        tape.accumulate_grad(grads, self.x, dx);
        Ok(())
    }
}
