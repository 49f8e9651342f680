//! Kamailio's `evapi` module as a channel (`serve --evapi HOST:PORT`): tcpka
//! connects to Kamailio's evapi server and keeps that connection up
//! (reconnecting with backoff). Kamailio relays enable/disable commands to
//! it with `evapi_relay()`, which does not wait; tcpka sends the events
//! (timeout, reset, aborted, gap; `closed` too if `--evapi-events` says
//! so) back over the same connection, into Kamailio's
//! `event_route[evapi:message-received]`.
//!
//! Both directions are netstrings (`LEN:DATA,`, evapi's
//! `netstring_format`, on by default) holding one JSON object:
//!
//! ```text
//! Kamailio -> tcpka  {"op":"enable","conn":"10.0.0.2:5060","idle":60,"count":5,"interval":5,"holder":"<md5>"}
//!                    {"op":"disable","conn":"10.0.0.2:5060","holder":"<md5>"}
//! tcpka -> Kamailio  {"kind":"timeout","remote":"10.0.0.2:5060",...,"token":"..."}
//! ```
//!
//! Commands that arrive together are applied together (one batch).
//!
//! Whoever can listen on the evapi address could send tcpka commands, and
//! whoever can connect to Kamailio's evapi server could send Kamailio
//! events. So tcpka only talks to a server whose socket belongs to root or
//! to the evapi user (`--evapi-user`, default `kamailio`), checked with
//! sock_diag after each connect, and puts the evapi token
//! (`--evapi-token-file`) in every event so that Kamailio can tell tcpka's
//! events from forgeries. Commands carry no secret: evapi relays them to
//! every client.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde::Deserialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::broadcast,
};

use crate::feed::{Gap, Message};

/// The longest message tcpka takes from Kamailio.
pub const MAX_MESSAGE: usize = 16 * 1024;

/// Where and whom to talk to.
#[derive(Clone, Debug)]
pub struct EvapiConfig {
    pub addr: SocketAddr,
    /// Put in every event as `"token"`.
    pub token: Option<String>,
    /// Uids whose server tcpka accepts (root always).
    pub users: Vec<u32>,
    /// The kinds of event sent (`--evapi-events`).
    pub events: Vec<&'static str>,
}

/// The kinds of event that can go to Kamailio (`applied` never does).
pub const EVENT_KINDS: [&str; 7] = [
    "timeout",
    "reset",
    "aborted",
    "gap",
    "closed",
    "at_risk",
    "recovered",
];

/// What Kamailio cannot learn by itself: a dead peer (`timeout`), a reset,
/// an abort, trouble before it (`at_risk`, `recovered`), and events lost
/// (`gap`). A connection's orderly close (`closed`) it sees on its own;
/// with a connection per phone that is one event per call, for nothing.
pub const DEFAULT_EVENTS: [&str; 6] =
    ["timeout", "reset", "aborted", "gap", "at_risk", "recovered"];

/// `--evapi-events`: kinds by name, or `all`.
pub fn parse_events<S: AsRef<str>>(names: &[S]) -> Result<Vec<&'static str>, String> {
    let mut out = Vec::new();
    for name in names {
        let name = name.as_ref().trim();
        if name == "all" {
            return Ok(EVENT_KINDS.to_vec());
        }
        match EVENT_KINDS.iter().find(|k| **k == name) {
            Some(k) if !out.contains(k) => out.push(*k),
            Some(_) => {}
            None => {
                return Err(format!(
                    "unknown event kind {name:?} (timeout, reset, aborted, gap, closed, at_risk, recovered or all)"
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(
            "no event kind (timeout, reset, aborted, gap, closed, at_risk, recovered or all)"
                .into(),
        );
    }
    Ok(out)
}

/// One command from Kamailio.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Command {
    Enable {
        conn: String,
        local: Option<String>,
        idle: u32,
        count: u32,
        interval: u32,
        user_timeout_ms: Option<u32>,
        /// Early-warning thresholds, as `enable --at-risk` takes them.
        at_risk: Option<String>,
        holder: Option<String>,
    },
    Disable {
        conn: String,
        local: Option<String>,
        holder: Option<String>,
    },
}

/// Splits complete netstrings off the front of `buf`. `Err` when the
/// stream is not netstrings (or a message is longer than [`MAX_MESSAGE`]):
/// the connection is then dropped.
pub fn netstrings(buf: &mut Vec<u8>) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some(colon) = rest.iter().position(|&b| b == b':') else {
            if rest.len() > 7 || !rest.iter().all(u8::is_ascii_digit) {
                return Err("not a netstring length".into());
            }
            break;
        };
        let digits = &rest[..colon];
        if digits.is_empty() || digits.len() > 7 || !digits.iter().all(u8::is_ascii_digit) {
            return Err("not a netstring length".into());
        }
        let len: usize = std::str::from_utf8(digits)
            .expect("digits")
            .parse()
            .expect("digits");
        if len > MAX_MESSAGE {
            return Err(format!("a message of {len} bytes (at most {MAX_MESSAGE})"));
        }
        let start = colon + 1;
        if rest.len() < start + len + 1 {
            break;
        }
        if rest[start + len] != b',' {
            return Err("a netstring without its comma".into());
        }
        out.push(rest[start..start + len].to_vec());
        at += start + len + 1;
    }
    buf.drain(..at);
    Ok(out)
}

