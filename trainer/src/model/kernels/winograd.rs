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
//! output value, F(4x4, 3x3)'s 2.25 (benches/RESULTS.md).
//!
//! The transforms run with the channels in the vector lanes: each image is first copied with its channels
//! innermost, so that one value of 16 channels is 16 consecutive floats and a tile's transform for 16
//! channels is a few dozen vector operations of fixed shape, whatever the map's width (transforming along
//! the map's rows kept them to short, strided loops on the small maps of these nets, and they cost more than
//! the GEMMs). The transformed tiles are stored tile-major, V[xi] [tiles, C] and M[xi] [tiles, Co], and the
//! kernels as U[xi] [C, Co], so each GEMM is M[xi]^T = V[xi]^T U[xi]^T with every operand in the order the
//! `gemm` crate reads without packing. F(4x4, 3x3)'s f32 error stays within the tests' bound in `conv.rs` (1e-5 of
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

use super::simd::transpose;
use super::{for_images, gemm_strided, with_scratch, SharedMut};

/// Tiles per GEMM: at least this many per group of images (one image when it has more).
const TILE_BLOCK: usize = 64;

/// Output tile side (m) and input tile side (m + 2) of F(m x m, 3 x 3); XI = (m + 2)^2 GEMMs.
const M: usize = 4;
const A: usize = M + 2;
const XI: usize = A * A;

/// The transformed kernels U[xi][i][o] = (G k G^T)[xi] (Lavin & Gray, eq. 8) of a convolution from `ins` to
/// `outs` channels, w [outs, ins, 3, 3]; with `transposed`, those of the input-gradient convolution of w [ins,
/// outs, 3, 3]: k = w[i][o] rotated by 180 degrees. Stored with the output channels contiguous, so that the
/// GEMMs read U[xi] [ins, outs] as it is, without packing it.
pub(crate) fn kernel_transform(w: &[f32], outs: usize, ins: usize, transposed: bool) -> Vec<f32> {
    assert_eq!(w.len(), outs * ins * 9);
    let mut u = vec![0f32; XI * outs * ins];
    kernel_transform_into(w, (outs, ins), transposed, &mut u);
    u
}

/// The body of [`kernel_transform`], with AVX2 and FMA where the CPU has them.
fn kernel_transform_into(w: &[f32], shape: (usize, usize), transposed: bool, u: &mut [f32]) {
    dispatch!(kernel_transform_avx2, kernel_transform_lanes(w, shape, transposed, u))
}

/// [`kernel_transform`] with the output channels in lanes: the kernels from one input channel to 16 output
/// channels at once, so that each transformed value is stored as a run of 16.
#[inline(always)]
fn kernel_transform_lanes(w: &[f32], (outs, ins): (usize, usize), transposed: bool, u: &mut [f32]) {
    for i in 0..ins {
        for (o0, l) in lane_chunks(outs) {
            match l {
                16 => kernel_tile::<16>(w, (outs, ins), transposed, (o0, i), u),
                8 => kernel_tile::<8>(w, (outs, ins), transposed, (o0, i), u),
                _ => kernel_tile::<1>(w, (outs, ins), transposed, (o0, i), u),
            }
        }
    }
}

