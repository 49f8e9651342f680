//! The command line: every subcommand's arguments and their --help.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use tcpka::{
    config::ServeOptions,
    conn::{parse_endpoint, ConnSpec},
    holders::parse_holder,
    policy::{parse_u32, Policy},
    rule::{parse_port, Cidr, RuleMatch},
    Error,
};

use super::{
    apply::ApplyArgs,
    check::CheckArgs,
    close::CloseArgs,
    enable::EnableArgs,
    fleet::FleetArgs,
    load::{LoadArgs, PrepareArgs},
    rule::RuleCommand,
    status::StatusArgs,
    trace::TraceArgs,
    watch::WatchArgs,
};

/// Kernel-side TCP keepalive policy enforcer.
///
/// tcpka attaches a sock_ops eBPF program to a cgroup v2 and sets
/// SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT (and
/// TCP_USER_TIMEOUT when asked) on TCP connections of any process in that
/// cgroup, so dead peers are detected without changing the server.
///
/// Exit codes: 0 success, 1 the operation failed, 2 invalid arguments.
#[derive(Parser, Debug)]
#[command(name = "tcpka", version, propagate_version = true)]
pub(crate) struct Cli {
    /// bpffs directory holding tcpka's pinned programs and maps.
    #[arg(long, global = true, env = tcpka::paths::PIN_DIR_ENV, default_value = tcpka::paths::DEFAULT_PIN_DIR)]
    pub(crate) pin_dir: PathBuf,

    /// Log format on stderr: human (the default), json (one object per
    /// line), or journald (structured fields; the default when systemd
    /// connects stderr to the journal). What is logged: RUST_LOG (e.g.
    /// `tcpka=debug`) [default: info for serve, warn otherwise].
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub(crate) log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Human,
    Json,
    Journald,
}

/// Logs go to stderr (or the journal), never to stdout, which is the
/// command's result. Every line has its control characters escaped (see
/// `tcpka::logs`). The daemon writes through a non-blocking writer: a
/// stderr nobody drains, or a stalled journal, drops lines (counted in
/// `/metrics`) and never stalls a request; it keeps the returned guard
/// (dropping it flushes the lines left). In journald format the daemon
/// writes priority-prefixed lines (`<4>…`) on the journal's stream: the
/// journal takes the level from them, and nothing waits on its socket.
pub(crate) fn init_logs(
    format: Option<LogFormat>,
    daemon: bool,
) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use tracing_subscriber::{fmt, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if daemon { "info" } else { "warn" })
    });
    // Only when stderr really is the journal's stream (JOURNAL_STREAM is
    // inherited by whatever a service starts).
    let format = format.unwrap_or(if tcpka::service::stderr_is_journal() {
        LogFormat::Journald
    } else {
        LogFormat::Human
    });
    let registry = tracing_subscriber::registry().with(filter);
    if daemon {
        let (writer, guard) = tcpka::logs::nonblocking_stderr();
        let _ = match format {
            LogFormat::Json => registry
                .with(fmt::layer().json().with_writer(writer))
                .try_init(),
            LogFormat::Journald => registry
                .with(
                    fmt::layer()
                        .with_writer(writer)
                        .with_ansi(false)
                        .event_format(SyslogPrefix(
                            fmt::format().with_target(false).without_time(),
                        )),
                )
                .try_init(),
            LogFormat::Human => registry
                .with(
                    fmt::layer()
                        .with_writer(writer)
                        .with_target(false)
                        .with_ansi(false),
                )
                .try_init(),
        };
        return Some(guard);
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr = || tcpka::logs::MakeEscaping(std::io::stderr);
    let human = || {
        fmt::layer()
            .with_writer(stderr())
            .with_target(false)
            .with_ansi(ansi)
    };
    let _ = match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(stderr()))
            .try_init(),
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(j) => registry
                .with(j.with_syslog_identifier("tcpka".into()))
                .try_init(),
            Err(e) => {
                let r = registry.with(human()).try_init();
                tracing::warn!("no journald ({e}); logging to stderr");
                r
            }
        },
        LogFormat::Human => registry.with(human()).try_init(),
    };
    None
}

