//! 3x3 stride-1 "same" convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016, "Fast
//! Algorithms for Convolutional Neural Networks", sec. 4.2 and 5): a 6x6 input tile d and a 3x3 kernel g give
//! the 4x4 output tile
//!
//!   Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A                                           (Lavin & Gray, eq. 8)
//!
//! 36 multiplications instead of 144. Summed over the input channels, the elementwise products of all tiles
//! at one of the 36 positions xi form one GEMM, M[xi] = U[xi] V[xi] with U[xi] [Co, C] (the transformed
//! kernels) and V[xi] [C, tiles] (the transformed input tiles) (eq. 12): 4x fewer multiply-adds than
//! im2col's GEMM, plus the transforms, which are a few additions per value. F(2x2, 3x3) (16 GEMMs, 2.25x
//! fewer multiply-adds) was measured first: its transforms write 4 values per input value and read 4 per
//! output value, F(4x4, 3x3)'s 2.25, and on the 2-core machines the transforms cost as much as the GEMMs
//! (benches/RESULTS.md). F(4x4, 3x3)'s f32 error stays within the tests' bound in `conv.rs` (1e-5 of
//! the largest value, against Candle's convolution), and a 300-step MNIST run ends at the same loss.
//!
//! The forward pass and both gradients use it: for stride 1 and padding 1, dx is the same kind of
//! convolution of the output gradient with the kernel transposed (channels swapped) and rotated by 180
//! degrees ([`kernel_transform`]'s `transposed`); dW runs the forward's transforms backwards (their adjoints:
//! [`Same3x3::weight_grad`], Lavin & Gray sec. 5). Images are processed in groups of about [`TILE_BLOCK`]
//! tiles, so that the transformed tiles of a group stay in cache; each thread takes its share of the groups.
//! Tested against Candle's convolution (values and gradients) in `conv.rs`.

use std::ops::Range;

use gemm::Parallelism;

use super::{for_images, gemm_strided, with_scratch, SharedMut};

/// Tiles per GEMM: at least this many per group of images (one image when it has more).
const TILE_BLOCK: usize = 64;

/// Output tile side (m) and input tile side (m + 2) of F(m x m, 3 x 3); XI = (m + 2)^2 GEMMs.
const M: usize = 4;
const A: usize = M + 2;
const XI: usize = A * A;

/// The transformed kernels U[xi][o][i] = (G k G^T)[xi] (Lavin & Gray, eq. 8) of a convolution from `ins` to
/// `outs` channels, w [outs, ins, 3, 3]; with `transposed`, those of the input-gradient convolution of w [ins,
/// outs, 3, 3]: k = w[i][o] rotated by 180 degrees.
pub(crate) fn kernel_transform(w: &[f32], outs: usize, ins: usize, transposed: bool) -> Vec<f32> {
    debug_assert_eq!(w.len(), outs * ins * 9);
    let mut u = vec![0f32; XI * outs * ins];
    for o in 0..outs {
        for i in 0..ins {
            let mut k = [0f32; 9];
            if transposed {
                let src = &w[(i * outs + o) * 9..][..9];
                k.iter_mut().zip(src.iter().rev()).for_each(|(k, &s)| *k = s);
            } else {
                k.copy_from_slice(&w[(o * ins + i) * 9..][..9]);
            }
            let mut gk = [[0f32; 3]; A]; // G k
            for col in 0..3 {
                let t = g(k[col], k[3 + col], k[6 + col]);
                (0..A).for_each(|r| gk[r][col] = t[r]);
            }
            for (r, row) in gk.iter().enumerate() {
                for (s, v) in g(row[0], row[1], row[2]).into_iter().enumerate() {
                    u[((r * A + s) * outs + o) * ins + i] = v;
                }
            }
        }
    }
    u
}

