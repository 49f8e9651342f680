//! `tcpka serve`: the daemon's options (the command line over the
//! configuration file's `[serve]`), then the server.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::Args;
use tcpka::{
    config::{Listen, ServeSettings},
    paths::PinLayout,
    server, Error,
};

use super::{
    args::KernelArgs,
    fleet::EtcdArgs,
    load::target_cgroup,
    output::{parse_level, runtime},
};

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// cgroup v2 directory to attach to when not loaded yet [default: the
    /// root of the cgroup v2 mount].
    #[arg(long)]
    pub(crate) cgroup: Option<PathBuf>,
    /// How the kernel side is set up, when serve loads.
    #[command(flatten)]
    pub(crate) kernel: KernelArgs,
    /// Configuration file whose named rules are applied at start and on
    /// SIGHUP (`tcpka reload`); see `tcpka apply --help`.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Log the kernel programs' decisions (as `tcpka trace` prints them),
    /// at most this detailed: error, warn, info or debug. Off by default:
    /// the programs then test one bit.
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    pub(crate) kernel_log: Option<log::LevelFilter>,
    /// Log one JSON object per line instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Where the API listens: ADDR:PORT or unix:/path. A non-loopback
    /// address needs --token.
    #[arg(long, value_parser = |s: &str| s.parse::<Listen>())]
    pub(crate) listen: Option<Listen>,
    /// Require `Authorization: Bearer TOKEN` (or HTTP Basic with the token
    /// as the password) on every request. Prefer
    /// --token-file or the TCPKA_TOKEN environment variable: an argument
    /// is visible to every local user in `ps`. A TCP listener always has a
    /// token: without one, serve generates one into /run/tcpka/api-token
    /// (another --pin-dir's: /run/tcpka/locks/NAME.token), readable by root
    /// and by --api-group.
    #[arg(long, env = "TCPKA_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Read the token from FILE (one line; owned by root or by the user
    /// serve runs as, and not readable by others).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub(crate) token_file: Option<PathBuf>,
    /// Group (name or gid) whose members may use the API besides root: a
    /// unix socket listener is made mode 0660 with this group, and a
    /// generated token file 0640.
    #[arg(long, value_name = "GROUP")]
    pub(crate) api_group: Option<String>,
    /// POST each timeout/reset/closed/aborted event (and gap markers) as
    /// JSON to this URL, http:// or https:// (retried with backoff; a
    /// bounded queue, drops counted in /metrics and reported as a gap).
    #[arg(long, value_name = "URL")]
    pub(crate) webhook: Option<String>,
    /// Sign every webhook request with this secret (the file's first
    /// line): headers X-Tcpka-Timestamp (Unix seconds) and
    /// X-Tcpka-Signature: sha256=HEX, the HMAC-SHA256 of
    /// "TIMESTAMP.BODY". The receiver recomputes it to reject forgeries.
    #[arg(long, value_name = "FILE")]
    pub(crate) webhook_secret_file: Option<PathBuf>,
    /// A token (the file's first line) for the receivers of events that
    /// cannot check an HMAC, such as Kamailio's configuration: sent as
    /// `Authorization: Bearer TOKEN` with every webhook request (loopback
    /// or https only) and as `"token"` in every event over --evapi.
    #[arg(long, value_name = "FILE")]
    pub(crate) events_token_file: Option<PathBuf>,
    /// Kamailio's evapi server (HOST:PORT, on this host): tcpka connects,
    /// takes enable/disable commands relayed with evapi_relay() (JSON
    /// netstrings, a command or an array of them; ones that arrive together
    /// are applied together) and
    /// sends events back, into event_route[evapi:message-received].
    /// Reconnects with backoff.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) evapi: Option<SocketAddr>,
    /// The user Kamailio runs as (name or uid): tcpka talks only to an
    /// evapi server whose socket belongs to root or to this user
    /// [default: kamailio].
    #[arg(long, value_name = "USER")]
    pub(crate) evapi_user: Option<String>,
    /// The kinds of event sent over --evapi, comma-separated: timeout,
    /// reset, aborted, gap, closed, or all [default:
    /// timeout,reset,aborted,gap: Kamailio sees a connection close by
    /// itself, and with a connection per phone `closed` is an event per
    /// call].
    #[arg(long, value_name = "KINDS", value_delimiter = ',')]
    pub(crate) evapi_events: Vec<String>,
    /// Also trust the CA certificate(s) in this PEM file for an https://
    /// webhook (the public web's CAs are trusted already).
    #[arg(long, value_name = "FILE")]
    pub(crate) webhook_ca: Option<PathBuf>,
    /// Join a fleet: take the rules under PREFIX/rules/ in etcd that select
    /// this node, keep this node's status at PREFIX/nodes/NODE (see
    /// `tcpka fleet --help`). Enforcement goes on when etcd is away.
    #[command(flatten)]
    pub(crate) etcd: EtcdArgs,
    /// This node's name in the fleet [default: the host name].
    #[arg(long, value_name = "NAME", value_parser = |s: &str| {
        if tcpka::fleet::valid_node(s) { Ok(s.to_owned()) }
        else { Err("1 to 64 of A-Z a-z 0-9 . _ -".to_owned()) }
    })]
    pub(crate) node: Option<String>,
    /// A label of this node, KEY=VALUE (repeat it), that fleet rules can
    /// select on.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = |s: &str| tcpka::fleet::parse_label(s))]
    pub(crate) labels: Vec<(String, String)>,
    /// Where the fleet rules last applied are kept, to be applied at start
    /// without etcd [default: /var/lib/tcpka/fleet/, one file per
    /// installation].
    #[arg(long, value_name = "FILE")]
    pub(crate) etcd_cache: Option<PathBuf>,
}

