//! Kamailio driving keepalive per call, at a call rate: the example
//! config (`examples/kamailio/kamailio.cfg`) between sipp's UAC and UAS over
//! TCP, in namespaces of its own, with keepalive enabled on both legs at
//! the 200 OK to the INVITE and disabled at the 200 OK to the BYE, in each
//! of its variants:
//!
//! - no keepalive (`WITHOUT_KEEPALIVE`);
//! - Kamailio's own tcpops, the reference (`WITH_TCPOPS`);
//! - tcpka over evapi (`WITH_TCPKA_EVAPI`, `serve --evapi`);
//! - tcpka over its HTTP API on a kept-alive connection per Kamailio process
//!   (`WITH_TCPKA_HTTP_POOLED`, `http_connect` with `keep_connections`);
//! - tcpka over its HTTP API, a connection per request (`WITH_TCPKA_HTTP`,
//!   `http_client_query`);
//! - the tcpka CLI through `exec_cmd` (the config's default), at
//!   [`CLI_RATE`] calls/s at most and as many calls as last as long.
//!
//! Each round runs every variant once, in turn; the figures are medians
//! over the rounds: calls/s achieved, failed calls, Kamailio's CPU per call
//! and tcpka's CPU per command (four per call: `tcpka serve`'s, or the CLI
//! processes'), and whether every enable was applied (serve's own count of
//! commands that succeeded; the CLI's exit codes are not collected).
//!
//! ```text
//!  caller ns (sipp uac) 10.202.1.2 ── 10.202.1.1 kamailio (this ns, the attached cgroup) 10.202.2.1 ── 10.202.2.2 callee ns (sipp uas)
//! ```
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

const CALLER: &str = "10.202.1.2";
const KAMAILIO: &str = "10.202.1.1";
const KAMAILIO_CALLEE_SIDE: &str = "10.202.2.1";
const CALLEE: &str = "10.202.2.2";
const CALLEE_PORT: u16 = 5062;
const TOKEN: &str = "tcpka-bench-token-0123456789abcdef";
const EVAPI: &str = "127.0.0.1:8448";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Tcpops,
    Evapi,
    HttpPooled,
    Http,
    Cli,
}

impl Mode {
    /// Whether the variant talks to `tcpka serve`.
    fn serve(self) -> bool {
        matches!(self, Mode::Evapi | Mode::HttpPooled | Mode::Http)
    }

    /// Whether the variant is tcpka's (compared with tcpops).
    fn tcpka(self) -> bool {
        self.serve() || self == Mode::Cli
    }
}

const MODES: [(Mode, &str); 6] = [
    (Mode::None, "no keepalive"),
    (Mode::Tcpops, "tcpops (in-process, the reference)"),
    (Mode::Evapi, "tcpka over evapi"),
    (Mode::HttpPooled, "tcpka HTTP, kept-alive (http_connect)"),
    (Mode::Http, "tcpka HTTP, a connection per request"),
    (Mode::Cli, "tcpka CLI via exec_cmd"),
];

/// The CLI variant's offered rate at most: a process per command, four per
/// call, blocking a Kamailio worker each; far above this it fails calls.
const CLI_RATE: usize = 40;

/// The variants named on the command line (all when none is).
fn parse_modes(names: &[String]) -> Result<Vec<Mode>> {
    if names.is_empty() {
        return Ok(MODES.iter().map(|m| m.0).collect());
    }
    names
        .iter()
        .map(|n| match n.as_str() {
            "none" => Ok(Mode::None),
            "tcpops" => Ok(Mode::Tcpops),
            "evapi" => Ok(Mode::Evapi),
            "http-pooled" => Ok(Mode::HttpPooled),
            "http" => Ok(Mode::Http),
            "cli" => Ok(Mode::Cli),
            other => bail!(
                "unknown Kamailio bench variant {other:?} (none, tcpops, evapi, http-pooled, http, cli)"
            ),
        })
        .collect()
}

/// One run of one variant.
struct Sample {
    offered: usize,
    calls: usize,
    rate: f64,
    failed: u64,
    kamailio_ms_per_call: f64,
    /// `tcpka serve`'s CPU per command, or the CLI processes' (four
    /// commands per call).
    tcpka_ms_per_command: Option<f64>,
    enables_ok: Option<u64>,
}

