//! Everything that crosses the line between tcpka's kernel programs and user
//! space: map and program names, map key/value layouts and the kernel's
//! limits for keepalive values.
//!
//! Layouts are `#[repr(C)]` without implicit padding, so both sides agree
//! byte for byte. The [`aya::Pod`] impls are only compiled with the `user`
//! feature.
#![no_std]

/// Names of the programs in the eBPF object.
pub mod programs {
    /// The sock_ops program that applies rules to new connections.
    pub const SOCK_OPS: &str = "tcpka_sockops";
    /// iter/tcp program that applies pending requests to live connections.
    pub const ITER_APPLY: &str = "tcpka_iter_apply";
    /// iter/tcp program that reports managed connections.
    pub const ITER_STATUS: &str = "tcpka_iter_status";
    /// tp_btf/inet_sock_set_state program: indexes established connections
    /// and forgets closed ones.
    pub const STATE: &str = "tcpka_state";
    /// iter/tcp program that indexes the connections of one namespace that
    /// existed before tcpka was loaded.
    pub const SEED_PEERS: &str = "tcpka_seed_peers";
    /// iter/task_file program that records who holds each TCP socket.
    pub const SEED_FDS: &str = "tcpka_seed_fds";
    /// iter/task_file program that finds who holds the sockets listed in
    /// [`crate::maps::WANT`], and stops when it found them all.
    pub const FIND_FDS: &str = "tcpka_find_fds";
    /// Read-only global: 1 when the index is kept host-wide by the state
    /// tracepoint ([`crate::meta::FLAG_HOST_INDEX`]), 0 when sock_ops keeps
    /// it for the ports in [`crate::maps::PORTS`].
    pub const GLOBAL_HOST_INDEX: &str = "HOST_INDEX";
    /// XDP program never attached: run with `BPF_PROG_TEST_RUN`, it does the
    /// index lookups of one command ([`crate::index::Query`]).
    pub const LOOKUP: &str = "tcpka_lookup";
    /// syscalls/sys_exit_accept{,4} program: records who holds an accepted
    /// socket.
    pub const ACCEPT_EXIT: &str = "tcpka_accept_exit";
    /// syscalls/sys_enter_connect program: records who holds a connecting
    /// socket.
    pub const CONNECT_ENTER: &str = "tcpka_connect_enter";
}

/// Where kernel struct members are: the programs read kernel memory at
/// these offsets. Members whose place depends on the kernel's
/// configuration come from the running kernel's BTF; the loader sets them
/// all at once as the read-only global [`offsets::GLOBAL`] (Rust eBPF has
/// no CO-RE field relocations).
pub mod offsets {
    /// Name of the read-only global that holds the [`Offsets`].
    pub const GLOBAL: &str = "OFFSETS";

