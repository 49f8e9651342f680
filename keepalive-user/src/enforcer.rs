//! Operations on a loaded installation: rules and managed connections. The
//! CLI, the daemon and the tests all go through here.
use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, MapError, PerCpuArray};
use keepalive_common::{
    conns::ConnInfo,
    maps,
    rules::{RuleKey, RuleValue},
    stats, RULES_MAX_ENTRIES,
};

use crate::{
    loader::{self, Lock},
    paths::PinLayout,
    policy::Policy,
    rule::{Rule, RuleMatch},
    Error, Result,
};

const BPF_NOEXIST: u64 = 1;

/// Handle on one installation's pinned maps.
#[derive(Clone, Debug, Default)]
pub struct Enforcer {
    layout: PinLayout,
}

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Counters {
    pub applied_by_rule: u64,
    pub setsockopt_errors: u64,
    pub conns_map_full: u64,
    pub conns_closed: u64,
    pub events_dropped: u64,
}

impl Enforcer {
    pub fn new(layout: PinLayout) -> Self {
        Self { layout }
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    fn rules_map(&self) -> Result<LpmTrie<aya::maps::MapData, RuleKey, RuleValue>> {
        let map = loader::open_map(&self.layout, maps::RULES)?;
        LpmTrie::try_from(map).map_err(|e| Error::map("opening the rule table", e))
    }

    /// Adds a rule for connections established from now on; returns it with
    /// its new id.
    pub fn add_rule(&self, m: RuleMatch, policy: Policy) -> Result<Rule> {
        let _lock = Lock::acquire(&self.layout)?;
        let mut rules = self.rules_map()?;
        let mut meta = loader::read_meta(&self.layout)?;
        let id = meta.next_rule_id.max(1);
        let (prefix_len, data) = m.key();
        let key = Key::new(prefix_len, data);
        match rules.insert(&key, m.value(id, policy), BPF_NOEXIST) {
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
        meta.next_rule_id = id + 1;
        if let Err(e) = loader::write_meta(&self.layout, &meta) {
            // Keep the tables consistent: no rule whose id may be handed out
            // again.
            let _ = rules.remove(&key);
            return Err(e);
        }
        Ok(Rule::new(id, m, policy))
    }

    /// Removes a rule. Connections that already got its policy keep it.
    pub fn delete_rule(&self, id: u32) -> Result<Rule> {
        let _lock = Lock::acquire(&self.layout)?;
        let mut rules = self.rules_map()?;
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
        Ok(rule_from_entry(&key, &value))
    }

    /// All rules, by id.
    pub fn rules(&self) -> Result<Vec<Rule>> {
        let rules = self.rules_map()?;
        let mut out = Vec::new();
        for entry in rules.iter() {
            let (key, value) = entry.map_err(|e| Error::map("reading the rule table", e))?;
            out.push(rule_from_entry(&key, &value));
        }
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    /// The connections the kernel programs manage, by socket cookie.
    pub fn managed(&self) -> Result<Vec<(u64, ConnInfo)>> {
        let map = loader::open_map(&self.layout, maps::CONNS)?;
        let conns: HashMap<_, u64, ConnInfo> =
            HashMap::try_from(map).map_err(|e| Error::map("opening the connection map", e))?;
        let mut out = Vec::new();
        for entry in conns.iter() {
            match entry {
                Ok(kv) => out.push(kv),
                // An entry removed between two reads: the connection closed.
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(Error::map("reading the connection map", e)),
            }
        }
        Ok(out)
    }

    /// Kernel-side counters.
    pub fn counters(&self) -> Result<Counters> {
        let map = loader::open_map(&self.layout, maps::STATS)?;
        let array: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|e| Error::map("opening the counters", e))?;
        let get = |i: u32| -> Result<u64> {
            let v = array
                .get(&i, 0)
                .map_err(|e| Error::map("reading the counters", e))?;
            Ok(v.iter().sum())
        };
        Ok(Counters {
            applied_by_rule: get(stats::APPLIED_RULE)?,
            setsockopt_errors: get(stats::SETSOCKOPT_ERRORS)?,
            conns_map_full: get(stats::CONNS_FULL)?,
            conns_closed: get(stats::CONNS_CLOSED)?,
            events_dropped: get(stats::EVENTS_DROPPED)?,
        })
    }
}

fn rule_from_entry(key: &Key<RuleKey>, value: &RuleValue) -> Rule {
    let m = RuleMatch::from_key(key.prefix_len(), &key.data(), value.fields);
    Rule::new(value.id, m, Policy::from_raw(&value.policy))
}
