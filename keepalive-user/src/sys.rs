//! The few BPF syscalls aya does not wrap.
use std::os::fd::{AsRawFd as _, BorrowedFd};

const BPF_LINK_DETACH: libc::c_long = 34;

/// Forcibly detaches a link (`BPF_LINK_DETACH`), so that a program stops
/// running even while some other process still holds the link open.
pub fn link_detach(link: BorrowedFd<'_>) -> std::io::Result<()> {
    // union bpf_attr { struct { __u32 link_fd; } link_detach; }, zero padded.
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

const BPF_OBJ_GET: libc::c_long = 7;

/// Why a path cannot be handed to the kernel.
const NUL_IN_PATH: &str = "the path holds a NUL byte";

/// Opens a pinned BPF object (`BPF_OBJ_GET`).
pub fn obj_get(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, NUL_IN_PATH))?;
    // union bpf_attr { struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }; }
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_OBJ_PIN: libc::c_long = 6;
/// `enum bpf_attach_type`: BPF_CGROUP_SOCK_OPS.
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-padded bpf_attr of the given size; any
    // pointers in it outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_long) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    // SAFETY: the kernel returned a new fd that we now own.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says of a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub prog_id: u32,
    /// 0 once the kernel detached the link because its cgroup went away.
    pub cgroup_id: u64,
}

/// Reads a cgroup link's program and cgroup.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> std::io::Result<CgroupLinkInfo> {
    // struct bpf_link_info { u32 type, id, prog_id; union { struct { u64
    // cgroup_id; u32 attach_type; } cgroup; ... } } (the union at +16).
    let mut info = [0u8; 64];
    let mut attr = [0u8; 128];
    // union bpf_attr { struct { u32 bpf_fd; u32 info_len; u64 info; } info; }
    attr[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    Ok(CgroupLinkInfo {
        prog_id: u32_at(8),
        cgroup_id: u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes")),
    })
}

/// Opens a loaded program by id (`BPF_PROG_GET_FD_BY_ID`).
pub fn prog_get_fd_by_id(id: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(owned)
}

/// Attaches a program to a cgroup with a new link (`BPF_LINK_CREATE`).
pub fn link_create_cgroup(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    // struct { u32 prog_fd; u32 target_fd; u32 attach_type; u32 flags; } link_create;
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Pins a BPF object (`BPF_OBJ_PIN`).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, NUL_IN_PATH))?;
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;

/// Attaches a `tp_btf` program to the tracepoint it was loaded for
/// (`BPF_RAW_TRACEPOINT_OPEN` without a name); returns the link.
pub fn raw_tracepoint_open(prog: BorrowedFd<'_>) -> std::io::Result<std::os::fd::OwnedFd> {
    // union bpf_attr { struct { __u64 name; __u32 prog_fd; } raw_tracepoint; }
    let mut attr = [0u8; 128];
    attr[8..12].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr).map(owned)
}
