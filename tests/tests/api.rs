//! `tcpka serve`: the HTTP API, events from the kernel (stream, watch,
//! webhook) and holders on shared connections, against the real kernel.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::json;
use tcpka_tests::*;

fn serve(e: &Env, extra: &[&str]) -> Serve {
    let addr = format!("127.0.0.1:{}", free_port());
    Serve::start(&e.tcpka, &e.cgroup.path, &addr, extra)
}

#[test]
fn enable_disable_and_status_over_http() {
    let e = Env::outside();
    let s = serve(&e, &[]);
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    let (c, _srv) = connect(&l);

    let (code, v) = http_json(
        &s.addr,
        "POST",
        "/v1/enable",
        json!({"conn": format!("tcp:{peer}"), "idle": 20, "count": 3, "interval": 4, "user_timeout_ms": 9000}),
    );
    assert_eq!(
        (code, v["result"].as_i64(), v["changed"].as_u64()),
        (200, Some(1), Some(1)),
        "{v}"
    );
    assert_eq!(keepalive(&c), expect(20, 3, 4, 9000));

    let (code, v) = http_json(
        &s.addr,
        "GET",
        &format!("/v1/connections?conn={peer}"),
        json!(null),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v[0]["cookie"].as_u64(), Some(cookie(&c)));
    assert_eq!(v[0]["keepalive"]["count_ignored"], true);

    let (code, v) = http_json(&s.addr, "POST", "/v1/disable", json!({"conn": peer}));
    assert_eq!((code, v["result"].as_i64()), (200, Some(1)), "{v}");
    assert!(!keepalive(&c).enabled);

    // Errors: 404 unknown, 400 invalid (nothing changed), 400 malformed.
    let (code, v) = http_json(
        &s.addr,
        "POST",
        "/v1/enable",
        json!({"conn": "127.0.0.1:9", "idle": 1, "count": 1, "interval": 1}),
    );
    assert_eq!((code, v["result"].as_i64()), (404, Some(-1)), "{v}");
    for bad in [
        json!({"conn": peer, "idle": 0, "count": 1, "interval": 1}),
        json!({"conn": peer, "idle": 1, "count": 128, "interval": 1}),
        json!({"conn": "10.0.0.1", "idle": 1, "count": 1, "interval": 1}),
        json!({"conn": peer, "idle": 1, "count": 1}),
        json!({"conn": peer, "idle": 1, "count": 1, "interval": 1, "bogus": 1}),
        json!({"conn": peer, "idle": 1, "count": 1, "interval": 1, "holder": "has space"}),
        json!({"conn": peer, "idle": "1", "count": 1, "interval": 1}),
    ] {
        let (code, v) = http_json(&s.addr, "POST", "/v1/enable", bad.clone());
        assert_eq!((code, v["result"].as_i64()), (400, Some(-1)), "{bad}: {v}");
    }
    for raw in [&b"{not json"[..], &b""[..], &vec![b' '; 100 * 1024][..]] {
        let (code, _) = http(&s.addr, "POST", "/v1/enable", Some(raw), None).unwrap();
        assert_eq!(code, 400);
    }
    assert!(!keepalive(&c).enabled, "nothing changed");
    // Still serving after all that.
    assert_eq!(http(&s.addr, "GET", "/healthz", None, None).unwrap().0, 200);
}

#[test]
fn rules_over_http() {
    let e = Env::entered();
    let s = serve(&e, &[]);
    let (code, v) = http_json(
        &s.addr,
        "POST",
        "/v1/rules",
        json!({"remote": "127.0.0.0/8", "idle": 33, "count": 3, "interval": 3}),
    );
    assert_eq!(code, 201, "{v}");
    let id = v["rule"]["id"].as_u64().unwrap();
    let l = listen("127.0.0.1:0");
    let (c, _s) = connect(&l);
    assert_eq!(keepalive(&c), expect(33, 3, 3, 0));
    let (code, v) = http_json(&s.addr, "GET", "/v1/rules", json!(null));
    assert_eq!((code, v[0]["id"].as_u64()), (200, Some(id)));
    let (code, _) = http_json(
        &s.addr,
        "POST",
        "/v1/rules",
        json!({"local_port": 0, "idle": 1, "count": 1, "interval": 1}),
    );
    assert_eq!(code, 400);
    assert_eq!(
        http_json(&s.addr, "DELETE", &format!("/v1/rules/{id}"), json!(null)).0,
        200
    );
    assert_eq!(
        http_json(&s.addr, "DELETE", &format!("/v1/rules/{id}"), json!(null)).0,
        404
    );
    assert_eq!(
        http_json(&s.addr, "DELETE", "/v1/rules/x", json!(null)).0,
        400
    );
}

