//! Project tasks that cargo alone cannot do: install the toolchain pieces,
//! run the daemon, run every test.
//!
//! `cargo xtask setup` is idempotent and fast when everything is present;
//! `run` and `test` call it first, so a fresh machine needs no other step.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod deny;
mod floor;
mod harness;
mod setup;
mod sip;
mod vm;

#[derive(Parser)]
#[command(about = "tcpka project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, bpf-linker,
    /// rust-src); does nothing when all is present.
    Setup,
    /// Set up, build (release) and run `tcpka serve` in the foreground.
    /// Extra arguments go to `tcpka serve` (e.g. `-- --cgroup PATH`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build (release) and measure `tcpka enable` end to end and
    /// the kernel pass with 1,000, 10,000 and 100,000 other open TCP
    /// connections, in a private network namespace; then what tcpka costs
    /// the rest of the host, and Kamailio driving it per call.
    /// `bench kamailio` runs only the last (as --sip-only), `bench cost`
    /// only the host cost (as --cost-only), `bench fleet` only the fleet: a
    /// change with 0 to 4,000 other rules, 5,000 puts, a 5,000-rule delete,
    /// and a change with 2, 10 and 20 agents,
    /// `bench enable` only the enable latencies (and the kernel's
    /// statistics of the host cost, without the ratios), `bench reach`
    /// only rule changes reaching 10,000 and 100,000 live connections,
    /// `bench risk` only what the early warning costs a watched
    /// connection's traffic.
    Bench {
        /// One part only: kamailio, cost, fleet, enable, reach or risk.
        #[arg(value_parser = ["kamailio", "cost", "fleet", "enable", "reach", "risk"])]
        part: Option<String>,
        /// Connection counts to measure at.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
        sizes: Vec<usize>,
        /// Samples per measurement.
        #[arg(long, default_value_t = 31)]
        samples: usize,
        /// Alternating pairs for the host-cost ratios.
        #[arg(long, default_value_t = 11)]
        pairs: usize,
        /// Only the host-cost ratios (syscall, connection setup).
        #[arg(long)]
        cost_only: bool,
        /// Extra arguments for `tcpka load`, e.g. `--load-args=--index=host`
        /// to measure the host-wide index.
        #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
        load_args: Vec<String>,
        /// Only the Kamailio bench: calls per second through Kamailio with
        /// no keepalive, tcpops, tcpka over evapi, over HTTP (kept-alive
        /// and not) and the CLI, with CPU per call and per command.
        #[arg(long, conflicts_with = "cost_only")]
        sip_only: bool,
        /// Calls per variant and round in the Kamailio bench.
        #[arg(long, default_value_t = 2000)]
        sip_calls: usize,
        /// Calls per second offered in the Kamailio bench.
        #[arg(long, default_value_t = 400)]
        sip_rate: usize,
        /// Rounds of the Kamailio bench (each runs every variant once).
        #[arg(long, default_value_t = 3)]
        sip_rounds: usize,
        /// Variants of the Kamailio bench to run, comma-separated: none,
        /// tcpops, evapi, http-pooled, http, cli (default: all).
        #[arg(long, value_delimiter = ',')]
        sip_modes: Vec<String>,
        /// Traffic shapes of the Kamailio bench, comma-separated: trunk
        /// (every call on one caller connection, sipp -t t1), phone (a
        /// connection per call, -t tn), phone-held (the same, calls held
        /// 1 s) (default: all).
        #[arg(long, value_delimiter = ',')]
        sip_shapes: Vec<String>,
        /// TIME_WAIT sockets kept in the Kamailio bench's namespace through
        /// every run, as a host that closes a connection per phone has
        /// them (every walk of the socket table passes them); 0 for none.
        #[arg(long, default_value_t = 100_000)]
        sip_time_wait: usize,
        /// Where the host cost is measured: host (this machine's kernel),
        /// debian12 (Debian 12's 6.1 under qemu: the kernel's statistics
        /// only, as TCG distorts timing ratios) or all.
        #[arg(long, value_enum, default_value_t = Kernel::All)]
        kernel: Kernel,
    },
    /// (internal) The host cost from the kernel's statistics, with no setup
    /// or build: what `bench cost` runs in the Debian 12 VM.
    #[command(hide = true)]
    BenchCostHere {
        tcpka: PathBuf,
        /// Alternating pairs for the ratios (0: the kernel's statistics only).
        #[arg(long, default_value_t = 0)]
        pairs: usize,
    },
    /// Set up, build (release) and make the Debian package
    /// (target/debian/tcpka_*.deb): binary, systemd unit, default config,
    /// man pages, completions, example Kamailio config.
    Deb,
    /// (internal) Hold COUNT loopback connections until stdin closes.
    #[command(hide = true)]
    BenchHold { src: String, count: usize },
    /// Set up, build, and run every test: unit tests and the real-kernel
    /// integration tests (as root), on this machine's kernel and on Debian
    /// 12's 6.1 in a VM (qemu TCG, one test at a time). Extra arguments
    /// filter test names.
    Test {
        /// Which kernels run the real-kernel tests: host (this machine's),
        /// debian12 (Debian 12's current 6.1, booted under qemu) or all.
        #[arg(long, value_enum, default_value_t = Kernel::All)]
        kernel: Kernel,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The lint gates alone, as `test` runs them first: formatting, clippy
    /// with warnings as errors, the kernel programs' unsafe blocks
    /// documented, then `deny`.
    Lint,
    /// Licences and duplicate crates against deny.toml (cargo-deny's
    /// format), offline from `cargo metadata`.
    Deny,
    /// (internal) Boot the Debian 12 kernel VM and run one shell command
    /// line in it; exits with the command's code.
    #[command(hide = true)]
    Vm {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Kernel {
    Host,
    Debian12,
    All,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).context("entering the workspace")?;
    match cli.command {
        Task::Setup => setup::run(),
        Task::Deb => {
            setup::run()?;
            build_release()?;
            let deb = build_deb(&root)?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::BenchHold { src, count } => bench::hold(&src, count),
        Task::BenchCostHere { tcpka, pairs } => bench::run(&tcpka, &[], 0, pairs),
        Task::Vm { args } => {
            let code = vm::run_command(&root, &args.join(" "), &[])?;
            std::process::exit(code);
        }
        Task::Bench {
            part,
            sizes,
            samples,
            pairs,
            cost_only,
            load_args,
            sip_only,
            sip_calls,
            sip_rate,
            sip_rounds,
            sip_modes,
            sip_shapes,
            sip_time_wait,
            kernel,
        } => {
            let sip_only = sip_only || part.as_deref() == Some("kamailio");
            let cost_only = cost_only || part.as_deref() == Some("cost");
            setup::run()?;
            build_release()?;
            let tcpka = root.join("target/release/tcpka");
            let sip = sip::Options {
                calls: sip_calls,
                rate: sip_rate,
                rounds: sip_rounds,
                modes: sip_modes,
                shapes: sip_shapes,
                time_wait: sip_time_wait,
            };
            if sip_only {
                return bench::sip(&tcpka, &sip);
            }
            if part.as_deref() == Some("fleet") {
                // Another build's agents, for a before-and-after in one
                // run of this bench.
                let agents = std::env::var_os("TCPKA_BENCH_FLEET_BIN").map_or(tcpka, PathBuf::from);
                return bench::fleet(&agents);
            }
            if part.as_deref() == Some("reach") {
                let sizes = if sizes == [1000, 10000, 100000] {
                    vec![10_000, 100_000]
                } else {
                    sizes
                };
                return bench::reach(&tcpka, &sizes, samples.min(15));
            }
            if part.as_deref() == Some("risk") {
                return bench::risk(&tcpka, pairs.max(5));
            }
            if part.as_deref() == Some("enable") {
                bench::set_load_args(load_args);
                println!("== this machine's kernel ({})", kernel_release());
                return bench::run(&tcpka, &sizes, samples, 0);
            }
            let sizes = if cost_only { Vec::new() } else { sizes };
            bench::set_load_args(load_args);
            if kernel != Kernel::Debian12 {
                println!("== this machine's kernel ({})", kernel_release());
                bench::run(&tcpka, &sizes, samples, pairs)?;
            }
            if kernel != Kernel::Host {
                let xtask = std::env::current_exe().context("finding xtask's binary")?;
                let cmd = format!(
                    "echo \"== Debian 12's kernel ($(uname -r)), under qemu TCG\"; {} bench-cost-here {}",
                    xtask.display(),
                    tcpka.display()
                );
                let code = vm::run_command(&root, &cmd, &[])?;
                if code != 0 {
                    bail!("the host cost in the Debian 12 VM failed (exit {code})");
                }
            }
            if !cost_only {
                bench::sip_here(&tcpka, &sip)?;
                bench::fleet(&tcpka)?;
                bench::reach(&tcpka, &[10_000, 100_000], 15)?;
                bench::risk(&tcpka, pairs.max(5))?;
            }
            Ok(())
        }
        Task::Run { args } => {
            setup::run()?;
            build_release()?;
            let bin = root.join("target/release/tcpka");
            eprintln!("xtask: running {} serve {}", bin.display(), args.join(" "));
            let status = Command::new(&bin)
                .arg("serve")
                .args(&args)
                .status()
                .with_context(|| format!("starting {}", bin.display()))?;
            // The shell convention for "stopped by Ctrl-C" is not a failure.
            if !status.success() && status.code().is_some() {
                bail!("tcpka serve exited with {status}");
            }
            Ok(())
        }
        Task::Lint => lint(&root),
        Task::Deny => step("deny", || deny::run(&root)),
        Task::Test { kernel, args } => {
            setup::run()?;
            lint(&root)?;
            step("build", || {
                cargo(&["build", "-p", "keepalive-user", "--bin", "tcpka"])
            })?;
            let bin = root.join("target/debug/tcpka");
            // The package test installs what a user would.
            build_release()?;
            let deb = build_deb(&root)?;
            let env = [
                ("TCPKA_BIN".to_owned(), bin.display().to_string()),
                ("TCPKA_DEB".to_owned(), deb.display().to_string()),
            ];
            let mut failed = Vec::new();
            if kernel != Kernel::Debian12 {
                if let Err(e) = test_host(&args, &env) {
                    eprintln!("xtask: {e:#}");
                    failed.push("this machine's kernel");
                }
            }
            if kernel != Kernel::Host {
                if let Err(e) = test_debian12(&root, &args, &env) {
                    eprintln!("xtask: {e:#}");
                    failed.push("Debian 12's kernel");
                }
            }
            if !failed.is_empty() {
                bail!("tests failed on {}", failed.join(" and "));
            }
            Ok(())
        }
    }
}

/// The lint gates: formatting, then clippy with warnings as errors on every
/// target, then the kernel programs (a BPF target, outside the default
/// members) checked for undocumented unsafe blocks only, then licences and
/// duplicate crates.
fn lint(root: &Path) -> Result<()> {
    step("fmt", || cargo(&["fmt", "--all", "--check"]))?;
    step("clippy", || {
        cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])
    })?;
    step("clippy (kernel programs' unsafe blocks)", || {
        // The same stable toolchain that builds them (see
        // keepalive-user/build.rs): RUSTC_BOOTSTRAP for -Z build-std.
        let args = [
            "clippy",
            "-p",
            "keepalive-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-A",
            "warnings",
            "-D",
            "clippy::undocumented_unsafe_blocks",
        ];
        let status = Command::new(cargo_bin())
            .args(args)
            .env("RUSTC_BOOTSTRAP", "1")
            .status()
            .context("starting cargo clippy")?;
        if !status.success() {
            bail!("cargo {} failed ({status})", args.join(" "));
        }
        Ok(())
    })?;
    step("deny", || deny::run(root))
}

