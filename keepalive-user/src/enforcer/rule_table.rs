//! Rules for new connections: add, delete, list, names, and `apply` of a
//! configuration file, in the pinned rule table.
use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, MapError};
use keepalive_common::{
    maps, rules,
    rules::{RuleKey, RuleName, RuleValue},
    RULES_MAX_ENTRIES,
};

use super::{
    reapply::{Pass, Reach, Reached, PREVIEW_ID},
    Enforcer, BPF_EXIST, BPF_NOEXIST,
};
use crate::{
    config::{Config, NamedRule, Step as ConfigStep},
    policy::Policy,
    rule::{Rule, RuleMatch},
    Error, Result,
};

pub(super) type RuleTable = LpmTrie<MapData, RuleKey, RuleValue>;

/// A rule name as the kernel map stores it.
pub(super) fn rule_name(name: &str) -> RuleName {
    let mut bytes = [0u8; 32];
    let n = name.len().min(32);
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    RuleName { bytes }
}

impl Enforcer {
    pub(super) fn rules_map(&self) -> Result<RuleTable> {
        let map = crate::pinned::open_map(&self.layout, maps::RULES)?;
        LpmTrie::try_from(map).map_err(|e| Error::map("opening the rule table", e))
    }

    /// Adds a rule for new connections and the live ones it now decides
    /// (see [`Enforcer::add_rule_reaching`]); returns it with its new id.
    pub fn add_rule(&self, m: RuleMatch, policy: Policy, tracked: bool) -> Result<Rule> {
        Ok(self
            .add_rule_reaching(m, policy, tracked, Some(Reach::default()))?
            .0)
    }

    /// Adds a rule; with `reach`, the live connections in the attached
    /// cgroup that it now decides get its values too (commands still win),
    /// else only new connections do. The rule stays added when live
    /// connections cannot be reached: the second value says why.
    pub fn add_rule_reaching(
        &self,
        m: RuleMatch,
        policy: Policy,
        tracked: bool,
        reach: Option<Reach>,
    ) -> Result<(Rule, Option<Result<Reached>>)> {
        let _lock = self.lock()?;
        let mut rules = self.rules_map()?;
        if let Some(how) = reach.filter(|h| h.dry_run) {
            // A preview: the checks an insert makes, then a pass with the
            // table as it would be.
            let mut after = self.rules()?;
            if let Some(same) = after.iter().find(|r| r.matcher() == m) {
                return Err(Error::DuplicateRule(same.id));
            }
            if after.len() >= RULES_MAX_ENTRIES as usize {
                return Err(Error::RulesFull(RULES_MAX_ENTRIES));
            }
            let rule = Rule::new(PREVIEW_ID, m, policy, tracked);
            after.push(rule.clone());
            let new = [rule.clone()];
            let pass = Pass {
                after: Some(&after),
                ..Pass::of(&[], &new)
            };
            let reached = self.reach_locked(&pass, how);
            return Ok((Rule { id: 0, ..rule }, Some(reached)));
        }
        // Added without reaching live connections: a rule for new ones
        // only, whose later changes do not reach them either.
        let new_only = reach.is_none();
        let rule = self.insert_rule(&mut rules, m, policy, tracked, new_only, None)?;
        let reached =
            reach.map(|how| self.reach_locked(&Pass::of(&[], std::slice::from_ref(&rule)), how));
        Ok((rule, reached))
    }

