//! A connection's changes of TCP state: tp_btf/inet_sock_set_state indexes
//! every connection as it connects and forgets it when it closes (`--index
//! host`), and what happens when a managed connection closes ([`forget`]:
//! its entries go, its end is reported). With the
//! default `--index ports`, sock_ops calls [`forget`] instead, for the
//! connections it was asked to watch.
//!
//! # Minimum kernel version
//! 5.5 (BTF-enabled raw tracepoints).
use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use aya_ebpf::{
    bindings::{BPF_TCP_CLOSE, BPF_TCP_ESTABLISHED, BPF_TCP_SYN_RECV, BPF_TCP_SYN_SENT},
    helpers::bpf_get_socket_cookie,
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use keepalive_common::{
    conns::{ConnInfo, FLAGS_TRACEPOINT_CLOSE, FLAG_CLOSING, SOURCE_COMMAND, SOURCE_RULE},
    events::{KIND_ABORTED, KIND_CLOSED, KIND_CLOSED_BY_TCPKA, KIND_RESET, KIND_TIMEOUT},
    ports, stats,
};

use crate::{
    apply::emit_with,
    index,
    maps::{count, host_index, index_port, port_flags, CONNS, HOLDER_COUNT, SLOTS},
    offsets::offset,
    sock::{ends, is_tcp, load, read, SKC_DPORT},
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcpka_state(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let newstate = ctx.arg::<u64>(2) as u32;
    if !host_index() {
        // Attached only while connections whose close sock_ops will not see
        // are managed (outside the cgroup; before 6.12, those it did not
        // see connect): their close is reported here, as it happens,
        // everything else by sock_ops.
        if newstate != BPF_TCP_CLOSE {
            return 0;
        }
        // Index entries sock_ops does not watch are forgotten by
        // [`tcpka_destroy`] (one run per socket, not one per state change).
        let flags = port_flags();
        if flags & (ports::FLAG_WATCH_CONNS | ports::FLAG_WATCH_INDEXED) == 0 {
            return 0;
        }
        let sk: *mut core::ffi::c_void = ctx.arg(0);
        if flags & ports::FLAG_WATCH_CONNS == 0 {
            // Only connections on index ports need it: a port check before
            // any map work, for every other connection on the host.
            // NB: not skc_num, which the port's release zeroes before the
            // tracepoint runs (a passive close): inet_sport stays.
            let sport: u16 = read(sk as *const u8, offset!(inet_sport));
            let local = u16::from_be(sport);
            let remote: u16 = u16::from_be(load(sk as *const u8, SKC_DPORT));
            if !index_port(flags, local, remote) {
                return 0;
            }
        }
        if !is_tcp(sk as *const u8) {
            return 0;
        }
        // SAFETY: a `struct sock` pointer from the tracepoint.
        let cookie = unsafe { bpf_get_socket_cookie(sk) };
        // SAFETY: read-only lookup.
        if unsafe { CONNS.get(&cookie) }.is_some_and(|i| i.flags & FLAGS_TRACEPOINT_CLOSE != 0) {
            forget(sk as *const u8, cookie, true);
        }
        return 0;
    }
    let connecting = matches!(
        newstate,
        BPF_TCP_SYN_SENT | BPF_TCP_SYN_RECV | BPF_TCP_ESTABLISHED
    );
    if newstate != BPF_TCP_CLOSE && !connecting {
        return 0;
    }
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    // NB: SCTP and DCCP use this tracepoint too.
    if !is_tcp(sk as *const u8) {
        return 0;
    }
    // SAFETY: a `struct sock` pointer from the tracepoint.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    if connecting {
        // Indexed from the first state that knows the peer, so a command
        // for a connection still being set up finds it too.
        index::add(sk as *const u8, cookie, false);
        return 0;
    }
    forget(sk as *const u8, cookie, true);
    0
}

/// A TCP socket is destroyed: before Linux 6.12, attached while index
/// entries that sock_ops does not watch (connections from before the load,
/// which it did not see connect) are left, to forget them. Two runs per
/// connection (one per end) where the state tracepoint has six, and a port
/// check before any map work: what every other connection on the host
/// pays. The index may keep a closed socket until its owner releases it;
/// a lookup of it finds a closed connection, as one racing a close would.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcpka_destroy(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct sock *sk); TCP's own (tcp_v4_destroy_sock, which
    // IPv6 calls too).
    let sk: *const u8 = ctx.arg(0);
    // NB: not skc_num, which the port's release zeroes before the socket
    // is destroyed: inet_sport stays.
    let sport: u16 = read(sk, offset!(inet_sport));
    let local = u16::from_be(sport);
    let remote: u16 = u16::from_be(load(sk, SKC_DPORT));
    if !index_port(port_flags(), local, remote) {
        return 0;
    }
    // SAFETY: a `struct sock` pointer from the tracepoint.
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut core::ffi::c_void) };
    // SAFETY: read-only lookup.
    if unsafe { SLOTS.get(&cookie) }.is_some_and(|i| i.unwatched()) {
        index::remove(cookie);
    }
    0
}