/// Every test on this machine's kernel. Kernel tests move the test process
/// between cgroups and network namespaces, so they run one at a time.
fn test_host(args: &[String], env: &[(String, String)]) -> Result<()> {
    let mut cmd = vec!["test", "--no-fail-fast", "--", "--test-threads=1"];
    cmd.extend(args.iter().map(String::as_str));
    // NB: in a private mount namespace laid out like a freshly booted
    // systemd host, whatever this machine's own state: see FRESH_HOST.
    step("test (this machine's kernel)", || {
        let status = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(FRESH_HOST)
            .arg("sh")
            .arg(cargo_bin())
            .args(&cmd)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .status()
            .context("starting cargo test (unshare is in util-linux)")?;
        if !status.success() {
            bail!("tests failed ({status})");
        }
        Ok(())
    })
}

/// The real-kernel tests (the tests package's) on Debian 12's 6.1, in a VM
/// laid out like a freshly booted Debian 12 host (see `vm.rs`).
fn test_debian12(root: &Path, args: &[String], env: &[(String, String)]) -> Result<()> {
    let mut bins = test_binaries()?;
    bins.retain(|b| {
        let name = b.file_name().unwrap_or_default().to_string_lossy();
        let skip = NOT_IN_VM
            .iter()
            .find(|(n, _)| name.strip_prefix(n).is_some_and(|r| r.starts_with('-')));
        if let Some((n, why)) = skip {
            eprintln!("xtask: vm: not run on Debian 12's kernel: {n}: {why}");
        }
        skip.is_none()
    });
    step("test (Debian 12's kernel, in a VM)", || {
        vm::run_tests(root, &bins, args, env)
    })
}

