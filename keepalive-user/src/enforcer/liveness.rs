//! How healthy a connection is, read from the kernel when asked (never
//! remembered): its `struct tcp_info`, from one exact sock_diag lookup by
//! its ends and cookie (`INET_DIAG_INFO`, as `ss -ti` reads it).
use std::{net::SocketAddr, path::Path};

use super::{status::ConnStatus, Enforcer};
use crate::{
    destroy::{request_of, Diag, SOCK_DIAG_BY_FAMILY},
    Error, Result,
};

/// `INET_DIAG_INFO`: the attribute with `struct tcp_info`.
const INET_DIAG_INFO: u16 = 2;
/// The reply's attributes start after `nlmsghdr` and `inet_diag_msg`.
const ATTRS_OFFSET: usize = 16 + 72;

/// What the kernel says of a connection's health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Liveness {
    /// Milliseconds since the peer last acknowledged anything (a keepalive
    /// probe's answer included).
    pub last_ack_recv_ms: u32,
    /// Milliseconds since data was last sent.
    pub last_data_sent_ms: u32,
    /// Milliseconds since data was last received.
    pub last_data_recv_ms: u32,
    /// Keepalive (or zero-window) probes sent and not answered.
    pub probes_out: u8,
    /// Retransmission timeouts in a row for the same data.
    pub retransmits: u8,
    /// The retransmission (or zero-window probe) backoff level.
    pub backoff: u8,
    /// Segments retransmitted over the connection's life.
    pub total_retrans: u32,
    /// The current retransmission timeout, in microseconds.
    pub rto_us: u32,
    /// The smoothed round-trip time and its variation, in microseconds.
    pub rtt_us: u32,
    pub rttvar_us: u32,
}

/// `struct tcp_info` (linux/tcp.h): the fields read, at their offsets.
fn parse_tcp_info(info: &[u8]) -> Option<Liveness> {
    let u8_at = |at: usize| info.get(at).copied();
    let u32_at = |at: usize| {
        info.get(at..at + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
    };
    Some(Liveness {
        retransmits: u8_at(2)?,
        probes_out: u8_at(3)?,
        backoff: u8_at(6)?,
        rto_us: u32_at(8)?,
        last_data_sent_ms: u32_at(44)?,
        last_data_recv_ms: u32_at(52)?,
        last_ack_recv_ms: u32_at(56)?,
        rtt_us: u32_at(68)?,
        rttvar_us: u32_at(72)?,
        total_retrans: u32_at(100)?,
    })
}

/// The `INET_DIAG_INFO` attribute of a sock_diag reply.
fn info_of(reply: &[u8]) -> Option<&[u8]> {
    if reply.len() < ATTRS_OFFSET || u16::from_ne_bytes([reply[4], reply[5]]) != SOCK_DIAG_BY_FAMILY
    {
        return None;
    }
    let end = (u32::from_ne_bytes(reply[0..4].try_into().ok()?) as usize).min(reply.len());
    let mut at = ATTRS_OFFSET;
    while at + 4 <= end {
        let len = usize::from(u16::from_ne_bytes([reply[at], reply[at + 1]]));
        let kind = u16::from_ne_bytes([reply[at + 2], reply[at + 3]]);
        if len < 4 || at + len > end {
            return None;
        }
        if kind == INET_DIAG_INFO {
            return Some(&reply[at + 4..at + len]);
        }
        at += (len + 3) & !3;
    }
    None
}

/// One connection's health, by its ends and cookie in this namespace;
/// `None` when it is gone (or not a full TCP socket any more).
fn read(diag: &Diag, local: SocketAddr, remote: SocketAddr, cookie: u64) -> Option<Liveness> {
    let ext = 1u8 << (INET_DIAG_INFO - 1);
    let reply = diag
        .ask(&request_of(SOCK_DIAG_BY_FAMILY, local, remote, cookie, ext))
        .ok()?;
    parse_tcp_info(info_of(&reply)?)
}

/// `idiag_timer`: the zero-window probe timer runs.
pub(crate) const TIMER_PROBE0: u8 = 4;

/// What the early warning looks at: the connection's health and which
/// timer the kernel runs for it (`idiag_timer`: 1 retransmission, 2
/// keepalive, 4 zero-window probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Health {
    pub(crate) liveness: Liveness,
    pub(crate) timer: u8,
}

/// [`read`], with the timer; `None` when the connection is gone.
pub(crate) fn health(
    diag: &Diag,
    local: SocketAddr,
    remote: SocketAddr,
    cookie: u64,
) -> Option<Health> {
    let ext = 1u8 << (INET_DIAG_INFO - 1);
    let reply = diag
        .ask(&request_of(SOCK_DIAG_BY_FAMILY, local, remote, cookie, ext))
        .ok()?;
    // `inet_diag_msg.idiag_timer`, after the netlink header.
    let timer = *reply.get(16 + 2)?;
    Some(Health {
        liveness: parse_tcp_info(info_of(&reply)?)?,
        timer,
    })
}

impl Enforcer {
    /// Gives each connection its health as the kernel has it now, in
    /// network namespace `netns` (default: this one): one sock_diag lookup
    /// each. A connection gone meanwhile gets none.
    pub fn add_liveness(&self, conns: &mut [ConnStatus], netns: Option<&Path>) -> Result<()> {
        let fill = |conns: &mut [ConnStatus]| -> Result<()> {
            let diag = Diag::open().map_err(|e| Error::io("opening sock_diag", e))?;
            for c in conns.iter_mut() {
                let ends = (
                    c.local.parse::<SocketAddr>(),
                    c.remote.parse::<SocketAddr>(),
                );
                if let (Ok(local), Ok(remote)) = ends {
                    c.liveness = read(&diag, local, remote, c.cookie);
                }
            }
            Ok(())
        };
        match netns {
            None => fill(conns),
            Some(ns) => crate::pass::in_netns(ns, || fill(conns)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    #[test]
    fn a_connection_reads_its_own_health() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, _) = l.accept().unwrap();
        c.write_all(b"ping").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let cookie = nix::sys::socket::getsockopt(&c, crate::sockopt::Cookie).unwrap();
        let diag = Diag::open().unwrap();
        let local = c.local_addr().unwrap();
        let remote = c.peer_addr().unwrap();
        let l = read(&diag, local, remote, cookie).expect("the connection's tcp_info");
        assert!(l.last_data_sent_ms >= 20, "{l:?}");
        assert!(
            l.last_ack_recv_ms >= 20 && l.last_ack_recv_ms < 10_000,
            "{l:?}"
        );
        assert!(l.rto_us >= 200_000, "{l:?}");
        assert!(l.rtt_us > 0, "{l:?}");
        assert_eq!((l.probes_out, l.retransmits, l.total_retrans), (0, 0, 0));
        // Another cookie: not this connection.
        assert_eq!(read(&diag, local, remote, cookie ^ 1), None);
    }

    #[test]
    fn a_malformed_reply_has_no_info() {
        assert_eq!(info_of(&[0u8; 10]), None);
        let mut reply = vec![0u8; ATTRS_OFFSET + 8];
        reply[0..4].copy_from_slice(&((ATTRS_OFFSET + 8) as u32).to_ne_bytes());
        reply[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        // An attribute longer than the reply.
        reply[ATTRS_OFFSET..ATTRS_OFFSET + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(info_of(&reply), None);
        // A short tcp_info.
        assert_eq!(parse_tcp_info(&[0u8; 50]), None);
    }
}
