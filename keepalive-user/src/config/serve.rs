//! `tcpka serve`'s settings: one type for its command-line options and
//! its configuration file's `[serve]` table, merged once (an option given
//! on the command line wins); and where the API listens.
//!
//! Each setting is written once, in [`ServeOptions`] (or the groups it
//! flattens, [`KernelOptions`] and [`EtcdSettings`], which `tcpka load` and
//! `tcpka fleet` share): its doc comment is its `--help`, its name the
//! file's key.
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, str::FromStr};

use serde::{Deserialize, Deserializer};

use crate::{
    loader::{parse_map_size, HolderMode, IndexMode, LoadOptions, MapSizes},
    ports::IndexPorts,
};

/// How the kernel side is set up at load: `tcpka load`'s options, and
/// `tcpka serve`'s when it loads.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Deserialize)]
pub struct KernelOptions {
    /// How socket holders are learned [default: scan].
    #[arg(long, value_enum)]
    #[serde(default, deserialize_with = "holders")]
    pub holders: Option<HolderMode>,
    /// Who keeps the connection index [default: ports].
    #[arg(long, value_enum)]
    #[serde(default, deserialize_with = "index")]
    pub index: Option<IndexMode>,
    /// With --index ports: connections with either end on one of these
    /// ports are indexed (comma-separated, or `all` for every connection in
    /// the cgroup, or `` for none) [default: 5060,5061].
    #[arg(long, value_parser = IndexPorts::parse)]
    #[serde(default, deserialize_with = "index_ports")]
    pub index_ports: Option<IndexPorts>,
    /// Report `applied` and `closed` events for the connections rules
    /// match (off: a rule costs each connection no event). Timeouts, resets
    /// and aborts are always reported, and every event of connections
    /// enabled by command.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    #[serde(default)]
    pub rule_events: Option<bool>,
    /// Capacity of the managed-connection table [default: 262144]. Past it,
    /// rules still apply but their connections are not tracked.
    #[arg(long, value_name = "N", value_parser = parse_map_size)]
    #[serde(default, deserialize_with = "max_connections")]
    pub max_connections: Option<u32>,
    /// Capacity of the connection index, in sockets [default: 1048576]. Past
    /// it, commands walk the socket table.
    #[arg(long, value_name = "N", value_parser = parse_map_size)]
    #[serde(default, deserialize_with = "max_indexed")]
    pub max_indexed: Option<u32>,
    /// Capacity of the holder table, holders on all connections together
    /// [default: 131072]. Past it, `enable --holder` is refused.
    #[arg(long, value_name = "N", value_parser = parse_map_size)]
    #[serde(default, deserialize_with = "max_holders")]
    pub max_holders: Option<u32>,
}

impl KernelOptions {
    /// These options over `file`'s: one given here wins.
    pub fn over(self, file: &Self) -> Self {
        Self {
            holders: self.holders.or(file.holders),
            index: self.index.or(file.index),
            index_ports: self.index_ports.or_else(|| file.index_ports.clone()),
            rule_events: self.rule_events.or(file.rule_events),
            max_connections: self.max_connections.or(file.max_connections),
            max_indexed: self.max_indexed.or(file.max_indexed),
            max_holders: self.max_holders.or(file.max_holders),
        }
    }

    /// What the loader is given; defaults for what is not set.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            holders: self.holders.unwrap_or_default(),
            index: self.index,
            index_ports: self.index_ports.clone().unwrap_or_default(),
            rule_events: self.rule_events.unwrap_or(false),
            sizes: MapSizes {
                connections: self.max_connections,
                indexed: self.max_indexed,
                holders: self.max_holders,
            },
        }
    }
}