/// One netstring.
pub fn netstring(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{}:", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.push(b',');
    out
}

/// An event as sent to Kamailio: its JSON with the token added.
pub fn event_json(m: &Message, token: Option<&str>) -> Vec<u8> {
    let mut v = serde_json::to_value(m).expect("plain data");
    if let (Some(t), Some(o)) = (token, v.as_object_mut()) {
        o.insert("token".into(), t.into());
    }
    serde_json::to_vec(&v).expect("plain data")
}

/// The uid owning the server end of our connection (`local` -> `remote`),
/// from sock_diag. `None` when the server is not on this host.
pub fn server_uid(local: SocketAddr, remote: SocketAddr) -> std::io::Result<Option<u32>> {
    // The server's socket has our ends the other way round.
    crate::destroy::socket_uid(remote, local)
}

/// Commands taken from Kamailio and not finished yet, at most: past it
/// tcpka stops reading until some finish, so a flood cannot grow its memory
/// without bound.
pub const MAX_PENDING: usize = 16_384;

/// What the connection loop needs from the daemon.
pub trait Commands: Clone + Send + Sync + 'static {
    /// Queues these commands, in order, to be applied together; returns
    /// once they are queued (one line of log and metrics each when they
    /// are done), waiting only while [`MAX_PENDING`] are.
    fn run(&self, commands: Vec<Command>) -> impl std::future::Future<Output = ()> + Send;
}

