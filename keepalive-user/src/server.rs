//! `tcpka serve`: the HTTP/JSON API a SIP controller drives, the event
//! stream, the webhook and the metrics. Thin: every request goes to the
//! same [`Enforcer`] the CLI uses.
//!
//! Replies carry `"result": 1` or `"result": -1` like the reference module,
//! with HTTP 200, 400 (invalid input), 401 (token), 404 (no such
//! connection or rule), 503 (not loaded) or 500.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    extract::{Path as UrlPath, Query, Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Json, Router,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{broadcast, mpsc},
};
use tokio_stream::{wrappers::BroadcastStream, StreamExt as _};

use crate::{
    access,
    config::Listen,
    conn::{parse_endpoint, ConnSpec},
    enforcer::{Action, Disabled, Enforcer, Op},
    feed::{self, Gap, Message},
    holders::parse_holder,
    loader,
    paths::PinLayout,
    policy::Policy,
    rule::{parse_port, Cidr, RuleMatch},
    Error, InvalidInput,
};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7077";
/// Most API connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// A client must send each request head within this, or is disconnected
/// (this also ends idle keep-alive connections).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time a request (other than the event stream) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long in-flight requests may take after SIGINT/SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Webhook deliveries waiting at most; more are dropped (and counted).
pub const WEBHOOK_QUEUE: usize = 1024;

/// Where and how events are POSTed.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// http:// or https:// URL.
    pub url: String,
    /// HMAC-SHA256 key for the X-Tcpka-Signature header.
    pub secret: Option<String>,
    /// Token sent as `Authorization: Bearer TOKEN`.
    pub bearer: Option<String>,
    /// Extra CA certificates (PEM) to trust for https.
    pub ca_pem: Option<Vec<u8>>,
}

/// Whether a webhook URL keeps a bearer token from other eyes: https, or
/// plain http to a loopback address.
pub fn webhook_keeps_secrets(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let host = u.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match u.scheme() {
        "https" => true,
        "http" => {
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback())
        }
        _ => false,
    }
}

/// The signature headers of one webhook body: (timestamp, "sha256=HEX").
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Daemon settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Listen,
    /// Required on every request when set. A TCP listener always has one
    /// (see [`resolve_token`]).
    pub token: Option<String>,
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
}

#[derive(Clone)]
struct AppState {
    enforcer: Enforcer,
    batcher: std::sync::mpsc::Sender<Job>,
    events: broadcast::Sender<Arc<Message>>,
    metrics: Arc<Metrics>,
    token: Option<Arc<str>>,
    api_group: Option<u32>,
}

/// What is done with a command's result, on the batch worker's thread.
type Done = Box<dyn FnOnce(Result<Disabled, Error>) + Send>;

/// One enable or disable waiting for the batch worker, what to do with its
/// result, and whether it may wait for company ([`LINGER`]).
struct Job {
    op: Op,
    done: Done,
    linger: bool,
}

/// Most commands run together in one batch.
const BATCH_MAX: usize = 64;

/// How long a batch of evapi commands waits for more before it runs.
/// Kamailio never waits for their results, and at a call rate most arrive
/// alone: gathering them for a millisecond runs several per wake-up of the
/// worker and per lock, where alone each paid for both. An API caller
/// waits for its reply, so a batch with an API command never lingers.
const LINGER: Duration = Duration::from_millis(1);

/// The one worker that runs commands: it takes every command waiting and
/// runs them as one batch (one lock, shared walks of the socket table), so
/// concurrent requests share the kernel work instead of queueing for it.
fn spawn_batcher(enforcer: Enforcer, metrics: Arc<Metrics>) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::spawn(move || {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            let mut lingered = false;
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    // One sleep, not a wake-up per arrival: that is the
                    // saving.
                    Err(std::sync::mpsc::TryRecvError::Empty)
                        if !lingered && batch.iter().all(|j| j.linger) =>
                    {
                        std::thread::sleep(LINGER);
                        lingered = true;
                    }
                    Err(_) => break,
                }
            }
            metrics.batch_size.observe(batch.len() as f64);
            let (ops, dones): (Vec<Op>, Vec<Done>) =
                batch.into_iter().map(|j| (j.op, j.done)).unzip();
            let start = Instant::now();
            let results = enforcer.run_batch(ops);
            metrics.pass_seconds.observe(start.elapsed().as_secs_f64());
            for (result, done) in results.into_iter().zip(dones) {
                done(result);
            }
        }
    });
    tx
}

fn worker_gone() -> Error {
    Error::Io {
        what: "the command worker stopped".into(),
        source: std::io::ErrorKind::Other.into(),
    }
}

/// Hands one command to the batch worker at once (commands run in the
/// order they are queued); the future waits for its result.
fn queue(state: &AppState, op: Op) -> impl std::future::Future<Output = Result<Disabled, Error>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done: Done = Box::new(move |r| {
        let _ = tx.send(r);
    });
    let sent = state
        .batcher
        .send(Job {
            op,
            done,
            linger: false,
        })
        .map_err(|_| worker_gone());
    async move {
        sent?;
        rx.await.map_err(|_| worker_gone())?
    }
}

/// Hands one command to the batch worker for a caller that does not wait
/// (evapi): `done` runs on the worker's thread, and the command may wait
/// for company ([`LINGER`]). Fails only when the worker is gone.
fn submit(state: &AppState, op: Op, done: Done) -> Result<(), Error> {
    state
        .batcher
        .send(Job {
            op,
            done,
            linger: true,
        })
        .map_err(|_| worker_gone())
}

/// The token an `Authorization` header carries: `Bearer TOKEN`, or
/// `Basic` with the token as the password (any user name), for clients that
/// can only send credentials in a URL (Kamailio's `http_connect` with a
/// kept-alive connection: `http://tcpka:TOKEN@127.0.0.1:7177`).
fn token_given(value: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    if let Some(t) = value.strip_prefix("Bearer ") {
        return Some(t.as_bytes().to_vec());
    }
    let b64 = value.strip_prefix("Basic ")?;
    let pair = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let colon = pair.iter().position(|&b| b == b':')?;
    Some(pair[colon + 1..].to_vec())
}

