//! 3x3 stride-1 "same" convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, "Fast
//! Algorithms for Convolutional Neural Networks", sec. 4.1 and 5): a 4x4 input tile d and a 3x3 kernel g give
//! the 2x2 output tile
//!
//!   Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A                                           (Lavin & Gray, eq. 8)
//!
//! 16 multiplications instead of 36. Summed over the input channels, the elementwise products of all tiles
//! at one of the 16 positions xi form one GEMM, M[xi] = U[xi] V[xi] with U[xi] [Co, C] (the transformed
//! kernels) and V[xi] [C, tiles] (the transformed input tiles) (eq. 12): 2.25x fewer multiply-adds than
//! im2col's GEMM, plus the transforms, which are additions only (and halves for G).
//!
//! Both the forward pass and the input gradient use it: for stride 1 and padding 1, dx is the same kind of
//! convolution of the output gradient with the kernel transposed (channels swapped) and rotated by 180
//! degrees ([`kernel_transform`]'s `transposed`). Images are processed in groups of about [`TILE_BLOCK`]
//! tiles, so that the transformed tiles of a group stay in cache; each thread takes its share of the batch.
//! Tested against the im2col GEMM convolution (values and gradients) in `conv.rs`.

use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

use super::{gemm_strided, with_scratch, SharedMut};

/// Tiles per GEMM: at least this many per group of images (one image when it has more).
const TILE_BLOCK: usize = 64;

/// The transformed kernels U[xi][o][i] = (G k G^T)[xi] (Lavin & Gray, eq. 8) of a convolution from `ins` to
/// `outs` channels, w [outs, ins, 3, 3]; with `transposed`, those of the input-gradient convolution of w [ins,
/// outs, 3, 3]: k = w[i][o] rotated by 180 degrees.
pub(crate) fn kernel_transform(w: &[f32], outs: usize, ins: usize, transposed: bool) -> Vec<f32> {
    debug_assert_eq!(w.len(), outs * ins * 9);
    let mut u = vec![0f32; 16 * outs * ins];
    for o in 0..outs {
        for i in 0..ins {
            let mut k = [0f32; 9];
            if transposed {
                let src = &w[(i * outs + o) * 9..][..9];
                k.iter_mut().zip(src.iter().rev()).for_each(|(k, &s)| *k = s);
            } else {
                k.copy_from_slice(&w[(o * ins + i) * 9..][..9]);
            }
            // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
            let g_rows = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
            let mut gk = [[0f32; 3]; 4]; // G k
            for col in 0..3 {
                let t = g_rows(k[col], k[3 + col], k[6 + col]);
                (0..4).for_each(|r| gk[r][col] = t[r]);
            }
            for (r, row) in gk.iter().enumerate() {
                for (s, v) in g_rows(row[0], row[1], row[2]).into_iter().enumerate() {
                    u[((r * 4 + s) * outs + o) * ins + i] = v;
                }
            }
        }
    }
    u
}

/// B^T t for the four values of a column (or, applied to rows, t B):
/// B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
#[inline(always)]
fn bt(t: [f32; 4]) -> [f32; 4] {
    [t[0] - t[2], t[1] + t[2], t[2] - t[1], t[1] - t[3]]
}

/// A^T t: A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
#[inline(always)]
fn at(t: [f32; 4]) -> [f32; 2] {
    [t[0] + t[1] + t[2], t[1] - t[2] - t[3]]
}

/// The shape of one call: `ins` channels in, `outs` out, h x w maps (the same in and out), tiles of 2x2.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Same3x3 {
    pub ins: usize,
    pub outs: usize,
    pub h: usize,
    pub w: usize,
}

impl Same3x3 {
    fn tiles(&self) -> (usize, usize) {
        (self.h.div_ceil(2), self.w.div_ceil(2))
    }

    /// V[xi][c][p] = (B^T d B)[xi] of the 4x4 tile of channel c of the images `images` of x [B, ins, h, w]
    /// (zero outside the image) at column p of the group (image-major, then tile row, then tile column); rows
    /// of V[xi] are `ld` apart, V[xi] `ins * ld`. One tile row at a time: B^T over the tile's 4 input rows as
    /// whole-row vector operations, then B across each tile's 4 columns, written as 16 sequential runs.
    fn input_transform(&self, x: &[f32], images: Range<usize>, v: &mut [f32], ld: usize) {
        let (th, tw) = self.tiles();
        let (h, w, c) = (self.h, self.w, self.ins);
        // the 4 input rows of a tile row, with one column of padding on the left and enough on the right
        let width = 2 * tw + 2;
        let mut rows = [vec![0f32; width], vec![0f32; width], vec![0f32; width], vec![0f32; width]];
        let mut t = [vec![0f32; width], vec![0f32; width], vec![0f32; width], vec![0f32; width]];
        for (ii, img) in images.enumerate() {
            for ch in 0..c {
                let plane = &x[(img * c + ch) * h * w..][..h * w];
                for ty in 0..th {
                    for (r, row) in rows.iter_mut().enumerate() {
                        match (2 * ty + r).checked_sub(1).filter(|&y| y < h) {
                            Some(y) => row[1..=w].copy_from_slice(&plane[y * w..][..w]),
                            None => row.fill(0.0),
                        }
                    }
                    // B^T d for every column at once
                    let [t0, t1, t2, t3] = &mut t;
                    for (xx, (((a, b), c2), d)) in rows[0].iter().zip(&rows[1]).zip(&rows[2]).zip(&rows[3]).enumerate()
                    {
                        let [u0, u1, u2, u3] = bt([*a, *b, *c2, *d]);
                        (t0[xx], t1[xx], t2[xx], t3[xx]) = (u0, u1, u2, u3);
                    }
                    let p0 = (ii * th + ty) * tw;
                    for (r, tr) in t.iter().enumerate() {
                        // (B^T d) B across each tile's columns 2 tx .. 2 tx + 3
                        let base = |s: usize| ((r * 4 + s) * c + ch) * ld + p0;
                        let (b0, b1, b2, b3) = (base(0), base(1), base(2), base(3));
                        for tx in 0..tw {
                            let [u0, u1, u2, u3] = bt([tr[2 * tx], tr[2 * tx + 1], tr[2 * tx + 2], tr[2 * tx + 3]]);
                            v[b0 + tx] = u0;
                            v[b1 + tx] = u1;
                            v[b2 + tx] = u2;
                            v[b3 + tx] = u3;
                        }
                    }
                }
            }
        }
    }

