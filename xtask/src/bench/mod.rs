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

use crate::harness::unload;

mod api;
mod fleet;
mod host_cost;
mod kamailio;
mod reach;
mod risk;
use api::{api_throughput, API_AT};
pub use fleet::fleet;
use host_cost::{host_cost, program_time, tracepoint_time};
use kamailio::own_cgroup;
pub use kamailio::{sip, sip_here};
pub use reach::reach;
pub use risk::risk;

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
    if pairs > 0 {
        host_cost(tcpka, &pin_dir, &cgroup, &floor_cgroup, pairs)?;
    }
    program_time(tcpka, &pin_dir, &cgroup, &floor_cgroup, &floor)?;
    tracepoint_time(tcpka, &pin_dir, &cgroup)?;
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
    cpu_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// A CPU-time clock (this thread's, or the whole process's), in seconds.
fn cpu_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// A bench's own installation: a cgroup and a pin directory named after
/// `what` and this process, loaded, and this process in the cgroup once
/// the caller has added what it needs ([`Cleanup::enter`]). Dropping the
/// guard unloads and removes both.
fn bench_installation(tcpka: &Path, what: &str) -> Result<(PathBuf, PathBuf, Cleanup)> {
    let cgroup = cgroup2_mount()?.join(format!("tcpka-bench-{what}-{}", std::process::id()));
    std::fs::create_dir(&cgroup).context("create bench cgroup")?;
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/tcpka-bench-{what}-{}",
        std::process::id()
    ));
    let guard = Cleanup {
        tcpka: tcpka.to_path_buf(),
        pin_dir: pin_dir.clone(),
        cgroup: cgroup.clone(),
        // No floor program here: the same directory, removed once.
        floor: cgroup.clone(),
        home: None,
    };
    load(tcpka, &pin_dir, &cgroup)?;
    Ok((cgroup, pin_dir, guard))
}

impl Cleanup {
    /// Moves this process into the bench's cgroup (and back when dropped).
    fn enter(&mut self) -> Result<()> {
        self.home = Some(own_cgroup()?);
        std::fs::write(
            self.cgroup.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .context("entering the bench cgroup")
    }
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

fn cgroup2_mount() -> Result<PathBuf> {
    // findmnt (util-linux) reads the mount table: the first cgroup v2 mount.
    let out = Command::new("findmnt")
        .args(["-n", "-t", "cgroup2", "-o", "TARGET"])
        .output()
        .context("running findmnt")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(PathBuf::from)
        .context("no cgroup v2 mount")
}
