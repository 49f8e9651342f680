//! Live connections: enable, disable, close and status, and batches of
//! commands; each goes the direct path (`direct.rs`) or walks the socket
//! table (`walk.rs`); holders are in `holding.rs`.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, MapData};
use keepalive_common::{
    conns::{ConnInfo, FLAG_CLOSING},
    maps,
};

use super::{
    status::{parse_records, ConnStatus, Outcome},
    walk::same_key,
    Action, Enforcer, BPF_EXIST,
};
use crate::{
    conn::{parse_endpoint, ConnSpec},
    holders::Holders,
    lend::lend,
    loader,
    policy::Policy,
    Error, InvalidInput, Result,
};

pub(super) fn no_such(conn: ConnSpec, local: Option<SocketAddr>) -> Error {
    let mut what = conn.to_string();
    if let Some(l) = local {
        what.push_str(&format!(" with local end {l}"));
    }
    Error::NoSuchConnection(what)
}

/// Not connected yet (SYN_SENT), a socket has no peer name to read; a
/// peer request knows it.
pub(super) fn remote_hint(conn: ConnSpec) -> Option<SocketAddr> {
    match conn {
        ConnSpec::Peer(p) => Some(p),
        ConnSpec::Cookie(_) => None,
    }
}

pub(super) fn one(mut results: Vec<Result<Outcome>>) -> Result<Outcome> {
    results.pop().expect("one result")
}

/// One command of a batch.
#[derive(Clone, Debug)]
pub struct Op {
    pub conn: ConnSpec,
    pub local: Option<SocketAddr>,
    pub action: Action,
    pub holder: Option<String>,
    pub netns: Option<PathBuf>,
}

impl Op {
    /// A command without a holder.
    pub fn new(
        conn: ConnSpec,
        local: Option<SocketAddr>,
        action: Action,
        netns: Option<&Path>,
    ) -> Self {
        Self {
            conn,
            local,
            action,
            holder: None,
            netns: netns.map(Path::to_path_buf),
        }
    }

    /// A command from the text of its fields (the API's and evapi's): a
    /// query until the caller gives it an action.
    pub fn parse(
        conn: &str,
        local: Option<&str>,
        holder: Option<&str>,
        netns: Option<PathBuf>,
    ) -> std::result::Result<Self, InvalidInput> {
        Ok(Self {
            conn: conn.parse()?,
            local: local.map(parse_endpoint).transpose()?,
            action: Action::Query,
            holder: holder.map(crate::holders::parse_holder).transpose()?,
            netns,
        })
    }
}

impl Enforcer {
    /// Applies an action to live connections at once, also idle ones and
    /// ones established before tcpka was loaded, in the network namespace
    /// `netns` (default: our own). Returns the connections it touched,
    /// with the values read back from the kernel; fails with
    /// [`Error::NoSuchConnection`] when none matched (nothing changed).
    pub fn apply(
        &self,
        conn: ConnSpec,
        local: Option<SocketAddr>,
        action: Action,
        netns: Option<&Path>,
    ) -> Result<Vec<ConnStatus>> {
        // One pass at a time per installation: a pass applies every pending
        // request, so serialising keeps each command's result its own.
        let _lock = self.lock()?;
        self.apply_locked(conn, local, action, netns)
    }

