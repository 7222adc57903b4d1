//! [`Collective`] over MPI (rsmpi, on the system's MPI library): the job is started by `mpirun`, every rank a
//! process.
//!
//! Collectives block, so a rank that died or hangs would leave the others waiting in an all-reduce forever.
//! Before each step, and again before its all-reduce (after the forward and backward pass, where a rank that
//! stopped is most likely met), the ranks meet at a gate made of point-to-point messages that are polled with a
//! deadline: every rank tells rank 0 it reached the step, rank 0 answers each one; the all-reduce itself is
//! non-blocking and polled with the same deadline. Rank 0 names the ranks that did not
//! come in time, the others name rank 0 when it does not answer, and whoever sees it first ends the job with
//! `MPI_Abort` (mpirun then stops every rank). A rank that exits is noticed by mpirun itself, which stops the
//! job naming it. Checkpoints are written to a temporary folder and renamed, so the last one stays intact
//! however the job ends.

use std::cell::Cell;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::Collective;

const TAG_ARRIVED: i32 = 7101;
const TAG_GO: i32 = 7102;

pub struct MpiCollective {
    // MPI is finalised when the universe is dropped, after the communicator
    world: SimpleCommunicator,
    _universe: Universe,
    timeout: Duration,
    /// All-reduce calls, seconds in them, seconds waited at gates.
    costs: Cell<(usize, f64, f64)>,
}

impl MpiCollective {
    /// Joins the job `mpirun` started (MPI_Init); `timeout` bounds every wait at a gate.
    pub fn init(timeout: Duration) -> Result<Self> {
        let Some(universe) = mpi::initialize() else { bail!("MPI was already initialised in this process") };
        let world = universe.world();
        Ok(Self { world, _universe: universe, timeout, costs: Cell::new((0, 0.0, 0.0)) })
    }

    /// How many ranks of this job run on this machine (those that share its memory), and this rank's place
    /// among them.
    pub fn local(&self) -> (usize, usize) {
        let node = self.world.split_shared(0);
        (node.size() as usize, node.rank() as usize)
    }

    /// The name MPI gives this machine.
    pub fn host(&self) -> String {
        mpi::environment::processor_name().unwrap_or_else(|_| "?".into())
    }

    /// Polls `f` until it yields or the timeout passes.
    fn poll<T>(&self, mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        loop {
            if let Some(v) = f() {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // a step takes tenths of a second: spin briefly, then sleep in short slices
            spins += 1;
            if spins < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let started = Instant::now();
        let send = buf.to_vec();
        // non-blocking, so that a rank that stops answering half-way is noticed too
        mpi::request::scope(|scope| {
            let mut req = Some(self.world.immediate_all_reduce_into(scope, &send[..], buf, SystemOperation::sum()));
            let done = self.poll(|| match req.take()?.test() {
                Ok(_) => Some(()),
                Err(r) => {
                    req = Some(r);
                    None
                }
            });
            if done.is_none() {
                self.abort(&format!(
                    "error: rank {}: an all-reduce did not finish within {} s (a rank died or hangs): stopping the \
                     job; the last checkpoint is intact (resume it with --resume)",
                    self.rank(),
                    self.timeout.as_secs()
                ));
            }
        });
        let (n, s, g) = self.costs.get();
        self.costs.set((n + 1, s + started.elapsed().as_secs_f64(), g));
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32]) -> Result<()> {
        self.world.process_at_rank(0).broadcast_into(buf);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()> {
        let root = self.world.process_at_rank(0);
        let mut len = buf.len() as u64;
        root.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        root.broadcast_into(&mut buf[..]);
        Ok(())
    }

    fn all_gather(&self, local: &[f64], per_rank: usize) -> Result<Vec<f64>> {
        let mut send = local.to_vec();
        send.resize(per_rank, 0.0);
        let mut out = vec![0f64; per_rank * self.size()];
        self.world.all_gather_into(&send[..], &mut out[..]);
        Ok(out)
    }

    fn gate(&self, step: usize, stop: bool) -> Result<bool> {
        let started = Instant::now();
        let r = self.gate_inner(step, stop);
        let (n, s, g) = self.costs.get();
        self.costs.set((n, s, g + started.elapsed().as_secs_f64()));
        r
    }

    fn abort(&self, msg: &str) -> ! {
        eprintln!("{msg}");
        self.world.abort(1)
    }

    fn costs(&self) -> (usize, f64, f64) {
        self.costs.get()
    }
}

impl MpiCollective {
    /// [`Collective::gate`]: rank 0 collects an "arrived" from every rank and answers each with a "go".
    fn gate_inner(&self, step: usize, stop: bool) -> Result<bool> {
        let (rank, size, secs) = (self.rank(), self.size(), self.timeout.as_secs());
        let step = step as u64;
        if rank == 0 {
            let mut pending: Vec<(usize, Option<_>)> = (1..size)
                .map(|r| (r, Some(self.world.process_at_rank(r as i32).immediate_receive_with_tag::<u64>(TAG_ARRIVED))))
                .collect();
            let mut arrived = vec![None; size];
            let done = self.poll(|| {
                for (r, slot) in pending.iter_mut() {
                    if let Some(f) = slot.take() {
                        match f.r#try() {
                            Ok((s, _)) => arrived[*r] = Some(s),
                            Err(f) => *slot = Some(f),
                        }
                    }
                }
                pending.iter().all(|(_, s)| s.is_none()).then_some(())
            });
            if done.is_none() {
                let missing: Vec<String> =
                    pending.iter().filter(|(_, s)| s.is_some()).map(|(r, _)| r.to_string()).collect();
                self.abort(&format!(
                    "error: rank(s) {} did not reach step {step} within {secs} s of rank 0 (dead, hung, or far slower): \
                     stopping the job; the last checkpoint is intact (resume it with --resume)",
                    missing.join(", ")
                ));
            }
            if let Some((r, s)) = arrived.iter().enumerate().find_map(|(r, s)| s.filter(|&s| s != step).map(|s| (r, s)))
            {
                self.abort(&format!(
                    "error: rank {r} is at step {s}, rank 0 at step {step}: the ranks fell out of step"
                ));
            }
            let go = (step << 1) | stop as u64;
            for r in 1..size {
                self.world.process_at_rank(r as i32).send_with_tag(&go, TAG_GO);
            }
            Ok(stop)
        } else {
            let root = self.world.process_at_rank(0);
            root.send_with_tag(&step, TAG_ARRIVED);
            let mut future = Some(root.immediate_receive_with_tag::<u64>(TAG_GO));
            let go = self.poll(|| match future.take()?.r#try() {
                Ok((g, _)) => Some(g),
                Err(f) => {
                    future = Some(f);
                    None
                }
            });
            let Some(go) = go else {
                self.abort(&format!(
                    "error: rank {rank}: rank 0 did not answer within {secs} s at step {step} (dead, hung, or far \
                     slower): stopping the job; the last checkpoint is intact (resume it with --resume)"
                ));
            };
            if go >> 1 != step {
                self.abort(&format!("error: rank {rank} is at step {step}, rank 0 at step {}", go >> 1));
            }
            Ok(go & 1 == 1)
        }
    }
}
