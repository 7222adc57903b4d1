//! Ops that move values without arithmetic: reshape (an alias of its input's buffer), permute, narrow,
//! concat, and nearest-neighbour 2x upsampling (whose backward sums each 2x2 block).

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::{numel, strides, Gradients, Op, Tape, Val};

/// [`crate::model::ops::Ops::reshape`]: the same buffer under new dimensions (`-1` inferred).
pub(super) fn reshape(tape: &mut Tape, x: &Val, dims: &[i64]) -> Result<Val> {
    let n = numel(&tape.nodes[x.0].dims);
    let known: usize = dims.iter().filter(|d| **d >= 0).map(|d| *d as usize).product();
    let shape: Vec<usize> = dims.iter().map(|d| if *d < 0 { n / known.max(1) } else { *d as usize }).collect();
    ensure!(numel(&shape) == n, "cannot reshape {:?} to {dims:?}", tape.nodes[x.0].dims);
    Ok(tape.alias(x.0, shape))
}

/// y = x permuted (`perm[i]` = the input axis of output axis i).
fn permute_copy(x: &[f32], dims: &[usize], perm: &[usize], y: &mut [f32]) {
    let st = strides(dims);
    let out: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let pst: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let n = out.len();
    if n == 0 {
        y.copy_from_slice(x);
        return;
    }
    // parallel over the first output axis
    let inner = numel(&out[1..]);
    y.par_chunks_mut(inner.max(1)).enumerate().for_each(|(i0, yc)| {
        let mut idx = vec![0usize; n];
        idx[0] = i0;
        let mut off = i0 * pst[0];
        for o in yc.iter_mut() {
            *o = x[off];
            for ax in (1..n).rev() {
                idx[ax] += 1;
                off += pst[ax];
                if idx[ax] < out[ax] {
                    break;
                }
                off -= pst[ax] * idx[ax];
                idx[ax] = 0;
            }
        }
    });
}

/// y = x with its axes permuted (a copy); backward permutes back.
pub(super) struct Permute {
    x: usize,
    perm: Vec<usize>,
}

impl Permute {
    /// [`crate::model::ops::Ops::permute`].
    pub(super) fn forward(tape: &mut Tape, x: &Val, perm: &[usize]) -> Result<Val> {
        let xd = tape.nodes[x.0].dims.clone();
        ensure!(perm.len() == xd.len(), "permute {perm:?} of a rank-{} value", xd.len());
        let mut y = tape.pool.take(numel(&xd));
        permute_copy(tape.values(x.0), &xd, perm, &mut y);
        let od = perm.iter().map(|&p| xd[p]).collect();
        let needs_grad = tape.needs_grad(x.0);
        Ok(tape.push(od, y, Op::Permute(Permute { x: x.0, perm: perm.to_vec() }), needs_grad))
    }

    pub(super) fn backward(&self, tape: &mut Tape, out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let mut inverse = vec![0; self.perm.len()];
        for (o, &p) in self.perm.iter().enumerate() {
            inverse[p] = o;
        }
        let mut dx = tape.pool.take(g.len());
        permute_copy(g, &tape.nodes[out].dims, &inverse, &mut dx);
        tape.accumulate_grad(grads, self.x, dx);
        Ok(())
    }
}

/// y = x[.., start..start + len, ..] along axis `dim` (a copy); backward scatters into zeros.
pub(super) struct Narrow {
    x: usize,
    dim: usize,
    start: usize,
}

impl Narrow {
    /// [`crate::model::ops::Ops::narrow`].
    pub(super) fn forward(tape: &mut Tape, x: &Val, dim: usize, start: usize, len: usize) -> Result<Val> {
        let xd = tape.nodes[x.0].dims.clone();
        ensure!(dim < xd.len() && start + len <= xd[dim], "narrow({dim}, {start}, {len}) of {xd:?}");
        let (outer, inner) = (numel(&xd[..dim]), numel(&xd[dim + 1..]));
        let mut y = tape.pool.take(outer * len * inner);
        let xs = tape.values(x.0);
        for o in 0..outer {
            let at = (o * xd[dim] + start) * inner;
            y[o * len * inner..(o + 1) * len * inner].copy_from_slice(&xs[at..at + len * inner]);
        }
        let mut od = xd;
        od[dim] = len;
        let needs_grad = tape.needs_grad(x.0);
        Ok(tape.push(od, y, Op::Narrow(Narrow { x: x.0, dim, start }), needs_grad))
    }

