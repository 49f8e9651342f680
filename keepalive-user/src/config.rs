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
//! ```
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    policy::Policy,
    rule::{parse_port, Cidr, Rule, RuleMatch},
    InvalidInput,
};

/// Longest rule name, in bytes.
pub const NAME_MAX: usize = 32;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<toml::Spanned<RuleEntry>>,
    serve: Option<toml::Spanned<ServeEntry>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeEntry {
    listen: Option<String>,
    token_file: Option<PathBuf>,
    api_group: Option<String>,
    webhook: Option<String>,
    webhook_secret_file: Option<PathBuf>,
    events_token_file: Option<PathBuf>,
    webhook_ca: Option<PathBuf>,
    evapi: Option<String>,
    evapi_user: Option<String>,
    json: Option<bool>,
    cgroup: Option<PathBuf>,
    holders: Option<String>,
    index: Option<String>,
    index_ports: Option<String>,
    rule_events: Option<bool>,
    max_connections: Option<i64>,
    max_indexed: Option<i64>,
    max_holders: Option<i64>,
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
    pub json: Option<bool>,
    pub cgroup: Option<PathBuf>,
    pub holders: Option<crate::loader::HolderMode>,
    pub index: Option<crate::loader::IndexMode>,
    pub index_ports: Option<crate::ports::IndexPorts>,
    pub rule_events: Option<bool>,
    pub sizes: crate::loader::MapSizes,
}

impl ServeEntry {
    fn check(self) -> Result<ServeSettings, String> {
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
        Ok(ServeSettings {
            listen,
            token_file: self.token_file,
            api_group: self.api_group,
            webhook: self.webhook,
            webhook_secret_file: self.webhook_secret_file,
            events_token_file: self.events_token_file,
            webhook_ca: self.webhook_ca,
            evapi,
            evapi_user: self.evapi_user,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    name: String,
    local_port: Option<i64>,
    remote_port: Option<i64>,
    remote: Option<String>,
    idle: i64,
    count: i64,
    interval: i64,
    user_timeout_ms: Option<i64>,
    #[serde(default)]
    tracked: bool,
}

/// A rule of the file, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedRule {
    pub name: String,
    pub matcher: RuleMatch,
    pub policy: Policy,
    pub tracked: bool,
}

/// The validated configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub rules: Vec<NamedRule>,
    pub serve: ServeSettings,
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
            err(line, e.message().to_owned())
        })?;
        let serve = match file.serve {
            None => ServeSettings::default(),
            Some(s) => {
                let line = line_of(text, s.span().start);
                s.into_inner()
                    .check()
                    .map_err(|reason| err(line, format!("[serve] {reason}")))?
            }
        };
        let mut rules = Vec::new();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut keys: BTreeMap<(u32, Vec<u8>), (String, usize)> = BTreeMap::new();
        for spanned in file.rule {
            let line = line_of(text, spanned.span().start);
            let r = spanned.into_inner();
            let what = format!("rule {:?}", r.name);
            if !valid_name(&r.name) {
                return Err(err(
                    line,
                    format!("{what}: a name is 1 to {NAME_MAX} of A-Z a-z 0-9 . _ -"),
                ));
            }
            if let Some(first) = names.insert(r.name.clone(), line) {
                return Err(err(line, format!("{what} is also on line {first}")));
            }
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
            let checked = (|| -> Result<NamedRule, InvalidInput> {
                let matcher = RuleMatch {
                    local_port: port(r.local_port)?,
                    remote_port: port(r.remote_port)?,
                    remote: r.remote.as_deref().map(str::parse::<Cidr>).transpose()?,
                };
                let policy = Policy::new(
                    num("idle", r.idle)?,
                    num("count", r.count)?,
                    num("interval", r.interval)?,
                    r.user_timeout_ms
                        .map(|v| num("user_timeout_ms", v))
                        .transpose()?,
                )?;
                Ok(NamedRule {
                    name: r.name.clone(),
                    matcher,
                    policy,
                    tracked: r.tracked,
                })
            })()
            .map_err(|e| err(line, format!("{what}: {}", field_words(e))))?;
            let (len, key) = checked.matcher.key();
            let key = (len, bytes_of(&key));
            if let Some((other, at)) = keys.insert(key, (r.name.clone(), line)) {
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

/// One step of bringing the installed rules to the file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Step {
    /// A named rule the file has and the kernel not.
    Add { rule: Rule },
    /// A named rule whose match, values or tracking differ.
    Change { from: Rule, to: Rule },
    /// A named rule the file no longer has.
    Remove { rule: Rule },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |r: &Rule| {
            format!(
                "{} idle {} count {} interval {}{}{}",
                r.describe_match(),
                r.idle,
                r.count,
                r.interval,
                r.user_timeout_ms
                    .map(|ms| format!(" user-timeout {ms}"))
                    .unwrap_or_default(),
                if r.tracked { " tracked" } else { "" }
            )
        };
        let name = |r: &Rule| r.name.clone().unwrap_or_default();
        match self {
            Step::Add { rule } => write!(f, "+ {}: {}", name(rule), show(rule)),
            Step::Change { from, to } => {
                write!(f, "~ {}: {} -> {}", name(to), show(from), show(to))
            }
            Step::Remove { rule } => write!(f, "- {}: {}", name(rule), show(rule)),
        }
    }
}

