// NB: this stub exists so that cargo sees a library target: keepalive-user's
// build script depends on this crate, and edits to keepalive-common then
// trigger a rebuild of the eBPF object.
#![no_std]
