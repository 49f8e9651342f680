//! `cargo xtask bench cost`: what tcpka costs every other process on the
//! host, as ratios to no program and to an empty one.
use std::{
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::{cookie, kamailio::own_cgroup, load, thread_cpu, time_cmd, SIP_PORT};

/// What tcpka costs the rest of the host, as ratios of CPU time from
/// alternating pairs in one run.
///
/// Host-wide (what a process outside the attached cgroup pays): each pair
/// measures without tcpka and with it loaded with a rule, in alternating
/// order so that drift cancels, and the ratio is taken within the pair:
/// - a `getppid()` loop (time with / without: 1.00 is free);
/// - connection setup: connect, accept, close on loopback (rate with /
///   without: 1.00 is free).
///
/// In the attached cgroup: while loaded, the process moves between its own
/// cgroup and the attached one, [`ROUNDS`] times per pair, so that each
/// ratio compares measurements a fraction of a second apart (the machine's
/// drift between a load and an unload is larger than the effect):
/// connection setup in each of [`CASES`]: on a port nobody names; a SIP
/// server's end (index port and rule); a rule, tracked or untracked, at the
/// server's end only (what a host sees of a connection: one end); and at
/// both ends, as loopback has them.
///
/// Their product with the host-wide ratio is the cost relative to no
/// tcpka at all.
pub fn host_cost(
    tcpka: &Path,
    pin_dir: &Path,
    cgroup: &Path,
    floor_cgroup: &Path,
    pairs: usize,
) -> Result<()> {
    const CALLS: usize = 2_000_000;
    const CONNS: usize = 4000;
    const ROUNDS: usize = 5;
    let home = own_cgroup()?;
    let me = std::process::id().to_string();
    let enter = |dir: &Path| std::fs::write(dir.join("cgroup.procs"), &me);
    // In a cgroup for one measurement, back home whatever it returned.
    let inside_of = |dir: &Path, f: &dyn Fn() -> Result<f64>| -> Result<f64> {
        enter(dir)?;
        let r = f();
        enter(&home)?;
        r
    };
    let inside = |f: &dyn Fn() -> Result<f64>| inside_of(cgroup, f);
    // Warm up: the first connections and calls of a process are slower.
    let _ = churn_rate(CONNS)?;
    let _ = syscall_ns(CALLS);
    let (mut sys, mut outside) = (Vec::new(), Vec::new());
    let mut in_cgroup: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    let mut floor = Vec::new();
    for i in 0..pairs {
        eprint!("\rbench: host cost, pair {}/{pairs}…", i + 1);
        let mut off = |()| -> Result<(f64, f64)> {
            let _ = churn_rate(CONNS / 4)?;
            let r = (syscall_ns(CALLS), churn_rate(CONNS)?);
            // tcpka not loaded: the empty program's cgroup vs home.
            for _ in 0..ROUNDS {
                let out = churn_rate_on(CONNS, OTHER_PORT)?;
                let inn = inside_of(floor_cgroup, &|| churn_rate_on(CONNS, OTHER_PORT))?;
                floor.push(inn / out);
            }
            Ok(r)
        };
        let mut on = |()| -> Result<(f64, f64)> {
            load(tcpka, pin_dir, cgroup)?;
            time_cmd(
                tcpka,
                pin_dir,
                &["rule", "add", "--local-port", "1", "60", "5", "5"],
            )?;
            // Loading is heavy work (BTF, verifier, seeding): let it settle,
            // then the same warm-up as without.
            std::thread::sleep(Duration::from_millis(300));
            let _ = churn_rate(CONNS / 4)?;
            let r = (syscall_ns(CALLS), churn_rate(CONNS)?);
            let rounds = |into: &mut Vec<f64>, port: u16| -> Result<()> {
                for _ in 0..ROUNDS {
                    let out = churn_rate_on(CONNS, port)?;
                    let inn = inside(&|| churn_rate_on(CONNS, port))?;
                    into.push(inn / out);
                }
                Ok(())
            };
            let per_case = in_each_case(tcpka, pin_dir, |port| {
                let mut v = Vec::new();
                rounds(&mut v, port)?;
                Ok(v)
            })?;
            for (all, v) in in_cgroup.iter_mut().zip(per_case) {
                all.extend(v);
            }
            time_cmd(tcpka, pin_dir, &["unload"])?;
            Ok(r)
        };
        let ((s0, c0), (s1, c1)) = if i % 2 == 0 {
            let a = off(())?;
            (a, on(())?)
        } else {
            let b = on(())?;
            (off(())?, b)
        };
        sys.push(s0 / s1);
        outside.push(c1 / c0);
    }
    eprintln!();
    let line = |what: &str, v: &[f64]| {
        let (lo, hi) = range(v);
        println!(
            "  {what:<58} {:>6.3}  (range {lo:.3}–{hi:.3})",
            median(v.to_vec())
        );
    };
    println!(
        "host cost (CPU time; {pairs} alternating pairs, {} rounds in the cgroup; 1.000 is free, lower is slower):",
        pairs * ROUNDS
    );
    println!(" every process on the host (loaded with a rule, vs not loaded):");
    line("getppid() calls per CPU second", &sys);
    line("connection setups per CPU second", &outside);
    println!(" processes in the attached cgroup (vs outside it, while loaded):");
    line(FLOOR, &floor);
    for ((what, _, _), v) in CASES.iter().zip(&in_cgroup) {
        line(what, v);
    }
    let host = median(outside.clone());
    println!(" processes in the attached cgroup, vs not loaded (product of medians):");
    for ((what, _, _), v) in CASES.iter().zip(&in_cgroup) {
        println!("  {what:<58} {:>6.3}", host * median(v.clone()));
    }
    println!();
    Ok(())
}

/// The first row of the cgroup measurements: what any sock_ops program
/// costs, measured in a cgroup of its own.
pub(super) const FLOOR: &str = "floor: an empty sock_ops program (not tcpka)";

/// The cases measured in the attached cgroup: what each is called, the
/// rules added before it (on top of the earlier cases' rules, so each new
/// one must be the best match for its port) and the listener's port.
pub(super) const CASES: [(&str, &[&[&str]], u16); 6] = [
    ("no rule and no index port", &[], OTHER_PORT),
    (
        "rule + index port at the server's end (a SIP server)",
        &[&["--local-port", "5060"]],
        SIP_PORT,
    ),
    (
        "rule at the server's end",
        &[&["--local-port", "5091"]],
        5091,
    ),
    (
        "--tracked rule at the server's end",
        &[&["--tracked", "--local-port", "5092"]],
        5092,
    ),
    (
        "rule at both ends",
        &[&["--local-port", "5093"], &["--remote-port", "5093"]],
        5093,
    ),
    ("--tracked rule at both ends", &[&["--tracked"]], OTHER_PORT),
];

/// Runs `measure(port)` in each of [`CASES`], in order, on an installation
/// that starts with a rule that matches nothing.
pub(super) fn in_each_case<T>(
    tcpka: &Path,
    pin_dir: &Path,
    mut measure: impl FnMut(u16) -> Result<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (_, rules, port) in CASES {
        for m in rules {
            let mut args = vec!["rule", "add"];
            args.extend_from_slice(m);
            args.extend_from_slice(&["60", "5", "5"]);
            time_cmd(tcpka, pin_dir, &args)?;
        }
        out.push(measure(port)?);
    }
    Ok(out)
}

/// Turns on the kernel's run-time statistics of BPF programs
/// (`BPF_ENABLE_STATS`) for as long as the returned descriptor is open.
pub(super) fn enable_bpf_stats() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr { struct { __u32 type; } enable_stats; }: BPF_STATS_RUN_TIME = 0.
    let attr = [0u8; 8];
    // SAFETY: a zeroed bpf_attr of the given size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Total run time (ns) and runs of the installation's programs that run
/// on connections: sock_ops, and the state and destroy tracepoints when
/// attached.
pub(super) fn programs_runtime(pin_dir: &Path) -> Result<(u64, u64)> {
    let (mut ns, mut runs) = (0, 0);
    for link in ["link_sockops", "link_close", "link_destroy"] {
        let pin = pin_dir.join(link);
        if pin.exists() {
            let (n, r) = link_runtime(&pin)?;
            ns += n;
            runs += r;
        }
    }
    Ok((ns, runs))
}

/// The kernel's own count of the time spent in tcpka's programs per
/// connection setup (both ends), for the cases of [`host_cost`]:
/// absolute, and free of the machine's noise. Statistics add a clock
/// read to each run, so these figures are slightly high.
pub(super) fn program_time(
    tcpka: &Path,
    pin_dir: &Path,
    cgroup: &Path,
    floor_cgroup: &Path,
    floor: &crate::floor::EmptySockOps,
) -> Result<()> {
    const CONNS: usize = 5000;
    let home = own_cgroup()?;
    let me = std::process::id().to_string();
    load(tcpka, pin_dir, cgroup)?;
    let result = (|| -> Result<()> {
        time_cmd(
            tcpka,
            pin_dir,
            &["rule", "add", "--local-port", "1", "60", "5", "5"],
        )?;
        let stats = enable_bpf_stats()?;
        let base = churn_rate(CONNS)?;
        let per_setup = |before: (u64, u64), after: (u64, u64)| {
            (
                (after.0 - before.0) as f64 / CONNS as f64,
                (after.1 - before.1) as f64 / CONNS as f64,
            )
        };
        std::fs::write(floor_cgroup.join("cgroup.procs"), &me)?;
        let before = floor.runtime()?;
        let r = churn_rate_on(CONNS, OTHER_PORT);
        let after = floor.runtime();
        std::fs::write(home.join("cgroup.procs"), &me)?;
        let (after, _) = (after?, r?);
        let empty = per_setup(before, after);
        let measure = |port: u16| -> Result<(f64, f64)> {
            std::fs::write(cgroup.join("cgroup.procs"), &me)?;
            let before = programs_runtime(pin_dir)?;
            let r = churn_rate_on(CONNS, port);
            let after = programs_runtime(pin_dir);
            std::fs::write(home.join("cgroup.procs"), &me)?;
            let (after, _) = (after?, r?);
            Ok(per_setup(before, after))
        };
        let per_case = in_each_case(tcpka, pin_dir, measure)?;
        drop(stats);
        println!(
            "time in tcpka's programs per connection setup, in the cgroup (kernel statistics; one setup takes {:.1} µs of CPU here):",
            1e6 / base
        );
        let rows = std::iter::once((FLOOR, empty)).chain(CASES.iter().map(|c| c.0).zip(per_case));
        for (what, (ns, runs)) in rows {
            println!(
                "  {what:<58} {ns:>6.0} ns  ({runs:.0} runs, {:.1}% of a setup)",
                ns * base / 1e7
            );
        }
        println!();
        Ok(())
    })();
    time_cmd(tcpka, pin_dir, &["unload"])?;
    result
}

/// Opens and closes `n` loopback connections; returns connections per
/// CPU second of this thread (loopback delivery runs in the sender's
/// context, so both ends' kernel work is counted).
pub(super) fn churn_rate(n: usize) -> Result<f64> {
    churn_rate_on(n, OTHER_PORT)
}

/// A port no rule and no index port names.
pub(super) const OTHER_PORT: u16 = 5090;

/// [`churn_rate`] with the listener on `port`.
pub(super) fn churn_rate_on(n: usize, port: u16) -> Result<f64> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    let addr = l.local_addr()?;
    let t = thread_cpu();
    for _ in 0..n {
        let c = TcpStream::connect(addr)?;
        let (s, _) = l.accept()?;
        // RST on close: no TIME_WAIT, so the port range never runs out.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt with a valid linger struct.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&c),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        drop(c);
        drop(s);
    }
    Ok(n as f64 / (thread_cpu() - t))
}

