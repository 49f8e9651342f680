//! Rule lookup and the `bpf_setsockopt` calls, shared by the programs.
use core::ffi::c_void;

use aya_ebpf::{helpers::generated::bpf_setsockopt, maps::lpm_trie::Key};
use keepalive_common::{
    events::{
        Event, KIND_ABORTED, KIND_APPLIED, KIND_AT_RISK, KIND_CLOSED_BY_TCPKA, KIND_RECOVERED,
        KIND_RESET, KIND_TIMEOUT, RING_BYTES,
    },
    policy::{Policy, FLAG_USER_TIMEOUT},
    ports::FLAG_ANY_PORT_RULE,
    rules::{RuleKey, RuleValue, MAX_PREFIX_LEN},
    sockopt::*,
    stats,
};

use crate::maps::{count, rule_local, rule_remote, ALERTS, EVENTS, RULES};

/// `bpf_ringbuf_query` flag: bytes not yet consumed.
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Sends an event to user space; a full ring buffer is counted, not fatal.
/// Timeouts, resets, aborts, early warnings (and `tcpka close`) have a ring
/// of their own; `applied` events give way once their ring is half full,
/// so `closed` ones still fit.
///
/// The event is written straight into the ring: `fill` sets every field
/// but `kind` through the pointer. Built on the stack, an event would
/// count against the 512 bytes a program and the functions it calls share.
#[inline(always)]
pub fn emit_with<F: FnOnce(*mut Event)>(kind: u32, fill: F) {
    let alert = matches!(
        kind,
        KIND_TIMEOUT
            | KIND_RESET
            | KIND_ABORTED
            | KIND_CLOSED_BY_TCPKA
            | KIND_AT_RISK
            | KIND_RECOVERED
    );
    if kind == KIND_APPLIED && EVENTS.query(BPF_RB_AVAIL_DATA) > u64::from(RING_BYTES / 2) {
        count(stats::EVENTS_DROPPED);
        return;
    }
    let ring = if alert { &ALERTS } else { &EVENTS };
    let Some(mut entry) = ring.reserve::<Event>(0) else {
        count(if alert {
            stats::ALERTS_DROPPED
        } else {
            stats::EVENTS_DROPPED
        });
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved slot of the size of an Event.
    unsafe { (*e).kind = kind };
    fill(e);
    entry.submit(0);
}

/// The port combinations (both, local only, remote only, none) that some
/// rule has, from the port filter: a connection no rule names has none,
/// and costs no lookup at all.
pub struct Candidates([(bool, u16, u16); 4]);

impl Candidates {
    #[inline(always)]
    pub fn new(flags: u64, local_port: u16, remote_port: u16) -> Self {
        let local = rule_local(local_port);
        let remote = rule_remote(remote_port);
        Self([
            (local && remote, local_port, remote_port),
            (local, local_port, 0),
            (remote, 0, remote_port),
            (flags & FLAG_ANY_PORT_RULE != 0, 0, 0),
        ])
    }

    /// Whether any rule may match.
    #[inline(always)]
    pub fn any(&self) -> bool {
        self.0.iter().any(|c| c.0)
    }
}

/// Finds the best rule for a connection: one trie lookup per candidate port
/// combination, each giving the longest address prefix; the highest rank
/// wins, ties go to the lower id.
#[inline(always)]
pub fn best_rule(candidates: &Candidates, addr: [u8; 16]) -> Option<RuleValue> {
    let mut best: Option<RuleValue> = None;
    for &(possible, lp, rp) in &candidates.0 {
        if !possible {
            continue;
        }
        let key = Key::new(
            MAX_PREFIX_LEN,
            RuleKey {
                local_port: lp,
                remote_port: rp,
                addr,
            },
        );
        if let Some(rule) = RULES.get(&key) {
            let better = match &best {
                None => true,
                Some(b) => rule.rank > b.rank || (rule.rank == b.rank && rule.id < b.id),
            };
            if better {
                best = Some(*rule);
            }
        }
    }
    best
}

/// One `bpf_setsockopt` of an int; returns whether it worked.
#[inline(always)]
pub fn setsockopt_int(sk: *mut c_void, level: i32, name: i32, value: i32) -> bool {
    let mut v = value;
    // SAFETY: `sk` is a socket pointer the verifier accepts for this program
    // type; `v` lives for the call.
    let ret = unsafe {
        bpf_setsockopt(
            sk,
            level,
            name,
            &mut v as *mut i32 as *mut c_void,
            size_of::<i32>() as i32,
        )
    };
    ret == 0
}

/// A keepalive option; a refusal is counted.
#[inline(always)]
pub fn set(sk: *mut c_void, level: i32, name: i32, value: u32) -> bool {
    let ok = setsockopt_int(sk, level, name, value as i32);
    if !ok {
        count(stats::SETSOCKOPT_ERRORS);
    }
    ok
}

/// Applies a policy: values first, then SO_KEEPALIVE on, so the keepalive
/// timer starts with the new idle time. Returns whether every call worked.
#[inline(always)]
pub fn apply_policy(sk: *mut c_void, p: &Policy) -> bool {
    let mut ok = set(sk, SOL_TCP, TCP_KEEPIDLE, p.idle);
    ok &= set(sk, SOL_TCP, TCP_KEEPINTVL, p.interval);
    ok &= set(sk, SOL_TCP, TCP_KEEPCNT, p.count);
    if p.flags & FLAG_USER_TIMEOUT != 0 {
        ok &= set(sk, SOL_TCP, TCP_USER_TIMEOUT, p.user_timeout_ms);
    }
    ok &= set(sk, SOL_SOCKET, SO_KEEPALIVE, 1);
    ok
}
