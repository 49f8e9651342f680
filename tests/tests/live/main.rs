//! enable / disable / status on live connections: reached through the
//! iter/tcp pass, verified with getsockopt on the sockets themselves.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, SockaddrIn};
use tcpka_tests::*;

mod close;
mod index_path;

/// Loaded on a fresh cgroup that the test process is NOT in, so whatever
/// changes the test's connections is the iterator pass.
fn env() -> Env {
    Env::outside()
}

fn enable(t: &Tcpka, args: &[&str]) -> Run {
    let mut a = vec!["enable"];
    a.extend_from_slice(args);
    t.run(&a)
}

#[test]
fn enable_reaches_idle_connections_made_before_load_v4_v6_and_mapped() {
    let _netns = NetNs::new();
    let l4 = listen("127.0.0.1:0");
    let l6 = listen("[::1]:0");
    let ld = listen("[::]:0");
    let (c4, s4) = connect(&l4);
    let (c6, s6) = connect(&l6);
    let cm = TcpStream::connect(("::ffff:127.0.0.1", ld.local_addr().unwrap().port())).unwrap();
    let (sm, _) = ld.accept().unwrap();

    // Only now load: these connections saw no sock_ops callback.
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    t.load(&cgroup.path);

    let r = enable(&t, &[&l4.local_addr().unwrap().to_string(), "30", "4", "6"]).ok();
    assert!(r.stdout.contains("on 1 connection"), "{r:?}");
    assert_eq!(keepalive(&c4), expect(30, 4, 6, 0));
    assert_eq!(
        keepalive(&s4),
        KERNEL_DEFAULT,
        "the other end is a different connection"
    );

    enable(&t, &[&l6.local_addr().unwrap().to_string(), "31", "5", "7"]).ok();
    assert_eq!(keepalive(&c6), expect(31, 5, 7, 0));
    assert_eq!(keepalive(&s6), KERNEL_DEFAULT);

    // The IPv4 spelling of the peer finds the IPv4-mapped IPv6 socket.
    let port = ld.local_addr().unwrap().port();
    enable(&t, &[&format!("127.0.0.1:{port}"), "32", "6", "8"]).ok();
    assert_eq!(keepalive(&cm), expect(32, 6, 8, 0));
    assert_eq!(keepalive(&sm), KERNEL_DEFAULT);
}

#[test]
fn enable_by_local_and_peer_by_cookie_and_by_transport_and_sip_uri() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    let (c1, s1) = connect(&l);
    let (c2, _s2) = connect(&l);

    // --local narrows the peer's connections to one.
    let local1 = c1.local_addr().unwrap().to_string();
    let r = enable(&e.tcpka, &[&peer, "--local", &local1, "40", "3", "5"]).ok();
    assert!(r.stdout.contains("on 1 connection"), "{r:?}");
    assert_eq!(keepalive(&c1), expect(40, 3, 5, 0));
    assert_eq!(keepalive(&c2), KERNEL_DEFAULT);

    // By cookie, decimal and hex.
    let ck = cookie(&s1);
    enable(&e.tcpka, &[&format!("cookie:{ck}"), "41", "3", "5"]).ok();
    assert_eq!(keepalive(&s1), expect(41, 3, 5, 0));
    enable(
        &e.tcpka,
        &[
            &format!("cookie:{ck:#x}"),
            "42",
            "3",
            "5",
            "--user-timeout",
            "7000",
        ],
    )
    .ok();
    assert_eq!(keepalive(&s1), expect(42, 3, 5, 7000));

    // Transport prefix and SIP URI select every connection to the peer.
    let r = enable(&e.tcpka, &[&format!("tcp:{peer}"), "43", "3", "5"]).ok();
    assert!(r.stdout.contains("on 2 connections"), "{r:?}");
    assert_eq!(keepalive(&c1), expect(43, 3, 5, 0));
    assert_eq!(keepalive(&c2), expect(43, 3, 5, 0));
    enable(
        &e.tcpka,
        &[&format!("sip:{peer};transport=tcp"), "44", "2", "9"],
    )
    .ok();
    assert_eq!(keepalive(&c1), expect(44, 2, 9, 0));
    assert_eq!(keepalive(&c2), expect(44, 2, 9, 0));
}

