//! Events from the kernel programs, rendered for people and scripts.
use std::fmt;

use std::time::{Duration, SystemTime};

use keepalive_common::{
    conns::source_name,
    events::{kind_name, Event, KIND_APPLIED, KIND_AT_RISK, KIND_RECOVERED},
    risk::reason_name,
};

use crate::{conn::endpoint, policy::Policy};

/// An event, decoded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Record {
    /// `"applied"`, `"closed"`, `"reset"`, `"timeout"`, `"aborted"`,
    /// `"closed_by_tcpka"`, `"at_risk"` or `"recovered"`.
    pub kind: &'static str,
    pub cookie: u64,
    pub local: String,
    pub remote: String,
    /// `"rule"` or `"command"`.
    pub source: &'static str,
    pub rule: Option<u32>,
    pub policy: Policy,
    /// CLOCK_MONOTONIC nanoseconds when the kernel saw it.
    pub monotonic_ns: u64,
    /// Wall-clock time, RFC 3339 UTC.
    pub time: String,
    /// The socket error that ended the connection (e.g. 110 ETIMEDOUT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<u32>,
    /// For `at_risk` and `recovered`: `"probe"`, `"backoff"`,
    /// `"zero_window"` or `"retrans"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Milliseconds since the peer last acknowledged anything, for
    /// `at_risk`, `recovered` and a managed connection's end (for a
    /// `timeout`, how long detection took).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_age_ms: Option<u32>,
}

/// Converts a CLOCK_MONOTONIC time to wall-clock RFC 3339 (UTC).
pub fn rfc3339_from_monotonic(monotonic_ns: u64) -> String {
    let now = |clock| {
        nix::time::clock_gettime(clock).map_or(0, |t| {
            i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
        })
    };
    let wall = now(nix::time::ClockId::CLOCK_REALTIME) - now(nix::time::ClockId::CLOCK_MONOTONIC)
        + i128::from(monotonic_ns);
    rfc3339(wall)
}

/// Formats nanoseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`
/// (times before the epoch, which no event has, as the epoch).
pub fn rfc3339(unix_ns: i128) -> String {
    let ns = u64::try_from(unix_ns).unwrap_or(0);
    humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

impl Record {
    pub fn from_raw(e: &Event) -> Self {
        Self {
            kind: kind_name(e.kind),
            cookie: e.cookie,
            local: endpoint(e.family, e.local_addr, e.local_port).to_string(),
            remote: endpoint(e.family, e.remote_addr, e.remote_port).to_string(),
            source: source_name(e.source),
            rule: (e.rule_id != 0).then_some(e.rule_id),
            policy: Policy::from_raw(&e.policy),
            monotonic_ns: e.ts_ns,
            time: rfc3339_from_monotonic(e.ts_ns),
            error: (e.error != 0).then_some(e.error),
            reason: matches!(e.kind, KIND_AT_RISK | KIND_RECOVERED).then(|| reason_name(e.detail)),
            ack_age_ms: (e.ack_age_ms != u32::MAX && e.kind != KIND_APPLIED)
                .then_some(e.ack_age_ms),
        }
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {} cookie={:#x}: {}",
            self.kind, self.local, self.remote, self.cookie, self.policy
        )?;
        if let Some(r) = self.reason {
            write!(f, " reason={r}")?;
        }
        if let Some(ms) = self.ack_age_ms {
            write!(f, " last_ack={ms}ms_ago")?;
        }
        match self.rule {
            Some(id) => write!(f, " (rule {id})"),
            None => write!(f, " ({})", self.source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_795_651_200_123_000_000),
            "2026-11-26T00:00:00.123Z"
        );
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
    }
}
