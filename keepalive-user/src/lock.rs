//! The locks of an installation, in a root-only run directory: the
//! installation lock that serialises changes across processes (and, for
//! threads of one process that share its open file, in process), and the
//! lock the one `tcpka serve` holds.
use std::{
    fs::{File, TryLockError},
    path::{Path, PathBuf},
};

use crate::{paths::PinLayout, Error, Result};

/// An exclusive lock on one installation, held while it changes, so that
/// concurrent `tcpka` processes never interleave a load, an unload or a
/// rule change. Released on drop.
///
/// The lock file lives in a root-only directory and is itself mode 0600
/// (`flock` needs only an open descriptor, so a file others can read is a
/// file others can lock); waiting for it is bounded.
pub struct Lock {
    path: PathBuf,
    file: std::sync::Arc<File>,
}

/// The lock files this process has open, kept between commands (opening
/// one checks its directory and owner: more work than the command in a
/// daemon), each with whether a thread of ours holds it. `flock` excludes
/// other processes, not our threads, which share the open file: they wait
/// here first.
struct KeptLock {
    dev: u64,
    ino: u64,
    file: std::sync::Arc<File>,
    busy: bool,
}

static KEPT_LOCKS: std::sync::Mutex<Option<std::collections::HashMap<PathBuf, KeptLock>>> =
    std::sync::Mutex::new(None);
static LOCK_FREED: std::sync::Condvar = std::sync::Condvar::new();

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
        let mut kept = KEPT_LOCKS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = kept
            .get_or_insert_with(Default::default)
            .get_mut(&self.path)
        {
            k.busy = false;
        }
        LOCK_FREED.notify_all();
    }
}

/// How long a command waits for the installation lock by default.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Environment variable that overrides [`LOCK_WAIT`], in milliseconds.
pub const LOCK_WAIT_ENV: &str = "TCPKA_LOCK_WAIT_MS";

fn lock_wait() -> std::time::Duration {
    std::env::var(LOCK_WAIT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(LOCK_WAIT, std::time::Duration::from_millis)
}

impl Lock {
    /// Takes the lock, waiting at most [`LOCK_WAIT`] (or `$TCPKA_LOCK_WAIT_MS`).
    pub fn acquire(layout: &PinLayout) -> Result<Self> {
        Self::acquire_within(layout, lock_wait())
    }

    /// Takes the lock, waiting at most `wait`; [`Error::LockBusy`] after that.
    pub fn acquire_within(layout: &PinLayout, wait: std::time::Duration) -> Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let path = layout.lock_file();
        let start = std::time::Instant::now();
        let busy = |waited: std::time::Duration| Error::LockBusy {
            path: path.clone(),
            waited_ms: waited.as_millis() as u64,
        };
        // Our own threads first.
        let mut kept = KEPT_LOCKS.lock().unwrap_or_else(|p| p.into_inner());
        while kept
            .get_or_insert_with(Default::default)
            .get(&path)
            .is_some_and(|k| k.busy)
        {
            let waited = start.elapsed();
            if waited >= wait {
                return Err(busy(waited));
            }
            kept = LOCK_FREED
                .wait_timeout(kept, wait - waited)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let map = kept.get_or_insert_with(Default::default);
        let same = match (map.get(&path), std::fs::symlink_metadata(&path)) {
            (Some(k), Ok(m)) => k.dev == m.dev() && k.ino == m.ino(),
            _ => false,
        };
        if !same {
            let file = open_lock_file(&path)?;
            let m = file
                .metadata()
                .map_err(|e| Error::io(format!("checking {}", path.display()), e))?;
            map.insert(
                path.clone(),
                KeptLock {
                    dev: m.dev(),
                    ino: m.ino(),
                    file: std::sync::Arc::new(file),
                    busy: false,
                },
            );
        }
        let k = map.get_mut(&path).expect("just kept");
        k.busy = true;
        let file = k.file.clone();
        drop(kept);
        // From here on, dropping `lock` frees our threads' turn again.
        let lock = Self {
            path: path.clone(),
            file,
        };
        let file = &lock.file;
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(lock),
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
                    continue
                }
                Err(TryLockError::Error(e)) => {
                    return Err(Error::io(format!("locking {}", path.display()), e))
                }
            }
            let waited = start.elapsed();
            if waited >= wait {
                drop(lock);
                return Err(busy(waited));
            }
            std::thread::sleep(pause.min(wait - waited));
            pause = (pause * 2).min(std::time::Duration::from_millis(20));
        }
    }
}

