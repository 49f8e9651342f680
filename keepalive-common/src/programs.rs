/// The sock_ops program that applies rules to new connections.
pub const SOCK_OPS: &str = "tcpka_sockops";
/// iter/tcp program that applies pending requests to live connections.
pub const ITER_APPLY: &str = "tcpka_iter_apply";
/// iter/tcp program that gives live connections the values the rules now
/// decide for them, after a rule change ([`crate::maps::CHANGED`]).
pub const ITER_RULES: &str = "tcpka_iter_rules";
/// iter/tcp program that reports managed connections.
pub const ITER_STATUS: &str = "tcpka_iter_status";
/// tp_btf/inet_sock_set_state program: indexes established connections
/// and forgets closed ones.
pub const STATE: &str = "tcpka_state";
/// tp_btf/tcp_destroy_sock program: forgets the index entries that
/// sock_ops does not watch (before Linux 6.12).
pub const DESTROY: &str = "tcpka_destroy";
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