/// Test binaries the Debian 12 VM does not run, and why (said in the run's
/// output).
const NOT_IN_VM: [(&str, &str); 1] = [(
    "crash",
    "kills tcpka at each of its BPF system calls, hundreds of loads that take over 30 minutes under qemu TCG; \
     it tests the order of tcpka's own steps, which is the same on every kernel",
)];

/// The integration test binaries of the tests package, built.
fn test_binaries() -> Result<Vec<PathBuf>> {
    let out = Command::new(cargo_bin())
        .args([
            "test",
            "-p",
            "tcpka-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("starting cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed ({})", out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe)) = (is_test, v["executable"].as_str()) {
            bins.push(PathBuf::from(exe));
        }
    }
    if bins.is_empty() {
        bail!("cargo test --no-run named no test binaries");
    }
    bins.sort();
    Ok(bins)
}

/// Shell prologue that lays out a private mount namespace like a freshly
/// booted Debian 12 systemd host, then runs its arguments: a new bpffs
/// instance mode 0700 on /sys/fs/bpf (as systemd mounts it), an empty tmpfs
/// on /run (/run/lock and /run/shm as on such a host), no tracefs or
/// debugfs, and an empty /var/lib/tcpka. The machine's own bpffs mode,
/// pins, leftover /run/tcpka or fleet cache cannot change a test's result;
/// a test that needs something else sets it up itself.
const FRESH_HOST: &str = concat!(
    "set -e; ",
    "for m in $(awk '$3 == \"tracefs\" || $3 == \"debugfs\" { print $2 }' /proc/self/mounts | sort -r); do ",
    "umount -l \"$m\"; done; ",
    // Any bpffs this machine has (a stack of them, even) goes first.
    "while umount /sys/fs/bpf 2>/dev/null; do :; done; ",
    "mount -t bpf -o mode=0700,nosuid,nodev,noexec bpf /sys/fs/bpf; ",
    "mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run; ",
    "install -d -m 1777 /run/lock; ln -s /dev/shm /run/shm; ",
    "if [ -d /var/lib/tcpka ]; then mount -t tmpfs -o mode=0700 tmpfs /var/lib/tcpka; fi; ",
    "exec \"$@\""
);

