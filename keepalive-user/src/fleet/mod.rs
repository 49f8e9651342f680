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
//! ```
//!
//! In the kernel a fleet rule is named `@NAME`: files and the fleet never
//! change each other's rules. A host's own named rule wins over a fleet
//! rule of the same name or match; the agent reports the clash.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

use crate::{
    config::{valid_name, NamedRule, RuleEntry, NAME_MAX},
    Error, InvalidInput,
};

mod agent;

pub use agent::{run as run_agent, AgentConfig, EventCounts};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/tcpka";
/// Lifetime of a node's status key: it disappears this long after its
/// agent stopped renewing it.
pub const NODE_TTL: Duration = Duration::from_secs(10);
/// Longest fleet rule name: one less than a rule name, for the `@`.
pub const FLEET_NAME_MAX: usize = NAME_MAX - 1;

/// How to reach etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdOptions {
    /// `http://HOST:PORT` or `https://HOST:PORT`, one per member.
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// CA certificate (PEM) that signed the members' certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for members that ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user; the password is read from `password_file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl EtcdOptions {
    /// Endpoints from `URL[,URL...]`.
    pub fn parse_endpoints(s: &str) -> Result<Vec<String>, String> {
        let eps: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if eps.is_empty() {
            return Err("no etcd endpoint".into());
        }
        for e in &eps {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .ok_or_else(|| {
                    format!("{e:?}: an etcd endpoint is http://HOST:PORT or https://HOST:PORT")
                })?;
            if rest.is_empty() || rest.contains('/') || rest.chars().any(char::is_whitespace) {
                return Err(format!(
                    "{e:?}: an etcd endpoint is http://HOST:PORT or https://HOST:PORT"
                ));
            }
        }
        Ok(eps)
    }

    /// Checks what can be checked before connecting: the prefix, the files
    /// (read here, so that a bad one changes nothing), the pairs.
    pub fn check(&self) -> Result<(), Error> {
        let usage = |m: String| Error::Invalid(InvalidInput::Usage(m));
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(usage(format!(
                "--etcd-prefix {:?}: a key prefix such as /tcpka (a leading /, no trailing /)",
                self.prefix
            )));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(usage("--etcd-cert and --etcd-key go together".into()));
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err(usage(
                "--etcd-user and --etcd-password-file go together".into(),
            ));
        }
        for f in [&self.ca, &self.cert, &self.key, &self.password_file]
            .into_iter()
            .flatten()
        {
            std::fs::metadata(f).map_err(|e| Error::io(format!("reading {}", f.display()), e))?;
        }
        Ok(())
    }

    fn connect_options(&self) -> Result<ConnectOptions, Error> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
        };
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if self.ca.is_some() || self.cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            o = o.with_tls(tls);
        }
        if let (Some(user), Some(file)) = (&self.user, &self.password_file) {
            let password = crate::access::read_password_file(file)?;
            o = o.with_user(user.clone(), password);
        }
        Ok(o)
    }

    /// Connects (and authenticates, when a user is given) to the first
    /// member that answers and has a leader.
    pub async fn connect(&self) -> Result<Client, Error> {
        self.connect_from(0).await.map(|(c, _)| c)
    }

    /// [`EtcdOptions::connect`], trying the members in turn from `first`
    /// (an agent starts where it was last connected); returns which one
    /// answered. One member per client: a request never goes to a member
    /// that has gone away while another answers.
    pub async fn connect_from(&self, first: usize) -> Result<(Client, usize), Error> {
        let options = self.connect_options()?;
        let n = self.endpoints.len();
        let mut why = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            let endpoint = &self.endpoints[i];
            let tried = async {
                let mut c = Client::connect([endpoint], Some(options.clone())).await?;
                let status = c.status().await?;
                Ok::<_, etcd_client::Error>((c, status.leader()))
            };
            match tried.await {
                Ok((c, leader)) if leader != 0 => return Ok((c, i)),
                Ok(_) => why.push(format!("{endpoint}: no leader")),
                Err(e) => why.push(format!(
                    "{endpoint}: {}",
                    crate::one_line(&etcd_error("connecting", e))
                )),
            }
        }
        Err(Error::Io {
            what: format!("no etcd member answers ({})", why.join("; ")),
            source: std::io::ErrorKind::NotConnected.into(),
        })
    }

    pub fn rules_prefix(&self) -> String {
        format!("{}/rules/", self.prefix)
    }

    pub fn rule_key(&self, name: &str) -> String {
        format!("{}/rules/{name}", self.prefix)
    }

    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    pub fn node_key(&self, node: &str) -> String {
        format!("{}/nodes/{node}", self.prefix)
    }

    pub fn known_prefix(&self) -> String {
        format!("{}/known/", self.prefix)
    }

    pub fn known_key(&self, node: &str) -> String {
        format!("{}/known/{node}", self.prefix)
    }
}

