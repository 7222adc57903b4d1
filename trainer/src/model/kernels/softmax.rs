//! softmax(scale * x) over the last axis, forward and backward, parallel over blocks of rows: portable
//! eight-lane loops, and explicit AVX2 + FMA rows picked at run time.
//!
//! Tested against Candle's `softmax` of `affine(x, scale)`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::exp_approx;
use super::{cpu_f32, slice, with_f32};

/// y = softmax(scale * x) over the last axis.
struct SoftmaxScaled {
    scale: f32,
}

#[inline(always)]
fn softmax_rows(x: &[f32], y: &mut [f32], n: usize, scale: f32) {
    let n8 = n / 8 * 8;
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        // eight lanes at a time so that the max, exp and sum loops vectorise
        let mut mx = [f32::NEG_INFINITY; 8];
        for c in xr[..n8].chunks_exact(8) {
            for l in 0..8 {
                mx[l] = if c[l] > mx[l] { c[l] } else { mx[l] };
            }
        }
        let m = xr[n8..].iter().chain(&mx).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m }) * scale;
        let mut acc = [0f32; 8];
        for (o, c) in yr[..n8].chunks_exact_mut(8).zip(xr[..n8].chunks_exact(8)) {
            for l in 0..8 {
                o[l] = exp_approx(c[l] * scale - m);
                acc[l] += o[l];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for (o, &v) in yr[n8..].iter_mut().zip(&xr[n8..]) {
            *o = exp_approx(v * scale - m);
            sum += *o;
        }
        let inv = 1.0 / sum;
        yr.iter_mut().for_each(|o| *o *= inv);
    }
}

#[inline(always)]
fn softmax_bwd_rows(y: &[f32], dy: &[f32], dx: &mut [f32], n: usize, scale: f32) {
    for ((yr, gr), or) in y.chunks_exact(n).zip(dy.chunks_exact(n)).zip(dx.chunks_exact_mut(n)) {
        let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
        for ((o, &yv), &g) in or.iter_mut().zip(yr).zip(gr) {
            // d softmax(s x) = s y (dy - <dy, y>)
            *o = scale * yv * (g - dot);
        }
    }
}

/// Rows per parallel task: enough work per task, at least as many tasks as threads.
fn row_block(rows: usize, n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (16384 / n.max(1)).clamp(1, rows.div_ceil(threads).max(1))
}

fn softmax_generic(x: &[f32], y: &mut [f32], n: usize, scale: f32) {
    let blk = row_block(x.len() / n, n) * n;
    y.par_chunks_mut(blk).zip(x.par_chunks(blk)).for_each(|(yb, xb)| softmax_rows(xb, yb, n, scale));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: &[f32], y: &mut [f32], n: usize, scale: f32) {
    let blk = row_block(x.len() / n, n) * n;
    y.par_chunks_mut(blk).zip(x.par_chunks(blk)).for_each(|(yb, xb)| unsafe { softmax_rows_avx2(xb, yb, n, scale) });
}

