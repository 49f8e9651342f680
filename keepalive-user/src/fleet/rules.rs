//! The fleet's rules: the JSON value of `PREFIX/rules/NAME`, checked, and
//! the selector that says which nodes a rule is for.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::FLEET_NAME_MAX;
use crate::{
    config::{valid_name, NamedRule, RuleEntry},
    node::{check_label, valid_node},
};

/// Which nodes a rule is for: every node when empty; else a node listed in
/// `nodes` (when given) whose labels include all of `labels` (when given).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Selector {
    /// Whether the rule is for `node` with `labels`, and why (or why not).
    pub fn selects(&self, node: &str, labels: &BTreeMap<String, String>) -> (bool, String) {
        if self.nodes.is_empty() && self.labels.is_empty() {
            return (true, "no selector: every node".into());
        }
        if !self.nodes.is_empty() && !self.nodes.iter().any(|n| n == node) {
            return (false, format!("node {node} is not in {:?}", self.nodes));
        }
        for (k, v) in &self.labels {
            match labels.get(k) {
                Some(have) if have == v => {}
                Some(have) => return (false, format!("label {k}={have}, not {v}")),
                None => return (false, format!("no label {k} (wants {k}={v})")),
            }
        }
        let mut why = Vec::new();
        if !self.nodes.is_empty() {
            why.push(format!("node {node} is listed"));
        }
        if !self.labels.is_empty() {
            let want: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            why.push(format!("labels {} match", want.join(",")));
        }
        (true, why.join(" and "))
    }
}

/// The JSON value of `PREFIX/rules/NAME`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleValue {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    pub idle: i64,
    pub count: i64,
    pub interval: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_timeout_ms: Option<i64>,
    /// Early-warning thresholds, as `rule add --at-risk` takes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_risk: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tracked: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new_only: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A fleet rule, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetRule {
    pub rule: NamedRule,
    pub selector: Selector,
    pub value: RuleValue,
}

impl FleetRule {
    /// Parses the value of `PREFIX/rules/NAME`. The error says what is
    /// wrong in the value's words.
    pub fn parse(name: &str, value: &[u8]) -> Result<Self, String> {
        if !valid_name(name) || name.len() > FLEET_NAME_MAX {
            return Err(format!(
                "rule name {name:?}: 1 to {FLEET_NAME_MAX} of A-Z a-z 0-9 . _ -"
            ));
        }
        let v: RuleValue = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        for n in &v.nodes {
            if !valid_node(n) {
                return Err(format!("nodes: {n:?} is not a node name"));
            }
        }
        for (k, val) in &v.labels {
            check_label(k, val)?;
        }
        let entry = RuleEntry {
            name: name.to_owned(),
            local_port: v.local_port,
            remote_port: v.remote_port,
            remote: v.remote.clone(),
            idle: v.idle,
            count: v.count,
            interval: v.interval,
            user_timeout_ms: v.user_timeout_ms,
            at_risk: v.at_risk.clone(),
            tracked: v.tracked,
            new_only: v.new_only,
        };
        Ok(Self {
            rule: entry.check()?,
            selector: Selector {
                nodes: v.nodes.clone(),
                labels: v.labels.clone(),
            },
            value: v,
        })
    }
}
