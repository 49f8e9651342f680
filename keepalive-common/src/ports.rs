/// `u64` words per bit set.
pub const WORDS: u32 = 1024;
/// First word of the local ports rules name.
pub const RULES_LOCAL: u32 = 0;
/// First word of the remote ports rules name.
pub const RULES_REMOTE: u32 = WORDS;
/// First word of the index ports: connections with either end on one
/// are indexed.
pub const INDEX: u32 = 2 * WORDS;
/// Index of the flag word.
pub const FLAGS: u32 = 3 * WORDS;
/// Entries in the map.
pub const LEN: u32 = 3 * WORDS + 1;
/// Flag: some rule names no port: every connection is looked up.
pub const FLAG_ANY_PORT_RULE: u64 = 1;
/// Flag: every connection is indexed.
pub const FLAG_INDEX_ALL: u64 = 2;
/// Flag: report `applied` and `closed` events for the connections a
/// rule matches (`--rule-events`); off, a rule costs no event per
/// connection. Timeouts, resets and aborts are always reported, and
/// every event of connections enabled by command.
pub const FLAG_RULE_EVENTS: u64 = 4;
/// [`FLAGS`]: `tcpka trace` runs: the programs log their decisions
/// through aya-log. Off, each log statement costs one bit test.
pub const FLAG_TRACE: u64 = 8;

/// [`FLAGS`]: this kernel cannot set sock_ops callback flags from an
/// iterator (before 6.12): connections sock_ops did not see connect are
/// watched by tracepoints instead, attached while any is left (index
/// entries by the destroy tracepoint, managed connections by the state
/// tracepoint).
pub const FLAG_CLOSE_BY_TRACEPOINT: u64 = 16;
/// [`FLAGS`]: managed connections whose close sock_ops will not see
/// (`conns::FLAGS_TRACEPOINT_CLOSE`) may exist: the state tracepoint looks
/// up every closing connection. Set by user space before such an entry is
/// made, cleared with the tracepoint's detach.
pub const FLAG_WATCH_CONNS: u64 = 32;
/// [`FLAGS`]: like [`FLAG_WATCH_CONNS`], for managed connections on index
/// ports only (enabled through the index before 6.12): the state
/// tracepoint looks up closing connections on index ports only.
pub const FLAG_WATCH_INDEXED: u64 = 64;

/// [`FLAGS`], during a pass of the rules iterator: change nothing, report
/// each connection a changed rule matches as it is (a preview).
pub const FLAG_REAPPLY_DRY_RUN: u64 = 128;
/// [`FLAGS`], during a pass of the rules iterator: a connection that a
/// changed rule matched and no rule matches now gets SO_KEEPALIVE off.
pub const FLAG_REAPPLY_REVERT: u64 = 256;
/// [`FLAGS`], during a pass of the rules iterator: a changed rule names
/// no port, so every connection is looked at.
pub const FLAG_REAPPLY_ANY_PORT: u64 = 512;

/// [`FLAGS`], bits 32 to 63: the rule generation. Every change a command
/// or a file makes to the rule table adds one (under the installation
/// lock); a new installation starts at a value of its own. The fleet agent
/// reads it to learn, in one lookup, whether the host's own rules changed
/// beside it. The programs never read it.
pub const GENERATION_SHIFT: u32 = 32;

/// The word and bit of `port` in a set starting at `base`.
#[inline(always)]
pub const fn slot(base: u32, port: u16) -> (u32, u64) {
    (base + (port as u32 >> 6), 1u64 << (port & 63))
}

/// Default index ports: SIP over TCP and over TLS.
pub const DEFAULT_INDEX: [u16; 2] = [5060, 5061];
