//! Everything that crosses the line between tcpka's kernel programs and user
//! space: map and program names, map key/value layouts and the kernel's
//! limits for keepalive values.
//!
//! Layouts are `#[repr(C)]` without implicit padding, so both sides agree
//! byte for byte. The [`aya::Pod`] impls are only compiled with the `user`
//! feature.
#![no_std]

/// Names of the programs in the eBPF object.
pub mod programs;

/// Where kernel struct members are: the programs read kernel memory at
/// these offsets. Members whose place depends on the kernel's
/// configuration come from the running kernel's BTF; the loader sets them
/// all at once as the read-only global [`offsets::GLOBAL`] (Rust eBPF has
/// no CO-RE field relocations).
pub mod offsets;

/// Names of the maps in the eBPF object (also their pin file names).
pub mod maps;

/// The ports sock_ops looks at, so that a connection no rule and no index
/// port names costs five array reads (the flag word and one bit per set), and a rule lookup tries only the port
/// combinations some rule has. [`crate::maps::PORTS`] holds three bit sets
/// of 65,536 ports and a flag word.
pub mod ports;

/// Kernel limits on keepalive values (`net/ipv4/tcp.c`: `MAX_TCP_KEEPIDLE`,
/// `MAX_TCP_KEEPINTVL`, `MAX_TCP_KEEPCNT`).
pub mod limits;

/// Socket option numbers used with `bpf_setsockopt` (`include/uapi/linux`).
pub mod sockopt;

/// A keepalive policy as the programs apply it.
pub mod policy;

/// The rule table: an LPM trie so that the kernel finds the longest
/// `--remote` prefix in one lookup per port combination.
pub mod rules;

/// Connections tcpka manages, keyed by socket cookie.
pub mod conns;

/// Indices into the per-CPU counter array.
pub mod stats;

/// Requests for live connections, applied by the iter/tcp program.
pub mod requests;

/// The connection index that lets user space reach one idle connection
/// without walking every socket: peer endpoint -> cookies, cookie -> the
/// process and fd that hold it.
pub mod index;

/// Holders: who needs a connection's keepalive (a SIP controller passes
/// the Call-ID), so that one call's disable does not turn it off under the
/// calls still up on a shared connection.
pub mod holders;

/// Events the programs report to user space through the ring buffer.
pub mod events;

/// The installation record, written by the loader.
pub mod meta;

/// Early warning: thresholds, reasons and the signals sock_ops sends.
pub mod risk;

/// Capacity of the connection map. Entries exist only while a managed
/// connection is open.
pub const CONNS_MAX_ENTRIES: u32 = 262_144;
/// Capacity of the rule table.
pub const RULES_MAX_ENTRIES: u32 = 4096;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)] with only integer fields and no padding.
    unsafe impl aya::Pod for crate::policy::Policy {}
    unsafe impl aya::Pod for crate::rules::RuleKey {}
    unsafe impl aya::Pod for crate::rules::RuleValue {}
    unsafe impl aya::Pod for crate::rules::RuleName {}
    unsafe impl aya::Pod for crate::conns::ConnInfo {}
    unsafe impl aya::Pod for crate::events::Event {}
    unsafe impl aya::Pod for crate::meta::Meta {}
    unsafe impl aya::Pod for crate::requests::PeerKey {}
    unsafe impl aya::Pod for crate::requests::Request {}
    unsafe impl aya::Pod for crate::requests::ConnRecord {}
    unsafe impl aya::Pod for crate::requests::Unsent {}
    unsafe impl aya::Pod for crate::index::IndexKey {}
    unsafe impl aya::Pod for crate::index::FdOwner {}
    unsafe impl aya::Pod for crate::index::SlotInfo {}
    unsafe impl aya::Pod for crate::holders::HolderKey {}
    unsafe impl aya::Pod for crate::offsets::Offsets {}
    unsafe impl aya::Pod for crate::risk::Risk {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<policy::Policy>(), 20);
        assert_eq!(size_of::<rules::RuleKey>(), 20);
        assert_eq!(size_of::<rules::RuleValue>(), 16 + 20 + 4);
        assert_eq!(size_of::<conns::ConnInfo>(), 20 + 12 + 8 + 16);
        assert_eq!(size_of::<events::Event>(), 112);
        assert_eq!(size_of::<risk::Risk>(), 12);
        assert_eq!(size_of::<meta::Meta>(), 16 + meta::PATH_MAX + 16);
        assert_eq!(size_of::<requests::PeerKey>(), 20);
        assert_eq!(size_of::<index::IndexKey>(), 24);
        assert_eq!(size_of::<index::FdOwner>(), 8);
        assert_eq!(size_of::<requests::Request>(), 60);
        assert_eq!(size_of::<requests::ConnRecord>(), 84 + 4);
        assert_eq!(size_of::<offsets::Offsets>(), 24 * 4);
    }

    #[test]
    fn rank_orders_fields_before_prefix() {
        let all_ports = rules::FIELD_LOCAL_PORT | rules::FIELD_REMOTE_PORT;
        assert!(rules::rank(all_ports, 0) > rules::rank(rules::FIELD_REMOTE, 128));
        assert!(rules::rank(rules::FIELD_REMOTE, 120) > rules::rank(rules::FIELD_REMOTE, 104));
    }
}
