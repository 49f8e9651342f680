//! What the least-privilege service needs from root before it starts
//! (`tcpka prepare`, the unit's `ExecStartPre=+`), and what root hands to it
//! afterwards.
//!
//! The service user holds CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and
//! CAP_SYS_PTRACE, none of which lets it search the root-only (0700)
//! `/sys/fs/bpf` that systemd mounts. So the unit gives it a private
//! `/sys/fs/bpf` holding only its own pin directory (`TemporaryFileSystem=`
//! and `BindPaths=`). That directory, its pins and the lock directory must
//! then belong to the service user, whoever made them first: root's
//! commands may have run before the service ever started.
use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
};

use crate::{paths::PinLayout, Error, Result};

/// Whom the prepared files are handed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// A user by name or number, with its primary group.
    pub fn lookup(user: &str) -> Result<Self> {
        let found = match user.parse::<u32>() {
            Ok(uid) => nix::unistd::User::from_uid(uid.into()),
            Err(_) => nix::unistd::User::from_name(user),
        }
        .map_err(|e| Error::io(format!("looking up user {user}"), e.into()))?;
        let u = found.ok_or_else(|| {
            Error::Invalid(crate::InvalidInput::Usage(format!("no such user: {user}")))
        })?;
        Ok(Self {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        })
    }
}

/// What [`prepare`] did, one line each.
pub type Steps = Vec<String>;

/// Makes the installation usable by the service user `owner`: bpffs
/// mounted on `/sys/fs/bpf` (race-free), the pin directory there (mode 0700)
/// with its pins, and the runtime, lock and fleet cache directories with their
/// files, all owned by `owner`. Needs root. Idempotent.
pub fn prepare(layout: &PinLayout, owner: Owner) -> Result<Steps> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::Invalid(crate::InvalidInput::Usage(
            "tcpka prepare sets up files for the service user: run it as root (the unit's ExecStartPre=+)".into(),
        )));
    }
    let mut steps = Steps::new();
    let dir = layout.dir();
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !crate::loader::is_bpffs(dir) && !crate::loader::is_bpffs(parent) {
        if parent != Path::new(crate::paths::BPFFS) {
            return Err(Error::Refused {
                what: parent.display().to_string(),
                why: format!(
                    "not on a bpffs mount, and tcpka mounts bpffs only on {}; mount one there or choose a pin directory under {0}",
                    crate::paths::BPFFS
                ),
            });
        }
        crate::loader::mount_bpffs(parent)?;
        steps.push(format!("bpffs on {}", parent.display()));
    }
    {
        use std::os::unix::fs::DirBuilderExt as _;
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => steps.push(format!("made {}", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
        }
    }
    let n = hand_over_dir(dir, owner)?;
    steps.push(format!(
        "{} and {n} pins belong to uid {}",
        dir.display(),
        owner.uid
    ));
    // The runtime directory too (systemd makes it the user's when it makes
    // it; root may have made it first), with its files (the token).
    for d in [
        crate::paths::run_dir(),
        crate::paths::lock_dir(),
        crate::paths::fleet_cache_dir(),
    ] {
        if std::fs::symlink_metadata(&d).is_ok() {
            let n = hand_over_dir(&d, owner)?;
            steps.push(format!(
                "{} and {n} files belong to uid {}",
                d.display(),
                owner.uid
            ));
        }
    }
    Ok(steps)
}

/// After root loaded into a pin directory that belongs to another user (the
/// service's), hands it the new pins, as root's lock files are.
pub fn hand_over_pins(layout: &PinLayout) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let Ok(meta) = std::fs::symlink_metadata(layout.dir()) else {
        return Ok(());
    };
    if !meta.is_dir() || meta.uid() == 0 {
        return Ok(());
    }
    hand_over_dir(
        layout.dir(),
        Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        },
    )
    .map(drop)
}

/// Gives `dir` and the files directly in it to `owner`, never following a
/// symlink (the directory may be writable by that user, who could plant
/// one); returns how many entries it handed over. Subdirectories and
/// anything but regular files and BPF pins are left alone.
fn hand_over_dir(dir: &Path, owner: Owner) -> Result<usize> {
    use nix::{
        fcntl::{AtFlags, OFlag},
        sys::stat::{FileStat, Mode, SFlag},
    };
    let what = |e: nix::Error| Error::io(format!("handing {} over", dir.display()), e.into());
    let fd: OwnedFd = nix::fcntl::open(
        dir,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(what)
    // SAFETY: open returned a new descriptor that nothing else owns.
    .map(|raw| unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) })?;
    let uid = Some(owner.uid.into());
    let gid = Some(owner.gid.into());
    nix::unistd::fchown(fd.as_raw_fd(), uid, gid).map_err(what)?;
    let mut n = 0;
    // Names from the path; every check and change is made relative to the
    // descriptor, without following links.
    let names =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    for entry in names {
        let entry = entry.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        let name = entry.file_name();
        let name = name.as_os_str();
        let st: FileStat =
            nix::sys::stat::fstatat(Some(fd.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(what)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            continue;
        }
        nix::unistd::fchownat(
            Some(fd.as_raw_fd()),
            name,
            uid,
            gid,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(what)?;
        n += 1;
    }
    Ok(n)
}

/// Tells systemd (`Type=notify`) how serve is doing: READY=1 once the API
/// listens with the rules applied, RELOADING=1 and READY=1 around a
/// reload, STOPPING=1. Nothing without `$NOTIFY_SOCKET`; a failure is
/// logged, never fatal.
pub fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("telling systemd ({states:?}): {e}");
    }
}

/// Whether stderr is the journal's stream: systemd's `$JOURNAL_STREAM`
/// ("DEVICE:INODE") names the very file stderr is. Its mere presence says
/// nothing: children a service starts (Kamailio's `exec_cmd`) inherit it
/// with their stderr sent elsewhere.
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = parse_journal_stream(&v.to_string_lossy()) else {
        return false;
    };
    let stderr = std::io::stderr();
    let Ok(fd) = std::os::fd::AsFd::as_fd(&stderr).try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

fn parse_journal_stream(v: &str) -> Option<(u64, u64)> {
    let (dev, ino) = v.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_device_and_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(parse_journal_stream(""), None);
    }
}
