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
//! Both the forward pass and the input gradient use it: for stride 1 and padding 1, dx is the same kind of
//! convolution of the output gradient with the kernel transposed (channels swapped) and rotated by 180
//! degrees ([`kernel_transform`]'s `transposed`). Images are processed in groups of about [`TILE_BLOCK`]
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

/// The body of [`Same3x3::input_transform`], compiled for the baseline and for AVX2 and FMA.
#[inline(always)]
fn input_transform(g: &Same3x3, x: &[f32], images: Range<usize>, v: &mut [f32], ld: usize) {
    let (th, tw) = g.tiles();
    let (h, w, c) = (g.h, g.w, g.ins);
    // the 6 input rows of a tile row, with one column of padding on the left and enough on the right
    let width = M * tw + 2;
    let mut rows: [Vec<f32>; A] = std::array::from_fn(|_| vec![0f32; width]);
    let mut t: [Vec<f32>; A] = std::array::from_fn(|_| vec![0f32; width]);
    for (ii, img) in images.enumerate() {
        for ch in 0..c {
            let plane = &x[(img * c + ch) * h * w..][..h * w];
            for ty in 0..th {
                for (r, row) in rows.iter_mut().enumerate() {
                    match (M * ty + r).checked_sub(1).filter(|&y| y < h) {
                        Some(y) => row[1..=w].copy_from_slice(&plane[y * w..][..w]),
                        None => row.fill(0.0),
                    }
                }
                // B^T d for every column at once
                for xx in 0..width {
                    let col = bt(std::array::from_fn(|r| rows[r][xx]));
                    (0..A).for_each(|r| t[r][xx] = col[r]);
                }
                let p0 = (ii * th + ty) * tw;
                for (r, tr) in t.iter().enumerate() {
                    // (B^T d) B across each tile's columns M tx .. M tx + 5
                    let base: [usize; A] = std::array::from_fn(|s| ((r * A + s) * c + ch) * ld + p0);
                    for tx in 0..tw {
                        let vals = bt(std::array::from_fn(|s| tr[M * tx + s]));
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_transform_avx2(g: &Same3x3, x: &[f32], images: Range<usize>, v: &mut [f32], ld: usize) {
    input_transform(g, x, images, v, ld)
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
