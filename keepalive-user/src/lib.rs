//! tcpka's library: everything the CLI, the daemon and the tests share.
//! Dependencies run one way, from the front ends down to the kernel:
//!
//! - **Front ends**: the CLI (`main.rs`), [`server`] (the daemon: HTTP API,
//!   events, webhook), [`evapi`] (Kamailio's channel), [`doctor`],
//!   [`trace`].
//! - **Operations**: [`enforcer`] (rules; live connections: the direct
//!   path, the walk, batches, holders), [`holders`], [`config`] (files and
//!   `apply`), [`destroy`] and [`sock_destroy`] (`close`), [`feed`] and
//!   [`events`] (what the programs report), [`fleet`] (rules from etcd,
//!   the node's status).
//! - **Kernel access**: [`loader`] (load, attach, pin, adopt, unload, the
//!   kernel offsets), [`lock`] (the installation lock) and [`journal`]
//!   (unfinished holder changes, beside it), [`pinned`] (the pinned maps,
//!   opened once per installation, and [`lend`]'s typed handles),
//!   [`index`] (the connection index's lookups) and [`ports`] (the port
//!   sets sock_ops reads), [`pass`] (iterator passes and namespaces),
//!   [`host`] (what the host gives), [`btf`], [`cgroup`], [`paths`],
//!   [`sockopt`], [`mounts`].
//! - **Input**, used by all: [`policy`], [`rule`], [`conn`], [`access`],
//!   [`node`] (fleet node names, labels, etcd endpoints).
pub mod access;
pub mod btf;
pub mod cgroup;
pub mod config;
pub mod conn;
pub mod destroy;
pub mod doctor;
pub mod enforcer;
pub mod evapi;
pub mod events;
pub mod feed;
pub mod fleet;
pub mod holders;
pub mod host;
pub mod index;
pub mod journal;
pub mod loader;
pub mod lock;
pub mod logs;
pub mod mounts;
pub mod node;
pub mod pass;
pub mod paths;
pub mod pinned;
pub use pinned::lend;
pub mod policy;
pub mod ports;
pub mod risk;
pub mod risk_tracker;
pub mod rule;
pub mod server;
pub mod service;
pub mod sock_destroy;
pub mod sockopt;
mod sys;
pub mod trace;

use std::path::PathBuf;

/// Writes a line to stdout. A closed or broken stdout (a caller such as
/// Kamailio's `exec_cmd()` that never reads) is ignored: output errors never
/// turn an operation that worked into a failure, and never panic.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout().lock(), $($arg)*);
    }};
}

/// Writes a line to stderr, ignoring a closed or broken stderr.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr().lock(), $($arg)*);
    }};
}

/// The eBPF object, built by build.rs from `keepalive-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keepalive"));

