//! Single-threaded workers: a batch split into one slice per thread of the calling rayon pool, each slice run on a
//! worker whose own rayon pool has one thread, so the kernels it calls take their sequential paths and the threads
//! never meet inside an op. Used by the training step (`train/workers.rs`) and the sampler's model call
//! (`denoise.rs`).

use std::ops::Range;

use anyhow::{Context, Result};

use crate::model::tape::Pool;

/// A worker: its own buffers, and a rayon pool of one thread so that the kernels it calls run sequentially.
pub struct Worker {
    pool: Pool,
    threads: rayon::ThreadPool,
}

impl Worker {
    /// Gives the buffers back (the sampler of a preview needs the memory meanwhile).
    pub fn release(&mut self) {
        self.pool = Pool::default();
    }
}

/// How many workers `images` are split over: one per thread of the calling rayon pool, each with at least two
/// images.
pub fn count(images: usize) -> usize {
    rayon::current_num_threads().min(images / 2).max(1)
}

/// Runs `f` on `n` workers at once, worker w on its buffers and the items [`crate::dist::share`]`(items, n, w)`,
/// each in a rayon pool of one thread; the results in worker order. `workers` grows to `n` as needed.
pub fn run<T: Send>(
    workers: &mut Vec<Worker>,
    n: usize,
    items: usize,
    f: impl Fn(&mut Pool, Range<usize>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    while workers.len() < n {
        let threads = rayon::ThreadPoolBuilder::new().num_threads(1).build().context("a worker's thread")?;
        workers.push(Worker { pool: Pool::default(), threads });
    }
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = workers[..n]
            .iter_mut()
            .enumerate()
            .map(|(w, worker)| {
                let part = crate::dist::share(items, n, w);
                s.spawn(move || worker.threads.install(|| f(&mut worker.pool, part)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))).collect()
    })
}
