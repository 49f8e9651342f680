//! iter/tcp programs: the only way to reach an idle, already established
//! connection on demand. Reading a pinned iterator link walks every TCP
//! socket of the reader's network namespace and runs the program on each.
//!
//! - `tcpka_iter_apply` applies pending requests (by cookie or by peer
//!   endpoint) and reports the connections it touched;
//! - `tcpka_iter_status` reports the connections tcpka manages.
//!
//! Both report with `bpf_seq_write`, values read back with `bpf_getsockopt`.
//!
//! # Minimum kernel version
//! 5.9 (iter/tcp); `bpf_setsockopt` from iterators needs 6.0.
use core::ffi::c_void;

use aya_ebpf::helpers::{
    bpf_get_socket_cookie,
    generated::{bpf_getsockopt, bpf_ktime_get_ns, bpf_seq_write, bpf_skc_to_tcp_sock},
};
use keepalive_common::{
    conns::{ConnInfo, FLAG_OUTSIDE, FLAG_UNWATCHED, SOURCE_COMMAND},
    ports,
    requests::{
        ConnRecord, PeerKey, Request, APPLY_CONNS_FULL, APPLY_SETSOCKOPT_FAILED, COOKIES_PENDING,
        OP_DISABLE, OP_ENABLE,
    },
    sockopt::*,
};

use crate::{
    apply::{apply_policy, set, setsockopt_int},
    index,
    maps::{
        count, host_index, index_port, port_flags, CONNS, META, REQ_COOKIE, REQ_PEER, REQ_PORTS,
    },
    sock::{ends, in_cgroup, load, Ends, SKC_DPORT},
};

/// Whether sock_ops runs for this socket (it is in the attached cgroup).
#[inline(always)]
fn covered(sk: *const u8) -> bool {
    META.get(0).is_some_and(|m| in_cgroup(sk, m.cgroup_id))
}
use keepalive_common::stats;

/// Asks the kernel to call sock_ops when this connection changes state, so
/// that its close is reported (`--index ports`; the state tracepoint sees
/// every close with `--index host`). Needs 6.12
/// (`TCP_BPF_SOCK_OPS_CB_FLAGS`) and a socket in the attached cgroup.
/// Returns whether sock_ops will see the close: false on an older kernel
/// (`FLAG_CLOSE_BY_TRACEPOINT`), where the state tracepoint watches it.
#[inline(always)]
fn watch_close(tp: *mut c_void) -> bool {
    if host_index() {
        return true;
    }
    if port_flags() & ports::FLAG_CLOSE_BY_TRACEPOINT != 0 {
        return false;
    }
    let flags = get(tp, SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS) as i32;
    if flags & STATE_CB_FLAG != 0 {
        return true;
    }
    if !setsockopt_int(
        tp,
        SOL_TCP,
        TCP_BPF_SOCK_OPS_CB_FLAGS,
        flags | STATE_CB_FLAG,
    ) {
        count(stats::CLOSE_WATCH_ERRORS);
    }
    true
}

/// `TCP_LISTEN` in `enum tcp_state`.
const TCP_LISTEN: u8 = 10;

/// `struct bpf_iter_meta`: only the seq_file pointer is used.
#[repr(C)]
struct IterMeta {
    seq: *mut c_void,
}

/// `struct bpf_iter__tcp`.
#[repr(C)]
struct IterTcp {
    meta: *mut IterMeta,
    sk_common: *mut u8,
    uid: u32,
}

#[inline(always)]
fn get(tp: *mut c_void, level: i32, name: i32) -> u32 {
    let mut v: i32 = 0;
    // SAFETY: `tp` is a full TCP socket from bpf_skc_to_tcp_sock.
    unsafe {
        bpf_getsockopt(
            tp,
            level,
            name,
            &mut v as *mut i32 as *mut c_void,
            size_of::<i32>() as i32,
        )
    };
    v as u32
}

/// Writes one record with the values the kernel now holds.
#[inline(always)]
fn report(seq: *mut c_void, tp: *mut c_void, cookie: u64, e: &Ends, apply_failed: u32) {
    let (source, rule_id) = match unsafe { CONNS.get(&cookie) } {
        Some(info) => (info.source, info.rule_id),
        None => (0, 0),
    };
    let mut rec = ConnRecord {
        cookie,
        family: e.family as u32,
        state: e.state as u32,
        local_addr: e.local_addr,
        remote_addr: e.remote_addr,
        local_port: e.local_port,
        remote_port: e.remote_port,
        keepalive: get(tp, SOL_SOCKET, SO_KEEPALIVE),
        idle: get(tp, SOL_TCP, TCP_KEEPIDLE),
        interval: get(tp, SOL_TCP, TCP_KEEPINTVL),
        count: get(tp, SOL_TCP, TCP_KEEPCNT),
        user_timeout_ms: get(tp, SOL_TCP, TCP_USER_TIMEOUT),
        source,
        rule_id,
        apply_failed,
        _pad: 0,
    };
    // SAFETY: `seq` is the iterator's seq_file; `rec` lives for the call.
    unsafe {
        bpf_seq_write(
            seq.cast(),
            &mut rec as *mut ConnRecord as *mut c_void,
            size_of::<ConnRecord>() as u32,
        )
    };
}

