use crate::policy::Policy;

/// Apply the policy (SO_KEEPALIVE on and the values).
pub const OP_ENABLE: u32 = 1;
/// SO_KEEPALIVE off.
pub const OP_DISABLE: u32 = 2;
/// Change nothing, only report the connection.
pub const OP_QUERY: u32 = 3;

/// A peer endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// Remote address as IPv6 (IPv4 mapped), network byte order.
    pub addr: [u8; 16],
    /// Remote port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// What to do with the matching connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// `OP_*`.
    pub op: u32,
    /// 1 when only connections with this local end match.
    pub has_local: u32,
    /// Local address as IPv6 (IPv4 mapped), network byte order.
    pub local_addr: [u8; 16],
    /// Local port, host byte order.
    pub local_port: u16,
    pub _pad: u16,
    /// Values for [`OP_ENABLE`].
    pub policy: Policy,
    /// Early-warning thresholds for [`OP_ENABLE`].
    pub risk: crate::risk::Risk,
}

/// What the iterators write for each connection they report, read back
/// from the kernel with `bpf_getsockopt`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    pub cookie: u64,
    /// 2 (IPv4) or 10 (IPv6).
    pub family: u32,
    /// TCP state (`BPF_TCP_*`, 1 = established).
    pub state: u32,
    /// Network byte order, IPv6 (IPv4 mapped).
    pub local_addr: [u8; 16],
    /// Network byte order, IPv6 (IPv4 mapped).
    pub remote_addr: [u8; 16],
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    /// SO_KEEPALIVE.
    pub keepalive: u32,
    pub idle: u32,
    pub interval: u32,
    pub count: u32,
    pub user_timeout_ms: u32,
    /// [`crate::conns`] `SOURCE_*`, 0 when not managed.
    pub source: u32,
    pub rule_id: u32,
    /// 0 when every `bpf_setsockopt` of the request worked; else
    /// [`APPLY_SETSOCKOPT_FAILED`] or [`APPLY_CONNS_FULL`].
    pub apply_failed: u32,
    pub _pad: u32,
}

/// [`ConnRecord::apply_failed`]: the kernel refused some value.
pub const APPLY_SETSOCKOPT_FAILED: u32 = 1;
/// [`ConnRecord::apply_failed`]: the connection map is full: nothing was
/// applied (a connection tcpka cannot manage gets no keepalive from it, so
/// that no one waits for events that would not come).
pub const APPLY_CONNS_FULL: u32 = 2;

/// Capacity of each request map (requests live for one pass).
pub const MAX_ENTRIES: u32 = 16_384;
/// Entries in the port prefilter: every port, 0 used as the cookie flag.
pub const PORTS_LEN: u32 = 65_536;
/// Index in the port prefilter that flags pending cookie requests (no
/// peer has port 0).
pub const COOKIES_PENDING: u32 = 0;
/// [`crate::maps::REQ_PORTS`] value bits, during a pass of the rules
/// iterator: a changed rule has this local port, or this remote port (the
/// pass's prefilter; apply requests use bit 0).
pub const REAPPLY_LOCAL: u32 = 2;
pub const REAPPLY_REMOTE: u32 = 4;
/// [`ConnRecord::apply_failed`] of the rules iterator: no rule matches the
/// connection any more (left as it is, or SO_KEEPALIVE turned off with
/// revert).
pub const REAPPLY_NO_RULE: u32 = 1 << 8;
/// [`ConnRecord::apply_failed`] of the rules iterator in a dry run: the
/// connection as it is, for user space to decide (nothing was changed).
pub const REAPPLY_PEEK: u32 = 1 << 9;

/// A report of the rules iterator that did not fit in the reader's buffer.
/// The kernel shows that connection again to the next read; by then the
/// pass has changed it (its values are right: it would be skipped), so the
/// report kept here is written instead ([`crate::maps::UNSENT`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unsent {
    /// 0 when none.
    pub cookie: u64,
    /// What the pass did: the rule id, the apply flags in the high half.
    pub outcome: u64,
}
