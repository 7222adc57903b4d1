//! GroupNorm + affine (+ the scale-shift norm) + SiLU as one op, on the fused kernel of
//! [`crate::model::kernels`].

use anyhow::{ensure, Result};

use super::{numel, Gradients, Op, ParamSlot, Tape, Val};
use crate::model::kernels::{self, GroupNormSpec, NormGrads, NormInput};
use crate::model::params::Param;

/// act(GroupNorm(x) a + d), with the kernel's per-(image, channel) affine a = w (1 + scale),
/// d = b (1 + scale) + shift; a, d [B, C] and the group statistics are kept for the backward pass.
pub(super) struct GroupNormAct {
    x: usize,
    weight: ParamSlot,
    bias: ParamSlot,
    /// The (scale, shift) nodes of the scale-shift norm, when used.
    scale_shift: Option<(usize, usize)>,
    a: Vec<f32>,
    d: Vec<f32>,
    /// Each (image, group)'s mean and 1/sqrt(var + eps) from the forward pass: they spare the backward two
    /// passes over x.
    stats: Vec<f32>,
    spec: GroupNormSpec,
}

impl GroupNormAct {
    /// The nodes the backward pass reads: the input (x_hat is computed again from it) and the scale.
    pub(super) fn reads(&self) -> Vec<usize> {
        let mut r = vec![self.x];
        r.extend(self.scale_shift.map(|(scale, _)| scale));
        r
    }

    /// [`crate::model::ops::Ops::group_norm_act`] for x [B, C, ...], with GroupNorm's affine (w, b).
    pub(super) fn forward(
        tape: &mut Tape,
        x: &Val,
        (groups, eps): (usize, f64),
        (w, b): (&Param, &Param),
        scale_shift: Option<(&Val, &Val)>,
        silu: bool,
    ) -> Result<Val> {
        let xd = tape.nodes[x.0].dims.clone();
        ensure!(xd.len() >= 2, "group_norm input must be [B, C, ...], got {xd:?}");
        let (bsz, c) = (xd[0], xd[1]);
        ensure!(groups > 0 && c % groups == 0, "group_norm: {c} channels in {groups} groups");
        let hw = numel(&xd[2..]);
        let (weight, bias) = (tape.param(w)?, tape.param(b)?);
        let (ws, bs) =
            (kernels::with_f32(&weight.tensor, |v| v.to_vec())?, kernels::with_f32(&bias.tensor, |v| v.to_vec())?);
        let (mut a, mut d) = (vec![0f32; bsz * c], vec![0f32; bsz * c]);
        let scale_shift = match scale_shift {
            Some((s, t)) => {
                for v in [s, t] {
                    ensure!(numel(&tape.nodes[v.0].dims) == bsz * c, "scale/shift must hold [B, C] values");
                }
                let (sv, tv) = (tape.values(s.0), tape.values(t.0));
                for k in 0..bsz * c {
                    let s1 = 1.0 + sv[k];
                    a[k] = ws[k % c] * s1;
                    d[k] = bs[k % c] * s1 + tv[k];
                }
                Some((s.0, t.0))
            }
            None => {
                for k in 0..bsz * c {
                    a[k] = ws[k % c];
                    d[k] = bs[k % c];
                }
                None
            }
        };
        let mut y = tape.pool.take(bsz * c * hw);
        let spec = GroupNormSpec { channels_per_group: c / groups, hw, eps: eps as f32, silu };
        let mut stats = vec![0f32; 2 * bsz * groups];
        kernels::gn_forward(NormInput { x: tape.values(x.0), a: &a, d: &d }, &mut y, &mut stats, spec);
        let op = GroupNormAct { x: x.0, weight, bias, scale_shift, a, d, stats, spec };
        Ok(tape.push(xd, y, Op::GroupNormAct(op), true))
    }

    pub(super) fn backward(&self, tape: &mut Tape, _out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let dims = &tape.nodes[self.x].dims;
        let (bsz, c) = (dims[0], dims[1]);
        let hw = numel(&dims[2..]);
        let mut dx = tape.pool.take(bsz * c * hw);
        let (mut da, mut dd) = (vec![0f32; bsz * c], vec![0f32; bsz * c]);
        let xs = tape.values(self.x);
        let input = NormInput { x: xs, a: &self.a, d: &self.d };
        let grads_out = NormGrads { dx: &mut dx, da: &mut da, dd: &mut dd };
        kernels::gn_backward(input, g, grads_out, Some(&self.stats), self.spec);
        let (mut dw, mut dbias) = (vec![0f32; c], vec![0f32; c]);
        match self.scale_shift {
            None => {
                for bi in 0..bsz {
                    for ch in 0..c {
                        dw[ch] += da[bi * c + ch];
                        dbias[ch] += dd[bi * c + ch];
                    }
                }
            }
            Some((scale, shift)) => {
                let (ws, bs) = (
                    kernels::with_f32(&self.weight.tensor, |v| v.to_vec())?,
                    kernels::with_f32(&self.bias.tensor, |v| v.to_vec())?,
                );
                let mut dscale = tape.pool.take(bsz * c);
                let s = tape.values(scale);
                for bi in 0..bsz {
                    for ch in 0..c {
                        let k = bi * c + ch;
                        let s1 = 1.0 + s[k];
                        dw[ch] += da[k] * s1;
                        dbias[ch] += dd[k] * s1;
                        dscale[k] = da[k] * ws[ch] + dd[k] * bs[ch];
                    }
                }
                let mut dshift = tape.pool.take(bsz * c);
                dshift.copy_from_slice(&dd);
                tape.accumulate_grad(grads, scale, dscale);
                tape.accumulate_grad(grads, shift, dshift);
            }
        }
        grads.accumulate_param_grad(self.weight.slot, dw);
        grads.accumulate_param_grad(self.bias.slot, dbias);
        tape.accumulate_grad(grads, self.x, dx);
        Ok(())
    }
}
