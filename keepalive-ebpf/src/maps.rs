//! Map definitions. Names come from `keepalive_common::maps`; the loader pins
//! them under tcpka's bpffs directory.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use keepalive_common::{
    conns::ConnInfo,
    events::RING_BYTES,
    holders::{self, HolderKey},
    index::{self, FdOwner, IndexKey, SlotInfo},
    meta::Meta,
    ports,
    requests::{self, PeerKey, Request, Unsent},
    risk::Risk,
    rules::{RuleKey, RuleName, RuleValue},
    stats, CONNS_MAX_ENTRIES, RULES_MAX_ENTRIES,
};

#[map(name = "TCPKA_RULES")]
pub static RULES: LpmTrie<RuleKey, RuleValue> = LpmTrie::with_max_entries(RULES_MAX_ENTRIES, 0);

// NB: BPF_F_NO_PREALLOC (1): entries exist only for open managed connections;
// preallocating the whole capacity would cost memory on every host.
#[map(name = "TCPKA_CONNS")]
pub static CONNS: HashMap<u64, ConnInfo> = HashMap::with_max_entries(CONNS_MAX_ENTRIES, 1);

#[map(name = "TCPKA_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::LEN, 0);

#[map(name = "TCPKA_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map(name = "TCPKA_ALERTS")]
pub static ALERTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Written and read by user space only; defined here so that it is created
/// and pinned with the other maps.
#[map(name = "TCPKA_META")]
pub static META: Array<Meta> = Array::with_max_entries(1, 0);

#[map(name = "TCPKA_REQ_PEER")]
pub static REQ_PEER: HashMap<PeerKey, Request> =
    HashMap::with_max_entries(requests::MAX_ENTRIES, 1);

#[map(name = "TCPKA_REQ_COOKIE")]
pub static REQ_COOKIE: HashMap<u64, Request> = HashMap::with_max_entries(requests::MAX_ENTRIES, 1);

#[map(name = "TCPKA_REQ_PORTS")]
pub static REQ_PORTS: Array<u32> = Array::with_max_entries(requests::PORTS_LEN, 0);

// NB: the index maps allocate per entry (BPF_F_NO_PREALLOC): preallocating
// them cost ~48 MB on every host for ~10% faster connection churn
// (`cargo xtask bench`). The LRU fd map is always preallocated.
#[map(name = "TCPKA_PEERS")]
pub static PEERS: HashMap<IndexKey, u64> = HashMap::with_max_entries(index::MAX_ENTRIES, 1);

#[map(name = "TCPKA_SLOTS")]
pub static SLOTS: HashMap<u64, SlotInfo> = HashMap::with_max_entries(index::MAX_ENTRIES, 1);

#[map(name = "TCPKA_FDS")]
pub static FDS: LruHashMap<u64, FdOwner> = LruHashMap::with_max_entries(index::FDS_MAX_ENTRIES, 0);

#[map(name = "TCPKA_SEEDED")]
pub static SEEDED: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

// Written by user space; the count goes with the connection (state.rs), the
// holder entries of closed connections are swept by user space.
#[map(name = "TCPKA_HOLDERS")]
pub static HOLDERS: HashMap<HolderKey, u8> = HashMap::with_max_entries(holders::MAX_ENTRIES, 1);

#[map(name = "TCPKA_HOLDER_COUNT")]
pub static HOLDER_COUNT: HashMap<u64, u32> = HashMap::with_max_entries(holders::MAX_ENTRIES, 1);

#[map(name = "TCPKA_PORTS")]
pub static PORTS: Array<u64> = Array::with_max_entries(ports::LEN, 0);

/// Written and read by user space only (the names of the rules a
/// configuration file manages); defined here to be created and pinned.
#[map(name = "TCPKA_RULE_NAMES")]
pub static RULE_NAMES: HashMap<u32, RuleName> = HashMap::with_max_entries(RULES_MAX_ENTRIES, 0);

/// Filled by user space for one pass of the rules iterator.
#[map(name = "TCPKA_CHANGED")]
pub static CHANGED: LpmTrie<RuleKey, u32> = LpmTrie::with_max_entries(RULES_MAX_ENTRIES * 2, 0);

/// The rules iterator's report that did not fit (see `requests::Unsent`).
#[map(name = "TCPKA_UNSENT")]
pub static UNSENT: Array<Unsent> = Array::with_max_entries(1, 0);

/// Rules' own early-warning thresholds, written by user space.
#[map(name = "TCPKA_RISK")]
pub static RISK: HashMap<u32, Risk> = HashMap::with_max_entries(RULES_MAX_ENTRIES, 1);

#[map(name = "TCPKA_WANT")]
pub static WANT: HashMap<u64, FdOwner> = HashMap::with_max_entries(index::WANT_MAX_ENTRIES, 0);

/// Set by the loader: 1 when the state tracepoint keeps the index for the
/// whole host and reports closes (`--index host`).
#[unsafe(no_mangle)]
static HOST_INDEX: u32 = 0;

/// Whether the index is kept host-wide by the state tracepoint.
#[inline(always)]
pub fn host_index() -> bool {
    // SAFETY: read-only global set by the loader.
    unsafe { core::ptr::read_volatile(&HOST_INDEX) != 0 }
}

#[inline(always)]
fn port_in(base: u32, port: u16) -> bool {
    let (word, bit) = ports::slot(base, port);
    PORTS.get(word).is_some_and(|w| *w & bit != 0)
}

/// The flag word of [`PORTS`].
#[inline(always)]
pub fn port_flags() -> u64 {
    PORTS.get(ports::FLAGS).copied().unwrap_or(0)
}

/// Whether some rule has this local port.
#[inline(always)]
pub fn rule_local(port: u16) -> bool {
    port_in(ports::RULES_LOCAL, port)
}

/// Whether some rule has this remote port.
#[inline(always)]
pub fn rule_remote(port: u16) -> bool {
    port_in(ports::RULES_REMOTE, port)
}

/// Whether a connection between these ports belongs in the index.
#[inline(always)]
pub fn index_port(flags: u64, local: u16, remote: u16) -> bool {
    flags & ports::FLAG_INDEX_ALL != 0
        || port_in(ports::INDEX, local)
        || port_in(ports::INDEX, remote)
}

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}
