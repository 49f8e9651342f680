//! A rule change reaching the connections that already exist: the rule
//! keys it touched go to the kernel for one pass of the rules iterator,
//! which gives each live connection in the attached cgroup one of them
//! matches what the rules now decide for it (see `tcpka_iter_rules`).
//!
//! A preview (`dry_run`) runs the same pass before the change, and the
//! kernel only reports the connections as they are: the decision is made
//! here, with the rules as the change would leave them, by the precedence
//! sock_ops applies ([`crate::rule::best`]).
use aya::maps::{lpm_trie::Key, Array, LpmTrie, MapData};
use keepalive_common::{
    maps,
    ports::{FLAG_REAPPLY_ANY_PORT, FLAG_REAPPLY_DRY_RUN, FLAG_REAPPLY_REVERT},
    requests::{
        ConnRecord, APPLY_SETSOCKOPT_FAILED, REAPPLY_LOCAL, REAPPLY_NO_RULE, REAPPLY_PEEK,
        REAPPLY_REMOTE,
    },
    rules::RuleKey,
    RULES_MAX_ENTRIES,
};

use super::{probe, status::ConnStatus, walk::parse_raw, Enforcer};
use crate::{
    conn::endpoint,
    lend::{lend, Lent},
    rule::Rule,
    Error, Result,
};

/// How a rule change treats live connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    /// Count and report, change nothing (not even the rules).
    pub dry_run: bool,
    /// A connection a changed rule matched and no rule matches now gets
    /// SO_KEEPALIVE off (default: left as it is: tcpka cannot know whether
    /// the application turned keepalive on itself).
    pub revert: bool,
}

/// What one pass did (or, dry, would do) to live connections.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reached {
    /// Connections given a rule's values (or that would be).
    pub changed: usize,
    /// Connections a changed rule matched that no rule matches now, with
    /// keepalive on: left as they are, or turned off with `revert`.
    pub unmatched: usize,
    /// Connections the kernel refused a value for.
    pub failed: usize,
    pub dry_run: bool,
    /// Microseconds the passes took (the walk of the socket table, the
    /// decisions and their setup), not the rule change itself.
    pub took_us: u64,
    /// Per rule: the rule that now decides the connections it changed
    /// (or, for those no rule matches any more, the rule they lost).
    pub rules: Vec<RuleReached>,
    /// The first connections, for a look (in a preview, as they are now).
    pub sample: Vec<ConnStatus>,
}

/// What one rule does to live connections, in [`Reached::rules`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RuleReached {
    /// The rule's name, or `rule N` for one added by hand (`new rule` for
    /// one a preview adds); `no rule` when the rule a connection lost is
    /// not known.
    pub rule: String,
    /// The rule's id (none for a rule a preview adds).
    pub id: Option<u32>,
    /// Its match, in `rule add` terms.
    #[serde(rename = "match")]
    pub matcher: Option<String>,
    /// Connections it gives its values (or would).
    pub changed: usize,
    /// Connections it matched that no rule matches now.
    pub unmatched: usize,
    /// The first of them.
    pub sample: Vec<ConnStatus>,
}

/// Connections listed in [`Reached::sample`] and each rule's sample.
const SAMPLE: usize = 10;
/// Rule keys one pass takes (the changed-rule map's size).
const REACH_KEYS_MAX: usize = RULES_MAX_ENTRIES as usize * 2;
/// Id of the rules a preview adds, in [`Pass::after`] and above: above
/// every real id, so they lose ties as a new rule would.
pub const PREVIEW_ID: u32 = u32::MAX / 2;

/// One pass of the rules iterator.
pub(super) struct Pass<'a> {
    /// Where to look: the matches of the rules the change touched (as they
    /// were and as they are).
    pub keys: Vec<(u32, RuleKey)>,
    /// The rules the change removed or replaced, as they were: they name
    /// the rule a connection no rule matches any more lost.
    pub gone: &'a [Rule],
    /// For a preview: every rule, as the change would leave the table.
    pub after: Option<&'a [Rule]>,
}

impl<'a> Pass<'a> {
    /// A pass over the matches of `gone` and `new`, but for the rules
    /// for new connections only (`new_only`).
    pub fn of(gone: &'a [Rule], new: &[Rule]) -> Self {
        Self {
            keys: gone
                .iter()
                .chain(new)
                .filter(|r| !r.new_only)
                .map(|r| r.matcher().key())
                .collect(),
            gone,
            after: None,
        }
    }
}

/// How a connection reported by the pass is counted.
enum Verdict<'r> {
    /// Given this rule's values (or would be); `None` when only its id is
    /// known (the kernel decided).
    Changed(Option<&'r Rule>, u32),
    /// No rule matches it any more.
    Unmatched,
}

