//! 2-D convolution as GEMMs over im2col matrices, with one geometry ([`ConvGeo`]) for both forms:
//!
//! - [`conv2d`], the fused CPU kernel (a Candle custom op; the tape calls [`conv2d_forward`] and
//!   [`conv2d_backward`] directly): per image, im2col into a per-thread buffer and one GEMM into the NCHW
//!   output; backward recomputes the im2col matrix and gives dx, dW and db in one pass.
//! - [`conv2d_gemm`], one GEMM over the whole batch's im2col matrix on Candle tensors: the [`Im2Col`] and
//!   [`Col2Im`] custom ops on the CPU, differentiable slices elsewhere. It is [`conv2d`]'s fallback off the
//!   CPU, and the Inception network's convolution (rectangular kernels).
//!
//! Same-size 3x3 convolutions (stride 1, padding 1), most of the U-Net's arithmetic, run forward and for
//! both gradients by Winograd's F(4x4, 3x3) instead ([`super::winograd`]).
//!
//! Tested against Candle's `conv2d` (values and gradients).

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::lane_sum;
use super::winograd::{kernel_transform, Same3x3};
use super::{cpu_f32, for_images, gemm_into, slice, with_f32, with_scratch, SharedMut};

/// Geometry of a convolution over [C, H, W] images: a kh x kw kernel, one stride and one (symmetric)
/// padding for both axes. Its im2col matrix of `images` images is [C*kh*kw, images*oh*ow]: row
/// (c, ky, kx), column (image, oy, ox) holds input (image, c, oy * stride + ky - padding, ox * stride + kx -
/// padding), or 0 where that is padding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvGeo {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
}

/// A run of consecutive columns of one im2col row, within one output row (see [`ConvGeo::walk`]).
enum Run {
    /// Columns `cols..cols + len` read the input at `input`, `input + stride`, ... (all in one input row).
    Taps { cols: usize, input: usize, len: usize },
    /// Columns `cols..cols + len` read padding.
    Padding { cols: usize, len: usize },
}

