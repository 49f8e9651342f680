//! Kernel access: the pinned maps of an installation and what its record
//! says about it.
//!
//! A map is opened through a descriptor kept per installation generation
//! (the sock_ops link pin's inode, looked at every 20 ms at most), and
//! values fixed at load are read once per generation ([`memo`]);
//! [`crate::lend`] hands out typed handles built on these. The loader
//! writes what this module reads.
use aya::maps::{Array, Map};
use keepalive_common::{maps, meta::Meta};

use crate::{paths::PinLayout, Error, Result};

pub mod lend;

/// How the kernel side learns which process holds each socket (what the
/// direct path of `enable` borrows with `pidfd_getfd`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum HolderMode {
    /// On demand: a command that meets a socket whose holder is unknown
    /// searches every process's descriptors for it, and stops when it is
    /// found (well under a millisecond per 10,000 descriptors). Costs the
    /// rest of the host nothing.
    #[default]
    Scan,
    /// Syscall tracepoints on accept/accept4/connect: every command takes
    /// the direct path at once, but every syscall of every process on the
    /// host then takes the kernel's slow path (about 25% on a cheap
    /// syscall).
    Syscalls,
}

impl HolderMode {
    pub fn name(self) -> &'static str {
        match self {
            HolderMode::Scan => "scan",
            HolderMode::Syscalls => "syscalls",
        }
    }
}

/// Who keeps the connection index, and so what the rest of the host pays
/// for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IndexMode {
    /// sock_ops indexes the cgroup's connections on an index port
    /// (--index-ports) and watches them, and those a --tracked rule
    /// matched, until they close; other connections cost five array reads,
    /// and commands for them walk the socket table. Before Linux 6.12 the
    /// state tracepoint watches the connections from before the load until
    /// they close (`TCP_BPF_SOCK_OPS_CB_FLAGS` is 6.12's).
    #[default]
    Ports,
    /// A state tracepoint (`inet_sock_set_state`) indexes every connection
    /// on the host: any connection is reached directly, and every
    /// connection on the host pays for it (about 15% slower connection
    /// setup; docs/performance.md).
    Host,
}

impl IndexMode {
    pub fn name(self) -> &'static str {
        match self {
            IndexMode::Ports => "ports",
            IndexMode::Host => "host",
        }
    }
}

/// A pinned table's capacity, as the kernel has it (read once per
/// installation generation).
pub fn capacity(layout: &PinLayout, name: &str) -> Result<u32> {
    let read = || aya::maps::MapInfo::from_pin(layout.map(name)).map(|i| i.max_entries());
    map_cache::capacity(layout, name, read).map_err(|e| match e {
        map_cache::OpenError::Io(e) => Error::io(format!("reading {}", layout.dir().display()), e),
        map_cache::OpenError::Map(e) => Error::map(format!("reading the size of {name}"), e),
    })
}

/// A value fixed for the installation's generation once `read` gives it
/// (read again while `read` gives `None`); see the map cache.
pub fn memo<T: Clone + Send + 'static>(
    layout: &PinLayout,
    key: &'static str,
    read: impl FnOnce() -> Option<T>,
) -> Option<T> {
    map_cache::memo(layout, key, read)
}

/// The generation of the installation in `layout` (`None`: nothing is
/// loaded there), looked at every 20 ms at most; see [`crate::lend`].
pub fn generation(layout: &PinLayout) -> Result<Option<u64>> {
    map_cache::current(layout).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            crate::host::denied(format!("reading {}", layout.dir().display()), layout.dir())
        }
        _ => Error::io(format!("reading {}", layout.dir().display()), e),
    })
}

pub(crate) fn index_mode(meta: &Meta) -> IndexMode {
    if meta.flags & keepalive_common::meta::FLAG_HOST_INDEX != 0 {
        IndexMode::Host
    } else {
        IndexMode::Ports
    }
}

pub(crate) fn holder_mode(meta: &Meta) -> HolderMode {
    if meta.flags & keepalive_common::meta::FLAG_SYSCALL_HOLDERS != 0 {
        HolderMode::Syscalls
    } else {
        HolderMode::Scan
    }
}

/// Who keeps the installation's index (`Ports` when unreadable).
pub fn index_mode_of(layout: &PinLayout) -> IndexMode {
    // Fixed at load: read once per installation generation.
    let read = || read_meta(layout).map(|m| index_mode(&m)).ok();
    map_cache::memo(layout, "index_mode", read).unwrap_or_default()
}

