//! Kamailio driving keepalive per call, at a call rate: the example
//! config (`examples/kamailio/kamailio.cfg`) between sipp's UAC and UAS over
//! TCP, in namespaces of its own, with keepalive enabled on both legs at
//! the 200 OK to the INVITE and disabled at the BYE (the end of its dialog), in each
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
//! In each traffic shape ([`SHAPES`]: a trunk carrying every call, a
//! connection per phone closed as its call ends, and the same with calls
//! held 1 s), each round runs every variant once, in turn; the figures are
//! medians over the rounds: calls/s achieved, failed calls, Kamailio's CPU
//! per call and tcpka's CPU per command (four per call: `tcpka serve`'s, or
//! the CLI processes'); and, from serve's own counts, its enables and
//! disables by result (applied, not found, refused), the holder entries
//! left once every call ended, how long serve still worked after the last
//! call, and the walks of the socket table (the CLI's exit codes are not
//! collected).
//!
//! ```text
//!  caller ns (sipp uac) 10.202.1.2 ── 10.202.1.1 kamailio (this ns, the attached cgroup) 10.202.2.1 ── 10.202.2.2 callee ns (sipp uas)
//! ```
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

mod measure;
mod setup;
mod time_wait;
use measure::measure;
use setup::{config, link, sh, Installation, Setup};
use time_wait::TimeWait;

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

/// What the Kamailio bench runs (`cargo xtask bench --sip-*`).
#[derive(Clone, Debug)]
pub struct Options {
    /// Calls per variant and round.
    pub calls: usize,
    /// Calls per second offered.
    pub rate: usize,
    pub rounds: usize,
    /// Variants by name (all when empty).
    pub modes: Vec<String>,
    /// Traffic shapes by name (all when empty).
    pub shapes: Vec<String>,
    /// TIME_WAIT sockets kept in the namespace during every run (0: none
    /// made).
    pub time_wait: usize,
}

/// How the calls reach Kamailio.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Shape {
    key: &'static str,
    name: &'static str,
    /// sipp's transport: t1 (one connection for every call) or tn (one
    /// per call, closed when the call ends).
    transport: &'static str,
    /// How long each call is held before the BYE.
    hold_ms: u32,
}

const SHAPES: [Shape; 3] = [
    Shape {
        key: "trunk",
        name: "a trunk: every call on one caller connection (sipp -t t1), zero hold",
        transport: "t1",
        hold_ms: 0,
    },
    Shape {
        key: "phone",
        name: "a connection per phone: one per call, closed as it ends (sipp -t tn), zero hold",
        transport: "tn",
        hold_ms: 0,
    },
    Shape {
        key: "phone-held",
        name: "a connection per phone, calls held 1 s (commands land on live connections)",
        transport: "tn",
        hold_ms: 1000,
    },
];

fn parse_shapes(names: &[String]) -> Result<Vec<Shape>> {
    if names.is_empty() {
        return Ok(SHAPES.to_vec());
    }
    names
        .iter()
        .map(|n| {
            SHAPES
                .iter()
                .find(|s| s.key == n)
                .copied()
                .with_context(|| format!("unknown traffic shape {n:?} (trunk, phone, phone-held)"))
        })
        .collect()
}

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
    rate: f64,
    failed: u64,
    kamailio_ms_per_call: f64,
    /// `tcpka serve`'s CPU per command, or the CLI processes' (four
    /// commands per call).
    tcpka_ms_per_command: Option<f64>,
    /// serve's commands of the round by result: enables and disables
    /// applied, not found (the connection had closed), refused otherwise.
    enables: Option<Results>,
    disables: Option<Results>,
    /// Holder entries left once the round's calls ended (and a sweep).
    holders_left: Option<u64>,
    /// How long after the last call serve finished its commands.
    backlog: Duration,
    /// Walks of the socket table during the round (the rest took the
    /// index).
    walks: Option<u64>,
    /// TIME_WAIT sockets in the namespace as the last call ended.
    time_wait: usize,
}

