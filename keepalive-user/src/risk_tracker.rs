//! The early warning of `tcpka serve`: turns what sock_ops signals of a
//! managed connection (`keepalive_common::risk` `SIGNAL_*`) into `at_risk`
//! when a reason starts and `recovered` when it ends, one event per
//! reason, by the connection's own thresholds:
//!
//! - `probe`: a keepalive probe unanswered for the probe threshold (by
//!   default half the interval, at most 1 s), or a second probe sent;
//!   recovered when the peer answers;
//! - `backoff`: the retransmission timer fired enough times in a row;
//!   recovered when the peer answers;
//! - `zero_window`: zero-window probes for the zero-window threshold;
//!   recovered when the peer opens its window;
//! - `retrans`: that many retransmits within 10 s; recovered once 10 s hold
//!   fewer.
//!
//! Whether a probe was answered, and whether a connection at risk is well
//! again, is asked of the kernel (an exact sock_diag lookup, in serve's
//! network namespace): a peer's answer to a probe takes TCP's fast path,
//! where no callback runs. A connection in another namespace is judged by
//! its signals alone: `probe` comes with its second probe.
//!
//! It keeps a small record per connection that signalled, forgotten when
//! the connection ends or has been quiet and healthy for a while.
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use keepalive_common::{
    events::{Event, KIND_AT_RISK, KIND_RECOVERED},
    risk::{
        Risk, DEFAULT_BACKOFF, DEFAULT_PROBE_MS_MAX, DEFAULT_RETRANS, DEFAULT_ZERO_WINDOW_MS,
        REASON_BACKOFF, REASON_PROBE, REASON_RETRANS, REASON_ZERO_WINDOW, RETRANS_WINDOW_MS,
        SIGNAL_ANSWER, SIGNAL_PROBE, SIGNAL_RETRANS, SIGNAL_RTO, SIGNAL_ZERO_WINDOW,
    },
};

use crate::events::Record;

const MS: u64 = 1_000_000;
/// A healthy connection that has not signalled for this long is forgotten.
const FORGET_AFTER_NS: u64 = 10 * 60 * 1_000 * MS;
/// The most connections kept; beyond it, the quietest healthy ones go.
const MAX_TRACKED: usize = 1 << 20;
/// How often a connection at risk is looked at for its recovery.
pub const RECOVERY_POLL_NS: u64 = 250 * MS;
/// Lookups that found nothing before a connection is forgotten (it ended
/// without a reported end), if it has not signalled for [`QUIET_NS`]
/// either (one in another network namespace still does).
const UNSEEN_LIMIT: u32 = 40;
const QUIET_NS: u64 = 10 * 1_000 * MS;
/// The longest gap between zero-window probes (`TCP_RTO_MAX`, 2 minutes,
/// and some).
const ZERO_WINDOW_GAP_NS: u64 = 130 * 1_000 * MS;

/// What a lookup of one connection found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not found (gone, or in another network namespace).
    Unknown,
    Health {
        probes_out: u8,
        backoff: u8,
        /// The zero-window probe timer runs.
        zero_window: bool,
        /// Milliseconds since the peer last acknowledged anything.
        last_ack_ms: u32,
    },
}

struct Watched {
    /// The last signal, as the template of the events made for it.
    last: Event,
    /// `REASON_*` reported as at risk and not yet recovered.
    reasons: u32,
    /// When an unanswered first probe becomes `at_risk`.
    probe_due: Option<u64>,
    /// When the window was first seen at zero, and last.
    zero_since: Option<u64>,
    zero_last: u64,
    /// Times of the most recent retransmits (at most the threshold).
    retrans: VecDeque<u64>,
    last_total: Option<u32>,
    /// Lookups in a row that found nothing.
    unseen: u32,
}

/// The thresholds of one connection, defaults filled in.
struct Limits {
    off: u32,
    probe_ns: u64,
    backoff: u32,
    zero_window_ns: u64,
    retrans: usize,
}

impl Limits {
    fn of(e: &Event) -> Self {
        let r: Risk = e.risk;
        let interval_ms = u64::from(e.policy.interval) * 1000;
        let or = |v: u64, d: u64| if v == 0 { d } else { v };
        Self {
            off: u32::from(r.off),
            probe_ns: or(
                u64::from(r.probe_ms),
                (interval_ms / 2).min(u64::from(DEFAULT_PROBE_MS_MAX)),
            ) * MS,
            backoff: u32::from(if r.backoff == 0 {
                DEFAULT_BACKOFF
            } else {
                r.backoff
            }),
            zero_window_ns: or(
                u64::from(r.zero_window_ms),
                u64::from(DEFAULT_ZERO_WINDOW_MS),
            ) * MS,
            retrans: usize::from(if r.retrans == 0 {
                DEFAULT_RETRANS
            } else {
                r.retrans
            }),
        }
    }
}

