//! GroupNorm (Wu & He 2018) + a per-(image, channel) affine + optional SiLU, forward and backward in one
//! pass each, parallel over (image, group); compiled for AVX2 + FMA and for the baseline, picked at run time.
//!
//! Tested against the composition of Candle's ops (`gn_reference` in `tests`).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{lane_sum_by, sigmoid};
use super::{slice, with_f32};

/// The geometry and settings of one GroupNorm + affine + activation over x [B, groups * cpg, hw].
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupNormSpec {
    /// Channels per group (cpg).
    pub(crate) channels_per_group: usize,
    /// Elements per channel (the product of the spatial dimensions).
    pub(crate) hw: usize,
    pub(crate) eps: f32,
    /// SiLU after the affine (else the identity).
    pub(crate) silu: bool,
}

impl GroupNormSpec {
    /// Elements per (image, group).
    fn group_len(&self) -> usize {
        self.channels_per_group * self.hw
    }
}

/// What the forward pass reads: x [.., C, hw] and the affine a, d [.., C] (y = act(a * x_hat + d)), of the
/// whole batch or of one (image, group).
#[derive(Clone, Copy)]
pub(crate) struct NormInput<'a> {
    pub(crate) x: &'a [f32],
    pub(crate) a: &'a [f32],
    pub(crate) d: &'a [f32],
}

impl NormInput<'_> {
    /// The `g`-th (image, group), counted image-major.
    fn group(&self, g: usize, spec: &GroupNormSpec) -> Self {
        let (cpg, glen) = (spec.channels_per_group, spec.group_len());
        Self {
            x: &self.x[g * glen..(g + 1) * glen],
            a: &self.a[g * cpg..(g + 1) * cpg],
            d: &self.d[g * cpg..(g + 1) * cpg],
        }
    }
}

/// What the backward pass writes (all overwritten): dx shaped like x, da and dd like a and d.
pub(crate) struct NormGrads<'a> {
    pub(crate) dx: &'a mut [f32],
    pub(crate) da: &'a mut [f32],
    pub(crate) dd: &'a mut [f32],
}

/// y = act(a[b, c] * x_hat + d[b, c]), x_hat = GroupNorm statistics of x over (channels of the group, H, W).
struct GroupNormAct {
    groups: usize,
    eps: f32,
    silu: bool,
}

