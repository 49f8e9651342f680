//! Guards and helpers for tcpka's real-kernel tests. Every test makes its
//! own network namespace, child cgroup and pin directory; each guard undoes
//! itself on drop, so the host's own connections are never touched.
//!
//! Tests panic on failure rather than return errors.
use std::{
    fs::File,
    io::BufRead as _,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc::Receiver,
    },
    time::{Duration, Instant},
};

use nix::{
    sched::{setns, unshare, CloneFlags},
    sys::socket::{
        getsockopt, setsockopt,
        sockopt::{KeepAlive, Linger, TcpKeepCount, TcpKeepIdle, TcpKeepInterval, TcpUserTimeout},
    },
};
use serde_json::Value;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fails loudly when not root: these tests need a real kernel and root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the kernel tests must run as root (kernel {})",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
}

/// The current thread in a fresh network namespace with `lo` up; restores
/// the previous namespace on drop. Processes spawned from this thread
/// inherit the namespace.
pub struct NetNs {
    previous: File,
}

impl NetNs {
    pub fn new() -> Self {
        require_root();
        let previous = File::open("/proc/thread-self/ns/net").expect("open current netns");
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        set_link_up("lo");
        Self { previous }
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        setns(self.previous.as_fd(), CloneFlags::CLONE_NEWNET).expect("restore netns");
    }
}

/// Brings an interface of the current namespace up (SIOCSIFFLAGS).
pub fn set_link_up(name: &str) {
    // SAFETY: plain socket/ioctl calls on an ifreq we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket for ioctl");
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.bytes().enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        assert_eq!(
            libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr),
            0,
            "SIOCGIFFLAGS {name}"
        );
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut ifr),
            0,
            "SIOCSIFFLAGS {name}"
        );
        libc::close(fd);
    }
}

/// Runs `f` with the current thread in the namespace behind `ns_path`
/// (e.g. `/run/netns/NAME`); sockets made in `f` stay in that namespace.
pub fn in_netns<T>(ns_path: &Path, f: impl FnOnce() -> T) -> T {
    let previous = File::open("/proc/thread-self/ns/net").expect("open current netns");
    let target = File::open(ns_path).expect("open target netns");
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns target");
    let out = f();
    setns(previous.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns back");
    out
}

/// The cgroup v2 mount point.
pub fn cgroup2_root() -> PathBuf {
    tcpka::cgroup::cgroup2_mount().expect("a cgroup v2 mount")
}

/// A child cgroup of the cgroup v2 root. [`CgroupDir::enter`] moves this
/// whole process into it; drop moves it back and removes the directory.
pub struct CgroupDir {
    pub path: PathBuf,
    home: PathBuf,
}

impl CgroupDir {
    pub fn new() -> Self {
        require_root();
        let root = cgroup2_root();
        let path = root.join(unique("tcpka-test"));
        std::fs::create_dir(&path).expect("create test cgroup");
        Self {
            path,
            home: current_cgroup(&root),
        }
    }

    /// Moves the whole test process into this cgroup: sockets created from
    /// now on belong to it.
    pub fn enter(&self) {
        std::fs::write(
            self.path.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .expect("move into test cgroup");
    }

    /// Moves the process back to where it started.
    pub fn leave(&self) {
        std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .expect("move back to original cgroup");
    }
}

impl Default for CgroupDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        self.leave();
        // A cgroup whose last socket is still being freed can briefly refuse.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

fn current_cgroup(root: &Path) -> PathBuf {
    let s = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let rel = s
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line in /proc/self/cgroup");
    root.join(rel.trim_start_matches('/'))
}

/// The `tcpka` binary, run with its own pin directory. Drop unloads.
pub struct Tcpka {
    pub pin_dir: PathBuf,
}

/// What one `tcpka` run did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(o: Output) -> Self {
        Self {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Panics unless the run exited 0.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "tcpka failed: {self:?}");
        self
    }
}

/// Path of the `tcpka` binary: `$TCPKA_BIN`, or next to the test binary's
/// directory (`target/debug/tcpka`).
pub fn tcpka_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TCPKA_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("tcpka");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo xtask test does)",
        bin.display()
    );
    bin
}

impl Tcpka {
    pub fn new() -> Self {
        require_root();
        Self {
            pin_dir: Path::new("/sys/fs/bpf").join(unique("tcpka-test")),
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(tcpka_bin());
        c.env("TCPKA_PIN_DIR", &self.pin_dir);
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.cmd().args(args).output().expect("run tcpka"))
    }

    /// `tcpka load --cgroup DIR`, asserting success.
    pub fn load(&self, cgroup: &Path) -> Run {
        self.load_with(cgroup, &[])
    }

