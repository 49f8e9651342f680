//! tcpka where users put it: a bare host without tracefs or debugfs, callers
//! that close the output pipe, local users who are not root, a service
//! restart that recreates the cgroup.
use std::{
    os::fd::OwnedFd,
    path::Path,
    process::{Command, Stdio},
};

use tcpka_tests::*;

mod output;
mod tables;

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
    // CAP_SYS_PTRACE is not needed to load (commands walk without it).
    assert!(
        line.contains("CAP_BPF")
            && line.contains("CAP_NET_ADMIN")
            && !line.contains("CAP_SYS_PTRACE"),
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
