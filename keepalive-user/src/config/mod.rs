//! The configuration file (TOML, e.g. `/etc/tcpka/tcpka.toml`): named
//! rules that `tcpka apply FILE` and `tcpka serve --config FILE` (at start
//! and on SIGHUP) bring the installed rules to.
//!
//! ```toml
//! [[rule]]
//! name = "sip-in"          # 1-32 of A-Z a-z 0-9 . _ -
//! local_port = 5060        # optional, like remote_port and remote
//! idle = 60
//! count = 5
//! interval = 5
//! user_timeout_ms = 20000  # optional
//! tracked = true           # optional; `rule add --tracked` (default false)
//! ```
//!
//! Rules are matched by name: the file adds, changes and removes the named
//! rules it manages; rules added by hand (without a name) are left alone.
//!
//! `tcpka serve --config` also takes its settings from the `[serve]` table
//! (any of them; a command-line option wins over the file):
//!
//! ```toml
//! [serve]
//! listen = "127.0.0.1:7077"            # or "unix:/run/tcpka/api.sock"
//! token_file = "/etc/tcpka/api-token"
//! api_group = "tcpka"
//! webhook = "https://controller.example/tcpka"
//! webhook_secret_file = "/etc/tcpka/webhook-secret"
//! events_token_file = "/etc/tcpka/events-token"  # webhook Bearer, evapi "token"
//! evapi = "127.0.0.1:8448"              # Kamailio's evapi server
//! evapi_user = "kamailio"
//! evapi_events = ["timeout", "reset", "aborted", "gap"]   # or ["all"]
//! webhook_ca = "/etc/tcpka/controller-ca.pem"
//! json = false                         # log events as JSON lines
//! cgroup = "/sys/fs/cgroup/system.slice/kamailio.service"
//! holders = "scan"                     # or "syscalls"
//! index = "ports"                      # or "host"
//! index_ports = "5060,5061"            # or "all", or ""
//! rule_events = false
//! max_connections = 262144            # table sizes, at load
//! max_indexed = 1048576
//! max_holders = 131072
//! etcd = "http://10.0.0.1:2379,http://10.0.0.2:2379"   # join a fleet
//! etcd_prefix = "/tcpka"
//! node = "edge-1"                      # default: the host name
//! labels = { role = "edge" }
//! etcd_ca = "/etc/tcpka/etcd-ca.pem"   # and etcd_cert, etcd_key
//! etcd_user = "tcpka"                  # and etcd_password_file
//! etcd_cache = "/var/lib/tcpka/fleet/edge-1.json"
//! ```
use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;

use crate::{
    policy::Policy,
    rule::{parse_port, Cidr, RuleMatch},
    InvalidInput,
};

mod plan;
mod serve;

pub use plan::{file_rules, plan, plan_owned, Step};
pub use serve::{parse_level, EtcdSettings, KernelOptions, Listen, ServeOptions};

/// Named rules from the fleet (etcd) carry this prefix in the kernel: a
/// file's name cannot start with it, and files never change or remove them.
pub const FLEET_PREFIX: &str = "@";

/// Longest rule name, in bytes.
pub const NAME_MAX: usize = 32;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<toml::Spanned<RuleSpec>>,
    serve: Option<toml::Spanned<ServeOptions>>,
}

