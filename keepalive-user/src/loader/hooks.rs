//! The hooks an installation has attached, what each costs the host, and
//! the state tracepoint attached only while connections outside the
//! cgroup are managed.
use super::*;

/// What one pinned link attaches, for `info`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Hook {
    /// The pin's file name.
    pub pin: String,
    /// Where it runs, e.g. `cgroup sock_ops`, `tp_btf inet_sock_set_state`.
    pub attach: &'static str,
    /// Who pays for it: `cgroup` (connections of processes in the attached
    /// cgroup), `host` (every process), `on demand` (only when read).
    pub cost: &'static str,
}

/// The links this installation has pinned, and what each costs.
pub fn hooks(layout: &PinLayout) -> Vec<Hook> {
    let known: [(&str, &'static str, &'static str); 11] = [
        (crate::paths::SOCK_OPS_LINK, "cgroup sock_ops", "cgroup"),
        (
            crate::paths::CLOSE_LINK,
            "tp_btf inet_sock_set_state",
            "host: every TCP state change",
        ),
        (
            crate::paths::ACCEPT4_LINK,
            "tracepoint syscalls:sys_exit_accept4",
            "host: every syscall",
        ),
        (
            crate::paths::ACCEPT_LINK,
            "tracepoint syscalls:sys_exit_accept",
            "host: every syscall",
        ),
        (
            crate::paths::CONNECT_LINK,
            "tracepoint syscalls:sys_enter_connect",
            "host: every syscall",
        ),
        (crate::paths::ITER_APPLY, "iter tcp", "on demand"),
        (crate::paths::ITER_STATUS, "iter tcp", "on demand"),
        (crate::paths::ITER_SEED_PEERS, "iter tcp", "on demand"),
        (crate::paths::ITER_SEED_FDS, "iter task_file", "on demand"),
        (crate::paths::ITER_FIND_FDS, "iter task_file", "on demand"),
        ("link_sockops_new", "cgroup sock_ops", "cgroup"),
    ];
    known
        .iter()
        .filter(|(pin, _, _)| layout.dir().join(pin).exists())
        .map(|&(pin, attach, cost)| Hook {
            pin: pin.to_owned(),
            attach,
            cost,
        })
        .collect()
}

/// With the ports index: attaches the state tracepoint, so that the close
/// of a connection sock_ops will not see close is reported: a managed one
/// outside the attached cgroup (where sock_ops never runs), and, before
/// Linux 6.12, one that sock_ops did not see connect (indexed by the seed
/// pass, or enabled by the walk). Costs every connection on the host while
/// attached; [`unwatch_outside`] detaches it once no such connection is
/// left. `conns`: managed connections need it (the tracepoint then looks
/// each closing connection up; index entries cost a port check only). Call
/// with the installation lock held.
pub fn watch_outside(layout: &PinLayout, conns: bool) -> Result<()> {
    if conns {
        crate::ports::set_flag(layout, keepalive_common::ports::FLAG_WATCH_CONNS, true)?;
    }
    let link = layout.close_link();
    if link.exists() || !layout.close_prog().exists() {
        return Ok(());
    }
    let prog = sys::obj_get(&layout.close_prog())
        .map_err(|e| Error::io("opening the close tracepoint program", e))?;
    let fd = sys::raw_tracepoint_open(prog.as_fd())
        .map_err(|e| Error::io("attaching to tracepoint inet_sock_set_state", e))?;
    sys::obj_pin(fd.as_fd(), &link)
        .map_err(|e| Error::io(format!("pinning {}", link.display()), e))?;
    tracing::debug!("watching closes host-wide until no connection needs it");
    Ok(())
}

/// Whether closes are reported by the state tracepoint for connections
/// sock_ops did not see connect (a kernel before 6.12).
pub fn close_by_tracepoint(layout: &PinLayout) -> Result<bool> {
    if index_mode_of(layout) != IndexMode::Ports {
        return Ok(false);
    }
    let read =
        || crate::ports::flag(layout, keepalive_common::ports::FLAG_CLOSE_BY_TRACEPOINT).ok();
    Ok(crate::pinned::memo(layout, "close_by_tracepoint", read).unwrap_or(false))
}

/// Index entries whose close only the state tracepoint sees, still open.
pub fn unwatched_indexed(layout: &PinLayout) -> Result<u64> {
    let array =
        crate::lend::lend::<aya::maps::PerCpuArray<aya::maps::MapData, u64>>(layout, maps::STATS)?;
    let get = |i: u32| -> Result<u64> {
        Ok(array
            .get(&i, 0)
            .map_err(|e| Error::map("reading the counters", e))?
            .iter()
            .sum())
    };
    let added = get(keepalive_common::stats::UNWATCHED_ADDED)?;
    let gone = get(keepalive_common::stats::UNWATCHED_GONE)?;
    Ok(added.saturating_sub(gone))
}

/// Detaches the state tracepoint [`watch_outside`] attached once no
/// connection needs it. Returns whether it did. Takes the installation
/// lock.
pub fn unwatch_outside(layout: &PinLayout) -> Result<bool> {
    if index_mode_of(layout) != IndexMode::Ports || !layout.close_link().exists() {
        return Ok(false);
    }
    let _lock = Lock::acquire(layout)?;
    unwatch_outside_locked(layout)
}

/// [`unwatch_outside`] for a caller that holds the installation lock.
pub fn unwatch_outside_locked(layout: &PinLayout) -> Result<bool> {
    if index_mode_of(layout) != IndexMode::Ports || !layout.close_link().exists() {
        return Ok(false);
    }
    let map = open_map(layout, maps::CONNS)?;
    let conns: aya::maps::HashMap<_, u64, keepalive_common::conns::ConnInfo> =
        aya::maps::HashMap::try_from(map)
            .map_err(|e| Error::map("opening the connection map", e))?;
    let managed = conns
        .iter()
        .filter_map(|r| r.ok())
        .any(|(_, i)| i.flags & keepalive_common::conns::FLAGS_TRACEPOINT_CLOSE != 0);
    if managed {
        return Ok(false);
    }
    crate::ports::set_flag(layout, keepalive_common::ports::FLAG_WATCH_CONNS, false)?;
    if close_by_tracepoint(layout)? && unwatched_indexed(layout)? > 0 {
        return Ok(false);
    }
    std::fs::remove_file(layout.close_link())
        .map_err(|e| Error::io(format!("removing {}", layout.close_link().display()), e))?;
    tracing::debug!("no connection needs the state tracepoint: detached");
    Ok(true)
}