    pub(super) fn backward(&self, tape: &mut Tape, out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let (dim, start) = (self.dim, self.start);
        let xd = tape.nodes[self.x].dims.clone();
        let len = tape.nodes[out].dims[dim];
        let mut dx = tape.pool.zeroed(numel(&xd));
        let (outer, inner) = (numel(&xd[..dim]), numel(&xd[dim + 1..]));
        for o in 0..outer {
            let src = &g[o * len * inner..(o + 1) * len * inner];
            let at = (o * xd[dim] + start) * inner;
            dx[at..at + len * inner].copy_from_slice(src);
        }
        tape.accumulate_grad(grads, self.x, dx);
        Ok(())
    }
}

/// y = the inputs concatenated along axis `dim`; backward slices the gradient back apart.
pub(super) struct Concat {
    xs: Vec<usize>,
    dim: usize,
}

impl Concat {
    /// [`crate::model::ops::Ops::concat`].
    pub(super) fn forward(tape: &mut Tape, xs: &[Val], dim: usize) -> Result<Val> {
        ensure!(!xs.is_empty(), "concat of nothing");
        let mut od = tape.nodes[xs[0].0].dims.clone();
        ensure!(dim < od.len(), "concat along axis {dim} of rank {}", od.len());
        od[dim] = 0;
        for x in xs {
            let d = &tape.nodes[x.0].dims;
            ensure!(
                d.len() == od.len() && d.iter().zip(&od).enumerate().all(|(i, (a, b))| i == dim || a == b),
                "concat: shapes differ off axis {dim}"
            );
            od[dim] += d[dim];
        }
        let (outer, inner) = (numel(&od[..dim]), numel(&od[dim + 1..]));
        let mut y = tape.pool.take(numel(&od));
        let mut off = 0;
        for x in xs {
            let len = tape.nodes[x.0].dims[dim];
            let src = tape.values(x.0);
            for o in 0..outer {
                let at = (o * od[dim] + off) * inner;
                y[at..at + len * inner].copy_from_slice(&src[o * len * inner..(o + 1) * len * inner]);
            }
            off += len;
        }
        let needs_grad = xs.iter().any(|x| tape.needs_grad(x.0));
        let op = Concat { xs: xs.iter().map(|x| x.0).collect(), dim };
        Ok(tape.push(od, y, Op::Concat(op), needs_grad))
    }

    pub(super) fn backward(&self, tape: &mut Tape, out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let dim = self.dim;
        let od = tape.nodes[out].dims.clone();
        let (outer, inner) = (numel(&od[..dim]), numel(&od[dim + 1..]));
        let mut off = 0;
        for &x in &self.xs {
            let len = tape.nodes[x].dims[dim];
            if tape.needs_grad(x) {
                let mut dx = tape.pool.take(outer * len * inner);
                for o in 0..outer {
                    let at = (o * od[dim] + off) * inner;
                    dx[o * len * inner..(o + 1) * len * inner].copy_from_slice(&g[at..at + len * inner]);
                }
                tape.accumulate_grad(grads, x, dx);
            }
            off += len;
        }
        Ok(())
    }
}

/// Nearest-neighbour 2x upsampling of [B, C, H, W].
pub(super) struct Upsample2x {
    x: usize,
}

impl Upsample2x {
    /// [`crate::model::ops::Ops::upsample_nearest2x`].
    pub(super) fn forward(tape: &mut Tape, x: &Val) -> Result<Val> {
        let xd = tape.nodes[x.0].dims.clone();
        ensure!(xd.len() == 4, "upsample input must be [B, C, H, W], got {xd:?}");
        let (h, w) = (xd[2], xd[3]);
        let mut y = tape.pool.take(4 * numel(&xd));
        y.par_chunks_mut(4 * h * w).zip(tape.values(x.0).par_chunks(h * w)).for_each(|(o, p)| {
            for yy in 0..2 * h {
                for xx in 0..2 * w {
                    o[yy * 2 * w + xx] = p[(yy / 2) * w + xx / 2];
                }
            }
        });
        let needs_grad = tape.needs_grad(x.0);
        Ok(tape.push(vec![xd[0], xd[1], 2 * h, 2 * w], y, Op::Upsample2x(Upsample2x { x: x.0 }), needs_grad))
    }

    pub(super) fn backward(&self, tape: &mut Tape, _out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let d = tape.nodes[self.x].dims.clone();
        let (h, w) = (d[2], d[3]);
        let mut dx = tape.pool.take(numel(&d));
        dx.par_chunks_mut(h * w).zip(g.par_chunks(4 * h * w)).for_each(|(o, gp)| {
            for y in 0..h {
                for xx in 0..w {
                    let r0 = 2 * y * 2 * w + 2 * xx;
                    let r1 = r0 + 2 * w;
                    o[y * w + xx] = gp[r0] + gp[r0 + 1] + gp[r1] + gp[r1 + 1];
                }
            }
        });
        tape.accumulate_grad(grads, self.x, dx);
        Ok(())
    }
}
