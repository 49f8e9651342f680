//! `tcpka`: the command-line front end. It parses arguments, calls the
//! library and prints; nothing else.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 invalid arguments.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use tcpka::{
    cgroup::Cgroup,
    config::Listen,
    config::ServeSettings,
    conn::{parse_endpoint, ConnSpec},
    enforcer::{Action, ConnStatus, Enforcer},
    holders::parse_holder,
    loader::{self, LoadOutcome},
    paths::PinLayout,
    policy::{parse_u32, Policy},
    rule::{parse_port, Cidr, RuleMatch},
    server, Error,
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
struct Cli {
    /// bpffs directory holding tcpka's pinned programs and maps.
    #[arg(long, global = true, env = tcpka::paths::PIN_DIR_ENV, default_value = tcpka::paths::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,

    /// Log format on stderr: human (the default), json (one object per
    /// line), or journald (structured fields; the default when systemd
    /// connects stderr to the journal). What is logged: RUST_LOG (e.g.
    /// `tcpka=debug`) [default: info for serve, warn otherwise].
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
    Journald,
}

/// Logs go to stderr (or the journal), never to stdout, which is the
/// command's result.
fn init_logs(format: Option<LogFormat>, daemon: bool) {
    use tracing_subscriber::{fmt, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if daemon { "info" } else { "warn" })
    });
    // systemd sets JOURNAL_STREAM when stderr goes to the journal.
    let format = format.unwrap_or(if std::env::var_os("JOURNAL_STREAM").is_some() {
        LogFormat::Journald
    } else {
        LogFormat::Human
    });
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let human = || {
        fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(ansi)
    };
    let _ = match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
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
}

#[derive(Subcommand, Debug)]
enum Command {
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
    /// connection" when none matches.
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
    Serve(Box<ServeArgs>),
    /// Print events as they happen (from a running `tcpka serve`).
    Watch(WatchArgs),
    /// Bring the installed rules to a configuration file's named rules: add
    /// the new ones, change those that differ, remove the named ones it no
    /// longer has. Rules added by hand are kept. An invalid file is refused
    /// with its line and reason, changing nothing.
    ///
    /// The file (TOML): one [[rule]] table per rule, with name (1 to 32 of
    /// A-Z a-z 0-9 . _ -), idle, count, interval, and optionally
    /// local_port, remote_port, remote (CIDR), user_timeout_ms and
    /// tracked (true: `rule add --tracked`).
    Apply(ApplyArgs),
    /// Make the running `tcpka serve` apply its --config file again
    /// (sends it SIGHUP, like `systemctl reload tcpka`).
    Reload,
    /// Print what the kernel programs decide, as they decide it: the rule
    /// each new connection got, a keepalive option the kernel refused, a
    /// full connection map. Off unless a trace runs (the programs then test
    /// one bit); Ctrl-C stops it. One trace at a time per installation.
    Trace(TraceArgs),
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
}

#[derive(Args, Debug)]
struct TraceArgs {
    /// One JSON object per line: {"level", "message"}.
    #[arg(long)]
    json: bool,
    /// Turn off a trace left on by a trace that was killed, and exit.
    #[arg(long)]
    stop: bool,
}

#[derive(Args, Debug)]
struct ApplyArgs {
    /// The configuration file, e.g. /etc/tcpka/tcpka.toml.
    file: PathBuf,
    /// Print what would change, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the changes as a JSON array.
    #[arg(long)]
    json: bool,
}

/// How the kernel side learns which process holds each socket.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
enum Holders {
    /// On demand: a command that meets a socket whose holder is unknown
    /// searches every process's descriptors for it, and stops when it is
    /// found (well under a millisecond per 10,000 descriptors). Costs the
    /// rest of the host nothing.
    #[default]
    Scan,
    /// Syscall tracepoints on accept/accept4/connect: every command takes
    /// the direct path at once, but every syscall of every process on the
    /// host then takes the kernel's slow path (about 25% on a cheap
    /// syscall).
    Syscalls,
}

impl From<Holders> for loader::HolderMode {
    fn from(h: Holders) -> Self {
        match h {
            Holders::Scan => loader::HolderMode::Scan,
            Holders::Syscalls => loader::HolderMode::Syscalls,
        }
    }
}

/// Who keeps the connection index that lets a command reach one
/// connection without walking every socket.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Index {
    /// sock_ops indexes the cgroup's connections on an index port
    /// (--index-ports) and watches them, and those a --tracked rule matched, until
    /// they close; other connections cost five array reads, and commands
    /// for them walk the socket table. Needs Linux 6.12.
    Ports,
    /// A state tracepoint indexes every connection on the host: any
    /// connection is reached directly, and every connection on the host
    /// pays for it (about 15% slower connection setup).
    Host,
}

/// How the kernel side is set up when loading.
#[derive(Args, Debug)]
struct KernelArgs {
    /// How socket holders are learned [default: scan].
    #[arg(long, value_enum)]
    holders: Option<Holders>,
    /// Who keeps the connection index [default: ports on Linux 6.12 or
    /// later, else host].
    #[arg(long, value_enum)]
    index: Option<Index>,
    /// With --index ports: connections with either end on one of these
    /// ports are indexed (comma-separated, or `all` for every connection in
    /// the cgroup, or `` for none) [default: 5060,5061].
    #[arg(long, value_parser = tcpka::ports::IndexPorts::parse)]
    index_ports: Option<tcpka::ports::IndexPorts>,
    /// Report `applied` and `closed` events for the connections rules
    /// match (off: a rule costs each connection no event). Timeouts, resets
    /// and aborts are always reported, and every event of connections
    /// enabled by command.
    #[arg(long)]
    rule_events: bool,
    /// Capacity of the managed-connection table [default: 262144]. Past it,
    /// rules still apply but their connections are not tracked.
    #[arg(long, value_name = "N", value_parser = loader::parse_map_size)]
    max_connections: Option<u32>,
    /// Capacity of the connection index, in sockets [default: 1048576]. Past
    /// it, commands walk the socket table.
    #[arg(long, value_name = "N", value_parser = loader::parse_map_size)]
    max_indexed: Option<u32>,
    /// Capacity of the holder table, holders on all connections together
    /// [default: 131072]. Past it, `enable --holder` is refused.
    #[arg(long, value_name = "N", value_parser = loader::parse_map_size)]
    max_holders: Option<u32>,
}