    /// Ends the connections CONN names from the kernel side (the reference's
    /// `tcp_close_connection`): each is destroyed ([`crate::destroy`]), its
    /// owner's next call fails, its peer gets a reset. Listening sockets
    /// are refused, before anything is closed. Returns the connections
    /// closed, as they were.
    pub fn close(
        &self,
        conn: ConnSpec,
        local: Option<SocketAddr>,
        netns: Option<&Path>,
    ) -> Result<Vec<ConnStatus>> {
        let found = self.apply(conn, local, Action::Query, netns)?;
        if found.is_empty() {
            return Err(no_such(conn, local));
        }
        if found.iter().any(|c| c.state == "listen") {
            return Err(Error::Invalid(InvalidInput::Conn {
                value: conn.to_string(),
                reason:
                    "is a listening socket: closing it would stop the server; name a connection",
            }));
        }
        let parse = |s: &str| {
            s.parse::<SocketAddr>().map_err(|_| Error::BadRecord {
                what: format!("closing {conn}"),
                why: format!("the endpoint {s:?} the walk gave is not an address"),
            })
        };
        let mut conns = lend::<HashMap<MapData, u64, ConnInfo>>(&self.layout, maps::CONNS)?;
        let mut closed = Vec::new();
        for c in found {
            // A managed connection is marked first, so that its end is
            // reported as tcpka's doing, not as an anonymous abort. (One
            // that closes meanwhile is simply gone: BPF_EXIST fails.)
            let marked = conns.get(&c.cookie, 0).ok().and_then(|mut info| {
                info.flags |= FLAG_CLOSING;
                conns.insert(c.cookie, info, BPF_EXIST).ok().map(|()| info)
            });
            if let Err(e) =
                crate::destroy::destroy(parse(&c.local)?, parse(&c.remote)?, c.cookie, netns)
            {
                if let Some(mut info) = marked {
                    info.flags &= !FLAG_CLOSING;
                    let _ = conns.insert(c.cookie, info, BPF_EXIST);
                }
                return Err(e);
            }
            closed.push(c);
        }
        Ok(closed)
    }

    /// Enables keepalive and, with a holder, records it on every connection
    /// changed.
    pub fn enable(
        &self,
        conn: ConnSpec,
        local: Option<SocketAddr>,
        policy: Policy,
        holder: Option<&str>,
        netns: Option<&Path>,
    ) -> Result<Vec<ConnStatus>> {
        let op = Op {
            conn,
            local,
            action: Action::Enable(policy),
            holder: holder.map(str::to_owned),
            netns: netns.map(Path::to_path_buf),
        };
        one(self.run_batch(vec![op])).map(|d| d.changed)
    }

    /// Disables keepalive. With a holder, only removes that holder from
    /// connections that still have others (they keep keepalive); without,
    /// disables and forgets every holder, like the reference module.
    pub fn disable(
        &self,
        conn: ConnSpec,
        local: Option<SocketAddr>,
        holder: Option<&str>,
        netns: Option<&Path>,
    ) -> Result<Outcome> {
        let op = Op {
            conn,
            local,
            action: Action::Disable,
            holder: holder.map(str::to_owned),
            netns: netns.map(Path::to_path_buf),
        };
        one(self.run_batch(vec![op]))
    }

    /// Runs several commands under one lock, sharing the kernel work: each
    /// connection the index knows is reached directly; the others are
    /// found in as few walks of the socket table as their keys allow (one
    /// for all cookie requests, one for all peer requests, per namespace).
    /// Results come back in the order of `ops`.
    pub fn run_batch(&self, ops: Vec<Op>) -> Vec<Result<Outcome>> {
        let _lock = match self.lock() {
            Ok(l) => l,
            Err(e) => return lock_failed(ops.len(), e),
        };
        let mut results: Vec<Option<Result<Outcome>>> = ops.iter().map(|_| None).collect();
        // Before any walk: see index::try_clear_overflow.
        let epoch = crate::index::overflow_epoch(&self.layout).ok();
        let mut walk = self.run_direct(&ops, &mut results);
        while !walk.is_empty() {
            let group = next_walk_group(&ops, &mut walk);
            self.run_walk(&ops, &group, epoch, &mut results);
        }
        results
            .into_iter()
            .map(|r| r.expect("every command has a result"))
            .collect()
    }

