//! Who may drive tcpka, and what a caller may make it open.
//!
//! - The API token: read from a file or the environment, or generated into
//!   a root-only file; compared in constant time.
//! - Unix socket callers: their credentials (`SO_PEERCRED`) must be root or
//!   a member of the configured group.
//! - `Host` headers on loopback listeners (against DNS rebinding).
//! - Network namespace paths: only nsfs files, opened without following a
//!   symlink (except the `/proc/PID/ns/net` magic links) and without
//!   blocking.
use std::{
    fs::File,
    io::Write as _,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

use crate::{Error, Result};

/// Where `serve` writes the token it generates when none is configured,
/// for the default installation, in the runtime directory
/// ([`crate::paths::run_dir`]; see `PinLayout::token_file`).
pub const DEFAULT_TOKEN_FILE: &str = "/run/tcpka/api-token";
/// Environment variable holding the token.
pub const TOKEN_ENV: &str = "TCPKA_TOKEN";

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // NB: black_box keeps the compiler from turning the loop into an early
    // exit.
    std::hint::black_box(diff) == 0
}

/// Reads a token file: one line, surrounding whitespace ignored. Refuses a
/// file that others than its owner and group can read.
pub fn read_token_file(path: &Path) -> Result<String> {
    let token = read_secret_file(path)?;
    check_token(&token).map_err(|why| Error::Refused {
        what: path.display().to_string(),
        why: why.into(),
    })?;
    Ok(token)
}

/// A password (e.g. etcd's) from a file: its first line, not empty; the
/// file must not be readable by every user.
pub fn read_password_file(path: &Path) -> Result<String> {
    let text = read_secret_file(path)?;
    let first = text.lines().next().unwrap_or_default().to_owned();
    if first.is_empty() || first.len() > 1024 {
        return Err(Error::Refused {
            what: path.display().to_string(),
            why: "the first line must hold the password (1 to 1024 bytes)".into(),
        });
    }
    Ok(first)
}

/// A file holding a secret, refused when every user can read it or when
/// someone other than root or us owns it.
fn read_secret_file(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    // Whoever owns the file decides the secret: root, or the user serve
    // runs as (the service user's own files).
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(Error::Refused {
            what: path.display().to_string(),
            why: format!(
                "owned by uid {}, who could change the secret; it must be owned by root{}",
                meta.uid(),
                if me == 0 {
                    String::new()
                } else {
                    format!(" or uid {me}")
                }
            ),
        });
    }
    if meta.mode() & 0o007 != 0 {
        return Err(Error::Refused {
            what: path.display().to_string(),
            why: format!(
                "readable by every user (mode {:o}); chmod o-rwx it",
                meta.mode() & 0o777
            ),
        });
    }
    // The file checked, not whatever is at the path now.
    let mut text = String::new();
    std::io::Read::read_to_string(&mut &file, &mut text)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Ok(text.trim().to_owned())
}

/// A token must be 16 to 256 visible ASCII characters.
pub fn check_token(t: &str) -> std::result::Result<(), &'static str> {
    if t.len() < 16 || t.len() > 256 || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be 16 to 256 visible ASCII characters");
    }
    Ok(())
}

/// A new random token (32 bytes from the kernel, hex).
pub fn generate_token() -> Result<String> {
    let mut buf = [0u8; 32];
    let mut f = File::open("/dev/urandom").map_err(|e| Error::io("opening /dev/urandom", e))?;
    std::io::Read::read_exact(&mut f, &mut buf)
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `token` to `path`, mode 0600 (0640 with `group`), owned by us,
/// replacing what was there atomically.
pub fn write_token_file(path: &Path, token: &str, group: Option<u32>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    let done = (|| {
        if let Some(gid) = group {
            std::os::unix::fs::fchown(&f, None, Some(gid))?;
            f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
        }
        writeln!(f, "{token}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", path.display()), e));
    }
    Ok(())
}

/// Resolves a group name or number.
pub fn group_id(name: &str) -> Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(Error::Invalid(crate::InvalidInput::Listen(format!(
            "no such group {name:?}"
        )))),
        Err(e) => Err(Error::io(format!("looking up group {name:?}"), e.into())),
    }
}

/// Resolves a user name or number; `None` when there is no such user.
pub fn uid_of(name: &str) -> Option<u32> {
    if let Ok(uid) = name.parse::<u32>() {
        return Some(uid);
    }
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// Credentials of a unix socket peer, read from the socket when it was
/// accepted (`SO_PEERCRED`, `SO_PEERGROUPS`: race-free, unlike a look at
/// `/proc/PID` later, when the pid may be another process's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Whether the API group is the peer's group or one of its
    /// supplementary groups (false without an API group).
    pub in_api_group: bool,
}

impl Peer {
    /// The credentials of the peer of unix socket `fd`; `api_group` is the
    /// group whose members may use the API.
    pub fn of_socket(fd: &impl std::os::fd::AsFd, api_group: Option<u32>) -> std::io::Result<Self> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let cred = getsockopt(fd, PeerCredentials).map_err(std::io::Error::from)?;
        let in_api_group = match api_group {
            Some(g) => cred.gid() == g || peer_groups(fd)?.contains(&g),
            None => false,
        };
        Ok(Self {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
            in_api_group,
        })
    }

    /// Whether this peer may use the API: root, or a member of the API
    /// group.
    pub fn allowed(&self) -> bool {
        self.uid == 0 || self.in_api_group
    }
}

