//! Reading the index: one run of the lookup program (`tcpka_lookup`) for
//! all the lookups of a command, or, on an installation without it, the
//! maps one lookup at a time.
use std::net::SocketAddr;

use aya::maps::{HashMap, MapData};
use keepalive_common::{
    index::{
        FdOwner, Found, IndexKey, Query, SlotInfo, FOUND_OWNER, FOUND_SLOT, PEER_SLOTS,
        SLOT_OVERFLOW,
    },
    maps,
};

use super::peer_slot;
use crate::{paths::PinLayout, Result};

/// Runs the index lookup program on `q` (one system call for the lookups
/// of a command); `None` when the installation has no such program (loaded
/// by an older tcpka): then the maps are read one lookup at a time.
pub(super) fn lookup(layout: &PinLayout, q: &Query) -> Result<Option<Query>> {
    use aya::programs::{TestRun as _, TestRunOptions, Xdp};
    use aya_obj::programs::XdpAttachType;
    type Prog = Option<std::sync::Arc<Xdp>>;
    let prog = crate::pinned::memo::<Prog>(layout, "lookup_prog", || {
        Some(
            Xdp::from_pin(layout.lookup_prog(), XdpAttachType::Interface)
                .ok()
                .map(std::sync::Arc::new),
        )
    })
    .flatten();
    let Some(prog) = prog else {
        tracing::debug!("no index lookup program in this installation: reading the maps");
        return Ok(None);
    };
    tracing::debug!("index lookups in one run of the lookup program");
    // SAFETY: Query is plain data (repr(C) integers, no padding).
    let data_in =
        unsafe { std::slice::from_raw_parts((q as *const Query).cast::<u8>(), size_of::<Query>()) };
    let mut out = [0u8; size_of::<Query>()];
    let run = prog.test_run(TestRunOptions {
        data_in: Some(data_in),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    });
    // The maps give the same answer, a lookup at a time: a run that fails
    // (a kernel that refuses it) costs speed, not the command.
    const XDP_PASS: u32 = 2;
    match run {
        Ok(r) if r.return_value == XDP_PASS && r.data_size_out as usize == out.len() => {}
        Ok(r) => {
            tracing::warn!(
                "the index lookup program answered {} with {} bytes; reading the maps",
                r.return_value,
                r.data_size_out
            );
            return Ok(None);
        }
        Err(e) => {
            tracing::warn!("running the index lookup program: {e}; reading the maps");
            return Ok(None);
        }
    }
    // SAFETY: as above; any bytes are a valid Query.
    Ok(Some(unsafe {
        std::ptr::read_unaligned(out.as_ptr().cast::<Query>())
    }))
}

/// What the lookup program reports for `cookie`, read from the maps.
pub(super) fn read_found(layout: &PinLayout, cookie: u64) -> Result<Found> {
    let slots = crate::lend::lend::<HashMap<MapData, u64, SlotInfo>>(layout, maps::SLOTS)?;
    let fds = crate::lend::lend::<HashMap<MapData, u64, FdOwner>>(layout, maps::FDS)?;
    let mut f = Found {
        cookie,
        ..Found::default()
    };
    if let Ok(info) = slots.get(&cookie, 0) {
        f.sk = info.sk;
        f.netns = info.key.netns;
        f.flags = FOUND_SLOT;
        if let Ok(owner) = fds.get(&info.sk, 0) {
            f.owner = owner;
            f.flags |= FOUND_OWNER;
        }
    }
    Ok(f)
}

/// What the lookup program reports for a peer, read from the maps: its
/// overflow mark and its connections.
pub(super) fn read_peer(
    layout: &PinLayout,
    inode: u64,
    peer: SocketAddr,
) -> Result<(bool, Vec<Found>)> {
    let peers = crate::lend::lend::<HashMap<MapData, IndexKey, u64>>(layout, maps::PEERS)?;
    let mut key = peer_slot(inode, peer, SLOT_OVERFLOW);
    if peers.get(&key, 0).is_ok() {
        return Ok((true, Vec::new()));
    }
    let cookies: Vec<u64> = (0..PEER_SLOTS)
        .filter_map(|slot| {
            key.slot = slot;
            peers.get(&key, 0).ok()
        })
        .collect();
    drop(peers);
    let found = cookies
        .into_iter()
        .map(|c| read_found(layout, c))
        .collect::<Result<_>>()?;
    Ok((false, found))
}
