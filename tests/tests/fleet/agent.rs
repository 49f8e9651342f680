//! One agent under test: `tcpka serve --etcd` on its own pins, cgroup and
//! cache file, its log kept.
use super::*;

/// One agent: `tcpka serve --etcd` on its own installation.
pub(super) struct Agent {
    pub(super) name: String,
    pub(super) args: Vec<String>,
    pub(super) addr: String,
    pub(super) log: PathBuf,
    pub(super) cache: PathBuf,
    pub(super) child: Option<std::process::Child>,
    pub(super) tcpka: Tcpka,
    pub(super) cgroup: CgroupDir,
}

impl Agent {
    pub(super) fn start(name: &str, labels: &[&str], cluster: &Cluster, prefix: &str) -> Self {
        Self::start_with(name, labels, cluster, prefix, &[])
    }

    pub(super) fn start_with(
        name: &str,
        labels: &[&str],
        cluster: &Cluster,
        prefix: &str,
        extra: &[&str],
    ) -> Self {
        let dir = std::env::temp_dir().join(unique("tcpka-agent"));
        std::fs::create_dir_all(&dir).unwrap();
        let cgroup = CgroupDir::new();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = [
            "serve",
            "--cgroup",
            cgroup.path.to_str().unwrap(),
            "--listen",
            &addr,
            "--etcd",
            &cluster.endpoints(),
            "--etcd-prefix",
            prefix,
            "--node",
            name,
            "--etcd-cache",
            dir.join("cache.json").to_str().unwrap(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for l in labels {
            args.push("--label".into());
            args.push((*l).into());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut a = Self {
            name: name.into(),
            args,
            addr,
            log: dir.join("serve.log"),
            cache: dir.join("cache.json"),
            child: None,
            tcpka: Tcpka::new(),
            cgroup,
        };
        a.spawn();
        a
    }

    pub(super) fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .tcpka
            .cmd()
            .env("TCPKA_TOKEN", TEST_TOKEN)
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tcpka serve --etcd");
        self.child = Some(child);
        wait_for_healthz(&self.addr, Some(TEST_TOKEN), |code| code == 200);
    }

    /// Stops serve (SIGINT); enforcement stays.
    pub(super) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }

    pub(super) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The fleet rules in this agent's kernel, by name (without the `@`).
    pub(super) fn fleet_rules(&self) -> Vec<(String, u32)> {
        tcpka::enforcer::Enforcer::new(self.tcpka.layout())
            .rules()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| Some((r.name?.strip_prefix('@')?.to_owned(), r.idle)))
            .collect()
    }

    pub(super) fn has(&self, rule: &str) -> bool {
        self.fleet_rules().iter().any(|(n, _)| n == rule)
    }

    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `done` holds for this agent's kernel; returns how long
    /// that took.
    pub(super) fn wait(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&Agent) -> bool,
    ) -> Duration {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < within,
                "agent {}: {what} within {within:?}; its log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        start.elapsed()
    }

    /// The keepalive a new connection to `port` gets in this agent's
    /// cgroup (the accepted end: its local port is `port`).
    pub(super) fn keepalive_on(&self, port: u16) -> Keepalive {
        self.cgroup.enter();
        let l = listen(&format!("127.0.0.1:{port}"));
        let (_client, server) = connect(&l);
        let k = keepalive(&server);
        self.cgroup.leave();
        k
    }
}

/// A connection made in an agent's cgroup and kept open (its listener
/// closed, so the port can be listened on again).
pub(super) struct Live {
    _client: std::net::TcpStream,
    pub(super) server: std::net::TcpStream,
}

impl Agent {
    /// A connection to `port` made now in this agent's cgroup, kept open.
    pub(super) fn live_on(&self, port: u16) -> Live {
        self.cgroup.enter();
        let l = listen(&format!("127.0.0.1:{port}"));
        let (client, server) = connect(&l);
        self.cgroup.leave();
        drop(l);
        Live {
            _client: client,
            server,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.log.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
