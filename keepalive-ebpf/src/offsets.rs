//! Where the kernel struct members the programs read are: one read-only
//! global, set by the loader from the running kernel's BTF
//! ([`keepalive_common::offsets`]).
pub use keepalive_common::offsets::Offsets;

#[unsafe(no_mangle)]
pub static OFFSETS: Offsets = Offsets::UNSET;

/// The offset of one member, e.g. `offset!(skc_net)`, as a `usize`. A
/// volatile read: the compiler must not fold in [`Offsets::UNSET`].
macro_rules! offset {
    ($member:ident) => {
        // SAFETY: a read-only global, set by the loader before load.
        unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!($crate::offsets::OFFSETS.$member)) as usize
        }
    };
}
pub(crate) use offset;
