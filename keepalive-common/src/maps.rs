/// Rules for new connections: [`crate::rules::RuleKey`] -> [`crate::rules::RuleValue`].
pub const RULES: &str = "TCPKA_RULES";
/// Connections tcpka applied a policy to: socket cookie -> [`crate::conns::ConnInfo`].
pub const CONNS: &str = "TCPKA_CONNS";
/// Per-CPU counters, indexed by [`crate::stats`] constants.
pub const STATS: &str = "TCPKA_STATS";
/// Ring buffer of [`crate::events::Event`]s: `applied` and `closed`.
pub const EVENTS: &str = "TCPKA_EVENTS";
/// Ring buffer of the events a controller acts on (`timeout`, `reset`,
/// `aborted`), apart so that churn never crowds them out.
pub const ALERTS: &str = "TCPKA_ALERTS";
/// One [`crate::meta::Meta`] record describing the installation.
pub const META: &str = "TCPKA_META";
/// Pending requests for live connections by peer endpoint:
/// [`crate::requests::PeerKey`] -> [`crate::requests::Request`].
pub const REQ_PEER: &str = "TCPKA_REQ_PEER";
/// Pending requests for live connections by socket cookie.
pub const REQ_COOKIE: &str = "TCPKA_REQ_COOKIE";
/// Prefilter for the apply pass: `u32` flags indexed by remote port,
/// non-zero while a peer request for that port is pending; index 0
/// ([`crate::requests::COOKIES_PENDING`]) while a cookie request is.
pub const REQ_PORTS: &str = "TCPKA_REQ_PORTS";
/// Peer index: [`crate::index::IndexKey`] -> socket cookie.
pub const PEERS: &str = "TCPKA_PEERS";
/// Each indexed socket: cookie -> [`crate::index::SlotInfo`].
pub const SLOTS: &str = "TCPKA_SLOTS";
/// Holder of each TCP socket: `struct sock` address ->
/// [`crate::index::FdOwner`] (LRU).
pub const FDS: &str = "TCPKA_FDS";
/// Network namespaces whose older connections were indexed: inode -> 1.
pub const SEEDED: &str = "TCPKA_SEEDED";
/// Holders of a connection's keepalive: [`crate::holders::HolderKey`]
/// -> 1.
pub const HOLDERS: &str = "TCPKA_HOLDERS";
/// Number of holders per connection: cookie -> count; removed at close.
pub const HOLDER_COUNT: &str = "TCPKA_HOLDER_COUNT";
/// Which ports sock_ops looks at: `u64` bit sets, see [`crate::ports`].
pub const PORTS: &str = "TCPKA_PORTS";
/// Sockets whose holder is being searched: `struct sock` address ->
/// [`crate::index::FdOwner`] (zero until found); key 0 counts the ones
/// still missing.
pub const WANT: &str = "TCPKA_WANT";
/// Names of the rules a configuration file manages: rule id ->
/// [`crate::rules::RuleName`]. User space only.
pub const RULE_NAMES: &str = "TCPKA_RULE_NAMES";
/// The rule keys a rule change touched ([`crate::rules::RuleKey`] -> 1):
/// the rules iterator re-decides the live connections one of them matches.
/// User space fills it for one pass, under the installation lock.
pub const CHANGED: &str = "TCPKA_CHANGED";
/// The report the rules iterator could not write (its output was full):
/// one [`crate::requests::Unsent`], written with the connection's next
/// visit, which the kernel makes when the reader asks for more.
pub const UNSENT: &str = "TCPKA_UNSENT";
/// Early-warning thresholds of rules that have their own: rule id ->
/// [`crate::risk::Risk`].
pub const RISK: &str = "TCPKA_RISK";
/// All maps, in the order they are pinned.
pub const ALL: [&str; 21] = [
    RULES,
    CONNS,
    STATS,
    EVENTS,
    ALERTS,
    META,
    REQ_PEER,
    REQ_COOKIE,
    REQ_PORTS,
    PEERS,
    SLOTS,
    FDS,
    SEEDED,
    HOLDERS,
    HOLDER_COUNT,
    PORTS,
    WANT,
    RULE_NAMES,
    CHANGED,
    UNSENT,
    RISK,
];
