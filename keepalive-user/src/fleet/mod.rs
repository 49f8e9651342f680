//! The fleet: one policy for many hosts through etcd. Each `tcpka serve
//! --etcd` agent watches the rules under a prefix, keeps its kernel's rules
//! equal to the ones that select it, and publishes its status under a lease.
//!
//! Keys (PREFIX is `/tcpka` unless `--etcd-prefix` says otherwise):
//!
//! ```text
//! PREFIX/rules/NAME   a named rule: JSON, the configuration file's fields
//!                     (idle, count, interval, local_port, remote_port,
//!                     remote, user_timeout_ms, tracked) and an optional
//!                     selector: "nodes": ["edge-1", ...] and/or
//!                     "labels": {"role": "edge", ...}
//! PREFIX/nodes/NODE   the agent's status (JSON), under a lease of 10 s: it
//!                     is gone within that when the agent is
//! PREFIX/known/NODE   the node's labels, kept: `tcpka fleet status` shows
//!                     a known node without a status as gone
//! PREFIX/previews/ID  a preview of a change (`fleet rule add|del
//!                     --dry-run`) and, at .../ID/NODE, each agent's
//!                     answer, all under the preview's lease
//! ```
//!
//! In the kernel a fleet rule is named `@NAME`: files and the fleet never
//! change each other's rules. A host's own named rule wins over a fleet
//! rule of the same name or match; the agent reports the clash.
use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config::NAME_MAX;

mod agent;
mod cache;
mod etcd;
mod preview;
mod rules;
mod state;
mod status;

pub use crate::node::{check_label, parse_label, valid_node};
pub use agent::{start as start_agent, AgentConfig, AgentHandle};
pub use etcd::{etcd_error, read_prefix, EtcdOptions, RETRY_FOR};
pub use preview::{ask as preview, PreviewReport, PreviewRequest};
pub use rules::{FleetRule, Selector};
pub use status::EventCounts;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/tcpka";
/// Lifetime of a node's status key: it disappears this long after its
/// agent stopped renewing it.
pub const NODE_TTL: Duration = Duration::from_secs(10);
/// Longest fleet rule name: one less than a rule name, for the `@`.
pub const FLEET_NAME_MAX: usize = NAME_MAX - 1;

/// What an agent publishes at `PREFIX/nodes/NODE`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub loaded: bool,
    pub attached: bool,
    /// The index mode (`ports` or `host`) and how holders are found.
    pub index: String,
    pub holders: String,
    /// The etcd revision of the rules applied to the kernel.
    pub revision: i64,
    /// Rules in the kernel (all), and the fleet's among them.
    pub rules: usize,
    pub fleet_rules: usize,
    /// Size of the kernel's rule table, and how many fleet rules it can
    /// hold beside this host's own.
    #[serde(default)]
    pub rule_table: usize,
    #[serde(default)]
    pub fleet_capacity: usize,
    /// Selected rules left out because the table is full: the least
    /// specific, then the last by name ([`state`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
    /// Live connections that the last applied change gave new values (the
    /// values the rules now decide for them), and all changes since the
    /// agent started.
    #[serde(default)]
    pub live_changed_last: usize,
    #[serde(default)]
    pub live_changed_total: u64,
    pub managed_connections: usize,
    pub timeouts: u64,
    pub resets: u64,
    /// `at_risk` and `recovered` events since serve started.
    #[serde(default)]
    pub at_risk: u64,
    #[serde(default)]
    pub recovered: u64,
    /// Fleet rules not applied because a rule of this host has their name
    /// or match.
    #[serde(default)]
    pub clashes: Vec<String>,
    /// Fleet rules not applied because their value is malformed.
    #[serde(default)]
    pub invalid: Vec<String>,
    /// Whether the last kernel update failed, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub updated: String,
}

