//! The one place that turns a connection name into what the kernel matches:
//! `10.0.0.2:5060`, `[2001:db8::1]:5061`, `tcp:…`/`tls:…`/`ws:…`/`wss:…`,
//! `sip:10.0.0.2:5060;transport=tcp`, `cookie:0x2a`. Every front end (CLI,
//! HTTP API, tests) uses it.
use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use keepalive_common::requests::PeerKey;

use crate::InvalidInput;

/// Which connections a command is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnSpec {
    /// Every local socket whose remote end is this endpoint.
    Peer(SocketAddr),
    /// One socket, by its cookie (SO_COOKIE, `ss -e` `sk:`).
    Cookie(u64),
}

/// Errors name the input and what is wrong with it.
fn bad(value: &str, reason: &'static str) -> InvalidInput {
    InvalidInput::Conn {
        value: value.to_owned(),
        reason,
    }
}

/// Why an IPv6 zone id is refused rather than dropped.
const ZONE: &str = "IPv6 zone ids (%...) are not supported: connections are matched by address and port; narrow with --local or --netns";

/// Parses `IP:PORT` or `[IPv6]:PORT`, with the port in 1..=65535.
pub fn parse_endpoint(s: &str) -> Result<SocketAddr, InvalidInput> {
    if s.contains('%') {
        return Err(bad(s, ZONE));
    }
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| bad(s, "expected IP:PORT or [IPv6]:PORT"))?;
    if addr.port() == 0 {
        return Err(bad(s, "port must be in 1..=65535"));
    }
    Ok(addr)
}

fn parse_cookie(s: &str, whole: &str) -> Result<u64, InvalidInput> {
    let n = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else {
        s.parse::<u64>()
    };
    match n {
        Ok(0) => Err(bad(whole, "a socket cookie is never 0")),
        Ok(n) => Ok(n),
        Err(_) => Err(bad(whole, "cookie must be a decimal or 0x-hex number")),
    }
}

/// A SIP URI: `sip:[user@]host[:port][;params]`, host an IP literal;
/// `transport=` must be a TCP-based one. Default port 5060 (`sips:` 5061).
fn parse_sip(rest: &str, default_port: u16, whole: &str) -> Result<SocketAddr, InvalidInput> {
    let mut parts = rest.split(';');
    let hostport = parts.next().unwrap_or_default();
    for param in parts {
        if let Some(t) = param.to_ascii_lowercase().strip_prefix("transport=") {
            if !matches!(t, "tcp" | "tls" | "ws" | "wss") {
                return Err(bad(
                    whole,
                    "only TCP transports (tcp, tls, ws, wss) have connections",
                ));
            }
        }
    }
    let hostport = hostport.rsplit_once('@').map_or(hostport, |(_, h)| h);
    if hostport.contains('%') {
        return Err(bad(whole, ZONE));
    }
    if let Ok(a) = parse_endpoint(hostport) {
        return Ok(a);
    }
    let host = hostport
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(hostport);
    let ip: IpAddr = host.parse().map_err(|_| {
        bad(
            whole,
            "SIP URI host must be an IP address (with a valid port if any)",
        )
    })?;
    Ok(SocketAddr::new(ip, default_port))
}

impl FromStr for ConnSpec {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("cookie:") {
            return parse_cookie(rest, s).map(ConnSpec::Cookie);
        }
        if let Some(rest) = lower.strip_prefix("sips:") {
            let _ = rest;
            return parse_sip(&t[5..], 5061, s).map(ConnSpec::Peer);
        }
        if lower.starts_with("sip:") {
            return parse_sip(&t[4..], 5060, s).map(ConnSpec::Peer);
        }
        for prefix in ["tcp:", "tls:", "wss:", "ws:"] {
            if lower.starts_with(prefix) {
                return parse_endpoint(&t[prefix.len()..]).map(ConnSpec::Peer);
            }
        }
        if lower.starts_with("udp:") || lower.starts_with("sctp:") {
            return Err(bad(
                s,
                "only TCP transports (tcp, tls, ws, wss) have connections",
            ));
        }
        parse_endpoint(t).map(ConnSpec::Peer)
    }
}

impl fmt::Display for ConnSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnSpec::Peer(a) => write!(f, "{a}"),
            ConnSpec::Cookie(c) => write!(f, "cookie:{c:#x}"),
        }
    }
}

/// An address as the kernel programs see it: IPv6 bytes, IPv4 mapped.
pub fn v6_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The request-map key for a peer endpoint.
pub fn peer_key(a: SocketAddr) -> PeerKey {
    PeerKey {
        addr: v6_bytes(a.ip()),
        port: a.port(),
        _pad: 0,
    }
}