/// CPU nanoseconds per `getppid()` over `n` calls: the cheapest syscall,
/// so any per-syscall hook shows.
pub(super) fn syscall_ns(n: usize) -> f64 {
    let t = thread_cpu();
    for _ in 0..n {
        // SAFETY: getppid has no arguments and cannot fail.
        std::hint::black_box(unsafe { libc::getppid() });
    }
    (thread_cpu() - t) * 1e9 / n as f64
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(super) fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// What tcpka's host-wide tracepoints cost every process on the host while
/// attached, from the kernel's statistics: per connection setup (connect,
/// accept, close with a reset: no TIME_WAIT) on a port no one names, by a
/// process outside the attached cgroup. Each beside the floor of an empty
/// program on the same tracepoint.
///
/// - the ports index with connections from before the load still open on
///   an index port: before Linux 6.12 the destroy tracepoint forgets them
///   (on a newer kernel, `TCPKA_CLOSE_BY_TRACEPOINT=1` takes that path);
/// - one of those enabled by a command: the state tracepoint reports its
///   end, behind a port check;
/// - a connection outside the attached cgroup enabled by a command: the
///   state tracepoint reports its end (any kernel);
/// - `--index host`, which keeps the index for every connection on the
///   host with the state tracepoint (the default on 6.1 before the ports
///   index reached it).
pub(super) fn tracepoint_time(tcpka: &Path, pin_dir: &Path, cgroup: &Path) -> Result<()> {
    const CONNS: usize = 5000;
    let home = own_cgroup()?;
    let me = std::process::id().to_string();
    let base = churn_rate(CONNS)?;
    println!(
        "host-wide: tcpka's tracepoints per connection setup on a port no one names, outside the cgroup (kernel statistics; one setup takes {:.1} µs of CPU here):",
        1e6 / base
    );
    let row = |what: &str, (ns, runs): (f64, f64)| {
        println!(
            "  {what:<66} {ns:>6.0} ns  ({runs:.1} runs, {:.2}% of a setup)",
            ns * base / 1e7
        );
    };
    let per_setup = |before: (u64, u64), after: (u64, u64)| {
        (
            (after.0 - before.0) as f64 / CONNS as f64,
            (after.1 - before.1) as f64 / CONNS as f64,
        )
    };
    for tracepoint in ["tcp_destroy_sock", "inet_sock_set_state"] {
        let floor = crate::floor::EmptyTracepoint::attach(tracepoint)?;
        let stats = enable_bpf_stats()?;
        let before = floor.runtime()?;
        churn_rate_on(CONNS, OTHER_PORT)?;
        let after = floor.runtime()?;
        drop(stats);
        row(
            &format!("floor: an empty program on {tracepoint} (not tcpka)"),
            per_setup(before, after),
        );
    }
    // What is named, the load's arguments, the connection held open (from
    // before the load in the cgroup; or after it, outside the cgroup),
    // whether a command enables it, and the link measured.
    let cases: [(&str, &[&str], bool, bool, &str); 4] = [
        (
            "ports index, connections from before the load (destroy tp)",
            &[],
            true,
            false,
            "link_destroy",
        ),
        (
            "the same, one of them enabled (+ state tp, port check)",
            &[],
            true,
            true,
            "link_close",
        ),
        (
            "a managed connection outside the cgroup (state tp)",
            &[],
            false,
            true,
            "link_close",
        ),
        (
            "--index host: every connection indexed (state tp)",
            &["--index", "host"],
            true,
            false,
            "link_close",
        ),
    ];
    for (what, args, older, enabled, link) in cases {
        if older {
            std::fs::write(cgroup.join("cgroup.procs"), &me)?;
        }
        let l = TcpListener::bind(("127.0.0.1", SIP_PORT))?;
        let held = (TcpStream::connect(l.local_addr()?)?, l.accept()?.0);
        std::fs::write(home.join("cgroup.procs"), &me)?;
        let mut cmd = Command::new(tcpka);
        cmd.env("TCPKA_PIN_DIR", pin_dir)
            .args(["load", "--cgroup"])
            .arg(cgroup)
            .args(args);
        if older && args.is_empty() && newer_than_6_11() {
            cmd.env("TCPKA_CLOSE_BY_TRACEPOINT", "1");
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("tcpka load: {}", String::from_utf8_lossy(&out.stderr));
        }
        let result = (|| -> Result<(f64, f64)> {
            if enabled {
                // Through the index for the connection from before the load
                // (its peer is on an index port), by the walk for the one
                // outside (the index holds the cgroup's connections only).
                let target = if older {
                    l.local_addr()?.to_string()
                } else {
                    format!("cookie:{}", cookie(&held.0)?)
                };
                time_cmd(tcpka, pin_dir, &["enable", &target, "60", "5", "5"])?;
            }
            let pin = pin_dir.join(link);
            if !pin.exists() {
                bail!("{what}: {link} is not attached");
            }
            let stats = enable_bpf_stats()?;
            let before = link_runtime(&pin)?;
            churn_rate_on(CONNS, OTHER_PORT)?;
            let after = link_runtime(&pin)?;
            drop(stats);
            Ok(per_setup(before, after))
        })();
        time_cmd(tcpka, pin_dir, &["unload"])?;
        drop(held);
        row(what, result?);
    }
    println!();
    Ok(())
}

/// Whether this kernel is 6.12 or later (the tracepoint path for older
/// connections is then taken on request).
fn newer_than_6_11() -> bool {
    let release = crate::kernel_release();
    let mut it = release.split(['.', '-']);
    let mut next = || it.next().and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
    (next(), next()) >= (6, 12)
}

/// Run time (ns) and runs of the program behind a pinned link.
fn link_runtime(pin: &Path) -> Result<(u64, u64)> {
    let json = |args: &[&str]| -> Result<serde_json::Value> {
        let out = Command::new("bpftool").args(args).output()?;
        if !out.status.success() {
            bail!("bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let link = json(&[
        "link",
        "show",
        "pinned",
        pin.to_str().unwrap_or_default(),
        "--json",
    ])?;
    let id = link["prog_id"].as_u64().context("no prog_id")?.to_string();
    let prog = json(&["prog", "show", "id", &id, "--json"])?;
    Ok((
        prog["run_time_ns"].as_u64().unwrap_or(0),
        prog["run_cnt"].as_u64().unwrap_or(0),
    ))
}
