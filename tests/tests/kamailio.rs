//! Real Kamailio 5.6 and sipp in network namespaces, driving tcpka with the
//! shipped `examples/kamailio/kamailio.cfg`:
//!
//! ```text
//!  caller ns (sipp uac)  10.201.1.2 ── 10.201.1.1  kamailio ns  10.201.2.1 ── 10.201.2.2  callee ns (sipp uas)
//!                                      (kamailio, tcpka serve)
//! ```
//!
//! Each call: keepalive on both legs from the 200 OK to the INVITE, off
//! after the 200 OK to the BYE; when the callee's host stops answering, the
//! timeout event reaches Kamailio's xhttp route.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tcpka_tests::*;

const CALLER: &str = "10.201.1.2";
const CALLEE: &str = "10.201.2.2";
const CALLEE_PORT: u16 = 5062;
const KAMAILIO_CALLER_SIDE: &str = "10.201.1.1";
const KA: (u32, u32, u32) = (1, 2, 1); // idle, count, interval

/// Kills a child and its process group (Kamailio forks workers) on drop.
struct Proc(Child);

impl Proc {
    fn spawn(cmd: &mut Command) -> Self {
        use std::os::unix::process::CommandExt as _;
        Self(
            cmd.process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("{cmd:?}: {e}")),
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Fields drop in order: Kamailio and sipp first, then tcpka, then the
/// namespaces and the cgroup.
struct Sip {
    kamailio: Proc,
    uas: Proc,
    serve: Serve,
    caller: NamedNetns,
    callee: NamedNetns,
    dir: PathBuf,
    log: PathBuf,
    e: Env,
}

fn link(ns: &NamedNetns, ours: &str, theirs: &str, our_ip: &str, their_ip: &str) {
    sh(&[
        "ip", "link", "add", ours, "type", "veth", "peer", "name", theirs, "netns", &ns.name,
    ]);
    sh(&["ip", "addr", "add", &format!("{our_ip}/24"), "dev", ours]);
    sh(&["ip", "link", "set", ours, "up"]);
    sh(&[
        "ip",
        "-n",
        &ns.name,
        "addr",
        "add",
        &format!("{their_ip}/24"),
        "dev",
        theirs,
    ]);
    sh(&["ip", "-n", &ns.name, "link", "set", theirs, "up"]);
    sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
}

/// The shipped config with this test's binary, addresses and short
/// keepalive values.
fn config(dir: &Path, api: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join("examples/kamailio/kamailio.cfg")).unwrap();
    let subst = |text: String, name: &str, value: &str| -> String {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("#!substdef \"!{name}!")))
            .unwrap_or_else(|| panic!("{name} in the example config"))
            .to_owned();
        text.replace(&line, &format!("#!substdef \"!{name}!{value}!g\""))
    };
    let mut text = subst(text, "TCPKA_BIN", tcpka_bin().to_str().unwrap());
    text = subst(text, "TCPKA_API", &format!("http://{api}"));
    text = subst(
        text,
        "CALLEE",
        &format!("sip:{CALLEE}:{CALLEE_PORT};transport=tcp"),
    );
    text = subst(text, "KA_IDLE", &KA.0.to_string());
    text = subst(text, "KA_COUNT", &KA.1.to_string());
    text = subst(text, "KA_INTERVAL", &KA.2.to_string());
    let path = dir.join("kamailio.cfg");
    std::fs::write(&path, text).unwrap();
    path
}

