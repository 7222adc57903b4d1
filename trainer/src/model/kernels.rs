//! Fused CPU kernels with their own backward passes: what makes training on a laptop CPU practical.
//!
//! Candle's CPU backend builds GroupNorm from a dozen allocating, single-threaded ops, runs the input
//! gradient of conv2d through a direct loop and allocates a fresh tensor for every intermediate. The kernels
//! here replace the hot spots of the U-Net with one pass forward and one pass backward each, parallel over
//! the batch on every core:
//!
//! - [`conv2d`]: per image, im2col into a per-thread buffer (none for 1x1 convolutions) and one GEMM of the
//!   `gemm` crate straight into the NCHW output, bias included; backward recomputes the im2col matrix
//!   instead of keeping it (memory), and gives dx, dW and db in one pass.
//! - [`group_norm_act`]: GroupNorm (Wu & He 2018) with a per-(image, channel) affine `a * x_hat + d` (which is
//!   how the scale-shift norm of Dhariwal & Nichol 2021 folds in) and an optional SiLU, in one pass.
//! - [`softmax_last_scaled`]: softmax(s * x) over the last axis.
//!
//! Each one runs for contiguous f32 tensors on the CPU and falls back to the composed Candle ops elsewhere
//! (CUDA, f16), so every device keeps working. `tests` checks values and gradients against Candle's reference
//! ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// True when the fused CPU path applies to all these tensors.
fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => {
            let o = l.start_offset();
            Ok(f(&c.as_slice::<f32>()?[o..o + t.elem_count()]))
        }
        _ => candle_core::bail!("fused CPU kernel called with a tensor on {:?}", t.device()),
    }
}

/// The contiguous f32 data of an op argument.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("fused CPU kernel needs contiguous inputs"),
    }
}

/// A pointer that threads may share while writing disjoint ranges.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// # Safety
    /// `[off, off + len)` must lie in the buffer and no other thread may touch it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range(&self, off: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

thread_local! {
    /// Per-thread im2col buffers, kept between calls: a fresh multi-megabyte buffer per convolution would be
    /// faulted in page by page every time.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Runs `f` with this thread's two scratch buffers of `a` and `b` elements (contents unspecified).
fn with_scratch<R>(a: usize, b: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => {
            let [x, y] = &mut *s;
            if x.len() < a {
                x.resize(a, 0.0);
            }
            if y.len() < b {
                y.resize(b, 0.0);
            }
            f(&mut x[..a], &mut y[..b])
        }
        // re-entered on this thread (a nested parallel call): use fresh buffers
        Err(_) => f(&mut vec![0f32; a], &mut vec![0f32; b]),
    })
}

/// Runs `body(state, image, parallelism)` for every image of a batch of `b`: in one chunk per thread (each
/// GEMM single-threaded, which suits the small per-image matrices), or, when there are fewer images than
/// threads, one image after the other with the GEMMs themselves parallel. Returns each chunk's state.
pub(crate) fn for_images<S: Send>(
    b: usize,
    init: impl Fn() -> S + Sync,
    body: impl Fn(&mut S, usize, Parallelism) + Sync,
) -> Vec<S> {
    let n = rayon::current_num_threads().max(1);
    if n == 1 || b < n {
        let par = if n == 1 { Parallelism::None } else { Parallelism::Rayon(n) };
        let mut s = init();
        (0..b).for_each(|i| body(&mut s, i, par));
        return vec![s];
    }
    let per = b.div_ceil(n);
    (0..b.div_ceil(per))
        .into_par_iter()
        .map(|chunk| {
            let mut s = init();
            (chunk * per..((chunk + 1) * per).min(b)).for_each(|i| body(&mut s, i, Parallelism::None));
            s
        })
        .collect()
}

/// dst[m, n] (row-major, row stride n) = (accumulate ? dst : 0) + lhs[m, k] . rhs[k, n], where lhs and rhs
/// are given by their (row, column) strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    dst: &mut [f32],
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    par: Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    debug_assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    debug_assert!(k == 0 || n == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the extents above are in bounds; gemm reads lhs and rhs and writes dst only.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

// ---------------------------------------------------------------------------------------------------------
// Convolution

/// Geometry of a square-kernel convolution over one [C, H, W] image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvGeo {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
}