/// A child killed with its process group on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command) -> Result<Proc> {
    use std::os::unix::process::CommandExt as _;
    Ok(Proc(
        cmd.process_group(0)
            .spawn()
            .with_context(|| format!("{cmd:?}"))?,
    ))
}

fn sh(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0]).args(&args[1..]).status()?;
    if !st.success() {
        bail!("{args:?} failed");
    }
    Ok(())
}

/// The namespaces, links and files of the setup; removed on drop.
struct Setup {
    caller: String,
    callee: String,
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for ns in [&self.caller, &self.callee] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn link(ns: &str, ours: &str, theirs: &str, our_ip: &str, their_ip: &str) -> Result<()> {
    sh(&[
        "ip", "link", "add", ours, "type", "veth", "peer", "name", theirs, "netns", ns,
    ])?;
    sh(&["ip", "addr", "add", &format!("{our_ip}/24"), "dev", ours])?;
    sh(&["ip", "link", "set", ours, "up"])?;
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{their_ip}/24"),
        "dev",
        theirs,
    ])?;
    sh(&["ip", "-n", ns, "link", "set", theirs, "up"])?;
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"])
}

/// The example config with this setup's addresses and the bench's values.
fn config(root: &Path, dir: &Path, tcpka: &Path, api: &str) -> Result<PathBuf> {
    let mut text = std::fs::read_to_string(root.join("examples/kamailio/kamailio.cfg"))?;
    let mut subst = |name: &str, value: &str| -> Result<()> {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("#!substdef \"!{name}!")))
            .with_context(|| format!("{name} in the example config"))?
            .to_owned();
        text = text.replace(&line, &format!("#!substdef \"!{name}!{value}!g\""));
        Ok(())
    };
    subst("TCPKA_BIN", &tcpka.display().to_string())?;
    subst("TCPKA_API", &format!("http://{api}"))?;
    subst("TCPKA_TOKEN", TOKEN)?;
    subst("TCPKA_HTTPCON", &format!("http://tcpka:{TOKEN}@{api}"))?;
    subst("EVENTS_TOKEN", TOKEN)?;
    subst(
        "CALLEE",
        &format!("sip:{CALLEE}:{CALLEE_PORT};transport=tcp"),
    )?;
    subst("SIP_LISTEN", &format!("tcp:{KAMAILIO}:5060"))?;
    subst("CTL_SOCKET", &format!("unix:{}", dir.join("ctl").display()))?;
    let path = dir.join("kamailio.cfg");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// CPU time (user + system) of every process in process group `pgrp`.
fn group_cpu(pgrp: u32) -> Duration {
    group_ticks(pgrp, 11)
}

/// CPU time of the children the processes of `pgrp` have waited for
/// (Kamailio's exec_cmd: the shell and the tcpka it runs).
fn group_children_cpu(pgrp: u32) -> Duration {
    group_ticks(pgrp, 13)
}

/// Fields `at` and `at + 1` of /proc/PID/stat (after the command), summed
/// over the processes of `pgrp`.
fn group_ticks(pgrp: u32, at: usize) -> Duration {
    let tick = 1.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis: state is 3, pgrp
        // 5, utime 14, stime 15 (1-based, as proc(5) counts them).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(2).and_then(|p| p.parse::<u32>().ok()) != Some(pgrp) {
            continue;
        }
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += n(at) + n(at + 1);
    }
    Duration::from_secs_f64(ticks as f64 * tick)
}

