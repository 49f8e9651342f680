//! `cargo xtask bench`: what `tcpka enable` costs as the number of other
//! TCP connections in the namespace grows. Everything runs in a private
//! network namespace, cgroup and pin directory, removed afterwards.
//!
//! Printed figures: median and p90 over the samples, all sizes measured in
//! one run.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// The port every measured server listens on: a default index port, like
/// a SIP server's, so that all connections are indexed (the most the index
/// holds).
const SIP_PORT: u16 = 5060;

/// Connections one holder process keeps open: 2 fds each plus its listener
/// stay under the 20,000 open-file limit.
const PER_HOLDER: usize = 9000;

/// Holds `count` loopback connections (client bound to `src`) until stdin
/// closes; prints "ready" once they are all up.
pub fn hold(src: &str, count: usize) -> Result<()> {
    let listener = TcpListener::bind((src, SIP_PORT)).context("bind holder listener")?;
    let addr = listener.local_addr()?;
    let mut conns = Vec::with_capacity(count * 2);
    for _ in 0..count {
        let c = TcpStream::connect(addr).context("holder connect")?;
        let (s, _) = listener.accept()?;
        conns.push(c);
        conns.push(s);
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

struct Holders(Vec<Child>);

impl Holders {
    /// Opens `total` connections spread over holder processes, each on its
    /// own 127.0.x.y source address (ephemeral ports are per address).
    fn open(total: usize, first: usize) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        let mut left = total;
        let mut i = first;
        while left > 0 {
            let n = left.min(PER_HOLDER);
            let src = format!("127.0.{}.{}", 1 + i / 250, 2 + i % 250);
            let child = Command::new(&exe)
                .args(["bench-hold", &src, &n.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("start holder")?;
            children.push(child);
            left -= n;
            i += 1;
        }
        for c in &mut children {
            let mut buf = [0u8; 6];
            c.stdout
                .as_mut()
                .expect("piped")
                .read_exact(&mut buf)
                .context("holder did not start (open files limit?)")?;
        }
        Ok(Self(children))
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for c in &mut self.0 {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(v[v.len() / 2]), ms(v[(v.len() * 9) / 10]))
}

fn sockets_in_netns() -> usize {
    std::fs::read_to_string("/proc/net/tcp")
        .map(|s| s.lines().count() - 1)
        .unwrap_or(0)
        + std::fs::read_to_string("/proc/net/tcp6")
            .map(|s| s.lines().count().saturating_sub(1))
            .unwrap_or(0)
}

/// Moves this process (and its children to come) to a network namespace
/// of its own, with loopback up.
fn private_netns() -> Result<()> {
    // SAFETY: plain unshare(2); xtask is single-threaded here.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    if !st.success() {
        bail!("ip link set lo up failed");
    }
    Ok(())
}

pub fn run(tcpka: &Path, sizes: &[usize], samples: usize, pairs: usize) -> Result<()> {
    private_netns()?;
    let cg_root = cgroup2_mount()?;
    let cgroup = cg_root.join(format!("tcpka-bench-{}", std::process::id()));
    // A sibling with an empty sock_ops program: the floor of any attachment.
    let floor_cgroup = cg_root.join(format!("tcpka-bench-floor-{}", std::process::id()));
    std::fs::create_dir(&cgroup).context("create bench cgroup")?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/tcpka-bench-{}", std::process::id()));
    let mut guard = Cleanup {
        tcpka: tcpka.to_path_buf(),
        pin_dir: pin_dir.clone(),
        cgroup: cgroup.clone(),
        floor: floor_cgroup.clone(),
        home: None,
    };
    std::fs::create_dir(&floor_cgroup).context("create the floor's cgroup")?;
    let floor = crate::floor::EmptySockOps::attach(&floor_cgroup)?;
    host_cost(tcpka, &pin_dir, &cgroup, &floor_cgroup, pairs)?;
    program_time(tcpka, &pin_dir, &cgroup, &floor_cgroup, &floor)?;
    drop(floor);
    if sizes.is_empty() {
        return Ok(());
    }
    load(tcpka, &pin_dir, &cgroup)?;
    // The measured connections and the others belong to the attached
    // cgroup, on the SIP port (an index port), like a SIP server's: all
    // are indexed.
    let out = Command::new(tcpka)
        .env("TCPKA_PIN_DIR", &pin_dir)
        .args(["info", "--json"])
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    println!(
        "enable latency (index {}, index ports {}, holders found {}):",
        info["index_mode"].as_str().unwrap_or("?"),
        info["index_ports"].as_str().unwrap_or("?"),
        info["installation"]["holders"].as_str().unwrap_or("?")
    );
    guard.home = Some(own_cgroup()?);
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .context("entering the bench cgroup")?;

    // One target connection per sample, each with its own listener, so
    // the medians cover sockets at many places in the kernel's table.
    let mut targets = Vec::new();
    for i in 0..samples {
        let l = TcpListener::bind((format!("127.0.200.{}", i + 1), SIP_PORT))?;
        let c = TcpStream::connect(l.local_addr()?)?;
        let (s, _) = l.accept()?;
        targets.push((l, c, s));
    }

    let fixed = maps_memory(&pin_dir)?;
    println!(
        "{:>8} {:>8}  {:>17}  {:>17}  {:>17}  {:>17}  {:>17}  {:>8}",
        "conns",
        "sockets",
        "enable PEER",
        "enable PEER+local",
        "enable cookie",
        "enable new conn",
        "kernel pass",
        "spawn"
    );
    println!(
        "{:>8} {:>8}  {:>17}  {:>17}  {:>17}  {:>17}  {:>17}  {:>8}",
        "",
        "",
        "med / p90 ms",
        "med / p90 ms",
        "med / p90 ms",
        "med / p90 ms",
        "med / p90 ms",
        "med ms"
    );
    let mut holders: Vec<Holders> = Vec::new();
    let mut open = 0;
    let mut holder_index = 0;
    for &size in sizes {
        if size > open {
            eprintln!("bench: opening {} more connections…", size - open);
            let h = Holders::open(size - open, holder_index)?;
            holder_index += h.0.len();
            holders.push(h);
            open = size;
        }
        let sockets = sockets_in_netns();
        let (mut peer, mut local, mut by_cookie, mut pass, mut spawn) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut fresh = Vec::new();
        for (i, (l, c, _)) in targets.iter().enumerate() {
            let idle = (100 + i).to_string();
            let target = l.local_addr()?.to_string();
            let local_end = c.local_addr()?.to_string();
            let ck = format!("cookie:{}", cookie(c)?);
            peer.push(time_cmd(
                tcpka,
                &pin_dir,
                &["enable", &target, &idle, "5", "5"],
            )?);
            local.push(time_cmd(
                tcpka,
                &pin_dir,
                &["enable", &target, "--local", &local_end, &idle, "5", "5"],
            )?);
            by_cookie.push(time_cmd(
                tcpka,
                &pin_dir,
                &["enable", &ck, &idle, "5", "5"],
            )?);
            // The kernel side alone: one full iterator pass with nothing
            // pending, i.e. the walk plus the program's prefilter.
            let t = Instant::now();
            let mut f = File::open(pin_dir.join("iter_apply"))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            pass.push(t.elapsed());
            // A connection made just now: its holder is not known yet, so
            // (holders found on demand) this enable scans the descriptors.
            let l2 = TcpListener::bind((format!("127.0.201.{}", i + 1), SIP_PORT))?;
            let c2 = TcpStream::connect(l2.local_addr()?)?;
            let (s2, _) = l2.accept()?;
            fresh.push(time_cmd(
                tcpka,
                &pin_dir,
                &["enable", &l2.local_addr()?.to_string(), &idle, "5", "5"],
            )?);
            drop((c2, s2, l2));
            // What starting a process costs here, for scale.
            let t = Instant::now();
            Command::new(tcpka).arg("--version").output()?;
            spawn.push(t.elapsed());
        }
        let fmt = |v: Vec<Duration>| {
            let (m, p) = stats(v);
            format!("{m:>7.2} / {p:>7.2}")
        };
        println!(
            "{:>8} {:>8}  {:>17}  {:>17}  {:>17}  {:>17}  {:>17}  {:>8.2}",
            size,
            sockets,
            fmt(peer),
            fmt(local),
            fmt(by_cookie),
            fmt(fresh),
            fmt(pass),
            stats(spawn).0
        );
        let mem = maps_memory(&pin_dir)?;
        println!(
            "{:>8} {:>8}  kernel memory of the maps: {:.1} MB, {:.0} bytes per socket above the {:.1} MB at load",
            "",
            "",
            mem as f64 / 1e6,
            mem.saturating_sub(fixed) as f64 / sockets.max(1) as f64,
            fixed as f64 / 1e6
        );
        if size == API_AT {
            api_throughput(tcpka, &pin_dir, &cgroup, size)?;
        }
    }
    drop(holders);
    drop(guard);
    Ok(())
}

/// Kernel memory of the installation's maps (bpftool's `bytes_memlock`,
/// which is what each map uses now).
fn maps_memory(pin_dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(pin_dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !name.starts_with("TCPKA_") {
            continue;
        }
        let out = Command::new("bpftool")
            .args(["map", "show", "pinned"])
            .arg(&path)
            .arg("--json")
            .output()
            .context("running bpftool")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        total += v["bytes_memlock"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

/// Connection count at which the HTTP API is measured.
const API_AT: usize = 10_000;

/// `POST /v1/enable` through `tcpka serve` from 16 concurrent clients
/// (wrk), spread over 100 target connections, with `size` other
/// connections open.
fn api_throughput(tcpka: &Path, pin_dir: &Path, cgroup: &Path, size: usize) -> Result<()> {
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

/// Extra arguments every `tcpka load` of the bench gets (`--load-args`).
static LOAD_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

pub fn set_load_args(args: Vec<String>) {
    let args: Vec<String> = args.into_iter().filter(|a| !a.is_empty()).collect();
    if !args.is_empty() {
        println!("tcpka load {}", args.join(" "));
    }
    let _ = LOAD_ARGS.set(args);
}

fn load(tcpka: &Path, pin_dir: &Path, cgroup: &Path) -> Result<()> {
    let out = Command::new(tcpka)
        .env("TCPKA_PIN_DIR", pin_dir)
        .args(["load", "--cgroup"])
        .arg(cgroup)
        .args(LOAD_ARGS.get().map(Vec::as_slice).unwrap_or_default())
        .output()?;
    if !out.status.success() {
        bail!("tcpka load: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// CPU time this thread has used (user and system), in seconds. Ratios of
/// CPU time, unlike wall time, do not count the time the machine gave to
/// others (a busy neighbour, a VM's steal time).
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Opens and closes `n` loopback connections; returns connections per
/// CPU second of this thread (loopback delivery runs in the sender's
/// context, so both ends' kernel work is counted).
fn churn_rate(n: usize) -> Result<f64> {
    churn_rate_on(n, OTHER_PORT)
}

/// A port no rule and no index port names.
const OTHER_PORT: u16 = 5090;

/// [`churn_rate`] with the listener on `port`.
fn churn_rate_on(n: usize, port: u16) -> Result<f64> {
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
fn syscall_ns(n: usize) -> f64 {
    let t = thread_cpu();
    for _ in 0..n {
        // SAFETY: getppid has no arguments and cannot fail.
        std::hint::black_box(unsafe { libc::getppid() });
    }
    (thread_cpu() - t) * 1e9 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// The cgroup v2 directory this process is in.
/// The Kamailio bench ([`crate::sip`]) in a network namespace of its own.
pub fn sip(tcpka: &Path, calls: usize, rate: usize, rounds: usize, modes: &[String]) -> Result<()> {
    private_netns()?;
    sip_here(tcpka, calls, rate, rounds, modes)
}

/// The Kamailio bench in the current network namespace (the bench's own).
pub fn sip_here(
    tcpka: &Path,
    calls: usize,
    rate: usize,
    rounds: usize,
    modes: &[String],
) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace")?;
    crate::sip::run(
        root,
        tcpka,
        &cgroup2_mount()?,
        &own_cgroup()?,
        calls,
        rate,
        rounds,
        modes,
    )
}

fn own_cgroup() -> Result<PathBuf> {
    let cg_root = cgroup2_mount()?;
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    own.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|rel| cg_root.join(rel.trim_start_matches('/')))
        .context("no cgroup v2 line in /proc/self/cgroup")
}

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
const FLOOR: &str = "floor: an empty sock_ops program (not tcpka)";

/// The cases measured in the attached cgroup: what each is called, the
/// rules added before it (on top of the earlier cases' rules, so each new
/// one must be the best match for its port) and the listener's port.
const CASES: [(&str, &[&[&str]], u16); 6] = [
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
fn in_each_case<T>(
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
fn enable_bpf_stats() -> Result<std::os::fd::OwnedFd> {
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
/// on connections: sock_ops, and the state tracepoint when attached.
fn programs_runtime(pin_dir: &Path) -> Result<(u64, u64)> {
    let json = |args: &[&str]| -> Result<serde_json::Value> {
        let out = Command::new("bpftool").args(args).output()?;
        if !out.status.success() {
            bail!("bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let (mut ns, mut runs) = (0, 0);
    for link in ["link_sockops", "link_close"] {
        let pin = pin_dir.join(link);
        if !pin.exists() {
            continue;
        }
        let link = json(&[
            "link",
            "show",
            "pinned",
            pin.to_str().unwrap_or_default(),
            "--json",
        ])?;
        let id = link["prog_id"].as_u64().context("no prog_id")?.to_string();
        let prog = json(&["prog", "show", "id", &id, "--json"])?;
        ns += prog["run_time_ns"].as_u64().unwrap_or(0);
        runs += prog["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok((ns, runs))
}

/// The kernel's own count of the time spent in tcpka's programs per
/// connection setup (both ends), for the cases of [`host_cost`]:
/// absolute, and free of the machine's noise. Statistics add a clock
/// read to each run, so these figures are slightly high.
fn program_time(
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

/// Runs one tcpka command, failing the bench if it fails; returns its
/// wall time.
fn time_cmd(tcpka: &Path, pin_dir: &Path, args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    let out = Command::new(tcpka)
        .env("TCPKA_PIN_DIR", pin_dir)
        .args(args)
        .output()?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "tcpka {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

/// The socket cookie (SO_COOKIE).
fn cookie(s: &TcpStream) -> Result<u64> {
    use std::os::fd::AsRawFd as _;
    let mut v: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd and out-pointers of the right size.
    let ret = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        bail!("SO_COOKIE: {}", std::io::Error::last_os_error());
    }
    Ok(v)
}

struct Cleanup {
    tcpka: PathBuf,
    pin_dir: PathBuf,
    cgroup: PathBuf,
    /// The empty program's cgroup (detached before this runs).
    floor: PathBuf,
    /// The cgroup the bench came from, once it entered the bench's.
    home: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        unload(&self.tcpka, &self.pin_dir);
        // Out of the bench cgroup, so that it can be removed.
        if let Some(home) = &self.home {
            let _ = std::fs::write(home.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir(&self.floor);
    }
}

/// `tcpka unload` of a bench's installation, and its lock files (see
/// keepalive-user paths.rs).
pub fn unload(tcpka: &Path, pin_dir: &Path) {
    let _ = Command::new(tcpka)
        .env("TCPKA_PIN_DIR", pin_dir)
        .arg("unload")
        .output();
    let name: String = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    for ext in ["lock", "serve", "journal"] {
        let _ = std::fs::remove_file(format!("/run/tcpka/locks/{name}.{ext}"));
    }
}

fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup v2 mount")
}
