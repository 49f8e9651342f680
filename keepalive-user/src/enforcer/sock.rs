//! One held connection: the socket options set and read back through the
//! owner's borrowed descriptor, and its record in the connection map.
use std::{net::SocketAddr, os::fd::AsFd};

use aya::maps::{HashMap, MapData, MapError, PerCpuArray};
use keepalive_common::{
    conns::{ConnInfo, SOURCE_COMMAND},
    maps,
    requests::{ConnRecord, Request},
    stats,
};
use nix::sys::socket::{getsockopt, setsockopt, sockopt, GetSockOpt, SetSockOpt};

use super::{status::ConnStatus, walk::request_for, Action, Enforcer};
use crate::{conn::v6_bytes, index::Held, lend::lend, loader, policy::Policy, Error, Result};
use keepalive_common::requests::{APPLY_CONNS_FULL, APPLY_SETSOCKOPT_FAILED};

pub(super) const TCP_CLOSE: u8 = 7;

pub(super) fn is_connected(s: &std::net::TcpStream) -> bool {
    tcp_state(s).is_some_and(|st| st != TCP_CLOSE)
}

/// Whether the kernel took a socket option (nix's typed options: the
/// value is what the kernel stores).
fn set<O: SetSockOpt>(fd: &std::net::TcpStream, opt: O, value: &O::Val) -> bool {
    setsockopt(fd, opt, value).is_ok()
}

/// A socket option's value as the kernel has it (0 when unreadable).
fn get<O: GetSockOpt<Val = u32>>(fd: &std::net::TcpStream, opt: O) -> u32 {
    getsockopt(fd, opt).unwrap_or(0)
}

/// `tcpi_state`, the first byte of `struct tcp_info`.
pub(super) fn tcp_state(fd: &impl AsFd) -> Option<u8> {
    getsockopt(fd, crate::sockopt::TcpState).ok()
}

pub(super) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// Sets the socket options of `action` (none for an enable the full
/// connection map refused, nor for a query). Returns whether the kernel
/// refused any; the options it took stay set.
fn set_options(fd: &std::net::TcpStream, action: Action, full: bool) -> bool {
    let mut failed = false;
    match action {
        Action::Enable(_) if full => {}
        Action::Enable(p) => {
            failed |= !set(fd, sockopt::TcpKeepIdle, &p.idle);
            failed |= !set(fd, sockopt::TcpKeepInterval, &p.interval);
            failed |= !set(fd, sockopt::TcpKeepCount, &p.count);
            if let Some(ms) = p.user_timeout_ms {
                failed |= !set(fd, sockopt::TcpUserTimeout, &ms);
            }
            failed |= !set(fd, sockopt::KeepAlive, &true);
        }
        Action::Disable => failed |= !set(fd, sockopt::KeepAlive, &false),
        Action::Query => {}
    }
    failed
}

/// The connection's keepalive, idle, interval, count and user timeout
/// for its record. An enable the kernel accepted in full holds exactly
/// its values (setsockopt stores them as given); anything else
/// (`not_in_full`: refused in part, or not recorded) is read back.
fn keepalive_values(
    fd: &std::net::TcpStream,
    action: Action,
    not_in_full: bool,
) -> (u32, u32, u32, u32, u32) {
    match action {
        Action::Enable(p) if !not_in_full => (
            1,
            p.idle,
            p.interval,
            p.count,
            p.user_timeout_ms
                .unwrap_or_else(|| get(fd, sockopt::TcpUserTimeout)),
        ),
        _ => (
            u32::from(getsockopt(fd, sockopt::KeepAlive).unwrap_or(false)),
            get(fd, sockopt::TcpKeepIdle),
            get(fd, sockopt::TcpKeepInterval),
            get(fd, sockopt::TcpKeepCount),
            get(fd, sockopt::TcpUserTimeout),
        ),
    }
}

