//! What this host gives tcpka: the kernel, cgroup v2, capabilities and
//! lockdown, each as a [`Check`]. `load` refuses with the first missing one
//! ([`blocking`]) before it touches anything; `tcpka doctor`
//! ([`crate::doctor`]) reports these and more.
use std::path::Path;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Something tcpka needs is not there.
    Missing,
    /// Worth knowing; tcpka works without it or sets it up itself.
    Note,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub(crate) fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub(crate) fn missing(
        name: &'static str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name,
            status: Status::Missing,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub(crate) fn note(name: &'static str, detail: impl Into<String>, fix: Option<String>) -> Self {
        Self {
            name,
            status: Status::Note,
            detail: detail.into(),
            fix,
        }
    }

    /// `name: detail (fix)`.
    pub fn describe(&self) -> String {
        match &self.fix {
            Some(fix) => format!("{}: {} ({fix})", self.name, self.detail),
            None => format!("{}: {}", self.name, self.detail),
        }
    }

    /// The report's line: a mark, then [`Check::describe`].
    pub fn line(&self) -> String {
        let mark = match self.status {
            Status::Ok => "ok",
            Status::Missing => "MISSING",
            Status::Note => "note",
        };
        format!("{mark:<7} {}", self.describe())
    }
}

/// Capabilities tcpka's commands use, by bit number.
pub const CAPS: [(u32, &str); 4] = [
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
    (12, "CAP_NET_ADMIN"),
    (19, "CAP_SYS_PTRACE"),
];

/// The capabilities of [`CAPS`] without which `load` cannot work;
/// CAP_SYS_PTRACE only lets tcpka find other users' sockets through their
/// file tables (without it, commands fall back to the walk).
pub const REQUIRED_CAPS: [(u32, &str); 3] = [CAPS[0], CAPS[1], CAPS[2]];

/// Needed only to act in another network namespace (`--netns`, the API's
/// `netns`): entering it is `setns(2)`.
const CAP_SYS_ADMIN: u32 = 21;

/// Whether this process lacks one of [`REQUIRED_CAPS`] (false when its
/// capabilities cannot be read).
pub fn lacks_required_caps() -> bool {
    missing_caps().is_some_and(|m| m.iter().any(|c| REQUIRED_CAPS.iter().any(|r| r.1 == *c)))
}

/// The effective capability set of this process.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The capabilities of [`CAPS`] this process lacks (`None`: unreadable).
pub fn missing_caps() -> Option<Vec<&'static str>> {
    let eff = effective_caps()?;
    Some(
        CAPS.iter()
            .filter(|(bit, _)| eff & (1 << bit) == 0)
            .map(|(_, name)| *name)
            .collect(),
    )
}

pub(crate) fn kernel() -> Check {
    let release = kernel_release();
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if !btf.exists() {
        return Check::missing(
            "kernel",
            format!("{release}, no BTF at {}", btf.display()),
            "a kernel built with CONFIG_DEBUG_INFO_BTF",
        );
    }
    match kernel_version(&release) {
        Some(v) if v >= (6, 0) => Check::ok("kernel", format!("{release}, BTF")),
        _ => Check::missing(
            "kernel",
            format!("{release}: setting options from an iterator needs 6.0"),
            "Linux 6.0 or later",
        ),
    }
}

pub(crate) fn cgroup2() -> Check {
    match crate::cgroup::cgroup2_mount() {
        Ok(p) => Check::ok("cgroup v2", format!("mounted at {}", p.display())),
        Err(e) => Check::missing(
            "cgroup v2",
            e.to_string(),
            "mount cgroup2 (systemd does on every current distribution)",
        ),
    }
}