/// A rule as written, in a file's `[[rule]]` tables and in the fleet's etcd
/// values (`PREFIX/rules/NAME`): one type for both, so that a field means
/// the same in each. A file's rule has a `name` and no selector; a fleet
/// rule's name is its key, and `nodes` and `labels` select the nodes it is
/// for. [`RuleSpec::check`] and [`RuleSpec::for_file`] say which is which.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
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
    /// Early-warning thresholds, as `rule add --at-risk` takes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_risk: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tracked: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new_only: bool,
    /// Fleet rules only: the nodes it is for (every node when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Fleet rules only: the labels a node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl RuleSpec {
    /// The rule as a file's rule: it has a name and no selector.
    fn for_file(&self) -> Result<NamedRule, String> {
        let Some(name) = &self.name else {
            return Err("missing field `name`".into());
        };
        if !self.nodes.is_empty() || !self.labels.is_empty() {
            return Err(format!(
                "rule {name:?}: nodes and labels select the nodes of a fleet rule \
                 (`tcpka fleet rule add`); a file's rules are for this host"
            ));
        }
        self.check(name)
    }

    /// The rule named `name`, checked: its values in range, its match well
    /// formed. The error is in the written words (lower-case fields).
    /// Neither the name nor the selector is checked here.
    pub fn check(&self, name: &str) -> Result<NamedRule, String> {
        let port = |p: Option<i64>| -> Result<Option<u16>, InvalidInput> {
            p.map(|p| parse_port(&p.to_string())).transpose()
        };
        let num = |what: &'static str, v: i64| -> Result<u32, InvalidInput> {
            u32::try_from(v).map_err(|_| InvalidInput::OutOfRange {
                what,
                value: v,
                min: 0,
                max: u32::MAX.into(),
            })
        };
        (|| -> Result<NamedRule, InvalidInput> {
            let matcher = RuleMatch {
                local_port: port(self.local_port)?,
                remote_port: port(self.remote_port)?,
                remote: self.remote.as_deref().map(str::parse::<Cidr>).transpose()?,
            };
            let policy = Policy::new(
                num("idle", self.idle)?,
                num("count", self.count)?,
                num("interval", self.interval)?,
                self.user_timeout_ms
                    .map(|v| num("user_timeout_ms", v))
                    .transpose()?,
            )?
            .with_risk(
                self.at_risk
                    .as_deref()
                    .map(crate::risk::Thresholds::parse)
                    .transpose()?
                    .unwrap_or_default(),
            );
            Ok(NamedRule {
                name: name.to_owned(),
                matcher,
                policy,
                tracked: self.tracked,
                new_only: self.new_only,
            })
        })()
        .map_err(field_words)
    }
}

/// A rule of the file, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedRule {
    pub name: String,
    pub matcher: RuleMatch,
    pub policy: Policy,
    pub tracked: bool,
    /// Only new connections get it: its changes never reach live ones.
    pub new_only: bool,
}

/// The validated configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub rules: Vec<NamedRule>,
    /// The `[serve]` table (its keys are `serve`'s options).
    pub serve: ServeOptions,
}

/// Whether `name` can name a rule.
pub fn valid_name(name: &str) -> bool {
    (1..=NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Config {
    /// Reads and validates a file; any error names the file and line.
    pub fn load(path: &Path) -> Result<Self, crate::Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::Error::io(format!("reading {}", path.display()), e))?;
        Ok(Self::parse(&text, &path.display().to_string())?)
    }

    /// Parses and validates the text of a file called `origin`.
    pub fn parse(text: &str, origin: &str) -> Result<Self, InvalidInput> {
        let err = |line: usize, reason: String| InvalidInput::Config {
            path: origin.to_owned(),
            line,
            reason,
        };
        let file: File = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            err(line, one_line_message(e.message()))
        })?;
        let serve = match file.serve {
            None => ServeOptions::default(),
            Some(s) => {
                let line = line_of(text, s.span().start);
                let s = s.into_inner();
                s.check_file()
                    .map_err(|reason| err(line, format!("[serve] {reason}")))?;
                s
            }
        };
        let mut rules = Vec::new();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut keys: BTreeMap<(u32, Vec<u8>), (String, usize)> = BTreeMap::new();
        for spanned in file.rule {
            let line = line_of(text, spanned.span().start);
            let r = spanned.into_inner();
            let name = r.name.clone().unwrap_or_default();
            let what = format!("rule {name:?}");
            if r.name.is_none() {
                return Err(err(line, "rule: missing field `name`".into()));
            }
            if !valid_name(&name) {
                return Err(err(
                    line,
                    format!("{what}: a name is 1 to {NAME_MAX} of A-Z a-z 0-9 . _ -"),
                ));
            }
            if let Some(first) = names.insert(name.clone(), line) {
                return Err(err(line, format!("{what} is also on line {first}")));
            }
            let checked = r.for_file().map_err(|reason| {
                err(
                    line,
                    if reason.starts_with(&what) {
                        reason
                    } else {
                        format!("{what}: {reason}")
                    },
                )
            })?;
            let (len, key) = checked.matcher.key();
            let key = (len, bytes_of(&key));
            if let Some((other, at)) = keys.insert(key, (name.clone(), line)) {
                return Err(err(
                    line,
                    format!("{what} has the same match as rule {other:?} on line {at}"),
                ));
            }
            rules.push(checked);
        }
        Ok(Self { rules, serve })
    }
}

