//! Events from the kernel programs, rendered for people and scripts.
use std::fmt;

use keepalive_common::{
    conns::{SOURCE_COMMAND, SOURCE_RULE},
    events::{
        Event, KIND_ABORTED, KIND_APPLIED, KIND_CLOSED, KIND_CLOSED_BY_TCPKA, KIND_RESET,
        KIND_TIMEOUT,
    },
};

use crate::policy::Policy;

/// An event, decoded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Record {
    /// `"applied"`, `"closed"`, `"reset"`, `"timeout"`, `"aborted"` or
    /// `"closed_by_tcpka"`.
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
}

/// Names an event kind.
pub fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_APPLIED => "applied",
        KIND_CLOSED => "closed",
        KIND_RESET => "reset",
        KIND_TIMEOUT => "timeout",
        KIND_ABORTED => "aborted",
        KIND_CLOSED_BY_TCPKA => "closed_by_tcpka",
        _ => "unknown",
    }
}

/// Converts a CLOCK_MONOTONIC time to wall-clock RFC 3339 (UTC).
pub fn rfc3339_from_monotonic(monotonic_ns: u64) -> String {
    let now = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    let wall = now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC) + monotonic_ns as i128;
    rfc3339(wall)
}

/// Formats nanoseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339(unix_ns: i128) -> String {
    let ms = (unix_ns / 1_000_000) as i64;
    let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

pub use crate::conn::endpoint;

/// Names a `SOURCE_*` value.
pub fn source_name(source: u32) -> &'static str {
    match source {
        SOURCE_RULE => "rule",
        SOURCE_COMMAND => "command",
        _ => "unknown",
    }
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

    #[test]
    fn endpoints() {
        let v4 = std::net::Ipv4Addr::new(10, 0, 0, 2)
            .to_ipv6_mapped()
            .octets();
        assert_eq!(endpoint(2, v4, 5060).to_string(), "10.0.0.2:5060");
        assert_eq!(endpoint(10, v4, 5060).to_string(), "[::ffff:10.0.0.2]:5060");
        let v6 = "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        assert_eq!(endpoint(10, v6, 5061).to_string(), "[2001:db8::1]:5061");
    }
}
