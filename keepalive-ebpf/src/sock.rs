//! Reading a socket's addresses, ports, state and network namespace from
//! `struct sock_common`, shared by the programs that see socket pointers.
use aya_ebpf::helpers::generated::bpf_probe_read_kernel;

use crate::offsets::offset;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

// Stable offsets in `struct sock_common`.
pub const SKC_DADDR: usize = 0;
pub const SKC_RCV_SADDR: usize = 4;
pub const SKC_DPORT: usize = 12;
pub const SKC_NUM: usize = 14;
pub const SKC_FAMILY: usize = 16;
pub const SKC_STATE: usize = 18;

/// The addresses and ports of one socket.
pub struct Ends {
    pub family: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub state: u8,
}

/// Reads a field at a configuration-dependent offset through the probe
/// helper; a fault leaves zeroes (the helper clears what it cannot read).
#[inline(always)]
pub fn read<T: Copy>(sk: *const u8, off: usize) -> T {
    // NB: not zeroed first: LLVM zeroes a 16-byte value with a call to
    // memset, a subprogram whose frame Linux 6.1 adds to the caller's
    // (over its 512-byte stack limit). The helper takes uninitialised
    // memory.
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: the destination is exactly `v`; the helper checks the kernel
    // address.
    let _ = unsafe {
        bpf_probe_read_kernel(
            v.as_mut_ptr().cast(),
            size_of::<T>() as u32,
            sk.wrapping_add(off).cast(),
        )
    };
    // SAFETY: the helper wrote every byte: what it read, or zeroes.
    unsafe { v.assume_init() }
}

/// Loads a field at one of the stable `sock_common` offsets directly: the
/// verifier checks it against BTF and turns it into a fault-safe load,
/// cheaper than a helper call on the path every socket takes.
#[inline(always)]
pub fn load<T: Copy>(sk: *const u8, off: usize) -> T {
    // SAFETY: `sk` is the iterator's `sock_common`; `off` is a constant
    // offset of a field of type T.
    unsafe { core::ptr::read_volatile(sk.add(off) as *const T) }
}

#[inline(always)]
pub fn v4_mapped(ip: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip[0], ip[1], ip[2], ip[3],
    ]
}

#[inline(always)]
pub fn ends(sk: *const u8) -> Option<Ends> {
    let family: u16 = load(sk, SKC_FAMILY);
    let (local_addr, remote_addr) = if family == AF_INET {
        let saddr: u32 = load(sk, SKC_RCV_SADDR);
        let daddr: u32 = load(sk, SKC_DADDR);
        (
            v4_mapped(saddr.to_ne_bytes()),
            v4_mapped(daddr.to_ne_bytes()),
        )
    } else if family == AF_INET6 {
        (
            read(sk, offset!(skc_v6_rcv_saddr)),
            read(sk, offset!(skc_v6_daddr)),
        )
    } else {
        return None;
    };
    let dport: u16 = load(sk, SKC_DPORT);
    Some(Ends {
        family,
        local_addr,
        remote_addr,
        local_port: load(sk, SKC_NUM),
        remote_port: u16::from_be(dport),
        state: load(sk, SKC_STATE),
    })
}

/// Inode number of the socket's network namespace.
#[inline(always)]
pub fn netns_inum(sk: *const u8) -> u32 {
    let net: u64 = read(sk, offset!(skc_net));
    read(net as *const u8, offset!(net_ns_inum))
}

const IPPROTO_TCP: u16 = 6;

/// Whether a socket is TCP (SCTP and MPTCP share families and types).
#[inline(always)]
pub fn is_tcp(sk: *const u8) -> bool {
    let proto: u16 = read(sk, offset!(sk_protocol));
    proto == IPPROTO_TCP
}

/// Deepest cgroup level looked at.
const MAX_LEVEL: u32 = 32;

/// Whether the socket belongs to cgroup `id` or one below it, i.e. whether
/// a sock_ops program attached there runs for it: `sk_cgrp_data.cgroup`,
/// whose `ancestors[level]` is itself and `ancestors[0]` the root.
#[inline(always)]
pub fn in_cgroup(sk: *const u8, id: u64) -> bool {
    let (cgrp, level_off, anc_off, kn_off, kid_off) = (
        offset!(sk_cgroup),
        offset!(cgroup_level),
        offset!(cgroup_ancestors),
        offset!(cgroup_kn),
        offset!(kernfs_id),
    );
    // `struct sock_cgroup_data` starts with the cgroup pointer.
    let cg: u64 = read(sk, cgrp);
    if cg == 0 {
        return false;
    }
    let level: i32 = read(cg as *const u8, level_off);
    let level = (level.max(0) as u32).min(MAX_LEVEL);
    for i in 0..=MAX_LEVEL {
        if i > level {
            break;
        }
        let anc: u64 = read(cg as *const u8, anc_off + 8 * i as usize);
        let kn: u64 = read(anc as *const u8, kn_off);
        let kid: u64 = read(kn as *const u8, kid_off);
        if anc != 0 && kid == id {
            return true;
        }
    }
    false
}
