//! The intent of a multi-step change to the holder maps, written before
//! the first step and removed after the last, so that a command killed in
//! between leaves a record the next command uses to finish or undo it.
//!
//! One file per installation, next to its lock (root only), written only
//! under the lock.
use std::path::PathBuf;

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

impl Journal {
    pub fn new(layout: &PinLayout) -> Self {
        Self {
            path: layout.journal_file(),
        }
    }

    /// Records `entry` before its first step.
    pub fn begin(&self, entry: &Entry) -> Result<()> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let text = serde_json::to_string(entry).expect("plain data");
        let mut f = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }

    /// Clears the record after the last step.
    pub fn end(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// The change a killed command left unfinished, if any. An unreadable
    /// record is removed with a warning: it cannot be acted on.
    pub fn pending(&self) -> Option<Entry> {
        let text = std::fs::read_to_string(&self.path).ok()?;
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
