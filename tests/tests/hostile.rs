//! A local user who is not root against `tcpka serve`: connections held
//! open or half-sent, floods of bad tokens, a stderr nobody reads, and text
//! made to forge log lines. The attacker is uid 65534 (setpriv), its
//! connections made by bash (`/dev/tcp`); the authorized caller is another
//! uid, 65533, with curl and the token, like a SIP proxy's workers.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::fd::AsRawFd as _,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use tcpka_tests::*;

const NOBODY: &str = "65534";
const CALLER: &str = "65533";

/// `bash -c SCRIPT` as uid/gid `uid`, no supplementary groups; stdout piped.
fn bash_as(uid: &str, script: &str) -> Child {
    as_user(uid)
        .args(["bash", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run setpriv bash")
}

/// Reads the child's stdout until a line starting with `word`; returns it.
fn wait_line(child: &mut Child, word: &str) -> String {
    let out = child.stdout.as_mut().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match out.read(&mut b) {
            Ok(1) if b[0] == b'\n' => {
                let l = String::from_utf8_lossy(&line).into_owned();
                if l.starts_with(word) {
                    return l;
                }
                line.clear();
            }
            Ok(1) => line.push(b[0]),
            _ => panic!("the helper ended before saying {word}"),
        }
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// An authorized request from uid 65533 with curl: the status and the
/// request's own time (curl's time_total, without the process start).
fn authorized(addr: &str) -> (String, Duration) {
    let o = as_user(CALLER)
        .args([
            "curl",
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}",
            "-H",
            &format!("Authorization: Bearer {TEST_TOKEN}"),
            &format!("http://{addr}/v1/rules"),
        ])
        .output()
        .expect("run setpriv curl (cargo xtask setup installs curl)");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (code, secs) = out.split_once(' ').unwrap_or((&out, "99"));
    (
        code.to_owned(),
        Duration::from_secs_f64(secs.trim().parse().unwrap_or(99.0)),
    )
}

/// The median time of `n` authorized requests, each answered 200.
fn median_authorized(addr: &str, n: usize) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let (code, t) = authorized(addr);
            assert_eq!(code, "200", "an authorized request was not served");
            t
        })
        .collect();
    times.sort();
    times[n / 2]
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

