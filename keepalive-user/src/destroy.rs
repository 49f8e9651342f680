//! Ending a connection from the kernel side (`tcpka close`): sock_diag's
//! `SOCK_DESTROY`, as `ss -K` does (the kernel needs
//! `CONFIG_INET_DIAG_DESTROY`; the caller `CAP_NET_ADMIN`). The kernel
//! aborts the socket: its owner's next call fails with ECONNABORTED and the
//! peer gets a reset. The owner need not cooperate.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use crate::{Error, Result};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DESTROY: u16 = 21;
pub(crate) const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
pub(crate) const NLMSG_ERROR: u16 = 2;

/// `struct nlmsghdr` + `struct inet_diag_req_v2` to destroy one socket,
/// by its ends and cookie.
fn request(local: SocketAddr, remote: SocketAddr, cookie: u64) -> Vec<u8> {
    request_of(SOCK_DESTROY, local, remote, cookie, 0)
}

/// The same for any exact-socket request (`kind`), with the extensions
/// `ext` asks for (`1 << (INET_DIAG_* - 1)` bits).
pub(crate) fn request_of(
    kind: u16,
    local: SocketAddr,
    remote: SocketAddr,
    cookie: u64,
    ext: u8,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(72);
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    } as u8;
    m.extend_from_slice(&72u32.to_ne_bytes()); // nlmsg_len
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, ext, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&remote.port().to_be_bytes());
    let addr = |ip: IpAddr| -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&v4.octets());
                a
            }
            IpAddr::V6(v6) => v6.octets(),
        }
    };
    m.extend_from_slice(&addr(local.ip()));
    m.extend_from_slice(&addr(remote.ip()));
    m.extend_from_slice(&0u32.to_ne_bytes()); // interface: any
    m.extend_from_slice(&(cookie as u32).to_ne_bytes());
    m.extend_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    debug_assert_eq!(m.len(), 72);
    m
}

/// A sock_diag socket of the current network namespace, for exact
/// requests one after another.
pub(crate) struct Diag(OwnedFd);

impl Diag {
    pub(crate) fn open() -> std::io::Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends one request to the kernel.
    pub(crate) fn send(&self, msg: &[u8]) -> std::io::Result<()> {
        // SAFETY: send(2) of a buffer we own; the kernel is the default peer.
        if unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram into `buf` (`flags`: recv(2)'s).
    pub(crate) fn recv(&self, buf: &mut [u8], flags: i32) -> std::io::Result<usize> {
        // SAFETY: recv(2) into a buffer we own.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends one request and returns the kernel's first reply (at least a
    /// netlink header and a code); what else it sent (an ACK) is dropped.
    pub(crate) fn ask(&self, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        self.send(msg)?;
        let mut buf = vec![0u8; 2048];
        let n = self.recv(&mut buf, 0)?;
        if n < 20 {
            return Err(std::io::Error::other("a short sock_diag reply"));
        }
        buf.truncate(n);
        // The ACK that follows a reply: read and dropped, so that the next
        // request's first reply is its own.
        if u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
            let mut ack = [0u8; 64];
            let _ = self.recv(&mut ack, libc::MSG_DONTWAIT);
        }
        Ok(buf)
    }
}

/// Sends one sock_diag request in the current network namespace and
/// returns the kernel's first reply (at least a netlink header and a
/// code).
fn exchange(msg: &[u8]) -> std::io::Result<Vec<u8>> {
    Diag::open()?.ask(msg)
}

/// Destroys one connection of the current network namespace with
/// sock_diag.
fn sock_diag_destroy(local: SocketAddr, remote: SocketAddr, cookie: u64) -> Result<()> {
    let err = |what: &str, e: std::io::Error| Error::io(format!("closing {remote}: {what}"), e);
    let buf = exchange(&request(local, remote, cookie)).map_err(|e| err("SOCK_DESTROY", e))?;
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    match (kind, code) {
        (NLMSG_ERROR, 0) => Ok(()),
        (NLMSG_ERROR, e) if -e == libc::EOPNOTSUPP => Err(Error::Unsupported {
            what: format!("closing {remote}"),
            needs: "sock_diag's SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY)".into(),
        }),
        (NLMSG_ERROR, e) if -e == libc::ENOENT => Err(Error::NotFound {
            what: format!("closing {remote}: no such socket any more (it closed meanwhile)"),
        }),
        (NLMSG_ERROR, e) => Err(err("SOCK_DESTROY", std::io::Error::from_raw_os_error(-e))),
        _ => Err(Error::BadRecord {
            what: format!("closing {remote}: SOCK_DESTROY"),
            why: format!("unexpected netlink reply type {kind}"),
        }),
    }
}

/// `SOCK_DIAG_BY_FAMILY`: one socket's `inet_diag_msg`.
pub(crate) const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// Offset of `idiag_uid` in the reply: `nlmsghdr` (16), then
/// `inet_diag_msg`'s family, state, timer, retrans (4), id (48), expires,
/// rqueue, wqueue (12).
const UID_OFFSET: usize = 80;
/// `INET_DIAG_NOCOOKIE`: any cookie.
const NO_COOKIE: u64 = u64::MAX;

/// Offset of `idiag_inode` in the reply (after `idiag_uid`).
const INODE_OFFSET: usize = 84;
/// Offset of `idiag_state` in the reply.
const STATE_OFFSET: usize = 17;
/// `TCP_SYN_RECV`: sock_diag reports a connection the server has not
/// finished setting up (a request socket) with this state and uid 0.
const TCP_SYN_RECV: u8 = 3;
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LISTEN: u8 = 10;

/// The uid that owns the TCP socket with these ends in this network
/// namespace; `None` when there is none (for a connection, the other end
/// is then not on this host).
///
/// NB: a socket no process holds has no owner, yet sock_diag reports uid 0
/// for it: a request socket (until the handshake's last ACK is processed),
/// and, before Linux 6.x took the uid from the socket itself (6.1 still
/// did not), a connection the server has not accepted yet or has closed.
/// Such a socket has no inode: this waits (up to a second) for the server
/// to hold it, then gives up rather than take uid 0 for root.
pub fn socket_uid(local: SocketAddr, remote: SocketAddr) -> std::io::Result<Option<u32>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match socket_uid_once(local, remote)? {
            Some(s) if s.held() => return Ok(Some(s.uid)),
            Some(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Some(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no process holds the other end (not accepted yet, or closed): its owner is not known",
                ))
            }
            None => return Ok(None),
        }
    }
}

