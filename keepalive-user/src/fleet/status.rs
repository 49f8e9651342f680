//! The node's status, from the pins and what the applier left.
use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
};

use super::{state::Verdicts, NodeStatus};
use crate::{enforcer::Enforcer, loader};

/// Timeout, reset and early-warning events seen by serve, for the node's
/// status.
#[derive(Debug, Default)]
pub struct EventCounts {
    pub timeouts: AtomicU64,
    pub resets: AtomicU64,
    pub at_risk: AtomicU64,
    pub recovered: AtomicU64,
}

impl EventCounts {
    pub fn count(&self, kind: &str) {
        match kind {
            "timeout" => self.timeouts.fetch_add(1, Ordering::Relaxed),
            "reset" => self.resets.fetch_add(1, Ordering::Relaxed),
            "at_risk" => self.at_risk.fetch_add(1, Ordering::Relaxed),
            "recovered" => self.recovered.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
}

/// What the last kernel update left, for the node's status.
#[derive(Clone, Debug, Default)]
pub(super) struct Applied {
    pub(super) revision: i64,
    pub(super) fleet_rules: usize,
    pub(super) rules: usize,
    pub(super) verdicts: Verdicts,
    pub(super) error: Option<String>,
    /// Live connections the last change gave new values, and all changes
    /// since the agent started.
    pub(super) live_changed_last: usize,
    pub(super) live_changed_total: u64,
}

/// The node's status (blocking: it reads the pins).
pub(super) fn status(
    enforcer: &Enforcer,
    node: String,
    labels: BTreeMap<String, String>,
    applied: &Applied,
    events: &EventCounts,
    managed: Option<usize>,
) -> NodeStatus {
    let installation = loader::installed(enforcer.layout()).ok().flatten();
    NodeStatus {
        node,
        labels,
        version: env!("CARGO_PKG_VERSION").into(),
        loaded: installation.is_some(),
        attached: installation.as_ref().is_some_and(|i| i.attached),
        index: installation
            .as_ref()
            .map(|i| i.index.name().to_owned())
            .unwrap_or_default(),
        holders: installation
            .as_ref()
            .map(|i| i.holders.name().to_owned())
            .unwrap_or_default(),
        revision: applied.revision,
        rules: applied.rules,
        fleet_rules: applied.fleet_rules,
        rule_table: keepalive_common::RULES_MAX_ENTRIES as usize,
        fleet_capacity: applied.verdicts.capacity,
        left_out: applied.verdicts.left_out.clone(),
        live_changed_last: applied.live_changed_last,
        live_changed_total: applied.live_changed_total,
        managed_connections: managed
            .unwrap_or_else(|| enforcer.managed().map(|m| m.len()).unwrap_or(0)),
        timeouts: events.timeouts.load(Ordering::Relaxed),
        resets: events.resets.load(Ordering::Relaxed),
        at_risk: events.at_risk.load(Ordering::Relaxed),
        recovered: events.recovered.load(Ordering::Relaxed),
        clashes: applied.verdicts.clashes.clone(),
        invalid: applied.verdicts.invalid.clone(),
        error: applied.error.clone(),
        updated: crate::events::rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128),
        ),
    }
}