/// Where etcd is, and how to reach it: `tcpka fleet`'s options, and
/// `tcpka serve`'s to join a fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Deserialize)]
pub struct EtcdSettings {
    /// etcd's members, URL[,URL...]: http://HOST:PORT, or https:// with
    /// --etcd-ca (and --etcd-cert/--etcd-key for client certificates).
    #[arg(long, value_name = "URL[,URL...]", value_parser = etcd_endpoints)]
    #[serde(default, deserialize_with = "etcd")]
    pub etcd: Option<String>,
    /// Key prefix of this fleet [default: /tcpka].
    #[arg(long, value_name = "PREFIX")]
    #[serde(default)]
    pub etcd_prefix: Option<String>,
    /// CA certificate (PEM) of the etcd members.
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM), for members that require one.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    #[serde(default)]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    #[serde(default)]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd auth); the password is read from
    /// --etcd-password-file.
    #[arg(long, value_name = "USER", requires = "etcd_password_file")]
    #[serde(default)]
    pub etcd_user: Option<String>,
    /// File whose first line is the etcd user's password (not readable by
    /// others).
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    #[serde(default)]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdSettings {
    /// These settings over `file`'s: one given here wins.
    pub fn over(self, file: &Self) -> Self {
        Self {
            etcd: self.etcd.or_else(|| file.etcd.clone()),
            etcd_prefix: self.etcd_prefix.or_else(|| file.etcd_prefix.clone()),
            etcd_ca: self.etcd_ca.or_else(|| file.etcd_ca.clone()),
            etcd_cert: self.etcd_cert.or_else(|| file.etcd_cert.clone()),
            etcd_key: self.etcd_key.or_else(|| file.etcd_key.clone()),
            etcd_user: self.etcd_user.or_else(|| file.etcd_user.clone()),
            etcd_password_file: self
                .etcd_password_file
                .or_else(|| file.etcd_password_file.clone()),
        }
    }
}

