pub const SOL_SOCKET: i32 = 1;
pub const SO_KEEPALIVE: i32 = 9;
pub const SOL_TCP: i32 = 6;
pub const TCP_KEEPIDLE: i32 = 4;
pub const TCP_KEEPINTVL: i32 = 5;
pub const TCP_KEEPCNT: i32 = 6;
pub const TCP_USER_TIMEOUT: i32 = 18;
/// `bpf_{set,get}sockopt` only (6.12+): the socket's sock_ops callback
/// flags.
pub const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;
/// `BPF_SOCK_OPS_STATE_CB_FLAG`: call sock_ops on every state change.
pub const STATE_CB_FLAG: i32 = 4;
