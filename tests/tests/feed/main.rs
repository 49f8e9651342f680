//! The event feed under stress: churn that fills the kernel's rings, a
//! stdout nobody reads, a slow subscriber, unload + load under a running
//! `serve`, a second `serve`, an aborted connection. Nothing is lost
//! without a gap marker saying so, and the events a controller acts on
//! are never crowded out.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::Stdio,
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcpka_tests::*;

mod webhook;

use webhook::reset_client_enabled;

/// Opens and closes `n` connections over `l` (both ends in the test).
fn churn(l: &TcpListener, n: usize) {
    for _ in 0..n {
        let (c, s) = connect(l);
        drop(c);
        drop(s);
    }
}

/// A connected pair whose server side then resets the client (SO_LINGER
/// 0): the client's socket ends with ECONNRESET.
fn reset_client(l: &TcpListener) -> u64 {
    reset_client_after(l, |_| {})
}

/// Like [`reset_client`], calling `before(cookie)` before the reset (to
/// enable keepalive by command, for one).
fn reset_client_after(l: &TcpListener, before: impl FnOnce(u64)) -> u64 {
    let (mut c, s) = connect(l);
    let ck = cookie(&c);
    before(ck);
    reset_on_close(&s);
    drop(s);
    std::thread::sleep(Duration::from_millis(50));
    let _ = c.write_all(b"x");
    let _ = c.write_all(b"x");
    ck
}

/// Lines of a child's stdout, parsed as JSON.
fn json_lines(r: impl std::io::Read + Send + 'static) -> Receiver<Value> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

/// Waits for a message matching `f`.
fn wait_for(
    rx: &Receiver<Value>,
    within: Duration,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if f(&v) => return v,
            Ok(_) => {}
            Err(_) => panic!("no {what} within {within:?}"),
        }
    }
}

/// `GET /v1/events` on a raw connection whose receive buffer is
/// `rcvbuf` bytes (set before connecting): a subscriber that can fall
/// behind. Returns the socket after the response head.
fn subscribe_slowly(addr: &str, rcvbuf: usize) -> BufReader<TcpStream> {
    use nix::sys::socket::{
        connect, setsockopt, socket, sockopt::RcvBuf, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let sa: std::net::SocketAddrV4 = addr.parse().unwrap();
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&fd, RcvBuf, &rcvbuf).unwrap();
    connect(fd.as_raw_fd(), &SockaddrIn::from(sa))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut s = TcpStream::from(fd);
    s.write_all(
        format!(
            "GET /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TEST_TOKEN}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            return r;
        }
    }
}

/// Reads NDJSON lines from a subscription on a thread.
fn stream_lines(r: BufReader<TcpStream>) -> Receiver<Value> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = r;
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            // Chunked encoding: size lines are not JSON and are skipped.
            if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                if tx.send(v).is_err() {
                    break;
                }
            }
            line.clear();
        }
    });
    rx
}

/// Churn fills the ring of `applied`/`closed` events while nobody reads
/// it; a reset that follows still reaches the controller, and the lost
/// events are reported as a gap.
#[test]
fn churn_never_crowds_out_resets_and_losses_are_reported() {
    let e = Env::entered_with(&["--rule-events"]);
    e.tcpka.rule_add(&["--tracked", "30", "3", "5"]);
    let l = listen("127.0.0.1:0");
    churn(&l, 5000);
    let ck = reset_client(&l);
    e.cgroup.leave();
    let info = e.tcpka.run(&["info", "--json"]).ok();
    let v: Value = serde_json::from_str(&info.stdout).unwrap();
    assert!(
        v["counters"]["events_dropped"].as_u64().unwrap() > 0,
        "the churn did not fill the ring: {v}"
    );
    assert_eq!(v["counters"]["alerts_dropped"], 0, "{v}");
    // Now a serve starts reading.
    let mut child = e
        .tcpka
        .cmd()
        .env("TCPKA_TOKEN", TEST_TOKEN)
        .args([
            "serve",
            "--json",
            "--cgroup",
            e.cgroup.path.to_str().unwrap(),
        ])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = json_lines(child.stdout.take().unwrap());
    // In whatever order they come: the reset, and a gap for what the
    // churn pushed out.
    let (mut reset, mut gap) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while reset.is_none() || gap.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("reset {reset:?}, gap {gap:?} within 10 s"));
        if v["kind"] == "reset" && v["cookie"].as_u64() == Some(ck) {
            reset = Some(v);
        } else if v["kind"] == "gap" {
            gap = Some(v);
        }
    }
    let (reset, gap) = (reset.unwrap(), gap.unwrap());
    assert_eq!(reset["error"], 104, "{reset}");
    assert_eq!(gap["reason"], "kernel_events", "{gap}");
    assert!(gap["missed"].as_u64().unwrap() > 0, "{gap}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait().unwrap();
}

