//! Early warning, in sock_ops: what a managed connection's health shows,
//! sent to `tcpka serve` as signals (`KIND_SIGNAL`), which makes `at_risk`
//! and `recovered` of them. The callbacks run only for the connections
//! sock_ops or a command asked them for ([`CB_FLAGS`]):
//!
//! - every segment it sends (`HDR_OPT_LEN`): a few context reads, and for
//!   a bare ACK on an idle connection, the check that it is a keepalive
//!   or zero-window probe — then a signal, and a watch for the answer;
//! - the retransmission timer firing (`RTO`) and each retransmission
//!   (`RETRANS`): a signal each;
//! - while an answer is awaited, each segment it receives
//!   (`PARSE_HDR_OPT`, turned off again by the answer).
//!
//! Nothing here adds or changes a TCP option.
//!
//! # Minimum kernel version
//! 5.10 (header-option callbacks and their packet pointers).
use core::ptr::{addr_of, addr_of_mut, read_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG, BPF_SOCK_OPS_RETRANS_CB_FLAG,
        BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::{
        bpf_get_socket_cookie,
        generated::{
            bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_skc_to_tcp_sock,
            bpf_sock_ops_cb_flags_set,
        },
    },
};
use keepalive_common::{
    events::{Event, KIND_SIGNAL, RING_BYTES},
    risk::{
        ALL_REASONS, SIGNAL_ANSWER, SIGNAL_PROBE, SIGNAL_RETRANS, SIGNAL_RTO, SIGNAL_ZERO_WINDOW,
    },
    stats,
};

use crate::{
    maps::{count, CONNS, EVENTS, META},
    offsets::offset,
    sock::{load, read, AF_INET, SKC_DADDR, SKC_DPORT, SKC_FAMILY, SKC_NUM, SKC_RCV_SADDR},
};

/// `bpf_ringbuf_query` flag: bytes not yet consumed.
const BPF_RB_AVAIL_DATA: u64 = 0;

/// The callbacks a managed connection gets, beside the state callback.
pub const CB_FLAGS: u32 =
    BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG | BPF_SOCK_OPS_RETRANS_CB_FLAG;

/// `TCPHDR_ACK`: the only flag of a keepalive or zero-window probe.
const TCPHDR_ACK: u32 = 0x10;

macro_rules! field {
    ($ops:expr, $($f:tt)+) => {
        // SAFETY: `$ops` is the context pointer the kernel handed us.
        unsafe { read_volatile(addr_of!((*$ops).$($f)+)) }
    };
}

/// The context's socket as a BTF `struct tcp_sock` pointer.
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

#[inline(always)]
fn set_cb_flags(ops: *mut bpf_sock_ops, flags: u32) {
    // SAFETY: sock_ops context is a valid argument for the helper.
    let _ = unsafe { bpf_sock_ops_cb_flags_set(ops, flags as i32) };
}

/// The connection is closing at this end: the early-warning callbacks stop.
#[inline(always)]
pub fn stop(ops: *mut bpf_sock_ops) {
    let cb = field!(ops, bpf_sock_ops_cb_flags);
    let risk = CB_FLAGS | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG;
    if cb & risk != 0 {
        set_cb_flags(ops, cb & !risk);
    }
}

/// A segment goes out. A bare ACK with nothing in flight, on a connection
/// idle for its keepalive time (or whose peer's window is zero), is a
/// probe: signalled, and the answer watched for.
#[inline(never)]
pub fn on_send(ops: *mut bpf_sock_ops) {
    let len = field!(ops, skb_len);
    let flags = field!(ops, skb_tcp_flags);
    let in_flight = field!(ops, packets_out);
    if len != 0 || flags != TCPHDR_ACK || in_flight != 0 {
        return;
    }
    let Some(sk) = full_sock(ops) else { return };
    let wnd: u32 = read(sk, offset!(snd_wnd));
    if wnd != 0 && !idle_for_keepalive(sk) {
        // An ACK for data just received.
        return;
    }
    let probes: u8 = read(sk, offset!(icsk_probes_out));
    let value = u32::from(probes) | if wnd == 0 { SIGNAL_ZERO_WINDOW } else { 0 };
    if signal(ops, sk, SIGNAL_PROBE, value) {
        let cb = field!(ops, bpf_sock_ops_cb_flags);
        set_cb_flags(ops, cb | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG);
    }
}