/// `tcpka serve` on a loopback port with its stderr where the test says
/// (a file, or a pipe it never reads); stopped on drop.
struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    fn start(e: &Env, stderr: Stdio, env: &[(&str, &str)], args: &[&str]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = e
            .tcpka
            .cmd()
            .env("TCPKA_TOKEN", TEST_TOKEN)
            .envs(env.iter().copied())
            .args(["serve", "--cgroup", e.cgroup.path.to_str().unwrap()])
            .args(["--listen", &addr])
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start tcpka serve");
        wait_for_healthz(&addr, Some(TEST_TOKEN), |c| c == 200);
        Self { child, addr }
    }

    fn port(&self) -> &str {
        self.addr.rsplit_once(':').unwrap().1
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

fn log_file(name: &str) -> (std::path::PathBuf, std::fs::File) {
    let path = std::env::temp_dir().join(unique(name));
    let f = std::fs::File::create(&path).unwrap();
    (path, f)
}

#[test]
fn a_user_holding_connections_neither_slows_others_nor_grows_serve() {
    let e = Env::outside();
    let (log, f) = log_file("tcpka-hostile-hold");
    let d = Daemon::start(&e, f.into(), &[], &[]);
    let before = median_authorized(&d.addr, 11);
    let rss_before = rss(d.child.id());
    // 300 connections: half idle, half in the middle of a large request
    // head (15 KB, just under the limit), held open.
    let script = format!(
        r#"trap '' PIPE; fds=(); pad=$(head -c 15000 /dev/zero | tr '\0' a)
        for i in $(seq 300); do
          exec {{fd}}<>/dev/tcp/127.0.0.1/{port} || continue
          fds+=($fd)
          if (( i % 2 )); then printf 'GET /v1/rules HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: %s' "$pad" >&$fd 2>/dev/null; fi
        done
        echo held ${{#fds[@]}}; sleep 60"#,
        port = d.port()
    );
    let mut attacker = bash_as(NOBODY, &script);
    let said = wait_line(&mut attacker, "held");
    let started = Instant::now();
    let during = median_authorized(&d.addr, 11);
    let rss_after = rss(d.child.id());
    eprintln!(
        "authorized GET /v1/rules, median: {before:?} alone, {during:?} while uid {NOBODY} {said} connections (measured in {:?}); RSS {} -> {} KB",
        started.elapsed(),
        rss_before / 1024,
        rss_after / 1024
    );
    stop(attacker);
    let bound = latency_bound(Duration::from_millis(50), before);
    assert!(during <= bound, "{during:?} (bound {bound:?})");
    assert!(
        rss_after.saturating_sub(rss_before) <= 32 << 20,
        "{rss_before} -> {rss_after}"
    );
    // The connections over the user's share were closed at once, and said
    // so in the log, a bounded number of times.
    drop(d);
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert!(
        text.contains(&format!(
            "uid {NOBODY} already holds {}",
            tcpka::server::PER_CALLER
        )),
        "{text}"
    );
    assert!(text.lines().count() < 100, "{} lines", text.lines().count());
}

#[test]
fn a_callers_share_is_capped_and_the_rest_closed_at_once() {
    let e = Env::outside();
    let (log, f) = log_file("tcpka-hostile-share");
    let d = Daemon::start(&e, f.into(), &[], &[]);
    let n = tcpka::server::PER_CALLER + 16;
    // Opens N connections and keeps them (idle: the head timeout ends the
    // accepted ones after 2 s, long after serve decided on each).
    let script = format!(
        r#"fds=(); for i in $(seq {n}); do exec {{fd}}<>/dev/tcp/127.0.0.1/{port}; fds+=($fd); done
        echo opened ${{#fds[@]}}; sleep 30"#,
        port = d.port()
    );
    let mut user = bash_as(NOBODY, &script);
    let said = wait_line(&mut user, "opened");
    assert_eq!(said, format!("opened {n}"));
    // serve said, for each connection over the share, why it closed it.
    let closed = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches(&format!(
                "uid {NOBODY} already holds {} API connections",
                tcpka::server::PER_CALLER
            ))
            .count()
    };
    wait_until("16 connections closed", Duration::from_secs(10), || {
        closed() >= 16
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(closed(), 16);
    stop(user);
    // Root holds every shared slot: another user is closed at once, root
    // still gets in (the reserved slots).
    let hogs: Vec<TcpStream> = (0..tcpka::server::MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(&d.addr).unwrap())
        .collect();
    let shared_full = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("all 256 API connections are taken")
    };
    wait_until("the shared slots taken", Duration::from_secs(10), || {
        authorized(&d.addr).0 == "000" && shared_full()
    });
    let (code, _) = http(&d.addr, "GET", "/v1/rules", None, None).unwrap();
    assert_eq!(code, 200);
    drop(hogs);
    wait_until("a slot again", Duration::from_secs(5), || {
        authorized(&d.addr).0 == "200"
    });
    drop(d);
    std::fs::remove_file(&log).unwrap();
}

#[test]
fn a_bad_token_flood_is_cheap_and_summarised_in_the_log() {
    let e = Env::outside();
    let (log, f) = log_file("tcpka-hostile-flood");
    let d = Daemon::start(&e, f.into(), &[], &[]);
    let alone = median_authorized(&d.addr, 11);
    let rss_before = rss(d.child.id());
    // Two loops of requests with a wrong token, for 10 s.
    // (python3: a shell loop sends a few hundred a second, far below what
    // one process can.)
    let flood = format!(
        "import socket,time\n\
         req=b'GET /v1/rules HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nAuthorization: Bearer wrong-token-0123456789\\r\\n\\r\\n'\n\
         end=time.time()+10; n=0\n\
         while time.time()<end:\n\
         \x20try:\n\
         \x20 s=socket.create_connection(('127.0.0.1',{port})); s.sendall(req)\n\
         \x20 while s.recv(4096): pass\n\
         \x20 s.close(); n+=1\n\
         \x20except OSError: pass\n\
         print('sent',n,flush=True)\n",
        port = d.port()
    );
    let script = "exec python3 -c \"$FLOOD\"";
    let flood_as_nobody = || {
        as_user(NOBODY)
            .args(["bash", "-c", script])
            .env("FLOOD", &flood)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run setpriv python3")
    };
    let mut a = flood_as_nobody();
    let mut b = flood_as_nobody();
    std::thread::sleep(Duration::from_secs(2));
    let during = median_authorized(&d.addr, 11);
    let sent: Vec<String> = [&mut a, &mut b]
        .into_iter()
        .map(|c| wait_line(c, "sent"))
        .collect();
    let rss_after = rss(d.child.id());
    stop(a);
    stop(b);
    drop(d);
    let size = std::fs::metadata(&log).unwrap().len();
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    eprintln!(
        "bad-token flood ({sent:?}): authorized median {during:?}, log {size} bytes, RSS {} -> {} KB",
        rss_before / 1024,
        rss_after / 1024
    );
    let bound = latency_bound(Duration::from_millis(50), alone);
    assert!(during <= bound, "{during:?} (bound {bound:?})");
    assert!(size <= 1 << 20, "{size} bytes of log");
    // Each second's refusals past the first 20: counted on the next line.
    let summarised = text
        .split("left_out=")
        .skip(1)
        .any(|rest| rest.starts_with(|c: char| ('1'..='9').contains(&c)));
    assert!(summarised, "no summary: {text}");
    assert!(rss_after.saturating_sub(rss_before) <= 32 << 20);
}

#[test]
fn serve_answers_while_nobody_reads_its_stderr() {
    let e = Env::outside();
    // A pipe of one page that nobody reads: full after a few lines.
    let (rd, wr) = nix::unistd::pipe().unwrap();
    // SAFETY: F_SETPIPE_SZ on our own pipe.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    let d = Daemon::start(&e, Stdio::from(wr), &[("RUST_LOG", "debug")], &[]);
    // Many lines: with debug on, each connection that ends in the middle of
    // a request head (reset: no TIME_WAIT) logs one, more than the writer
    // holds; and refused requests.
    let lines = |n: usize| {
        for i in 0..n {
            let mut c = TcpStream::connect(&d.addr).unwrap();
            if i % 100 == 0 {
                let _ = c.write_all(
                    b"GET /v1/rules HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n\r\n",
                );
                let _ = c.read_to_end(&mut Vec::new());
                continue;
            }
            let _ = c.write_all(b"GET /v1/rules HTTP/1.1\r\n");
            reset_on_close(&c);
        }
    };
    lines(tcpka::logs::BUFFERED_LINES + 4000);
    for _ in 0..5 {
        let started = Instant::now();
        let (code, _) = http(&d.addr, "GET", "/healthz", None, None).unwrap();
        assert_eq!(code, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let (code, _) = http(&d.addr, "GET", "/v1/rules", None, None).unwrap();
        assert_eq!(code, 200);
        lines(200);
    }
    // The lines it could not write are counted, not waited for.
    let (_, metrics) = http(&d.addr, "GET", "/metrics", None, None).unwrap();
    let dropped: u64 = metrics
        .lines()
        .find(|l| l.starts_with("tcpka_log_lines_lost_total{outcome=\"dropped\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("no dropped-lines counter: {metrics}"));
    assert!(dropped > 0, "{metrics}");
    drop(rd);
}

#[test]
fn text_from_outside_never_starts_a_log_line() {
    let e = Env::outside();
    let (log, f) = log_file("tcpka-hostile-forge");
    let d = Daemon::start(&e, f.into(), &[], &[]);
    let forged = "10.1.1.1:5060\nERROR FORGED line \u{1b}[2J";
    let body = serde_json::json!({"conn": forged, "idle": 9, "count": 3, "interval": 4,
        "holder": "call\r\nINFO FORGED holder"});
    let (code, _) = http(
        &d.addr,
        "POST",
        "/v1/enable",
        Some(body.to_string().as_bytes()),
        None,
    )
    .unwrap();
    assert_eq!(code, 400);
    // A request path and a header with escapes, refused before a handler.
    let mut c = TcpStream::connect(&d.addr).unwrap();
    c.write_all(
        b"GET /v1/%0aFORGED HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\x1b[31m\r\n\r\n",
    )
    .unwrap();
    let _ = c.read_to_end(&mut Vec::new());
    std::thread::sleep(Duration::from_millis(300));
    drop(d);
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert!(
        text.contains("FORGED"),
        "the refusal was not logged: {text}"
    );
    for line in text.lines() {
        for forged in ["ERROR FORGED", "INFO FORGED", "FORGED"] {
            assert!(!line.trim_start().starts_with(forged), "{line}");
        }
        assert!(!line.contains('\u{1b}'), "a raw escape: {line:?}");
        assert!(!line.contains('\r'), "a raw CR: {line:?}");
    }
}

#[test]
fn an_evapi_flood_neither_delays_api_commands_nor_fills_the_log() {
    let e = Env::outside();
    let (log, f) = log_file("tcpka-hostile-evapi");
    // The test is Kamailio's evapi server (root's socket: trusted).
    let kamailio = listen("127.0.0.1:0");
    let evapi = kamailio.local_addr().unwrap().to_string();
    let d = Daemon::start(&e, f.into(), &[], &["--evapi", &evapi]);
    let (mut k, _) = kamailio.accept().unwrap();
    let l = listen("127.0.0.1:0");
    let (c, _s) = connect(&l);
    let target = format!("cookie:{}", cookie(&c));
    let enable = |idle: u32| {
        let started = Instant::now();
        let (code, v) = http_json(
            &d.addr,
            "POST",
            "/v1/enable",
            serde_json::json!({"conn": target, "idle": idle, "count": 3, "interval": 5}),
        );
        assert_eq!(code, 200, "{v}");
        started.elapsed()
    };
    let median = |f: &dyn Fn(u32) -> Duration| {
        let mut t: Vec<Duration> = (0..21).map(|i| f(40 + i)).collect();
        t.sort();
        t[10]
    };
    let alone = median(&enable);
    // Commands as fast as the socket takes them: enables of a peer nobody
    // has (an index port: answered from the index), disables with a holder,
    // and messages that are not commands (a newline and an escape in them).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let netstring = |s: &str| format!("{}:{s},", s.len());
            let mut chunk = String::new();
            for i in 0..1000 {
                let m = match i % 3 {
                    0 => format!(
                        r#"{{"op":"enable","conn":"10.9.{}.{}:5060","idle":30,"count":3,"interval":5}}"#,
                        i / 250,
                        i % 250
                    ),
                    1 => format!(
                        r#"{{"op":"disable","conn":"10.9.0.{}:5060","holder":"call-{i}"}}"#,
                        i % 250
                    ),
                    // Valid JSON whose op is no command: the parser's error quotes it.
                    _ => r#"{"op":"enable\nFORGED \u001b[2J"}"#.to_owned(),
                };
                chunk.push_str(&netstring(&m));
            }
            let (mut sent, started) = (0u64, Instant::now());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if k.write_all(chunk.as_bytes()).is_err() {
                    break;
                }
                sent += 1000;
            }
            (sent, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let during = median(&enable);
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, took) = flood.join().unwrap();
    drop(d);
    let size = std::fs::metadata(&log).unwrap().len();
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert!(text.contains("FORGED"), "the bad messages were not logged");
    for line in text.lines() {
        assert!(!line.trim_start().starts_with("FORGED"), "{line}");
        assert!(!line.contains('\u{1b}'), "a raw escape: {line:?}");
    }
    eprintln!(
        "evapi flood: {sent} messages in {took:?} ({:.0}/s taken); API enable median {alone:?} alone, {during:?} during; log {size} bytes",
        sent as f64 / took.as_secs_f64()
    );
    let bound = latency_bound(Duration::from_millis(10), alone);
    assert!(during <= bound, "{during:?} (bound {bound:?})");
    assert!(size <= 1 << 20, "{size} bytes of log");
}

#[test]
fn event_streams_have_slots_of_their_own() {
    let e = Env::outside();
    let d = Daemon::start(&e, Stdio::null(), &[], &[]);
    // One user opens all the event streams it may (one more is refused),
    // then uses its whole share of API connections: the streams gave back
    // their API slots.
    let script = format!(
        r#"fds=(); for i in $(seq {streams}); do
          exec {{fd}}<>/dev/tcp/127.0.0.1/{port}; fds+=($fd)
          printf 'GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TEST_TOKEN}\r\n\r\n' >&$fd
          read -t 5 -u $fd status; echo "stream $i: $status"
        done
        for i in $(seq {more}); do exec {{fd}}<>/dev/tcp/127.0.0.1/{port}; fds+=($fd); done
        exec 3<>/dev/tcp/127.0.0.1/{port}
        printf 'GET /v1/rules HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TEST_TOKEN}\r\nConnection: close\r\n\r\n' >&3
        read -t 5 -u 3 status; echo "api $status"; sleep 30"#,
        streams = tcpka::server::STREAMS_PER_CALLER + 1,
        port = d.port(),
        // (the refused stream's connection stays open: one of the share)
        more = tcpka::server::PER_CALLER - 2,
    );
    let mut user = bash_as(NOBODY, &script);
    for i in 1..=tcpka::server::STREAMS_PER_CALLER {
        let said = wait_line(&mut user, &format!("stream {i}:"));
        assert!(said.contains(" 200 "), "{said}");
    }
    let said = wait_line(&mut user, "stream");
    assert!(said.contains(" 503 "), "one stream too many: {said}");
    let said = wait_line(&mut user, "api");
    assert!(said.contains(" 200 "), "{said}");
    // Others still have theirs.
    let r = request(&d.addr, "GET", "/v1/events", None)
        .timeout(Duration::from_secs(2))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    stop(user);
}