/// Prometheus metrics.
struct Metrics {
    registry: Registry,
    commands: Family<Vec<(String, String)>, Counter>,
    applied: Family<Vec<(String, String)>, Counter>,
    errors: Family<Vec<(String, String)>, Counter>,
    events: Family<Vec<(String, String)>, Counter>,
    webhook: Family<Vec<(String, String)>, Counter>,
    pass_seconds: Histogram,
    batch_size: Histogram,
    /// Kernel counters are read at scrape time; these hold what was
    /// already added to the Prometheus counters.
    seen_rule_applied: AtomicU64,
    seen_kernel_dropped: AtomicU64,
    seen_alerts_dropped: AtomicU64,
    seen_index_full: AtomicU64,
    seen_peer_overflows: AtomicU64,
    seen_setsockopt_errors: AtomicU64,
    seen_index_hits: AtomicU64,
    seen_walks: AtomicU64,
    lookups: Family<Vec<(String, String)>, Counter>,
    /// 1 while the sock_ops program runs on its cgroup, read at scrape.
    attached: prometheus_client::metrics::gauge::Gauge,
    reattached: Counter,
    scrape: Mutex<()>,
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("tcpka");
        let commands = Family::default();
        let applied = Family::default();
        let errors = Family::default();
        let events = Family::default();
        let webhook = Family::default();
        let pass_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
        );
        registry.register(
            "commands",
            "API commands by operation and result",
            commands.clone(),
        );
        registry.register(
            "connections_applied",
            "Connections given a policy, by source (rule or command)",
            applied.clone(),
        );
        registry.register("errors", "Errors by kind", errors.clone());
        let lookups = Family::default();
        registry.register(
            "lookups",
            "How commands found their connections: index (direct) or walk (socket table)",
            lookups.clone(),
        );
        registry.register("events", "Events from the kernel by kind", events.clone());
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries by outcome (delivered, retried, dropped)",
            webhook.clone(),
        );
        registry.register(
            "kernel_pass_seconds",
            "Time in the kernel per batch of enable/disable commands (and per query)",
            pass_seconds.clone(),
        );
        let batch_size = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 7),
        );
        registry.register(
            "batch_size",
            "Commands run together in one batch",
            batch_size.clone(),
        );
        let attached = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "attached",
            "1 while the sock_ops program is attached to its cgroup, 0 after the cgroup was removed",
            attached.clone(),
        );
        let reattached = Counter::default();
        registry.register(
            "reattached",
            "Times serve attached again to a recreated cgroup",
            reattached.clone(),
        );
        Self {
            registry,
            attached,
            reattached,
            commands,
            applied,
            errors,
            events,
            webhook,
            pass_seconds,
            batch_size,
            seen_rule_applied: AtomicU64::new(0),
            seen_kernel_dropped: AtomicU64::new(0),
            seen_alerts_dropped: AtomicU64::new(0),
            seen_index_full: AtomicU64::new(0),
            seen_peer_overflows: AtomicU64::new(0),
            seen_setsockopt_errors: AtomicU64::new(0),
            seen_index_hits: AtomicU64::new(0),
            seen_walks: AtomicU64::new(0),
            lookups,
            scrape: Mutex::new(()),
        }
    }

    fn command(&self, op: &str, result: &str) {
        self.commands
            .get_or_create(&labels(&[("op", op), ("result", result)]))
            .inc();
    }

    fn error(&self, kind: &str) {
        self.errors.get_or_create(&labels(&[("kind", kind)])).inc();
    }

    fn webhook(&self, outcome: &str) {
        self.webhook
            .get_or_create(&labels(&[("outcome", outcome)]))
            .inc();
    }
}

/// A JSON reply with the reference's result code.
fn reply(status: StatusCode, mut body: Value) -> Response {
    let result = if status.is_success() { 1 } else { -1 };
    let note = body["error"].as_str().map(|e| ErrorNote(e.to_owned()));
    body["result"] = json!(result);
    let mut r = (status, Json(body)).into_response();
    if let Some(n) = note {
        r.extensions_mut().insert(n);
    }
    r
}

/// Why a request was refused, kept with the reply for the log line.
#[derive(Clone)]
struct ErrorNote(String);

/// One log line per command: what was asked, on which connection, and how
/// it ended. Peer-given strings are logged quoted (`?`), so that nothing in
/// them can forge a line.
fn log_command(op: &str, conn: Option<&str>, holder: Option<&str>, r: &Response) {
    let status = r.status().as_u16();
    match r.extensions().get::<ErrorNote>() {
        None => tracing::info!(command = op, conn, holder, status, "applied"),
        Some(ErrorNote(why)) => {
            tracing::warn!(
                command = op,
                conn,
                holder,
                status,
                error = why.as_str(),
                "refused"
            )
        }
    }
}

fn invalid(msg: impl std::fmt::Display) -> Response {
    reply(StatusCode::BAD_REQUEST, json!({ "error": msg.to_string() }))
}

/// Maps a library error to a status and a reply; counts it.
fn failure(state: &AppState, op: &str, e: &Error) -> Response {
    let (status, result) = match e {
        Error::Invalid(_) | Error::Netns { .. } => (StatusCode::BAD_REQUEST, "invalid"),
        Error::NotLoaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "not_loaded"),
        Error::NoSuchConnection(_) | Error::NoSuchRule(_) => (StatusCode::NOT_FOUND, "not_found"),
        Error::DuplicateRule(_) => (StatusCode::CONFLICT, "conflict"),
        Error::LockBusy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        Error::HoldersFull(_) | Error::RulesFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "full"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "error"),
    };
    state.metrics.command(op, result);
    if status.is_server_error() {
        state.metrics.error(op);
    }
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        msg.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    reply(status, json!({ "error": msg }))
}

