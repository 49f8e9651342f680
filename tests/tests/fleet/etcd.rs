//! A real etcd cluster (the Debian package's `etcd`) on loopback in the
//! test's own network namespace, its data in a temporary directory; each
//! member can be stopped and started again with its data.
use super::*;

pub(super) struct Member {
    pub(super) name: String,
    pub(super) client: String,
    peer: String,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

pub(super) struct Cluster {
    pub(super) members: Vec<Member>,
    initial: String,
    token: String,
    pub(super) root: PathBuf,
    /// TLS: the members' server certificate, and the client certificate
    /// tcpka and etcdctl use.
    tls: Option<Certs>,
    /// etcdctl's `--user USER:PASSWORD` once auth is on.
    user: Option<String>,
}

fn etcdctl_with(flags: &[String], endpoints: &str, args: &[&str]) -> std::process::Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(flags)
        .args(["--endpoints", endpoints, "--command-timeout=3s"])
        .args(args)
        .output()
        .expect("etcdctl (Debian package etcd-client; cargo xtask setup installs it)")
}

impl Cluster {
    /// `n` members, started and healthy.
    pub(super) fn start(n: usize) -> Self {
        Self::start_with(n, false)
    }

    /// `n` members serving clients over TLS, asking for a client
    /// certificate (see [`Cluster::tls`]).
    pub(super) fn start_tls(n: usize) -> Self {
        Self::start_with(n, true)
    }

