//! Fleet previews: `tcpka fleet rule add|del --dry-run` asks every agent
//! what the change would do to the live connections on its host, through
//! etcd, and changes nothing:
//!
//! - the command puts the change at `PREFIX/previews/ID`, under a lease of
//!   its own;
//! - each agent plans the change in a copy of its view (the rules stay as
//!   they are), runs a preview pass of its kernel's rules iterator, and
//!   puts its answer at `PREFIX/previews/ID/NODE` under the same lease;
//! - the command waits for an answer from every node that has a status (or
//!   until its wait ends) and revokes the lease, which deletes them all.
use std::{collections::BTreeMap, sync::mpsc, time::Duration};

use etcd_client::{Client, EventType, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use super::{etcd::read_prefix, etcd_error, EtcdOptions};
use crate::{enforcer::Reached, Error};

/// The change a preview asks about, at `PREFIX/previews/ID`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    /// The fleet rule's name.
    pub name: String,
    /// Its value as it would be put; `None`: deleted.
    pub value: Option<String>,
    /// The lease the answers go under.
    pub lease: i64,
}

/// What the agent's applier answers.
pub(super) type Answer = oneshot::Sender<Result<Reached, String>>;

/// What every node answered, by node name (`{"live": ...}` or
/// `{"error": ...}`), and the nodes with a status that did not answer in
/// time.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PreviewReport {
    pub answers: BTreeMap<String, Value>,
    pub missing: Vec<String>,
}

impl EtcdOptions {
    pub fn previews_prefix(&self) -> String {
        format!("{}/previews/", self.prefix)
    }
}

/// Asks every agent what putting (`Some`) or deleting (`None`) the fleet
/// rule `name` would do to its live connections; waits up to `wait` for
/// the nodes that have a status. Nothing is changed; the request and the
/// answers are gone when this returns (or, at the latest, when the lease
/// ends).
pub async fn ask(
    client: &mut Client,
    o: &EtcdOptions,
    name: &str,
    value: Option<String>,
    wait: Duration,
) -> Result<PreviewReport, Error> {
    let (nodes, _) = read_prefix(client, &o.nodes_prefix(), "reading the node statuses").await?;
    let nodes: Vec<String> = nodes.into_iter().map(|(n, _)| n).collect();
    let ttl = wait.as_secs() as i64 + 10;
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(|e| etcd_error("granting the preview's lease", e))?
        .id();
    let report = ask_under(client, o, name, value, wait, lease, &nodes).await;
    // The answers go with the lease; an error here leaves them until its
    // time ends.
    let _ = client.lease_revoke(lease).await;
    report
}

async fn ask_under(
    client: &mut Client,
    o: &EtcdOptions,
    name: &str,
    value: Option<String>,
    wait: Duration,
    lease: i64,
    nodes: &[String],
) -> Result<PreviewReport, Error> {
    let id = format!("{:016x}", fastrand::u64(..));
    let key = format!("{}{id}", o.previews_prefix());
    let request = PreviewRequest {
        name: name.to_owned(),
        value,
        lease,
    };
    let put = client
        .put(
            key.clone(),
            serde_json::to_string(&request).expect("plain data"),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(|e| etcd_error("asking the agents", e))?;
    let revision = put.header().map_or(0, |h| h.revision());
    let answers_prefix = format!("{key}/");
    let mut stream = client
        .watch(
            answers_prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision),
            ),
        )
        .await
        .map_err(|e| etcd_error("waiting for the agents' answers", e))?;
    let mut report = PreviewReport::default();
    let deadline = tokio::time::Instant::now() + wait;
    while !nodes.iter().all(|n| report.answers.contains_key(n)) {
        let message = match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => break,
            Ok(m) => m.map_err(|e| etcd_error("waiting for the agents' answers", e))?,
        };
        let Some(response) = message else { break };
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            if event.event_type() != EventType::Put {
                continue;
            }
            let Some(node) = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(&answers_prefix))
            else {
                continue;
            };
            let answer = serde_json::from_slice(kv.value()).unwrap_or_else(
                |e| serde_json::json!({ "error": format!("a malformed answer: {e}") }),
            );
            report.answers.insert(node.to_owned(), answer);
        }
    }
    report.missing = nodes
        .iter()
        .filter(|n| !report.answers.contains_key(*n))
        .cloned()
        .collect();
    Ok(report)
}

/// The agent's side: answers every preview put from now on, until the
/// watch fails (the session's end). The applier plans and runs each; the
/// answer goes under the request's lease.
pub(super) async fn answer(
    mut client: Client,
    prefix: String,
    node: String,
    tx: mpsc::Sender<super::agent::Input>,
) -> Error {
    let what = "watching the previews";
    let mut stream = match client
        .watch(prefix.clone(), Some(WatchOptions::new().with_prefix()))
        .await
    {
        Ok(w) => w,
        Err(e) => return etcd_error(what, e),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Error::Etcd {
                    what: what.into(),
                    why: "the watch ended".into(),
                    transient: true,
                }
            }
            Err(e) => return etcd_error(what, e),
        };
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            if event.event_type() != EventType::Put {
                continue;
            }
            // Requests only: an answer's key has the node after the id.
            let Some(id) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                continue;
            };
            if id.is_empty() || id.contains('/') {
                continue;
            }
            // An answer goes under the request's lease, so that it goes
            // with it: a request without one is not answered.
            let request = match serde_json::from_slice::<PreviewRequest>(kv.value()) {
                Ok(r) if r.lease != 0 => r,
                _ => {
                    tracing::debug!("fleet: a malformed preview request at {id}: skipped");
                    continue;
                }
            };
            let (reply, answered) = oneshot::channel();
            let asked = super::agent::Input::Preview {
                name: request.name.clone(),
                value: request.value.clone(),
                reply,
            };
            if tx.send(asked).is_err() {
                return Error::Etcd {
                    what: "handing a preview to the applier".into(),
                    why: "the applier thread has ended".into(),
                    transient: false,
                };
            }
            let body = match answered.await {
                Ok(Ok(r)) => serde_json::json!({ "live": r }),
                Ok(Err(e)) => serde_json::json!({ "error": e }),
                Err(_) => serde_json::json!({ "error": "the applier did not answer" }),
            };
            let key = format!("{prefix}{id}/{node}");
            let put = client
                .put(
                    key,
                    body.to_string(),
                    Some(PutOptions::new().with_lease(request.lease)),
                )
                .await;
            if let Err(e) = put {
                // The lease is gone: the command stopped waiting.
                tracing::debug!(
                    "fleet: preview {id}: {}",
                    crate::one_line(&etcd_error("answering", e))
                );
            }
        }
    }
}
