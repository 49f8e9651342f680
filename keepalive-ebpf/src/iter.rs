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

use aya_ebpf::{
    helpers::{
        bpf_get_socket_cookie,
        generated::{
            bpf_getsockopt, bpf_jiffies64, bpf_ktime_get_ns, bpf_seq_write, bpf_skc_to_tcp_sock,
        },
    },
    maps::lpm_trie::Key,
};
use keepalive_common::{
    conns::{ConnInfo, FLAG_OUTSIDE, FLAG_UNWATCHED, SOURCE_COMMAND, SOURCE_RULE},
    policy::FLAG_USER_TIMEOUT,
    ports,
    requests::{
        ConnRecord, PeerKey, Request, APPLY_CONNS_FULL, APPLY_SETSOCKOPT_FAILED, COOKIES_PENDING,
        OP_DISABLE, OP_ENABLE, REAPPLY_LOCAL, REAPPLY_NO_RULE, REAPPLY_PEEK, REAPPLY_REMOTE,
    },
    rules::{RuleKey, MAX_PREFIX_LEN, OPT_NEW_ONLY},
    sockopt::*,
};

use crate::{
    apply::{apply_policy, best_rule, set, setsockopt_int, Candidates},
    index,
    maps::{
        count, host_index, index_port, port_flags, CHANGED, CONNS, META, REQ_COOKIE, REQ_PEER,
        REQ_PORTS, UNSENT,
    },
    risk,
    sock::{ends, in_cgroup, load, Ends, SKC_DPORT, SKC_NUM, SKC_STATE},
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
    // With the early-warning callbacks (`risk.rs`).
    let want = STATE_CB_FLAG | risk::CB_FLAGS as i32;
    let flags = get(tp, SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS) as i32;
    if flags & want == want {
        return true;
    }
    if !setsockopt_int(tp, SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS, flags | want) {
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

/// Writes one record with the values the kernel now holds, and the
/// connection's source and rule as recorded.
#[inline(always)]
fn report(seq: *mut c_void, tp: *mut c_void, cookie: u64, e: &Ends, apply_failed: u32) {
    // SAFETY: a lookup whose two u32 fields are copied out at once; the map
    // value stays valid memory for this program's run even if another CPU
    // deletes or rewrites the entry (a stale copy only misreports them).
    let (source, rule_id) = match unsafe { CONNS.get(&cookie) } {
        Some(info) => (info.source, info.rule_id),
        None => (0, 0),
    };
    write_record(seq, tp, cookie, e, source, rule_id, apply_failed);
}

/// Writes one [`ConnRecord`]: the ends, the values the kernel now holds
/// (read back with `bpf_getsockopt`), and what the caller says of it.
/// Returns whether it fit in the reader's buffer (when it did not, the
/// kernel shows the same connection again to the next read).
#[inline(always)]
fn write_record(
    seq: *mut c_void,
    tp: *mut c_void,
    cookie: u64,
    e: &Ends,
    source: u32,
    rule_id: u32,
    apply_failed: u32,
) -> bool {
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
    let written = unsafe {
        bpf_seq_write(
            seq.cast(),
            &mut rec as *mut ConnRecord as *mut c_void,
            size_of::<ConnRecord>() as u32,
        )
    };
    written == 0
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
            risk: req.risk,
            _pad: 0,
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

/// `TCP_ESTABLISHED` in `enum tcp_state`.
const TCP_ESTABLISHED: u8 = 1;

/// Whether a rule key in [`CHANGED`] matches these ends (the four port
/// combinations a rule can name, each with the longest address prefix).
#[inline(never)]
fn touched(local_port: u16, remote_port: u16, addr: &[u8; 16]) -> bool {
    let mut key = Key::new(
        MAX_PREFIX_LEN,
        RuleKey {
            local_port,
            remote_port,
            addr: *addr,
        },
    );
    if CHANGED.get(&key).is_some() {
        return true;
    }
    key.data.remote_port = 0;
    if CHANGED.get(&key).is_some() {
        return true;
    }
    key.data.local_port = 0;
    if CHANGED.get(&key).is_some() {
        return true;
    }
    key.data.remote_port = remote_port;
    CHANGED.get(&key).is_some()
}

/// After a rule change: each established connection in the attached
/// cgroup that a changed rule key matches gets what the rules now decide
/// for it, as a new connection with the same ends would, unless a command
/// manages it (commands win over rules). Values already right are left
/// alone; a connection no rule matches any more is left as it is, or with
/// [`ports::FLAG_REAPPLY_REVERT`] gets SO_KEEPALIVE off. Reports each
/// connection it changed, `rule_id` the deciding rule. With
/// [`ports::FLAG_REAPPLY_DRY_RUN`] it changes nothing and reports every
/// such connection as it is ([`REAPPLY_PEEK`]): user space decides with
/// the rules as a change would leave them.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn tcpka_iter_rules(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_iter__tcp`.
    let sk = unsafe { (*(ctx as *const IterTcp)).sk_common };
    if sk.is_null() {
        return 0;
    }
    let state: u8 = load(sk, SKC_STATE);
    if state != TCP_ESTABLISHED {
        return 0;
    }
    // Prefilter: two array reads for a connection on no changed port.
    let flags = port_flags();
    let local_port: u16 = load(sk, SKC_NUM);
    let dport: u16 = load(sk, SKC_DPORT);
    let remote_port = u16::from_be(dport);
    let by_local = REQ_PORTS
        .get(u32::from(local_port))
        .is_some_and(|f| *f & REAPPLY_LOCAL != 0);
    let by_remote = REQ_PORTS
        .get(u32::from(remote_port))
        .is_some_and(|f| *f & REAPPLY_REMOTE != 0);
    if !by_local && !by_remote && flags & ports::FLAG_REAPPLY_ANY_PORT == 0 {
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
    if !covered(sk) {
        return 0;
    }
    let Some(e) = ends(sk) else { return 0 };
    if !touched(e.local_port, e.remote_port, &e.remote_addr) {
        return 0;
    }
    // A connection shown again because its report did not fit: the pass
    // has changed it already; its report is kept.
    let unsent = UNSENT
        .get(0)
        .filter(|u| u.cookie == cookie)
        .map(|u| u.outcome);
    let outcome = match unsent {
        Some(o) => o,
        None => decide(tp, cookie, &e, flags),
    };
    if outcome != SKIP {
        report_rule(seq, tp, cookie, &e, outcome);
    }
    0
}

/// [`decide`]: nothing to report.
const SKIP: u64 = u64::MAX;

/// What the rules now decide for one connection a changed rule matches,
/// applied (unless dry): the outcome to report ([`report_rule`]) or
/// [`SKIP`]. A call of its own, beside [`report_rule`]: the kernel limits
/// the stack of a chain of calls (512 bytes on 6.1, both frames counted).
#[inline(never)]
fn decide(tp: *mut c_void, cookie: u64, e: &Ends, flags: u64) -> u64 {
    let managed = CONNS.get_ptr_mut(&cookie);
    // SAFETY: a pointer into the map's value, read while the entry lives.
    // A plain value, 0 when not managed: the verifier refuses the spill of
    // an `Option`'s undefined payload.
    let source = managed.map_or(0, |m| unsafe { (*m).source });
    if source == SOURCE_COMMAND {
        return SKIP;
    }
    if flags & ports::FLAG_REAPPLY_DRY_RUN != 0 {
        // A preview: user space decides with the rules as they would be.
        return u64::from(REAPPLY_PEEK) << 32;
    }
    let candidates = Candidates::new(flags, e.local_port, e.remote_port);
    let Some(rule) = best_rule(&candidates, e.remote_addr) else {
        if get(tp, SOL_SOCKET, SO_KEEPALIVE) == 0 {
            return SKIP;
        }
        let revert = flags & ports::FLAG_REAPPLY_REVERT != 0;
        let mut failed = REAPPLY_NO_RULE;
        if revert {
            if !set(tp, SOL_SOCKET, SO_KEEPALIVE, 0) {
                failed |= APPLY_SETSOCKOPT_FAILED;
            }
            if source == SOURCE_RULE {
                let _ = CONNS.remove(&cookie);
            }
        }
        return u64::from(failed) << 32;
    };
    if rule.opts & OPT_NEW_ONLY != 0 {
        // Only for connections established after it.
        return SKIP;
    }
    let p = rule.policy;
    let same = get(tp, SOL_SOCKET, SO_KEEPALIVE) == 1
        && get(tp, SOL_TCP, TCP_KEEPIDLE) == p.idle
        && get(tp, SOL_TCP, TCP_KEEPINTVL) == p.interval
        && get(tp, SOL_TCP, TCP_KEEPCNT) == p.count
        && (p.flags & FLAG_USER_TIMEOUT == 0
            || get(tp, SOL_TCP, TCP_USER_TIMEOUT) == p.user_timeout_ms);
    if same {
        return SKIP;
    }
    let mut failed = 0;
    if !apply_policy(tp, &p) {
        failed = APPLY_SETSOCKOPT_FAILED;
    }
    // A connection tracked for an earlier rule: its entry follows (its
    // close is already watched). One not tracked stays so.
    if let Some(m) = managed {
        // SAFETY: the map's value, written in place (as sock_ops writes
        // it: whole fields, no reader relies on a pair).
        unsafe {
            (*m).policy = p;
            (*m).rule_id = rule.id;
        }
    }
    u64::from(failed) << 32 | u64::from(rule.id)
}

/// A record of the rules iterator: the values the kernel now holds and the
/// deciding rule (`outcome`: the rule id, and the apply flags in the high
/// half). A call of its own: its record does not add to the caller's
/// stack (and BPF calls take at most five arguments).
#[inline(never)]
fn report_rule(seq: *mut c_void, tp: *mut c_void, cookie: u64, e: &Ends, outcome: u64) {
    let (rule_id, failed) = (outcome as u32, (outcome >> 32) as u32);
    let written = write_record(seq, tp, cookie, e, SOURCE_RULE, rule_id, failed);
    if let Some(u) = UNSENT.get_ptr_mut(0) {
        // SAFETY: the map's only value, written in place; one pass at a
        // time (user space holds the installation lock).
        unsafe {
            if !written {
                (*u).cookie = cookie;
                (*u).outcome = outcome;
            } else if (*u).cookie == cookie {
                (*u).cookie = 0;
            }
        }
    }
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn tcpka_iter_status(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_iter__tcp`.
    let (sk, seq) = unsafe {
        let c = ctx as *const IterTcp;
        ((*c).sk_common, (*(*c).meta).seq)
    };
    if sk.is_null() {
        // The call after the last socket: both clocks, after the records
        // (a reader of whole records ignores them), from which the loader
        // measures the kernel's HZ.
        // SAFETY: helpers without arguments.
        let mut clocks = unsafe { [bpf_ktime_get_ns(), bpf_jiffies64()] };
        // SAFETY: the iterator's seq_file; `clocks` lives for the call.
        unsafe { bpf_seq_write(seq.cast(), clocks.as_mut_ptr().cast(), 16) };
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
    let state: u8 = load(sk, SKC_STATE);
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
