//! Holders of a connection's keepalive. A SIP controller passes the
//! Call-ID: a shared connection keeps keepalive while any call on it is up,
//! and the last call's disable turns it off.
//!
//! Kept in pinned maps so that every `tcpka` process and the daemon see
//! the same holders. Changes happen under the installation lock.
use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData, MapError};
use keepalive_common::{
    holders::{HolderKey, ID_MAX},
    maps,
};

use crate::{loader, paths::PinLayout, Error, InvalidInput, Result};

const BPF_NOEXIST: u64 = 1;

/// Checks a holder id: 1..=64 bytes of printable ASCII without spaces (a
/// SIP Call-ID's alphabet).
pub fn parse_holder(s: &str) -> Result<String, InvalidInput> {
    let ok = !s.is_empty() && s.len() <= ID_MAX && s.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(s.to_owned())
    } else {
        Err(InvalidInput::Holder(s.to_owned()))
    }
}

fn key(cookie: u64, id: &str) -> HolderKey {
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

/// The holder maps of one installation.
pub struct Holders {
    set: HashMap<MapData, HolderKey, u8>,
    count: HashMap<MapData, u64, u32>,
}

impl Holders {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let err = |e| Error::map("opening the holder maps", e);
        Ok(Self {
            set: HashMap::try_from(loader::open_map(layout, maps::HOLDERS)?).map_err(err)?,
            count: HashMap::try_from(loader::open_map(layout, maps::HOLDER_COUNT)?).map_err(err)?,
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
        let n = self.count(cookie) + 1;
        self.count
            .insert(cookie, n, 0)
            .map_err(|e| Error::map("counting holders", e))?;
        match self.set.insert(k, 1, BPF_NOEXIST) {
            Ok(()) => Ok(n),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                let _ = self.count.insert(cookie, n - 1, 0);
                Ok(n - 1)
            }
            Err(e) => {
                let _ = self.count.insert(cookie, n - 1, 0);
                Err(Error::map("adding a holder", e))
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
        if n == 0 {
            let _ = self.count.remove(&cookie);
        } else {
            self.count
                .insert(cookie, n, 0)
                .map_err(|e| Error::map("counting holders", e))?;
        }
        Ok(Some(n))
    }

    /// Forgets a connection that closed: its count (if the kernel has not
    /// already) and its holder entries.
    pub fn forget(&mut self, cookie: u64) {
        self.clear(cookie);
    }

    /// Removes every holder of a connection.
    pub fn clear(&mut self, cookie: u64) {
        let mine: Vec<HolderKey> = self
            .set
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.cookie == cookie)
            .collect();
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

    #[test]
    fn holder_ids() {
        assert!(parse_holder("a84b4c76e66710@pc33.atlanta.example.com").is_ok());
        assert!(parse_holder(&"x".repeat(64)).is_ok());
        for bad in ["", "has space", "tab\there", &"x".repeat(65), "caf\u{e9}"] {
            assert!(parse_holder(bad).is_err(), "{bad:?}");
        }
        assert_eq!(id_of(&key(1, "call-1")), "call-1");
    }
}
