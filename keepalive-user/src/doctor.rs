//! `tcpka doctor`: what this host gives tcpka, one check per line: ok,
//! missing (tcpka cannot load or run as asked) or a note, and what to do.
//! Read-only: it mounts, loads and changes nothing. `load` runs the
//! checks that decide whether it can work first, and refuses with the same
//! words.
use std::path::Path;

use crate::{loader, paths::PinLayout};

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
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn missing(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Missing,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn note(name: &'static str, detail: impl Into<String>, fix: Option<String>) -> Self {
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

/// Needed only to act in another network namespace (`--netns`, the API's
/// `netns`): entering it is `setns(2)`.
const CAP_SYS_ADMIN: u32 = 21;

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

fn kernel() -> Check {
    let release = loader::kernel_release();
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if !btf.exists() {
        return Check::missing(
            "kernel",
            format!("{release}, no BTF at {}", btf.display()),
            "a kernel built with CONFIG_DEBUG_INFO_BTF",
        );
    }
    match loader::kernel_version(&release) {
        Some(v) if v >= (6, 0) => Check::ok("kernel", format!("{release}, BTF")),
        _ => Check::missing(
            "kernel",
            format!("{release}: setting options from an iterator needs 6.0"),
            "Linux 6.0 or later (6.12 for the low-cost index)",
        ),
    }
}

fn cgroup2() -> Check {
    match crate::cgroup::cgroup2_mount() {
        Ok(p) => Check::ok("cgroup v2", format!("mounted at {}", p.display())),
        Err(e) => Check::missing(
            "cgroup v2",
            e.to_string(),
            "mount cgroup2 (systemd does on every current distribution)",
        ),
    }
}

fn bpffs(layout: &PinLayout) -> Check {
    let dir = layout.dir().parent().unwrap_or(Path::new("/"));
    if loader::is_bpffs(dir) || loader::is_bpffs(layout.dir()) {
        Check::ok("bpffs", format!("{} is on bpffs", dir.display()))
    } else {
        Check::note(
            "bpffs",
            format!("{} is not on bpffs", dir.display()),
            Some("`tcpka load` mounts it (mode 700)".into()),
        )
    }
}

fn tracefs() -> Check {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(2) == Some("tracefs"))
        })
        .unwrap_or(false);
    if mounted {
        Check::ok("tracefs", "mounted (used only by --holders syscalls)")
    } else {
        Check::note(
            "tracefs",
            "not mounted; not needed by default",
            Some("`tcpka load --holders syscalls` mounts it".into()),
        )
    }
}

fn index() -> Check {
    let (mode, why) = loader::default_index();
    Check::ok(
        "hooks",
        format!(
            "sock_ops on the cgroup, iter/tcp and iter/task_file on demand; index mode {} ({why})",
            mode.name()
        ),
    )
}

/// How `tcpka close` ends connections here.
fn close() -> Check {
    match crate::destroy::method() {
        Ok(m) => Check::ok(
            "close",
            format!("tcpka close ends connections with {}", m.name()),
        ),
        Err(why) => Check::note(
            "close",
            why,
            Some("everything else works; only tcpka close and POST /v1/close are refused".into()),
        ),
    }
}

fn capabilities() -> Check {
    match missing_caps() {
        Some(m) if m.is_empty() => {
            let all = CAPS.iter().map(|c| c.1).collect::<Vec<_>>().join(", ");
            if effective_caps().is_some_and(|e| e & (1 << CAP_SYS_ADMIN) != 0) {
                Check::ok("capabilities", format!("{all}, CAP_SYS_ADMIN"))
            } else {
                Check::note(
                    "capabilities",
                    format!("{all}; no CAP_SYS_ADMIN"),
                    Some("add it only to act in other network namespaces (--netns)".into()),
                )
            }
        }
        Some(m) => Check::missing(
            "capabilities",
            format!("this process lacks {}", m.join(", ")),
            "run as root, or with those capabilities",
        ),
        None => Check::note("capabilities", "unreadable (/proc/self/status)", None),
    }
}

fn lockdown() -> Check {
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

fn pins(layout: &PinLayout) -> Check {
    match loader::installed(layout) {
        Ok(None) => Check::note(
            "pins",
            format!("not loaded ({})", layout.dir().display()),
            Some("`tcpka load` or `tcpka serve`".into()),
        ),
        Ok(Some(i)) if !i.attached => Check::missing(
            "pins",
            format!("loaded for cgroup {}, which is gone", i.cgroup.display()),
            "`tcpka load` attaches again",
        ),
        Ok(Some(i)) if !i.seeded => Check::missing(
            "pins",
            "a load was interrupted",
            "the next command completes it",
        ),
        Ok(Some(i)) => Check::ok(
            "pins",
            format!(
                "loaded, attached to {}, index {}, holders {}",
                i.cgroup.display(),
                i.index.name(),
                i.holders.name()
            ),
        ),
        Err(e) => Check::missing("pins", e.to_string(), "`tcpka unload && tcpka load`"),
    }
}

/// Every check, in order.
pub fn run(layout: &PinLayout) -> Vec<Check> {
    vec![
        kernel(),
        cgroup2(),
        bpffs(layout),
        tracefs(),
        index(),
        close(),
        capabilities(),
        lockdown(),
        pins(layout),
    ]
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
