//! The walk of the socket table: requests queued for the apply iterator,
//! one pass for a group of commands, and what it found.
use std::{net::SocketAddr, sync::atomic::Ordering};

use aya::maps::{Array, HashMap, MapData};
use keepalive_common::{
    conns::ConnInfo,
    maps,
    requests::{ConnRecord, PeerKey, Request, COOKIES_PENDING, OP_DISABLE, OP_ENABLE, OP_QUERY},
};

use super::{live::Op, status::ConnStatus, Action, Enforcer};
use crate::{
    conn::{peer_key, v6_bytes, ConnSpec},
    lend::{lend, Lent},
    loader,
    paths::PinLayout,
    Error, Result,
};

/// Parses what an iterator pass wrote.
pub(super) fn parse_raw(buf: &[u8]) -> Vec<ConnRecord> {
    buf.chunks_exact(size_of::<ConnRecord>())
        // SAFETY: the programs write whole `ConnRecord`s; read unaligned.
        .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast()) })
        .collect()
}

/// Whether a reported socket is one a request named (as the program
/// matched it).
pub(super) fn record_matches(r: &ConnRecord, conn: ConnSpec, local: Option<SocketAddr>) -> bool {
    let named = match conn {
        ConnSpec::Cookie(c) => r.cookie == c,
        ConnSpec::Peer(p) => r.remote_addr == v6_bytes(p.ip()) && r.remote_port == p.port(),
    };
    named && local.is_none_or(|l| r.local_addr == v6_bytes(l.ip()) && r.local_port == l.port())
}

pub(super) fn same_key(a: ConnSpec, b: ConnSpec) -> bool {
    match (a, b) {
        (ConnSpec::Cookie(x), ConnSpec::Cookie(y)) => x == y,
        (ConnSpec::Peer(x), ConnSpec::Peer(y)) => peer_key(x) == peer_key(y),
        _ => false,
    }
}

pub(super) fn request_for(action: Action, local: Option<SocketAddr>) -> Request {
    let (op, policy, risk) = match action {
        Action::Enable(p) => (OP_ENABLE, p.to_raw(), p.risk.to_raw()),
        Action::Disable => (OP_DISABLE, Default::default(), Default::default()),
        Action::Query => (OP_QUERY, Default::default(), Default::default()),
    };
    Request {
        op,
        has_local: local.is_some() as u32,
        local_addr: local.map_or([0; 16], |l| v6_bytes(l.ip())),
        local_port: local.map_or(0, |l| l.port()),
        _pad: 0,
        policy,
        risk,
    }
}

/// The pending-request maps of one installation. Requests live for one
/// pass, under the installation lock.
pub(super) struct Pending {
    peer: Lent<HashMap<MapData, PeerKey, Request>>,
    cookie: Lent<HashMap<MapData, u64, Request>>,
    ports: Lent<Array<MapData, u32>>,
}

impl Pending {
    pub(super) fn open(layout: &PinLayout) -> Result<Self> {
        Ok(Self {
            peer: lend(layout, maps::REQ_PEER)?,
            cookie: lend(layout, maps::REQ_COOKIE)?,
            ports: lend(layout, maps::REQ_PORTS)?,
        })
    }

    /// Queues a request and raises the prefilter flag it needs.
    pub(super) fn queue(&mut self, conn: ConnSpec, request: Request) -> Result<()> {
        let err = |e| Error::map("queueing the request", e);
        match conn {
            ConnSpec::Cookie(cookie) => {
                self.cookie.insert(cookie, request, 0).map_err(err)?;
                self.ports.set(COOKIES_PENDING, 1, 0).map_err(err)
            }
            ConnSpec::Peer(peer) => {
                self.peer.insert(peer_key(peer), request, 0).map_err(err)?;
                self.ports.set(u32::from(peer.port()), 1, 0).map_err(err)
            }
        }
    }

    /// Removes every request and flag: after a pass, and before one in case
    /// an earlier tcpka died mid-pass (the lock is held, so nothing else is
    /// pending).
    pub(super) fn clear(&mut self) -> Result<()> {
        let err = |e| Error::map("clearing the request maps", e);
        let peers: Vec<PeerKey> = self.peer.keys().filter_map(|k| k.ok()).collect();
        for key in peers {
            let _ = self.peer.remove(&key);
            self.ports.set(u32::from(key.port), 0, 0).map_err(err)?;
        }
        let cookies: Vec<u64> = self.cookie.keys().filter_map(|k| k.ok()).collect();
        for key in cookies {
            let _ = self.cookie.remove(&key);
        }
        self.ports.set(COOKIES_PENDING, 0, 0).map_err(err)
    }
}

impl Enforcer {
    /// One walk of the socket table applying every command in `ops`
    /// (distinct keys, one kind, one namespace); returns each command's
    /// connections.
    pub(super) fn walk(&self, ops: &[&Op]) -> Result<Vec<Vec<ConnStatus>>> {
        let Some(first) = ops.first() else {
            return Ok(Vec::new());
        };
        debug_assert!(ops.iter().all(|op| op.netns == first.netns));
        self.lookups.walks.fetch_add(1, Ordering::Relaxed);
        let enabling = ops.iter().any(|op| matches!(op.action, Action::Enable(_)));
        // Before 6.12 most connections the walk enables are ones sock_ops
        // will not see close: the tracepoint watches from before the pass,
        // so that none closes unseen (detached afterwards if not needed).
        if enabling && loader::close_by_tracepoint(&self.layout)? {
            loader::watch_outside(&self.layout, loader::Watch::Conns)?;
        }
        let mut pending = Pending::open(&self.layout)?;
        pending.clear()?;
        for op in ops {
            pending.queue(op.conn, request_for(op.action, op.local))?;
        }
        // A lone cookie, or a lone peer with a local end, names at most one
        // socket: the walk can stop at it.
        let exact =
            ops.len() == 1 && (matches!(first.conn, ConnSpec::Cookie(_)) || first.local.is_some());
        let found = crate::pass::run(
            &self.layout.iter_apply(),
            first.netns.as_deref(),
            exact.then_some(1),
        );
        pending.clear()?;
        let records = parse_raw(&found?);
        if enabling {
            self.watch_if_outside(&records)?;
        }
        Ok(ops
            .iter()
            .map(|op| {
                records
                    .iter()
                    .filter(|r| record_matches(r, op.conn, op.local))
                    .map(ConnStatus::from_raw)
                    .collect()
            })
            .collect())
    }

    /// With the ports index: when the walk enabled a connection outside
    /// the attached cgroup, attaches the state tracepoint that reports its
    /// close (sock_ops never runs for it).
    pub(super) fn watch_if_outside(&self, records: &[ConnRecord]) -> Result<()> {
        if crate::pinned::index_mode_of(&self.layout) != loader::IndexMode::Ports {
            return Ok(());
        }
        let conns = lend::<HashMap<MapData, u64, ConnInfo>>(&self.layout, maps::CONNS)?;
        let outside = records.iter().any(|r| {
            conns
                .get(&r.cookie, 0)
                .is_ok_and(|i| i.flags & keepalive_common::conns::FLAGS_TRACEPOINT_CLOSE != 0)
        });
        if outside {
            loader::watch_outside(&self.layout, loader::Watch::Conns)?;
        } else if loader::close_by_tracepoint(&self.layout)? {
            loader::unwatch_outside_locked(&self.layout)?;
        }
        Ok(())
    }
}
