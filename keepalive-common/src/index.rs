/// Slots per peer endpoint; more connections to one peer mark the peer
/// as overflowed and user space walks the socket table for it.
pub const PEER_SLOTS: u16 = 8;
/// [`IndexKey::slot`] of the overflow marker (value unused).
pub const SLOT_OVERFLOW: u16 = 0xffff;

/// One slot of one peer endpoint in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IndexKey {
    /// Inode number of the network namespace.
    pub netns: u32,
    /// Remote address as IPv6 (IPv4 mapped), network byte order.
    pub addr: [u8; 16],
    /// Remote port, host byte order.
    pub port: u16,
    /// 0..[`PEER_SLOTS`], or [`SLOT_OVERFLOW`].
    pub slot: u16,
}

/// Where an indexed socket sits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotInfo {
    /// Its key in the peer index (so that a close finds it without
    /// reading the socket again).
    pub key: IndexKey,
    /// Address of its `struct sock`, the key of the fd map.
    pub sk: u64,
}

/// A bit of [`SlotInfo::key`]'s `slot` (a real slot is below
/// [`PEER_SLOTS`]; the peer map's key has it clear): sock_ops will not see
/// this connection close (see `stats::UNWATCHED_ADDED`), the state
/// tracepoint forgets it. (Kept in the key, not in a field of its own: the
/// value stays 32 bytes, and sock_ops' stack within Linux 6.1's limit.)
pub const SLOT_UNWATCHED: u16 = 0x4000;

impl SlotInfo {
    /// Whether only the state tracepoint sees this connection close.
    pub fn unwatched(&self) -> bool {
        self.key.slot & SLOT_UNWATCHED != 0
    }

    /// Its key in the peer map.
    pub fn peer_key(&self) -> IndexKey {
        IndexKey {
            slot: self.key.slot & !SLOT_UNWATCHED,
            ..self.key
        }
    }
}

/// A process and descriptor that last received a TCP socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdOwner {
    /// Thread group id (the process id) in the initial pid namespace.
    pub tgid: u32,
    pub fd: u32,
}

/// One connection the index holds, as the lookup program reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Socket cookie; 0: the slot is empty.
    pub cookie: u64,
    /// [`SlotInfo::sk`]; 0: the slot map has no entry for the cookie.
    pub sk: u64,
    /// [`IndexKey::netns`] of its slot entry.
    pub netns: u32,
    /// Its holder, when the fd map knows one ([`FOUND_OWNER`]).
    pub owner: FdOwner,
    /// `FOUND_*` bits.
    pub flags: u32,
}

/// [`Found::flags`]: the slot map has the cookie.
pub const FOUND_SLOT: u32 = 1;
/// [`Found::flags`]: the fd map has a holder for the socket.
pub const FOUND_OWNER: u32 = 2;

/// The lookup program's input and output, as one buffer (the "packet"
/// of a `BPF_PROG_TEST_RUN`): the index lookups of one command in one
/// system call instead of one each.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// In: a cookie to look up alone; 0: look up the peer in [`Self::key`].
    pub cookie: u64,
    /// In: the peer (its slot is ignored).
    pub key: IndexKey,
    /// Out: 1 when the peer is marked overflowed.
    pub overflowed: u32,
    pub _pad: u32,
    /// Out: each slot's connection, in slot order (the cookie's in
    /// the first).
    pub found: [Found; PEER_SLOTS as usize],
}

/// Capacity of the peer index and the slot map.
pub const MAX_ENTRIES: u32 = 1 << 20;
/// Capacity of the fd map (LRU: descriptors closed without a TCP close
/// age out).
pub const FDS_MAX_ENTRIES: u32 = 1 << 18;
/// Sockets one holder search looks for at most.
pub const WANT_MAX_ENTRIES: u32 = 1024;