impl ConvGeo {
    pub(crate) fn new(c: usize, h: usize, w: usize, k: usize, stride: usize, padding: usize) -> Result<Self> {
        if h + 2 * padding < k || w + 2 * padding < k || stride == 0 {
            candle_core::bail!("conv2d: a {k}x{k} kernel (stride {stride}, padding {padding}) does not fit {h}x{w}");
        }
        let oh = (h + 2 * padding - k) / stride + 1;
        let ow = (w + 2 * padding - k) / stride + 1;
        Ok(Self { c, h, w, k, stride, padding, oh, ow })
    }
    /// Rows of the im2col matrix (= the GEMM's inner dimension).
    fn rows(&self) -> usize {
        self.c * self.k * self.k
    }
    pub(crate) fn out_hw(&self) -> usize {
        self.oh * self.ow
    }
    /// A 1x1, stride-1, unpadded convolution reads the image itself as the im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
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
    /// Calls f(cols row range start, input row start, lo, hi, ix0) for every in-image (row, oy) pair, and
    /// g(cols range) for each output row segment that reads only padding.
    #[inline]
    fn walk(&self, mut f: impl FnMut(usize, usize, usize, usize, usize), mut pad: impl FnMut(usize, usize, usize)) {
        let ohw = self.out_hw();
        for c in 0..self.c {
            for ky in 0..self.k {
                for kx in 0..self.k {
                    let row = (c * self.k + ky) * self.k + kx;
                    let (lo, hi, ix0) = self.valid_cols(kx);
                    for oy in 0..self.oh {
                        let iy = (oy * self.stride + ky) as isize - self.padding as isize;
                        let o = row * ohw + oy * self.ow;
                        if iy < 0 || iy >= self.h as isize || lo == hi {
                            pad(o, 0, self.ow);
                            continue;
                        }
                        pad(o, 0, lo);
                        pad(o, hi, self.ow);
                        f(o, (c * self.h + iy as usize) * self.w, lo, hi, ix0);
                    }
                }
            }
        }
    }

    /// image [C, H, W] -> cols [C*k*k, oh*ow].
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let s = self.stride;
        let cols_ptr = SharedMut(cols.as_mut_ptr());
        self.walk(
            |o, irow, lo, hi, ix0| {
                // SAFETY: o + hi <= cols.len() by construction of the walk
                let dst = unsafe { cols_ptr.range(o + lo, hi - lo) };
                let src = &x[irow + ix0..];
                if s == 1 {
                    dst.copy_from_slice(&src[..hi - lo]);
                } else {
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = src[j * s];
                    }
                }
            },
            |o, a, b| {
                // SAFETY: as above
                unsafe { cols_ptr.range(o + a, b - a) }.fill(0.0)
            },
        );
    }

    /// The adjoint of im2col: dx [C, H, W] = sum of the taps in dcols (dx is overwritten).
    fn col2im(&self, dcols: &[f32], dx: &mut [f32]) {
        dx.fill(0.0);
        let s = self.stride;
        self.walk(
            |o, irow, lo, hi, ix0| {
                let src = &dcols[o + lo..o + hi];
                let dst = &mut dx[irow + ix0..];
                if s == 1 {
                    for (d, v) in dst.iter_mut().zip(src) {
                        *d += v;
                    }
                } else {
                    for (j, v) in src.iter().enumerate() {
                        dst[j * s] += v;
                    }
                }
            },
            |_, _, _| {},
        );
    }
}

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
        Ok((b, co, ConvGeo::new(c, h, wd, kh, self.stride, self.padding)?))
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
    let (kk, ohw, in_len) = (g.rows(), g.out_hw(), g.c * g.h * g.w);
    debug_assert_eq!(out.len(), b * co * ohw);
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
    let (kk, ohw, in_len) = (g.rows(), g.out_hw(), g.c * g.h * g.w);
    let pointwise = g.is_pointwise();
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
                    *d += row.iter().sum::<f32>();
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
/// f32 on the CPU, [`crate::model::ops::conv2d_gemm`] elsewhere.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if !cpu_f32(&[x, w, b]) {
        return crate::model::ops::conv2d_gemm(x, w, Some(b), stride, padding);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2d { stride, padding })
}