/// Held by the one `tcpka serve` of an installation for as long as it runs:
/// a second one would split the kernel's events with the first.
pub struct ServeLock(#[expect(dead_code, reason = "held for its flock")] File);

impl ServeLock {
    pub fn acquire(layout: &PinLayout) -> Result<Self> {
        use std::io::{Read as _, Seek as _, Write as _};
        let path = layout.serve_lock_file();
        let mut file = open_lock_file(&path)?;
        if file.try_lock().is_err() {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(Error::Busy {
                what: format!(
                    "another tcpka serve (pid {}) already serves {}; stop it first",
                    pid.trim(),
                    layout.dir().display()
                ),
            });
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        Ok(Self(file))
    }
}

/// The pid of the `tcpka serve` of this installation, if one runs (it holds
/// the serve lock).
pub fn serve_pid(layout: &PinLayout) -> Result<Option<u32>> {
    use std::io::Read as _;
    let path = layout.serve_lock_file();
    if !path.exists() {
        return Ok(None);
    }
    let mut file = open_lock_file(&path)?;
    if file.try_lock_shared().is_ok() {
        return Ok(None); // nobody holds it
    }
    let mut pid = String::new();
    file.read_to_string(&mut pid)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Ok(pid.trim().parse().ok())
}

/// Opens (creating) a lock file that only its owner can open: the
/// directory is 0700 and the file 0600, neither may be a symlink, and both
/// must belong to us, or, for root, to the owner of `/run/tcpka` (the
/// service user when systemd made it: `RuntimeDirectory=`). What root
/// creates there is handed to that owner, so that the service can use it.
fn open_lock_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    };
    let me = nix::unistd::geteuid().as_raw();
    let dir = path.parent().unwrap_or(Path::new("/"));
    if let Some(run) = dir.parent() {
        std::fs::create_dir_all(run)
            .map_err(|e| Error::io(format!("creating {}", run.display()), e))?;
    }
    // Only root trusts another owner, and only the one of the run directory,
    // which nobody else could have created (/run is root's).
    let service = dir
        .parent()
        .and_then(|run| std::fs::symlink_metadata(run).ok())
        .filter(|m| m.is_dir() && me == 0)
        .map(|m| m.uid());
    let trusted = |uid: u32| uid == me || Some(uid) == service;
    let hand_over = |what: &Path, fd: Option<&File>| -> Result<()> {
        let Some(owner) = service.filter(|o| *o != me) else {
            return Ok(());
        };
        let r = match fd {
            Some(f) => std::os::unix::fs::fchown(f, Some(owner), None),
            None => std::os::unix::fs::lchown(what, Some(owner), None),
        };
        r.map_err(|e| Error::io(format!("handing {} to uid {owner}", what.display()), e))
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => hand_over(dir, None)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("checking {}", dir.display()), e))?;
    if !meta.is_dir() || !trusted(meta.uid()) {
        // A user without tcpka's capabilities could not use the
        // installation anyway: say that, not what the directory is.
        if crate::host::lacks_required_caps() {
            return Err(Error::NoPrivilege {
                what: format!("using {}", dir.display()),
            });
        }
        return Err(Error::Refused {
            what: format!("using {}", dir.display()),
            why: format!(
                "it must be a directory owned by uid {me} (it is {} owned by uid {}); \
                 `tcpka prepare --user {me}` as root hands it over (the unit runs it), or remove it",
                if meta.is_dir() {
                    "a directory"
                } else {
                    "not a directory"
                },
                meta.uid()
            ),
        });
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("making {} private", dir.display()), e))?;
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("checking {}", path.display()), e))?;
    if meta.uid() == me && meta.nlink() == 1 && meta.is_file() {
        hand_over(path, Some(&file))?;
    }
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("checking {}", path.display()), e))?;
    if !meta.is_file() || !trusted(meta.uid()) {
        return Err(Error::Refused {
            what: format!("using {}", path.display()),
            why: format!(
                "it must be a regular file owned by uid {me} (it is {} owned by uid {}); remove it",
                if meta.is_file() {
                    "a regular file"
                } else {
                    "not a regular file"
                },
                meta.uid()
            ),
        });
    }
    if meta.mode() & 0o777 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("making {} private", path.display()), e))?;
    }
    Ok(file)
}
