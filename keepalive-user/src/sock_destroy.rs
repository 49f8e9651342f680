//! Ending a connection with the `bpf_sock_destroy` kfunc (Linux 6.5+), for
//! kernels built without `CONFIG_INET_DIAG_DESTROY`: a one-shot `iter/tcp`
//! program that walks the current network namespace's TCP sockets and
//! destroys the one whose cookie it was given.
//!
//! The program is a handful of instructions written here and loaded with
//! bpf(2) directly: the aya version this project builds with cannot
//! relocate kfunc calls. Its walk visits every TCP socket (O(n), like the
//! fallback walk of commands), where sock_diag finds one with a single
//! lookup, so [`crate::destroy`] uses it only when sock_diag cannot.
//!
//! ```text
//!  r7 = ctx; r6 = ctx->sk_common; if r6 == NULL exit
//!  if bpf_get_socket_cookie(r6) != COOKIE exit
//!  r0 = bpf_sock_destroy(r6); bpf_seq_write(ctx->meta->seq, &r0, 8)
//! ```
use std::{
    io::Read as _,
    os::fd::{FromRawFd as _, OwnedFd},
};

use crate::btf::Btf;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
const HELPER_GET_SOCKET_COOKIE: i32 = 46;
const HELPER_SEQ_WRITE: i32 = 127;

/// `union bpf_attr` as a zeroed buffer, fields written at their offsets.
struct Attr([u8; 144]);

impl Attr {
    fn new() -> Self {
        Self([0; 144])
    }

    fn u32(mut self, off: usize, v: u32) -> Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn u64(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }

    /// bpf(2); a new descriptor on success.
    fn fd(&self, cmd: libc::c_long) -> std::io::Result<OwnedFd> {
        // SAFETY: bpf(2) with a zero-padded bpf_attr of the given size.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_ptr(), self.0.len()) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
    }
}

/// One `struct bpf_insn`.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    u64::from_le_bytes([code, (src << 4) | dst, o[0], o[1], i[0], i[1], i[2], i[3]])
}

/// The kernel's BTF ids of the kfunc and the iterator target, when it has
/// both (read once per process: the kernel's BTF is megabytes).
fn ids() -> Result<(u32, u32), String> {
    static IDS: std::sync::OnceLock<Result<(u32, u32), String>> = std::sync::OnceLock::new();
    IDS.get_or_init(read_ids).clone()
}

fn read_ids() -> Result<(u32, u32), String> {
    let btf = Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
    let destroy = btf
        .func_id("bpf_sock_destroy")
        .ok_or("the kernel has no bpf_sock_destroy (Linux 6.5+)")?;
    let iter = btf
        .func_id("bpf_iter_tcp")
        .ok_or("the kernel has no iter/tcp (Linux 5.9+)")?;
    Ok((destroy, iter))
}

/// The program, loaded (the verifier has accepted the kfunc call).
fn load(cookie: u64) -> Result<OwnedFd, String> {
    let (destroy_id, iter_id) = ids()?;
    let (lo, hi) = (cookie as u32 as i32, (cookie >> 32) as u32 as i32);
    let insns = [
        insn(0xbf, 7, 1, 0, 0),                                     // 0: r7 = r1
        insn(0x79, 6, 7, 8, 0),                                     // 1: r6 = *(u64 *)(r7 + 8)
        insn(0x15, 6, 0, 14, 0),                                    // 2: if r6 == 0 goto 17
        insn(0xbf, 1, 6, 0, 0),                                     // 3: r1 = r6
        insn(0x85, 0, 0, 0, HELPER_GET_SOCKET_COOKIE),              // 4: call
        insn(0x18, 1, 0, 0, lo),                                    // 5: r1 = COOKIE ll
        insn(0x00, 0, 0, 0, hi),                                    // 6
        insn(0x5d, 0, 1, 9, 0),                                     // 7: if r0 != r1 goto 17
        insn(0xbf, 1, 6, 0, 0),                                     // 8: r1 = r6
        insn(0x85, 0, BPF_PSEUDO_KFUNC_CALL, 0, destroy_id as i32), // 9: bpf_sock_destroy
        insn(0x7b, 10, 0, -8, 0),                                   // 10: *(u64 *)(r10 - 8) = r0
        insn(0x79, 1, 7, 0, 0),                                     // 11: r1 = ctx->meta
        insn(0x79, 1, 1, 0, 0),                                     // 12: r1 = meta->seq
        insn(0xbf, 2, 10, 0, 0),                                    // 13: r2 = r10
        insn(0x07, 2, 0, 0, -8),                                    // 14: r2 += -8
        insn(0xb7, 3, 0, 0, 8),                                     // 15: r3 = 8
        insn(0x85, 0, 0, 0, HELPER_SEQ_WRITE),                      // 16: call
        insn(0xb7, 0, 0, 0, 0),                                     // 17: r0 = 0
        insn(0x95, 0, 0, 0, 0),                                     // 18: exit
    ];
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 4096];
    let mut attr = Attr::new()
        .u32(0, BPF_PROG_TYPE_TRACING)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .u32(68, BPF_TRACE_ITER)
        .u32(108, iter_id);
    attr.0[48..61].copy_from_slice(b"tcpka_destroy");
    attr.fd(BPF_PROG_LOAD).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let log = String::from_utf8_lossy(&log[..end]);
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        format!("loading the bpf_sock_destroy program: {e} ({last})")
    })
}

/// Whether this kernel lets tcpka use `bpf_sock_destroy`: loads the
/// program (for a cookie no socket has) and drops it.
pub fn probe() -> Result<(), String> {
    load(0).map(drop)
}

/// Destroys the TCP socket with this cookie in the current network
/// namespace. `Ok(false)`: no socket has it.
pub fn destroy(cookie: u64) -> std::io::Result<bool> {
    let prog = load(cookie).map_err(std::io::Error::other)?;
    let link = Attr::new()
        .u32(0, std::os::fd::AsRawFd::as_raw_fd(&prog) as u32)
        .u32(8, BPF_TRACE_ITER)
        .fd(BPF_LINK_CREATE)?;
    let iter = Attr::new()
        .u32(0, std::os::fd::AsRawFd::as_raw_fd(&link) as u32)
        .fd(BPF_ITER_CREATE)?;
    let mut out = Vec::new();
    std::fs::File::from(iter).read_to_end(&mut out)?;
    let Some(first) = out.get(..8) else {
        return Ok(false);
    };
    let ret = i64::from_ne_bytes(first.try_into().expect("8 bytes"));
    if ret < 0 {
        return Err(std::io::Error::from_raw_os_error(-ret as i32));
    }
    Ok(true)
}