impl ConvGeo {
    /// The kind of convolution, as the profile names it: kernel size and stride.
    pub(crate) fn kind(&self) -> &'static str {
        match (self.kh, self.kw, self.stride) {
            (1, 1, 1) => "conv 1x1",
            (3, 3, 1) => "conv 3x3",
            (3, 3, 2) => "conv 3x3 stride 2",
            (5, 5, 1) => "conv 5x5",
            _ => "conv other",
        }
    }

    pub(crate) fn new(
        c: usize,
        h: usize,
        w: usize,
        (kh, kw): (usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        if h + 2 * padding < kh || w + 2 * padding < kw || stride == 0 {
            candle_core::bail!("conv2d: a {kh}x{kw} kernel (stride {stride}, padding {padding}) does not fit {h}x{w}");
        }
        let oh = (h + 2 * padding - kh) / stride + 1;
        let ow = (w + 2 * padding - kw) / stride + 1;
        Ok(Self { c, h, w, kh, kw, stride, padding, oh, ow })
    }
    /// Rows of the im2col matrix (= the GEMM's inner dimension).
    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }
    pub(crate) fn out_hw(&self) -> usize {
        self.oh * self.ow
    }
    /// Elements of one input image.
    fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }
    /// A 3x3, stride-1 convolution with padding 1 keeps the map's size; it runs by Winograd's F(4x4, 3x3)
    /// ([`super::winograd`]), forward and for the input gradient, into `outs` channels.
    fn same_3x3(&self, outs: usize) -> Option<Same3x3> {
        (self.kh == 3 && self.kw == 3 && self.stride == 1 && self.padding == 1).then_some(Same3x3 {
            ins: self.c,
            outs,
            h: self.h,
            w: self.w,
        })
    }
    /// A 1x1, stride-1, unpadded convolution reads the image itself as the im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }
    /// For tap offset `kx`, the output columns [lo, hi) whose input column ox * stride + kx - padding is
    /// inside the image, and the input column of `lo`.
    fn valid_cols(&self, kx: usize) -> (usize, usize, usize) {
        let (s, p) = (self.stride as isize, self.padding as isize);
        let lo = ((p - kx as isize).max(0) + s - 1) / s;
        let hi = ((self.w as isize - 1 + p - kx as isize).div_euclid(s) + 1).clamp(0, self.ow as isize);
        let lo = lo.min(hi);
        (lo as usize, hi as usize, (lo * s + kx as isize - p).max(0) as usize)
    }

    /// Calls `f` for every run of the im2col matrix of `images` images, rows of the channels `channels`
    /// only. Offsets are into the whole matrix and the whole [images, C, H, W] input. The order is
    /// channel, ky, kx, image, oy: every input element receives its taps in (ky, kx) order.
    #[inline]
    fn walk(&self, images: usize, channels: Range<usize>, mut f: impl FnMut(Run)) {
        let n = images * self.out_hw();
        for c in channels {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = (c * self.kh + ky) * self.kw + kx;
                    let (lo, hi, ix0) = self.valid_cols(kx);
                    for image in 0..images {
                        for oy in 0..self.oh {
                            let iy = (oy * self.stride + ky) as isize - self.padding as isize;
                            let o = row * n + (image * self.oh + oy) * self.ow;
                            if iy < 0 || iy >= self.h as isize || lo == hi {
                                f(Run::Padding { cols: o, len: self.ow });
                                continue;
                            }
                            f(Run::Padding { cols: o, len: lo });
                            f(Run::Padding { cols: o + hi, len: self.ow - hi });
                            let input = ((image * self.c + c) * self.h + iy as usize) * self.w + ix0;
                            f(Run::Taps { cols: o + lo, input, len: hi - lo });
                        }
                    }
                }
            }
        }
    }

    /// The rows of channels `channels` of the im2col matrix of x [images, C, H, W], into `cols`, which
    /// starts at the first of those rows.
    fn im2col_rows(&self, x: &[f32], images: usize, channels: Range<usize>, cols: &mut [f32]) {
        let base = channels.start * self.kh * self.kw * images * self.out_hw();
        let s = self.stride;
        self.walk(images, channels, |run| match run {
            Run::Taps { cols: o, input, len } => copy_taps(&x[input..], &mut cols[o - base..o - base + len], s),
            Run::Padding { cols: o, len } => cols[o - base..o - base + len].fill(0.0),
        });
    }

    /// image [C, H, W] -> cols [C*kh*kw, oh*ow].
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        self.im2col_rows(x, 1, 0..self.c, cols);
    }

    /// The adjoint of im2col: dx [C, H, W] = sum of the taps in dcols (dx is overwritten).
    fn col2im(&self, dcols: &[f32], dx: &mut [f32]) {
        dx.fill(0.0);
        let s = self.stride;
        self.walk(1, 0..self.c, |run| {
            if let Run::Taps { cols, input, len } = run {
                add_taps(&dcols[cols..cols + len], &mut dx[input..], s);
            }
        });
    }
}

/// dst[j] = src[j * stride] (one run of im2col).
#[inline(always)]
fn copy_taps(src: &[f32], dst: &mut [f32], stride: usize) {
    if stride == 1 {
        dst.copy_from_slice(&src[..dst.len()]);
    } else {
        for (j, d) in dst.iter_mut().enumerate() {
            *d = src[j * stride];
        }
    }
}

/// dst[j * stride] += src[j] (one run of col2im).
#[inline(always)]
fn add_taps(src: &[f32], dst: &mut [f32], stride: usize) {
    if stride == 1 {
        for (d, v) in dst.iter_mut().zip(src) {
            *d += v;
        }
    } else {
        for (j, v) in src.iter().enumerate() {
            dst[j * stride] += v;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The fused per-image kernel

/// y = conv2d(x, w) + b as one custom op (x [B, C, H, W], w [Co, C, k, k], b [Co]).
struct Conv2d {
    stride: usize,
    padding: usize,
}

impl Conv2d {
    fn geo(&self, x: &[usize], w: &[usize]) -> Result<(usize, usize, ConvGeo)> {
        let (b, c, h, wd) = (x[0], x[1], x[2], x[3]);
        let (co, ci, kh, kw) = (w[0], w[1], w[2], w[3]);
        if ci != c || kh != kw {
            candle_core::bail!("conv2d: input {x:?} does not fit kernel {w:?}");
        }
        Ok((b, co, ConvGeo::new(c, h, wd, (kh, kw), self.stride, self.padding)?))
    }
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "fused-conv2d"
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
        let (x, w, bias) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (b, co, g) = self.geo(l1.dims(), l2.dims())?;
        let mut out = vec![0f32; b * co * g.out_hw()];
        conv2d_forward(x, w, bias, b, co, &g, &mut out);
        Ok((CpuStorage::F32(out), (b, co, g.oh, g.ow).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, co, g) = self.geo(x.dims(), w.dims())?;
        let mut dx = vec![0f32; x.elem_count()];
        let (dw, db) = with_f32(x, |x| {
            with_f32(w, |w| with_f32(grad, |gr| conv2d_backward(x, w, gr, b, co, &g, Some(&mut dx))))
        })???;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(dw, w.dims(), dev)?),
            Some(Tensor::from_vec(db, co, dev)?),
        ))
    }
}

