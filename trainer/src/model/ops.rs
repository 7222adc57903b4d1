//! The primitive operations the U-Net is written in, and their Candle implementation.
//!
//! The U-Net's forward pass (unet.rs) is written once, against the [`Ops`] trait. [`CandleOps`] executes it
//! on tensors (training, previews, evaluation); the ONNX exporter (export.rs) implements the same trait by
//! emitting graph nodes. The exported graph therefore has exactly the structure of the trained model.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::model::kernels;
use crate::model::params::Param;

/// Graph primitives. Shapes are NCHW; every binary op broadcasts numpy-style.
pub trait Ops {
    type T: Clone;
    /// 2-D convolution, square kernel from `w` [out, in, k, k], symmetric padding.
    fn conv2d(&mut self, x: &Self::T, w: &Param, b: &Param, stride: usize, padding: usize) -> Result<Self::T>;
    /// x [B, in] -> [B, out] with w [out, in] (PyTorch layout).
    fn linear(&mut self, x: &Self::T, w: &Param, b: &Param) -> Result<Self::T>;
    /// GroupNorm over [B, C, ...] with per-channel affine (Wu & He 2018); statistics in f32.
    fn group_norm(&mut self, x: &Self::T, groups: usize, eps: f64, w: &Param, b: &Param) -> Result<Self::T>;
    fn silu(&mut self, x: &Self::T) -> Result<Self::T>;
    fn add(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    fn mul(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// x * mul + add.
    fn affine(&mut self, x: &Self::T, mul: f64, add: f64) -> Result<Self::T>;
    /// Reshape; `-1` (at most once) is inferred, which is how the dynamic batch dimension is written.
    fn reshape(&mut self, x: &Self::T, dims: &[i64]) -> Result<Self::T>;
    fn permute(&mut self, x: &Self::T, perm: &[usize]) -> Result<Self::T>;
    fn narrow(&mut self, x: &Self::T, dim: usize, start: usize, len: usize) -> Result<Self::T>;
    fn concat(&mut self, xs: &[Self::T], dim: usize) -> Result<Self::T>;
    fn matmul(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// Softmax over the last axis; computed in f32.
    fn softmax_last(&mut self, x: &Self::T) -> Result<Self::T>;
    /// Nearest-neighbour 2x upsampling of [B, C, H, W].
    fn upsample_nearest2x(&mut self, x: &Self::T) -> Result<Self::T>;
    /// Dropout with drop probability p (identity at inference).
    fn dropout(&mut self, x: &Self::T, p: f64) -> Result<Self::T>;
    /// Rows of `table` [N, D] picked by integer ids [B] -> [B, D].
    fn embedding(&mut self, ids: &Self::T, table: &Param) -> Result<Self::T>;
    /// Integer timesteps [B] -> f32 [B].
    fn timesteps_to_f32(&mut self, t: &Self::T) -> Result<Self::T>;
    /// A constant f32 vector.
    fn const_f32(&mut self, name: &str, values: &[f32]) -> Result<Self::T>;
    fn sin(&mut self, x: &Self::T) -> Result<Self::T>;
    fn cos(&mut self, x: &Self::T) -> Result<Self::T>;
    /// f32 -> the model's compute dtype (a no-op for f32 models).
    fn to_model_dtype(&mut self, x: &Self::T) -> Result<Self::T>;

    /// GroupNorm, then the scale-shift norm h (1 + scale) + shift when given (Dhariwal & Nichol 2021, sec. 3),
    /// then SiLU when `silu`. One op so that an implementation can fuse it; the default is the composition of
    /// the primitives (the ONNX graph is written this way).
    #[allow(clippy::too_many_arguments)]
    fn group_norm_act(
        &mut self,
        x: &Self::T,
        groups: usize,
        eps: f64,
        w: &Param,
        b: &Param,
        scale_shift: Option<(&Self::T, &Self::T)>,
        silu: bool,
    ) -> Result<Self::T> {
        group_norm_act_composed(self, x, groups, eps, w, b, scale_shift, silu)
    }

    /// softmax(scale * x) over the last axis (the default: affine, then [`Ops::softmax_last`]).
    fn softmax_last_scaled(&mut self, x: &Self::T, scale: f64) -> Result<Self::T> {
        let x = self.affine(x, scale, 0.0)?;
        self.softmax_last(&x)
    }
}

/// [`Ops::group_norm_act`] from the primitives.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_act_composed<O: Ops + ?Sized>(
    o: &mut O,
    x: &O::T,
    groups: usize,
    eps: f64,
    w: &Param,
    b: &Param,
    scale_shift: Option<(&O::T, &O::T)>,
    silu: bool,
) -> Result<O::T> {
    let h = o.group_norm(x, groups, eps, w, b)?;
    let h = match scale_shift {
        Some((scale, shift)) => {
            let s1 = o.affine(scale, 1.0, 1.0)?;
            let h = o.mul(&h, &s1)?;
            o.add(&h, shift)?
        }
        None => h,
    };
    if silu {
        o.silu(&h)
    } else {
        Ok(h)
    }
}

/// Fills `mask` with inverted-dropout factors: 0 with probability p, else 1 / (1 - p). Both gradient engines
/// draw their masks here, so they train alike; one u32 per element (drawn in bulk) decides.
pub fn dropout_mask(rng: &mut ChaCha8Rng, p: f64, mask: &mut [f32]) {
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    // u < keep * 2^32 with probability keep
    let threshold = (keep * 4_294_967_296.0).min(u32::MAX as f64) as u32;
    let mut bits = [0u32; 1024];
    for chunk in mask.chunks_mut(bits.len()) {
        let b = &mut bits[..chunk.len()];
        rng.fill(b);
        for (m, &u) in chunk.iter_mut().zip(b.iter()) {
            *m = if u < threshold { scale } else { 0.0 };
        }
    }
}

/// Runs the primitives on Candle tensors (with autograd when the params are variables).
pub struct CandleOps<'a> {
    /// Dropout is applied only when an RNG is given (training).
    pub dropout_rng: Option<&'a mut ChaCha8Rng>,
    pub dtype: DType,
    pub device: Device,
}

impl<'a> CandleOps<'a> {
    pub fn inference(device: &Device, dtype: DType) -> Self {
        Self { dropout_rng: None, dtype, device: device.clone() }
    }
    pub fn training(device: &Device, dtype: DType, rng: &'a mut ChaCha8Rng) -> Self {
        Self { dropout_rng: Some(rng), dtype, device: device.clone() }
    }
}

impl Ops for CandleOps<'_> {
    type T = Tensor;

