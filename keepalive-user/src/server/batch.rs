//! The one command worker: commands from the API and evapi run in batches
//! (one lock, shared walks): each channel's in the order it queued them,
//! the API's ahead of an evapi backlog.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{metrics::Metrics, AppState};
use crate::{
    enforcer::{Enforcer, Op, Outcome},
    Error,
};

/// What is done with a command's result, on the batch worker's thread.
pub(super) type Done = Box<dyn FnOnce(Result<Outcome, Error>) + Send>;

/// One enable or disable waiting for the batch worker, what to do with its
/// result, and whether it may wait for company ([`LINGER`]).
pub(super) struct Job {
    op: Op,
    done: Done,
    linger: bool,
}

/// Most commands run together in one batch.
pub(super) const BATCH_MAX: usize = 64;
/// Most evapi commands in one batch: an API command arriving meanwhile
/// waits for at most this many (a batch of them takes about a
/// millisecond), yet a flood still shares one lock per 16.
pub(super) const EVAPI_BATCH_MAX: usize = 16;

/// How long a batch of evapi commands waits for more before it runs.
/// Kamailio never waits for their results, and at a call rate most arrive
/// alone: gathering them for 5 ms runs several per wake-up of the worker,
/// per lock and per search of the descriptors, where alone each paid for
/// all three (at 400 calls/s with a connection per phone: 0.086 ms of
/// serve's CPU per command with 1 ms, 0.077 ms with 5 ms). Keepalive acts
/// in seconds; 5 ms more before it is on changes nothing. An API caller
/// waits for its reply, so a batch with an API command never lingers.
pub(super) const LINGER: Duration = Duration::from_millis(5);

/// The one worker that runs commands: it takes every command waiting and
/// runs them as one batch (one lock, shared walks of the socket table), so
/// concurrent requests share the kernel work instead of queueing for it.
///
/// Channels are served fairly: a caller waiting for its reply (API, CLI
/// through the API) goes into the next batch ahead of any evapi backlog,
/// which fills the rest of each batch in the order Kamailio sent it. An
/// API command waits for one batch at most, however deep a flood of evapi
/// commands is.
pub(super) fn spawn_batcher(
    enforcer: Enforcer,
    metrics: Arc<Metrics>,
) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::spawn(move || {
        let mut waiting = Waiting::default();
        loop {
            if waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => waiting.add(job),
                    Err(_) => return,
                }
            }
            waiting.drain(&rx);
            // Only evapi commands, fewer than a batch: one sleep for more,
            // not a wake-up per arrival (that is the saving).
            if waiting.api.is_empty() && waiting.evapi.len() < EVAPI_BATCH_MAX {
                std::thread::sleep(LINGER);
                waiting.drain(&rx);
            }
            let batch = waiting.next_batch();
            metrics.batch_size.observe(batch.len() as f64);
            let (ops, dones): (Vec<Op>, Vec<Done>) =
                batch.into_iter().map(|j| (j.op, j.done)).unzip();
            let start = Instant::now();
            let results = enforcer.run_batch(ops);
            metrics.pass_seconds.observe(start.elapsed().as_secs_f64());
            for (result, done) in results.into_iter().zip(dones) {
                done(result);
            }
        }
    });
    tx
}

/// The commands the worker has taken from its channel, by who waits.
#[derive(Default)]
struct Waiting {
    /// Callers waiting for the reply.
    api: std::collections::VecDeque<Job>,
    /// evapi's, which nobody waits for (at most `evapi::MAX_PENDING`).
    evapi: std::collections::VecDeque<Job>,
}

impl Waiting {
    fn is_empty(&self) -> bool {
        self.api.is_empty() && self.evapi.is_empty()
    }

    fn add(&mut self, job: Job) {
        if job.linger {
            self.evapi.push_back(job);
        } else {
            self.api.push_back(job);
        }
    }

    /// Takes everything in the channel now.
    fn drain(&mut self, rx: &std::sync::mpsc::Receiver<Job>) {
        while let Ok(job) = rx.try_recv() {
            self.add(job);
        }
    }

    /// At most [`BATCH_MAX`]: the API's first, then at most
    /// [`EVAPI_BATCH_MAX`] of evapi's, each in order.
    fn next_batch(&mut self) -> Vec<Job> {
        let from_api = self.api.len().min(BATCH_MAX);
        let mut batch: Vec<Job> = self.api.drain(..from_api).collect();
        let from_evapi = self
            .evapi
            .len()
            .min(EVAPI_BATCH_MAX)
            .min(BATCH_MAX - batch.len());
        batch.extend(self.evapi.drain(..from_evapi));
        batch
    }
}

pub(super) fn worker_gone() -> Error {
    Error::Internal("the command worker stopped".into())
}

/// Hands one command to the batch worker at once (commands run in the
/// order they are queued); the future waits for its result.
pub(super) fn queue(
    state: &AppState,
    op: Op,
) -> impl std::future::Future<Output = Result<Outcome, Error>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done: Done = Box::new(move |r| {
        let _ = tx.send(r);
    });
    let sent = state
        .batcher
        .send(Job {
            op,
            done,
            linger: false,
        })
        .map_err(|_| worker_gone());
    async move {
        sent?;
        rx.await.map_err(|_| worker_gone())?
    }
}

/// Hands one command to the batch worker for a caller that does not wait
/// (evapi): `done` runs on the worker's thread, and the command may wait
/// for company ([`LINGER`]). Fails only when the worker is gone.
pub(super) fn submit(state: &AppState, op: Op, done: Done) -> Result<(), Error> {
    state
        .batcher
        .send(Job {
            op,
            done,
            linger: true,
        })
        .map_err(|_| worker_gone())
}