    /// Byte offsets of the kernel struct members the programs read.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Offsets {
        /// `sock_common.skc_v6_daddr`.
        pub skc_v6_daddr: u32,
        /// `sock_common.skc_v6_rcv_saddr`.
        pub skc_v6_rcv_saddr: u32,
        /// `sock_common.skc_net` (a `struct net *`).
        pub skc_net: u32,
        /// `net.ns.inum`: the namespace's inode, as `stat` on
        /// `/proc/PID/ns/net` shows it.
        pub net_ns_inum: u32,
        /// `sock.sk_err`.
        pub sk_err: u32,
        /// `sock.sk_protocol`.
        pub sk_protocol: u32,
        /// `inet_sock.inet_sport`: the local port, which stays when closing
        /// has already released `skc_num`.
        pub inet_sport: u32,
        /// `task_struct.tgid`.
        pub task_tgid: u32,
        /// `task_struct.files`.
        pub task_files: u32,
        /// `files_struct.fdt`.
        pub files_fdt: u32,
        /// `fdtable.max_fds`.
        pub fdt_max_fds: u32,
        /// `fdtable.fd`.
        pub fdt_fd: u32,
        /// `file.private_data`.
        pub file_private_data: u32,
        /// `sock.sk_cgrp_data.cgroup`: the cgroup check, used by the ports
        /// index on kernels (6.12+) that have these members; 0 elsewhere.
        pub sk_cgroup: u32,
        /// `cgroup.level`.
        pub cgroup_level: u32,
        /// `cgroup.ancestors`.
        pub cgroup_ancestors: u32,
        /// `cgroup.kn`.
        pub cgroup_kn: u32,
        /// `kernfs_node.id`.
        pub kernfs_id: u32,
    }

    impl Offsets {
        /// What the programs hold until the loader sets them: x86_64's
        /// values for the socket members, 0 for the rest. Never used as
        /// loaded; non-zero so that the global is in `.rodata`.
        pub const UNSET: Self = Self {
            skc_v6_daddr: 56,
            skc_v6_rcv_saddr: 72,
            skc_net: 48,
            net_ns_inum: 176,
            sk_err: 0,
            sk_protocol: 0,
            inet_sport: 0,
            task_tgid: 0,
            task_files: 0,
            files_fdt: 0,
            fdt_max_fds: 0,
            fdt_fd: 0,
            file_private_data: 0,
            sk_cgroup: 0,
            cgroup_level: 0,
            cgroup_ancestors: 0,
            cgroup_kn: 0,
            kernfs_id: 0,
        };
    }
}

/// Names of the maps in the eBPF object (also their pin file names).
pub mod maps {
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
    /// All maps, in the order they are pinned.
    pub const ALL: [&str; 18] = [
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
    ];
}

/// The ports sock_ops looks at, so that a connection no rule and no index
/// port names costs five array reads (the flag word and one bit per set), and a rule lookup tries only the port
/// combinations some rule has. [`crate::maps::PORTS`] holds three bit sets
/// of 65,536 ports and a flag word.
pub mod ports {
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

    /// The word and bit of `port` in a set starting at `base`.
    #[inline(always)]
    pub const fn slot(base: u32, port: u16) -> (u32, u64) {
        (base + (port as u32 >> 6), 1u64 << (port & 63))
    }

    /// Default index ports: SIP over TCP and over TLS.
    pub const DEFAULT_INDEX: [u16; 2] = [5060, 5061];
}

/// Kernel limits on keepalive values (`net/ipv4/tcp.c`: `MAX_TCP_KEEPIDLE`,
/// `MAX_TCP_KEEPINTVL`, `MAX_TCP_KEEPCNT`).
pub mod limits {
    /// Largest TCP_KEEPIDLE, in seconds.
    pub const IDLE_MAX: u32 = 32767;
    /// Largest TCP_KEEPINTVL, in seconds.
    pub const INTERVAL_MAX: u32 = 32767;
    /// Largest TCP_KEEPCNT.
    pub const COUNT_MAX: u32 = 127;
    /// Largest TCP_USER_TIMEOUT tcpka accepts, in milliseconds (the kernel
    /// takes any non-negative `int`).
    pub const USER_TIMEOUT_MAX_MS: u32 = i32::MAX as u32;
}

/// Socket option numbers used with `bpf_setsockopt` (`include/uapi/linux`).
pub mod sockopt {
    pub const SOL_SOCKET: i32 = 1;
    pub const SO_KEEPALIVE: i32 = 9;
    pub const SOL_TCP: i32 = 6;
    pub const TCP_KEEPIDLE: i32 = 4;
    pub const TCP_KEEPINTVL: i32 = 5;
    pub const TCP_KEEPCNT: i32 = 6;
    pub const TCP_USER_TIMEOUT: i32 = 18;
    /// `bpf_{set,get}sockopt` only (6.12+): the socket's sock_ops callback
    /// flags.
    pub const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;
    /// `BPF_SOCK_OPS_STATE_CB_FLAG`: call sock_ops on every state change.
    pub const STATE_CB_FLAG: i32 = 4;
}