/// Reads a JSON body: anything unreadable, too large or malformed is 400.
async fn json_body<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T, Response> {
    let bytes: Bytes = axum::body::to_bytes(body, BODY_LIMIT).await.map_err(|_| {
        invalid(format!(
            "request body missing, unreadable or over {BODY_LIMIT} bytes"
        ))
    })?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnableBody {
    conn: String,
    idle: u32,
    count: u32,
    interval: u32,
    local: Option<String>,
    user_timeout_ms: Option<u32>,
    holder: Option<String>,
    netns: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisableBody {
    conn: String,
    local: Option<String>,
    holder: Option<String>,
    netns: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    conn: String,
    local: Option<String>,
    netns: Option<PathBuf>,
}

type Target = (ConnSpec, Option<SocketAddr>, Option<String>);

/// Commands from Kamailio's evapi, run like the API's: each one a job for
/// the batch worker, queued without waiting, so that commands arriving
/// together run as one batch; one log line and the metrics of each.
#[derive(Clone)]
struct EvapiCommands(AppState, Arc<tokio::sync::Semaphore>);

impl crate::evapi::Commands for EvapiCommands {
    /// Queues every command at once, in the order Kamailio sent them (an
    /// enable and the disable after it must run in that order); the batch
    /// worker logs and counts each result itself, so the connection is
    /// read on meanwhile and Kamailio's evapi never waits on tcpka.
    async fn run(&self, commands: Vec<crate::evapi::Command>) {
        use crate::evapi::Command;
        let state = &self.0;
        let n = commands.len().min(crate::evapi::MAX_PENDING) as u32;
        let Ok(permits) = self.1.clone().acquire_many_owned(n).await else {
            return;
        };
        let permits = Arc::new(permits);
        for c in commands {
            let (name, conn, holder, op) = match c {
                Command::Enable {
                    conn,
                    local,
                    idle,
                    count,
                    interval,
                    user_timeout_ms,
                    holder,
                } => {
                    let b = EnableBody {
                        conn: conn.clone(),
                        idle,
                        count,
                        interval,
                        local,
                        user_timeout_ms,
                        holder: holder.clone(),
                        netns: None,
                    };
                    ("enable", conn, holder, enable_op(state, b))
                }
                Command::Disable {
                    conn,
                    local,
                    holder,
                } => {
                    let b = DisableBody {
                        conn: conn.clone(),
                        local,
                        holder: holder.clone(),
                        netns: None,
                    };
                    ("disable", conn, holder, disable_op(state, b))
                }
            };
            let op = match op {
                Ok(op) => op,
                Err(r) => {
                    log_command(name, Some(&conn), holder.as_deref(), &r);
                    continue;
                }
            };
            // The permits go back when the last of these commands is done.
            let (st, permits) = (state.clone(), permits.clone());
            let done: Done = Box::new(move |result| {
                let _permits = permits;
                let r = match name {
                    "enable" => enable_done(&st, result, false),
                    _ => disable_done(&st, result, false),
                };
                log_command(name, Some(&conn), holder.as_deref(), &r);
            });
            if let Err(e) = submit(state, op, done) {
                tracing::error!("evapi: {e}");
            }
        }
    }
}

fn target(conn: &str, local: Option<&str>, holder: Option<&str>) -> Result<Target, InvalidInput> {
    Ok((
        conn.parse()?,
        local.map(parse_endpoint).transpose()?,
        holder.map(parse_holder).transpose()?,
    ))
}

/// Runs blocking enforcer work off the async threads, timing it.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(Enforcer) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let enforcer = state.enforcer.clone();
    let start = Instant::now();
    let out = tokio::task::spawn_blocking(move || f(enforcer))
        .await
        .unwrap_or_else(|e| {
            Err(Error::Io {
                what: format!("worker failed: {e}"),
                source: std::io::ErrorKind::Other.into(),
            })
        });
    state
        .metrics
        .pass_seconds
        .observe(start.elapsed().as_secs_f64());
    out
}

async fn enable(State(state): State<AppState>, body: Body) -> Response {
    let b: EnableBody = match json_body(body).await {
        Ok(b) => b,
        Err(r) => {
            state.metrics.command("enable", "invalid");
            log_command("enable", None, None, &r);
            return r;
        }
    };
    let (conn, holder) = (b.conn.clone(), b.holder.clone());
    let r = enable_body(&state, b).await;
    log_command("enable", Some(&conn), holder.as_deref(), &r);
    r
}

async fn enable_body(state: &AppState, b: EnableBody) -> Response {
    match enable_op(state, b) {
        Ok(op) => enable_done(state, queue(state, op).await, true),
        Err(r) => *r,
    }
}

/// An enable request as a command for the batch worker (or the reply
/// that refuses it).
fn enable_op(state: &AppState, b: EnableBody) -> Result<Op, Box<Response>> {
    let parsed = target(&b.conn, b.local.as_deref(), b.holder.as_deref()).and_then(|t| {
        Ok((
            t,
            Policy::new(b.idle, b.count, b.interval, b.user_timeout_ms)?,
        ))
    });
    let ((conn, local, holder), policy) = parsed.map_err(|e| {
        state.metrics.command("enable", "invalid");
        Box::new(invalid(e))
    })?;
    Ok(Op {
        conn,
        local,
        action: Action::Enable(policy),
        holder,
        netns: b.netns,
    })
}

/// The reply to an enable the batch worker ran; counts it.
/// `body`: whether anyone reads the reply's body (evapi's commands have
/// no reply; their status and error still go to the log and metrics).
fn enable_done(state: &AppState, result: Result<Disabled, Error>, body: bool) -> Response {
    match result.map(|d| d.changed) {
        Ok(changed) => {
            state.metrics.command("enable", "ok");
            state
                .metrics
                .applied
                .get_or_create(&labels(&[("source", "command")]))
                .inc_by(changed.len() as u64);
            if !body {
                return StatusCode::OK.into_response();
            }
            reply(
                StatusCode::OK,
                json!({ "changed": changed.len(), "connections": changed }),
            )
        }
        Err(e) => failure(state, "enable", &e),
    }
}

async fn disable(State(state): State<AppState>, body: Body) -> Response {
    let b: DisableBody = match json_body(body).await {
        Ok(b) => b,
        Err(r) => {
            state.metrics.command("disable", "invalid");
            log_command("disable", None, None, &r);
            return r;
        }
    };
    let (conn, holder) = (b.conn.clone(), b.holder.clone());
    let r = disable_body(&state, b).await;
    log_command("disable", Some(&conn), holder.as_deref(), &r);
    r
}

async fn disable_body(state: &AppState, b: DisableBody) -> Response {
    match disable_op(state, b) {
        Ok(op) => disable_done(state, queue(state, op).await, true),
        Err(r) => *r,
    }
}

/// A disable request as a command for the batch worker (or the reply
/// that refuses it).
fn disable_op(state: &AppState, b: DisableBody) -> Result<Op, Box<Response>> {
    let (conn, local, holder) =
        target(&b.conn, b.local.as_deref(), b.holder.as_deref()).map_err(|e| {
            state.metrics.command("disable", "invalid");
            Box::new(invalid(e))
        })?;
    Ok(Op {
        conn,
        local,
        action: Action::Disable,
        holder,
        netns: b.netns,
    })
}

/// The reply to a disable the batch worker ran; counts it.
/// `body`: as for [`enable_done`].
fn disable_done(state: &AppState, result: Result<Disabled, Error>, body: bool) -> Response {
    match result {
        Ok(done) => {
            state.metrics.command("disable", "ok");
            if !body {
                return StatusCode::OK.into_response();
            }
            reply(
                StatusCode::OK,
                json!({
                    "changed": done.changed.len(),
                    "connections": done.changed,
                    "kept": done.kept,
                }),
            )
        }
        Err(e) => failure(state, "disable", &e),
    }
}

/// `POST /v1/close`: ends the connections from the kernel side (see
/// [`Enforcer::close`]).
async fn close(State(state): State<AppState>, body: Body) -> Response {
    let b: CloseBody = match json_body(body).await {
        Ok(b) => b,
        Err(r) => {
            state.metrics.command("close", "invalid");
            log_command("close", None, None, &r);
            return r;
        }
    };
    let r = close_body(&state, &b).await;
    log_command("close", Some(&b.conn), None, &r);
    r
}

async fn close_body(state: &AppState, b: &CloseBody) -> Response {
    let (conn, local, _) = match target(&b.conn, b.local.as_deref(), None) {
        Ok(t) => t,
        Err(e) => {
            state.metrics.command("close", "invalid");
            return invalid(e);
        }
    };
    let netns = b.netns.clone();
    match blocking(state, move |e| e.close(conn, local, netns.as_deref())).await {
        Ok(closed) => {
            state.metrics.command("close", "ok");
            reply(
                StatusCode::OK,
                json!({ "changed": closed.len(), "connections": closed }),
            )
        }
        Err(e) => failure(state, "close", &e),
    }
}

#[derive(Deserialize)]
struct ConnQuery {
    conn: Option<String>,
    local: Option<String>,
    netns: Option<PathBuf>,
    /// At most this many connections per reply (1..=CONNECTIONS_PAGE_MAX).
    limit: Option<usize>,
    /// Only connections with a larger cookie (the previous page's last).
    after: Option<u64>,
}

/// Connections per `GET /v1/connections` reply unless `limit` says less.
pub const CONNECTIONS_PAGE: usize = 1000;
/// Largest `limit`.
pub const CONNECTIONS_PAGE_MAX: usize = 10_000;
/// Response header with the `after` value of the next page, present when
/// there is one.
pub const NEXT_PAGE_HEADER: &str = "x-tcpka-next-after";

async fn connections(State(state): State<AppState>, Query(q): Query<ConnQuery>) -> Response {
    let spec = match q
        .conn
        .as_deref()
        .map(|c| target(c, q.local.as_deref(), None))
        .transpose()
    {
        Ok(t) => t,
        Err(e) => {
            state.metrics.command("status", "invalid");
            return invalid(e);
        }
    };
    let limit = q.limit.unwrap_or(CONNECTIONS_PAGE);
    if !(1..=CONNECTIONS_PAGE_MAX).contains(&limit) {
        state.metrics.command("status", "invalid");
        return invalid(format!("limit must be in 1..={CONNECTIONS_PAGE_MAX}"));
    }
    let after = q.after;
    let netns = q.netns;
    let out = blocking(&state, move |e| {
        let mut conns = match spec {
            Some((conn, local, _)) => e.apply(conn, local, Action::Query, netns.as_deref())?,
            None => return e.status(netns.as_deref()),
        };
        e.attach_holders(&mut conns)?;
        Ok(conns)
    })
    .await;
    match out {
        Ok(mut conns) => {
            state.metrics.command("status", "ok");
            // Pages in cookie order: stable while connections come and go.
            conns.retain(|c| after.is_none_or(|a| c.cookie > a));
            conns.sort_unstable_by_key(|c| c.cookie);
            let next = (conns.len() > limit).then(|| conns[limit - 1].cookie);
            conns.truncate(limit);
            let mut r = (StatusCode::OK, Json(conns)).into_response();
            if let Some(n) = next {
                r.headers_mut().insert(NEXT_PAGE_HEADER, n.into());
            }
            r
        }
        Err(e) => failure(&state, "status", &e),
    }
}

async fn rules_list(State(state): State<AppState>) -> Response {
    match blocking(&state, |e| e.rules()).await {
        Ok(rules) => (StatusCode::OK, Json(rules)).into_response(),
        Err(e) => failure(&state, "rule_list", &e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleBody {
    local_port: Option<u32>,
    remote_port: Option<u32>,
    remote: Option<String>,
    idle: u32,
    count: u32,
    interval: u32,
    user_timeout_ms: Option<u32>,
    /// True for a tracked rule (`rule add --tracked`); false by default.
    tracked: Option<bool>,
}

async fn rules_add(State(state): State<AppState>, body: Body) -> Response {
    let b: RuleBody = match json_body(body).await {
        Ok(b) => b,
        Err(r) => {
            state.metrics.command("rule_add", "invalid");
            return r;
        }
    };
    let parsed = (|| -> Result<(RuleMatch, Policy), InvalidInput> {
        let port = |p: Option<u32>| p.map(|p| parse_port(&p.to_string())).transpose();
        Ok((
            RuleMatch {
                local_port: port(b.local_port)?,
                remote_port: port(b.remote_port)?,
                remote: b.remote.as_deref().map(str::parse::<Cidr>).transpose()?,
            },
            Policy::new(b.idle, b.count, b.interval, b.user_timeout_ms)?,
        ))
    })();
    let (m, policy) = match parsed {
        Ok(p) => p,
        Err(e) => {
            state.metrics.command("rule_add", "invalid");
            return invalid(e);
        }
    };
    let tracked = b.tracked.unwrap_or(false);
    match blocking(&state, move |e| e.add_rule(m, policy, tracked)).await {
        Ok(rule) => {
            state.metrics.command("rule_add", "ok");
            reply(StatusCode::CREATED, json!({ "rule": rule }))
        }
        Err(e) => failure(&state, "rule_add", &e),
    }
}

async fn rules_del(State(state): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    let Ok(id) = id.parse::<u32>() else {
        state.metrics.command("rule_del", "invalid");
        return invalid(format!("rule id must be a whole number, got {id:?}"));
    };
    match blocking(&state, move |e| e.delete_rule(id)).await {
        Ok(rule) => {
            state.metrics.command("rule_del", "ok");
            reply(StatusCode::OK, json!({ "rule": rule }))
        }
        Err(e) => failure(&state, "rule_del", &e),
    }
}

/// Newline-delimited JSON, one event per line, until the client goes.
async fn events(State(state): State<AppState>) -> Response {
    let stream = BroadcastStream::new(state.events.subscribe()).map(|r| {
        let m = match r {
            Ok(m) => m,
            // This subscriber fell behind: say how much it missed.
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Arc::new(Message::Gap(Gap::new(n, "subscriber")))
            }
        };
        let mut line = serde_json::to_vec(&*m).expect("plain data");
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// How long `/healthz` waits for the installation lock.
const HEALTH_LOCK_WAIT: Duration = Duration::from_secs(1);

async fn healthz(State(state): State<AppState>) -> Response {
    let layout = state.enforcer.layout().clone();
    let health = tokio::task::spawn_blocking(move || {
        let i = loader::installed(&layout)?.ok_or_else(|| Error::NotLoaded {
            pin_dir: layout.dir().into(),
        })?;
        if !i.attached {
            return Err(Error::Io {
                what: format!(
                    "detached: cgroup {} was removed; re-attaching when it is back",
                    i.cgroup.display()
                ),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        // Commands need the lock: a lock nobody can take is an outage.
        crate::lock::Lock::acquire_within(&layout, HEALTH_LOCK_WAIT)?;
        Ok::<_, Error>(())
    })
    .await;
    match health {
        Ok(Ok(())) => (StatusCode::OK, "ok\n").into_response(),
        Ok(Err(Error::NotLoaded { .. })) => {
            (StatusCode::SERVICE_UNAVAILABLE, "not loaded\n").into_response()
        }
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "health check failed\n").into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let enforcer = state.enforcer.clone();
    let (counters, attached) = tokio::task::spawn_blocking(move || {
        let attached = loader::installed(enforcer.layout())
            .ok()
            .flatten()
            .is_some_and(|i| i.attached);
        (enforcer.counters().ok(), attached)
    })
    .await
    .unwrap_or((None, false));
    let m = &state.metrics;
    m.attached.set(i64::from(attached));
    let mut text = String::new();
    {
        let _one = m.scrape.lock().expect("not poisoned");
        if let Some(c) = counters {
            let add = |seen: &AtomicU64, now: u64, counter: &Counter| {
                let before = seen.swap(now, Ordering::Relaxed);
                counter.inc_by(now.saturating_sub(before));
            };
            add(
                &m.seen_rule_applied,
                c.applied_by_rule,
                &m.applied.get_or_create(&labels(&[("source", "rule")])),
            );
            add(
                &m.seen_kernel_dropped,
                c.events_dropped,
                &m.errors
                    .get_or_create(&labels(&[("kind", "kernel_events_dropped")])),
            );
            add(
                &m.seen_index_full,
                c.index_full,
                &m.errors.get_or_create(&labels(&[("kind", "index_full")])),
            );
            add(
                &m.seen_peer_overflows,
                c.peer_overflows,
                &m.errors
                    .get_or_create(&labels(&[("kind", "index_peer_overflow")])),
            );
            add(
                &m.seen_alerts_dropped,
                c.alerts_dropped,
                &m.errors
                    .get_or_create(&labels(&[("kind", "kernel_alerts_dropped")])),
            );
            add(
                &m.seen_setsockopt_errors,
                c.setsockopt_errors,
                &m.errors.get_or_create(&labels(&[("kind", "setsockopt")])),
            );
        }
        let add = |seen: &AtomicU64, now: u64, counter: &Counter| {
            let before = seen.swap(now, Ordering::Relaxed);
            counter.inc_by(now.saturating_sub(before));
        };
        add(
            &m.seen_index_hits,
            crate::enforcer::INDEX_HITS.load(Ordering::Relaxed),
            &m.lookups.get_or_create(&labels(&[("path", "index")])),
        );
        add(
            &m.seen_walks,
            crate::enforcer::WALKS.load(Ordering::Relaxed),
            &m.lookups.get_or_create(&labels(&[("path", "walk")])),
        );
        if encode(&mut text, &m.registry).is_err() {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// What the accept loop knows of a connection, for [`guard`].
#[derive(Clone, Copy, Debug)]
struct ConnInfo {
    /// Credentials of a unix socket client.
    peer: Option<access::Peer>,
    /// The port of a loopback TCP listener, whose `Host` is checked.
    loopback_port: Option<u16>,
}

fn refuse(status: StatusCode, msg: &str) -> Response {
    reply(status, json!({ "error": msg }))
}

/// A request refused before it reached its handler, logged once.
fn refuse_logged(req: &Request, status: StatusCode, msg: &str) -> Response {
    tracing::warn!(
        method = %req.method(),
        path = req.uri().path(),
        status = status.as_u16(),
        error = msg,
        "refused"
    );
    refuse(status, msg)
}

/// Every request: a unix client must be root or in the API group; a
/// loopback listener only answers its own `Host` names (DNS rebinding); the
/// token, when set, must match; bodies must be JSON; and a request other
/// than the event stream must finish within [`REQUEST_TIMEOUT`].
async fn guard(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let info = req.extensions().get::<ConnInfo>().copied();
    if let Some(peer) = info.and_then(|i| i.peer) {
        if !peer.allowed(state.api_group) {
            return refuse_logged(
                &req,
                StatusCode::FORBIDDEN,
                "only root or members of the API group may use this socket",
            );
        }
    }
    if let Some(port) = info.and_then(|i| i.loopback_port) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !access::loopback_host_ok(host, port) {
            return refuse_logged(
                &req,
                StatusCode::FORBIDDEN,
                "Host must be localhost or a loopback address on this port",
            );
        }
    }
    if let Some(token) = &state.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(token_given)
            .unwrap_or_default();
        if !access::constant_time_eq(&given, token.as_bytes()) {
            return refuse_logged(
                &req,
                StatusCode::UNAUTHORIZED,
                "missing or wrong token (Authorization: Bearer TOKEN, or Basic with the token as password)",
            );
        }
    }
    if req.method() == axum::http::Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return refuse_logged(
                &req,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/json",
            );
        }
    }
    if req.uri().path() == "/v1/events" {
        return next.run(req).await;
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(status = 503, "refused: the request took too long");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "the request took too long")
        }
    }
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

/// Starts the event feed: the log, the stream subscribers, the metrics and
/// the webhook (which gets how connections ended, not `applied`).
fn spawn_feed(layout: &PinLayout, state: &AppState, webhook: Option<Webhook>, json_log: bool) {
    let metrics = state.metrics.clone();
    let each = move |m: &Arc<Message>| {
        metrics
            .events
            .get_or_create(&labels(&[("kind", m.kind())]))
            .inc();
        if let Some(w) = &webhook {
            if m.kind() != "applied" && w.tx.try_send(m.clone()).is_err() {
                w.missed.fetch_add(1, Ordering::Relaxed);
                metrics.webhook("dropped");
            }
        }
    };
    let sinks = feed::Sinks {
        log: feed::Log::spawn(json_log),
        subscribers: state.events.clone(),
        each: Box::new(each),
    };
    tokio::spawn(feed::run(layout.clone(), sinks));
}

/// The webhook's queue, and how many events it lost since it last said so.
struct Webhook {
    tx: mpsc::Sender<Arc<Message>>,
    missed: Arc<AtomicU64>,
}

/// POSTs each event to the webhook: up to 4 attempts of at most 2 s each,
/// 100 ms, 200 ms, 400 ms apart (about 9 s at worst); a 4xx answer is not
/// retried. Events wait in a bounded queue; what does not fit, or fails
/// every attempt, is counted as dropped.
fn spawn_webhook(config: WebhookConfig, metrics: Arc<Metrics>) -> Result<Webhook, Error> {
    let bad = |what: String| Error::Invalid(InvalidInput::Listen(what));
    if !config.url.starts_with("http://") && !config.url.starts_with("https://") {
        return Err(bad(format!(
            "--webhook {:?}: needs an http:// or https:// URL",
            config.url
        )));
    }
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .https_only(config.url.starts_with("https://"));
    if let Some(pem) = &config.ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| bad(format!("--webhook-ca: {e}")))?;
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    let client = builder.build().map_err(|e| {
        Error::io(
            format!("the webhook client: {e}"),
            std::io::ErrorKind::Other.into(),
        )
    })?;
    let url = config.url;
    let secret = config.secret;
    let bearer = config.bearer;
    let (tx, mut rx) = mpsc::channel::<Arc<Message>>(WEBHOOK_QUEUE);
    let missed = Arc::new(AtomicU64::new(0));
    let lost = missed.clone();
    tokio::spawn(async move {
        let deliver = |rec: Arc<Message>| {
            let client = client.clone();
            let url = url.clone();
            let secret = secret.clone();
            let bearer = bearer.clone();
            let metrics = metrics.clone();
            async move {
                let body = serde_json::to_vec(&*rec).expect("plain data");
                let mut delay = Duration::from_millis(100);
                for attempt in 0..4 {
                    if attempt > 0 {
                        metrics.webhook("retried");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                    let mut req = client
                        .post(&url)
                        .header(header::CONTENT_TYPE, "application/json");
                    if let Some(key) = &secret {
                        let ts = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        req = req
                            .header("X-Tcpka-Timestamp", ts.to_string())
                            .header("X-Tcpka-Signature", sign(key.as_bytes(), ts, &body));
                    }
                    if let Some(token) = &bearer {
                        req = req.bearer_auth(token);
                    }
                    match req.body(body.clone()).send().await {
                        Ok(r) if r.status().is_success() => {
                            metrics.webhook("delivered");
                            return true;
                        }
                        Ok(r) if r.status().is_client_error() => {
                            tracing::warn!("webhook {url}: HTTP {}; not retried", r.status());
                            break;
                        }
                        Ok(r) => tracing::warn!("webhook {url}: HTTP {}", r.status()),
                        Err(e) => tracing::warn!("webhook {url}: {e}"),
                    }
                }
                metrics.webhook("dropped");
                false
            }
        };
        while let Some(rec) = rx.recv().await {
            // What was lost since the last delivery goes first, as a gap;
            // a gap that cannot be delivered either is told with the next.
            let n = lost.swap(0, Ordering::Relaxed);
            if n > 0 && !deliver(Arc::new(Message::Gap(Gap::new(n, "webhook")))).await {
                lost.fetch_add(n, Ordering::Relaxed);
            }
            if !deliver(rec).await {
                lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok(Webhook { tx, missed })
}

/// Sweeps holder entries of closed connections now and then, so that the
/// holder map does not fill without anyone listing it.
fn spawn_holder_sweep(enforcer: Enforcer) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            let e = enforcer.clone();
            if let Ok(Err(err)) = tokio::task::spawn_blocking(move || e.sweep_holders()).await {
                tracing::warn!("sweeping holders: {err}");
            }
        }
    });
}

/// Watches the attachment: when the cgroup is removed (a service restart)
/// the kernel detaches the sock_ops program; once a cgroup exists again at
/// the same path, attach to it.
fn spawn_attach_watch(layout: PinLayout, metrics: Arc<Metrics>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(ATTACH_CHECK);
        let mut warned = false;
        loop {
            every.tick().await;
            let l = layout.clone();
            let Ok(checked) = tokio::task::spawn_blocking(move || {
                let repaired = loader::repair_attachment(&l)?;
                if let Err(e) = loader::unwatch_outside(&l) {
                    tracing::warn!("checking for managed connections outside the cgroup: {e}");
                }
                Ok::<_, Error>((repaired, loader::installed(&l)?))
            })
            .await
            else {
                continue;
            };
            match checked {
                Ok((Some(i), _)) => {
                    metrics.reattached.inc();
                    warned = false;
                    tracing::warn!(cgroup = %i.cgroup.display(), "re-attached to the recreated cgroup");
                }
                Ok((None, Some(i))) if !i.attached && !warned => {
                    warned = true;
                    tracing::error!(
                        cgroup = %i.cgroup.display(),
                        "detached: the cgroup was removed; new connections get no rules until it is back"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("checking the attachment: {e}"),
            }
        }
    });
}

/// How often `serve` checks that the sock_ops program is still attached.
const ATTACH_CHECK: Duration = Duration::from_secs(1);

/// The socket file of a unix listener, removed when serving ends if it is
/// still the one we bound.
struct SocketFile {
    path: PathBuf,
    ino: Option<u64>,
}

impl SocketFile {
    fn new(path: &std::path::Path) -> Self {
        let ino = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        Self {
            path: path.to_path_buf(),
            ino,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        if now.is_some() && now == self.ino {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes a unix listener's socket file 0600, or 0660 with the API group.
fn secure_socket(path: &std::path::Path, group: Option<u32>) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let done = (|| {
        if let Some(gid) = group {
            std::os::unix::fs::lchown(path, None, Some(gid))?;
        }
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    })();
    done.map_err(|e| Error::io(format!("setting the mode of {}", path.display()), e))
}

/// Serves HTTP/1.1 connections from `accept` until `stop`: at most
/// [`MAX_CONNECTIONS`] at once, each dropped when a request head takes
/// longer than [`HEADER_TIMEOUT`]. After `stop`, connections in flight get
/// [`SHUTDOWN_GRACE`].
async fn serve_connections<S, F, Fut>(
    mut accept: F,
    app: Router,
    stop: tokio::sync::watch::Receiver<bool>,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(S, ConnInfo)>>,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt as _;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stopped(stop.clone()) => break,
        };
        let (io, info) = tokio::select! {
            r = accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or a client gone before accept:
                    // wait a moment and go on.
                    tracing::warn!("accepting an API connection: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stopped(stop.clone()) => break,
        };
        let svc =
            app.clone()
                .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(info);
                    req.map(Body::new)
                });
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(io),
                    hyper_util::service::TowerToHyperService::new(svc),
                );
            if let Err(e) = conn.await {
                tracing::debug!("API connection: {e}");
            }
        });
    }
    // In-flight requests get the grace period (the caller's timer).
    let _ = slots.acquire_many(MAX_CONNECTIONS as u32).await;
}

/// Brings the installed rules to the file, logging each change.
async fn apply_rules_file(enforcer: &Enforcer, path: &std::path::Path) -> Result<(), Error> {
    let (e, p) = (enforcer.clone(), path.to_owned());
    let steps = tokio::task::spawn_blocking(move || {
        let config = crate::config::Config::load(&p)?;
        e.apply_config(&config, false)
    })
    .await
    .expect("apply task")?;
    for step in &steps {
        tracing::info!(file = %path.display(), "{step}");
    }
    tracing::info!(file = %path.display(), changes = steps.len(), "rules applied");
    Ok(())
}

/// On SIGHUP (`tcpka reload`, `systemctl reload`), the rules file again. A
/// file that has become invalid is reported and changes nothing. Without a
/// file, SIGHUP is logged and ignored (it must not stop the daemon).
fn spawn_reload(enforcer: Enforcer, path: Option<PathBuf>) -> Result<(), Error> {
    let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::io("installing SIGHUP", e))?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(path) = &path else {
                tracing::warn!("reload: serve has no --config file; nothing to apply");
                continue;
            };
            if let Err(e) = apply_rules_file(&enforcer, path).await {
                tracing::error!(file = %path.display(), "reload refused: {}", crate::one_line(&e));
            }
        }
    });
    Ok(())
}