/// Whether the connection has heard nothing for its keepalive time: what
/// the keepalive timer checks before it sends a probe.
#[inline(always)]
fn idle_for_keepalive(sk: *const u8) -> bool {
    let keepalive: u32 = read(sk, offset!(keepalive_time));
    if keepalive == 0 {
        return false;
    }
    let rcv: u32 = read(sk, offset!(rcv_tstamp));
    let data: u32 = read(sk, offset!(icsk_ack_lrcvtime));
    let last = if (data.wrapping_sub(rcv) as i32) > 0 {
        data
    } else {
        rcv
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_jiffies64() } as u32;
    now.wrapping_sub(last) >= keepalive
}

/// A segment arrived while an answer was awaited: the peer answers.
/// Watching goes on while its window stays zero.
#[inline(never)]
pub fn on_receive(ops: *mut bpf_sock_ops) {
    let Some(sk) = full_sock(ops) else { return };
    let data = field!(ops, __bindgen_anon_3.skb_data) as usize;
    let end = field!(ops, __bindgen_anon_4.skb_data_end) as usize;
    // The TCP header's window field (bytes 14 and 15), unscaled.
    let window = if data + 16 <= end {
        // SAFETY: inside the packet, as checked just above.
        let w = unsafe { read_volatile((data + 14) as *const u16) };
        u32::from(u16::from_be(w))
    } else {
        u32::MAX
    };
    if window != 0 {
        let cb = field!(ops, bpf_sock_ops_cb_flags);
        set_cb_flags(ops, cb & !BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG);
    }
    signal(ops, sk, SIGNAL_ANSWER, window);
}

/// The retransmission timer fired: signalled with the backoff it leaves,
/// and the answer watched for.
#[inline(never)]
pub fn on_rto(ops: *mut bpf_sock_ops) {
    let Some(sk) = full_sock(ops) else { return };
    let backoff: u8 = read(sk, offset!(icsk_backoff));
    if signal(ops, sk, SIGNAL_RTO, u32::from(backoff) + 1) {
        let cb = field!(ops, bpf_sock_ops_cb_flags);
        set_cb_flags(ops, cb | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG);
    }
}

/// A segment was retransmitted: signalled with the connection's count.
#[inline(never)]
pub fn on_retrans(ops: *mut bpf_sock_ops) {
    let Some(sk) = full_sock(ops) else { return };
    let total = field!(ops, total_retrans);
    signal(ops, sk, SIGNAL_RETRANS, total);
}