#[test]
fn not_loaded_is_503() {
    let e = Env::outside();
    let s = serve(&e, &[]);
    e.tcpka.run(&["unload"]).ok();
    let (code, v) = http_json(
        &s.addr,
        "POST",
        "/v1/enable",
        json!({"conn": "127.0.0.1:5060", "idle": 1, "count": 1, "interval": 1}),
    );
    assert_eq!((code, v["result"].as_i64()), (503, Some(-1)), "{v}");
    assert_eq!(http(&s.addr, "GET", "/healthz", None, None).unwrap().0, 503);
}

#[test]
fn token_and_listen_rules() {
    let e = Env::outside();
    // A guessable token is refused before anything.
    let r = e.tcpka.run(&[
        "serve",
        "--cgroup",
        e.cgroup.path.to_str().unwrap(),
        "--listen",
        "0.0.0.0:7078",
        "--token",
        "s3cret",
    ]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("token"), "{r:?}");
    let port = free_port();
    let s = Serve::start(
        &e.tcpka,
        &e.cgroup.path,
        &format!("0.0.0.0:{port}"),
        &["--token", "s3cret-s3cret-s3cret"],
    );
    let addr = format!("127.0.0.1:{port}");
    assert_eq!(
        http(&addr, "GET", "/v1/rules", None, Some("")).unwrap().0,
        401
    );
    assert_eq!(
        http(&addr, "GET", "/v1/rules", None, Some("wrong"))
            .unwrap()
            .0,
        401
    );
    assert_eq!(
        http(
            &addr,
            "GET",
            "/v1/rules",
            None,
            Some("s3cret-s3cret-s3cret")
        )
        .unwrap()
        .0,
        200
    );
    // The token as a Basic password (Kamailio's http_connect), any user.
    // Returns the status line.
    let basic = |user_pass: &str| {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(user_pass);
        let r = request(&addr, "GET", "/v1/rules", Some(""))
            .header(reqwest::header::AUTHORIZATION, format!("Basic {b64}"))
            .send()
            .unwrap();
        format!("{:?} {}", r.version(), r.status())
    };
    assert!(basic("kamailio:s3cret-s3cret-s3cret").contains(" 200 "));
    assert!(basic("s3cret-s3cret-s3cret:wrong").contains(" 401 "));
    assert!(basic(":s3cret-s3cret-s3cre").contains(" 401 "));
    drop(s);
}

#[test]
fn unix_socket_listener() {
    let e = Env::outside();
    let path = std::env::temp_dir().join(format!("{}.sock", unique("tcpka-test")));
    let mut child = e
        .tcpka
        .cmd()
        .args(["serve", "--cgroup", e.cgroup.path.to_str().unwrap()])
        .arg("--listen")
        .arg(format!("unix:{}", path.display()))
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let client = http_client().unix_socket(path.as_path()).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        match client.get("http://tcpka/healthz").send() {
            Ok(r) => break (r.status().as_u16(), r.text().unwrap()),
            Err(e) if !e.is_connect() => panic!("GET /healthz: {e}"),
            // Not listening yet.
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "no unix socket");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(reply, (200, "ok\n".to_owned()));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    assert!(!path.exists(), "socket file removed on exit");
}