impl KernelArgs {
    fn options(&self) -> loader::LoadOptions {
        self.options_over(&ServeSettings::default())
    }

    /// These options over a configuration file's: an option given here
    /// wins.
    fn options_over(&self, file: &ServeSettings) -> loader::LoadOptions {
        loader::LoadOptions {
            holders: self
                .holders
                .map(Into::into)
                .or(file.holders)
                .unwrap_or_default(),
            index: self
                .index
                .map(|i| match i {
                    Index::Ports => loader::IndexMode::Ports,
                    Index::Host => loader::IndexMode::Host,
                })
                .or(file.index),
            index_ports: self
                .index_ports
                .clone()
                .or_else(|| file.index_ports.clone())
                .unwrap_or_default(),
            rule_events: self.rule_events || file.rule_events.unwrap_or(false),
            sizes: loader::MapSizes {
                connections: self.max_connections.or(file.sizes.connections),
                indexed: self.max_indexed.or(file.sizes.indexed),
                holders: self.max_holders.or(file.sizes.holders),
            },
        }
    }
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// cgroup v2 directory to attach to [default: the root of the cgroup v2
    /// mount, i.e. every process on the host].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[command(flatten)]
    kernel: KernelArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// cgroup v2 directory to attach to when not loaded yet [default: the
    /// root of the cgroup v2 mount].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// How the kernel side is set up, when serve loads.
    #[command(flatten)]
    kernel: KernelArgs,
    /// Configuration file whose named rules are applied at start and on
    /// SIGHUP (`tcpka reload`); see `tcpka apply --help`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log the kernel programs' decisions (as `tcpka trace` prints them),
    /// at most this detailed: error, warn, info or debug. Off by default:
    /// the programs then test one bit.
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    kernel_log: Option<log::LevelFilter>,
    /// Log one JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Where the API listens: ADDR:PORT or unix:/path. A non-loopback
    /// address needs --token.
    #[arg(long, value_parser = |s: &str| s.parse::<Listen>())]
    listen: Option<Listen>,
    /// Require `Authorization: Bearer TOKEN` (or HTTP Basic with the token
    /// as the password) on every request. Prefer
    /// --token-file or the TCPKA_TOKEN environment variable: an argument
    /// is visible to every local user in `ps`. A TCP listener always has a
    /// token: without one, serve generates one into /run/tcpka/api-token
    /// (readable by root, and by --api-group).
    #[arg(long, env = "TCPKA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from FILE (one line; not readable by others).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Group (name or gid) whose members may use the API besides root: a
    /// unix socket listener is made mode 0660 with this group, and a
    /// generated token file 0640.
    #[arg(long, value_name = "GROUP")]
    api_group: Option<String>,
    /// POST each timeout/reset/closed/aborted event (and gap markers) as
    /// JSON to this URL, http:// or https:// (retried with backoff; a
    /// bounded queue, drops counted in /metrics and reported as a gap).
    #[arg(long, value_name = "URL")]
    webhook: Option<String>,
    /// Sign every webhook request with this secret (the file's first
    /// line): headers X-Tcpka-Timestamp (Unix seconds) and
    /// X-Tcpka-Signature: sha256=HEX, the HMAC-SHA256 of
    /// "TIMESTAMP.BODY". The receiver recomputes it to reject forgeries.
    #[arg(long, value_name = "FILE")]
    webhook_secret_file: Option<PathBuf>,
    /// A token (the file's first line) for the receivers of events that
    /// cannot check an HMAC, such as Kamailio's configuration: sent as
    /// `Authorization: Bearer TOKEN` with every webhook request (loopback
    /// or https only) and as `"token"` in every event over --evapi.
    #[arg(long, value_name = "FILE")]
    events_token_file: Option<PathBuf>,
    /// Kamailio's evapi server (HOST:PORT, on this host): tcpka connects,
    /// takes enable/disable commands relayed with evapi_relay() (JSON
    /// netstrings; ones that arrive together are applied together) and
    /// sends events back, into event_route[evapi:message-received].
    /// Reconnects with backoff.
    #[arg(long, value_name = "HOST:PORT")]
    evapi: Option<SocketAddr>,
    /// The user Kamailio runs as (name or uid): tcpka talks only to an
    /// evapi server whose socket belongs to root or to this user
    /// [default: kamailio].
    #[arg(long, value_name = "USER")]
    evapi_user: Option<String>,
    /// Also trust the CA certificate(s) in this PEM file for an https://
    /// webhook (the public web's CAs are trusted already).
    #[arg(long, value_name = "FILE")]
    webhook_ca: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct WatchArgs {
    /// The API of `tcpka serve` (host:port).
    #[arg(long, default_value = tcpka::server::DEFAULT_LISTEN)]
    api: String,
    /// Token of the API [default: TCPKA_TOKEN, else the file serve
    /// generated, /run/tcpka/api-token].
    #[arg(long, env = "TCPKA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
}

/// CONN: the peer endpoint `IP:PORT` or `[IPv6]:PORT` (Kamailio's
/// `$si:$sp`), optionally prefixed `tcp:`, `tls:`, `ws:` or `wss:`; a SIP URI
/// such as `sip:10.0.0.2:5060;transport=tcp`; or `cookie:N` (decimal or 0x
/// hex, as SO_COOKIE and `ss -e` `sk:` show it).
#[derive(Args, Debug)]
struct ConnArgs {
    #[command(flatten)]
    which: Which,
    /// Who needs the keepalive (a SIP controller passes the Call-ID). A
    /// connection keeps keepalive while any holder remains: `disable
    /// --holder` only turns it off when the last holder goes; `disable`
    /// without one turns it off and forgets all holders.
    #[arg(long, value_name = "ID", value_parser = parse_holder)]
    holder: Option<String>,
    /// Print the connections changed as JSON (as `status --json`).
    #[arg(long)]
    json: bool,
}

/// Which live connections a command acts on.
#[derive(Args, Debug)]
struct Which {
    /// The connection(s): peer endpoint, SIP URI or cookie:N.
    #[arg(value_name = "CONN", value_parser = |s: &str| s.parse::<ConnSpec>())]
    conn: ConnSpec,
    /// Only the connection with this local end (Kamailio's `$Ri:$Rp`).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_endpoint)]
    local: Option<SocketAddr>,
    /// Act in another network namespace, e.g. /run/netns/NAME or
    /// /proc/PID/ns/net [default: tcpka's own].
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct CloseArgs {
    #[command(flatten)]
    which: Which,
    /// Print the connections closed as JSON (as they were).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct EnableArgs {
    #[command(flatten)]
    target: ConnArgs,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// IDLE COUNT INTERVAL in the reference module's order, plus the optional
/// user timeout: shared by `enable` and `rule add`.
#[derive(Args, Debug)]
struct PolicyArgs {
    /// Seconds idle before the first probe (1..=32767).
    #[arg(value_parser = |s: &str| parse_u32("IDLE", s))]
    idle: u32,
    /// Unanswered probes before the connection is dropped (1..=127).
    #[arg(value_parser = |s: &str| parse_u32("COUNT", s))]
    count: u32,
    /// Seconds between probes (1..=32767).
    #[arg(value_parser = |s: &str| parse_u32("INTERVAL", s))]
    interval: u32,
    /// Also set TCP_USER_TIMEOUT to MS milliseconds (0 = kernel default).
    /// A non-zero value makes the kernel ignore COUNT.
    #[arg(long, value_name = "MS", value_parser = |s: &str| parse_u32("user timeout (ms)", s))]
    user_timeout: Option<u32>,
}

impl PolicyArgs {
    fn policy(&self) -> Result<Policy, Error> {
        Ok(Policy::new(
            self.idle,
            self.count,
            self.interval,
            self.user_timeout,
        )?)
    }
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Show this connection (peer endpoint, SIP URI or cookie:N), managed
    /// or not; exit 1 when there is none.
    #[arg(value_name = "CONN", value_parser = |s: &str| s.parse::<ConnSpec>())]
    conn: Option<ConnSpec>,
    /// With CONN: only the connection with this local end.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_endpoint, requires = "conn")]
    local: Option<SocketAddr>,
    /// Network namespace to look in [default: tcpka's own].
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct JsonArg {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum RuleCommand {
    /// Add a rule for connections established from now on; prints its id.
    ///
    /// Arguments in the reference module's order: IDLE COUNT INTERVAL.
    /// The rule with the most fields set wins; among --remote prefixes the
    /// longest wins; on a tie the older rule (lower id) wins.
    Add(RuleAddArgs),
    /// Delete a rule. Connections that already got its policy keep it.
    Del {
        /// Rule id, as printed by `rule add` and `rule list`.
        #[arg(value_parser = |s: &str| parse_u32("ID", s))]
        id: u32,
    },
    /// List the rules.
    List(JsonArg),
    /// Show which rule a new connection from LOCAL to REMOTE would get, and
    /// why (the precedence sock_ops applies), without changing anything.
    Explain(RuleExplainArgs),
}

#[derive(Args, Debug)]
struct RuleExplainArgs {
    /// LOCAL REMOTE: this host's end and the peer's of a new connection
    /// (ADDR:PORT, IPv6 as [ADDR]:PORT); or one CONN (peer endpoint, SIP
    /// URI or cookie:N): the live connections it names, with the values
    /// they hold.
    #[arg(num_args = 1..=2, required = true, value_name = "LOCAL REMOTE | CONN")]
    ends: Vec<String>,
    /// With CONN: the network namespace to look in [default: tcpka's own].
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Print the explanation as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RuleAddArgs {
    /// Only connections whose local port is P (a server's listening port
    /// for inbound connections).
    #[arg(long, value_name = "P", value_parser = parse_port)]
    local_port: Option<u16>,
    /// Only connections whose remote port is P.
    #[arg(long, value_name = "P", value_parser = parse_port)]
    remote_port: Option<u16>,
    /// Only connections whose remote address is in CIDR (IPv4 or IPv6; a
    /// bare address means one host).
    #[arg(long, value_name = "CIDR", value_parser = |s: &str| s.parse::<Cidr>())]
    remote: Option<Cidr>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Track the connections the rule matches: `status` lists them and
    /// their timeout, reset or abort is reported as an event. Without it
    /// (the default) the rule only sets the values, which costs each new
    /// connection the least; the kernel still ends a dead one. Tracking
    /// costs about 1 µs more per connection setup (see the README's
    /// Performance section).
    #[arg(long)]
    tracked: bool,
    /// The default: only set the values (kept for scripts).
    #[arg(long, hide = true, conflicts_with = "tracked")]
    untracked: bool,
    /// Print the new rule as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format, matches!(cli.command, Command::Serve(_)));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = tcpka::one_line(&e);
            if let Some(hint) = privilege_hint(&msg) {
                msg.push_str("; ");
                msg.push_str(&hint);
            }
            tcpka::errln!("error: {msg}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// For an error the kernel gave for lack of privilege: which capabilities
/// this process lacks.
fn privilege_hint(msg: &str) -> Option<String> {
    if !msg.contains("Permission denied") && !msg.contains("Operation not permitted") {
        return None;
    }
    let missing = tcpka::doctor::missing_caps()?;
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "tcpka needs root (this process lacks {})",
        missing.join(", ")
    ))
}

/// tcpka.8, then tcpka-COMMAND.8 for each command and tcpka-rule-add.8
/// and so on for their own commands, from the clap definitions.
fn write_man_pages(dir: &Path) -> Result<usize, Error> {
    fn write(cmd: &clap::Command, name: &str, dir: &Path, n: &mut usize) -> Result<(), Error> {
        let cmd = cmd
            .clone()
            .name(name.to_owned())
            .bin_name(name.replace('-', " "));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .section("8")
            .render(&mut out)
            .map_err(|e| Error::io(format!("rendering the man page of {name}"), e))?;
        let path = dir.join(format!("{name}.8"));
        std::fs::write(&path, out)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        *n += 1;
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            write(sub, &format!("{name}-{}", sub.get_name()), dir, n)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let mut n = 0;
    write(
        &<Cli as clap::CommandFactory>::command(),
        "tcpka",
        dir,
        &mut n,
    )?;
    Ok(n)
}

fn print_explanation(conn: Option<&ConnStatus>, e: &tcpka::rule::Explanation) {
    match conn {
        None => tcpka::outln!("new connection {} -> {}", e.local, e.remote),
        Some(c) => {
            let k = &c.keepalive;
            let now = if k.enabled {
                format!(
                    "keepalive on (idle {}, count {}, interval {})",
                    k.idle, k.count, k.interval
                )
            } else {
                "keepalive off".to_owned()
            };
            let from = match (c.source, c.rule) {
                (Some(src), Some(id)) => format!(", from {src} {id}"),
                (Some(src), None) => format!(", from {src}"),
                _ => String::new(),
            };
            tcpka::outln!(
                "connection {} -> {} (cookie:{:#x}): {now}{from}; a new one with these ends:",
                c.local,
                c.remote,
                c.cookie
            );
        }
    }
    for v in &e.rules {
        let verdict = match &v.why_not {
            None => "matches".to_owned(),
            Some(why) => format!("no: {why}"),
        };
        tcpka::outln!("  rule {:<4} {:<40} {verdict}", v.id, v.matcher);
    }
    match &e.winner {
        Some(r) => tcpka::outln!(
            "applies rule {} (idle {}, count {}, interval {}{}{}): {}",
            r.id,
            r.idle,
            r.count,
            r.interval,
            r.user_timeout_ms
                .map(|ms| format!(", user timeout {ms} ms"))
                .unwrap_or_default(),
            if r.tracked { ", tracked" } else { "" },
            e.reason
        ),
        None => tcpka::outln!("applies nothing: {}", e.reason),
    }
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    match s {
        "error" | "warn" | "info" | "debug" => Ok(s.parse().expect("a level name")),
        _ => Err(format!("{s:?} is not error, warn, info or debug")),
    }
}

fn print_json(value: &impl serde::Serialize) {
    tcpka::outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialising plain data")
    );
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))
}

/// Streams `GET /v1/events` and prints each event.
async fn watch(a: WatchArgs) -> Result<(), Error> {
    let url = format!("http://{}/v1/events", a.api);
    let fail = |what: String| Error::Io {
        what,
        source: std::io::ErrorKind::Other.into(),
    };
    let token = match (&a.token, &a.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(tcpka::access::read_token_file(f)?),
        (None, None) => {
            let f = tcpka::access::default_token_file();
            f.exists()
                .then(|| tcpka::access::read_token_file(&f))
                .transpose()?
        }
    };
    let client = reqwest::Client::new();
    let mut req = client.get(&url);
    if let Some(t) = &token {
        req = req.bearer_auth(t);
    }
    let mut resp = req.send().await.map_err(|e| {
        fail(format!(
            "connecting to {url} (is `tcpka serve` running?): {e}"
        ))
    })?;
    if !resp.status().is_success() {
        return Err(fail(format!("{url}: HTTP {}", resp.status())));
    }
    let mut pending = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| fail(format!("reading {url}: {e}")))?
    {
        pending.extend_from_slice(&chunk);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if a.json {
                tcpka::outln!("{line}");
            } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["kind"] == "gap" {
                    tcpka::outln!(
                        "{} gap: {} events missed ({})",
                        v["time"].as_str().unwrap_or("-"),
                        v["missed"],
                        v["reason"].as_str().unwrap_or("?")
                    );
                    continue;
                }
                tcpka::outln!(
                    "{} {} {} -> {} cookie={} {}",
                    v["time"].as_str().unwrap_or("-"),
                    v["kind"].as_str().unwrap_or("?"),
                    v["local"].as_str().unwrap_or("?"),
                    v["remote"].as_str().unwrap_or("?"),
                    v["cookie"],
                    v["error"]
                        .as_u64()
                        .map(|e| format!("error={e}"))
                        .unwrap_or_default(),
                );
            }
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
        }
    }
    Ok(())
}

fn report_changed(changed: &[ConnStatus], what: &str, policy: &str, json: bool) {
    if !json && changed.is_empty() {
        return;
    }
    if json {
        print_json(&changed);
        return;
    }
    let n = changed.len();
    let plural = if n == 1 { "connection" } else { "connections" };
    if policy.is_empty() {
        tcpka::outln!("{what} on {n} {plural}");
    } else {
        tcpka::outln!("{what} on {n} {plural} ({policy})");
    }
    if changed.iter().any(|c| c.apply_failed) {
        tcpka::errln!("warning: the kernel refused some values; see `tcpka status`");
    }
}

fn print_status(conns: &[ConnStatus]) {
    tcpka::outln!(
        "{:<18}  {:<46}  {:<46}  {:<12}  {:<34}  SOURCE",
        "COOKIE",
        "LOCAL",
        "REMOTE",
        "STATE",
        "KEEPALIVE"
    );
    for c in conns {
        let k = &c.keepalive;
        let mut ka = if k.enabled {
            format!(
                "on idle={}s count={} intvl={}s",
                k.idle, k.count, k.interval
            )
        } else {
            "off".to_owned()
        };
        if let Some(ms) = k.user_timeout_ms {
            ka.push_str(&format!(" user_timeout={ms}ms"));
        }
        let source = match (c.source, c.rule) {
            (_, Some(id)) => format!("rule {id}"),
            (Some(s), None) => s.to_owned(),
            (None, None) => "-".to_owned(),
        };
        tcpka::outln!(
            "{:<18}  {:<46}  {:<46}  {:<12}  {:<34}  {source}",
            format!("{:#x}", c.cookie),
            c.local,
            c.remote,
            c.state,
            ka
        );
        if let Some(h) = c.holders.as_ref().filter(|h| !h.is_empty()) {
            tcpka::outln!("{:<18}  holders: {}", "", h.join(", "));
        }
        if k.count_ignored {
            tcpka::outln!(
                "{:<18}  note: TCP_USER_TIMEOUT is set, so the kernel ignores count={} and drops the connection {}ms after data stops being acknowledged",
                "", k.count, k.user_timeout_ms.unwrap_or(0)
            );
        }
    }
}

/// The API token: from --token-file, --token or TCPKA_TOKEN; for a TCP
/// listener without one, a new token written to /run/tcpka/api-token.
fn serve_token(
    listen: &Listen,
    token: Option<String>,
    file: Option<&Path>,
    group: Option<u32>,
) -> Result<Option<String>, Error> {
    let token = match (token, file) {
        (_, Some(f)) => Some(tcpka::access::read_token_file(f)?),
        (Some(t), None) => {
            tcpka::access::check_token(&t)
                .map_err(|why| Error::Invalid(tcpka::InvalidInput::Listen(why.into())))?;
            Some(t)
        }
        (None, None) => None,
    };
    if token.is_some() || !matches!(listen, Listen::Tcp(_)) {
        return Ok(token);
    }
    let t = tcpka::access::generate_token()?;
    let path = tcpka::access::default_token_file();
    tcpka::access::write_token_file(&path, &t, group)?;
    tcpka::errln!(
        "tcpka: API token in {} (send it as Authorization: Bearer TOKEN)",
        path.display()
    );
    Ok(Some(t))
}

/// The cgroup `load` and `serve` attach to: the one named, else the one an
/// existing installation recorded (so a plain `tcpka load` repairs an
/// installation whose cgroup was recreated), else the cgroup v2 root.
fn target_cgroup(layout: &PinLayout, named: Option<&Path>) -> Result<Cgroup, Error> {
    if named.is_none() {
        if let Ok(Some(i)) = loader::installed(layout) {
            return Cgroup::open(&i.cgroup).map_err(|e| Error::Io {
                what: format!(
                    "tcpka is loaded for cgroup {}, which no longer exists ({e}); start the service again, or `tcpka unload` and load elsewhere",
                    i.cgroup.display()
                ),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
    }
    Ok(Cgroup::open_or_root(named)?)
}

fn run(cli: Cli) -> Result<(), Error> {
    let layout = PinLayout::new(cli.pin_dir);
    match cli.command {
        Command::Load(args) => {
            let cgroup = target_cgroup(&layout, args.cgroup.as_deref())?;
            let outcome = loader::load(&layout, &cgroup, &args.kernel.options())?;
            let i = outcome.installation();
            let loaded = matches!(outcome, LoadOutcome::Loaded(_));
            let reattached = matches!(outcome, LoadOutcome::Reattached(_));
            if args.json {
                print_json(&serde_json::json!({
                    "loaded": loaded,
                    "already_loaded": !loaded,
                    "reattached": reattached,
                    "installation": i,
                }));
            } else if loaded {
                tcpka::outln!(
                    "loaded: attached to cgroup {}, pinned in {}",
                    i.cgroup.display(),
                    i.pin_dir.display()
                );
            } else if reattached {
                tcpka::outln!(
                    "re-attached: the cgroup had been removed; attached to cgroup {} again, pinned in {}",
                    i.cgroup.display(),
                    i.pin_dir.display()
                );
            } else {
                tcpka::outln!(
                    "already loaded: attached to cgroup {}, pinned in {}; nothing changed",
                    i.cgroup.display(),
                    i.pin_dir.display()
                );
            }
        }
        Command::Unload => {
            if loader::unload(&layout)? {
                tcpka::outln!("unloaded: detached and removed {}", layout.dir().display());
            } else {
                tcpka::outln!("not loaded: nothing to do");
            }
        }
        Command::Rule(RuleCommand::Add(a)) => {
            let policy = a.policy.policy()?;
            let m = RuleMatch {
                local_port: a.local_port,
                remote_port: a.remote_port,
                remote: a.remote,
            };
            let rule = Enforcer::new(layout).add_rule(m, policy, a.tracked)?;
            if a.json {
                print_json(&rule);
            } else {
                tcpka::outln!("{}", rule.id);
            }
        }
        Command::Rule(RuleCommand::Del { id }) => {
            Enforcer::new(layout).delete_rule(id)?;
            tcpka::outln!("deleted rule {id}");
        }
        Command::Rule(RuleCommand::Explain(a)) => {
            let enforcer = Enforcer::new(layout);
            let rules = enforcer.rules()?;
            let explanations = match a.ends.as_slice() {
                [local, remote] => {
                    let (local, remote) = (parse_endpoint(local)?, parse_endpoint(remote)?);
                    vec![(None, tcpka::rule::explain(&rules, local, remote))]
                }
                [conn] => {
                    // The live connections CONN names: what a new connection
                    // with their ends would get, beside what they hold.
                    let conn: ConnSpec = conn.parse()?;
                    let found = enforcer.apply(conn, None, Action::Query, a.netns.as_deref())?;
                    let mut out = Vec::new();
                    for c in found {
                        let (l, r) = (parse_endpoint(&c.local)?, parse_endpoint(&c.remote)?);
                        out.push((Some(c), tcpka::rule::explain(&rules, l, r)));
                    }
                    out
                }
                _ => unreachable!("clap takes one or two"),
            };
            if a.json {
                let v: Vec<_> = explanations
                    .iter()
                    .map(|(c, e)| match c {
                        Some(c) => serde_json::json!({ "connection": c, "explanation": e }),
                        None => serde_json::to_value(e).expect("plain data"),
                    })
                    .collect();
                if a.ends.len() == 2 {
                    print_json(&v[0]);
                } else {
                    print_json(&v);
                }
            } else {
                for (c, e) in &explanations {
                    print_explanation(c.as_ref(), e);
                }
            }
        }
        Command::Rule(RuleCommand::List(a)) => {
            let rules = Enforcer::new(layout).rules()?;
            if a.json {
                print_json(&rules);
            } else if rules.is_empty() {
                tcpka::outln!("no rules");
            } else {
                tcpka::outln!(
                    "{:>4}  {:>10}  {:>11}  {:<24}  {:>5}  {:>5}  {:>8}  {:>14}  {:<7}  {}",
                    "ID",
                    "LOCAL_PORT",
                    "REMOTE_PORT",
                    "REMOTE",
                    "IDLE",
                    "COUNT",
                    "INTERVAL",
                    "USER_TIMEOUT",
                    "TRACKED",
                    "NAME"
                );
                let any = |v: Option<String>| v.unwrap_or_else(|| "*".into());
                for r in rules {
                    tcpka::outln!(
                        "{:>4}  {:>10}  {:>11}  {:<24}  {:>5}  {:>5}  {:>8}  {:>14}  {:<7}  {}",
                        r.id,
                        any(r.local_port.map(|p| p.to_string())),
                        any(r.remote_port.map(|p| p.to_string())),
                        any(r.remote.map(|c| c.to_string())),
                        r.idle,
                        r.count,
                        r.interval,
                        r.user_timeout_ms.map_or("-".into(), |ms| format!("{ms}ms")),
                        if r.tracked { "yes" } else { "no" },
                        r.name.as_deref().unwrap_or("- (by hand)"),
                    );
                }
            }
        }
        Command::Enable(a) => {
            let policy = a.policy.policy()?;
            let t = a.target;
            let changed = Enforcer::new(layout).enable(
                t.which.conn,
                t.which.local,
                policy,
                t.holder.as_deref(),
                t.which.netns.as_deref(),
            )?;
            report_changed(&changed, "enabled keepalive", &policy.to_string(), t.json);
        }
        Command::Close(a) => {
            let w = a.which;
            let closed = Enforcer::new(layout).close(w.conn, w.local, w.netns.as_deref())?;
            if a.json {
                print_json(&closed);
            } else {
                let n = closed.len();
                tcpka::outln!("closed {n} connection{}", if n == 1 { "" } else { "s" });
            }
        }
        Command::Disable(t) => {
            let done = Enforcer::new(layout).disable(
                t.which.conn,
                t.which.local,
                t.holder.as_deref(),
                t.which.netns.as_deref(),
            )?;
            if t.json {
                print_json(&done);
            } else {
                report_changed(&done.changed, "disabled keepalive", "", false);
                for k in &done.kept {
                    tcpka::outln!(
                        "kept keepalive on {} -> {}: {} other holder(s) remain",
                        k.connection.local,
                        k.connection.remote,
                        k.holders_remaining
                    );
                }
            }
        }
        Command::Status(a) => {
            let enforcer = Enforcer::new(layout);
            let conns = match a.conn {
                Some(conn) => {
                    let mut found =
                        enforcer.apply(conn, a.local, Action::Query, a.netns.as_deref())?;
                    enforcer.attach_holders(&mut found)?;
                    found
                }
                None => enforcer.status(a.netns.as_deref())?,
            };
            if a.json {
                print_json(&conns);
            } else if conns.is_empty() {
                tcpka::outln!("no managed connections");
            } else {
                print_status(&conns);
            }
        }
        Command::Doctor(a) => {
            let checks = tcpka::doctor::run(&layout);
            let missing = checks
                .iter()
                .any(|c| c.status == tcpka::doctor::Status::Missing);
            if a.json {
                print_json(&serde_json::json!({ "ok": !missing, "checks": checks }));
            } else {
                for c in &checks {
                    tcpka::outln!("{}", c.line());
                }
            }
            if missing {
                return Err(Error::HostMissing {
                    check: checks
                        .iter()
                        .filter(|c| c.status == tcpka::doctor::Status::Missing)
                        .map(|c| c.name)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        Command::Info(a) => {
            let installation = loader::installed(&layout)?;
            let Some(installation) = installation else {
                if a.json {
                    print_json(&serde_json::json!({ "loaded": false }));
                }
                return Err(Error::NotLoaded {
                    pin_dir: layout.dir().into(),
                });
            };
            let enforcer = Enforcer::new(layout);
            let rules = enforcer.rules()?.len();
            let managed = enforcer.managed()?.len();
            let counters = enforcer.counters()?;
            let layout = enforcer.layout();
            let holders = tcpka::holders::total(layout)?;
            let holder_cap = tcpka::pinned::capacity(layout, keepalive_common::maps::HOLDERS)?;
            let conn_cap = tcpka::pinned::capacity(layout, keepalive_common::maps::CONNS)?;
            let index = tcpka::index::state(layout)?;
            let index_ports = tcpka::ports::read_index(layout)?;
            let rule_events =
                tcpka::ports::flag(layout, keepalive_common::ports::FLAG_RULE_EVENTS)?;
            let trace = tcpka::ports::flag(layout, keepalive_common::ports::FLAG_TRACE)?;
            if a.json {
                print_json(&serde_json::json!({
                    "loaded": true,
                    "installation": installation,
                    "rules": rules,
                    "managed_connections": managed,
                    "connection_capacity": conn_cap,
                    "holders": { "count": holders, "capacity": holder_cap },
                    "index": index,
                    "index_mode": installation.index,
                    "index_mode_reason": loader::index_reason(installation.index),
                    "index_ports": index_ports.to_string(),
                    "rule_events": rule_events,
                    "trace": trace,
                    "counters": counters,
                    "hooks": loader::hooks(layout),
                }));
            } else {
                tcpka::outln!("loaded: cgroup {}", installation.cgroup.display());
                match installation.holders {
                    loader::HolderMode::Scan => tcpka::outln!(
                        "holders: found on demand (a search of every process's descriptors when a command meets an unknown socket; no cost to other processes)"
                    ),
                    loader::HolderMode::Syscalls => tcpka::outln!(
                        "holders: syscall tracepoints accept/accept4/connect (commands take the direct path at once; every syscall on the host takes the slow path)"
                    ),
                }
                let why = loader::index_reason(installation.index);
                match installation.index {
                    loader::IndexMode::Ports => tcpka::outln!(
                        "index mode: ports {index_ports}, {why} (sock_ops indexes the cgroup's connections on these ports and watches them, and those a --tracked rule matched, until they close; other connections cost five array reads, and commands for them walk the socket table)"
                    ),
                    loader::IndexMode::Host => tcpka::outln!(
                        "index mode: host, {why} (the inet_sock_set_state tracepoint indexes every connection on the host; every connection setup on the host pays for it)"
                    ),
                }
                tcpka::outln!(
                    "rule events: {}",
                    if rule_events {
                        "on (applied and closed, for each connection a rule matches)"
                    } else {
                        "timeouts, resets and aborts only (load with --rule-events for applied and closed too)"
                    }
                );
                if trace {
                    tcpka::outln!(
                        "trace: on (a `tcpka trace` reads the programs' decisions; `tcpka trace --stop` if none runs)"
                    );
                }
                if !installation.seeded {
                    tcpka::outln!(
                        "load: INTERRUPTED: existing connections are not indexed yet; the next command (or `tcpka load`) completes it"
                    );
                }
                if installation.attached {
                    tcpka::outln!("attached: yes");
                } else {
                    tcpka::outln!(
                        "attached: NO: the cgroup was removed (a service restart?); new connections get no rules until `tcpka load` (or a running `tcpka serve`) attaches again"
                    );
                }
                tcpka::outln!("pins: {}", installation.pin_dir.display());
                tcpka::outln!("rules: {rules}");
                tcpka::outln!("managed connections: {managed} of {conn_cap}");
                tcpka::outln!("holders: {holders} of {holder_cap}");
                if index.failures > 0 {
                    tcpka::outln!(
                        "index: INCOMPLETE: full, {} connections not indexed ({} of {} entries); every peer lookup walks the socket table",
                        index.failures,
                        index.entries,
                        index.capacity
                    );
                } else if index.overflowed_peers > 0 {
                    tcpka::outln!(
                        "index: INCOMPLETE: {} peers have more connections than their slots; lookups of those peers walk the socket table ({} of {} entries)",
                        index.overflowed_peers,
                        index.entries,
                        index.capacity
                    );
                } else {
                    tcpka::outln!(
                        "index: complete ({} of {} entries)",
                        index.entries,
                        index.capacity
                    );
                }
                tcpka::outln!("applied by rule: {}", counters.applied_by_rule);
                tcpka::outln!("setsockopt errors: {}", counters.setsockopt_errors);
                tcpka::outln!("connection map full: {}", counters.conns_map_full);
                if counters.close_watch_errors > 0 {
                    tcpka::outln!(
                        "close watch errors: {} (connections whose close is not reported)",
                        counters.close_watch_errors
                    );
                }
                tcpka::outln!(
                    "events dropped (applied/closed): {}",
                    counters.events_dropped
                );
                tcpka::outln!(
                    "events dropped (timeout/reset/aborted): {}",
                    counters.alerts_dropped
                );
            }
        }
        Command::Serve(a) => {
            // The configuration file's [serve] settings, under the options
            // given here.
            let file = match &a.config {
                Some(path) => tcpka::config::Config::load(path)?.serve,
                None => ServeSettings::default(),
            };
            let cgroup = target_cgroup(&layout, a.cgroup.as_deref().or(file.cgroup.as_deref()))?;
            let api_group = a
                .api_group
                .as_deref()
                .or(file.api_group.as_deref())
                .map(tcpka::access::group_id)
                .transpose()?;
            let listen = match a.listen.or(file.listen.clone()) {
                Some(l) => l,
                None => server::DEFAULT_LISTEN
                    .parse::<Listen>()
                    .map_err(|e| Error::Invalid(tcpka::InvalidInput::Listen(e)))?,
            };
            // A token from the command line or the environment wins over the
            // file's token file.
            let token_file = a
                .token_file
                .as_deref()
                .or(file.token_file.as_deref().filter(|_| a.token.is_none()));
            let webhook_secret_file = a
                .webhook_secret_file
                .as_deref()
                .or(file.webhook_secret_file.as_deref());
            let events_token_file = a
                .events_token_file
                .as_deref()
                .or(file.events_token_file.as_deref());
            let webhook_ca = a.webhook_ca.as_deref().or(file.webhook_ca.as_deref());
            let webhook = a.webhook.or(file.webhook.clone());
            if webhook.is_none() && (webhook_secret_file.is_some() || webhook_ca.is_some()) {
                return Err(Error::Invalid(tcpka::InvalidInput::Usage(
                    "a webhook secret or CA file needs a webhook (--webhook URL)".into(),
                )));
            }
            let evapi_addr = a.evapi.or(file.evapi);
            if webhook.is_none() && evapi_addr.is_none() && events_token_file.is_some() {
                return Err(Error::Invalid(tcpka::InvalidInput::Usage(
                    "an events token file needs a receiver (--webhook URL or --evapi HOST:PORT)"
                        .into(),
                )));
            }
            if let (Some(url), Some(_)) = (&webhook, events_token_file) {
                if !server::webhook_keeps_secrets(url) {
                    return Err(Error::Invalid(tcpka::InvalidInput::Usage(format!(
                        "--events-token-file sends the token in clear: the webhook must be \
                         https:// or on a loopback address, not {url}"
                    ))));
                }
            }
            // Files are read before the token is made: a bad one changes nothing.
            let events_token = events_token_file
                .map(tcpka::access::read_token_file)
                .transpose()?;
            let webhook = webhook
                .map(|url| {
                    Ok::<_, Error>(server::WebhookConfig {
                        url,
                        secret: webhook_secret_file
                            .map(tcpka::access::read_token_file)
                            .transpose()?,
                        bearer: events_token.clone(),
                        ca_pem: webhook_ca
                            .map(|p| {
                                std::fs::read(p)
                                    .map_err(|e| Error::io(format!("reading {}", p.display()), e))
                            })
                            .transpose()?,
                    })
                })
                .transpose()?;
            let evapi = match evapi_addr {
                None => {
                    if a.evapi_user.is_some() || file.evapi_user.is_some() {
                        return Err(Error::Invalid(tcpka::InvalidInput::Usage(
                            "--evapi-user needs --evapi HOST:PORT".into(),
                        )));
                    }
                    None
                }
                Some(addr) => {
                    // Without --evapi-user: Kamailio's usual user, if this
                    // host has one (root is always accepted).
                    let users = match a.evapi_user.clone().or(file.evapi_user.clone()) {
                        Some(user) => vec![tcpka::access::uid_of(&user).ok_or_else(|| {
                            Error::Invalid(tcpka::InvalidInput::Usage(format!(
                                "--evapi-user: no such user {user:?}"
                            )))
                        })?],
                        None => tcpka::access::uid_of("kamailio").into_iter().collect(),
                    };
                    Some(tcpka::evapi::EvapiConfig {
                        addr,
                        token: events_token.clone(),
                        users,
                    })
                }
            };
            let token = serve_token(&listen, a.token, token_file, api_group)?;
            let config = server::Config {
                listen,
                token,
                api_group,
                load: a.kernel.options_over(&file),
                webhook,
                evapi,
                json: a.json || file.json.unwrap_or(false),
                rules_file: a.config,
                kernel_log: a.kernel_log,
            };
            runtime()?.block_on(server::run(layout, cgroup, config))?;
        }
        Command::Watch(a) => runtime()?.block_on(watch(a))?,
        Command::Apply(a) => {
            let config = tcpka::config::Config::load(&a.file)?;
            let steps = Enforcer::new(layout).apply_config(&config, a.dry_run)?;
            if a.json {
                print_json(&steps);
            } else {
                for s in &steps {
                    tcpka::outln!("{s}");
                }
                let n = steps.len();
                let changes = if n == 1 {
                    "1 change".to_owned()
                } else {
                    format!("{n} changes")
                };
                match (n, a.dry_run) {
                    (0, _) => tcpka::outln!("rules already match {}", a.file.display()),
                    (_, true) => tcpka::outln!("{changes}; nothing changed (--dry-run)"),
                    (_, false) => tcpka::outln!("{changes} applied"),
                }
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "tcpka", &mut out);
            tcpka::outln!("{}", String::from_utf8_lossy(&out).trim_end());
        }
        Command::Manpages { dir } => {
            let n = write_man_pages(&dir)?;
            tcpka::outln!("wrote {n} man pages to {}", dir.display());
        }
        Command::Trace(a) => {
            let enforcer = Enforcer::new(layout.clone());
            if a.stop {
                let was = enforcer.set_trace(false)?;
                tcpka::outln!(
                    "{}",
                    if was {
                        "trace turned off"
                    } else {
                        "no trace was on"
                    }
                );
            } else {
                tcpka::trace::run(&enforcer, &layout, a.json)?;
            }
        }
        Command::Reload => {
            let Some(pid) = tcpka::lock::serve_pid(&layout)? else {
                return Err(Error::NoDaemon(layout.dir().into()));
            };
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .map_err(|e| Error::io(format!("signalling tcpka serve (pid {pid})"), e.into()))?;
            tcpka::outln!("asked tcpka serve (pid {pid}) to apply its configuration file again");
        }
    }
    Ok(())
}
