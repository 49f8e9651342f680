//! Finding cgroup v2 directories.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Problems with a cgroup path.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 mount in /proc/self/mounts")]
    NoCgroup2Mount,
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cgroup v2 mount point, from `/proc/self/mounts` (the first `cgroup2`
/// entry: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    crate::mounts::mount_points("cgroup2")
        .map_err(|source| CgroupError::Open {
            path: crate::mounts::MOUNTS.into(),
            source,
        })?
        .into_iter()
        .next()
        .ok_or(CgroupError::NoCgroup2Mount)
}

/// A cgroup v2 directory, checked, with its id (the directory's inode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    pub path: PathBuf,
    pub id: u64,
}

impl Cgroup {
    /// Checks that `path` is a directory on a cgroup v2 filesystem.
    pub fn open(path: &Path) -> Result<Self, CgroupError> {
        let meta = std::fs::metadata(path).map_err(|source| CgroupError::Open {
            path: path.into(),
            source,
        })?;
        let fs = nix::sys::statfs::statfs(path).map_err(|e| CgroupError::Open {
            path: path.into(),
            source: e.into(),
        })?;
        if !meta.is_dir() || fs.filesystem_type().0 != CGROUP2_SUPER_MAGIC {
            return Err(CgroupError::NotCgroup2 { path: path.into() });
        }
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(Self {
            path,
            id: meta.ino(),
        })
    }

    /// The given path, or the root of the cgroup v2 mount.
    pub fn open_or_root(path: Option<&Path>) -> Result<Self, CgroupError> {
        match path {
            Some(p) => Self::open(p),
            None => Self::open(&cgroup2_mount()?),
        }
    }
}