/// The uid of the process that holds the TCP socket with these ends, from
/// one sock_diag lookup: `None` when there is no such socket or no process
/// holds it (see [`socket_uid`] on why its uid is then no owner's).
pub fn holder_uid(local: SocketAddr, remote: SocketAddr) -> std::io::Result<Option<u32>> {
    Ok(socket_uid_once(local, remote)?
        .filter(DiagOwner::held)
        .map(|s| s.uid))
}

/// Whether the TCP connection with these ends (in this namespace) is
/// closing or gone, from one sock_diag lookup: none has these ends (the
/// lookup then finds the listener on the local end, if any), or no process
/// holds its socket and it is past the states a connection waits to be
/// accepted in (FIN_WAIT, CLOSING, LAST_ACK, TIME_WAIT, ...).
pub fn closing_or_gone(local: SocketAddr, remote: SocketAddr) -> std::io::Result<bool> {
    Ok(match socket_uid_once(local, remote)? {
        None => true,
        Some(s) if s.state == TCP_LISTEN => true,
        Some(s) => {
            s.inode == 0 && !matches!(s.state, TCP_ESTABLISHED | TCP_SYN_RECV | TCP_CLOSE_WAIT)
        }
    })
}

/// What sock_diag says of one socket.
struct DiagOwner {
    uid: u32,
    inode: u32,
    state: u8,
}

impl DiagOwner {
    /// Whether a process holds the socket, so that its uid is an owner's.
    fn held(&self) -> bool {
        self.state != TCP_SYN_RECV && self.inode != 0
    }
}

/// [`socket_uid`]'s one look.
fn socket_uid_once(local: SocketAddr, remote: SocketAddr) -> std::io::Result<Option<DiagOwner>> {
    let buf = exchange(&request_of(
        SOCK_DIAG_BY_FAMILY,
        local,
        remote,
        NO_COOKIE,
        0,
    ))?;
    let n = buf.len();
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if kind == NLMSG_ERROR {
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return match -code {
            libc::ENOENT => Ok(None),
            e => Err(std::io::Error::from_raw_os_error(e)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY || n < INODE_OFFSET + 4 {
        return Err(std::io::Error::other(format!(
            "unexpected sock_diag reply type {kind}"
        )));
    }
    let word = |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    Ok(Some(DiagOwner {
        uid: word(UID_OFFSET),
        inode: word(INODE_OFFSET),
        state: buf[STATE_OFFSET],
    }))
}

/// How tcpka ends connections on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// sock_diag's `SOCK_DESTROY`: one exact lookup by the connection's
    /// ends (`CONFIG_INET_DIAG_DESTROY`).
    SockDiag,
    /// The `bpf_sock_destroy` kfunc from a one-shot `iter/tcp` program
    /// (Linux 6.5+): a walk of the namespace's TCP sockets.
    BpfSockDestroy,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::SockDiag => "sock_diag SOCK_DESTROY",
            Method::BpfSockDestroy => "bpf_sock_destroy (iter/tcp)",
        }
    }
}