/// The tracker; single-threaded, driven by the event feed.
#[derive(Default)]
pub struct Tracker {
    conns: HashMap<u64, Watched>,
    /// (time, cookie): when a connection's state must be looked at again.
    due: BTreeSet<(u64, u64)>,
    /// Connections at risk for a reason the kernel is asked about.
    polled: HashSet<u64>,
    last_poll: u64,
}

impl Tracker {
    /// How many connections it keeps a record of.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// One signal from sock_ops; returns the events it makes.
    pub fn signal(&mut self, e: &Event) -> Vec<Record> {
        if self.conns.len() >= MAX_TRACKED && !self.conns.contains_key(&e.cookie) {
            self.forget_quiet(e.ts_ns);
        }
        let w = self.conns.entry(e.cookie).or_insert_with(|| Watched {
            last: *e,
            reasons: 0,
            probe_due: None,
            zero_since: None,
            zero_last: 0,
            retrans: VecDeque::new(),
            last_total: None,
            unseen: 0,
        });
        w.last = *e;
        let lim = Limits::of(e);
        let ts = e.ts_ns;
        let mut out = Vec::new();
        let mut due = Vec::new();
        match e.detail {
            SIGNAL_PROBE if e.error & SIGNAL_ZERO_WINDOW != 0 => {
                // Zero-window probes back off to 2 minutes apart: a longer
                // silence means the window opened in between.
                if ts.saturating_sub(w.zero_last) > ZERO_WINDOW_GAP_NS {
                    w.zero_since = None;
                }
                w.zero_last = ts;
                let since = *w.zero_since.get_or_insert(ts);
                if ts >= since + lim.zero_window_ns {
                    raise(w, &lim, REASON_ZERO_WINDOW, ts, &mut out);
                } else {
                    due.push(since + lim.zero_window_ns);
                }
            }
            SIGNAL_PROBE => {
                let unanswered_before = e.error & 0xff;
                if unanswered_before == 0 {
                    // The probe before this one was answered (the kernel
                    // counts from zero again).
                    clear(w, REASON_PROBE, ts, None, &mut out);
                }
                if unanswered_before >= 1 {
                    // The previous probe went a whole interval unanswered.
                    w.probe_due = None;
                    raise(w, &lim, REASON_PROBE, ts, &mut out);
                } else if w.probe_due.is_none() {
                    let at = ts + lim.probe_ns;
                    w.probe_due = Some(at);
                    due.push(at);
                }
            }
            SIGNAL_ANSWER => {
                w.probe_due = None;
                clear(w, REASON_PROBE, ts, None, &mut out);
                clear(w, REASON_BACKOFF, ts, None, &mut out);
                if e.error != 0 {
                    w.zero_since = None;
                    clear(w, REASON_ZERO_WINDOW, ts, None, &mut out);
                }
            }
            SIGNAL_RTO if e.error >= lim.backoff => {
                raise(w, &lim, REASON_BACKOFF, ts, &mut out);
            }
            SIGNAL_RETRANS => {
                let new = w
                    .last_total
                    .map_or(1, |t| e.error.wrapping_sub(t).max(1) as usize);
                w.last_total = Some(e.error);
                for _ in 0..new.min(lim.retrans) {
                    w.retrans.push_back(ts);
                }
                while w.retrans.len() > lim.retrans {
                    w.retrans.pop_front();
                }
                let window = u64::from(RETRANS_WINDOW_MS) * MS;
                if let Some(&oldest) = w.retrans.front() {
                    if w.retrans.len() >= lim.retrans && oldest + window > ts {
                        raise(w, &lim, REASON_RETRANS, ts, &mut out);
                    }
                    if w.reasons & REASON_RETRANS != 0 {
                        due.push(oldest + window);
                    }
                }
            }
            _ => {}
        }
        for at in due {
            self.due.insert((at, e.cookie));
        }
        self.note_polled(e.cookie);
        out
    }

