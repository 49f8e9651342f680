//! The agent inside `tcpka serve --etcd`: it keeps the kernel's fleet
//! rules equal to the etcd rules that select this node, and publishes the
//! node's status under a lease.
//!
//! Three parts run apart, so that none waits for another:
//! - the watch (a task) reads etcd's changes and hands them over;
//! - the applier (a thread of its own) takes every change handed over so
//!   far, plans it against its view of the kernel's table and applies what
//!   it touches ([`super::state`]);
//! - the lease keeper and the status writer (tasks) keep the node alive in
//!   etcd whatever the size of a change being applied.
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
        atomic::{AtomicI64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use etcd_client::{Client, EventType, PutOptions, WatchOptions, WatchStream};
use tokio::sync::Notify;

use super::{
    cache::Cache,
    etcd::read_prefix,
    etcd_error,
    state::{Verdicts, View},
    status::{status, Applied, EventCounts},
    EtcdOptions, NODE_TTL,
};
use crate::{enforcer::Enforcer, enforcer::FleetOp, Error};

/// What the agent needs to know.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub etcd: EtcdOptions,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// The rules last applied, kept across restarts.
    pub cache: PathBuf,
}

/// How often the lease is renewed.
const TICK: Duration = Duration::from_secs(3);
/// The status is written when it changes, not more often than this...
const STATUS_MIN: Duration = Duration::from_secs(1);
/// ... and at least this often.
const STATUS_MAX: Duration = Duration::from_secs(30);
/// The managed-connection count reads the whole connection map: not more
/// often than this.
const MANAGED_EVERY: Duration = Duration::from_secs(15);
/// The applier looks at the rule generation this often: a rule of the
/// host's own added or removed beside the fleet is seen within it.
const GENERATION_EVERY: Duration = Duration::from_secs(3);
/// ... and reads the whole table this often, whatever the generation says
/// (a table changed by other means than tcpka).
const REPAIR_EVERY: Duration = Duration::from_secs(60);
/// The cache is written at once after a change, then not again within
/// this while changes keep coming (a stream of 5,000 puts is not 5,000
/// writes of a growing file); the last of a stream is written when the
/// stream pauses for [`SAVE_AFTER`].
const SAVE_EVERY: Duration = Duration::from_secs(3);
const SAVE_AFTER: Duration = Duration::from_millis(300);
/// Live connections are reached this long after a stream of changes
/// pauses...
const REACH_AFTER: Duration = Duration::from_millis(20);
/// ... or this long into one that does not.
const REACH_WITHIN: Duration = Duration::from_millis(300);
/// A change of more ops than this is logged as one line of counts.
const LOG_EACH_UP_TO: usize = 20;

/// What the applier and the status writer share.
#[derive(Default)]
struct Shared {
    applied: Mutex<Applied>,
    changed: Notify,
}

/// What the watch hands to the applier.
pub(super) enum Input {
    /// Rules put (`Some`) or deleted (`None`), up to `revision`.
    Changes {
        revision: i64,
        changes: Vec<(String, Option<String>)>,
    },
    /// Every rule, as of `revision` (a full read).
    All {
        revision: i64,
        rules: BTreeMap<String, String>,
    },
    /// What putting (`Some`) or deleting (`None`) a rule would do to live
    /// connections: planned on a copy of the view, nothing changed.
    Preview {
        name: String,
        value: Option<String>,
        reply: super::preview::Answer,
    },
    /// The daemon stops: write the cache and end.
    Stop,
}

/// A running agent.
pub struct AgentHandle {
    tx: mpsc::Sender<Input>,
    applier: Option<std::thread::JoinHandle<()>>,
    etcd: tokio::task::JoinHandle<()>,
}

impl AgentHandle {
    /// Stops the agent: etcd is let go, and the applier writes the rules
    /// it has to the cache before it ends (blocking, briefly).
    pub fn stop(mut self) {
        self.etcd.abort();
        let _ = self.tx.send(Input::Stop);
        if let Some(t) = self.applier.take() {
            let _ = t.join();
        }
    }
}

