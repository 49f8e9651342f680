//! What is installed and where it is attached; re-attaching an
//! installation whose cgroup was removed and is back.
use std::{fs::File, os::fd::AsFd, path::PathBuf};

use keepalive_common::meta::Meta;

use super::Installation;
use crate::{
    cgroup::Cgroup,
    lock::Lock,
    paths::PinLayout,
    pinned::{holder_mode, index_mode, read_meta, write_meta},
    sys, Error, Result,
};

/// Whether the installation's sock_ops link is pinned. A pin directory we
/// may not look into is an error that says which privilege is missing,
/// not "not loaded".
pub fn is_loaded(layout: &PinLayout) -> Result<bool> {
    match std::fs::symlink_metadata(layout.sock_ops_link()) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(crate::host::denied(
            format!("reading {}", layout.dir().display()),
            layout.dir(),
        )),
        Err(e) => Err(Error::io(format!("reading {}", layout.dir().display()), e)),
    }
}

/// Reads the installation record, or `None` when nothing is loaded.
pub fn installed(layout: &PinLayout) -> Result<Option<Installation>> {
    if !is_loaded(layout)? {
        return Ok(None);
    }
    let meta = read_meta(layout)?;
    let link = sock_ops_link_info(layout)?;
    let cgroup = meta_cgroup_path(&meta);
    // A removed cgroup lingers, with the program attached, until its last
    // socket is freed; what counts is the cgroup now at the path.
    let at_path = std::fs::metadata(&cgroup)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .ok();
    Ok(Some(Installation {
        pin_dir: layout.dir().to_path_buf(),
        cgroup,
        cgroup_id: meta.cgroup_id,
        attached: link.cgroup_id != 0
            && link.cgroup_id == meta.cgroup_id
            && at_path == Some(meta.cgroup_id),
        seeded: meta.flags & keepalive_common::meta::FLAG_SEEDED != 0,
        holders: holder_mode(&meta),
        index: index_mode(&meta),
    }))
}

pub(super) fn sock_ops_link_info(layout: &PinLayout) -> Result<sys::CgroupLinkInfo> {
    let path = layout.sock_ops_link();
    let link =
        sys::obj_get(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    sys::cgroup_link_info(link.as_fd())
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

/// Attaches the pinned sock_ops program to `cgroup` with a new link, puts
/// that link in place of the pinned one and records the cgroup. The
/// caller holds the lock.
pub(super) fn reattach(layout: &PinLayout, cgroup: &Cgroup) -> Result<Installation> {
    let info = sock_ops_link_info(layout)?;
    let prog = sys::prog_get_fd_by_id(info.prog_id)
        .map_err(|e| Error::io("opening the sock_ops program", e))?;
    let dir = File::open(&cgroup.path)
        .map_err(|e| Error::io(format!("opening cgroup {}", cgroup.path.display()), e))?;
    let link = sys::link_create_cgroup(prog.as_fd(), dir.as_fd(), sys::BPF_CGROUP_SOCK_OPS)
        .map_err(|e| Error::io(format!("attaching to cgroup {}", cgroup.path.display()), e))?;
    // Pinned under a new name, then renamed over the old pin: the
    // installation is never seen without its link.
    let pin = layout.sock_ops_link();
    // NB: bpffs refuses names with a dot.
    let fresh = layout
        .dir()
        .join(format!("{}_new", crate::paths::SOCK_OPS_LINK));
    let _ = std::fs::remove_file(&fresh);
    sys::obj_pin(link.as_fd(), &fresh)
        .map_err(|e| Error::io(format!("pinning {}", fresh.display()), e))?;
    std::fs::rename(&fresh, &pin).map_err(|e| {
        let _ = std::fs::remove_file(&fresh);
        Error::io(format!("replacing {}", pin.display()), e)
    })?;
    let mut meta = read_meta(layout)?;
    set_meta_cgroup(&mut meta, cgroup);
    write_meta(layout, &meta)?;
    tracing::info!("re-attached to cgroup {}", cgroup.path.display());
    Ok(Installation {
        pin_dir: layout.dir().to_path_buf(),
        cgroup: cgroup.path.clone(),
        cgroup_id: cgroup.id,
        attached: true,
        seeded: meta.flags & keepalive_common::meta::FLAG_SEEDED != 0,
        holders: holder_mode(&meta),
        index: index_mode(&meta),
    })
}

pub(super) fn meta_cgroup_path(meta: &Meta) -> PathBuf {
    let len = (meta.cgroup_path_len as usize).min(meta.cgroup_path.len());
    PathBuf::from(String::from_utf8_lossy(&meta.cgroup_path[..len]).into_owned())
}

pub(super) fn set_meta_cgroup(meta: &mut Meta, cgroup: &Cgroup) {
    let path_bytes = cgroup.path.to_string_lossy().into_owned().into_bytes();
    meta.cgroup_id = cgroup.id;
    meta.cgroup_path = [0; keepalive_common::meta::PATH_MAX];
    let n = path_bytes.len().min(meta.cgroup_path.len());
    meta.cgroup_path[..n].copy_from_slice(&path_bytes[..n]);
    meta.cgroup_path_len = n as u32;
}

/// Re-attaches an installation whose cgroup was removed, once a cgroup
/// exists again at the recorded path (a restarted service). Returns the
/// installation when it re-attached, `None` when nothing needed doing or
/// the cgroup is not back yet.
pub fn repair_attachment(layout: &PinLayout) -> Result<Option<Installation>> {
    match installed(layout)? {
        Some(i) if !i.attached => {}
        _ => return Ok(None),
    }
    let _lock = Lock::acquire(layout)?;
    let Some(current) = installed(layout)? else {
        return Ok(None);
    };
    if current.attached {
        return Ok(None);
    }
    let Ok(cgroup) = Cgroup::open(&current.cgroup) else {
        return Ok(None);
    };
    reattach(layout, &cgroup).map(Some)
}
