//! Events over the API: the stream, `tcpka watch`, the webhook, and the
//! log line per command.
use super::*;

/// Reads NDJSON events from `GET /v1/events` on a background thread.
#[test]
pub(super) fn dead_peer_timeout_reaches_stream_watch_and_webhook() {
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
pub(super) fn reset_and_orderly_close_events() {
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

/// The daemon logs one line per command (naming the connection) and per
/// refused request, as JSON objects with `--log-format json`; a peer-given
/// string with a newline stays inside its field.
#[test]
pub(super) fn serve_logs_commands_and_refusals_as_json_lines() {
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