/// Starts the agent: the applier thread and the etcd task, which run
/// until [`AgentHandle::stop`].
pub fn start(config: AgentConfig, enforcer: Enforcer, events: Arc<EventCounts>) -> AgentHandle {
    let prefix = config.etcd.prefix.clone();
    let cache = Cache::load(&config.cache, &prefix).unwrap_or(Cache {
        prefix,
        ..Cache::default()
    });
    let revision = Arc::new(AtomicI64::new(cache.revision));
    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::channel();
    let applier = {
        let (config, enforcer, shared) = (config.clone(), enforcer.clone(), shared.clone());
        std::thread::Builder::new()
            .name("tcpka-fleet".into())
            .spawn(move || Applier::new(config, enforcer, shared, cache).run(rx))
    };
    let applier = match applier {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!("fleet: cannot start the applier thread: {e}; no fleet rules");
            None
        }
    };
    let etcd = tokio::spawn(run(config, enforcer, events, shared, tx.clone(), revision));
    AgentHandle { tx, applier, etcd }
}

/// Follows etcd until the process ends, one session after another.
async fn run(
    config: AgentConfig,
    enforcer: Enforcer,
    events: Arc<EventCounts>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Input>,
    revision: Arc<AtomicI64>,
) {
    let mut member = 0;
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let mut session = Session {
            config: config.clone(),
            enforcer: enforcer.clone(),
            events: events.clone(),
            shared: shared.clone(),
            tx: tx.clone(),
            revision: revision.clone(),
            member,
        };
        // A session in a task of its own: a panic in it (the etcd
        // client's) ends that session, not the agent.
        let ended = tokio::spawn(async move {
            let r = session.run().await;
            (session.member, r)
        })
        .await;
        match ended {
            Ok((m, Ok(()))) => member = m,
            Ok((m, Err(e))) => {
                member = m;
                tracing::warn!(
                    "fleet: {}; enforcement goes on with the rules of revision {}",
                    crate::one_line(&e),
                    revision.load(Ordering::Relaxed)
                );
            }
            Err(e) => tracing::error!("fleet: the etcd session failed ({e}); starting again"),
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(crate::jitter(backoff)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection to etcd.
struct Session {
    config: AgentConfig,
    enforcer: Enforcer,
    events: Arc<EventCounts>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Input>,
    /// The last revision handed to the applier.
    revision: Arc<AtomicI64>,
    /// The member last connected to: tried first next time.
    member: usize,
}

/// Aborts a task when dropped: a session's helpers end with it.
struct Guard(tokio::task::JoinHandle<Error>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Session {
    async fn run(&mut self) -> Result<(), Error> {
        let etcd = self.config.etcd.clone();
        let (mut client, member) = etcd.connect_from(self.member).await?;
        self.member = member;
        let lease = client
            .lease_grant(NODE_TTL.as_secs() as i64, None)
            .await
            .map_err(|e| etcd_error("granting the node's lease", e))?
            .id();
        let mut keeper = Guard(tokio::spawn(keep_lease(client.clone(), lease)));
        let known = serde_json::json!({ "labels": self.config.labels }).to_string();
        client
            .put(etcd.known_key(&self.config.node), known, None)
            .await
            .map_err(|e| etcd_error("writing the node's labels", e))?;
        let mut writer = Guard(tokio::spawn(write_status(
            client.clone(),
            lease,
            etcd.node_key(&self.config.node),
            self.config.clone(),
            self.enforcer.clone(),
            self.events.clone(),
            self.shared.clone(),
        )));
        let mut previews = Guard(tokio::spawn(super::preview::answer(
            client.clone(),
            etcd.previews_prefix(),
            self.config.node.clone(),
            self.tx.clone(),
        )));
        let mut stream = self.watch(&mut client).await?;
        tracing::info!(
            node = %self.config.node,
            revision = self.revision.load(Ordering::Relaxed),
            "fleet: connected to etcd at {}, watching {}",
            etcd.endpoints[member],
            etcd.rules_prefix()
        );
        let prefix = etcd.rules_prefix();
        loop {
            tokio::select! {
                message = stream.message() => {
                    let response = message
                        .map_err(|e| etcd_error("watching the rules", e))?
                        .ok_or_else(|| Error::Etcd {
                            what: "watching the rules".into(),
                            why: "the watch ended".into(),
                            transient: true,
                        })?;
                    if response.compact_revision() > 0 {
                        tracing::warn!(
                            "fleet: revision {} was compacted away; reading every rule again",
                            self.revision.load(Ordering::Relaxed) + 1
                        );
                        self.revision.store(0, Ordering::Relaxed);
                        stream = self.watch(&mut client).await?;
                        continue;
                    }
                    if response.canceled() {
                        return Err(Error::Etcd {
                            what: "watching the rules".into(),
                            why: format!("etcd cancelled the watch: {}", response.cancel_reason()),
                            transient: true,
                        });
                    }
                    let mut changes = Vec::with_capacity(response.events().len());
                    let mut revision = self.revision.load(Ordering::Relaxed);
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        revision = revision.max(kv.mod_revision());
                        let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                            continue;
                        };
                        changes.push((
                            name.to_owned(),
                            match event.event_type() {
                                EventType::Put => Some(String::from_utf8_lossy(kv.value()).into_owned()),
                                EventType::Delete => None,
                            },
                        ));
                    }
                    if changes.is_empty() {
                        continue;
                    }
                    self.hand_over(Input::Changes { revision, changes })?;
                    self.revision.store(revision, Ordering::Relaxed);
                }
                e = &mut keeper.0 => return Err(e.unwrap_or_else(|e| lost("keeping the node's lease", e))),
                e = &mut writer.0 => return Err(e.unwrap_or_else(|e| lost("writing the node's status", e))),
                e = &mut previews.0 => return Err(e.unwrap_or_else(|e| lost("answering previews", e))),
            }
        }
    }

    fn hand_over(&self, input: Input) -> Result<(), Error> {
        self.tx.send(input).map_err(|_| Error::Etcd {
            what: "handing rules to the applier".into(),
            why: "the applier thread has ended".into(),
            transient: false,
        })
    }

    /// Starts watching the rules after the revision seen; with none (or a
    /// compacted one), reads them all first, in pages.
    async fn watch(&mut self, client: &mut Client) -> Result<WatchStream, Error> {
        let prefix = self.config.etcd.rules_prefix();
        let mut revision = self.revision.load(Ordering::Relaxed);
        if revision > 0 {
            tracing::info!("fleet: resuming after revision {revision}");
        } else {
            let (all, at) = read_prefix(client, &prefix, "reading the rules").await?;
            let rules = all
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                .collect();
            self.hand_over(Input::All {
                revision: at,
                rules,
            })?;
            self.revision.store(at, Ordering::Relaxed);
            revision = at;
        }
        // etcd-client has read the "created" response; when the revision
        // was compacted away, the next response says so (see run).
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
}

fn lost(what: &str, e: tokio::task::JoinError) -> Error {
    Error::Etcd {
        what: what.into(),
        why: format!("the task ended: {e}"),
        transient: true,
    }
}

/// Renews the node's lease every [`TICK`] until that fails; returns why.
async fn keep_lease(mut client: Client, lease: i64) -> Error {
    let what = "renewing the node's lease";
    let (mut keeper, mut renewals) = match client.lease_keep_alive(lease).await {
        Ok(k) => k,
        Err(e) => return etcd_error(what, e),
    };
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        if let Err(e) = keeper.keep_alive().await {
            return etcd_error(what, e);
        }
        match tokio::time::timeout(TICK, renewals.message()).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
            Ok(Ok(_)) => {
                return Error::Etcd {
                    what: what.into(),
                    why: "the lease expired".into(),
                    transient: true,
                }
            }
            Ok(Err(e)) => return etcd_error(what, e),
            Err(_) => {
                return Error::Etcd {
                    what: what.into(),
                    why: format!("no answer within {} s", TICK.as_secs()),
                    transient: true,
                }
            }
        }
    }
}

/// Writes the node's status under the lease when it changes (at most every
/// [`STATUS_MIN`]) and at least every [`STATUS_MAX`]; returns why it
/// could not.
async fn write_status(
    mut client: Client,
    lease: i64,
    key: String,
    config: AgentConfig,
    enforcer: Enforcer,
    events: Arc<EventCounts>,
    shared: Arc<Shared>,
) -> Error {
    let mut managed: Option<(Instant, usize)> = None;
    let mut last: Option<(Instant, super::NodeStatus)> = None;
    loop {
        let fresh = managed
            .filter(|(at, _)| at.elapsed() < MANAGED_EVERY)
            .map(|(_, n)| n);
        let (enforcer, node, labels, events) = (
            enforcer.clone(),
            config.node.clone(),
            config.labels.clone(),
            events.clone(),
        );
        let applied = shared.applied.lock().expect("not poisoned").clone();
        let s = match tokio::task::spawn_blocking(move || {
            status(&enforcer, node, labels, &applied, &events, fresh)
        })
        .await
        {
            Ok(s) => s,
            Err(e) => return lost("reading the node's status", e),
        };
        if fresh.is_none() {
            managed = Some((Instant::now(), s.managed_connections));
        }
        let same = last.as_ref().is_some_and(|(at, l)| {
            at.elapsed() < STATUS_MAX
                && super::NodeStatus {
                    updated: String::new(),
                    ..l.clone()
                } == super::NodeStatus {
                    updated: String::new(),
                    ..s.clone()
                }
        });
        if !same {
            let body = serde_json::to_string(&s).expect("plain data");
            if let Err(e) = client
                .put(key.clone(), body, Some(PutOptions::new().with_lease(lease)))
                .await
            {
                return etcd_error("writing the node's status", e);
            }
            last = Some((Instant::now(), s));
        }
        tokio::time::sleep(STATUS_MIN).await;
        let _ = tokio::time::timeout(TICK, shared.changed.notified()).await;
    }
}

/// The applier: owns the view and the kernel's fleet rules.
struct Applier {
    config: AgentConfig,
    enforcer: Enforcer,
    shared: Arc<Shared>,
    view: View,
    revision: i64,
    /// The rule generation the view was read at; `None`: read it again.
    generation: Option<u32>,
    read_at: Instant,
    /// Rules were removed since the port filter was last narrowed.
    narrow: bool,
    /// The cache on disk is behind.
    dirty: bool,
    saved_at: Option<Instant>,
    last_input: Instant,
    /// When the first change not yet applied was handed over.
    received: Option<Instant>,
    /// Live connections the last change gave new values, and all changes.
    live: (usize, u64),
    /// Keys of rules changed since live connections were last reached, and
    /// since when.
    reach_keys: Vec<(u32, keepalive_common::rules::RuleKey)>,
    reach_since: Option<Instant>,
    /// Previews asked, answered after the next apply.
    previews: Vec<(String, Option<String>, super::preview::Answer)>,
    previous: Verdicts,
}

impl Applier {
    fn new(config: AgentConfig, enforcer: Enforcer, shared: Arc<Shared>, cache: Cache) -> Self {
        let mut view = View::new(&config.node, &config.labels);
        let revision = cache.revision;
        let cached = cache.rules.len();
        view.reset(cache.rules);
        if revision > 0 {
            tracing::info!(
                cache = %config.cache.display(),
                revision,
                "fleet: applying the {cached} cached rule(s) before etcd answers",
            );
        }
        Self {
            config,
            enforcer,
            shared,
            view,
            revision,
            generation: None,
            read_at: Instant::now(),
            narrow: false,
            dirty: false,
            saved_at: None,
            received: None,
            live: (0, 0),
            reach_keys: Vec::new(),
            reach_since: None,
            previews: Vec::new(),
            last_input: Instant::now(),
            previous: Verdicts::default(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Input>) {
        if self.revision > 0 {
            self.apply();
        }
        let mut checked = Instant::now();
        loop {
            let mut wait = GENERATION_EVERY.saturating_sub(checked.elapsed());
            if self.dirty {
                wait = wait.min(SAVE_AFTER / 3);
            }
            if self.reach_since.is_some() {
                wait = wait.min(REACH_AFTER);
            }
            match rx.recv_timeout(wait) {
                Ok(Input::Stop) => break,
                Ok(input) => {
                    self.take(input);
                    while let Ok(more) = rx.try_recv() {
                        if matches!(more, Input::Stop) {
                            self.apply();
                            self.reach();
                            self.saved_at = None;
                            self.save();
                            return;
                        }
                        self.take(more);
                    }
                    self.apply();
                    self.answer_previews();
                    checked = Instant::now();
                    // A stream that does not pause is reached now and then.
                    if self
                        .reach_since
                        .is_some_and(|at| at.elapsed() >= REACH_WITHIN)
                    {
                        self.reach();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.reach();
                    if checked.elapsed() >= GENERATION_EVERY {
                        checked = Instant::now();
                        self.apply();
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.save();
        }
        self.saved_at = None;
        self.save();
    }

    /// Gives the live connections the changed rules match what the rules
    /// now decide for them: one walk of the namespace's sockets for every
    /// change since the last.
    fn reach(&mut self) {
        if self.reach_since.take().is_none() {
            return;
        }
        let mut keys = std::mem::take(&mut self.reach_keys);
        keys.sort_by(|a, b| {
            (a.0, a.1.local_port, a.1.remote_port, a.1.addr).cmp(&(
                b.0,
                b.1.local_port,
                b.1.remote_port,
                b.1.addr,
            ))
        });
        keys.dedup();
        match self
            .enforcer
            .reach(&keys, crate::enforcer::Reach::default())
        {
            Ok(r) => {
                self.live = (r.changed, self.live.1 + r.changed as u64);
                if r.changed > 0 || r.failed > 0 {
                    tracing::info!(
                        revision = self.revision,
                        live = r.changed,
                        "fleet: {} live connection(s) given the values the rules now decide ({} refused a value)",
                        r.changed,
                        r.failed
                    );
                }
                let mut applied = self.shared.applied.lock().expect("not poisoned");
                (applied.live_changed_last, applied.live_changed_total) = self.live;
                drop(applied);
                self.shared.changed.notify_one();
            }
            Err(e) => tracing::warn!(
                "fleet: live connections not reached (new connections get the change): {}",
                crate::one_line(&e)
            ),
        }
    }

    fn take(&mut self, input: Input) {
        if let Input::Preview { name, value, reply } = input {
            // Answered once what came before it is applied.
            self.previews.push((name, value, reply));
            return;
        }
        self.last_input = Instant::now();
        self.received.get_or_insert(self.last_input);
        self.dirty = true;
        match input {
            Input::Changes { revision, changes } => {
                for (name, value) in changes {
                    self.view.set(&name, value);
                }
                self.revision = self.revision.max(revision);
            }
            Input::All { revision, rules } => {
                self.view.reset(rules);
                self.revision = revision;
            }
            Input::Stop | Input::Preview { .. } => {}
        }
    }

    /// Answers the previews asked: each change planned on a copy of the
    /// view, the kernel's rules iterator run in a preview pass.
    fn answer_previews(&mut self) {
        for (name, value, reply) in std::mem::take(&mut self.previews) {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.preview(&name, value)
            }))
            .unwrap_or_else(|_| Err("internal error".into()));
            let _ = reply.send(outcome);
        }
    }

    fn preview(
        &self,
        name: &str,
        value: Option<String>,
    ) -> Result<crate::enforcer::Reached, String> {
        let mut view = self.view.clone();
        view.set(name, value);
        let plan = view.plan();
        let mut after = self
            .enforcer
            .rules()
            .map_err(|e| format!("reading the installed rules: {}", crate::one_line(&e)))?;
        let as_rule = |id: u32, r: &crate::config::NamedRule| crate::rule::Rule {
            new_only: r.new_only,
            name: Some(format!("{}{}", crate::config::FLEET_PREFIX, r.name)),
            ..crate::rule::Rule::new(id, r.matcher, r.policy, r.tracked)
        };
        let (mut gone, mut new) = (Vec::new(), Vec::new());
        let mut next = crate::enforcer::PREVIEW_ID;
        for op in &plan.ops {
            match op {
                FleetOp::Remove { id, .. } => {
                    if let Some(i) = after.iter().position(|r| r.id == *id) {
                        gone.push(after.remove(i));
                    }
                }
                FleetOp::Replace { id, rule } => {
                    if let Some(i) = after.iter().position(|r| r.id == *id) {
                        gone.push(after[i].clone());
                        after[i] = as_rule(*id, rule);
                        new.push(after[i].clone());
                    }
                }
                FleetOp::Add(rule) => {
                    let r = as_rule(next, rule);
                    next += 1;
                    after.push(r.clone());
                    new.push(r);
                }
            }
        }
        self.enforcer
            .preview(&gone, &new, &after)
            .map_err(|e| crate::one_line(&e))
    }

    /// Reads the kernel's table when it may have changed beside the view,
    /// plans, and applies the plan. A panic here (a bug) is caught: the
    /// view is read again next time.
    fn apply(&mut self) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply_inner()));
        if outcome.is_err() {
            self.failed("applying the fleet rules: internal error".into());
        }
    }

    /// The view may be wrong: read the kernel's table next time, and keep
    /// the last status with this error.
    fn failed(&mut self, error: String) {
        self.generation = None;
        self.publish(Some(error));
    }

    /// [`Self::apply`] without its guard: refreshes the view, applies the
    /// plan, and publishes the outcome.
    fn apply_inner(&mut self) {
        let started = self.received.take().unwrap_or_else(Instant::now);
        if let Err(e) = self.refresh_view() {
            return self.failed(e);
        }
        let plan = self.view.plan();
        let mut error = None;
        if !plan.ops.is_empty() {
            error = self.apply_plan(&plan.ops, started);
        }
        self.record_applied(plan.verdicts, error);
    }

    /// Reads the installed rules into the view when the table changed
    /// under it (or it is due for repair), then narrows the rule port
    /// filter if removals asked for it (a failure there is only logged).
    /// On failure, why (for [`Self::failed`]); the view is left as it was.
    fn refresh_view(&mut self) -> Result<(), String> {
        let generation = match self.enforcer.rule_generation() {
            Ok(g) => g,
            Err(e) => {
                return Err(format!(
                    "reading the rule generation: {}",
                    crate::one_line(&e)
                ));
            }
        };
        if self.generation != Some(generation) || self.read_at.elapsed() > REPAIR_EVERY {
            match self.enforcer.rules_with_generation() {
                Ok((rules, g)) => {
                    self.view.refresh(&rules);
                    self.generation = Some(g);
                    self.read_at = Instant::now();
                }
                Err(e) => {
                    return Err(format!(
                        "reading the installed rules: {}",
                        crate::one_line(&e)
                    ));
                }
            }
            if self.narrow {
                match self.enforcer.narrow_rule_filter() {
                    Ok(()) => self.narrow = false,
                    Err(e) => tracing::warn!(
                        "fleet: narrowing the rule port filter: {}",
                        crate::one_line(&e)
                    ),
                }
            }
        }
        Ok(())
    }

    /// Applies the plan's changes in one batch, records their results in
    /// the view, and gathers the keys of the live connections to reach.
    /// Returns the error to report, if any change (or the batch) failed;
    /// the view is then read from the kernel next time.
    fn apply_plan(&mut self, ops: &[FleetOp], started: Instant) -> Option<String> {
        let mut error = None;
        match self.enforcer.fleet_batch(ops, self.view.min_id()) {
            Ok(results) => {
                // Live connections are reached once a stream of changes
                // pauses (see `reach`): one pass for many changes.
                // A rule for new connections only reaches none.
                for (op, r) in ops.iter().zip(&results) {
                    if r.is_err() {
                        continue;
                    }
                    match op {
                        FleetOp::Remove {
                            matcher, new_only, ..
                        } if !new_only => self.reach_keys.push(matcher.key()),
                        FleetOp::Replace { rule, .. } | FleetOp::Add(rule) if !rule.new_only => {
                            self.reach_keys.push(rule.matcher.key())
                        }
                        _ => {}
                    }
                }
                self.reach_since.get_or_insert_with(Instant::now);
                let failures = self.view.record(ops, &results);
                self.narrow |= ops
                    .iter()
                    .zip(&results)
                    .any(|(o, r)| matches!(o, FleetOp::Remove { .. }) && r.is_ok());
                self.log_ops(ops, &results, started);
                if !failures.is_empty() {
                    // The view may be wrong: read the table next time.
                    self.generation = None;
                    error = Some(format!(
                        "{} of {} change(s) of revision {} failed: {}",
                        failures.len(),
                        ops.len(),
                        self.revision,
                        failures.join("; ")
                    ));
                }
            }
            Err(e) => {
                self.generation = None;
                error = Some(format!(
                    "applying the fleet rules of revision {}: {}",
                    self.revision,
                    crate::one_line(&e)
                ));
            }
        }
        error
    }

    /// Reports the verdicts that changed, and publishes what this revision
    /// applied (with `error`, logged) for the node status.
    fn record_applied(&mut self, verdicts: Verdicts, error: Option<String>) {
        self.report(&verdicts);
        self.previous = verdicts.clone();
        let (fleet_rules, rules) = self.view.counts();
        *self.shared.applied.lock().expect("not poisoned") = Applied {
            revision: self.revision,
            fleet_rules,
            rules,
            verdicts,
            error: error.clone(),
            live_changed_last: self.live.0,
            live_changed_total: self.live.1,
        };
        if let Some(e) = &error {
            tracing::error!("fleet: {e}");
        }
        self.shared.changed.notify_one();
    }

    /// Keeps the last status, with a new error.
    fn publish(&mut self, error: Option<String>) {
        if let Some(e) = &error {
            tracing::error!("fleet: {e}");
        }
        self.shared.applied.lock().expect("not poisoned").error = error;
        self.shared.changed.notify_one();
    }

    /// Logs what changed, with the revision and how long it took from the
    /// watch handing it over to the kernel having it (`took_us`).
    fn log_ops(&self, ops: &[FleetOp], results: &[Result<u32, Error>], started: Instant) {
        let revision = self.revision;
        let took_us = started.elapsed().as_micros() as u64;
        if ops.len() <= LOG_EACH_UP_TO {
            for (op, r) in ops.iter().zip(results) {
                if r.is_err() {
                    continue;
                }
                match op {
                    FleetOp::Add(rule) => {
                        tracing::info!(revision, took_us, "fleet: added rule @{}", rule.name)
                    }
                    FleetOp::Replace { id, rule } => tracing::info!(
                        revision,
                        took_us,
                        "fleet: changed rule {id} (@{})",
                        rule.name
                    ),
                    FleetOp::Remove { id, .. } => {
                        tracing::info!(revision, took_us, "fleet: removed rule {id}")
                    }
                }
            }
            return;
        }
        let count = |f: fn(&FleetOp) -> bool| {
            ops.iter()
                .zip(results)
                .filter(|(o, r)| f(o) && r.is_ok())
                .count()
        };
        tracing::info!(
            revision,
            took_us,
            "fleet: {} rule(s) added, {} changed, {} removed",
            count(|o| matches!(o, FleetOp::Add(_))),
            count(|o| matches!(o, FleetOp::Replace { .. })),
            count(|o| matches!(o, FleetOp::Remove { .. })),
        );
    }

    /// Logs what is newly skipped, once each.
    fn report(&self, v: &Verdicts) {
        for m in v
            .invalid
            .iter()
            .filter(|m| !self.previous.invalid.contains(m))
        {
            tracing::warn!("fleet: rule skipped, malformed: {m}");
        }
        for m in v
            .clashes
            .iter()
            .filter(|m| !self.previous.clashes.contains(m))
        {
            tracing::warn!("fleet: rule skipped, the local rule wins: {m}");
        }
        if v.left_out != self.previous.left_out && !v.left_out.is_empty() {
            let first: Vec<&str> = v.left_out.iter().take(5).map(String::as_str).collect();
            tracing::warn!(
                "fleet: {} selected rule(s) left out: the kernel's rule table holds {} fleet rule(s) beside this host's own (most specific first, then by name); left out first: {}",
                v.left_out.len(),
                v.capacity,
                first.join(", ")
            );
        } else if v.left_out.is_empty() && !self.previous.left_out.is_empty() {
            tracing::info!("fleet: every selected rule fits in the kernel's rule table again");
        }
    }

    /// Writes the cache when it is behind: at once after a quiet while,
    /// else every [`SAVE_EVERY`] and when the changes pause.
    fn save(&mut self) {
        if !self.dirty {
            return;
        }
        let quiet = self.saved_at.is_none_or(|at| at.elapsed() >= SAVE_EVERY);
        let paused = self.last_input.elapsed() >= SAVE_AFTER
            && self.saved_at.is_none_or(|at| self.last_input > at);
        if !quiet && !paused {
            return;
        }
        let cache = Cache {
            prefix: self.config.etcd.prefix.clone(),
            revision: self.revision,
            rules: self.view.rules.clone(),
        };
        self.saved_at = Some(Instant::now());
        match cache.save(&self.config.cache) {
            Ok(()) => self.dirty = false,
            // Tried again in SAVE_EVERY, not in a loop.
            Err(e) => tracing::warn!(
                cache = %self.config.cache.display(),
                "fleet: keeping the rules on disk: {e}"
            ),
        }
    }
}
