//! Who holds each TCP socket, so user space can reach it with
//! `pidfd_getfd`: the `accept`/`accept4` exits and `connect` entries from
//! now on, and an `iter/task_file` pass at load for what exists.
//!
//! NB: `fentry/fd_install` would see every descriptor, but attaching to
//! kernel functions is not allowed on every host; syscall tracepoints are,
//! and cost nothing on other syscalls. Descriptors passed on with
//! SCM_RIGHTS or dup are not seen: user space then walks the socket table.
//!
//! # Minimum kernel version
//! 5.11 (`bpf_sock_from_file`).
use core::ffi::c_void;

use aya_ebpf::{
    bindings::file,
    helpers::{bpf_get_current_task, generated::bpf_sock_from_file},
    macros::tracepoint,
    programs::TracePointContext,
};

use keepalive_common::index::FdOwner;

use crate::{
    index::{current_tgid, record_fd},
    maps::{FDS, WANT},
    offsets::offset,
    sock::read,
};

/// Records the holder of descriptor `fd` of the current process:
/// task->files->fdt->fd[fd]->private_data is the `struct socket`.
#[inline(always)]
fn record_current(fd: u64) {
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let files: u64 = read(task, offset!(task_files));
    if files == 0 {
        return;
    }
    let fdt: u64 = read(files as *const u8, offset!(files_fdt));
    if fdt == 0 {
        return;
    }
    let max: u32 = read(fdt as *const u8, offset!(fdt_max_fds));
    if fd >= max as u64 {
        return;
    }
    let array: u64 = read(fdt as *const u8, offset!(fdt_fd));
    let f: u64 = read(array as *const u8, (fd as usize) * 8);
    if f == 0 {
        return;
    }
    let socket: u64 = read(f as *const u8, offset!(file_private_data));
    record_fd(socket as *const u8, Some(f), current_tgid(), fd as u32);
}

/// `syscalls:sys_exit_accept` and `sys_exit_accept4`: `ret` (+16) is the
/// new descriptor.
#[tracepoint]
pub fn tcpka_accept_exit(ctx: TracePointContext) -> u32 {
    // SAFETY: offset 16 is `long ret` in both formats.
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(-1);
    if ret >= 0 {
        record_current(ret as u64);
    }
    0
}

/// `syscalls:sys_enter_connect`: `fd` (+16).
#[tracepoint]
pub fn tcpka_connect_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: offset 16 is the `fd` argument.
    let fd: u64 = unsafe { ctx.read_at(16) }.unwrap_or(u64::MAX);
    if fd <= i32::MAX as u64 {
        record_current(fd);
    }
    0
}

/// `struct bpf_iter__task_file`.
#[repr(C)]
struct IterTaskFile {
    meta: *mut c_void,
    task: *const u8,
    fd: u32,
    _pad: u32,
    file: *mut file,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn tcpka_seed_fds(ctx: *mut c_void) -> i32 {
    let ctx = ctx as *const IterTaskFile;
    // SAFETY: the kernel passes a valid `bpf_iter__task_file`.
    let (task, fd, f) = unsafe { ((*ctx).task, (*ctx).fd, (*ctx).file) };
    if task.is_null() || f.is_null() {
        return 0;
    }
    let tgid: u32 = read(task, offset!(task_tgid));
    // SAFETY: a `struct file` pointer from the iterator.
    let socket = unsafe { bpf_sock_from_file(f) } as *const u8;
    record_fd(socket, None, tgid, fd);
    0
}

/// `struct socket.sk`.
const SOCKET_SK: usize = 24;

/// Finds the holders of the sockets user space put in `WANT` (key: the
/// `struct sock` address), records them there and in the fd map, and stops
/// the pass once all are found: a search costs the descriptors before the
/// last one found, with one hash lookup per socket descriptor.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn tcpka_find_fds(ctx: *mut c_void) -> i32 {
    let ctx = ctx as *const IterTaskFile;
    // SAFETY: the kernel passes a valid `bpf_iter__task_file`.
    let (task, fd, f) = unsafe { ((*ctx).task, (*ctx).fd, (*ctx).file) };
    if task.is_null() || f.is_null() {
        return 0;
    }
    // SAFETY: a `struct file` pointer from the iterator.
    let socket = unsafe { bpf_sock_from_file(f) } as *const u8;
    if socket.is_null() {
        return 0;
    }
    let sk: u64 = read(socket, SOCKET_SK);
    // Key 0 is the count of sockets still missing.
    if sk == 0 {
        return 0;
    }
    let Some(slot) = WANT.get_ptr_mut(&sk) else {
        return 0;
    };
    // SAFETY: a value of the map, written only under the installation
    // lock's single pass.
    if unsafe { (*slot).tgid } != 0 {
        return 0;
    }
    let owner = FdOwner {
        tgid: read(task, offset!(task_tgid)),
        fd,
    };
    // SAFETY: as above.
    unsafe { *slot = owner };
    let _ = FDS.insert(&sk, &owner, 0);
    let Some(left) = WANT.get_ptr_mut(&0) else {
        return 0;
    };
    // SAFETY: as above.
    unsafe {
        (*left).tgid = (*left).tgid.saturating_sub(1);
        // Returning 1 ends the pass (the read fails with EAGAIN).
        i32::from((*left).tgid == 0)
    }
}