#[test]
fn holders_keep_a_shared_connection_until_the_last_call_ends() {
    let e = Env::outside();
    let s = serve(&e, &[]);
    let l = listen("127.0.0.1:0");
    let trunk = l.local_addr().unwrap().to_string();
    let (c, _srv) = connect(&l);
    // Ten calls over one connection (the reference module would turn
    // keepalive off at the first BYE).
    for call in 0..10 {
        let (code, v) = http_json(
            &s.addr,
            "POST",
            "/v1/enable",
            json!({"conn": trunk, "idle": 30, "count": 3, "interval": 5, "holder": format!("call-{call}@example")}),
        );
        assert_eq!(code, 200, "{v}");
    }
    let (_, v) = http_json(&s.addr, "GET", "/v1/connections", json!(null));
    assert_eq!(v[0]["holders"].as_array().unwrap().len(), 10, "{v}");
    for call in 0..9 {
        let (code, v) = http_json(
            &s.addr,
            "POST",
            "/v1/disable",
            json!({"conn": trunk, "holder": format!("call-{call}@example")}),
        );
        assert_eq!((code, v["changed"].as_u64()), (200, Some(0)), "{v}");
        assert_eq!(
            v["kept"][0]["holders_remaining"].as_u64(),
            Some(9 - call),
            "{v}"
        );
        assert!(keepalive(&c).enabled, "call {call} ended, others remain");
    }
    // The same holder twice counts once; an unknown holder changes nothing.
    let (_, v) = http_json(
        &s.addr,
        "POST",
        "/v1/disable",
        json!({"conn": trunk, "holder": "call-0@example"}),
    );
    assert_eq!(v["kept"][0]["holders_remaining"].as_u64(), Some(1), "{v}");
    // The last call's BYE turns it off.
    let (code, v) = http_json(
        &s.addr,
        "POST",
        "/v1/disable",
        json!({"conn": trunk, "holder": "call-9@example"}),
    );
    assert_eq!((code, v["changed"].as_u64()), (200, Some(1)), "{v}");
    assert!(!keepalive(&c).enabled);

    // A holder's disable leaves alone a connection it never held (another
    // connection to the same peer, enabled without holders).
    e.tcpka
        .run(&["enable", &trunk, "30", "3", "5", "--holder", "x"])
        .ok();
    let (c2, _srv2) = connect(&l);
    e.tcpka
        .run(&["enable", &format!("cookie:{}", cookie(&c2)), "31", "3", "5"])
        .ok();
    let (code, v) = http_json(
        &s.addr,
        "POST",
        "/v1/disable",
        json!({"conn": trunk, "holder": "x"}),
    );
    assert_eq!((code, v["changed"].as_u64()), (200, Some(1)), "{v}");
    assert!(!keepalive(&c).enabled, "x was its only holder");
    assert_eq!(keepalive(&c2), expect(31, 3, 5, 0), "never held by x");

    // The CLI takes --holder too, and disable without one clears them all.
    e.tcpka
        .run(&["enable", &trunk, "30", "3", "5", "--holder", "a"])
        .ok();
    e.tcpka
        .run(&["enable", &trunk, "30", "3", "5", "--holder", "b"])
        .ok();
    let r = e.tcpka.run(&["disable", &trunk, "--holder", "a"]).ok();
    assert!(r.stdout.contains("1 other holder(s) remain"), "{r:?}");
    let r = e.tcpka.run(&["status", &trunk]).ok();
    assert!(r.stdout.contains("holders: b"), "{r:?}");
    e.tcpka.run(&["disable", &trunk]).ok();
    assert!(!keepalive(&c).enabled);
    let r = e.tcpka.run(&["status", &trunk, "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["holders"], json!([]));
}

/// Reads NDJSON events from `GET /v1/events` on a background thread.
#[test]
fn dead_peer_timeout_reaches_stream_watch_and_webhook() {
    let e = Env::outside();
    let (hook, hook_rx) = webhook_receiver();
    let s = serve(&e, &["--webhook", &format!("http://{hook}/tcpka")]);
    let stream = event_stream(&s.addr);
    let mut watch = e
        .tcpka
        .cmd()
        .args(["watch", "--json", "--api", &s.addr])
        .env("TCPKA_TOKEN", TEST_TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let watch_out = watch.stdout.take().unwrap();
    let (watch_tx, watch_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(watch_out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                let _ = watch_tx.send(v);
            }
        }
    });
    // Watch is connected once it prints an event: a throwaway connection,
    // enabled and closed until one shows up.
    let probe = listen("127.0.0.1:0");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (pc, ps) = connect(&probe);
        let pck = cookie(&pc);
        let (code, _) = http_json(
            &s.addr,
            "POST",
            "/v1/enable",
            json!({"conn": format!("cookie:{pck}"), "idle": 9, "count": 1, "interval": 1}),
        );
        assert_eq!(code, 200);
        drop((pc, ps));
        if watch_rx.recv_timeout(Duration::from_millis(500)).is_ok() {
            while watch_rx.try_recv().is_ok() {}
            break;
        }
        assert!(Instant::now() < deadline, "tcpka watch printed nothing");
    }

    let peer = VethPeer::new();
    let l = peer.listen();
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut srv, _) = l.accept().unwrap();
    srv.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    let ck = cookie(&c);
    let (idle, count, interval) = (1u64, 2u64, 1u64);
    let (code, v) = http_json(
        &s.addr,
        "POST",
        "/v1/enable",
        json!({"conn": l.local_addr().unwrap().to_string(), "idle": idle, "count": count, "interval": interval}),
    );
    assert_eq!(code, 200, "{v}");

    peer.cut();
    let bound = Duration::from_secs(idle + count * interval + 2);
    let start = Instant::now();
    let ev = wait_for_event(&stream, "timeout", ck, bound);
    eprintln!(
        "timeout event after {:?} (bound {bound:?}): {ev}",
        start.elapsed()
    );
    assert_eq!(ev["error"].as_u64(), Some(110), "ETIMEDOUT: {ev}");
    assert_eq!(ev["remote"], l.local_addr().unwrap().to_string());
    assert_eq!(ev["local"], c.local_addr().unwrap().to_string());
    assert_eq!(ev["policy"]["idle"].as_u64(), Some(idle));
    assert!(ev["time"].as_str().unwrap().ends_with('Z'));
    let w = wait_for_event(&watch_rx, "timeout", ck, Duration::from_secs(2));
    assert_eq!(w["cookie"], ev["cookie"]);
    // The webhook also got the probes' "closed" events; the timeout follows.
    let h = wait_for_event(&hook_rx, "timeout", ck, Duration::from_secs(3));
    assert_eq!(h["error"].as_u64(), Some(110));
    let _ = c.read(&mut b); // the socket reports the error too
    drop(srv);
    let _ = watch.kill();
    let _ = watch.wait();

    // Delivered and counted.
    let (_, metrics) = http(&s.addr, "GET", "/metrics", None, None).unwrap();
    assert!(
        metrics.contains("tcpka_events_total{kind=\"timeout\"} 1"),
        "{metrics}"
    );
    let count = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(count("tcpka_webhook_deliveries_total{outcome=\"delivered\"} ") >= 2);
    assert!(count("tcpka_commands_total{op=\"enable\",result=\"ok\"} ") >= 2);
    assert_eq!(
        count("tcpka_webhook_deliveries_total{outcome=\"dropped\"} "),
        0
    );
    assert!(metrics.contains("tcpka_kernel_pass_seconds"), "{metrics}");
}

