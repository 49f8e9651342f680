//! The port filter sock_ops reads before anything else
//! ([`keepalive_common::ports`]): the ports rules name, and the index ports
//! whose connections are indexed so that a controller reaches them
//! directly. A connection on no such port costs every process two array
//! reads and nothing more.
//!
//! Bits for a rule are set before the rule is inserted and cleared after it
//! is removed: a command killed in between leaves a bit too many (a lookup
//! that finds nothing), never a rule the filter hides.
use std::borrow::{Borrow, BorrowMut};

use aya::maps::{Array, LpmTrie, MapData};
use keepalive_common::{
    maps,
    ports::{
        self, FLAGS, FLAG_ANY_PORT_RULE, FLAG_INDEX_ALL, FLAG_RULE_EVENTS, INDEX, RULES_LOCAL,
        RULES_REMOTE, WORDS,
    },
    rules::{RuleKey, RuleValue},
};

use crate::{paths::PinLayout, Error, Result};

/// Which connections sock_ops indexes (with `--index ports`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexPorts {
    /// Every connection in the cgroup.
    All,
    /// Connections with either end on one of these ports.
    List(Vec<u16>),
}

impl Default for IndexPorts {
    fn default() -> Self {
        IndexPorts::List(ports::DEFAULT_INDEX.to_vec())
    }
}

impl IndexPorts {
    /// Parses `all` or a comma-separated list of ports (1..=65535).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        if s.trim() == "all" {
            return Ok(IndexPorts::All);
        }
        let mut out = Vec::new();
        for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let port = crate::rule::parse_port(p).map_err(|e| e.to_string())?;
            if port == 0 {
                return Err("index ports must be in 1..=65535, got 0".into());
            }
            if !out.contains(&port) {
                out.push(port);
            }
        }
        out.sort_unstable();
        Ok(IndexPorts::List(out))
    }
}

impl std::fmt::Display for IndexPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexPorts::All => f.write_str("all"),
            IndexPorts::List(l) if l.is_empty() => f.write_str("none"),
            IndexPorts::List(l) => {
                let s: Vec<String> = l.iter().map(u16::to_string).collect();
                f.write_str(&s.join(","))
            }
        }
    }
}

fn open(layout: &PinLayout) -> Result<crate::lend::Lent<Array<MapData, u64>>> {
    crate::lend::lend(layout, maps::PORTS)
}

fn read_set<T: Borrow<MapData>>(map: &Array<T, u64>, base: u32) -> Result<Vec<u64>> {
    (0..WORDS)
        .map(|i| {
            map.get(&(base + i), 0)
                .map_err(|e| Error::map("reading the port filter", e))
        })
        .collect()
}

/// Writes the given words of one set (never read back: each bpf call on
/// this path is one more step a killed command could stop at).
fn write_words<T: BorrowMut<MapData>>(
    map: &mut Array<T, u64>,
    base: u32,
    set: &[u64],
    words: impl IntoIterator<Item = u32>,
) -> Result<()> {
    for w in words {
        map.set(base + w, set[w as usize], 0)
            .map_err(|e| Error::map("writing the port filter", e))?;
    }
    Ok(())
}

fn nonzero(set: &[u64]) -> impl Iterator<Item = u32> + '_ {
    set.iter()
        .enumerate()
        .filter(|(_, w)| **w != 0)
        .map(|(i, _)| i as u32)
}

fn set_bit(set: &mut [u64], port: u16) {
    let (word, bit) = ports::slot(0, port);
    set[word as usize] |= bit;
}

fn has_bit(set: &[u64], port: u16) -> bool {
    let (word, bit) = ports::slot(0, port);
    set[word as usize] & bit != 0
}

fn flags<T: Borrow<MapData>>(map: &Array<T, u64>) -> Result<u64> {
    map.get(&FLAGS, 0)
        .map_err(|e| Error::map("reading the port filter", e))
}

