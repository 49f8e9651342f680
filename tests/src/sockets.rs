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

/// A free TCP port on 127.0.0.1 in the current namespace.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
