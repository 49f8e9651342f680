use crate::policy::Policy;

/// Bits of the key data before the address: both ports (2 x 16 bits).
/// A rule's prefix length is this plus its address prefix length.
pub const PORTS_PREFIX_LEN: u32 = 32;
/// Longest prefix: ports plus a full IPv6 address.
pub const MAX_PREFIX_LEN: u32 = PORTS_PREFIX_LEN + 128;

/// [`RuleValue::fields`]: the rule sets a local port.
pub const FIELD_LOCAL_PORT: u32 = 1;
/// [`RuleValue::fields`]: the rule sets a remote port.
pub const FIELD_REMOTE_PORT: u32 = 2;
/// [`RuleValue::fields`]: the rule sets a remote prefix.
pub const FIELD_REMOTE: u32 = 4;

/// Data part of the LPM key. Ports are always fully part of the prefix
/// (0 stands for "any port"), so the trie's longest match is only ever
/// about the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleKey {
    /// Local port, host byte order; 0 = any.
    pub local_port: u16,
    /// Remote port, host byte order; 0 = any.
    pub remote_port: u16,
    /// Remote address as IPv6, network byte order; IPv4 is stored
    /// IPv4-mapped (`::ffff:a.b.c.d`), so IPv4 rules also match
    /// IPv4-mapped IPv6 connections.
    pub addr: [u8; 16],
}

/// What a rule applies and how specific it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    /// Rule id shown to users; unique among rules.
    pub id: u32,
    /// `FIELD_*` bits the rule sets.
    pub fields: u32,
    /// Remote prefix length in IPv6 bits (IPv4 /n is 96 + n); 0 when
    /// the rule has no remote.
    pub remote_prefix_len: u32,
    /// Precedence: number of fields set, then the remote prefix length
    /// (see [`rank`]). Higher wins; ties go to the lower id.
    pub rank: u32,
    /// Values to apply.
    pub policy: Policy,
    /// `OPT_*` bits.
    pub opts: u32,
}

/// [`RuleValue::opts`]: apply the values and nothing else. The
/// connection is not recorded nor watched until it closes, so it is not
/// listed and its timeout or reset is not reported; it costs the least.
pub const OPT_UNTRACKED: u32 = 1;
/// [`RuleValue::opts`]: only connections established after the rule get
/// it: a rule change never reaches live connections for it, and the rules
/// iterator leaves a connection it decides as it is.
pub const OPT_NEW_ONLY: u32 = 2;

/// A rule's name (NUL-padded), for the rules a configuration file
/// manages; rules added by hand have none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleName {
    pub bytes: [u8; 32],
}

/// Precedence of a rule: more fields set beats fewer; among equals, the
/// longer remote prefix wins.
pub const fn rank(fields: u32, remote_prefix_len: u32) -> u32 {
    (fields.count_ones() << 8) | remote_prefix_len
}
