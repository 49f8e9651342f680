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

mod evapi;
mod events;
mod risk;

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
    // Its health, read from the kernel (`tcp_info`).
    let l = &v[0]["liveness"];
    assert_eq!(l["probes_out"], 0, "{v}");
    assert!(l["rto_us"].as_u64().unwrap() >= 200_000, "{v}");
    assert!(l["last_ack_recv_ms"].is_u64(), "{v}");
    let (_, all) = http_json(&s.addr, "GET", "/v1/connections", json!(null));
    assert!(all[0]["liveness"]["rtt_us"].is_u64(), "{all}");

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
    let l = listen("127.0.0.1:0");
    let (live, _live_server) = connect(&l);
    let body = json!({"remote": "127.0.0.0/8", "idle": 33, "count": 3, "interval": 3});
    // A preview: what the rule would do to live connections, nothing done.
    let mut dry = body.clone();
    dry["dry_run"] = json!(true);
    let (code, v) = http_json(&s.addr, "POST", "/v1/rules", dry);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["live"]["dry_run"], true, "{v}");
    // The two ends of `live` (and of this request's own connection).
    let previewed = v["live"]["changed"].as_u64().unwrap();
    assert!(previewed >= 2, "{v}");
    assert_eq!(
        keepalive(&live),
        KERNEL_DEFAULT,
        "a preview changes nothing"
    );
    let (_, rules) = http_json(&s.addr, "GET", "/v1/rules", json!(null));
    assert_eq!(rules, json!([]), "a preview adds no rule");
    let mut both = body.clone();
    both["dry_run"] = json!(true);
    both["new_only"] = json!(true);
    assert_eq!(http_json(&s.addr, "POST", "/v1/rules", both).0, 400);

    let (code, v) = http_json(&s.addr, "POST", "/v1/rules", body);
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["live"]["changed"].as_u64(), Some(previewed), "{v}");
    assert_eq!(keepalive(&live), expect(33, 3, 3, 0), "a live connection");
    let id = v["rule"]["id"].as_u64().unwrap();
    let (c, _s) = connect(&l);
    assert_eq!(keepalive(&c), expect(33, 3, 3, 0));
    let (code, v) = http_json(
        &s.addr,
        "DELETE",
        &format!("/v1/rules/{id}?dry_run=true&revert=true"),
        json!(null),
    );
    assert_eq!(code, 200, "{v}");
    assert!(v["live"]["unmatched"].as_u64().unwrap() >= 4, "{v}");
    assert_eq!(
        keepalive(&c),
        expect(33, 3, 3, 0),
        "a preview changes nothing"
    );
    for bad in ["bogus=1", "dry_run=yes", "new_only=true&revert=true"] {
        let (code, v) = http_json(
            &s.addr,
            "DELETE",
            &format!("/v1/rules/{id}?{bad}"),
            json!(null),
        );
        assert_eq!(code, 400, "{bad}: {v}");
    }
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
