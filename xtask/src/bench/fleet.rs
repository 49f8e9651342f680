//! `cargo xtask bench fleet`: a 3-member etcd cluster on loopback in a
//! private network namespace, and agents (`tcpka serve --etcd`, each on
//! its own pin directory and cgroup, all on this host).
//!
//! 1. Scale, 2 agents: how long one rule change takes from the put to the
//!    kernel with 0, 1,000 and 4,000 other fleet rules; 5,000 puts one
//!    after another (more than the kernel's table: the agents apply the
//!    most specific 4,096 and report the rest); one delete of all 5,000.
//!    Each agent's CPU time per phase, and whether it kept its lease.
//! 2. Fan-out: one rule change with 2, 10 and 20 agents.
//!
//! The put goes straight to etcd's JSON gateway (`/v3/kv/put`) from this
//! process, its time taken just before the request is written; an agent's
//! time is the timestamp of its log line for the change, written once the
//! kernel's rule table has it.
use std::{
    fs::File,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{cgroup2_mount, private_netns};
use crate::harness::unload;

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

/// The revision in a reply of etcd's gateway: {"header":{...,
/// "revision":"N", ...}} (int64 as a string).
fn revision_of(reply: &str) -> Result<i64> {
    reply
        .split_once("\"revision\":\"")
        .and_then(|(_, rest)| rest.split('"').next())
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("no revision in etcd's reply: {reply}"))
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
    Ok((at, revision_of(&reply)?))
}

/// Microseconds since the epoch of an RFC 3339 timestamp, as the agents'
/// JSON log writes it.
fn parse_time(t: &str) -> Option<i128> {
    let at = humantime::parse_rfc3339(t).ok()?;
    Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_micros() as i128)
}

/// When the agent's log says it applied the bench rule at `revision`, and
/// the agent's own time for it (µs from the watch to the kernel), when the
/// log gives it.
fn applied_at(log: &Path, revision: i64) -> Option<(i128, Option<u64>)> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let msg = v["fields"]["message"].as_str()?;
        let rev = v["fields"]["revision"].as_i64()?;
        (msg.contains("@bench") && rev == revision).then(|| {
            Some((
                parse_time(v["timestamp"].as_str()?)?,
                v["fields"]["took_us"].as_u64(),
            ))
        })?
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
    let env = Env {
        tcpka,
        root: &root,
        cgroup_root: &cgroup_root,
        endpoints: &endpoints,
    };
    scale(&env, &first)?;
    eprintln!(
        "fleet: one rule change, from the etcd put to the kernel of every agent ({ROUNDS} changes each, no other rules):"
    );
    let clients: Vec<String> = ports
        .iter()
        .map(|(c, _)| format!("http://127.0.0.1:{c}"))
        .collect();
    for agents in [2usize, 10, 20] {
        let prefix = format!("/tcpka-bench-{agents}");
        let running = env.agents(agents, &prefix)?;
        // Let the start-up writes (labels, first statuses) settle.
        std::thread::sleep(Duration::from_secs(2));
        let before = grpc_bytes(&clients);
        let (all, each, _) = changes(&first, &prefix, &running, ROUNDS)?;
        // The status each agent writes after a change.
        std::thread::sleep(Duration::from_millis(1500));
        let after = grpc_bytes(&clients);
        let per = |a: f64, b: f64| (b - a) / (ROUNDS * agents) as f64;
        let (all_med, all_p90) = pct(all);
        let (each_med, each_p90) = pct(each);
        let status_len =
            node_status(&first, &prefix, &running[0].node).map_or(0, |s| s.to_string().len());
        eprintln!(
            "  {agents:>2} agents: every agent has it after {all_med:.1} ms (median; p90 {all_p90:.1} ms); one agent {each_med:.1} ms (median; p90 {each_p90:.1} ms); etcd's gRPC per change and agent: {:.0} bytes sent, {:.0} received (a status is {status_len} bytes)",
            per(before.0, after.0),
            per(before.1, after.1),
        );
    }
    drop(members);
    Ok(())
}

struct Env<'a> {
    tcpka: &'a Path,
    root: &'a Path,
    cgroup_root: &'a Path,
    endpoints: &'a str,
}

/// A running agent: its serve, log and installation.
struct Running {
    proc: Proc,
    log: PathBuf,
    node: String,
    _cleanup: Agent,
}