/// Commands of one kind by result.
#[derive(Clone, Copy, Default)]
struct Results {
    ok: u64,
    not_found: u64,
    other: u64,
}

/// Runs the bench in `cgroup_root` (a cgroup of its own below it) and
/// prints its table. The caller runs in a network namespace of its own.
#[allow(clippy::too_many_arguments)]
pub fn run(root: &Path, tcpka: &Path, cgroup_root: &Path, home: &Path, o: &Options) -> Result<()> {
    let Options {
        calls,
        rate,
        rounds,
        ..
    } = *o;
    let wanted = parse_modes(&o.modes)?;
    let shapes = parse_shapes(&o.shapes)?;
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
    let mut tw = match o.time_wait {
        0 => None,
        n => Some(TimeWait::new(n)?),
    };

    for shape in &shapes {
        bench_shape(
            shape, &wanted, &setup, &cfg, tcpka, pin_dir, cgroup, home, api, calls, rate, rounds,
            &mut tw,
        )?;
    }
    if let Some(t) = tw.as_mut() {
        t.top_up(Duration::from_secs(10))?;
        miss_cost(tcpka, pin_dir)?;
    }
    println!();
    Ok(())
}

/// What a command for a closed connection costs with the namespace's
/// TIME_WAIT sockets: answered from the index (a SIP port, with `--local`)
/// against a walk of the socket table (no port the index covers). The
/// CLI's wall time, process start included, median of 9 alternating pairs.
fn miss_cost(tcpka: &Path, pin_dir: &Path) -> Result<()> {
    let run = |args: &[&str]| -> Result<Duration> {
        let start = Instant::now();
        let out = Command::new(tcpka)
            .env("TCPKA_PIN_DIR", pin_dir)
            .arg("disable")
            .args(args)
            .output()?;
        let took = start.elapsed();
        if out.status.success() {
            bail!("tcpka disable {args:?} found a connection");
        }
        Ok(took)
    };
    let (mut index, mut walk) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        index.push(run(&[
            &format!("{CALLER}:1"),
            "--local",
            &format!("{KAMAILIO}:5060"),
        ])?);
        walk.push(run(&[&format!("{CALLER}:1")])?);
    }
    index.sort();
    walk.sort();
    println!(
        "A disable for a closed connection with {} TIME_WAIT sockets in the namespace (tcpka CLI, \
         wall time with its start, median of 9 pairs): from the index {:.1} ms, by a walk of the \
         socket table {:.1} ms",
        TimeWait::count()?,
        index[4].as_secs_f64() * 1e3,
        walk[4].as_secs_f64() * 1e3
    );
    Ok(())
}

