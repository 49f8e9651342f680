//! tcpka where users put it: a bare host without tracefs or debugfs, callers
//! that close the output pipe, local users who are not root, a service
//! restart that recreates the cgroup.
use std::{
    os::fd::OwnedFd,
    process::{Command, Stdio},
};

use tcpka_tests::*;

/// `load`, a rule, an `enable` and `unload` in a private mount namespace in
/// which neither tracefs nor debugfs is mounted (a fresh host).
#[test]
fn works_without_tracefs_or_debugfs() {
    let _netns = NetNs::new();
    let cgroup = CgroupDir::new();
    let tcpka = Tcpka::new();
    let l = listen("127.0.0.1:0");
    let (client, server) = connect(&l);
    let peer = server.peer_addr().unwrap().to_string();
    let script = r#"
        set -e
        for m in $(awk '$3 == "tracefs" || $3 == "debugfs" { print $2 }' /proc/self/mounts | sort -r); do
            umount -l "$m"
        done
        if awk '$3 == "tracefs" || $3 == "debugfs"' /proc/self/mounts | grep -q .; then
            echo "still mounted" >&2; exit 90
        fi
        "$TCPKA_BIN" load --cgroup "$CG"
        "$TCPKA_BIN" rule add --local-port 1 30 4 7
        "$TCPKA_BIN" enable "$PEER" 21 5 3
    "#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", script])
        .env("TCPKA_BIN", tcpka_bin())
        .env("TCPKA_PIN_DIR", &tcpka.pin_dir)
        .env("CG", &cgroup.path)
        .env("PEER", &peer)
        .output()
        .expect("run unshare");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // PEER is the client's end: the server's socket is the one changed.
    assert_eq!(keepalive(&server), expect(21, 5, 3, 0));
    assert_eq!(keepalive(&client), KERNEL_DEFAULT);
    // Unload, too, from a namespace without tracefs.
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            r#"for m in $(awk '$3 == "tracefs" || $3 == "debugfs" { print $2 }' /proc/self/mounts | sort -r); do umount -l "$m"; done
               "$TCPKA_BIN" unload"#,
        ])
        .env("TCPKA_BIN", tcpka_bin())
        .env("TCPKA_PIN_DIR", &tcpka.pin_dir)
        .output()
        .expect("run unshare");
    assert!(out.status.success(), "{out:?}");
    assert!(!tcpka.pin_dir.exists(), "unload left pins");
}

/// Which output a run gets broken.
#[derive(Clone, Copy, Debug)]
enum Broken {
    Stdout,
    Stderr,
}

/// A pipe whose read end is already closed: writing to it fails with
/// EPIPE, as when Kamailio's `exec_cmd()` closes its popen pipe unread.
fn broken_pipe() -> OwnedFd {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    drop(r);
    w
}

fn run_broken(t: &Tcpka, args: &[&str], which: Broken) -> (i32, String) {
    let mut c = t.cmd();
    c.args(args).stdin(Stdio::null());
    // Plenty of log output too, so stderr is written on success as well.
    c.env("RUST_LOG", "tcpka=debug");
    let captured = match which {
        Broken::Stdout => {
            c.stdout(Stdio::from(broken_pipe())).stderr(Stdio::piped());
            true
        }
        Broken::Stderr => {
            c.stderr(Stdio::from(broken_pipe())).stdout(Stdio::piped());
            false
        }
    };
    let out = c.output().expect("run tcpka");
    let other = if captured { out.stderr } else { out.stdout };
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&other).into_owned(),
    )
}

/// Every command keeps its exit code when its stdout or stderr is a pipe
/// nobody reads, and the operation is really done.
#[test]
fn closed_output_never_changes_the_result() {
    for which in [Broken::Stdout, Broken::Stderr] {
        let _netns = NetNs::new();
        let cgroup = CgroupDir::new();
        let t = Tcpka::new();
        let cg = cgroup.path.to_str().unwrap().to_owned();
        let l = listen("127.0.0.1:0");
        let (client, server) = connect(&l);
        let peer = server.peer_addr().unwrap().to_string();
        // PEER names the server's socket (its peer is the client), the
        // cookie the client's.
        let cookie = format!("cookie:{}", cookie(&client));
        let check = |args: &[&str], want: i32| {
            let (code, other) = run_broken(&t, args, which);
            assert_eq!(code, want, "{which:?} closed: tcpka {args:?}: {other}");
            assert!(
                !other.contains("panicked"),
                "{which:?} closed: tcpka {args:?} panicked: {other}"
            );
        };
        check(&["--help"], 0);
        check(&["--version"], 0);
        check(&["enable", "--help"], 0);
        check(&["info"], 1);
        check(&["load", "--cgroup", &cg], 0);
        check(&["load", "--cgroup", &cg, "--json"], 0);
        assert!(t.pin_dir.join("link_sockops").exists());
        check(&["rule", "add", "--local-port", "9", "30", "4", "7"], 0);
        check(&["rule", "add", "--local-port", "8", "30", "4", "7", "--json"], 0);
        check(&["rule", "list"], 0);
        check(&["rule", "list", "--json"], 0);
        check(&["rule", "del", "1"], 0);
        check(&["rule", "del", "1"], 1);
        assert_eq!(
            tcpka::enforcer::Enforcer::new(t.layout())
                .rules()
                .unwrap()
                .len(),
            1
        );
        check(&["rule", "add", "0", "4", "7"], 2);
        check(&["enable", &peer, "21", "5", "3"], 0);
        assert_eq!(keepalive(&server), expect(21, 5, 3, 0));
        check(&["enable", &cookie, "22", "5", "3", "--json"], 0);
        assert_eq!(keepalive(&client), expect(22, 5, 3, 0));
        check(&["enable", "127.0.0.1:1", "21", "5", "3"], 1);
        check(&["enable", "127.0.0.1:x", "21", "5", "3"], 2);
        check(&["status"], 0);
        check(&["status", "--json"], 0);
        check(&["status", &peer], 0);
        check(&["info"], 0);
        check(&["info", "--json"], 0);
        check(&["disable", &peer], 0);
        assert!(!keepalive(&server).enabled);
        check(&["disable", &cookie, "--json"], 0);
        assert!(!keepalive(&client).enabled);
        check(&["unload"], 0);
        assert!(!t.pin_dir.exists());
        check(&["unload"], 0);
    }
}
