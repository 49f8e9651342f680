//! The direct path to a live connection: the kernel keeps an index of
//! peer endpoint -> socket cookies and cookie -> holding process and fd
//! (see `keepalive-ebpf/src/index.rs`). With it, `enable` reaches one
//! connection with `pidfd_getfd` and a plain `setsockopt`, in time that
//! does not grow with the number of sockets on the host.
//!
//! The index is a shortcut, never the authority: whenever it cannot vouch
//! for the complete answer (a peer with more connections than slots, a
//! full map, a holder that closed or passed on its descriptor, a cookie it
//! never saw) the caller walks the socket table instead.
use std::{
    fs::File,
    net::{SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
};

use aya::maps::{HashMap, MapData};
use keepalive_common::{
    index::{FdOwner, Found, IndexKey, Query, SlotInfo, FOUND_OWNER, FOUND_SLOT},
    maps,
};

use crate::{
    conn::{v6_bytes, ConnSpec},
    paths::PinLayout,
    Error, Result,
};

mod lookup;
mod state;

use lookup::{lookup, read_found, read_peer};
use state::index_overflowed;
pub use state::{kernel_counter, overflow_epoch, state, try_clear_overflow, IndexState};

/// Inode number of a network namespace (`--netns PATH`, or the calling
/// thread's: threads of one process may be in different ones).
/// The calling thread's is looked up once per thread: a thread that enters
/// another namespace (a pass with `--netns`) leaves it before it returns.
pub fn netns_inode(netns: Option<&Path>) -> Result<u64> {
    thread_local! {
        static OWN: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    }
    if netns.is_none() {
        if let Some(ino) = OWN.get() {
            return Ok(ino);
        }
    }
    let path = netns.unwrap_or(Path::new("/proc/thread-self/ns/net"));
    let ino = crate::access::open_netns(path)?
        .metadata()
        .map(|m| m.ino())
        .map_err(|source| Error::Netns {
            path: path.into(),
            source,
        })?;
    if netns.is_none() {
        OWN.set(Some(ino));
    }
    Ok(ino)
}

/// Records the holder of every socket that exists (one pass over all
/// processes' descriptors).
pub fn seed_fds(layout: &PinLayout) -> Result<()> {
    crate::pass::run(&layout.iter_seed_fds(), None, None).map(drop)
}

/// Indexes the connections of a network namespace that existed before
/// tcpka was loaded, once per namespace. Call with the installation lock
/// held. Returns whether the namespace is indexed (false when its record
/// does not fit: then the index cannot vouch for it and callers walk).
pub fn seed_netns(layout: &PinLayout, netns: Option<&Path>) -> Result<bool> {
    let inode = netns_inode(netns)? as u32;
    // Our own namespace outlives the installation's generation: once seeded,
    // remembered. (Another one may die and its inode be reused.)
    if netns.is_none()
        && crate::pinned::memo::<u32>(layout, "own_netns_seeded", || None) == Some(inode)
    {
        return Ok(true);
    }
    let mut seeded = crate::lend::lend::<HashMap<MapData, u32, u32>>(layout, maps::SEEDED)?;
    if seeded.get(&inode, 0).is_ok() {
        if netns.is_none() {
            crate::pinned::memo::<u32>(layout, "own_netns_seeded", || Some(inode));
        }
        return Ok(true);
    }
    // Before 6.12 sock_ops cannot be asked to watch what the pass indexes:
    // the state tracepoint does, from before the pass until none is left.
    let by_tracepoint = crate::loader::close_by_tracepoint(layout)?;
    if by_tracepoint {
        crate::loader::watch_outside(layout, crate::loader::Watch::IndexEntries)?;
    }
    crate::pass::run(&layout.iter_seed_peers(), netns, None)?;
    if by_tracepoint {
        crate::loader::unwatch_outside_locked(layout)?;
    }
    Ok(seeded.insert(inode, 1, 0).is_ok())
}

/// Whether the index holds connection `cookie` as one sock_ops does not
/// watch (before Linux 6.12, seeded at load): only a tracepoint sees its
/// close.
pub fn is_unwatched(layout: &PinLayout, cookie: u64) -> Result<bool> {
    let slots = crate::lend::lend::<HashMap<MapData, u64, SlotInfo>>(layout, maps::SLOTS)?;
    Ok(slots.get(&cookie, 0).is_ok_and(|i| i.unwatched()))
}

/// A live connection held through a duplicate of its owner's descriptor.
pub struct Held {
    pub cookie: u64,
    pub stream: TcpStream,
}

/// The connections `conn` names in namespace `netns`, found through the
/// index; `None` when the index cannot vouch for the complete answer.
pub fn resolve(
    layout: &PinLayout,
    conn: ConnSpec,
    local: Option<SocketAddr>,
    netns: Option<&Path>,
) -> Result<Option<Vec<Held>>> {
    let inode = netns_inode(netns)?;
    let Some(found) = indexed(layout, conn, local, inode)? else {
        return Ok(None);
    };
    // A cookie the index never saw is walked for.
    if found.iter().any(|f| f.flags & FOUND_SLOT == 0) {
        return Ok(None);
    }
    let socks: Vec<(u64, u64)> = found.iter().map(|f| (f.cookie, f.sk)).collect();
    // The namespace the kernel indexed each socket in (a socket never
    // changes namespace; the cookie is checked on the borrowed fd).
    let in_netns: Vec<bool> = found.iter().map(|f| f.netns == inode as u32).collect();
    let streams = borrow_holders(layout, &found, &socks)?;
    keep_asked(streams, socks, in_netns, conn, local, netns)
}

/// Each connection the index holds for `conn`, with its socket and
/// holder: from one run of the lookup program, or (an installation
/// without one) from the maps, a lookup each. `None` when the index
/// cannot vouch for the complete answer (it overflowed, or, with the ports
/// index, the ports asked for are not all index ports). Reads only.
fn indexed(
    layout: &PinLayout,
    conn: ConnSpec,
    local: Option<SocketAddr>,
    inode: u64,
) -> Result<Option<Vec<Found>>> {
    let mode = crate::pinned::index_mode_of(layout);
    // With the ports index, a connection with no index port at either end
    // is indexed only if a rule matched it: an empty answer proves nothing.
    let covered = |port: u16| -> Result<bool> {
        Ok(mode == crate::pinned::IndexMode::Host || crate::ports::is_index_port(layout, port)?)
    };
    let found: Vec<Found> = match conn {
        ConnSpec::Cookie(cookie) => {
            let q = Query {
                cookie,
                ..Query::default()
            };
            match lookup(layout, &q)? {
                Some(a) => vec![a.found[0]],
                None => vec![read_found(layout, cookie)?],
            }
        }
        ConnSpec::Peer(peer) => {
            if index_overflowed(layout)? {
                return Ok(None);
            }
            let complete = covered(peer.port())?
                || match local {
                    Some(l) => covered(l.port())?,
                    None => false,
                };
            if local.is_some() && !complete {
                return Ok(None);
            }
            let q = Query {
                key: peer_slot(inode, peer, 0),
                ..Query::default()
            };
            let (overflowed, found) = match lookup(layout, &q)? {
                Some(a) => (
                    a.overflowed != 0,
                    a.found.into_iter().filter(|f| f.cookie != 0).collect(),
                ),
                None => read_peer(layout, inode, peer)?,
            };
            if overflowed || (found.is_empty() && !complete) {
                return Ok(None);
            }
            found
        }
    };
    Ok(Some(found))
}

/// Borrows each socket of `found` (`socks`: cookie and `struct sock`)
/// from its holder; where the holder is unknown or gone, after one search
/// of every process's descriptors. `None` for a socket no process holds.
/// Call with the installation lock held (see [`find_holders`]); what it
/// borrowed is closed again on failure.
fn borrow_holders(
    layout: &PinLayout,
    found: &[Found],
    socks: &[(u64, u64)],
) -> Result<Vec<Option<TcpStream>>> {
    let mut streams: Vec<Option<TcpStream>> = found
        .iter()
        .map(|f| {
            (f.flags & FOUND_OWNER != 0)
                .then(|| borrow(f.owner, f.cookie))
                .flatten()
        })
        .collect();
    let missing: Vec<u64> = socks
        .iter()
        .zip(&streams)
        .filter(|(_, s)| s.is_none())
        .map(|(&(_, sk), _)| sk)
        .collect();
    if !missing.is_empty() {
        // Holder unknown or gone (a socket newer than the load, or one that
        // changed hands): one search of every process's descriptors, which
        // stops at the last one found.
        tracing::debug!("{} holder(s) unknown; searching descriptors", missing.len());
        find_holders(layout, &missing)?;
        let fds = crate::lend::lend::<HashMap<MapData, u64, FdOwner>>(layout, maps::FDS)?;
        for (s, &(cookie, sk)) in streams.iter_mut().zip(socks) {
            if s.is_none() {
                *s = fds.get(&sk, 0).ok().and_then(|o| borrow(o, cookie));
            }
        }
    }
    Ok(streams)
}

/// Of the borrowed sockets, those `conn` asks for: in namespace `netns`
/// (`in_netns`), with the local end asked for, and connected (for a
/// cookie). `None` when a socket no process holds may be one asked for
/// (the walk finds it). The sockets left out are closed again.
fn keep_asked(
    streams: Vec<Option<TcpStream>>,
    socks: Vec<(u64, u64)>,
    in_netns: Vec<bool>,
    conn: ConnSpec,
    local: Option<SocketAddr>,
    netns: Option<&Path>,
) -> Result<Option<Vec<Held>>> {
    let mut held = Vec::with_capacity(socks.len());
    // Whether the connection asked for (both ends given) is closing or gone
    // by sock_diag's word: asked once, for the first socket no process
    // holds.
    let mut closing: Option<bool> = None;
    for ((stream, (cookie, _)), ours) in streams.into_iter().zip(socks).zip(in_netns) {
        let Some(stream) = stream else {
            // No process holds this socket: its application has closed it
            // (LAST_ACK, FIN_WAIT, ... as a phone's connection ends), or it
            // is passing between processes, or waits to be accepted. With
            // both ends known, one exact sock_diag lookup tells a closing
            // connection from the others, instead of a walk of the whole
            // socket table, TIME_WAIT included.
            let closing = *closing.get_or_insert_with(|| match (conn, local, netns) {
                (ConnSpec::Peer(peer), Some(l), None) => {
                    crate::destroy::closing_or_gone(l, peer).unwrap_or(false)
                }
                _ => false,
            });
            if closing {
                continue;
            }
            return Ok(None);
        };
        if !ours {
            // A cookie names one socket host-wide: in another namespace it
            // is not the one asked for. Peers are indexed per namespace.
            continue;
        }
        if let Some(l) = local {
            if !same_end(stream.local_addr().ok(), l) {
                continue;
            }
        }
        // A socket not connected yet has no peer name for the reply; for a
        // cookie request the walk reports it from the kernel instead.
        if matches!(conn, ConnSpec::Cookie(_)) && stream.peer_addr().is_err() {
            return Ok(None);
        }
        held.push(Held { cookie, stream });
    }
    Ok(Some(held))
}

/// Finds who holds each of `socks` (`struct sock` addresses) with one pass
/// over every process's descriptors that stops once all are found; the
/// kernel records them in the fd map. Call with the installation lock held.
pub fn find_holders(layout: &PinLayout, socks: &[u64]) -> Result<()> {
    let mut want = crate::lend::lend::<HashMap<MapData, u64, FdOwner>>(layout, maps::WANT)?;
    let err = |e| Error::map("preparing the holder search", e);
    for k in want.keys().filter_map(Result::ok).collect::<Vec<_>>() {
        let _ = want.remove(&k);
    }
    let socks = &socks[..socks
        .len()
        .min(keepalive_common::index::WANT_MAX_ENTRIES as usize - 1)];
    for &sk in socks {
        want.insert(sk, FdOwner::default(), 0).map_err(err)?;
    }
    // Key 0: how many are still missing; the pass ends when it reaches 0.
    let left = FdOwner {
        tgid: socks.len() as u32,
        fd: 0,
    };
    want.insert(0, left, 0).map_err(err)?;
    let pin = layout.iter_find_fds();
    let mut file = File::open(&pin)
        .map_err(|e| Error::io(format!("running the iterator {}", pin.display()), e))?;
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut file, &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            // The program ended the pass early: everything was found.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
            Err(e) => {
                return Err(Error::io(
                    format!("reading the iterator {}", pin.display()),
                    e,
                ))
            }
        }
    }
    for k in want.keys().filter_map(Result::ok).collect::<Vec<_>>() {
        let _ = want.remove(&k);
    }
    Ok(())
}

