//! `tcpka fleet status`, `explain` and `forget`: the fleet's nodes.
use std::collections::BTreeMap;

use etcd_client::Client;
use tcpka::{
    fleet::{EtcdOptions, NodeStatus},
    Error,
};

use super::{
    fleet::{fleet_rules, FleetExplainArgs},
    output::print_json,
};

/// The keys under `prefix` (their last part) and values.
async fn under(
    client: &mut Client,
    prefix: &str,
    what: &str,
) -> Result<Vec<(String, Vec<u8>)>, Error> {
    Ok(tcpka::fleet::read_prefix(client, prefix, what).await?.0)
}

/// Live statuses (under a lease) and the labels of every node seen.
pub(crate) async fn fleet_nodes(
    client: &mut Client,
    o: &EtcdOptions,
) -> Result<BTreeMap<String, (Option<NodeStatus>, BTreeMap<String, String>)>, Error> {
    let mut out: BTreeMap<String, (Option<NodeStatus>, BTreeMap<String, String>)> = BTreeMap::new();
    for (node, value) in under(client, &o.known_prefix(), "reading the known nodes").await? {
        let labels = serde_json::from_slice::<serde_json::Value>(&value)
            .ok()
            .and_then(|v| serde_json::from_value(v["labels"].clone()).ok())
            .unwrap_or_default();
        out.insert(node, (None, labels));
    }
    for (node, value) in under(client, &o.nodes_prefix(), "reading the nodes' status").await? {
        if let Ok(s) = serde_json::from_slice::<NodeStatus>(&value) {
            let labels = s.labels.clone();
            out.insert(node, (Some(s), labels));
        }
    }
    Ok(out)
}

pub(crate) async fn fleet_status(
    client: &mut Client,
    o: &EtcdOptions,
    json: bool,
) -> Result<(), Error> {
    let nodes = fleet_nodes(client, o).await?;
    if json {
        let v: Vec<_> = nodes
            .iter()
            .map(|(node, (s, labels))| {
                serde_json::json!({ "node": node, "up": s.is_some(), "labels": labels, "status": s })
            })
            .collect();
        print_json(&v);
        return Ok(());
    }
    if nodes.is_empty() {
        tcpka::outln!("no nodes under {}", o.prefix);
        return Ok(());
    }
    tcpka::outln!(
        "{:<20}  {:<5}  {:<8}  {:<8}  {:<15}  {:>8}  {:>5}  {:>5}  {:>7}  {:>8}  {:>6}  {}",
        "NODE",
        "STATE",
        "VERSION",
        "ATTACHED",
        "HOOKS",
        "REVISION",
        "RULES",
        "FLEET",
        "CONNS",
        "TIMEOUTS",
        "RESETS",
        "NOTES"
    );
    for (node, (s, _)) in &nodes {
        match s {
            None => tcpka::outln!(
                "{node:<20}  gone   (no status: its agent stopped or lost etcd for over 10 s)"
            ),
            Some(s) => {
                let mut notes = Vec::new();
                if !s.clashes.is_empty() {
                    notes.push(format!("{} clash(es)", s.clashes.len()));
                }
                if !s.invalid.is_empty() {
                    notes.push(format!("{} malformed", s.invalid.len()));
                }
                if !s.left_out.is_empty() {
                    notes.push(format!(
                        "{} left out: rule table full ({} fit)",
                        s.left_out.len(),
                        s.fleet_capacity
                    ));
                }
                if s.at_risk > 0 {
                    notes.push(format!("{} at_risk, {} recovered", s.at_risk, s.recovered));
                }
                if let Some(e) = &s.error {
                    notes.push(format!("error: {e}"));
                }
                tcpka::outln!(
                    "{:<20}  {:<5}  {:<8}  {:<8}  {:<15}  {:>8}  {:>5}  {:>5}  {:>7}  {:>8}  {:>6}  {}",
                    node,
                    "up",
                    s.version,
                    if !s.loaded { "unloaded" } else if s.attached { "yes" } else { "NO" },
                    format!("{}/{}", s.index, s.holders),
                    s.revision,
                    s.rules,
                    s.fleet_rules,
                    s.managed_connections,
                    s.timeouts,
                    s.resets,
                    notes.join("; ")
                );
            }
        }
    }
    Ok(())
}

pub(crate) async fn fleet_explain(
    client: &mut Client,
    o: &EtcdOptions,
    a: &FleetExplainArgs,
) -> Result<(), Error> {
    let nodes = fleet_nodes(client, o).await?;
    let Some((status, labels)) = nodes.get(&a.node) else {
        return Err(Error::NotFound {
            what: format!("no node {:?} under {} (never seen)", a.node, o.prefix),
        });
    };
    let rules = fleet_rules(client, o).await?;
    let clash = |name: &str| {
        status.as_ref().and_then(|s| {
            s.clashes
                .iter()
                .find(|c| c.split(':').next() == Some(name))
                .cloned()
        })
    };
    let left_out: std::collections::HashSet<&str> = status
        .iter()
        .flat_map(|s| s.left_out.iter().map(String::as_str))
        .collect();
    let full = status.as_ref().map(|s| {
        format!(
            "left out: the kernel's rule table is full ({} fleet rule(s) fit beside the node's own; the most specific go in first, then by name)",
            s.fleet_capacity
        )
    });
    let verdicts: Vec<serde_json::Value> = rules
        .iter()
        .map(|(name, _, parsed)| match parsed {
            Err(e) => serde_json::json!({ "rule": name, "selects": false, "why": format!("malformed: {e}") }),
            Ok(r) => {
                let (selects, why) = r.selector.selects(&a.node, labels);
                let out = selects && left_out.contains(name.as_str());
                let applied = selects && clash(name).is_none() && !out;
                let mut v = serde_json::json!({ "rule": name, "selects": selects, "why": why, "applied": applied });
                if let Some(c) = clash(name) {
                    v["clash"] = c.into();
                } else if out {
                    v["left_out"] = true.into();
                    v["clash"] = full.clone().into();
                }
                v
            }
        })
        .collect();
    if a.json {
        print_json(&serde_json::json!({
            "node": a.node,
            "up": status.is_some(),
            "labels": labels,
            "revision": status.as_ref().map(|s| s.revision),
            "rules": verdicts,
        }));
        return Ok(());
    }
    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    tcpka::outln!(
        "node {} ({}), labels: {}",
        a.node,
        match status {
            Some(s) => format!("up, rules of revision {}", s.revision),
            None => "gone".into(),
        },
        if l.is_empty() {
            "none".into()
        } else {
            l.join(",")
        }
    );
    if verdicts.is_empty() {
        tcpka::outln!("no fleet rules under {}", o.rules_prefix());
    }
    for v in &verdicts {
        let name = v["rule"].as_str().unwrap_or_default();
        let why = v["why"].as_str().unwrap_or_default();
        match (v["selects"].as_bool(), v["clash"].as_str()) {
            (Some(true), Some(c)) => {
                tcpka::outln!("  {name}: selects it ({why}), NOT applied: {c}")
            }
            (Some(true), None) => tcpka::outln!("  {name}: applies ({why})"),
            _ => tcpka::outln!("  {name}: not for it ({why})"),
        }
    }
    Ok(())
}
