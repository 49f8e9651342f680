use crate::policy::Policy;

/// A policy was applied to a connection.
pub const KIND_APPLIED: u32 = 1;
/// A managed connection closed in order (no error).
pub const KIND_CLOSED: u32 = 2;
/// A managed connection was reset (`ECONNRESET`, `EPIPE`).
pub const KIND_RESET: u32 = 3;
/// A managed connection's peer stopped answering: keepalive probes or
/// retransmissions gave up (`ETIMEDOUT`, or the ICMP error that ended
/// them, such as `EHOSTUNREACH`).
pub const KIND_TIMEOUT: u32 = 4;
/// A managed connection was aborted locally (`ECONNABORTED`: `ss -K`,
/// SOCK_DESTROY, `bpf_sock_destroy`).
pub const KIND_ABORTED: u32 = 5;
/// A managed connection was ended by `tcpka close` (`POST /v1/close`).
pub const KIND_CLOSED_BY_TCPKA: u32 = 6;
/// A watched connection shows trouble: [`Event::detail`] is the
/// [`crate::risk`] `REASON_*` that started.
pub const KIND_AT_RISK: u32 = 7;
/// The trouble of an earlier [`KIND_AT_RISK`] ended: [`Event::detail`] is
/// the reason that cleared.
pub const KIND_RECOVERED: u32 = 8;
/// What sock_ops saw of a managed connection's health
/// ([`crate::risk`] `SIGNAL_*` in [`Event::detail`]): read by `tcpka
/// serve`, which makes [`KIND_AT_RISK`] and [`KIND_RECOVERED`] of them;
/// never shown.
pub const KIND_SIGNAL: u32 = 9;

/// Names a `KIND_*` value.
pub fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_APPLIED => "applied",
        KIND_CLOSED => "closed",
        KIND_RESET => "reset",
        KIND_TIMEOUT => "timeout",
        KIND_ABORTED => "aborted",
        KIND_CLOSED_BY_TCPKA => "closed_by_tcpka",
        KIND_AT_RISK => "at_risk",
        KIND_RECOVERED => "recovered",
        KIND_SIGNAL => "signal",
        _ => "unknown",
    }
}

/// One event. Addresses are IPv6, network byte order; IPv4 connections
/// (family 2) carry them IPv4-mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `KIND_*`.
    pub kind: u32,
    /// Socket family: 2 (IPv4) or 10 (IPv6).
    pub family: u32,
    /// Socket cookie.
    pub cookie: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Local address, network byte order.
    pub local_addr: [u8; 16],
    /// Remote address, network byte order.
    pub remote_addr: [u8; 16],
    /// Local port, host byte order.
    pub local_port: u16,
    /// Remote port, host byte order.
    pub remote_port: u16,
    /// Rule id, 0 when the policy did not come from a rule.
    pub rule_id: u32,
    /// The policy in force.
    pub policy: Policy,
    /// [`crate::conns`] `SOURCE_*`.
    pub source: u32,
    /// The socket's error (`sk_err`) when it closed, else 0; for a
    /// signal, its value (see [`crate::risk`] `SIGNAL_*`).
    pub error: u32,
    /// For `at_risk` and `recovered`: the [`crate::risk`] `REASON_*`; for
    /// a signal, its `SIGNAL_*`.
    pub detail: u32,
    /// Milliseconds since the peer last acknowledged anything
    /// (`rcv_tstamp`), for signals and a managed connection's end;
    /// `u32::MAX` when not known.
    pub ack_age_ms: u32,
    /// The connection's early-warning thresholds (signals).
    pub risk: crate::risk::Risk,
}

/// Ring buffer size in bytes (a power of two, multiple of the page size).
pub const RING_BYTES: u32 = 256 * 1024;
