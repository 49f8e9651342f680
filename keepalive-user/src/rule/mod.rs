//! Rule matches: what a rule selects, turned into the kernel's LPM key.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use keepalive_common::rules::{
    self, RuleKey, FIELD_LOCAL_PORT, FIELD_REMOTE, FIELD_REMOTE_PORT, PORTS_PREFIX_LEN,
};

use crate::{policy::Policy, InvalidInput};

mod explain;

pub use explain::{best, explain, Explanation, Verdict};

/// An address prefix such as `10.0.0.0/8` or `2001:db8::/32`. A bare
/// address is a host prefix (/32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Builds a prefix; host bits are cleared.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, InvalidInput> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(InvalidInput::Cidr {
                value: format!("{addr}/{len}"),
                reason: "prefix length too long",
            });
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Self { addr, len })
    }

    /// The prefix as IPv6 bits: IPv4 `/n` becomes `::ffff:a.b.c.d/(96+n)`.
    pub fn to_v6(self) -> ([u8; 16], u32) {
        match self.addr {
            IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), 96 + u32::from(self.len)),
            IpAddr::V6(a) => (a.octets(), u32::from(self.len)),
        }
    }

    /// Back from IPv6 bits; IPv4-mapped prefixes of /96 or longer are shown
    /// as IPv4.
    pub fn from_v6(octets: [u8; 16], len: u32) -> Self {
        let a = Ipv6Addr::from(octets);
        match a.to_ipv4_mapped() {
            Some(v4) if len >= 96 => Self {
                addr: IpAddr::V4(v4),
                len: (len - 96) as u8,
            },
            _ => Self {
                addr: IpAddr::V6(a),
                len: len as u8,
            },
        }
    }
}

