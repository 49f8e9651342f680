//! How complete the index is: its fill, the kernel's failure counters,
//! and the overflow mark of peers with more connections than slots.
use std::{net::SocketAddr, path::Path};

use aya::maps::{HashMap, MapData, PerCpuArray};
use keepalive_common::{
    index::{IndexKey, SlotInfo, PEER_SLOTS, SLOT_OVERFLOW},
    maps, stats,
};

use super::{netns_inode, peer_slot};
use crate::{paths::PinLayout, Error, Result};

/// How complete the connection index is.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct IndexState {
    /// Connections indexed by peer.
    pub entries: usize,
    /// Capacity of the peer index.
    pub capacity: u32,
    /// Connections the kernel could not index since load because the
    /// index was full. While non-zero, every peer lookup walks the socket
    /// table.
    pub failures: u64,
    /// Peers with more connections than the index has slots for: lookups
    /// of these peers walk the socket table.
    pub overflowed_peers: usize,
}

/// Reads the index's fill and failures (walks the peer map: for `info`).
pub fn state(layout: &PinLayout) -> Result<IndexState> {
    let peers = crate::lend::lend::<HashMap<MapData, IndexKey, u64>>(layout, maps::PEERS)?;
    let mut out = IndexState {
        capacity: crate::pinned::capacity(layout, maps::PEERS)?,
        ..IndexState::default()
    };
    for k in peers.keys().filter_map(Result::ok) {
        if k.slot == SLOT_OVERFLOW {
            out.overflowed_peers += 1;
        } else {
            out.entries += 1;
        }
    }
    out.failures = kernel_counter(layout, stats::INDEX_FULL)?;
    Ok(out)
}

/// The kernel's count of peer overflows (see `stats::PEER_OVERFLOWS`).
pub fn overflow_epoch(layout: &PinLayout) -> Result<u64> {
    kernel_counter(layout, stats::PEER_OVERFLOWS)
}

/// After a walk found every connection to `peer` (`found`), clears the
/// peer's overflow mark when all of them are indexed again, so that its
/// lookups go back to the index. `epoch` is [`overflow_epoch`] from before
/// the walk: if any connection overflowed since, the mark is put back.
/// Returns whether the mark was cleared.
pub fn try_clear_overflow(
    layout: &PinLayout,
    peer: SocketAddr,
    netns: Option<&Path>,
    found: &[u64],
    epoch: u64,
) -> Result<bool> {
    if found.len() > PEER_SLOTS as usize {
        return Ok(false);
    }
    let inode = netns_inode(netns)?;
    let mut peers = crate::lend::lend::<HashMap<MapData, IndexKey, u64>>(layout, maps::PEERS)?;
    let key = peer_slot(inode, peer, SLOT_OVERFLOW);
    if peers.get(&key, 0).is_err() {
        return Ok(false);
    }
    let slots = crate::lend::lend::<HashMap<MapData, u64, SlotInfo>>(layout, maps::SLOTS)?;
    if found.iter().any(|c| slots.get(c, 0).is_err()) {
        return Ok(false);
    }
    peers
        .remove(&key)
        .map_err(|e| Error::map("clearing an overflow mark", e))?;
    if overflow_epoch(layout)? != epoch {
        let _ = peers.insert(key, 0, 0);
        return Ok(false);
    }
    tracing::debug!("{peer}: every connection is indexed again");
    Ok(true)
}

/// Set when the kernel could not index some connection: peer lookups are
/// not complete any more and must walk.
pub(super) fn index_overflowed(layout: &PinLayout) -> Result<bool> {
    Ok(kernel_counter(layout, stats::INDEX_FULL)? > 0)
}

/// One of the programs' per-CPU counters (`stats::*`), summed.
pub fn kernel_counter(layout: &PinLayout, index: u32) -> Result<u64> {
    let counters = crate::lend::lend::<PerCpuArray<MapData, u64>>(layout, maps::STATS)?;
    Ok(counters
        .get(&index, 0)
        .map_err(|e| Error::map("reading the counters", e))?
        .iter()
        .sum())
}
