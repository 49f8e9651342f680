//! Early warning: a managed connection (tracked or command-managed) whose
//! peer shows trouble before the kernel gives up on it. sock_ops sends a
//! signal ([`crate::events::KIND_SIGNAL`]) when such a connection sends a
//! keepalive or zero-window probe, when its retransmission timer fires,
//! when it retransmits, and when the peer answers; `tcpka serve` turns
//! them into `at_risk` when a reason starts and `recovered` when it ends,
//! one event per reason.

/// A keepalive probe went unanswered for longer than the probe threshold.
pub const REASON_PROBE: u32 = 1;
/// Retransmission backoff (`icsk_backoff`) reached its threshold.
pub const REASON_BACKOFF: u32 = 2;
/// The peer's receive window stayed at zero for the zero-window threshold.
pub const REASON_ZERO_WINDOW: u32 = 4;
/// Retransmits in one [`RETRANS_WINDOW_MS`] window reached the threshold.
pub const REASON_RETRANS: u32 = 8;
/// Every reason, in report order.
pub const REASONS: [u32; 4] = [
    REASON_PROBE,
    REASON_BACKOFF,
    REASON_ZERO_WINDOW,
    REASON_RETRANS,
];

/// Names a `REASON_*` bit.
pub fn reason_name(reason: u32) -> &'static str {
    match reason {
        REASON_PROBE => "probe",
        REASON_BACKOFF => "backoff",
        REASON_ZERO_WINDOW => "zero_window",
        REASON_RETRANS => "retrans",
        _ => "unknown",
    }
}

/// The probe threshold when none is given: half the keepalive interval,
/// at most this (so that `at_risk` comes before the next probe).
pub const DEFAULT_PROBE_MS_MAX: u32 = 1000;
/// Backoff threshold when none is given: three retransmission timeouts in
/// a row without an answer.
pub const DEFAULT_BACKOFF: u8 = 3;
/// Zero-window threshold when none is given.
pub const DEFAULT_ZERO_WINDOW_MS: u32 = 5000;
/// Retransmits per window when none is given.
pub const DEFAULT_RETRANS: u16 = 10;
/// The window the retransmit threshold counts in.
pub const RETRANS_WINDOW_MS: u32 = 10_000;

/// Thresholds of one rule or command. A field at 0 takes its default; a
/// reason in `off` is never reported.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Risk {
    /// How long a keepalive probe may go unanswered, ms.
    pub probe_ms: u32,
    /// How long the peer's window may stay at zero, ms.
    pub zero_window_ms: u32,
    /// Retransmits per [`RETRANS_WINDOW_MS`].
    pub retrans: u16,
    /// `icsk_backoff` level.
    pub backoff: u8,
    /// `REASON_*` bits turned off.
    pub off: u8,
}

/// [`crate::events::KIND_SIGNAL`] `detail`: a probe went out (keepalive
/// or zero-window). `error` holds the probes unanswered before it (low
/// byte) and [`SIGNAL_ZERO_WINDOW`].
pub const SIGNAL_PROBE: u32 = 1;
/// The peer answered (a packet arrived after a probe or a retransmission
/// timeout). `error` holds the window it advertised (unscaled).
pub const SIGNAL_ANSWER: u32 = 2;
/// The retransmission timer fired. `error` holds the backoff level it
/// leaves (`icsk_backoff` + 1).
pub const SIGNAL_RTO: u32 = 3;
/// A segment was retransmitted. `error` holds `total_retrans`.
pub const SIGNAL_RETRANS: u32 = 4;
/// In a [`SIGNAL_PROBE`]'s `error`: the peer's window is zero (a
/// zero-window probe).
pub const SIGNAL_ZERO_WINDOW: u32 = 1 << 8;

/// Every `REASON_*` bit: `off` with all of them turns early warning off.
pub const ALL_REASONS: u8 =
    (REASON_PROBE | REASON_BACKOFF | REASON_ZERO_WINDOW | REASON_RETRANS) as u8;
