//! `tcpka serve`: the HTTP/JSON API a SIP controller drives, the event
//! stream, the webhook and the metrics. Thin: every request goes to the
//! same [`Enforcer`] the CLI uses.
//!
//! Replies carry `"result": 1` or `"result": -1` like the reference module,
//! with HTTP 200, 400 (invalid input), 401 (token), 404 (no such
//! connection or rule), 503 (not loaded) or 500.
use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use axum::{
    middleware,
    routing::{delete, get, post},
    Router,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::broadcast,
};

use crate::{
    access, config::Listen, enforcer::Enforcer, feed::Message, loader, paths::PinLayout, Error,
    InvalidInput,
};

mod auth;
mod batch;
mod commands;
mod connections;
mod handlers;
mod listeners;
mod metrics;
mod rules;
mod tasks;
mod webhook;

use auth::{guard, ConnInfo};
use batch::{spawn_batcher, Job};
use commands::{close, disable, enable, EvapiCommands};
use connections::connections;
use handlers::{events, healthz};
use listeners::{
    bind_secured, keep_alive, loopback_caller, serve_connections, Caller, Slots, SocketFile,
};
use metrics::{metrics, Metrics};
use rules::{rules_add, rules_del, rules_list};
use tasks::{
    apply_rules_file, spawn_attach_watch, spawn_holder_sweep, spawn_log_report, spawn_reload,
};
pub use webhook::{sign, webhook_keeps_secrets, WebhookConfig};
use webhook::{spawn_feed, spawn_webhook, Webhook};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7077";
/// API connections served at once for all callers (see `Slots`).
pub const MAX_CONNECTIONS: usize = 256;
/// Of those, most one caller (a uid, or a remote address) may hold.
pub const PER_CALLER: usize = 64;
/// Connections beyond [`MAX_CONNECTIONS`] that only root and the daemon's
/// own user may take.
pub const RESERVED: usize = 32;
/// A client must send each request head within this, or is disconnected
/// (this also ends idle keep-alive connections).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Event streams open at most for all callers (apart from the API's
/// connections), and more that only root and the daemon's user may open.
pub const EVENT_STREAMS: usize = 64;
/// Of those, most one caller may hold (also the number kept for root).
pub const STREAMS_PER_CALLER: usize = 8;
/// Largest request head (request line and headers), in bytes: a larger one
/// is refused (431) and its connection closed.
pub const HEAD_LIMIT: usize = 16 * 1024;
/// Longest time a request (other than the event stream) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long in-flight requests may take after SIGINT/SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Webhook deliveries waiting at most; more are dropped (and counted).
pub const WEBHOOK_QUEUE: usize = 1024;

/// Daemon settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Listen,
    /// Required on every request when set. A TCP listener always has one
    /// (see [`resolve_token`]).
    pub token: Option<String>,
    /// Where to write the token, once serve has loaded (a generated one:
    /// `/run/tcpka/api-token`, readable by `api_group`).
    pub token_file: Option<PathBuf>,
    /// Group whose members may use a unix socket listener (root always
    /// may); the socket is then mode 0660 with that group, else 0600.
    pub api_group: Option<u32>,
    /// How to load, when `serve` loads.
    pub load: loader::LoadOptions,
    pub webhook: Option<WebhookConfig>,
    /// Kamailio's evapi server to take commands from and send events to.
    pub evapi: Option<crate::evapi::EvapiConfig>,
    /// Log events as JSON lines instead of text.
    pub json: bool,
    /// Configuration file whose named rules are applied at start and on
    /// SIGHUP (`serve --config`).
    pub rules_file: Option<PathBuf>,
    /// The kernel programs' decisions in the daemon's log, at most this
    /// detailed (`serve --kernel-log`); off when `None`.
    pub kernel_log: Option<log::LevelFilter>,
    /// Rules from etcd, and this node's status there (`serve --etcd`).
    pub fleet: Option<crate::fleet::AgentConfig>,
}

