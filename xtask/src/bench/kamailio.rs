//! `cargo xtask bench kamailio`: the Kamailio bench, in a cgroup of its
//! own.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{cgroup2_mount, private_netns};

/// The Kamailio bench ([`crate::sip`]) in a network namespace of its own.
pub fn sip(tcpka: &Path, o: &crate::sip::Options) -> Result<()> {
    private_netns()?;
    sip_here(tcpka, o)
}

/// The Kamailio bench in the current network namespace (the bench's own).
pub fn sip_here(tcpka: &Path, o: &crate::sip::Options) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace")?;
    crate::sip::run(root, tcpka, &cgroup2_mount()?, &own_cgroup()?, o)
}

/// The cgroup v2 directory this process is in.
pub(super) fn own_cgroup() -> Result<PathBuf> {
    let cg_root = cgroup2_mount()?;
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    own.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|rel| cg_root.join(rel.trim_start_matches('/')))
        .context("no cgroup v2 line in /proc/self/cgroup")
}
