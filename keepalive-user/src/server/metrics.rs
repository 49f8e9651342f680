//! Prometheus metrics: commands, events, webhook deliveries, batch sizes
//! and pass times, and the kernel's counters read at scrape time.
use super::*;

/// Prometheus metrics.
pub(super) struct Metrics {
    pub(super) registry: Registry,
    pub(super) commands: Family<Vec<(String, String)>, Counter>,
    pub(super) applied: Family<Vec<(String, String)>, Counter>,
    pub(super) errors: Family<Vec<(String, String)>, Counter>,
    pub(super) events: Family<Vec<(String, String)>, Counter>,
    pub(super) webhook: Family<Vec<(String, String)>, Counter>,
    pub(super) pass_seconds: Histogram,
    pub(super) batch_size: Histogram,
    /// Kernel counters are read at scrape time; these hold what was
    /// already added to the Prometheus counters.
    pub(super) seen_rule_applied: AtomicU64,
    pub(super) seen_kernel_dropped: AtomicU64,
    pub(super) seen_alerts_dropped: AtomicU64,
    pub(super) seen_index_full: AtomicU64,
    pub(super) seen_peer_overflows: AtomicU64,
    pub(super) seen_setsockopt_errors: AtomicU64,
    pub(super) seen_index_hits: AtomicU64,
    pub(super) seen_walks: AtomicU64,
    pub(super) lookups: Family<Vec<(String, String)>, Counter>,
    /// 1 while the sock_ops program runs on its cgroup, read at scrape.
    pub(super) attached: prometheus_client::metrics::gauge::Gauge,
    pub(super) reattached: Counter,
    pub(super) scrape: Mutex<()>,
}

pub(super) fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl Metrics {
    pub(super) fn new() -> Self {
        let mut registry = Registry::with_prefix("tcpka");
        let commands = Family::default();
        let applied = Family::default();
        let errors = Family::default();
        let events = Family::default();
        let webhook = Family::default();
        let pass_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
        );
        registry.register(
            "commands",
            "API commands by operation and result",
            commands.clone(),
        );
        registry.register(
            "connections_applied",
            "Connections given a policy, by source (rule or command)",
            applied.clone(),
        );
        registry.register("errors", "Errors by kind", errors.clone());
        let lookups = Family::default();
        registry.register(
            "lookups",
            "How commands found their connections: index (direct) or walk (socket table)",
            lookups.clone(),
        );
        registry.register("events", "Events from the kernel by kind", events.clone());
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries by outcome (delivered, retried, dropped)",
            webhook.clone(),
        );
        registry.register(
            "kernel_pass_seconds",
            "Time in the kernel per batch of enable/disable commands (and per query)",
            pass_seconds.clone(),
        );
        let batch_size = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 7),
        );
        registry.register(
            "batch_size",
            "Commands run together in one batch",
            batch_size.clone(),
        );
        let attached = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "attached",
            "1 while the sock_ops program is attached to its cgroup, 0 after the cgroup was removed",
            attached.clone(),
        );
        let reattached = Counter::default();
        registry.register(
            "reattached",
            "Times serve attached again to a recreated cgroup",
            reattached.clone(),
        );
        Self {
            registry,
            attached,
            reattached,
            commands,
            applied,
            errors,
            events,
            webhook,
            pass_seconds,
            batch_size,
            seen_rule_applied: AtomicU64::new(0),
            seen_kernel_dropped: AtomicU64::new(0),
            seen_alerts_dropped: AtomicU64::new(0),
            seen_index_full: AtomicU64::new(0),
            seen_peer_overflows: AtomicU64::new(0),
            seen_setsockopt_errors: AtomicU64::new(0),
            seen_index_hits: AtomicU64::new(0),
            seen_walks: AtomicU64::new(0),
            lookups,
            scrape: Mutex::new(()),
        }
    }

    pub(super) fn command(&self, op: &str, result: &str) {
        self.commands
            .get_or_create(&labels(&[("op", op), ("result", result)]))
            .inc();
    }

    pub(super) fn error(&self, kind: &str) {
        self.errors.get_or_create(&labels(&[("kind", kind)])).inc();
    }

    pub(super) fn webhook(&self, outcome: &str) {
        self.webhook
            .get_or_create(&labels(&[("outcome", outcome)]))
            .inc();
    }
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let enforcer = state.enforcer.clone();
    let (counters, attached) = tokio::task::spawn_blocking(move || {
        let attached = loader::installed(enforcer.layout())
            .ok()
            .flatten()
            .is_some_and(|i| i.attached);
        (enforcer.counters().ok(), attached)
    })
    .await
    .unwrap_or((None, false));
    let m = &state.metrics;
    m.attached.set(i64::from(attached));
    let mut text = String::new();
    {
        let _one = m.scrape.lock().expect("not poisoned");
        if let Some(c) = counters {
            let add = |seen: &AtomicU64, now: u64, counter: &Counter| {
                let before = seen.swap(now, Ordering::Relaxed);
                counter.inc_by(now.saturating_sub(before));
            };
            add(
                &m.seen_rule_applied,
                c.applied_by_rule,
                &m.applied.get_or_create(&labels(&[("source", "rule")])),
            );
            add(
                &m.seen_kernel_dropped,
                c.events_dropped,
                &m.errors
                    .get_or_create(&labels(&[("kind", "kernel_events_dropped")])),
            );
            add(
                &m.seen_index_full,
                c.index_full,
                &m.errors.get_or_create(&labels(&[("kind", "index_full")])),
            );
            add(
                &m.seen_peer_overflows,
                c.peer_overflows,
                &m.errors
                    .get_or_create(&labels(&[("kind", "index_peer_overflow")])),
            );
            add(
                &m.seen_alerts_dropped,
                c.alerts_dropped,
                &m.errors
                    .get_or_create(&labels(&[("kind", "kernel_alerts_dropped")])),
            );
            add(
                &m.seen_setsockopt_errors,
                c.setsockopt_errors,
                &m.errors.get_or_create(&labels(&[("kind", "setsockopt")])),
            );
        }
        let add = |seen: &AtomicU64, now: u64, counter: &Counter| {
            let before = seen.swap(now, Ordering::Relaxed);
            counter.inc_by(now.saturating_sub(before));
        };
        add(
            &m.seen_index_hits,
            crate::enforcer::INDEX_HITS.load(Ordering::Relaxed),
            &m.lookups.get_or_create(&labels(&[("path", "index")])),
        );
        add(
            &m.seen_walks,
            crate::enforcer::WALKS.load(Ordering::Relaxed),
            &m.lookups.get_or_create(&labels(&[("path", "walk")])),
        );
        if encode(&mut text, &m.registry).is_err() {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