/// Input that tcpka refuses before touching anything.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum InvalidInput {
    #[error("{what} must be in {min}..={max}, got {value}")]
    OutOfRange {
        what: &'static str,
        value: i64,
        min: i64,
        max: i64,
    },
    #[error("{what} must be a whole number, got {value:?}")]
    NotANumber { what: &'static str, value: String },
    #[error("invalid port {0:?}: must be in 1..=65535")]
    Port(String),
    #[error("invalid connection {value:?}: {reason}")]
    Conn { value: String, reason: &'static str },
    #[error("invalid listen address: {0}")]
    Listen(String),
    #[error(
        "invalid holder {0:?}: 1 to {max} printable ASCII characters without spaces (a SIP Call-ID)",
        max = crate::holders::HOLDER_MAX
    )]
    Holder(String),
    #[error("invalid address prefix {value:?}: {reason}")]
    Cidr { value: String, reason: &'static str },
    #[error("{0}")]
    Usage(String),
    #[error("{path}:{line}: {reason}")]
    Config {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error(
        "{what}: permission denied; tcpka needs root, or CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_PTRACE (and CAP_SYS_ADMIN for --netns)"
    )]
    NoPrivilege { what: String },
    #[error(
        "{what}: {dir} is mode {mode:04o} owned by uid {owner}, and uid {uid} may not search it; \
         give this user its own view of the pin directory (the unit binds it onto a private \
         /sys/fs/bpf) or run as root"
    )]
    Unreachable {
        what: String,
        dir: PathBuf,
        mode: u32,
        owner: u32,
        uid: u32,
    },
    #[error("this host cannot run tcpka: {check} (`tcpka doctor` lists every check)")]
    HostMissing { check: String },
    #[error("tcpka is not loaded (no pins in {pin_dir}); run `tcpka load` first")]
    NotLoaded { pin_dir: PathBuf },
    #[error(
        "tcpka is already loaded on cgroup {loaded}, not {requested}; run `tcpka unload` first"
    )]
    LoadedElsewhere { loaded: String, requested: String },
    #[error(
        "another tcpka command has held the installation lock {path} for over {waited_ms} ms; \
         try again, or find the process holding it (`fuser -v {path}`)"
    )]
    LockBusy { path: PathBuf, waited_ms: u64 },
    #[error("no such rule: {0}")]
    NoSuchRule(u32),
    #[error("a rule with the same match already exists (id {0})")]
    DuplicateRule(u32),
    #[error("the rule table is full ({0} rules)")]
    RulesFull(u32),
    #[error(
        "the connection map is full: {0} connection(s) not managed, left as they were (tcpka load --max-connections)"
    )]
    ConnsFull(usize),
    #[error(
        "the holder table is full ({0} holders on all connections); release holders of calls that ended (disable --holder)"
    )]
    HoldersFull(u32),
    #[error("cgroup: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Map {
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{what}")]
    Program {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("reading kernel BTF")]
    Btf(#[from] btf::BtfError),
    #[error("{0}; nothing changed")]
    Conflict(String),
    #[error("no tcpka serve runs for {0}; start one with `tcpka serve --config FILE`")]
    NoDaemon(PathBuf),
    #[error("applied {done} of {total} changes; failed at `{step}`: {source}")]
    Partial {
        done: usize,
        total: usize,
        step: String,
        #[source]
        source: Box<Error>,
    },
    #[error("no such connection: {0}")]
    NoSuchConnection(String),
    #[error("network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// etcd refused or did not answer; `transient` when another member,
    /// or the same one a moment later, may answer (no leader, a timeout,
    /// a member gone).
    #[error("{what}: {why}")]
    Etcd {
        what: String,
        why: String,
        transient: bool,
    },
    #[error("loading the eBPF object")]
    Ebpf(#[source] aya::EbpfError),
    #[error("{what}")]
    Pin {
        what: String,
        #[source]
        source: aya::pin::PinError,
    },
    /// The running kernel lacks something tcpka needs (a filesystem, a
    /// hook, a structure's layout).
    #[error("{what}: this kernel lacks {needs}")]
    Unsupported { what: String, needs: String },
    /// A file or object that should be there is not (a fleet rule, a node,
    /// a loaded program, a cgroup).
    #[error("{what}")]
    NotFound { what: String },
    /// A record tcpka reads back (a pinned record, a map value, what an
    /// iterator wrote) is not what this version wrote.
    #[error("{what}: {why}")]
    BadRecord { what: String, why: String },
    /// A file or directory tcpka will not use as it is (its owner, mode or
    /// type, or what it holds); `why` says what is wrong and what to do.
    #[error("{what}: {why}")]
    Refused { what: String, why: String },
    /// Another process holds what this one needs (a serve's lock, a socket
    /// path).
    #[error("{what}")]
    Busy { what: String },
    /// The eBPF object built into tcpka lacks a map or program: a broken
    /// build.
    #[error("the eBPF object built into tcpka has no {missing}; rebuild tcpka")]
    Object { missing: String },
    /// An HTTP request that did not get an answer (`tcpka serve`'s API, a
    /// webhook receiver).
    #[error("{what}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    /// `tcpka serve`'s API answered with an error status; `why` is the
    /// reply's error, else the status's reason.
    #[error("{url}: HTTP {status}: {why}")]
    Api {
        url: String,
        status: u16,
        why: String,
    },
    /// A thread or task of tcpka's own stopped or failed.
    #[error("{0}")]
    Internal(String),
    /// The failure of a step that several commands of one batch shared
    /// (taking the lock, one walk), told to each of them.
    #[error("{0}")]
    Shared(String),
}

/// A pause of `base` give or take a quarter, so that many agents,
/// connections or deliveries that failed together do not come back in
/// step.
pub fn jitter(base: std::time::Duration) -> std::time::Duration {
    let spread = (base.as_nanos() / 2).min(u128::from(u64::MAX)) as u64;
    base - base / 4 + std::time::Duration::from_nanos(fastrand::u64(0..=spread))
}

/// An error and its causes on one line, each cause once.
pub fn one_line(e: &Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}

impl Error {
    /// The process exit code for this error: 2 for invalid input, 1 for a
    /// failed operation.
    pub fn exit_code(&self) -> i32 {
        match self {
            // A namespace path that cannot be used is a bad argument.
            Error::Invalid(_) | Error::Netns { .. } => 2,
            _ => 1,
        }
    }

    /// The same failure again, for another command that shared the step
    /// that failed: the variant itself where it can be copied, else its
    /// message with every cause ([`Error::Shared`]).
    pub fn again(&self) -> Self {
        match self {
            Error::Invalid(i) => Error::Invalid(i.clone()),
            Error::NoPrivilege { what } => Error::NoPrivilege { what: what.clone() },
            Error::NotLoaded { pin_dir } => Error::NotLoaded {
                pin_dir: pin_dir.clone(),
            },
            Error::LockBusy { path, waited_ms } => Error::LockBusy {
                path: path.clone(),
                waited_ms: *waited_ms,
            },
            Error::Netns { path, source } => Error::Netns {
                path: path.clone(),
                source: match source.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(source.kind(), source.to_string()),
                },
            },
            other => Error::Shared(one_line(other)),
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn map(what: impl Into<String>, source: aya::maps::MapError) -> Self {
        Error::Map {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// What an `io::ErrorKind` made up as a cause would add to a message.
    fn kind_texts() -> Vec<String> {
        use std::io::ErrorKind as K;
        [
            K::Other,
            K::NotFound,
            K::InvalidData,
            K::InvalidInput,
            K::PermissionDenied,
            K::AddrInUse,
            K::AlreadyExists,
            K::Unsupported,
            K::UnexpectedEof,
        ]
        .into_iter()
        .map(|k| std::io::Error::from(k).to_string())
        .collect()
    }

    fn new_variants() -> Vec<Error> {
        let reqwest_error = reqwest::Client::new()
            .get("no scheme")
            .build()
            .expect_err("not a URL");
        vec![
            Error::Unsupported {
                what: "/sys/kernel/tracing has no events directory".into(),
                needs: "syscall tracepoints (CONFIG_FTRACE_SYSCALLS)".into(),
            },
            Error::NotFound {
                what: "no fleet rule \"a\" under /tcpka/rules/".into(),
            },
            Error::BadRecord {
                what: "the installation in /sys/fs/bpf/tcpka".into(),
                why: "it was loaded by another version of tcpka".into(),
            },
            Error::Refused {
                what: "/etc/tcpka/token".into(),
                why: "readable by every user (mode 644); chmod o-rwx it".into(),
            },
            Error::Busy {
                what: "another tcpka serve (pid 7) already serves /sys/fs/bpf/tcpka".into(),
            },
            Error::Object {
                missing: "map TCPKA_CONNS".into(),
            },
            Error::Http {
                what: "connecting to http://127.0.0.1:1/v1/events".into(),
                source: reqwest_error,
            },
            Error::Api {
                url: "http://127.0.0.1:1/v1/events".into(),
                status: 401,
                why: "bad token".into(),
            },
            Error::Internal("the command worker stopped".into()),
            Error::Shared("tcpka is not loaded".into()),
        ]
    }

    #[test]
    fn new_variants_say_what_happened_on_one_line() {
        let kinds = kind_texts();
        for e in new_variants() {
            let line = one_line(&e);
            assert!(!line.contains('\n'), "{line}");
            assert!(!line.ends_with('.'), "{line}");
            assert!(
                !line.starts_with(|c: char| c.is_ascii_uppercase()),
                "{line}"
            );
            for k in &kinds {
                assert!(!line.ends_with(k.as_str()), "{line} ends in {k:?}");
            }
            assert_eq!(e.exit_code(), 1, "{line}");
        }
    }

    #[test]
    fn messages_read_as_documented() {
        let e = Error::Unsupported {
            what: "pinning /sys/fs/bpf/tcpka/link_sockops".into(),
            needs: "a BPF link for this attachment".into(),
        };
        assert_eq!(
            one_line(&e),
            "pinning /sys/fs/bpf/tcpka/link_sockops: this kernel lacks a BPF link for this attachment"
        );
        let e = Error::Object {
            missing: "program tcpka_sockops".into(),
        };
        assert_eq!(
            one_line(&e),
            "the eBPF object built into tcpka has no program tcpka_sockops; rebuild tcpka"
        );
        let e = Error::Api {
            url: "http://h/v1/events".into(),
            status: 503,
            why: "Service Unavailable".into(),
        };
        assert_eq!(
            one_line(&e),
            "http://h/v1/events: HTTP 503: Service Unavailable"
        );
    }

    #[test]
    fn a_shared_failure_keeps_its_variant_or_its_causes() {
        let e = Error::NotLoaded {
            pin_dir: "/sys/fs/bpf/tcpka".into(),
        };
        assert!(matches!(e.again(), Error::NotLoaded { .. }));
        assert_eq!(e.again().to_string(), e.to_string());

        let e = Error::LockBusy {
            path: "/run/tcpka/lock".into(),
            waited_ms: 5000,
        };
        assert!(matches!(
            e.again(),
            Error::LockBusy {
                waited_ms: 5000,
                ..
            }
        ));

        let e = Error::Invalid(InvalidInput::Port("x".into()));
        assert_eq!(e.again().exit_code(), 2);

        let e = Error::Netns {
            path: "/run/netns/a".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let again = e.again();
        assert!(matches!(again, Error::Netns { .. }));
        assert_eq!(one_line(&again), one_line(&e));
        assert_eq!(again.exit_code(), 2);

        // Anything else: its message with every cause, not a made-up one.
        let e = Error::io(
            "opening /sys/fs/bpf/tcpka/TCPKA_CONNS",
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        let again = e.again();
        assert!(matches!(again, Error::Shared(_)));
        assert_eq!(one_line(&again), one_line(&e));
        assert!(one_line(&again).ends_with("(os error 13)"));
        assert_eq!(again.exit_code(), 1);
    }
}