impl Env<'_> {
    /// Starts `n` agents under `prefix` and waits until each is connected.
    fn agents(&self, n: usize, prefix: &str) -> Result<Vec<Running>> {
        let tag = prefix.trim_start_matches('/');
        let mut running = Vec::new();
        for i in 0..n {
            let pin_dir = PathBuf::from(format!(
                "/sys/fs/bpf/tcpka-bench-fleet-{}-{tag}-{i}",
                std::process::id()
            ));
            let cgroup = self.cgroup_root.join(format!(
                "tcpka-bench-fleet-{}-{tag}-{i}",
                std::process::id()
            ));
            std::fs::create_dir_all(&cgroup)?;
            let cleanup = Agent {
                tcpka: self.tcpka.to_owned(),
                pin_dir: pin_dir.clone(),
                cgroup: cgroup.clone(),
            };
            let log = self.root.join(format!("agent-{tag}-{i}.log"));
            let node = format!("bench-{i}");
            let child = Command::new(self.tcpka)
                .env("TCPKA_PIN_DIR", &pin_dir)
                .args(["--log-format", "json", "serve", "--cgroup"])
                .arg(&cgroup)
                .args(["--listen"])
                .arg(format!(
                    "unix:{}",
                    self.root.join(format!("api-{tag}-{i}.sock")).display()
                ))
                .args([
                    "--max-connections",
                    "4096",
                    "--max-indexed",
                    "4096",
                    "--max-holders",
                    "4096",
                ])
                .args(["--etcd", self.endpoints, "--etcd-prefix", prefix])
                .args(["--node", &node, "--etcd-cache"])
                .arg(self.root.join(format!("cache-{tag}-{i}.json")))
                .stdout(Stdio::null())
                .stderr(File::create(&log)?)
                .spawn()?;
            running.push(Running {
                proc: Proc(child),
                log,
                node,
                _cleanup: cleanup,
            });
        }
        let start = Instant::now();
        for r in &running {
            while !std::fs::read_to_string(&r.log)?.contains("connected to etcd") {
                if start.elapsed() > Duration::from_secs(60) {
                    bail!(
                        "an agent did not connect: {}",
                        std::fs::read_to_string(&r.log)?
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(running)
    }
}

/// `rounds` changes of the rule `bench`, each waited for in every agent's
/// log: the slowest agent's and every agent's milliseconds from the put,
/// and the agents' own milliseconds from the watch to the kernel.
fn changes(
    client: &str,
    prefix: &str,
    running: &[Running],
    rounds: usize,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let (mut all, mut each, mut own) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let value = format!(
            r#"{{"local_port":5060,"idle":{},"count":3,"interval":5}}"#,
            100 + round
        );
        let (at, rev) = put(client, &format!("{prefix}/rules/bench"), &value)?;
        let at = i128::try_from(at.duration_since(std::time::UNIX_EPOCH)?.as_micros())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut times = Vec::new();
        for r in running {
            loop {
                if let Some((t, took)) = applied_at(&r.log, rev) {
                    times.push((t - at) as f64 / 1000.0);
                    own.extend(took.map(|us| us as f64 / 1000.0));
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "an agent did not apply revision {rev}: {}",
                        std::fs::read_to_string(&r.log)?
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        all.push(times.iter().copied().fold(0.0, f64::max));
        each.extend(times);
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((all, each, own))
}

/// A fleet rule of its own match: local port 5060 from one address.
fn filler(i: usize) -> String {
    format!(
        r#"{{"local_port":5060,"remote":"10.{}.{}.{}","idle":30,"count":3,"interval":5}}"#,
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    )
}

/// When the agent's log first says it applied revision `revision` or a
/// later one (any fleet line with a revision).
fn reached(log: &Path, revision: i64) -> Option<i128> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|l| {
        if !l.contains("\"revision\"") {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let rev = v["fields"]["revision"].as_i64()?;
        let msg = v["fields"]["message"].as_str()?;
        (msg.starts_with("fleet: ") && rev >= revision)
            .then(|| parse_time(v["timestamp"].as_str()?))?
    })
}

/// Waits until every agent reached `revision`; milliseconds from `since`
/// (µs since the epoch) for each, `None` for one not there within `limit`.
fn wait_reached(
    running: &[Running],
    revision: i64,
    since: i128,
    limit: Duration,
) -> Vec<Option<f64>> {
    let deadline = Instant::now() + limit;
    running
        .iter()
        .map(|r| loop {
            if let Some(t) = reached(&r.log, revision) {
                break Some((t - since) as f64 / 1000.0);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        })
        .collect()
}

/// CPU seconds a process has used (user and system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime: fields 14 and 15 (12 and 13 after the name), in
    // USER_HZ ticks, 100 a second on Linux.
    let hz = 100.0;
    (ticks(11) + ticks(12)) / hz
}

fn now_us() -> Result<i128> {
    Ok(i128::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros(),
    )?)
}

/// Lines in an agent's log that say it lost etcd or its lease.
fn lease_trouble(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("lease") && (l.contains("WARN") || l.contains("ERROR")))
        .count()
}

fn ms_or_late(v: &[Option<f64>], limit: Duration) -> String {
    v.iter()
        .map(|t| match t {
            Some(ms) if *ms >= 1000.0 => format!("{:.2} s", ms / 1000.0),
            Some(ms) => format!("{ms:.1} ms"),
            None => format!("not within {} s", limit.as_secs()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Deletes every key under `prefix` in one request; returns the revision.
fn delete_prefix(client: &str, prefix: &str) -> Result<(std::time::SystemTime, i64)> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("a prefix") += 1;
    let body = format!(
        r#"{{"key":"{}","range_end":"{}"}}"#,
        b64(prefix.as_bytes()),
        b64(&end)
    );
    let (at, reply) = gateway(client, "/v3/kv/deleterange", &body)?;
    Ok((at, revision_of(&reply)?))
}

/// The node's status as the agent last wrote it.
fn node_status(client: &str, prefix: &str, node: &str) -> Option<serde_json::Value> {
    let body = format!(
        r#"{{"key":"{}"}}"#,
        b64(format!("{prefix}/nodes/{node}").as_bytes())
    );
    let (_, reply) = gateway(client, "/v3/kv/range", &body).ok()?;
    let json = reply.split_once("\r\n\r\n")?.1;
    // The body may be chunked: from the first { to the last }.
    let json = &json[json.find('{')?..=json.rfind('}')?];
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let value = v["kvs"][0]["value"].as_str()?;
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    serde_json::from_slice(&raw).ok()
}

/// Bytes etcd's members sent to and received from gRPC clients, summed
/// (`etcd_network_client_grpc_{sent,received}_bytes_total`).
fn grpc_bytes(clients: &[String]) -> (f64, f64) {
    let mut sum = (0.0, 0.0);
    for c in clients {
        let addr = c.trim_start_matches("http://");
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        if s.write_all(req.as_bytes()).is_err() || s.read_to_string(&mut text).is_err() {
            continue;
        }
        for line in text.lines() {
            let value = || {
                line.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            if line.starts_with("etcd_network_client_grpc_sent_bytes_total") {
                sum.0 += value();
            } else if line.starts_with("etcd_network_client_grpc_received_bytes_total") {
                sum.1 += value();
            }
        }
    }
    sum
}

/// Part 1: the cost of a change as the rule count grows, 5,000 puts, and
/// a 5,000-rule delete, with 2 agents.
fn scale(env: &Env, client: &str) -> Result<()> {
    let prefix = "/tcpka-bench-scale";
    let running = env.agents(2, prefix)?;
    let rules = format!("{prefix}/rules/");
    let cpu = |running: &[Running]| -> Vec<f64> {
        running.iter().map(|r| cpu_seconds(r.proc.0.id())).collect()
    };
    eprintln!("fleet: one rule change with other fleet rules in the table, 2 agents ({ROUNDS} changes each; put to kernel, every agent):");
    let mut have = 0;
    for n in [0usize, 1000, 4000] {
        let mut last = 0;
        let added = n - have;
        for i in have..n {
            last = put(client, &format!("{rules}s{i:05}"), &filler(i))?.1;
        }
        have = n;
        if last > 0 {
            let t = now_us()?;
            let limit = Duration::from_secs(600);
            let r = wait_reached(&running, last, t, limit);
            if r.iter().any(Option::is_none) {
                bail!("the agents did not take {n} rules within 600 s");
            }
            eprintln!(
                "  (the {} puts up to {n} rules were applied {} after the last)",
                added,
                ms_or_late(&r, limit)
            );
        }
        let (all, each, own) = changes(client, prefix, &running, ROUNDS)?;
        let (all_med, all_p90) = pct(all);
        let (each_med, _) = pct(each);
        let own = if own.is_empty() {
            "not logged".to_owned()
        } else {
            let (m, p) = pct(own);
            format!("{m:.2} ms (p90 {p:.2} ms)")
        };
        eprintln!(
            "  {n:>5} other rules: every agent has it after {all_med:.1} ms (median; p90 {all_p90:.1} ms); one agent {each_med:.1} ms; the agent's own time, watch to kernel, {own}"
        );
    }
    // Empty again.
    let (at, rev) = delete_prefix(client, &rules)?;
    let at = i128::try_from(at.duration_since(std::time::UNIX_EPOCH)?.as_micros())?;
    let limit = Duration::from_secs(60);
    let r = wait_reached(&running, rev, at, limit);
    eprintln!(
        "  delete of the {} rules in one request: applied after {}",
        have + 1,
        ms_or_late(&r, limit)
    );
    // 5,000 puts, last name first: the last put is always among the 4,096
    // applied, so every agent logs it.
    let total = 5000;
    let cpu0 = cpu(&running);
    let started = Instant::now();
    let mut last = (std::time::SystemTime::now(), 0);
    for i in (0..total).rev() {
        last = put(client, &format!("{rules}p{i:05}"), &filler(i))?;
    }
    let put_for = started.elapsed();
    let at = i128::try_from(last.0.duration_since(std::time::UNIX_EPOCH)?.as_micros())?;
    let limit = Duration::from_secs(120);
    let r = wait_reached(&running, last.1, at, limit);
    let cpu1 = cpu(&running);
    std::thread::sleep(Duration::from_millis(1500));
    let left_out: Vec<String> = running
        .iter()
        .map(|a| {
            node_status(client, prefix, &a.node)
                .and_then(|s| {
                    Some(format!(
                        "{} applied, {} left out",
                        s["fleet_rules"].as_u64()?,
                        s["left_out"].as_array().map_or(0, Vec::len)
                    ))
                })
                .unwrap_or_else(|| "no status".into())
        })
        .collect();
    eprintln!(
        "  {total} puts, one after another ({:.1} s, {:.0} puts/s): applied {} after the last put; agent CPU {} s; {}",
        put_for.as_secs_f64(),
        total as f64 / put_for.as_secs_f64(),
        ms_or_late(&r, limit),
        cpu1.iter()
            .zip(&cpu0)
            .map(|(b, a)| format!("{:.2}", b - a))
            .collect::<Vec<_>>()
            .join(", "),
        left_out.join("; ")
    );
    // One delete of all 5,000, the agents' leases watched.
    let trouble0: Vec<usize> = running.iter().map(|r| lease_trouble(&r.log)).collect();
    let cpu0 = cpu(&running);
    let (at, rev) = delete_prefix(client, &rules)?;
    let at = i128::try_from(at.duration_since(std::time::UNIX_EPOCH)?.as_micros())?;
    let limit = Duration::from_secs(60);
    let r = wait_reached(&running, rev, at, limit);
    let cpu1 = cpu(&running);
    // Statuses live for 10 s after an agent last renewed: look past that.
    let mut gone = 0;
    let watch_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < watch_until {
        gone += running
            .iter()
            .filter(|a| node_status(client, prefix, &a.node).is_none())
            .count();
        std::thread::sleep(Duration::from_millis(500));
    }
    let trouble: usize = running
        .iter()
        .zip(&trouble0)
        .map(|(r, t0)| lease_trouble(&r.log) - t0)
        .sum();
    eprintln!(
        "  delete of {total} rules in one request: applied after {}; agent CPU {} s; node status missing {gone} time(s) in 12 s of checks every 0.5 s, lease warnings {trouble}",
        ms_or_late(&r, limit),
        cpu1.iter()
            .zip(&cpu0)
            .map(|(b, a)| format!("{:.2}", b - a))
            .collect::<Vec<_>>()
            .join(", "),
    );
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