/// The peer index's key for `peer` in namespace `inode`.
fn peer_slot(inode: u64, peer: SocketAddr, slot: u16) -> IndexKey {
    IndexKey {
        netns: inode as u32,
        addr: v6_bytes(peer.ip()),
        port: peer.port(),
        slot,
    }
}

/// Duplicates the holder's descriptor (`pidfd_getfd`) and checks that it is
/// still the same socket.
fn borrow(owner: FdOwner, cookie: u64) -> Option<TcpStream> {
    // SAFETY: plain syscalls; the returned fds are owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, owner.tgid as libc::pid_t, 0) };
    if pidfd < 0 {
        return None;
    }
    // SAFETY: a fresh fd we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: as above.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), owner.fd, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: pidfd_getfd returned a new descriptor that we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The holder may have closed the descriptor and reused its number.
    use crate::sockopt::{Cookie, Protocol};
    use nix::sys::socket::getsockopt;
    let same =
        getsockopt(&fd, Cookie) == Ok(cookie) && getsockopt(&fd, Protocol) == Ok(libc::IPPROTO_TCP);
    same.then(|| TcpStream::from(fd))
}

/// Local ends compare as the kernel sees them: an IPv4 address equals its
/// IPv4-mapped IPv6 form.
fn same_end(a: Option<SocketAddr>, b: SocketAddr) -> bool {
    a.is_some_and(|a| a.port() == b.port() && v6_bytes(a.ip()) == v6_bytes(b.ip()))
}