/// What the rules as a change leaves them decide for a connection reported
/// as it is: `None` when nothing would change.
fn preview<'r>(after: &'r [Rule], r: &ConnRecord) -> Option<Verdict<'r>> {
    let remote = endpoint(r.family, r.remote_addr, r.remote_port);
    match crate::rule::best(after, r.local_port, remote) {
        None => (r.keepalive != 0).then_some(Verdict::Unmatched),
        // Only for connections established after it.
        Some(rule) if rule.new_only => None,
        Some(rule) => {
            let same = r.keepalive == 1
                && r.idle == rule.idle
                && r.interval == rule.interval
                && r.count == rule.count
                && rule
                    .user_timeout_ms
                    .is_none_or(|ms| r.user_timeout_ms == ms);
            (!same).then_some(Verdict::Changed(Some(rule), rule.id))
        }
    }
}

/// How a rule is named in [`RuleReached`].
fn label(rule: &Rule) -> String {
    match &rule.name {
        Some(n) => n.clone(),
        None if rule.id >= PREVIEW_ID => "new rule".to_owned(),
        None => format!("rule {}", rule.id),
    }
}

impl Reached {
    fn empty(how: Reach) -> Self {
        Self {
            dry_run: how.dry_run,
            ..Self::default()
        }
    }

    /// Adds the connections of another pass.
    fn merge(&mut self, other: Reached) {
        self.changed += other.changed;
        self.unmatched += other.unmatched;
        self.failed += other.failed;
        self.took_us += other.took_us;
        for r in other.rules {
            match self.rules.iter_mut().find(|m| m.rule == r.rule) {
                Some(m) => {
                    m.changed += r.changed;
                    m.unmatched += r.unmatched;
                    m.sample.extend(r.sample);
                    m.sample.truncate(SAMPLE);
                }
                None => self.rules.push(r),
            }
        }
        self.sample.extend(other.sample);
        self.sample.truncate(SAMPLE);
    }

    /// Counts one connection under its rule.
    fn count(&mut self, rule: Option<&Rule>, id: u32, unmatched: bool, conn: &ConnStatus) {
        if unmatched {
            self.unmatched += 1;
        } else {
            self.changed += 1;
        }
        let (name, id, matcher) = match rule {
            Some(r) => (
                label(r),
                (r.id < PREVIEW_ID).then_some(r.id),
                Some(r.describe_match()),
            ),
            None if id != 0 => (format!("rule {id}"), Some(id), None),
            None => ("no rule".to_owned(), None, None),
        };
        let i = match self.rules.iter().position(|m| m.rule == name) {
            Some(i) => i,
            None => {
                self.rules.push(RuleReached {
                    rule: name,
                    id,
                    matcher,
                    ..RuleReached::default()
                });
                self.rules.len() - 1
            }
        };
        let entry = &mut self.rules[i];
        if unmatched {
            entry.unmatched += 1;
        } else {
            entry.changed += 1;
        }
        if entry.sample.len() < SAMPLE {
            entry.sample.push(conn.clone());
        }
        if self.sample.len() < SAMPLE {
            self.sample.push(conn.clone());
        }
    }
}

impl Enforcer {
    /// What a change would do to live connections, changing nothing:
    /// `gone` and `new` are the rules it would remove and add (a replaced
    /// rule in both, as it is and as it would be), `after` the whole table
    /// as it would leave it (the rules it adds with ids from
    /// [`PREVIEW_ID`] up).
    pub fn preview(&self, gone: &[Rule], new: &[Rule], after: &[Rule]) -> Result<Reached> {
        let _lock = self.lock()?;
        let pass = Pass {
            after: Some(after),
            ..Pass::of(gone, new)
        };
        if pass.keys.len() > REACH_KEYS_MAX {
            return Err(Error::RulesFull(RULES_MAX_ENTRIES));
        }
        self.reach_locked(&pass, Reach::default())
    }

    /// [`Enforcer::reach_locked`] under the installation lock, for rule
    /// changes made earlier (the fleet's, gathered over a stream of
    /// changes): the live connections one of `keys` matches get what the
    /// rules now decide. Keys beyond one pass's room go in further passes.
    pub fn reach(&self, keys: &[(u32, RuleKey)], how: Reach) -> Result<Reached> {
        let _lock = self.lock()?;
        let mut total = Reached::empty(how);
        for chunk in keys.chunks(REACH_KEYS_MAX) {
            let pass = Pass {
                keys: chunk.to_vec(),
                gone: &[],
                after: None,
            };
            total.merge(self.reach_locked(&pass, how)?);
        }
        Ok(total)
    }

