//! The floor of any cgroup sock_ops attachment: a program that returns at
//! once (`r0 = 1; exit`), attached to a cgroup of its own. What a process in
//! that cgroup pays is what the kernel charges for calling a sock_ops
//! program at each of its points, whatever the program does; the bench
//! sets tcpka's figures next to it.
use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{bail, Context as _, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_F_ALLOW_MULTI: u32 = 2;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;

/// `union bpf_attr` as a zeroed buffer, fields written at their offsets.
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn u32(mut self, off: usize, v: u32) -> Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn u64(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn call(&self, cmd: libc::c_long, what: &str) -> Result<i64> {
        // SAFETY: bpf(2) with a zero-padded bpf_attr of the given size.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_ptr(), self.0.len()) };
        if r < 0 {
            bail!("{what}: {}", std::io::Error::last_os_error());
        }
        Ok(r)
    }
}

/// Loads a program that returns `r0` at once (`r0 = R0; exit`), named
/// `tcpka_floor`; `attr` holds its type and where it attaches.
fn load_empty(attr: Attr, r0: u8, what: &str) -> Result<OwnedFd> {
    // struct bpf_insn: code, regs, off, imm.
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, r0, 0, 0, 0]), // r0 = R0
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),  // exit
    ];
    let license = c"Dual MIT/GPL";
    let mut attr = attr
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64);
    attr.0[48..59].copy_from_slice(b"tcpka_floor");
    let fd = attr.call(BPF_PROG_LOAD, what)?;
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An empty sock_ops program attached to one cgroup; detached on drop.
pub struct EmptySockOps {
    prog: OwnedFd,
    cgroup: File,
}

impl EmptySockOps {
    pub fn attach(cgroup: &Path) -> Result<Self> {
        let prog = load_empty(
            Attr::new().u32(0, BPF_PROG_TYPE_SOCK_OPS),
            1,
            "loading an empty sock_ops program",
        )?;
        let cgroup = File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
        Attr::new()
            .u32(0, cgroup.as_raw_fd() as u32)
            .u32(4, prog.as_raw_fd() as u32)
            .u32(8, BPF_CGROUP_SOCK_OPS)
            .u32(12, BPF_F_ALLOW_MULTI)
            .call(BPF_PROG_ATTACH, "attaching the empty sock_ops program")?;
        Ok(Self { prog, cgroup })
    }

    /// The kernel's run statistics of the program: (run_time_ns, run_cnt),
    /// counted while `BPF_ENABLE_STATS` is on.
    pub fn runtime(&self) -> Result<(u64, u64)> {
        runtime(&self.prog)
    }
}

/// The kernel's run statistics of a program: (run_time_ns, run_cnt).
fn runtime(prog: &OwnedFd) -> Result<(u64, u64)> {
    // struct bpf_prog_info: run_time_ns at 192, run_cnt at 200.
    let mut info = [0u8; 232];
    Attr::new()
        .u32(0, prog.as_raw_fd() as u32)
        .u32(4, info.len() as u32)
        .u64(8, info.as_mut_ptr() as u64)
        .call(
            BPF_OBJ_GET_INFO_BY_FD,
            "reading the empty program's statistics",
        )?;
    let at = |off: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&info[off..off + 8]);
        u64::from_ne_bytes(b)
    };
    Ok((at(192), at(200)))
}

/// The floor of any program on a tracepoint tcpka uses
/// (`inet_sock_set_state`, `tcp_destroy_sock`): one that returns at once,
/// attached host-wide (tp_btf) for as long as this lives.
pub struct EmptyTracepoint {
    prog: OwnedFd,
    _link: OwnedFd,
}

impl EmptyTracepoint {
    pub fn attach(tracepoint: &str) -> Result<Self> {
        let btf_id = vmlinux_type_id(&format!("btf_trace_{tracepoint}"))?;
        let prog = load_empty(
            Attr::new()
                .u32(0, BPF_PROG_TYPE_TRACING)
                .u32(68, BPF_TRACE_RAW_TP)
                .u32(108, btf_id),
            0,
            "loading an empty tp_btf program",
        )?;
        let link = Attr::new().u32(8, prog.as_raw_fd() as u32).call(
            BPF_RAW_TRACEPOINT_OPEN,
            "attaching the empty tp_btf program",
        )?;
        // SAFETY: a new descriptor we own.
        let link = unsafe { OwnedFd::from_raw_fd(link as i32) };
        Ok(Self { prog, _link: link })
    }

    /// See [`EmptySockOps::runtime`].
    pub fn runtime(&self) -> Result<(u64, u64)> {
        runtime(&self.prog)
    }
}

/// The id of a named type in the kernel's BTF (bpftool reads it).
fn vmlinux_type_id(name: &str) -> Result<u32> {
    let out = std::process::Command::new("bpftool")
        .args([
            "btf",
            "dump",
            "file",
            "/sys/kernel/btf/vmlinux",
            "format",
            "raw",
        ])
        .output()
        .context("running bpftool btf dump")?;
    let want = format!("'{name}'");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(want.as_str()))
        .and_then(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .with_context(|| format!("no type {name} in the kernel's BTF"))
}

impl Drop for EmptySockOps {
    fn drop(&mut self) {
        let _ = Attr::new()
            .u32(0, self.cgroup.as_raw_fd() as u32)
            .u32(4, self.prog.as_raw_fd() as u32)
            .u32(8, BPF_CGROUP_SOCK_OPS)
            .call(BPF_PROG_DETACH, "detaching the empty sock_ops program");
    }
}
