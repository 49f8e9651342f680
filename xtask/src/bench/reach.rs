//! `cargo xtask bench reach`: what a rule change costs when it reaches the
//! live connections, with 10,000 and 100,000 of them in the attached
//! cgroup, in a private network namespace.
//!
//! The shape: every connection is a loopback pair whose client end talks
//! to port 5060, as a proxy's trunks and phones do (both ends in the
//! namespace: 2 sockets per connection). A fifth of the clients talk to
//! 127.0.1.x, the rest to 127.0.2.x. Per sample, alternating:
//! - **matching**: `rule add --remote-port 5060 --remote 127.0.1.0/24`
//!   gives its values to the fifth (each sample changes the idle time, so
//!   each changes them all). Every socket on remote port 5060 passes the
//!   pass's port prefilter: the rule's address decides, in the kernel;
//! - **no match**: `rule add --local-port 5999`, a port no connection has;
//! - **floor**: the same with `--new-only` (no pass): what a rule change
//!   costs without reaching live connections.
//!
//! Each rule goes again with `rule del --new-only`. Printed: the pass's own
//! time (`live.took_us`) and the command's wall time, medians and p90.
use std::path::Path;

use anyhow::{bail, Context as _, Result};

use super::{bench_installation, private_netns, sockets_in_netns, Holders};

/// One `tcpka rule add ... --json`: its wall time, the rule's id, and its
/// `live` report.
fn rule_add(tcpka: &Path, pin_dir: &Path, args: &[&str]) -> Result<(f64, u64, serde_json::Value)> {
    let t = std::time::Instant::now();
    let out = std::process::Command::new(tcpka)
        .env("TCPKA_PIN_DIR", pin_dir)
        .args(["rule", "add", "--json"])
        .args(args)
        .output()?;
    let wall = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "tcpka rule add {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("rule add --json output")?;
    let id = v["id"].as_u64().context("a rule id")?;
    let del = std::process::Command::new(tcpka)
        .env("TCPKA_PIN_DIR", pin_dir)
        .args(["rule", "del", "--new-only", &id.to_string()])
        .output()?;
    if !del.status.success() {
        bail!("tcpka rule del: {}", String::from_utf8_lossy(&del.stderr));
    }
    Ok((wall, id, v["live"].clone()))
}

/// Median and p90 of milliseconds.
fn spread(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[(v.len() * 9) / 10])
}

pub fn reach(tcpka: &Path, sizes: &[usize], samples: usize) -> Result<()> {
    private_netns()?;
    let (_cgroup, pin_dir, mut guard) = bench_installation(tcpka, "reach")?;
    guard.enter()?;
    println!(
        "rule changes reaching live connections ({samples} alternating samples of each; \
         a fifth of the connections match; ms, median / p90):"
    );
    println!(
        "{:>8} {:>8} {:>7}  {:>15}  {:>15}  {:>15}  {:>15}  {:>15}",
        "conns",
        "sockets",
        "match",
        "matching: pass",
        "matching: cmd",
        "no match: pass",
        "no match: cmd",
        "floor: cmd"
    );
    for &size in sizes {
        let matching = size / 5;
        let _m = Holders::open(matching, 0)?;
        let _o = Holders::open(size - matching, 250)?;
        let sockets = sockets_in_netns();
        let (mut m_pass, mut m_cmd, mut n_pass, mut n_cmd, mut floor) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..samples {
            let idle = (30 + i % 2).to_string();
            let (wall, _, live) = rule_add(
                tcpka,
                &pin_dir,
                &[
                    "--remote-port",
                    "5060",
                    "--remote",
                    "127.0.1.0/24",
                    &idle,
                    "3",
                    "10",
                ],
            )?;
            let changed = live["changed"].as_u64().unwrap_or(0) as usize;
            if changed != matching {
                bail!("the matching change reached {changed} connections, not {matching}: {live}");
            }
            m_cmd.push(wall);
            m_pass.push(live["took_us"].as_f64().unwrap_or(0.0) / 1e3);
            let (wall, _, live) =
                rule_add(tcpka, &pin_dir, &["--local-port", "5999", &idle, "3", "10"])?;
            if live["changed"].as_u64() != Some(0) {
                bail!("the change for no connection reached some: {live}");
            }
            n_cmd.push(wall);
            n_pass.push(live["took_us"].as_f64().unwrap_or(0.0) / 1e3);
            let (wall, _, _) = rule_add(
                tcpka,
                &pin_dir,
                &["--local-port", "5999", "--new-only", &idle, "3", "10"],
            )?;
            floor.push(wall);
        }
        let cell = |v: Vec<f64>| {
            let (m, p) = spread(v);
            format!("{m:.2} / {p:.2}")
        };
        println!(
            "{:>8} {:>8} {:>7}  {:>15}  {:>15}  {:>15}  {:>15}  {:>15}",
            size,
            sockets,
            matching,
            cell(m_pass),
            cell(m_cmd),
            cell(n_pass),
            cell(n_cmd),
            cell(floor)
        );
    }
    Ok(())
}