    /// Adds a rule under the lock; with a name, the name is written first
    /// (a command killed in between leaves a name without a rule, which
    /// nothing shows, rather than a named rule that looks hand-made).
    pub(super) fn insert_rule(
        &self,
        rules: &mut RuleTable,
        m: RuleMatch,
        policy: Policy,
        tracked: bool,
        new_only: bool,
        name: Option<&str>,
    ) -> Result<Rule> {
        let mut meta = crate::pinned::read_meta(&self.layout)?;
        // Above every id in use, whatever the counter says.
        let highest = rules
            .iter()
            .filter_map(|r| r.ok())
            .map(|(_, v)| v.id)
            .max()
            .unwrap_or(0);
        let id = meta.next_rule_id.max(highest + 1).max(1);
        let (prefix_len, data) = m.key();
        let key = Key::new(prefix_len, data);
        // The counter moves first: a command killed between the two steps
        // skips an id, and never hands one out twice.
        meta.next_rule_id = id + 1;
        crate::pinned::write_meta(&self.layout, &meta)?;
        if let Some(n) = name {
            self.names_map()?
                .insert(id, rule_name(n), 0)
                .map_err(|e| Error::map("recording the rule's name", e))?;
        }
        // Its thresholds before the rule: sock_ops reads them when the
        // rule first matches.
        if !policy.risk.is_default() {
            self.risk_map()?
                .insert(id, policy.risk.to_raw(), 0)
                .map_err(|e| Error::map("recording the rule's at-risk thresholds", e))?;
        }
        crate::ports::sync_rules(&self.layout, rules, Some(&data), None)?;
        let inserted = rules.insert(&key, m.value(id, policy, tracked, new_only), BPF_NOEXIST);
        if inserted.is_err() && !policy.risk.is_default() {
            let _ = self.risk_map()?.remove(&id);
        }
        if inserted.is_err() && name.is_some() {
            let _ = self.names_map()?.remove(&id);
        }
        match inserted {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                let existing = rules.get(&key, 0).map(|v| v.id).unwrap_or(0);
                return Err(Error::DuplicateRule(existing));
            }
            Err(MapError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::ENOSPC | libc::E2BIG)) =>
            {
                return Err(Error::RulesFull(RULES_MAX_ENTRIES));
            }
            Err(e) => return Err(Error::map("adding the rule", e)),
        }
        crate::ports::bump_generation(&self.layout)?;
        let mut rule = Rule::new(id, m, policy, tracked);
        rule.new_only = new_only;
        rule.name = name.map(str::to_owned);
        Ok(rule)
    }

    /// Removes a rule; its live connections get what another rule decides
    /// for them, and keep its values when none does.
    pub fn delete_rule(&self, id: u32) -> Result<Rule> {
        Ok(self.delete_rule_reaching(id, Some(Reach::default()))?.0)
    }

    /// Removes a rule; with `reach`, the live connections it matched get
    /// what the remaining rules decide for them (with `revert`, SO_KEEPALIVE
    /// off where none matches), else they keep its values.
    pub fn delete_rule_reaching(
        &self,
        id: u32,
        reach: Option<Reach>,
    ) -> Result<(Rule, Option<Result<Reached>>)> {
        let _lock = self.lock()?;
        if let Some(how) = reach.filter(|h| h.dry_run) {
            let mut after = self.rules()?;
            let Some(i) = after.iter().position(|r| r.id == id) else {
                return Err(Error::NoSuchRule(id));
            };
            let gone = [after.remove(i)];
            let pass = Pass {
                after: Some(&after),
                ..Pass::of(&gone, &[])
            };
            let reached = self.reach_locked(&pass, how);
            let [rule] = gone;
            return Ok((rule, Some(reached)));
        }
        let mut rules = self.rules_map()?;
        let rule = self.remove_rule(&mut rules, id)?;
        let reached =
            reach.map(|how| self.reach_locked(&Pass::of(std::slice::from_ref(&rule), &[]), how));
        Ok((rule, reached))
    }

    pub(super) fn remove_rule(&self, rules: &mut RuleTable, id: u32) -> Result<Rule> {
        let found = rules
            .iter()
            .filter_map(|r| r.ok())
            .find(|(_, v)| v.id == id);
        let Some((key, value)) = found else {
            return Err(Error::NoSuchRule(id));
        };
        rules
            .remove(&key)
            .map_err(|e| Error::map(format!("removing rule {id}"), e))?;
        crate::ports::sync_rules(&self.layout, rules, None, Some(&key.data()))?;
        let names = self.rule_names()?;
        let _ = self.names_map()?.remove(&id);
        let mut rule = rule_from_entry(&key, &value);
        let mut risk = self.risk_map()?;
        if let Ok(r) = risk.get(&id, 0) {
            rule.risk = crate::risk::Thresholds::from_raw(r);
            let _ = risk.remove(&id);
        }
        crate::ports::bump_generation(&self.layout)?;
        rule.name = names.get(&id).cloned();
        Ok(rule)
    }

    /// Records rule `id`'s own thresholds, or forgets them when it has the
    /// defaults.
    pub(super) fn set_rule_risk(
        &self,
        risk: &mut HashMap<MapData, u32, keepalive_common::risk::Risk>,
        id: u32,
        policy: &Policy,
    ) -> Result<()> {
        if policy.risk.is_default() {
            let _ = risk.remove(&id);
            return Ok(());
        }
        risk.insert(id, policy.risk.to_raw(), 0)
            .map_err(|e| Error::map("recording the rule's at-risk thresholds", e))
    }

    /// Rules' own early-warning thresholds, by rule id.
    pub(super) fn risk_map(&self) -> Result<HashMap<MapData, u32, keepalive_common::risk::Risk>> {
        HashMap::try_from(crate::pinned::open_map(&self.layout, maps::RISK)?)
            .map_err(|e| Error::map("opening the rules' at-risk thresholds", e))
    }

    pub(super) fn names_map(&self) -> Result<HashMap<MapData, u32, RuleName>> {
        HashMap::try_from(crate::pinned::open_map(&self.layout, maps::RULE_NAMES)?)
            .map_err(|e| Error::map("opening the rule names", e))
    }

    /// Names of the rules a configuration file manages, by rule id.
    pub(super) fn rule_names(&self) -> Result<std::collections::HashMap<u32, String>> {
        let map = self.names_map()?;
        let mut out = std::collections::HashMap::new();
        for entry in map.iter() {
            let (id, name) = entry.map_err(|e| Error::map("reading the rule names", e))?;
            let len = name.bytes.iter().position(|b| *b == 0).unwrap_or(32);
            out.insert(id, String::from_utf8_lossy(&name.bytes[..len]).into_owned());
        }
        Ok(out)
    }

    /// Turns the kernel programs' decision log (`tcpka trace`) on or off;
    /// returns whether it was on.
    pub fn set_trace(&self, on: bool) -> Result<bool> {
        let _lock = self.lock()?;
        crate::ports::set_flag(&self.layout, keepalive_common::ports::FLAG_TRACE, on)
    }

    /// All rules, by id.
    pub fn rules(&self) -> Result<Vec<Rule>> {
        let rules = self.rules_map()?;
        let names = self.rule_names()?;
        let risk = self.risk_map()?;
        let mut out = Vec::new();
        for entry in rules.iter() {
            let (key, value) = entry.map_err(|e| Error::map("reading the rule table", e))?;
            let mut rule = rule_from_entry(&key, &value);
            rule.name = names.get(&rule.id).cloned();
            if let Ok(r) = risk.get(&rule.id, 0) {
                rule.risk = crate::risk::Thresholds::from_raw(r);
            }
            out.push(rule);
        }
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    /// Brings the named rules to what `config` says (see
    /// [`crate::config::plan`]); with `dry_run`, only says what it would do.
    /// Everything is checked before the first change: a conflict or too
    /// many rules changes nothing.
    pub fn apply_config(&self, config: &Config, dry_run: bool) -> Result<Vec<ConfigStep>> {
        Ok(self
            .apply_config_reaching(config, dry_run, Some(Reach::default()))?
            .0)
    }

    /// [`Enforcer::apply_config`]; with `reach`, then the live connections
    /// the changed rules match get what the rules now decide for them
    /// (with `dry_run`, a preview of what they would get).
    pub fn apply_config_reaching(
        &self,
        config: &Config,
        dry_run: bool,
        reach: Option<Reach>,
    ) -> Result<(Vec<ConfigStep>, Option<Result<Reached>>)> {
        let _lock = self.lock()?;
        let steps = self.apply_owned_locked(config, dry_run, |name| {
            !name.starts_with(crate::config::FLEET_PREFIX)
        })?;
        let Some(how) = reach else {
            return Ok((steps, None));
        };
        let (mut gone, mut new) = (Vec::new(), Vec::new());
        for s in &steps {
            match s {
                ConfigStep::Add { rule } => new.push(rule.clone()),
                ConfigStep::Remove { rule } => gone.push(rule.clone()),
                ConfigStep::Change { from, to } => {
                    gone.push(from.clone());
                    new.push(to.clone());
                }
            }
        }
        if !dry_run {
            return Ok((steps, Some(self.reach_locked(&Pass::of(&gone, &new), how))));
        }
        // The table as the steps would leave it: the rules they add take
        // ids above every other, in order, as they would.
        let reached = self.rules().and_then(|mut after| {
            after.retain(|r| !gone.iter().any(|g| g.id == r.id));
            for (i, s) in steps.iter().enumerate() {
                if let ConfigStep::Add { rule: to } | ConfigStep::Change { to, .. } = s {
                    let id = match s {
                        ConfigStep::Change { from, .. } if from.matcher() == to.matcher() => {
                            from.id
                        }
                        _ => PREVIEW_ID + i as u32,
                    };
                    after.push(Rule { id, ..to.clone() });
                }
            }
            let pass = Pass {
                after: Some(&after),
                ..Pass::of(&gone, &new)
            };
            self.reach_locked(&pass, how)
        });
        Ok((steps, Some(reached)))
    }

    /// Every rule (as [`Enforcer::rules`]) and the rule generation read
    /// before them: a change made while they were read shows as a new
    /// generation next time.
    pub fn rules_with_generation(&self) -> Result<(Vec<Rule>, u32)> {
        let generation = crate::ports::generation(&self.layout)?;
        Ok((self.rules()?, generation))
    }

    /// The rule generation: it moves with every change a command or a file
    /// makes to the rule table (one map lookup).
    pub fn rule_generation(&self) -> Result<u32> {
        crate::ports::generation(&self.layout)
    }

    /// Applies fleet changes (names without the `@`) under one lock, each
    /// on its own: the result of each op, in order (the rule's id, or why
    /// it failed). Nothing here reads the whole table: removals are by key
    /// and id, new ids come from the installation record (and above
    /// `min_id`), and the port filter is only widened ([`Enforcer::
    /// narrow_rule_filter`] narrows it). Removals go first, so that a full
    /// table makes room before additions.
    /// Live connections are not reached here: the caller gathers the keys
    /// of a stream of changes for one [`Enforcer::reach`].
    pub fn fleet_batch(&self, ops: &[FleetOp], min_id: u32) -> Result<Vec<Result<u32>>> {
        let _lock = self.lock()?;
        let mut rules = self.rules_map()?;
        let mut names = self.names_map()?;
        let mut risk = self.risk_map()?;
        let mut next = self.reserve_fleet_ids(ops, min_id)?;
        let mut out: Vec<Result<u32>> = Vec::with_capacity(ops.len());
        for op in ops {
            out.push(match op {
                FleetOp::Remove { id, matcher, .. } => {
                    fleet_remove(&mut rules, &mut names, &mut risk, *id, matcher)
                }
                FleetOp::Replace { id, rule } => {
                    self.fleet_replace(&mut rules, &mut risk, *id, rule)
                }
                FleetOp::Add(rule) => {
                    let id = next;
                    next += 1;
                    self.fleet_add(&mut rules, &mut names, &mut risk, id, rule)
                }
            });
        }
        Ok(out)
    }

    /// For the additions of a fleet batch: moves the installation record's
    /// rule id counter past them (above `min_id`), then widens the rule port
    /// filter to their keys. Returns the first of their ids (0 without
    /// additions). On failure nothing is added; a counter moved stays
    /// moved (ids skipped, never handed out twice).
    fn reserve_fleet_ids(&self, ops: &[FleetOp], min_id: u32) -> Result<u32> {
        let adds = ops.iter().filter(|o| matches!(o, FleetOp::Add(_))).count() as u32;
        let mut next = 0;
        if adds > 0 {
            let mut meta = crate::pinned::read_meta(&self.layout)?;
            next = meta.next_rule_id.max(min_id).max(1);
            // The counter moves first: a batch killed half-way skips ids,
            // and never hands one out twice.
            meta.next_rule_id = next + adds;
            crate::pinned::write_meta(&self.layout, &meta)?;
            let keys: Vec<RuleKey> = ops
                .iter()
                .filter_map(|o| match o {
                    FleetOp::Add(r) => Some(r.matcher.key().1),
                    _ => None,
                })
                .collect();
            crate::ports::widen_rules(&self.layout, &keys)?;
        }
        Ok(next)
    }

    /// A fleet batch's new values for rule `id` (its match unchanged): its
    /// at-risk thresholds, then its entry. On failure the thresholds may be
    /// the new ones already.
    fn fleet_replace(
        &self,
        rules: &mut RuleTable,
        risk: &mut HashMap<MapData, u32, keepalive_common::risk::Risk>,
        id: u32,
        rule: &NamedRule,
    ) -> Result<u32> {
        // Checked when the rule was parsed.
        let p = rule.policy;
        self.set_rule_risk(risk, id, &p)?;
        let (len, data) = rule.matcher.key();
        rules
            .insert(
                &Key::new(len, data),
                rule.matcher.value(id, p, rule.tracked, rule.new_only),
                BPF_EXIST,
            )
            .map_err(|e| Error::map(format!("changing rule {id}"), e))
            .map(|()| id)
    }

    /// A fleet batch's new rule, as `id`: its name, its at-risk thresholds,
    /// then its entry. A rule whose entry is refused (a duplicate, a full
    /// table) leaves no name or thresholds behind.
    fn fleet_add(
        &self,
        rules: &mut RuleTable,
        names: &mut HashMap<MapData, u32, RuleName>,
        risk: &mut HashMap<MapData, u32, keepalive_common::risk::Risk>,
        id: u32,
        rule: &NamedRule,
    ) -> Result<u32> {
        // Checked when the rule was parsed.
        let p = rule.policy;
        let (len, data) = rule.matcher.key();
        let key = Key::new(len, data);
        let name = format!("{}{}", crate::config::FLEET_PREFIX, rule.name);
        names
            .insert(id, rule_name(&name), BPF_NOEXIST)
            .map_err(|e| Error::map("recording the rule's name", e))?;
        self.set_rule_risk(risk, id, &p)?;
        let inserted = rules.insert(
            &key,
            rule.matcher.value(id, p, rule.tracked, rule.new_only),
            BPF_NOEXIST,
        );
        if inserted.is_err() {
            let _ = names.remove(&id);
            let _ = risk.remove(&id);
        }
        match inserted {
            Ok(()) => Ok(id),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Err(Error::DuplicateRule(
                    rules.get(&key, 0).map(|v| v.id).unwrap_or(0),
                ))
            }
            Err(MapError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::ENOSPC | libc::E2BIG)) =>
            {
                Err(Error::RulesFull(RULES_MAX_ENTRIES))
            }
            Err(e) => Err(Error::map("adding the rule", e)),
        }
    }

    /// Narrows the rule port filter to the rules in the table (a full
    /// read): after [`Enforcer::fleet_batch`] removed rules.
    pub fn narrow_rule_filter(&self) -> Result<()> {
        let _lock = self.lock()?;
        let rules = self.rules_map()?;
        crate::ports::sync_rules(&self.layout, &rules, None, None)
    }

    fn apply_owned_locked(
        &self,
        config: &Config,
        dry_run: bool,
        owned: impl Fn(&str) -> bool,
    ) -> Result<Vec<ConfigStep>> {
        let steps =
            crate::config::plan_owned(&self.rules()?, config, owned).map_err(Error::Conflict)?;
        let installed = self.rules()?.len();
        let adds = steps
            .iter()
            .filter(|s| match s {
                ConfigStep::Add { .. } => true,
                ConfigStep::Change { from, to } => from.matcher() != to.matcher(),
                ConfigStep::Remove { .. } => false,
            })
            .count();
        if installed + adds > RULES_MAX_ENTRIES as usize {
            return Err(Error::RulesFull(RULES_MAX_ENTRIES));
        }
        if dry_run {
            return Ok(steps);
        }
        let mut rules = self.rules_map()?;
        for (done, step) in steps.iter().enumerate() {
            let r = self.apply_step(&mut rules, step);
            if let Err(e) = r {
                return Err(Error::Partial {
                    done,
                    total: steps.len(),
                    step: step.to_string(),
                    source: Box::new(e),
                });
            }
        }
        Ok(steps)
    }

    pub(super) fn apply_step(&self, rules: &mut RuleTable, step: &ConfigStep) -> Result<()> {
        let policy = |r: &Rule| {
            Policy::new(r.idle, r.count, r.interval, r.user_timeout_ms).map(|p| p.with_risk(r.risk))
        };
        match step {
            ConfigStep::Add { rule } => {
                let p = policy(rule)?;
                self.insert_rule(
                    rules,
                    rule.matcher(),
                    p,
                    rule.tracked,
                    rule.new_only,
                    rule.name.as_deref(),
                )?;
            }
            ConfigStep::Change { from, to } if from.matcher() == to.matcher() => {
                // Same key: the value is replaced at once, id kept (its
                // thresholds first: sock_ops reads them with the rule).
                let (len, data) = to.matcher().key();
                let p = policy(to)?;
                self.set_rule_risk(&mut self.risk_map()?, from.id, &p)?;
                let value = to.matcher().value(from.id, p, to.tracked, to.new_only);
                rules
                    .insert(&Key::new(len, data), value, BPF_EXIST)
                    .map_err(|e| Error::map(format!("changing rule {}", from.id), e))?;
                crate::ports::bump_generation(&self.layout)?;
            }
            ConfigStep::Change { from, to } => {
                // A new match: the new rule first, then the old one goes.
                let p = policy(to)?;
                self.insert_rule(
                    rules,
                    to.matcher(),
                    p,
                    to.tracked,
                    to.new_only,
                    to.name.as_deref(),
                )?;
                self.remove_rule(rules, from.id)?;
            }
            ConfigStep::Remove { rule } => {
                self.remove_rule(rules, rule.id)?;
            }
        }
        Ok(())
    }
}

