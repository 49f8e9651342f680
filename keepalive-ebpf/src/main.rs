//! tcpka's kernel programs. Each program has one job and lives in its own
//! module; lookups and `bpf_setsockopt` calls they share are in `apply`.
#![no_std]
#![no_main]

mod apply;
mod fds;
mod index;
mod iter;
mod lookup;
mod maps;
mod offsets;
mod risk;
mod sock;
mod sockops;
mod state;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier proves no panic path is reachable; this only
    // satisfies the compiler.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The kernel's licence string for these programs: MIT or GPL-2.0, as this
/// crate declares (the kernel takes "Dual MIT/GPL" as GPL-compatible, which
/// the tracing helpers these programs use require).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