// ---------------------------------------------------------------------------------------------------------
// Vectorisable math

/// e^x to ~2 ulp for x in [-87, 88] (clamped outside), written so that loops over it vectorise: Cody-Waite
/// range reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-6 Taylor polynomial of e^r. n is rounded
/// and turned into the exponent bits of 2^n with the 1.5 * 2^23 trick (no saturating float-to-int cast,
/// which would keep the loop scalar).
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    let bits = t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

/// The logistic sigmoid 1 / (1 + e^-z).
#[inline(always)]
pub(crate) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-z))
}

/// Compiles `$body` (a generic, inlined kernel) once for AVX2+FMA and once for the baseline target, and
/// picks at run time.
macro_rules! dispatch {
    ($avx:ident, $generic:ident ( $($arg:expr),* )) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has the features the function was compiled for
                return unsafe { $avx($($arg),*) };
            }
        }
        $generic($($arg),*)
    }};
}

// ---------------------------------------------------------------------------------------------------------
// GroupNorm + affine + SiLU

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
    let lane_sum = |f: &dyn Fn(f32) -> f32| {
        let mut acc = [0f32; 8];
        let chunks = x.chunks_exact(8);
        let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
        for c in chunks {
            for j in 0..8 {
                acc[j] += f(c[j]);
            }
        }
        acc.iter().sum::<f32>() + rest
    };
    let mean = lane_sum(&|v| v) / n;
    let var = lane_sum(&|v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn gn_fwd_group(x: &[f32], y: &mut [f32], a: &[f32], d: &[f32], hw: usize, eps: f32, silu: bool) {
    let (mean, rstd) = moments(x, eps);
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

/// One group's backward: writes dx and returns nothing; da, dd receive the per-channel sums.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gn_bwd_group(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    a: &[f32],
    d: &[f32],
    da: &mut [f32],
    dd: &mut [f32],
    hw: usize,
    eps: f32,
    silu: bool,
) {
    let (mean, rstd) = moments(x, eps);
    // pass 1: dz = dy * act'(z); da = sum dz x_hat; dd = sum dz; dx <- dx_hat = dz a; group sums of dx_hat
    // and dx_hat x_hat
    let (mut s1, mut s2) = (0f32, 0f32);
    for c in 0..a.len() {
        let r = c * hw..(c + 1) * hw;
        let (xc, gc, oc) = (&x[r.clone()], &dy[r.clone()], &mut dx[r]);
        let sc = rstd * a[c];
        let sh = d[c] - mean * sc;
        // dz = dy * act'(z) into dx first (a plain elementwise loop, which vectorises) ...
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
        // ... then the two sums in eight lanes (a strict sequential float sum would stay scalar) ...
        let (mut sa, mut sd) = ([0f32; 8], [0f32; 8]);
        let n8 = hw / 8 * 8;
        for (o8, x8) in oc[..n8].chunks_exact(8).zip(xc[..n8].chunks_exact(8)) {
            for l in 0..8 {
                sa[l] += o8[l] * ((x8[l] - mean) * rstd);
                sd[l] += o8[l];
            }
        }
        for (&dz, &v) in oc[n8..].iter().zip(&xc[n8..]) {
            sa[0] += dz * ((v - mean) * rstd);
            sd[0] += dz;
        }
        // ... and dx_hat = dz a
        let ac = a[c];
        oc.iter_mut().for_each(|o| *o *= ac);
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

/// Runs `group(x, y, a, d)` for every (image, group) of x [B, groups * cpg, hw], in parallel.
fn gn_fwd_par(
    x: &[f32],
    y: &mut [f32],
    (a, d): (&[f32], &[f32]),
    (cpg, hw): (usize, usize),
    group: impl Fn(&[f32], &mut [f32], &[f32], &[f32]) + Sync,
) {
    let glen = cpg * hw;
    y.par_chunks_mut(glen)
        .zip(x.par_chunks(glen))
        .enumerate()
        .for_each(|(bg, (yg, xg))| group(xg, yg, &a[bg * cpg..(bg + 1) * cpg], &d[bg * cpg..(bg + 1) * cpg]));
}

#[allow(clippy::too_many_arguments)]
fn gn_fwd_generic(x: &[f32], y: &mut [f32], a: &[f32], d: &[f32], cpg: usize, hw: usize, eps: f32, silu: bool) {
    gn_fwd_par(x, y, (a, d), (cpg, hw), |xg, yg, ab, db| gn_fwd_group(xg, yg, ab, db, hw, eps, silu))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gn_fwd_avx2(x: &[f32], y: &mut [f32], a: &[f32], d: &[f32], cpg: usize, hw: usize, eps: f32, silu: bool) {
    // SAFETY (inside): the same features as the caller
    gn_fwd_par(x, y, (a, d), (cpg, hw), |xg, yg, ab, db| unsafe { gn_fwd_group_avx2(xg, yg, ab, db, hw, eps, silu) })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gn_fwd_group_avx2(x: &[f32], y: &mut [f32], a: &[f32], d: &[f32], hw: usize, eps: f32, silu: bool) {
    gn_fwd_group(x, y, a, d, hw, eps, silu)
}

/// The per-group backward function: (x, dy, dx, a, d, da, dd) of one (image, group).
type GnBwdGroup<'a> = dyn Fn(&[f32], &[f32], &mut [f32], &[f32], &[f32], &mut [f32], &mut [f32]) + Sync + 'a;

/// Runs `group` for every (image, group), in parallel.
#[allow(clippy::too_many_arguments)]
fn gn_bwd_par(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    (a, d): (&[f32], &[f32]),
    da: &mut [f32],
    dd: &mut [f32],
    (cpg, hw): (usize, usize),
    group: &GnBwdGroup,
) {
    let glen = cpg * hw;
    dx.par_chunks_mut(glen).zip(da.par_chunks_mut(cpg).zip(dd.par_chunks_mut(cpg))).enumerate().for_each(
        |(bg, (dxg, (dag, ddg)))| {
            let r = bg * glen..(bg + 1) * glen;
            let (ab, db) = (&a[bg * cpg..(bg + 1) * cpg], &d[bg * cpg..(bg + 1) * cpg]);
            group(&x[r.clone()], &dy[r], dxg, ab, db, dag, ddg)
        },
    );
}

#[allow(clippy::too_many_arguments)]
fn gn_bwd_generic(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    a: &[f32],
    d: &[f32],
    da: &mut [f32],
    dd: &mut [f32],
    cpg: usize,
    hw: usize,
    eps: f32,
    silu: bool,
) {
    gn_bwd_par(x, dy, dx, (a, d), da, dd, (cpg, hw), &|x, dy, dx, a, d, da, dd| {
        gn_bwd_group(x, dy, dx, a, d, da, dd, hw, eps, silu)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gn_bwd_avx2(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    a: &[f32],
    d: &[f32],
    da: &mut [f32],
    dd: &mut [f32],
    cpg: usize,
    hw: usize,
    eps: f32,
    silu: bool,
) {
    gn_bwd_par(x, dy, dx, (a, d), da, dd, (cpg, hw), &|x, dy, dx, a, d, da, dd| {
        // SAFETY: the same features as the caller
        unsafe { gn_bwd_group_avx2(x, dy, dx, a, d, da, dd, hw, eps, silu) }
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gn_bwd_group_avx2(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    a: &[f32],
    d: &[f32],
    da: &mut [f32],
    dd: &mut [f32],
    hw: usize,
    eps: f32,
    silu: bool,
) {
    gn_bwd_group(x, dy, dx, a, d, da, dd, hw, eps, silu)
}

/// act(a[b, c] * x_hat + d[b, c]) over x [B, groups * cpg, hw] (y overwritten), parallel over (image, group).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gn_forward(x: &[f32], y: &mut [f32], a: &[f32], d: &[f32], cpg: usize, hw: usize, eps: f32, silu: bool) {
    dispatch!(gn_fwd_avx2, gn_fwd_generic(x, y, a, d, cpg, hw, eps, silu))
}

/// The backward pass of [`gn_forward`]: writes dx, da and dd (all overwritten).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gn_backward(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    a: &[f32],
    d: &[f32],
    da: &mut [f32],
    dd: &mut [f32],
    cpg: usize,
    hw: usize,
    eps: f32,
    silu: bool,
) {
    dispatch!(gn_bwd_avx2, gn_bwd_generic(x, dy, dx, a, d, da, dd, cpg, hw, eps, silu))
}

impl GroupNormAct {
    fn check(&self, x: &[usize], a: &[usize]) -> Result<(usize, usize, usize)> {
        let (b, c) = (x[0], x[1]);
        let hw: usize = x[2..].iter().product();
        if a != [b, c] || !c.is_multiple_of(self.groups) {
            candle_core::bail!("group_norm_act: x {x:?}, affine {a:?}, {} groups", self.groups);
        }
        Ok((b, c / self.groups, hw))
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
        let (_, cpg, hw) = self.check(l1.dims(), l2.dims())?;
        let mut y = vec![0f32; x.len()];
        let (eps, silu) = (self.eps, self.silu);
        gn_forward(x, &mut y, a, d, cpg, hw, eps, silu);
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
        let (b, cpg, hw) = self.check(x.dims(), a.dims())?;
        let c = cpg * self.groups;
        let mut dx = vec![0f32; x.elem_count()];
        let (mut da, mut dd) = (vec![0f32; b * c], vec![0f32; b * c]);
        let (eps, silu) = (self.eps, self.silu);
        with_f32(x, |xs| {
            with_f32(grad, |gs| {
                with_f32(a, |as_| {
                    with_f32(d, |ds| gn_backward(xs, gs, &mut dx, as_, ds, &mut da, &mut dd, cpg, hw, eps, silu))
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
/// [`fused_applies`]).
pub fn group_norm_act(x: &Tensor, groups: usize, eps: f64, a: &Tensor, d: &Tensor, silu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&a.contiguous()?, &d.contiguous()?, GroupNormAct { groups, eps: eps as f32, silu })
}

/// True when the fused CPU kernels take these tensors (f32 on the CPU).
pub fn fused_applies(ts: &[&Tensor]) -> bool {
    cpu_f32(ts)
}

// ---------------------------------------------------------------------------------------------------------
// Softmax

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
mod simd {
    use std::arch::x86_64::*;

    /// [`super::exp_approx`] on eight lanes (same reduction and polynomial).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8(x: __m256) -> __m256 {
        const MAGIC: f32 = 12_582_912.0;
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(MAGIC));
        let n = _mm256_sub_ps(t, _mm256_set1_ps(MAGIC));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(MAGIC.to_bits() as i32));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(e, _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(e))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
    }

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
                *o = super::exp_approx(v * scale - m);
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
    simd::softmax_rows(x, y, n, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_bwd_avx2(y: &[f32], dy: &[f32], dx: &mut [f32], n: usize, scale: f32) {
    let blk = row_block(y.len() / n, n) * n;
    dx.par_chunks_mut(blk)
        .zip(y.par_chunks(blk).zip(dy.par_chunks(blk)))
        .for_each(|(o, (yb, gb))| simd::softmax_bwd_rows(yb, gb, o, n, scale));
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
    use candle_core::{Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }
    fn max_abs(a: &Tensor) -> f32 {
        a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }
    /// Asserts |a - b| <= tol * max(1, max |b|).
    fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        let d = max_diff(a, b);
        let scale = max_abs(b).max(1.0);
        assert!(d <= tol * scale, "{what}: differs by {d} (scale {scale})");
    }

    #[test]
    fn exp_approx_is_accurate_over_the_range() {
        let mut worst = 0f32;
        for i in -8700..8800 {
            let x = i as f32 * 0.01 + 0.003;
            let r = (exp_approx(x) - x.exp()).abs() / x.exp();
            worst = worst.max(r);
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert!(exp_approx(-1000.0) >= 0.0 && exp_approx(-1000.0) < 1e-37);
        assert!(exp_approx(1000.0).is_finite());
    }

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
        }
    }

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