/// Every command serve has finished (`tcpka_commands_total`, all results).
fn commands_done(api: &str) -> Result<u64> {
    let out = Command::new("curl")
        .args(["-s", "-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg(format!("http://{api}/metrics"))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("tcpka_commands_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// `tcpka_commands_total{op="enable",result="ok"}` from serve's metrics.
fn enables_ok(api: &str) -> Result<u64> {
    let out = Command::new("curl")
        .args(["-s", "-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg(format!("http://{api}/metrics"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("tcpka_commands_total")
                && l.contains("op=\"enable\"")
                && l.contains("result=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// The bench's own installation and cgroup, removed on drop.
struct Installation {
    tcpka: PathBuf,
    pin_dir: PathBuf,
    cgroup: PathBuf,
}

impl Drop for Installation {
    fn drop(&mut self) {
        crate::bench::unload(&self.tcpka, &self.pin_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Runs the bench in `cgroup_root` (a cgroup of its own below it) and
/// prints its table. The caller runs in a network namespace of its own.
#[allow(clippy::too_many_arguments)]
pub fn run(
    root: &Path,
    tcpka: &Path,
    cgroup_root: &Path,
    home: &Path,
    calls: usize,
    rate: usize,
    rounds: usize,
    modes: &[String],
) -> Result<()> {
    let wanted = parse_modes(modes)?;
    let id = std::process::id();
    let inst = Installation {
        tcpka: tcpka.to_path_buf(),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/tcpka-bench-sip-{id}")),
        cgroup: cgroup_root.join(format!("tcpka-bench-sip-{id}")),
    };
    std::fs::create_dir(&inst.cgroup).context("create the SIP bench's cgroup")?;
    let (pin_dir, cgroup) = (&inst.pin_dir, &inst.cgroup);
    for t in ["kamailio", "sipp", "curl"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("{t} is not installed (cargo xtask setup installs it)");
        }
    }
    let setup = Setup {
        caller: format!("tcpka-bench-caller-{id}"),
        callee: format!("tcpka-bench-callee-{id}"),
        dir: std::env::temp_dir().join(format!("tcpka-bench-sip-{id}")),
    };
    std::fs::create_dir_all(&setup.dir)?;
    for ns in [&setup.caller, &setup.callee] {
        sh(&["ip", "netns", "add", ns])?;
    }
    link(&setup.caller, "kbca0", "kbca1", KAMAILIO, CALLER)?;
    link(
        &setup.callee,
        "kbcb0",
        "kbcb1",
        KAMAILIO_CALLEE_SIDE,
        CALLEE,
    )?;
    // The SIP ports of this setup are the index ports, as a deployment
    // sets them.
    let st = Command::new(tcpka)
        .env("TCPKA_PIN_DIR", pin_dir)
        .args(["load", "--cgroup"])
        .arg(cgroup)
        .args(["--index-ports", &format!("5060,{CALLEE_PORT}")])
        .output()?;
    if !st.status.success() {
        bail!("tcpka load: {}", String::from_utf8_lossy(&st.stderr));
    }
    let api = "127.0.0.1:7177";
    let cfg = config(root, &setup.dir, tcpka, api)?;

    println!(
        "Kamailio per call ({calls} calls at {rate} calls/s offered, zero hold, keepalive on both legs \
         from the 200 OK to the INVITE to the 200 OK to the BYE; {rounds} rounds, medians):"
    );
    let mut samples: Vec<Vec<Sample>> = MODES.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (mode, name)) in MODES.iter().enumerate() {
            if !wanted.contains(mode) {
                continue;
            }
            // The CLI runs as long as the others, at a rate it can carry.
            let (calls, rate) = match mode {
                Mode::Cli if rate > CLI_RATE => ((calls * CLI_RATE / rate).max(1), CLI_RATE),
                _ => (calls, rate),
            };
            eprint!("bench: Kamailio, round {}/{rounds}, {name}…", round + 1);
            let s = measure(
                *mode, &setup, &cfg, tcpka, pin_dir, cgroup, home, api, calls, rate,
            )
            .with_context(|| format!("{name}, round {}", round + 1))?;
            eprintln!(" {:.1} calls/s", s.rate);
            samples[i].push(s);
        }
    }
    println!(
        "  {:<38} {:>7} {:>8} {:>7} {:>16} {:>16} {:>12}",
        "", "offered", "calls/s", "failed", "Kamailio ms/call", "tcpka ms/command", "enables ok"
    );
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut reference = None;
    for (i, (mode, name)) in MODES.iter().enumerate() {
        let s = &samples[i];
        if s.is_empty() {
            continue;
        }
        let rate = med(s.iter().map(|x| x.rate).collect());
        let cpu = med(s.iter().map(|x| x.kamailio_ms_per_call).collect());
        if *mode == Mode::Tcpops {
            reference = Some((rate, cpu));
        }
        let failed: u64 = s.iter().map(|x| x.failed).sum();
        let tcpka = s
            .iter()
            .filter_map(|x| x.tcpka_ms_per_command)
            .collect::<Vec<_>>();
        let tcpka = if tcpka.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.3}", med(tcpka))
        };
        let enables = match s.iter().map(|x| x.enables_ok).collect::<Option<Vec<_>>>() {
            Some(v) => format!(
                "{}/{}",
                v.iter().sum::<u64>(),
                s.iter().map(|x| 2 * x.calls).sum::<usize>()
            ),
            None => "-".into(),
        };
        let offered = s[0].offered;
        println!(
            "  {name:<38} {offered:>7} {rate:>8.1} {failed:>7} {cpu:>16.3} {tcpka:>16} {enables:>12}"
        );
    }
    if let Some((rate0, cpu0)) = reference {
        for (i, (mode, name)) in MODES.iter().enumerate() {
            let s = &samples[i];
            if !mode.tcpka() || s.is_empty() {
                continue;
            }
            let rate = med(s.iter().map(|x| x.rate).collect());
            let cpu = med(s.iter().map(|x| x.kamailio_ms_per_call).collect());
            if s[0].offered == samples[1].first().map_or(0, |t| t.offered) {
                println!(
                    "  {name}: {:.2}x tcpops' call rate, {:.2}x its Kamailio CPU per call",
                    rate / rate0,
                    cpu / cpu0
                );
            } else {
                println!(
                    "  {name}: offered {} calls/s (tcpops {}); {:.2}x tcpops' Kamailio CPU per call",
                    s[0].offered,
                    samples[1].first().map_or(0, |t| t.offered),
                    cpu / cpu0
                );
            }
        }
    }
    println!();
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn measure(
    mode: Mode,
    setup: &Setup,
    cfg: &Path,
    tcpka: &Path,
    pin_dir: &Path,
    cgroup: &Path,
    home: &Path,
    api: &str,
    calls: usize,
    rate: usize,
) -> Result<Sample> {
    let log = setup.dir.join("kamailio.log");
    let serve = match mode {
        m if m.serve() => {
            let mut c = Command::new(tcpka);
            c.env("TCPKA_PIN_DIR", pin_dir)
                .env("TCPKA_TOKEN", TOKEN)
                .args(["serve", "--listen", api, "--cgroup"])
                .arg(cgroup)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if mode == Mode::Evapi {
                c.args(["--evapi", EVAPI]);
            }
            let p = spawn(&mut c)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while enables_ok(api).is_err() || std::net::TcpStream::connect(api).is_err() {
                if Instant::now() > deadline {
                    bail!("tcpka serve did not come up");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(p)
        }
        _ => None,
    };
    let mut k = Command::new("kamailio");
    // Shared memory for the transactions and dialogs of thousands of calls
    // (Kamailio's default of 64 MB runs out past about 3,500 quick calls).
    k.args(["-DD", "-E", "-m", "512", "-f"])
        .arg(cfg)
        .arg("-w")
        .arg(&setup.dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    match mode {
        Mode::None => k.args(["-A", "WITHOUT_KEEPALIVE"]),
        Mode::Tcpops => k.args(["-A", "WITH_TCPOPS"]),
        Mode::Evapi => k.args(["-A", "WITH_TCPKA_EVAPI"]),
        Mode::HttpPooled => k.args(["-A", "WITH_TCPKA_HTTP_POOLED"]),
        Mode::Http => k.args(["-A", "WITH_TCPKA_HTTP"]),
        // The example config's default: the CLI through exec_cmd.
        Mode::Cli => k.env("TCPKA_PIN_DIR", pin_dir),
    };
    // Kamailio runs in the attached cgroup, as its service would.
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
    let kamailio = spawn(&mut k);
    std::fs::write(home.join("cgroup.procs"), std::process::id().to_string())?;
    let kamailio = kamailio?;
    let _uas = spawn(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &setup.callee,
                "sipp",
                "-sn",
                "uas",
                "-t",
                "t1",
            ])
            .args(["-i", CALLEE, "-p", &CALLEE_PORT.to_string(), "-nostdin"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let up = std::net::TcpStream::connect((KAMAILIO, 5060)).is_ok();
        let connected = mode != Mode::Evapi
            || std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("evapi: client");
        if up && connected {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "kamailio did not come up: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let pgrp = kamailio.0.id();
    let serve_pid = serve.as_ref().map(|p| p.0.id());
    let (enables_before, commands_before) = match mode {
        m if m.serve() => (Some(enables_ok(api)?), Some(commands_done(api)?)),
        _ => (None, None),
    };
    let cpu0 = group_cpu(pgrp);
    let children0 = group_children_cpu(pgrp);
    let serve0 = serve_pid.map(group_cpu);
    let stats = setup.dir.join("uac.csv");
    let _ = std::fs::remove_file(&stats);
    let start = Instant::now();
    let uac = Command::new("ip")
        .args(["netns", "exec", &setup.caller, "sipp"])
        .arg(format!("{KAMAILIO}:5060"))
        .arg("-sf")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace")
                .join("tests/sipp/uac_rr.xml"),
        )
        .args(["-t", "t1", "-i", CALLER, "-s", "callee", "-nostdin"])
        .args(["-m", &calls.to_string(), "-r", &rate.to_string(), "-d", "0"])
        .args(["-timeout", "120s", "-trace_stat", "-fd", "1", "-stf"])
        .arg(&stats)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let elapsed = start.elapsed();
    // Let the last commands (the BYE's disables) finish: serve may still
    // be working through a backlog. Waits until all four per call are done
    // or no more finish for 2 s.
    let mut lag = Duration::ZERO;
    match mode {
        m if m.serve() => {
            let want = commands_before.unwrap_or(0) + 4 * calls as u64;
            let (mut last, mut since) = (0, Instant::now());
            loop {
                let done = commands_done(api)?;
                if done >= want || since.elapsed() > Duration::from_secs(2) {
                    break;
                }
                if done != last {
                    (last, since) = (done, Instant::now());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            lag = start.elapsed() - elapsed;
        }
        _ => std::thread::sleep(Duration::from_millis(500)),
    }
    if lag > Duration::from_millis(200) {
        eprint!(" (serve finished {lag:.1?} after the last call)");
    }
    let cpu = group_cpu(pgrp) - cpu0;
    let children = group_children_cpu(pgrp) - children0;
    let serve_cpu = serve_pid.zip(serve0).map(|(p, c0)| group_cpu(p) - c0);
    let (ok, failed) = call_counts(&stats)?;
    if !uac.success() && failed == 0 {
        bail!("sipp exited with {uac} and no failed call counted");
    }
    let enables = match (mode, enables_before) {
        (m, Some(b)) if m.serve() => Some(enables_ok(api)? - b),
        _ => None,
    };
    if enables.is_some_and(|n| n < 2 * calls as u64) {
        // Say where the others went: serve's commands by result.
        let out = Command::new("curl")
            .args(["-s", "-H", &format!("Authorization: Bearer {TOKEN}")])
            .arg(format!("http://{api}/metrics"))
            .output()?;
        for l in String::from_utf8_lossy(&out.stdout).lines().filter(|l| {
            l.starts_with("tcpka_commands_total") || l.starts_with("tcpka_errors_total")
        }) {
            eprintln!("  {l}");
        }
        // And what Kamailio saw of them.
        for l in std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("tcpka enable"))
            .take(3)
        {
            eprintln!("  kamailio: {l}");
        }
    }
    drop(serve);
    drop(kamailio);
    let _ = std::io::stderr().flush();
    let tcpka_cpu = match mode {
        Mode::Cli => Some(children),
        _ => serve_cpu,
    };
    Ok(Sample {
        offered: rate,
        calls,
        rate: ok as f64 / elapsed.as_secs_f64(),
        failed,
        kamailio_ms_per_call: cpu.as_secs_f64() * 1000.0 / calls as f64,
        tcpka_ms_per_command: tcpka_cpu.map(|c| c.as_secs_f64() * 1000.0 / (4 * calls) as f64),
        enables_ok: enables,
    })
}

/// Successful and failed calls from sipp's statistics file (its last
/// line, cumulative columns).
fn call_counts(path: &Path) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let header: Vec<&str> = lines
        .first()
        .context("empty sipp statistics")?
        .split(';')
        .collect();
    let last: Vec<&str> = lines[1..]
        .last()
        .context("no sipp statistics line")?
        .split(';')
        .collect();
    let col = |name: &str| -> Result<u64> {
        let i = header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("{name} in sipp's statistics"))?;
        Ok(last.get(i).and_then(|v| v.trim().parse().ok()).unwrap_or(0))
    };
    Ok((col("SuccessfulCall(C)")?, col("FailedCall(C)")?))
}
