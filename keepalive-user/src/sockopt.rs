//! Socket options nix 0.29 has no type for, as nix socket options: use
//! them with `nix::sys::socket::getsockopt(&fd, Cookie)` like nix's own.
use std::os::fd::{AsFd, AsRawFd as _};

use nix::sys::socket::GetSockOpt;

/// Reads an option whose value is a plain `T` (or starts with one).
fn get_raw<T: Copy + Default, F: AsFd>(fd: &F, level: i32, name: i32) -> nix::Result<T> {
    let mut v = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: an out-pointer to `len` writable bytes; the kernel writes at
    // most `len` of them.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    nix::errno::Errno::result(ret).map(|_| v)
}

/// `SO_COOKIE`: the socket's cookie, as `ss -e` (`sk:`) and the kernel
/// programs see it.
#[derive(Clone, Copy, Debug)]
pub struct Cookie;

impl GetSockOpt for Cookie {
    type Val = u64;
    fn get<F: AsFd>(&self, fd: &F) -> nix::Result<u64> {
        get_raw(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
    }
}

/// `SO_PROTOCOL`: e.g. `libc::IPPROTO_TCP`.
#[derive(Clone, Copy, Debug)]
pub struct Protocol;

impl GetSockOpt for Protocol {
    type Val = i32;
    fn get<F: AsFd>(&self, fd: &F) -> nix::Result<i32> {
        get_raw(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)
    }
}

/// `tcpi_state`, the first byte of `TCP_INFO` (`TCP_ESTABLISHED` is 1).
#[derive(Clone, Copy, Debug)]
pub struct TcpState;

impl GetSockOpt for TcpState {
    type Val = u8;
    fn get<F: AsFd>(&self, fd: &F) -> nix::Result<u8> {
        get_raw(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::getsockopt;

    use super::*;

    #[test]
    fn reads_a_connected_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let (a, b) = (
            getsockopt(&c, Cookie).unwrap(),
            getsockopt(&s, Cookie).unwrap(),
        );
        assert!(a != 0 && b != 0 && a != b);
        assert_eq!(getsockopt(&c, Protocol).unwrap(), libc::IPPROTO_TCP);
        assert_eq!(getsockopt(&c, TcpState).unwrap(), 1);
        assert_eq!(getsockopt(&l, TcpState).unwrap(), 10, "TCP_LISTEN");
    }
}
