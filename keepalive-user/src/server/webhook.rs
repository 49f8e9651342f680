//! The webhook: events POSTed to a controller, signed, in order, with a
//! bounded queue; and the feed from the kernel's ring buffers.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::http::header;
use tokio::sync::mpsc;

use super::{metrics::Metrics, AppState, WEBHOOK_QUEUE};
use crate::{
    feed,
    feed::{Gap, Message},
    paths::PinLayout,
    Error, InvalidInput,
};

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

/// Starts the event feed: the log, the stream subscribers, the metrics and
/// the webhook (which gets how connections ended, not `applied`).
pub(super) fn spawn_feed(
    layout: &PinLayout,
    state: &AppState,
    webhook: Option<Webhook>,
    json_log: bool,
) {
    let metrics = state.metrics.clone();
    let counts = state.event_counts.clone();
    let ended = state.ended.clone();
    let each = move |m: &Arc<Message>| {
        metrics.event(m);
        counts.count(m.kind());
        if let Message::Event(r) = &**m {
            let ends = !matches!(r.kind, "applied" | "at_risk" | "recovered");
            if r.source == "command" && ends {
                ended.notify_one();
            }
        }
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
pub(super) struct Webhook {
    tx: mpsc::Sender<Arc<Message>>,
    missed: Arc<AtomicU64>,
}

/// POSTs each event to the webhook: up to 4 attempts of at most 2 s each,
/// 100 ms, 200 ms, 400 ms apart (about 9 s at worst); a 4xx answer is not
/// retried. Events wait in a bounded queue; what does not fit, or fails
/// every attempt, is counted as dropped.
pub(super) fn spawn_webhook(
    config: WebhookConfig,
    metrics: Arc<Metrics>,
) -> Result<Webhook, Error> {
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
    let client = builder.build().map_err(|e| Error::Http {
        what: "building the webhook client".into(),
        source: e,
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
                        tokio::time::sleep(crate::jitter(delay)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
