//! Holders of a connection's keepalive. A SIP controller passes the
//! Call-ID: a shared connection keeps keepalive while any call on it is up,
//! and the last call's disable turns it off.
//!
//! Kept in pinned maps so that every `tcpka` process and the daemon see
//! the same holders. Changes happen under the installation lock.
//!
//! A map key holds [`ID_MAX`] bytes of id. Ids that fit are stored as they
//! are; longer ones, and any id starting with `#`, are stored as `#` and the
//! base64url (no padding) SHA-256 of the id, 44 bytes. A SIP Call-ID never
//! starts with `#` (RFC 3261's `word` alphabet has no `#`), so a stored id
//! stays readable for Call-IDs of up to 64 bytes and two ids never share a
//! key unless SHA-256 collides.
use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData, MapError};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use keepalive_common::{
    holders::{HolderKey, ID_MAX},
    maps,
};
use sha2::{Digest as _, Sha256};

use crate::{lend::Lent, paths::PinLayout, Error, InvalidInput, Result};

const BPF_NOEXIST: u64 = 1;

/// Longest holder id accepted, in bytes. RFC 3261 sets no limit on a
/// Call-ID; real ones are well under this.
pub const HOLDER_MAX: usize = 1024;

/// Checks a holder id (1..=[`HOLDER_MAX`] bytes of printable ASCII without
/// spaces: any SIP Call-ID) and returns the id as the holder maps store it
/// (see the module docs). The same id always gives the same stored id, so
/// an enable and a disable with it name the same holder.
pub fn parse_holder(s: &str) -> Result<String, InvalidInput> {
    let ok = !s.is_empty() && s.len() <= HOLDER_MAX && s.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(stored_id(s))
    } else {
        Err(InvalidInput::Holder(shown(s)))
    }
}

fn stored_id(s: &str) -> String {
    if s.len() <= ID_MAX && !s.starts_with('#') {
        s.to_owned()
    } else {
        format!("#{}", URL_SAFE_NO_PAD.encode(Sha256::digest(s.as_bytes())))
    }
}

/// A rejected id for an error message: at most 64 characters of it.
fn shown(s: &str) -> String {
    const SHOWN: usize = 64;
    if s.chars().count() <= SHOWN {
        s.to_owned()
    } else {
        let head: String = s.chars().take(SHOWN).collect();
        format!("{head}... ({} bytes)", s.len())
    }
}

/// `id` is a stored id (from [`parse_holder`]).
fn key(cookie: u64, id: &str) -> HolderKey {
    debug_assert!(id.len() <= ID_MAX, "holder ids go through parse_holder");
    let mut k = HolderKey {
        cookie,
        id: [0; ID_MAX],
    };
    k.id[..id.len()].copy_from_slice(id.as_bytes());
    k
}

fn id_of(k: &HolderKey) -> String {
    let end = k.id.iter().position(|&b| b == 0).unwrap_or(ID_MAX);
    String::from_utf8_lossy(&k.id[..end]).into_owned()
}

/// A full map is [`Error::HoldersFull`]; anything else is itself.
fn full_or(e: MapError, what: &str, capacity: u32) -> Error {
    match &e {
        MapError::SyscallError(s)
            if matches!(
                s.io_error.raw_os_error(),
                Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
            ) =>
        {
            Error::HoldersFull(capacity)
        }
        _ => Error::map(what, e),
    }
}

/// How many holder entries exist (all connections).
pub fn total(layout: &PinLayout) -> Result<usize> {
    let set: Lent<HashMap<MapData, HolderKey, u8>> = crate::lend::lend(layout, maps::HOLDERS)?;
    Ok(set.keys().filter(Result::is_ok).count())
}

/// The holder maps of one installation.
pub struct Holders {
    set: Lent<HashMap<MapData, HolderKey, u8>>,
    count: Lent<HashMap<MapData, u64, u32>>,
    capacity: u32,
}