/// y [B, Co, oh, ow] = conv2d(x, w) + bias on contiguous f32 data (y is overwritten).
pub(crate) fn conv2d_forward(x: &[f32], w: &[f32], bias: &[f32], b: usize, co: usize, g: &ConvGeo, out: &mut [f32]) {
    let (kk, ohw, in_len) = (g.rows(), g.out_hw(), g.in_len());
    debug_assert_eq!(out.len(), b * co * ohw);
    if let Some(same) = g.same_3x3(co) {
        same.run(x, &kernel_transform(w, co, g.c, false), Some(bias), b, out);
        return;
    }
    let y = SharedMut(out.as_mut_ptr());
    let pointwise = g.is_pointwise();
    for_images(
        b,
        || (),
        |_, i, par| {
            with_scratch(if pointwise { 0 } else { kk * ohw }, 0, |cols, _| {
                let xb = &x[i * in_len..(i + 1) * in_len];
                let rhs: &[f32] = if pointwise {
                    xb
                } else {
                    g.im2col(xb, cols);
                    cols
                };
                // SAFETY: image i's output range is written by this call only
                let yb = unsafe { y.range(i * co * ohw, co * ohw) };
                for (row, &bv) in yb.chunks_exact_mut(ohw).zip(bias) {
                    row.fill(bv);
                }
                gemm_into(yb, true, (co, ohw, kk), w, (kk, 1), rhs, (ohw, 1), par);
            })
        },
    );
}

/// The backward pass of [`conv2d_forward`] for the output gradient `gr`: writes dx when given (overwriting
/// it) and returns (dW, db). The im2col matrix is recomputed rather than kept (memory).
pub(crate) fn conv2d_backward(
    x: &[f32],
    w: &[f32],
    gr: &[f32],
    b: usize,
    co: usize,
    g: &ConvGeo,
    dx: Option<&mut [f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let (kk, ohw, in_len) = (g.rows(), g.out_hw(), g.in_len());
    let pointwise = g.is_pointwise();
    // a same-size 3x3 convolution by Winograd: dx is the same kind of convolution of the output gradient with
    // the kernel transposed and rotated, dW the adjoint of the forward's transforms
    if let Some(same) = g.same_3x3(co) {
        if let Some(dx) = dx {
            let back = Same3x3 { ins: co, outs: same.ins, ..same };
            back.run(gr, &kernel_transform(w, same.ins, co, true), None, b, dx);
        }
        let mut db = vec![0f32; co];
        for (j, row) in gr.chunks_exact(ohw).enumerate() {
            db[j % co] += lane_sum(row);
        }
        return (same.weight_grad(x, gr, b), db);
    }
    let dxp = dx.map(|d| {
        debug_assert_eq!(d.len(), b * in_len);
        SharedMut(d.as_mut_ptr())
    });
    let scratch = if pointwise { 0 } else { kk * ohw };
    let dscratch = if pointwise || dxp.is_none() { 0 } else { kk * ohw };
    let parts = for_images(
        b,
        || (vec![0f32; co * kk], vec![0f32; co]),
        |(dw, db), i, par| {
            with_scratch(scratch, dscratch, |cols, dcols| {
                let xb = &x[i * in_len..(i + 1) * in_len];
                let gb = &gr[i * co * ohw..(i + 1) * co * ohw];
                if let Some(dxp) = dxp {
                    // SAFETY: image i's input-gradient range is written by this call only
                    let dxb = unsafe { dxp.range(i * in_len, in_len) };
                    // dcols = W^T . g  ([kk, Co] . [Co, ohw])
                    if pointwise {
                        gemm_into(dxb, false, (kk, ohw, co), w, (1, kk), gb, (ohw, 1), par);
                    } else {
                        gemm_into(dcols, false, (kk, ohw, co), w, (1, kk), gb, (ohw, 1), par);
                        g.col2im(dcols, dxb);
                    }
                }
                // dW += g . cols^T  ([Co, ohw] . [ohw, kk])
                let cols: &[f32] = if pointwise {
                    xb
                } else {
                    g.im2col(xb, cols);
                    cols
                };
                gemm_into(dw, true, (co, kk, ohw), gb, (ohw, 1), cols, (1, ohw), par);
                for (d, row) in db.iter_mut().zip(gb.chunks_exact(ohw)) {
                    *d += lane_sum(row);
                }
            })
        },
    );
    let mut parts = parts.into_iter();
    let (mut dw, mut db) = parts.next().expect("at least one chunk");
    for (w2, b2) in parts {
        dw.iter_mut().zip(&w2).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&b2).for_each(|(a, b)| *a += b);
    }
    (dw, db)
}

