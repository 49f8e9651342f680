//! Who can drive `tcpka serve`: local users who are not root, web pages
//! through DNS rebinding, clients that hold connections open. Each case is
//! tried as an unprivileged uid (65534) with curl.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::fs::PermissionsExt as _,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;
use tcpka_tests::*;

const NOBODY: &str = "65534";

/// curl as uid/gid 65534 with no supplementary groups; `args` follow.
fn curl_as_nobody(args: &[&str]) -> Output {
    as_user(NOBODY)
        .args([
            "curl",
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/stderr",
            "-w",
            "%{http_code}",
        ])
        .args(args)
        .output()
        .expect("run setpriv curl (cargo xtask setup installs curl)")
}

fn code(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn rules(e: &Env) -> usize {
    tcpka::enforcer::Enforcer::new(e.tcpka.layout())
        .rules()
        .unwrap()
        .len()
}

const RULE: &str = r#"{"idle": 30, "count": 3, "interval": 5, "user_timeout_ms": 1}"#;

#[test]
fn tcp_listener_needs_the_token_host_and_json() {
    let e = Env::outside();
    let dir = tempdir("tcpka-token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TEST_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let _s = Serve::start(
        &e.tcpka,
        &e.cgroup.path,
        &addr,
        &["--token-file", token_file.to_str().unwrap()],
    );
    let url = format!("http://{addr}/v1/rules");
    // No token, as an unprivileged user: refused, nothing added.
    let o = curl_as_nobody(&["-H", "Content-Type: application/json", "-d", RULE, &url]);
    assert_eq!(code(&o), "401", "{o:?}");
    assert_eq!(rules(&e), 0);
    // That user cannot read the token either.
    let o = as_user(NOBODY)
        .args(["cat", token_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success(), "uid 65534 read the token file");
    let auth = format!("Authorization: Bearer {TEST_TOKEN}");
    // The right token but a foreign Host (a DNS-rebound web page): refused.
    let o = curl_as_nobody(&[
        "-H",
        "Content-Type: application/json",
        "-H",
        &auth,
        "-H",
        &format!(
            "Host: attacker.example:{}",
            addr.rsplit(':').next().unwrap()
        ),
        "-d",
        RULE,
        &url,
    ]);
    assert_eq!(code(&o), "403", "{o:?}");
    // A form post (no preflight in a browser): refused.
    let o = curl_as_nobody(&[
        "-H",
        &auth,
        "-H",
        "Content-Type: text/plain",
        "-d",
        RULE,
        &url,
    ]);
    assert_eq!(code(&o), "415", "{o:?}");
    assert_eq!(rules(&e), 0);
    // With token, Host and JSON it works.
    let o = curl_as_nobody(&[
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        RULE,
        &url,
    ]);
    assert_eq!(code(&o), "201", "{o:?}");
    assert_eq!(rules(&e), 1);
    // A serve with this token file, which must refuse it.
    let refused = || {
        let r = e.tcpka.run(&[
            "serve",
            "--cgroup",
            e.cgroup.path.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--token-file",
            token_file.to_str().unwrap(),
        ]);
        assert_eq!(r.code, 1, "{r:?}");
        r
    };
    // A token file others can read is refused.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = refused();
    assert!(r.stderr.contains("readable by every user"), "{r:?}");
    // So is one another user owns (they could change the secret).
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&token_file, Some(65534), Some(65534)).unwrap();
    let r = refused();
    assert!(r.stderr.contains("owned by uid 65534"), "{r:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without a configured token, serve makes one in a root-only file (here
/// in a private mount namespace with its own /run/tcpka).
#[test]
fn generated_token_is_root_only() {
    let e = Env::outside();
    let port = free_port();
    let script = r#"
        set -e
        mkdir -p /run/tcpka
        mount -t tmpfs -o mode=0755 tcpka-test /run/tcpka
        "$TCPKA_BIN" serve --cgroup "$CG" --listen "127.0.0.1:$PORT" 2>/dev/null &
        pid=$!
        for i in $(seq 100); do [ -s "$TOKEN" ] && break; sleep 0.05; done
        for i in $(seq 100); do
            code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(cat "$TOKEN")" "http://127.0.0.1:$PORT/healthz") || true
            [ "$code" = 200 ] && break; sleep 0.05
        done
        echo "healthz=$code"
        echo "mode=$(stat -c %a "$TOKEN")"
        echo "anon=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/v1/rules")"
        if setpriv --reuid=65534 --regid=65534 --clear-groups cat "$TOKEN" >/dev/null 2>&1; then
            echo "nobody=read"
        else
            echo "nobody=denied"
        fi
        kill -INT $pid; wait $pid || true
    "#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", script])
        .env("TCPKA_BIN", tcpka_bin())
        .env("TCPKA_PIN_DIR", &e.tcpka.pin_dir)
        .env_remove("TCPKA_TOKEN")
        .env("CG", &e.cgroup.path)
        .env("PORT", port.to_string())
        // This installation's own (the default one's is /run/tcpka/api-token).
        .env("TOKEN", e.tcpka.layout().token_file())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want in ["healthz=200", "mode=600", "anon=401", "nobody=denied"] {
        assert!(
            stdout.contains(want),
            "{want}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn unix_socket_is_for_root_and_the_api_group() {
    let e = Env::outside();
    let dir = tempdir("tcpka-sock");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.join("api.sock");
    let start = |extra: &[&str]| {
        let child = e
            .tcpka
            .cmd()
            .args([
                "serve",
                "--cgroup",
                e.cgroup.path.to_str().unwrap(),
                "--listen",
            ])
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "no unix socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    };
    let stop = |mut child: std::process::Child| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait().unwrap();
    };
    let url = "http://localhost/v1/rules";
    let s = sock.to_str().unwrap();
    // Adds a rule over the unix socket as uid 65534.
    let post_rule_as_nobody = || {
        curl_as_nobody(&[
            "--unix-socket",
            s,
            "-H",
            "Content-Type: application/json",
            "-d",
            RULE,
            url,
        ])
    };
    // Root only: mode 0600, so other users cannot even connect.
    let child = start(&[]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let o = post_rule_as_nobody();
    assert_eq!(code(&o), "000", "connect must fail: {o:?}");
    // Even with the file opened up, the peer credentials are checked.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = post_rule_as_nobody();
    assert_eq!(code(&o), "403", "{o:?}");
    assert_eq!(rules(&e), 0);
    stop(child);
    // A file that is not a socket is never replaced.
    std::fs::write(&sock, "keep me").unwrap();
    let r = e.tcpka.run(&[
        "serve",
        "--cgroup",
        e.cgroup.path.to_str().unwrap(),
        "--listen",
        &format!("unix:{s}"),
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not a socket"), "{r:?}");
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "keep me");
    std::fs::remove_file(&sock).unwrap();
    // Members of the API group may use it (here gid 65534).
    let child = start(&["--api-group", NOBODY]);
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65534);
    let o = post_rule_as_nobody();
    assert_eq!(code(&o), "201", "{o:?}");
    assert_eq!(rules(&e), 1);
    stop(child);
    assert!(!sock.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn netns_must_be_a_namespace_file() {
    let e = Env::outside();
    let addr = format!("127.0.0.1:{}", free_port());
    let _s = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
    let ns = NamedNetns::new();
    let dir = tempdir("tcpka-netns");
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(ns.path(), &link).unwrap();
    let ptys = || std::fs::read_to_string("/proc/sys/kernel/pty/nr").unwrap();
    let ptys_before = ptys();
    // Every refusal reads the same: whether a file exists, in a directory
    // the caller may not look into, is not told.
    let mut said = std::collections::BTreeSet::new();
    for path in [
        "/etc/passwd",
        "/dev/zero",
        "/dev/ptmx",
        fifo.to_str().unwrap(),
        link.to_str().unwrap(),
        "/nonexistent/ns",
        "/root/.tcpka-no-such-file",
        "/root",
    ] {
        let started = Instant::now();
        let (code, v) = http_json(
            &addr,
            "POST",
            "/v1/enable",
            json!({"conn": "10.1.1.1:5060", "idle": 9, "count": 3, "interval": 4, "netns": path}),
        );
        assert_eq!(code, 400, "{path}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("not a network namespace file"),
            "{path}: {v}"
        );
        said.insert(error.replace(path, "PATH"));
        assert!(started.elapsed() < Duration::from_secs(2), "{path}");
    }
    assert_eq!(said.len(), 1, "{said:?}");
    // Nothing was opened: no pseudo-terminal was allocated by /dev/ptmx.
    assert_eq!(ptys(), ptys_before);
    // The real ones work: a /run/netns mount and a /proc link.
    for path in [
        ns.path().to_str().unwrap().to_owned(),
        "/proc/self/ns/net".to_owned(),
    ] {
        let (code, v) = http_json(
            &addr,
            "POST",
            "/v1/enable",
            json!({"conn": "10.1.1.1:5060", "idle": 9, "count": 3, "interval": 4, "netns": path}),
        );
        assert_eq!(code, 404, "{path}: {v}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn connections_and_requests_are_bounded() {
    let e = Env::outside();
    let addr = format!("127.0.0.1:{}", free_port());
    let _s = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
    // A client that never sends its request head is dropped.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = idle.read(&mut buf).unwrap_or(0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "idle connection closed after {waited:?} ({n} bytes)"
    );
    // A request head over the limit is refused, and its connection closed.
    let mut c = TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let pad = "a".repeat(tcpka::server::HEAD_LIMIT);
    let _ = c.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Pad: {pad}\r\n\r\n").as_bytes(),
    );
    let mut out = Vec::new();
    let started = Instant::now();
    let _ = c.read_to_end(&mut out);
    // 431, or a reset that overtook it (the rest of the head unread).
    let code = parse_response(&out).map(|r| r.0).ok();
    assert!(code.is_none() || code == Some(431), "{code:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // (The caps per caller: hostile.rs.)
    // Oversized bodies are refused.
    let big = vec![b' '; tcpka::server::BODY_LIMIT + 1];
    let (code, _) = http(&addr, "POST", "/v1/rules", Some(&big), None).unwrap();
    assert_eq!(code, 400);
}

#[test]
fn connections_come_in_pages() {
    let e = Env::outside();
    let addr = format!("127.0.0.1:{}", free_port());
    let _s = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
    let l = listen("127.0.0.1:0");
    let pairs: Vec<_> = (0..5).map(|_| connect(&l)).collect();
    e.tcpka
        .run(&[
            "enable",
            &l.local_addr().unwrap().to_string(),
            "30",
            "3",
            "5",
        ])
        .ok();
    let mut seen = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let q = match after {
            Some(a) => format!("/v1/connections?limit=2&after={a}"),
            None => "/v1/connections?limit=2".to_owned(),
        };
        let r = request(&addr, "GET", &q, None).send().unwrap();
        let code = r.status().as_u16();
        let next = r
            .headers()
            .get("x-tcpka-next-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = r.text().unwrap();
        assert_eq!(code, 200, "{body}");
        let page: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|c| c["cookie"].as_u64().unwrap()));
        match next {
            Some(n) => after = Some(n.trim().parse().unwrap()),
            None => break,
        }
    }
    let mut want: Vec<u64> = pairs.iter().map(|(c, _)| cookie(c)).collect();
    want.sort_unstable();
    assert_eq!(seen, want);
    let (code, _) = http(&addr, "GET", "/v1/connections?limit=0", None, None).unwrap();
    assert_eq!(code, 400);
    // A query string that does not parse: the API's JSON error too.
    let (code, body) = http(&addr, "GET", "/v1/connections?limit=many", None, None).unwrap();
    assert_eq!(code, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["result"], -1, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("bad query string"),
        "{v}"
    );
}

fn tempdir(prefix: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir(&d).unwrap();
    d
}
