//! Vectorisable math the kernels share: e^x, the sigmoid, and their AVX2 + FMA counterparts.
//!
//! Tested against `f32::exp` over its whole range.

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

/// The sum of f(v) over x in eight interleaved lanes: a sequential f32 sum keeps the loop scalar (its order is
/// part of its result), eight partial sums let it vectorise.
#[inline(always)]
pub(crate) fn lane_sum_by(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for j in 0..8 {
            acc[j] += f(c[j]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The sum of x ([`lane_sum_by`]).
#[inline(always)]
pub(crate) fn lane_sum(x: &[f32]) -> f32 {
    lane_sum_by(x, |v| v)
}

/// The logistic sigmoid 1 / (1 + e^-z).
#[inline(always)]
pub(crate) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-z))
}

/// dst[j * dst_rs + i] = src[i * src_rs + j] + add[j] (add: zero when None) for i < rows, j < cols: a strided
/// transposition, in 8 x 8 blocks of AVX2 registers where the CPU has them (a scalar loop writes one value per
/// instruction to places `dst_rs` apart).
pub(crate) fn transpose(
    src: &[f32],
    (rows, cols): (usize, usize),
    src_rs: usize,
    dst: &mut [f32],
    dst_rs: usize,
    add: Option<&[f32]>,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(src.len() > (rows - 1) * src_rs + cols - 1 && dst.len() > (cols - 1) * dst_rs + rows - 1);
    assert!(src_rs >= cols && dst_rs >= rows && add.is_none_or(|a| a.len() >= cols));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has the features; the extents were checked above
    let (r8, c8) = if super::avx2_fma() {
        unsafe { avx2::transpose_blocks(src, (rows, cols), src_rs, dst, dst_rs, add) }
    } else {
        (0, 0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (r8, c8) = (0, 0);
    // what the blocks left: the last columns of every row, and the last rows
    for i in 0..rows {
        for j in if i < r8 { c8 } else { 0 }..cols {
            dst[j * dst_rs + i] = src[i * src_rs + j] + add.map_or(0.0, |a| a[j]);
        }
    }
}

/// Eight-lane AVX2 + FMA helpers, for kernels whose portable loops the compiler keeps scalar.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::exp_approx`] on eight lanes (same reduction and polynomial).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::model::kernels) fn exp8(x: __m256) -> __m256 {
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

    /// The 8 x 8 blocks of [`super::transpose`]: returns the (rows, columns) done, multiples of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::model::kernels) fn transpose_blocks(
        src: &[f32],
        (rows, cols): (usize, usize),
        src_rs: usize,
        dst: &mut [f32],
        dst_rs: usize,
        add: Option<&[f32]>,
    ) -> (usize, usize) {
        let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
        let block = |i0: usize, j0: usize, dst: &mut [f32]| {
            let a = add.map_or(_mm256_setzero_ps(), |a| unsafe { _mm256_loadu_ps(a[j0..][..8].as_ptr()) });
            let mut r = [_mm256_setzero_ps(); 8];
            for (k, rk) in r.iter_mut().enumerate() {
                // SAFETY: the slice holds the 8 values read
                *rk = _mm256_add_ps(unsafe { _mm256_loadu_ps(src[(i0 + k) * src_rs + j0..][..8].as_ptr()) }, a);
            }
            for (k, v) in transpose8(r).into_iter().enumerate() {
                // SAFETY: the slice holds the 8 values written
                unsafe { _mm256_storeu_ps(dst[(j0 + k) * dst_rs + i0..][..8].as_mut_ptr(), v) };
            }
        };
        // the side whose rows lie far apart (planes) in the outer loop: 8 of its rows at a time, each read or
        // written in order, rather than all of them a block at a time
        if src_rs >= dst_rs {
            for i0 in (0..r8).step_by(8) {
                (0..c8).step_by(8).for_each(|j0| block(i0, j0, dst));
            }
        } else {
            for j0 in (0..c8).step_by(8) {
                (0..r8).step_by(8).for_each(|i0| block(i0, j0, dst));
            }
        }
        (r8, c8)
    }

    /// The 8 x 8 transposition of eight rows of eight floats: row j of the result is column j of `r`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // rows 2i and 2i + 1 interleaved: columns (0, 1 | 4, 5) and (2, 3 | 6, 7)
        let (t0, t1) = (_mm256_unpacklo_ps(r[0], r[1]), _mm256_unpackhi_ps(r[0], r[1]));
        let (t2, t3) = (_mm256_unpacklo_ps(r[2], r[3]), _mm256_unpackhi_ps(r[2], r[3]));
        let (t4, t5) = (_mm256_unpacklo_ps(r[4], r[5]), _mm256_unpackhi_ps(r[4], r[5]));
        let (t6, t7) = (_mm256_unpacklo_ps(r[6], r[7]), _mm256_unpackhi_ps(r[6], r[7]));
        // column q (and q + 4 in the upper half) of rows 0-3 (s0-s3) and of rows 4-7 (s4-s7)
        let (s0, s1) = (_mm256_shuffle_ps::<0x44>(t0, t2), _mm256_shuffle_ps::<0xEE>(t0, t2));
        let (s2, s3) = (_mm256_shuffle_ps::<0x44>(t1, t3), _mm256_shuffle_ps::<0xEE>(t1, t3));
        let (s4, s5) = (_mm256_shuffle_ps::<0x44>(t4, t6), _mm256_shuffle_ps::<0xEE>(t4, t6));
        let (s6, s7) = (_mm256_shuffle_ps::<0x44>(t5, t7), _mm256_shuffle_ps::<0xEE>(t5, t7));
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// The sum of the eight lanes (pairwise: the low and high halves, then within the half).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::model::kernels) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// The largest of the eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::model::kernels) fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_matches_the_definition_on_odd_shapes() {
        for (rows, cols, src_rs, dst_rs, add) in [(8, 8, 8, 8, false), (13, 21, 24, 17, true), (3, 40, 41, 5, true)] {
            let src: Vec<f32> = (0..rows * src_rs).map(|v| v as f32 * 0.5 - 7.0).collect();
            let add_v: Vec<f32> = (0..cols).map(|j| j as f32 * 100.0).collect();
            let mut dst = vec![f32::NAN; cols * dst_rs];
            transpose(&src, (rows, cols), src_rs, &mut dst, dst_rs, add.then_some(&add_v[..]));
            for i in 0..rows {
                for j in 0..cols {
                    let want = src[i * src_rs + j] + if add { add_v[j] } else { 0.0 };
                    assert_eq!(dst[j * dst_rs + i], want, "{rows}x{cols} at ({i}, {j})");
                }
            }
            // the gaps between the rows are left alone
            assert!(dst.chunks(dst_rs).all(|row| row[rows..].iter().all(|v| v.is_nan())));
        }
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
}
