//! The direct path through the connection index, and the walks it falls
//! back to.
use super::*;

/// Runs `tcpka ARGS` with debug logging; returns the run and whether the
/// connection index answered (rather than a walk of the socket table).
pub(super) fn enable_traced(t: &Tcpka, args: &[&str]) -> (Run, bool) {
    let out = t
        .cmd()
        .env("RUST_LOG", "tcpka=debug")
        .arg("enable")
        .args(args)
        .output()
        .expect("run tcpka");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let via_index = stderr.contains("via the index");
    let walked = stderr.contains("walking the socket table");
    assert!(via_index != walked, "exactly one path expected: {stderr}");
    (
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        },
        via_index,
    )
}

#[test]
pub(super) fn the_index_reaches_connections_made_before_and_after_load() {
    let _netns = NetNs::new();
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    let (before, s1) = connect(&l);
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    // The host-wide index holds every connection, wherever it was made
    // (tests/tests/index.rs covers the ports index).
    t.load_with(&cgroup.path, &["--index", "host"]);
    let (after, s2) = connect(&l);

    let (r, via_index) = enable_traced(&t, &[&peer, "30", "4", "6"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(via_index, "{r:?}");
    assert!(r.stdout.contains("on 2 connections"), "{r:?}");
    assert_eq!(keepalive(&before), expect(30, 4, 6, 0));
    assert_eq!(keepalive(&after), expect(30, 4, 6, 0));

    // An accepted socket by cookie, and an unknown peer, also answered
    // by the index.
    let (r, via_index) = enable_traced(&t, &[&format!("cookie:{}", cookie(&s2)), "31", "4", "6"]);
    assert!(via_index && r.code == 0, "{r:?}");
    assert_eq!(keepalive(&s2), expect(31, 4, 6, 0));
    let (r, via_index) = enable_traced(&t, &["127.0.0.1:9", "31", "4", "6"]);
    assert!(via_index, "{r:?}");
    assert_eq!(r.code, 1, "{r:?}");
    // Managed and cleaned up like the walk's connections.
    assert_eq!(t.managed_count(), 3);
    // Both ends closed: a client end left in FIN_WAIT2 by an open peer may
    // wait out tcp_fin_timeout (60 s) before it closes.
    drop((before, after, s2, s1));
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.managed_count() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(t.managed_count(), 0);
}

/// What tells a command for a connection its application has closed (a
/// phone's, as its call ends) from one the index must walk for, with both
/// ends named: one exact sock_diag lookup. Closing or gone: no walk.
#[test]
pub(super) fn closing_or_gone_tells_a_closing_connection_from_a_held_one() {
    use tcpka::destroy::closing_or_gone;
    let _netns = NetNs::new();
    let l = listen("127.0.0.1:0");
    let (client, server) = connect(&l);
    let (c, s) = (client.local_addr().unwrap(), server.local_addr().unwrap());
    assert!(!closing_or_gone(s, c).unwrap(), "held at both ends");
    assert!(
        closing_or_gone(s, "127.0.0.1:1".parse().unwrap()).unwrap(),
        "no such connection"
    );
    // Not accepted yet: established and held by no process, yet live.
    let waiting = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    assert!(!closing_or_gone(l.local_addr().unwrap(), waiting.local_addr().unwrap()).unwrap());
    // The server lets go first: its end waits in FIN_WAIT2, no process
    // holds it; the client's end, in CLOSE_WAIT, is still held.
    drop(server);
    wait_until(
        "the server's end in FIN_WAIT2",
        Duration::from_secs(5),
        || {
            let out = Command::new("ss")
                .args(["-tnH", "state", "fin-wait-2", "dst", &c.to_string()])
                .output()
                .unwrap();
            !String::from_utf8_lossy(&out.stdout).trim().is_empty()
        },
    );
    assert!(closing_or_gone(s, c).unwrap(), "FIN_WAIT2, no holder");
    assert!(!closing_or_gone(c, s).unwrap(), "CLOSE_WAIT, held");
    drop(client);
}

#[test]
pub(super) fn a_peer_with_more_connections_than_index_slots_is_walked_for() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    let slots = keepalive_common::index::PEER_SLOTS as usize;
    let pairs: Vec<_> = (0..slots + 1).map(|_| connect(&l)).collect();
    let (r, via_index) = enable_traced(&e.tcpka, &[&peer, "30", "4", "6"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!via_index, "an overflowed peer must be walked for: {r:?}");
    assert!(
        r.stdout.contains(&format!("on {} connections", slots + 1)),
        "{r:?}"
    );
    for (c, _) in &pairs {
        assert_eq!(keepalive(c), expect(30, 4, 6, 0));
    }
}

#[test]
pub(super) fn a_stale_holder_is_walked_for() {
    // Holders recorded as sockets connect: the record of `original` goes
    // stale when it is closed. (Found on demand, the holder would be
    // looked up again instead: see the next test.)
    let e = Env::entered_with(&["--holders", "syscalls"]);
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    // The index recorded the descriptor connect() used; move the socket to
    // another descriptor and close the first, so the record is stale (and
    // the number may be reused by another socket).
    let original = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (_server, _) = l.accept().unwrap();
    let moved = original.try_clone().unwrap();
    drop(original);
    let _reuse = TcpStream::connect(listen("127.0.0.1:0").local_addr().unwrap()).unwrap();

    let (r, via_index) = enable_traced(&e.tcpka, &[&peer, "30", "4", "6"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!via_index, "a stale record must not be trusted: {r:?}");
    assert!(r.stdout.contains("on 1 connection"), "{r:?}");
    assert_eq!(keepalive(&moved), expect(30, 4, 6, 0));

    // The walks that stop at the one socket a cookie or a local end names.
    let (r, via_index) = enable_traced(
        &e.tcpka,
        &[&format!("cookie:{}", cookie(&moved)), "32", "4", "6"],
    );
    assert!(r.code == 0 && !via_index, "{r:?}");
    assert_eq!(keepalive(&moved), expect(32, 4, 6, 0));
    let local = moved.local_addr().unwrap().to_string();
    let (r, via_index) = enable_traced(&e.tcpka, &[&peer, "--local", &local, "33", "4", "6"]);
    assert!(r.code == 0 && !via_index, "{r:?}");
    assert_eq!(keepalive(&moved), expect(33, 4, 6, 0));

    // A cookie with a local end that does not match changes nothing, on
    // the walk as on the index.
    let ck = format!("cookie:{}", cookie(&moved));
    let r = e
        .tcpka
        .run(&["enable", &ck, "--local", "127.0.0.1:1", "50", "4", "6"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(keepalive(&moved), expect(33, 4, 6, 0), "unchanged");
}

#[test]
pub(super) fn a_socket_that_changed_hands_is_found_again() {
    // Holders found on demand (the default): a stale record leads to a new
    // search of the descriptors, and the direct path still answers.
    // (The environment is a fresh network namespace: the port is free.)
    let e = Env::entered_with(&["--index-ports", "5070"]);
    let l = listen("127.0.0.1:5070");
    let peer = l.local_addr().unwrap().to_string();
    let original = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (_server, _) = l.accept().unwrap();
    let (r, via_index) = enable_traced(&e.tcpka, &[&peer, "30", "4", "6"]);
    assert!(r.code == 0 && via_index, "{r:?}");
    let moved = original.try_clone().unwrap();
    drop(original);
    let _reuse = TcpStream::connect(listen("127.0.0.1:0").local_addr().unwrap()).unwrap();
    let (r, via_index) = enable_traced(&e.tcpka, &[&peer, "31", "4", "6"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(via_index, "{r:?}");
    assert!(r.stderr.contains("searching descriptors"), "{r:?}");
    assert_eq!(keepalive(&moved), expect(31, 4, 6, 0));
}

#[test]
pub(super) fn a_connection_still_being_set_up_is_found() {
    // The host-wide index has it from SYN_SENT on; the ports index (which
    // indexes at establishment) leaves it to the walk.
    for (mode, direct) in [("host", true), ("ports", false)] {
        set_up_connection_found(mode, direct);
    }
}

pub(super) fn set_up_connection_found(mode: &str, direct: bool) {
    let e = Env::outside_with(&["--index", mode]);
    let peer = VethPeer::new();
    let l = peer.listen();
    let addr = l.local_addr().unwrap();
    peer.cut();
    // A non-blocking connect to a peer that no longer answers stays in
    // SYN_SENT, as a proxy's connection does until the handshake completes.
    let SocketAddr::V4(a) = addr else {
        unreachable!()
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK,
        None,
    )
    .unwrap();
    assert_eq!(
        nix::sys::socket::connect(fd.as_raw_fd(), &SockaddrIn::from(a)),
        Err(nix::errno::Errno::EINPROGRESS)
    );
    let (r, via_index) = enable_traced(&e.tcpka, &[&addr.to_string(), "30", "4", "6"]);
    assert_eq!(r.code, 0, "{mode}: {r:?}");
    assert_eq!(via_index, direct, "{mode}: {r:?}");
    assert_eq!(keepalive(&fd), expect(30, 4, 6, 0));
    let r = e.tcpka.run(&["status", &addr.to_string(), "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["state"], "syn-sent", "{v}");
}
