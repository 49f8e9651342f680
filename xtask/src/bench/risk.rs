//! `cargo xtask bench risk`: what the early warning costs the traffic of
//! the connections it watches.
//!
//! The shape: a request/response exchange (64 bytes each way, the next
//! request once the answer is in, as a SIP transaction's messages go) on a
//! loopback connection in the attached cgroup, its server end matched by a
//! rule: `--tracked` (watched: sock_ops runs for each segment that end
//! sends) or not (untracked: sock_ops never runs after the setup). Pairs
//! alternate the two, in both orders; the ratio is taken within a pair.
//! The kernel's own count (`BPF_ENABLE_STATS`) gives sock_ops's time per
//! segment sent on the watched connection.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
};

use anyhow::{Context as _, Result};

use super::{
    bench_installation, cpu_seconds,
    host_cost::{enable_bpf_stats, median, programs_runtime, range},
    time_cmd,
};

const TRACKED_PORT: u16 = 5094;
const UNTRACKED_PORT: u16 = 5095;
const EXCHANGES: usize = 50_000;

/// A connection whose server end listens on `port`, made in the current
/// cgroup, with its server echoing on a thread.
fn pair(port: u16) -> Result<(TcpStream, std::thread::JoinHandle<()>)> {
    let l = TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("bind {port}"))?;
    let c = TcpStream::connect(("127.0.0.1", port))?;
    let (mut s, _) = l.accept()?;
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    Ok((c, echo))
}

/// CPU time of the whole process (both ends' threads), seconds.
fn process_cpu() -> f64 {
    cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Exchanges per CPU second (both ends, softirq work included) over `c`.
fn exchanges(c: &mut TcpStream, n: usize) -> Result<f64> {
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let t = process_cpu();
    for _ in 0..n {
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
    }
    Ok(n as f64 / (process_cpu() - t))
}

pub fn risk(tcpka: &Path, pairs: usize) -> Result<()> {
    let (_cgroup, pin_dir, mut guard) = bench_installation(tcpka, "risk")?;
    let port = |p: u16| p.to_string();
    time_cmd(
        tcpka,
        &pin_dir,
        &[
            "rule",
            "add",
            "--tracked",
            "--local-port",
            &port(TRACKED_PORT),
            "60",
            "5",
            "5",
        ],
    )?;
    time_cmd(
        tcpka,
        &pin_dir,
        &[
            "rule",
            "add",
            "--local-port",
            &port(UNTRACKED_PORT),
            "60",
            "5",
            "5",
        ],
    )?;
    guard.enter()?;
    let (mut tracked, t_echo) = pair(TRACKED_PORT)?;
    let (mut untracked, u_echo) = pair(UNTRACKED_PORT)?;
    // Warm up both.
    exchanges(&mut tracked, EXCHANGES / 4)?;
    exchanges(&mut untracked, EXCHANGES / 4)?;
    let (mut ratios, mut plain) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        eprint!("\rbench: early warning, pair {}/{pairs}…", i + 1);
        let (w, u) = if i % 2 == 0 {
            let w = exchanges(&mut tracked, EXCHANGES)?;
            (w, exchanges(&mut untracked, EXCHANGES)?)
        } else {
            let u = exchanges(&mut untracked, EXCHANGES)?;
            (exchanges(&mut tracked, EXCHANGES)?, u)
        };
        ratios.push(w / u);
        plain.push(u);
    }
    eprintln!();
    // The kernel's count: sock_ops runs and time per exchange on the
    // watched connection (its server end sends one segment per exchange).
    let stats = enable_bpf_stats()?;
    let before = programs_runtime(&pin_dir)?;
    exchanges(&mut tracked, EXCHANGES)?;
    let after = programs_runtime(&pin_dir)?;
    drop(stats);
    let runs = (after.1 - before.1) as f64 / EXCHANGES as f64;
    let ns = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
    drop((tracked, untracked));
    let _ = (t_echo.join(), u_echo.join());
    let (lo, hi) = range(&ratios);
    println!(
        "early warning: a watched connection's traffic ({pairs} alternating pairs of \
         {EXCHANGES} request/response exchanges of 64 bytes on loopback, server end \
         matched by a rule):"
    );
    println!(
        "  exchanges per CPU second, --tracked rule / untracked rule {:>8.3}  (range {lo:.3}–{hi:.3}; 1.000 is free)",
        median(ratios)
    );
    println!(
        "  sock_ops on the watched connection: {runs:.2} runs per exchange, {ns:.0} ns per run \
         (kernel statistics, which add a clock read to each run)"
    );
    let exchange_ns = 1e9 / median(plain);
    println!(
        "  an exchange costs {exchange_ns:.0} ns of CPU (both ends, untracked): the kernel's count \
         is {:.3} of it as a ratio",
        exchange_ns / (exchange_ns + runs * ns)
    );
    println!();
    Ok(())
}
