//! Builds the eBPF object with the same stable toolchain that builds this
//! crate (`RUSTC_BOOTSTRAP=1` for `-Z build-std=core`), so a machine needs
//! only one toolchain plus `rust-src` and `bpf-linker`.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    // SAFETY: the build script is single-threaded at this point.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("keepalive-user has no parent directory"))?
        .join("keepalive-ebpf");
    let root = root.to_str().context("non UTF-8 path")?;
    aya_build::build_ebpf(
        [Package {
            name: "keepalive-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context("building the eBPF programs (run `cargo xtask setup` for bpf-linker and rust-src)")
}
