//! Who may call the API: the Host check against DNS rebinding, the token
//! (Bearer, or Basic with the token as password), unix-socket peer
//! credentials, and JSON bodies only.
use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::Next,
    response::Response,
};
use serde_json::json;

use super::{handlers::reply, AppState, REQUEST_TIMEOUT};
use crate::access;

/// The token an `Authorization` header carries: `Bearer TOKEN`, or
/// `Basic` with the token as the password (any user name), for clients that
/// can only send credentials in a URL (Kamailio's `http_connect` with a
/// kept-alive connection: `http://tcpka:TOKEN@127.0.0.1:7177`).
pub(super) fn token_given(value: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    // The scheme is case-insensitive (RFC 9110, 11.1).
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("Bearer") {
        return Some(rest.trim_start().as_bytes().to_vec());
    }
    if !scheme.eq_ignore_ascii_case("Basic") {
        return None;
    }
    let b64 = rest;
    let pair = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let colon = pair.iter().position(|&b| b == b':')?;
    Some(pair[colon + 1..].to_vec())
}

/// What the accept loop knows of a connection, for [`guard`].
#[derive(Clone, Copy, Debug)]
pub(super) struct ConnInfo {
    /// Credentials of a unix socket client.
    pub(super) peer: Option<access::Peer>,
    /// The port of a loopback TCP listener, whose `Host` is checked.
    pub(super) loopback_port: Option<u16>,
}

pub(super) fn refuse(status: StatusCode, msg: &str) -> Response {
    let mut r = reply(status, json!({ "error": msg }));
    // A caller without the right to ask keeps no connection: its slot is
    // free at once for the next.
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    r
}

/// A request refused before it reached its handler, logged once.
/// At most [`crate::logs::THROTTLE`]'s rate of such lines, then one a
/// second with the count: a flood of bad requests costs the log little.
pub(super) fn refuse_logged(req: &Request, status: StatusCode, msg: &str) -> Response {
    if let crate::logs::Admit::Log { left_out } = crate::logs::THROTTLE.admit("request refused") {
        tracing::warn!(
            method = %req.method(),
            path = ?req.uri().path(),
            status = status.as_u16(),
            error = msg,
            left_out,
            "refused"
        );
    }
    refuse(status, msg)
}

/// Every request: a unix client must be root or in the API group; a
/// loopback listener only answers its own `Host` names (DNS rebinding); the
/// token, when set, must match; bodies must be JSON; and a request other
/// than the event stream must finish within [`REQUEST_TIMEOUT`].
pub(super) async fn guard(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let info = req.extensions().get::<ConnInfo>().copied();
    if let Some(peer) = info.and_then(|i| i.peer) {
        if !peer.allowed() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_as_bearer_or_as_a_basic_password() {
        assert_eq!(token_given("Bearer abc").as_deref(), Some(&b"abc"[..]));
        assert_eq!(token_given("bearer abc").as_deref(), Some(&b"abc"[..]));
        assert_eq!(token_given("BEARER  abc").as_deref(), Some(&b"abc"[..]));
        // "tcpka:s3cret:with:colons"
        let basic = "Basic dGNwa2E6czNjcmV0OndpdGg6Y29sb25z";
        assert_eq!(
            token_given(basic).as_deref(),
            Some(&b"s3cret:with:colons"[..])
        );
        assert_eq!(
            token_given("basic dGNwa2E6eA==").as_deref(),
            Some(&b"x"[..])
        );
        assert_eq!(token_given("Basic not base64!"), None);
        // "no colon"
        assert_eq!(token_given("Basic bm8gY29sb24="), None);
        assert_eq!(token_given("Digest x"), None);
        assert_eq!(token_given("abc"), None);
    }
}
