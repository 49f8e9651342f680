//! The event feed of `tcpka serve`: reads the kernel's event rings and
//! fans each event out to the log, the `/v1/events` subscribers and the
//! webhook. No consumer loses events silently: each one that missed some
//! gets a gap marker saying how many, and why.
//!
//! - The kernel drops events when a ring is full (counted per ring); the
//!   feed turns a rise of those counters into a gap for everyone.
//! - A subscriber too slow for the broadcast channel gets a gap in its own
//!   stream; a full webhook queue or a full log pipe, in theirs.
//! - Reading never waits for a consumer: the log has its own thread.
//! - When the installation is unloaded and loaded again, the feed follows
//!   it to the new rings.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::maps::{MapInfo, PerCpuArray, RingBuf};
use keepalive_common::{
    events::{
        Event, KIND_ABORTED, KIND_CLOSED, KIND_CLOSED_BY_TCPKA, KIND_RESET, KIND_SIGNAL,
        KIND_TIMEOUT,
    },
    maps, stats,
};
use tokio::{io::unix::AsyncFd, sync::broadcast};

use crate::{
    destroy::Diag,
    enforcer::liveness::{health, TIMER_PROBE0},
    events::{rfc3339, Record},
    paths::PinLayout,
    risk_tracker::{Seen, Tracker},
    Error, Result,
};

/// What consumers receive.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Message {
    Event(Record),
    Gap(Gap),
}

/// Events this consumer did not get.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    /// Always `"gap"`.
    pub kind: &'static str,
    /// How many events were lost.
    pub missed: u64,
    /// Where: `kernel_alerts` (timeout/reset/aborted ring full),
    /// `kernel_events` (applied/closed ring full), `subscriber` (this
    /// stream was too slow), `webhook` (queue full or delivery failed),
    /// `log` (the log output was blocked), `evapi` (the evapi connection
    /// fell behind).
    pub reason: &'static str,
    /// Wall-clock time, RFC 3339 UTC.
    pub time: String,
}

impl Gap {
    pub fn new(missed: u64, reason: &'static str) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        Self {
            kind: "gap",
            missed,
            reason,
            time: rfc3339(now),
        }
    }
}

impl Message {
    /// The event kind, or `"gap"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Event(r) => r.kind,
            Message::Gap(g) => g.kind,
        }
    }

    /// One line for the log.
    pub fn log_line(&self, json: bool) -> String {
        if json {
            return serde_json::to_string(self).expect("plain data");
        }
        match self {
            Message::Event(r) => r.to_string(),
            Message::Gap(g) => format!("gap: {} events missed ({})", g.missed, g.reason),
        }
    }
}

/// Lines waiting for the log thread; more are counted and reported as a gap.
const LOG_QUEUE: usize = 4096;

/// The log of events: a thread of its own writes to stdout, so a blocked
/// or closed stdout never stalls (or fails) the feed.
pub struct Log {
    tx: std::sync::mpsc::SyncSender<String>,
    missed: AtomicU64,
    json: bool,
}

