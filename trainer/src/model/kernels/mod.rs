//! Fused CPU kernels with their own backward passes: what makes training on a laptop CPU practical.
//!
//! Candle's CPU backend builds GroupNorm from a dozen allocating, single-threaded ops, runs the input
//! gradient of conv2d through a direct loop and allocates a fresh tensor for every intermediate. The kernels
//! here replace the hot spots of the U-Net with one pass forward and one pass backward each, parallel over
//! the batch on every core:
//!
//! - [`conv2d`] (`conv.rs`): per image, im2col into a per-thread buffer (none for 1x1 convolutions) and one
//!   GEMM of the `gemm` crate straight into the NCHW output, bias included; backward recomputes the im2col
//!   matrix instead of keeping it (memory), and gives dx, dW and db in one pass. [`conv2d_gemm`], the
//!   whole-batch im2col GEMM on Candle tensors, lives beside it.
//! - [`group_norm_act`] (`group_norm.rs`): GroupNorm (Wu & He 2018) with a per-(image, channel) affine
//!   `a * x_hat + d` (which is how the scale-shift norm of Dhariwal & Nichol 2021 folds in) and an optional
//!   SiLU, in one pass.
//! - [`softmax_last_scaled`] (`softmax.rs`): softmax(s * x) over the last axis.
//! - `simd.rs`: the vectorisable e^x and sigmoid they share, and the AVX2 helpers.
//!
//! Each one runs for contiguous f32 tensors on the CPU and falls back to the composed Candle ops elsewhere
//! (CUDA, f16), so every device keeps working. Each file's `tests` checks its kernel's values and gradients
//! against Candle's reference ops.
//!
//! This module holds the plumbing they share: access to a tensor's f32 data, a pointer for disjoint
//! parallel writes, per-thread scratch buffers, the per-image batch loop, a GEMM call, and the run-time
//! choice between AVX2 and baseline code. The kernels are the lower layer: [`crate::model::ops`] and
//! [`crate::model::tape`] call them, never the reverse.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Compiles `$body` (a generic, inlined kernel) once for AVX2+FMA and once for the baseline target, and
/// picks at run time.
macro_rules! dispatch {
    ($avx:ident, $generic:ident ( $($arg:expr),* )) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $crate::model::kernels::avx2_fma() {
                // SAFETY: the CPU has the features the function was compiled for
                return unsafe { $avx($($arg),*) };
            }
        }
        $generic($($arg),*)
    }};
}

/// True when the CPU has AVX2 and FMA: the run-time test of [`dispatch!`] and of the kernels that choose by
/// hand.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

mod conv;
mod group_norm;
mod simd;
mod softmax;
mod winograd;

pub use conv::{conv2d, conv2d_gemm};
pub(crate) use conv::{conv2d_backward, conv2d_forward, ConvGeo};
pub use group_norm::group_norm_act;
pub(crate) use group_norm::{gn_backward, gn_forward, GroupNormSpec, NormGrads, NormInput};
pub(crate) use simd::sigmoid;
pub use softmax::softmax_last_scaled;
pub(crate) use softmax::{softmax_backward, softmax_forward};

/// True when the fused CPU path applies to all these tensors.
fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// True when the fused CPU kernels take these tensors (f32 on the CPU).
pub fn fused_applies(ts: &[&Tensor]) -> bool {
    cpu_f32(ts)
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

/// A pointer that threads may share while writing disjoint ranges. Going through [`SharedMut::range`]
/// (rather than the field) makes closures capture the whole (Send + Sync) wrapper.
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
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    par: Parallelism,
) {
    gemm_strided(dst, (n, accumulate), (m, n, k), lhs, lhs_strides, rhs, rhs_strides, par)
}

/// [`gemm_into`] with dst's rows `dst_rs` apart.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    dst: &mut [f32],
    (dst_rs, accumulate): (usize, bool),
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    par: Parallelism,
) {
    debug_assert!(m == 0 || n == 0 || dst.len() >= (m - 1) * dst_rs + n);
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
            dst_rs as isize,
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

/// What the kernels' tests share: comparison against Candle's reference ops.
#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }
    fn max_abs(a: &Tensor) -> f32 {
        a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }
    /// Asserts |a - b| <= tol * max(1, max |b|).
    pub(super) fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        let d = max_diff(a, b);
        let scale = max_abs(b).max(1.0);
        assert!(d <= tol * scale, "{what}: differs by {d} (scale {scale})");
    }
}
