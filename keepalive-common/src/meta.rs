/// Longest cgroup path the record holds.
pub const PATH_MAX: usize = 256;

/// Where tcpka is attached and the next rule id.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    /// Inode number of the cgroup v2 directory (the cgroup id).
    pub cgroup_id: u64,
    /// Id the next rule gets.
    pub next_rule_id: u32,
    /// Bytes used in `cgroup_path`.
    pub cgroup_path_len: u32,
    /// Cgroup directory path, UTF-8.
    pub cgroup_path: [u8; PATH_MAX],
    /// `FLAG_*`.
    pub flags: u32,
    /// [`LAYOUT_VERSION`] of the tcpka that loaded the installation.
    pub version: u32,
    /// Nanoseconds per jiffy (1e9 / the kernel's HZ), measured at load:
    /// the kernel keeps TCP timestamps in jiffies.
    pub jiffy_ns: u32,
    pub _pad: u32,
}

/// The index was seeded with what existed at load: the load finished.
pub const FLAG_SEEDED: u32 = 1;
/// Socket holders are recorded by syscall tracepoints (`--holders
/// syscalls`); without it they are found on demand.
pub const FLAG_SYSCALL_HOLDERS: u32 = 2;
/// The index covers every connection on the host, kept by the state
/// tracepoint (`--index host`); without it sock_ops keeps it for the
/// index ports and watches closes per connection.
pub const FLAG_HOST_INDEX: u32 = 4;

/// Changes whenever the maps or programs of an installation change in a
/// way an older or newer tcpka cannot use.
pub const LAYOUT_VERSION: u32 = 8;