/// Mean and 1/sqrt(var + eps) of one group's values (two passes, eight lanes: precise and vectorisable).
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lane_sum_by(x, |v| v) / n;
    let var = lane_sum_by(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// One (image, group)'s forward pass; `stats` receives its (mean, 1/sqrt(var + eps)) for the backward pass.
#[inline(always)]
fn gn_fwd_group(input: NormInput, y: &mut [f32], stats: &mut [f32], spec: &GroupNormSpec) {
    let NormInput { x, a, d } = input;
    let (hw, silu) = (spec.hw, spec.silu);
    let (mean, rstd) = moments(x, spec.eps);
    stats.copy_from_slice(&[mean, rstd]);
    for (c, (xc, yc)) in x.chunks_exact(hw).zip(y.chunks_exact_mut(hw)).enumerate() {
        let sc = rstd * a[c];
        let sh = d[c] - mean * sc;
        if silu {
            for (o, &v) in yc.iter_mut().zip(xc) {
                let z = v * sc + sh;
                *o = z * sigmoid(z);
            }
        } else {
            for (o, &v) in yc.iter_mut().zip(xc) {
                *o = v * sc + sh;
            }
        }
    }
}

/// One (image, group)'s backward pass: writes dx, and da, dd receive the per-channel sums. `stats` are the
/// forward pass's (mean, rstd) when it kept them, else they are computed again.
#[inline(always)]
fn gn_bwd_group(input: NormInput, dy: &[f32], grads: NormGrads, stats: Option<&[f32]>, spec: &GroupNormSpec) {
    let NormInput { x, a, d } = input;
    let NormGrads { dx, da, dd } = grads;
    let (hw, silu) = (spec.hw, spec.silu);
    let (mean, rstd) = match stats {
        Some(&[mean, rstd]) => (mean, rstd),
        _ => moments(x, spec.eps),
    };
    // pass 1: dz = dy * act'(z); da = sum dz x_hat; dd = sum dz; dx <- dx_hat = dz a; group sums of dx_hat
    // and dx_hat x_hat
    let (mut s1, mut s2) = (0f32, 0f32);
    for c in 0..a.len() {
        let r = c * hw..(c + 1) * hw;
        let (xc, gc, oc) = (&x[r.clone()], &dy[r.clone()], &mut dx[r]);
        let (sc, ac) = (rstd * a[c], a[c]);
        let sh = d[c] - mean * sc;
        // dz = dy * act'(z) into dx first (a plain elementwise loop, which vectorises; with the sums below in
        // the same loop it did not: 5x slower, measured) ...
        if silu {
            for (o, (&v, &g)) in oc.iter_mut().zip(xc.iter().zip(gc)) {
                let z = v * sc + sh;
                let s = sigmoid(z);
                // d/dz z s(z) = s (1 + z (1 - s))
                *o = g * s * (1.0 + z * (1.0 - s));
            }
        } else {
            oc.copy_from_slice(gc);
        }
        // ... then the two sums in eight lanes (a strict sequential float sum would stay scalar), dx_hat = dz a
        // written back in the same pass
        let (mut sa, mut sd) = ([0f32; 8], [0f32; 8]);
        let n8 = hw / 8 * 8;
        for (o8, x8) in oc[..n8].chunks_exact_mut(8).zip(xc[..n8].chunks_exact(8)) {
            for l in 0..8 {
                sa[l] += o8[l] * ((x8[l] - mean) * rstd);
                sd[l] += o8[l];
                o8[l] *= ac;
            }
        }
        for (o, &v) in oc[n8..].iter_mut().zip(&xc[n8..]) {
            sa[0] += *o * ((v - mean) * rstd);
            sd[0] += *o;
            *o *= ac;
        }
        da[c] = sa.iter().sum();
        dd[c] = sd.iter().sum();
        // sum dx_hat = a sum dz; sum dx_hat x_hat = a sum dz x_hat
        s1 += a[c] * dd[c];
        s2 += a[c] * da[c];
    }
    // pass 2: dx = rstd (dx_hat - mean(dx_hat) - x_hat mean(dx_hat x_hat))  (Wu & He 2018; as in PyTorch)
    let n = x.len() as f32;
    let (m1, m2) = (s1 / n, s2 / n);
    for (o, &v) in dx.iter_mut().zip(x) {
        let xh = (v - mean) * rstd;
        *o = rstd * (*o - m1 - xh * m2);
    }
}

/// The per-group forward function: (input, y, stats) of one (image, group).
type GnFwdGroup<'a> = dyn Fn(NormInput, &mut [f32], &mut [f32]) + Sync + 'a;

/// Runs `group` for every (image, group), in parallel.
fn gn_fwd_par(input: NormInput, y: &mut [f32], stats: &mut [f32], spec: &GroupNormSpec, group: &GnFwdGroup) {
    y.par_chunks_mut(spec.group_len())
        .zip(stats.par_chunks_mut(2))
        .enumerate()
        .for_each(|(g, (yg, sg))| group(input.group(g, spec), yg, sg));
}

fn gn_fwd_generic(input: NormInput, y: &mut [f32], stats: &mut [f32], spec: GroupNormSpec) {
    gn_fwd_par(input, y, stats, &spec, &|ig, yg, sg| gn_fwd_group(ig, yg, sg, &spec))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gn_fwd_avx2(input: NormInput, y: &mut [f32], stats: &mut [f32], spec: GroupNormSpec) {
    // SAFETY (inside): the same features as the caller
    gn_fwd_par(input, y, stats, &spec, &|ig, yg, sg| unsafe { gn_fwd_group_avx2(ig, yg, sg, &spec) })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gn_fwd_group_avx2(input: NormInput, y: &mut [f32], stats: &mut [f32], spec: &GroupNormSpec) {
    gn_fwd_group(input, y, stats, spec)
}

/// The per-group backward function: (input, dy, grads, the forward's stats) of one (image, group).
type GnBwdGroup<'a> = dyn Fn(NormInput, &[f32], NormGrads, Option<&[f32]>) + Sync + 'a;

/// Runs `group` for every (image, group), in parallel.
fn gn_bwd_par(
    input: NormInput,
    dy: &[f32],
    grads: NormGrads,
    stats: Option<&[f32]>,
    spec: &GroupNormSpec,
    group: &GnBwdGroup,
) {
    let (cpg, glen) = (spec.channels_per_group, spec.group_len());
    let NormGrads { dx, da, dd } = grads;
    dx.par_chunks_mut(glen).zip(da.par_chunks_mut(cpg).zip(dd.par_chunks_mut(cpg))).enumerate().for_each(
        |(g, (dxg, (dag, ddg)))| {
            let dyg = &dy[g * glen..(g + 1) * glen];
            let sg = stats.map(|s| &s[2 * g..2 * g + 2]);
            group(input.group(g, spec), dyg, NormGrads { dx: dxg, da: dag, dd: ddg }, sg)
        },
    );
}

fn gn_bwd_generic(input: NormInput, dy: &[f32], grads: NormGrads, stats: Option<&[f32]>, spec: GroupNormSpec) {
    gn_bwd_par(input, dy, grads, stats, &spec, &|ig, dyg, gg, sg| gn_bwd_group(ig, dyg, gg, sg, &spec))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gn_bwd_avx2(input: NormInput, dy: &[f32], grads: NormGrads, stats: Option<&[f32]>, spec: GroupNormSpec) {
    gn_bwd_par(input, dy, grads, stats, &spec, &|ig, dyg, gg, sg| {
        // SAFETY: the same features as the caller
        unsafe { gn_bwd_group_avx2(ig, dyg, gg, sg, &spec) }
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gn_bwd_group_avx2(
    input: NormInput,
    dy: &[f32],
    grads: NormGrads,
    stats: Option<&[f32]>,
    spec: &GroupNormSpec,
) {
    gn_bwd_group(input, dy, grads, stats, spec)
}

/// act(a[b, c] * x_hat + d[b, c]) over x [B, groups * cpg, hw] (y overwritten), parallel over (image, group);
/// `stats` [B * groups, 2] receives each group's (mean, 1/sqrt(var + eps)) for [`gn_backward`].
pub(crate) fn gn_forward(input: NormInput, y: &mut [f32], stats: &mut [f32], spec: GroupNormSpec) {
    dispatch!(gn_fwd_avx2, gn_fwd_generic(input, y, stats, spec))
}

/// The backward pass of [`gn_forward`] for the output gradient `dy`: writes dx, da and dd (all overwritten).
/// `stats`: the forward's, or None to compute them again from x (two passes over it).
pub(crate) fn gn_backward(input: NormInput, dy: &[f32], grads: NormGrads, stats: Option<&[f32]>, spec: GroupNormSpec) {
    dispatch!(gn_bwd_avx2, gn_bwd_generic(input, dy, grads, stats, spec))
}

impl GroupNormAct {
    /// (batch, the kernel's spec) for x and the affine a.
    fn spec(&self, x: &[usize], a: &[usize]) -> Result<(usize, GroupNormSpec)> {
        let (b, c) = (x[0], x[1]);
        let hw: usize = x[2..].iter().product();
        if a != [b, c] || !c.is_multiple_of(self.groups) {
            candle_core::bail!("group_norm_act: x {x:?}, affine {a:?}, {} groups", self.groups);
        }
        Ok((b, GroupNormSpec { channels_per_group: c / self.groups, hw, eps: self.eps, silu: self.silu }))
    }
}

impl CustomOp3 for GroupNormAct {
    fn name(&self) -> &'static str {
        "fused-group-norm-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, d) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (_, spec) = self.spec(l1.dims(), l2.dims())?;
        let mut y = vec![0f32; x.len()];
        let mut stats = vec![0f32; 2 * a.len() / spec.channels_per_group];
        gn_forward(NormInput { x, a, d }, &mut y, &mut stats, spec);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        d: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, spec) = self.spec(x.dims(), a.dims())?;
        let c = spec.channels_per_group * self.groups;
        let mut dx = vec![0f32; x.elem_count()];
        let (mut da, mut dd) = (vec![0f32; b * c], vec![0f32; b * c]);
        with_f32(x, |xs| {
            with_f32(grad, |gs| {
                with_f32(a, |as_| {
                    with_f32(d, |ds| {
                        let grads = NormGrads { dx: &mut dx, da: &mut da, dd: &mut dd };
                        gn_backward(NormInput { x: xs, a: as_, d: ds }, gs, grads, None, spec)
                    })
                })
            })
        })????;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(da, (b, c), dev)?),
            Some(Tensor::from_vec(dd, (b, c), dev)?),
        ))
    }
}

/// act(GroupNorm(x) * a + d) for x [B, C, ...] and per-(image, channel) a, d [B, C]; act is SiLU or the
/// identity. Fused on the CPU for f32; callers fall back to the composed ops elsewhere (see
/// [`super::fused_applies`]).
pub fn group_norm_act(x: &Tensor, groups: usize, eps: f64, a: &Tensor, d: &Tensor, silu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&a.contiguous()?, &d.contiguous()?, GroupNormAct { groups, eps: eps as f32, silu })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::tests::close;
    use candle_core::{Device, Var, D};

    /// The composed reference: GroupNorm through Candle's ops, then a * x_hat + d and SiLU.
    fn gn_reference(x: &Tensor, groups: usize, a: &Tensor, d: &Tensor, silu: bool) -> Tensor {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let xg = x.reshape((b, groups, ())).unwrap();
        let mean = xg.mean_keepdim(D::Minus1).unwrap();
        let cen = xg.broadcast_sub(&mean).unwrap();
        let var = cen.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xh = cen.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().reshape(dims.clone()).unwrap();
        let mut shape = vec![b, c];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let z = xh
            .broadcast_mul(&a.reshape(shape.clone()).unwrap())
            .unwrap()
            .broadcast_add(&d.reshape(shape).unwrap())
            .unwrap();
        if silu {
            z.silu().unwrap()
        } else {
            z
        }
    }

    #[test]
    fn group_norm_act_matches_candle_values_and_gradients() {
        let dev = Device::Cpu;
        for &(b, c, g, h, w, silu) in &[
            (1usize, 4usize, 2usize, 7usize, 7usize, true),
            (3, 6, 3, 7, 5, false),
            (2, 12, 4, 14, 14, true),
            (2, 5, 1, 3, 3, true),
            (4, 32, 32, 7, 7, true),
        ] {
            // an offset and scale so that the statistics matter
            let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (b, c, h, w), &dev).unwrap() + 0.7).unwrap()).unwrap();
            let a = Var::randn(1f32, 0.5, (b, c), &dev).unwrap();
            let d = Var::randn(0f32, 0.5, (b, c), &dev).unwrap();
            let ours = group_norm_act(&x, g, 1e-5, &a, &d, silu).unwrap();
            let reference = gn_reference(&x, g, &a, &d, silu);
            let what = format!("b{b} c{c} g{g} {h}x{w} silu {silu}");
            close(&ours, &reference, 1e-5, &format!("{what} forward"));
            let probe = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (v, name) in [(&x, "dx"), (&a, "da"), (&d, "dd")] {
                close(g1.get(v).unwrap(), g2.get(v).unwrap(), 2e-5, &format!("{what} {name}"));
            }
            // the backward pass from the forward's kept statistics: the same numbers as computing them again
            let spec = GroupNormSpec { channels_per_group: c / g, hw: h * w, eps: 1e-5, silu };
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (xs, as_, ds, dy) = (v(&x), v(&a), v(&d), v(&probe));
            let input = NormInput { x: &xs, a: &as_, d: &ds };
            let (mut y, mut stats) = (vec![0f32; xs.len()], vec![0f32; 2 * b * g]);
            gn_forward(input, &mut y, &mut stats, spec);
            let backward = |stats: Option<&[f32]>| {
                let (mut dx, mut da, mut dd) = (vec![0f32; xs.len()], vec![0f32; b * c], vec![0f32; b * c]);
                gn_backward(input, &dy, NormGrads { dx: &mut dx, da: &mut da, dd: &mut dd }, stats, spec);
                (dx, da, dd)
            };
            assert!(backward(Some(&stats)) == backward(None), "{what}: kept statistics");
        }
    }
}
