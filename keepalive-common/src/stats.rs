/// Connections that got a policy from a rule.
pub const APPLIED_RULE: u32 = 0;
/// `bpf_setsockopt` calls the kernel refused.
pub const SETSOCKOPT_ERRORS: u32 = 1;
/// Connection entries that did not fit in the connection map.
pub const CONNS_FULL: u32 = 2;
/// Connection entries removed at close.
pub const CONNS_CLOSED: u32 = 3;
/// `applied`/`closed` events lost because their ring buffer was full
/// (`applied` ones are dropped already at half full, to keep room for
/// `closed`).
pub const EVENTS_DROPPED: u32 = 4;
/// Connections the index could not hold (map full): user space stops
/// trusting the index for peer lookups.
pub const INDEX_FULL: u32 = 5;
/// `timeout`/`reset`/`aborted` events lost because their ring buffer was
/// full.
pub const ALERTS_DROPPED: u32 = 6;
/// Connections that found every slot of their peer taken (the peer is
/// then marked as overflowed). Counted before the mark is written, so
/// that user space can tell whether one happened while it was clearing
/// a mark.
pub const PEER_OVERFLOWS: u32 = 7;
/// Connections whose close the kernel could not be asked to report
/// (`TCP_BPF_SOCK_OPS_CB_FLAGS` refused): their `closed`, `reset` and
/// `timeout` events are not sent.
pub const CLOSE_WATCH_ERRORS: u32 = 8;
/// Index entries of connections whose close sock_ops will not see (a
/// kernel before 6.12 cannot ask it to, for connections it did not see
/// connect): the state tracepoint forgets them, attached while
/// `UNWATCHED_ADDED - UNWATCHED_GONE` is not zero.
pub const UNWATCHED_ADDED: u32 = 9;
/// Such index entries removed (the connection closed).
pub const UNWATCHED_GONE: u32 = 10;
/// Number of counters.
pub const LEN: u32 = 11;
