//! Early warning: `at_risk` before the kernel gives up on a peer, and
//! `recovered` when it answers again, from `tcpka serve`'s early warning.
use std::sync::mpsc::Receiver;

use super::*;

/// Every event of the stream, kept: (kind, cookie) lookups in order.
struct Events {
    rx: Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Events {
    fn new(rx: Receiver<serde_json::Value>) -> Self {
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Ok(v) = self.rx.try_recv() {
            self.seen.push(v);
        }
    }

    fn all(&mut self, kind: &str, cookie: u64) -> Vec<serde_json::Value> {
        self.drain();
        self.seen
            .iter()
            .filter(|v| v["kind"] == kind && v["cookie"].as_u64() == Some(cookie))
            .cloned()
            .collect()
    }

    /// The first event of `kind` for `cookie` seen since `from` events,
    /// waiting up to `within`.
    fn wait(
        &mut self,
        kind: &str,
        cookie: u64,
        from: usize,
        within: Duration,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            self.drain();
            if let Some(v) = self.seen[from.min(self.seen.len())..]
                .iter()
                .find(|v| v["kind"] == kind && v["cookie"].as_u64() == Some(cookie))
            {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {kind} event for cookie {cookie} within {within:?}; seen: {:?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn len(&mut self) -> usize {
        self.drain();
        self.seen.len()
    }
}

/// A connection to the peer that has just exchanged a byte (its last ACK
/// is now).
fn talk(l: &std::net::TcpListener) -> (TcpStream, TcpStream) {
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut s, _) = l.accept().unwrap();
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    (c, s)
}

fn enable(s: &Serve, c: &TcpStream, idle: u64, count: u64, interval: u64, at_risk: Option<&str>) {
    let mut body = json!({
        "conn": format!("cookie:{}", cookie(c)),
        "idle": idle, "count": count, "interval": interval,
    });
    if let Some(a) = at_risk {
        body["at_risk"] = json!(a);
    }
    let (code, v) = http_json(&s.addr, "POST", "/v1/enable", body);
    assert_eq!((code, v["changed"].as_u64()), (200, Some(1)), "{v}");
}

fn ns(v: &serde_json::Value) -> i128 {
    i128::from(v["monotonic_ns"].as_u64().unwrap())
}

/// The bars: with the peer cut, `at_risk` (reason `probe`) comes at least
/// (count - 1) x interval before the `timeout`; once the peer answers
/// again, `recovered` comes within 2 s; thresholds per command (`off`) and
/// per rule (`probe=300ms`) hold.
#[test]
pub(super) fn at_risk_comes_before_the_timeout_and_recovered_after_the_peer_returns() {
    let e = Env::entered();
    let peer = VethPeer::new();
    // An index port: sock_ops indexes and watches these connections as
    // they connect, so commands get early warning on every kernel.
    let l = peer.listen_on(5060);
    let l_rule = peer.listen();
    let rule_port = l_rule.local_addr().unwrap().port().to_string();
    e.tcpka.rule_add(&[
        "--tracked",
        "--remote-port",
        &rule_port,
        "--at-risk",
        "probe=300ms",
        "2",
        "3",
        "3",
    ]);
    let rules = e.tcpka.run(&["rule", "list", "--json"]).ok().stdout;
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    assert_eq!(rules[0]["at_risk"], "probe=300ms", "{rules}");
    let s = serve(&e, &[]);
    let mut events = Events::new(event_stream(&s.addr));

    // a: recovery (interval 2); d: the lead with a longer interval; b: no
    // early warning; r: a tracked rule's connection with its own threshold.
    let (a, _a) = talk(&l);
    let (d, _d) = talk(&l);
    let (b, _b) = talk(&l);
    let (r, _r) = talk(&l_rule);
    enable(&s, &a, 2, 3, 2, None);
    enable(&s, &d, 2, 3, 3, Some("default"));
    enable(&s, &b, 2, 3, 2, Some("off"));
    let (ca, cd, cb, cr) = (cookie(&a), cookie(&d), cookie(&b), cookie(&r));
    // Everything exchanged just now: the idle time starts here.
    for (c, srv) in [(&a, &_a), (&d, &_d), (&b, &_b), (&r, &_r)] {
        let (mut c, mut srv) = (c, srv);
        srv.write_all(b"y").unwrap();
        let mut x = [0u8; 1];
        c.read_exact(&mut x).unwrap();
    }
    let slack = if under_tcg() { 3.0 } else { 1.0 };

    // Cut: the first probe goes out 2 s idle, unanswered.
    peer.cut();
    let cut = Instant::now();
    let from = events.len();
    let at_a = events.wait("at_risk", ca, from, Duration::from_secs_f64(6.0 * slack));
    let waited = cut.elapsed();
    peer.restore();
    let restored = Instant::now();
    eprintln!("a: at_risk {waited:?} after the cut: {at_a}");
    assert_eq!(at_a["reason"], "probe", "{at_a}");
    assert!(at_a["ack_age_ms"].as_u64().unwrap() >= 2000, "{at_a}");
    // Not before the probe's threshold (half the interval): 2 s + 1 s.
    assert!(waited >= Duration::from_millis(2900), "{waited:?}");
    let at_r = events.wait("at_risk", cr, from, Duration::from_secs(3));
    assert_eq!(at_r["reason"], "probe", "{at_r}");
    let rec = events.wait("recovered", ca, from, Duration::from_secs_f64(2.0 * slack));
    let took = restored.elapsed();
    eprintln!("a: recovered {took:?} after the peer returned: {rec}");
    assert!(took <= Duration::from_secs_f64(2.0 * slack), "{took:?}");
    assert_eq!(rec["reason"], "probe", "{rec}");
    assert!(rec["ack_age_ms"].as_u64().unwrap() < 1000, "{rec}");
    // Every watched connection answered again; d and r at their next probe.
    for c in [cd, cr] {
        events.wait("recovered", c, from, Duration::from_secs_f64(4.0 * slack));
    }

    // Cut for good: each times out, its at_risk well before.
    std::thread::sleep(Duration::from_millis(500));
    peer.cut();
    let from = events.len();
    for (c, count, interval) in [(ca, 3, 2), (cd, 3, 3), (cr, 3, 3)] {
        let risk = events.wait("at_risk", c, from, Duration::from_secs_f64(8.0 * slack));
        let timeout = events.wait("timeout", c, from, Duration::from_secs_f64(16.0 * slack));
        let lead = ns(&timeout) - ns(&risk);
        let bar = i128::from((count - 1) * interval) * 1_000_000_000;
        eprintln!(
            "cookie {c}: at_risk {:.2} s before the timeout (bar {} s); detection {} ms",
            lead as f64 / 1e9,
            bar / 1_000_000_000,
            timeout["ack_age_ms"]
        );
        assert!(lead >= bar, "{risk} {timeout}");
        // The detection time: from the last ACK, idle + count x interval.
        let det = timeout["ack_age_ms"].as_u64().unwrap();
        let want = (2 + count * interval) * 1000;
        assert!(det >= want - 100 && det < want + 3000, "{det} {timeout}");
    }
    // b: no early warning, as asked; its timeout still comes.
    events.wait("timeout", cb, from, Duration::from_secs(8));
    assert!(events.all("at_risk", cb).is_empty(), "{:?}", events.seen);

    let (_, metrics) = http(&s.addr, "GET", "/metrics", None, None).unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert!(
        value("tcpka_at_risk_total{reason=\"probe\"} ") >= 5.0,
        "{metrics}"
    );
    assert!(
        value("tcpka_recovered_total{reason=\"probe\"} ") >= 3.0,
        "{metrics}"
    );
    assert_eq!(value("tcpka_at_risk_total{reason=\"zero_window\"} "), 0.0);
    assert!(value("tcpka_detection_seconds_count ") >= 4.0, "{metrics}");
}

/// The other reasons: retransmission backoff and the retransmit count on
/// data the peer does not acknowledge, and a receive window at zero.
#[test]
pub(super) fn backoff_retransmits_and_a_zero_window_are_reported() {
    let e = Env::entered();
    let s = serve(&e, &[]);
    let mut events = Events::new(event_stream(&s.addr));

    // Data into a cut: backoff and retransmits. A connection on no index
    // port: a command asks sock_ops to watch it (Linux 6.12+); before, only
    // connections on an index port are watched.
    let peer = VethPeer::new();
    let l = peer.listen_on(if kernel_at_least(6, 12) { 0 } else { 5060 });
    let (mut c, _srv) = talk(&l);
    enable(&s, &c, 600, 9, 60, Some("retrans=3,backoff=3"));
    let ck = cookie(&c);
    peer.drop_answers();
    let from = events.len();
    c.write_all(b"lost").unwrap();
    let slack = if under_tcg() { 3.0 } else { 1.0 };
    let deadline = Instant::now() + Duration::from_secs_f64(8.0 * slack);
    let reasons = loop {
        let reasons: Vec<String> = events
            .all("at_risk", ck)
            .iter()
            .map(|v| v["reason"].as_str().unwrap().to_owned())
            .collect();
        if reasons.iter().any(|r| r == "backoff") && reasons.iter().any(|r| r == "retrans") {
            break reasons;
        }
        assert!(Instant::now() < deadline, "{reasons:?}: {:?}", events.seen);
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("data into a cut: at_risk {reasons:?}");
    peer.answer_again();
    // Acknowledged at the next retransmission: backoff clears.
    let rec = events.wait("recovered", ck, from, Duration::from_secs_f64(8.0 * slack));
    assert_eq!(rec["reason"], "backoff", "{rec}");

    // A reader that stops: the window closes.
    let lo = listen(if kernel_at_least(6, 12) {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:5061"
    });
    let (w, srv) = connect(&lo);
    enable(&s, &w, 600, 9, 60, Some("zero-window=1s"));
    let wk = cookie(&w);
    w.set_nonblocking(true).unwrap();
    let chunk = vec![0u8; 65536];
    let mut sent = 0usize;
    let start = Instant::now();
    // Until the peer's buffer is full and ours too.
    loop {
        match (&w).write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    }
    let from = events.len();
    let zw = events.wait("at_risk", wk, from, Duration::from_secs_f64(4.0 * slack));
    assert_eq!(zw["reason"], "zero_window", "{zw}");
    // The reader reads again.
    let mut srv = srv;
    srv.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while got < sent {
        match srv.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => break,
        }
    }
    let rec = events.wait("recovered", wk, from, Duration::from_secs_f64(3.0 * slack));
    assert_eq!(rec["reason"], "zero_window", "{rec}");
}

/// No `at_risk` on healthy idle connections over five minutes of
/// keepalive probes (a probe a second, each answered).
#[test]
pub(super) fn no_at_risk_on_healthy_idle_connections_over_five_minutes() {
    let e = Env::entered();
    let peer = VethPeer::new();
    // Index ports: watched on every kernel (see above).
    let l = peer.listen_on(5060);
    let l_rule = peer.listen();
    let rule_port = l_rule.local_addr().unwrap().port().to_string();
    e.tcpka
        .rule_add(&["--tracked", "--remote-port", &rule_port, "1", "3", "1"]);
    let s = serve(&e, &[]);
    let mut events = Events::new(event_stream(&s.addr));
    let (a, _a) = talk(&l);
    let (r, _r) = talk(&l_rule);
    let lo = listen("127.0.0.1:5061");
    let (b, _b) = connect(&lo);
    enable(&s, &a, 1, 3, 1, None);
    enable(&s, &b, 1, 3, 1, Some("probe=100ms"));
    let cookies = [cookie(&a), cookie(&r), cookie(&b)];
    let minutes = 5;
    std::thread::sleep(Duration::from_secs(60 * minutes));
    events.drain();
    let risky: Vec<_> = events
        .seen
        .iter()
        .filter(|v| v["kind"] == "at_risk" || v["kind"] == "recovered")
        .collect();
    assert!(risky.is_empty(), "{risky:?}");
    // The probes went out and were answered all along: each connection is
    // up, heard from within the last probe interval or two.
    let (_, v) = http_json(&s.addr, "GET", "/v1/connections", json!(null));
    for c in cookies {
        let conn = v
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["cookie"].as_u64() == Some(c))
            .unwrap_or_else(|| panic!("{c} in {v}"));
        let l = &conn["liveness"];
        assert!(l["last_ack_recv_ms"].as_u64().unwrap() < 2500, "{conn}");
        assert_eq!(l["probes_out"], 0, "{conn}");
    }
    let (_, metrics) = http(&s.addr, "GET", "/metrics", None, None).unwrap();
    assert!(
        metrics.contains("tcpka_at_risk_total{reason=\"probe\"} 0"),
        "{metrics}"
    );
}
