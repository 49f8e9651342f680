//! Why a connection gets a rule: `rule explain`, `tcpka trace`, and
//! serve's kernel log.
use super::*;

/// `rule explain` names the rule the kernel applied, for connections that
/// several rules match.
#[test]
pub(super) fn rule_explain_names_the_rule_the_kernel_applies() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let port = l.local_addr().unwrap().port().to_string();
    e.tcpka.rule_add(&["60", "3", "5"]);
    e.tcpka
        .rule_add(&["--remote", "127.0.0.0/8", "61", "3", "5"]);
    e.tcpka.rule_add(&["--remote", "127.0.0.1", "62", "3", "5"]);
    e.tcpka.rule_add(&[
        "--local-port",
        &port,
        "--remote",
        "127.0.0.0/8",
        "63",
        "3",
        "5",
    ]);
    let (c, s) = connect(&l);
    for sock in [&c, &s] {
        let (local, remote) = (sock.local_addr().unwrap(), sock.peer_addr().unwrap());
        let out = e
            .tcpka
            .run(&[
                "rule",
                "explain",
                &local.to_string(),
                &remote.to_string(),
                "--json",
            ])
            .ok();
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let idle = v["winner"]["idle"].as_i64().unwrap() as i32;
        assert_eq!(keepalive(sock).idle, idle, "{local} -> {remote}: {v}");
        let text = e
            .tcpka
            .run(&["rule", "explain", &local.to_string(), &remote.to_string()])
            .ok()
            .stdout;
        assert!(text.contains(&format!("(idle {idle},")), "{text}");
    }
    // The server's end has the local port: the two-field rule.
    assert_eq!(keepalive(&s).idle, 63);
    // The client's end: the host /32 beats the /8.
    assert_eq!(keepalive(&c).idle, 62);
    // A live connection by CONN (here the client's peer, the listener):
    // each end it names, with the values it holds and the rule's.
    let out = e
        .tcpka
        .run(&["rule", "explain", &format!("127.0.0.1:{port}"), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    assert_eq!(items[0]["connection"]["keepalive"]["idle"], 62, "{v}");
    assert_eq!(items[0]["explanation"]["winner"]["idle"], 62, "{v}");
    let text = e
        .tcpka
        .run(&["rule", "explain", &format!("127.0.0.1:{port}")])
        .ok()
        .stdout;
    assert!(
        text.contains("keepalive on (idle 62") && text.contains("applies rule"),
        "{text}"
    );
    let r = e
        .tcpka
        .run(&["rule", "explain", "127.0.0.1", "127.0.0.1:1"]);
    assert_eq!(r.code, 2, "{r:?}");
    e.cgroup.leave();
}

/// `tcpka trace` prints the kernel's decision for a new connection (the
/// rule it got), refuses a second reader, and turns the log off when it
/// stops.
#[test]
pub(super) fn trace_prints_the_rule_a_new_connection_got() {
    let e = env();
    let id = e.tcpka.rule_add(&["--local-port", "7040", "30", "3", "3"]);
    let mut child = e
        .tcpka
        .cmd()
        .args(["trace", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until `info` shows the trace on (a probe must not start one).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = e.tcpka.run(&["info", "--json"]).ok().stdout;
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        if v["trace"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "trace did not start: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A second reader is refused.
    let r = e.tcpka.run(&["trace"]);
    assert!(
        r.code == 1 && r.stderr.contains("a trace already runs"),
        "{r:?}"
    );
    let l = listen("127.0.0.1:7040");
    let (_c, s) = connect(&l);
    assert_eq!(keepalive(&s).idle, 30);
    // The first line, read on a thread so that a missing one fails the
    // test instead of hanging it.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(10));
    if line.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let line = line.expect("no trace line within 10 s");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "info", "{line}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.starts_with("new connection 7040->")
            && msg.contains(&format!("rule {id} (idle 30 count 3 interval 3)")),
        "{msg}"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    let r = e.tcpka.run(&["trace", "--stop"]).ok();
    assert_eq!(r.stdout.trim(), "no trace was on", "stopping turned it off");
}

/// `serve --kernel-log info` puts the same decisions in the daemon's log,
/// and turns the kernel log off when it stops.
#[test]
pub(super) fn serve_kernel_log_puts_decisions_in_its_log() {
    let e = env();
    let id = e.tcpka.rule_add(&["--local-port", "7041", "31", "3", "3"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let serve = LoggedServe::start(&e.tcpka, &addr, &["--kernel-log", "info"]);
    let l = listen("127.0.0.1:7041");
    let (_c, s) = connect(&l);
    assert_eq!(keepalive(&s).idle, 31);
    std::thread::sleep(Duration::from_millis(500));
    let log = serve.stop();
    let found = log.iter().any(|v| {
        v["target"] == "kernel"
            && v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("rule {id} (idle 31")))
    });
    assert!(found, "{log:?}");
    let r = e.tcpka.run(&["trace", "--stop"]).ok();
    assert_eq!(r.stdout.trim(), "no trace was on");
}
