//! `GET /v1/connections`: managed connections, or the ones `conn` names,
//! a page at a time.
use std::path::PathBuf;

use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;

use super::{
    handlers::{blocking, failure, invalid},
    AppState,
};
use crate::enforcer::{Action, Op};

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
    q: Result<Query<ConnQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    // A query string that does not parse gets the API's JSON error.
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            state.metrics.command("status", "invalid");
            return invalid(format!("bad query string: {}", e.body_text()));
        }
    };
    let spec = match q
        .conn
        .as_deref()
        .map(|c| Op::parse(c, q.local.as_deref(), None, None))
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
            Some(op) => {
                let mut found = e.apply(op.conn, op.local, Action::Query, netns.as_deref())?;
                e.attach_holders(&mut found)?;
                found
            }
            None => e.status(netns.as_deref())?,
        };
        // Pages in cookie order: stable while connections come and go.
        conns.retain(|c| after.is_none_or(|a| c.cookie > a));
        conns.sort_unstable_by_key(|c| c.cookie);
        let next = (conns.len() > limit).then(|| conns[limit - 1].cookie);
        conns.truncate(limit);
        // Read for the page only: one lookup per connection.
        e.add_liveness(&mut conns, netns.as_deref())?;
        Ok((conns, next))
    })
    .await;
    match out {
        Ok((conns, next)) => {
            state.metrics.command("status", "ok");
            let mut r = (StatusCode::OK, Json(conns)).into_response();
            if let Some(n) = next {
                r.headers_mut().insert(NEXT_PAGE_HEADER, n.into());
            }
            r
        }
        Err(e) => failure(&state, "status", &e),
    }
}
