//! Commands from Kamailio's evapi, and events back to it.
use super::*;

/// `serve --evapi`: tcpka connects to the evapi server (Kamailio's, here a
/// stand-in that speaks its netstrings), applies the commands it relays and
/// sends events back with the events token. A server whose socket belongs
/// to another user (anyone can listen on a free port) is refused: its
/// commands change nothing.
#[test]
pub(super) fn evapi_commands_in_events_out_and_a_stranger_is_refused() {
    let e = Env::outside();
    let dir = std::env::temp_dir().join(unique("tcpka-evapi"));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("events-token");
    std::fs::write(&token_file, "evapi-test-token-0123456789\n").unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let netstring = |s: &str| format!("{}:{s},", s.len());

    // A stranger's server (uid 65534) relays an enable: refused.
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    let (c, srv) = connect(&l);
    let port = free_port();
    let command = format!(
        r#"{{"op":"enable","conn":"{peer}","idle":21,"count":3,"interval":4,"holder":"h1"}}"#
    );
    let stranger = as_user("65534")
        .args(["/usr/bin/python3", "-c"])
        .arg(format!(
            "import socket,time\n\
             s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.bind(('127.0.0.1',{port})); s.listen(8); s.settimeout(0.2)\n\
             end=time.time()+4; keep=[]\n\
             while time.time()<end:\n\
             \x20try:\n\
             \x20 c,_=s.accept(); c.sendall({msg:?}.encode()); keep.append(c)\n\
             \x20except socket.timeout: pass\n",
            msg = netstring(&command)
        ))
        .spawn()
        .expect("setpriv python3");
    let mut stranger = Guard(stranger);
    wait_until(
        "the stranger's server started",
        Duration::from_secs(5),
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let start = |evapi: &str| {
        LoggedServe::start(
            &e.tcpka,
            &addr,
            &[
                "--cgroup",
                e.cgroup.path.to_str().unwrap(),
                "--evapi",
                evapi,
                "--events-token-file",
                token_file.to_str().unwrap(),
                // Orderly closes too (not sent by default).
                "--evapi-events",
                "closed,timeout,reset",
            ],
        )
    };
    let evapi = format!("127.0.0.1:{port}");
    let s = start(&evapi);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        keepalive(&c),
        KERNEL_DEFAULT,
        "a stranger's command applied"
    );
    let log = s.stop();
    assert!(
        log.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("belongs to uid 65534") && m.contains("refused"))),
        "{log:?}"
    );
    let _ = stranger.0.wait();

    // Root's server: the same command applies, and the connection's end
    // comes back as an event with the token.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let evapi = server.local_addr().unwrap().to_string();
    let s = start(&evapi);
    let (mut k, _) = server.accept().unwrap();
    // Two commands in one read: applied together.
    let l2 = listen("127.0.0.1:0");
    let peer2 = l2.local_addr().unwrap().to_string();
    let (c2, _srv2) = connect(&l2);
    let command2 = format!(
        r#"{{"op":"enable","conn":"{peer2}","idle":22,"count":3,"interval":4,"holder":"h2"}}"#
    );
    k.write_all(format!("{}{}", netstring(&command), netstring(&command2)).as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while keepalive(&c) != expect(21, 3, 4, 0) || keepalive(&c2) != expect(22, 3, 4, 0) {
        assert!(Instant::now() < deadline, "evapi commands not applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Both ends: a client end left in FIN_WAIT2 by an open peer may wait
    // out tcp_fin_timeout before it closes.
    drop((c, srv));
    k.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let event = loop {
        let n = k.read(&mut buf).expect("an event over evapi");
        assert!(n > 0, "tcpka closed the evapi connection");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((len, rest)) = text.split_once(':') {
            let len: usize = len.parse().unwrap();
            if rest.len() > len {
                assert_eq!(&rest[len..len + 1], ",", "{text}");
                break serde_json::from_str::<serde_json::Value>(&rest[..len]).unwrap();
            }
        }
    };
    assert_eq!(event["kind"], "closed", "{event}");
    assert_eq!(event["token"], "evapi-test-token-0123456789", "{event}");
    assert_eq!(event["remote"], peer, "{event}");
    drop(s.stop());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stranger's evapi server that accepts late: until it accepts, the
/// kernel may report its end as uid 0 (Linux 6.1 does, for a socket no
/// process holds yet). tcpka waits for an owner, and refuses it.
#[test]
pub(super) fn a_strangers_evapi_server_that_accepts_late_is_refused() {
    let e = Env::outside();
    let netstring = |s: &str| format!("{}:{s},", s.len());
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    let (c, _srv) = connect(&l);
    let port = free_port();
    let command = format!(r#"{{"op":"enable","conn":"{peer}","idle":23,"count":3,"interval":4}}"#);
    let stranger = as_user("65534")
        .args(["/usr/bin/python3", "-c"])
        .arg(format!(
            "import socket,time\n\
             s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.bind(('127.0.0.1',{port})); s.listen(8); print('up', flush=True)\n\
             end=time.time()+6; keep=[]\n\
             while time.time()<end:\n\
             \x20time.sleep(0.3); s.settimeout(0.5)\n\
             \x20try:\n\
             \x20 c,_=s.accept(); c.sendall({msg:?}.encode()); keep.append(c)\n\
             \x20except socket.timeout: pass\n",
            msg = netstring(&command)
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv python3");
    let mut stranger = Guard(stranger);
    let mut up = [0u8; 3];
    std::io::Read::read_exact(stranger.0.stdout.as_mut().unwrap(), &mut up).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let s = LoggedServe::start(
        &e.tcpka,
        &addr,
        &[
            "--cgroup",
            e.cgroup.path.to_str().unwrap(),
            "--evapi",
            &format!("127.0.0.1:{port}"),
        ],
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        keepalive(&c),
        KERNEL_DEFAULT,
        "a stranger's command applied"
    );
    let log = s.stop();
    assert!(
        log.iter()
            .any(|l| l["fields"]["message"].as_str().is_some_and(|m| m
                .contains("belongs to uid 65534")
                || m.contains("owner is not known"))),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("connected"))),
        "{log:?}"
    );
    let _ = stranger.0.kill();
}

/// Kamailio restarting: tcpka is connected again within a second of its
/// evapi port opening, however long it was down.
#[test]
pub(super) fn evapi_reconnects_within_a_second_of_kamailio_starting() {
    let e = Env::outside();
    let mut listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let evapi = listener.local_addr().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let s = LoggedServe::start(
        &e.tcpka,
        &addr,
        &[
            "--cgroup",
            e.cgroup.path.to_str().unwrap(),
            "--evapi",
            &evapi.to_string(),
        ],
    );
    let (mut conn, _) = listener.accept().unwrap();
    for down in [Duration::from_secs(1), Duration::from_secs(4)] {
        // Kamailio stops: its connection and its port go...
        drop(conn);
        drop(listener);
        std::thread::sleep(down);
        // ...and it starts again on the same port.
        listener = std::net::TcpListener::bind(evapi).unwrap();
        listener.set_nonblocking(true).unwrap();
        let started = Instant::now();
        let c = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(started.elapsed() < Duration::from_secs(5), "not back");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        let took = started.elapsed();
        eprintln!("evapi: down {down:?}, connected again {took:?} after the port opened");
        assert!(took < Duration::from_secs(1), "{took:?}");
        conn = c;
    }
    drop(conn);
    drop(s.stop());
}

/// Kills a child on drop.
pub(super) struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
