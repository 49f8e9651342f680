/// [`ConnInfo::flags`]: the connection is outside the attached cgroup,
/// where sock_ops never runs: with `--index ports`, its close is seen
/// only while the state tracepoint is attached for such connections.
pub const FLAG_OUTSIDE: u32 = 1;
/// [`ConnInfo::flags`]: `tcpka close` is ending it; its end is reported
/// as `KIND_CLOSED_BY_TCPKA`.
pub const FLAG_CLOSING: u32 = 2;
/// [`ConnInfo::flags`]: in the attached cgroup, but sock_ops may not see
/// its close: a kernel before 6.12 cannot ask it to for a connection it
/// did not see connect. Like [`FLAG_OUTSIDE`], its close is seen while the
/// state tracepoint is attached for such connections.
pub const FLAG_UNWATCHED: u32 = 4;
/// Flags of connections whose close only the state tracepoint sees.
pub const FLAGS_TRACEPOINT_CLOSE: u32 = FLAG_OUTSIDE | FLAG_UNWATCHED;
use crate::policy::Policy;

/// [`ConnInfo::source`]: the policy came from a rule.
pub const SOURCE_RULE: u32 = 1;
/// [`ConnInfo::source`]: the policy came from an enable command.
pub const SOURCE_COMMAND: u32 = 2;

/// Names a `SOURCE_*` value.
pub fn source_name(source: u32) -> &'static str {
    match source {
        SOURCE_RULE => "rule",
        SOURCE_COMMAND => "command",
        _ => "unknown",
    }
}

/// The policy a connection got and where it came from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// What was applied.
    pub policy: Policy,
    /// `SOURCE_*`.
    pub source: u32,
    /// Id of the rule for [`SOURCE_RULE`], else 0.
    pub rule_id: u32,
    /// `FLAG_*`.
    pub flags: u32,
    /// `bpf_ktime_get_ns()` when the policy was applied.
    pub applied_ns: u64,
    /// Early-warning thresholds.
    pub risk: crate::risk::Risk,
    pub _pad: u32,
}