    /// `tcpka load --cgroup DIR EXTRA...`, asserting success.
    pub fn load_with(&self, cgroup: &Path, extra: &[&str]) -> Run {
        let mut args = vec!["load", "--cgroup", cgroup.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.run(&args).ok()
    }

    /// `tcpka rule add ARGS...`, returning the new id.
    pub fn rule_add(&self, args: &[&str]) -> u32 {
        let mut a = vec!["rule", "add"];
        a.extend_from_slice(args);
        let r = self.run(&a).ok();
        r.stdout.trim().parse().expect("rule id on stdout")
    }

    pub fn layout(&self) -> tcpka::paths::PinLayout {
        tcpka::paths::PinLayout::new(&self.pin_dir)
    }

    /// Entries in the per-connection map.
    pub fn managed_count(&self) -> usize {
        tcpka::enforcer::Enforcer::new(self.layout())
            .managed()
            .expect("read the connection map")
            .len()
    }
}

impl Default for Tcpka {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Tcpka {
    fn drop(&mut self) {
        let layout = self.layout();
        let _ = tcpka::loader::unload(&layout);
        // The lock file tcpka made for this test's pin directory.
        let _ = std::fs::remove_file(layout.lock_file());
        let _ = std::fs::remove_file(layout.serve_lock_file());
        let _ = std::fs::remove_file(layout.journal_file());
    }
}

/// Keepalive settings of a socket as the kernel reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub enabled: bool,
    pub idle: i32,
    pub interval: i32,
    pub count: i32,
    pub user_timeout_ms: i32,
}

/// Reads SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT and
/// TCP_USER_TIMEOUT with getsockopt.
pub fn keepalive(fd: &impl AsFd) -> Keepalive {
    fn get<O: nix::sys::socket::GetSockOpt>(fd: &impl AsFd, opt: O, name: &str) -> O::Val {
        getsockopt(fd, opt).unwrap_or_else(|e| panic!("getsockopt({name}): {e}"))
    }
    Keepalive {
        enabled: get(fd, KeepAlive, "SO_KEEPALIVE"),
        idle: get(fd, TcpKeepIdle, "TCP_KEEPIDLE") as i32,
        interval: get(fd, TcpKeepInterval, "TCP_KEEPINTVL") as i32,
        count: get(fd, TcpKeepCount, "TCP_KEEPCNT") as i32,
        user_timeout_ms: get(fd, TcpUserTimeout, "TCP_USER_TIMEOUT") as i32,
    }
}

/// What a fresh namespace's sockets get by default (net.ipv4.tcp_keepalive_*).
pub const KERNEL_DEFAULT: Keepalive = Keepalive {
    enabled: false,
    idle: 7200,
    interval: 75,
    count: 9,
    user_timeout_ms: 0,
};

/// The keepalive a test expects from a policy.
pub fn expect(idle: i32, count: i32, interval: i32, user_timeout_ms: i32) -> Keepalive {
    Keepalive {
        enabled: true,
        idle,
        interval,
        count,
        user_timeout_ms,
    }
}

/// The socket cookie (SO_COOKIE), read as tcpka reads it.
pub fn cookie(fd: &impl AsFd) -> u64 {
    getsockopt(fd, tcpka::sockopt::Cookie).expect("getsockopt(SO_COOKIE)")
}

/// SO_LINGER 0: closing the socket then resets its connection (RST)
/// instead of ending it in order.
pub fn reset_on_close(fd: &impl AsFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(fd, Linger, &linger).expect("setsockopt(SO_LINGER)");
}

/// Polls `done` every 50 ms; panics naming `what` unless it holds within
/// `within`.
pub fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connected pair over the given listener: (client, accepted server side).
pub fn connect(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let addr = listener.local_addr().unwrap();
    let client = TcpStream::connect(addr).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

/// A listener on `addr` (port 0 picks one).
pub fn listen(addr: &str) -> TcpListener {
    TcpListener::bind(addr.parse::<SocketAddr>().expect("listen address")).expect("bind")
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Programs attached to a cgroup directly, as bpftool reports them.
pub fn attached_programs(cgroup: &Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show", cgroup.to_str().unwrap(), "--json"])
        .output()
        .expect("run bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.get("name").and_then(|n| n.as_str()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A test environment: a fresh network namespace, a fresh cgroup with
/// tcpka loaded on it, and a private pin directory. Fields drop in order:
/// unload, then the cgroup, then the namespace.
pub struct Env {
    pub tcpka: Tcpka,
    pub cgroup: CgroupDir,
    _netns: NetNs,
}

impl Env {
    /// Loaded, with the test process inside the cgroup: new connections
    /// go through sock_ops.
    pub fn entered() -> Self {
        let e = Self::outside();
        e.cgroup.enter();
        e
    }

    /// Loaded, with the test process outside the cgroup: sock_ops never
    /// sees the test's connections, so whatever changes them is the
    /// iterator pass.
    pub fn outside() -> Self {
        Self::outside_with(&[])
    }

    /// [`Env::entered`], loaded with extra `load` arguments.
    pub fn entered_with(extra: &[&str]) -> Self {
        let e = Self::outside_with(extra);
        e.cgroup.enter();
        e
    }

    /// [`Env::outside`], loaded with extra `load` arguments.
    pub fn outside_with(extra: &[&str]) -> Self {
        let netns = NetNs::new();
        let cgroup = CgroupDir::new();
        let tcpka = Tcpka::new();
        tcpka.load_with(&cgroup.path, extra);
        Self {
            tcpka,
            cgroup,
            _netns: netns,
        }
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    pub fn new() -> Self {
        let name = unique("tcpka-test-ns");
        sh(&["ip", "netns", "add", &name]);
        Self { name }
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Default for NamedNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A running `tcpka serve` on its own address; stopped (SIGINT) on drop.
pub struct Serve {
    pub child: std::process::Child,
    pub addr: String,
}

impl Serve {
    /// Starts `tcpka serve --listen ADDR EXTRA...` and waits for /healthz.
    pub fn start(t: &Tcpka, cgroup: &Path, addr: &str, extra: &[&str]) -> Self {
        let own_token = extra
            .iter()
            .any(|a| *a == "--token" || *a == "--token-file");
        let mut cmd = t.cmd();
        if !own_token {
            cmd.env("TCPKA_TOKEN", TEST_TOKEN);
        }
        let child = cmd
            .args([
                "serve",
                "--cgroup",
                cgroup.to_str().unwrap(),
                "--listen",
                addr,
            ])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tcpka serve");
        let s = Self {
            child,
            addr: addr.to_owned(),
        };
        let token = extra
            .windows(2)
            .find(|w| w[0] == "--token")
            .map(|w| w[1].to_owned())
            .or_else(|| (!own_token).then(|| TEST_TOKEN.to_owned()));
        wait_for_healthz(&s.addr, token.as_deref(), |code| code == 200);
        s
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

/// The API token [`Serve::start`] gives a daemon unless the test passes
/// its own; [`http`] sends it when given no other.
pub const TEST_TOKEN: &str = "tcpka-test-token-0123456789abcdef";

/// How long a request of the harness may take (connect, send, each read).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The harness's HTTP client, to finish with `build()`: [`HTTP_TIMEOUT`],
/// and no proxy whatever the environment says. Build it on the thread
/// whose network namespace it should connect in: its runtime thread
/// inherits that thread's.
pub fn http_client() -> reqwest::blocking::ClientBuilder {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .connect_timeout(HTTP_TIMEOUT)
        .timeout(HTTP_TIMEOUT)
}

/// A request to `http://ADDR/PATH` with `Authorization: Bearer TOKEN`:
/// `token` None sends [`TEST_TOKEN`], `Some("")` no Authorization at all.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> reqwest::blocking::RequestBuilder {
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .unwrap_or_else(|e| panic!("HTTP method {method:?}: {e}"));
    let client = http_client().build().expect("an HTTP client");
    let r = client.request(method, format!("http://{addr}{path}"));
    match token.unwrap_or(TEST_TOKEN) {
        "" => r,
        t => r.bearer_auth(t),
    }
}

/// Sends a request; returns status and body.
pub fn reply(r: reqwest::blocking::RequestBuilder) -> std::io::Result<(u16, String)> {
    let r = r.send().map_err(std::io::Error::other)?;
    let code = r.status().as_u16();
    Ok((code, r.text().map_err(std::io::Error::other)?))
}

/// One HTTP/1.1 request (a JSON content type, `body` or an empty one)
/// with `token` as [`request`] takes it; returns status and body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    reply(
        request(addr, method, path, token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.unwrap_or_default().to_vec()),
    )
}

/// Splits a raw HTTP/1.1 response into status and (de-chunked) body: for
/// the tests that speak HTTP over a raw socket on purpose.
pub fn parse_response(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// `http` with a JSON body, parsing the JSON reply.
pub fn http_json(addr: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    let (code, text) = http(addr, method, path, Some(body.to_string().as_bytes()), None)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Polls `GET /healthz` (with `token` as [`request`] takes it) every 50 ms
/// until it answers with a status `ready` accepts; panics after 10 s.
pub fn wait_for_healthz(addr: &str, token: Option<&str>, ready: impl Fn(u16) -> bool) {
    wait_until("tcpka serve up", Duration::from_secs(10), || {
        http(addr, "GET", "/healthz", None, token).is_ok_and(|(code, _)| ready(code))
    });
}

/// A free TCP port on 127.0.0.1 in the current namespace.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A peer host in its own network namespace behind a veth pair:
/// 10.199.0.1 (ours, `tka0`) <-> 10.199.0.2 (the peer, `tka1`).
/// [`VethPeer::cut`] takes the peer's link down: its packets stop.
pub struct VethPeer {
    pub ns: NamedNetns,
}

impl VethPeer {
    pub const ADDR: &'static str = "10.199.0.2";

    pub fn new() -> Self {
        let ns = NamedNetns::new();
        let name = ns.name.clone();
        sh(&[
            "ip", "link", "add", "tka0", "type", "veth", "peer", "name", "tka1", "netns", &name,
        ]);
        sh(&["ip", "addr", "add", "10.199.0.1/24", "dev", "tka0"]);
        sh(&["ip", "link", "set", "tka0", "up"]);
        sh(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            "10.199.0.2/24",
            "dev",
            "tka1",
        ]);
        sh(&["ip", "-n", &name, "link", "set", "tka1", "up"]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { ns }
    }

    /// A listener on the peer.
    pub fn listen(&self) -> TcpListener {
        in_netns(&self.ns.path(), || listen(&format!("{}:0", Self::ADDR)))
    }

    /// The peer stops answering.
    pub fn cut(&self) {
        sh(&["ip", "-n", &self.ns.name, "link", "set", "tka1", "down"]);
    }
}

impl Default for VethPeer {
    fn default() -> Self {
        Self::new()
    }
}

/// A tiny HTTP server that answers 200 to every request and hands over the
/// JSON bodies: the webhook's receiving end.
pub fn webhook_receiver() -> (String, Receiver<Value>) {
    let l = listen("127.0.0.1:0");
    let addr = l.local_addr().unwrap().to_string();
    (addr, webhook_receiver_on(l))
}

/// [`webhook_receiver`] on a listener of the test's: axum on a tokio
/// runtime of its own thread, answering 200 to every request on any path
/// and sending each body that is JSON.
pub fn webhook_receiver_on(l: TcpListener) -> Receiver<Value> {
    let (tx, rx) = std::sync::mpsc::channel();
    l.set_nonblocking(true).expect("non-blocking listener");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).expect("a tokio listener");
            let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    let _ = tx.send(v);
                }
                std::future::ready(axum::http::StatusCode::OK)
            });
            let _ = axum::serve(l, app).await;
        });
    });
    rx
}

/// Subscribes to `GET /v1/events` of a running `tcpka serve`: one JSON
/// value per event, from a reader thread.
pub fn event_stream(addr: &str) -> Receiver<Value> {
    // No timeout: events may be far apart.
    let client = http_client().timeout(None).build().expect("an HTTP client");
    let r = client
        .get(format!("http://{addr}/v1/events"))
        .bearer_auth(TEST_TOKEN)
        .send()
        .unwrap_or_else(|e| panic!("GET /v1/events: {e}"));
    // Subscribed once the response header arrives.
    assert_eq!(r.status(), reqwest::StatusCode::OK, "GET /v1/events");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v.is_object() {
                    let _ = tx.send(v);
                }
            }
        }
    });
    rx
}