/// The node's name when `--node` is not given: the host name.
pub fn default_node() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| valid_node(h))
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn selectors() {
        let edge = labels(&[("role", "edge"), ("dc", "fra")]);
        let all = Selector::default();
        assert!(all.selects("a", &edge).0);
        let by_name = Selector {
            nodes: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        assert!(by_name.selects("a", &edge).0);
        let (no, why) = by_name.selects("c", &edge);
        assert!(!no && why.contains("not in"), "{why}");
        let by_label = Selector {
            labels: labels(&[("role", "edge")]),
            ..Default::default()
        };
        assert!(by_label.selects("c", &edge).0);
        let (no, why) = by_label.selects("c", &labels(&[("role", "core")]));
        assert!(!no && why.contains("role=core"), "{why}");
        assert!(!by_label.selects("c", &BTreeMap::new()).0);
        let both = Selector {
            nodes: vec!["a".into()],
            labels: labels(&[("dc", "fra")]),
        };
        assert!(both.selects("a", &edge).0);
        assert!(!both.selects("b", &edge).0);
    }

    #[test]
    fn rule_values() {
        let r = FleetRule::parse(
            "sip-in",
            br#"{"local_port":5060,"idle":30,"count":3,"interval":5,"labels":{"role":"edge"}}"#,
        )
        .unwrap();
        assert_eq!(r.rule.name, "sip-in");
        assert_eq!(r.rule.matcher.local_port, Some(5060));
        assert_eq!(r.selector.labels["role"], "edge");
        let r = FleetRule::parse(
            "trunk",
            br#"{"remote_port":5060,"idle":30,"count":3,"interval":5,"tracked":true,"at_risk":"probe=800ms"}"#,
        )
        .unwrap();
        assert_eq!(r.rule.policy.risk.to_string(), "probe=800ms");
        for (name, value, want) in [
            (
                "x",
                &br#"{"idle":30,"count":3,"interval":5,"at_risk":"probe=never"}"#[..],
                "at-risk",
            ),
            ("x", br#"{"idle":30,"count":3}"#, "interval"),
            ("x", br#"{"idle":0,"count":3,"interval":5}"#, "idle"),
            (
                "x",
                br#"{"idle":30,"count":3,"interval":5,"color":1}"#,
                "color",
            ),
            ("x", br#"not json"#, "expected"),
            (
                "x",
                br#"{"idle":30,"count":3,"interval":5,"remote":"10.0.0.0/33"}"#,
                "10.0.0.0/33",
            ),
            (
                "bad name",
                br#"{"idle":30,"count":3,"interval":5}"#,
                "rule name",
            ),
            (
                &"n".repeat(32),
                br#"{"idle":30,"count":3,"interval":5}"#,
                "1 to 31",
            ),
            (
                "x",
                br#"{"idle":30,"count":3,"interval":5,"nodes":["a b"]}"#,
                "node name",
            ),
            (
                "x",
                br#"{"idle":30,"count":3,"interval":5,"labels":{"k":""}}"#,
                "label",
            ),
            (
                "x",
                br#"{"name":"y","idle":30,"count":3,"interval":5}"#,
                "its key",
            ),
        ] {
            let e = FleetRule::parse(name, value).unwrap_err();
            assert!(
                e.contains(want),
                "{name} {:?}: {e}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn endpoints_and_options() {
        assert_eq!(
            crate::node::parse_etcd_endpoints("http://127.0.0.1:2379, https://[::1]:2379").unwrap(),
            vec!["http://127.0.0.1:2379", "https://[::1]:2379"]
        );
        for bad in ["", "127.0.0.1:2379", "ftp://x:1", "http://", "http://a:1/x"] {
            assert!(crate::node::parse_etcd_endpoints(bad).is_err(), "{bad:?}");
        }
        let o = |prefix: &str| EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: prefix.into(),
            ..Default::default()
        };
        assert!(o("/tcpka").check().is_ok());
        for bad in ["tcpka", "/tcpka/", "/"] {
            assert!(o(bad).check().is_err(), "{bad}");
        }
        assert_eq!(
            parse_label("role=edge").unwrap(),
            ("role".into(), "edge".into())
        );
        assert!(parse_label("role").is_err());
        assert!(parse_label("role=a b").is_err());
    }
}
