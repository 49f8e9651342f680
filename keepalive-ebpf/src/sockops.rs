//! sock_ops: when a connection is established (either side), applies the
//! best matching rule and, with `--index ports`, indexes it if one of its
//! ports is an index port. Both kinds are then watched until they close
//! (the STATE callback), when `state.rs` forgets them; a rule with
//! `OPT_UNTRACKED` only sets the values.
//!
//! A connection whose ports no rule and no index port names costs five array
//! reads: every process in the cgroup pays this program on each connection.
//!
//! # Minimum kernel version
//! 5.7 (cgroup links); `bpf_setsockopt` for TCP_USER_TIMEOUT needs 5.x.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, BPF_TCP_FIN_WAIT1, BPF_TCP_LAST_ACK,
    },
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_ns,
        generated::{bpf_skc_to_tcp_sock, bpf_sock_ops_cb_flags_set},
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use keepalive_common::{
    conns::{ConnInfo, SOURCE_RULE},
    events::KIND_APPLIED,
    ports::{FLAG_RULE_EVENTS, FLAG_TRACE},
    risk::Risk,
    rules::OPT_UNTRACKED,
    stats,
};

use crate::{
    apply::{apply_policy, best_rule, emit_with, Candidates},
    index,
    maps::{count, host_index, index_port, port_flags, CONNS, RISK},
    risk, state,
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
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            risk::on_send(ops);
            Ok(())
        }
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => {
            risk::on_receive(ops);
            Ok(())
        }
        BPF_SOCK_OPS_RTO_CB => {
            risk::on_rto(ops);
            Ok(())
        }
        BPF_SOCK_OPS_RETRANS_CB => {
            risk::on_retrans(ops);
            Ok(())
        }
        BPF_SOCK_OPS_STATE_CB => {
            // args[1] is the new state; the callback runs before the change.
            let new = field!(ops, __bindgen_anon_1.args[1]);
            if new == BPF_TCP_FIN_WAIT1 || new == BPF_TCP_LAST_ACK || new == BPF_TCP_CLOSE {
                // This end closes: its FIN or RST and what follows need no
                // early warning (the callbacks would run for each of them).
                risk::stop(ops);
            }
            if new == BPF_TCP_CLOSE && !host_index() {
                let sk = full_sock(ops).ok_or(())?;
                // SAFETY: sock_ops context is a valid argument for the helper.
                let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
                // Index ports are fixed at load: a connection on none of
                // them was never indexed (the ports are still bound here:
                // the callback runs before the state changes).
                let (local, remote) = ports(ops);
                state::forget(sk, cookie, index_port(port_flags(), local, remote));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The context's socket as a BTF `struct tcp_sock` pointer, which the
/// shared socket readers (`sock.rs`) accept.
#[inline(always)]
fn full_sock(ops: *mut bpf_sock_ops) -> Option<*const u8> {
    let sk = field!(ops, __bindgen_anon_2.sk);
    if sk.is_null() {
        return None;
    }
    // SAFETY: a non-null socket pointer from the context.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    (!tp.is_null()).then_some(tp as *const u8)
}

/// The local and remote ports, host order. (local_port is host order;
/// remote_port holds the network-order port in its upper 16 bits on
/// little-endian hosts, which from_be undoes.)
#[inline(always)]
fn ports(ops: *mut bpf_sock_ops) -> (u16, u16) {
    (
        field!(ops, local_port) as u16,
        u32::from_be(field!(ops, remote_port)) as u16,
    )
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
        // NB: not a zeroed array filled in: LLVM zeroes it with a call to
        // memset, a subprogram whose frame Linux 6.1 adds to this program's
        // (over its 512-byte stack limit).
        // SAFETY: four u32 are sixteen bytes, in the words' native order as
        // to_ne_bytes would give them; any bit pattern is a valid u8.
        unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
    }};
}