/// Writes the index ports and flags of a new installation (its map is all
/// zero), before it is pinned.
pub fn write_initial<T: BorrowMut<MapData>>(
    map: &mut Array<T, u64>,
    index: &IndexPorts,
    rule_events: bool,
    close_by_tracepoint: bool,
) -> Result<()> {
    let mut set = vec![0u64; WORDS as usize];
    let mut flags = 0;
    if close_by_tracepoint {
        flags |= ports::FLAG_CLOSE_BY_TRACEPOINT;
    }
    match index {
        IndexPorts::List(l) => l.iter().for_each(|&p| set_bit(&mut set, p)),
        IndexPorts::All => flags |= FLAG_INDEX_ALL,
    }
    if rule_events {
        flags |= FLAG_RULE_EVENTS;
    }
    // A generation of its own: an agent that saw another installation's
    // generation reads this one's rules afresh.
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() | 1);
    flags |= u64::from(start) << ports::GENERATION_SHIFT;
    if flags != 0 {
        map.set(FLAGS, flags, 0)
            .map_err(|e| Error::map("writing the port filter", e))?;
    }
    let words: Vec<u32> = nonzero(&set).collect();
    write_words(map, INDEX, &set, words)
}

/// Turns a flag of the filter on or off; returns whether it was on. The
/// caller holds the installation lock ([`sync_rules`] writes the same
/// word).
pub fn set_flag(layout: &PinLayout, flag: u64, on: bool) -> Result<bool> {
    let mut map = open(layout)?;
    let old = flags(&map)?;
    let new = if on { old | flag } else { old & !flag };
    if new != old {
        map.set(FLAGS, new, 0)
            .map_err(|e| Error::map("writing the port filter", e))?;
    }
    Ok(old & flag != 0)
}

/// The rule generation ([`ports::GENERATION_SHIFT`]).
pub fn generation(layout: &PinLayout) -> Result<u32> {
    Ok((flags(&*open(layout)?)? >> ports::GENERATION_SHIFT) as u32)
}

/// Adds one to the rule generation; the caller holds the installation
/// lock and has changed the rule table.
pub fn bump_generation(layout: &PinLayout) -> Result<()> {
    let mut map = open(layout)?;
    let old = flags(&map)?;
    let low = old & u64::from(u32::MAX);
    let generation = ((old >> ports::GENERATION_SHIFT) as u32).wrapping_add(1);
    map.set(
        FLAGS,
        low | u64::from(generation) << ports::GENERATION_SHIFT,
        0,
    )
    .map_err(|e| Error::map("writing the port filter", e))
}

/// Widens the rule port filter for rules about to be added, without
/// reading the rule table: their ports' bits (or the any-port flag) are
/// set, nothing is cleared. [`sync_rules`] narrows it again. The caller
/// holds the installation lock.
pub fn widen_rules(layout: &PinLayout, adding: &[RuleKey]) -> Result<()> {
    if adding.is_empty() {
        return Ok(());
    }
    let mut map = open(layout)?;
    let mut words: std::collections::BTreeMap<u32, u64> = Default::default();
    let mut any_port = false;
    for k in adding {
        if k.local_port == 0 && k.remote_port == 0 {
            any_port = true;
        }
        for (base, port) in [(RULES_LOCAL, k.local_port), (RULES_REMOTE, k.remote_port)] {
            if port != 0 {
                let (word, bit) = ports::slot(base, port);
                *words.entry(word).or_default() |= bit;
            }
        }
    }
    if any_port {
        let old = flags(&map)?;
        if old & FLAG_ANY_PORT_RULE == 0 {
            map.set(FLAGS, old | FLAG_ANY_PORT_RULE, 0)
                .map_err(|e| Error::map("writing the port filter", e))?;
        }
    }
    for (word, bits) in words {
        let old = map
            .get(&word, 0)
            .map_err(|e| Error::map("reading the port filter", e))?;
        if old | bits != old {
            map.set(word, old | bits, 0)
                .map_err(|e| Error::map("writing the port filter", e))?;
        }
    }
    Ok(())
}

/// Whether a flag of the filter is on.
pub fn flag(layout: &PinLayout, flag: u64) -> Result<bool> {
    Ok(flags(&*open(layout)?)? & flag != 0)
}

/// The index ports of an installation.
pub fn read_index(layout: &PinLayout) -> Result<IndexPorts> {
    let map = open(layout)?;
    if flags(&map)? & FLAG_INDEX_ALL != 0 {
        return Ok(IndexPorts::All);
    }
    let set = read_set(&map, INDEX)?;
    Ok(IndexPorts::List(
        (1..=u16::MAX).filter(|&p| has_bit(&set, p)).collect(),
    ))
}

