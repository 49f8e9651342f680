//! Sockets: the keepalive values the kernel holds, cookies, and
//! connections on loopback.
use super::*;

/// Keepalive settings of a socket as the kernel reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub enabled: bool,
    pub idle: i32,
    pub interval: i32,
    pub count: i32,
    pub user_timeout_ms: i32,
}

/// Reads SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT and
/// TCP_USER_TIMEOUT with getsockopt.
pub fn keepalive(fd: &impl AsFd) -> Keepalive {
    fn get<O: nix::sys::socket::GetSockOpt>(fd: &impl AsFd, opt: O, name: &str) -> O::Val {
        getsockopt(fd, opt).unwrap_or_else(|e| panic!("getsockopt({name}): {e}"))
    }
    Keepalive {
        enabled: get(fd, KeepAlive, "SO_KEEPALIVE"),
        idle: get(fd, TcpKeepIdle, "TCP_KEEPIDLE") as i32,
        interval: get(fd, TcpKeepInterval, "TCP_KEEPINTVL") as i32,
        count: get(fd, TcpKeepCount, "TCP_KEEPCNT") as i32,
        user_timeout_ms: get(fd, TcpUserTimeout, "TCP_USER_TIMEOUT") as i32,
    }
}

/// What a fresh namespace's sockets get by default (net.ipv4.tcp_keepalive_*).
pub const KERNEL_DEFAULT: Keepalive = Keepalive {
    enabled: false,
    idle: 7200,
    interval: 75,
    count: 9,
    user_timeout_ms: 0,
};

/// The keepalive a test expects from a policy.
pub fn expect(idle: i32, count: i32, interval: i32, user_timeout_ms: i32) -> Keepalive {
    Keepalive {
        enabled: true,
        idle,
        interval,
        count,
        user_timeout_ms,
    }
}

/// The socket cookie (SO_COOKIE), read as tcpka reads it.
pub fn cookie(fd: &impl AsFd) -> u64 {
    getsockopt(fd, tcpka::sockopt::Cookie).expect("getsockopt(SO_COOKIE)")
}

/// SO_LINGER 0: closing the socket then resets its connection (RST)
/// instead of ending it in order.
pub fn reset_on_close(fd: &impl AsFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(fd, Linger, &linger).expect("setsockopt(SO_LINGER)");
}

/// A connected pair over the given listener: (client, accepted server side).
pub fn connect(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let addr = listener.local_addr().unwrap();
    let client = TcpStream::connect(addr).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

/// A listener on `addr` (port 0 picks one).
pub fn listen(addr: &str) -> TcpListener {
    TcpListener::bind(addr.parse::<SocketAddr>().expect("listen address")).expect("bind")
}

/// A free TCP port on 127.0.0.1 in the current namespace, for a process
/// that binds it later.
///
/// It is taken below the kernel's ephemeral range (32768 and up by
/// default), where no connect() can be given it in the meantime: a
/// port from `bind(0)` is one the next outgoing connection (an etcd
/// member dialling its peers, a client polling) may take before the
/// server binds it. Each call in a process returns a different port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // Start at a point that differs per process, so test binaries run one
    // after another do not reuse each other's TIME_WAIT ports first.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()))
            % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}
