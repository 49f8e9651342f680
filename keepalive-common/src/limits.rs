/// Largest TCP_KEEPIDLE, in seconds.
pub const IDLE_MAX: u32 = 32767;
/// Largest TCP_KEEPINTVL, in seconds.
pub const INTERVAL_MAX: u32 = 32767;
/// Largest TCP_KEEPCNT.
pub const COUNT_MAX: u32 = 127;
/// Largest TCP_USER_TIMEOUT tcpka accepts, in milliseconds (the kernel
/// takes any non-negative `int`).
pub const USER_TIMEOUT_MAX_MS: u32 = i32::MAX as u32;