/// Each line prefixed with its syslog priority, which the journal reads
/// from a service's stream (`SyslogLevelPrefix=`, on by default).
struct SyslogPrefix<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for SyslogPrefix<F>
where
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Load the kernel programs, attach them to a cgroup and pin everything,
    /// so enforcement goes on after tcpka exits. Loading again is a no-op.
    Load(LoadArgs),
    /// Detach the programs and remove every pin (also fine when nothing is
    /// loaded). Connections keep the keepalive values they already have.
    Unload,
    /// Rules for new connections.
    #[command(subcommand)]
    Rule(RuleCommand),
    /// Enable keepalive on live connections now, idle or not, whichever
    /// process owns them (the reference's tcp_keepalive_enable).
    ///
    /// Prints how many connections changed; exits 1 with "no such
    /// connection" when none matches. A connection the full connection
    /// map (load --max-connections) cannot hold is left as it was: a
    /// warning beside the others, exit 1 when none could be managed.
    Enable(EnableArgs),
    /// Turn keepalive off on live connections now (tcp_keepalive_disable).
    Disable(ConnArgs),
    /// End live connections now, from the kernel side (tcpops'
    /// tcp_close_connection): the owner's next call fails with
    /// ECONNABORTED and the peer gets a reset; the owner need not
    /// cooperate. Uses sock_diag SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY), else
    /// the bpf_sock_destroy kfunc (Linux 6.5+); TCPKA_CLOSE_WITH=sock_diag or
    /// bpf_sock_destroy picks one, and `tcpka doctor` says which is used.
    /// Exit 1 "no such connection" when none matches.
    Close(CloseArgs),
    /// Show managed connections (or, with CONN, the matching connections
    /// whether managed or not) with the values read back from the kernel.
    Status(StatusArgs),
    /// Show whether tcpka is loaded, where, and its kernel-side counters.
    Info(JsonArg),
    /// Check what this host gives tcpka, one line per check (ok, MISSING or
    /// note, and what to do): kernel and BTF, cgroup v2, bpffs, tracefs,
    /// the hooks and index mode the loader would use, capabilities,
    /// lockdown, and the state of the pins. Changes nothing; exits 1 when
    /// something tcpka needs is missing.
    Doctor(JsonArg),
    /// Load (or adopt the pinned installation), serve the HTTP/JSON API
    /// for a SIP controller, and log every event (policies applied,
    /// connections closed, reset or timed out). Ctrl-C stops the daemon;
    /// enforcement stays in place.
    ///
    /// API: POST /v1/enable, POST /v1/disable, POST /v1/close, GET /v1/connections,
    /// GET|POST /v1/rules, DELETE /v1/rules/{id}, GET /v1/events (NDJSON
    /// stream), GET /metrics (Prometheus), GET /healthz.
    Serve(Box<ServeOptions>),
    /// Print events as they happen (from a running `tcpka serve`).
    Watch(WatchArgs),
    /// Bring the installed rules to a configuration file's named rules: add
    /// the new ones, change those that differ, remove the named ones it no
    /// longer has. Rules added by hand are kept, and so are the fleet's
    /// (`@NAME`, from `serve --etcd`), except one with the match of a rule
    /// in the file: the file's wins. An invalid file is refused with its
    /// line and reason, changing nothing. With --dry-run where tcpka is not
    /// loaded, the file is checked and the steps shown are those from no
    /// rules (see also `tcpka check`).
    ///
    /// The file (TOML): one [[rule]] table per rule, with name (1 to 32 of
    /// A-Z a-z 0-9 . _ -), idle, count, interval, and optionally
    /// local_port, remote_port, remote (CIDR), user_timeout_ms and
    /// tracked (true: `rule add --tracked`).
    Apply(ApplyArgs),
    /// Check a configuration file offline, as `apply` and `serve --config`
    /// would read it: prints its rules and exits 0 when it is valid, or
    /// prints its first error with the line and exits 2. Needs no
    /// installation and no privilege (for CI, or before a deploy).
    Check(CheckArgs),
    /// Make the running `tcpka serve` apply its --config file again
    /// (sends it SIGHUP, like `systemctl reload tcpka`).
    Reload,
    /// Print what the kernel programs decide, as they decide it: the rule
    /// each new connection got, a keepalive option the kernel refused, a
    /// full connection map. Off unless a trace runs (the programs then test
    /// one bit); Ctrl-C stops it. One trace at a time per installation.
    Trace(TraceArgs),
    /// One policy for many hosts through etcd: put and list the fleet's
    /// rules, see which nodes enforce what (agents are `tcpka serve
    /// --etcd`). etcd from --etcd or TCPKA_ETCD.
    ///
    /// Keys under PREFIX (default /tcpka): rules/NAME (JSON: idle, count,
    /// interval, local_port, remote_port, remote, user_timeout_ms, tracked,
    /// and the selector nodes: [...] and labels: {...}), nodes/NODE (an
    /// agent's status, under a 10 s lease), known/NODE (its labels).
    Fleet(Box<FleetArgs>),
    /// Print a completion script for SHELL, e.g.
    /// `tcpka completions bash > /etc/bash_completion.d/tcpka`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (section 8: tcpka.8 and one per command) into
    /// DIR.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
    /// Set up, as root, what the least-privilege service needs before it
    /// starts (the unit's `ExecStartPre=+`): bpffs mounted on /sys/fs/bpf
    /// when missing, the pin directory made, and it, its pins, the lock
    /// directory and the fleet cache handed to USER, whichever of root's
    /// commands made them first. Changes nothing else; safe to run again.
    Prepare(PrepareArgs),
}

