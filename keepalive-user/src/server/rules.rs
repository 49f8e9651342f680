//! `GET|POST /v1/rules` and `DELETE /v1/rules/{id}`.
use super::*;

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
