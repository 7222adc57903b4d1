//! The sampling workers: OS threads that each own an open [`Generator`] per model and take jobs from one bounded
//! queue, so the ONNX work never runs on the async threads and the memory in use is bounded by the queue and the
//! workers, not by the number of clients.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::{OwnedPermit, Sender};

use crate::generator::{GenerateRequest, Generator, Images};
use crate::sampler::{Cancel, StepInfo};

/// One request for the workers.
pub(super) struct Job {
    /// Index of the model in the server's list.
    pub model: usize,
    /// Validated against the model; carries its [`Cancel`] flag in `options.cancel`.
    pub req: GenerateRequest,
    pub cancel: Cancel,
    /// The request's time limit: past it the run is stopped between two model calls.
    pub deadline: Instant,
    /// Where the predicted x0 goes every `preview_every` steps (streamed requests).
    pub progress: Option<(Sender<Event>, usize)>,
    /// A slot reserved for the outcome, so that the worker never waits on a slow client.
    pub done: OwnedPermit<Event>,
}

/// What a job reports.
pub(super) enum Event {
    /// The predicted x0 of images `first..first + count` at one step, as a PNG grid.
    Progress {
        first: usize,
        count: usize,
        step: usize,
        num_steps: usize,
        t: usize,
        png: Vec<u8>,
    },
    Done(Result<Images, Failure>),
}

/// Why a job gave no images.
#[derive(Debug)]
pub(super) enum Failure {
    /// Its client went away (its [`Cancel`] was raised).
    Gone,
    /// It ran past its time limit.
    TimedOut,
    /// The model or the request failed (a message for the client).
    Failed(String),
}

/// Why a job was not queued.
#[derive(Debug, PartialEq)]
pub(super) enum Refused {
    /// Every worker is busy and the queue is full.
    Full,
    /// The server is shutting down.
    Closed,
}

/// The queue and its workers.
pub(super) struct Pool {
    tx: Mutex<Option<SyncSender<Box<Job>>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// Starts one worker per entry of `generators` (each one open model per server model, in the server's order)
    /// behind a queue of `queue` jobs.
    pub fn start(generators: Vec<Vec<Generator>>, queue: usize) -> Self {
        let (tx, rx) = sync_channel::<Box<Job>>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let workers = generators
            .into_iter()
            .enumerate()
            .map(|(i, gens)| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("sampler-{i}"))
                    .spawn(move || work(&rx, gens))
                    .expect("cannot start a sampler thread")
            })
            .collect();
        Self { tx: Mutex::new(Some(tx)), workers: Mutex::new(workers) }
    }

    /// Queues a job, or refuses it at once (never waits).
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        match tx.as_ref().map(|tx| tx.try_send(Box::new(job))) {
            None | Some(Err(TrySendError::Disconnected(_))) => Err(Refused::Closed),
            Some(Err(TrySendError::Full(_))) => Err(Refused::Full),
            Some(Ok(())) => Ok(()),
        }
    }

    /// Refuses new jobs, lets the workers finish the queued ones and waits for them.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

/// A worker: jobs until the queue is closed and empty.
fn work(rx: &Mutex<Receiver<Box<Job>>>, mut gens: Vec<Generator>) {
    loop {
        let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let Job { model, req, cancel, deadline, progress, done } = *job;
        let g = &mut gens[model];
        let outcome = catch_unwind(AssertUnwindSafe(|| run(g, &req, &cancel, deadline, progress.as_ref())))
            .unwrap_or_else(|_| Err(Failure::Failed("the sampler failed unexpectedly".into())));
        // the previews end before the outcome, so a stream sees them in order
        drop(progress);
        done.send(Event::Done(outcome));
    }
}

/// Runs one job, unless its client is gone or its time is up.
fn run(
    g: &mut Generator,
    req: &GenerateRequest,
    cancel: &Cancel,
    deadline: Instant,
    progress: Option<&(Sender<Event>, usize)>,
) -> Result<Images, Failure> {
    if cancel.is_cancelled() {
        return Err(Failure::Gone);
    }
    if Instant::now() >= deadline {
        return Err(Failure::TimedOut);
    }
    let shape = [g.info().channels, g.info().image_size, g.info().image_size];
    let mut timed_out = false;
    let result = g.generate(req, &mut |s: &StepInfo| {
        if Instant::now() >= deadline {
            timed_out = true;
            cancel.cancel();
        }
        if let Some((tx, every)) = progress {
            if s.step.is_multiple_of(*every) || s.step + 1 == s.num_steps {
                let count = s.x0.len() / shape.iter().product::<usize>();
                // a preview that cannot be sent now (the client reads slowly) is skipped, not waited for
                if let Ok(png) = Images::from_f32(s.x0, count, shape, None).grid_png(None) {
                    let (first, step, num_steps, t) = (s.chunk_start, s.step, s.num_steps, s.t);
                    let _ = tx.try_send(Event::Progress { first, count, step, num_steps, t, png });
                }
            }
        }
    });
    result.map_err(|e| match e {
        crate::Error::Cancelled if timed_out => Failure::TimedOut,
        crate::Error::Cancelled => Failure::Gone,
        e => Failure::Failed(e.to_string()),
    })
}
