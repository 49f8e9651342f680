//! Prometheus metrics: commands, events, webhook deliveries, batch sizes
//! and pass times, counted here; the kernel's counters, the lookups and
//! the attachment, read when scraped (a [`Collector`]).
use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
        MetricType,
    },
    registry::Registry,
};

use super::AppState;
use crate::{enforcer::Enforcer, feed::Message, loader};

/// The API operations, as counted in `tcpka_command_errors_total{op}`.
pub(super) const API_OPS: [&str; 7] = [
    "enable",
    "disable",
    "close",
    "status",
    "rule_list",
    "rule_add",
    "rule_del",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OpResult {
    pub(super) op: &'static str,
    pub(super) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct Kind {
    pub(super) kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct Delivery {
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Source {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Table {
    table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Path {
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: &'static str,
    layout: String,
}

/// Prometheus metrics.
pub(super) struct Metrics {
    pub(super) registry: Registry,
    pub(super) commands: Family<OpResult, Counter>,
    pub(super) events: Family<Kind, Counter>,
    pub(super) webhook: Family<Delivery, Counter>,
    pub(super) pass_seconds: Histogram,
    pub(super) batch_size: Histogram,
    pub(super) reattached: Counter,
    /// Read by [`Scraped`], which writes the families they share with the
    /// kernel's counters.
    pub(super) applied_by_command: Counter,
    op_errors: Family<Kind, Counter>,
    at_risk: Family<Reason, Counter>,
    recovered: Family<Reason, Counter>,
    detection_seconds: Histogram,
}

/// What is read when scraped: the kernel's counters (rules applied,
/// events and alerts dropped, a full index, setsockopt failures), how
/// commands found their connections, and whether sock_ops is attached.
/// `tcpka_connections_applied_total` mixes these with what serve counts
/// itself.
#[derive(Debug)]
struct Scraped {
    enforcer: Enforcer,
    applied_by_command: Counter,
    op_errors: Family<Kind, Counter>,
}

fn counter<S: EncodeLabelSet>(
    family: &mut prometheus_client::encoding::MetricEncoder,
    labels: &S,
    value: u64,
) -> std::fmt::Result {
    ConstCounter::new(value).encode(family.encode_family(labels)?)
}

impl Collector for Scraped {
    /// Runs where scraping may block (the map reads are system calls).
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let kernel = self.enforcer.counters().ok();
        let attached = loader::installed(self.enforcer.layout())
            .ok()
            .flatten()
            .is_some_and(|i| i.attached);

        self.encode_applied(&mut encoder, kernel.as_ref())?;
        self.encode_command_errors(&mut encoder)?;
        encode_kernel_errors(&mut encoder, kernel.as_ref())?;
        encode_log_lines_lost(&mut encoder)?;
        self.encode_lookups(&mut encoder)?;
        self.encode_tables(&mut encoder)?;
        encode_build(&mut encoder)?;
        encode_attached(&mut encoder, attached)
    }
}

impl Scraped {
    /// `connections_applied`: by rule (when the kernel's counters could be
    /// read) and by command.
    fn encode_applied(
        &self,
        encoder: &mut DescriptorEncoder,
        kernel: Option<&crate::enforcer::Counters>,
    ) -> std::fmt::Result {
        let mut f = encoder.encode_descriptor(
            "connections_applied",
            "Connections given a policy, by source (rule or command)",
            None,
            MetricType::Counter,
        )?;
        if let Some(k) = kernel {
            counter(&mut f, &Source { source: "rule" }, k.applied_by_rule)?;
        }
        let by_command = self.applied_by_command.get();
        counter(&mut f, &Source { source: "command" }, by_command)
    }

    /// `command_errors`: one sample for each API operation.
    fn encode_command_errors(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut f = encoder.encode_descriptor(
            "command_errors",
            "API commands that failed on serve's side (not refused input), by operation",
            None,
            MetricType::Counter,
        )?;
        for op in API_OPS {
            let c = self
                .op_errors
                .get(&Kind { kind: op })
                .map_or(0, |c| c.get());
            counter(&mut f, &Op { op }, c)?;
        }
        Ok(())
    }

    /// `lookups`: how commands found their connections.
    fn encode_lookups(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let (index, walks) = self.enforcer.lookups();
        let mut f = encoder.encode_descriptor(
            "lookups",
            "How commands found their connections: index (direct) or walk (socket table)",
            None,
            MetricType::Counter,
        )?;
        counter(&mut f, &Path { path: "index" }, index)?;
        counter(&mut f, &Path { path: "walk" }, walks)
    }

    /// `table_entries` and `table_capacity`: how full each kernel table
    /// is; a table whose figure cannot be read is left out.
    fn encode_tables(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        // How full each kernel table is: used and most, per table.
        let layout = self.enforcer.layout();
        let cap = |name: &str| crate::pinned::capacity(layout, name).ok().map(i64::from);
        let tables: [(&'static str, Option<i64>, Option<i64>); 4] = [
            (
                "connections",
                self.enforcer.managed().ok().map(|m| m.len() as i64),
                cap(keepalive_common::maps::CONNS),
            ),
            (
                "holders",
                crate::holders::total(layout).ok().map(|n| n as i64),
                cap(keepalive_common::maps::HOLDERS),
            ),
            (
                "index",
                crate::index::state(layout).ok().map(|s| s.entries as i64),
                cap(keepalive_common::maps::PEERS),
            ),
            (
                "rules",
                self.enforcer.rules().ok().map(|r| r.len() as i64),
                Some(i64::from(keepalive_common::RULES_MAX_ENTRIES)),
            ),
        ];
        for (name, help, pick) in [
            (
                "table_entries",
                "Entries in each kernel table (connections, holders, index, rules)",
                0,
            ),
            (
                "table_capacity",
                "Most entries each kernel table holds; past it, what does not fit is refused and counted in tcpka_kernel_errors_total",
                1,
            ),
        ] {
            let mut f = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (table, used, max) in tables {
                let v = if pick == 0 { used } else { max };
                if let Some(v) = v {
                    ConstGauge::new(v).encode(f.encode_family(&Table { table })?)?;
                }
            }
        }
        Ok(())
    }
}

/// `kernel_errors`: what the kernel side could not do, by kind (none when
/// its counters could not be read).
fn encode_kernel_errors(
    encoder: &mut DescriptorEncoder,
    kernel: Option<&crate::enforcer::Counters>,
) -> std::fmt::Result {
    let mut f = encoder.encode_descriptor(
        "kernel_errors",
        "What the kernel side could not do, by kind: events or alerts dropped (a ring full), a table full, a bpf_setsockopt refused",
        None,
        MetricType::Counter,
    )?;
    if let Some(k) = kernel {
        for (kind, value) in [
            ("kernel_events_dropped", k.events_dropped),
            ("kernel_alerts_dropped", k.alerts_dropped),
            ("index_full", k.index_full),
            ("connection_map_full", k.conns_map_full),
            ("index_peer_overflow", k.peer_overflows),
            ("setsockopt", k.setsockopt_errors),
        ] {
            counter(&mut f, &Kind { kind }, value)?;
        }
    }
    Ok(())
}

/// `log_lines_lost`: dropped and left out.
fn encode_log_lines_lost(encoder: &mut DescriptorEncoder) -> std::fmt::Result {
    let mut f = encoder.encode_descriptor(
        "log_lines_lost",
        "Log lines not written: dropped (stderr or the journal fell behind) or left out (more than 20 a second of one kind; each second's count is logged)",
        None,
        MetricType::Counter,
    )?;
    counter(
        &mut f,
        &Outcome { outcome: "dropped" },
        crate::logs::dropped_lines(),
    )?;
    counter(
        &mut f,
        &Outcome {
            outcome: "left_out",
        },
        crate::logs::THROTTLE.suppressed(),
    )
}

/// `build`: tcpka's version and its layout, as labels.
fn encode_build(encoder: &mut DescriptorEncoder) -> std::fmt::Result {
    let f = encoder.encode_descriptor(
        "build",
        "1, labelled with tcpka's version and the layout of its maps and programs",
        None,
        MetricType::Info,
    )?;
    prometheus_client::metrics::info::Info::new(Build {
        version: env!("CARGO_PKG_VERSION"),
        layout: keepalive_common::meta::LAYOUT_VERSION.to_string(),
    })
    .encode(f)
}

/// `attached`: 1 while sock_ops is attached to its cgroup, else 0.
fn encode_attached(encoder: &mut DescriptorEncoder, attached: bool) -> std::fmt::Result {
    let f = encoder.encode_descriptor(
        "attached",
        "1 while the sock_ops program is attached to its cgroup, 0 after the cgroup was removed",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(i64::from(attached)).encode(f)
}

impl Metrics {
    pub(super) fn new(enforcer: &Enforcer) -> Self {
        let mut registry = Registry::with_prefix("tcpka");
        let commands = Family::default();
        let events = Family::default();
        let webhook = Family::default();
        registry.register(
            "commands",
            "API commands by operation and result",
            commands.clone(),
        );
        registry.register("events", "Events from the kernel by kind", events.clone());
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries by outcome (delivered, retried, dropped)",
            webhook.clone(),
        );
        let pass_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
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
        let reattached = Counter::default();
        registry.register(
            "reattached",
            "Times serve attached again to a recreated cgroup",
            reattached.clone(),
        );
        let applied_by_command = Counter::default();
        let op_errors = Family::default();
        let (at_risk, recovered) = (Family::<Reason, Counter>::default(), Family::default());
        for reason in crate::risk::reason_names() {
            let _ = at_risk.get_or_create(&Reason { reason });
            let _ = recovered.get_or_create(&Reason { reason });
        }
        registry.register(
            "at_risk",
            "at_risk events: a watched connection showed trouble, by reason",
            at_risk.clone(),
        );
        registry.register(
            "recovered",
            "recovered events: the trouble of an at_risk event ended, by reason",
            recovered.clone(),
        );
        let detection_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.5, 2.0, 14),
        );
        registry.register(
            "detection_seconds",
            "From the peer's last acknowledgement to the timeout event, per timed-out connection",
            detection_seconds.clone(),
        );

        registry.register_collector(Box::new(Scraped {
            enforcer: enforcer.clone(),
            applied_by_command: applied_by_command.clone(),
            op_errors: op_errors.clone(),
        }));
        Self {
            registry,
            commands,
            events,
            webhook,
            pass_seconds,
            batch_size,
            reattached,
            applied_by_command,
            op_errors,
            at_risk,
            recovered,
            detection_seconds,
        }
    }

    pub(super) fn command(&self, op: &'static str, result: &'static str) {
        self.commands.get_or_create(&OpResult { op, result }).inc();
    }

    /// A server-side failure of an API operation (one of [`API_OPS`]).
    pub(super) fn error(&self, op: &'static str) {
        debug_assert!(API_OPS.contains(&op), "{op} is not in API_OPS");
        self.op_errors.get_or_create(&Kind { kind: op }).inc();
    }

    /// One message of the event feed: counted by kind; `at_risk` and
    /// `recovered` by reason; a timeout's detection time observed.
    pub(super) fn event(&self, m: &Message) {
        let kind = m.kind();
        self.events.get_or_create(&Kind { kind }).inc();
        let Message::Event(r) = m else {
            return;
        };
        match (r.kind, r.reason, r.ack_age_ms) {
            ("at_risk", Some(reason), _) => {
                self.at_risk.get_or_create(&Reason { reason }).inc();
            }
            ("recovered", Some(reason), _) => {
                self.recovered.get_or_create(&Reason { reason }).inc();
            }
            ("timeout", _, Some(ms)) => self.detection_seconds.observe(f64::from(ms) / 1000.0),
            _ => {}
        }
    }

    pub(super) fn webhook(&self, outcome: &'static str) {
        self.webhook.get_or_create(&Delivery { outcome }).inc();
    }
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let m = state.metrics.clone();
    // The collector reads the kernel's maps: off the async workers.
    let text = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        encode(&mut text, &m.registry).map(|()| text)
    })
    .await;
    let Ok(Ok(text)) = text else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::PinLayout;

    /// With nothing loaded the kernel's families are empty, not an error;
    /// serve's own counts are there, each family once.
    #[test]
    fn encodes_each_family_once() {
        let m = Metrics::new(&Enforcer::new(PinLayout::new(
            "/nonexistent/tcpka-metrics-test",
        )));
        m.command("enable", "ok");
        m.error("enable");
        m.applied_by_command.inc_by(3);
        let raw = |kind, detail, ack_age_ms| keepalive_common::events::Event {
            kind,
            detail,
            ack_age_ms,
            ..Default::default()
        };
        use keepalive_common::{events as ev, risk};
        for e in [
            raw(ev::KIND_TIMEOUT, 0, 12_500),
            raw(ev::KIND_AT_RISK, risk::REASON_PROBE, 3000),
            raw(ev::KIND_AT_RISK, risk::REASON_PROBE, 3000),
            raw(ev::KIND_RECOVERED, risk::REASON_ZERO_WINDOW, 0),
        ] {
            m.event(&Message::Event(crate::events::Record::from_raw(&e)));
        }
        m.webhook("delivered");
        let mut text = String::new();
        encode(&mut text, &m.registry).unwrap();
        for line in [
            "tcpka_commands_total{op=\"enable\",result=\"ok\"} 1",
            "tcpka_command_errors_total{op=\"enable\"} 1",
            "tcpka_command_errors_total{op=\"rule_del\"} 0",
            "tcpka_build_info{version=",
            "tcpka_connections_applied_total{source=\"command\"} 3",
            "tcpka_events_total{kind=\"timeout\"} 1",
            "tcpka_at_risk_total{reason=\"probe\"} 2",
            "tcpka_at_risk_total{reason=\"backoff\"} 0",
            "tcpka_recovered_total{reason=\"zero_window\"} 1",
            "tcpka_detection_seconds_count 1",
            "tcpka_detection_seconds_sum 12.5",
            "tcpka_webhook_deliveries_total{outcome=\"delivered\"} 1",
            "tcpka_lookups_total{path=\"index\"} 0",
            "tcpka_attached 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("tcpka_errors_total"), "{text}");
        for family in ["command_errors", "connections_applied", "lookups"] {
            let header = format!("# TYPE tcpka_{family} counter");
            assert_eq!(text.matches(&header).count(), 1, "{text}");
        }
    }
}
