//! Running tcpka: one-shot commands in a private pin directory and
//! cgroup, and `tcpka serve` daemons.
use super::*;

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
