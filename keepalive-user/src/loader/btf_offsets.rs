//! The kernel struct offsets the programs read, from the running
//! kernel's BTF (`keepalive_common::offsets`).
use keepalive_common::offsets::Offsets;

use crate::{pinned::IndexMode, Result};

/// Where the members the programs read are in the running kernel.
pub(super) fn kernel_offsets(btf: &crate::btf::Btf, index: IndexMode) -> Result<Offsets> {
    let at = |strukt: &str, member: &str| btf.member_offset(strukt, member);
    // The cgroup check (which connections sock_ops sees) is used by the
    // ports index only, on kernels (6.12+) that have these members.
    let cgroup = || -> Result<[u32; 5]> {
        Ok([
            at("sock", "sk_cgrp_data")? + at("sock_cgroup_data", "cgroup")?,
            at("cgroup", "level")?,
            at("cgroup", "ancestors")?,
            at("cgroup", "kn")?,
            at("kernfs_node", "id")?,
        ])
    };
    let [sk_cgroup, cgroup_level, cgroup_ancestors, cgroup_kn, kernfs_id] = match index {
        IndexMode::Ports => cgroup()?,
        IndexMode::Host => cgroup().unwrap_or_default(),
    };
    Ok(Offsets {
        skc_v6_daddr: at("sock_common", "skc_v6_daddr")?,
        skc_v6_rcv_saddr: at("sock_common", "skc_v6_rcv_saddr")?,
        skc_net: at("sock_common", "skc_net")?,
        net_ns_inum: at("net", "ns")? + at("ns_common", "inum")?,
        sk_err: at("sock", "sk_err")?,
        sk_protocol: at("sock", "sk_protocol")?,
        inet_sport: at("inet_sock", "inet_sport")?,
        task_tgid: at("task_struct", "tgid")?,
        task_files: at("task_struct", "files")?,
        files_fdt: at("files_struct", "fdt")?,
        fdt_max_fds: at("fdtable", "max_fds")?,
        fdt_fd: at("fdtable", "fd")?,
        file_private_data: at("file", "private_data")?,
        sk_cgroup,
        cgroup_level,
        cgroup_ancestors,
        cgroup_kn,
        kernfs_id,
        icsk_probes_out: at("inet_connection_sock", "icsk_probes_out")?,
        icsk_backoff: at("inet_connection_sock", "icsk_backoff")?,
        icsk_ack_lrcvtime: btf.nested_offset("inet_connection_sock", "icsk_ack", "lrcvtime")?,
        snd_wnd: at("tcp_sock", "snd_wnd")?,
        rcv_tstamp: at("tcp_sock", "rcv_tstamp")?,
        keepalive_time: at("tcp_sock", "keepalive_time")?,
    })
}
