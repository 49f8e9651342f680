//! Events from the kernel programs, rendered for people and scripts.
use std::fmt;

use keepalive_common::{
    conns::{SOURCE_COMMAND, SOURCE_RULE},
    events::{Event, KIND_APPLIED},
};

use crate::policy::Policy;

/// An event, decoded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Record {
    /// `"applied"`.
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
            kind: match e.kind {
                KIND_APPLIED => "applied",
                _ => "unknown",
            },
            cookie: e.cookie,
            local: endpoint(e.family, e.local_addr, e.local_port).to_string(),
            remote: endpoint(e.family, e.remote_addr, e.remote_port).to_string(),
            source: source_name(e.source),
            rule: (e.rule_id != 0).then_some(e.rule_id),
            policy: Policy::from_raw(&e.policy),
            monotonic_ns: e.ts_ns,
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
