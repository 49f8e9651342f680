//! What a load is asked for (options, table sizes) and what it gives (the
//! installation, and whether it was loaded, adopted or re-attached).
use std::path::PathBuf;

use crate::pinned::{HolderMode, IndexMode};

/// How to load.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    pub holders: HolderMode,
    /// `None`: chosen by [`choose_index`].
    pub index: Option<IndexMode>,
    /// With [`IndexMode::Ports`]: which connections are indexed.
    pub index_ports: crate::ports::IndexPorts,
    /// Report `applied` and `closed` events for connections rules match.
    pub rule_events: bool,
    /// Capacities of the tables that grow with the host.
    pub sizes: MapSizes,
}

/// Capacities of the tables that grow with the host; `None` keeps the
/// built-in one. Set at load; a table's entries exist only while used, but
/// its bucket array (8 bytes per entry) is allocated at load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSizes {
    /// Managed connections ([`keepalive_common::CONNS_MAX_ENTRIES`]).
    pub connections: Option<u32>,
    /// Indexed sockets ([`keepalive_common::index::MAX_ENTRIES`]).
    pub indexed: Option<u32>,
    /// Holders on all connections
    /// ([`keepalive_common::holders::MAX_ENTRIES`]).
    pub holders: Option<u32>,
}

/// The range a table capacity must be in.
pub const MAP_SIZE_MIN: u32 = 1024;

pub const MAP_SIZE_MAX: u32 = 1 << 24;

/// Parses a table capacity (1024..=16777216).
pub fn parse_map_size(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (MAP_SIZE_MIN..=MAP_SIZE_MAX).contains(&n) => Ok(n),
        _ => Err(format!(
            "a table size must be a whole number in {MAP_SIZE_MIN}..={MAP_SIZE_MAX}, got {s:?}"
        )),
    }
}

/// Where an installation is attached.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Installation {
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// Whether the sock_ops program still runs on that cgroup. The kernel
    /// detaches it when the cgroup is removed, as a service manager does
    /// on every restart of the service (`systemctl restart kamailio`).
    pub attached: bool,
    /// Whether the load completed (existing connections indexed). A load
    /// that was killed is completed by the next command.
    pub seeded: bool,
    /// How socket holders are learned.
    pub holders: HolderMode,
    /// Who keeps the connection index.
    pub index: IndexMode,
}

/// What `load` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// Programs loaded, attached and pinned now.
    Loaded(Installation),
    /// The same installation was already pinned; nothing changed.
    AlreadyLoaded(Installation),
    /// The installation was pinned but its cgroup had been removed and
    /// recreated: the sock_ops program was attached to it again.
    Reattached(Installation),
}

impl LoadOutcome {
    pub fn installation(&self) -> &Installation {
        match self {
            LoadOutcome::Loaded(i) | LoadOutcome::AlreadyLoaded(i) | LoadOutcome::Reattached(i) => {
                i
            }
        }
    }
}