impl Holders {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        Ok(Self {
            set: crate::lend::lend(layout, maps::HOLDERS)?,
            count: crate::lend::lend(layout, maps::HOLDER_COUNT)?,
            capacity: crate::pinned::capacity(layout, maps::HOLDERS)?,
        })
    }

    fn count(&self, cookie: u64) -> u32 {
        self.count.get(&cookie, 0).unwrap_or(0)
    }

    /// How many holders a connection has.
    pub fn count_of(&self, cookie: u64) -> u32 {
        self.count(cookie)
    }

    /// Adds a holder (once); returns how many the connection has.
    ///
    /// NB: the count is written before the holder entry, so a sweep never
    /// sees an entry without its count and mistakes it for a closed
    /// connection's.
    pub fn add(&mut self, cookie: u64, id: &str) -> Result<u32> {
        let k = key(cookie, id);
        if self.set.get(&k, 0).is_ok() {
            return Ok(self.count(cookie));
        }
        let before = self.count(cookie);
        let n = before + 1;
        self.set_count(cookie, n)?;
        match self.set.insert(k, 1, BPF_NOEXIST) {
            Ok(()) => Ok(n),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                let _ = self.set_count(cookie, before);
                Ok(before)
            }
            Err(e) => {
                let _ = self.set_count(cookie, before);
                Err(full_or(e, "adding a holder", self.capacity))
            }
        }
    }

    /// Removes a holder; returns how many remain, or `None` when `id` did
    /// not hold this connection (nothing changed).
    pub fn remove(&mut self, cookie: u64, id: &str) -> Result<Option<u32>> {
        if self.set.remove(&key(cookie, id)).is_err() {
            return Ok(None);
        }
        let n = self.count(cookie).saturating_sub(1);
        self.set_count(cookie, n)?;
        Ok(Some(n))
    }

    /// Writes a connection's count; no entry for 0.
    fn set_count(&mut self, cookie: u64, n: u32) -> Result<()> {
        if n == 0 {
            let _ = self.count.remove(&cookie);
            return Ok(());
        }
        self.count
            .insert(cookie, n, 0)
            .map_err(|e| full_or(e, "counting holders", self.capacity))
    }

    /// The holder entries of one connection.
    fn keys_of(&self, cookie: u64) -> Vec<HolderKey> {
        self.set
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.cookie == cookie)
            .collect()
    }

    /// Forgets a connection that closed: its count (if the kernel has not
    /// already) and its holder entries.
    pub fn forget(&mut self, cookie: u64) {
        self.clear(cookie);
    }

    /// Fails with [`Error::HoldersFull`] when no holder can be added (by
    /// adding and removing a placeholder, so that the check is the map's
    /// own).
    pub fn check_room(&mut self) -> Result<()> {
        // NB: cookie 0 is never a socket's.
        let probe = key(0, "#room");
        match self.set.insert(probe, 1, BPF_NOEXIST) {
            Ok(()) => {
                let _ = self.set.remove(&probe);
                Ok(())
            }
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                let _ = self.set.remove(&probe);
                Ok(())
            }
            Err(e) => Err(full_or(e, "checking the holder table", self.capacity)),
        }
    }

    /// Sets a connection's count to its number of holder entries (after a
    /// command was killed between the two); forgets it when `alive` is
    /// false. Returns the count.
    pub fn recount(&mut self, cookie: u64, alive: bool) -> Result<u32> {
        if !alive {
            self.clear(cookie);
            return Ok(0);
        }
        let n = self.keys_of(cookie).len() as u32;
        self.set_count(cookie, n)?;
        Ok(n)
    }

    /// Removes every holder of a connection.
    pub fn clear(&mut self, cookie: u64) {
        let mine = self.keys_of(cookie);
        for k in mine {
            let _ = self.set.remove(&k);
        }
        let _ = self.count.remove(&cookie);
    }

    /// Every connection's holders. Entries of connections that closed (the
    /// kernel removed their count) are swept on the way: call with the
    /// installation lock held.
    pub fn all(&mut self) -> StdHashMap<u64, Vec<String>> {
        let keys: Vec<HolderKey> = self.set.keys().filter_map(|k| k.ok()).collect();
        let mut out: StdHashMap<u64, Vec<String>> = StdHashMap::new();
        for k in keys {
            if self.count.get(&k.cookie, 0).is_err() {
                let _ = self.set.remove(&k);
                continue;
            }
            out.entry(k.cookie).or_default().push(id_of(&k));
        }
        for ids in out.values_mut() {
            ids.sort();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3261's `word` alphabet (`callid = word [ "@" word ]`).
    const WORD: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\
                        -.!%*_+`'~()<>:\\\"/[]?{}";

    fn hashed(id: &str) -> bool {
        let s = parse_holder(id).unwrap();
        s.len() == 44
            && s.starts_with('#')
            && s[1..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    #[test]
    fn holder_ids() {
        assert!(parse_holder("a84b4c76e66710@pc33.atlanta.example.com").is_ok());
        for bad in [
            "",
            "has space",
            "tab\there",
            "caf\u{e9}",
            &"x".repeat(HOLDER_MAX + 1),
        ] {
            assert!(parse_holder(bad).is_err(), "{bad:?}");
        }
        assert_eq!(id_of(&key(1, "call-1")), "call-1");
    }

    #[test]
    fn every_rfc3261_call_id_is_a_holder() {
        let all = format!("{WORD}@{WORD}");
        assert!(all.len() > ID_MAX);
        assert!(hashed(&all));
        for c in WORD.chars() {
            let id = format!("a{c}b@host");
            assert_eq!(parse_holder(&id).unwrap(), id);
        }
        assert!(hashed(&"x".repeat(HOLDER_MAX)));
    }

    #[test]
    fn short_ids_are_stored_as_they_are() {
        for id in ["1", "call-1@10.0.0.1", &"x".repeat(ID_MAX)] {
            assert_eq!(parse_holder(id).unwrap(), id);
            assert_eq!(id_of(&key(7, &parse_holder(id).unwrap())), id);
        }
    }

    #[test]
    fn long_and_hash_ids_are_stored_hashed() {
        assert!(hashed(&"x".repeat(ID_MAX + 1)));
        // SHA-256("#abc"), base64url without padding.
        assert_eq!(
            parse_holder("#abc").unwrap(),
            "#AOFuHTHAuis7PRdYO7KsO4mGZmIN31QKrlvQcD19Auc"
        );
        // A stored id passed again names another holder, not the same one.
        let stored = parse_holder(&"y".repeat(300)).unwrap();
        assert_ne!(parse_holder(&stored).unwrap(), stored);
        assert!(hashed(&stored));
    }

    #[test]
    fn one_long_id_one_holder() {
        let a = format!("{}-a", "c".repeat(200));
        let b = format!("{}-b", "c".repeat(200));
        assert_eq!(parse_holder(&a).unwrap(), parse_holder(&a).unwrap());
        assert_ne!(parse_holder(&a).unwrap(), parse_holder(&b).unwrap());
        let k = key(9, &parse_holder(&a).unwrap());
        assert_eq!(k, key(9, &parse_holder(&a).unwrap()));
        assert_eq!(id_of(&k), parse_holder(&a).unwrap());
    }

    #[test]
    fn rejections_show_a_bounded_id() {
        let long = format!("{} x", "z".repeat(5000));
        let msg = InvalidInput::Holder(match parse_holder(&long) {
            Err(InvalidInput::Holder(s)) => s,
            other => panic!("{other:?}"),
        })
        .to_string();
        assert!(msg.len() < 200, "{msg}");
        assert!(msg.contains("5002 bytes"), "{msg}");
        assert!(msg.contains("1 to 1024"), "{msg}");
    }
}