/// Keeps the connection to Kamailio up for as long as the daemon runs.
pub async fn run<C: Commands>(
    config: EvapiConfig,
    commands: C,
    events: broadcast::Sender<Arc<Message>>,
) {
    let mut backoff = RETRY_FIRST;
    // Said once when the channel goes down, then every RETRY_REPORT.
    let mut down_since: Option<std::time::Instant> = None;
    let mut reported = std::time::Instant::now();
    loop {
        let started = std::time::Instant::now();
        match session(&config, &commands, &events).await {
            Ok(()) => {
                tracing::warn!("evapi {}: Kamailio closed the connection", config.addr);
                backoff = RETRY_FIRST;
                down_since = Some(std::time::Instant::now());
            }
            Err(e) if down_since.is_none() || reported.elapsed() >= RETRY_REPORT => {
                let down = down_since.get_or_insert(started).elapsed();
                tracing::warn!(
                    "evapi {}: {e}; retrying every {RETRY_MAX:?} or sooner (down {down:.0?})",
                    config.addr
                );
                reported = std::time::Instant::now();
            }
            Err(e) => tracing::debug!("evapi {}: {e}", config.addr),
        }
        if started.elapsed() > Duration::from_secs(1) {
            // It was up a while: start over from the shortest wait.
            backoff = RETRY_FIRST;
        }
        tokio::time::sleep(crate::jitter(backoff)).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

/// The first wait before connecting again.
const RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between two tries: Kamailio drops what `evapi_relay()`
/// sends while no client is connected, so tcpka is back within about half
/// a second of Kamailio's start (a refused connect costs next to nothing).
pub const RETRY_MAX: Duration = Duration::from_millis(400);
/// How often a channel that stays down is said again in the log.
const RETRY_REPORT: Duration = Duration::from_secs(30);

/// `d` give or take a quarter, so that many daemons (or a restart of
/// all of them) do not knock at once.
/// One connection, until it ends.
async fn session<C: Commands>(
    config: &EvapiConfig,
    commands: &C,
    events: &broadcast::Sender<Arc<Message>>,
) -> Result<(), String> {
    let stream = TcpStream::connect(config.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    // NB: may wait (up to a second) for the server to finish accepting.
    let addr = config.addr;
    let owner = tokio::task::spawn_blocking(move || server_uid(local, addr))
        .await
        .map_err(|e| format!("finding the server's owner: {e}"))?;
    match owner {
        Ok(Some(uid)) if uid == 0 || config.users.contains(&uid) => {}
        Ok(Some(uid)) => {
            return Err(format!(
                "the server's socket belongs to uid {uid}, not to root or the evapi user: refused"
            ))
        }
        Ok(None) => return Err("the server is not on this host: refused".into()),
        Err(e) => return Err(format!("finding the server's owner: {e}")),
    }
    tracing::info!("evapi {}: connected", config.addr);
    let (mut rd, mut wr) = stream.into_split();
    let mut rx = events.subscribe();
    let token = config.token.clone();
    let events = config.events.clone();
    let writer = async move {
        loop {
            let m = match rx.recv().await {
                Ok(m) => m,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    Arc::new(Message::Gap(Gap::new(n, "evapi")))
                }
                Err(broadcast::error::RecvError::Closed) => return Ok::<(), String>(()),
            };
            if !events.contains(&m.kind()) {
                continue;
            }
            let frame = netstring(&event_json(&m, token.as_deref()));
            wr.write_all(&frame)
                .await
                .map_err(|e| format!("sending an event: {e}"))?;
        }
    };
    let reader = async move {
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 8192];
        loop {
            let n = rd
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading: {e}"))?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut batch = Vec::new();
            for msg in netstrings(&mut buf)? {
                match parse_commands(&msg) {
                    Ok(c) => batch.extend(c),
                    Err(e) => {
                        if let crate::logs::Admit::Log { left_out } =
                            crate::logs::THROTTLE.admit("evapi message refused")
                        {
                            let text = String::from_utf8_lossy(&msg[..msg.len().min(200)]);
                            tracing::warn!(
                                left_out,
                                "evapi: a message that is not a command ({}): {}",
                                crate::logs::escape_controls(&e.to_string()),
                                text.escape_debug()
                            )
                        }
                    }
                }
            }
            if !batch.is_empty() {
                commands.run(batch).await;
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}

/// One message: a command, or a JSON array of commands (a call's two legs
/// in one `evapi_relay()`), all or nothing.
pub fn parse_commands(msg: &[u8]) -> Result<Vec<Command>, serde_json::Error> {
    if msg.trim_ascii_start().first() == Some(&b'[') {
        serde_json::from_slice(msg)
    } else {
        serde_json::from_slice(msg).map(|c| vec![c])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_netstrings_and_keeps_the_rest() {
        let mut buf = b"5:hello,0:,3:ab".to_vec();
        assert_eq!(
            netstrings(&mut buf).unwrap(),
            vec![b"hello".to_vec(), Vec::new()]
        );
        assert_eq!(buf, b"3:ab");
        buf.extend_from_slice(b"c,");
        assert_eq!(netstrings(&mut buf).unwrap(), vec![b"abc".to_vec()]);
        assert!(buf.is_empty());
        assert_eq!(netstring(b"abc"), b"3:abc,");
    }

    #[test]
    fn refuses_what_is_not_netstrings() {
        for bad in [
            &b"x:abc,"[..],
            b"3:abcd",
            b"99999999:",
            b"123456789",
            b":a,",
            b"20000:",
        ] {
            let mut buf = bad.to_vec();
            assert!(
                netstrings(&mut buf).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A length still arriving is fine.
        let mut buf = b"12".to_vec();
        assert!(netstrings(&mut buf).unwrap().is_empty());
    }

    #[test]
    fn parses_commands_and_refuses_extra_fields() {
        let c: Command = serde_json::from_str(
            r#"{"op":"enable","conn":"10.0.0.2:5060","idle":60,"count":5,"interval":5,"holder":"ab"}"#,
        )
        .unwrap();
        assert!(matches!(c, Command::Enable { idle: 60, .. }));
        let c: Command =
            serde_json::from_str(r#"{"op":"disable","conn":"10.0.0.2:5060"}"#).unwrap();
        assert!(matches!(c, Command::Disable { holder: None, .. }));
        for bad in [
            r#"{"op":"enable","conn":"x","idle":1,"count":1,"interval":1,"netns":"/proc/1/ns/net"}"#,
            r#"{"op":"rm","conn":"x"}"#,
            r#"{"conn":"x"}"#,
        ] {
            assert!(serde_json::from_str::<Command>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_message_holds_one_command_or_an_array_all_or_nothing() {
        let one = br#"{"op":"disable","conn":"10.0.0.2:5060"}"#;
        assert_eq!(parse_commands(one).unwrap().len(), 1);
        let two = br#" [{"op":"disable","conn":"10.0.0.2:5060"},{"op":"disable","conn":"10.0.0.3:5060","holder":"h"}]"#;
        assert_eq!(parse_commands(two).unwrap().len(), 2);
        let bad = br#"[{"op":"disable","conn":"10.0.0.2:5060"},{"op":"rm","conn":"x"}]"#;
        assert!(parse_commands(bad).is_err());
        assert!(parse_commands(b"[]").unwrap().is_empty());
    }

    #[test]
    fn event_kinds() {
        assert_eq!(parse_events(&["all"]).unwrap(), EVENT_KINDS.to_vec());
        assert_eq!(
            parse_events(&["timeout", " reset", "timeout"]).unwrap(),
            vec!["timeout", "reset"]
        );
        assert!(!DEFAULT_EVENTS.contains(&"closed"));
        assert!(!DEFAULT_EVENTS.contains(&"applied"));
        assert!(parse_events(&["applied"]).unwrap_err().contains("applied"));
        assert!(parse_events(&["closd"]).unwrap_err().contains("closd"));
        assert!(parse_events::<&str>(&[]).is_err());
    }
}
