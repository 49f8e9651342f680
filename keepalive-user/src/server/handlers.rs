//! What the API's handlers share: replies, the log line per command,
//! errors as statuses, JSON bodies, blocking work off the async threads;
//! and the event stream and health check.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::{wrappers::BroadcastStream, StreamExt as _};

use super::{
    auth::refuse,
    listeners::{Caller, SlotHandle},
    AppState, BODY_LIMIT,
};
use crate::{
    enforcer::Enforcer,
    feed::{Gap, Message},
    loader, Error,
};

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
///
/// At most [`crate::logs::THROTTLE`]'s rate of each (applied, refused),
/// then one line a second with the count left out.
pub(super) fn log_command(op: &str, conn: Option<&str>, holder: Option<&str>, r: &Response) {
    use crate::logs::{Admit, THROTTLE};
    let status = r.status().as_u16();
    match r.extensions().get::<ErrorNote>() {
        None => {
            if let Admit::Log { left_out } = THROTTLE.admit("command applied") {
                tracing::info!(command = op, conn, holder, status, left_out, "applied")
            }
        }
        // A connection that has closed: the normal end of a call whose
        // phone went away first, counted in /metrics, not a warning.
        Some(ErrorNote(why)) if status == 404 => {
            tracing::debug!(
                command = op,
                conn,
                holder,
                status,
                error = why.as_str(),
                "not found"
            )
        }
        Some(ErrorNote(why)) => {
            if let Admit::Log { left_out } = THROTTLE.admit("command refused") {
                tracing::warn!(
                    command = op,
                    conn,
                    holder,
                    status,
                    error = why.as_str(),
                    left_out,
                    "refused"
                )
            }
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
        Error::NoSuchConnection(_) | Error::NoSuchRule(_) | Error::NotFound { .. } => {
            (StatusCode::NOT_FOUND, "not_found")
        }
        Error::DuplicateRule(_) => (StatusCode::CONFLICT, "conflict"),
        Error::LockBusy { .. } | Error::Busy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        Error::Unsupported { .. } => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
        Error::HoldersFull(_) | Error::RulesFull(_) | Error::ConnsFull(_) => {
            (StatusCode::INSUFFICIENT_STORAGE, "full")
        }
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

/// Runs blocking enforcer work off the async threads, timing it.
pub(super) async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(Enforcer) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let enforcer = state.enforcer.clone();
    let start = Instant::now();
    let out = tokio::task::spawn_blocking(move || f(enforcer))
        .await
        .unwrap_or_else(|e| Err(Error::Internal(format!("the worker thread failed: {e}"))));
    state
        .metrics
        .pass_seconds
        .observe(start.elapsed().as_secs_f64());
    out
}

/// Newline-delimited JSON, one event per line, until the client goes.
/// The event stream: a slot of its own (at most [`EVENT_STREAMS`], of
/// which one caller holds at most [`STREAMS_PER_CALLER`]), and the
/// connection's API slot given back, so that subscribers, who stay, never
/// hold the API's slots. A subscriber whose host died is found by TCP
/// keepalive (set on every API connection) and dropped; one that closed
/// its end, at the next event written to it.
pub(super) async fn events(
    State(state): State<AppState>,
    slot: Option<axum::Extension<SlotHandle>>,
) -> Response {
    let caller = slot
        .as_ref()
        .and_then(|axum::Extension(s)| s.caller())
        .unwrap_or(Caller::Uid(0));
    let stream_slot = match state.streams.take(caller) {
        Ok(s) => s,
        Err(why) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &why),
    };
    if let Some(axum::Extension(s)) = slot {
        s.give_back();
    }
    let stream = BroadcastStream::new(state.events.subscribe()).map(move |r| {
        let _held = &stream_slot;
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
            return Err(Error::NotFound {
                what: format!(
                    "detached: cgroup {} was removed; re-attaching when it is back",
                    i.cgroup.display()
                ),
            });
        }
        // Commands need the lock: a lock nobody can take is an outage.
        crate::lock::Lock::acquire_within(&layout, HEALTH_LOCK_WAIT)?;
        Enforcer::new(layout).set_aside()
    })
    .await;
    match health {
        Ok(Ok(aside)) if aside.is_empty() => (StatusCode::OK, "ok\n").into_response(),
        // Serving, but something needs an operator: said, still 200.
        Ok(Ok(aside)) => (
            StatusCode::OK,
            format!(
                "ok; {} interrupted holder change(s) set aside, not finished (tcpka info): {}\n",
                aside.len(),
                crate::logs::escape_controls(&aside[0].why)
            ),
        )
            .into_response(),
        Ok(Err(Error::NotLoaded { .. })) => {
            (StatusCode::SERVICE_UNAVAILABLE, "not loaded\n").into_response()
        }
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "health check failed\n").into_response(),
    }
}