    fn conv2d(&mut self, x: &Tensor, w: &Param, b: &Param, stride: usize, padding: usize) -> Result<Tensor> {
        Ok(kernels::conv2d(x, &w.value, &b.value, stride, padding)?)
    }

    fn group_norm_act(
        &mut self,
        x: &Tensor,
        groups: usize,
        eps: f64,
        w: &Param,
        b: &Param,
        scale_shift: Option<(&Tensor, &Tensor)>,
        silu: bool,
    ) -> Result<Tensor> {
        if !kernels::fused_applies(&[x, &w.value, &b.value]) {
            return group_norm_act_composed(self, x, groups, eps, w, b, scale_shift, silu);
        }
        // the per-(image, channel) affine of the fused kernel: a = w (1 + scale), d = b (1 + scale) + shift
        let (bsz, c) = (x.dim(0)?, x.dim(1)?);
        let (w, b) = (w.value.reshape((1, c))?, b.value.reshape((1, c))?);
        let (a, d) = match scale_shift {
            Some((scale, shift)) => {
                let s1 = (scale.reshape((bsz, c))? + 1.0)?;
                (w.broadcast_mul(&s1)?, b.broadcast_mul(&s1)?.add(&shift.reshape((bsz, c))?)?)
            }
            None => (w.broadcast_as((bsz, c))?.contiguous()?, b.broadcast_as((bsz, c))?.contiguous()?),
        };
        Ok(kernels::group_norm_act(x, groups, eps, &a, &d, silu)?)
    }

    fn softmax_last_scaled(&mut self, x: &Tensor, scale: f64) -> Result<Tensor> {
        Ok(kernels::softmax_last_scaled(x, scale)?)
    }

