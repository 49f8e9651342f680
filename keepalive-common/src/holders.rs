/// Longest holder id, in bytes.
pub const ID_MAX: usize = 64;

/// One holder of one connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HolderKey {
    pub cookie: u64,
    /// The id, zero padded.
    pub id: [u8; ID_MAX],
}

/// Capacity of the holder map: holders of all connections together
/// (about 20 MB of kernel memory when full). More are refused until
/// some are released.
pub const MAX_ENTRIES: u32 = 1 << 17;