/// `tcpka serve`'s settings: its options, and the keys of a configuration
/// file's `[serve]` table (the same names, with `_` for `-`). Every one is
/// optional; [`ServeOptions::over`] puts the command line's over the
/// file's. `config`, `token` and `kernel_log` are command-line only.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Deserialize)]
pub struct ServeOptions {
    /// cgroup v2 directory to attach to when not loaded yet [default: the
    /// root of the cgroup v2 mount].
    #[arg(long)]
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// How the kernel side is set up, when serve loads.
    #[command(flatten)]
    #[serde(flatten)]
    pub kernel: KernelOptions,
    /// Configuration file whose named rules are applied at start and on
    /// SIGHUP (`tcpka reload`), and whose [serve] table gives settings
    /// not given here; see `tcpka apply --help`.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Log the kernel programs' decisions (as `tcpka trace` prints them),
    /// at most this detailed: error, warn, info or debug. Off by default:
    /// the programs then test one bit.
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    #[serde(skip)]
    pub kernel_log: Option<log::LevelFilter>,
    /// Log one JSON object per line instead of text.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    #[serde(default)]
    pub json: Option<bool>,
    /// Where the API listens: ADDR:PORT or unix:/path [default:
    /// 127.0.0.1:7077]. A non-loopback address needs --token.
    #[arg(long, value_parser = |s: &str| s.parse::<Listen>())]
    #[serde(default, deserialize_with = "listen")]
    pub listen: Option<Listen>,
    /// Require `Authorization: Bearer TOKEN` (or HTTP Basic with the token
    /// as the password) on every request. Prefer
    /// --token-file or the TCPKA_TOKEN environment variable: an argument
    /// is visible to every local user in `ps`. A TCP listener always has a
    /// token: without one, serve generates one into /run/tcpka/api-token
    /// (another --pin-dir's: /run/tcpka/locks/NAME.token), readable by root
    /// and by --api-group.
    #[arg(long, env = "TCPKA_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub token: Option<String>,
    /// Read the token from FILE (one line; owned by root or by the user
    /// serve runs as, and not readable by others).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Group (name or gid) whose members may use the API besides root: a
    /// unix socket listener is made mode 0660 with this group, and a
    /// generated token file 0640.
    #[arg(long, value_name = "GROUP")]
    #[serde(default)]
    pub api_group: Option<String>,
    /// POST each timeout/reset/closed/aborted event (and gap markers) as
    /// JSON to this URL, http:// or https:// (retried with backoff; a
    /// bounded queue, drops counted in /metrics and reported as a gap).
    #[arg(long, value_name = "URL")]
    #[serde(default)]
    pub webhook: Option<String>,
    /// Sign every webhook request with this secret (the file's first
    /// line): headers X-Tcpka-Timestamp (Unix seconds) and
    /// X-Tcpka-Signature: sha256=HEX, the HMAC-SHA256 of
    /// "TIMESTAMP.BODY". The receiver recomputes it to reject forgeries.
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub webhook_secret_file: Option<PathBuf>,
    /// A token (the file's first line) for the receivers of events that
    /// cannot check an HMAC, such as Kamailio's configuration: sent as
    /// `Authorization: Bearer TOKEN` with every webhook request (loopback
    /// or https only) and as `"token"` in every event over --evapi.
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub events_token_file: Option<PathBuf>,
    /// Also trust the CA certificate(s) in this PEM file for an https://
    /// webhook (the public web's CAs are trusted already).
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub webhook_ca: Option<PathBuf>,
    /// Kamailio's evapi server (HOST:PORT, on this host): tcpka connects,
    /// takes enable/disable commands relayed with evapi_relay() (JSON
    /// netstrings, a command or an array of them; ones that arrive together
    /// are applied together) and
    /// sends events back, into event_route[evapi:message-received].
    /// Reconnects with backoff.
    #[arg(long, value_name = "HOST:PORT")]
    #[serde(default, deserialize_with = "evapi")]
    pub evapi: Option<SocketAddr>,
    /// The user Kamailio runs as (name or uid): tcpka talks only to an
    /// evapi server whose socket belongs to root or to this user
    /// [default: kamailio].
    #[arg(long, value_name = "USER")]
    #[serde(default)]
    pub evapi_user: Option<String>,
    /// The kinds of event sent over --evapi, comma-separated: timeout,
    /// reset, aborted, gap, closed, at_risk, recovered, or all [default:
    /// timeout,reset,aborted,gap,at_risk,recovered: Kamailio sees a
    /// connection close by itself, and with a connection per phone `closed`
    /// is an event per call].
    #[arg(long, value_name = "KINDS", value_delimiter = ',', value_parser = evapi_kind)]
    #[serde(default, deserialize_with = "evapi_events")]
    pub evapi_events: Option<Vec<String>>,
    /// Join a fleet: take the rules under PREFIX/rules/ in etcd that select
    /// this node, keep this node's status at PREFIX/nodes/NODE (see
    /// `tcpka fleet --help`). Enforcement goes on when etcd is away.
    #[command(flatten)]
    #[serde(flatten)]
    pub etcd: EtcdSettings,
    /// This node's name in the fleet [default: the host name].
    #[arg(long, value_name = "NAME", value_parser = node_name)]
    #[serde(default, deserialize_with = "node")]
    pub node: Option<String>,
    /// A label of this node, KEY=VALUE (repeat it), that fleet rules can
    /// select on. In the file: `labels = { KEY = "VALUE" }`; the command
    /// line's are added to the file's.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = crate::node::parse_label)]
    #[serde(default, deserialize_with = "labels")]
    pub labels: Vec<(String, String)>,
    /// Where the fleet rules last applied are kept, to be applied at start
    /// without etcd [default: /var/lib/tcpka/fleet/, one file per
    /// installation].
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub etcd_cache: Option<PathBuf>,
    /// The file's keys that are none of the above.
    #[arg(skip)]
    #[serde(flatten)]
    unknown: BTreeMap<String, Unknown>,
}

