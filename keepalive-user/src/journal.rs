//! The intent of a multi-step change to the holder maps, written before
//! the first step and removed after the last, so that a command killed in
//! between leaves a record the next command uses to finish or undo it.
//!
//! One file per installation, next to its lock (root only), written only
//! under the lock.
use std::{fs::File, path::PathBuf, sync::Mutex};

use crate::{paths::PinLayout, Error, Result};

/// What was being done to a connection's holders.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Adding a holder (count, then entry).
    Add,
    /// Removing a holder, and turning keepalive off if it was the last.
    Remove,
    /// Removing every holder.
    Clear,
}

/// One pending change.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub step: Step,
    pub cookie: u64,
    /// The network namespace of the command, for finishing it.
    pub netns: Option<PathBuf>,
}

/// The journal of one installation.
pub struct Journal {
    path: PathBuf,
}

/// The journal file a process writes, kept open between changes: a daemon
/// records one per holder change, and creating and removing a file each
/// time cost more than the change. Checked against the path at each
/// `begin` (an unload removes the file).
static OPEN: Mutex<Option<(PathBuf, File)>> = Mutex::new(None);

impl Journal {
    pub fn new(layout: &PinLayout) -> Self {
        Self {
            path: layout.journal_file(),
        }
    }

    fn file(&self) -> std::io::Result<File> {
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((path, f)) = open.as_ref() {
            if *path == self.path {
                let same = match (std::fs::symlink_metadata(path), f.metadata()) {
                    (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                    _ => false,
                };
                if same {
                    return f.try_clone();
                }
            }
        }
        let f = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)?;
        *open = Some((self.path.clone(), f.try_clone()?));
        Ok(f)
    }

    /// Records `entry` before its first step.
    pub fn begin(&self, entry: &Entry) -> Result<()> {
        use std::os::unix::fs::FileExt as _;
        let text = serde_json::to_string(entry).expect("plain data");
        let err = |e| Error::io(format!("writing {}", self.path.display()), e);
        let f = self.file().map_err(err)?;
        // The file is empty here: every change ends with `end`, and a
        // command finishes a left-over record before it starts its own.
        f.set_len(0).map_err(err)?;
        f.write_all_at(text.as_bytes(), 0).map_err(err)
    }

    /// Clears the record after the last step.
    pub fn end(&self) {
        match self.file() {
            Ok(f) => {
                let _ = f.set_len(0);
            }
            Err(_) => {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    /// Removes the file (the installation is gone).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if open.as_ref().is_some_and(|(p, _)| *p == self.path) {
            *open = None;
        }
    }

    /// The change a killed command left unfinished, if any. An unreadable
    /// record is removed with a warning: it cannot be acted on.
    pub fn pending(&self) -> Option<Entry> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        if text.trim().is_empty() {
            return None;
        }
        match serde_json::from_str(&text) {
            Ok(e) => Some(e),
            Err(err) => {
                tracing::warn!("ignoring unreadable {}: {err}", self.path.display());
                self.end();
                None
            }
        }
    }
}
