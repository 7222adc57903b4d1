//! The memorisation check (seed 003's fig. 3.6): each sample beside its nearest training images, in pixel space
//! and in the evaluation classifier's features, and how close the samples come to the training set against how
//! close real test images come to it. Samples that copied training images would sit much nearer than test
//! images do.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::classifier::{features, Classifier};
use crate::data::Dataset;
use crate::progress::Progress;
pub use crate::report::{Distances, NearestReport};

/// For each query row, the `k` nearest reference rows (distance, index), nearest first:
/// |q - r|^2 = |q|^2 + |r|^2 - 2 q.r, the dot products as one matrix product per chunk of queries.
pub fn nearest(queries: &[f32], refs: &[f32], d: usize, k: usize) -> Result<Vec<Vec<(f32, usize)>>> {
    let m = refs.len() / d;
    let r = Tensor::from_slice(refs, (m, d), &Device::Cpu)?;
    let r_sq: Vec<f32> = refs.chunks(d).map(|row| row.iter().map(|v| v * v).sum()).collect();
    let rt = r.t()?;
    let mut out = Vec::with_capacity(queries.len() / d);
    for chunk in queries.chunks(256 * d) {
        let b = chunk.len() / d;
        let dots: Vec<Vec<f32>> = Tensor::from_slice(chunk, (b, d), &Device::Cpu)?.matmul(&rt)?.to_vec2()?;
        for (q, row) in chunk.chunks(d).zip(dots) {
            let q_sq: f32 = q.iter().map(|v| v * v).sum();
            let mut all: Vec<(f32, usize)> =
                row.iter().enumerate().map(|(j, dot)| ((q_sq + r_sq[j] - 2.0 * dot).max(0.0).sqrt(), j)).collect();
            let k = k.min(all.len());
            if k < all.len() {
                all.select_nth_unstable_by(k, |a, b| a.0.total_cmp(&b.0));
            }
            all.truncate(k);
            all.sort_by(|a, b| a.0.total_cmp(&b.0));
            out.push(all);
        }
    }
    Ok(out)
}

fn summary(samples: &[f32], test: &[f32]) -> Distances {
    let q = |v: &[f32], p: f64| {
        let mut s = v.to_vec();
        s.sort_by(f32::total_cmp);
        s[((s.len() - 1) as f64 * p).round() as usize] as f64
    };
    Distances {
        samples_min: q(samples, 0.0),
        samples_p05: q(samples, 0.05),
        samples_median: q(samples, 0.5),
        test_min: q(test, 0.0),
        test_p05: q(test, 0.05),
        test_median: q(test, 0.5),
    }
}

/// The check for samples `x` ([n, c, h, w] in [-1, 1]) against `train`, with as many images of `test`; writes
/// the grid (the first `rows` samples, `k` neighbours each way) to `grid`.
#[allow(clippy::too_many_arguments)]
pub fn check(
    x: &[f32],
    train: &Dataset,
    test: &Dataset,
    clf: &Classifier,
    k: usize,
    rows: usize,
    grid: &std::path::Path,
    progress: &dyn Progress,
) -> Result<NearestReport> {
    let per = train.image_len();
    let n = (x.len() / per).min(test.len);
    let shape = [train.channels, train.size, train.size];
    let all = |ds: &Dataset, count: usize| -> Vec<f32> { (0..count).flat_map(|i| ds.image_f32(i)).collect() };
    progress.begin("nearest neighbours", 4);
    let train_x = all(train, train.len);
    let test_x = all(test, n);
    let samples = &x[..n * per];
    let pix_s = nearest(samples, &train_x, per, k.max(1))?;
    let pix_t = nearest(&test_x, &train_x, per, 1)?;
    progress.advance(1, None);
    let feats = |v: &[f32]| -> Result<Vec<f32>> {
        Ok(features(clf, v, shape, &Device::Cpu)?.0.into_iter().flatten().map(|f| f as f32).collect())
    };
    let (train_f, samples_f, test_f) = (feats(&train_x)?, feats(samples)?, feats(&test_x)?);
    progress.advance(1, None);
    let d = train_f.len() / train.len;
    let feat_s = nearest(&samples_f, &train_f, d, k.max(1))?;
    let feat_t = nearest(&test_f, &train_f, d, 1)?;
    progress.advance(1, None);
    let first = |v: &[Vec<(f32, usize)>]| v.iter().map(|r| r[0].0).collect::<Vec<_>>();
    let rows = rows.min(n);
    let mut tiles = Vec::with_capacity(rows * (1 + 2 * k) * per);
    for i in 0..rows {
        tiles.extend_from_slice(&samples[i * per..(i + 1) * per]);
        for (_, j) in pix_s[i].iter().chain(&feat_s[i]).take(2 * k) {
            tiles.extend(train.image_f32(*j));
        }
    }
    runtime::images::Images::from_f32(&tiles, tiles.len() / per, shape, None).save_grid_cols(grid, Some(1 + 2 * k))?;
    progress.end();
    Ok(NearestReport {
        k,
        n,
        pixel: summary(&first(&pix_s), &first(&pix_t)),
        features: summary(&first(&feat_s), &first(&feat_t)),
        grid: grid.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rows_match_a_brute_force_search() {
        let d = 5;
        let refs: Vec<f32> = (0..40 * d).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let queries: Vec<f32> = (0..300 * d).map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0).collect();
        let got = nearest(&queries, &refs, d, 3).unwrap();
        assert_eq!(got.len(), 300);
        for (q, found) in queries.chunks(d).zip(&got) {
            let mut brute: Vec<(f32, usize)> = refs
                .chunks(d)
                .enumerate()
                .map(|(j, r)| (q.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt(), j))
                .collect();
            brute.sort_by(|a, b| a.0.total_cmp(&b.0));
            for (f, b) in found.iter().zip(&brute) {
                assert!((f.0 - b.0).abs() < 1e-4, "{f:?} vs {b:?}");
            }
        }
        // a query that is a reference row finds it at distance 0
        let exact = nearest(&refs[7 * d..8 * d], &refs, d, 1).unwrap();
        assert_eq!(exact[0][0].1, 7);
        assert!(exact[0][0].0 < 1e-3);
    }
}
