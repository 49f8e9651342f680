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
/// of a managed connection outside the attached cgroup (where sock_ops
/// never runs) is reported. Costs every connection on the host while
/// attached; [`unwatch_outside`] detaches it once no such connection is
/// left. Call with the installation lock held.
pub fn watch_outside(layout: &PinLayout) -> Result<()> {
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
    tracing::info!(
        "a managed connection is outside cgroup {}: watching closes host-wide until none is left",
        read_meta(layout)
            .map(|m| meta_cgroup_path(&m).display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}

/// Detaches the state tracepoint [`watch_outside`] attached once no
/// managed connection is outside the cgroup. Returns whether it did.
/// Takes the installation lock.
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
    let outside = conns
        .iter()
        .filter_map(|r| r.ok())
        .any(|(_, i)| i.flags & keepalive_common::conns::FLAG_OUTSIDE != 0);
    if outside {
        return Ok(false);
    }
    std::fs::remove_file(layout.close_link())
        .map_err(|e| Error::io(format!("removing {}", layout.close_link().display()), e))?;
    tracing::info!(
        "no managed connection outside the cgroup is left: the state tracepoint is detached"
    );
    Ok(true)
}
