//! Which index a load gets: `ports` by default, on every kernel tcpka runs
//! on. Before 6.12, sock_ops cannot be asked (from an iterator) to watch
//! the connections it did not see connect: the state tracepoint watches
//! those, attached only while any is left ([`iterators_set_cb_flags`]).
use crate::{pinned::IndexMode, Result};

/// The first kernel whose `bpf_setsockopt` sets sock_ops callback flags.
pub(super) const CB_FLAGS_KERNEL: (u32, u32) = (6, 12);

/// Set to 1 to act as on a kernel before 6.12 (the tests of that path on
/// a newer kernel).
pub const CLOSE_BY_TRACEPOINT_ENV: &str = "TCPKA_CLOSE_BY_TRACEPOINT";

pub use crate::host::{kernel_release, kernel_version};

/// Whether `release` sets sock_ops callback flags from `bpf_setsockopt`.
pub(super) fn supports_cb_flags(release: &str) -> bool {
    kernel_version(release).is_some_and(|v| v >= CB_FLAGS_KERNEL)
}

/// Whether this kernel lets an iterator ask sock_ops to watch a
/// connection's close (6.12), unless [`CLOSE_BY_TRACEPOINT_ENV`] says to act
/// as without.
pub fn iterators_set_cb_flags() -> bool {
    std::env::var_os(CLOSE_BY_TRACEPOINT_ENV).is_none_or(|v| v != "1")
        && supports_cb_flags(&kernel_release())
}

/// The index mode to load with: the one asked for, else `ports`.
pub fn choose_index(requested: Option<IndexMode>) -> Result<IndexMode> {
    let release = kernel_release();
    let mode = requested.unwrap_or(IndexMode::Ports);
    if mode == IndexMode::Ports && !iterators_set_cb_flags() {
        tracing::info!(
            "kernel {release} is older than 6.12: the connections that existed before the load are watched by the state tracepoint until they close"
        );
    }
    Ok(mode)
}

/// The index mode a load without `--index` picks here, and why.
pub fn default_index() -> (IndexMode, &'static str) {
    if iterators_set_cb_flags() {
        (IndexMode::Ports, "the default")
    } else {
        (
            IndexMode::Ports,
            "the default; before Linux 6.12 the state tracepoint watches the connections that existed before the load, until they close",
        )
    }
}

/// Why an installation has its index mode, for `info`.
pub fn index_reason(mode: IndexMode) -> &'static str {
    match (mode, iterators_set_cb_flags()) {
        (IndexMode::Ports, true) => "the default",
        (IndexMode::Ports, false) => {
            "the default; before Linux 6.12 the state tracepoint watches the connections that existed before the load, until they close"
        }
        (IndexMode::Host, _) => "asked for with --index host",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_flags_follow_the_kernel() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("6.12"), Some((6, 12)));
        assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(kernel_version("6.1rc2"), Some((6, 1)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(supports_cb_flags("6.18.0"));
        assert!(supports_cb_flags("6.12.1"));
        assert!(!supports_cb_flags("6.11.9"));
        assert!(!supports_cb_flags("6.1.0-57-amd64"));
        assert!(!supports_cb_flags(""));
    }
}
