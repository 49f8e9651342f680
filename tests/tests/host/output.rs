//! Closed and broken output never changes a command's result.
use super::*;

/// A pipe whose read end is already closed: writing to it fails with
/// EPIPE, as when Kamailio's `exec_cmd()` closes its popen pipe unread.
pub(super) fn broken_pipe() -> OwnedFd {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    drop(r);
    w
}

pub(super) fn run_broken(t: &Tcpka, args: &[&str], which: Broken) -> (i32, String) {
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
pub(super) fn closed_output_never_changes_the_result() {
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
        check(
            &["rule", "add", "--local-port", "8", "30", "4", "7", "--json"],
            0,
        );
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

/// Which output a run gets broken.
#[derive(Clone, Copy, Debug)]
pub(super) enum Broken {
    Stdout,
    Stderr,
}
