//! The webhook: signed events over HTTPS, and what it could not deliver.
use super::*;

/// Like [`reset_client`], with keepalive enabled by command (the test
/// process is outside the cgroup).
pub(super) fn reset_client_enabled(e: &Env, l: &TcpListener) -> u64 {
    reset_client_after(l, |ck| {
        e.tcpka
            .run(&["enable", &format!("cookie:{ck}"), "30", "3", "5"])
            .ok();
    })
}

/// The webhook over HTTPS (a private CA given with --webhook-ca), each
/// event signed with HMAC-SHA256 so that the receiver can reject forgeries.
#[test]
pub(super) fn https_webhook_with_signed_events() {
    let e = Env::outside();
    let dir = std::env::temp_dir().join(unique("tcpka-tls"));
    std::fs::create_dir(&dir).unwrap();
    let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    let certs = Certs::make(&dir);
    let path = |f: &std::path::Path| f.to_str().unwrap().to_owned();
    std::fs::write(dir.join("secret"), "webhook-secret-0123456789\n").unwrap();
    std::fs::set_permissions(
        dir.join("secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/https_webhook.py");
    let mut receiver = std::process::Command::new("python3")
        .args([
            script,
            &path(&certs.server_cert),
            &path(&certs.server_key),
            &p("secret"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(receiver.stdout.take().unwrap());
    let mut port = String::new();
    out.read_line(&mut port).unwrap();
    let url = format!("https://127.0.0.1:{}/tcpka", port.trim());
    let rx = json_lines(out.into_inner());
    let addr = format!("127.0.0.1:{}", free_port());
    let _s = Serve::start(
        &e.tcpka,
        &e.cgroup.path,
        &addr,
        &[
            "--webhook",
            &url,
            "--webhook-secret-file",
            &p("secret"),
            "--webhook-ca",
            &path(&certs.ca),
        ],
    );
    let l = listen("127.0.0.1:0");
    let ck = reset_client_enabled(&e, &l);
    let v = wait_for(&rx, Duration::from_secs(10), "the reset over https", |v| {
        v["event"]["cookie"].as_u64() == Some(ck)
    });
    assert_eq!(v["event"]["kind"], "reset", "{v}");
    assert_eq!(v["valid"], true, "signature: {v}");
    let _ = receiver.kill();
    let _ = receiver.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Events the webhook could not deliver are announced to the receiver as
/// a gap, with their count, before the next event.
#[test]
pub(super) fn webhook_reports_what_it_could_not_deliver() {
    let e = Env::outside();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/tcpka");
    let addr = format!("127.0.0.1:{}", free_port());
    let _s = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &["--webhook", &url]);
    let l = listen("127.0.0.1:0");
    // Nobody listens yet: every attempt for this event fails.
    reset_client_enabled(&e, &l);
    std::thread::sleep(Duration::from_millis(2000));
    // The receiver comes up; the next event is preceded by a gap.
    let rx = webhook_receiver_on(TcpListener::bind(("127.0.0.1", port)).unwrap());
    let ck = reset_client_enabled(&e, &l);
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a delivery");
    assert_eq!(first["kind"], "gap", "{first}");
    assert_eq!(first["reason"], "webhook", "{first}");
    assert!(first["missed"].as_u64().unwrap() >= 1, "{first}");
    let v = wait_for(
        &rx,
        Duration::from_secs(10),
        "the reset after the gap",
        |v| v["cookie"].as_u64() == Some(ck),
    );
    assert_eq!(v["kind"], "reset", "{v}");
}
