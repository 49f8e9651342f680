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
//! timeout event reaches Kamailio's xhttp route. Call-IDs made to break out
//! of a shell word or a JSON string run nothing and add no field: the
//! config hands tcpka only their MD5, and those calls get keepalive too.
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
const KA_USER_TIMEOUT_MS: u64 = 4000;
const EVENTS_TOKEN: &str = "tcpka-events-token-fedcba9876543210";

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

/// A directory removed with what is in it on drop.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fields drop in order: Kamailio and sipp first, then tcpka, then the
/// namespaces, the test's directory and the cgroup.
struct Sip {
    kamailio: Proc,
    uas: Proc,
    /// None once stopped ([`Sip::stop_tcpka`]).
    serve: Option<Serve>,
    caller: NamedNetns,
    callee: NamedNetns,
    dir: TempDir,
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
        "TCPKA_HTTPCON",
        &format!("http://tcpka:{TEST_TOKEN}@{api}"),
    );
    text = subst(text, "TCPKA_TOKEN", TEST_TOKEN);
    // Each command's line, with the Call-ID next to its holder.
    text = subst(text, "KA_LOG", "L_INFO");
    text = subst(
        text,
        "CALLEE",
        &format!("sip:{CALLEE}:{CALLEE_PORT};transport=tcp"),
    );
    text = subst(text, "KA_IDLE", &KA.0.to_string());
    text = subst(text, "KA_COUNT", &KA.1.to_string());
    text = subst(text, "KA_INTERVAL", &KA.2.to_string());
    text = subst(text, "KA_USER_TIMEOUT", &KA_USER_TIMEOUT_MS.to_string());
    text = subst(text, "EVENTS_TOKEN", EVENTS_TOKEN);
    text = subst(
        text,
        "CTL_SOCKET",
        &format!("unix:{}", dir.join("ctl").display()),
    );
    let path = dir.join("kamailio.cfg");
    std::fs::write(&path, text).unwrap();
    path
}

/// The callee: sipp's built-in UAS on CALLEE:CALLEE_PORT, logging what it
/// gets in `uas_messages.log`.
fn uas(callee: &NamedNetns, dir: &Path) -> Proc {
    Proc::spawn(
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
    )
}

/// How Kamailio calls tcpka (the example config's variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// `exec_cmd()` of the CLI; events by webhook to xhttp.
    Exec,
    /// `http_client_query()` of the API; events by webhook to xhttp.
    Http,
    /// `http_connect()` of the API on a kept-alive connection, the token as
    /// a Basic password; events by webhook to xhttp.
    HttpPooled,
    /// `evapi_relay()`; events back over evapi.
    Evapi,
}

const EVAPI: &str = "127.0.0.1:8448";

impl Sip {
    fn start(via: Via) -> Self {
        for t in ["kamailio", "sipp"] {
            if !tool(t) {
                // `cargo xtask test` installs both; a bare `cargo test` may not.
                panic!("{t} is not installed (cargo xtask setup installs kamailio and sip-tester)");
            }
        }
        // The SIP ports of this setup (Kamailio's and the callee's) are the
        // index ports, as a deployment sets them.
        let e = Env::outside_with(&["--index-ports", &format!("5060,{CALLEE_PORT}")]);
        let caller = NamedNetns::new();
        let callee = NamedNetns::new();
        link(&caller, "ka0", "ka1", KAMAILIO_CALLER_SIDE, CALLER);
        link(&callee, "kb0", "kb1", "10.201.2.1", CALLEE);
        let dir = TempDir(std::env::temp_dir().join(unique("tcpka-kamailio")));
        std::fs::create_dir_all(&*dir).unwrap();
        let api = format!("127.0.0.1:{}", free_port());
        let token_file = dir.join("events-token");
        {
            use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&token_file)
                .unwrap();
            writeln!(f, "{EVENTS_TOKEN}").unwrap();
        }
        let serve = Serve::start(
            &e.tcpka,
            &e.cgroup.path,
            &api,
            &match via {
                Via::Evapi => ["--evapi", EVAPI],
                Via::Exec | Via::Http | Via::HttpPooled => {
                    ["--webhook", "http://127.0.0.1:8088/tcpka"]
                }
            }
            .into_iter()
            .chain(["--events-token-file", token_file.to_str().unwrap()])
            .collect::<Vec<_>>(),
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
        match via {
            Via::Exec => {}
            Via::Http => {
                k.args(["-A", "WITH_TCPKA_HTTP"]);
            }
            Via::HttpPooled => {
                k.args(["-A", "WITH_TCPKA_HTTP_POOLED"]);
            }
            Via::Evapi => {
                k.args(["-A", "WITH_TCPKA_EVAPI"]);
            }
        }
        // Kamailio runs in the cgroup tcpka is attached to, as its service
        // would; sipp and the test stay outside.
        e.cgroup.enter();
        let kamailio = Proc::spawn(&mut k);
        e.cgroup.leave();
        let uas = uas(&callee, &dir);
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
        let sip = Self {
            e,
            caller,
            callee,
            dir,
            serve: Some(serve),
            kamailio,
            log,
            uas,
        };
        if via == Via::Evapi {
            // tcpka connects (with backoff) once Kamailio listens.
            sip.wait("tcpka connected to evapi", Duration::from_secs(10), || {
                sip.kamailio_log().contains("evapi: client")
            });
        }
        sip
    }