/// Loads or adopts the installation, then serves until SIGINT or SIGTERM.
/// Stopping leaves enforcement in place.
pub async fn run(
    layout: PinLayout,
    cgroup: crate::cgroup::Cgroup,
    config: Config,
) -> Result<(), Error> {
    if matches!(config.listen, Listen::Tcp(_)) && config.token.is_none() {
        return Err(Error::Invalid(InvalidInput::Listen(
            "a TCP listener needs a token (--token-file FILE or TCPKA_TOKEN)".into(),
        )));
    }
    // Everything the configuration can get wrong is found before anything
    // is loaded.
    let metrics = Arc::new(Metrics::new());
    let webhook = config
        .webhook
        .clone()
        .map(|w| spawn_webhook(w, metrics.clone()))
        .transpose()?;
    if let Some(path) = &config.rules_file {
        crate::config::Config::load(path)?;
    }
    let _serving = crate::lock::ServeLock::acquire(&layout)?;
    let outcome = {
        let layout = layout.clone();
        let options = config.load.clone();
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
    let (events_tx, _) = broadcast::channel(4096);
    let enforcer = Enforcer::for_daemon(layout.clone());
    if let Some(path) = &config.rules_file {
        apply_rules_file(&enforcer, path).await?;
    }
    spawn_reload(enforcer.clone(), config.rules_file.clone())?;
    let state = AppState {
        batcher: spawn_batcher(enforcer.clone(), metrics.clone()),
        enforcer,
        events: events_tx,
        metrics: metrics.clone(),
        token: config.token.as_deref().map(Arc::from),
        api_group: config.api_group,
    };
    spawn_feed(&layout, &state, webhook, config.json);
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
    spawn_holder_sweep(state.enforcer.clone());
    spawn_attach_watch(layout.clone(), metrics.clone());
    let kernel_log_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kernel_log = match config.kernel_log {
        Some(max) => Some(crate::trace::spawn_into_log(
            state.enforcer.clone(),
            &layout,
            max,
            kernel_log_stop.clone(),
        )?),
        None => None,
    };
    let app = router(state);

    let mut term =
        signal(SignalKind::terminate()).map_err(|e| Error::io("installing SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("installing SIGINT", e))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        let _ = stop_tx.send(true);
    });
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
            Listen::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::io(format!("listening on {addr}"), e))?;
                tracing::info!("API on http://{addr}");
                let info = ConnInfo {
                    peer: None,
                    loopback_port: addr.ip().is_loopback().then_some(addr.port()),
                };
                serve_connections(
                    || async { listener.accept().await.map(|(io, _)| (io, info)) },
                    app,
                    stop_rx.clone(),
                )
                .await;
                Ok(())
            }
            Listen::Unix(path) => {
                access::claim_socket_path(path)?;
                let listener = tokio::net::UnixListener::bind(path)
                    .map_err(|e| Error::io(format!("listening on {}", path.display()), e))?;
                let _remove = SocketFile::new(path);
                secure_socket(path, config.api_group)?;
                tracing::info!("API on unix:{}", path.display());
                serve_connections(
                    || async {
                        let (io, _) = listener.accept().await?;
                        let cred = io.peer_cred()?;
                        let info = ConnInfo {
                            peer: Some(access::Peer {
                                pid: cred.pid().unwrap_or(0),
                                uid: cred.uid(),
                                gid: cred.gid(),
                            }),
                            loopback_port: None,
                        };
                        Ok((io, info))
                    },
                    app,
                    stop_rx.clone(),
                )
                .await;
                Ok(())
            }
        }
    };
    let result: Result<(), Error> = tokio::select! {
        r = serving => r,
        _ = grace => Ok(()),
    };
    // The kernel log goes off with the daemon.
    kernel_log_stop.store(true, Ordering::Relaxed);
    if let Some(t) = kernel_log {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    result?;
    tracing::info!("stopped; enforcement stays in place (tcpka unload removes it)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_as_bearer_or_as_a_basic_password() {
        assert_eq!(token_given("Bearer abc").as_deref(), Some(&b"abc"[..]));
        // "tcpka:s3cret:with:colons"
        let basic = "Basic dGNwa2E6czNjcmV0OndpdGg6Y29sb25z";
        assert_eq!(
            token_given(basic).as_deref(),
            Some(&b"s3cret:with:colons"[..])
        );
        assert_eq!(token_given("Basic not base64!"), None);
        // "no colon"
        assert_eq!(token_given("Basic bm8gY29sb24="), None);
        assert_eq!(token_given("Digest x"), None);
        assert_eq!(token_given("abc"), None);
    }

    #[test]
    fn bearer_tokens_go_only_where_nobody_else_reads_them() {
        for ok in [
            "https://controller.example/tcpka",
            "http://127.0.0.1:8088/tcpka",
            "http://127.9.9.9/x",
            "http://[::1]:8088/tcpka",
            "http://localhost:8088/",
        ] {
            assert!(webhook_keeps_secrets(ok), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8088/tcpka",
            "http://controller.example/tcpka",
            "http://localhost.example/",
            "ftp://127.0.0.1/",
            "not a url",
        ] {
            assert!(!webhook_keeps_secrets(bad), "{bad}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "127.0.0.1:7077".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:7077".parse().unwrap())
        );
        assert!("127.0.0.1:7077".parse::<Listen>().unwrap().is_local());
        assert!(!"0.0.0.0:7077".parse::<Listen>().unwrap().is_local());
        assert!("unix:/run/tcpka.sock".parse::<Listen>().unwrap().is_local());
        for bad in ["unix:", "localhost:7077", "7077", ""] {
            assert!(bad.parse::<Listen>().is_err(), "{bad:?}");
        }
    }
}
