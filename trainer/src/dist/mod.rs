//! Collectives for data-parallel training: the ranks of one job, each holding a share of every batch, sum their
//! gradients with an all-reduce so that every rank takes the step one process would take on the whole batch
//! (the scheme of PyTorch's DistributedDataParallel and Horovod). The trainer talks to a [`Collective`]: one
//! process is [`Single`] (every call a no-op), an MPI job is `mpi::MpiCollective` (feature `mpi`), and with
//! the feature `nccl` the GPU's gradients go through NCCL (`nccl::NcclGrads`).
//!
//! This module knows nothing of the trainer: it moves f32/f64/byte buffers and names the rank that fails.

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

use std::ops::Range;
use std::time::Duration;

use anyhow::{bail, Result};
use candle_core::Tensor;

/// The ranks of a data-parallel job, as the trainer uses them. Every call is collective: all ranks make it, in
/// the same order, with buffers of the same length.
pub trait Collective {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Sums `buf` element-wise over the ranks, in place; every rank ends with the same bits.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Sums a tensor over the ranks (gradients of the Candle engine). The default goes through host memory;
    /// NCCL keeps it on the GPU.
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(t.clone());
        }
        all_reduce_on_host(self, t)
    }
    /// Rank 0's `buf` on every rank.
    fn broadcast(&self, buf: &mut [f32]) -> Result<()>;
    /// Rank 0's bytes on every rank (any length: the length is sent first).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()>;
    /// Every rank's `local` (each `per_rank` long) in rank order, on every rank.
    fn all_gather(&self, local: &[f64], per_rank: usize) -> Result<Vec<f64>>;
    /// Waits until every rank has reached `step`, at most the collective's timeout: a rank that does not arrive
    /// (dead, hung, or far slower) stops the job with a message naming it. Rank 0's `stop` is returned on every
    /// rank, so that all stop at the same step (a wall-time budget is measured on rank 0).
    fn gate(&self, step: usize, stop: bool) -> Result<bool>;
    /// Ends the whole job at once (every rank), after printing `msg`.
    fn abort(&self, msg: &str) -> !;
    /// What the collectives cost so far, for the log: (all-reduce calls, seconds in them, seconds waited at
    /// gates).
    fn costs(&self) -> (usize, f64, f64) {
        (0, 0.0, 0.0)
    }
}

/// One process: rank 0 of 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, local: &[f64], per_rank: usize) -> Result<Vec<f64>> {
        let mut out = local.to_vec();
        out.resize(per_rank, 0.0);
        Ok(out)
    }
    fn gate(&self, _step: usize, stop: bool) -> Result<bool> {
        Ok(stop)
    }
    fn abort(&self, msg: &str) -> ! {
        eprintln!("{msg}");
        std::process::exit(1)
    }
}

/// The positions of the global batch (of `batch` images) that rank `rank` of `size` takes: contiguous, in
/// rank order, sizes differing by at most one.
pub fn share(batch: usize, size: usize, rank: usize) -> Range<usize> {
    rank * batch / size..(rank + 1) * batch / size
}

/// The longest share of a batch of `batch` over `size` ranks.
pub fn longest_share(batch: usize, size: usize) -> usize {
    (0..size).map(|r| share(batch, size, r).len()).max().unwrap_or(0)
}

/// How long a rank waits for the others at a [`Collective::gate`] before it stops the job: long enough for
/// rank 0 to write a checkpoint and a preview grid meanwhile.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// [`Collective::all_reduce_tensor`] through host memory: the tensor copied out as f32, summed by
/// [`Collective::all_reduce_sum`], and copied back in its own dtype and device.
pub fn all_reduce_on_host<C: Collective + ?Sized>(comm: &C, t: &Tensor) -> Result<Tensor> {
    let mut host: Vec<f32> = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    comm.all_reduce_sum(&mut host)?;
    Ok(Tensor::from_vec(host, t.dims(), t.device())?.to_dtype(t.dtype())?)
}

/// FNV-1a's offset basis: the hash of no bytes, where [`fnv1a_extend`] starts.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A 64-bit FNV-1a hash (fingerprints compared between ranks; not cryptographic).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_extend(FNV_OFFSET, bytes)
}

/// Continues an FNV-1a hash `h` over more bytes: hashing a stream piece by piece gives the hash of the whole.
pub fn fnv1a_extend(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Refuses a job whose ranks disagree: `mine` holds this rank's fingerprints, one per named item (e.g. the
/// config, the data, the trainer's version); every rank gets the same error, naming the ranks whose items
/// differ from rank 0's, and ending with `advice`.
pub fn check_same(comm: &dyn Collective, names: &[&str], mine: &[u64], advice: &str) -> Result<()> {
    // f64 carries 52 bits exactly: compare the hashes in two 32-bit halves
    let local: Vec<f64> = mine.iter().flat_map(|&h| [(h >> 32) as f64, (h & 0xffff_ffff) as f64]).collect();
    let n = local.len();
    let all = comm.all_gather(&local, n)?;
    let mut problems = vec![];
    for (i, name) in names.iter().enumerate() {
        let differ: Vec<String> = (1..comm.size())
            .filter(|&r| all[r * n + 2 * i..r * n + 2 * i + 2] != all[2 * i..2 * i + 2])
            .map(|r| r.to_string())
            .collect();
        if !differ.is_empty() {
            problems.push(format!("{name} of rank(s) {} differ(s) from rank 0's", differ.join(", ")));
        }
    }
    if !problems.is_empty() {
        bail!("{}: {advice}", problems.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_batch_in_rank_order_and_differ_by_at_most_one() {
        for batch in [1, 7, 32, 33] {
            for size in 1..=batch.min(5) {
                let shares: Vec<Range<usize>> = (0..size).map(|r| share(batch, size, r)).collect();
                assert_eq!(shares[0].start, 0);
                assert_eq!(shares[size - 1].end, batch);
                assert!(shares.windows(2).all(|w| w[0].end == w[1].start));
                let (lo, hi) = (shares.iter().map(|s| s.len()).min().unwrap(), longest_share(batch, size));
                assert!(lo >= 1 && hi - lo <= 1, "batch {batch} over {size}: {shares:?}");
            }
        }
    }

    #[test]
    fn one_process_agrees_with_itself() {
        check_same(&Single, &["config", "data"], &[fnv1a(b"a"), fnv1a(b"b")], "").unwrap();
        assert_ne!(fnv1a(b"config a"), fnv1a(b"config b"));
    }

    #[test]
    fn fnv1a_of_a_stream_in_pieces_is_that_of_the_whole() {
        // the published 64-bit FNV-1a test vectors: "" and "a"
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_extend(fnv1a(b"weights "), b"of rank 0"), fnv1a(b"weights of rank 0"));
    }
}