#[test]
fn reset_and_orderly_close_events() {
    let e = Env::outside();
    let s = serve(&e, &[]);
    let stream = event_stream(&s.addr);
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    let (c1, s1) = connect(&l);
    let (c2, s2) = connect(&l);
    let (k1, k2) = (cookie(&c1), cookie(&c2));
    assert_eq!(
        http_json(
            &s.addr,
            "POST",
            "/v1/enable",
            json!({"conn": peer, "idle": 30, "count": 3, "interval": 5})
        )
        .0,
        200
    );
    // The peer of c1 resets (SO_LINGER 0); c2 closes in order.
    reset_on_close(&s1);
    drop(s1);
    let ev = wait_for_event(&stream, "reset", k1, Duration::from_secs(3));
    assert_eq!(ev["error"].as_u64(), Some(104), "ECONNRESET: {ev}");
    drop(c1);
    drop(s2);
    drop(c2);
    let ev = wait_for_event(&stream, "closed", k2, Duration::from_secs(3));
    assert!(ev.get("error").is_none(), "{ev}");
}

#[test]
fn concurrent_requests_share_batches_and_walks() {
    let e = Env::outside();
    let s = serve(&e, &[]);
    let slots = keepalive_common::index::PEER_SLOTS as usize;
    // Four peers with more connections than index slots (each needs a
    // walk) and twenty peers the index answers directly.
    let walked: Vec<_> = (0..4)
        .map(|_| {
            let l = listen("127.0.0.1:0");
            let conns: Vec<_> = (0..=slots).map(|_| connect(&l)).collect();
            (l, conns)
        })
        .collect();
    let direct: Vec<_> = (0..20)
        .map(|_| {
            let l = listen("127.0.0.1:0");
            let pair = connect(&l);
            (l, pair)
        })
        .collect();
    let peers: Vec<(String, u32)> = walked
        .iter()
        .map(|(l, _)| l.local_addr().unwrap().to_string())
        .chain(
            direct
                .iter()
                .map(|(l, _)| l.local_addr().unwrap().to_string()),
        )
        .enumerate()
        .map(|(i, p)| (p, 100 + i as u32))
        .collect();
    // Hold the installation lock while the requests arrive, as a long
    // command would: they queue up and run together once it is released.
    let lock = tcpka::lock::Lock::acquire(&e.tcpka.layout()).unwrap();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            drop(lock);
        });
        for (peer, idle) in &peers {
            let addr = s.addr.clone();
            scope.spawn(move || {
                let (code, v) = http_json(
                    &addr,
                    "POST",
                    "/v1/enable",
                    json!({"conn": peer, "idle": idle, "count": 3, "interval": 4}),
                );
                assert_eq!(code, 200, "{peer}: {v}");
            });
        }
    });
    for (i, (_, conns)) in walked.iter().enumerate() {
        for (c, _) in conns {
            assert_eq!(keepalive(c), expect(100 + i as i32, 3, 4, 0));
        }
    }
    for (i, (_, (c, _))) in direct.iter().enumerate() {
        assert_eq!(keepalive(c), expect(104 + i as i32, 3, 4, 0));
    }
    let (_, metrics) = http(&s.addr, "GET", "/metrics", None, None).unwrap();
    let batches: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tcpka_batch_size_count "))
        .and_then(|v| v.trim().parse().ok())
        .expect("batch count in /metrics");
    eprintln!("{} requests ran in {batches} batches", peers.len());
    assert!(
        batches <= peers.len() as u64 / 4,
        "concurrent requests were batched: {metrics}"
    );
}

