//! The API's throughput: commands per second through `tcpka serve`.
use std::{
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::SIP_PORT;

/// Connection count at which the HTTP API is measured.
pub(super) const API_AT: usize = 10_000;

/// `POST /v1/enable` through `tcpka serve` from 16 concurrent clients
/// (wrk), spread over 100 target connections, with `size` other
/// connections open.
pub(super) fn api_throughput(
    tcpka: &Path,
    pin_dir: &Path,
    cgroup: &Path,
    size: usize,
) -> Result<()> {
    let mut targets = Vec::new();
    for i in 0..100 {
        let l = TcpListener::bind((format!("127.0.203.{}", i + 1), SIP_PORT))?;
        let c = TcpStream::connect(l.local_addr()?)?;
        let (s, _) = l.accept()?;
        targets.push((l, c, s));
    }
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    // A token of the bench's own: nothing is written to /run/tcpka.
    let token = format!("tcpka-bench-{}-{port}", std::process::id());
    let mut serve = Command::new(tcpka)
        .env("TCPKA_PIN_DIR", pin_dir)
        .env("TCPKA_TOKEN", &token)
        .args(["serve", "--listen", &addr, "--cgroup"])
        .arg(cgroup)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        TcpStream::connect(&addr).is_ok()
    });
    let result = (|| -> Result<()> {
        if !up {
            bail!("tcpka serve did not come up");
        }
        let peers: Vec<String> = targets
            .iter()
            .map(|(l, _, _)| Ok(format!("\"{}\"", l.local_addr()?)))
            .collect::<Result<_>>()?;
        let script = std::env::temp_dir().join(format!("tcpka-bench-{}.lua", std::process::id()));
        std::fs::write(
            &script,
            format!(
                "local peers = {{{}}}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  \
                 local body = '{{\"conn\":\"' .. peers[(i % #peers) + 1] .. '\",\"idle\":60,\"count\":5,\"interval\":5}}'\n  \
                 return wrk.format('POST', '/v1/enable', {{['Content-Type'] = 'application/json', ['Authorization'] = 'Bearer {token}'}}, body)\nend\n\
                 local bad = 0\nresponse = function(status, headers, body)\n  if status ~= 200 then bad = bad + 1 end\nend\n\
                 done = function(summary, latency, requests)\n  io.write(string.format('non-2xx: %d\\n', summary.errors.status))\nend\n",
                peers.join(", "),
                token = token,
            ),
        )?;
        let out = Command::new("wrk")
            .args(["-t", "4", "-c", "16", "-d", "10s", "--latency", "-s"])
            .arg(&script)
            .arg(format!("http://{addr}/v1/enable"))
            .output()
            .context("running wrk (cargo xtask setup installs it)")?;
        let _ = std::fs::remove_file(&script);
        let text = String::from_utf8_lossy(&out.stdout);
        let grab = |prefix: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(prefix))
                .map(|l| l.trim().to_owned())
                .unwrap_or_else(|| format!("{prefix} ?"))
        };
        println!();
        println!(
            "HTTP API: POST /v1/enable, 16 concurrent clients (wrk -t4 -c16 -d10s), 100 targets, {size} other connections:"
        );
        for p in [
            "Requests/sec",
            "50%",
            "90%",
            "99%",
            "non-2xx",
            "Socket errors",
        ] {
            let line = grab(p);
            if !line.ends_with('?') || p == "Requests/sec" || p == "99%" {
                println!("  {line}");
            }
        }
        println!();
        Ok(())
    })();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(serve.id() as i32, libc::SIGINT) };
    let _ = serve.wait();
    result
}
