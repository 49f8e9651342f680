//! The filesystems a load needs: bpffs for the pins (mounted when
//! missing), tracefs for the syscall tracepoints.
use std::{fs::File, path::Path};

use crate::{paths::PinLayout, Error, Result};

/// Makes sure the pin directory is on bpffs, mounting bpffs at its usual
/// place `/sys/fs/bpf` when nothing is mounted there (as `bpftool` does).
///
/// A pin directory that is itself on bpffs is enough: the service sees only
/// its own pin directory, bound onto a private `/sys/fs/bpf` (the unit's
/// `TemporaryFileSystem=` and `BindPaths=`), so that it need not search the
/// host's root-only bpffs.
pub(super) fn ensure_bpffs(layout: &PinLayout) -> Result<()> {
    let dir = layout.dir();
    if is_bpffs(dir) {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return check_pin_dir(layout);
    }
    if parent == Path::new(crate::paths::BPFFS) {
        mount_bpffs(parent)?;
        return check_pin_dir(layout);
    }
    Err(Error::Refused {
        what: parent.display().to_string(),
        why: format!(
            "not on a bpffs mount, and tcpka mounts bpffs only on {}; mount one there or choose a pin directory under {0}",
            crate::paths::BPFFS
        ),
    })
}

/// Mounts a bpffs instance on `dir` unless one is there, once however many
/// tcpka processes try at the same moment: each mount is a new instance,
/// and a second one would hide the first one's pins. The processes take an
/// exclusive `flock` on the mount point (the directory under any bpffs
/// mounted there later), then look again.
pub fn mount_bpffs(dir: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let point = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
    // NB: flock on a directory works on every file system; the lock goes
    // with the descriptor.
    nix::fcntl::Flock::lock(point, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io(format!("locking {}", dir.display()), e.into()))
        .and_then(|_held| {
            if is_bpffs(dir) {
                return Ok(());
            }
            // NB: mode=700 as systemd mounts it (bpffs defaults to 1777).
            nix::mount::mount(
                Some("bpf"),
                dir,
                Some("bpf"),
                nix::mount::MsFlags::MS_NOSUID
                    | nix::mount::MsFlags::MS_NODEV
                    | nix::mount::MsFlags::MS_NOEXEC,
                Some("mode=700"),
            )
            .map_err(|e| Error::io(format!("mounting bpffs on {}", dir.display()), e.into()))?;
            tracing::info!("mounted bpffs on {}", dir.display());
            Ok(())
        })
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
        Err(Error::Unsupported {
            what: format!("{TRACEFS} has no events directory"),
            needs: "syscall tracepoints (CONFIG_FTRACE_SYSCALLS)".into(),
        })
    }
}

/// An existing pin directory must itself be on bpffs (nothing else mounted
/// over it), so that removing pins never removes anything else.
pub(super) fn check_pin_dir(layout: &PinLayout) -> Result<()> {
    let dir = layout.dir();
    if std::fs::symlink_metadata(dir).is_ok() && !is_bpffs(dir) {
        return Err(Error::Refused {
            what: dir.display().to_string(),
            why: "not on a bpffs mount, so it holds no pins of tcpka's (and tcpka removes \
                  nothing there); unmount what is mounted on it, or choose another pin directory"
                .into(),
        });
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
