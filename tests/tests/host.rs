//! tcpka where users put it: a bare host without tracefs or debugfs, callers
//! that close the output pipe, local users who are not root, a service
//! restart that recreates the cgroup.
use std::{
    os::fd::OwnedFd,
    path::Path,
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
            r#"set -e
               for m in $(awk '$3 == "tracefs" || $3 == "debugfs" { print $2 }' /proc/self/mounts | sort -r); do umount -l "$m"; done
               "$TCPKA_BIN" unload
               # The mode with syscall tracepoints mounts tracefs itself.
               "$TCPKA_BIN" load --cgroup "$CG" --holders syscalls
               "$TCPKA_BIN" unload"#,
        ])
        .env("TCPKA_BIN", tcpka_bin())
        .env("TCPKA_PIN_DIR", &tcpka.pin_dir)
        .env("CG", &cgroup.path)
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

/// The lock that serialises commands: only root can open it, a command
/// that cannot take it fails in bounded time with a message saying so,
/// `/healthz` reports it, and every spelling of the pin directory names
/// the same lock.
#[test]
fn installation_lock_is_private_bounded_and_one_per_installation() {
    use std::os::unix::fs::PermissionsExt as _;
    let e = Env::outside();
    e.tcpka.rule_add(&["--local-port", "9", "30", "4", "7"]);
    let layout = e.tcpka.layout();
    let lock = layout.lock_file();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(lock.parent().unwrap()), 0o700, "lock directory");
    assert_eq!(mode(&lock), 0o600, "lock file");

    // An unprivileged user cannot lock it.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["flock", "--nonblock", lock.to_str().unwrap(), "true"])
        .output()
        .expect("run setpriv");
    assert!(
        !out.status.success(),
        "uid 65534 could lock {}: {out:?}",
        lock.display()
    );

    // Other spellings of the same pin directory share the lock.
    let dir = e.tcpka.pin_dir.to_str().unwrap().to_owned();
    let link = std::env::temp_dir().join(unique("tcpka-pin-link"));
    std::os::unix::fs::symlink(&e.tcpka.pin_dir, &link).unwrap();
    let spellings = [
        format!("{dir}/"),
        format!("{dir}/."),
        format!(
            "/sys/fs/bpf/../bpf/{}",
            e.tcpka.pin_dir.file_name().unwrap().to_str().unwrap()
        ),
        link.to_str().unwrap().to_owned(),
    ];
    for s in &spellings {
        assert_eq!(tcpka::paths::PinLayout::new(s).lock_file(), lock, "{s}");
    }

    // A held lock: the CLI gives up with a clear error after its bounded
    // wait, and nothing changes.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let serve = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
    let held = tcpka::lock::Lock::acquire(&layout).unwrap();
    for s in spellings.iter().map(String::as_str).chain([dir.as_str()]) {
        let started = std::time::Instant::now();
        let out = Command::new(tcpka_bin())
            .args([
                "--pin-dir",
                s,
                "rule",
                "add",
                "--local-port",
                "10",
                "30",
                "4",
                "7",
            ])
            .env("TCPKA_LOCK_WAIT_MS", "300")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{s}: {stderr}");
        assert!(stderr.contains("installation lock"), "{s}: {stderr}");
        assert!(started.elapsed() < std::time::Duration::from_secs(3), "{s}");
    }
    let (code, body) = http(&addr, "GET", "/healthz", None, None).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("installation lock"), "{body}");
    // The API answers 503 after its bounded wait, too.
    let (code, v) = http_json(
        &addr,
        "POST",
        "/v1/rules",
        serde_json::json!({"local_port": 11, "idle": 30, "count": 4, "interval": 7}),
    );
    assert_eq!(code, 503, "{v}");
    drop(held);
    let (code, body) = http(&addr, "GET", "/healthz", None, None).unwrap();
    assert_eq!(code, 200, "{body}");
    drop(serve);
    assert_eq!(
        tcpka::enforcer::Enforcer::new(layout)
            .rules()
            .unwrap()
            .len(),
        1,
        "nothing was added while the lock was held"
    );
    std::fs::remove_file(&link).unwrap();
}

