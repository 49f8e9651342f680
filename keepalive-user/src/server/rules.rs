//! `GET|POST /v1/rules` and `DELETE /v1/rules/{id}`.
use axum::{
    body::Body,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::json;

use super::{
    handlers::{blocking, failure, invalid, json_body, reply},
    AppState,
};
use crate::{
    enforcer::Reach,
    policy::Policy,
    rule::{parse_port, Cidr, RuleMatch},
    InvalidInput,
};

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
    /// Early-warning thresholds of its tracked connections (`rule add
    /// --at-risk`).
    at_risk: Option<String>,
    /// True for a tracked rule (`rule add --tracked`); false by default.
    tracked: Option<bool>,
    /// Only new connections get the rule (`rule add --new-only`).
    new_only: Option<bool>,
    /// Change nothing: `live` says what the rule would do to live
    /// connections (`rule add --dry-run`).
    dry_run: Option<bool>,
}

/// How a change reaches live connections, from the request's fields; a
/// preview that would not reach them is a contradiction.
fn reach(new_only: bool, dry_run: bool, revert: bool) -> Result<Option<Reach>, String> {
    match (new_only, dry_run, revert) {
        (true, true, _) => Err("dry_run previews live connections: not with new_only".into()),
        (true, _, true) => Err("revert is about live connections: not with new_only".into()),
        (true, false, false) => Ok(None),
        (false, dry_run, revert) => Ok(Some(Reach { dry_run, revert })),
    }
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
            Policy::new(b.idle, b.count, b.interval, b.user_timeout_ms)?.with_risk(
                b.at_risk
                    .as_deref()
                    .map(crate::risk::Thresholds::parse)
                    .transpose()?
                    .unwrap_or_default(),
            ),
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
    let dry_run = b.dry_run.unwrap_or(false);
    let how = match reach(b.new_only.unwrap_or(false), dry_run, false) {
        Ok(h) => h,
        Err(e) => {
            state.metrics.command("rule_add", "invalid");
            return invalid(e);
        }
    };
    match blocking(&state, move |e| {
        e.add_rule_reaching(m, policy, tracked, how)
    })
    .await
    {
        Ok((rule, reached)) => {
            state.metrics.command("rule_add", "ok");
            let code = if dry_run {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            reply(
                code,
                json!({ "rule": rule, "dry_run": dry_run, "live": crate::enforcer::live_json(&reached) }),
            )
        }
        Err(e) => failure(&state, "rule_add", &e),
    }
}

/// `DELETE /v1/rules/{id}` query: how the delete treats live connections.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleDelQuery {
    /// Live connections keep the rule's values (`rule del --new-only`).
    new_only: Option<bool>,
    /// Those no rule matches any more get SO_KEEPALIVE off.
    revert: Option<bool>,
    /// Change nothing: `live` says what the delete would do.
    dry_run: Option<bool>,
}

pub(super) async fn rules_del(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<RuleDelQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(id) = id.parse::<u32>() else {
        state.metrics.command("rule_del", "invalid");
        return invalid(format!("rule id must be a whole number, got {id:?}"));
    };
    let parsed = q
        .map_err(|e| format!("bad query string: {}", e.body_text()))
        .and_then(|Query(q)| {
            let dry_run = q.dry_run.unwrap_or(false);
            reach(
                q.new_only.unwrap_or(false),
                dry_run,
                q.revert.unwrap_or(false),
            )
            .map(|h| (h, dry_run))
        });
    let (how, dry_run) = match parsed {
        Ok(p) => p,
        Err(e) => {
            state.metrics.command("rule_del", "invalid");
            return invalid(e);
        }
    };
    match blocking(&state, move |e| e.delete_rule_reaching(id, how)).await {
        Ok((rule, reached)) => {
            state.metrics.command("rule_del", "ok");
            reply(
                StatusCode::OK,
                json!({ "rule": rule, "dry_run": dry_run, "live": crate::enforcer::live_json(&reached) }),
            )
        }
        Err(e) => failure(&state, "rule_del", &e),
    }
}
