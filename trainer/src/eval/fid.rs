//! Frechet distances between feature sets (Heusel et al. 2017), exact in sample space when there are fewer
//! samples than dimensions.

use nalgebra::DMatrix;
use rand::SeedableRng;

/// Mean and covariance (unbiased) of feature rows.
pub fn moments(f: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
    let (n, d) = (f.len(), f[0].len());
    let x = DMatrix::from_row_iterator(n, d, f.iter().flatten().copied());
    let mu = x.row_mean();
    let xc = DMatrix::from_fn(n, d, |i, j| x[(i, j)] - mu[j]);
    let cov = xc.transpose() * &xc / (n as f64 - 1.0).max(1.0);
    // symmetric, so the column-major storage is also the row-major one
    (mu.iter().copied().collect(), cov.as_slice().to_vec())
}

/// Frechet distance between N(mu1, s1) and N(mu2, s2) (Heusel et al. 2017, eq. 6):
/// |mu1 - mu2|^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2)), with Tr((s1 s2)^(1/2)) = sum sqrt(eig(s1^(1/2) s2 s1^(1/2))).
pub fn frechet_distance(mu1: &[f64], s1: &[f64], mu2: &[f64], s2: &[f64]) -> f64 {
    let d = mu1.len();
    let (a, b) = (DMatrix::from_row_slice(d, d, s1), DMatrix::from_row_slice(d, d, s2));
    let e = a.clone().symmetric_eigen();
    // s1^(1/2) = V diag(sqrt(e)) V^T
    let sq = DMatrix::from_diagonal(&e.eigenvalues.map(|x| x.max(0.0).sqrt()));
    let half = &e.eigenvectors * sq * e.eigenvectors.transpose();
    let m = &half * &b * &half;
    let m = (&m + m.transpose()) * 0.5;
    let tr_sqrt: f64 = m.symmetric_eigenvalues().iter().map(|x| x.max(0.0).sqrt()).sum();
    let diff: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b).powi(2)).sum();
    diff + a.trace() + b.trace() - 2.0 * tr_sqrt
}

/// FID between two sets of feature rows. With fewer samples than dimensions (both sets), computed exactly in
/// sample space: with centred rows X1 [n1, d], X2 [n2, d], S1 S2 = X1^T (X1 X2^T) X2 / ((n1-1)(n2-1)) shares its
/// non-zero eigenvalues with A A^T for A = X1 X2^T, so Tr((S1 S2)^(1/2)) is A's nuclear norm over
/// sqrt((n1-1)(n2-1)); otherwise through the d x d covariances ([`frechet_distance`]).
pub fn fid_features(f1: &[Vec<f64>], f2: &[Vec<f64>]) -> f64 {
    let d = f1[0].len();
    let (n1, n2) = (f1.len(), f2.len());
    if n1 >= d || n2 >= d {
        let ((m1, s1), (m2, s2)) = (moments(f1), moments(f2));
        return frechet_distance(&m1, &s1, &m2, &s2);
    }
    let centred = |f: &[Vec<f64>]| -> (DMatrix<f64>, Vec<f64>) {
        let x = DMatrix::from_row_iterator(f.len(), d, f.iter().flatten().copied());
        let mu: Vec<f64> = x.row_mean().iter().copied().collect();
        (DMatrix::from_fn(f.len(), d, |i, j| x[(i, j)] - mu[j]), mu)
    };
    let ((x1, mu1), (x2, mu2)) = (centred(f1), centred(f2));
    let (k1, k2) = ((n1 as f64 - 1.0).max(1.0), (n2 as f64 - 1.0).max(1.0));
    let a = &x1 * x2.transpose();
    let aat = &a * a.transpose();
    let nuclear: f64 = aat.symmetric_eigenvalues().iter().map(|x| x.max(0.0).sqrt()).sum();
    let diff: f64 = mu1.iter().zip(&mu2).map(|(a, b)| (a - b).powi(2)).sum();
    diff + x1.norm_squared() / k1 + x2.norm_squared() / k2 - 2.0 * nuclear / (k1 * k2).sqrt()
}

/// Seeded uniform helper for callers that need shuffled subsets.
pub fn subset(n: usize, k: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    idx.truncate(k.min(n));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_space_fid_equals_covariance_fid() {
        // d = 6 features, 4 and 5 samples: the sample-space path against the d x d path on the same data
        let f = |n: usize, s: f64| -> Vec<Vec<f64>> {
            (0..n).map(|i| (0..6).map(|j| ((i * 7 + j * 3) as f64 * s).sin() + 0.1 * j as f64).collect()).collect()
        };
        let (a, b) = (f(4, 0.9), f(5, 1.7));
        let ((m1, s1), (m2, s2)) = (moments(&a), moments(&b));
        let full = frechet_distance(&m1, &s1, &m2, &s2);
        let fast = fid_features(&a, &b);
        assert!(full > 0.1 && (full - fast).abs() < 1e-9 * full, "{full} vs {fast}");
        assert!((fid_features(&b, &a) - fast).abs() < 1e-9 * full);
        assert!(fid_features(&a, &a).abs() < 1e-9);
    }

    #[test]
    fn frechet_distance_closed_forms() {
        // identical Gaussians: 0; shifted means only: |dmu|^2; scaled isotropic: d (a - b)^2 for sd a, b
        let d = 4;
        let eye: Vec<f64> = (0..d * d).map(|i| if i % (d + 1) == 0 { 1.0 } else { 0.0 }).collect();
        let mu0 = vec![0.0; d];
        assert!(frechet_distance(&mu0, &eye, &mu0, &eye).abs() < 1e-9);
        let mu1 = vec![1.0, 2.0, 0.0, 0.0];
        assert!((frechet_distance(&mu0, &eye, &mu1, &eye) - 5.0).abs() < 1e-9);
        let four: Vec<f64> = eye.iter().map(|x| 4.0 * x).collect();
        assert!((frechet_distance(&mu0, &eye, &mu0, &four) - 4.0).abs() < 1e-9);
        // a non-diagonal covariance against itself
        let a = [2.0, 0.5, 0.1, 0.0, 0.5, 1.0, 0.2, 0.0, 0.1, 0.2, 1.5, 0.3, 0.0, 0.0, 0.3, 0.7];
        assert!(frechet_distance(&mu0, &a, &mu0, &a).abs() < 1e-8);
    }
}