impl Enforcer {
    /// [`Self::apply_held`], with `None` for a connection that closed
    /// while we held it: gone, like one the walk no longer finds.
    pub(super) fn apply_held_if_open(
        &self,
        h: &Held,
        action: Action,
        local: Option<SocketAddr>,
        remote_hint: Option<SocketAddr>,
    ) -> Result<Option<ConnStatus>> {
        match self.apply_held(h, action, &request_for(action, local), remote_hint) {
            Ok(c) => Ok(Some(c)),
            Err(e) if !is_connected(&h.stream) => {
                tracing::debug!("cookie {:#x} closed meanwhile: {e}", h.cookie);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Applies an action to a connection held through its owner's
    /// descriptor: the same socket options `bpf_setsockopt` would set, then
    /// the same record of it, read back from the kernel.
    pub(super) fn apply_held(
        &self,
        h: &Held,
        action: Action,
        request: &Request,
        remote_hint: Option<SocketAddr>,
    ) -> Result<ConnStatus> {
        let fd = &h.stream;
        let mut conns = lend::<HashMap<MapData, u64, ConnInfo>>(&self.layout, maps::CONNS)?;
        // NB: for an enable, the entry goes in first, then the options are
        // set and the state is read: a close after the insert runs the
        // close program, which removes the entry; one before it leaves
        // TCP_CLOSE to see here. A full map leaves the connection as it was.
        let full = match action {
            Action::Enable(p) => self.record_enable(&mut conns, h.cookie, p, request)?,
            Action::Disable | Action::Query => false,
        };
        let failed = set_options(fd, action, full);
        let state = tcp_state(fd);
        match action {
            Action::Enable(_) if state == Some(TCP_CLOSE) => {
                let _ = conns.remove(&h.cookie);
            }
            Action::Disable => {
                let _ = conns.remove(&h.cookie);
            }
            _ => {}
        }
        let (source, rule_id) = match action {
            Action::Enable(_) if full => (0, 0),
            Action::Enable(_) if state != Some(TCP_CLOSE) => (SOURCE_COMMAND, 0),
            Action::Enable(_) | Action::Disable => (0, 0),
            Action::Query => conns
                .get(&h.cookie, 0)
                .map_or((0, 0), |i| (i.source, i.rule_id)),
        };
        let local = fd
            .local_addr()
            .map_err(|e| Error::io("reading the local end", e))?;
        let remote = match (fd.peer_addr(), remote_hint) {
            (Ok(r), _) => r,
            (Err(_), Some(hint)) => hint,
            (Err(e), None) => return Err(Error::io("reading the remote end", e)),
        };
        let (keepalive, idle, interval, count, user_timeout_ms) =
            keepalive_values(fd, action, failed || full);
        let rec = ConnRecord {
            cookie: h.cookie,
            family: if local.is_ipv4() { 2 } else { 10 },
            state: state.unwrap_or(0).into(),
            local_addr: v6_bytes(local.ip()),
            remote_addr: v6_bytes(remote.ip()),
            local_port: local.port(),
            remote_port: remote.port(),
            keepalive,
            idle,
            interval,
            count,
            user_timeout_ms,
            source,
            rule_id,
            apply_failed: if full {
                APPLY_CONNS_FULL
            } else if failed {
                APPLY_SETSOCKOPT_FAILED
            } else {
                0
            },
            _pad: 0,
        };
        Ok(ConnStatus::from_raw(&rec))
    }

    /// Records an enable by command of connection `cookie` in the
    /// connection map, before its options are set (see
    /// [`Self::apply_held`]). Returns whether the map was full: the
    /// connection is then left as it was, and the refusal counted. Before
    /// 6.12, one sock_ops does not watch gets the close watch first; on
    /// failure that watch stays attached, and nothing is recorded.
    fn record_enable(
        &self,
        conns: &mut HashMap<MapData, u64, ConnInfo>,
        cookie: u64,
        p: Policy,
        request: &Request,
    ) -> Result<bool> {
        // Before 6.12, one indexed at load is a connection sock_ops did
        // not see connect, and will not see close: the state tracepoint
        // reports its end (attached first, so no close goes unseen).
        let unwatched = loader::close_by_tracepoint(&self.layout)?
            && crate::index::is_unwatched(&self.layout, cookie)?;
        if unwatched {
            loader::watch_outside(&self.layout, loader::Watch::IndexedConns)?;
        }
        let info = ConnInfo {
            policy: request.policy,
            source: SOURCE_COMMAND,
            rule_id: 0,
            flags: if unwatched {
                keepalive_common::conns::FLAG_UNWATCHED
            } else {
                0
            },
            applied_ns: monotonic_ns(),
            risk: p.risk.to_raw(),
            _pad: 0,
        };
        match conns.insert(cookie, info, 0) {
            Ok(()) => Ok(false),
            Err(e) if map_full(&e) => {
                self.count_conns_full();
                Ok(true)
            }
            Err(e) => Err(Error::map("recording the connection", e)),
        }
    }

    /// Counts an enable the full connection map refused on the direct path
    /// with the kernel's own (`stats::CONNS_FULL`, CPU 0's slot): `info`
    /// and `/metrics` show one figure. A race with another command may
    /// lose a count, never a connection.
    fn count_conns_full(&self) {
        let bump = || -> Result<()> {
            let mut a = lend::<PerCpuArray<MapData, u64>>(&self.layout, maps::STATS)?;
            let mut v: Vec<u64> = a
                .get(&stats::CONNS_FULL, 0)
                .map_err(|e| Error::map("reading the counters", e))?
                .iter()
                .copied()
                .collect();
            v[0] += 1;
            let v = aya::maps::PerCpuValues::try_from(v)
                .map_err(|e| Error::io("counting a full connection map", e))?;
            a.set(stats::CONNS_FULL, v, 0)
                .map_err(|e| Error::map("writing the counters", e))
        };
        if let Err(e) = bump() {
            tracing::debug!("counting a full connection map: {e}");
        }
    }
}

/// Whether a map update failed because the map is full.
pub(super) fn map_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}