    fn start_with(n: usize, tls: bool) -> Self {
        let token = unique("tcpka-etcd");
        let root = std::env::temp_dir().join(&token);
        std::fs::create_dir_all(&root).unwrap();
        let tls = tls.then(|| Certs::make(&root.join("tls")));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("{scheme}://127.0.0.1:{}", free_port()),
                peer: format!("http://127.0.0.1:{}", free_port()),
                dir: root.join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Self {
            members,
            initial,
            token,
            root,
            tls,
            user: None,
        };
        for i in 0..n {
            c.spawn(i, "new");
        }
        c.wait_healthy(&(0..n).collect::<Vec<_>>());
        c
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let m = &mut self.members[i];
        let log = std::fs::File::create(self.root.join(format!("{}.log", m.name))).unwrap();
        let child = Command::new("etcd")
            .args([
                "--name",
                &m.name,
                "--data-dir",
                m.dir.to_str().unwrap(),
                "--listen-client-urls",
                &m.client,
                "--advertise-client-urls",
                &m.client,
                "--listen-peer-urls",
                &m.peer,
                "--initial-advertise-peer-urls",
                &m.peer,
                "--initial-cluster",
                &self.initial,
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                &self.token,
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .args(self.tls.iter().flat_map(|t| {
                [
                    "--cert-file".into(),
                    t.server_cert.to_str().unwrap().to_owned(),
                    "--key-file".into(),
                    t.server_key.to_str().unwrap().to_owned(),
                    "--trusted-ca-file".into(),
                    t.ca.to_str().unwrap().to_owned(),
                    "--client-cert-auth".into(),
                ]
            }))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian package etcd-server; cargo xtask setup installs it)");
        m.child = Some(child);
    }

    fn wait_healthy(&mut self, which: &[usize]) {
        for &i in which {
            let ep = self.members[i].client.clone();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !self.ctl(&ep, &["endpoint", "health"]).status.success() {
                if Instant::now() >= deadline {
                    let m = &mut self.members[i];
                    let exited = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                    let log = std::fs::read_to_string(self.root.join(format!("{}.log", m.name)))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    panic!(
                        "etcd member {} ({}, peer {}) not healthy within 20 s; process: {}; \
                         its log ends:\n{}",
                        m.name,
                        m.client,
                        m.peer,
                        exited.map_or("running".into(), |s| format!("exited, {s}")),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// etcdctl with this cluster's TLS and user flags.
    fn ctl(&self, endpoints: &str, args: &[&str]) -> std::process::Output {
        let mut flags = Vec::new();
        if let Some(t) = &self.tls {
            for (f, p) in [
                ("--cacert", &t.ca),
                ("--cert", &t.client_cert),
                ("--key", &t.client_key),
            ] {
                flags.push(f.to_owned());
                flags.push(p.to_str().unwrap().to_owned());
            }
        }
        if let Some(u) = &self.user {
            flags.push("--user".into());
            flags.push(u.clone());
        }
        etcdctl_with(&flags, endpoints, args)
    }

    pub(super) fn tls(&self) -> &Certs {
        self.tls.as_ref().expect("a TLS cluster")
    }

    /// Turns etcd auth on with user root and `password`.
    pub(super) fn enable_auth(&mut self, password: &str) {
        let eps = self.running();
        for args in [
            &["user", "add", &format!("root:{password}")][..],
            &["user", "grant-role", "root", "root"],
            &["auth", "enable"],
        ] {
            let o = self.ctl(&eps, args);
            assert!(o.status.success(), "etcdctl {args:?}: {o:?}");
        }
        self.user = Some(format!("root:{password}"));
    }

    /// Every member's client URL, comma-separated.
    pub(super) fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The running members' client URLs.
    fn running(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs etcdctl against the running members until it succeeds (a
    /// cluster electing a leader refuses writes for a moment).
    fn write(&self, args: &[&str]) {
        let start = Instant::now();
        loop {
            let o = self.ctl(&self.running(), args);
            if o.status.success() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "etcdctl {args:?}: {o:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(super) fn put(&self, key: &str, value: &str) {
        self.write(&["put", key, value]);
    }

    /// Puts many keys, up to 128 and 1 MB to a transaction (etcd's
    /// default limits: 128 operations, 1.5 MiB), through the JSON gateway
    /// of a running member (no TLS).
    pub(super) fn put_many(&self, kvs: &[(String, String)]) {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let http = reqwest::blocking::Client::new();
        let mut chunks: Vec<&[(String, String)]> = Vec::new();
        let (mut from, mut bytes) = (0, 0);
        for (i, (k, v)) in kvs.iter().enumerate() {
            if i > from && (i - from == 128 || bytes + k.len() + v.len() > 1_000_000) {
                chunks.push(&kvs[from..i]);
                (from, bytes) = (i, 0);
            }
            bytes += k.len() + v.len();
        }
        chunks.push(&kvs[from..]);
        for chunk in chunks {
            let ops: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| serde_json::json!({ "requestPut": { "key": b64(k), "value": b64(v) } }))
                .collect();
            let body = serde_json::json!({ "success": ops });
            let start = Instant::now();
            loop {
                let running = self.running();
                let url = format!("{}/v3/kv/txn", running.split(',').next().unwrap());
                match http.post(&url).json(&body).send() {
                    Ok(r) if r.status().is_success() => break,
                    other => assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "etcd txn: {other:?}"
                    ),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    pub(super) fn del(&self, key: &str) {
        self.write(&["del", key]);
    }

    /// Deletes every key under `prefix` in one request.
    pub(super) fn del_prefix(&self, prefix: &str) {
        self.write(&["del", "--prefix", prefix]);
    }

    /// Compacts the history up to the current revision.
    pub(super) fn compact(&self) {
        let o = self.ctl(&self.running(), &["endpoint", "status", "-w", "json"]);
        let v: Value = serde_json::from_slice(&o.stdout).expect("endpoint status JSON");
        let rev = v[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("a revision");
        self.write(&["compact", &rev.to_string()]);
    }

    /// The value at `key`, if any.
    pub(super) fn get(&self, key: &str) -> Option<String> {
        let o = self.ctl(&self.running(), &["get", key, "--print-value-only"]);
        assert!(o.status.success(), "etcdctl get {key}: {o:?}");
        let v = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        (!v.is_empty()).then_some(v)
    }

    /// The keys under `prefix`.
    pub(super) fn keys(&self, prefix: &str) -> Vec<String> {
        let o = self.ctl(&self.running(), &["get", "--prefix", "--keys-only", prefix]);
        assert!(o.status.success(), "etcdctl get --prefix {prefix}: {o:?}");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The index of the member that leads.
    pub(super) fn leader(&self) -> usize {
        let o = self.ctl(&self.running(), &["endpoint", "status", "-w", "json"]);
        let v: Value = serde_json::from_slice(&o.stdout).expect("endpoint status JSON");
        for s in v.as_array().expect("an array") {
            let me = &s["Status"]["header"]["member_id"];
            if me == &s["Status"]["leader"] {
                let ep = s["Endpoint"].as_str().unwrap();
                return self.members.iter().position(|m| m.client == ep).unwrap();
            }
        }
        panic!("no leader in {v}");
    }

    /// Stops member `i` (SIGKILL: as a crash).
    pub(super) fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again with its data.
    pub(super) fn restart(&mut self, i: usize) {
        self.spawn(i, "existing");
    }

    pub(super) fn wait_all_healthy(&mut self) {
        self.wait_healthy(&(0..self.members.len()).collect::<Vec<_>>());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
