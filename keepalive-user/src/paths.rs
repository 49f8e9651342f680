//! Every filesystem location tcpka uses.
use std::path::{Path, PathBuf};

/// Where bpffs is mounted on a usual host.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Default bpffs directory holding tcpka's pins.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tcpka";
/// Environment variable that overrides the pin directory (tests use it to
/// keep their pins apart from the host's).
pub const PIN_DIR_ENV: &str = "TCPKA_PIN_DIR";
/// tcpka's runtime directory (the API token, the lock directory), unless
/// systemd names another in `$RUNTIME_DIRECTORY`.
pub const RUN_DIR: &str = "/run/tcpka";
/// tcpka's state directory (the fleet cache), unless systemd names another
/// in `$STATE_DIRECTORY`.
pub const STATE_DIR: &str = "/var/lib/tcpka";

/// The runtime directory: the first of systemd's `$RUNTIME_DIRECTORY`
/// (`RuntimeDirectory=`) when set, else [`RUN_DIR`]. The unit's
/// `RuntimeDirectory=tcpka` is /run/tcpka, where root's commands look too.
pub fn run_dir() -> PathBuf {
    systemd_dir("RUNTIME_DIRECTORY").unwrap_or_else(|| PathBuf::from(RUN_DIR))
}

/// The state directory: systemd's `$STATE_DIRECTORY` when set, else
/// [`STATE_DIR`].
pub fn state_dir() -> PathBuf {
    systemd_dir("STATE_DIRECTORY").unwrap_or_else(|| PathBuf::from(STATE_DIR))
}

/// Directory of the lock files that serialise changes to one installation
/// (its owner's only).
pub fn lock_dir() -> PathBuf {
    run_dir().join("locks")
}

/// Where fleet agents keep the rules they last applied.
pub fn fleet_cache_dir() -> PathBuf {
    state_dir().join("fleet")
}

/// systemd passes a colon-separated list of absolute paths; the first is
/// tcpka's. Anything else is ignored.
fn systemd_dir(var: &str) -> Option<PathBuf> {
    let v = std::env::var_os(var)?;
    let v = v.to_str()?;
    let first = v.split(':').next()?;
    Path::new(first).is_absolute().then(|| PathBuf::from(first))
}
/// Pin name of the sock_ops cgroup link, inside the pin directory.
pub const SOCK_OPS_LINK: &str = "link_sockops";
/// Pin name of the close tracepoint link.
pub const CLOSE_LINK: &str = "link_close";
/// Pin name of the close tracepoint program, kept for attaching later
/// (`--index ports`).
pub const CLOSE_PROG: &str = "prog_close";
/// Pin name of the destroy tracepoint link (attached while index entries
/// sock_ops does not watch are left: before Linux 6.12).
pub const DESTROY_LINK: &str = "link_destroy";
/// Pin name of the destroy tracepoint program, kept for attaching later.
pub const DESTROY_PROG: &str = "prog_destroy";
/// Pin name of the index lookup program (run, never attached).
pub const LOOKUP_PROG: &str = "prog_lookup";
/// Pin names of the syscall tracepoint links that record socket holders.
pub const ACCEPT4_LINK: &str = "link_accept4";
pub const ACCEPT_LINK: &str = "link_accept";
pub const CONNECT_LINK: &str = "link_connect";
/// Pin names of the index seed iterators.
pub const ITER_SEED_PEERS: &str = "iter_seed_peers";
pub const ITER_SEED_FDS: &str = "iter_seed_fds";
/// Pin name of the iterator that finds the holders of chosen sockets.
pub const ITER_FIND_FDS: &str = "iter_find_fds";
/// Pin name of the apply iterator (reading it runs one pass).
pub const ITER_APPLY: &str = "iter_apply";
/// Pin name of the status iterator.
pub const ITER_STATUS: &str = "iter_status";
/// Pin name of the rules iterator (a rule change reaching live
/// connections).
pub const ITER_RULES: &str = "iter_rules";

/// The pins of one installation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    dir: PathBuf,
}

