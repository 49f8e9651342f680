//! Operations on a loaded installation: rules and managed connections. The
//! CLI, the daemon and the tests all go through here.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use aya::maps::{HashMap, MapData, MapError, PerCpuArray};
use keepalive_common::{conns::ConnInfo, maps, stats};

use crate::{
    conn::ConnSpec,
    holders::Holders,
    journal::{Journal, Step},
    lend::{lend, Lent},
    loader,
    lock::Lock,
    paths::PinLayout,
    policy::Policy,
    Error, Result,
};

mod direct;
mod holding;
mod live;
pub(crate) mod liveness;
mod probe;
mod reapply;
mod rule_table;
mod sock;
mod status;
mod walk;

pub use live::Op;
pub use liveness::Liveness;
pub use reapply::{live_json, Reach, Reached, RuleReached, PREVIEW_ID};
pub use rule_table::FleetOp;
pub use status::{phase, state_name, ConnStatus, KeepaliveState, Kept, Outcome, CONNS_FULL_ERROR};

const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// How this enforcer's commands found their connections: answered by the
/// connection index, or by a walk of the socket table. Shared by clones.
#[derive(Debug, Default)]
pub struct Lookups {
    pub index: AtomicU64,
    pub walks: AtomicU64,
}

/// Handle on one installation's pinned maps.
#[derive(Clone, Debug, Default)]
pub struct Enforcer {
    layout: PinLayout,
    /// A daemon detaches the outside-connection tracepoint on its own
    /// schedule (`serve`'s attach watch, every second): its commands skip
    /// that check, which reads the whole connection map.
    daemon: bool,
    lookups: Arc<Lookups>,
}

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Counters {
    pub applied_by_rule: u64,
    pub setsockopt_errors: u64,
    pub conns_map_full: u64,
    pub conns_closed: u64,
    pub events_dropped: u64,
    pub alerts_dropped: u64,
    /// Connections not indexed because the index was full.
    pub index_full: u64,
    /// Connections that found their peer's index slots taken.
    pub peer_overflows: u64,
    /// Managed or indexed connections whose close the kernel could not be
    /// asked to report (no `closed`/`reset`/`timeout` event for them).
    pub close_watch_errors: u64,
}

impl Enforcer {
    pub fn new(layout: PinLayout) -> Self {
        Self {
            layout,
            daemon: false,
            lookups: Arc::default(),
        }
    }

    /// For a daemon that runs [`loader::unwatch_outside`] itself, often.
    pub fn for_daemon(layout: PinLayout) -> Self {
        Self {
            layout,
            daemon: true,
            lookups: Arc::default(),
        }
    }

    /// Takes the installation lock, then finishes what a killed command
    /// left undone: a load that did not index the existing connections, a
    /// holder change between its steps.
    fn lock(&self) -> Result<Lock> {
        let lock = Lock::acquire(&self.layout)?;
        if self.layout.sock_ops_link().exists() {
            loader::repair_seed(&self.layout)?;
            self.recover_journal()?;
            // Without a `serve` to do it, the next command detaches a state
            // tracepoint no connection outside the cgroup needs any more.
            if !self.daemon {
                if let Err(e) = loader::unwatch_outside_locked(&self.layout) {
                    tracing::warn!("checking for managed connections outside the cgroup: {e}");
                }
            }
        }
        Ok(lock)
    }

    fn recover_journal(&self) -> Result<()> {
        let journal = Journal::new(&self.layout);
        let Some(entry) = journal.pending() else {
            return Ok(());
        };
        tracing::warn!("finishing an interrupted holder change: {entry:?}");
        let conns: Lent<HashMap<MapData, u64, ConnInfo>> = lend(&self.layout, maps::CONNS)?;
        let alive = conns.get(&entry.cookie, 0).is_ok();
        let mut holders = Holders::open(&self.layout)?;
        match entry.step {
            Step::Clear => holders.clear(entry.cookie),
            Step::Add => {
                holders.recount(entry.cookie, alive)?;
            }
            Step::Remove => {
                if holders.recount(entry.cookie, alive)? == 0 && alive {
                    // The last holder was gone: keepalive goes off, as the
                    // command meant to.
                    match self.apply_locked(
                        ConnSpec::Cookie(entry.cookie),
                        None,
                        Action::Disable,
                        entry.netns.as_deref(),
                    ) {
                        Ok(_) | Err(Error::NoSuchConnection(_)) => {}
                        // Its namespace file is gone, say: it cannot be
                        // finished now, and must not block every other
                        // command. Set aside, shown by /healthz and info.
                        Err(e) => {
                            let why = crate::one_line(&e);
                            tracing::warn!(
                                cookie = entry.cookie,
                                "set aside an interrupted holder change that cannot be finished ({why}); the connection keeps its keepalive until it closes"
                            );
                            journal.put_aside(&entry, &why);
                            return Ok(());
                        }
                    }
                }
            }
        }
        journal.end();
        Ok(())
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// Interrupted holder changes set aside because they could not be
    /// finished, for connections still managed (once none is, the record
    /// is forgotten).
    pub fn set_aside(&self) -> Result<Vec<crate::journal::Aside>> {
        let journal = Journal::new(&self.layout);
        let all = journal.set_aside();
        if all.is_empty() {
            return Ok(all);
        }
        let conns: Lent<HashMap<MapData, u64, ConnInfo>> = lend(&self.layout, maps::CONNS)?;
        let live: Vec<_> = all
            .into_iter()
            .filter(|a| conns.get(&a.entry.cookie, 0).is_ok())
            .collect();
        if live.is_empty() {
            journal.clear_aside();
        }
        Ok(live)
    }

    /// How commands found their connections so far (for metrics).
    pub fn lookups(&self) -> (u64, u64) {
        (
            self.lookups.index.load(Ordering::Relaxed),
            self.lookups.walks.load(Ordering::Relaxed),
        )
    }

    /// The connections the kernel programs manage, by socket cookie.
    pub fn managed(&self) -> Result<Vec<(u64, ConnInfo)>> {
        let conns = lend::<HashMap<MapData, u64, ConnInfo>>(&self.layout, maps::CONNS)?;
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
        let array = lend::<PerCpuArray<MapData, u64>>(&self.layout, maps::STATS)?;
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
            alerts_dropped: get(stats::ALERTS_DROPPED)?,
            index_full: get(stats::INDEX_FULL)?,
            peer_overflows: get(stats::PEER_OVERFLOWS)?,
            close_watch_errors: get(stats::CLOSE_WATCH_ERRORS)?,
        })
    }
}

/// What to do with live connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// SO_KEEPALIVE on with these values (the reference's
    /// `tcp_keepalive_enable`).
    Enable(Policy),
    /// SO_KEEPALIVE off (`tcp_keepalive_disable`).
    Disable,
    /// Change nothing; report the matching connections.
    Query,
}
