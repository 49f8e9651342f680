//! The agent's view: the fleet rules as etcd has them, what this node
//! selects of them, and what the kernel's rule table holds. A change is
//! planned against this view, in memory, and only the rules it touches go
//! to the kernel: a change costs what it changes, not the size of the
//! table.
//!
//! When the selected rules do not all fit in the kernel's table (beside
//! the host's own rules), the most specific go in first: more fields set,
//! then the longer remote prefix (the kernel's own precedence), then the
//! name. The rest are left out and reported; the same rules on the same
//! host always give the same subset.
use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
};

use keepalive_common::RULES_MAX_ENTRIES;

use super::FleetRule;
use crate::{
    config::{NamedRule, FLEET_PREFIX},
    enforcer::FleetOp,
    policy::Policy,
    rule::{Rule, RuleMatch},
    Error,
};

/// A fleet rule as this node sees it; a selected rule with its rank.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Parsed {
    Selected(NamedRule, u32),
    NotSelected,
    Invalid(String),
}

/// A fleet rule in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Installed {
    pub(super) id: u32,
    pub(super) rule: NamedRule,
}

/// The host's own rules (not the fleet's), as last read.
#[derive(Clone, Debug, Default)]
struct Own {
    names: HashSet<String>,
    matchers: HashMap<RuleMatch, u32>,
    count: usize,
}

/// What a plan leaves out, for the node's status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Verdicts {
    /// `NAME: why`, in name order.
    pub(super) clashes: Vec<String>,
    pub(super) invalid: Vec<String>,
    /// Names left out because the table is full, in the order of the
    /// subset (most specific first).
    pub(super) left_out: Vec<String>,
    /// Rules the fleet may have in the kernel beside the host's own.
    pub(super) capacity: usize,
}

/// Kernel changes and what is left out.
#[derive(Debug, Default)]
pub(super) struct Plan {
    pub(super) ops: Vec<FleetOp>,
    pub(super) verdicts: Verdicts,
}

#[derive(Clone)]
pub(super) struct View {
    node: String,
    labels: BTreeMap<String, String>,
    /// Raw values by name, malformed ones included (the cache).
    pub(super) rules: BTreeMap<String, String>,
    parsed: BTreeMap<String, Parsed>,
    installed: HashMap<String, Installed>,
    own: Own,
    /// Highest rule id seen: new ids go above it.
    highest_id: u32,
    table_size: usize,
    /// What the last full plan left out.
    verdicts: Verdicts,
    /// Rules changed since the last plan in a way that changes nothing for
    /// any other rule, planned without a look at the others:
    /// - new values, same match (the same rank, clashes and place);
    /// - a new rule whose name and match are free, with room in the table;
    /// - an installed rule deleted, no other rule waiting for its match or
    ///   for room.
    quick: Vec<String>,
    /// Quick additions since the last plan.
    quick_adds: usize,
    /// Something else changed: the next plan looks at every rule.
    full: bool,
    /// Selected rules by match (several when they clash).
    by_match: HashMap<RuleMatch, BTreeSet<String>>,
}

/// The kernel's precedence of a match: more fields, then a longer prefix.
fn rank(m: &RuleMatch) -> u32 {
    keepalive_common::rules::rank(m.fields(), m.remote.map_or(0, |c| c.to_v6().1))
}

impl View {
    pub(super) fn new(node: &str, labels: &BTreeMap<String, String>) -> Self {
        Self {
            node: node.to_owned(),
            labels: labels.clone(),
            rules: BTreeMap::new(),
            parsed: BTreeMap::new(),
            installed: HashMap::new(),
            own: Own::default(),
            highest_id: 0,
            table_size: RULES_MAX_ENTRIES as usize,
            verdicts: Verdicts::default(),
            quick: Vec::new(),
            quick_adds: 0,
            full: true,
            by_match: HashMap::new(),
        }
    }

    #[cfg(test)]
    fn with_table_size(mut self, n: usize) -> Self {
        self.table_size = n;
        self
    }