/// What to do so that the installed rules' named part equals `wanted`:
/// rules without a name (added by hand) are not touched. Fails, changing
/// nothing, when a wanted rule has the match of a rule added by hand.
pub fn plan(installed: &[Rule], wanted: &Config) -> Result<Vec<Step>, String> {
    let to_rule = |w: &NamedRule, id: u32| {
        let mut r = Rule::new(id, w.matcher, w.policy, w.tracked);
        r.name = Some(w.name.clone());
        r
    };
    let mut steps = Vec::new();
    for w in &wanted.rules {
        let current = installed
            .iter()
            .find(|r| r.name.as_deref() == Some(&w.name));
        if let Some(by_hand) = installed
            .iter()
            .find(|r| r.name.is_none() && r.matcher() == w.matcher)
        {
            return Err(format!(
                "rule {:?} has the match of rule {} ({}), added by hand: delete that one first (`tcpka rule del {}`)",
                w.name,
                by_hand.id,
                by_hand.describe_match(),
                by_hand.id
            ));
        }
        match current {
            None => steps.push(Step::Add {
                rule: to_rule(w, 0),
            }),
            Some(c) => {
                let want = to_rule(w, c.id);
                if *c != want {
                    steps.push(Step::Change {
                        from: c.clone(),
                        to: want,
                    });
                }
            }
        }
    }
    for r in installed {
        if let Some(name) = &r.name {
            if !wanted.rules.iter().any(|w| &w.name == name) {
                steps.push(Step::Remove { rule: r.clone() });
            }
        }
    }
    Ok(steps)
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
    fn the_packaged_file_is_valid() {
        let c = Config::parse(include_str!("../../contrib/tcpka.toml"), "tcpka.toml").unwrap();
        assert_eq!(c, Config::default(), "every example in it is commented out");
        // Its examples, uncommented, are valid too.
        let text: String = include_str!("../../contrib/tcpka.toml")
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&text, "examples").unwrap();
        assert_eq!(c.rules.len(), 2);
        assert!(
            c.serve.listen.is_some() && c.serve.index_ports.is_some() && c.serve.evapi.is_some()
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
        assert_eq!(c.serve.index, Some(crate::loader::IndexMode::Ports));
        assert_eq!(c.serve.index_ports.unwrap().to_string(), "5060,5080");
        assert_eq!(c.serve.rule_events, Some(true));
        let e = err_of("\n[serve]\nindex = \"everything\"\n");
        assert!(
            e.starts_with("t.toml:2: [serve] index: \"everything\""),
            "{e}"
        );
        let e = err_of("[serve]\nlisten = \"nowhere\"\n");
        assert!(e.starts_with("t.toml:1: [serve] listen:"), "{e}");
        let e = err_of("[serve]\nindex_ports = \"0\"\n");
        assert!(e.starts_with("t.toml:1: [serve] index_ports:"), "{e}");
        let e = err_of("[serve]\nport = 1\n");
        assert!(e.contains("unknown field `port`"), "{e}");
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
        let e = err_of("[[rule\n");
        assert!(e.starts_with("t.toml:1:"), "{e}");
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

    fn installed(id: u32, name: Option<&str>, lp: u16, idle: u32) -> Rule {
        let m = RuleMatch {
            local_port: Some(lp),
            ..Default::default()
        };
        let mut r = Rule::new(id, m, Policy::new(idle, 5, 5, None).unwrap(), false);
        r.name = name.map(str::to_owned);
        r
    }

    #[test]
    fn plan_adds_changes_removes_by_name_and_keeps_hand_rules() {
        let wanted = Config::parse(
            "[[rule]]\nname = \"keep\"\nlocal_port = 1\nidle = 60\ncount = 5\ninterval = 5\n\
             [[rule]]\nname = \"change\"\nlocal_port = 2\nidle = 61\ncount = 5\ninterval = 5\n\
             [[rule]]\nname = \"new\"\nlocal_port = 3\nidle = 60\ncount = 5\ninterval = 5\n",
            "t.toml",
        )
        .unwrap();
        let have = [
            installed(1, Some("keep"), 1, 60),
            installed(2, Some("change"), 2, 60),
            installed(3, Some("gone"), 4, 60),
            installed(4, None, 5, 60),
        ];
        let steps = plan(&have, &wanted).unwrap();
        let shown: Vec<String> = steps.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "~ change: --local-port 2 idle 60 count 5 interval 5 -> --local-port 2 idle 61 count 5 interval 5",
                "+ new: --local-port 3 idle 60 count 5 interval 5",
                "- gone: --local-port 4 idle 60 count 5 interval 5",
            ]
        );
        // Applied, nothing is left to do.
        let after = [
            installed(1, Some("keep"), 1, 60),
            installed(2, Some("change"), 2, 61),
            installed(5, Some("new"), 3, 60),
            installed(4, None, 5, 60),
        ];
        assert_eq!(plan(&after, &wanted).unwrap(), []);
        // A wanted rule with the match of a hand-made one is refused.
        let clash = [installed(9, None, 3, 60)];
        let e = plan(&clash, &wanted).unwrap_err();
        assert!(e.contains("rule \"new\" has the match of rule 9"), "{e}");
    }

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
