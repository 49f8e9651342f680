//! The `[serve]` table: `tcpka serve`'s settings, checked; and where the
//! API listens.
use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServeEntry {
    listen: Option<String>,
    token_file: Option<PathBuf>,
    api_group: Option<String>,
    webhook: Option<String>,
    webhook_secret_file: Option<PathBuf>,
    events_token_file: Option<PathBuf>,
    webhook_ca: Option<PathBuf>,
    evapi: Option<String>,
    evapi_user: Option<String>,
    evapi_events: Option<Vec<String>>,
    json: Option<bool>,
    cgroup: Option<PathBuf>,
    holders: Option<String>,
    index: Option<String>,
    index_ports: Option<String>,
    rule_events: Option<bool>,
    max_connections: Option<i64>,
    max_indexed: Option<i64>,
    max_holders: Option<i64>,
    etcd: Option<String>,
    etcd_prefix: Option<String>,
    node: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password_file: Option<PathBuf>,
    etcd_cache: Option<PathBuf>,
}

/// The `[serve]` table's fleet settings (`tcpka serve --etcd`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetSettings {
    pub etcd: Option<Vec<String>>,
    pub etcd_prefix: Option<String>,
    pub node: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
    pub etcd_cache: Option<PathBuf>,
}

/// The `[serve]` table, validated: each setting the file gives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServeSettings {
    pub listen: Option<Listen>,
    pub token_file: Option<PathBuf>,
    pub api_group: Option<String>,
    pub webhook: Option<String>,
    pub webhook_secret_file: Option<PathBuf>,
    pub events_token_file: Option<PathBuf>,
    pub webhook_ca: Option<PathBuf>,
    pub evapi: Option<SocketAddr>,
    pub evapi_user: Option<String>,
    /// The kinds of event sent over evapi.
    pub evapi_events: Option<Vec<&'static str>>,
    pub json: Option<bool>,
    pub cgroup: Option<PathBuf>,
    pub holders: Option<crate::loader::HolderMode>,
    pub index: Option<crate::loader::IndexMode>,
    pub index_ports: Option<crate::ports::IndexPorts>,
    pub rule_events: Option<bool>,
    pub sizes: crate::loader::MapSizes,
    pub fleet: FleetSettings,
}

impl ServeEntry {
    pub(super) fn check(self) -> Result<ServeSettings, String> {
        use crate::loader::{HolderMode, IndexMode};
        let listen = self
            .listen
            .map(|l| l.parse::<Listen>())
            .transpose()
            .map_err(|e| format!("listen: {e}"))?;
        let holders = match self.holders.as_deref() {
            None => None,
            Some("scan") => Some(HolderMode::Scan),
            Some("syscalls") => Some(HolderMode::Syscalls),
            Some(o) => return Err(format!("holders: {o:?} is not \"scan\" or \"syscalls\"")),
        };
        let index = match self.index.as_deref() {
            None => None,
            Some("ports") => Some(IndexMode::Ports),
            Some("host") => Some(IndexMode::Host),
            Some(o) => return Err(format!("index: {o:?} is not \"ports\" or \"host\"")),
        };
        let index_ports = self
            .index_ports
            .map(|p| crate::ports::IndexPorts::parse(&p))
            .transpose()
            .map_err(|e| format!("index_ports: {e}"))?;
        let size = |what: &str, v: Option<i64>| {
            v.map(|n| crate::loader::parse_map_size(&n.to_string()))
                .transpose()
                .map_err(|e| format!("{what}: {e}"))
        };
        let evapi = self
            .evapi
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|_| {
                    format!("evapi: {a:?} is not HOST:PORT (an IP address and a port)")
                })
            })
            .transpose()?;
        let sizes = crate::loader::MapSizes {
            connections: size("max_connections", self.max_connections)?,
            indexed: size("max_indexed", self.max_indexed)?,
            holders: size("max_holders", self.max_holders)?,
        };
        let etcd = self
            .etcd
            .as_deref()
            .map(crate::node::parse_etcd_endpoints)
            .transpose()
            .map_err(|e| format!("etcd: {e}"))?;
        if let Some(n) = self.node.as_deref().filter(|n| !crate::node::valid_node(n)) {
            return Err(format!(
                "node: {n:?} is not a node name (1 to 64 of A-Z a-z 0-9 . _ -)"
            ));
        }
        for (k, v) in &self.labels {
            crate::node::check_label(k, v).map_err(|e| format!("labels: {e}"))?;
        }
        let fleet = FleetSettings {
            etcd,
            etcd_prefix: self.etcd_prefix,
            node: self.node,
            labels: self.labels,
            etcd_ca: self.etcd_ca,
            etcd_cert: self.etcd_cert,
            etcd_key: self.etcd_key,
            etcd_user: self.etcd_user,
            etcd_password_file: self.etcd_password_file,
            etcd_cache: self.etcd_cache,
        };
        Ok(ServeSettings {
            fleet,
            listen,
            token_file: self.token_file,
            api_group: self.api_group,
            webhook: self.webhook,
            webhook_secret_file: self.webhook_secret_file,
            events_token_file: self.events_token_file,
            webhook_ca: self.webhook_ca,
            evapi,
            evapi_user: self.evapi_user,
            evapi_events: self
                .evapi_events
                .map(|k| crate::evapi::parse_events(&k).map_err(|e| format!("evapi_events: {e}")))
                .transpose()?,
            json: self.json,
            cgroup: self.cgroup,
            holders,
            index,
            index_ports,
            rule_events: self.rule_events,
            sizes,
        })
    }
}

/// Where the API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Listen::Unix(path.into()));
        }
        s.parse()
            .map(Listen::Tcp)
            .map_err(|_| format!("{s:?} is not ADDR:PORT or unix:/path"))
    }
}

impl Listen {
    /// Whether only this host can connect.
    pub fn is_local(&self) -> bool {
        match self {
            Listen::Tcp(a) => a.ip().is_loopback(),
            Listen::Unix(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "127.0.0.1:7077".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:7077".parse().unwrap())
        );
        assert!("127.0.0.1:7077".parse::<Listen>().unwrap().is_local());
        assert!(!"0.0.0.0:7077".parse::<Listen>().unwrap().is_local());
        assert!("unix:/run/tcpka.sock".parse::<Listen>().unwrap().is_local());
        for bad in ["unix:", "localhost:7077", "7077", ""] {
            assert!(bad.parse::<Listen>().is_err(), "{bad:?}");
        }
    }
}
