//! sock_ops: applies the best matching rule when a connection is
//! established (either side). `close.rs` forgets it when it closes.
//!
//! # Minimum kernel version
//! 5.7 (cgroup links); `bpf_setsockopt` for TCP_USER_TIMEOUT needs 5.x.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use keepalive_common::{
    conns::{ConnInfo, SOURCE_RULE},
    events::{Event, KIND_APPLIED},
    stats,
};

use crate::{
    apply::{apply_policy, best_rule, emit},
    maps::{count, CONNS},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sock_ops]
pub fn tcpka_sockops(ctx: SockOpsContext) -> u32 {
    match try_sockops(&ctx) {
        Ok(()) | Err(()) => 1,
    }
}

// NB: every ctx field is read with a volatile load at its own address.
// Copying an array field (aya's `local_ip6()`) makes LLVM load it through a
// modified ctx pointer, which the verifier rejects ("dereference of modified
// ctx ptr").
macro_rules! field {
    ($ops:expr, $($f:tt)+) => {
        // SAFETY: `$ops` is the context pointer the kernel handed us.
        unsafe { read_volatile(addr_of!((*$ops).$($f)+)) }
    };
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), ()> {
    let ops = ctx.ops;
    let op = field!(ops, op);
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            established(ops)
        }
        _ => Ok(()),
    }
}

/// Reads one end's address as IPv6 bytes (IPv4 mapped), network order.
///
/// NB: all five fields are read unconditionally and only the values are
/// chosen by family. Choosing which field to read lets LLVM compute the
/// field address (`ctx + r1`), which the verifier rejects ("dereference of
/// modified ctx ptr").
macro_rules! addr {
    ($ops:expr, $family:expr, $ip4:ident, $ip6:ident) => {{
        let ip4: u32 = field!($ops, $ip4);
        let w0: u32 = field!($ops, $ip6[0]);
        let w1: u32 = field!($ops, $ip6[1]);
        let w2: u32 = field!($ops, $ip6[2]);
        let w3: u32 = field!($ops, $ip6[3]);
        let words = if $family == AF_INET {
            [0, 0, u32::from_be(0xffff), ip4]
        } else {
            [w0, w1, w2, w3]
        };
        let mut addr = [0u8; 16];
        addr[0..4].copy_from_slice(&words[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&words[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&words[2].to_ne_bytes());
        addr[12..16].copy_from_slice(&words[3].to_ne_bytes());
        addr
    }};
}

fn established(ops: *mut bpf_sock_ops) -> Result<(), ()> {
    let family = field!(ops, family);
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    let addr = addr!(ops, family, remote_ip4, remote_ip6);
    // local_port is host order; remote_port holds the network-order port in
    // its upper 16 bits on little-endian hosts, which from_be undoes.
    let local_port = field!(ops, local_port) as u16;
    let remote_port = u32::from_be(field!(ops, remote_port)) as u16;

    let rule = best_rule(local_port, remote_port, addr).ok_or(())?;
    let policy = rule.policy;
    apply_policy(ops.cast(), &policy);
    count(stats::APPLIED_RULE);

    // SAFETY: sock_ops context is a valid argument for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let info = ConnInfo {
        policy,
        source: SOURCE_RULE,
        rule_id: rule.id,
        _pad: 0,
        applied_ns: now,
    };
    emit(&Event {
        kind: KIND_APPLIED,
        family,
        cookie,
        ts_ns: now,
        local_addr: addr!(ops, family, local_ip4, local_ip6),
        remote_addr: addr,
        local_port,
        remote_port,
        rule_id: rule.id,
        policy,
        source: SOURCE_RULE,
        error: 0,
        _pad: 0,
    });
    if CONNS.insert(&cookie, &info, 0).is_err() {
        count(stats::CONNS_FULL);
    }
    Ok(())
}