impl Log {
    pub fn spawn(json: bool) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(LOG_QUEUE);
        std::thread::spawn(move || {
            use std::io::Write as _;
            for line in rx {
                let _ = writeln!(std::io::stdout().lock(), "{line}");
            }
        });
        Self {
            tx,
            missed: AtomicU64::new(0),
            json,
        }
    }

    pub fn write(&self, m: &Message) {
        let missed = self.missed.load(Ordering::Relaxed);
        if missed > 0
            && self
                .tx
                .try_send(Message::Gap(Gap::new(missed, "log")).log_line(self.json))
                .is_ok()
        {
            self.missed.fetch_sub(missed, Ordering::Relaxed);
        }
        if self.tx.try_send(m.log_line(self.json)).is_err() {
            self.missed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Called for every message.
pub type Each = Box<dyn Fn(&Arc<Message>) + Send + Sync>;

/// Where the feed sends what it reads.
pub struct Sinks {
    pub log: Log,
    pub subscribers: broadcast::Sender<Arc<Message>>,
    /// Called for every message (metrics, webhook).
    pub each: Each,
}

impl Sinks {
    fn send(&self, m: Message) {
        let m = Arc::new(m);
        self.log.write(&m);
        (self.each)(&m);
        let _ = self.subscribers.send(m);
    }
}

/// The rings of one installation, and what their drop counters said when
/// last read.
struct Rings {
    alerts: AsyncFd<RingBuf<aya::maps::MapData>>,
    events: AsyncFd<RingBuf<aya::maps::MapData>>,
    stats: PerCpuArray<aya::maps::MapData, u64>,
    ids: (u32, u32),
    dropped: (u64, u64),
}

fn map_id(layout: &PinLayout, name: &str) -> Option<u32> {
    MapInfo::from_pin(layout.map(name)).ok().map(|i| i.id())
}

impl Rings {
    fn open(layout: &PinLayout) -> Result<Self> {
        let ids = (
            map_id(layout, maps::ALERTS).unwrap_or(0),
            map_id(layout, maps::EVENTS).unwrap_or(0),
        );
        let ring = |name: &str| -> Result<AsyncFd<RingBuf<aya::maps::MapData>>> {
            let map = crate::pinned::open_map(layout, name)?;
            let ring =
                RingBuf::try_from(map).map_err(|e| Error::map("opening an event ring", e))?;
            // SAFETY: the ring buffer owns its fd for as long as the AsyncFd
            // holds it.
            unsafe { AsyncFd::register(ring) }
                .map_err(|e| Error::io("polling an event ring", e.into()))
        };
        let stats = PerCpuArray::try_from(crate::pinned::open_map(layout, maps::STATS)?)
            .map_err(|e| Error::map("opening the counters", e))?;
        // NB: counting from zero: events the kernel dropped before this
        // feed started reading (since the installation was loaded) are
        // reported too.
        Ok(Self {
            alerts: ring(maps::ALERTS)?,
            events: ring(maps::EVENTS)?,
            stats,
            ids,
            dropped: (0, 0),
        })
    }

    fn read_dropped(&self) -> (u64, u64) {
        let get = |i: u32| {
            self.stats
                .get(&i, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0)
        };
        (get(stats::ALERTS_DROPPED), get(stats::EVENTS_DROPPED))
    }

    /// Whether the pins are still these rings (not unloaded, not
    /// reloaded).
    fn current(&self, layout: &PinLayout) -> bool {
        map_id(layout, maps::ALERTS) == Some(self.ids.0)
            && map_id(layout, maps::EVENTS) == Some(self.ids.1)
    }
}

fn drain(ring: &mut RingBuf<aya::maps::MapData>, sinks: &Sinks, tracker: &mut Tracker) {
    while let Some(item) = ring.next() {
        if item.len() < size_of::<Event>() {
            continue;
        }
        // SAFETY: the programs write whole `Event`s; read unaligned.
        let raw: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        drop(item);
        match raw.kind {
            // Signals make early-warning events; they are not shown.
            KIND_SIGNAL => {
                tracing::trace!(
                    "signal {} value {} for cookie {:#x} at {}",
                    raw.detail,
                    raw.error,
                    raw.cookie,
                    raw.ts_ns
                );
                for r in tracker.signal(&raw) {
                    sinks.send(Message::Event(r));
                }
                continue;
            }
            KIND_CLOSED | KIND_RESET | KIND_TIMEOUT | KIND_ABORTED | KIND_CLOSED_BY_TCPKA => {
                tracker.forget(raw.cookie);
            }
            _ => {}
        }
        sinks.send(Message::Event(Record::from_raw(&raw)));
    }
}

/// CLOCK_MONOTONIC, the clock of the kernel's event times.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// Asks the kernel about one connection for the early warning (in serve's
/// network namespace); the sock_diag socket is opened on first use.
fn look(diag: &mut Option<Diag>, e: &Event) -> Seen {
    if diag.is_none() {
        *diag = Diag::open().ok();
    }
    let Some(d) = diag.as_ref() else {
        return Seen::Unknown;
    };
    let local = crate::conn::endpoint(e.family, e.local_addr, e.local_port);
    let remote = crate::conn::endpoint(e.family, e.remote_addr, e.remote_port);
    match health(d, local, remote, e.cookie) {
        Some(h) => Seen::Health {
            probes_out: h.liveness.probes_out,
            backoff: h.liveness.backoff,
            zero_window: h.timer == TIMER_PROBE0,
            last_ack_ms: h.liveness.last_ack_recv_ms,
        },
        None => Seen::Unknown,
    }
}

/// How often the early warning looks at what has come due: an unanswered
/// probe's `at_risk` is at most this late.
const RISK_TICK: Duration = Duration::from_millis(50);

/// How often the feed checks the drop counters and that its rings are
/// still the installed ones.
const CHECK: Duration = Duration::from_secs(1);

/// Runs the feed until the process ends.
pub async fn run(layout: PinLayout, sinks: Sinks) {
    let mut reported_missing = false;
    let mut tracker = Tracker::default();
    let mut diag = None;
    loop {
        let mut rings = match Rings::open(&layout) {
            Ok(r) => {
                if reported_missing {
                    tracing::info!("events: the installation is back; reading its rings");
                }
                reported_missing = false;
                r
            }
            Err(e) => {
                if !reported_missing {
                    tracing::warn!("events: {e}; waiting for the installation");
                    reported_missing = true;
                }
                tokio::time::sleep(CHECK).await;
                continue;
            }
        };
        // The first check after a period: what is in the rings is read first.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + CHECK, CHECK);
        let mut risk_tick = tokio::time::interval(RISK_TICK);
        risk_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweeps = 0u32;
        loop {
            tokio::select! {
                biased;
                g = rings.alerts.readable_mut() => {
                    let Ok(mut g) = g else { break };
                    drain(g.get_inner_mut(), &sinks, &mut tracker);
                    g.clear_ready();
                }
                g = rings.events.readable_mut() => {
                    let Ok(mut g) = g else { break };
                    drain(g.get_inner_mut(), &sinks, &mut tracker);
                    g.clear_ready();
                }
                _ = risk_tick.tick() => {
                    for r in tracker.tick(monotonic_ns(), &mut |e| look(&mut diag, e)) {
                        sinks.send(Message::Event(r));
                    }
                }
                _ = tick.tick() => {
                    let now = rings.read_dropped();
                    let (a, e) = (now.0.saturating_sub(rings.dropped.0), now.1.saturating_sub(rings.dropped.1));
                    rings.dropped = now;
                    if a > 0 {
                        sinks.send(Message::Gap(Gap::new(a, "kernel_alerts")));
                    }
                    if e > 0 {
                        sinks.send(Message::Gap(Gap::new(e, "kernel_events")));
                    }
                    sweeps += 1;
                    if sweeps.is_multiple_of(60) {
                        tracker.sweep(monotonic_ns());
                    }
                    if !rings.current(&layout) {
                        // Drain what is left of the old rings first.
                        drain(rings.alerts.get_mut(), &sinks, &mut tracker);
                        drain(rings.events.get_mut(), &sinks, &mut tracker);
                        tracing::info!("events: the installation was unloaded or reloaded");
                        break;
                    }
                }
            }
        }
    }
}
