//! The index lookups of one command, in one system call: user space runs
//! this XDP program with `BPF_PROG_TEST_RUN` (it is never attached to a
//! device), its "packet" a [`Query`] that the program fills in: the peer's
//! overflow mark, and for each of its slots the cookie, the socket and the
//! socket's holder. One run replaces a dozen map lookups, each a system
//! call of its own.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use keepalive_common::index::{
    IndexKey, Query, FOUND_OWNER, FOUND_SLOT, PEER_SLOTS, SLOT_OVERFLOW,
};

use crate::maps::{FDS, PEERS, SLOTS};

#[xdp]
pub fn tcpka_lookup(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + size_of::<Query>() > end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the packet holds a whole Query (checked above) and nothing
    // else reads or writes it while the program runs.
    let q = unsafe { &mut *(start as *mut Query) };
    if q.cookie != 0 {
        fill(q, 0, q.cookie);
        return xdp_action::XDP_PASS;
    }
    let mut key = IndexKey {
        netns: q.key.netns,
        addr: q.key.addr,
        port: q.key.port,
        slot: SLOT_OVERFLOW,
    };
    // SAFETY: read-only lookups.
    q.overflowed = u32::from(unsafe { PEERS.get(&key) }.is_some());
    for slot in 0..PEER_SLOTS {
        key.slot = slot;
        // SAFETY: as above.
        if let Some(&cookie) = unsafe { PEERS.get(&key) } {
            fill(q, slot as usize, cookie);
        }
    }
    xdp_action::XDP_PASS
}

/// Fills slot `i` of the answer with `cookie`'s socket and holder.
#[inline(always)]
fn fill(q: &mut Query, i: usize, cookie: u64) {
    let Some(f) = q.found.get_mut(i) else { return };
    f.cookie = cookie;
    // SAFETY: read-only lookups.
    let Some(info) = (unsafe { SLOTS.get(&cookie) }) else {
        return;
    };
    f.sk = info.sk;
    f.netns = info.key.netns;
    f.flags = FOUND_SLOT;
    // SAFETY: as above.
    if let Some(owner) = unsafe { FDS.get(&info.sk) } {
        f.owner = *owner;
        f.flags |= FOUND_OWNER;
    }
}