impl FromStr for Cidr {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| InvalidInput::Cidr {
            value: s.to_owned(),
            reason,
        };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let len = match len {
            Some(l) => l.parse::<u8>().map_err(|_| bad("bad prefix length"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Self::new(addr, len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Which new connections a rule selects. Unset fields match anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleMatch {
    pub local_port: Option<u16>,
    pub remote_port: Option<u16>,
    pub remote: Option<Cidr>,
}

impl RuleMatch {
    /// `FIELD_*` bits of the fields that are set.
    pub fn fields(&self) -> u32 {
        let mut f = 0;
        if self.local_port.is_some() {
            f |= FIELD_LOCAL_PORT;
        }
        if self.remote_port.is_some() {
            f |= FIELD_REMOTE_PORT;
        }
        if self.remote.is_some() {
            f |= FIELD_REMOTE;
        }
        f
    }

    /// The LPM trie key: both ports (0 = any) always fully in the prefix,
    /// then the remote prefix.
    pub fn key(&self) -> (u32, RuleKey) {
        let (addr, len) = self.remote.map_or(([0; 16], 0), Cidr::to_v6);
        (
            PORTS_PREFIX_LEN + len,
            RuleKey {
                local_port: self.local_port.unwrap_or(0),
                remote_port: self.remote_port.unwrap_or(0),
                addr,
            },
        )
    }

    /// Inverse of [`RuleMatch::key`], given the rule's recorded fields.
    pub fn from_key(prefix_len: u32, key: &RuleKey, fields: u32) -> Self {
        Self {
            local_port: (fields & FIELD_LOCAL_PORT != 0).then_some(key.local_port),
            remote_port: (fields & FIELD_REMOTE_PORT != 0).then_some(key.remote_port),
            remote: (fields & FIELD_REMOTE != 0)
                .then(|| Cidr::from_v6(key.addr, prefix_len.saturating_sub(PORTS_PREFIX_LEN))),
        }
    }

    /// The kernel-side value for a rule with this match.
    pub fn value(
        &self,
        id: u32,
        policy: Policy,
        tracked: bool,
        new_only: bool,
    ) -> rules::RuleValue {
        let remote_prefix_len = self.remote.map_or(0, |c| c.to_v6().1);
        rules::RuleValue {
            id,
            fields: self.fields(),
            remote_prefix_len,
            rank: rules::rank(self.fields(), remote_prefix_len),
            policy: policy.to_raw(),
            opts: if tracked { 0 } else { rules::OPT_UNTRACKED }
                | if new_only { rules::OPT_NEW_ONLY } else { 0 },
        }
    }
}

/// A port for a clap argument: 1..=65535.
pub fn parse_port(s: &str) -> Result<u16, InvalidInput> {
    match s.trim().parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(InvalidInput::Port(s.to_owned())),
    }
}

/// A rule as listed: id, match and policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    pub id: u32,
    pub local_port: Option<u16>,
    pub remote_port: Option<u16>,
    pub remote: Option<Cidr>,
    pub idle: u32,
    pub count: u32,
    pub interval: u32,
    pub user_timeout_ms: Option<u32>,
    /// Whether its connections are tracked: listed by `status` and their
    /// timeout, reset or abort reported. An untracked rule only sets the
    /// values, which costs each of its connections the least.
    pub tracked: bool,
    /// Whether only connections established after it get it: a change of
    /// the rule never reaches live connections.
    pub new_only: bool,
    /// The name a configuration file gave it (`tcpka apply`); `None` for a
    /// rule added by hand.
    pub name: Option<String>,
    /// Early-warning thresholds of its tracked connections.
    #[serde(rename = "at_risk")]
    pub risk: crate::risk::Thresholds,
}

impl Rule {
    pub fn new(id: u32, m: RuleMatch, p: Policy, tracked: bool) -> Self {
        Self {
            id,
            local_port: m.local_port,
            remote_port: m.remote_port,
            remote: m.remote,
            idle: p.idle,
            count: p.count,
            interval: p.interval,
            user_timeout_ms: p.user_timeout_ms,
            tracked,
            new_only: false,
            name: None,
            risk: p.risk,
        }
    }
}

impl Rule {
    /// What the rule selects.
    pub fn matcher(&self) -> RuleMatch {
        RuleMatch {
            local_port: self.local_port,
            remote_port: self.remote_port,
            remote: self.remote,
        }
    }

    /// The kernel's precedence value (see `keepalive_common::rules::rank`).
    fn rank(&self) -> u32 {
        let m = self.matcher();
        rules::rank(m.fields(), m.remote.map_or(0, |c| c.to_v6().1))
    }

    /// Why the rule does not match a connection, or `None` when it does.
    fn mismatch(&self, local_port: u16, remote: std::net::SocketAddr) -> Option<String> {
        if let Some(p) = self.local_port.filter(|p| *p != local_port) {
            return Some(format!("local port {local_port} is not {p}"));
        }
        if let Some(p) = self.remote_port.filter(|p| *p != remote.port()) {
            return Some(format!("remote port {} is not {p}", remote.port()));
        }
        if let Some(c) = self.remote {
            let (net, len) = c.to_v6();
            let addr = crate::conn::v6_bytes(remote.ip());
            let inside = (0..16).all(|i| {
                let bits = (len as i32 - 8 * i as i32).clamp(0, 8) as u32;
                let mask = (0xff00u16 >> bits) as u8;
                addr[i] & mask == net[i] & mask
            });
            if !inside {
                return Some(format!("remote address {} is not in {c}", remote.ip()));
            }
        }
        None
    }

    /// The match in `rule add` terms, e.g. `--local-port 5060 --remote 10.0.0.0/8`.
    pub fn describe_match(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.local_port {
            parts.push(format!("--local-port {p}"));
        }
        if let Some(p) = self.remote_port {
            parts.push(format!("--remote-port {p}"));
        }
        if let Some(c) = self.remote {
            parts.push(format!("--remote {c}"));
        }
        if parts.is_empty() {
            "every connection".into()
        } else {
            parts.join(" ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_masks() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!(c.to_v6().1, 104);
        let c: Cidr = "2001:db8::1".parse().unwrap();
        assert_eq!(c.to_string(), "2001:db8::1/128");
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().to_v6().1, 96);
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "1.2.3.4/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr_v6_round_trip() {
        for s in ["10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32", "::/0"] {
            let c: Cidr = s.parse().unwrap();
            let (a, l) = c.to_v6();
            assert_eq!(Cidr::from_v6(a, l), c, "{s}");
        }
    }

    #[test]
    fn match_key_round_trip_and_rank() {
        let m = RuleMatch {
            local_port: Some(5060),
            remote_port: None,
            remote: Some("10.0.0.0/8".parse().unwrap()),
        };
        let (len, key) = m.key();
        assert_eq!(len, 32 + 104);
        assert_eq!(RuleMatch::from_key(len, &key, m.fields()), m);
        let v = m.value(7, Policy::new(1, 2, 3, None).unwrap(), true, false);
        assert_eq!(v.rank, (2 << 8) | 104);
        assert_eq!(v.opts, 0);
        let untracked = m.value(7, Policy::new(1, 2, 3, None).unwrap(), false, false);
        assert_eq!(untracked.opts, rules::OPT_UNTRACKED);
        assert_eq!(
            untracked.rank, v.rank,
            "tracking does not change precedence"
        );
        let any = RuleMatch::default();
        assert_eq!(any.key().0, 32);
        assert_eq!(
            any.value(1, Policy::new(1, 1, 1, None).unwrap(), true, false)
                .rank,
            0
        );
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("5060").unwrap(), 5060);
        for bad in ["0", "65536", "-1", "http", ""] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }
}
