//! The agent inside `tcpka serve --etcd`: it keeps the kernel's fleet
//! rules equal to the etcd rules that select this node, and publishes the
//! node's status under a lease.
//!
//! etcd is never in the way of enforcement: the rules last applied are
//! kept on disk and applied at start before etcd is reached; while etcd is
//! away, the kernel keeps them and local commands work as ever. On
//! reconnection the watch resumes after the last revision seen, or, when
//! etcd has compacted that revision away, everything is read again.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions, WatchStream};

use super::{apply::*, cache::*, etcd_error, EtcdOptions, NODE_TTL};
use crate::{enforcer::Enforcer, Error};

/// What the agent needs to know.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub etcd: EtcdOptions,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// The rules last applied, kept across restarts.
    pub cache: PathBuf,
}

/// Timeout and reset events seen by serve, for the node's status.
#[derive(Debug, Default)]
pub struct EventCounts {
    pub timeouts: AtomicU64,
    pub resets: AtomicU64,
}

impl EventCounts {
    pub fn count(&self, kind: &str) {
        match kind {
            "timeout" => self.timeouts.fetch_add(1, Ordering::Relaxed),
            "reset" => self.resets.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
}

/// How often the lease is renewed and the status written.
const TICK: Duration = Duration::from_secs(3);
/// The managed-connection count reads the whole connection map: not more
/// often than this.
const MANAGED_EVERY: Duration = Duration::from_secs(15);

/// What the last kernel update left.
#[derive(Clone, Debug, Default)]
pub(super) struct Applied {
    pub(super) revision: i64,
    pub(super) fleet_rules: usize,
    pub(super) clashes: Vec<String>,
    pub(super) invalid: Vec<String>,
    pub(super) error: Option<String>,
}

struct Agent {
    config: AgentConfig,
    enforcer: Enforcer,
    events: Arc<EventCounts>,
    cache: Cache,
    /// What is on disk, so that an unchanged cache is not written again.
    saved: Option<Cache>,
    applied: Applied,
    managed: Option<(Instant, usize)>,
    /// The member last connected to: tried first next time.
    member: usize,
}

/// Runs the agent until the process ends.
pub async fn run(config: AgentConfig, enforcer: Enforcer, events: Arc<EventCounts>) {
    let mut agent = Agent::new(config.clone(), enforcer.clone(), events.clone());
    if agent.cache.revision > 0 {
        tracing::info!(
            cache = %agent.config.cache.display(),
            revision = agent.cache.revision,
            "fleet: applying the {} cached rule(s) before etcd answers",
            agent.cache.rules.len()
        );
        agent.apply().await;
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        // Each session in a task of its own: a panic in it (the etcd
        // client's) ends that session, not the agent, which starts again
        // from its cache.
        let session = tokio::spawn(async move {
            let result = agent.session().await;
            (agent, result)
        })
        .await;
        agent = match session {
            Ok((a, Ok(()))) => a,
            Ok((a, Err(e))) => {
                tracing::warn!(
                    "fleet: {}; enforcement goes on with the rules of revision {}",
                    crate::one_line(&e),
                    a.applied.revision
                );
                a
            }
            Err(e) => {
                tracing::error!(
                    "fleet: the etcd session failed ({e}); starting again from the cache"
                );
                Agent::new(config.clone(), enforcer.clone(), events.clone())
            }
        };
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

impl Agent {
    /// The agent with the rules kept on disk, if any.
    fn new(config: AgentConfig, enforcer: Enforcer, events: Arc<EventCounts>) -> Self {
        let prefix = config.etcd.prefix.clone();
        let cache = Cache::load(&config.cache, &prefix).unwrap_or(Cache {
            prefix,
            ..Cache::default()
        });
        Self {
            config,
            enforcer,
            events,
            saved: Some(cache.clone()),
            cache,
            applied: Applied::default(),
            managed: None,
            member: 0,
        }
    }

    /// One connection to etcd, until it fails.
    async fn session(&mut self) -> Result<(), Error> {
        let etcd = self.config.etcd.clone();
        let (mut client, member) = etcd.connect_from(self.member).await?;
        self.member = member;
        let (mut _watcher, mut stream) = self.watch(&mut client).await?;
        let lease = client
            .lease_grant(NODE_TTL.as_secs() as i64, None)
            .await
            .map_err(|e| etcd_error("granting the node's lease", e))?
            .id();
        let (mut keeper, mut renewals) = client
            .lease_keep_alive(lease)
            .await
            .map_err(|e| etcd_error("keeping the node's lease", e))?;
        let known = serde_json::json!({ "labels": self.config.labels }).to_string();
        client
            .put(etcd.known_key(&self.config.node), known, None)
            .await
            .map_err(|e| etcd_error("writing the node's labels", e))?;
        tracing::info!(
            node = %self.config.node,
            revision = self.cache.revision,
            "fleet: connected to etcd at {}, watching {}",
            etcd.endpoints[member],
            etcd.rules_prefix()
        );
        self.publish(&mut client, lease).await?;
        let mut tick = tokio::time::interval(TICK);
        tick.tick().await;
        loop {
            tokio::select! {
                message = stream.message() => {
                    let response = message
                        .map_err(|e| etcd_error("watching the rules", e))?
                        .ok_or_else(|| Error::Io {
                            what: "the watch of the rules ended".into(),
                            source: std::io::ErrorKind::UnexpectedEof.into(),
                        })?;
                    if response.compact_revision() > 0 {
                        tracing::warn!(
                            "fleet: revision {} was compacted away; reading every rule again",
                            self.cache.revision + 1
                        );
                        self.cache.revision = 0;
                        (_watcher, stream) = self.watch(&mut client).await?;
                        self.publish(&mut client, lease).await?;
                        continue;
                    }
                    if response.canceled() {
                        return Err(Error::Io {
                            what: format!("etcd cancelled the watch: {}", response.cancel_reason()),
                            source: std::io::ErrorKind::Other.into(),
                        });
                    }
                    if response.events().is_empty() {
                        continue;
                    }
                    let prefix = etcd.rules_prefix();
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                            continue;
                        };
                        match event.event_type() {
                            EventType::Put => {
                                let value = String::from_utf8_lossy(kv.value()).into_owned();
                                self.cache.rules.insert(name.to_owned(), value);
                            }
                            EventType::Delete => {
                                self.cache.rules.remove(name);
                            }
                        }
                        self.cache.revision = self.cache.revision.max(kv.mod_revision());
                    }
                    self.apply().await;
                    self.publish(&mut client, lease).await?;
                }
                _ = tick.tick() => {
                    keeper
                        .keep_alive()
                        .await
                        .map_err(|e| etcd_error("renewing the node's lease", e))?;
                    match tokio::time::timeout(TICK, renewals.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                        Ok(Ok(Some(_))) => {
                            return Err(Error::Io {
                                what: "the node's lease expired".into(),
                                source: std::io::ErrorKind::TimedOut.into(),
                            })
                        }
                        Ok(Err(e)) => return Err(etcd_error("renewing the node's lease", e)),
                        _ => {
                            return Err(Error::Io {
                                what: "etcd did not renew the node's lease".into(),
                                source: std::io::ErrorKind::TimedOut.into(),
                            })
                        }
                    }
                    // Repairs what changed beside the fleet: a fleet rule
                    // deleted by hand, a local rule that now clashes.
                    self.apply().await;
                    self.publish(&mut client, lease).await?;
                }
            }
        }
    }

    /// Starts watching the rules after the revision seen; with none (or a
    /// compacted one), reads them all first.
    async fn watch(
        &mut self,
        client: &mut Client,
    ) -> Result<(etcd_client::Watcher, WatchStream), Error> {
        let prefix = self.config.etcd.rules_prefix();
        if self.cache.revision > 0 {
            // etcd-client has read the "created" response; when the revision
            // was compacted away, the next response says so (see session).
            let watch = client
                .watch(
                    prefix.clone(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(self.cache.revision + 1),
                    ),
                )
                .await
                .map_err(|e| etcd_error("watching the rules", e))?;
            tracing::info!("fleet: resuming after revision {}", self.cache.revision);
            return Ok(watch);
        }
        let all = client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| etcd_error("reading the rules", e))?;
        let revision = all.header().map_or(0, |h| h.revision());
        let mut rules = BTreeMap::new();
        for kv in all.kvs() {
            if let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) {
                rules.insert(
                    name.to_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                );
            }
        }
        self.cache.rules = rules;
        self.cache.revision = revision;
        self.apply().await;
        client
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .map_err(|e| etcd_error("watching the rules", e))
    }