    /// What has come due by `now` (CLOCK_MONOTONIC ns): unanswered probes,
    /// windows shut too long, retransmits that have aged out; and, every
    /// [`RECOVERY_POLL_NS`], whether a connection at risk is well again.
    /// `look` asks the kernel about one connection.
    pub fn tick(&mut self, now: u64, look: &mut dyn FnMut(&Event) -> Seen) -> Vec<Record> {
        let mut out = Vec::new();
        let mut touched = Vec::new();
        while let Some(&(at, cookie)) = self.due.first() {
            if at > now {
                break;
            }
            self.due.pop_first();
            touched.push(cookie);
            let Some(w) = self.conns.get_mut(&cookie) else {
                continue;
            };
            let lim = Limits::of(&w.last);
            if w.probe_due.is_some_and(|d| d <= now) {
                w.probe_due = None;
                // Unanswered still? Not found: its second probe will say.
                if let Seen::Health {
                    probes_out,
                    last_ack_ms,
                    ..
                } = look(&w.last)
                {
                    if probes_out >= 1 {
                        raise_seen(w, &lim, REASON_PROBE, at, last_ack_ms, &mut out);
                    }
                }
            }
            if w.zero_since.is_some_and(|s| s + lim.zero_window_ns <= now)
                && w.reasons & REASON_ZERO_WINDOW == 0
            {
                match look(&w.last) {
                    Seen::Health {
                        zero_window: true,
                        last_ack_ms,
                        ..
                    } => raise_seen(w, &lim, REASON_ZERO_WINDOW, at, last_ack_ms, &mut out),
                    Seen::Health { .. } => w.zero_since = None,
                    // Its next zero-window probe will say.
                    Seen::Unknown => {}
                }
            }
            if w.reasons & REASON_RETRANS != 0 {
                let window = u64::from(RETRANS_WINDOW_MS) * MS;
                match w.retrans.front() {
                    Some(&oldest) if oldest + window > now => {
                        self.due.insert((oldest + window, cookie));
                    }
                    _ => {
                        w.retrans.clear();
                        clear(w, REASON_RETRANS, at, None, &mut out);
                    }
                }
            }
        }
        for cookie in touched {
            self.note_polled(cookie);
        }
        if now >= self.last_poll + RECOVERY_POLL_NS {
            self.last_poll = now;
            self.poll(now, look, &mut out);
        }
        out
    }

    /// Asks the kernel whether each connection at risk is well again.
    fn poll(&mut self, now: u64, look: &mut dyn FnMut(&Event) -> Seen, out: &mut Vec<Record>) {
        let mut gone = Vec::new();
        for &cookie in &self.polled {
            let Some(w) = self.conns.get_mut(&cookie) else {
                continue;
            };
            let lim = Limits::of(&w.last);
            match look(&w.last) {
                Seen::Unknown => {
                    w.unseen += 1;
                    if w.unseen >= UNSEEN_LIMIT && now.saturating_sub(w.last.ts_ns) > QUIET_NS {
                        gone.push(cookie);
                    }
                }
                Seen::Health {
                    probes_out,
                    backoff,
                    zero_window,
                    last_ack_ms,
                } => {
                    w.unseen = 0;
                    let ack = Some(last_ack_ms);
                    if probes_out == 0 {
                        clear(w, REASON_PROBE, now, ack, out);
                    }
                    if u32::from(backoff) < lim.backoff {
                        clear(w, REASON_BACKOFF, now, ack, out);
                    }
                    if !zero_window {
                        w.zero_since = None;
                        clear(w, REASON_ZERO_WINDOW, now, ack, out);
                    }
                }
            }
        }
        for cookie in gone {
            self.forget(cookie);
        }
        let cookies: Vec<u64> = self.polled.iter().copied().collect();
        for cookie in cookies {
            self.note_polled(cookie);
        }
    }

    /// Keeps [`Self::polled`] right for one connection: those at risk for
    /// a reason the kernel can be asked about.
    fn note_polled(&mut self, cookie: u64) {
        const ASKED: u32 = REASON_PROBE | REASON_BACKOFF | REASON_ZERO_WINDOW;
        if self
            .conns
            .get(&cookie)
            .is_some_and(|w| w.reasons & ASKED != 0)
        {
            self.polled.insert(cookie);
        } else {
            self.polled.remove(&cookie);
        }
    }

    /// The connection ended: nothing more is said of it.
    pub fn forget(&mut self, cookie: u64) {
        self.conns.remove(&cookie);
        self.polled.remove(&cookie);
    }

    /// Drops healthy connections that have not signalled for a while.
    fn forget_quiet(&mut self, now: u64) {
        self.conns.retain(|_, w| {
            w.reasons != 0
                || w.probe_due.is_some()
                || w.zero_since.is_some()
                || now.saturating_sub(w.last.ts_ns) < FORGET_AFTER_NS
        });
    }

