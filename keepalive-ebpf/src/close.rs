//! tp_btf/inet_sock_set_state: forgets a connection when it closes, for
//! every managed connection however it got its policy (rule or command,
//! established before or after load, in or outside the cgroup).
//!
//! # Minimum kernel version
//! 5.5 (BTF-enabled raw tracepoints).
use aya_ebpf::{
    bindings::BPF_TCP_CLOSE, helpers::bpf_get_socket_cookie, macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use keepalive_common::stats;

use crate::maps::{count, CONNS};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcpka_close(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let newstate: u64 = ctx.arg(2);
    if newstate as u32 != BPF_TCP_CLOSE {
        return 0;
    }
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    // SAFETY: a `struct sock` pointer from the tracepoint.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    if CONNS.remove(&cookie).is_ok() {
        count(stats::CONNS_CLOSED);
    }
    0
}