    fn linear(&mut self, x: &Tensor, w: &Param, b: &Param) -> Result<Tensor> {
        Ok(x.matmul(&w.value.t()?)?.broadcast_add(&b.value)?)
    }

    fn group_norm(&mut self, x: &Tensor, groups: usize, eps: f64, w: &Param, b: &Param) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (bsz, c) = (dims[0], dims[1]);
        let in_dtype = x.dtype();
        let xg = x.reshape((bsz, groups, ()))?.to_dtype(DType::F32)?;
        let mean = xg.mean_keepdim(D::Minus1)?;
        let centered = xg.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
        let mut wshape = vec![1usize; dims.len()];
        wshape[1] = c;
        let normed = normed.to_dtype(in_dtype)?.reshape(dims)?;
        Ok(normed.broadcast_mul(&w.value.reshape(wshape.clone())?)?.broadcast_add(&b.value.reshape(wshape)?)?)
    }

    fn silu(&mut self, x: &Tensor) -> Result<Tensor> {
        Ok(x.silu()?)
    }
    fn add(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.broadcast_add(b)?)
    }
    fn mul(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.broadcast_mul(b)?)
    }
    fn affine(&mut self, x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
        Ok(x.affine(mul, add)?)
    }
    fn reshape(&mut self, x: &Tensor, dims: &[i64]) -> Result<Tensor> {
        let known: usize = dims.iter().filter(|d| **d >= 0).map(|d| *d as usize).product();
        let shape: Vec<usize> =
            dims.iter().map(|d| if *d < 0 { x.elem_count() / known.max(1) } else { *d as usize }).collect();
        Ok(x.reshape(shape)?)
    }
    fn permute(&mut self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        Ok(x.permute(perm.to_vec())?.contiguous()?)
    }
    fn narrow(&mut self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        Ok(x.narrow(dim, start, len)?.contiguous()?)
    }
    fn concat(&mut self, xs: &[Tensor], dim: usize) -> Result<Tensor> {
        Ok(Tensor::cat(xs, dim)?)
    }
    fn matmul(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.contiguous()?.matmul(&b.contiguous()?)?)
    }
    fn softmax_last(&mut self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        Ok(candle_nn::ops::softmax(&x.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(dt)?)
    }
    fn upsample_nearest2x(&mut self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        Ok(x.upsample_nearest2d(2 * h, 2 * w)?)
    }
    fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        let Some(rng) = self.dropout_rng.as_deref_mut() else { return Ok(x.clone()) };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        // Inverted dropout with a seeded host-side mask, so training is reproducible on every device.
        let mut mask = vec![0f32; x.elem_count()];
        dropout_mask(rng, p, &mut mask);
        let mask = Tensor::from_vec(mask, x.dims(), &self.device)?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
    fn embedding(&mut self, ids: &Tensor, table: &Param) -> Result<Tensor> {
        Ok(table.value.index_select(ids, 0)?)
    }
    fn timesteps_to_f32(&mut self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?)
    }
    fn const_f32(&mut self, _name: &str, values: &[f32]) -> Result<Tensor> {
        Ok(Tensor::from_slice(values, values.len(), &self.device)?)
    }
    fn sin(&mut self, x: &Tensor) -> Result<Tensor> {
        Ok(x.sin()?)
    }
    fn cos(&mut self, x: &Tensor) -> Result<Tensor> {
        Ok(x.cos()?)
    }
    fn to_model_dtype(&mut self, x: &Tensor) -> Result<Tensor> {
        Ok(x.to_dtype(self.dtype)?)
    }
}

