//! The fleet's rules: the JSON value of `PREFIX/rules/NAME`, checked, and
//! the selector that says which nodes a rule is for.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::FLEET_NAME_MAX;
use crate::{
    config::{valid_name, NamedRule, RuleSpec},
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

/// A fleet rule, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetRule {
    pub rule: NamedRule,
    pub selector: Selector,
    /// The value as written (a [`RuleSpec`] without a name).
    pub value: RuleSpec,
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
        let v: RuleSpec = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        if v.name.is_some() {
            return Err("name: a fleet rule's name is its key (PREFIX/rules/NAME)".into());
        }
        for n in &v.nodes {
            if !valid_node(n) {
                return Err(format!("nodes: {n:?} is not a node name"));
            }
        }
        for (k, val) in &v.labels {
            check_label(k, val)?;
        }
        Ok(Self {
            rule: v.check(name)?,
            selector: Selector {
                nodes: v.nodes.clone(),
                labels: v.labels.clone(),
            },
            value: v,
        })
    }
}