/// G (a, b, c)^T: G = [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6],
/// [1/24, -1/12, 1/6], [0, 0, 1]] (Lavin & Gray, sec. 4.2).
#[inline(always)]
fn g(a: f32, b: f32, c: f32) -> [f32; A] {
    let (p, q) = (a / 24.0 + c / 6.0, b / 12.0);
    [a / 4.0, -(a + b + c) / 6.0, -(a - b + c) / 6.0, p + q, p - q, c]
}

/// B^T d for the six values of a column (or, applied to rows, d B): B^T = [[4, 0, -5, 0, 1, 0],
/// [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]].
#[inline(always)]
fn bt(d: [f32; A]) -> [f32; A] {
    let (s13, s24) = (d[3] - 4.0 * d[1], d[4] - 4.0 * d[2]);
    let (t13, t24) = (2.0 * (d[3] - d[1]), d[4] - d[2]);
    [4.0 * d[0] - 5.0 * d[2] + d[4], s24 + s13, s24 - s13, t24 + t13, t24 - t13, 4.0 * d[1] - 5.0 * d[3] + d[5]]
}

/// A^T t: A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]].
#[inline(always)]
fn at(t: [f32; A]) -> [f32; M] {
    let (a, b) = (t[1] + t[2], t[1] - t[2]);
    let (c, d) = (t[3] + t[4], t[3] - t[4]);
    [t[0] + a + c, b + 2.0 * d, a + 4.0 * c, b + 8.0 * d + t[5]]
}

/// A t for the four values of a column (or, applied to rows, t A^T): the adjoint of [`at`], which spreads an
/// output-gradient tile over the 6 x 6 positions.
#[inline(always)]
fn a(t: [f32; M]) -> [f32; A] {
    let (e, o) = (t[0] + t[2], t[1] + t[3]);
    let (e4, o8) = (t[0] + 4.0 * t[2], 2.0 * t[1] + 8.0 * t[3]);
    [t[0], e + o, e - o, e4 + o8, e4 - o8, t[3]]
}

/// G^T u for six values: the adjoint of [`g`], which folds a transformed kernel's gradient back to 3 taps.
#[inline(always)]
fn gt(u: [f32; A]) -> [f32; 3] {
    let (s12, d12, s34, d34) = (u[1] + u[2], u[2] - u[1], u[3] + u[4], u[3] - u[4]);
    [u[0] / 4.0 - s12 / 6.0 + s34 / 24.0, d12 / 6.0 + d34 / 12.0, -s12 / 6.0 + s34 / 6.0 + u[5]]
}

/// The kernel gradient dW [outs, ins, 3, 3] = G^T dU G of the transformed kernels' gradient dU[xi][o][i]
/// (the adjoint of [`kernel_transform`]).
fn kernel_grad_transform(du: &[f32], outs: usize, ins: usize) -> Vec<f32> {
    debug_assert_eq!(du.len(), XI * outs * ins);
    let mut dw = vec![0f32; outs * ins * 9];
    for o in 0..outs {
        for i in 0..ins {
            let mut t = [[0f32; A]; 3]; // G^T dU, t[ky][s]
            for s in 0..A {
                let col = gt(std::array::from_fn(|r| du[((r * A + s) * outs + o) * ins + i]));
                (0..3).for_each(|ky| t[ky][s] = col[ky]);
            }
            for (ky, row) in t.into_iter().enumerate() {
                dw[(o * ins + i) * 9 + 3 * ky..][..3].copy_from_slice(&gt(row));
            }
        }
    }
    dw
}

/// The shape of one call: `ins` channels in, `outs` out, h x w maps (the same in and out), output tiles of
/// M x M.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Same3x3 {
    pub ins: usize,
    pub outs: usize,
    pub h: usize,
    pub w: usize,
}

impl Same3x3 {
    fn tiles(&self) -> (usize, usize) {
        (self.h.div_ceil(M), self.w.div_ceil(M))
    }