    /// A rule put (`Some`) or deleted (`None`) in etcd.
    pub(super) fn set(&mut self, name: &str, value: Option<String>) {
        let parsed = match &value {
            None => None,
            Some(v) if self.rules.get(name) == Some(v) => return,
            Some(v) => Some(match FleetRule::parse(name, v.as_bytes()) {
                Ok(r) if r.selector.selects(&self.node, &self.labels).0 => {
                    let rank = rank(&r.rule.matcher);
                    Parsed::Selected(r.rule, rank)
                }
                Ok(_) => Parsed::NotSelected,
                Err(e) => Parsed::Invalid(e),
            }),
        };
        if value.is_none() && !self.rules.contains_key(name) {
            return;
        }
        if self.is_quick(name, parsed.as_ref()) {
            self.quick.push(name.to_owned());
        } else {
            self.full = true;
        }
        if let Some(Parsed::Selected(old, _)) = self.parsed.get(name) {
            if let Some(names) = self.by_match.get_mut(&old.matcher) {
                names.remove(name);
                if names.is_empty() {
                    self.by_match.remove(&old.matcher);
                }
            }
        }
        if let Some(Parsed::Selected(new, _)) = &parsed {
            self.by_match
                .entry(new.matcher)
                .or_default()
                .insert(name.to_owned());
        }
        match (value, parsed) {
            (Some(v), Some(p)) => {
                self.parsed.insert(name.to_owned(), p);
                self.rules.insert(name.to_owned(), v);
            }
            _ => {
                self.parsed.remove(name);
                self.rules.remove(name);
            }
        }
    }

    /// Whether changing `name` to `new` (`None`: deleted) leaves every
    /// other rule as it is (see [`View::quick`]); called before the change.
    fn is_quick(&mut self, name: &str, new: Option<&Parsed>) -> bool {
        if self.full {
            return false;
        }
        let old = self.parsed.get(name);
        let installed = self.installed.get(name);
        match (old, new) {
            // New values, same match, installed.
            (Some(Parsed::Selected(o, _)), Some(Parsed::Selected(n, _))) => {
                o.matcher == n.matcher && installed.is_some_and(|i| i.rule.matcher == n.matcher)
            }
            // A new rule, its name and match free, room for it.
            (None, Some(Parsed::Selected(n, _))) => {
                let room = self.installed.len() + self.quick_adds < self.verdicts.capacity;
                let free = !self.own.names.contains(name)
                    && !self.own.matchers.contains_key(&n.matcher)
                    && !self.by_match.contains_key(&n.matcher);
                let quick = room && free && self.verdicts.left_out.is_empty();
                if quick {
                    self.quick_adds += 1;
                }
                quick
            }
            // A new rule not for this node: nothing changes.
            (None, Some(Parsed::NotSelected)) => true,
            // An installed rule deleted, nothing waiting for its match or
            // for room.
            (Some(Parsed::Selected(o, _)), None) => {
                installed.is_some_and(|i| i.rule.matcher == o.matcher)
                    && self.verdicts.left_out.is_empty()
                    && self.by_match.get(&o.matcher).is_some_and(|n| n.len() == 1)
            }
            (Some(Parsed::NotSelected), None) => true,
            _ => false,
        }
    }

    /// Every rule at once (a full read): only the names that differ are
    /// parsed again.
    pub(super) fn reset(&mut self, rules: BTreeMap<String, String>) {
        let gone: Vec<String> = self
            .rules
            .keys()
            .filter(|n| !rules.contains_key(*n))
            .cloned()
            .collect();
        for n in gone {
            self.set(&n, None);
        }
        for (n, v) in rules {
            self.set(&n, Some(v));
        }
    }

    /// Takes the kernel's rules as they are (a full read).
    pub(super) fn refresh(&mut self, kernel: &[Rule]) {
        self.full = true;
        self.own = Own::default();
        self.installed.clear();
        self.highest_id = kernel.iter().map(|r| r.id).max().unwrap_or(0);
        for r in kernel {
            match r.name.as_deref().and_then(|n| n.strip_prefix(FLEET_PREFIX)) {
                Some(name) => {
                    // A rule with values no parse would give is replaced.
                    let policy = Policy::new(r.idle, r.count, r.interval, r.user_timeout_ms)
                        .map(|p| p.with_risk(r.risk))
                        .unwrap_or(Policy {
                            idle: 0,
                            count: 0,
                            interval: 0,
                            user_timeout_ms: None,
                            risk: Default::default(),
                        });
                    self.installed.insert(
                        name.to_owned(),
                        Installed {
                            id: r.id,
                            rule: NamedRule {
                                name: name.to_owned(),
                                matcher: r.matcher(),
                                policy,
                                tracked: r.tracked,
                                new_only: r.new_only,
                            },
                        },
                    );
                }
                None => {
                    self.own.count += 1;
                    if let Some(n) = &r.name {
                        self.own.names.insert(n.clone());
                    }
                    self.own.matchers.insert(r.matcher(), r.id);
                }
            }
        }
    }