/// 2-D convolution with bias, square kernel `w` [Co, C, k, k], symmetric padding: the fused CPU kernel for
/// f32 on the CPU, [`conv2d_gemm`] elsewhere.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if !cpu_f32(&[x, w, b]) {
        return conv2d_gemm(x, w, Some(b), stride, padding);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2d { stride, padding })
}

// ---------------------------------------------------------------------------------------------------------
// One GEMM over the whole batch, on Candle tensors

/// 2-D convolution as one GEMM over an im2col matrix:
/// y[co, (b,h,w)] = W[co, (ci,ky,kx)] . cols[(ci,ky,kx), (b,h,w)].
///
/// Candle's own conv2d backward goes through a naive conv_transpose2d loop on the CPU (and has no cuDNN
/// path on CUDA). Written this way, forward and backward are three large matrix products plus an
/// im2col/col2im pass: on the CPU a custom op with a hand-written col2im backward, elsewhere the same
/// matrix built from differentiable slices.
pub fn conv2d_gemm(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (co, ci, kh, kw) = w.dims4()?;
    if ci != c {
        candle_core::bail!("conv2d: input has {c} channels, kernel expects {ci}");
    }
    let geo = ConvGeo::new(c, h, wd, (kh, kw), stride, padding)?;
    let (oh, ow) = (geo.oh, geo.ow);
    let cols = if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Im2Col { geo, images: b })?
    } else {
        im2col_sliced(x, kh, kw, stride, padding, (oh, ow))?
    };
    let wm = w.reshape((co, ci * kh * kw))?;
    // y [Co, B*oh*ow]; the bias is added along the contiguous axis, so its gradient is a fast last-axis sum
    let y = wm.matmul(&cols)?;
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
) -> Result<Tensor> {
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

/// x [B, C, H, W] (contiguous f32, CPU) -> cols [C*kh*kw, B*oh*ow], the im2col matrix of the whole batch,
/// built in parallel over channels; backward is [`Col2Im`].
#[derive(Clone, Copy)]
struct Im2Col {
    geo: ConvGeo,
    images: usize,
}

impl Im2Col {
    fn input_dims(&self) -> [usize; 4] {
        [self.images, self.geo.c, self.geo.h, self.geo.w]
    }
    fn output_dims(&self) -> (usize, usize) {
        (self.geo.rows(), self.images * self.geo.out_hw())
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if l.dims() != self.input_dims() {
            candle_core::bail!("im2col: input {:?}, expected {:?}", l.dims(), self.input_dims());
        }
        let x = slice(s, l)?;
        let (g, images) = (self.geo, self.images);
        let per_c = g.kh * g.kw * images * g.out_hw();
        let mut out = vec![0f32; g.c * per_c];
        out.par_chunks_mut(per_c).enumerate().for_each(|(c, chunk)| g.im2col_rows(x, images, c..c + 1, chunk));
        Ok((CpuStorage::F32(out), self.output_dims().into()))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(*self))?))
    }
}