/// 2-D convolution as one GEMM over an im2col matrix:
/// y[co, (b,h,w)] = W[co, (ci,ky,kx)] . cols[(ci,ky,kx), (b,h,w)].
///
/// Candle's own conv2d backward goes through a naive conv_transpose2d loop on the CPU (and has no cuDNN
/// path on CUDA). Written this way, forward and backward are three large matrix products plus an
/// im2col/col2im pass: on the CPU a custom op with a hand-written col2im backward, elsewhere the same
/// matrix built from differentiable slices.
pub fn conv2d_gemm(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (co, ci, kh, kw) = w.dims4()?;
    if ci != c {
        candle_core::bail!("conv2d: input has {c} channels, kernel expects {ci}");
    }
    let oh = (h + 2 * padding - kh) / stride + 1;
    let ow = (wd + 2 * padding - kw) / stride + 1;
    let cols = if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Im2Col { kh, kw, stride, padding })?
    } else {
        im2col_sliced(x, kh, kw, stride, padding, (oh, ow))?
    };
    let wm = w.reshape((co, ci * kh * kw))?;
    let y = wm.matmul(&cols)?; // [Co, B*oh*ow]
                               // the bias is added along the contiguous axis, so its gradient is a fast last-axis sum
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((co, 1))?)?,
        None => y,
    };
    y.reshape((co, b, oh, ow))?.permute((1, 0, 2, 3))?.contiguous()
}

/// The im2col matrix [C*kh*kw, B*oh*ow] from slices of the padded input (differentiable on any device).
fn im2col_sliced(
    x: &Tensor,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    (oh, ow): (usize, usize),
) -> candle_core::Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let xc = x.permute((1, 0, 2, 3))?;
    let xp =
        if padding > 0 { xc.pad_with_zeros(2, padding, padding)?.pad_with_zeros(3, padding, padding)? } else { xc };
    if kh == 1 && kw == 1 && stride == 1 {
        return xp.contiguous()?.reshape((c, b * oh * ow));
    }
    let mut taps = Vec::with_capacity(kh * kw);
    for ky in 0..kh {
        for kx in 0..kw {
            let t = xp.narrow(2, ky, (oh - 1) * stride + 1)?.narrow(3, kx, (ow - 1) * stride + 1)?;
            let t = if stride > 1 {
                // keep every stride-th row and column: pad to a multiple of the stride, fold, take index 0
                let t = t.pad_with_zeros(2, 0, stride - 1)?.pad_with_zeros(3, 0, stride - 1)?;
                t.reshape((c, b, oh, stride, ow, stride))?.narrow(3, 0, 1)?.narrow(5, 0, 1)?.reshape((c, b, oh, ow))?
            } else {
                t
            };
            taps.push(t.unsqueeze(1)?);
        }
    }
    Tensor::cat(&taps, 1)?.reshape((c * kh * kw, b * oh * ow))
}

/// Geometry of an im2col over a [B, C, H, W] input.
#[derive(Clone, Copy)]
struct Geo {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    oh: usize,
    ow: usize,
}

impl Geo {
    /// For every (row, b, oy) of channel c with an in-bounds input row, calls
    /// f(cols offset of ox0, input offset of (b, c, iy, ix(ox0)), count) where ox0..ox0+count are the output
    /// columns whose taps fall inside the input (ix = ox * stride + kx - padding).
    #[inline]
    fn for_channel_runs(&self, c: usize, mut f: impl FnMut(usize, usize, usize)) {
        let n = self.b * self.oh * self.ow;
        let (s, p) = (self.stride as isize, self.padding as isize);
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                let row = (c * self.kh + ky) * self.kw + kx;
                // valid ox: 0 <= ox*s + kx - p < w
                let lo = ((p - kx as isize).max(0) + s - 1) / s;
                let hi = ((self.w as isize - 1 + p - kx as isize).div_euclid(s) + 1).min(self.ow as isize);
                if hi <= lo {
                    continue;
                }
                let (ox0, count) = (lo as usize, (hi - lo) as usize);
                let ix0 = (lo * s + kx as isize - p) as usize;
                for b in 0..self.b {
                    for oy in 0..self.oh {
                        let iy = oy as isize * s + ky as isize - p;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let col = (b * self.oh + oy) * self.ow + ox0;
                        f(row * n + col, ((b * self.c + c) * self.h + iy as usize) * self.w + ix0, count);
                    }
                }
            }
        }
    }
}