/// How the installation learns socket holders (`Scan` when unreadable).
pub fn holders_mode(layout: &PinLayout) -> HolderMode {
    read_meta(layout)
        .map(|m| holder_mode(&m))
        .unwrap_or_default()
}

/// Opens a pinned map of a loaded installation.
pub fn open_map(layout: &PinLayout, name: &str) -> Result<Map> {
    let path = layout.map(name);
    let data = match map_cache::open(layout, name) {
        Ok(Some(data)) => data,
        Ok(None) => {
            return Err(Error::NotLoaded {
                pin_dir: layout.dir().into(),
            })
        }
        Err(map_cache::OpenError::Io(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(crate::host::denied(
                format!("reading {}", layout.dir().display()),
                layout.dir(),
            ))
        }
        Err(map_cache::OpenError::Io(e)) => {
            return Err(Error::io(format!("reading {}", layout.dir().display()), e))
        }
        Err(map_cache::OpenError::Map(e)) => {
            return Err(Error::map(format!("opening {}", path.display()), e))
        }
    };
    Map::from_map_data(data).map_err(|e| Error::map(format!("opening {}", path.display()), e))
}

/// The pinned maps' descriptors, kept by a process that opens them again
/// and again (`serve` runs several commands' worth of opens per command).
/// Opening a pin walks its path through /sys; a kept descriptor is
/// duplicated instead. The installation's generation is the inode of its
/// sock_ops link pin, looked at once per [`CHECK_EVERY`] at most: when it
/// changes (an unload and a load) or disappears, the kept descriptors are
/// dropped, so a command never reaches the maps of an installation that is
/// gone for longer than that.
mod map_cache {
    use std::{
        collections::HashMap,
        os::fd::{AsFd as _, OwnedFd},
        path::PathBuf,
        sync::Mutex,
        time::{Duration, Instant},
    };

    use aya::maps::{MapData, MapError};

    use crate::paths::PinLayout;

    pub const CHECK_EVERY: Duration = Duration::from_millis(20);

    struct Entry {
        /// The link pin's inode when last looked at; 0: not loaded.
        generation: u64,
        checked: Instant,
        fds: HashMap<String, OwnedFd>,
        capacities: HashMap<String, u32>,
        memo: HashMap<&'static str, Box<dyn std::any::Any + Send>>,
    }

    static CACHE: Mutex<Option<HashMap<PathBuf, Entry>>> = Mutex::new(None);

    fn generation(layout: &PinLayout) -> std::io::Result<u64> {
        match std::fs::symlink_metadata(layout.sock_ops_link()) {
            Ok(m) => Ok(std::os::unix::fs::MetadataExt::ino(&m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    pub enum OpenError {
        Io(std::io::Error),
        Map(MapError),
    }

    /// The installation's entry, its generation looked at again when due.
    fn entry<'a>(
        cache: &'a mut HashMap<PathBuf, Entry>,
        layout: &PinLayout,
    ) -> std::io::Result<&'a mut Entry> {
        let now = Instant::now();
        let due = match cache.get(layout.dir()) {
            // "Not loaded" is looked at again every time: a load may just
            // have happened.
            Some(e) => e.generation == 0 || now.duration_since(e.checked) >= CHECK_EVERY,
            None => true,
        };
        if due {
            let generation = generation(layout)?;
            match cache.get_mut(layout.dir()) {
                Some(e) if e.generation == generation => e.checked = now,
                _ => {
                    cache.insert(
                        layout.dir().to_path_buf(),
                        Entry {
                            generation,
                            checked: now,
                            fds: HashMap::new(),
                            capacities: HashMap::new(),
                            memo: HashMap::new(),
                        },
                    );
                }
            }
        }
        Ok(cache.get_mut(layout.dir()).expect("just looked at"))
    }

    /// The installation's generation (`None`: nothing is loaded there).
    pub fn current(layout: &PinLayout) -> std::io::Result<Option<u64>> {
        let mut guard = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        let cache = guard.get_or_insert_with(HashMap::new);
        let g = entry(cache, layout)?.generation;
        Ok((g != 0).then_some(g))
    }

    /// A table's capacity, read from the kernel once per generation.
    pub fn capacity(
        layout: &PinLayout,
        name: &str,
        read: impl FnOnce() -> Result<u32, MapError>,
    ) -> Result<u32, OpenError> {
        let mut guard = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        let cache = guard.get_or_insert_with(HashMap::new);
        let entry = entry(cache, layout).map_err(OpenError::Io)?;
        if let Some(&n) = entry.capacities.get(name) {
            return Ok(n);
        }
        let n = read().map_err(OpenError::Map)?;
        if entry.generation != 0 {
            entry.capacities.insert(name.to_owned(), n);
        }
        Ok(n)
    }

    /// A value that is fixed for an installation's generation once
    /// `read` gives it (`None`: not known yet, read again next time).
    pub fn memo<T: Clone + Send + 'static>(
        layout: &PinLayout,
        key: &'static str,
        read: impl FnOnce() -> Option<T>,
    ) -> Option<T> {
        let mut guard = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        let cache = guard.get_or_insert_with(HashMap::new);
        let Ok(entry) = entry(cache, layout) else {
            drop(guard);
            return read();
        };
        if let Some(v) = entry.memo.get(key).and_then(|v| v.downcast_ref::<T>()) {
            return Some(v.clone());
        }
        let generation = entry.generation;
        // Read without the cache's lock: `read` may open maps.
        drop(guard);
        let v = read()?;
        let mut guard = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = guard.as_mut().and_then(|c| c.get_mut(layout.dir())) {
            if e.generation == generation && generation != 0 {
                e.memo.insert(key, Box::new(v.clone()));
            }
        }
        Some(v)
    }

    /// The map `name` of the installation, or `None` when nothing is
    /// loaded there.
    pub fn open(layout: &PinLayout, name: &str) -> Result<Option<MapData>, OpenError> {
        let io = OpenError::Io;
        let mut guard = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        let cache = guard.get_or_insert_with(HashMap::new);
        let entry = entry(cache, layout).map_err(io)?;
        if entry.generation == 0 {
            return Ok(None);
        }
        let fd = match entry.fds.get(name) {
            Some(fd) => fd.try_clone().map_err(io)?,
            None => {
                let data = match MapData::from_pin(layout.map(name)) {
                    Ok(data) => data,
                    // Unloaded since the last look: say so, not "no such
                    // file".
                    Err(e) if generation(layout).map_err(io)? != entry.generation => {
                        drop(e);
                        cache.remove(layout.dir());
                        return match generation(layout).map_err(io)? {
                            0 => Ok(None),
                            _ => open_uncached(layout, name),
                        };
                    }
                    Err(e) => return Err(OpenError::Map(e)),
                };
                let fd = data.fd().as_fd().try_clone_to_owned().map_err(io)?;
                entry.fds.insert(name.to_owned(), fd);
                return Ok(Some(data));
            }
        };
        MapData::from_fd(fd).map(Some).map_err(OpenError::Map)
    }

    fn open_uncached(layout: &PinLayout, name: &str) -> Result<Option<MapData>, OpenError> {
        MapData::from_pin(layout.map(name))
            .map(Some)
            .map_err(OpenError::Map)
    }
}

pub(crate) fn read_meta(layout: &PinLayout) -> Result<Meta> {
    let stale = || Error::BadRecord {
        what: format!("the installation in {}", layout.dir().display()),
        why: "it was loaded by another version of tcpka; run `tcpka unload` and `tcpka load` \
              (connections keep their keepalive)"
            .into(),
    };
    // A record of another size is another version's layout.
    let array = match lend::lend::<Array<aya::maps::MapData, Meta>>(layout, maps::META) {
        Err(Error::Map {
            source: aya::maps::MapError::InvalidValueSize { .. },
            ..
        }) => return Err(stale()),
        other => other?,
    };
    let meta = array
        .get(&0, 0)
        .map_err(|e| Error::map("reading the installation record", e))?;
    if meta.version != keepalive_common::meta::LAYOUT_VERSION {
        return Err(stale());
    }
    Ok(meta)
}

pub(crate) fn write_meta(layout: &PinLayout, meta: &Meta) -> Result<()> {
    let mut array = lend::lend::<Array<aya::maps::MapData, Meta>>(layout, maps::META)?;
    array
        .set(0, meta, 0)
        .map_err(|e| Error::map("writing the installation record", e))
}