impl Sip {
    fn start(http: bool) -> Option<Self> {
        for t in ["kamailio", "sipp"] {
            if !tool(t) {
                // `cargo xtask test` installs both; a bare `cargo test` may not.
                panic!("{t} is not installed (cargo xtask setup installs kamailio and sip-tester)");
            }
        }
        let e = Env::outside();
        let caller = NamedNetns::new();
        let callee = NamedNetns::new();
        link(&caller, "ka0", "ka1", KAMAILIO_CALLER_SIDE, CALLER);
        link(&callee, "kb0", "kb1", "10.201.2.1", CALLEE);
        let dir = std::env::temp_dir().join(unique("tcpka-kamailio"));
        std::fs::create_dir_all(&dir).unwrap();
        let api = format!("127.0.0.1:{}", free_port());
        let serve = Serve::start(
            &e.tcpka,
            &e.cgroup.path,
            &api,
            &["--webhook", "http://127.0.0.1:8088/tcpka"],
        );
        let cfg = config(&dir, &api);
        let log = dir.join("kamailio.log");
        let mut k = Command::new("kamailio");
        k.args([
            "-DD",
            "-E",
            "-f",
            cfg.to_str().unwrap(),
            "-w",
            dir.to_str().unwrap(),
        ])
        .env("TCPKA_PIN_DIR", &e.tcpka.pin_dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        if http {
            k.args(["-A", "WITH_TCPKA_HTTP"]);
        }
        let kamailio = Proc::spawn(&mut k);
        let uas = Proc::spawn(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &callee.name,
                    "sipp",
                    "-sn",
                    "uas",
                    "-t",
                    "t1",
                ])
                .args(["-i", CALLEE, "-p", &CALLEE_PORT.to_string(), "-nostdin"])
                .args(["-trace_msg", "-message_file"])
                .arg(dir.join("uas_messages.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        // Kamailio and the UAS listening.
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect((KAMAILIO_CALLER_SIDE, 5060)).is_err() {
            assert!(
                Instant::now() < deadline,
                "kamailio did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        Some(Self {
            e,
            caller,
            callee,
            dir,
            serve,
            kamailio,
            log,
            uas,
        })
    }

    /// One call of `pause_ms` from the caller; returns the running sipp.
    fn call(&self, pause_ms: u32) -> Proc {
        Proc::spawn(
            Command::new("ip")
                .args(["netns", "exec", &self.caller.name, "sipp"])
                .arg(format!("{KAMAILIO_CALLER_SIDE}:5060"))
                .arg("-sf")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("sipp/uac_rr.xml"))
                .args(["-t", "t1", "-i", CALLER, "-m", "1", "-l", "1"])
                .args([
                    "-d",
                    &pause_ms.to_string(),
                    "-s",
                    "callee",
                    "-nostdin",
                    "-timeout",
                    "60s",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    }

    /// Kamailio's connections as the kernel reports them (`tcpka status`).
    fn connections(&self) -> Vec<serde_json::Value> {
        let r = self.e.tcpka.run(&["status", "--json"]).ok();
        serde_json::from_str::<serde_json::Value>(&r.stdout)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// One connection by peer, managed or not (None when there is none).
    fn connection(&self, peer: &str) -> Option<serde_json::Value> {
        let r = self.e.tcpka.run(&["status", peer, "--json"]);
        (r.code == 0)
            .then(|| serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()[0].clone())
    }

    /// ACKs the callee has received so far.
    fn acks_at_callee(&self) -> usize {
        std::fs::read_to_string(self.dir.join("uas_messages.log"))
            .unwrap_or_default()
            .matches("ACK sip:")
            .count()
    }

    fn kamailio_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `f` holds, failing with Kamailio's log.
    fn wait(&self, what: &str, within: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !f() {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}\nkamailio log:\n{}",
                self.kamailio_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sip {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ka_on(c: &serde_json::Value) -> bool {
    c["keepalive"]["enabled"] == true
        && c["keepalive"]["idle"].as_u64() == Some(KA.0.into())
        && c["keepalive"]["count"].as_u64() == Some(KA.1.into())
        && c["keepalive"]["interval"].as_u64() == Some(KA.2.into())
}

/// Kernel timers, independent of tcpka: `ss -tno` shows a keepalive timer.
fn ss_keepalive(peer: &str) -> bool {
    let out = Command::new("ss")
        .args(["-tnoH", "dst", peer])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("timer:(keepalive")
}

fn call_turns_keepalive_on_and_off(sip: &Sip) {
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    let mut uac = sip.call(2500);
    // During the call: both legs have the configured keepalive.
    sip.wait(
        "keepalive on both legs during the call",
        Duration::from_secs(10),
        || {
            let conns = sip.connections();
            let caller_leg = conns.iter().any(|c| {
                c["remote"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(&format!("{CALLER}:"))
                    && ka_on(c)
            });
            let callee_leg = conns
                .iter()
                .any(|c| c["remote"] == callee.as_str() && ka_on(c));
            caller_leg && callee_leg
        },
    );
    // While data is unacknowledged the kernel runs the retransmit timer
    // instead; the keepalive timer shows once the leg is idle.
    sip.wait(
        "ss shows the keepalive timer on the callee leg",
        Duration::from_secs(2),
        || ss_keepalive(&callee),
    );
    let status = uac.0.wait().unwrap();
    assert!(
        status.success(),
        "sipp uac: {status}\nkamailio log:\n{}",
        sip.kamailio_log()
    );
    // After the BYE: keepalive off on the callee's connection (Kamailio keeps
    // it open for the next call) and on the caller's, if still open.
    sip.wait(
        "keepalive off after the BYE",
        Duration::from_secs(5),
        || {
            sip.connection(&callee)
                .is_some_and(|c| c["keepalive"]["enabled"] == false)
                && sip.connections().iter().all(|c| {
                    !c["remote"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with(&format!("{CALLER}:"))
                })
        },
    );
    assert!(!ss_keepalive(&callee));
}

#[test]
fn kamailio_via_http_api_and_dead_callee_timeout_event() {
    let Some(sip) = Sip::start(true) else { return };
    call_turns_keepalive_on_and_off(&sip);
    assert!(
        sip.kamailio_log().contains("tcpka enable"),
        "{}",
        sip.kamailio_log()
    );
    assert!(
        sip.kamailio_log().contains("HTTP 200"),
        "{}",
        sip.kamailio_log()
    );
    let (_, metrics) = http(&sip.serve.addr, "GET", "/metrics", None, None).unwrap();
    let lookups: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tcpka_lookups_total"))
        .collect();
    eprintln!("how Kamailio's connections were found: {lookups:?}");
    // Kamailio's tcp_main keeps the descriptors it accepts and connects, so
    // the connection index reaches every one directly.
    assert!(
        lookups.contains(&"tcpka_lookups_total{path=\"walk\"} 0"),
        "{lookups:?}"
    );

    // A long call; then the callee's host stops answering.
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    let _uac = sip.call(60_000);
    sip.wait(
        "keepalive on the callee leg",
        Duration::from_secs(10),
        || sip.connection(&callee).is_some_and(|c| ka_on(&c)),
    );
    // Cut only once the leg is idle, the second call's ACK delivered: with
    // data in flight the kernel retransmits instead of probing, and only
    // TCP_USER_TIMEOUT bounds that (a policy can set it: user_timeout_ms).
    sip.wait(
        "the callee got the second ACK",
        Duration::from_secs(5),
        || sip.acks_at_callee() >= 2,
    );
    sip.wait("the callee leg idle", Duration::from_secs(5), || {
        ss_keepalive(&callee)
    });
    sh(&["ip", "-n", &sip.callee.name, "link", "set", "kb1", "down"]);
    let start = Instant::now();
    let bound = Duration::from_secs(u64::from(KA.0 + KA.1 * KA.2) + 2);
    sip.wait("the timeout event at Kamailio's xhttp route", bound, || {
        sip.kamailio_log().lines().any(|l| {
            l.contains("tcpka event:") && l.contains("\"kind\":\"timeout\"") && l.contains(&callee)
        })
    });
    let took = start.elapsed();
    let line = sip
        .kamailio_log()
        .lines()
        .find(|l| l.contains("tcpka event:") && l.contains("timeout"))
        .unwrap()
        .to_owned();
    eprintln!("timeout event at Kamailio after {took:?} (bound {bound:?}):\n{line}");
    let _ = sip.uas.0.id();
}

#[test]
fn kamailio_via_exec_cli() {
    let Some(sip) = Sip::start(false) else { return };
    call_turns_keepalive_on_and_off(&sip);
    assert!(
        sip.kamailio_log().contains("(exec)"),
        "{}",
        sip.kamailio_log()
    );
    let _ = sip.kamailio.0.id();
}