    /// V[xi][c][p] = (B^T d B)[xi] of the 6x6 tile of channel c of the images `images` of x [B, ins, h, w]
    /// (zero outside the image) at column p of the group (image-major, then tile row, then tile column); rows
    /// of V[xi] are `ld` apart, V[xi] `ins * ld`. One tile row at a time: B^T over the tile's 6 input rows as
    /// whole-row vector operations, then B across each tile's 6 columns, written as 36 sequential runs.
    fn input_transform(&self, x: &[f32], images: Range<usize>, v: &mut [f32], ld: usize) {
        dispatch!(input_transform_avx2, input_transform(self, x, images, v, ld))
    }

    /// The output of the group's tiles from the GEMMs' results ([`output_transform`]), with AVX2 and FMA
    /// where the CPU has them.
    fn output_transform(&self, m: &[f32], bias: Option<&[f32]>, images: Range<usize>, out: &SharedMut, ld: usize) {
        dispatch!(output_transform_avx2, output_transform(self, m, bias, images, out, ld))
    }

    /// W[xi][o][p] = (A dY A^T)[xi] of the M x M tile of the output gradient dY of channel o (zero outside the
    /// map), laid out as [`Self::input_transform`]'s V with `outs` channels.
    fn grad_transform(&self, gr: &[f32], images: Range<usize>, v: &mut [f32], ld: usize) {
        dispatch!(grad_transform_avx2, grad_transform(self, gr, images, v, ld))
    }

    /// One group of images: transform, XI GEMMs, transform back.
    fn group(
        &self,
        x: &[f32],
        u: &[f32],
        bias: Option<&[f32]>,
        images: Range<usize>,
        out: &SharedMut,
        par: Parallelism,
    ) {
        let (th, tw) = self.tiles();
        let pb = images.len() * th * tw;
        // rows a little longer than the tiles, so that the runs of a transform do not fall on the same cache
        // sets (a row of 256 floats is 1 KiB; 4 of them 4 KiB apart alias)
        let ld = pb + 4;
        let (c, o) = (self.ins, self.outs);
        with_scratch(XI * c * ld, XI * o * ld, |v, m| {
            self.input_transform(x, images.clone(), v, ld);
            for xi in 0..XI {
                // M[xi] [o, pb] = U[xi] [o, c] . V[xi] [c, pb]
                let (mx, ux, vx) =
                    (&mut m[xi * o * ld..][..o * ld], &u[xi * o * c..][..o * c], &v[xi * c * ld..][..c * ld]);
                gemm_strided(mx, (ld, false), (o, pb, c), ux, (c, 1), vx, (ld, 1), par);
            }
            self.output_transform(m, bias, images, out, ld);
        });
    }

    /// out [B, outs, h, w] = the convolution of x [B, ins, h, w] with the transformed kernels `u`
    /// ([`kernel_transform`]) plus `bias` (out is overwritten), in groups of images of about [`TILE_BLOCK`]
    /// tiles, each thread taking its share of the groups.
    pub(crate) fn run(&self, x: &[f32], u: &[f32], bias: Option<&[f32]>, b: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), b * self.ins * self.h * self.w);
        debug_assert_eq!(out.len(), b * self.outs * self.h * self.w);
        debug_assert_eq!(u.len(), XI * self.ins * self.outs);
        let (th, tw) = self.tiles();
        let per_group = TILE_BLOCK.div_ceil(th * tw).max(1);
        let out = SharedMut(out.as_mut_ptr());
        // the groups are the units of the batch loop: a share of them per thread, or (fewer groups than
        // threads) one after the other with the GEMMs parallel
        for_images(
            b.div_ceil(per_group),
            || (),
            |_, g, par| self.group(x, u, bias, g * per_group..((g + 1) * per_group).min(b), &out, par),
        );
    }
}