    fn serve(&self) -> &Serve {
        self.serve.as_ref().expect("tcpka serve running")
    }

    /// The callee's host back after an outage: a new UAS process (the old
    /// one's connections died with the outage).
    fn restart_callee(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-(self.uas.0.id() as i32), libc::SIGKILL) };
        let _ = self.uas.0.wait();
        self.uas = uas(&self.callee, &self.dir);
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Stops `tcpka serve`: Kamailio's calls to it fail and no event comes.
    fn stop_tcpka(&mut self) {
        drop(self.serve.take());
    }

    /// `calls` calls at once from the caller that never hang up: each one
    /// succeeds when Kamailio's BYE arrives (`uac_until_bye.xml`).
    fn calls_until_bye(&self, calls: usize) -> Proc {
        let n = calls.to_string();
        Proc::spawn(
            Command::new("ip")
                .args(["netns", "exec", &self.caller.name, "sipp"])
                .arg(format!("{KAMAILIO_CALLER_SIDE}:5060"))
                .arg("-sf")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("sipp/uac_until_bye.xml"))
                .args(["-t", "t1", "-i", CALLER, "-m", &n, "-l", &n, "-r", &n])
                .args(["-s", "callee", "-nostdin", "-timeout", "120s"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    }

    /// Kamailio's count of active dialogs (kamcmd over the ctl socket).
    fn active_dialogs(&self) -> Option<u64> {
        let out = Command::new("kamcmd")
            .args(["-s", &format!("unix:{}", self.dir.join("ctl").display())])
            .args(["stats.get_statistics", "dialog:"])
            .output()
            .ok()?;
        // dialog:active_dialogs = 10, then the group's other counters
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.contains("active_dialogs"))?;
        line.split('=')
            .nth(1)?
            .trim()
            .trim_matches('"')
            .parse()
            .ok()
    }

    /// One call of `pause_ms` from the caller; returns the running sipp.
    fn call(&self, pause_ms: u32) -> Proc {
        self.call_with(pause_ms, &[])
    }

    /// One call, with more sipp arguments.
    fn call_with(&self, pause_ms: u32, extra: &[String]) -> Proc {
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
                .args(extra)
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

/// A file that hostile Call-IDs try to create; removed on drop.
struct Canary(PathBuf);

impl Canary {
    fn new() -> Self {
        let path = Path::new("/tmp").join(format!("{}-canary", unique("tcpka")));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Call-IDs that break out of a '...' shell word (through a quote and a
/// backtick, `$(...)`, `;`) or out of a JSON string (`"`, `\`), one of
/// them over 200 bytes. `${IFS}` stands for a space, which a Call-ID has
/// none of.
fn hostile_call_ids(canary: &Path) -> Vec<String> {
    let touch = format!("touch${{IFS}}{}", canary.display());
    vec![
        format!("q1'`{touch}`'@x"),
        format!("q2'$({touch})'@x"),
        r#"j","user_timeout_ms":1,"netns":"/proc/self/ns/net"#.to_owned(),
        format!("s';{touch};'\\\"@x"),
        format!("long-{}'`{touch}`'\\q\"$({touch})\"@x", "x".repeat(220)),
    ]
}

/// Lower-case hex MD5, as Kamailio's `{s.md5}` gives it.
fn md5_hex(s: &str) -> String {
    use std::io::Write as _;
    let mut p = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    p.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..32].to_owned()
}

fn holders_of(c: &serde_json::Value) -> Vec<&str> {
    c["holders"]
        .as_array()
        .map(|a| a.iter().filter_map(|h| h.as_str()).collect())
        .unwrap_or_default()
}

/// Concurrent calls with hostile Call-IDs: nothing runs, no policy field
/// is added, and every call gets keepalive on both legs, held by the MD5
/// of its Call-ID, until its BYE.
fn hostile_call_ids_run_nothing_and_get_keepalive(sip: &Sip, via: &str) {
    let canary = Canary::new();
    let ids = hostile_call_ids(&canary.0);
    assert!(ids.iter().any(|id| id.len() > 200));
    let hashes: Vec<String> = ids.iter().map(|id| md5_hex(id)).collect();
    let calls: Vec<Proc> = ids
        .iter()
        .zip(5070..)
        .map(|(id, port)| {
            // sipp's -cid_str is a format (a literal % is %%). Concurrent
            // sipps each need their own local port: left to choose, they
            // race for the same one.
            let cid = id.replace('%', "%%");
            sip.call_with(
                4000,
                &["-cid_str".into(), cid, "-p".into(), port.to_string()],
            )
        })
        .collect();
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    let is_caller_leg = |c: &serde_json::Value| {
        c["remote"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{CALLER}:"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            !canary.0.exists(),
            "a Call-ID ran a command: {} exists\nkamailio log:\n{}",
            canary.0.display(),
            sip.kamailio_log()
        );
        let conns = sip.connections();
        for c in &conns {
            assert!(
                c["keepalive"]["user_timeout_ms"].as_u64() != Some(1),
                "a Call-ID set a user timeout: {c}\nkamailio log:\n{}",
                sip.kamailio_log()
            );
        }
        let caller_legs = hashes.iter().all(|h| {
            conns
                .iter()
                .any(|c| is_caller_leg(c) && ka_on(c) && holders_of(c) == [h.as_str()])
        });
        let callee_leg = conns.iter().any(|c| {
            c["remote"] == callee.as_str()
                && ka_on(c)
                && hashes.iter().all(|h| holders_of(c).contains(&h.as_str()))
        });
        if caller_legs && callee_leg {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keepalive on both legs of every call, held by the MD5 of its Call-ID \
             ({hashes:?} for {ids:?}): not within 10 s\nconnections: {conns:#?}\n\
             kamailio log:\n{}",
            sip.kamailio_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for mut uac in calls {
        let status = uac.0.wait().unwrap();
        assert!(
            status.success(),
            "sipp uac: {status}\nkamailio log:\n{}",
            sip.kamailio_log()
        );
    }
    // The BYEs' disables name the same holders: the shared callee leg lets
    // go once the last call ends.
    sip.wait(
        "keepalive off after the BYEs",
        Duration::from_secs(5),
        || {
            sip.connection(&callee)
                .is_some_and(|c| c["keepalive"]["enabled"] == false && holders_of(&c).is_empty())
                && sip.connections().iter().all(|c| !is_caller_leg(c))
        },
    );
    let log = sip.kamailio_log();
    for (id, h) in ids.iter().zip(&hashes) {
        // Operators find the Call-ID next to its holder in the log.
        assert!(
            log.contains(&format!("holder {h} for Call-ID {id}")),
            "{h} for {id} in the kamailio log:\n{log}"
        );
    }
    assert!(log.contains(via), "{log}");
    assert!(
        !canary.0.exists(),
        "a Call-ID ran a command: {} exists\nkamailio log:\n{log}",
        canary.0.display()
    );
}

/// A controller may also pass a Call-ID of any length as the holder (here
/// on Kamailio's connection to the callee): one over 64 bytes is kept
/// hashed, and the disable with the same Call-ID finds it.
fn long_call_id_is_one_holder(sip: &Sip, via: Via) {
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    let id = format!("{}@host.example", "a1-.!%*_+`'~()<>:\\\"/[]?{}".repeat(10));
    assert!(id.len() > 200);
    let (idle, count, interval) = KA;
    let run = |body: serde_json::Value, args: &[&str]| {
        if via == Via::Http {
            let path = if args[0] == "enable" {
                "/v1/enable"
            } else {
                "/v1/disable"
            };
            let (code, reply) = http_json(&sip.serve().addr, "POST", path, body);
            assert_eq!(code, 200, "{reply}");
        } else {
            sip.e.tcpka.run(args).ok();
        }
    };
    let (i, c, n) = (idle.to_string(), count.to_string(), interval.to_string());
    run(
        serde_json::json!({"conn": callee, "idle": idle, "count": count,
                           "interval": interval, "holder": id}),
        &["enable", &callee, &i, &c, &n, "--holder", &id],
    );
    let conn = sip.connection(&callee).expect("the callee leg");
    assert!(ka_on(&conn), "{conn}");
    let held = holders_of(&conn);
    assert!(
        held.len() == 1 && held[0].len() == 44 && held[0].starts_with('#'),
        "{conn}"
    );
    run(
        serde_json::json!({"conn": callee, "holder": id}),
        &["disable", &callee, "--holder", &id],
    );
    let conn = sip.connection(&callee).expect("the callee leg");
    assert!(
        conn["keepalive"]["enabled"] == false && holders_of(&conn).is_empty(),
        "{conn}"
    );
}

#[test]
fn kamailio_via_http_api_and_dead_callee_timeout_event() {
    let sip = Sip::start(Via::Http);
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
    let (_, metrics) = http(&sip.serve().addr, "GET", "/metrics", None, None).unwrap();
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
    let sip = Sip::start(Via::Exec);
    call_turns_keepalive_on_and_off(&sip);
    assert!(
        sip.kamailio_log().contains("(exec)"),
        "{}",
        sip.kamailio_log()
    );
    let _ = sip.kamailio.0.id();
}

/// The recommended variant: commands relayed over evapi, applied on the
/// sockets like the others; Call-IDs made to break out of JSON reach tcpka
/// only as their hash.
#[test]
fn kamailio_via_evapi() {
    let sip = Sip::start(Via::Evapi);
    call_turns_keepalive_on_and_off(&sip);
    assert!(
        sip.kamailio_log().contains("(evapi)"),
        "{}",
        sip.kamailio_log()
    );
    hostile_call_ids_run_nothing_and_get_keepalive(&sip, "(evapi)");
}

/// The API over one kept-alive connection: the same commands, and the
/// requests share a connection instead of opening one each.
#[test]
fn kamailio_via_http_kept_alive() {
    let sip = Sip::start(Via::HttpPooled);
    call_turns_keepalive_on_and_off(&sip);
    let log = sip.kamailio_log();
    assert!(
        log.contains("HTTP 200") && !log.contains("HTTP 401"),
        "{log}"
    );
    hostile_call_ids_run_nothing_and_get_keepalive(&sip, "HTTP 200");
    // Kamailio keeps its connection to the API open after its requests
    // (http_client_query closes each one; the test's own requests close
    // too).
    let (_, metrics) = http(&sip.serve().addr, "GET", "/metrics", None, None).unwrap();
    let commands: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tcpka_commands_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let port = sip.serve().addr.rsplit(':').next().unwrap().to_owned();
    let out = Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .unwrap();
    let kept = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(
        commands >= 4.0 && kept >= 1,
        "{commands} commands, {kept} kept connection(s) to the API\n{log}"
    );
}

#[test]
fn kamailio_via_http_api_hostile_call_ids() {
    let sip = Sip::start(Via::Http);
    hostile_call_ids_run_nothing_and_get_keepalive(&sip, "HTTP 200");
    long_call_id_is_one_holder(&sip, Via::Http);
    let _ = (sip.uas.0.id(), sip.kamailio.0.id());
}

#[test]
fn kamailio_via_exec_cli_hostile_call_ids() {
    let sip = Sip::start(Via::Exec);
    hostile_call_ids_run_nothing_and_get_keepalive(&sip, "(exec)");
    long_call_id_is_one_holder(&sip, Via::Exec);
    let _ = (sip.uas.0.id(), sip.kamailio.0.id());
}

const CALLS: usize = 10;

/// Places [`CALLS`] calls through Kamailio to the one callee and waits
/// until they are all up (dialogs confirmed, ACKs at the callee) and, with
/// tcpka, their legs have keepalive and the callee leg is idle: the state
/// in which a dead callee host would leave them hanging.
fn calls_up(sip: &Sip, with_tcpka: bool) -> Proc {
    let uac = sip.calls_until_bye(CALLS);
    sip.wait(
        "all calls answered and acknowledged",
        Duration::from_secs(20),
        || sip.active_dialogs() == Some(CALLS as u64) && sip.acks_at_callee() >= CALLS,
    );
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    if with_tcpka {
        sip.wait(
            "keepalive on the callee leg for every call",
            Duration::from_secs(10),
            || {
                sip.connection(&callee)
                    .is_some_and(|c| ka_on(&c) && holders_of(&c).len() == CALLS)
            },
        );
        sip.wait("the callee leg idle", Duration::from_secs(5), || {
            ss_keepalive(&callee)
        });
    }
    uac
}

/// The loop closed: the callee's host goes dark while 10 calls are up;
/// keepalive finds the dead connection, tcpka's timeout event reaches
/// Kamailio's event route, and Kamailio ends every call on it (BYE to each
/// caller), its dialog count back to 0. A forged event without the token
/// ends nothing. New calls work once the link is back.
#[test]
fn kamailio_ends_calls_when_the_callee_dies() {
    ends_calls_when_the_callee_dies(Via::Http);
}

/// The same loop over evapi: commands relayed, the timeout event sent back
/// over the same connection.
#[test]
fn kamailio_via_evapi_ends_calls_when_the_callee_dies() {
    ends_calls_when_the_callee_dies(Via::Evapi);
}

fn ends_calls_when_the_callee_dies(via: Via) {
    let mut sip = Sip::start(via);
    let mut uac = calls_up(&sip, true);

    // A local user forging a timeout for the callee's connection is refused
    // and ends nothing.
    let forged = |token: Option<&str>| {
        let mut v = serde_json::json!({"kind": "timeout",
            "remote": format!("{CALLEE}:{CALLEE_PORT}"), "local": "10.201.2.1:1"});
        if let Some(t) = token {
            v["token"] = t.into();
        }
        v.to_string()
    };
    match via {
        Via::Evapi => {
            use std::io::Write as _;
            let mut c = std::net::TcpStream::connect(EVAPI).unwrap();
            for body in [forged(None), forged(Some("wrong"))] {
                c.write_all(format!("{}:{body},", body.len()).as_bytes())
                    .unwrap();
            }
            sip.wait("both forgeries refused", Duration::from_secs(5), || {
                sip.kamailio_log().matches("no valid token").count() >= 2
            });
        }
        Via::Http | Via::HttpPooled | Via::Exec => {
            // No Authorization, then a wrong bearer token.
            for token in ["", "wrong"] {
                let body = forged(None);
                let (code, reply) = http(
                    "127.0.0.1:8088",
                    "POST",
                    "/tcpka",
                    Some(body.as_bytes()),
                    Some(token),
                )
                .unwrap();
                assert_eq!(code, 403, "{reply}");
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sip.active_dialogs(), Some(CALLS as u64));
    assert!(
        uac.0.try_wait().unwrap().is_none(),
        "a forged event ended calls"
    );

    sh(&["ip", "-n", &sip.callee.name, "link", "set", "kb1", "down"]);
    let down = Instant::now();
    let bound = Duration::from_secs(10);
    let status = loop {
        if let Some(s) = uac.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            down.elapsed() < bound,
            "not every caller got a BYE within {bound:?}; dialogs {:?}\nkamailio log:\n{}",
            sip.active_dialogs(),
            sip.kamailio_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = down.elapsed();
    assert!(
        status.success(),
        "a caller's call did not end with Kamailio's BYE: sipp {status}\nkamailio log:\n{}",
        sip.kamailio_log()
    );
    sip.wait("no active dialog", Duration::from_secs(10), || {
        sip.active_dialogs() == Some(0)
    });
    let log = sip.kamailio_log();
    let ended = log.matches("tcpka: ended call").count();
    assert_eq!(ended, CALLS, "{log}");
    eprintln!(
        "{via:?}: link down -> last of {CALLS} callers got its BYE: {took:?} \
         (keepalive {}/{}/{}, user timeout {KA_USER_TIMEOUT_MS} ms)",
        KA.0, KA.1, KA.2
    );

    // The callee's host back: a new call goes through.
    sh(&["ip", "-n", &sip.callee.name, "link", "set", "kb1", "up"]);
    sip.restart_callee();
    let mut again = sip.call(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = again.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "a new call after the link came back hung\nkamailio log:\n{}\ncallee's messages:\n{}",
            sip.kamailio_log(),
            std::fs::read_to_string(sip.dir.join("uas_messages.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "a new call after the link came back: sipp {status}\nkamailio log:\n{}",
        sip.kamailio_log()
    );
}

/// The contrast: the same calls and the same dead callee without tcpka.
/// Nothing notices: after longer than the bound above every call is still
/// up in Kamailio and no caller got a BYE.
#[test]
fn without_tcpka_calls_to_a_dead_callee_stay_up() {
    let mut sip = Sip::start(Via::Http);
    sip.stop_tcpka();
    let mut uac = calls_up(&sip, false);
    sh(&["ip", "-n", &sip.callee.name, "link", "set", "kb1", "down"]);
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        uac.0.try_wait().unwrap().is_none(),
        "a caller got a BYE without tcpka"
    );
    assert_eq!(sip.active_dialogs(), Some(CALLS as u64));
    eprintln!("without tcpka: {CALLS} calls to a dead callee still up after 12 s");
}
