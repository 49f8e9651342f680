//! HTTP: requests to `tcpka serve` (reqwest), its event stream, and a
//! webhook receiver (axum).
use super::*;

/// The API token [`Serve::start`] gives a daemon unless the test passes
/// its own; [`http`] sends it when given no other.
pub const TEST_TOKEN: &str = "tcpka-test-token-0123456789abcdef";

/// How long a request of the harness may take (connect, send, each read).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The harness's HTTP client, to finish with `build()`: [`HTTP_TIMEOUT`],
/// and no proxy whatever the environment says. Build it on the thread
/// whose network namespace it should connect in: its runtime thread
/// inherits that thread's.
pub fn http_client() -> reqwest::blocking::ClientBuilder {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .connect_timeout(HTTP_TIMEOUT)
        .timeout(HTTP_TIMEOUT)
}

/// A request to `http://ADDR/PATH` with `Authorization: Bearer TOKEN`:
/// `token` None sends [`TEST_TOKEN`], `Some("")` no Authorization at all.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> reqwest::blocking::RequestBuilder {
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .unwrap_or_else(|e| panic!("HTTP method {method:?}: {e}"));
    let client = http_client().build().expect("an HTTP client");
    let r = client.request(method, format!("http://{addr}{path}"));
    match token.unwrap_or(TEST_TOKEN) {
        "" => r,
        t => r.bearer_auth(t),
    }
}

/// Sends a request; returns status and body.
pub fn reply(r: reqwest::blocking::RequestBuilder) -> std::io::Result<(u16, String)> {
    let r = r.send().map_err(std::io::Error::other)?;
    let code = r.status().as_u16();
    Ok((code, r.text().map_err(std::io::Error::other)?))
}

/// One HTTP/1.1 request (a JSON content type, `body` or an empty one)
/// with `token` as [`request`] takes it; returns status and body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    reply(
        request(addr, method, path, token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.unwrap_or_default().to_vec()),
    )
}

/// Splits a raw HTTP/1.1 response into status and (de-chunked) body: for
/// the tests that speak HTTP over a raw socket on purpose.
pub fn parse_response(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// `http` with a JSON body, parsing the JSON reply.
pub fn http_json(addr: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    let (code, text) = http(addr, method, path, Some(body.to_string().as_bytes()), None)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Polls `GET /healthz` (with `token` as [`request`] takes it) every 50 ms
/// until it answers with a status `ready` accepts; panics after 10 s (40 s
/// under TCG, where the kernel's verifier alone takes seconds for serve's
/// programs).
pub fn wait_for_healthz(addr: &str, token: Option<&str>, ready: impl Fn(u16) -> bool) {
    let within = Duration::from_secs(if under_tcg() { 40 } else { 10 });
    wait_until("tcpka serve up", within, || {
        http(addr, "GET", "/healthz", None, token).is_ok_and(|(code, _)| ready(code))
    });
}

/// A tiny HTTP server that answers 200 to every request and hands over the
/// JSON bodies: the webhook's receiving end.
pub fn webhook_receiver() -> (String, Receiver<Value>) {
    let l = listen("127.0.0.1:0");
    let addr = l.local_addr().unwrap().to_string();
    (addr, webhook_receiver_on(l))
}

/// [`webhook_receiver`] on a listener of the test's: axum on a tokio
/// runtime of its own thread, answering 200 to every request on any path
/// and sending each body that is JSON.
pub fn webhook_receiver_on(l: TcpListener) -> Receiver<Value> {
    let (tx, rx) = std::sync::mpsc::channel();
    l.set_nonblocking(true).expect("non-blocking listener");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).expect("a tokio listener");
            let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    let _ = tx.send(v);
                }
                std::future::ready(axum::http::StatusCode::OK)
            });
            let _ = axum::serve(l, app).await;
        });
    });
    rx
}

/// Subscribes to `GET /v1/events` of a running `tcpka serve`: one JSON
/// value per event, from a reader thread.
pub fn event_stream(addr: &str) -> Receiver<Value> {
    // No timeout: events may be far apart.
    let client = http_client().timeout(None).build().expect("an HTTP client");
    let r = client
        .get(format!("http://{addr}/v1/events"))
        .bearer_auth(TEST_TOKEN)
        .send()
        .unwrap_or_else(|e| panic!("GET /v1/events: {e}"));
    // Subscribed once the response header arrives.
    assert_eq!(r.status(), reqwest::StatusCode::OK, "GET /v1/events");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v.is_object() {
                    let _ = tx.send(v);
                }
            }
        }
    });
    rx
}

/// Waits for an event of `kind` for `cookie`, skipping others.
pub fn wait_for_event(rx: &Receiver<Value>, kind: &str, cookie: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {kind} event for cookie {cookie} within {within:?}"));
        if v["kind"] == kind && v["cookie"].as_u64() == Some(cookie) {
            return v;
        }
    }
}
