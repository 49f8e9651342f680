//! Kernel access: passes of the pinned iterators (reading one runs its
//! program once over the kernel's TCP sockets or every task's files), and
//! work inside another network namespace.
//!
//! Entering a namespace (`setns`) changes the calling thread only, so
//! [`in_netns`] does it on a thread of its own that ends with the work: no
//! shared thread is ever left inside another namespace, whatever fails.
use std::{fs::File, io::Read as _, path::Path};

use keepalive_common::requests::ConnRecord;

use crate::{Error, Result};

/// Runs `f` in network namespace `ns`, on a thread of its own.
pub fn in_netns<T: Send>(ns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let target = crate::access::open_netns(ns)?;
            nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                Error::Netns {
                    path: ns.into(),
                    source: e.into(),
                }
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::Internal(format!(
                "working in {}: the namespace thread panicked",
                ns.display()
            )))
        })
    })
}

/// Runs the pinned iterator `pin` once, in namespace `netns` (default: our
/// own; an iter/tcp pass sees the sockets of the namespace it was opened
/// in), and returns what it wrote. With `limit`, stops reading after that
/// many [`ConnRecord`]s.
pub fn run(pin: &Path, netns: Option<&Path>, limit: Option<usize>) -> Result<Vec<u8>> {
    let open = || {
        File::open(pin).map_err(|e| Error::io(format!("running the iterator {}", pin.display()), e))
    };
    let mut file = match netns {
        None => open()?,
        Some(ns) => in_netns(ns, open)?,
    };
    let read_err = |e| Error::io(format!("reading the iterator {}", pin.display()), e);
    let mut buf = Vec::with_capacity(64 * 1024);
    match limit {
        None => {
            file.read_to_end(&mut buf).map_err(read_err)?;
        }
        Some(n) => {
            // NB: a read returns as soon as the kernel has written enough
            // to fill the buffer, so one record per read stops the walk
            // right after the last expected match.
            let mut record = [0u8; size_of::<ConnRecord>()];
            while buf.len() < n * record.len() {
                let got = file.read(&mut record).map_err(read_err)?;
                if got == 0 {
                    break;
                }
                buf.extend_from_slice(&record[..got]);
            }
        }
    }
    Ok(buf)
}