/// cols [C*kh*kw, B*oh*ow] -> [B, C, H, W], summing overlapping taps (the adjoint of [`Im2Col`]), in
/// parallel over channels.
struct Col2Im(Im2Col);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Col2Im(op) = self;
        if l.dims() != <[usize; 2]>::from(op.output_dims()) {
            candle_core::bail!("col2im: input {:?}, expected {:?}", l.dims(), op.output_dims());
        }
        let cols = slice(s, l)?;
        let (g, images) = (op.geo, op.images);
        let mut out = vec![0f32; images * g.in_len()];
        let ptr = SharedMut(out.as_mut_ptr());
        let len = out.len();
        (0..g.c).into_par_iter().for_each(|c| {
            g.walk(images, c..c + 1, |run| {
                if let Run::Taps { cols: o, input, len: n } = run {
                    let span = (n - 1) * g.stride + 1;
                    debug_assert!(input + span <= len);
                    // SAFETY: a run's taps lie in one input row of channel c, and each channel is handled by
                    // exactly one task, so no two threads touch the same element; the span is in bounds.
                    add_taps(&cols[o..o + n], unsafe { ptr.range(input, span) }, g.stride);
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from(op.input_dims().to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::tests::close;
    use candle_core::{Device, Var};

    #[test]
    fn conv2d_matches_candle_values_and_gradients_on_odd_shapes() {
        let dev = Device::Cpu;
        // (batch, cin, cout, k, stride, pad, h, w)
        for &(b, ci, co, k, s, p, h, w) in &[
            (1usize, 3usize, 5usize, 3usize, 1usize, 1usize, 7usize, 7usize),
            (3, 5, 7, 3, 1, 1, 7, 9),
            (2, 4, 6, 3, 2, 1, 7, 7),
            (4, 6, 3, 1, 1, 0, 7, 5),
            (2, 3, 4, 3, 2, 1, 8, 8),
            (5, 9, 10, 3, 1, 1, 14, 14),
            // Winograd's groups: many images of 5x5 maps (9 tiles each), one image of more tiles than a group
            (9, 3, 5, 3, 1, 1, 5, 5),
            (3, 3, 8, 3, 1, 1, 34, 33),
            // the weight gradient's groups (256 tiles): 12 images of 25 tiles in two, summed across threads
            (12, 2, 3, 3, 1, 1, 20, 20),
            // channels in lanes: 16 at a time, then 8, then one by one (25 = 16 + 8 + 1, 19 = 16 + 3)
            (2, 25, 19, 3, 1, 1, 9, 11),
            (3, 32, 16, 3, 1, 1, 8, 8),
        ] {
            let x = Var::randn(0f32, 1.0, (b, ci, h, w), &dev).unwrap();
            let wt = Var::randn(0f32, 0.5, (co, ci, k, k), &dev).unwrap();
            let bias = Var::randn(0f32, 1.0, co, &dev).unwrap();
            let ours = conv2d(&x, &wt, &bias, s, p).unwrap();
            let reference =
                x.conv2d(&wt, p, s, 1, 1).unwrap().broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap()).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let what = format!("b{b} ci{ci} co{co} k{k} s{s} p{p} {h}x{w}");
            close(&ours, &reference, 1e-5, &format!("{what} forward"));
            let probe = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (v, name) in [(&x, "dx"), (&wt, "dw"), (&bias, "db")] {
                close(g1.get(v).unwrap(), g2.get(v).unwrap(), 1e-5, &format!("{what} {name}"));
            }
        }
    }

    #[test]
    fn gemm_conv_matches_candle_conv_values_and_gradients() {
        let dev = Device::Cpu;
        for &(k, stride, pad, h) in
            &[(3usize, 1usize, 1usize, 6usize), (3, 2, 1, 6), (1, 1, 0, 5), (3, 1, 1, 7), (3, 2, 1, 8)]
        {
            let x = Var::randn(0f32, 1.0, (2, 3, h, h), &dev).unwrap();
            let w = Var::randn(0f32, 1.0, (4, 3, k, k), &dev).unwrap();
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