#[test]
fn disable_turns_keepalive_off() {
    let e = env();
    let l = listen("[::1]:0");
    let peer = l.local_addr().unwrap().to_string();
    let (c, _s) = connect(&l);
    enable(&e.tcpka, &[&peer, "30", "4", "6"]).ok();
    assert!(keepalive(&c).enabled);
    let r = e.tcpka.run(&["disable", &format!("wss:{peer}")]).ok();
    assert!(
        r.stdout.contains("disabled keepalive on 1 connection"),
        "{r:?}"
    );
    assert!(!keepalive(&c).enabled);
    assert_eq!(e.tcpka.managed_count(), 0, "no longer managed");
}

#[test]
fn enable_reaches_another_process_connection() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    // A separate process (not ours, not in the cgroup) owns the client end;
    // it reports its own getsockopt once it reads a byte.
    let code = format!(
        "import socket,sys\n\
         c=socket.create_connection(('127.0.0.1',{port}))\n\
         print('up',flush=True)\n\
         c.recv(1)\n\
         print(c.getsockopt(1,9),c.getsockopt(6,4),c.getsockopt(6,6),c.getsockopt(6,5),flush=True)\n",
        port = l.local_addr().unwrap().port()
    );
    let mut child = Command::new("python3")
        .args(["-c", &code])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "up");
    let (mut server, _) = l.accept().unwrap();

    enable(&e.tcpka, &[&peer, "50", "7", "9"]).ok();
    server.write_all(b"x").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "1 50 7 9", "the other process's socket");
    assert!(child.wait().unwrap().success());
}

