//! The few BPF syscalls aya does not wrap.
use std::os::fd::{AsRawFd as _, BorrowedFd};

const BPF_LINK_DETACH: libc::c_long = 34;

/// Forcibly detaches a link (`BPF_LINK_DETACH`), so that a program stops
/// running even while some other process still holds the link open.
pub fn link_detach(link: BorrowedFd<'_>) -> std::io::Result<()> {
    // union bpf_attr { struct { __u32 link_fd; } link_detach; }, zero padded.
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: attr is a valid, zeroed bpf_attr of the given size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

const BPF_OBJ_GET: libc::c_long = 7;

/// Opens a pinned BPF object (`BPF_OBJ_GET`).
pub fn obj_get(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // union bpf_attr { struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }; }
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    // SAFETY: attr is a valid, zeroed bpf_attr; c_path outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(ret as i32) })
}