/// Makes the Debian package from the release binary: man pages and
/// completions first (generated from the CLI), then `cargo deb`. Returns
/// the package's path.
fn build_deb(root: &Path) -> Result<PathBuf> {
    let bin = root.join("target/release/tcpka");
    let extra = root.join("target/release/tcpka-extra");
    let mut deb = None;
    step("package", || {
        let _ = std::fs::remove_dir_all(&extra);
        let man = extra.join("man");
        let completions = extra.join("completions");
        std::fs::create_dir_all(&completions)?;
        let status = Command::new(&bin).arg("manpages").arg(&man).status()?;
        if !status.success() {
            bail!("tcpka manpages failed ({status})");
        }
        // Debian installs man pages compressed (gzip -9n: no name or time,
        // so the package is reproducible).
        for page in std::fs::read_dir(&man)? {
            let status = Command::new("gzip").arg("-9n").arg(page?.path()).status()?;
            if !status.success() {
                bail!("gzip of a man page failed ({status})");
            }
        }
        for (shell, file) in [
            ("bash", "tcpka.bash"),
            ("zsh", "_tcpka"),
            ("fish", "tcpka.fish"),
        ] {
            let out = Command::new(&bin).args(["completions", shell]).output()?;
            if !out.status.success() {
                bail!("tcpka completions {shell} failed");
            }
            std::fs::write(completions.join(file), out.stdout)?;
        }
        let out = Command::new(cargo_bin())
            .args(["deb", "-p", "keepalive-user", "--no-build", "--no-strip"])
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("starting cargo deb (cargo xtask setup installs it)")?;
        if !out.status.success() {
            bail!("cargo deb failed ({})", out.status);
        }
        let path = String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned();
        if !path.ends_with(".deb") {
            bail!("cargo deb printed no package path");
        }
        deb = Some(PathBuf::from(path));
        Ok(())
    })?;
    deb.context("no package")
}

/// Builds the release `tcpka` binary.
fn build_release() -> Result<()> {
    step("build (release)", || {
        cargo(&[
            "build",
            "--release",
            "-p",
            "keepalive-user",
            "--bin",
            "tcpka",
        ])
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(cargo_bin())
        .args(args)
        .status()
        .with_context(|| format!("starting cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs one named step, printing how long it took; a failure names it.
pub fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let start = Instant::now();
    f().with_context(|| format!("step '{name}' failed"))?;
    eprintln!(
        "xtask: {name}: done in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