pub(crate) fn capabilities() -> Check {
    let Some(missing) = missing_caps() else {
        return Check::note("capabilities", "unreadable (/proc/self/status)", None);
    };
    let required: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|m| REQUIRED_CAPS.iter().any(|c| c.1 == *m))
        .collect();
    if !required.is_empty() {
        return Check::missing(
            "capabilities",
            format!("this process lacks {}", required.join(", ")),
            "run as root, or with those capabilities",
        );
    }
    let held: Vec<&str> = CAPS
        .iter()
        .map(|c| c.1)
        .filter(|c| !missing.contains(c))
        .collect();
    let held = held.join(", ");
    if !missing.is_empty() {
        return Check::note(
            "capabilities",
            format!("{held}; no CAP_SYS_PTRACE"),
            Some(
                "commands find other users' sockets by the slower walk; add CAP_SYS_PTRACE for the direct path"
                    .into(),
            ),
        );
    }
    if effective_caps().is_some_and(|e| e & (1 << CAP_SYS_ADMIN) != 0) {
        Check::ok("capabilities", format!("{held}, CAP_SYS_ADMIN"))
    } else {
        Check::note(
            "capabilities",
            format!("{held}; no CAP_SYS_ADMIN"),
            Some("add it only to act in other network namespaces (--netns)".into()),
        )
    }
}

/// The directory on the way to `path` (or `path` itself, a directory) that
/// this process may not search, with its mode and owner: what a
/// "permission denied" there really means when no capability is missing.
pub fn unsearchable_dir(path: &Path) -> Option<(std::path::PathBuf, u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut dirs: Vec<&Path> = path.ancestors().collect();
    dirs.reverse();
    for dir in dirs {
        let Ok(meta) = std::fs::metadata(dir) else {
            return None;
        };
        if !meta.is_dir() {
            return None;
        }
        let searchable = nix::unistd::faccessat(
            None,
            dir,
            nix::unistd::AccessFlags::X_OK,
            nix::fcntl::AtFlags::AT_EACCESS,
        )
        .is_ok();
        if !searchable {
            return Some((dir.to_path_buf(), meta.mode() & 0o777, meta.uid()));
        }
    }
    None
}

/// The error for "permission denied" while doing `what` on `path`: a
/// directory this user may not search when that is the cause (no
/// capability lets a user through a directory it may not search, short of
/// CAP_DAC_OVERRIDE), else the capabilities tcpka needs.
pub fn denied(what: String, path: &Path) -> crate::Error {
    if !lacks_required_caps() {
        if let Some((dir, mode, owner)) = unsearchable_dir(path) {
            return crate::Error::Unreachable {
                what,
                dir,
                mode,
                owner,
                uid: nix::unistd::geteuid().as_raw(),
            };
        }
    }
    crate::Error::NoPrivilege { what }
}

pub(crate) fn lockdown() -> Check {
    match std::fs::read_to_string("/sys/kernel/security/lockdown") {
        // "none integrity [confidentiality]": the active one is bracketed.
        Ok(s) => {
            let active = s
                .split_whitespace()
                .find(|w| w.starts_with('['))
                .map(|w| w.trim_matches(['[', ']']).to_owned())
                .unwrap_or_default();
            if active == "confidentiality" {
                Check::missing(
                    "lockdown",
                    "confidentiality: the kernel refuses BPF reads of kernel memory",
                    "boot with lockdown=integrity or none",
                )
            } else {
                Check::ok("lockdown", active)
            }
        }
        Err(_) => Check::note(
            "lockdown",
            "unknown (securityfs not mounted)",
            Some("mount -t securityfs none /sys/kernel/security to check".into()),
        ),
    }
}

/// Parses "6.18.0-1-amd64" into (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(['.', '-']);
    let number = |s: &str| -> Option<u32> {
        let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    Some((number(it.next()?)?, number(it.next()?)?))
}

/// The kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The checks without which `load` cannot work: the first one missing.
pub fn blocking() -> Option<Check> {
    [kernel(), cgroup2(), capabilities(), lockdown()]
        .into_iter()
        .find(|c| c.status == Status::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_what_to_do() {
        let c = Check::missing("capabilities", "this process lacks CAP_BPF", "run as root");
        assert_eq!(
            c.line(),
            "MISSING capabilities: this process lacks CAP_BPF (run as root)"
        );
        assert_eq!(Check::ok("kernel", "6.18").line(), "ok      kernel: 6.18");
    }
}