/// Whether connections with `port` at either end are indexed (two map
/// reads the first time; the index ports are fixed at load, so the answer
/// is kept for the installation's generation).
pub fn is_index_port(layout: &PinLayout, port: u16) -> Result<bool> {
    type Known = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u16, bool>>>;
    let known = crate::pinned::memo::<Known>(layout, "index_ports", || Some(Known::default()));
    let lock = |k: &Known| {
        k.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&port)
            .copied()
    };
    if let Some(v) = known.as_ref().and_then(lock) {
        return Ok(v);
    }
    let v = read_is_index_port(layout, port)?;
    if let Some(k) = known {
        k.lock().unwrap_or_else(|p| p.into_inner()).insert(port, v);
    }
    Ok(v)
}

fn read_is_index_port(layout: &PinLayout, port: u16) -> Result<bool> {
    let map = open(layout)?;
    if flags(&map)? & FLAG_INDEX_ALL != 0 {
        return Ok(true);
    }
    let (word, bit) = ports::slot(INDEX, port);
    let w = map
        .get(&word, 0)
        .map_err(|e| Error::map("reading the port filter", e))?;
    Ok(w & bit != 0)
}

/// Makes the rule ports match the rule table `rules` plus `adding` (a
/// rule about to be inserted); `removed` is a rule just removed, whose
/// bits are cleared. Call with the installation lock held.
pub fn sync_rules(
    layout: &PinLayout,
    rules: &LpmTrie<MapData, RuleKey, RuleValue>,
    adding: Option<&RuleKey>,
    removed: Option<&RuleKey>,
) -> Result<()> {
    let mut local = vec![0u64; WORDS as usize];
    let mut remote = vec![0u64; WORDS as usize];
    let mut any_port = false;
    let keys = rules
        .iter()
        .filter_map(|r| r.ok())
        .map(|(k, _)| k.data())
        .chain(adding.copied());
    for k in keys {
        if k.local_port == 0 && k.remote_port == 0 {
            any_port = true;
        }
        if k.local_port != 0 {
            set_bit(&mut local, k.local_port);
        }
        if k.remote_port != 0 {
            set_bit(&mut remote, k.remote_port);
        }
    }
    // The words any rule uses, and those of the rule removed or added.
    let touched = |set: &[u64], pick: fn(&RuleKey) -> u16| {
        let mut words: Vec<u32> = nonzero(set).collect();
        for k in removed.into_iter().chain(adding) {
            words.push(ports::slot(0, pick(k)).0);
        }
        words.sort_unstable();
        words.dedup();
        words
    };
    let local_words = touched(&local, |k| k.local_port);
    let remote_words = touched(&remote, |k| k.remote_port);
    let mut map = open(layout)?;
    let old = flags(&map)?;
    let new = if any_port {
        old | FLAG_ANY_PORT_RULE
    } else {
        old & !FLAG_ANY_PORT_RULE
    };
    let set_flags = |map: &mut Array<MapData, u64>| {
        map.set(FLAGS, new, 0)
            .map_err(|e| Error::map("writing the port filter", e))
    };
    // Widen first, narrow last: the filter never hides a rule in the table.
    if new != old && any_port {
        set_flags(&mut map)?;
    }
    write_words(&mut map, RULES_LOCAL, &local, local_words)?;
    write_words(&mut map, RULES_REMOTE, &remote, remote_words)?;
    if new != old && !any_port {
        set_flags(&mut map)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_index_ports() {
        assert_eq!(IndexPorts::parse("all"), Ok(IndexPorts::All));
        assert_eq!(
            IndexPorts::parse("5061, 5060,5061"),
            Ok(IndexPorts::List(vec![5060, 5061]))
        );
        assert_eq!(IndexPorts::parse(""), Ok(IndexPorts::List(vec![])));
        assert!(IndexPorts::parse("0").is_err());
        assert!(IndexPorts::parse("65536").is_err());
        assert!(IndexPorts::parse("sip").is_err());
        assert_eq!(IndexPorts::default().to_string(), "5060,5061");
        assert_eq!(IndexPorts::List(vec![]).to_string(), "none");
    }

    #[test]
    fn bits_round_trip() {
        let mut set = vec![0u64; WORDS as usize];
        for p in [1, 63, 64, 5060, 65535] {
            set_bit(&mut set, p);
        }
        let back: Vec<u16> = (1..=u16::MAX).filter(|&p| has_bit(&set, p)).collect();
        assert_eq!(back, vec![1, 63, 64, 5060, 65535]);
    }
}
