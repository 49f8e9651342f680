//! `tcpka watch`: the event stream of a running `tcpka serve`.
use std::path::PathBuf;

use clap::Args;
use tcpka::{paths::PinLayout, Error};

#[derive(Args, Debug)]
pub(crate) struct WatchArgs {
    /// The API of `tcpka serve` (host:port).
    #[arg(long, default_value = tcpka::server::DEFAULT_LISTEN)]
    pub(crate) api: String,
    /// Token of the API [default: TCPKA_TOKEN, else the file serve
    /// generated, /run/tcpka/api-token].
    #[arg(long, env = "TCPKA_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Read the token from FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub(crate) token_file: Option<PathBuf>,
    /// Print one JSON object per line.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Streams `GET /v1/events` and prints each event.
pub(crate) async fn watch(layout: &PinLayout, a: WatchArgs) -> Result<(), Error> {
    let url = format!("http://{}/v1/events", a.api);
    let fail = |what: String, e: reqwest::Error| Error::Http {
        what,
        source: e.without_url(),
    };
    let token = match (&a.token, &a.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(tcpka::access::read_token_file(f)?),
        (None, None) => {
            let f = layout.token_file();
            f.exists()
                .then(|| tcpka::access::read_token_file(&f))
                .transpose()?
        }
    };
    let client = reqwest::Client::new();
    let mut req = client.get(&url);
    if let Some(t) = &token {
        req = req.bearer_auth(t);
    }
    let mut resp = req.send().await.map_err(|e| {
        fail(
            format!("connecting to {url} (is `tcpka serve` running?)"),
            e,
        )
    })?;
    if !resp.status().is_success() {
        let status = resp.status();
        // The API's replies say why in "error".
        let body = resp.text().await.unwrap_or_default();
        let why = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v["error"]
                    .as_str()
                    .map(|s| tcpka::logs::escape_controls(s).into_owned())
            })
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("no reason").to_owned());
        return Err(Error::Api {
            url,
            status: status.as_u16(),
            why,
        });
    }
    let mut pending = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| fail(format!("reading {url}"), e))?
    {
        pending.extend_from_slice(&chunk);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if a.json {
                tcpka::outln!("{line}");
            } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["kind"] == "gap" {
                    tcpka::outln!(
                        "{} gap: {} events missed ({})",
                        v["time"].as_str().unwrap_or("-"),
                        v["missed"],
                        v["reason"].as_str().unwrap_or("?")
                    );
                    continue;
                }
                tcpka::outln!(
                    "{} {} {} -> {} cookie={} {}",
                    v["time"].as_str().unwrap_or("-"),
                    v["kind"].as_str().unwrap_or("?"),
                    v["local"].as_str().unwrap_or("?"),
                    v["remote"].as_str().unwrap_or("?"),
                    v["cookie"],
                    v["error"]
                        .as_u64()
                        .map(|e| format!("error={e}"))
                        .unwrap_or_default(),
                );
            }
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
        }
    }
    Ok(())
}