/// A fleet batch's removal of rule `id`, found by its match: its entry
/// (when the key is still that rule's), then its name and thresholds. A
/// rule gone already counts as removed; on failure nothing is removed.
fn fleet_remove(
    rules: &mut RuleTable,
    names: &mut HashMap<MapData, u32, RuleName>,
    risk: &mut HashMap<MapData, u32, keepalive_common::risk::Risk>,
    id: u32,
    matcher: &RuleMatch,
) -> Result<u32> {
    let (len, data) = matcher.key();
    let key = Key::new(len, data);
    match rules.get(&key, 0) {
        Ok(v) if v.id == id => rules
            .remove(&key)
            .map_err(|e| Error::map(format!("removing rule {id}"), e))
            .map(|()| {
                let _ = names.remove(&id);
                let _ = risk.remove(&id);
                id
            }),
        // Gone already, or the key is another rule's now.
        _ => {
            let _ = names.remove(&id);
            let _ = risk.remove(&id);
            Ok(id)
        }
    }
}

/// One change of [`Enforcer::fleet_batch`]; rule names without the `@`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetOp {
    /// Removes rule `id`, found by its match (`new_only`: it was a rule
    /// for new connections only).
    Remove {
        id: u32,
        matcher: RuleMatch,
        new_only: bool,
    },
    /// New values for rule `id`, match unchanged.
    Replace { id: u32, rule: NamedRule },
    /// A new rule.
    Add(NamedRule),
}

pub(super) fn rule_from_entry(key: &Key<RuleKey>, value: &RuleValue) -> Rule {
    let m = RuleMatch::from_key(key.prefix_len(), &key.data(), value.fields);
    Rule {
        new_only: value.opts & rules::OPT_NEW_ONLY != 0,
        ..Rule::new(
            value.id,
            m,
            Policy::from_raw(&value.policy),
            value.opts & rules::OPT_UNTRACKED == 0,
        )
    }
}
