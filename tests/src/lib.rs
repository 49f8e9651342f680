//! Guards and helpers for tcpka's real-kernel tests. Every test makes its
//! own network namespace, child cgroup and pin directory; each guard undoes
//! itself on drop, so the host's own connections are never touched.
//!
//! Tests panic on failure rather than return errors.
use std::{
    fs::File,
    io::BufRead as _,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc::Receiver,
    },
    time::{Duration, Instant},
};

use nix::{
    sched::{setns, unshare, CloneFlags},
    sys::socket::{
        getsockopt, setsockopt,
        sockopt::{KeepAlive, Linger, TcpKeepCount, TcpKeepIdle, TcpKeepInterval, TcpUserTimeout},
    },
};
use serde_json::Value;

mod cgroup;
mod http;
mod ns;
mod runner;
mod sockets;
mod tls;

pub use cgroup::*;
pub use http::*;
pub use ns::*;
pub use runner::*;
pub use sockets::*;
pub use tls::*;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fails loudly when not root: these tests need a real kernel and root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the kernel tests must run as root (kernel {})",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
}

/// A command run as uid and gid `uid` with no supplementary groups (and
/// no capabilities): `setpriv`, with what to run to be added.
pub fn as_user(uid: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
    ]);
    c
}

/// Whether the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// Whether the tests run under qemu's TCG (the Debian 12 VM of `cargo
/// xtask test`), where everything takes about 35 times as long.
pub fn under_tcg() -> bool {
    std::env::var_os("TCPKA_TCG").is_some()
}

/// The most a request may take under a load, given what it took without:
/// the bar, on a real host; under TCG, whose absolute times say nothing,
/// the bar or five times the time without the load, whichever is more
/// (what the bars guard against, a request waiting behind the load,
/// shows as hundreds of times).
pub fn latency_bound(bar: Duration, alone: Duration) -> Duration {
    if under_tcg() {
        bar.max(alone * 5)
    } else {
        bar
    }
}

/// Polls `done` every 50 ms; panics naming `what` unless it holds within
/// `within`.
pub fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
