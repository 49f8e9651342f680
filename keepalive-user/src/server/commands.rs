//! `POST /v1/enable`, `/v1/disable` and `/v1/close`, and evapi's
//! commands, run like the API's: through the batch worker.
use std::{path::PathBuf, sync::Arc};

use axum::{
    body::Body,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::json;

use super::{
    batch::{queue, submit, Done},
    handlers::{blocking, failure, invalid, json_body, log_command, reply},
    AppState,
};
use crate::{
    enforcer::{Action, Op, Outcome},
    policy::Policy,
    risk::Thresholds,
    Error,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EnableBody {
    conn: String,
    idle: u32,
    count: u32,
    interval: u32,
    local: Option<String>,
    user_timeout_ms: Option<u32>,
    /// Early-warning thresholds (`enable --at-risk`).
    at_risk: Option<String>,
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
                    at_risk,
                    holder,
                } => {
                    let b = EnableBody {
                        conn: conn.clone(),
                        idle,
                        count,
                        interval,
                        local,
                        user_timeout_ms,
                        at_risk,
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
    let parsed =
        Op::parse(&b.conn, b.local.as_deref(), b.holder.as_deref(), b.netns).and_then(|op| {
            Ok(Op {
                action: Action::Enable(
                    Policy::new(b.idle, b.count, b.interval, b.user_timeout_ms)?.with_risk(
                        b.at_risk
                            .as_deref()
                            .map(Thresholds::parse)
                            .transpose()?
                            .unwrap_or_default(),
                    ),
                ),
                ..op
            })
        });
    parsed.map_err(|e| {
        state.metrics.command("enable", "invalid");
        Box::new(invalid(e))
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
        // The full connection map left every connection as it was.
        Ok(changed) if !changed.is_empty() && changed.iter().all(|c| c.error.is_some()) => {
            let mut r = failure(state, "enable", &Error::ConnsFull(changed.len()));
            if body {
                let e = Error::ConnsFull(changed.len()).to_string();
                r = reply(
                    StatusCode::INSUFFICIENT_STORAGE,
                    json!({ "error": e, "changed": 0, "failed": changed.len(), "connections": changed }),
                );
            }
            r
        }
        Ok(changed) => {
            let failed = changed.iter().filter(|c| c.error.is_some()).count();
            state.metrics.command("enable", "ok");
            state
                .metrics
                .applied_by_command
                .inc_by((changed.len() - failed) as u64);
            if !body {
                return StatusCode::OK.into_response();
            }
            let mut v = json!({ "changed": changed.len() - failed, "connections": changed });
            // Some left as they were: said, beside the others.
            if failed > 0 {
                v["failed"] = json!(failed);
                v["warning"] = json!(Error::ConnsFull(failed).to_string());
            }
            reply(StatusCode::OK, v)
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
    let op = Op::parse(&b.conn, b.local.as_deref(), b.holder.as_deref(), b.netns).map_err(|e| {
        state.metrics.command("disable", "invalid");
        Box::new(invalid(e))
    })?;
    Ok(Op {
        action: Action::Disable,
        ..op
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
    let op = match Op::parse(&b.conn, b.local.as_deref(), None, b.netns.clone()) {
        Ok(op) => op,
        Err(e) => {
            state.metrics.command("close", "invalid");
            return invalid(e);
        }
    };
    match blocking(state, move |e| {
        e.close(op.conn, op.local, op.netns.as_deref())
    })
    .await
    {
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