/// A keepalive policy as the programs apply it.
pub mod policy {
    /// [`Policy::flags`]: the policy sets TCP_USER_TIMEOUT.
    pub const FLAG_USER_TIMEOUT: u32 = 1;

    /// Keepalive values to apply to one connection.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Policy {
        /// TCP_KEEPIDLE, seconds (1..=[`crate::limits::IDLE_MAX`]).
        pub idle: u32,
        /// TCP_KEEPCNT (1..=[`crate::limits::COUNT_MAX`]).
        pub count: u32,
        /// TCP_KEEPINTVL, seconds (1..=[`crate::limits::INTERVAL_MAX`]).
        pub interval: u32,
        /// TCP_USER_TIMEOUT in milliseconds; applied only with
        /// [`FLAG_USER_TIMEOUT`].
        pub user_timeout_ms: u32,
        /// `FLAG_*` bits.
        pub flags: u32,
    }
}

/// The rule table: an LPM trie so that the kernel finds the longest
/// `--remote` prefix in one lookup per port combination.
pub mod rules {
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
}

/// Connections tcpka manages, keyed by socket cookie.
pub mod conns {
    /// [`ConnInfo::flags`]: the connection is outside the attached cgroup,
    /// where sock_ops never runs: with `--index ports`, its close is seen
    /// only while the state tracepoint is attached for such connections.
    pub const FLAG_OUTSIDE: u32 = 1;
    /// [`ConnInfo::flags`]: `tcpka close` is ending it; its end is reported
    /// as `KIND_CLOSED_BY_TCPKA`.
    pub const FLAG_CLOSING: u32 = 2;
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
    }
}

/// Indices into the per-CPU counter array.
pub mod stats {
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
    /// Number of counters.
    pub const LEN: u32 = 9;
}

/// Requests for live connections, applied by the iter/tcp program.
pub mod requests {
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
        /// 0 when every `bpf_setsockopt` of the request worked.
        pub apply_failed: u32,
        pub _pad: u32,
    }

    /// Capacity of each request map (requests live for one pass).
    pub const MAX_ENTRIES: u32 = 16_384;
    /// Entries in the port prefilter: every port, 0 used as the cookie flag.
    pub const PORTS_LEN: u32 = 65_536;
    /// Index in the port prefilter that flags pending cookie requests (no
    /// peer has port 0).
    pub const COOKIES_PENDING: u32 = 0;
}

/// The connection index that lets user space reach one idle connection
/// without walking every socket: peer endpoint -> cookies, cookie -> the
/// process and fd that hold it.
pub mod index {
    /// Slots per peer endpoint; more connections to one peer mark the peer
    /// as overflowed and user space walks the socket table for it.
    pub const PEER_SLOTS: u16 = 8;
    /// [`IndexKey::slot`] of the overflow marker (value unused).
    pub const SLOT_OVERFLOW: u16 = 0xffff;