/// Renders an IPv6-bytes address for a socket of `family`: IPv4 for IPv4
/// sockets, `[v6]` otherwise.
pub fn endpoint(family: u32, addr: [u8; 16], port: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(addr);
    let ip = match (family, v6.to_ipv4_mapped()) {
        (2, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_ids_are_refused() {
        for s in [
            "[fe80::1%2]:5060",
            "[fe80::1%eth0]:5060",
            "sip:[fe80::1%25eth0]:5060",
        ] {
            let e = s.parse::<ConnSpec>().unwrap_err().to_string();
            assert!(e.contains("zone"), "{s}: {e}");
        }
        assert!(parse_endpoint("[fe80::1%2]:5060").is_err());
        assert!("sip:al%20ice@10.0.0.2:5060".parse::<ConnSpec>().is_ok());
    }

    fn peer(s: &str) -> SocketAddr {
        match s.parse::<ConnSpec>().unwrap() {
            ConnSpec::Peer(a) => a,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn peer_forms() {
        assert_eq!(peer("10.0.0.2:5060").to_string(), "10.0.0.2:5060");
        assert_eq!(peer("[2001:db8::1]:5061").to_string(), "[2001:db8::1]:5061");
        assert_eq!(peer("tcp:10.0.0.2:5060").to_string(), "10.0.0.2:5060");
        assert_eq!(peer("TLS:10.0.0.2:5061").to_string(), "10.0.0.2:5061");
        assert_eq!(peer("ws:[::1]:8080").to_string(), "[::1]:8080");
        assert_eq!(peer("wss:10.0.0.2:443").to_string(), "10.0.0.2:443");
        assert_eq!(
            peer("sip:10.0.0.2:5060;transport=tcp").to_string(),
            "10.0.0.2:5060"
        );
        assert_eq!(
            peer("sip:alice@10.0.0.2:5070;transport=TCP;lr").to_string(),
            "10.0.0.2:5070"
        );
        assert_eq!(
            peer("sip:10.0.0.2;transport=tcp").to_string(),
            "10.0.0.2:5060"
        );
        assert_eq!(peer("sips:[2001:db8::2]").to_string(), "[2001:db8::2]:5061");
        assert_eq!(
            peer("sip:[2001:db8::2]:5080").to_string(),
            "[2001:db8::2]:5080"
        );
    }

    #[test]
    fn cookies() {
        assert_eq!(
            "cookie:42".parse::<ConnSpec>().unwrap(),
            ConnSpec::Cookie(42)
        );
        assert_eq!(
            "cookie:0x2a".parse::<ConnSpec>().unwrap(),
            ConnSpec::Cookie(42)
        );
        assert_eq!(
            "COOKIE:0X2A".parse::<ConnSpec>().unwrap(),
            ConnSpec::Cookie(42)
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "10.0.0.2",
            "10.0.0.2:0",
            "10.0.0.2:65536",
            "10.0.0.256:5060",
            "::1:5060",
            "[::1]",
            "host.example:5060",
            "tcp:",
            "udp:10.0.0.2:5060",
            "sip:10.0.0.2:5060;transport=udp",
            "sip:proxy.example",
            "cookie:",
            "cookie:0",
            "cookie:-1",
            "cookie:0xzz",
            "cookie:18446744073709551616",
        ] {
            assert!(bad.parse::<ConnSpec>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn keys_map_ipv4() {
        let k = peer_key("10.0.0.2:5060".parse().unwrap());
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 10, 0, 0, 2]);
        assert_eq!(k.port, 5060);
        assert_eq!(peer_key("[::ffff:10.0.0.2]:5060".parse().unwrap()), k);
        assert_eq!(endpoint(2, k.addr, 5060).to_string(), "10.0.0.2:5060");
        assert_eq!(
            endpoint(10, k.addr, 5060).to_string(),
            "[::ffff:10.0.0.2]:5060"
        );
    }

    #[test]
    fn endpoints() {
        let v4 = std::net::Ipv4Addr::new(10, 0, 0, 2)
            .to_ipv6_mapped()
            .octets();
        assert_eq!(endpoint(2, v4, 5060).to_string(), "10.0.0.2:5060");
        assert_eq!(endpoint(10, v4, 5060).to_string(), "[::ffff:10.0.0.2]:5060");
        let v6 = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(endpoint(10, v6, 5061).to_string(), "[2001:db8::1]:5061");
    }
}