/// An etcd failure, in one line.
pub fn etcd_error(what: &str, e: etcd_client::Error) -> Error {
    let why = match &e {
        etcd_client::Error::GRpcStatus(s) if !s.message().is_empty() => {
            format!("{} ({:?})", s.message(), s.code())
        }
        other => other.to_string(),
    };
    Error::Io {
        what: format!("{what}: {why}"),
        source: std::io::ErrorKind::Other.into(),
    }
}

/// Which nodes a rule is for: every node when empty; else a node listed in
/// `nodes` (when given) whose labels include all of `labels` (when given).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Selector {
    /// Whether the rule is for `node` with `labels`, and why (or why not).
    pub fn selects(&self, node: &str, labels: &BTreeMap<String, String>) -> (bool, String) {
        if self.nodes.is_empty() && self.labels.is_empty() {
            return (true, "no selector: every node".into());
        }
        if !self.nodes.is_empty() && !self.nodes.iter().any(|n| n == node) {
            return (false, format!("node {node} is not in {:?}", self.nodes));
        }
        for (k, v) in &self.labels {
            match labels.get(k) {
                Some(have) if have == v => {}
                Some(have) => return (false, format!("label {k}={have}, not {v}")),
                None => return (false, format!("no label {k} (wants {k}={v})")),
            }
        }
        let mut why = Vec::new();
        if !self.nodes.is_empty() {
            why.push(format!("node {node} is listed"));
        }
        if !self.labels.is_empty() {
            let want: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            why.push(format!("labels {} match", want.join(",")));
        }
        (true, why.join(" and "))
    }
}

/// The JSON value of `PREFIX/rules/NAME`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleValue {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    pub idle: i64,
    pub count: i64,
    pub interval: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_timeout_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tracked: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A fleet rule, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetRule {
    pub rule: NamedRule,
    pub selector: Selector,
    pub value: RuleValue,
}

impl FleetRule {
    /// Parses the value of `PREFIX/rules/NAME`. The error says what is
    /// wrong in the value's words.
    pub fn parse(name: &str, value: &[u8]) -> Result<Self, String> {
        if !valid_name(name) || name.len() > FLEET_NAME_MAX {
            return Err(format!(
                "rule name {name:?}: 1 to {FLEET_NAME_MAX} of A-Z a-z 0-9 . _ -"
            ));
        }
        let v: RuleValue = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        for n in &v.nodes {
            if !valid_node(n) {
                return Err(format!("nodes: {n:?} is not a node name"));
            }
        }
        for (k, val) in &v.labels {
            check_label(k, val)?;
        }
        let entry = RuleEntry {
            name: name.to_owned(),
            local_port: v.local_port,
            remote_port: v.remote_port,
            remote: v.remote.clone(),
            idle: v.idle,
            count: v.count,
            interval: v.interval,
            user_timeout_ms: v.user_timeout_ms,
            tracked: v.tracked,
        };
        Ok(Self {
            rule: entry.check()?,
            selector: Selector {
                nodes: v.nodes.clone(),
                labels: v.labels.clone(),
            },
            value: v,
        })
    }
}

/// A node name: 1 to 64 of A-Z a-z 0-9 . _ - (a host name fits).
pub fn valid_node(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A label `KEY=VALUE`: keys and values 1 to 63 of A-Z a-z 0-9 . _ - /.
pub fn check_label(k: &str, v: &str) -> Result<(), String> {
    let ok = |s: &str| {
        (1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
    };
    if ok(k) && ok(v) {
        Ok(())
    } else {
        Err(format!(
            "label {k:?}={v:?}: keys and values are 1 to 63 of A-Z a-z 0-9 . _ - /"
        ))
    }
}

/// Parses `KEY=VALUE`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?}: KEY=VALUE"))?;
    check_label(k, v)?;
    Ok((k.to_owned(), v.to_owned()))
}

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
    pub managed_connections: usize,
    pub timeouts: u64,
    pub resets: u64,
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
        for (name, value, want) in [
            ("x", &br#"{"idle":30,"count":3}"#[..], "interval"),
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
            EtcdOptions::parse_endpoints("http://127.0.0.1:2379, https://[::1]:2379").unwrap(),
            vec!["http://127.0.0.1:2379", "https://[::1]:2379"]
        );
        for bad in ["", "127.0.0.1:2379", "ftp://x:1", "http://", "http://a:1/x"] {
            assert!(EtcdOptions::parse_endpoints(bad).is_err(), "{bad:?}");
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
