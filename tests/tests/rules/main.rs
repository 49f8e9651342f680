//! Rules for new connections, verified with getsockopt on real sockets.
use std::{
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

use tcpka_tests::*;

mod explain;
mod live;

fn env() -> Env {
    Env::entered()
}

#[test]
fn rule_applies_to_inbound_and_outbound_v4() {
    let e = env();
    e.tcpka.rule_add(&["--tracked", "30", "4", "7"]);
    let l = listen("127.0.0.1:0");
    let (client, server) = connect(&l);
    assert_eq!(keepalive(&client), expect(30, 4, 7, 0), "outbound");
    assert_eq!(keepalive(&server), expect(30, 4, 7, 0), "inbound");
    assert_eq!(e.tcpka.managed_count(), 2);
}

#[test]
fn rule_applies_to_v6_and_sets_user_timeout() {
    let e = env();
    e.tcpka.rule_add(&[
        "--remote",
        "::1/128",
        "--user-timeout",
        "4500",
        "11",
        "3",
        "2",
    ]);
    let l = listen("[::1]:0");
    let (client, server) = connect(&l);
    assert_eq!(keepalive(&client), expect(11, 3, 2, 4500));
    assert_eq!(keepalive(&server), expect(11, 3, 2, 4500));
}

#[test]
fn ipv4_rule_matches_ipv4_mapped_ipv6_connections() {
    let e = env();
    e.tcpka.rule_add(&["--remote", "127.0.0.1", "21", "5", "3"]);
    // A dual-stack IPv6 listener; the client connects to ::ffff:127.0.0.1.
    let l = listen("[::]:0");
    let port = l.local_addr().unwrap().port();
    let client = std::net::TcpStream::connect(("::ffff:127.0.0.1", port)).unwrap();
    let (server, peer) = l.accept().unwrap();
    assert!(peer.to_string().starts_with("[::ffff:127.0.0.1]"), "{peer}");
    assert_eq!(keepalive(&client), expect(21, 5, 3, 0), "v4-mapped client");
    assert_eq!(keepalive(&server), expect(21, 5, 3, 0), "v4-mapped server");
}

/// A rule is untracked by default: it sets the values on both ends and
/// keeps nothing, so the connections are not managed; a `--tracked` rule's
/// are. (`--untracked`, the default, is still accepted.)
#[test]
fn untracked_rule_sets_the_values_and_keeps_no_record() {
    let e = env();
    e.tcpka.rule_add(&["25", "4", "6"]);
    let l = listen("127.0.0.1:0");
    let (client, server) = connect(&l);
    assert_eq!(keepalive(&client), expect(25, 4, 6, 0), "outbound");
    assert_eq!(keepalive(&server), expect(25, 4, 6, 0), "inbound");
    assert_eq!(e.tcpka.managed_count(), 0);
    let status = e.tcpka.run(&["status", "--json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(0), "{status}");
    let list = e.tcpka.run(&["rule", "list"]).ok().stdout;
    let row = list.lines().nth(1).unwrap_or_default();
    assert!(list.contains("TRACKED") && row.contains("  no  "), "{list}");

    // The same connection shape under a tracked rule is managed.
    e.tcpka.rule_add(&[
        "--tracked",
        "--local-port",
        &l.local_addr().unwrap().port().to_string(),
        "26",
        "4",
        "6",
    ]);
    let (_c2, s2) = connect(&l);
    assert_eq!(keepalive(&s2).idle, 26);
    assert_eq!(e.tcpka.managed_count(), 1);
}

#[test]
fn unmatched_connection_is_untouched() {
    let e = env();
    e.tcpka.rule_add(&["--local-port", "1", "30", "4", "7"]);
    e.tcpka
        .rule_add(&["--remote", "10.0.0.0/8", "30", "4", "7"]);
    let l = listen("127.0.0.1:0");
    let (client, server) = connect(&l);
    assert_eq!(keepalive(&client), KERNEL_DEFAULT);
    assert_eq!(keepalive(&server), KERNEL_DEFAULT);
    assert_eq!(e.tcpka.managed_count(), 0);
}

#[test]
fn connection_in_another_cgroup_is_untouched() {
    let e = env();
    e.tcpka.rule_add(&["30", "4", "7"]);
    let other = CgroupDir::new();
    other.enter();
    let l = listen("127.0.0.1:0");
    let (client, server) = connect(&l);
    assert_eq!(keepalive(&client), KERNEL_DEFAULT);
    assert_eq!(keepalive(&server), KERNEL_DEFAULT);
    // Same process back in the attached cgroup: now it applies.
    e.cgroup.enter();
    let (client, _server) = connect(&l);
    assert_eq!(keepalive(&client), expect(30, 4, 7, 0));
    drop(other);
}

#[test]
fn best_matching_rule_wins() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let port = l.local_addr().unwrap().port().to_string();
    e.tcpka.rule_add(&["10", "1", "1"]); // any
    e.tcpka
        .rule_add(&["--remote", "127.0.0.0/8", "20", "1", "1"]);
    e.tcpka
        .rule_add(&["--remote", "127.0.0.1/32", "30", "1", "1"]);
    e.tcpka.rule_add(&[
        "--local-port",
        &port,
        "--remote",
        "127.0.0.0/8",
        "40",
        "1",
        "1",
    ]);
    e.tcpka.rule_add(&[
        "--remote-port",
        &port,
        "--remote",
        "10.0.0.0/8",
        "50",
        "1",
        "1",
    ]);

    let (client, server) = connect(&l);
    // Server side: local port matches rule 4 (two fields) over the /32.
    assert_eq!(keepalive(&server).idle, 40);
    // Client side: longest remote prefix (/32) beats /8 and "any"; rule 5
    // has two fields but its remote does not match.
    assert_eq!(keepalive(&client).idle, 30);

    // Not on 127.0.0.1/8 at all: only the catch-all rule matches.
    let l6 = listen("[::1]:0");
    let (c6, s6) = connect(&l6);
    assert_eq!(keepalive(&c6).idle, 10);
    assert_eq!(keepalive(&s6).idle, 10);

    // A deleted rule no longer applies to new connections.
    e.tcpka.run(&["rule", "del", "4"]).ok();
    let (_c, server) = connect(&l);
    assert_eq!(keepalive(&server).idle, 30);
}

#[test]
fn load_twice_gives_one_attachment() {
    let e = env();
    let again = e.tcpka.load(&e.cgroup.path);
    assert!(again.stdout.contains("already loaded"), "{again:?}");
    assert_eq!(
        attached_programs(&e.cgroup.path),
        vec!["tcpka_sockops".to_owned()]
    );
    // A different cgroup while loaded is refused, and changes nothing.
    let other = CgroupDir::new();
    let r = e
        .tcpka
        .run(&["load", "--cgroup", other.path.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(attached_programs(&other.path).is_empty());
    assert_eq!(attached_programs(&e.cgroup.path).len(), 1);
}

#[test]
fn unload_removes_pins_and_attachment() {
    let e = env();
    e.tcpka.rule_add(&["30", "4", "7"]);
    let l = listen("127.0.0.1:0");
    let (before, _s) = connect(&l);
    assert_eq!(keepalive(&before), expect(30, 4, 7, 0));

    let r = e.tcpka.run(&["unload"]).ok();
    assert!(r.stdout.contains("unloaded"), "{r:?}");
    assert!(
        !e.tcpka.pin_dir.exists(),
        "pins left in {}",
        e.tcpka.pin_dir.display()
    );
    assert!(attached_programs(&e.cgroup.path).is_empty());
    let (after, server) = connect(&l);
    assert_eq!(keepalive(&after), KERNEL_DEFAULT);
    assert_eq!(keepalive(&server), KERNEL_DEFAULT);

    // Unloading again is fine; commands on a missing installation fail 1.
    assert_eq!(e.tcpka.run(&["unload"]).code, 0);
    let r = e.tcpka.run(&["rule", "list"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not loaded"), "{r:?}");
}

#[test]
fn invalid_arguments_exit_2_and_change_nothing() {
    let e = env();
    e.tcpka.rule_add(&["--local-port", "5060", "60", "5", "5"]);
    let before = e.tcpka.run(&["rule", "list", "--json"]).ok().stdout;
    let bad: &[&[&str]] = &[
        &["rule", "add", "0", "5", "5"],
        &["rule", "add", "32768", "5", "5"],
        &["rule", "add", "60", "0", "5"],
        &["rule", "add", "60", "128", "5"],
        &["rule", "add", "60", "5", "0"],
        &["rule", "add", "60", "5", "32768"],
        &["rule", "add", "sixty", "5", "5"],
        &["rule", "add", "60", "5"],
        &["rule", "add", "--local-port", "0", "60", "5", "5"],
        &["rule", "add", "--remote-port", "65536", "60", "5", "5"],
        &["rule", "add", "--remote", "10.0.0.0/33", "60", "5", "5"],
        &["rule", "add", "--remote", "10.0.0", "60", "5", "5"],
        &["rule", "add", "--remote", "::/129", "60", "5", "5"],
        &["rule", "add", "--user-timeout", "-1", "60", "5", "5"],
        &["rule", "add", "--tracked", "--untracked", "60", "5", "5"],
        &["rule", "del", "x"],
        &["rule", "frobnicate"],
    ];
    for args in bad {
        let r = e.tcpka.run(args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(!r.stderr.trim().is_empty(), "{args:?}: no message");
    }
    assert_eq!(e.tcpka.run(&["rule", "list", "--json"]).ok().stdout, before);

    // Well-formed but failing operations exit 1, also changing nothing.
    let r = e.tcpka.run(&["rule", "del", "999"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no such rule: 999"), "{r:?}");
    let r = e
        .tcpka
        .run(&["rule", "add", "--local-port", "5060", "1", "1", "1"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("already exists (id 1)"), "{r:?}");
    assert_eq!(e.tcpka.run(&["rule", "list", "--json"]).ok().stdout, before);
}

#[test]
fn rule_list_json_has_documented_fields() {
    let e = env();
    e.tcpka.rule_add(&[
        "--tracked",
        "--local-port",
        "5060",
        "--remote-port",
        "5061",
        "--remote",
        "192.0.2.0/24",
        "--user-timeout",
        "9000",
        "60",
        "5",
        "4",
    ]);
    e.tcpka.rule_add(&["--untracked", "1", "2", "3"]);
    let out = e.tcpka.run(&["rule", "list", "--json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!([
            {"id": 1, "local_port": 5060, "remote_port": 5061, "remote": "192.0.2.0/24",
             "idle": 60, "count": 5, "interval": 4, "user_timeout_ms": 9000, "tracked": true, "new_only": false, "name": null,
             "at_risk": "default"},
            {"id": 2, "local_port": null, "remote_port": null, "remote": null,
             "idle": 1, "count": 2, "interval": 3, "user_timeout_ms": null, "tracked": false, "new_only": false, "name": null,
             "at_risk": "default"},
        ])
    );
}

#[test]
fn connection_map_returns_to_its_size_after_10000_connections() {
    let e = env();
    e.tcpka.rule_add(&["--tracked", "30", "4", "7"]);
    let start = e.tcpka.managed_count();
    let l = listen("127.0.0.1:0");
    let mut peak = 0;
    for i in 0..10_000 {
        let (client, server) = connect(&l);
        if i % 1000 == 0 {
            assert_eq!(keepalive(&client).idle, 30);
            peak = peak.max(e.tcpka.managed_count());
        }
        if i % 2 == 0 {
            // Half end with an RST (SO_LINGER 0), half with an orderly close.
            reset_on_close(&client);
        }
        drop(client);
        drop(server);
    }
    assert!(peak >= start + 2, "entries were created (peak {peak})");
    // Closing is asynchronous for the side that waits for the last ACK.
    let deadline = Instant::now() + Duration::from_secs(5);
    while e.tcpka.managed_count() != start && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(e.tcpka.managed_count(), start);
}

/// Drops the peer's packets (its veth goes down) and waits for the kernel
/// to give up on the connection: ETIMEDOUT within idle + count × interval + 1 s.
#[test]
fn dead_peer_times_out() {
    let e = env();
    let (idle, count, interval) = (1u64, 3u64, 1u64);
    e.tcpka.rule_add(&["--remote", "10.199.0.2", "1", "3", "1"]);

    let peer = NamedNetns::new();
    let peer_ns = peer.name.clone();
    sh(&[
        "ip", "link", "add", "tka0", "type", "veth", "peer", "name", "tka1", "netns", &peer_ns,
    ]);
    sh(&["ip", "addr", "add", "10.199.0.1/24", "dev", "tka0"]);
    sh(&["ip", "link", "set", "tka0", "up"]);
    sh(&[
        "ip",
        "-n",
        &peer_ns,
        "addr",
        "add",
        "10.199.0.2/24",
        "dev",
        "tka1",
    ]);
    sh(&["ip", "-n", &peer_ns, "link", "set", "tka1", "up"]);

    let ns_path = peer.path();
    let listener = in_netns(&ns_path, || listen("10.199.0.2:0"));
    let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    assert_eq!(keepalive(&client), expect(1, 3, 1, 0));
    // One exchange so both sides are idle from here on.
    server.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    client.read_exact(&mut b).unwrap();

    sh(&["ip", "-n", &peer_ns, "link", "set", "tka1", "down"]);
    let start = Instant::now();
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let err = client
        .read(&mut b)
        .expect_err("the dead peer must time out");
    let took = start.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
    let bound = Duration::from_secs(idle + count * interval + 1);
    assert!(took <= bound, "timed out after {took:?}, bound {bound:?}");
    assert!(
        took >= Duration::from_secs(idle + (count - 1) * interval),
        "too early for keepalive: {took:?}"
    );
    eprintln!("dead peer detected after {took:?} (bound {bound:?})");
    drop(server);
}

/// `status` reads each managed connection's health from the kernel when
/// asked: a peer that stops answering shows its keepalive probes
/// unanswered and the age of its last ACK growing; once it answers again,
/// they are back to none and a fresh ACK.
#[test]
fn status_reads_liveness_from_the_kernel() {
    let e = env();
    e.tcpka
        .rule_add(&["--tracked", "--remote", VethPeer::ADDR, "2", "9", "1"]);
    let peer = VethPeer::new();
    let listener = peer.listen();
    let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    server.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    client.read_exact(&mut b).unwrap();
    let remote = listener.local_addr().unwrap().to_string();
    let liveness = || -> serde_json::Value {
        let out = e.tcpka.run(&["status", "--json"]).ok().stdout;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|c| c["remote"] == remote.as_str())
            .unwrap_or_else(|| panic!("{remote} not in {v}"))["liveness"]
            .clone()
    };
    let l = liveness();
    assert_eq!(l["probes_out"], 0, "{l}");
    assert!(l["last_ack_recv_ms"].as_u64().unwrap() < 1500, "{l}");
    assert!(l["rtt_us"].as_u64().unwrap() > 0, "{l}");

    peer.cut();
    // Idle 2 s, then a probe a second: by 4.5 s two or more unanswered.
    std::thread::sleep(Duration::from_millis(4500));
    let l = liveness();
    assert!(l["probes_out"].as_u64().unwrap() >= 2, "{l}");
    assert!(l["last_ack_recv_ms"].as_u64().unwrap() >= 4000, "{l}");
    let text = e.tcpka.run(&["status"]).ok().stdout;
    assert!(text.contains("probes unanswered"), "{text}");

    sh(&["ip", "-n", &peer.ns.name, "link", "set", "tka1", "up"]);
    let start = Instant::now();
    loop {
        let l = liveness();
        if l["probes_out"] == 0 && l["last_ack_recv_ms"].as_u64().unwrap() < 2000 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the peer answers again: {l}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
