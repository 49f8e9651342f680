//! The hooks an installation has attached, what each costs the host, and
//! the state tracepoint attached only while connections outside the
//! cgroup are managed.
use std::{os::fd::AsFd, path::Path};

use keepalive_common::maps;

use crate::{
    lock::Lock,
    paths::PinLayout,
    pinned::{index_mode_of, open_map, IndexMode},
    sys, Error, Result,
};

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
    let known: [(&str, &'static str, &'static str); 13] = [
        (crate::paths::SOCK_OPS_LINK, "cgroup sock_ops", "cgroup"),
        (
            crate::paths::CLOSE_LINK,
            "tp_btf inet_sock_set_state",
            "host: every TCP state change",
        ),
        (
            crate::paths::DESTROY_LINK,
            "tp_btf tcp_destroy_sock",
            "host: every TCP socket's end",
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
        (crate::paths::ITER_RULES, "iter tcp", "on demand"),
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

/// What [`watch_outside`] is asked to watch the close of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// Managed connections on any port: outside the attached cgroup, where
    /// sock_ops never runs, or (before Linux 6.12) enabled by the walk
    /// without sock_ops having seen them connect.
    Conns,
    /// Managed connections on index ports that sock_ops did not see
    /// connect (before 6.12, enabled through the index).
    IndexedConns,
    /// Index entries from the seed pass (before 6.12).
    IndexEntries,
}

/// With the ports index: attaches what reports the close of connections
/// sock_ops will not see close. Costs every connection on the host while
/// attached; [`unwatch_outside`] detaches it once no such connection is
/// left. Call with the installation lock held.
///
/// Managed connections get the state tracepoint, which reports their end
/// as it happens (for [`Watch::IndexedConns`] behind a port check);
/// index entries the destroy tracepoint, which forgets them, and runs once
/// per socket where the state tracepoint runs at each change of state.
pub fn watch_outside(layout: &PinLayout, what: Watch) -> Result<()> {
    use keepalive_common::ports::{FLAG_WATCH_CONNS, FLAG_WATCH_INDEXED};
    let (link, prog, hook) = match what {
        Watch::Conns | Watch::IndexedConns => {
            let flag = if what == Watch::Conns {
                FLAG_WATCH_CONNS
            } else {
                FLAG_WATCH_INDEXED
            };
            crate::ports::set_flag(layout, flag, true)?;
            (
                layout.close_link(),
                layout.close_prog(),
                "inet_sock_set_state",
            )
        }
        Watch::IndexEntries => (
            layout.destroy_link(),
            layout.destroy_prog(),
            "tcp_destroy_sock",
        ),
    };
    if link.exists() || !prog.exists() {
        return Ok(());
    }
    let prog = sys::obj_get(&prog)
        .map_err(|e| Error::io(format!("opening the {hook} tracepoint program"), e))?;
    let fd = sys::raw_tracepoint_open(prog.as_fd())
        .map_err(|e| Error::io(format!("attaching to tracepoint {hook}"), e))?;
    sys::obj_pin(fd.as_fd(), &link)
        .map_err(|e| Error::io(format!("pinning {}", link.display()), e))?;
    tracing::debug!("attached tracepoint {hook} until no connection needs it");
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

/// Index entries whose close only the destroy tracepoint sees, still open.
pub fn unwatched_indexed(layout: &PinLayout) -> Result<u64> {
    use keepalive_common::stats::{UNWATCHED_ADDED, UNWATCHED_GONE};
    let added = crate::index::kernel_counter(layout, UNWATCHED_ADDED)?;
    let gone = crate::index::kernel_counter(layout, UNWATCHED_GONE)?;
    Ok(added.saturating_sub(gone))
}

/// Whether a tracepoint [`watch_outside`] attached is attached.
fn watching(layout: &PinLayout) -> bool {
    index_mode_of(layout) == IndexMode::Ports
        && (layout.close_link().exists() || layout.destroy_link().exists())
}

/// Detaches the tracepoints [`watch_outside`] attached once no connection
/// needs them. Returns whether it detached one. Takes the installation
/// lock.
pub fn unwatch_outside(layout: &PinLayout) -> Result<bool> {
    if !watching(layout) {
        return Ok(false);
    }
    let _lock = Lock::acquire(layout)?;
    unwatch_outside_locked(layout)
}

/// [`unwatch_outside`] for a caller that holds the installation lock.
pub fn unwatch_outside_locked(layout: &PinLayout) -> Result<bool> {
    if !watching(layout) {
        return Ok(false);
    }
    let mut detached = false;
    if layout.close_link().exists() {
        let map = open_map(layout, maps::CONNS)?;
        let conns: aya::maps::HashMap<_, u64, keepalive_common::conns::ConnInfo> =
            aya::maps::HashMap::try_from(map)
                .map_err(|e| Error::map("opening the connection map", e))?;
        let managed = conns
            .iter()
            .filter_map(|r| r.ok())
            .any(|(_, i)| i.flags & keepalive_common::conns::FLAGS_TRACEPOINT_CLOSE != 0);
        if !managed {
            use keepalive_common::ports::{FLAG_WATCH_CONNS, FLAG_WATCH_INDEXED};
            crate::ports::set_flag(layout, FLAG_WATCH_CONNS | FLAG_WATCH_INDEXED, false)?;
            detached |= detach(&layout.close_link())?;
        }
    }
    if layout.destroy_link().exists() && unwatched_indexed(layout)? == 0 {
        detached |= detach(&layout.destroy_link())?;
    }
    Ok(detached)
}

/// Removes a link's pin (its last reference: the program detaches).
fn detach(link: &Path) -> Result<bool> {
    match std::fs::remove_file(link) {
        Ok(()) => {
            tracing::debug!("no connection needs {}: detached", link.display());
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("removing {}", link.display()), e)),
    }
}