/// A connection is closing: report how it ended if tcpka manages it, and
/// drop everything kept about it. `sk` is a BTF `struct sock` pointer;
/// `maybe_indexed` is false when the caller knows the index cannot hold it.
///
/// NB: every lookup here is a likely cache miss in a large table, paid on
/// each managed connection's close: only the tables that can hold this
/// connection are looked at.
#[inline(always)]
pub fn forget(sk: *const u8, cookie: u64, maybe_indexed: bool) {
    // SAFETY: read-only lookup.
    if let Some(info) = unsafe { CONNS.get(&cookie) }.copied() {
        report_end(sk, cookie, &info);
        let _ = CONNS.remove(&cookie);
        count(stats::CONNS_CLOSED);
        // Only a command-managed connection has holders (user space sweeps
        // what a race leaves behind). A delete takes the bucket lock even
        // when there is nothing to delete: looked up first.
        // SAFETY: read-only lookup.
        if info.source == SOURCE_COMMAND && unsafe { HOLDER_COUNT.get(&cookie) }.is_some() {
            let _ = HOLDER_COUNT.remove(&cookie);
        }
    }
    if maybe_indexed {
        index::remove(cookie);
    }
}

const EPIPE: u32 = 32;
const ECONNABORTED: u32 = 103;
const ECONNRESET: u32 = 104;

/// Tells user space how a managed connection ended: the socket error that
/// ended it decides timeout, reset or orderly close.
#[inline(always)]
fn report_end(sk: *const u8, cookie: u64, info: &ConnInfo) {
    let (off, sport_off) = (offset!(sk_err), offset!(inet_sport));
    let error: i32 = read(sk, off);
    let error = error.unsigned_abs();
    let kind = match error {
        // Marked by `tcpka close` just before it destroyed the socket.
        _ if info.flags & FLAG_CLOSING != 0 => KIND_CLOSED_BY_TCPKA,
        0 => KIND_CLOSED,
        ECONNRESET | EPIPE => KIND_RESET,
        ECONNABORTED => KIND_ABORTED,
        _ => KIND_TIMEOUT,
    };
    if kind == KIND_CLOSED
        && info.source == SOURCE_RULE
        && port_flags() & ports::FLAG_RULE_EVENTS == 0
    {
        return;
    }
    let Some(e) = ends(sk) else { return };
    let sport: u16 = read(sk, sport_off);
    let ack_age_ms = crate::risk::ack_age_ms(sk);
    // SAFETY: `ev` is a reserved ring slot; every field is written.
    emit_with(kind, |ev| unsafe {
        (*ev).family = e.family as u32;
        (*ev).cookie = cookie;
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).local_addr = e.local_addr;
        (*ev).remote_addr = e.remote_addr;
        (*ev).local_port = u16::from_be(sport);
        (*ev).remote_port = e.remote_port;
        (*ev).rule_id = info.rule_id;
        (*ev).policy = info.policy;
        (*ev).source = info.source;
        (*ev).error = error;
        (*ev).detail = 0;
        (*ev).ack_age_ms = ack_age_ms;
        (*ev).risk = info.risk;
    });
}