/// Sends one signal for a managed connection that wants early warning;
/// returns whether it was one.
///
/// NB: written field by field straight into the ring slot, the socket's
/// addresses read into it: these callbacks are calls of the sock_ops
/// program, whose own frame leaves them little of the 512 bytes of stack
/// a chain of calls may use.
#[inline(always)]
fn signal(ops: *mut bpf_sock_ops, sk: *const u8, what: u32, value: u32) -> bool {
    // SAFETY: sock_ops context is a valid argument for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    let Some(info) = CONNS.get_ptr(&cookie) else {
        return false;
    };
    // SAFETY: a pointer into the map's value, read while the entry lives.
    let info = unsafe { &*info };
    if info.risk.off == ALL_REASONS {
        return false;
    }
    if EVENTS.query(BPF_RB_AVAIL_DATA) > u64::from(RING_BYTES / 2) {
        count(stats::EVENTS_DROPPED);
        return true;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(stats::EVENTS_DROPPED);
        return true;
    };
    let ev = entry.as_mut_ptr();
    let family: u16 = load(sk, SKC_FAMILY);
    // SAFETY: `ev` is a reserved ring slot of an Event's size; every field
    // is written before it is submitted.
    unsafe {
        (*ev).kind = KIND_SIGNAL;
        (*ev).family = u32::from(family);
        (*ev).cookie = cookie;
        (*ev).ts_ns = bpf_ktime_get_ns();
        if family == AF_INET {
            put_v4(addr_of_mut!((*ev).local_addr), load(sk, SKC_RCV_SADDR));
            put_v4(addr_of_mut!((*ev).remote_addr), load(sk, SKC_DADDR));
        } else {
            read_into(&mut (*ev).local_addr, sk, offset!(skc_v6_rcv_saddr));
            read_into(&mut (*ev).remote_addr, sk, offset!(skc_v6_daddr));
        }
        (*ev).local_port = load(sk, SKC_NUM);
        (*ev).remote_port = u16::from_be(load(sk, SKC_DPORT));
        (*ev).rule_id = info.rule_id;
        // Field by field: a copy of the struct is a call to memcpy.
        (*ev).policy.idle = info.policy.idle;
        (*ev).policy.count = info.policy.count;
        (*ev).policy.interval = info.policy.interval;
        (*ev).policy.user_timeout_ms = info.policy.user_timeout_ms;
        (*ev).policy.flags = info.policy.flags;
        (*ev).source = info.source;
        (*ev).error = value;
        (*ev).detail = what;
        (*ev).ack_age_ms = ack_age_ms(sk);
        (*ev).risk.probe_ms = info.risk.probe_ms;
        (*ev).risk.zero_window_ms = info.risk.zero_window_ms;
        (*ev).risk.retrans = info.risk.retrans;
        (*ev).risk.backoff = info.risk.backoff;
        (*ev).risk.off = info.risk.off;
    }
    entry.submit(0);
    true
}

/// Writes an IPv4 address (network order, as the socket has it) IPv4-mapped
/// into `dst`, word by word: an array written whole is a call to memset
/// and memmove, subprograms whose frames (32 bytes each on Linux 6.1) the
/// verifier adds to this callback's and the sock_ops program's.
///
/// # Safety
///
/// `dst` must point to 16 writable bytes, 4-aligned (a field of a reserved
/// ring slot).
#[inline(always)]
unsafe fn put_v4(dst: *mut [u8; 16], ip: u32) {
    let w = dst as *mut u32;
    // SAFETY: `dst` is 16 writable bytes, 4-aligned in the event.
    unsafe {
        w.write_volatile(0);
        w.add(1).write_volatile(0);
        w.add(2)
            .write_volatile(u32::from_ne_bytes([0, 0, 0xff, 0xff]));
        w.add(3).write_volatile(ip);
    }
}

/// Reads 16 bytes of the socket into `dst` (a ring slot's field).
#[inline(always)]
fn read_into(dst: &mut [u8; 16], sk: *const u8, off: usize) {
    // SAFETY: `dst` is 16 bytes; the helper checks the kernel address and
    // clears what it cannot read.
    let _ =
        unsafe { bpf_probe_read_kernel(dst.as_mut_ptr().cast(), 16, sk.wrapping_add(off).cast()) };
}

/// Milliseconds since the peer last acknowledged anything (`rcv_tstamp`);
/// `u32::MAX` before the loader measured the kernel's HZ.
#[inline(always)]
pub fn ack_age_ms(sk: *const u8) -> u32 {
    let jiffy_ns = META.get(0).map_or(0, |m| u64::from(m.jiffy_ns));
    if jiffy_ns == 0 {
        return u32::MAX;
    }
    let rcv: u32 = read(sk, offset!(rcv_tstamp));
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_jiffies64() } as u32;
    (u64::from(now.wrapping_sub(rcv)) * jiffy_ns / 1_000_000) as u32
}