impl Same3x3 {
    /// The kernel gradient dW [outs, ins, 3, 3] of [`Self::run`] for the output gradient `gr` [B, outs, h, w]
    /// of input x [B, ins, h, w] (Lavin & Gray 2016, sec. 5): the loss is sum over tiles of
    /// <A dY A^T, U ⊙ V>, so dU[xi] = sum over tiles of (A dY A^T)[xi] (B^T d B)[xi], one GEMM a position
    /// ([outs, tiles] . [tiles, ins]), and dW = G^T dU G: 36 multiplications per tile and channel pair
    /// instead of im2col's 144. Groups of about [`GRAD_TILE_BLOCK`] tiles; each thread sums its groups' dU.
    pub(crate) fn weight_grad(&self, x: &[f32], gr: &[f32], b: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), b * self.ins * self.h * self.w);
        debug_assert_eq!(gr.len(), b * self.outs * self.h * self.w);
        let (th, tw) = self.tiles();
        let (c, o) = (self.ins, self.outs);
        let per_group = GRAD_TILE_BLOCK.div_ceil(th * tw).max(1);
        let parts = for_images(
            b.div_ceil(per_group),
            || vec![0f32; XI * o * c],
            |du, g, par| {
                let images = g * per_group..((g + 1) * per_group).min(b);
                let pb = images.len() * th * tw;
                let ld = pb + 4;
                with_scratch(XI * c * ld, XI * o * ld, |v, m| {
                    self.input_transform(x, images.clone(), v, ld);
                    self.grad_transform(gr, images, m, ld);
                    for xi in 0..XI {
                        // dU[xi] [o, c] += W[xi] [o, pb] . V[xi]^T [pb, c]
                        let (dux, mx, vx) =
                            (&mut du[xi * o * c..][..o * c], &m[xi * o * ld..][..o * ld], &v[xi * c * ld..][..c * ld]);
                        gemm_strided(dux, (c, true), (o, c, pb), mx, (ld, 1), vx, (1, ld), par);
                    }
                });
            },
        );
        let mut parts = parts.into_iter();
        let mut du = parts.next().expect("at least one group");
        for p in parts {
            du.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        }
        kernel_grad_transform(&du, o, c)
    }
}

/// Tiles per GEMM of the kernel gradient: its GEMMs sum over the tiles, so longer runs amortise the
/// accumulation into dU.
const GRAD_TILE_BLOCK: usize = 256;

/// The body of [`Same3x3::input_transform`] (and of [`Same3x3::grad_transform`]), compiled for the baseline
/// and for AVX2 and FMA: the 2-D transform f(f(d)^T)^T of every K x K tile of the `chans` planes of `src`
/// [B, chans, h, w] that starts `pad` pixels above and left of an output tile (zero outside the map), written as
/// V[xi][chan][p] like [`Same3x3::input_transform`]'s. One tile row at a time: f over the tile's K rows as
/// whole-row vector operations, then f across each tile's K columns, written as 36 sequential runs.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_transform<const K: usize>(
    g: &Same3x3,
    src: &[f32],
    chans: usize,
    pad: usize,
    f: impl Fn([f32; K]) -> [f32; A],
    images: Range<usize>,
    v: &mut [f32],
    ld: usize,
) {
    let (th, tw) = g.tiles();
    let (h, w) = (g.h, g.w);
    // the K rows of a tile row, `pad` columns of zeros on the left and enough on the right (never written)
    let width = M * tw + K - M;
    let mut rows: [Vec<f32>; K] = std::array::from_fn(|_| vec![0f32; width]);
    let mut t: [Vec<f32>; A] = std::array::from_fn(|_| vec![0f32; width]);
    for (ii, img) in images.enumerate() {
        for ch in 0..chans {
            let plane = &src[(img * chans + ch) * h * w..][..h * w];
            for ty in 0..th {
                for (r, row) in rows.iter_mut().enumerate() {
                    match (M * ty + r).checked_sub(pad).filter(|&y| y < h) {
                        Some(y) => row[pad..pad + w].copy_from_slice(&plane[y * w..][..w]),
                        None => row.fill(0.0),
                    }
                }
                // f over the rows, for every column at once
                for xx in 0..width {
                    let col = f(std::array::from_fn(|r| rows[r][xx]));
                    (0..A).for_each(|r| t[r][xx] = col[r]);
                }
                let p0 = (ii * th + ty) * tw;
                for (r, tr) in t.iter().enumerate() {
                    // f across each tile's columns M tx .. M tx + K - 1
                    let base: [usize; A] = std::array::from_fn(|s| ((r * A + s) * chans + ch) * ld + p0);
                    for tx in 0..tw {
                        let vals = f(std::array::from_fn(|s| tr[M * tx + s]));
                        for s in 0..A {
                            v[base[s] + tx] = vals[s];
                        }
                    }
                }
            }
        }
    }
}

