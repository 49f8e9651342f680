//! `tcpka doctor`: what this host gives tcpka, one check per line: ok,
//! missing (tcpka cannot load or run as asked) or a note, and what to do.
//! Read-only: it mounts, loads and changes nothing. `load` runs the
//! checks that decide whether it can work first, and refuses with the same
//! words.
use std::path::Path;

pub use crate::host::{missing_caps, Check, Status, CAPS};
use crate::{
    host::{capabilities, cgroup2, kernel, lockdown},
    loader,
    paths::PinLayout,
};

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
    let mounted = crate::mounts::mount_points("tracefs").is_ok_and(|m| !m.is_empty());
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
