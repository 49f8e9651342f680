//! `cargo xtask setup`: installs what is missing, checks before it acts.
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::step;

/// Debian packages: LLVM 22 for bpf-linker (rustc 1.95 uses LLVM 22),
/// iproute2 for the tests' network namespaces, bpftool for inspection,
/// Kamailio and sipp for the end-to-end tests.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libzstd-dev",
    "iproute2",
    "bpftool",
    "python3",
    "kamailio",
    "kamailio-utils-modules",
    // json_get_string in the example config's event routes; evapi.
    "kamailio-json-modules",
    "kamailio-extra-modules",
    "sip-tester",
    "wrk",
    // The access tests act as an unprivileged user (setpriv, util-linux)
    // with curl; the fresh-host tests use unshare and flock (util-linux).
    "curl",
    "util-linux",
    // The crash tests kill tcpka at each BPF syscall (strace -e inject).
    "strace",
    // The https webhook test makes its own CA and certificate.
    "openssl",
    // The service tests verify the unit (systemd-analyze) and run its
    // command in the service's mount namespace (nsenter, util-linux).
    "systemd",
    // The fleet: etcd-client's build compiles etcd's protos (protoc, and
    // the well-known types they import: libprotobuf-dev); the fleet tests
    // run a 3-member cluster (etcd) and write to it (etcdctl).
    "protobuf-compiler",
    "libprotobuf-dev",
    "etcd-server",
    "etcd-client",
    // `cargo xtask test --kernel debian12` boots Debian 12's kernel under
    // qemu (TCG) with a busybox initramfs; depmod for its modules (kmod).
    "qemu-system-x86",
    "busybox-static",
    "kmod",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_DEB_VERSION: &str = "3.8.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> Result<()> {
    let start = std::time::Instant::now();
    step("setup: apt packages", apt)?;
    step("setup: rust components", rust_components)?;
    step("setup: bpf-linker", bpf_linker)?;
    step("setup: cargo-deb", cargo_deb)?;
    eprintln!(
        "xtask: setup complete in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_cmd(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {what}");
    let status = cmd.status().with_context(|| format!("starting: {what}"))?;
    if !status.success() {
        bail!("{what}: exited with {status}");
    }
    Ok(())
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let new_etcd = missing.contains(&"etcd-server");
    run_cmd(
        "apt-get update",
        Command::new("apt-get").args(["-q", "update"]),
    )?;
    run_cmd(
        &format!("apt-get install {}", missing.join(" ")),
        Command::new("apt-get")
            .args(["-q", "install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    // Debian's etcd-server starts a host-wide etcd on 127.0.0.1:2379. The
    // tests run their own clusters: the service this install started is
    // stopped and disabled (an etcd that was there before is left alone).
    if new_etcd && std::path::Path::new("/run/systemd/system").exists() {
        run_cmd(
            "systemctl disable --now etcd (the tests run their own etcd)",
            Command::new("systemctl").args(["disable", "--now", "etcd.service"]),
        )?;
    }
    Ok(())
}

/// The toolchain components the build (rust-src, for the eBPF target) and
/// the lint gates of `cargo xtask test` (rustfmt, clippy) need.
fn rust_components() -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed"]))
        .context("rustup is needed to install rust-src, rustfmt and clippy")?;
    let missing: Vec<&str> = ["rust-src", "rustfmt", "clippy"]
        .into_iter()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run_cmd(
        &format!("rustup component add {}", missing.join(" ")),
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )
}

fn bpf_linker() -> Result<()> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        if v.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
        eprintln!("xtask: found {}, want {BPF_LINKER_VERSION}", v.trim());
    }
    run_cmd(
        &format!("cargo install bpf-linker {BPF_LINKER_VERSION} (LLVM 22, about a minute)"),
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            // Without it bpf-linker's build finds /usr/bin/llvm-config
            // (an older LLVM) and fails to link.
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

/// `cargo deb`, for the Debian package (`cargo xtask deb`, and the package
/// test).
fn cargo_deb() -> Result<()> {
    if output(Command::new("cargo-deb").arg("--version"))
        .is_some_and(|v| v.contains(CARGO_DEB_VERSION))
    {
        return Ok(());
    }
    run_cmd(
        &format!("cargo install cargo-deb {CARGO_DEB_VERSION} (a few minutes)"),
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "install",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
            "--locked",
        ]),
    )
}