#[derive(Clone)]
struct AppState {
    enforcer: Enforcer,
    batcher: std::sync::mpsc::Sender<Job>,
    events: broadcast::Sender<Arc<Message>>,
    metrics: Arc<Metrics>,
    /// Slots of the event streams (see [`EVENT_STREAMS`]).
    streams: Arc<Slots>,
    token: Option<Arc<str>>,
    /// Timeouts and resets, for the fleet's node status.
    event_counts: Arc<crate::fleet::EventCounts>,
    /// Told when a command-managed connection ends (its holders go).
    ended: Arc<tokio::sync::Notify>,
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/enable", post(enable))
        .route("/v1/disable", post(disable))
        .route("/v1/close", post(close))
        .route("/v1/connections", get(connections))
        .route("/v1/rules", get(rules_list).post(rules_add))
        .route("/v1/rules/{id}", delete(rules_del))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Loads or adopts the installation, then serves until SIGINT or SIGTERM.
/// Stopping leaves enforcement in place.
pub async fn run(
    layout: PinLayout,
    cgroup: crate::cgroup::Cgroup,
    config: Config,
) -> Result<(), Error> {
    check_listen(&config)?;
    // Everything the configuration can get wrong is found before anything
    // is loaded.
    let enforcer = Enforcer::for_daemon(layout.clone());
    let metrics = Arc::new(Metrics::new(&enforcer));
    let webhook = config
        .webhook
        .clone()
        .map(|w| spawn_webhook(w, metrics.clone()))
        .transpose()?;
    if let Some(path) = &config.rules_file {
        crate::config::Config::load(path)?;
    }
    // SIGHUP from here on is a reload, applied once the rules file has
    // been applied the first time (until here it was ignored: main).
    let hup = signal(SignalKind::hangup()).map_err(|e| Error::io("installing SIGHUP", e))?;
    let _serving = crate::lock::ServeLock::acquire(&layout)?;
    load_installation(&layout, cgroup, &config.load).await?;
    write_token_file(&config)?;
    let (events_tx, _) = broadcast::channel(4096);
    if let Some(path) = &config.rules_file {
        apply_rules_file(&enforcer, path).await?;
    }
    spawn_reload(hup, enforcer.clone(), config.rules_file.clone());
    let state = app_state(enforcer, events_tx, metrics.clone(), &config);
    let background = spawn_background(&layout, &state, webhook, metrics, &config)?;
    let app = router(state);

    let stop_rx = stop_on_signals()?;
    let result = serve(&config, app, stop_rx).await;
    background.stop().await;
    result?;
    tracing::info!("stopped; enforcement stays in place (tcpka unload removes it)");
    Ok(())
}

/// Refuses a TCP listener without a token. Checked before anything else:
/// nothing is loaded or spawned yet.
fn check_listen(config: &Config) -> Result<(), Error> {
    if matches!(config.listen, Listen::Tcp(_)) && config.token.is_none() {
        return Err(Error::Invalid(InvalidInput::Listen(
            "a TCP listener needs a token (--token-file FILE or TCPKA_TOKEN)".into(),
        )));
    }
    Ok(())
}

/// Loads, adopts or re-attaches the installation (see [`loader::load`]),
/// and logs which. A load that fails removes what it pinned; an adopted
/// installation is left as it was.
async fn load_installation(
    layout: &PinLayout,
    cgroup: crate::cgroup::Cgroup,
    options: &loader::LoadOptions,
) -> Result<(), Error> {
    let outcome = {
        let layout = layout.clone();
        let options = options.clone();
        tokio::task::spawn_blocking(move || loader::load(&layout, &cgroup, &options))
            .await
            .expect("load task")?
    };
    let i = outcome.installation();
    let verb = match outcome {
        loader::LoadOutcome::Loaded(_) => "loaded",
        loader::LoadOutcome::AlreadyLoaded(_) => "adopted",
        loader::LoadOutcome::Reattached(_) => "re-attached",
    };
    tracing::info!(
        cgroup = %i.cgroup.display(),
        pin_dir = %i.pin_dir.display(),
        "{verb} the installation"
    );
    Ok(())
}

/// Writes the API token where `--token-file` asks for it, when there is
/// both a file and a token. On failure the installation stays loaded.
fn write_token_file(config: &Config) -> Result<(), Error> {
    if let (Some(path), Some(token)) = (&config.token_file, &config.token) {
        access::write_token_file(path, token, config.api_group)?;
        crate::errln!(
            "tcpka: API token in {} (send it as Authorization: Bearer TOKEN)",
            path.display()
        );
    }
    Ok(())
}

/// The handlers' shared state; starts the batcher, the one task it spawns.
fn app_state(
    enforcer: Enforcer,
    events: broadcast::Sender<Arc<Message>>,
    metrics: Arc<Metrics>,
    config: &Config,
) -> AppState {
    AppState {
        batcher: spawn_batcher(enforcer.clone(), metrics.clone()),
        enforcer,
        events,
        metrics,
        streams: Slots::with(
            "event streams",
            EVENT_STREAMS,
            STREAMS_PER_CALLER,
            STREAMS_PER_CALLER,
        ),
        token: config.token.as_deref().map(Arc::from),
        event_counts: Arc::default(),
        ended: Arc::default(),
    }
}

/// The background work that is stopped, not just dropped, when serving
/// ends: the fleet agent and the kernel log.
struct Background {
    fleet_agent: Option<crate::fleet::AgentHandle>,
    kernel_log_stop: Arc<std::sync::atomic::AtomicBool>,
    kernel_log: Option<std::thread::JoinHandle<()>>,
}

/// Spawns the daemon's tasks: the event feed (and webhook), the fleet
/// agent, evapi, the holder sweep, the attach watch, the log report and
/// the kernel log. A kernel log that cannot start fails it with the other
/// tasks already running (they end with the runtime).
fn spawn_background(
    layout: &PinLayout,
    state: &AppState,
    webhook: Option<Webhook>,
    metrics: Arc<Metrics>,
    config: &Config,
) -> Result<Background, Error> {
    spawn_feed(layout, state, webhook, config.json);
    let mut fleet_agent = None;
    if let Some(fleet) = config.fleet.clone() {
        tracing::info!(
            node = %fleet.node,
            "fleet: rules from etcd ({}) under {}",
            fleet.etcd.endpoints.join(","),
            fleet.etcd.prefix
        );
        fleet_agent = Some(crate::fleet::start_agent(
            fleet,
            state.enforcer.clone(),
            state.event_counts.clone(),
        ));
    }
    if let Some(evapi) = config.evapi.clone() {
        tracing::info!("evapi: commands from and events to {}", evapi.addr);
        tokio::spawn(crate::evapi::run(
            evapi,
            EvapiCommands(
                state.clone(),
                Arc::new(tokio::sync::Semaphore::new(crate::evapi::MAX_PENDING)),
            ),
            state.events.clone(),
        ));
    }
    spawn_holder_sweep(state.enforcer.clone(), state.ended.clone());
    spawn_attach_watch(layout.clone(), metrics);
    spawn_log_report();
    let kernel_log_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kernel_log = match config.kernel_log {
        Some(max) => Some(crate::trace::spawn_into_log(
            state.enforcer.clone(),
            layout,
            max,
            kernel_log_stop.clone(),
        )?),
        None => None,
    };
    Ok(Background {
        fleet_agent,
        kernel_log_stop,
        kernel_log,
    })
}

impl Background {
    /// Stops the fleet agent and the kernel log, waiting for both.
    async fn stop(self) {
        // The fleet's rules are kept on disk for the next start.
        if let Some(agent) = self.fleet_agent {
            let _ = tokio::task::spawn_blocking(move || agent.stop()).await;
        }
        // The kernel log goes off with the daemon.
        self.kernel_log_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.kernel_log {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers; the receiver turns true on
/// either (systemd is told the daemon is stopping). On failure nothing is
/// spawned.
fn stop_on_signals() -> Result<tokio::sync::watch::Receiver<bool>, Error> {
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| Error::io("installing SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("installing SIGINT", e))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        crate::service::notify(&[sd_notify::NotifyState::Stopping]);
        let _ = stop_tx.send(true);
    });
    Ok(stop_rx)
}

/// Serves the API on the configured listener until told to stop, plus
/// [`SHUTDOWN_GRACE`] for requests in flight. A listener that cannot be
/// bound fails it; a unix socket's file is removed when it returns.
async fn serve(
    config: &Config,
    app: Router,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Error> {
    let stopping = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // Requests in flight get a moment to finish; event streams never do,
    // so the daemon does not wait for them past the grace period.
    let grace = {
        let rx = stop_rx.clone();
        async move {
            stopping(rx).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    };
    let serving = async {
        match &config.listen {
            Listen::Tcp(addr) => serve_tcp(*addr, app, stop_rx.clone()).await,
            Listen::Unix(path) => serve_unix(path, config.api_group, app, stop_rx.clone()).await,
        }
    };
    tokio::select! {
        r = serving => r,
        _ = grace => Ok(()),
    }
}

/// Binds the TCP listener and serves it (see [`serve`]); tells systemd
/// the daemon is ready once bound.
async fn serve_tcp(
    addr: std::net::SocketAddr,
    app: Router,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("listening on {addr}"), e))?;
    tracing::info!("API on http://{addr}");
    crate::service::notify(&[sd_notify::NotifyState::Ready]);
    let info = ConnInfo {
        peer: None,
        loopback_port: addr.ip().is_loopback().then_some(addr.port()),
    };
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("reading the API's address", e))?;
    serve_connections(
        || async {
            let (io, peer) = listener.accept().await?;
            keep_alive(&io);
            // A local client is known by its uid (one sock_diag
            // lookup); one on another host by its address.
            let caller = if peer.ip().is_loopback() {
                tokio::task::spawn_blocking(move || loopback_caller(local, peer))
                    .await
                    .unwrap_or(Caller::Addr(peer.ip()))
            } else {
                Caller::Addr(peer.ip())
            };
            Ok((io, info, caller))
        },
        app,
        stop_rx,
    )
    .await;
    Ok(())
}

/// Claims and binds the unix socket (mode and group from `api_group`) and
/// serves it (see [`serve`]); tells systemd the daemon is ready once
/// bound. The socket file is removed when it returns.
async fn serve_unix(
    path: &std::path::Path,
    api_group: Option<u32>,
    app: Router,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Error> {
    access::claim_socket_path(path)?;
    let listener = bind_secured(path, api_group)?;
    let _remove = SocketFile::new(path);
    tracing::info!("API on unix:{}", path.display());
    crate::service::notify(&[sd_notify::NotifyState::Ready]);
    serve_connections(
        || async {
            let (io, _) = listener.accept().await?;
            let peer = access::Peer::of_socket(&io, api_group)?;
            let info = ConnInfo {
                peer: Some(peer),
                loopback_port: None,
            };
            Ok((io, info, Caller::Uid(peer.uid)))
        },
        app,
        stop_rx,
    )
    .await;
    Ok(())
}