/// G k G^T of the L kernels from input channel i to output channels o0.., into U[xi][i][o0..o0 + L].
#[inline(always)]
fn kernel_tile<const L: usize>(
    w: &[f32],
    (outs, ins): (usize, usize),
    transposed: bool,
    (o0, i): (usize, usize),
    u: &mut [f32],
) {
    let g3 = |[a, b, c]: [f32; 3]| g(a, b, c);
    let mut k = [[0f32; L]; 9];
    for (l, o) in (o0..o0 + L).enumerate() {
        for (tap, kt) in k.iter_mut().enumerate() {
            kt[l] = if transposed { w[(i * outs + o) * 9 + 8 - tap] } else { w[(o * ins + i) * 9 + tap] };
        }
    }
    let mut gk = [[[0f32; L]; 3]; A]; // G k, gk[r][col]
    for col in 0..3 {
        for (r, v) in lanewise(g3, &[k[col], k[3 + col], k[6 + col]]).into_iter().enumerate() {
            gk[r][col] = v;
        }
    }
    for (r, row) in gk.iter().enumerate() {
        for (s, v) in lanewise(g3, row).iter().enumerate() {
            u[((r * A + s) * ins + i) * outs + o0..][..L].copy_from_slice(v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_transform_avx2(w: &[f32], shape: (usize, usize), transposed: bool, u: &mut [f32]) {
    kernel_transform_lanes(w, shape, transposed, u)
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

    /// V[xi][p][c] = (B^T d B)[xi] of the 6x6 tile of channel c (zero outside the image) at the group's tile p
    /// (image-major, then tile row, then tile column) of the images `images` of x [B, ins, h, w]; the XI blocks
    /// [tiles, ins] are `vs` apart. `buf` holds one image with its channels in lanes ([`padded_len`]): the 6 x 6
    /// tiles start one pixel up and left of the output's.
    fn input_transform(&self, x: &[f32], images: Range<usize>, v: &mut [f32], vs: usize, buf: &mut [f32]) {
        self.tile_transform((x, self.ins), 1, bt, images, (v, vs), buf)
    }

    /// W[xi][p][o] = (A dY A^T)[xi] of the M x M tile of the output gradient dY of channel o (zero outside the
    /// map), laid out as [`Self::input_transform`]'s V with `outs` channels.
    fn grad_transform(&self, gr: &[f32], images: Range<usize>, v: &mut [f32], vs: usize, buf: &mut [f32]) {
        self.tile_transform((gr, self.outs), 0, a, images, (v, vs), buf)
    }

    /// [`tile_transform`], with AVX2 and FMA where the CPU has them.
    fn tile_transform<const K: usize>(
        &self,
        src: (&[f32], usize),
        pad: usize,
        f: impl Fn([f32; K]) -> [f32; A] + Copy,
        images: Range<usize>,
        v: (&mut [f32], usize),
        buf: &mut [f32],
    ) {
        dispatch!(tile_transform_avx2, tile_transform(self, src, pad, f, images, v, buf))
    }

    /// The output of the group's tiles from the GEMMs' results m[xi][p][o] (blocks `ms` apart), through the
    /// staging buffer `st` of one image's tiles ([`output_transform`]).
    fn output_transform(
        &self,
        m: &[f32],
        ms: usize,
        bias: Option<&[f32]>,
        images: Range<usize>,
        out: &SharedMut,
        st: &mut [f32],
    ) {
        dispatch!(output_transform_avx2, output_transform(self, m, ms, bias, images, out, st))
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
        let (c, o) = (self.ins, self.outs);
        let (vs, ms) = (pb * c + SKEW, pb * o + SKEW);
        let staging = M * th * M * tw * o;
        with_scratch(XI * vs + padded_len(th, tw, A, c), XI * ms + staging, |a, b| {
            let (v, buf) = a.split_at_mut(XI * vs);
            let (m, st) = b.split_at_mut(XI * ms);
            self.input_transform(x, images.clone(), v, vs, buf);
            for xi in 0..XI {
                // M[xi] [pb, o] = V[xi] [pb, c] . U[xi] [c, o]
                let (mx, vx, ux) = (&mut m[xi * ms..][..pb * o], &v[xi * vs..][..pb * c], &u[xi * o * c..][..o * c]);
                gemm_strided(mx, (o, false), (pb, o, c), vx, (c, 1), ux, (o, 1), par);
            }
            self.output_transform(m, ms, bias, images, out, st);
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
                let (vs, ws) = (pb * c + SKEW, pb * o + SKEW);
                let (xbuf, gbuf) = (padded_len(th, tw, A, c), padded_len(th, tw, M, o));
                with_scratch(XI * vs + xbuf, XI * ws + gbuf, |a, b| {
                    let (v, xbuf) = a.split_at_mut(XI * vs);
                    let (m, gbuf) = b.split_at_mut(XI * ws);
                    self.input_transform(x, images.clone(), v, vs, xbuf);
                    self.grad_transform(gr, images, m, ws, gbuf);
                    for xi in 0..XI {
                        // dU[xi] [o, c] += W[xi]^T [o, pb] . V[xi] [pb, c]
                        let (dux, mx, vx) =
                            (&mut du[xi * o * c..][..o * c], &m[xi * ws..][..pb * o], &v[xi * vs..][..pb * c]);
                        gemm_strided(dux, (c, true), (o, c, pb), mx, (1, o), vx, (c, 1), par);
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

/// Floats between the XI blocks of the transformed tiles beyond their size, so that a tile's 36 stores (and
/// the output transform's 36 loads) do not fall on one cache set, as blocks of a power-of-two size would.
const SKEW: usize = 16;

/// The channel chunks that the transforms take at once, (first channel, count): 16 at a time (vectors of 16
/// lanes, or two of 8), then 8, then one by one.
fn lane_chunks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let sixteens = n / 16 * 16;
    let eights = sixteens + if n - sixteens >= 8 { 8 } else { 0 };
    let wide = (0..sixteens).step_by(16).map(|c| (c, 16));
    wide.chain((sixteens..eights).step_by(8).map(|c| (c, 8))).chain((eights..n).map(|c| (c, 1)))
}

/// The floats of one image's `chans` planes with the channels in lanes, framed for the K x K tiles that start
/// every M pixels of a th x tw grid of tiles ([`to_lanes`]).
fn padded_len(th: usize, tw: usize, k: usize, chans: usize) -> usize {
    (M * th + k - M) * (M * tw + k - M) * chans
}

/// buf[(py * wp + px) * c + ch] = src[ch][py - pad][px - pad] for one image src [c, h, w], zero outside it:
/// the image with its channels in lanes, framed by the tiles' padding (rows of wp pixels).
fn to_lanes(src: &[f32], (c, h, w): (usize, usize, usize), pad: usize, wp: usize, buf: &mut [f32]) {
    // the frame: rows above and below the map, columns left and right of it
    let (top, inner) = (pad * wp * c, h * wp * c);
    buf[..top].fill(0.0);
    buf[top + inner..].fill(0.0);
    for (y, row) in buf[top..top + inner].chunks_exact_mut(wp * c).enumerate() {
        row[..pad * c].fill(0.0);
        row[(pad + w) * c..].fill(0.0);
        // the image row: [c, w] (planes h * w apart) to [w, c]
        transpose(&src[y * w..], (c, w), h * w, &mut row[pad * c..], c, None);
    }
}

/// planes[ch][y][x] = bias[ch] + st[(y * ws + x) * c + ch] for y < h, x < w: one image's output tiles, staged
/// with the channels in lanes (rows of ws pixels), back in the output's planes [c, h, w], cut to the map.
fn from_lanes(st: &[f32], (c, h, w): (usize, usize, usize), ws: usize, bias: Option<&[f32]>, planes: &mut [f32]) {
    for y in 0..h {
        // the output row: [w, c] to [c, w] (planes h * w apart)
        transpose(&st[y * ws * c..], (w, c), c, &mut planes[y * w..], h * w, bias);
    }
}

/// f applied lane by lane: out[j][l] = f(d[0][l], ..., d[K-1][l])[j], which the compiler turns into L-lane
/// vector operations.
#[inline(always)]
fn lanewise<const K: usize, const J: usize, const L: usize>(
    f: impl Fn([f32; K]) -> [f32; J],
    d: &[[f32; L]; K],
) -> [[f32; L]; J] {
    let mut out = [[0f32; L]; J];
    for l in 0..L {
        let mut col = [0f32; K];
        for (c, dk) in col.iter_mut().zip(d) {
            *c = dk[l];
        }
        let r = f(col);
        for j in 0..J {
            out[j][l] = r[j];
        }
    }
    out
}

/// The 2-D transform f(f(d)^T)^T of the K x K tile of L channels whose first value is src[origin] (pixels `col`
/// apart, rows `row` apart), written to dst[xi * stride + off ..][..L] for its 36 positions xi.
#[inline(always)]
fn tile_in<const K: usize, const L: usize>(
    f: impl Fn([f32; K]) -> [f32; A] + Copy,
    src: &[f32],
    (origin, row, col): (usize, usize, usize),
    dst: &mut [f32],
    stride: usize,
    off: usize,
) {
    let mut t = [[[0f32; L]; K]; A]; // t[r][s]: f over the rows of column s
    for s in 0..K {
        let mut d = [[0f32; L]; K];
        for (r, dr) in d.iter_mut().enumerate() {
            dr.copy_from_slice(&src[origin + r * row + s * col..][..L]);
        }
        for (r, v) in lanewise(f, &d).into_iter().enumerate() {
            t[r][s] = v;
        }
    }
    for (r, tr) in t.iter().enumerate() {
        for (s, v) in lanewise(f, tr).iter().enumerate() {
            dst[(r * A + s) * stride + off..][..L].copy_from_slice(v);
        }
    }
}

/// The output tile A^T m A of L channels from m[xi * stride + off ..][..L] (its 36 positions), written as the
/// M x M pixels of st from st[origin] on (pixels `col` apart, rows `row` apart).
#[inline(always)]
fn tile_out<const L: usize>(
    m: &[f32],
    stride: usize,
    off: usize,
    st: &mut [f32],
    (origin, row, col): (usize, usize, usize),
) {
    let mut t = [[[0f32; L]; A]; M]; // t[r][s]: A^T over the rows of column s
    for s in 0..A {
        let mut d = [[0f32; L]; A];
        for (r, dr) in d.iter_mut().enumerate() {
            dr.copy_from_slice(&m[(r * A + s) * stride + off..][..L]);
        }
        for (r, v) in lanewise(at, &d).into_iter().enumerate() {
            t[r][s] = v;
        }
    }
    for (r, tr) in t.iter().enumerate() {
        for (s, v) in lanewise(at, tr).iter().enumerate() {
            st[origin + r * row + s * col..][..L].copy_from_slice(v);
        }
    }
}

/// The body of [`Same3x3::input_transform`] (and of [`Same3x3::grad_transform`]), compiled for the baseline
/// and for AVX2 and FMA: the 2-D transform f(f(d)^T)^T of every K x K tile of the `chans` planes of `src`
/// [B, chans, h, w] that starts `pad` pixels above and left of an output tile (zero outside the map), written as
/// V[xi][p][chan] like [`Same3x3::input_transform`]'s. Each image is first copied with its channels in lanes
/// ([`to_lanes`]), so that a tile's values for 16 channels are 16 consecutive floats and the transform is a
/// few dozen vector operations.
#[inline(always)]
fn tile_transform<const K: usize>(
    g: &Same3x3,
    (src, chans): (&[f32], usize),
    pad: usize,
    f: impl Fn([f32; K]) -> [f32; A] + Copy,
    images: Range<usize>,
    (v, vs): (&mut [f32], usize),
    buf: &mut [f32],
) {
    let (th, tw) = g.tiles();
    let (h, w) = (g.h, g.w);
    let wp = M * tw + K - M;
    let buf = &mut buf[..padded_len(th, tw, K, chans)];
    for (ii, img) in images.enumerate() {
        to_lanes(&src[img * chans * h * w..][..chans * h * w], (chans, h, w), pad, wp, buf);
        // the tile walk is written out here and in output_transform, not shared through a closure: a closure's
        // body compiles without the AVX2 wrappers' target features, and the tiles' arithmetic sits in it
        for ty in 0..th {
            for tx in 0..tw {
                let p = (ii * th + ty) * tw + tx;
                let origin = (M * ty * wp + M * tx) * chans;
                for (c0, l) in lane_chunks(chans) {
                    let geo = (origin + c0, wp * chans, chans);
                    match l {
                        16 => tile_in::<K, 16>(f, buf, geo, v, vs, p * chans + c0),
                        8 => tile_in::<K, 8>(f, buf, geo, v, vs, p * chans + c0),
                        _ => tile_in::<K, 1>(f, buf, geo, v, vs, p * chans + c0),
                    }
                }
            }
        }
    }
}

/// out[img][o] (the images `images`) = bias[o] + A^T m A of each tile (eq. 8), m[xi] = M[xi][p][o] (blocks
/// `ms` apart), cut to the h x w map. Each image's tiles are transformed with their channels in lanes into
/// `st` ([tile rows x M, tile columns x M, outs]), then copied into the output's planes.
#[inline(always)]
fn output_transform(
    g: &Same3x3,
    m: &[f32],
    ms: usize,
    bias: Option<&[f32]>,
    images: Range<usize>,
    out: &SharedMut,
    st: &mut [f32],
) {
    let (th, tw) = g.tiles();
    let (h, w, o_n) = (g.h, g.w, g.outs);
    let ws = M * tw;
    for (ii, img) in images.enumerate() {
        for ty in 0..th {
            for tx in 0..tw {
                let p = (ii * th + ty) * tw + tx;
                let origin = (M * ty * ws + M * tx) * o_n;
                for (o0, l) in lane_chunks(o_n) {
                    let geo = (origin + o0, ws * o_n, o_n);
                    match l {
                        16 => tile_out::<16>(m, ms, p * o_n + o0, st, geo),
                        8 => tile_out::<8>(m, ms, p * o_n + o0, st, geo),
                        _ => tile_out::<1>(m, ms, p * o_n + o0, st, geo),
                    }
                }
            }
        }
        // SAFETY: image img's output planes are written by this call only
        let planes = unsafe { out.range(img * o_n * h * w, o_n * h * w) };
        from_lanes(st, (o_n, h, w), ws, bias, planes);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_transform_avx2<const K: usize>(
    g: &Same3x3,
    src: (&[f32], usize),
    pad: usize,
    f: impl Fn([f32; K]) -> [f32; A] + Copy,
    images: Range<usize>,
    v: (&mut [f32], usize),
    buf: &mut [f32],
) {
    tile_transform(g, src, pad, f, images, v, buf)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_transform_avx2(
    g: &Same3x3,
    m: &[f32],
    ms: usize,
    bias: Option<&[f32]>,
    images: Range<usize>,
    out: &SharedMut,
    st: &mut [f32],
) {
    output_transform(g, m, ms, bias, images, out, st)
}
