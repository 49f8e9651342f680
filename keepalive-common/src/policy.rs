/// [`Policy::flags`]: the policy sets TCP_USER_TIMEOUT.
pub const FLAG_USER_TIMEOUT: u32 = 1;

/// Keepalive values to apply to one connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// TCP_KEEPIDLE, seconds (1..=[`crate::limits::IDLE_MAX`]).
    pub idle: u32,
    /// TCP_KEEPCNT (1..=[`crate::limits::COUNT_MAX`]).
    pub count: u32,
    /// TCP_KEEPINTVL, seconds (1..=[`crate::limits::INTERVAL_MAX`]).
    pub interval: u32,
    /// TCP_USER_TIMEOUT in milliseconds; applied only with
    /// [`FLAG_USER_TIMEOUT`].
    pub user_timeout_ms: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}
