//! One variant's round: Kamailio between the sipp caller and callee, the
//! call counts, and the CPU of Kamailio and of tcpka.
use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    setup::{spawn, Setup},
    time_wait::TimeWait,
    Mode, Results, Sample, Shape, CALLEE, CALLEE_PORT, CALLER, EVAPI, KAMAILIO, TOKEN,
};

#[allow(clippy::too_many_arguments)]
pub(super) fn measure(
    mode: Mode,
    shape: &Shape,
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
    let (commands_before, by_result_before, walks_before) = match mode {
        m if m.serve() => (
            Some(commands_done(api)?),
            Some(commands_by_result(api)?),
            Some(walks(api)?),
        ),
        _ => (None, None, None),
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
        .args([
            "-t",
            shape.transport,
            "-i",
            CALLER,
            "-s",
            "callee",
            "-nostdin",
        ])
        // sipp refuses tn unless its socket cap is below the open-file limit.
        .args(["-max_socket", "10000"])
        .args(["-m", &calls.to_string(), "-r", &rate.to_string()])
        .args(["-d", &shape.hold_ms.to_string()])
        .args(["-timeout", "120s", "-trace_stat", "-fd", "1", "-stf"])
        .arg(&stats)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let elapsed = start.elapsed();
    let time_wait = TimeWait::count()?;
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
    let (by_enable, by_disable) = match by_result_before {
        Some(before) => {
            let after = commands_by_result(api)?;
            let of = |op: &str| {
                let n = |result: &str| {
                    let k = (op.to_owned(), result.to_owned());
                    after.get(&k).copied().unwrap_or(0) - before.get(&k).copied().unwrap_or(0)
                };
                let all: u64 = after
                    .iter()
                    .filter(|((o, _), _)| o == op)
                    .map(|(k, v)| v - before.get(k).copied().unwrap_or(0))
                    .sum();
                Results {
                    ok: n("ok"),
                    not_found: n("not_found"),
                    other: all - n("ok") - n("not_found"),
                }
            };
            (Some(of("enable")), Some(of("disable")))
        }
        None => (None, None),
    };
    let walks = match walks_before {
        Some(b) => Some(walks(api)? - b),
        None => None,
    };
    // Holders of calls that all ended: none should be left once their
    // connections closed (a sweep follows a close within a second).
    let holders_left = if mode.tcpka() {
        std::thread::sleep(Duration::from_millis(1500));
        Some(holders_total(tcpka, pin_dir)?)
    } else {
        None
    };
    drop(serve);
    drop(kamailio);
    let _ = std::io::stderr().flush();
    let tcpka_cpu = match mode {
        Mode::Cli => Some(children),
        _ => serve_cpu,
    };
    Ok(Sample {
        offered: rate,
        rate: ok as f64 / elapsed.as_secs_f64(),
        failed,
        kamailio_ms_per_call: cpu.as_secs_f64() * 1000.0 / calls as f64,
        tcpka_ms_per_command: tcpka_cpu.map(|c| c.as_secs_f64() * 1000.0 / (4 * calls) as f64),
        enables: by_enable,
        disables: by_disable,
        holders_left,
        backlog: lag,
        walks,
        time_wait,
    })
}

/// Successful and failed calls from sipp's statistics file (its last
/// line, cumulative columns).
pub(super) fn call_counts(path: &Path) -> Result<(u64, u64)> {
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

/// CPU time (user + system) of every process in process group `pgrp`.
pub(super) fn group_cpu(pgrp: u32) -> Duration {
    group_ticks(pgrp, 11)
}

/// CPU time of the children the processes of `pgrp` have waited for
/// (Kamailio's exec_cmd: the shell and the tcpka it runs).
pub(super) fn group_children_cpu(pgrp: u32) -> Duration {
    group_ticks(pgrp, 13)
}

/// Fields `at` and `at + 1` of /proc/PID/stat (after the command), summed
/// over the processes of `pgrp`.
pub(super) fn group_ticks(pgrp: u32, at: usize) -> Duration {
    // SAFETY: sysconf(3) takes a plain integer name and touches no memory of
    // ours.
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

/// serve's metrics, as text.
pub(super) fn metrics(api: &str) -> Result<String> {
    let out = Command::new("curl")
        .args(["-s", "-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg(format!("http://{api}/metrics"))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every command serve has finished (`tcpka_commands_total`, all results).
pub(super) fn commands_done(api: &str) -> Result<u64> {
    Ok(metrics(api)?
        .lines()
        .filter(|l| l.starts_with("tcpka_commands_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// `tcpka_commands_total{op="enable",result="ok"}` from serve's metrics.
pub(super) fn enables_ok(api: &str) -> Result<u64> {
    Ok(metrics(api)?
        .lines()
        .filter(|l| {
            l.starts_with("tcpka_commands_total")
                && l.contains("op=\"enable\"")
                && l.contains("result=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// serve's finished commands by (op, result), from its metrics.
pub(super) fn commands_by_result(
    api: &str,
) -> Result<std::collections::HashMap<(String, String), u64>> {
    let mut by = std::collections::HashMap::new();
    for l in metrics(api)?.lines() {
        let Some(rest) = l.strip_prefix("tcpka_commands_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .map(|v| v.trim_matches('"').to_owned())
        };
        if let (Some(op), Some(result), Ok(n)) =
            (label("op"), label("result"), value.trim().parse::<u64>())
        {
            by.insert((op, result), n);
        }
    }
    Ok(by)
}

/// Holder entries in the installation (`tcpka info --json`).
pub(super) fn holders_total(tcpka: &Path, pin_dir: &Path) -> Result<u64> {
    let out = Command::new(tcpka)
        .env("TCPKA_PIN_DIR", pin_dir)
        .args(["info", "--json"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("tcpka info --json")?;
    v["holders"]["count"]
        .as_u64()
        .context("no holder count in tcpka info")
}

/// Walks of the socket table serve did so far (`tcpka_lookups_total{path="walk"}`).
pub(super) fn walks(api: &str) -> Result<u64> {
    Ok(metrics(api)?
        .lines()
        .find(|l| l.starts_with("tcpka_lookups_total{path=\"walk\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0))
}
