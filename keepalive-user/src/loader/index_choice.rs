//! Which index a load gets: `ports` where the kernel can watch the
//! connections sock_ops did not see connect (6.12+), else `host`.
use super::*;

/// The first kernel whose `bpf_setsockopt` sets sock_ops callback flags.
pub(super) const CB_FLAGS_KERNEL: (u32, u32) = (6, 12);

pub use crate::host::{kernel_release, kernel_version};

/// Whether `release` sets sock_ops callback flags from `bpf_setsockopt`.
pub(super) fn supports_ports_index(release: &str) -> bool {
    kernel_version(release).is_some_and(|v| v >= CB_FLAGS_KERNEL)
}

/// The index mode for a kernel `release`: the one asked for, else `ports`
/// where the kernel supports it and `host` where it does not; `Err` with
/// the reason when `ports` is asked of a kernel without it.
pub(super) fn index_for(
    release: &str,
    requested: Option<IndexMode>,
) -> std::result::Result<IndexMode, String> {
    let supported = supports_ports_index(release);
    match requested {
        Some(IndexMode::Ports) if !supported => Err(format!(
            "--index ports needs Linux 6.12 or later to watch connections it did not see connect (this kernel: {release}); use --index host"
        )),
        Some(mode) => Ok(mode),
        None if supported => Ok(IndexMode::Ports),
        None => Ok(IndexMode::Host),
    }
}

/// The index mode to load with (see [`index_for`]); logs why when the
/// kernel decided.
pub fn choose_index(requested: Option<IndexMode>) -> Result<IndexMode> {
    let release = kernel_release();
    let mode = index_for(&release, requested).map_err(|what| Error::Io {
        what,
        source: std::io::ErrorKind::Unsupported.into(),
    })?;
    if requested.is_none() && mode == IndexMode::Host {
        tracing::warn!(
            "kernel {release} is older than 6.12: the connection index is kept host-wide (--index host), which costs every connection on the host"
        );
    }
    Ok(mode)
}

/// The index mode a load without `--index` picks here, and why.
pub fn default_index() -> (IndexMode, &'static str) {
    match index_for(&kernel_release(), None) {
        Ok(IndexMode::Ports) => (IndexMode::Ports, "the kernel is 6.12 or later"),
        _ => (IndexMode::Host, "the kernel is older than 6.12"),
    }
}

/// Why an installation has its index mode, for `info`.
pub fn index_reason(mode: IndexMode) -> &'static str {
    match (mode, supports_ports_index(&kernel_release())) {
        (IndexMode::Ports, _) => "the default on Linux 6.12 and later",
        (IndexMode::Host, true) => "asked for with --index host",
        (IndexMode::Host, false) => "this kernel is older than 6.12",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_mode_follows_the_kernel() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("6.12"), Some((6, 12)));
        assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(kernel_version("6.1rc2"), Some((6, 1)));
        assert_eq!(kernel_version("garbage"), None);
        assert_eq!(index_for("6.18.0", None), Ok(IndexMode::Ports));
        assert_eq!(index_for("6.12.1", None), Ok(IndexMode::Ports));
        assert_eq!(index_for("6.11.9", None), Ok(IndexMode::Host));
        assert_eq!(index_for("", None), Ok(IndexMode::Host));
        assert_eq!(
            index_for("6.18.0", Some(IndexMode::Host)),
            Ok(IndexMode::Host)
        );
        assert!(index_for("6.6.0", Some(IndexMode::Ports))
            .unwrap_err()
            .contains("6.12"));
        assert_eq!(
            index_for("5.10.0", Some(IndexMode::Host)),
            Ok(IndexMode::Host)
        );
    }
}