    /// One slot of one peer endpoint in one network namespace.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct IndexKey {
        /// Inode number of the network namespace.
        pub netns: u32,
        /// Remote address as IPv6 (IPv4 mapped), network byte order.
        pub addr: [u8; 16],
        /// Remote port, host byte order.
        pub port: u16,
        /// 0..[`PEER_SLOTS`], or [`SLOT_OVERFLOW`].
        pub slot: u16,
    }

    /// Where an indexed socket sits.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SlotInfo {
        /// Its key in the peer index (so that a close finds it without
        /// reading the socket again).
        pub key: IndexKey,
        /// Address of its `struct sock`, the key of the fd map.
        pub sk: u64,
    }

    /// A process and descriptor that last received a TCP socket.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FdOwner {
        /// Thread group id (the process id) in the initial pid namespace.
        pub tgid: u32,
        pub fd: u32,
    }

    /// One connection the index holds, as the lookup program reports it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Found {
        /// Socket cookie; 0: the slot is empty.
        pub cookie: u64,
        /// [`SlotInfo::sk`]; 0: the slot map has no entry for the cookie.
        pub sk: u64,
        /// [`IndexKey::netns`] of its slot entry.
        pub netns: u32,
        /// Its holder, when the fd map knows one ([`FOUND_OWNER`]).
        pub owner: FdOwner,
        /// `FOUND_*` bits.
        pub flags: u32,
    }

    /// [`Found::flags`]: the slot map has the cookie.
    pub const FOUND_SLOT: u32 = 1;
    /// [`Found::flags`]: the fd map has a holder for the socket.
    pub const FOUND_OWNER: u32 = 2;

    /// The lookup program's input and output, as one buffer (the "packet"
    /// of a `BPF_PROG_TEST_RUN`): the index lookups of one command in one
    /// system call instead of one each.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Query {
        /// In: a cookie to look up alone; 0: look up the peer in [`Self::key`].
        pub cookie: u64,
        /// In: the peer (its slot is ignored).
        pub key: IndexKey,
        /// Out: 1 when the peer is marked overflowed.
        pub overflowed: u32,
        pub _pad: u32,
        /// Out: each slot's connection, in slot order (the cookie's in
        /// the first).
        pub found: [Found; PEER_SLOTS as usize],
    }

    /// Capacity of the peer index and the slot map.
    pub const MAX_ENTRIES: u32 = 1 << 20;
    /// Capacity of the fd map (LRU: descriptors closed without a TCP close
    /// age out).
    pub const FDS_MAX_ENTRIES: u32 = 1 << 18;
    /// Sockets one holder search looks for at most.
    pub const WANT_MAX_ENTRIES: u32 = 1024;
}

/// Holders: who needs a connection's keepalive (a SIP controller passes
/// the Call-ID), so that one call's disable does not turn it off under the
/// calls still up on a shared connection.
pub mod holders {
    /// Longest holder id, in bytes.
    pub const ID_MAX: usize = 64;

    /// One holder of one connection.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct HolderKey {
        pub cookie: u64,
        /// The id, zero padded.
        pub id: [u8; ID_MAX],
    }

    /// Capacity of the holder map: holders of all connections together
    /// (about 20 MB of kernel memory when full). More are refused until
    /// some are released.
    pub const MAX_ENTRIES: u32 = 1 << 17;
}

/// Events the programs report to user space through the ring buffer.
pub mod events {
    use crate::policy::Policy;

    /// A policy was applied to a connection.
    pub const KIND_APPLIED: u32 = 1;
    /// A managed connection closed in order (no error).
    pub const KIND_CLOSED: u32 = 2;
    /// A managed connection was reset (`ECONNRESET`, `EPIPE`).
    pub const KIND_RESET: u32 = 3;
    /// A managed connection's peer stopped answering: keepalive probes or
    /// retransmissions gave up (`ETIMEDOUT`, or the ICMP error that ended
    /// them, such as `EHOSTUNREACH`).
    pub const KIND_TIMEOUT: u32 = 4;
    /// A managed connection was aborted locally (`ECONNABORTED`: `ss -K`,
    /// SOCK_DESTROY, `bpf_sock_destroy`).
    pub const KIND_ABORTED: u32 = 5;
    /// A managed connection was ended by `tcpka close` (`POST /v1/close`).
    pub const KIND_CLOSED_BY_TCPKA: u32 = 6;