/// The supplementary groups of a unix socket's peer (`SO_PEERGROUPS`,
/// Linux 4.13), as they were when it connected.
fn peer_groups(fd: &impl std::os::fd::AsFd) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd as _;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer holds `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                fd.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        // ERANGE: `len` says how much it needs.
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

/// Whether a `Host` header names this loopback listener: an IP literal of
/// the loopback range or `localhost`, with the listener's port or none.
/// Anything else is a name an attacker's DNS may point here.
pub fn loopback_host_ok(host: &str, port: u16) -> bool {
    let (name, p) = match host.rsplit_once(':') {
        Some((n, p)) if !n.ends_with(':') && (n.starts_with('[') || !n.contains(':')) => {
            (n, Some(p))
        }
        _ => (host, None),
    };
    if let Some(p) = p {
        if p.parse::<u16>() != Ok(port) {
            return false;
        }
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Opens a network namespace file: an nsfs file (a `/run/netns/NAME`
/// mount, or `/proc/PID/ns/net`). The path is first opened `O_PATH`, which
/// opens nothing (a device or FIFO there is not touched), without following
/// a last symlink (the `/proc` namespace links excepted); only once that is
/// known to be nsfs is it opened for use, through the descriptor. Every
/// refusal reads the same, so that the API cannot be used to learn which
/// files exist where the caller may not look.
pub fn open_netns(path: &Path) -> Result<File> {
    let refused = || {
        Error::Netns {
        path: path.into(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a network namespace file (nsfs) tcpka can use: name /run/netns/NAME or /proc/PID/ns/net itself, not a link to it",
        ),
    }
    };
    let mut flags = libc::O_PATH | libc::O_CLOEXEC;
    if !is_proc_ns_link(path) {
        flags |= libc::O_NOFOLLOW;
    }
    let handle = File::options()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|_| refused())?;
    let fs = nix::sys::statfs::fstatfs(&handle).map_err(|_| refused())?;
    if fs.filesystem_type().0 != NSFS_MAGIC {
        return Err(refused());
    }
    // The same file, for setns (which an O_PATH descriptor is not).
    let fd = std::os::fd::AsRawFd::as_raw_fd(&handle);
    File::options()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{fd}"))
        .map_err(|e| Error::Netns {
            path: path.into(),
            source: e,
        })
}

/// `/proc/PID/ns/net`, `/proc/self/ns/net` or `/proc/thread-self/ns/net`.
fn is_proc_ns_link(path: &Path) -> bool {
    let parts: Vec<_> = path.components().collect();
    let s = |i: usize| parts.get(i).and_then(|c| c.as_os_str().to_str());
    parts.len() == 5
        && s(0) == Some("/")
        && s(1) == Some("proc")
        && s(2).is_some_and(|p| {
            p == "self" || p == "thread-self" || p.bytes().all(|b| b.is_ascii_digit())
        })
        && s(3) == Some("ns")
        && s(4) == Some("net")
}

/// The path a unix listener may take: free, or a stale socket (nothing
/// listening) that is removed. Any other file is refused, not deleted.
pub fn claim_socket_path(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("checking {}", path.display()), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::Refused {
            what: path.display().to_string(),
            why: "it exists and is not a socket; refusing to replace it".into(),
        });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::Busy {
            what: format!("another process is listening on {}", path.display()),
        });
    }
    std::fs::remove_file(path)
        .map_err(|e| Error::io(format!("removing stale {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn loopback_hosts() {
        for ok in [
            "127.0.0.1:7077",
            "127.0.0.1",
            "localhost:7077",
            "LOCALHOST",
            "[::1]:7077",
            "[::1]",
            "127.9.9.9:7077",
        ] {
            assert!(loopback_host_ok(ok, 7077), "{ok}");
        }
        for bad in [
            "evil.example:7077",
            "evil.example",
            "127.0.0.1:7078",
            "10.0.0.1:7077",
            "localhost.evil.example",
            "",
            "127.0.0.1:",
        ] {
            assert!(!loopback_host_ok(bad, 7077), "{bad}");
        }
    }

    #[test]
    fn proc_namespace_links() {
        assert!(is_proc_ns_link(Path::new("/proc/123/ns/net")));
        assert!(is_proc_ns_link(Path::new("/proc/self/ns/net")));
        assert!(is_proc_ns_link(Path::new("/proc/thread-self/ns/net")));
        assert!(!is_proc_ns_link(Path::new("/proc/123/ns/mnt")));
        assert!(!is_proc_ns_link(Path::new("/proc/../etc/ns/net")));
        assert!(!is_proc_ns_link(Path::new("/run/netns/x")));
    }

    #[test]
    fn netns_files_only() {
        assert!(open_netns(Path::new("/proc/self/ns/net")).is_ok());
        assert!(open_netns(Path::new("/etc/hostname")).is_err());
        assert!(open_netns(Path::new("/dev/null")).is_err());
    }

    #[test]
    fn tokens() {
        assert!(check_token("0123456789abcdef").is_ok());
        assert!(check_token("short").is_err());
        assert!(check_token("0123456789abcdef with space").is_err());
        let t = generate_token().unwrap();
        assert_eq!(t.len(), 64);
        assert!(check_token(&t).is_ok());
    }
}