    /// Fleet rules in the kernel, and rules in all.
    pub(super) fn counts(&self) -> (usize, usize) {
        (self.installed.len(), self.installed.len() + self.own.count)
    }

    pub(super) fn min_id(&self) -> u32 {
        self.highest_id.saturating_add(1)
    }

    /// What the kernel needs to match the selected rules, and what is left
    /// out. In memory: no map is read. When only installed rules' values
    /// changed, only they are looked at.
    pub(super) fn plan(&mut self) -> Plan {
        if self.full {
            self.full = false;
            self.quick.clear();
            self.quick_adds = 0;
            let plan = self.full_plan();
            self.verdicts = plan.verdicts.clone();
            return plan;
        }
        let mut ops = Vec::new();
        let (mut removes, mut adds) = (Vec::new(), Vec::new());
        self.quick.sort();
        self.quick.dedup();
        self.quick_adds = 0;
        for name in self.quick.drain(..) {
            match (self.parsed.get(&name), self.installed.get(&name)) {
                (Some(Parsed::Selected(r, _)), Some(i)) if i.rule != *r => {
                    ops.push(FleetOp::Replace {
                        id: i.id,
                        rule: r.clone(),
                    })
                }
                (Some(Parsed::Selected(r, _)), None) => adds.push(FleetOp::Add(r.clone())),
                (None | Some(Parsed::NotSelected), Some(i)) => removes.push(FleetOp::Remove {
                    id: i.id,
                    matcher: i.rule.matcher,
                    new_only: i.rule.new_only,
                }),
                _ => {}
            }
        }
        removes.extend(ops);
        removes.extend(adds);
        Plan {
            ops: removes,
            verdicts: self.verdicts.clone(),
        }
    }

    fn full_plan(&self) -> Plan {
        let mut verdicts = Verdicts {
            capacity: self.table_size.saturating_sub(self.own.count),
            ..Verdicts::default()
        };
        let mut matchers: HashSet<RuleMatch> = HashSet::new();
        let mut wanted: Vec<(u32, &NamedRule)> = Vec::new();
        for (name, parsed) in &self.parsed {
            let (r, rank) = match parsed {
                Parsed::Selected(r, rank) => (r, *rank),
                Parsed::NotSelected => continue,
                Parsed::Invalid(e) => {
                    verdicts.invalid.push(format!("{name}: {e}"));
                    continue;
                }
            };
            if self.own.names.contains(name) {
                verdicts
                    .clashes
                    .push(format!("{name}: this host has a rule of that name"));
            } else if let Some(id) = self.own.matchers.get(&r.matcher) {
                verdicts
                    .clashes
                    .push(format!("{name}: this host's rule {id} has the same match"));
            } else if !matchers.insert(r.matcher) {
                verdicts
                    .clashes
                    .push(format!("{name}: another fleet rule has the same match"));
            } else {
                wanted.push((rank, r));
            }
        }
        // Already in name order: a stable sort by rank keeps it within a
        // rank.
        wanted.sort_by_key(|(rank, _)| Reverse(*rank));
        if wanted.len() > verdicts.capacity {
            verdicts.left_out = wanted
                .split_off(verdicts.capacity)
                .into_iter()
                .map(|(_, r)| r.name.clone())
                .collect();
        }
        let wanted: Vec<&NamedRule> = wanted.into_iter().map(|(_, r)| r).collect();
        let mut removes = Vec::new();
        let mut replaces = Vec::new();
        let mut adds = Vec::new();
        let by_name: HashMap<&str, &NamedRule> =
            wanted.iter().map(|r| (r.name.as_str(), *r)).collect();
        let mut gone: Vec<(&String, &Installed)> = self
            .installed
            .iter()
            .filter(|(n, _)| !by_name.contains_key(n.as_str()))
            .collect();
        gone.sort_by_key(|(n, _)| *n);
        for (_, i) in gone {
            removes.push(FleetOp::Remove {
                id: i.id,
                matcher: i.rule.matcher,
                new_only: i.rule.new_only,
            });
        }
        for r in wanted {
            match self.installed.get(&r.name) {
                None => adds.push(FleetOp::Add(r.clone())),
                Some(i) if i.rule == *r => {}
                Some(i) if i.rule.matcher == r.matcher => replaces.push(FleetOp::Replace {
                    id: i.id,
                    rule: r.clone(),
                }),
                Some(i) => {
                    removes.push(FleetOp::Remove {
                        id: i.id,
                        matcher: i.rule.matcher,
                        new_only: i.rule.new_only,
                    });
                    adds.push(FleetOp::Add(r.clone()));
                }
            }
        }
        removes.extend(replaces);
        removes.extend(adds);
        Plan {
            ops: removes,
            verdicts,
        }
    }