/// Every wanted variant in one traffic shape, `rounds` times; prints the
/// shape's table.
#[allow(clippy::too_many_arguments)]
fn bench_shape(
    shape: &Shape,
    wanted: &[Mode],
    setup: &Setup,
    cfg: &Path,
    tcpka: &Path,
    pin_dir: &Path,
    cgroup: &Path,
    home: &Path,
    api: &str,
    calls: usize,
    rate: usize,
    rounds: usize,
    tw: &mut Option<TimeWait>,
) -> Result<()> {
    let tw_line = match tw {
        Some(t) => format!(
            "; at least {} TIME_WAIT sockets in the namespace through every run",
            t.target()
        ),
        None => String::new(),
    };
    println!(
        "Kamailio per call, {} ({calls} calls at {rate} calls/s offered, keepalive on both legs \
         from the 200 OK to the INVITE to the BYE{tw_line}; {rounds} rounds, medians):",
        shape.name
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
            if let Some(t) = tw.as_mut() {
                // The calls, with Kamailio's start and serve's last
                // commands around them.
                t.top_up(Duration::from_secs_f64(calls as f64 / rate as f64 + 20.0))?;
            }
            eprint!(
                "bench: Kamailio, {}, round {}/{rounds}, {name}…",
                shape.key,
                round + 1
            );
            let s = measure(
                *mode, shape, setup, cfg, tcpka, pin_dir, cgroup, home, api, calls, rate,
            )
            .with_context(|| format!("{name}, {}, round {}", shape.key, round + 1))?;
            eprintln!(" {:.1} calls/s", s.rate);
            samples[i].push(s);
        }
    }
    println!(
        "  {:<38} {:>7} {:>8} {:>6} {:>9} {:>10} {:>17} {:>17} {:>7} {:>7} {:>6} {:>7}",
        "",
        "offered",
        "calls/s",
        "failed",
        "Kam ms/c",
        "tcpka ms/c",
        "enables ok/nf/ref",
        "disables ok/nf/rf",
        "holders",
        "backlog",
        "walks",
        "TW end"
    );
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let sum = |v: &[Sample], f: &dyn Fn(&Sample) -> Option<Results>| -> String {
        match v.iter().map(f).collect::<Option<Vec<_>>>() {
            Some(r) => format!(
                "{}/{}/{}",
                r.iter().map(|x| x.ok).sum::<u64>(),
                r.iter().map(|x| x.not_found).sum::<u64>(),
                r.iter().map(|x| x.other).sum::<u64>()
            ),
            None => "-".into(),
        }
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
            reference = Some((rate, cpu, s[0].offered));
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
        let holders = match s.iter().map(|x| x.holders_left).collect::<Option<Vec<_>>>() {
            Some(v) => v.iter().max().copied().unwrap_or(0).to_string(),
            None => "-".into(),
        };
        let backlog = s.iter().map(|x| x.backlog).max().unwrap_or_default();
        let walks = match s.iter().map(|x| x.walks).collect::<Option<Vec<_>>>() {
            Some(v) => v.iter().sum::<u64>().to_string(),
            None => "-".into(),
        };
        let offered = s[0].offered;
        let tw_end = s.iter().map(|x| x.time_wait).min().unwrap_or(0);
        println!(
            "  {name:<38} {offered:>7} {rate:>8.1} {failed:>6} {cpu:>9.3} {tcpka:>10} {:>17} {:>17} {holders:>7} {:>6.1}s {walks:>6} {tw_end:>7}",
            sum(s, &|x| x.enables),
            sum(s, &|x| x.disables),
            backlog.as_secs_f64()
        );
    }
    // Medians hide a drift: serve's cost per command round by round.
    for (i, (mode, name)) in MODES.iter().enumerate() {
        let s = &samples[i];
        if !mode.serve() || s.is_empty() {
            continue;
        }
        let by_round: Vec<String> = s
            .iter()
            .filter_map(|x| x.tcpka_ms_per_command)
            .map(|c| format!("{c:.3}"))
            .collect();
        println!(
            "  {name}: serve ms/command by round: {}",
            by_round.join(", ")
        );
    }
    if let Some((rate0, cpu0, offered0)) = reference {
        for (i, (mode, name)) in MODES.iter().enumerate() {
            let s = &samples[i];
            if !mode.tcpka() || s.is_empty() {
                continue;
            }
            let rate = med(s.iter().map(|x| x.rate).collect());
            let cpu = med(s.iter().map(|x| x.kamailio_ms_per_call).collect());
            if s[0].offered == offered0 {
                println!(
                    "  {name}: {:.2}x tcpops' call rate, {:.2}x its Kamailio CPU per call",
                    rate / rate0,
                    cpu / cpu0
                );
            } else {
                println!(
                    "  {name}: offered {} calls/s (tcpops {offered0}); {:.2}x tcpops' Kamailio CPU per call",
                    s[0].offered,
                    cpu / cpu0
                );
            }
        }
    }
    println!(
        "  (holders: entries left after the round, of calls that all ended; backlog: how long \
         serve still worked after the last call; nf: the connection had closed; TW end: the fewest TIME_WAIT sockets in the namespace \
         as a round's last call ended)"
    );
    println!();
    Ok(())
}