/// Explicit AVX2 + FMA softmax rows: the compiler keeps the portable loops above scalar.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::simd::avx2::{exp8, hmax, hsum};
    use super::super::simd::exp_approx;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax_rows(x: &[f32], y: &mut [f32], n: usize, scale: f32) {
        let n8 = n / 8 * 8;
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in xr[..n8].chunks_exact(8) {
                // SAFETY: c holds 8 floats
                mv = _mm256_max_ps(mv, unsafe { _mm256_loadu_ps(c.as_ptr()) });
            }
            let m = xr[n8..].iter().fold(hmax(mv), |m, &v| if v > m { v } else { m }) * scale;
            let (sv, mb) = (_mm256_set1_ps(scale), _mm256_set1_ps(m));
            let mut acc = _mm256_setzero_ps();
            for (o, c) in yr[..n8].chunks_exact_mut(8).zip(xr[..n8].chunks_exact(8)) {
                // SAFETY: o and c hold 8 floats each
                let e = exp8(_mm256_fmsub_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, sv, mb));
                unsafe { _mm256_storeu_ps(o.as_mut_ptr(), e) };
                acc = _mm256_add_ps(acc, e);
            }
            let mut sum = hsum(acc);
            for (o, &v) in yr[n8..].iter_mut().zip(&xr[n8..]) {
                *o = exp_approx(v * scale - m);
                sum += *o;
            }
            let inv = 1.0 / sum;
            yr.iter_mut().for_each(|o| *o *= inv);
        }
    }

    /// dx = s y (dy - <dy, y>) per row.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax_bwd_rows(y: &[f32], dy: &[f32], dx: &mut [f32], n: usize, scale: f32) {
        let n8 = n / 8 * 8;
        for ((yr, gr), or) in y.chunks_exact(n).zip(dy.chunks_exact(n)).zip(dx.chunks_exact_mut(n)) {
            let mut acc = _mm256_setzero_ps();
            for (a, b) in yr[..n8].chunks_exact(8).zip(gr[..n8].chunks_exact(8)) {
                // SAFETY: a and b hold 8 floats each
                acc = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr()), _mm256_loadu_ps(b.as_ptr()), acc) };
            }
            let dot = hsum(acc) + yr[n8..].iter().zip(&gr[n8..]).map(|(a, b)| a * b).sum::<f32>();
            for ((o, &yv), &g) in or.iter_mut().zip(yr).zip(gr) {
                *o = scale * yv * (g - dot);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(x: &[f32], y: &mut [f32], n: usize, scale: f32) {
    avx2::softmax_rows(x, y, n, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_bwd_avx2(y: &[f32], dy: &[f32], dx: &mut [f32], n: usize, scale: f32) {
    let blk = row_block(y.len() / n, n) * n;
    dx.par_chunks_mut(blk)
        .zip(y.par_chunks(blk).zip(dy.par_chunks(blk)))
        .for_each(|(o, (yb, gb))| avx2::softmax_bwd_rows(yb, gb, o, n, scale));
}

fn softmax_bwd_generic(y: &[f32], dy: &[f32], dx: &mut [f32], n: usize, scale: f32) {
    let blk = row_block(y.len() / n, n) * n;
    dx.par_chunks_mut(blk)
        .zip(y.par_chunks(blk).zip(dy.par_chunks(blk)))
        .for_each(|(o, (yb, gb))| softmax_bwd_rows(yb, gb, o, n, scale));
}

/// y = softmax(scale * x) over rows of n (y overwritten).
pub(crate) fn softmax_forward(x: &[f32], y: &mut [f32], n: usize, scale: f32) {
    dispatch!(softmax_avx2, softmax_generic(x, y, n, scale))
}

/// dx = d softmax(scale x) given y = softmax(scale x) and dy (dx overwritten).
pub(crate) fn softmax_backward(y: &[f32], dy: &[f32], dx: &mut [f32], n: usize, scale: f32) {
    dispatch!(softmax_bwd_avx2, softmax_bwd_generic(y, dy, dx, n, scale))
}

impl CustomOp1 for SoftmaxScaled {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let n = *l.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        let scale = self.scale;
        if n > 0 {
            softmax_forward(x, &mut y, n, scale);
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = *res.dims().last().unwrap_or(&1);
        let mut dx = vec![0f32; res.elem_count()];
        if n > 0 {
            with_f32(res, |y| with_f32(grad, |g| softmax_backward(y, g, &mut dx, n, self.scale)))??;
        }
        Ok(Some(Tensor::from_vec(dx, res.dims(), res.device())?))
    }
}

/// softmax(scale * x) over the last axis, fused on the CPU for f32.
pub fn softmax_last_scaled(x: &Tensor, scale: f64) -> Result<Tensor> {
    if !cpu_f32(&[x]) {
        let dt = x.dtype();
        let x = x.to_dtype(DType::F32)?.affine(scale, 0.0)?;
        return candle_nn::ops::softmax(&x, candle_core::D::Minus1)?.to_dtype(dt);
    }
    x.contiguous()?.apply_op1(SoftmaxScaled { scale: scale as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::tests::close;
    use candle_core::{Device, Var, D};

    #[test]
    fn softmax_matches_candle_values_and_gradients() {
        let dev = Device::Cpu;
        for &(rows, n, scale) in &[(1usize, 1usize, 1.0f64), (3, 7, 0.35), (40, 49, 0.25), (8, 196, 1.7)] {
            let x = Var::randn(0f32, 3.0, (rows, n), &dev).unwrap();
            let ours = softmax_last_scaled(&x, scale).unwrap();
            let reference = candle_nn::ops::softmax(&x.affine(scale, 0.0).unwrap(), D::Minus1).unwrap();
            close(&ours, &reference, 1e-6, &format!("{rows}x{n} forward"));
            let probe = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            close(g1.get(&x).unwrap(), g2.get(&x).unwrap(), 1e-5, &format!("{rows}x{n} gradient"));
        }
    }
}
