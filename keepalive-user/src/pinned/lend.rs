//! The installation's maps as typed handles, each opened once per
//! installation generation and lent to one user at a time.
//!
//! Opening a pinned map costs three system calls (a duplicate of the kept
//! descriptor, the map's info, a close) and a daemon runs a dozen opens per
//! command; a lent handle costs none. [`lend`] hands out a kept handle of
//! the current generation (see [`crate::pinned`]'s map cache: the sock_ops
//! link pin's inode, looked at every 20 ms at most) or opens a new one, and
//! the handle goes back to the pool when the [`Lent`] guard drops. Handles
//! of an installation that has gone are dropped at the next lend, so a
//! kept descriptor never keeps an unloaded map alive for longer than that.
use std::{
    any::{Any, TypeId},
    collections::HashMap,
    ops::{Deref, DerefMut},
    path::PathBuf,
    sync::Mutex,
};

use aya::maps::{Map, MapError};

use crate::{paths::PinLayout, Error, Result};

type Key = (PathBuf, &'static str, TypeId);

struct Shelf {
    generation: u64,
    free: Vec<Box<dyn Any + Send>>,
}

static POOL: Mutex<Option<HashMap<Key, Shelf>>> = Mutex::new(None);

/// A typed map handle on loan; derefs to the map, goes back on drop.
pub struct Lent<T: Send + 'static> {
    value: Option<T>,
    key: Option<Key>,
    generation: u64,
}

impl<T: Send + 'static> Deref for Lent<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("lent until dropped")
    }
}

impl<T: Send + 'static> DerefMut for Lent<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("lent until dropped")
    }
}

impl<T: Send + 'static> Drop for Lent<T> {
    fn drop(&mut self) {
        let (Some(value), Some(key)) = (self.value.take(), self.key.take()) else {
            return;
        };
        let mut guard = POOL.lock().unwrap_or_else(|p| p.into_inner());
        let shelf = guard
            .get_or_insert_with(HashMap::new)
            .entry(key)
            .or_insert(Shelf {
                generation: self.generation,
                free: Vec::new(),
            });
        // A handle of an older installation is not kept.
        if shelf.generation == self.generation {
            shelf.free.push(Box::new(value));
        }
    }
}

/// The map `name` of the installation in `layout`, as `T` (for example
/// `HashMap<MapData, u64, ConnInfo>`). Fails like
/// [`crate::pinned::open_map`] (not loaded, no privilege), or when the map is not
/// a `T` (another version's layout).
pub fn lend<T>(layout: &PinLayout, name: &'static str) -> Result<Lent<T>>
where
    T: TryFrom<Map, Error = MapError> + Send + 'static,
{
    let Some(generation) = crate::pinned::generation(layout)? else {
        return Err(Error::NotLoaded {
            pin_dir: layout.dir().into(),
        });
    };
    let key: Key = (layout.dir().to_path_buf(), name, TypeId::of::<T>());
    {
        let mut guard = POOL.lock().unwrap_or_else(|p| p.into_inner());
        let pool = guard.get_or_insert_with(HashMap::new);
        if let Some(shelf) = pool.get_mut(&key) {
            if shelf.generation != generation {
                shelf.generation = generation;
                shelf.free.clear();
            }
            if let Some(value) = shelf.free.pop() {
                let value = *value.downcast::<T>().expect("shelved under its type");
                return Ok(Lent {
                    value: Some(value),
                    key: Some(key),
                    generation,
                });
            }
        }
    }
    let map = crate::pinned::open_map(layout, name)?;
    let value = T::try_from(map).map_err(|e| Error::map(format!("opening {name}"), e))?;
    Ok(Lent {
        value: Some(value),
        key: Some(key),
        generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_loaded_is_said_and_nothing_is_kept() {
        let dir = std::env::temp_dir().join(format!("tcpka-lend-{}", std::process::id()));
        let layout = PinLayout::new(&dir);
        let r = lend::<aya::maps::HashMap<aya::maps::MapData, u64, u64>>(&layout, "X");
        assert!(matches!(r, Err(Error::NotLoaded { .. })), "{:?}", r.err());
    }
}
