//! The setup: namespaces and links, Kamailio with the example config
//! (in one of its variants), sipp's callee, and tcpka serve.
use super::*;

/// Kills a child and its process group (Kamailio forks workers) on drop.
pub(super) struct Proc(pub(super) Child);

impl Proc {
    pub(super) fn spawn(cmd: &mut Command) -> Self {
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

pub(super) fn tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A directory removed with what is in it on drop.
pub(super) struct TempDir(pub(super) PathBuf);

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
pub(super) struct Sip {
    pub(super) kamailio: Proc,
    pub(super) uas: Proc,
    /// None once stopped ([`Sip::stop_tcpka`]).
    pub(super) serve: Option<Serve>,
    /// How serve was started (for [`Sip::start_tcpka`]).
    serve_args: Vec<String>,
    api: String,
    pub(super) caller: NamedNetns,
    pub(super) callee: NamedNetns,
    pub(super) dir: TempDir,
    pub(super) log: PathBuf,
    pub(super) e: Env,
}

pub(super) fn link(ns: &NamedNetns, ours: &str, theirs: &str, our_ip: &str, their_ip: &str) {
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
pub(super) fn config(dir: &Path, api: &str, extra: &[(&str, &str)]) -> PathBuf {
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
    text = subst(
        text,
        "SIP_LISTEN",
        &format!("tcp:{KAMAILIO_CALLER_SIDE}:5060"),
    );
    text = subst(text, "UPSTREAM_LISTEN", "tcp:10.201.2.1:5060");
    // Each command's line, with the Call-ID next to its holder.
    text = subst(text, "KA_LOG", "L_INFO");
    text = subst(
        text,
        "CALLEE",
        &format!("sip:{CALLEE}:{CALLEE_PORT};transport=tcp"),
    );
    text = subst(text, "CALLEE_HOSTPORT", &format!("{CALLEE}:{CALLEE_PORT}"));
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
    for (name, value) in extra {
        text = subst(text, name, value);
    }
    let path = dir.join("kamailio.cfg");
    std::fs::write(&path, text).unwrap();
    path
}

/// The callee: sipp's built-in UAS on CALLEE:CALLEE_PORT, logging what it
/// gets in `uas_messages.log`.
pub(super) fn uas(callee: &NamedNetns, dir: &Path) -> Proc {
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
pub(super) enum Via {
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

pub(super) const EVAPI: &str = "127.0.0.1:8448";

impl Sip {
    pub(super) fn start(via: Via) -> Self {
        Self::start_with(via, &[])
    }

    /// Starts with more of the example's substdefs set (name, value).
    pub(super) fn start_with(via: Via, substdefs: &[(&str, &str)]) -> Self {
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
        let serve_args: Vec<String> = match via {
            Via::Evapi => ["--evapi", EVAPI],
            Via::Exec | Via::Http | Via::HttpPooled => ["--webhook", "http://127.0.0.1:8088/tcpka"],
        }
        .into_iter()
        .chain(["--events-token-file", token_file.to_str().unwrap()])
        .map(str::to_owned)
        .collect();
        let serve = Serve::start(
            &e.tcpka,
            &e.cgroup.path,
            &api,
            &serve_args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let cfg = config(&dir, &api, substdefs);
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
            serve_args,
            api: api.clone(),
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

    pub(super) fn serve(&self) -> &Serve {
        self.serve.as_ref().expect("tcpka serve running")
    }

    /// The callee's host back after an outage: a new UAS process (the old
    /// one's connections died with the outage).
    pub(super) fn restart_callee(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-(self.uas.0.id() as i32), libc::SIGKILL) };
        let _ = self.uas.0.wait();
        self.uas = uas(&self.callee, &self.dir);
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Stops `tcpka serve`: Kamailio's calls to it fail and no event comes.
    pub(super) fn stop_tcpka(&mut self) {
        drop(self.serve.take());
    }

    /// Starts `tcpka serve` again, as it was started.
    pub(super) fn start_tcpka(&mut self) {
        let args: Vec<&str> = self.serve_args.iter().map(String::as_str).collect();
        self.serve = Some(Serve::start(
            &self.e.tcpka,
            &self.e.cgroup.path,
            &self.api,
            &args,
        ));
    }

    /// `calls` calls at once from the caller that never hang up: each one
    /// succeeds when Kamailio's BYE arrives (`uac_until_bye.xml`).
    pub(super) fn calls_until_bye(&self, calls: usize) -> Proc {
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

    /// Commands `op` tcpka's serve got so far, whatever their result
    /// (`tcpka_commands_total`).
    pub(super) fn commands(&self, op: &str) -> u64 {
        let Some(serve) = &self.serve else { return 0 };
        let Ok((_, text)) = http(&serve.addr, "GET", "/metrics", None, None) else {
            return 0;
        };
        let prefix = format!("tcpka_commands_total{{op=\"{op}\",");
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum()
    }

    /// What an RPC of the running Kamailio prints (kamcmd over the ctl
    /// socket), or "" if it cannot be run.
    pub(super) fn kamcmd(&self, args: &[&str]) -> String {
        Command::new("kamcmd")
            .args(["-s", &format!("unix:{}", self.dir.join("ctl").display())])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// One of the running Kamailio's TCP options (`kamcmd
    /// core.tcp_options`), e.g. `connection_lifetime`.
    pub(super) fn tcp_option(&self, name: &str) -> Option<String> {
        let text = self.kamcmd(&["core.tcp_options"]);
        text.lines().find_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            (k == name).then(|| v.trim().to_owned())
        })
    }

    /// Kamailio's count of active dialogs.
    pub(super) fn active_dialogs(&self) -> Option<u64> {
        // dialog:active_dialogs = 10, then the group's other counters
        let text = self.kamcmd(&["stats.get_statistics", "dialog:"]);
        let line = text.lines().find(|l| l.contains("active_dialogs"))?;
        line.split('=')
            .nth(1)?
            .trim()
            .trim_matches('"')
            .parse()
            .ok()
    }

    /// One call of `pause_ms` from the caller; returns the running sipp.
    pub(super) fn call(&self, pause_ms: u32) -> Proc {
        self.call_with(pause_ms, &[])
    }

    /// One call, with more sipp arguments.
    pub(super) fn call_with(&self, pause_ms: u32, extra: &[String]) -> Proc {
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
    pub(super) fn connections(&self) -> Vec<serde_json::Value> {
        let r = self.e.tcpka.run(&["status", "--json"]).ok();
        serde_json::from_str::<serde_json::Value>(&r.stdout)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// One connection by peer, managed or not (None when there is none).
    pub(super) fn connection(&self, peer: &str) -> Option<serde_json::Value> {
        let r = self.e.tcpka.run(&["status", peer, "--json"]);
        (r.code == 0)
            .then(|| serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()[0].clone())
    }

    /// ACKs the callee has received so far.
    pub(super) fn acks_at_callee(&self) -> usize {
        std::fs::read_to_string(self.dir.join("uas_messages.log"))
            .unwrap_or_default()
            .matches("ACK sip:")
            .count()
    }

    pub(super) fn kamailio_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `f` holds, failing with Kamailio's log.
    pub(super) fn wait(&self, what: &str, within: Duration, mut f: impl FnMut() -> bool) {
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