/// A parser's message on one line: TOML's syntax errors come on several
/// ("invalid table header\nexpected `.`, `]]`").
fn one_line_message(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A value error in the file's words: its fields are lower case.
fn field_words(e: InvalidInput) -> String {
    match e {
        InvalidInput::OutOfRange {
            what,
            value,
            min,
            max,
        } => {
            let field = match what {
                "user timeout (ms)" => "user_timeout_ms".to_owned(),
                w => w.to_lowercase(),
            };
            format!("{field} must be in {min}..={max}, got {value}")
        }
        other => other.to_string(),
    }
}

fn bytes_of(key: &keepalive_common::rules::RuleKey) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&key.local_port.to_ne_bytes());
    v.extend_from_slice(&key.remote_port.to_ne_bytes());
    v.extend_from_slice(&key.addr);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
# SIP over TCP and TLS
[[rule]]
name = "sip-in"
local_port = 5060
idle = 60
count = 5
interval = 5
tracked = true

[[rule]]
name = "trunk.1"
remote = "10.0.0.0/8"
remote_port = 5061
idle = 30
count = 3
interval = 10
user_timeout_ms = 20000
"#;

    fn err_of(text: &str) -> String {
        Config::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn parses_named_rules() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.rules.len(), 2);
        assert_eq!(c.rules[0].name, "sip-in");
        assert_eq!(c.rules[0].matcher.local_port, Some(5060));
        assert!(c.rules[0].tracked);
        assert_eq!(c.rules[1].policy.user_timeout_ms, Some(20000));
        assert!(!c.rules[1].tracked);
        assert_eq!(Config::parse("", "t.toml").unwrap(), Config::default());
    }

    #[test]
    fn a_rule_has_its_early_warning_thresholds() {
        let c = Config::parse(
            "[[rule]]\nname = \"trunk\"\nremote_port = 5060\nidle = 30\ncount = 3\n\
             interval = 5\ntracked = true\nat_risk = \"probe=800ms,retrans=off\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            c.rules[0].policy.risk.to_string(),
            "probe=800ms,retrans=off"
        );
        let e = err_of(
            "[[rule]]\nname = \"trunk\"\nidle = 30\ncount = 3\ninterval = 5\nat_risk = \"probe=soon\"\n",
        );
        assert!(e.contains("at-risk") && e.contains("probe"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn the_packaged_file_is_valid() {
        let c = Config::parse(include_str!("../../../contrib/tcpka.toml"), "tcpka.toml").unwrap();
        assert_eq!(c, Config::default(), "every example in it is commented out");
        // Its examples, uncommented, are valid too.
        let text: String = include_str!("../../../contrib/tcpka.toml")
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&text, "examples").unwrap();
        assert_eq!(c.rules.len(), 2);
        assert!(
            c.serve.listen.is_some()
                && c.serve.kernel.index_ports.is_some()
                && c.serve.evapi.is_some()
        );
    }

    #[test]
    fn serve_settings_are_checked() {
        let c = Config::parse(
            "[serve]\nlisten = \"unix:/run/tcpka/api.sock\"\nindex = \"ports\"\nindex_ports = \"5060,5080\"\nholders = \"scan\"\nrule_events = true\n",
            "t.toml",
        )
        .unwrap();
        assert!(matches!(c.serve.listen, Some(Listen::Unix(_))));
        assert_eq!(c.serve.kernel.index, Some(crate::loader::IndexMode::Ports));
        assert_eq!(c.serve.kernel.index_ports.unwrap().to_string(), "5060,5080");
        assert_eq!(c.serve.kernel.rule_events, Some(true));
        let e = err_of("\n[serve]\nindex = \"everything\"\n");
        assert!(
            e.starts_with("t.toml:2: [serve] index: \"everything\""),
            "{e}"
        );
        // A key of the table's own: its line; one of a group it shares
        // with `load` or `fleet` (index, etcd...): the table's.
        let e = err_of("[serve]\nlisten = \"nowhere\"\n");
        assert!(e.starts_with("t.toml:2: [serve] listen:"), "{e}");
        let e = err_of("[serve]\nindex_ports = \"0\"\n");
        assert!(e.starts_with("t.toml:1: [serve] index_ports:"), "{e}");
        let e = err_of("[serve]\nport = 1\n");
        assert!(e.contains("unknown field `port`"), "{e}");
        let c = Config::parse(
            "[serve]\nevapi_events = [\"timeout\", \"closed\"]\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.serve.evapi_kinds(), ["timeout", "closed"]);
        let e = err_of("[serve]\nevapi_events = [\"closing\"]\n");
        assert!(e.contains("evapi_events") && e.contains("closing"), "{e}");
    }

    #[test]
    fn fleet_settings_are_checked() {
        let c = Config::parse(
            "[serve]\netcd = \"http://10.0.0.1:2379,http://10.0.0.2:2379\"\nnode = \"edge-1\"\nlabels = { role = \"edge\", dc = \"fra\" }\n",
            "t.toml",
        )
        .unwrap();
        let f = &c.serve;
        assert_eq!(
            f.etcd.etcd.as_deref(),
            Some("http://10.0.0.1:2379,http://10.0.0.2:2379")
        );
        assert_eq!(f.node.as_deref(), Some("edge-1"));
        assert_eq!(f.label_map()["dc"], "fra");
        for (text, want) in [
            ("[serve]\netcd = \"10.0.0.1:2379\"\n", "1: [serve] etcd:"),
            ("[serve]\nnode = \"a b\"\n", "2: [serve] node:"),
            ("[serve]\nlabels = { role = \"\" }\n", "2: [serve] labels:"),
        ] {
            let e = err_of(text);
            assert!(e.starts_with(&format!("t.toml:{want}")), "{e}");
        }
    }

    #[test]
    fn errors_name_the_line_and_reason() {
        let e = err_of("[[rule]]\nname = \"a\"\nidle = 0\ncount = 1\ninterval = 1\n");
        assert!(
            e.starts_with("t.toml:1: rule \"a\": idle must be in"),
            "{e}"
        );
        let e = err_of(
            "[[rule]]\nname = \"a\"\nidle = 1\ncount = 1\ninterval = 1\nlocal_port = 70000\n",
        );
        assert!(e.contains("t.toml:1:") && e.contains("70000"), "{e}");
        let e = err_of("\n\n[[rule]]\nname = \"a b\"\nidle = 1\ncount = 1\ninterval = 1\n");
        assert!(e.starts_with("t.toml:3: rule \"a b\": a name is"), "{e}");
        let e = err_of("[[rule]]\nname = \"a\"\nidle = 1\ncount = 1\ninterval = 1\ncolour = 1\n");
        assert!(
            e.starts_with("t.toml:6:") && e.contains("unknown field"),
            "{e}"
        );
        let e = err_of("[[rule]]\nname = \"a\"\nidle = 1\n");
        assert!(e.contains("missing field `count`"), "{e}");
        let e = err_of("\n[[rule]]\nidle = 1\ncount = 1\ninterval = 1\n");
        assert!(e.starts_with("t.toml:2: rule: missing field `name`"), "{e}");
        let e =
            err_of("[[rule]]\nname = \"a\"\nidle = 1\ncount = 1\ninterval = 1\nnodes = [\"n1\"]\n");
        assert!(
            e.starts_with(
                "t.toml:1: rule \"a\": nodes and labels select the nodes of a fleet rule"
            ),
            "{e}"
        );
        let e = err_of("[[rule\n");
        assert!(e.starts_with("t.toml:1:"), "{e}");
        assert!(!e.contains('\n'), "one line: {e:?}");
        let two = "[[rule]]\nname = \"a\"\nidle = 1\ncount = 1\ninterval = 1\n";
        let e = err_of(&format!("{two}{two}"));
        assert!(
            e.starts_with("t.toml:6: rule \"a\" is also on line 1"),
            "{e}"
        );
        let e = err_of(&format!("{two}{}", two.replace("\"a\"", "\"b\"")));
        assert!(e.contains("same match as rule \"a\" on line 1"), "{e}");
        let e = err_of("[[rule]]\nname = \"a\"\nidle = -1\ncount = 1\ninterval = 1\n");
        assert!(e.contains("idle must be in"), "{e}");
    }
}