    /// The first pass of [`Self::run_batch`]: a holder's disable, the
    /// room check of a holder's enable, and each command the index
    /// reaches directly get their result in `results`. Returns the indexes
    /// of the commands left for a walk. Call with the lock held.
    fn run_direct(&self, ops: &[Op], results: &mut [Option<Result<Outcome>>]) -> Vec<usize> {
        let mut walk: Vec<usize> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if matches!(op.action, Action::Disable) && op.holder.is_some() {
                results[i] = Some(self.disable_held_locked(op));
                continue;
            }
            // A holder that cannot be recorded must not leave a policy
            // applied without it: check for room before anything changes.
            if matches!(op.action, Action::Enable(_)) && op.holder.is_some() {
                if let Err(e) = Holders::open(&self.layout).and_then(|mut h| h.check_room()) {
                    results[i] = Some(Err(e));
                    continue;
                }
            }
            match self.try_index(op.conn, op.local, op.action, op.netns.as_deref()) {
                Ok(Some(found)) => results[i] = Some(self.finish(op, found)),
                Ok(None) => walk.push(i),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        walk
    }

    /// Walks the socket table once for the commands `group` (see
    /// [`next_walk_group`]) and puts their results in `results`; a walk
    /// that fails fails each of them. A walk for a whole peer lets an
    /// overflowed peer go back to the index (from `epoch`). Call with the
    /// lock held.
    fn run_walk(
        &self,
        ops: &[Op],
        group: &[usize],
        epoch: Option<u64>,
        results: &mut [Option<Result<Outcome>>],
    ) {
        let items: Vec<&Op> = group.iter().map(|&i| &ops[i]).collect();
        match self.walk(&items) {
            Ok(found) => {
                for (&i, found) in group.iter().zip(found) {
                    // A walk for a whole peer sees all its connections:
                    // an overflowed peer may go back to the index.
                    if let (ConnSpec::Peer(peer), None, Some(epoch)) =
                        (ops[i].conn, ops[i].local, epoch)
                    {
                        let cookies: Vec<u64> = found.iter().map(|c| c.cookie).collect();
                        if let Err(e) = crate::index::try_clear_overflow(
                            &self.layout,
                            peer,
                            ops[i].netns.as_deref(),
                            &cookies,
                            epoch,
                        ) {
                            tracing::warn!("re-indexing {peer}: {e}");
                        }
                    }
                    results[i] = Some(self.finish(&ops[i], found));
                }
            }
            Err(e) => {
                for &i in group {
                    results[i] = Some(Err(e.again()));
                }
            }
        }
    }

    pub(super) fn apply_locked(
        &self,
        conn: ConnSpec,
        local: Option<SocketAddr>,
        action: Action,
        netns: Option<&Path>,
    ) -> Result<Vec<ConnStatus>> {
        let found = match self.try_index(conn, local, action, netns)? {
            Some(found) => found,
            None => self
                .walk(&[&Op::new(conn, local, action, netns)])?
                .pop()
                .unwrap_or_default(),
        };
        if found.is_empty() {
            return Err(no_such(conn, local));
        }
        Ok(found)
    }

    /// Every connection tcpka manages in `netns`, values read back from the
    /// kernel.
    pub fn status(&self, netns: Option<&Path>) -> Result<Vec<ConnStatus>> {
        if loader::installed(&self.layout)?.is_none() {
            return Err(Error::NotLoaded {
                pin_dir: self.layout.dir().into(),
            });
        }
        let buf = crate::pass::run(&self.layout.iter_status(), netns, None)?;
        let mut out = parse_records(&buf);
        out.sort_by_key(|c| c.cookie);
        self.attach_holders(&mut out)?;
        Ok(out)
    }
}

/// The results of a batch of `n` commands that could not take the lock:
/// the lock's error for each (the last gets `e` itself).
fn lock_failed(n: usize, e: Error) -> Vec<Result<Outcome>> {
    let mut out: Vec<Result<Outcome>> = (1..n).map(|_| Err(e.again())).collect();
    out.push(Err(e));
    out
}

/// Takes from `walk` the commands one walk of the socket table serves
/// together: same namespace, same kind of key (a socket matched by a
/// cookie request would hide it from a peer request in the same pass),
/// distinct keys. The others stay in `walk`, in order.
fn next_walk_group(ops: &[Op], walk: &mut Vec<usize>) -> Vec<usize> {
    let first = &ops[walk[0]];
    let mut group: Vec<usize> = Vec::new();
    let mut rest = Vec::new();
    for &i in walk.iter() {
        let op = &ops[i];
        let same_kind = matches!(
            (op.conn, first.conn),
            (ConnSpec::Cookie(_), ConnSpec::Cookie(_)) | (ConnSpec::Peer(_), ConnSpec::Peer(_))
        );
        let clash = group.iter().any(|&g| same_key(ops[g].conn, op.conn));
        if same_kind && op.netns == first.netns && !clash {
            group.push(i);
        } else {
            rest.push(i);
        }
    }
    *walk = rest;
    group
}