#[test]
fn enable_in_another_network_namespace_with_netns() {
    let e = env();
    let named = NamedNetns::new();
    let ns = named.path();
    let (l, c, _s) = in_netns(&ns, || {
        set_link_up("lo");
        let l = listen("127.0.0.1:0");
        let (c, s) = connect(&l);
        (l, c, s)
    });
    let peer = l.local_addr().unwrap().to_string();
    // Not visible from the test's own namespace...
    let r = enable(&e.tcpka, &[&peer, "60", "5", "5"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(keepalive(&c), KERNEL_DEFAULT);
    // ...but with --netns.
    enable(
        &e.tcpka,
        &[&peer, "60", "5", "5", "--netns", ns.to_str().unwrap()],
    )
    .ok();
    assert_eq!(keepalive(&c), expect(60, 5, 5, 0));
    let r = e
        .tcpka
        .run(&["status", "--json", "--netns", ns.to_str().unwrap()])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn unknown_connection_exits_1_and_changes_nothing() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let (c, s) = connect(&l);
    let other_port = l.local_addr().unwrap().port().wrapping_add(1).max(1);
    for conn in [
        format!("127.0.0.1:{other_port}"),
        "10.9.9.9:5060".to_owned(),
        "cookie:0xffffffffffff".to_owned(),
    ] {
        let r = enable(&e.tcpka, &[&conn, "30", "4", "6"]);
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stderr.starts_with("error: no such connection: "), "{r:?}");
        let r = e.tcpka.run(&["disable", &conn]);
        assert_eq!(r.code, 1, "{r:?}");
    }
    // The right peer with the wrong local end matches nothing either.
    let r = enable(
        &e.tcpka,
        &[
            &l.local_addr().unwrap().to_string(),
            "--local",
            "127.0.0.1:1",
            "30",
            "4",
            "6",
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(keepalive(&c), KERNEL_DEFAULT);
    assert_eq!(keepalive(&s), KERNEL_DEFAULT);
    assert_eq!(e.tcpka.managed_count(), 0);
}

#[test]
fn invalid_arguments_exit_2_and_change_nothing() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    let (c, _s) = connect(&l);
    let bad: Vec<Vec<String>> = [
        vec!["enable", &peer, "0", "5", "5"],
        vec!["enable", &peer, "32768", "5", "5"],
        vec!["enable", &peer, "60", "0", "5"],
        vec!["enable", &peer, "60", "128", "5"],
        vec!["enable", &peer, "60", "5", "0"],
        vec!["enable", &peer, "60", "5", "32768"],
        vec!["enable", &peer, "60", "5"],
        vec!["enable", &peer, "60", "5", "5", "--user-timeout", "x"],
        vec!["enable", "127.0.0.1", "60", "5", "5"],
        vec!["enable", "127.0.0.1:0", "60", "5", "5"],
        vec!["enable", "127.0.0.1:65536", "60", "5", "5"],
        vec!["enable", "300.0.0.1:5060", "60", "5", "5"],
        vec!["enable", "::1:5060", "60", "5", "5"],
        vec!["enable", "udp:127.0.0.1:5060", "60", "5", "5"],
        vec!["enable", "sip:127.0.0.1:5060;transport=udp", "60", "5", "5"],
        vec!["enable", "cookie:xyz", "60", "5", "5"],
        vec!["enable", "cookie:-5", "60", "5", "5"],
        vec!["enable", &peer, "60", "5", "5", "--local", "127.0.0.1"],
        vec!["disable", "nonsense"],
        vec!["disable", &peer, "--local", "1.2.3.4:99999"],
        vec!["status", "cookie:"],
    ]
    .iter()
    .map(|v| v.iter().map(|s| s.to_string()).collect())
    .collect();
    for args in &bad {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = e.tcpka.run(&a);
        assert_eq!(r.code, 2, "{a:?}: {r:?}");
        assert!(r.stderr.contains("error"), "{a:?}: {r:?}");
    }
    assert_eq!(keepalive(&c), KERNEL_DEFAULT);
    assert_eq!(e.tcpka.managed_count(), 0);
}

#[test]
fn not_loaded_exits_1() {
    let _netns = NetNs::new();
    let t = Tcpka::new();
    let r = t.run(&["enable", "127.0.0.1:5060", "30", "4", "6"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not loaded"), "{r:?}");
    let r = t.run(&["status"]);
    assert_eq!(r.code, 1, "{r:?}");
}

#[test]
fn status_json_matches_getsockopt() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let (c, s) = connect(&l);
    enable(
        &e.tcpka,
        &[&format!("cookie:{}", cookie(&c)), "33", "4", "6"],
    )
    .ok();
    enable(
        &e.tcpka,
        &[
            &format!("cookie:{}", cookie(&s)),
            "34",
            "5",
            "7",
            "--user-timeout",
            "9000",
        ],
    )
    .ok();
    let r = e.tcpka.run(&["status", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    for sock in [&c, &s] {
        let k = keepalive(sock);
        let entry = list
            .iter()
            .find(|x| x["cookie"].as_u64() == Some(cookie(sock)))
            .expect("socket listed");
        let local: SocketAddr = entry["local"].as_str().unwrap().parse().unwrap();
        let remote: SocketAddr = entry["remote"].as_str().unwrap().parse().unwrap();
        assert_eq!(local, sock.local_addr().unwrap());
        assert_eq!(remote, sock.peer_addr().unwrap());
        assert_eq!(entry["state"], "established");
        assert_eq!(entry["source"], "command");
        assert_eq!(entry["rule"], serde_json::Value::Null);
        let ka = &entry["keepalive"];
        assert_eq!(ka["enabled"].as_bool(), Some(k.enabled));
        assert_eq!(ka["idle"].as_i64(), Some(k.idle as i64));
        assert_eq!(ka["count"].as_i64(), Some(k.count as i64));
        assert_eq!(ka["interval"].as_i64(), Some(k.interval as i64));
        let ut = (k.user_timeout_ms != 0).then_some(k.user_timeout_ms as i64);
        assert_eq!(ka["user_timeout_ms"].as_i64(), ut);
        assert_eq!(ka["count_ignored"].as_bool(), Some(ut.is_some()));
    }
    // With CONN: an unmanaged connection is shown too, as it is.
    let (c2, _s2) = connect(&l);
    let local2 = c2.local_addr().unwrap().to_string();
    let r = e
        .tcpka
        .run(&[
            "status",
            &l.local_addr().unwrap().to_string(),
            "--local",
            &local2,
            "--json",
        ])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["cookie"].as_u64(), Some(cookie(&c2)));
    assert_eq!(v[0]["keepalive"]["enabled"], false);
    assert_eq!(v[0]["source"], serde_json::Value::Null);
    let r = e.tcpka.run(&["status", "10.1.1.1:1"]);
    assert_eq!(r.code, 1, "{r:?}");
}

#[test]
fn concurrent_commands_from_8_processes_are_all_applied() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let conns: Vec<_> = (0..8).map(|_| connect(&l)).collect();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (i, (client, _)) in conns.iter().enumerate() {
            let t = &e.tcpka;
            let ck = cookie(client);
            scope.spawn(move || {
                for n in 1..=200u32 {
                    let idle = (i as u32 + 1) * 1000 + n;
                    // NB: a generous lock wait: what is tested is that
                    // every command is applied, not how long 8 processes
                    // queue (a slow machine, an emulated CPU).
                    let r = Run::from(
                        t.cmd()
                            .env("TCPKA_LOCK_WAIT_MS", "120000")
                            .args([
                                "enable",
                                &format!("cookie:{ck}"),
                                &idle.to_string(),
                                "3",
                                "4",
                            ])
                            .output()
                            .unwrap(),
                    );
                    assert_eq!(r.code, 0, "process {i} command {n}: {r:?}");
                    assert!(r.stdout.contains("on 1 connection"), "{r:?}");
                }
            });
        }
    });
    eprintln!("1600 commands in {:?}", start.elapsed());
    // Each connection ends with its own process's last command.
    for (i, (client, _)) in conns.iter().enumerate() {
        assert_eq!(
            keepalive(client),
            expect((i as i32 + 1) * 1000 + 200, 3, 4, 0)
        );
    }
}

#[test]
fn entries_go_when_connections_close() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    let pairs: Vec<_> = (0..50).map(|_| connect(&l)).collect();
    let r = enable(&e.tcpka, &[&peer, "30", "4", "6"]).ok();
    assert!(r.stdout.contains("on 50 connections"), "{r:?}");
    assert_eq!(e.tcpka.managed_count(), 50);
    drop(pairs);
    let deadline = Instant::now() + Duration::from_secs(5);
    while e.tcpka.managed_count() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(e.tcpka.managed_count(), 0);
}

/// `status CONN` gives the state in a stable vocabulary and as tcpops'
/// `tcp_conid_state` numbers it: established (1), then peer-closed (-2)
/// once the peer sent its FIN; a listener is listening (2).
#[test]
fn status_gives_the_state_in_a_stable_vocabulary() {
    let e = Env::outside();
    let l = listen("127.0.0.1:0");
    let listener = l.local_addr().unwrap().to_string();
    let (_c, s) = connect(&l);
    let state = |conn: &str| {
        let out = e.tcpka.run(&["status", conn, "--json"]).ok().stdout;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (
            v[0]["phase"].as_str().unwrap().to_owned(),
            v[0]["conid_state"].as_i64().unwrap(),
        )
    };
    assert_eq!(state(&listener), ("established".into(), 1));
    assert_eq!(
        state(&format!("cookie:{}", cookie(&l))),
        ("listening".into(), 2)
    );
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(&listener).1 != -2 {
        assert!(Instant::now() < deadline, "{:?}", state(&listener));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(state(&listener), ("peer-closed".into(), -2));
}