/// Waits for an event of `kind` for `cookie`, skipping others.
pub fn wait_for_event(rx: &Receiver<Value>, kind: &str, cookie: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {kind} event for cookie {cookie} within {within:?}"));
        if v["kind"] == kind && v["cookie"].as_u64() == Some(cookie) {
            return v;
        }
    }
}

/// `tcpka --log-format json serve --listen ADDR ARGS...` with its log
/// (stderr) kept, once /healthz answers.
pub struct LoggedServe {
    child: std::process::Child,
}

impl LoggedServe {
    pub fn start(t: &Tcpka, addr: &str, args: &[&str]) -> Self {
        let child = t
            .cmd()
            .env("TCPKA_TOKEN", TEST_TOKEN)
            .args(["--log-format", "json", "serve", "--listen", addr])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start tcpka serve");
        let s = Self { child };
        wait_for_healthz(addr, Some(TEST_TOKEN), |_| true);
        s
    }

    /// Stops the daemon (SIGINT) and returns its log, one JSON object per
    /// line.
    pub fn stop(mut self) -> Vec<Value> {
        use std::io::Read as _;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let mut log = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut log);
        }
        let status = self.child.wait().expect("wait for tcpka serve");
        assert!(status.success(), "serve exited with {status}: {log}");
        log.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l:?}")))
            .collect()
    }
}

impl Drop for LoggedServe {
    fn drop(&mut self) {
        // SAFETY: signalling our own child (a no-op once it was reaped).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}