/// A stdout that nobody reads does not stall the feed: subscribers still
/// get events long after the pipe is full.
#[test]
fn blocked_stdout_does_not_stall_events() {
    let e = Env::entered();
    e.tcpka.rule_add(&["--tracked", "30", "3", "5"]);
    let (r, w) = nix::unistd::pipe().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = e
        .tcpka
        .cmd()
        .env("TCPKA_TOKEN", TEST_TOKEN)
        .args([
            "serve",
            "--cgroup",
            e.cgroup.path.to_str().unwrap(),
            "--listen",
            &addr,
        ])
        .stdout(Stdio::from(w))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_healthz(&addr, None, |code| code == 200);
    let events = event_stream(&addr);
    let l = listen("127.0.0.1:0");
    // Far more than a pipe holds (64 KiB): thousands of log lines.
    churn(&l, 3000);
    let ck = reset_client(&l);
    e.cgroup.leave();
    wait_for(
        &events,
        Duration::from_secs(10),
        "the reset after the pipe filled",
        |v| v["kind"] == "reset" && v["cookie"].as_u64() == Some(ck),
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    drop(r);
}

/// A subscriber that stops reading gets a gap marker with the count when
/// it reads again.
#[test]
fn slow_subscriber_gets_a_gap_marker() {
    // Rule events make the churn below a flood.
    let e = Env::entered_with(&["--rule-events"]);
    e.tcpka.rule_add(&["--tracked", "30", "3", "5"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let _s = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
    let slow = subscribe_slowly(&addr, 4096);
    let l = listen("127.0.0.1:0");
    churn(&l, 12_000);
    e.cgroup.leave();
    std::thread::sleep(Duration::from_millis(500));
    let rx = stream_lines(slow);
    let gap = wait_for(&rx, Duration::from_secs(20), "a subscriber gap", |v| {
        v["kind"] == "gap" && v["reason"] == "subscriber"
    });
    assert!(gap["missed"].as_u64().unwrap() > 0, "{gap}");
}

/// `serve` follows the installation through unload + load, refuses a
/// second `serve`, and reports `ss -K` as `aborted`.
#[test]
fn serve_survives_reload_and_is_alone() {
    let e = Env::outside();
    let addr = format!("127.0.0.1:{}", free_port());
    let _s = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
    // A second serve on the same installation is refused.
    let r = e.tcpka.run(&[
        "serve",
        "--cgroup",
        e.cgroup.path.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--token",
        TEST_TOKEN,
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("already serves"), "{r:?}");

    let events = event_stream(&addr);
    e.tcpka.run(&["unload"]).ok();
    e.tcpka.load(&e.cgroup.path);
    // Let the feed notice (it checks every second).
    std::thread::sleep(Duration::from_millis(2500));
    let l = listen("127.0.0.1:0");
    let ck = reset_client_enabled(&e, &l);
    wait_for(
        &events,
        Duration::from_secs(10),
        "a reset after reload",
        |v| v["kind"] == "reset" && v["cookie"].as_u64() == Some(ck),
    );

    // `ss -K` aborts a connection: its own kind.
    let (c, _srv) = connect(&l);
    let port = c.local_addr().unwrap().port();
    let ck = cookie(&c);
    e.tcpka
        .run(&["enable", &format!("cookie:{ck}"), "30", "3", "5"])
        .ok();
    sh(&[
        "ss",
        "-K",
        "-tn",
        "src",
        "127.0.0.1",
        "sport",
        "=",
        &format!(":{port}"),
    ]);
    let v = wait_for(&events, Duration::from_secs(10), "an aborted event", |v| {
        v["cookie"].as_u64() == Some(ck)
    });
    assert_eq!(v["kind"], "aborted", "{v}");
    assert_eq!(v["error"], 103, "{v}");

    // `tcpka close` ends one: reported as tcpka's doing.
    let (c, _srv) = connect(&l);
    let ck = cookie(&c);
    e.tcpka
        .run(&["enable", &format!("cookie:{ck}"), "30", "3", "5"])
        .ok();
    let r = e.tcpka.run(&["close", &format!("cookie:{ck}")]).ok();
    assert_eq!(r.stdout.trim(), "closed 1 connection", "{r:?}");
    let v = wait_for(
        &events,
        Duration::from_secs(10),
        "a closed_by_tcpka event",
        |v| v["cookie"].as_u64() == Some(ck),
    );
    assert_eq!(v["kind"], "closed_by_tcpka", "{v}");
    assert_eq!(v["source"], "command", "{v}");
}

/// Connections a rule matches report their resets always, and their
/// `applied` and orderly `closed` events only with `--rule-events` (each
/// event costs every matching connection).
#[test]
fn rule_events_are_opt_in_and_resets_are_not() {
    for with in [false, true] {
        let extra: &[&str] = if with { &["--rule-events"] } else { &[] };
        let e = Env::entered_with(extra);
        let addr = format!("127.0.0.1:{}", free_port());
        let serve = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
        let events = event_stream(&serve.addr);
        e.tcpka.rule_add(&["--tracked", "30", "3", "5"]);
        let l = listen("127.0.0.1:0");
        let (c, s) = connect(&l);
        let orderly = cookie(&c);
        drop((c, s));
        let reset = reset_client(&l);
        // The reset comes through a ring of its own: it may overtake the
        // orderly connection's events, so collect until both are in (or,
        // without --rule-events, a second more).
        let mut kinds = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut reset_at = None;
        loop {
            let done = |k: &[(bool, String)]| {
                k.iter().any(|k| k.0 && k.1 == "reset")
                    && (!with || k.iter().any(|k| !k.0 && k.1 == "closed"))
            };
            if done(&kinds) {
                let at = *reset_at.get_or_insert_with(Instant::now);
                if with || at.elapsed() > Duration::from_secs(1) {
                    break;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "with {with}: {kinds:?} after 10 s");
            let Ok(v) = events.recv_timeout(left.min(Duration::from_millis(200))) else {
                continue;
            };
            let ck = v["cookie"].as_u64();
            if ck == Some(orderly) || ck == Some(reset) {
                kinds.push((ck == Some(reset), v["kind"].as_str().unwrap().to_owned()));
            }
        }
        let orderly_kinds: Vec<_> = kinds.iter().filter(|k| !k.0).map(|k| &k.1).collect();
        if with {
            assert_eq!(orderly_kinds, ["applied", "closed"], "{kinds:?}");
        } else {
            assert!(orderly_kinds.is_empty(), "{kinds:?}");
        }
        e.cgroup.leave();
    }
}