    /// Brings the kernel's fleet rules to the cached rules that select
    /// this node, then keeps the cache on disk.
    async fn apply(&mut self) {
        let (enforcer, cache, node, labels) = (
            self.enforcer.clone(),
            self.cache.clone(),
            self.config.node.clone(),
            self.config.labels.clone(),
        );
        let previous = self.applied.clone();
        let applied = tokio::task::spawn_blocking(move || {
            apply_rules(&enforcer, &cache, &node, &labels, &previous)
        })
        .await
        .unwrap_or_else(|e| Applied {
            error: Some(format!("applying the fleet rules: {e}")),
            ..Applied::default()
        });
        if let Some(e) = &applied.error {
            tracing::error!("fleet: {e}");
        }
        self.applied = applied;
        if self.saved.as_ref() != Some(&self.cache) {
            match self.cache.save(&self.config.cache) {
                Ok(()) => self.saved = Some(self.cache.clone()),
                Err(e) => tracing::warn!(
                    cache = %self.config.cache.display(),
                    "fleet: keeping the rules on disk: {e}"
                ),
            }
        }
    }

    /// Writes the node's status under the lease.
    async fn publish(&mut self, client: &mut Client, lease: i64) -> Result<(), Error> {
        let managed = match self.managed {
            Some((at, n)) if at.elapsed() < MANAGED_EVERY => Some(n),
            _ => None,
        };
        let (enforcer, node, labels, applied) = (
            self.enforcer.clone(),
            self.config.node.clone(),
            self.config.labels.clone(),
            self.applied.clone(),
        );
        let events = self.events.clone();
        let status = tokio::task::spawn_blocking(move || {
            status(&enforcer, node, labels, &applied, &events, managed)
        })
        .await
        .map_err(|e| Error::Io {
            what: format!("reading the node's status: {e}"),
            source: std::io::ErrorKind::Other.into(),
        })?;
        if managed.is_none() {
            self.managed = Some((Instant::now(), status.managed_connections));
        }
        client
            .put(
                self.config.etcd.node_key(&self.config.node),
                serde_json::to_string(&status).expect("plain data"),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| etcd_error("writing the node's status", e))?;
        Ok(())
    }
}