pub(crate) fn serve(layout: PinLayout, a: ServeArgs) -> Result<(), Error> {
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
            "an events token file needs a receiver (--webhook URL or --evapi HOST:PORT)".into(),
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
            if !a.evapi_events.is_empty() || file.evapi_events.is_some() {
                return Err(Error::Invalid(tcpka::InvalidInput::Usage(
                    "--evapi-events needs --evapi HOST:PORT".into(),
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
            let events = if !a.evapi_events.is_empty() {
                tcpka::evapi::parse_events(&a.evapi_events).map_err(|e| {
                    Error::Invalid(tcpka::InvalidInput::Usage(format!("--evapi-events: {e}")))
                })?
            } else {
                file.evapi_events
                    .clone()
                    .unwrap_or_else(|| tcpka::evapi::DEFAULT_EVENTS.to_vec())
            };
            Some(tcpka::evapi::EvapiConfig {
                addr,
                token: events_token.clone(),
                users,
                events,
            })
        }
    };
    let fleet = match a.etcd.options_over(&file.fleet)? {
        None => {
            if a.node.is_some() || !a.labels.is_empty() || a.etcd_cache.is_some() {
                return Err(Error::Invalid(tcpka::InvalidInput::Usage(
                    "--node, --label and --etcd-cache need --etcd URL".into(),
                )));
            }
            None
        }
        Some(etcd) => {
            let mut labels = file.fleet.labels.clone();
            labels.extend(a.labels);
            Some(tcpka::fleet::AgentConfig {
                etcd,
                node: a
                    .node
                    .or(file.fleet.node.clone())
                    .unwrap_or_else(tcpka::fleet::default_node),
                labels,
                cache: a
                    .etcd_cache
                    .or(file.fleet.etcd_cache.clone())
                    .unwrap_or_else(|| layout.fleet_cache_file()),
            })
        }
    };
    let mut token_write = None;
    let token = serve_token(&layout, &listen, a.token, token_file, &mut token_write)?;
    let config = server::Config {
        listen,
        token,
        token_file: token_write,
        api_group,
        load: a.kernel.options_over(&file),
        webhook,
        evapi,
        json: a.json || file.json.unwrap_or(false),
        rules_file: a.config,
        kernel_log: a.kernel_log,
        fleet,
    };
    runtime()?.block_on(server::run(layout, cgroup, config))?;
    Ok(())
}

/// The API token: from --token-file, --token or TCPKA_TOKEN; for a TCP
/// listener without one, a new token, for serve to write to the
/// installation's token file (`write_to`: /run/tcpka/api-token for the
/// default installation).
pub(crate) fn serve_token(
    layout: &PinLayout,
    listen: &Listen,
    token: Option<String>,
    file: Option<&Path>,
    write_to: &mut Option<PathBuf>,
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
    // Written once serve holds the installation and has loaded: a serve
    // that cannot start leaves the running one's token alone.
    let t = tcpka::access::generate_token()?;
    *write_to = Some(layout.token_file());
    Ok(Some(t))
}