    /// Called now and then: forgets what is stale.
    pub fn sweep(&mut self, now: u64) {
        self.forget_quiet(now);
    }
}

fn record(w: &Watched, kind: u32, reason: u32, at: u64, ack: Option<u32>) -> Record {
    let mut e = w.last;
    e.kind = kind;
    e.detail = reason;
    e.error = 0;
    // As the kernel said just now; or the age of the last ACK when it was
    // signalled, plus the time since; a peer that just answered has none.
    e.ack_age_ms = if let Some(ms) = ack {
        ms
    } else if kind == KIND_RECOVERED && matches!(reason, REASON_PROBE | REASON_BACKOFF) {
        0
    } else if e.ack_age_ms == u32::MAX {
        u32::MAX
    } else {
        e.ack_age_ms
            .saturating_add((at.saturating_sub(e.ts_ns) / MS) as u32)
    };
    e.ts_ns = at;
    Record::from_raw(&e)
}

fn raise(w: &mut Watched, lim: &Limits, reason: u32, at: u64, out: &mut Vec<Record>) {
    raise_with(w, lim, reason, at, None, out);
}

fn raise_seen(
    w: &mut Watched,
    lim: &Limits,
    reason: u32,
    at: u64,
    ack: u32,
    out: &mut Vec<Record>,
) {
    raise_with(w, lim, reason, at, Some(ack), out);
}

fn raise_with(
    w: &mut Watched,
    lim: &Limits,
    reason: u32,
    at: u64,
    ack: Option<u32>,
    out: &mut Vec<Record>,
) {
    if lim.off & reason != 0 || w.reasons & reason != 0 {
        return;
    }
    w.reasons |= reason;
    out.push(record(w, KIND_AT_RISK, reason, at, ack));
}

fn clear(w: &mut Watched, reason: u32, at: u64, ack: Option<u32>, out: &mut Vec<Record>) {
    if w.reasons & reason == 0 {
        return;
    }
    w.reasons &= !reason;
    out.push(record(w, KIND_RECOVERED, reason, at, ack));
}