/// out[img][o] (the images `images`) = bias[o] + A^T m A of each tile (eq. 8), m[xi] = M[xi][o][p] (rows
/// `ld` apart), cut to the h x w map. One tile row at a time: A^T over the 36 runs of the row's tiles as
/// vector operations, then A across each tile.
#[inline(always)]
fn output_transform(g: &Same3x3, m: &[f32], bias: Option<&[f32]>, images: Range<usize>, out: &SharedMut, ld: usize) {
    let (th, tw) = g.tiles();
    let (h, w, o_n) = (g.h, g.w, g.outs);
    // t[row][s][tx]: A^T m of column s of each tile, output row `row`
    let mut t: [[Vec<f32>; A]; M] = std::array::from_fn(|_| std::array::from_fn(|_| vec![0f32; tw]));
    for (ii, img) in images.enumerate() {
        for o in 0..o_n {
            // SAFETY: image img's output planes are written by this call only
            let plane = unsafe { out.range((img * o_n + o) * h * w, h * w) };
            let b = bias.map_or(0.0, |b| b[o]);
            for ty in 0..th {
                let p0 = (ii * th + ty) * tw;
                for s in 0..A {
                    let runs: [&[f32]; A] = std::array::from_fn(|r| &m[((r * A + s) * o_n + o) * ld + p0..][..tw]);
                    for tx in 0..tw {
                        let col = at(std::array::from_fn(|r| runs[r][tx]));
                        (0..M).for_each(|row| t[row][s][tx] = col[row]);
                    }
                }
                for (r, tr) in t.iter().enumerate() {
                    let y = M * ty + r;
                    if y >= h {
                        break;
                    }
                    // tile tx's M outputs (fewer in the last tile of an odd width)
                    for (tx, outs) in plane[y * w..][..w].chunks_mut(M).enumerate() {
                        let ys = at(std::array::from_fn(|s| tr[s][tx]));
                        outs.iter_mut().zip(ys).for_each(|(dst, yv)| *dst = b + yv);
                    }
                }
            }
        }
    }
}

/// V = (B^T d B) of the input tiles: [`tile_transform`] of 6 x 6 tiles one pixel up and left of the output's.
#[inline(always)]
fn input_transform(g: &Same3x3, x: &[f32], images: Range<usize>, v: &mut [f32], ld: usize) {
    tile_transform::<A>(g, x, g.ins, 1, bt, images, v, ld)
}

/// W = (A dY A^T) of the output-gradient tiles: [`tile_transform`] of the M x M output tiles.
#[inline(always)]
fn grad_transform(g: &Same3x3, gr: &[f32], images: Range<usize>, v: &mut [f32], ld: usize) {
    tile_transform::<M>(g, gr, g.outs, 0, a, images, v, ld)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_transform_avx2(g: &Same3x3, x: &[f32], images: Range<usize>, v: &mut [f32], ld: usize) {
    input_transform(g, x, images, v, ld)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_transform_avx2(g: &Same3x3, gr: &[f32], images: Range<usize>, v: &mut [f32], ld: usize) {
    grad_transform(g, gr, images, v, ld)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_transform_avx2(
    g: &Same3x3,
    m: &[f32],
    bias: Option<&[f32]>,
    images: Range<usize>,
    out: &SharedMut,
    ld: usize,
) {
    output_transform(g, m, bias, images, out, ld)
}
