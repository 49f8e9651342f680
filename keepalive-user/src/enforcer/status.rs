//! What a command reports of a connection: its state and keepalive values
//! as the kernel has them, and what a batch changed or kept.
use super::{liveness::Liveness, walk::parse_raw};
use crate::conn::endpoint;
use keepalive_common::{
    conns::source_name,
    requests::{ConnRecord, APPLY_CONNS_FULL, APPLY_SETSOCKOPT_FAILED},
};

/// A connection an enable could not manage: the connection map is full.
pub const CONNS_FULL_ERROR: &str =
    "the connection map is full (tcpka load --max-connections): not managed, left as it was";

/// Keepalive settings read back from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeepaliveState {
    pub enabled: bool,
    pub idle: u32,
    pub count: u32,
    pub interval: u32,
    /// TCP_USER_TIMEOUT, `None` when 0 (kernel default).
    pub user_timeout_ms: Option<u32>,
    /// True when a non-zero user timeout makes the kernel ignore `count`:
    /// it drops the connection once the user timeout has passed and one
    /// probe went unanswered.
    pub count_ignored: bool,
}

/// One connection as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConnStatus {
    pub cookie: u64,
    pub local: String,
    pub remote: String,
    /// The kernel's TCP state (`ss` names).
    pub state: &'static str,
    /// The state in tcpka's stable vocabulary: `established`, `listening`,
    /// `connecting`, `peer-closed` (the peer sent its FIN) or `closing`
    /// (see [`phase`]).
    pub phase: &'static str,
    /// The same as Kamailio tcpops' `tcp_conid_state` returns it: 1 OK, 2
    /// accepting, 3 setting up, -2 EOF, -4 about to close (-1, no such
    /// connection, is a command's exit 1 / HTTP 404).
    pub conid_state: i32,
    pub keepalive: KeepaliveState,
    /// `"rule"` or `"command"`; `None` when tcpka does not manage it.
    pub source: Option<&'static str>,
    pub rule: Option<u32>,
    /// Some `bpf_setsockopt` of the request failed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub apply_failed: bool,
    /// Why the command left this connection as it was (the connection map
    /// is full: tcpka could not manage it, so it gave it nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Holders of its keepalive (shown by status).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holders: Option<Vec<String>>,
    /// Its health as the kernel has it (shown by status, see
    /// [`Enforcer::add_liveness`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Liveness>,
}

/// What a command did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    /// Connections it changed (an enable's, or a disable's whose
    /// keepalive is now off), read back from the kernel.
    pub changed: Vec<ConnStatus>,
    /// A disable's connections that keep keepalive for their other holders.
    pub kept: Vec<Kept>,
}

/// A connection that kept keepalive.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Kept {
    pub connection: ConnStatus,
    pub holders_remaining: u32,
}

/// Name of a TCP state (`include/net/tcp_states.h`).
/// A TCP state in tcpka's stable vocabulary, and as tcpops'
/// `tcp_conid_state` numbers it.
pub fn phase(state: u32) -> (&'static str, i32) {
    match state {
        1 => ("established", 1),
        10 => ("listening", 2),
        2 | 3 | 12 => ("connecting", 3),
        8 => ("peer-closed", -2),
        _ => ("closing", -4),
    }
}

pub fn state_name(state: u32) -> &'static str {
    match state {
        1 => "established",
        2 => "syn-sent",
        3 => "syn-recv",
        4 => "fin-wait-1",
        5 => "fin-wait-2",
        6 => "time-wait",
        7 => "close",
        8 => "close-wait",
        9 => "last-ack",
        10 => "listen",
        11 => "closing",
        12 => "new-syn-recv",
        _ => "unknown",
    }
}

impl ConnStatus {
    pub(super) fn from_raw(r: &ConnRecord) -> Self {
        let user_timeout_ms = (r.user_timeout_ms != 0).then_some(r.user_timeout_ms);
        Self {
            cookie: r.cookie,
            local: endpoint(r.family, r.local_addr, r.local_port).to_string(),
            remote: endpoint(r.family, r.remote_addr, r.remote_port).to_string(),
            state: state_name(r.state),
            phase: phase(r.state).0,
            conid_state: phase(r.state).1,
            keepalive: KeepaliveState {
                enabled: r.keepalive != 0,
                idle: r.idle,
                count: r.count,
                interval: r.interval,
                user_timeout_ms,
                count_ignored: r.keepalive != 0 && user_timeout_ms.is_some(),
            },
            source: (r.source != 0).then(|| source_name(r.source)),
            rule: (r.rule_id != 0).then_some(r.rule_id),
            apply_failed: r.apply_failed == APPLY_SETSOCKOPT_FAILED,
            error: (r.apply_failed == APPLY_CONNS_FULL).then(|| CONNS_FULL_ERROR.to_owned()),
            holders: None,
            liveness: None,
        }
    }
}

pub(super) fn parse_records(buf: &[u8]) -> Vec<ConnStatus> {
    parse_raw(buf).iter().map(ConnStatus::from_raw).collect()
}
