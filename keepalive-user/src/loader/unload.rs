//! Unloading: detaching the programs and removing every pin.
use std::os::fd::AsFd;

use keepalive_common::maps;

use super::mounts::check_pin_dir;
use crate::{lock::Lock, paths::PinLayout, sys, Error, Result};

/// Detaches the programs and removes every pin. Returns whether anything
/// was there.
pub fn unload(layout: &PinLayout) -> Result<bool> {
    if std::fs::symlink_metadata(layout.dir()).is_err() {
        return Ok(false);
    }
    check_pin_dir(layout)?;
    let _lock = Lock::acquire(layout)?;
    let found = detach_and_remove(layout)?;
    Ok(remove_pin_dir(layout)? || found)
}

pub(super) fn detach_and_remove(layout: &PinLayout) -> Result<bool> {
    let link_path = layout.sock_ops_link();
    let mut found = false;
    if link_path.exists() {
        found = true;
        let link = sys::obj_get(&link_path)
            .map_err(|e| Error::io(format!("opening {}", link_path.display()), e))?;
        // Detach now even if another process (a running `tcpka serve`)
        // still holds the link open.
        sys::link_detach(link.as_fd()).map_err(|e| Error::io("detaching the sock_ops link", e))?;
        drop(link);
    }
    found |= remove_pins(layout)?;
    // A holder change left unfinished has nothing left to finish.
    crate::journal::Journal::new(layout).remove();
    Ok(found)
}

/// Removes tcpka's pin files. The directory stays: the unit makes it for
/// the service user, who may not make it again (`/sys/fs/bpf` is root's).
pub(super) fn remove_pins(layout: &PinLayout) -> Result<bool> {
    let mut found = false;
    let names = std::iter::once(
        layout
            .dir()
            .join(format!("{}_new", crate::paths::SOCK_OPS_LINK)),
    )
    .chain(layout.links().into_iter().rev())
    .chain([
        layout.close_prog(),
        layout.destroy_prog(),
        layout.lookup_prog(),
    ])
    .chain(maps::ALL.iter().map(|n| layout.map(n)));
    for path in names {
        match std::fs::remove_file(&path) {
            Ok(()) => found = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }
    Ok(found)
}

/// Removes the emptied pin directory (`unload`). One that is a mount point
/// (the service's own view of it, bound by the unit) is left to its mount.
pub(super) fn remove_pin_dir(layout: &PinLayout) -> Result<bool> {
    match std::fs::remove_dir(layout.dir()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(false),
        Err(e) => Err(Error::io(
            format!("removing {} (not empty?)", layout.dir().display()),
            e,
        )),
    }
}