/// Environment variable that picks the method (`sock_diag` or
/// `bpf_sock_destroy`) instead of the default.
pub const METHOD_ENV: &str = "TCPKA_CLOSE_WITH";

/// Whether sock_diag can destroy sockets here: asks it to destroy a socket
/// that cannot exist (port 0 at both ends); nothing is closed.
fn probe_sock_diag() -> std::result::Result<(), String> {
    let none: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, 0).into();
    match sock_diag_destroy(none, none, 0) {
        Ok(()) => Ok(()),
        Err(Error::NotFound { .. }) => Ok(()),
        Err(Error::Unsupported { .. }) => {
            let why = "sock_diag cannot destroy sockets (a kernel built without \
                       CONFIG_INET_DIAG_DESTROY)";
            Err(why.into())
        }
        Err(e) => Err(crate::one_line(&e)),
    }
}

/// The method this host uses: sock_diag where the kernel has it (one
/// lookup, where the kfunc's program walks every socket), else
/// `bpf_sock_destroy`; [`METHOD_ENV`] picks one. `Err` says why neither
/// works. Nothing is closed.
pub fn method() -> std::result::Result<Method, String> {
    let bpf = || {
        crate::sock_destroy::probe()
            .map(|()| Method::BpfSockDestroy)
            .map_err(|e| format!("bpf_sock_destroy: {e}"))
    };
    match std::env::var(METHOD_ENV).ok().as_deref() {
        Some("sock_diag") => probe_sock_diag().map(|()| Method::SockDiag),
        Some("bpf_sock_destroy") => bpf(),
        Some(other) => Err(format!(
            "{METHOD_ENV}={other}: expected sock_diag or bpf_sock_destroy"
        )),
        None => probe_sock_diag()
            .map(|()| Method::SockDiag)
            .or_else(|diag| bpf().map_err(|kfunc| format!("{diag}; {kfunc}"))),
    }
}

/// Destroys one connection of the current network namespace, the way
/// [`method`] picks.
fn destroy_here(local: SocketAddr, remote: SocketAddr, cookie: u64) -> Result<()> {
    let unavailable = |why: String| Error::Unsupported {
        what: format!("closing {remote}: this host cannot end connections"),
        needs: format!("a way tcpka can use ({why})"),
    };
    match method().map_err(unavailable)? {
        Method::SockDiag => sock_diag_destroy(local, remote, cookie),
        Method::BpfSockDestroy => match crate::sock_destroy::destroy(cookie) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::NotFound {
                what: format!(
                    "closing {remote}: no socket has cookie {cookie} any more (it closed meanwhile)"
                ),
            }),
            Err(e) => Err(Error::io(format!("closing {remote}: bpf_sock_destroy"), e)),
        },
    }
}

/// Destroys one connection, in `netns` when given (the sock_diag socket
/// must be made inside it).
pub fn destroy(
    local: SocketAddr,
    remote: SocketAddr,
    cookie: u64,
    netns: Option<&Path>,
) -> Result<()> {
    let Some(ns) = netns else {
        return destroy_here(local, remote, cookie);
    };
    crate::pass::in_netns(ns, || destroy_here(local, remote, cookie))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_uid_is_the_owner_of_the_other_end() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // Not accepted yet: no process holds the server's end (6.1 says
        // uid 0 for it): no owner.
        let e = socket_uid(l.local_addr().unwrap(), c.local_addr().unwrap()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        let (s, _) = l.accept().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        // The server's accepted socket, seen from the client's side.
        let uid = socket_uid(s.local_addr().unwrap(), c.local_addr().unwrap()).unwrap();
        assert_eq!(uid, Some(me));
        drop(s);
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(socket_uid(gone, c.local_addr().unwrap()).unwrap(), None);
    }

    #[test]
    fn request_layout() {
        let m = request(
            "10.0.0.1:5060".parse().unwrap(),
            "10.0.0.2:40000".parse().unwrap(),
            0x1_0000_0002,
        );
        assert_eq!(m.len(), 72);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), SOCK_DESTROY);
        assert_eq!(&m[16..20], &[libc::AF_INET as u8, 6, 0, 0]);
        assert_eq!(&m[24..26], &5060u16.to_be_bytes());
        assert_eq!(&m[26..28], &40000u16.to_be_bytes());
        assert_eq!(&m[28..32], &[10, 0, 0, 1]);
        assert_eq!(&m[44..48], &[10, 0, 0, 2]);
        assert_eq!(u32::from_ne_bytes([m[64], m[65], m[66], m[67]]), 2);
        assert_eq!(u32::from_ne_bytes([m[68], m[69], m[70], m[71]]), 1);
    }
}