    /// Names a `KIND_*` value.
    pub fn kind_name(kind: u32) -> &'static str {
        match kind {
            KIND_APPLIED => "applied",
            KIND_CLOSED => "closed",
            KIND_RESET => "reset",
            KIND_TIMEOUT => "timeout",
            KIND_ABORTED => "aborted",
            KIND_CLOSED_BY_TCPKA => "closed_by_tcpka",
            _ => "unknown",
        }
    }

    /// One event. Addresses are IPv6, network byte order; IPv4 connections
    /// (family 2) carry them IPv4-mapped.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Event {
        /// `KIND_*`.
        pub kind: u32,
        /// Socket family: 2 (IPv4) or 10 (IPv6).
        pub family: u32,
        /// Socket cookie.
        pub cookie: u64,
        /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
        pub ts_ns: u64,
        /// Local address, network byte order.
        pub local_addr: [u8; 16],
        /// Remote address, network byte order.
        pub remote_addr: [u8; 16],
        /// Local port, host byte order.
        pub local_port: u16,
        /// Remote port, host byte order.
        pub remote_port: u16,
        /// Rule id, 0 when the policy did not come from a rule.
        pub rule_id: u32,
        /// The policy in force.
        pub policy: Policy,
        /// [`crate::conns`] `SOURCE_*`.
        pub source: u32,
        /// The socket's error (`sk_err`) when it closed, else 0.
        pub error: u32,
        pub _pad: u32,
    }

    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub const RING_BYTES: u32 = 256 * 1024;
}

/// The installation record, written by the loader.
pub mod meta {
    /// Longest cgroup path the record holds.
    pub const PATH_MAX: usize = 256;

    /// Where tcpka is attached and the next rule id.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Meta {
        /// Inode number of the cgroup v2 directory (the cgroup id).
        pub cgroup_id: u64,
        /// Id the next rule gets.
        pub next_rule_id: u32,
        /// Bytes used in `cgroup_path`.
        pub cgroup_path_len: u32,
        /// Cgroup directory path, UTF-8.
        pub cgroup_path: [u8; PATH_MAX],
        /// `FLAG_*`.
        pub flags: u32,
        /// [`LAYOUT_VERSION`] of the tcpka that loaded the installation.
        pub version: u32,
    }

    /// The index was seeded with what existed at load: the load finished.
    pub const FLAG_SEEDED: u32 = 1;
    /// Socket holders are recorded by syscall tracepoints (`--holders
    /// syscalls`); without it they are found on demand.
    pub const FLAG_SYSCALL_HOLDERS: u32 = 2;
    /// The index covers every connection on the host, kept by the state
    /// tracepoint (`--index host`); without it sock_ops keeps it for the
    /// index ports and watches closes per connection.
    pub const FLAG_HOST_INDEX: u32 = 4;

    /// Changes whenever the maps or programs of an installation change in a
    /// way an older or newer tcpka cannot use.
    pub const LAYOUT_VERSION: u32 = 5;
}

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
    unsafe impl aya::Pod for crate::index::IndexKey {}
    unsafe impl aya::Pod for crate::index::FdOwner {}
    unsafe impl aya::Pod for crate::index::SlotInfo {}
    unsafe impl aya::Pod for crate::holders::HolderKey {}
    unsafe impl aya::Pod for crate::offsets::Offsets {}
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
        assert_eq!(size_of::<conns::ConnInfo>(), 20 + 12 + 8);
        assert_eq!(size_of::<events::Event>(), 96);
        assert_eq!(size_of::<meta::Meta>(), 16 + meta::PATH_MAX + 8);
        assert_eq!(size_of::<requests::PeerKey>(), 20);
        assert_eq!(size_of::<index::IndexKey>(), 24);
        assert_eq!(size_of::<index::FdOwner>(), 8);
        assert_eq!(size_of::<requests::Request>(), 48);
        assert_eq!(size_of::<requests::ConnRecord>(), 84 + 4);
        assert_eq!(size_of::<offsets::Offsets>(), 18 * 4);
    }

    #[test]
    fn rank_orders_fields_before_prefix() {
        let all_ports = rules::FIELD_LOCAL_PORT | rules::FIELD_REMOTE_PORT;
        assert!(rules::rank(all_ports, 0) > rules::rank(rules::FIELD_REMOTE, 128));
        assert!(rules::rank(rules::FIELD_REMOTE, 120) > rules::rank(rules::FIELD_REMOTE, 104));
    }
}
