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
    /// `inet_connection_sock.icsk_probes_out` (u8): keepalive or
    /// zero-window probes sent since the peer last answered.
    pub icsk_probes_out: u32,
    /// `inet_connection_sock.icsk_backoff` (u8).
    pub icsk_backoff: u32,
    /// `inet_connection_sock.icsk_ack` + `lrcvtime` (u32 jiffies): the
    /// last data received.
    pub icsk_ack_lrcvtime: u32,
    /// `tcp_sock.snd_wnd` (u32): the peer's receive window.
    pub snd_wnd: u32,
    /// `tcp_sock.rcv_tstamp` (u32 jiffies): the last ACK received.
    pub rcv_tstamp: u32,
    /// `tcp_sock.keepalive_time` (u32 jiffies, 0: the sysctl's).
    pub keepalive_time: u32,
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
        icsk_probes_out: 0,
        icsk_backoff: 0,
        icsk_ack_lrcvtime: 0,
        snd_wnd: 0,
        rcv_tstamp: 0,
        keepalive_time: 0,
    };
}
