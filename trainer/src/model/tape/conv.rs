//! The weight layers, both GEMMs: conv2d (the fused kernels of [`crate::model::kernels`]) and linear.

use anyhow::{ensure, Result};
use gemm::Parallelism;

use super::{Gradients, Op, ParamSlot, Tape, Val};
use crate::model::kernels::{self, ConvGeo};
use crate::model::params::Param;

/// y = conv2d(x, w) + b; backward recomputes the im2col matrix from x.
pub(super) struct Conv {
    x: usize,
    weight: ParamSlot,
    bias: ParamSlot,
    geo: ConvGeo,
    out_channels: usize,
}

impl Conv {
    /// The node the backward pass reads (the input: it recomputes the im2col matrix or the tiles).
    pub(super) fn x(&self) -> usize {
        self.x
    }

    pub(super) fn kind(&self) -> &'static str {
        self.geo.kind()
    }

    /// [`crate::model::ops::Ops::conv2d`]: x [B, C, H, W], square kernel w [Co, C, k, k].
    pub(super) fn forward(
        tape: &mut Tape,
        x: &Val,
        w: &Param,
        b: &Param,
        stride: usize,
        padding: usize,
    ) -> Result<Val> {
        let xd = tape.nodes[x.0].dims.clone();
        ensure!(xd.len() == 4, "conv2d input must be [B, C, H, W], got {xd:?}");
        let wd = w.value.dims().to_vec();
        ensure!(wd.len() == 4 && wd[1] == xd[1] && wd[2] == wd[3], "conv2d: input {xd:?} does not fit kernel {wd:?}");
        let geo = ConvGeo::new(xd[1], xd[2], xd[3], (wd[2], wd[3]), stride, padding)?;
        let (bsz, out_channels) = (xd[0], wd[0]);
        let (weight, bias) = (tape.param(w)?, tape.param(b)?);
        let mut out = tape.pool.take(bsz * out_channels * geo.out_hw());
        let xs = tape.values(x.0);
        kernels::with_f32(&weight.tensor, |ws| {
            kernels::with_f32(&bias.tensor, |bs| kernels::conv2d_forward(xs, ws, bs, bsz, out_channels, &geo, &mut out))
        })??;
        let dims = vec![bsz, out_channels, geo.oh, geo.ow];
        Ok(tape.push(dims, out, Op::Conv(Conv { x: x.0, weight, bias, geo, out_channels }), true))
    }

    pub(super) fn backward(&self, tape: &mut Tape, _out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let x = self.x;
        let bsz = tape.nodes[x].dims[0];
        let need_dx = tape.needs_grad(x);
        let mut dx = if need_dx { tape.pool.take(tape.values(x).len()) } else { vec![] };
        let xs = tape.values(x);
        let (dw, db) = kernels::with_f32(&self.weight.tensor, |ws| {
            kernels::conv2d_backward(xs, ws, g, bsz, self.out_channels, &self.geo, need_dx.then_some(&mut dx[..]))
        })?;
        grads.accumulate_param_grad(self.weight.slot, dw);
        grads.accumulate_param_grad(self.bias.slot, db);
        if need_dx {
            tape.accumulate_grad(grads, x, dx);
        }
        Ok(())
    }
}

/// y = x W^T + b for x [B, in], W [out, in].
pub(super) struct Linear {
    x: usize,
    weight: ParamSlot,
    bias: ParamSlot,
}

impl Linear {
    /// The node the backward pass reads.
    pub(super) fn x(&self) -> usize {
        self.x
    }

    /// [`crate::model::ops::Ops::linear`].
    pub(super) fn forward(tape: &mut Tape, x: &Val, w: &Param, b: &Param) -> Result<Val> {
        let xd = tape.nodes[x.0].dims.clone();
        let (cout, cin) = w.value.dims2()?;
        ensure!(xd.len() == 2 && xd[1] == cin, "linear: input {xd:?} does not fit weight [{cout}, {cin}]");
        let bsz = xd[0];
        let (weight, bias) = (tape.param(w)?, tape.param(b)?);
        let mut out = tape.pool.take(bsz * cout);
        let xs = tape.values(x.0);
        kernels::with_f32(&weight.tensor, |ws| {
            kernels::with_f32(&bias.tensor, |bs| {
                for row in out.chunks_exact_mut(cout) {
                    row.copy_from_slice(bs);
                }
                // y += x W^T  ([B, in] . [in, out])
                kernels::gemm_into(&mut out, true, (bsz, cout, cin), xs, (cin, 1), ws, (1, cin), Parallelism::None)
            })
        })??;
        Ok(tape.push(vec![bsz, cout], out, Op::Linear(Linear { x: x.0, weight, bias }), true))
    }

    pub(super) fn backward(&self, tape: &mut Tape, _out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let x = self.x;
        let (bsz, cin) = (tape.nodes[x].dims[0], tape.nodes[x].dims[1]);
        let cout = g.len() / bsz;
        let xs = tape.values(x);
        let mut dw = vec![0f32; cout * cin];
        // dW = g^T x  ([out, B] . [B, in])
        kernels::gemm_into(&mut dw, false, (cout, cin, bsz), g, (1, cout), xs, (cin, 1), Parallelism::None);
        let mut db = vec![0f32; cout];
        for row in g.chunks_exact(cout) {
            db.iter_mut().zip(row).for_each(|(d, v)| *d += v);
        }
        if tape.needs_grad(x) {
            let mut dx = tape.pool.take(bsz * cin);
            // dx = g W  ([B, out] . [out, in])
            kernels::with_f32(&self.weight.tensor, |ws| {
                kernels::gemm_into(&mut dx, false, (bsz, cin, cout), g, (cout, 1), ws, (cin, 1), Parallelism::None)
            })?;
            tape.accumulate_grad(grads, x, dx);
        }
        grads.accumulate_param_grad(self.weight.slot, dw);
        grads.accumulate_param_grad(self.bias.slot, db);
        Ok(())
    }
}
