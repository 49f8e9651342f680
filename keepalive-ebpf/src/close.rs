//! tp_btf/inet_sock_set_state: indexes a connection when it becomes
//! established, and forgets it when it closes (for every managed
//! connection however it got its policy: rule or command, established
//! before or after load, in or outside the cgroup).
//!
//! # Minimum kernel version
//! 5.5 (BTF-enabled raw tracepoints).
use aya_ebpf::{
    bindings::{BPF_TCP_CLOSE, BPF_TCP_ESTABLISHED},
    helpers::bpf_get_socket_cookie,
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use keepalive_common::stats;

use crate::{
    index,
    maps::{count, CONNS},
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcpka_close(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let newstate = ctx.arg::<u64>(2) as u32;
    if newstate != BPF_TCP_CLOSE && newstate != BPF_TCP_ESTABLISHED {
        return 0;
    }
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    // SAFETY: a `struct sock` pointer from the tracepoint.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    if newstate == BPF_TCP_ESTABLISHED {
        index::add(sk as *const u8, cookie);
        return 0;
    }
    if CONNS.remove(&cookie).is_ok() {
        count(stats::CONNS_CLOSED);
    }
    index::remove(sk as *const u8, cookie);
    0
}
