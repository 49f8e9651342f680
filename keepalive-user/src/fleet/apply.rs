//! What the agent does to the kernel (blocking): the fleet rules that
//! select the node, less what clashes with the host's own; and the node's
//! status.
use std::sync::atomic::Ordering;

use super::{
    agent::{Applied, EventCounts},
    cache::Cache,
    *,
};
use crate::{config::FLEET_PREFIX, enforcer::Enforcer, loader};

/// The kernel update itself (blocking). Malformed values and clashes are
/// left out and reported once each; the rest is applied.
pub(super) fn apply_rules(
    enforcer: &Enforcer,
    cache: &Cache,
    node: &str,
    labels: &BTreeMap<String, String>,
    previous: &Applied,
) -> Applied {
    let mut out = Applied {
        revision: cache.revision,
        ..Applied::default()
    };
    let mut selected = Vec::new();
    for (name, value) in &cache.rules {
        match FleetRule::parse(name, value.as_bytes()) {
            Ok(r) if r.selector.selects(node, labels).0 => selected.push(r),
            Ok(_) => {}
            Err(e) => out.invalid.push(format!("{name}: {e}")),
        }
    }
    let installed = match enforcer.rules() {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!(
                "reading the installed rules: {}",
                crate::one_line(&e)
            ));
            out.revision = previous.revision;
            return out;
        }
    };
    let own: Vec<_> = installed
        .iter()
        .filter(|r| {
            !r.name
                .as_deref()
                .is_some_and(|n| n.starts_with(FLEET_PREFIX))
        })
        .collect();
    let mut wanted = Vec::new();
    let mut matches = Vec::new();
    for r in selected {
        let name = &r.rule.name;
        if own.iter().any(|o| o.name.as_deref() == Some(name)) {
            out.clashes
                .push(format!("{name}: this host has a rule of that name"));
        } else if let Some(o) = own.iter().find(|o| o.matcher() == r.rule.matcher) {
            out.clashes.push(format!(
                "{name}: this host's rule {} has the same match",
                o.id
            ));
        } else if matches.contains(&r.rule.matcher) {
            out.clashes
                .push(format!("{name}: another fleet rule has the same match"));
        } else {
            matches.push(r.rule.matcher);
            wanted.push(r.rule);
        }
    }
    for m in out.invalid.iter().filter(|m| !previous.invalid.contains(m)) {
        tracing::warn!("fleet: rule skipped, malformed: {m}");
    }
    for m in out.clashes.iter().filter(|m| !previous.clashes.contains(m)) {
        tracing::warn!("fleet: rule skipped, the local rule wins: {m}");
    }
    match enforcer.apply_fleet(&wanted) {
        Ok(steps) => {
            for step in &steps {
                tracing::info!(revision = cache.revision, "fleet: {step}");
            }
            out.fleet_rules = wanted.len();
        }
        Err(e) => {
            out.error = Some(format!(
                "applying the fleet rules of revision {}: {}",
                cache.revision,
                crate::one_line(&e)
            ));
            out.revision = previous.revision;
            out.fleet_rules = previous.fleet_rules;
        }
    }
    out
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
        rules: enforcer.rules().map(|r| r.len()).unwrap_or(0),
        fleet_rules: applied.fleet_rules,
        managed_connections: managed
            .unwrap_or_else(|| enforcer.managed().map(|m| m.len()).unwrap_or(0)),
        timeouts: events.timeouts.load(Ordering::Relaxed),
        resets: events.resets.load(Ordering::Relaxed),
        clashes: applied.clashes.clone(),
        invalid: applied.invalid.clone(),
        error: applied.error.clone(),
        updated: crate::events::rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128),
        ),
    }
}