/// A pointer that may be shared by threads writing disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Going through a method makes closures capture the whole (Send + Sync) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// x [B, C, H, W] (contiguous f32, CPU) -> cols [C*kh*kw, B*oh*ow]; backward is [`Col2Im`].
struct Im2Col {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    fn geo(&self, dims: &[usize]) -> Geo {
        let (b, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
        let oh = (h + 2 * self.padding - self.kh) / self.stride + 1;
        let ow = (w + 2 * self.padding - self.kw) / self.stride + 1;
        Geo { b, c, h, w, kh: self.kh, kw: self.kw, stride: self.stride, padding: self.padding, oh, ow }
    }
}

impl candle_core::CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = &s.as_slice::<f32>()?[l.start_offset()..];
        let g = self.geo(l.dims());
        let per_c = g.kh * g.kw * g.b * g.oh * g.ow;
        let mut out = vec![0f32; g.c * per_c];
        let stride = g.stride;
        out.par_chunks_mut(per_c).enumerate().for_each(|(c, chunk)| {
            let base = c * per_c;
            g.for_channel_runs(c, |o, i, count| {
                let dst = &mut chunk[o - base..o - base + count];
                if stride == 1 {
                    dst.copy_from_slice(&x[i..i + count]);
                } else {
                    for (k, d) in dst.iter_mut().enumerate() {
                        *d = x[i + k * stride];
                    }
                }
            });
        });
        Ok((candle_core::CpuStorage::F32(out), (g.c * g.kh * g.kw, g.b * g.oh * g.ow).into()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = self.geo(arg.dims());
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(g))?))
    }
}

/// cols [C*kh*kw, B*oh*ow] -> [B, C, H, W], summing overlapping taps (the adjoint of im2col).
struct Col2Im(Geo);

impl candle_core::CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let cols = &s.as_slice::<f32>()?[l.start_offset()..];
        let g = self.0;
        let mut out = vec![0f32; g.b * g.c * g.h * g.w];
        let ptr = SharedMut(out.as_mut_ptr());
        let len = out.len();
        (0..g.c).into_par_iter().for_each(|c| {
            g.for_channel_runs(c, |o, i, count| {
                debug_assert!(i + (count - 1) * g.stride < len);
                for k in 0..count {
                    // SAFETY: every input offset i belongs to channel c, and each channel is handled by
                    // exactly one task, so no two threads touch the same element; i is in bounds.
                    unsafe { *ptr.get().add(i + k * g.stride) += cols[o + k] };
                }
            });
        });
        Ok((candle_core::CpuStorage::F32(out), (g.b, g.c, g.h, g.w).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_conv_matches_candle_conv_values_and_gradients() {
        let dev = Device::Cpu;
        for &(k, stride, pad, h) in
            &[(3usize, 1usize, 1usize, 6usize), (3, 2, 1, 6), (1, 1, 0, 5), (3, 1, 1, 7), (3, 2, 1, 8)]
        {
            let x = candle_core::Var::randn(0f32, 1.0, (2, 3, h, h), &dev).unwrap();
            let w = candle_core::Var::randn(0f32, 1.0, (4, 3, k, k), &dev).unwrap();
            let ours = conv2d_gemm(&x, &w, None, stride, pad).unwrap();
            let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (h + 2 * pad - k) / stride + 1);
            let sliced = w
                .reshape((4, 3 * k * k))
                .unwrap()
                .matmul(&im2col_sliced(&x, k, k, stride, pad, (oh, ow)).unwrap())
                .unwrap();
            let sliced = sliced.reshape((4, 2, oh, ow)).unwrap().permute((1, 0, 2, 3)).unwrap();
            let d = (&ours - &sliced).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "sliced im2col differs by {d}");
            let reference = x.conv2d(&w, pad, stride, 1, 1).unwrap();
            assert_eq!(ours.dims(), reference.dims(), "k{k} s{stride}");
            let d = (&ours - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "k{k} s{stride} h{h}: forward differs by {d}");
            // gradients of a weighted sum, against candle's conv backward
            let wt = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (ours * &wt).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &wt).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let a = g1.get(v).unwrap();
                let b = g2.get(v).unwrap();
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-3, "k{k} s{stride} h{h}: gradient differs by {d}");
            }
        }
    }
}
