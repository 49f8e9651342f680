//! The two index modes the loader chooses between (`--index ports`, the
//! default, and `--index host`): what each attaches, the
//! direct path through the index, the walk for what the index does not
//! hold, and close events for connections inside and outside the cgroup.
use std::{
    net::{TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use tcpka_tests::*;

fn info(t: &Tcpka) -> serde_json::Value {
    serde_json::from_str(&t.run(&["info", "--json"]).ok().stdout).unwrap()
}

/// Pins of the hooks that cost every process on the host.
fn host_wide(t: &Tcpka) -> Vec<String> {
    let v = info(t);
    v["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["cost"].as_str().unwrap().starts_with("host"))
        .map(|h| h["pin"].as_str().unwrap().to_owned())
        .collect()
}

/// The bpftool link type of a pinned link.
fn link_type(pin: &Path) -> String {
    let out = std::process::Command::new("bpftool")
        .args(["link", "show", "pinned"])
        .arg(pin)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{pin:?}: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["type"].as_str().unwrap_or_default().to_owned()
}

/// `tcpka enable` with debug logs; returns whether it took the direct path.
fn enable_direct(t: &Tcpka, conn: &str, idle: &str) -> bool {
    let out = t
        .cmd()
        .env("RUST_LOG", "debug")
        .args(["enable", conn, idle, "3", "5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "enable {conn}: {err}");
    err.contains("via the index")
}

/// `tcpka serve` for the environment, and its event stream.
fn serve_with_events(e: &Env) -> (Serve, std::sync::mpsc::Receiver<serde_json::Value>) {
    let addr = format!("127.0.0.1:{}", free_port());
    let serve = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
    let events = event_stream(&serve.addr);
    (serve, events)
}

/// A new loopback connection, enabled by cookie with IDLE 3 5 (checked
/// with getsockopt): the listener, both ends and the client's cookie.
fn enabled_by_cookie(t: &Tcpka, idle: i32) -> (TcpListener, TcpStream, TcpStream, u64) {
    let l = listen("127.0.0.1:0");
    let (c, s) = connect(&l);
    let ck = cookie(&c);
    t.run(&[
        "enable",
        &format!("cookie:{ck}"),
        &idle.to_string(),
        "3",
        "5",
    ])
    .ok();
    assert_eq!(keepalive(&c), expect(idle, 3, 5, 0));
    (l, c, s, ck)
}

#[test]
fn index_modes_attach_what_info_says() {
    let e = Env::outside_with(&["--index", "ports"]);
    let v = info(&e.tcpka);
    assert_eq!(v["index_mode"], "ports", "{v}");
    assert_eq!(v["index_ports"], "5060,5061", "{v}");
    assert_eq!(host_wide(&e.tcpka), Vec::<String>::new(), "{v}");
    assert!(!e.tcpka.pin_dir.join("link_close").exists());
    drop(e);

    let e = Env::outside_with(&["--index", "host", "--index-ports", "7000"]);
    let v = info(&e.tcpka);
    assert_eq!(v["index_mode"], "host", "{v}");
    assert_eq!(host_wide(&e.tcpka), vec!["link_close".to_owned()], "{v}");
    assert_eq!(
        link_type(&e.tcpka.pin_dir.join("link_close")),
        "raw_tracepoint"
    );
}

#[test]
fn bad_index_ports_are_refused_before_anything_is_loaded() {
    let _ns = NetNs::new();
    let cg = CgroupDir::new();
    let t = Tcpka::new();
    for bad in ["0", "70000", "sip", "5060,x"] {
        let out = t
            .cmd()
            .args(["load", "--cgroup", cg.path.to_str().unwrap()])
            .args(["--index-ports", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        assert!(!t.pin_dir.exists(), "{bad}: something was pinned");
    }
}

#[test]
fn ports_index_reaches_an_index_port_connection_directly_and_forgets_it_at_close() {
    // The environment is a fresh network namespace: the port is free.
    let e = Env::entered_with(&["--index-ports", "5070"]);
    let l = listen("127.0.0.1:5070");
    let (c, s) = connect(&l);
    e.cgroup.leave();
    let target = l.local_addr().unwrap().to_string();
    assert!(enable_direct(&e.tcpka, &target, "31"));
    assert_eq!(keepalive(&c), expect(31, 3, 5, 0));
    // The server's end (local port = index port) is indexed too.
    let client = c.local_addr().unwrap().to_string();
    assert!(enable_direct(&e.tcpka, &client, "32"));
    assert_eq!(keepalive(&s), expect(32, 3, 5, 0));
    assert_eq!(e.tcpka.managed_count(), 2);
    // sock_ops sees both ends close and forgets them.
    drop((c, s));
    wait_until("both ends forgotten", Duration::from_secs(5), || {
        e.tcpka.managed_count() == 0
    });
    let v = info(&e.tcpka);
    assert_eq!(v["index"]["entries"], 0, "{v}");
}

/// The direct path's lookups run as one program run; an installation
/// without that program (an older tcpka's) reads the maps one by one, with
/// the same result.
#[test]
fn the_lookup_program_and_the_maps_give_the_same_direct_path() {
    let e = Env::entered_with(&["--index-ports", "5071"]);
    let l = listen("127.0.0.1:5071");
    let (c, _s) = connect(&l);
    e.cgroup.leave();
    let target = l.local_addr().unwrap().to_string();
    let enable = |idle: &str| {
        let out = e
            .tcpka
            .cmd()
            .env("RUST_LOG", "debug")
            .args(["enable", &target, idle, "3", "5"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        assert!(err.contains("via the index"), "{err}");
        err
    };
    let pin = e.tcpka.pin_dir.join("prog_lookup");
    assert!(pin.exists(), "{pin:?}");
    let err = enable("41");
    assert!(err.contains("one run of the lookup program"), "{err}");
    assert_eq!(keepalive(&c), expect(41, 3, 5, 0));
    std::fs::remove_file(&pin).unwrap();
    let err = enable("42");
    assert!(err.contains("reading the maps"), "{err}");
    assert_eq!(keepalive(&c), expect(42, 3, 5, 0));
}

#[test]
fn ports_index_seeds_older_connections_on_index_ports_only() {
    let _ns = NetNs::new();
    let cg = CgroupDir::new();
    // Everything in the cgroup: an accepted socket belongs to its
    // listener's cgroup.
    cg.enter();
    let l = listen("127.0.0.1:0");
    let other = listen("127.0.0.1:0");
    let (c, s) = connect(&l);
    let (oc, _os) = connect(&other);
    cg.leave();
    let t = Tcpka::new();
    let port = l.local_addr().unwrap().port().to_string();
    t.load_with(&cg.path, &["--index-ports", &port]);
    // Indexed at load: both ends of the connection on the index port.
    assert_eq!(info(&t)["index"]["entries"], 2);
    assert!(enable_direct(
        &t,
        &l.local_addr().unwrap().to_string(),
        "33"
    ));
    assert_eq!(keepalive(&c), expect(33, 3, 5, 0));
    // Not on an index port: found by the walk, all the same.
    assert!(!enable_direct(
        &t,
        &other.local_addr().unwrap().to_string(),
        "34"
    ));
    assert_eq!(keepalive(&oc), expect(34, 3, 5, 0));
    // Both are watched until they close: from 6.12 by sock_ops, with
    // nothing attached host-wide; before, sock_ops cannot be asked to: the
    // state tracepoint reports the managed one's end, and the destroy
    // tracepoint forgets the seeded index entries.
    assert_eq!(
        host_wide(&t),
        closes_watched_host_wide(&["link_close", "link_destroy"])
    );
    drop((c, s, oc));
    wait_until("closes seen", Duration::from_secs(5), || {
        t.managed_count() == 0 && info(&t)["index"]["entries"] == 0
    });
    // The next command detaches it (without a daemon to do it).
    t.rule_add(&["--local-port", "1", "60", "5", "5"]);
    assert_eq!(host_wide(&t), Vec::<String>::new());
}

#[test]
fn an_older_connection_enabled_through_the_index_reports_its_end() {
    let _ns = NetNs::new();
    let cg = CgroupDir::new();
    cg.enter();
    let l = listen("127.0.0.1:0");
    let (c, s) = connect(&l);
    let ck = cookie(&c);
    cg.leave();
    let t = Tcpka::new();
    let port = l.local_addr().unwrap().port().to_string();
    t.load_with(&cg.path, &["--index-ports", &port]);
    let addr = format!("127.0.0.1:{}", free_port());
    let serve = Serve::start(&t, &cg.path, &addr, &[]);
    let events = event_stream(&serve.addr);
    // Before 6.12 the destroy tracepoint forgets the seeded entries; once
    // one is managed, the state tracepoint reports its end as it happens.
    assert_eq!(host_wide(&t), closes_watched_host_wide(&["link_destroy"]));
    assert!(enable_direct(
        &t,
        &l.local_addr().unwrap().to_string(),
        "35"
    ));
    assert_eq!(keepalive(&c), expect(35, 3, 5, 0));
    assert_eq!(
        host_wide(&t),
        closes_watched_host_wide(&["link_close", "link_destroy"])
    );
    drop((c, s));
    let v = wait_for_event(&events, "closed", ck, Duration::from_secs(10));
    assert_eq!(v["source"], "command", "{v}");
    // Neither is needed any more: the daemon detaches both.
    wait_until("nothing host-wide", Duration::from_secs(10), || {
        host_wide(&t).is_empty() && info(&t)["index"]["entries"] == 0
    });
}

/// What is attached host-wide while a connection sock_ops did not see
/// connect is managed or indexed: nothing from Linux 6.12, `before` (the
/// state tracepoint for a managed one, the destroy tracepoint for index
/// entries) on an older kernel.
fn closes_watched_host_wide(before: &[&str]) -> Vec<String> {
    if tcpka::loader::iterators_set_cb_flags() {
        Vec::new()
    } else {
        before.iter().map(|&p| p.to_owned()).collect()
    }
}

#[test]
fn ports_index_reports_closes_in_the_cgroup_without_host_wide_hooks() {
    let e = Env::entered();
    let (_serve, events) = serve_with_events(&e);
    let (_l, c, s, ck) = enabled_by_cookie(&e.tcpka, 40);
    // Not on an index port, no rule: sock_ops did not watch it. From 6.12
    // the enable asks it to; before, the state tracepoint watches it.
    assert_eq!(
        host_wide(&e.tcpka),
        closes_watched_host_wide(&["link_close"])
    );
    drop((c, s));
    let v = wait_for_event(&events, "closed", ck, Duration::from_secs(10));
    assert_eq!(v["source"], "command", "{v}");
    wait_until("nothing host-wide", Duration::from_secs(10), || {
        host_wide(&e.tcpka).is_empty()
    });
    e.cgroup.leave();
}

#[test]
fn ports_index_watches_closes_outside_the_cgroup_only_while_needed() {
    let e = Env::outside();
    let (_serve, events) = serve_with_events(&e);
    assert_eq!(host_wide(&e.tcpka), Vec::<String>::new());
    let (_l, c, s, ck) = enabled_by_cookie(&e.tcpka, 41);
    // sock_ops never runs outside the cgroup: the state tracepoint is
    // attached for this connection's close...
    assert_eq!(host_wide(&e.tcpka), vec!["link_close".to_owned()]);
    drop((c, s));
    wait_for_event(&events, "closed", ck, Duration::from_secs(10));
    // ...and detached by the daemon once no such connection is left.
    wait_until("the tracepoint detached", Duration::from_secs(10), || {
        host_wide(&e.tcpka).is_empty()
    });
}

#[test]
fn without_a_daemon_the_next_command_detaches_the_outside_watch() {
    let e = Env::outside();
    let (_l, c, s, _) = enabled_by_cookie(&e.tcpka, 43);
    assert_eq!(host_wide(&e.tcpka), vec!["link_close".to_owned()]);
    // Still needed while the connection is open.
    e.tcpka.rule_add(&["--local-port", "1", "60", "5", "5"]);
    assert_eq!(host_wide(&e.tcpka), vec!["link_close".to_owned()]);
    drop((c, s));
    wait_until("the close seen", Duration::from_secs(5), || {
        e.tcpka.managed_count() == 0
    });
    e.tcpka.rule_add(&["--local-port", "2", "60", "5", "5"]);
    assert_eq!(host_wide(&e.tcpka), Vec::<String>::new());
}

#[test]
fn host_index_reaches_any_connection_directly_and_reports_closes() {
    let e = Env::outside_with(&["--index", "host"]);
    let (_serve, events) = serve_with_events(&e);
    let l = listen("127.0.0.1:0");
    let (c, s) = connect(&l);
    let ck = cookie(&c);
    // Any port, outside the cgroup: still the direct path.
    assert!(enable_direct(
        &e.tcpka,
        &l.local_addr().unwrap().to_string(),
        "42"
    ));
    assert_eq!(keepalive(&c), expect(42, 3, 5, 0));
    drop((c, s));
    wait_for_event(&events, "closed", ck, Duration::from_secs(10));
}

#[test]
fn a_rule_on_a_port_reaches_connections_after_it_and_not_before_it_is_removed() {
    // The port filter follows the rule table: a rule on a port applies at
    // once, and removing it stops it at once.
    let e = Env::entered();
    let l = listen("127.0.0.1:0");
    let port = l.local_addr().unwrap().port().to_string();
    let (c0, _s0) = connect(&l);
    assert_eq!(keepalive(&c0), KERNEL_DEFAULT);
    let id = e
        .tcpka
        .rule_add(&["--remote-port", &port, "50", "3", "5"])
        .to_string();
    let (c1, _s1) = connect(&l);
    assert_eq!(keepalive(&c1), expect(50, 3, 5, 0));
    e.tcpka.run(&["rule", "del", &id]).ok();
    let (c2, _s2) = connect(&l);
    assert_eq!(keepalive(&c2), KERNEL_DEFAULT);
    // An address-only rule (no port) applies to every port.
    e.tcpka.rule_add(&["--remote", "127.0.0.1", "51", "3", "5"]);
    let (c3, _s3) = connect(&l);
    assert_eq!(keepalive(&c3), expect(51, 3, 5, 0));
    e.cgroup.leave();
}
