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
    // Each type is #[repr(C)] with only integer and byte-array fields, so
    // every bit pattern is a valid value, and its fields leave no padding
    // (so no uninitialised bytes are read when it is viewed as bytes);
    // `tests::layouts_have_no_padding` checks their sizes.
    // SAFETY: five u32s (20 bytes): plain data, no padding.
    unsafe impl aya::Pod for crate::policy::Policy {}
    // SAFETY: two u16s and a [u8; 16] (20 bytes, align 2): plain data, no padding.
    unsafe impl aya::Pod for crate::rules::RuleKey {}
    // SAFETY: four u32s, a Policy and a u32 (40 bytes, align 4): plain data, no padding.
    unsafe impl aya::Pod for crate::rules::RuleValue {}
    // SAFETY: a [u8; 32]: plain data, no padding.
    unsafe impl aya::Pod for crate::rules::RuleName {}
    // SAFETY: a Policy and three u32s (32 bytes), then a u64 at offset 32, a Risk and an explicit
    // u32 pad (56 bytes, align 8): plain data, no padding.
    unsafe impl aya::Pod for crate::conns::ConnInfo {}
    // SAFETY: u32s, u64s at offsets 8 and 16, byte arrays, u16s, a Policy and a Risk laid out
    // without gaps (112 bytes, align 8): plain data, no padding.
    unsafe impl aya::Pod for crate::events::Event {}
    // SAFETY: a u64, two u32s, a [u8; 256] and four u32s (the last an explicit pad): 288 bytes,
    // align 8: plain data, no padding.
    unsafe impl aya::Pod for crate::meta::Meta {}
    // SAFETY: a [u8; 16], a u16 and an explicit u16 pad (20 bytes): plain data, no padding.
    unsafe impl aya::Pod for crate::requests::PeerKey {}
    // SAFETY: two u32s, a [u8; 16], a u16 and an explicit u16 pad, a Policy and a Risk (60 bytes,
    // align 4): plain data, no padding.
    unsafe impl aya::Pod for crate::requests::Request {}
    // SAFETY: a u64, two u32s, two [u8; 16], two u16s and nine u32s, the last an explicit pad (88
    // bytes, align 8): plain data, no padding.
    unsafe impl aya::Pod for crate::requests::ConnRecord {}
    // SAFETY: two u64s: plain data, no padding.
    unsafe impl aya::Pod for crate::requests::Unsent {}
    // SAFETY: a u32, a [u8; 16] and two u16s (24 bytes, align 4): plain data, no padding.
    unsafe impl aya::Pod for crate::index::IndexKey {}
    // SAFETY: two u32s: plain data, no padding.
    unsafe impl aya::Pod for crate::index::FdOwner {}
    // SAFETY: an IndexKey (24 bytes) then a u64 at offset 24 (32 bytes, align 8): plain data, no
    // padding.
    unsafe impl aya::Pod for crate::index::SlotInfo {}
    // SAFETY: a u64 and a [u8; 64] (72 bytes, align 8): plain data, no padding.
    unsafe impl aya::Pod for crate::holders::HolderKey {}
    // SAFETY: 24 u32s: plain data, no padding.
    unsafe impl aya::Pod for crate::offsets::Offsets {}
    // SAFETY: two u32s, a u16 and two u8s (12 bytes, align 4): plain data, no padding.
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
        assert_eq!(size_of::<rules::RuleName>(), 32);
        assert_eq!(size_of::<requests::Unsent>(), 16);
        assert_eq!(size_of::<index::SlotInfo>(), 24 + 8);
        assert_eq!(size_of::<holders::HolderKey>(), 8 + holders::ID_MAX);
    }

    #[test]
    fn rank_orders_fields_before_prefix() {
        let all_ports = rules::FIELD_LOCAL_PORT | rules::FIELD_REMOTE_PORT;
        assert!(rules::rank(all_ports, 0) > rules::rank(rules::FIELD_REMOTE, 128));
        assert!(rules::rank(rules::FIELD_REMOTE, 120) > rules::rank(rules::FIELD_REMOTE, 104));
    }
}