impl ServeOptions {
    /// These options (the command line's) over `file`'s `[serve]`: one
    /// given here wins; labels add to the file's. A token given here (or
    /// in TCPKA_TOKEN) wins over the file's token file.
    pub fn over(self, file: &Self) -> Self {
        let mut labels = file.labels.clone();
        labels.extend(self.labels);
        Self {
            cgroup: self.cgroup.or_else(|| file.cgroup.clone()),
            kernel: self.kernel.over(&file.kernel),
            config: self.config,
            kernel_log: self.kernel_log,
            json: self.json.or(file.json),
            listen: self.listen.or_else(|| file.listen.clone()),
            token_file: self
                .token_file
                .or_else(|| file.token_file.clone().filter(|_| self.token.is_none())),
            token: self.token,
            api_group: self.api_group.or_else(|| file.api_group.clone()),
            webhook: self.webhook.or_else(|| file.webhook.clone()),
            webhook_secret_file: self
                .webhook_secret_file
                .or_else(|| file.webhook_secret_file.clone()),
            events_token_file: self
                .events_token_file
                .or_else(|| file.events_token_file.clone()),
            webhook_ca: self.webhook_ca.or_else(|| file.webhook_ca.clone()),
            evapi: self.evapi.or(file.evapi),
            evapi_user: self.evapi_user.or_else(|| file.evapi_user.clone()),
            evapi_events: self.evapi_events.or_else(|| file.evapi_events.clone()),
            etcd: self.etcd.over(&file.etcd),
            node: self.node.or_else(|| file.node.clone()),
            labels,
            etcd_cache: self.etcd_cache.or_else(|| file.etcd_cache.clone()),
            unknown: BTreeMap::new(),
        }
    }

    /// The kinds of event sent over evapi.
    pub fn evapi_kinds(&self) -> Vec<&'static str> {
        match &self.evapi_events {
            // Each was checked when read.
            Some(k) => crate::evapi::parse_events(k).unwrap_or_default(),
            None => crate::evapi::DEFAULT_EVENTS.to_vec(),
        }
    }

    /// The labels, as a map (a later one of a key wins).
    pub fn label_map(&self) -> BTreeMap<String, String> {
        self.labels.iter().cloned().collect()
    }

    /// What a `[serve]` table cannot say, in the file's words: its keys
    /// that are not settings.
    pub(super) fn check_file(&self) -> Result<(), String> {
        match self.unknown.keys().next() {
            Some(k) => Err(format!(
                "unknown field `{k}` (the settings are `tcpka serve`'s options, with _ for -)"
            )),
            None => Ok(()),
        }
    }
}

/// A value the file has under a key that is not a setting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Unknown;

impl<'de> Deserialize<'de> for Unknown {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Unknown)
    }
}

/// A string value parsed with `parse`; its error names the `[serve]` key.
fn parsed<'de, D, T>(
    d: D,
    key: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
{
    let s = String::deserialize(d)?;
    parse(&s)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("[serve] {key}: {e}")))
}

/// A key whose value is parsed from a string.
macro_rules! parsed_key {
    ($name:ident, $t:ty, $parse:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$t>, D::Error> {
            parsed(d, stringify!($name), $parse)
        }
    };
}

/// A key whose value is a table size.
macro_rules! size_key {
    ($name:ident) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
            let n = i64::deserialize(d)?;
            parse_map_size(&n.to_string()).map(Some).map_err(|e| {
                serde::de::Error::custom(format!("[serve] {}: {e}", stringify!($name)))
            })
        }
    };
}

parsed_key!(holders, HolderMode, value_of);
parsed_key!(index, IndexMode, value_of);
parsed_key!(index_ports, IndexPorts, IndexPorts::parse);
parsed_key!(listen, Listen, Listen::from_str);
parsed_key!(evapi, SocketAddr, |a| a.parse::<SocketAddr>().map_err(
    |_| format!("{a:?} is not HOST:PORT (an IP address and a port)")
));
parsed_key!(etcd, String, etcd_endpoints);
parsed_key!(node, String, node_name);
size_key!(max_connections);
size_key!(max_indexed);
size_key!(max_holders);

