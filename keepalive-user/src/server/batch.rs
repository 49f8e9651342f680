//! The one command worker: commands from the API and evapi run in batches
//! (one lock, shared walks), in the order they were queued.
use super::*;

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

/// How long a batch of evapi commands waits for more before it runs.
/// Kamailio never waits for their results, and at a call rate most arrive
/// alone: gathering them for a millisecond runs several per wake-up of the
/// worker and per lock, where alone each paid for both. An API caller
/// waits for its reply, so a batch with an API command never lingers.
pub(super) const LINGER: Duration = Duration::from_millis(1);

/// The one worker that runs commands: it takes every command waiting and
/// runs them as one batch (one lock, shared walks of the socket table), so
/// concurrent requests share the kernel work instead of queueing for it.
pub(super) fn spawn_batcher(
    enforcer: Enforcer,
    metrics: Arc<Metrics>,
) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::spawn(move || {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            let mut lingered = false;
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    // One sleep, not a wake-up per arrival: that is the
                    // saving.
                    Err(std::sync::mpsc::TryRecvError::Empty)
                        if !lingered && batch.iter().all(|j| j.linger) =>
                    {
                        std::thread::sleep(LINGER);
                        lingered = true;
                    }
                    Err(_) => break,
                }
            }
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

pub(super) fn worker_gone() -> Error {
    Error::Io {
        what: "the command worker stopped".into(),
        source: std::io::ErrorKind::Other.into(),
    }
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