/// Indexes a connection (an index port) and watches it until it closes:
/// state.rs reports a managed connection's end and forgets what was kept
/// about it.
#[inline(always)]
fn watch(ops: *mut bpf_sock_ops, host: bool, indexed: bool, cookie: u64) {
    if indexed {
        if let Some(sk) = full_sock(ops) {
            index::add(sk, cookie, false);
        }
    }
    if !host {
        let cb = field!(ops, bpf_sock_ops_cb_flags);
        // With the early-warning callbacks (`risk.rs`): they run only for
        // these connections, and cost nothing until a probe or a
        // retransmission.
        let flags = cb | BPF_SOCK_OPS_STATE_CB_FLAG | risk::CB_FLAGS;
        // SAFETY: `ops` is this program's sock_ops context, a valid
        // argument for the helper.
        if unsafe { bpf_sock_ops_cb_flags_set(ops, flags as i32) } != 0 {
            count(stats::CLOSE_WATCH_ERRORS);
        }
    }
}

/// A rule's own early-warning thresholds (defaults when it has none).
#[inline(always)]
fn rule_risk(id: u32) -> Risk {
    // SAFETY: read-only lookup.
    unsafe { RISK.get(&id) }.copied().unwrap_or_default()
}

fn established(ops: *mut bpf_sock_ops) -> Result<(), ()> {
    let family = field!(ops, family);
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    let (local_port, remote_port) = ports(ops);

    // The port filter first: a connection nobody named stops here.
    let flags = port_flags();
    let candidates = Candidates::new(flags, local_port, remote_port);
    let host = host_index();
    let indexed = !host && index_port(flags, local_port, remote_port);
    if !candidates.any() && !indexed {
        return Ok(());
    }
    let addr = addr!(ops, family, remote_ip4, remote_ip6);
    let rule = best_rule(&candidates, addr);
    let trace = flags & FLAG_TRACE != 0;
    if trace {
        // NB: aya-log's macros take a context they do not use.
        match &rule {
            Some(r) => aya_log_ebpf::info!(
                &(),
                "new connection {}->{}: rule {} (idle {} count {} interval {}), indexed {}",
                local_port,
                remote_port,
                r.id,
                r.policy.idle,
                r.policy.count,
                r.policy.interval,
                indexed as u8
            ),
            None if indexed => aya_log_ebpf::debug!(
                &(),
                "new connection {}->{}: no rule, indexed",
                local_port,
                remote_port
            ),
            None => {}
        }
    }
    if rule.is_none() && !indexed {
        return Ok(());
    }
    let tracked = rule.is_some_and(|r| r.opts & OPT_UNTRACKED == 0);
    // An untracked rule (the default) on no index port takes no cookie, no
    // map entry and no close watch.
    let cookie = if indexed || tracked {
        // SAFETY: sock_ops context is a valid argument for the helper.
        let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
        watch(ops, host, indexed, cookie);
        cookie
    } else {
        0
    };
    let rule = rule.ok_or(())?;
    let policy = rule.policy;
    if !apply_policy(ops.cast(), &policy) && trace {
        aya_log_ebpf::warn!(
            &(),
            "new connection {}->{}: the kernel refused a keepalive option of rule {}",
            local_port,
            remote_port,
            rule.id
        );
    }
    count(stats::APPLIED_RULE);
    if !tracked {
        return Ok(());
    }

    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let info = ConnInfo {
        policy,
        source: SOURCE_RULE,
        rule_id: rule.id,
        flags: 0,
        applied_ns: now,
        risk: rule_risk(rule.id),
        _pad: 0,
    };
    if CONNS.insert(&cookie, &info, 0).is_err() {
        count(stats::CONNS_FULL);
        if trace {
            aya_log_ebpf::warn!(
                &(),
                "new connection {}->{}: the connection map is full; not tracked",
                local_port,
                remote_port
            );
        }
    }
    if flags & FLAG_RULE_EVENTS == 0 {
        return Ok(());
    }
    let local_addr = addr!(ops, family, local_ip4, local_ip6);
    // SAFETY: `e` is a reserved ring slot; every field is written.
    emit_with(KIND_APPLIED, |e| unsafe {
        (*e).family = family;
        (*e).cookie = cookie;
        (*e).ts_ns = now;
        (*e).local_addr = local_addr;
        (*e).remote_addr = addr;
        (*e).local_port = local_port;
        (*e).remote_port = remote_port;
        (*e).rule_id = rule.id;
        (*e).policy = policy;
        (*e).source = SOURCE_RULE;
        (*e).error = 0;
        (*e).detail = 0;
        (*e).ack_age_ms = u32::MAX;
        (*e).risk = info.risk;
    });
    Ok(())
}