/// `evapi_events`: a list of kinds, each checked.
fn evapi_events<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let kinds = Vec::<String>::deserialize(d)?;
    crate::evapi::parse_events(&kinds)
        .map_err(|e| serde::de::Error::custom(format!("[serve] evapi_events: {e}")))?;
    Ok(Some(kinds))
}

/// `labels`: a table of KEY = "VALUE", each checked.
fn labels<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    let map = BTreeMap::<String, String>::deserialize(d)?;
    for (k, v) in &map {
        crate::node::check_label(k, v)
            .map_err(|e| serde::de::Error::custom(format!("[serve] labels: {e}")))?;
    }
    Ok(map.into_iter().collect())
}

/// The value named `s`, by the names its `--help` lists (clap's
/// `ValueEnum`, the one place they are written).
fn value_of<T: clap::ValueEnum>(s: &str) -> Result<T, String> {
    T::from_str(s, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| format!("{:?}", p.get_name()))
            .collect();
        format!("{s:?} is not {}", names.join(" or "))
    })
}

fn etcd_endpoints(s: &str) -> Result<String, String> {
    crate::node::parse_etcd_endpoints(s).map(|_| s.to_owned())
}

fn node_name(s: &str) -> Result<String, String> {
    if crate::node::valid_node(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a node name (1 to 64 of A-Z a-z 0-9 . _ -)"
        ))
    }
}

fn evapi_kind(s: &str) -> Result<String, String> {
    crate::evapi::parse_events(&[s]).map(|_| s.trim().to_owned())
}

/// A kernel log level for `--kernel-log`.
pub fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    match s {
        "error" | "warn" | "info" | "debug" => Ok(s.parse().expect("a level name")),
        _ => Err(format!("{s:?} is not error, warn, info or debug")),
    }
}

/// Where the API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for Listen {
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

    #[test]
    fn the_command_line_wins_and_labels_add() {
        let file = ServeOptions {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            token_file: Some("/etc/tcpka/token".into()),
            json: Some(true),
            labels: vec![("role".into(), "edge".into())],
            kernel: KernelOptions {
                max_holders: Some(4096),
                index: Some(IndexMode::Host),
                ..Default::default()
            },
            ..Default::default()
        };
        let cli = ServeOptions {
            listen: Some("127.0.0.1:2".parse().unwrap()),
            json: Some(false),
            labels: vec![("dc".into(), "fra".into())],
            kernel: KernelOptions {
                index: Some(IndexMode::Ports),
                ..Default::default()
            },
            ..Default::default()
        };
        let o = cli.over(&file);
        assert_eq!(o.listen, Some("127.0.0.1:2".parse().unwrap()));
        assert_eq!(o.json, Some(false));
        assert_eq!(o.token_file, file.token_file);
        assert_eq!(o.kernel.index, Some(IndexMode::Ports));
        assert_eq!(o.kernel.max_holders, Some(4096));
        assert_eq!(o.label_map().len(), 2);
        // A token on the command line wins over the file's token file.
        let cli = ServeOptions {
            token: Some("t".repeat(32)),
            ..Default::default()
        };
        assert_eq!(cli.over(&file).token_file, None);
    }

    #[test]
    fn the_help_is_the_files_keys() {
        // Every file key but the flattened groups' is an option of the
        // same name, with - for _.
        let cmd = <ServeOptions as clap::Args>::augment_args(clap::Command::new("serve"));
        for key in [
            "cgroup",
            "holders",
            "index_ports",
            "rule_events",
            "max_connections",
            "listen",
            "token_file",
            "webhook_ca",
            "evapi_events",
            "etcd",
            "etcd_password_file",
            "node",
            "etcd_cache",
        ] {
            let long = key.replace('_', "-");
            assert!(
                cmd.get_arguments()
                    .any(|a| a.get_long() == Some(long.as_str())),
                "--{long}"
            );
        }
    }
}