    /// Gives the live connections one of the pass's keys matches what the
    /// rules now decide for them (one walk of this namespace's sockets);
    /// a preview (a pass with [`Pass::after`]) changes nothing and says
    /// what the rules in `after` would do; `how.dry_run` follows the pass. The caller holds the
    /// installation lock (and, unless previewing, has changed the rules).
    pub(super) fn reach_locked(&self, pass: &Pass, how: Reach) -> Result<Reached> {
        // A preview is a pass with the rules as they would be.
        let how = Reach {
            dry_run: pass.after.is_some(),
            ..how
        };
        let mut out = Reached::empty(how);
        if pass.keys.is_empty() {
            return Ok(out);
        }
        let started = std::time::Instant::now();
        // No walk when the kernel says no established connection can match.
        let records = if probe::may_match(&pass.keys) {
            parse_raw(&self.run_rules_pass(&pass.keys, how)?)
        } else {
            Vec::new()
        };
        // The names of the deciding rules, read only when there is
        // something to name.
        let mut table: Option<Vec<Rule>> = None;
        for r in &records {
            let verdict = match pass.after {
                Some(after) if r.apply_failed & REAPPLY_PEEK != 0 => preview(after, r),
                // A preview pass on a kernel program that decided: never
                // with a matching installation (the layout version).
                Some(_) => None,
                None if r.apply_failed & REAPPLY_NO_RULE != 0 => Some(Verdict::Unmatched),
                None => Some(Verdict::Changed(None, r.rule_id)),
            };
            let Some(verdict) = verdict else { continue };
            let conn = ConnStatus::from_raw(r);
            if !how.dry_run && r.apply_failed & APPLY_SETSOCKOPT_FAILED != 0 {
                out.failed += 1;
            }
            match verdict {
                Verdict::Changed(Some(rule), id) => out.count(Some(rule), id, false, &conn),
                Verdict::Changed(None, id) => {
                    if table.is_none() {
                        table = Some(self.rules().unwrap_or_default());
                    }
                    let rule = table.as_deref().and_then(|t| t.iter().find(|x| x.id == id));
                    out.count(rule, id, false, &conn);
                }
                Verdict::Unmatched => {
                    let remote = endpoint(r.family, r.remote_addr, r.remote_port);
                    let lost = crate::rule::best(pass.gone, r.local_port, remote);
                    out.count(lost, 0, true, &conn);
                }
            }
        }
        out.took_us = started.elapsed().as_micros() as u64;
        Ok(out)
    }

    /// Runs the rules iterator over the connections `keys` match; returns
    /// its records. Every mark it sets is cleared again, whatever happens.
    fn run_rules_pass(&self, keys: &[(u32, RuleKey)], how: Reach) -> Result<Vec<u8>> {
        let mut changed: LpmTrie<MapData, RuleKey, u32> =
            LpmTrie::try_from(crate::pinned::open_map(&self.layout, maps::CHANGED)?)
                .map_err(|e| Error::map("opening the changed-rule map", e))?;
        let mut ports: Lent<Array<MapData, u32>> = lend(&self.layout, maps::REQ_PORTS)?;
        let mut any_port = false;
        let mut marked: Vec<(u32, u32)> = Vec::new();
        let mut mark = |ports: &mut Lent<Array<MapData, u32>>, port: u16, bit: u32| -> Result<()> {
            let i = u32::from(port);
            let old = ports
                .get(&i, 0)
                .map_err(|e| Error::map("reading the request ports", e))?;
            ports
                .set(i, old | bit, 0)
                .map_err(|e| Error::map("marking the changed rules' ports", e))?;
            marked.push((i, bit));
            Ok(())
        };
        let prepared = (|| -> Result<()> {
            // No report kept from a pass that was cut short.
            let mut unsent: Lent<Array<MapData, keepalive_common::requests::Unsent>> =
                lend(&self.layout, maps::UNSENT)?;
            unsent
                .set(0, keepalive_common::requests::Unsent::default(), 0)
                .map_err(|e| Error::map("clearing the unsent report", e))?;
            for (len, k) in keys {
                changed
                    .insert(&Key::new(*len, *k), 1, 0)
                    .map_err(|e| Error::map("recording the changed rules", e))?;
                if k.local_port != 0 {
                    mark(&mut ports, k.local_port, REAPPLY_LOCAL)?;
                } else if k.remote_port != 0 {
                    mark(&mut ports, k.remote_port, REAPPLY_REMOTE)?;
                } else {
                    any_port = true;
                }
            }
            let mut flags = 0;
            if how.dry_run {
                flags |= FLAG_REAPPLY_DRY_RUN;
            }
            if how.revert {
                flags |= FLAG_REAPPLY_REVERT;
            }
            if any_port {
                flags |= FLAG_REAPPLY_ANY_PORT;
            }
            if flags != 0 {
                crate::ports::set_flag(&self.layout, flags, true)?;
            }
            Ok(())
        })();
        let found = prepared.and_then(|()| crate::pass::run(&self.layout.iter_rules(), None, None));
        for (len, k) in keys {
            let _ = changed.remove(&Key::new(*len, *k));
        }
        for (i, bit) in &marked {
            if let Ok(old) = ports.get(i, 0) {
                let _ = ports.set(*i, old & !bit, 0);
            }
        }
        let _ = crate::ports::set_flag(
            &self.layout,
            FLAG_REAPPLY_DRY_RUN | FLAG_REAPPLY_REVERT | FLAG_REAPPLY_ANY_PORT,
            false,
        );
        found
    }
}

/// What a change did (or would do) to live connections, as the `live`
/// field of a reply: null when it did not reach them, `{"error": ...}`
/// when they could not be reached.
pub fn live_json(reached: &Option<Result<Reached>>) -> serde_json::Value {
    match reached {
        None => serde_json::Value::Null,
        Some(Ok(r)) => serde_json::to_value(r).unwrap_or(serde_json::Value::Null),
        Some(Err(e)) => serde_json::json!({ "error": crate::one_line(e) }),
    }
}
