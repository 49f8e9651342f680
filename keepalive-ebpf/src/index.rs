//! The connection index: peer endpoint -> cookies (kept by the state
//! tracepoint and the seed pass) and cookie -> holder (kept by fd_install
//! and the fd seed pass). User space uses it to reach one connection
//! without walking the socket table; whatever the index cannot vouch for,
//! user space walks for.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_get_current_pid_tgid};
use keepalive_common::{
    index::{FdOwner, IndexKey, SlotInfo, PEER_SLOTS, SLOT_OVERFLOW, SLOT_UNWATCHED},
    stats,
};

use crate::{
    maps::{count, FDS, PEERS, SLOTS},
    sock::{ends, is_tcp, netns_inum, read, AF_INET, AF_INET6, SKC_FAMILY},
};

const E2BIG: i32 = -7;

/// Adds a connected socket to the peer index, once. `unwatched`: only the
/// state tracepoint will see it close (counted, for user space to know
/// when the tracepoint may go).
#[inline(always)]
pub fn add(sk: *const u8, cookie: u64, unwatched: bool) {
    // SAFETY: read-only lookup.
    if unsafe { SLOTS.get(&cookie) }.is_some() {
        return;
    }
    let Some(e) = ends(sk) else { return };
    if e.remote_port == 0 {
        return;
    }
    let mut key = IndexKey {
        netns: netns_inum(sk),
        addr: e.remote_addr,
        port: e.remote_port,
        slot: 0,
    };
    let mut full = false;
    for slot in 0..PEER_SLOTS {
        key.slot = slot;
        match PEERS.insert(&key, &cookie, BPF_NOEXIST as u64) {
            Ok(()) => {
                let mut info = SlotInfo { key, sk: sk as u64 };
                if unwatched {
                    info.key.slot |= SLOT_UNWATCHED;
                }
                if SLOTS.insert(&cookie, &info, 0).is_err() {
                    let _ = PEERS.remove(&key);
                    full = true;
                    break;
                }
                if unwatched {
                    count(stats::UNWATCHED_ADDED);
                }
                return;
            }
            Err(e) if e == E2BIG => {
                full = true;
                break;
            }
            Err(_) => {} // slot taken
        }
    }
    // No slot (or no room): the peer may now have connections the index
    // does not list; user space walks for it from now on.
    key.slot = SLOT_OVERFLOW;
    // NB: counted before the mark is written (see stats::PEER_OVERFLOWS).
    count(stats::PEER_OVERFLOWS);
    if full || PEERS.insert(&key, &0, 0).is_err() {
        count(stats::INDEX_FULL);
    }
}

/// Removes a closing socket from the peer index. (Its holder record, if
/// any, stays in the LRU fd map: keyed by the socket's address, it is
/// checked against the cookie before use, and ages out.)
#[inline(always)]
pub fn remove(cookie: u64) {
    // SAFETY: read-only lookup.
    let Some((key, unwatched)) =
        (unsafe { SLOTS.get(&cookie) }).map(|i| (i.peer_key(), i.unwatched()))
    else {
        return;
    };
    // NB: counted only by the one that removed it (sock_ops and the state
    // tracepoint may both see the close).
    if SLOTS.remove(&cookie).is_ok() && unwatched {
        count(stats::UNWATCHED_GONE);
    }
    // Only if the slot still holds this socket.
    // SAFETY: read-only lookup.
    if unsafe { PEERS.get(&key) }.is_some_and(|c| *c == cookie) {
        let _ = PEERS.remove(&key);
    }
}

/// `struct socket` is stable: `state`, `type`, `flags`, `file`, `sk`; the
/// loader checks these offsets against the kernel's BTF.
const SOCKET_TYPE: usize = 4;
const SOCKET_FILE: usize = 16;
const SOCKET_SK: usize = 24;
const SOCK_STREAM: u16 = 1;

/// Records that process `tgid` holds the socket behind `socket` as `fd`,
/// for IPv4/IPv6 stream sockets. `file`, when known, must be the socket's
/// own file (a descriptor that is not a socket fails this).
#[inline(always)]
pub fn record_fd(socket: *const u8, file: Option<u64>, tgid: u32, fd: u32) {
    if socket.is_null() {
        return;
    }
    if let Some(f) = file {
        let own: u64 = read(socket, SOCKET_FILE);
        if own != f {
            return;
        }
    }
    let ty: u16 = read(socket, SOCKET_TYPE);
    if ty != SOCK_STREAM {
        return;
    }
    let sk: u64 = read(socket, SOCKET_SK);
    if sk == 0 {
        return;
    }
    let family: u16 = read(sk as *const u8, SKC_FAMILY);
    if (family != AF_INET && family != AF_INET6) || !is_tcp(sk as *const u8) {
        return;
    }
    let owner = FdOwner { tgid, fd };
    // NB: a rescan finds most holders unchanged: a lookup is cheaper than
    // rewriting the LRU entry.
    // SAFETY: read-only lookup.
    if unsafe { FDS.get(&sk) }.is_some_and(|o| *o == owner) {
        return;
    }
    let _ = FDS.insert(&sk, &owner, 0);
}

/// The current process's tgid.
#[inline(always)]
pub fn current_tgid() -> u32 {
    // SAFETY: helper without arguments.
    (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32
}