/// A pin directory outside bpffs is refused before anything in it is
/// touched.
#[test]
fn pin_dir_outside_bpffs_is_refused_untouched() {
    let dir = std::env::temp_dir().join(unique("tcpka-not-bpffs"));
    std::fs::create_dir(&dir).unwrap();
    // Files named like tcpka's pins.
    for name in ["link_sockops", "TCPKA_RULES", "TCPKA_META"] {
        std::fs::write(dir.join(name), "keep me").unwrap();
    }
    let cg = CgroupDir::new();
    for args in [
        vec!["load", "--cgroup", cg.path.to_str().unwrap()],
        vec!["unload"],
    ] {
        let out = Command::new(tcpka_bin())
            .arg("--pin-dir")
            .arg(&dir)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("not on a bpffs mount"),
            "{args:?}: {stderr}"
        );
        for name in ["link_sockops", "TCPKA_RULES", "TCPKA_META"] {
            assert!(dir.join(name).exists(), "{args:?} removed {name}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn attached(t: &Tcpka) -> bool {
    let r = t.run(&["info", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["installation"]["attached"]
        .as_bool()
        .expect("attached in info --json")
}

/// Rules reach new connections in the cgroup (checked by a connection made
/// from inside it).
fn rule_reaches_new_connections(e: &Env, want: Keepalive) {
    e.cgroup.enter();
    let l = listen("127.0.0.1:0");
    let (client, _server) = connect(&l);
    e.cgroup.leave();
    assert_eq!(keepalive(&client), want);
}

/// A service restart removes and recreates its cgroup, and the kernel
/// drops the sock_ops attachment with it: `info`, `/healthz` and a metric
/// show it, `load` repairs it, and `serve` re-attaches by itself.
#[test]
fn recreated_cgroup_is_detected_and_reattached() {
    let e = Env::outside();
    e.tcpka.rule_add(&["13", "3", "2"]);
    assert!(attached(&e.tcpka));
    rule_reaches_new_connections(&e, expect(13, 3, 2, 0));

    // Restart without serve: detected, then repaired by a plain `load`.
    std::fs::remove_dir(&e.cgroup.path).unwrap();
    std::fs::create_dir(&e.cgroup.path).unwrap();
    assert!(!attached(&e.tcpka), "info must show the detachment");
    let info = e.tcpka.run(&["info"]).ok();
    assert!(info.stdout.contains("attached: NO"), "{}", info.stdout);
    rule_reaches_new_connections(&e, KERNEL_DEFAULT);
    let r = e.tcpka.run(&["load"]).ok();
    assert!(r.stdout.starts_with("re-attached"), "{}", r.stdout);
    assert!(attached(&e.tcpka));
    assert_eq!(attached_programs(&e.cgroup.path).len(), 1);
    rule_reaches_new_connections(&e, expect(13, 3, 2, 0));
    // `load --cgroup` with the same path is fine afterwards.
    let cg = e.cgroup.path.to_str().unwrap();
    let r = e.tcpka.run(&["load", "--cgroup", cg]).ok();
    assert!(r.stdout.starts_with("already loaded"), "{}", r.stdout);

    // Restart under serve: health and metrics show it, serve re-attaches.
    let addr = format!("127.0.0.1:{}", free_port());
    let _serve = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
    let metric = |name: &str| -> Option<f64> {
        let (_, text) = http(&addr, "GET", "/metrics", None, None).unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    assert_eq!(metric("tcpka_attached"), Some(1.0));
    std::fs::remove_dir(&e.cgroup.path).unwrap();
    let (code, body) = http(&addr, "GET", "/healthz", None, None).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("detached"), "{body}");
    assert_eq!(metric("tcpka_attached"), Some(0.0));
    std::fs::create_dir(&e.cgroup.path).unwrap();
    wait_until(
        "serve re-attached",
        std::time::Duration::from_secs(5),
        || attached(&e.tcpka),
    );
    assert_eq!(attached_programs(&e.cgroup.path).len(), 1);
    rule_reaches_new_connections(&e, expect(13, 3, 2, 0));
    let (code, body) = http(&addr, "GET", "/healthz", None, None).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(metric("tcpka_attached"), Some(1.0));
    assert_eq!(metric("tcpka_reattached_total"), Some(1.0));
}

/// The holder table has a cap: past it, `enable --holder` is refused with a
/// clear error and changes nothing; once holders are released it works
/// again. `info` shows the fill.
#[test]
fn holder_table_cap_is_enforced_and_recovers() {
    let e = Env::outside();
    let l = listen("127.0.0.1:0");
    let (c, _s) = connect(&l);
    let conn = format!("cookie:{}", cookie(&c));
    let cap = keepalive_common::holders::MAX_ENTRIES as u64;
    let mut h = tcpka::holders::Holders::open(&e.tcpka.layout()).unwrap();
    // Other connections' holders fill the table (cookies no socket has).
    for i in 0..cap {
        h.add(u64::MAX - i, "call").unwrap();
    }
    let r = e
        .tcpka
        .run(&["enable", &conn, "30", "3", "5", "--holder", "one-more"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("holder table is full"), "{r:?}");
    assert_eq!(
        keepalive(&c),
        KERNEL_DEFAULT,
        "a refused enable changed the socket"
    );
    let info: serde_json::Value =
        serde_json::from_str(&e.tcpka.run(&["info", "--json"]).ok().stdout).unwrap();
    assert_eq!(info["holders"]["count"].as_u64(), Some(cap), "{info}");
    assert_eq!(info["holders"]["capacity"].as_u64(), Some(cap), "{info}");
    // Room again: it works.
    assert_eq!(h.remove(u64::MAX, "call").unwrap(), Some(0));
    e.tcpka
        .run(&["enable", &conn, "30", "3", "5", "--holder", "one-more"])
        .ok();
    assert_eq!(keepalive(&c), expect(30, 3, 5, 0));
}

/// More connections to one peer than the index has slots for: `info` says
/// the index is incomplete, and commands still find every connection.
#[test]
fn index_overflow_is_shown_and_lookups_stay_complete() {
    // Connections of the cgroup on an index port: what the index holds.
    // (The environment is a fresh network namespace: the port is free.)
    let e = Env::entered_with(&["--index-ports", "5070"]);
    let l = listen("127.0.0.1:5070");
    let peer = l.local_addr().unwrap().to_string();
    let info = |t: &Tcpka| -> serde_json::Value {
        serde_json::from_str(&t.run(&["info", "--json"]).ok().stdout).unwrap()
    };
    assert_eq!(info(&e.tcpka)["index"]["failures"], 0);
    let slots = keepalive_common::index::PEER_SLOTS as usize;
    let pairs: Vec<_> = (0..slots + 2).map(|_| connect(&l)).collect();
    let v = info(&e.tcpka);
    assert_eq!(v["index"]["failures"], 0, "the map is not full: {v}");
    assert_eq!(v["index"]["overflowed_peers"], 1, "{v}");
    let text = e.tcpka.run(&["info"]).ok().stdout;
    assert!(text.contains("index: INCOMPLETE"), "{text}");
    let r = e.tcpka.run(&["enable", &peer, "30", "3", "5"]).ok();
    assert!(
        r.stdout.contains(&format!("on {} connections", slots + 2)),
        "{r:?}"
    );
    for (c, _) in &pairs {
        assert_eq!(keepalive(c), expect(30, 3, 5, 0));
    }
    // Back within the slots: the next command for the peer finds every
    // connection indexed and the peer goes back to the index.
    let mut pairs = pairs;
    pairs.truncate(slots - 1);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let r = e.tcpka.run(&["enable", &peer, "31", "3", "5"]).ok();
    assert!(
        r.stdout.contains(&format!("on {} connections", slots - 1)),
        "{r:?}"
    );
    let v = info(&e.tcpka);
    assert_eq!(v["index"]["overflowed_peers"], 0, "{v}");
    assert!(e
        .tcpka
        .run(&["info"])
        .ok()
        .stdout
        .contains("index: complete"));
    let r = e.tcpka.run(&["enable", &peer, "32", "3", "5"]).ok();
    assert!(
        r.stdout.contains(&format!("on {} connections", slots - 1)),
        "{r:?}"
    );
    for (c, _) in &pairs {
        assert_eq!(keepalive(c), expect(32, 3, 5, 0));
    }
    // And over them again: marked again.
    let more: Vec<_> = (0..3).map(|_| connect(&l)).collect();
    assert_eq!(info(&e.tcpka)["index"]["overflowed_peers"], 1);
    let r = e.tcpka.run(&["enable", &peer, "33", "3", "5"]).ok();
    assert!(
        r.stdout.contains(&format!("on {} connections", slots + 2)),
        "{r:?}"
    );
    drop(more);
}

/// A listening socket by cookie is refused (its options would pass to
/// every connection it accepts); IPv6 zone ids are refused, not dropped;
/// a user without privileges is told what is missing, not "not loaded".
#[test]
fn listeners_zone_ids_and_unprivileged_users() {
    let e = Env::outside();
    let l = listen("127.0.0.1:0");
    let r = e
        .tcpka
        .run(&["enable", &format!("cookie:{}", cookie(&l)), "30", "3", "5"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("listening socket"), "{r:?}");
    assert_eq!(keepalive(&l), KERNEL_DEFAULT);
    let (_c, s) = connect(&l);
    assert_eq!(
        keepalive(&s),
        KERNEL_DEFAULT,
        "an accepted connection inherited it"
    );
    // Still readable.
    e.tcpka
        .run(&["status", &format!("cookie:{}", cookie(&l))])
        .ok();

    for conn in ["[fe80::1%2]:5060", "[fe80::1%eth0]:5060"] {
        let r = e.tcpka.run(&["enable", conn, "30", "3", "5"]);
        assert_eq!(r.code, 2, "{r:?}");
        assert!(r.stderr.contains("zone"), "{r:?}");
    }
    let r = e.tcpka.run(&[
        "enable",
        "10.0.0.1:5060",
        "30",
        "3",
        "5",
        "--local",
        "[fe80::1%2]:5060",
    ]);
    assert_eq!(r.code, 2, "{r:?}");

    for args in [
        &["info"][..],
        &["rule", "list"],
        &["enable", "10.0.0.1:5060", "30", "3", "5"],
    ] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(tcpka_bin())
            .args(args)
            .env("TCPKA_PIN_DIR", &e.tcpka.pin_dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("needs root"), "{args:?}: {stderr}");
        assert!(!stderr.contains("not loaded"), "{args:?}: {stderr}");
    }
}

/// Each holder mode attaches what `info` says, and nothing more: checked
/// against bpftool's view of the pinned links.
#[test]
fn holder_modes_attach_what_info_says() {
    for (extra, mode, host_wide_syscall_hooks) in [
        (&[][..], "scan", 0),
        (&["--holders", "syscalls"][..], "syscalls", 3),
    ] {
        let e = Env::outside_with(extra);
        let v: serde_json::Value =
            serde_json::from_str(&e.tcpka.run(&["info", "--json"]).ok().stdout).unwrap();
        assert_eq!(v["installation"]["holders"], mode, "{v}");
        let hooks = v["hooks"].as_array().unwrap();
        let syscall = hooks
            .iter()
            .filter(|h| h["cost"] == "host: every syscall")
            .count();
        assert_eq!(syscall, host_wide_syscall_hooks, "{mode}: {v}");
        // Every hook info lists is a link bpftool sees, of the kind it says.
        for h in hooks {
            let pin = e.tcpka.pin_dir.join(h["pin"].as_str().unwrap());
            let out = Command::new("bpftool")
                .args(["link", "show", "pinned"])
                .arg(&pin)
                .arg("--json")
                .output()
                .unwrap();
            assert!(out.status.success(), "{pin:?}: {out:?}");
            let link: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let kind = link["type"].as_str().unwrap_or_default().to_owned();
            let attach = h["attach"].as_str().unwrap();
            let want = match attach.split(' ').next().unwrap() {
                "cgroup" => "cgroup",
                "tp_btf" => "raw_tracepoint",
                "tracepoint" => "perf_event",
                "iter" => "iter",
                other => panic!("unknown attach {other}"),
            };
            assert_eq!(kind, want, "{attach}: {link}");
        }
        // And nothing is pinned that info leaves out.
        let links = std::fs::read_dir(&e.tcpka.pin_dir)
            .unwrap()
            .filter_map(|d| d.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("link_") || n.starts_with("iter_"))
            .count();
        assert_eq!(links, hooks.len(), "{mode}: {v}");
    }
}

/// `tcpka doctor` reports this host and the installation, and a user
/// without the capabilities gets the check that fails, from `doctor` and,
/// in the same words, from `load`, which then touches nothing.
#[test]
fn doctor_reports_the_host_and_load_refuses_in_its_words() {
    let e = Env::outside();
    let out = e.tcpka.run(&["doctor", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "kernel",
            "cgroup v2",
            "bpffs",
            "tracefs",
            "hooks",
            "close",
            "capabilities",
            "lockdown",
            "pins"
        ]
    );
    // This kernel has CONFIG_INET_DIAG_DESTROY (the close tests need it).
    let close = &v["checks"][5];
    assert_eq!(close["status"], "ok", "{close}");
    assert!(
        close["detail"].as_str().unwrap().contains("SOCK_DESTROY"),
        "{close}"
    );
    let pins = &v["checks"][8];
    assert_eq!(pins["status"], "ok", "{pins}");
    let detail = pins["detail"].as_str().unwrap();
    assert!(
        detail.contains(&e.cgroup.path.display().to_string()) && detail.contains("index ports"),
        "{pins}"
    );

    let pin_dir = Path::new("/sys/fs/bpf").join(unique("tcpka-doctor"));
    let nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(tcpka_bin())
            .args(args)
            .env("TCPKA_PIN_DIR", &pin_dir)
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap()
    };
    let out = nobody(&["doctor"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("MISSING capabilities"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        line.contains("CAP_BPF") && line.contains("CAP_SYS_PTRACE"),
        "{line}"
    );
    let out = nobody(&["load", "--cgroup", e.cgroup.path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(line.trim_start_matches("MISSING").trim()),
        "{stderr} / {line}"
    );
    assert!(!pin_dir.exists(), "load touched {pin_dir:?}");
}