#[inline(always)]
fn find_request(cookie: u64, e: &Ends) -> Option<Request> {
    // SAFETY: map values are only read here.
    let r = match unsafe { REQ_COOKIE.get(&cookie) } {
        Some(r) => *r,
        None => {
            let key = PeerKey {
                addr: e.remote_addr,
                port: e.remote_port,
                _pad: 0,
            };
            // SAFETY: as above.
            *unsafe { REQ_PEER.get(&key) }?
        }
    };
    // The local end narrows either kind of request.
    if r.has_local != 0 && (r.local_port != e.local_port || r.local_addr != e.local_addr) {
        return None;
    }
    Some(r)
}

/// One full TCP socket visited by an iterator.
struct Visit {
    seq: *mut c_void,
    sk: *const u8,
    tp: *mut c_void,
    cookie: u64,
}

/// Unpacks the iterator context; `None` for the final call (no socket) and
/// for request and time-wait sockets, which carry no options.
#[inline(always)]
fn visit(ctx: *mut c_void) -> Option<Visit> {
    let ctx = ctx as *const IterTcp;
    // SAFETY: the kernel passes a valid `bpf_iter__tcp`.
    let (sk, seq) = unsafe { ((*ctx).sk_common, (*(*ctx).meta).seq) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a sock_common pointer from the iterator.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) } as *mut c_void;
    if tp.is_null() {
        return None;
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    Some(Visit {
        seq,
        sk,
        tp,
        cookie,
    })
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn tcpka_iter_apply(ctx: *mut c_void) -> i32 {
    // Prefilter: a socket with no pending request for its remote port,
    // while no cookie request is pending, costs two array reads.
    // SAFETY: the kernel passes a valid `bpf_iter__tcp`.
    let sk = unsafe { (*(ctx as *const IterTcp)).sk_common };
    if sk.is_null() {
        return 0;
    }
    let dport: u16 = load(sk, SKC_DPORT);
    let by_port = REQ_PORTS
        .get(u32::from(u16::from_be(dport)))
        .is_some_and(|f| *f != 0);
    let by_cookie = REQ_PORTS.get(COOKIES_PENDING).is_some_and(|f| *f != 0);
    if !by_port && !by_cookie {
        return 0;
    }
    let Some(Visit {
        seq,
        sk,
        tp,
        cookie,
    }) = visit(ctx)
    else {
        return 0;
    };
    let Some(e) = ends(sk) else { return 0 };
    let Some(req) = find_request(cookie, &e) else {
        return 0;
    };
    // NB: a listening socket's options pass to every connection it
    // accepts from then on: never changed here (user space refuses it).
    if e.state == TCP_LISTEN {
        report(seq, tp, cookie, &e, 0);
        return 0;
    }
    let mut failed = 0;
    if req.op == OP_ENABLE {
        // Outside the cgroup sock_ops never sees its close, nor (before
        // 6.12) that of a connection it did not see connect: user space
        // then attaches the state tracepoint for such connections.
        let outside = !host_index() && !covered(sk);
        let flags = if outside {
            FLAG_OUTSIDE
        } else if !watch_close(tp) {
            FLAG_UNWATCHED
        } else {
            0
        };
        let info = ConnInfo {
            policy: req.policy,
            source: SOURCE_COMMAND,
            rule_id: 0,
            flags,
            // SAFETY: helper without arguments.
            applied_ns: unsafe { bpf_ktime_get_ns() },
        };
        // Recorded first: a connection the full map cannot hold is left as
        // it was, and said so.
        if CONNS.insert(&cookie, &info, 0).is_err() {
            count(stats::CONNS_FULL);
            failed = APPLY_CONNS_FULL;
        } else if !apply_policy(tp, &req.policy) {
            failed = APPLY_SETSOCKOPT_FAILED;
        }
    } else if req.op == OP_DISABLE {
        if !set(tp, SOL_SOCKET, SO_KEEPALIVE, 0) {
            failed = APPLY_SETSOCKOPT_FAILED;
        }
        let _ = CONNS.remove(&cookie);
    }
    report(seq, tp, cookie, &e, failed);
    0
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn tcpka_iter_status(ctx: *mut c_void) -> i32 {
    let Some(Visit {
        seq,
        sk,
        tp,
        cookie,
    }) = visit(ctx)
    else {
        return 0;
    };
    // SAFETY: read-only lookup.
    if unsafe { CONNS.get(&cookie) }.is_none() {
        return 0;
    }
    let Some(e) = ends(sk) else { return 0 };
    report(seq, tp, cookie, &e, 0);
    0
}

/// Indexes the connections of the reader's network namespace that existed
/// before tcpka was loaded (later ones are indexed as they connect, by
/// sock_ops or by `state.rs`): all of them with `--index host`, those on an
/// index port with `--index ports`, watched until they close.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn tcpka_seed_peers(ctx: *mut c_void) -> i32 {
    let Some(Visit { sk, cookie, tp, .. }) = visit(ctx) else {
        return 0;
    };
    // Listening (10) and closed (7) sockets have no peer to index.
    let state: u8 = load(sk, crate::sock::SKC_STATE);
    if matches!(state, 7 | 10) {
        return 0;
    }
    let mut unwatched = false;
    if !host_index() {
        let Some(e) = ends(sk) else { return 0 };
        // Only what sock_ops (or, before 6.12, the state tracepoint, which
        // user space attached before this pass) will see close: the index
        // never keeps a socket it cannot forget.
        if !index_port(port_flags(), e.local_port, e.remote_port) || !covered(sk) {
            return 0;
        }
        unwatched = !watch_close(tp);
    }
    index::add(sk, cookie, unwatched);
    0
}