#[cfg(test)]
mod tests {
    use keepalive_common::{events::KIND_SIGNAL, policy::Policy};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn sig(what: u32, value: u32, ts: u64, risk: Risk) -> Event {
        Event {
            kind: KIND_SIGNAL,
            family: 2,
            cookie: 7,
            ts_ns: ts,
            local_addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1],
            remote_addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 2],
            local_port: 1000,
            remote_port: 5060,
            rule_id: 0,
            policy: Policy {
                idle: 30,
                count: 3,
                interval: 4,
                user_timeout_ms: 0,
                flags: 0,
            },
            source: 2,
            error: value,
            detail: what,
            ack_age_ms: 30_000,
            risk,
        }
    }

    fn health(probes_out: u8, backoff: u8, zero_window: bool) -> Seen {
        Seen::Health {
            probes_out,
            backoff,
            zero_window,
            last_ack_ms: 1234,
        }
    }

    fn kinds(r: &[Record]) -> Vec<(&str, &str)> {
        r.iter().map(|r| (r.kind, r.reason.unwrap())).collect()
    }

    #[test]
    fn an_unanswered_probe_is_at_risk_after_its_threshold_and_recovers_when_answered() {
        let mut t = Tracker::default();
        let r = Risk::default();
        let mut unanswered = |_: &Event| health(1, 0, false);
        assert!(t.signal(&sig(SIGNAL_PROBE, 0, 100 * S, r)).is_empty());
        // Default threshold: half the 4 s interval, at most 1 s.
        assert!(t.tick(100 * S + 999 * MS, &mut unanswered).is_empty());
        let at = t.tick(101 * S, &mut unanswered);
        assert_eq!(kinds(&at), [("at_risk", "probe")]);
        assert_eq!(at[0].monotonic_ns, 101 * S);
        assert_eq!(at[0].ack_age_ms, Some(1234));
        // Still unanswered: nothing new.
        assert!(t.tick(102 * S, &mut unanswered).is_empty());
        // The kernel says the peer answered.
        let rec = t.tick(103 * S, &mut |_| health(0, 0, false));
        assert_eq!(kinds(&rec), [("recovered", "probe")]);
        // A probe answered in time says nothing.
        t.signal(&sig(SIGNAL_PROBE, 0, 200 * S, r));
        assert!(t.tick(300 * S, &mut |_| health(0, 0, false)).is_empty());
        // An answer signalled by the kernel recovers at once.
        t.signal(&sig(SIGNAL_PROBE, 1, 400 * S, r));
        let rec = t.signal(&sig(SIGNAL_ANSWER, 1000, 401 * S, r));
        assert_eq!(kinds(&rec), [("recovered", "probe")]);
        assert_eq!(rec[0].ack_age_ms, Some(0));
    }

    #[test]
    fn a_connection_not_found_waits_for_its_second_probe() {
        let mut t = Tracker::default();
        let r = Risk::default();
        t.signal(&sig(SIGNAL_PROBE, 0, S, r));
        assert!(t.tick(10 * S, &mut |_| Seen::Unknown).is_empty());
        let at = t.signal(&sig(SIGNAL_PROBE, 1, 11 * S, r));
        assert_eq!(kinds(&at), [("at_risk", "probe")]);
        // Its next probe counts from zero: the one before was answered.
        let rec = t.signal(&sig(SIGNAL_PROBE, 0, 15 * S, r));
        assert_eq!(kinds(&rec), [("recovered", "probe")]);
        // At risk again, then never found nor heard from: forgotten after
        // a while, without a word.
        t.signal(&sig(SIGNAL_PROBE, 1, 16 * S, r));
        for i in 0..UNSEEN_LIMIT as u64 {
            assert!(t.tick(20 * S + i * S, &mut |_| Seen::Unknown).is_empty());
        }
        assert!(t.is_empty());
    }

    #[test]
    fn off_means_never() {
        let mut t = Tracker::default();
        let off = crate::risk::Thresholds::OFF.to_raw();
        assert!(t.signal(&sig(SIGNAL_PROBE, 1, S, off)).is_empty());
        t.signal(&sig(SIGNAL_PROBE, 0, 2 * S, off));
        assert!(t.tick(10 * S, &mut |_| health(1, 0, false)).is_empty());
    }

    #[test]
    fn backoff_zero_window_and_retransmits() {
        let mut t = Tracker::default();
        let r = Risk {
            backoff: 3,
            zero_window_ms: 2000,
            retrans: 3,
            ..Risk::default()
        };
        let mut stuck = |_: &Event| health(0, 3, false);
        assert!(t.signal(&sig(SIGNAL_RTO, 2, S, r)).is_empty());
        assert_eq!(
            kinds(&t.signal(&sig(SIGNAL_RTO, 3, 2 * S, r))),
            [("at_risk", "backoff")]
        );
        assert!(t.tick(2 * S + 300 * MS, &mut stuck).is_empty());
        // Three retransmits within 10 s.
        t.signal(&sig(SIGNAL_RETRANS, 1, 3 * S, r));
        t.signal(&sig(SIGNAL_RETRANS, 2, 4 * S, r));
        assert_eq!(
            kinds(&t.signal(&sig(SIGNAL_RETRANS, 3, 5 * S, r))),
            [("at_risk", "retrans")]
        );
        assert_eq!(
            kinds(&t.tick(6 * S, &mut |_| health(0, 0, false))),
            [("recovered", "backoff")]
        );
        // Ten seconds after the oldest of the three: fewer than three.
        let mut well = |_: &Event| health(0, 0, false);
        assert!(t.tick(12 * S, &mut well).is_empty());
        assert_eq!(
            kinds(&t.tick(13 * S, &mut well)),
            [("recovered", "retrans")]
        );

        // Zero-window probes: at risk once the window has been shut 2 s.
        let zw = SIGNAL_ZERO_WINDOW;
        let mut shut = |_: &Event| health(2, 2, true);
        assert!(t.signal(&sig(SIGNAL_PROBE, zw, 20 * S, r)).is_empty());
        assert!(t.tick(21 * S, &mut shut).is_empty());
        assert_eq!(
            kinds(&t.tick(22 * S, &mut shut)),
            [("at_risk", "zero_window")]
        );
        assert!(t.tick(23 * S, &mut shut).is_empty());
        assert_eq!(
            kinds(&t.tick(24 * S, &mut |_| health(0, 0, false))),
            [("recovered", "zero_window")]
        );
    }

    #[test]
    fn an_ended_connection_is_forgotten() {
        let mut t = Tracker::default();
        t.signal(&sig(SIGNAL_PROBE, 0, S, Risk::default()));
        t.forget(7);
        assert!(t.tick(100 * S, &mut |_| health(1, 0, false)).is_empty());
        assert!(t.is_empty());
    }
}
