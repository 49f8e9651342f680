//! `cargo xtask bench fleet`: how long a rule change takes from the etcd
//! put to the kernel of every agent, with 2 agents and with 20 (each
//! `tcpka serve --etcd` on its own pin directory and cgroup, all on this
//! host), against a 3-member etcd cluster on loopback in a private network
//! namespace.
//!
//! The put goes straight to etcd's JSON gateway (`/v3/kv/put`) from this
//! process, its time taken just before the request is written; an agent's
//! time is the timestamp of its log line for the change, written once the
//! kernel's rule table has it.
use super::*;

/// A rule change every agent must apply, per round.
const ROUNDS: usize = 15;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// POSTs `body` to etcd's JSON gateway at `path`; returns the wall time
/// just before the request went out, and the reply (status line first).
fn gateway(client: &str, path: &str, body: &str) -> Result<(std::time::SystemTime, String)> {
    let addr = client.trim_start_matches("http://");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(addr)?;
    let at = std::time::SystemTime::now();
    s.write_all(req.as_bytes())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    if !reply.starts_with("HTTP/1.1 200") {
        bail!("etcd {path}: {reply}");
    }
    Ok((at, reply))
}

/// Puts `key` = `value`; returns when the request went out and the put's
/// revision.
fn put(client: &str, key: &str, value: &str) -> Result<(std::time::SystemTime, i64)> {
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        b64(key.as_bytes()),
        b64(value.as_bytes())
    );
    let (at, reply) = gateway(client, "/v3/kv/put", &body)?;
    // The body: {"header":{..., "revision":"N", ...}} (int64 as a string).
    let revision = reply
        .split_once("\"revision\":\"")
        .and_then(|(_, rest)| rest.split('"').next())
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("no revision in etcd's reply: {reply}"))?;
    Ok((at, revision))
}

/// Microseconds since the epoch of an RFC 3339 timestamp, as the agents'
/// JSON log writes it.
fn parse_time(t: &str) -> Option<i128> {
    let at = humantime::parse_rfc3339(t).ok()?;
    Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_micros() as i128)
}

/// When the agent's log says it applied the bench rule at `revision`.
fn applied_at(log: &Path, revision: i64) -> Option<i128> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let msg = v["fields"]["message"].as_str()?;
        let rev = v["fields"]["revision"].as_i64()?;
        (msg.contains("@bench") && rev == revision).then(|| parse_time(v["timestamp"].as_str()?))?
    })
}

/// Whether etcd answers (a range read).
fn answers(client: &str) -> bool {
    gateway(client, "/v3/kv/range", r#"{"key":"AA=="}"#).is_ok()
}

pub fn fleet(tcpka: &Path) -> Result<()> {
    private_netns()?;
    let root = std::env::temp_dir().join(format!("tcpka-bench-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let _cleanup_dir = DirCleanup(root.clone());
    // A 3-member cluster.
    let names = ["b0", "b1", "b2"];
    let ports: Vec<(u16, u16)> = names
        .iter()
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let initial = names
        .iter()
        .zip(&ports)
        .map(|(n, (_, p))| format!("{n}=http://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::new();
    for (n, (c, p)) in names.iter().zip(&ports) {
        let client = format!("http://127.0.0.1:{c}");
        let peer = format!("http://127.0.0.1:{p}");
        members.push(Proc(
            Command::new("etcd")
                .args(["--name", n, "--data-dir"])
                .arg(root.join(n))
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args([
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-state",
                    "new",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("etcd (Debian package etcd-server)")?,
        ));
    }
    let endpoints = ports
        .iter()
        .map(|(c, _)| format!("http://127.0.0.1:{c}"))
        .collect::<Vec<_>>()
        .join(",");
    let first = format!("http://127.0.0.1:{}", ports[0].0);
    let start = Instant::now();
    while !answers(&first) {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("etcd did not come up");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let cgroup_root = cgroup2_mount()?;
    eprintln!(
        "fleet: from the etcd put to the kernel of every agent ({ROUNDS} rule changes each):"
    );
    for agents in [2usize, 20] {
        let prefix = format!("/tcpka-bench-{agents}");
        let mut running = Vec::new();
        let mut cleanups = Vec::new();
        for i in 0..agents {
            let pin_dir = PathBuf::from(format!(
                "/sys/fs/bpf/tcpka-bench-fleet-{}-{i}",
                std::process::id()
            ));
            let cgroup = cgroup_root.join(format!("tcpka-bench-fleet-{}-{i}", std::process::id()));
            std::fs::create_dir_all(&cgroup)?;
            cleanups.push(Agent {
                tcpka: tcpka.to_owned(),
                pin_dir: pin_dir.clone(),
                cgroup: cgroup.clone(),
            });
            let log = root.join(format!("agent-{agents}-{i}.log"));
            let child = Command::new(tcpka)
                .env("TCPKA_PIN_DIR", &pin_dir)
                .args(["--log-format", "json", "serve", "--cgroup"])
                .arg(&cgroup)
                .args(["--listen"])
                .arg(format!(
                    "unix:{}",
                    root.join(format!("api-{agents}-{i}.sock")).display()
                ))
                .args([
                    "--max-connections",
                    "4096",
                    "--max-indexed",
                    "4096",
                    "--max-holders",
                    "4096",
                ])
                .args(["--etcd", &endpoints, "--etcd-prefix", &prefix])
                .args(["--node", &format!("bench-{i}"), "--etcd-cache"])
                .arg(root.join(format!("cache-{agents}-{i}.json")))
                .stdout(Stdio::null())
                .stderr(File::create(&log)?)
                .spawn()?;
            running.push((Proc(child), log));
        }
        // Every agent connected to etcd.
        let start = Instant::now();
        for (_, log) in &running {
            while !std::fs::read_to_string(log)?.contains("connected to etcd") {
                if start.elapsed() > Duration::from_secs(60) {
                    bail!(
                        "an agent did not connect: {}",
                        std::fs::read_to_string(log)?
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let (mut all, mut each) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let value = format!(
                r#"{{"local_port":5060,"idle":{},"count":3,"interval":5}}"#,
                100 + round
            );
            let (at, rev) = put(&first, &format!("{prefix}/rules/bench"), &value)?;
            let at = i128::try_from(at.duration_since(std::time::UNIX_EPOCH)?.as_micros())?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut times = Vec::new();
            for (_, log) in &running {
                loop {
                    if let Some(t) = applied_at(log, rev) {
                        times.push((t - at) as f64 / 1000.0);
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "an agent did not apply revision {rev}: {}",
                            std::fs::read_to_string(log)?
                        );
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            all.push(times.iter().copied().fold(0.0, f64::max));
            each.extend(times);
            std::thread::sleep(Duration::from_millis(100));
        }
        let (all_med, all_p90) = pct(all);
        let (each_med, each_p90) = pct(each);
        eprintln!(
            "  {agents:>2} agents: every agent has it after {all_med:.1} ms (median; p90 {all_p90:.1} ms); one agent {each_med:.1} ms (median; p90 {each_p90:.1} ms)"
        );
        drop(running);
        drop(cleanups);
    }
    drop(members);
    Ok(())
}

/// Median and p90 of milliseconds.
fn pct(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

/// One agent's installation and cgroup, removed on drop (after its serve
/// stopped).
struct Agent {
    tcpka: PathBuf,
    pin_dir: PathBuf,
    cgroup: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        unload(&self.tcpka, &self.pin_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

struct DirCleanup(PathBuf);

impl Drop for DirCleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
