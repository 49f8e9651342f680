//! The filesystems a load needs: bpffs for the pins (mounted when
//! missing), tracefs for the syscall tracepoints.
use super::*;

/// Makes sure the pin directory's parent is on bpffs, mounting bpffs at its
/// usual place `/sys/fs/bpf` when nothing is mounted there (as `bpftool`
/// does).
pub(super) fn ensure_bpffs(layout: &PinLayout) -> Result<()> {
    let parent = layout.dir().parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return check_pin_dir(layout);
    }
    if parent == Path::new(crate::paths::BPFFS) {
        // NB: mode=700 as systemd mounts it (bpffs defaults to 1777).
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            Some("mode=700"),
        )
        .map_err(|e| Error::io(format!("mounting bpffs on {}", parent.display()), e.into()))?;
        return check_pin_dir(layout);
    }
    Err(Error::io(
        format!("{} is not on a bpffs mount", parent.display()),
        std::io::ErrorKind::InvalidInput.into(),
    ))
}

/// Where tracefs is mounted on a usual host.
pub(super) const TRACEFS: &str = "/sys/kernel/tracing";
/// Where debugfs shows tracefs when only debugfs is mounted.
pub(super) const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Makes sure tracefs can be read, mounting it at its usual place
/// `/sys/kernel/tracing` when neither it nor debugfs's view is mounted (a
/// fresh host, a container or a minimal image mounts neither), as bpffs is.
pub fn ensure_tracefs() -> Result<()> {
    let has_events = |dir: &str| Path::new(dir).join("events").is_dir();
    if has_events(TRACEFS) || has_events(DEBUGFS_TRACING) {
        return Ok(());
    }
    const TRACEFS_MAGIC: i64 = 0x7472_6163;
    let mounted = nix::sys::statfs::statfs(TRACEFS)
        .map(|s| s.filesystem_type().0 == TRACEFS_MAGIC)
        .unwrap_or(false);
    if !mounted {
        nix::mount::mount(
            Some("tracefs"),
            TRACEFS,
            Some("tracefs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| {
            Error::io(
                format!("tracefs is not mounted and mounting it on {TRACEFS} failed (the kernel needs CONFIG_TRACING and tcpka CAP_SYS_ADMIN)"),
                e.into(),
            )
        })?;
        tracing::info!("mounted tracefs on {TRACEFS}");
    }
    if has_events(TRACEFS) {
        Ok(())
    } else {
        Err(Error::io(
            format!("{TRACEFS} has no events directory: this kernel has no syscall tracepoints (CONFIG_FTRACE_SYSCALLS)"),
            std::io::ErrorKind::NotFound.into(),
        ))
    }
}

/// An existing pin directory must itself be on bpffs (nothing else mounted
/// over it), so that removing pins never removes anything else.
pub(super) fn check_pin_dir(layout: &PinLayout) -> Result<()> {
    let dir = layout.dir();
    if std::fs::symlink_metadata(dir).is_ok() && !is_bpffs(dir) {
        return Err(Error::io(
            format!("{} is not on a bpffs mount", dir.display()),
            std::io::ErrorKind::InvalidInput.into(),
        ));
    }
    Ok(())
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}