    /// Records what the kernel did with a plan's ops. Returns one line per
    /// failure; a failure means the view may be wrong: the caller reads
    /// the kernel again before the next plan.
    pub(super) fn record(
        &mut self,
        ops: &[FleetOp],
        results: &[Result<u32, Error>],
    ) -> Vec<String> {
        let mut failures = Vec::new();
        let names: HashMap<u32, String> = if ops.iter().any(|o| matches!(o, FleetOp::Remove { .. }))
        {
            self.installed
                .iter()
                .map(|(n, i)| (i.id, n.clone()))
                .collect()
        } else {
            HashMap::new()
        };
        for (op, result) in ops.iter().zip(results) {
            match (op, result) {
                (FleetOp::Remove { id, .. }, Ok(_)) => {
                    if let Some(n) = names.get(id) {
                        self.installed.remove(n);
                    }
                }
                (FleetOp::Replace { rule, .. }, Ok(_)) => {
                    if let Some(i) = self.installed.get_mut(&rule.name) {
                        i.rule = rule.clone();
                    }
                }
                (FleetOp::Add(rule), Ok(id)) => {
                    self.highest_id = self.highest_id.max(*id);
                    self.installed.insert(
                        rule.name.clone(),
                        Installed {
                            id: *id,
                            rule: rule.clone(),
                        },
                    );
                }
                (op, Err(e)) => failures.push(format!("{}: {}", op_name(op), crate::one_line(e))),
            }
        }
        if !failures.is_empty() {
            self.full = true;
        }
        failures
    }

    /// The fleet rules in the kernel, by name (tests and status).
    #[cfg(test)]
    fn installed_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.installed.keys().cloned().collect();
        v.sort();
        v
    }
}

