//! The API's handlers: enable, disable, close, connections, rules, events,
//! health; and evapi's commands, run like the API's.
use super::*;

/// A JSON reply with the reference's result code.
pub(super) fn reply(status: StatusCode, mut body: Value) -> Response {
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
pub(super) struct ErrorNote(String);

/// One log line per command: what was asked, on which connection, and how
/// it ended. Peer-given strings are logged quoted (`?`), so that nothing in
/// them can forge a line.
pub(super) fn log_command(op: &str, conn: Option<&str>, holder: Option<&str>, r: &Response) {
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

pub(super) fn invalid(msg: impl std::fmt::Display) -> Response {
    reply(StatusCode::BAD_REQUEST, json!({ "error": msg.to_string() }))
}

/// Maps a library error to a status and a reply; counts it.
pub(super) fn failure(state: &AppState, op: &'static str, e: &Error) -> Response {
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
pub(super) async fn json_body<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T, Response> {
    let bytes: Bytes = axum::body::to_bytes(body, BODY_LIMIT).await.map_err(|_| {
        invalid(format!(
            "request body missing, unreadable or over {BODY_LIMIT} bytes"
        ))
    })?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EnableBody {
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
pub(super) struct DisableBody {
    conn: String,
    local: Option<String>,
    holder: Option<String>,
    netns: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CloseBody {
    conn: String,
    local: Option<String>,
    netns: Option<PathBuf>,
}

pub(super) type Target = (ConnSpec, Option<SocketAddr>, Option<String>);

/// Commands from Kamailio's evapi, run like the API's: each one a job for
/// the batch worker, queued without waiting, so that commands arriving
/// together run as one batch; one log line and the metrics of each.
#[derive(Clone)]
pub(super) struct EvapiCommands(pub(super) AppState, pub(super) Arc<tokio::sync::Semaphore>);

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

pub(super) fn target(
    conn: &str,
    local: Option<&str>,
    holder: Option<&str>,
) -> Result<Target, InvalidInput> {
    Ok((
        conn.parse()?,
        local.map(parse_endpoint).transpose()?,
        holder.map(parse_holder).transpose()?,
    ))
}

/// Runs blocking enforcer work off the async threads, timing it.
pub(super) async fn blocking<T: Send + 'static>(
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

pub(super) async fn enable(State(state): State<AppState>, body: Body) -> Response {
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

pub(super) async fn enable_body(state: &AppState, b: EnableBody) -> Response {
    match enable_op(state, b) {
        Ok(op) => enable_done(state, queue(state, op).await, true),
        Err(r) => *r,
    }
}

/// An enable request as a command for the batch worker (or the reply
/// that refuses it).
pub(super) fn enable_op(state: &AppState, b: EnableBody) -> Result<Op, Box<Response>> {
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
pub(super) fn enable_done(
    state: &AppState,
    result: Result<Outcome, Error>,
    body: bool,
) -> Response {
    match result.map(|d| d.changed) {
        Ok(changed) => {
            state.metrics.command("enable", "ok");
            state
                .metrics
                .applied_by_command
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

pub(super) async fn disable(State(state): State<AppState>, body: Body) -> Response {
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

pub(super) async fn disable_body(state: &AppState, b: DisableBody) -> Response {
    match disable_op(state, b) {
        Ok(op) => disable_done(state, queue(state, op).await, true),
        Err(r) => *r,
    }
}

/// A disable request as a command for the batch worker (or the reply
/// that refuses it).
pub(super) fn disable_op(state: &AppState, b: DisableBody) -> Result<Op, Box<Response>> {
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
pub(super) fn disable_done(
    state: &AppState,
    result: Result<Outcome, Error>,
    body: bool,
) -> Response {
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
pub(super) async fn close(State(state): State<AppState>, body: Body) -> Response {
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

pub(super) async fn close_body(state: &AppState, b: &CloseBody) -> Response {
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
pub(super) struct ConnQuery {
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

pub(super) async fn connections(
    State(state): State<AppState>,
    Query(q): Query<ConnQuery>,
) -> Response {
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

pub(super) async fn rules_list(State(state): State<AppState>) -> Response {
    match blocking(&state, |e| e.rules()).await {
        Ok(rules) => (StatusCode::OK, Json(rules)).into_response(),
        Err(e) => failure(&state, "rule_list", &e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleBody {
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

pub(super) async fn rules_add(State(state): State<AppState>, body: Body) -> Response {
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

pub(super) async fn rules_del(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Response {
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
pub(super) async fn events(State(state): State<AppState>) -> Response {
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
pub(super) const HEALTH_LOCK_WAIT: Duration = Duration::from_secs(1);

pub(super) async fn healthz(State(state): State<AppState>) -> Response {
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