/// CONN: the peer endpoint `IP:PORT` or `[IPv6]:PORT` (Kamailio's
/// `$si:$sp`), optionally prefixed `tcp:`, `tls:`, `ws:` or `wss:`; a SIP URI
/// such as `sip:10.0.0.2:5060;transport=tcp`; or `cookie:N` (decimal or 0x
/// hex, as SO_COOKIE and `ss -e` `sk:` show it).
#[derive(Args, Debug)]
pub(crate) struct ConnArgs {
    #[command(flatten)]
    pub(crate) which: Which,
    /// Who needs the keepalive (a SIP controller passes the Call-ID). A
    /// connection keeps keepalive while any holder remains: `disable
    /// --holder` only turns it off when the last holder goes; `disable`
    /// without one turns it off and forgets all holders.
    #[arg(long, value_name = "ID", value_parser = parse_holder)]
    pub(crate) holder: Option<String>,
    /// Print the connections changed as JSON (as `status --json`).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Which live connections a command acts on.
#[derive(Args, Debug)]
pub(crate) struct Which {
    /// The connection(s): peer endpoint, SIP URI or cookie:N.
    #[arg(value_name = "CONN", value_parser = |s: &str| s.parse::<ConnSpec>())]
    pub(crate) conn: ConnSpec,
    /// Only the connection with this local end (Kamailio's `$Ri:$Rp`).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_endpoint)]
    pub(crate) local: Option<SocketAddr>,
    /// Act in another network namespace, e.g. /run/netns/NAME or
    /// /proc/PID/ns/net [default: tcpka's own].
    #[arg(long, value_name = "PATH")]
    pub(crate) netns: Option<PathBuf>,
}

/// What a rule matches: shared by `rule add` and `fleet rule add`.
#[derive(Args, Debug)]
pub(crate) struct MatchArgs {
    /// Only connections whose local port is P (a server's listening port
    /// for inbound connections).
    #[arg(long, value_name = "P", value_parser = parse_port)]
    pub(crate) local_port: Option<u16>,
    /// Only connections whose remote port is P.
    #[arg(long, value_name = "P", value_parser = parse_port)]
    pub(crate) remote_port: Option<u16>,
    /// Only connections whose remote address is in CIDR (IPv4 or IPv6; a
    /// bare address means one host).
    #[arg(long, value_name = "CIDR", value_parser = |s: &str| s.parse::<Cidr>())]
    pub(crate) remote: Option<Cidr>,
}

impl MatchArgs {
    pub(crate) fn matcher(&self) -> RuleMatch {
        RuleMatch {
            local_port: self.local_port,
            remote_port: self.remote_port,
            remote: self.remote,
        }
    }
}

/// IDLE COUNT INTERVAL in the reference module's order, plus the optional
/// user timeout: shared by `enable` and `rule add`.
#[derive(Args, Debug)]
pub(crate) struct PolicyArgs {
    /// Seconds idle before the first probe (1..=32767).
    #[arg(value_parser = |s: &str| parse_u32("IDLE", s))]
    pub(crate) idle: u32,
    /// Unanswered probes before the connection is dropped (1..=127).
    #[arg(value_parser = |s: &str| parse_u32("COUNT", s))]
    pub(crate) count: u32,
    /// Seconds between probes (1..=32767).
    #[arg(value_parser = |s: &str| parse_u32("INTERVAL", s))]
    pub(crate) interval: u32,
    /// Also set TCP_USER_TIMEOUT to MS milliseconds (0 = kernel default).
    /// A non-zero value makes the kernel ignore COUNT.
    #[arg(long, value_name = "MS", value_parser = |s: &str| parse_u32("user timeout (ms)", s))]
    pub(crate) user_timeout: Option<u32>,
    /// Early-warning thresholds for `at_risk` events on tracked and
    /// command-managed connections: comma-separated NAME=VALUE, where NAME
    /// is `probe` (a keepalive probe unanswered this long; default half
    /// the interval, at most 1s), `backoff` (retransmission backoff level;
    /// 3), `zero-window` (the peer's window at zero this long; 5s) or
    /// `retrans` (retransmits per 10 s; 10), and VALUE a number (ms, or
    /// with `ms`/`s`) or `off`. `off` alone turns early warning off.
    #[arg(long, value_name = "SPEC", value_parser = |s: &str| tcpka::risk::Thresholds::parse(s))]
    pub(crate) at_risk: Option<tcpka::risk::Thresholds>,
}

impl PolicyArgs {
    pub(crate) fn policy(&self) -> Result<Policy, Error> {
        Ok(
            Policy::new(self.idle, self.count, self.interval, self.user_timeout)?
                .with_risk(self.at_risk.unwrap_or_default()),
        )
    }
}

#[derive(Args, Debug)]
pub(crate) struct JsonArg {
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}