    /// out[img][o] (the images `images`) = bias[o] + A^T m A of each tile (eq. 8), m[xi] = M[xi][o][p] (rows
    /// `ld` apart), cut to the h x w map. One tile row at a time: A^T over the 16 runs of the row's tiles as
    /// vector operations, then A across each tile.
    fn output_transform(&self, m: &[f32], bias: Option<&[f32]>, images: Range<usize>, out: &SharedMut, ld: usize) {
        let (th, tw) = self.tiles();
        let (h, w, o_n) = (self.h, self.w, self.outs);
        let mut t = [
            [vec![0f32; tw], vec![0f32; tw], vec![0f32; tw], vec![0f32; tw]],
            [vec![0f32; tw], vec![0f32; tw], vec![0f32; tw], vec![0f32; tw]],
        ];
        for (ii, img) in images.enumerate() {
            for o in 0..o_n {
                // SAFETY: image img's output planes are written by this call only
                let plane = unsafe { out.range((img * o_n + o) * h * w, h * w) };
                let b = bias.map_or(0.0, |b| b[o]);
                for ty in 0..th {
                    let p0 = (ii * th + ty) * tw;
                    let run = |xi: usize| &m[(xi * o_n + o) * ld + p0..][..tw];
                    // A^T m for every tile of the row at once: t[row][s][tx]
                    for s in 0..4 {
                        let (r0, r1, r2, r3) = (run(s), run(4 + s), run(8 + s), run(12 + s));
                        let [top, bottom] = &mut t;
                        for tx in 0..tw {
                            let [a, c2] = at([r0[tx], r1[tx], r2[tx], r3[tx]]);
                            top[s][tx] = a;
                            bottom[s][tx] = c2;
                        }
                    }
                    for (r, tr) in t.iter().enumerate() {
                        let y = 2 * ty + r;
                        if y >= h {
                            break;
                        }
                        let row = &mut plane[y * w..][..w];
                        for tx in 0..tw {
                            let [y0, y1] = at([tr[0][tx], tr[1][tx], tr[2][tx], tr[3][tx]]);
                            row[2 * tx] = b + y0;
                            if 2 * tx + 1 < w {
                                row[2 * tx + 1] = b + y1;
                            }
                        }
                    }
                }
            }
        }
    }

    /// One group of images: transform, 16 GEMMs, transform back.
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
        // rows a little longer than the tiles, so that the 16 runs of a transform do not fall on the same cache
        // sets (a row of 256 floats is 1 KiB; 4 of them 4 KiB apart alias)
        let ld = pb + 4;
        let (c, o) = (self.ins, self.outs);
        with_scratch(16 * c * ld, 16 * o * ld, |v, m| {
            self.input_transform(x, images.clone(), v, ld);
            for xi in 0..16 {
                // M[xi] [o, pb] = U[xi] [o, c] . V[xi] [c, pb]
                let (mx, ux, vx) =
                    (&mut m[xi * o * ld..][..o * ld], &u[xi * o * c..][..o * c], &v[xi * c * ld..][..c * ld]);
                gemm_strided(mx, (ld, false), (o, pb, c), ux, (c, 1), vx, (ld, 1), par);
            }
            self.output_transform(m, bias, images, out, ld);
        });
    }

    /// out [B, outs, h, w] = the convolution of x [B, ins, h, w] with the transformed kernels `u`
    /// ([`kernel_transform`]) plus `bias` (out is overwritten): each thread takes its share of the images, in
    /// groups of about [`TILE_BLOCK`] tiles.
    pub(crate) fn run(&self, x: &[f32], u: &[f32], bias: Option<&[f32]>, b: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), b * self.ins * self.h * self.w);
        debug_assert_eq!(out.len(), b * self.outs * self.h * self.w);
        debug_assert_eq!(u.len(), 16 * self.ins * self.outs);
        let (th, tw) = self.tiles();
        let per_group = TILE_BLOCK.div_ceil(th * tw).max(1);
        let out = SharedMut(out.as_mut_ptr());
        let threads = rayon::current_num_threads().max(1);
        if threads == 1 || b < threads {
            let par = if threads == 1 { Parallelism::None } else { Parallelism::Rayon(threads) };
            for start in (0..b).step_by(per_group) {
                self.group(x, u, bias, start..(start + per_group).min(b), &out, par);
            }
            return;
        }
        let per_thread = b.div_ceil(threads);
        (0..b.div_ceil(per_thread)).into_par_iter().for_each(|chunk| {
            let end = ((chunk + 1) * per_thread).min(b);
            for start in (chunk * per_thread..end).step_by(per_group) {
                self.group(x, u, bias, start..(start + per_group).min(end), &out, Parallelism::None);
            }
        });
    }
}