/// The daemon logs one line per command (naming the connection) and per
/// refused request, as JSON objects with `--log-format json`; a peer-given
/// string with a newline stays inside its field.
#[test]
fn serve_logs_commands_and_refusals_as_json_lines() {
    let e = Env::outside();
    let addr = format!("127.0.0.1:{}", free_port());
    let cgroup = e.cgroup.path.to_str().unwrap().to_owned();
    let serve = LoggedServe::start(&e.tcpka, &addr, &["--cgroup", &cgroup]);
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    let (_c, _s) = connect(&l);
    let (code, _) = http_json(
        &addr,
        "POST",
        "/v1/enable",
        json!({"conn": peer, "idle": 20, "count": 3, "interval": 4}),
    );
    assert_eq!(code, 200);
    let (code, _) = http_json(
        &addr,
        "POST",
        "/v1/enable",
        json!({"conn": "10.0.0.9:5060\n{\"level\":\"INFO\"}", "idle": 20, "count": 3, "interval": 4}),
    );
    assert_eq!(code, 400);
    let (code, _) = http(&addr, "GET", "/v1/rules", None, Some("wrong-token")).unwrap();
    assert_eq!(code, 401);
    let lines = serve.stop();
    let log = format!("{lines:?}");
    let find =
        |f: &dyn Fn(&serde_json::Value) -> bool| lines.iter().filter(|l| f(&l["fields"])).count();
    assert_eq!(
        find(&|f| f["message"] == "applied"
            && f["command"] == "enable"
            && f["conn"] == peer.as_str()),
        1,
        "{log}"
    );
    assert_eq!(
        find(&|f| f["message"] == "refused"
            && f["status"] == 400
            && f["conn"].as_str().is_some_and(|c| c.contains('\n'))),
        1,
        "{log}"
    );
    assert_eq!(
        find(&|f| f["message"] == "refused" && f["status"] == 401),
        1,
        "{log}"
    );
}

/// `POST /v1/close` ends the connection (result 1), then finds none (404,
/// result -1).
#[test]
fn close_over_http() {
    let e = Env::outside();
    let s = serve(&e, &[]);
    let l = listen("127.0.0.1:0");
    let peer = l.local_addr().unwrap().to_string();
    let (mut c, _srv) = connect(&l);
    let (code, v) = http_json(&s.addr, "POST", "/v1/close", json!({ "conn": peer }));
    assert_eq!(
        (code, v["result"].as_i64(), v["changed"].as_u64()),
        (200, Some(1), Some(1)),
        "{v}"
    );
    let mut b = [0u8; 1];
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let err = c.read(&mut b).expect_err("aborted");
    assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
    let (code, v) = http_json(&s.addr, "POST", "/v1/close", json!({ "conn": peer }));
    assert_eq!((code, v["result"].as_i64()), (404, Some(-1)), "{v}");
}

/// `serve --evapi`: tcpka connects to the evapi server (Kamailio's, here a
/// stand-in that speaks its netstrings), applies the commands it relays and
/// sends events back with the events token. A server whose socket belongs
/// to another user (anyone can listen on a free port) is refused: its
/// commands change nothing.
#[test]
fn evapi_commands_in_events_out_and_a_stranger_is_refused() {
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
    let stranger = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
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

/// Kills a child on drop.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