impl PinLayout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pin of a map, by its name from `keepalive_common::maps`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Pin of the sock_ops cgroup link.
    pub fn sock_ops_link(&self) -> PathBuf {
        self.dir.join(SOCK_OPS_LINK)
    }

    /// Pin of the close tracepoint link.
    pub fn close_link(&self) -> PathBuf {
        self.dir.join(CLOSE_LINK)
    }

    /// Pin of the destroy tracepoint link.
    pub fn destroy_link(&self) -> PathBuf {
        self.dir.join(DESTROY_LINK)
    }

    /// Pin of the destroy tracepoint program (not its link).
    pub fn destroy_prog(&self) -> PathBuf {
        self.dir.join(DESTROY_PROG)
    }

    /// Pins of the syscall tracepoint links.
    pub fn accept4_link(&self) -> PathBuf {
        self.dir.join(ACCEPT4_LINK)
    }

    pub fn accept_link(&self) -> PathBuf {
        self.dir.join(ACCEPT_LINK)
    }

    pub fn connect_link(&self) -> PathBuf {
        self.dir.join(CONNECT_LINK)
    }

    /// Pin of the iterator that indexes one namespace's connections.
    pub fn iter_seed_peers(&self) -> PathBuf {
        self.dir.join(ITER_SEED_PEERS)
    }

    /// Pin of the iterator that records every socket's holder.
    pub fn iter_seed_fds(&self) -> PathBuf {
        self.dir.join(ITER_SEED_FDS)
    }

    /// Pin of the close tracepoint program (not its link).
    pub fn close_prog(&self) -> PathBuf {
        self.dir.join(CLOSE_PROG)
    }

    pub fn lookup_prog(&self) -> PathBuf {
        self.dir.join(LOOKUP_PROG)
    }

    /// Pin of the iterator that finds the holders of the sockets in the
    /// want map.
    pub fn iter_find_fds(&self) -> PathBuf {
        self.dir.join(ITER_FIND_FDS)
    }

    /// Pin of the apply iterator.
    pub fn iter_apply(&self) -> PathBuf {
        self.dir.join(ITER_APPLY)
    }

    /// Pin of the status iterator.
    pub fn iter_status(&self) -> PathBuf {
        self.dir.join(ITER_STATUS)
    }

    /// Pin of the rules iterator.
    pub fn iter_rules(&self) -> PathBuf {
        self.dir.join(ITER_RULES)
    }

    /// Every link pin, the sock_ops link last (its presence means
    /// "loaded", so it is pinned last and removed first).
    pub fn links(&self) -> [PathBuf; 12] {
        [
            self.close_link(),
            self.destroy_link(),
            self.accept4_link(),
            self.accept_link(),
            self.connect_link(),
            self.iter_apply(),
            self.iter_status(),
            self.iter_rules(),
            self.iter_seed_peers(),
            self.iter_seed_fds(),
            self.iter_find_fds(),
            self.sock_ops_link(),
        ]
    }

    /// Lock file for this installation (outside bpffs, which only holds
    /// BPF objects). One per installation however its directory is
    /// spelled: a trailing slash, `..` or a symlink name the same lock.
    pub fn lock_file(&self) -> PathBuf {
        let name: String = canonical(&self.dir)
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        lock_dir().join(format!("{name}.lock"))
    }

    /// Where `tcpka serve` writes the API token it generated: the default
    /// installation's is `/run/tcpka/api-token`; any other's is beside its
    /// lock, so that two installations never share one (nor does a test's
    /// serve touch the host's).
    pub fn token_file(&self) -> PathBuf {
        if canonical(&self.dir) == canonical(Path::new(DEFAULT_PIN_DIR)) {
            run_dir().join("api-token")
        } else {
            self.lock_file().with_extension("token")
        }
    }

    /// Held by the installation's one `tcpka serve`, next to the lock.
    pub fn serve_lock_file(&self) -> PathBuf {
        self.lock_file().with_extension("serve")
    }

    /// The journal of unfinished holder changes, next to the lock.
    pub fn journal_file(&self) -> PathBuf {
        self.lock_file().with_extension("journal")
    }

    /// The fleet agent's copy of the etcd rules, kept across restarts
    /// and reboots (unlike the locks in /run).
    pub fn fleet_cache_file(&self) -> PathBuf {
        let name = self.lock_file();
        let name = name.file_stem().unwrap_or_default();
        fleet_cache_dir().join(format!("{}.json", name.to_string_lossy()))
    }
}

/// `path` with symlinks, `.` and `..` resolved, also when its last part does
/// not exist yet (a pin directory before `load`). Kept once found for an
/// existing directory: `serve` asks for it with every command.
fn canonical(path: &Path) -> PathBuf {
    static FOUND: std::sync::Mutex<Vec<(PathBuf, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut found = FOUND.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = found.iter().find(|(p, _)| p == path) {
        return c.clone();
    }
    if let Ok(p) = std::fs::canonicalize(path) {
        if found.len() < 64 {
            found.push((path.to_path_buf(), p.clone()));
        }
        return p;
    }
    drop(found);
    let mut clean = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                clean.pop();
            }
            std::path::Component::CurDir => {}
            other => clean.push(other),
        }
    }
    match (clean.parent(), clean.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or(clean.clone()),
        _ => clean,
    }
}

impl Default for PinLayout {
    fn default() -> Self {
        Self::new(
            std::env::var_os(PIN_DIR_ENV)
                .map_or_else(|| PathBuf::from(DEFAULT_PIN_DIR), PathBuf::from),
        )
    }
}
