//! tp_btf/inet_sock_set_state: indexes a connection when it becomes
//! established, and forgets it when it closes (for every managed
//! connection however it got its policy: rule or command, established
//! before or after load, in or outside the cgroup).
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
    conns::ConnInfo,
    events::{Event, KIND_ABORTED, KIND_CLOSED, KIND_RESET, KIND_TIMEOUT},
    stats,
};

use crate::{
    apply::emit,
    index,
    maps::{count, CONNS, HOLDER_COUNT},
    sock::{ends, is_tcp, read},
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcpka_close(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let newstate = ctx.arg::<u64>(2) as u32;
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
        index::add(sk as *const u8, cookie);
        return 0;
    }
    // SAFETY: read-only lookup.
    if let Some(info) = unsafe { CONNS.get(&cookie) }.copied() {
        report_end(sk as *const u8, cookie, &info);
        let _ = CONNS.remove(&cookie);
        count(stats::CONNS_CLOSED);
    }
    let _ = HOLDER_COUNT.remove(&cookie);
    index::remove(sk as *const u8, cookie);
    0
}

/// Offset of `sk_err` in `struct sock`, set by the loader from BTF.
#[unsafe(no_mangle)]
static SK_ERR_OFF: u32 = 0;
/// Offset of `inet_sport` in `struct inet_sock`: the local port, which
/// stays when closing has already released `skc_num`.
#[unsafe(no_mangle)]
static INET_SPORT_OFF: u32 = 0;

const EPIPE: u32 = 32;
const ECONNABORTED: u32 = 103;
const ECONNRESET: u32 = 104;

/// Tells user space how a managed connection ended: the socket error that
/// ended it decides timeout, reset or orderly close.
#[inline(always)]
fn report_end(sk: *const u8, cookie: u64, info: &ConnInfo) {
    let Some(e) = ends(sk) else { return };
    // SAFETY: read-only globals set by the loader.
    let (off, sport_off) = unsafe {
        (
            core::ptr::read_volatile(&SK_ERR_OFF),
            core::ptr::read_volatile(&INET_SPORT_OFF),
        )
    };
    let sport: u16 = read(sk, sport_off as usize);
    let error: i32 = read(sk, off as usize);
    let error = error.unsigned_abs();
    let kind = match error {
        0 => KIND_CLOSED,
        ECONNRESET | EPIPE => KIND_RESET,
        ECONNABORTED => KIND_ABORTED,
        _ => KIND_TIMEOUT,
    };
    emit(&Event {
        kind,
        family: e.family as u32,
        cookie,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        local_addr: e.local_addr,
        remote_addr: e.remote_addr,
        local_port: u16::from_be(sport),
        remote_port: e.remote_port,
        rule_id: info.rule_id,
        policy: info.policy,
        source: info.source,
        error,
        _pad: 0,
    });
}
