//! The primitive operations the U-Net is written in, and their Candle implementation.
//!
//! The U-Net's forward pass (unet.rs) is written once, against the [`Ops`] trait. [`CandleOps`] executes it
//! on tensors (training, previews, evaluation); the ONNX exporter (export.rs) implements the same trait by
//! emitting graph nodes. The exported graph therefore has exactly the structure of the trained model.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

use crate::model::kernels;
use crate::model::params::Param;
use crate::model::random::DropoutKeys;

/// The whole-batch im2col GEMM convolution on Candle tensors (it lives with the other convolution kernels).
pub use crate::model::kernels::conv2d_gemm;

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

    /// The forward pass reads `x` no more. An engine that keeps values for a backward pass frees it now unless
    /// that pass reads it (the CPU tape: the peak memory of a step); the others ignore it.
    fn release(&mut self, _x: &Self::T) {}

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

/// Runs the primitives on Candle tensors (with autograd when the params are variables).
pub struct CandleOps<'a> {
    /// Dropout is applied only when its keys are given (training).
    pub dropout: Option<&'a mut DropoutKeys>,
    pub dtype: DType,
    pub device: Device,
}

impl<'a> CandleOps<'a> {
    pub fn inference(device: &Device, dtype: DType) -> Self {
        Self { dropout: None, dtype, device: device.clone() }
    }
    pub fn training(device: &Device, dtype: DType, dropout: &'a mut DropoutKeys) -> Self {
        Self { dropout: Some(dropout), dtype, device: device.clone() }
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
        let Some(keys) = self.dropout.as_deref_mut() else { return Ok(x.clone()) };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        // Inverted dropout with a seeded host-side mask, so training is reproducible on every device.
        let mut mask = vec![0f32; x.elem_count()];
        keys.fill(p, &mut mask, x.dim(0)?);
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