fn op_name(op: &FleetOp) -> String {
    match op {
        FleetOp::Remove { id, .. } => format!("removing rule {id}"),
        FleetOp::Replace { rule, .. } => format!("changing {}", rule.name),
        FleetOp::Add(rule) => format!("adding {}", rule.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(port: u16, idle: u32) -> String {
        format!(r#"{{"local_port":{port},"idle":{idle},"count":3,"interval":5}}"#)
    }

    fn view() -> View {
        View::new("n1", &[("role".to_owned(), "edge".to_owned())].into())
    }

    /// Applies a plan as a kernel would, ids from 100.
    fn apply(v: &mut View) -> Plan {
        let plan = v.plan();
        let full = v.full_plan();
        assert_eq!(plan.verdicts, full.verdicts, "a quick plan's verdicts");
        let mut next = 100 + v.highest_id;
        let results: Vec<Result<u32, Error>> = plan
            .ops
            .iter()
            .map(|op| match op {
                FleetOp::Add(_) => {
                    next += 1;
                    Ok(next)
                }
                FleetOp::Remove { id, .. } | FleetOp::Replace { id, .. } => Ok(*id),
            })
            .collect();
        assert!(v.record(&plan.ops, &results).is_empty());
        plan
    }

    #[test]
    fn a_change_touches_only_its_rule() {
        let mut v = view();
        for i in 0..1000u16 {
            v.set(&format!("r{i}"), Some(value(10000 + i, 30)));
        }
        assert_eq!(apply(&mut v).ops.len(), 1000);
        assert!(v.plan().ops.is_empty());
        // One new value: one replace.
        v.set("r5", Some(value(10005, 31)));
        let p = apply(&mut v);
        assert!(
            matches!(&p.ops[..], [FleetOp::Replace { rule, .. }] if rule.name == "r5"),
            "{:?}",
            p.ops
        );
        // The same value again: nothing.
        v.set("r5", Some(value(10005, 31)));
        assert!(v.plan().ops.is_empty());
        // A new match: remove, then add.
        v.set("r6", Some(value(20006, 30)));
        let p = apply(&mut v);
        assert!(
            matches!(&p.ops[..], [FleetOp::Remove { .. }, FleetOp::Add(r)] if r.name == "r6"),
            "{:?}",
            p.ops
        );
        // A delete: one remove.
        v.set("r7", None);
        let p = apply(&mut v);
        assert!(
            matches!(&p.ops[..], [FleetOp::Remove { .. }]),
            "{:?}",
            p.ops
        );
        assert_eq!(v.counts(), (999, 999));
    }

    #[test]
    fn a_value_change_of_an_installed_rule_is_planned_alone() {
        let mut v = view();
        for i in 0..100u16 {
            v.set(&format!("r{i}"), Some(value(10000 + i, 30)));
        }
        apply(&mut v);
        v.set("r1", Some(value(10001, 40)));
        v.set("r2", Some(value(10002, 40)));
        v.set("r1", Some(value(10001, 41)));
        assert!(!v.full, "value changes of installed rules");
        let p = apply(&mut v);
        assert_eq!(p.ops.len(), 2, "{:?}", p.ops);
        assert!(
            matches!(&p.ops[0], FleetOp::Replace { rule, .. } if rule.name == "r1" && rule.policy.idle == 41)
        );
        // A new rule with a free match and room, a delete with nothing
        // waiting: on their own too.
        v.set("new", Some(value(20000, 30)));
        v.set("r4", None);
        assert!(!v.full);
        let p = apply(&mut v);
        assert!(
            matches!(&p.ops[..], [FleetOp::Remove { .. }, FleetOp::Add(r)] if r.name == "new"),
            "{:?}",
            p.ops
        );
        // A new match, a malformed value, a rule taking a used match, the
        // delete of one that another waits for: every rule is looked at.
        for change in [
            ("r3", Some(value(20003, 30))),
            ("r5", Some("{".to_owned())),
            ("dup", Some(value(10006, 50))),
            ("r6", None),
        ] {
            v.set(change.0, change.1);
            assert!(v.full, "{}", change.0);
            apply(&mut v);
        }
        assert!(v.installed_names().contains(&"dup".to_owned()));
    }

    #[test]
    fn quick_plans_agree_with_full_ones_over_random_changes() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut v = view().with_table_size(12);
        for step in 0..3000 {
            let name = format!("n{}", rng.usize(0..30));
            let value = match rng.usize(0..10) {
                0..=2 => None,
                3 => Some("{".to_owned()),
                4 => Some(format!(
                    r#"{{"local_port":{},"idle":30,"count":3,"interval":5,"labels":{{"role":"core"}}}}"#,
                    1000 + rng.u16(0..20)
                )),
                5 => Some(format!(
                    r#"{{"local_port":{},"remote":"10.0.0.{}","idle":30,"count":3,"interval":5}}"#,
                    1000 + rng.u16(0..20),
                    rng.u8(1..4)
                )),
                _ => Some(value(1000 + rng.u16(0..20), 30 + rng.u32(0..3))),
            };
            v.set(&name, value);
            if rng.usize(0..3) == 0 {
                apply(&mut v);
                // Nothing left to do for a plan that looks at every rule.
                assert!(v.full_plan().ops.is_empty(), "step {step}");
            }
        }
    }

    #[test]
    fn two_rules_swapping_matches_remove_before_they_add() {
        let mut v = view();
        v.set("a", Some(value(1001, 30)));
        v.set("b", Some(value(1002, 30)));
        apply(&mut v);
        v.reset(
            [
                ("a".to_owned(), value(1002, 30)),
                ("b".to_owned(), value(1001, 30)),
            ]
            .into(),
        );
        let p = apply(&mut v);
        let kinds: Vec<&str> = p
            .ops
            .iter()
            .map(|o| match o {
                FleetOp::Remove { .. } => "remove",
                FleetOp::Replace { .. } => "replace",
                FleetOp::Add(_) => "add",
            })
            .collect();
        assert_eq!(kinds, ["remove", "remove", "add", "add"]);
    }

    #[test]
    fn selection_clashes_and_malformed_values() {
        let mut v = view();
        let kernel = vec![{
            let mut r = Rule::new(
                7,
                RuleMatch {
                    local_port: Some(5060),
                    ..Default::default()
                },
                Policy::new(30, 3, 5, None).unwrap(),
                true,
            );
            r.name = Some("mine".into());
            r
        }];
        v.refresh(&kernel);
        v.set("mine", Some(value(1, 30)));
        v.set("same-match", Some(value(5060, 30)));
        v.set(
            "core",
            Some(
                r#"{"local_port":2,"idle":30,"count":3,"interval":5,"labels":{"role":"core"}}"#
                    .into(),
            ),
        );
        v.set("bad", Some("{".into()));
        v.set("dup-a", Some(value(3, 30)));
        v.set("dup-b", Some(value(3, 31)));
        let p = v.full_plan();
        assert_eq!(
            p.verdicts.clashes,
            [
                "dup-b: another fleet rule has the same match",
                "mine: this host has a rule of that name",
                "same-match: this host's rule 7 has the same match",
            ]
        );
        assert_eq!(p.verdicts.invalid.len(), 1);
        assert!(p.verdicts.invalid[0].starts_with("bad: "));
        assert_eq!(
            p.ops
                .iter()
                .filter(|o| matches!(o, FleetOp::Add(_)))
                .count(),
            1
        );
        assert_eq!(p.verdicts.capacity, RULES_MAX_ENTRIES as usize - 1);
        apply(&mut v);
        assert_eq!(v.installed_names(), ["dup-a"]);
        // Ids go above every id seen (7, then 108).
        assert_eq!(v.min_id(), 109);
    }

    #[test]
    fn a_full_table_takes_the_most_specific_rules_then_by_name() {
        let mut v = view().with_table_size(3);
        v.set("z-port", Some(value(10, 30)));
        v.set("a-port", Some(value(11, 30)));
        v.set(
            "b-peer",
            Some(
                r#"{"local_port":12,"remote":"10.0.0.1","idle":30,"count":3,"interval":5}"#.into(),
            ),
        );
        v.set(
            "c-net",
            Some(
                r#"{"local_port":13,"remote":"10.0.0.0/8","idle":30,"count":3,"interval":5}"#
                    .into(),
            ),
        );
        v.set(
            "any",
            Some(r#"{"remote":"10.0.0.0/8","idle":30,"count":3,"interval":5}"#.into()),
        );
        // Two fields before one; a longer prefix before a shorter; then
        // the name.
        let p = apply(&mut v);
        assert_eq!(p.verdicts.left_out, ["a-port", "z-port"]);
        assert_eq!(v.installed_names(), ["any", "b-peer", "c-net"]);
        // A rule that fits is applied whatever waits outside.
        v.set(
            "c-net",
            Some(
                r#"{"local_port":13,"remote":"10.0.0.0/8","idle":40,"count":3,"interval":5}"#
                    .into(),
            ),
        );
        let p = apply(&mut v);
        assert!(
            matches!(&p.ops[..], [FleetOp::Replace { .. }]),
            "{:?}",
            p.ops
        );
        // Room made: the next in line goes in.
        v.set("b-peer", None);
        let p = apply(&mut v);
        assert_eq!(p.verdicts.left_out, ["z-port"]);
        assert_eq!(v.installed_names(), ["a-port", "any", "c-net"]);
        // A more specific newcomer pushes out the least specific one.
        v.set(
            "d-peer",
            Some(
                r#"{"local_port":14,"remote":"10.0.0.2","idle":30,"count":3,"interval":5}"#.into(),
            ),
        );
        let p = apply(&mut v);
        assert_eq!(p.verdicts.left_out, ["a-port", "z-port"]);
        assert_eq!(v.installed_names(), ["any", "c-net", "d-peer"]);
    }

    #[test]
    fn failures_are_reported_and_leave_the_rule_out_of_the_view() {
        let mut v = view();
        v.set("a", Some(value(1, 30)));
        let p = v.plan();
        let failures = v.record(&p.ops, &[Err(Error::RulesFull(RULES_MAX_ENTRIES))]);
        assert_eq!(failures.len(), 1);
        assert!(failures[0].starts_with("adding a: "), "{failures:?}");
        assert_eq!(v.counts(), (0, 0));
        assert_eq!(v.plan().ops.len(), 1);
    }
}
