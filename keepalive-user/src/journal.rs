//! The intent of a multi-step change to the holder maps, written before
//! the first step and marked finished after the last, so that a command killed in
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

/// A change that could not be finished, set aside.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Aside {
    pub entry: Entry,
    pub why: String,
}

/// The journal of one installation.
pub struct Journal {
    path: PathBuf,
    /// The installation's generation ([`crate::pinned::generation`]).
    generation: Option<u64>,
}

/// The journal file this process writes, kept open while the installation
/// lasts: a daemon records one change per holder command, and creating,
/// truncating and removing a file each time cost more than the change.
/// A record is overwritten in place and padded with spaces to the file's
/// length; a finished one has its first byte (`{`) overwritten with `#`.
struct Open {
    path: PathBuf,
    generation: u64,
    file: File,
    len: u64,
}

static OPEN: Mutex<Option<Open>> = Mutex::new(None);

/// The first byte of a finished record.
const DONE: u8 = b'#';

fn open_file(path: &std::path::Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl Journal {
    pub fn new(layout: &PinLayout) -> Self {
        Self {
            path: layout.journal_file(),
            generation: crate::pinned::generation(layout).ok().flatten(),
        }
    }

    /// Runs `f` on this journal's kept file, opening it when needed.
    fn with_file<T>(
        &self,
        f: impl FnOnce(&File, &mut u64) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let Some(generation) = self.generation else {
            let file = open_file(&self.path)?;
            let mut len = file.metadata()?.len();
            return f(&file, &mut len);
        };
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        let kept = open
            .as_ref()
            .is_some_and(|o| o.path == self.path && o.generation == generation);
        if !kept {
            let file = open_file(&self.path)?;
            let len = file.metadata()?.len();
            *open = Some(Open {
                path: self.path.clone(),
                generation,
                file,
                len,
            });
        }
        let o = open.as_mut().expect("just opened");
        f(&o.file, &mut o.len)
    }

    /// The kept file's content, when this process keeps it open (`None`:
    /// it does not; the file is not created to be read).
    fn read_kept(&self) -> Option<std::io::Result<Vec<u8>>> {
        use std::os::unix::fs::FileExt as _;
        let generation = self.generation?;
        let open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        let o = open
            .as_ref()
            .filter(|o| o.path == self.path && o.generation == generation)?;
        let mut out = vec![0; 512];
        let mut n = 0;
        loop {
            if n == out.len() {
                out.resize(2 * n, 0);
            }
            match o.file.read_at(&mut out[n..], n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Some(Err(e)),
            }
        }
        out.truncate(n);
        Some(Ok(out))
    }

    /// Records `entry` before its first step.
    pub fn begin(&self, entry: &Entry) -> Result<()> {
        use std::os::unix::fs::FileExt as _;
        let mut text = serde_json::to_vec(entry).expect("plain data");
        self.with_file(|file, len| {
            if (text.len() as u64) < *len {
                text.resize(*len as usize, b' ');
            }
            file.write_all_at(&text, 0)?;
            *len = text.len() as u64;
            Ok(())
        })
        .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }

    /// Marks the record finished after the last step.
    pub fn end(&self) {
        use std::os::unix::fs::FileExt as _;
        let marked = self.with_file(|file, len| match *len {
            0 => Ok(()),
            _ => file.write_all_at(&[DONE], 0),
        });
        if marked.is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Sets a record that cannot be finished aside (with why), so that it
    /// blocks no other command, and ends it. Kept, one JSON line each, in
    /// a file beside the journal until the installation goes (see
    /// [`Journal::set_aside`]).
    pub fn put_aside(&self, entry: &Entry, why: &str) {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let line = serde_json::json!({ "entry": entry, "why": why }).to_string();
        let written = File::options()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.aside_path())
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::warn!("recording a holder change set aside: {e}");
        }
        self.end();
    }

    /// The records set aside by [`Journal::put_aside`], with why.
    pub fn set_aside(&self) -> Vec<Aside> {
        let Ok(text) = std::fs::read_to_string(self.aside_path()) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Forgets the records set aside (none is needed any more).
    pub fn clear_aside(&self) {
        let _ = std::fs::remove_file(self.aside_path());
    }

    fn aside_path(&self) -> PathBuf {
        self.path.with_extension("aside")
    }

    /// Removes the file (the installation is gone).
    pub fn remove(&self) {
        self.clear_aside();
        let _ = std::fs::remove_file(&self.path);
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if open.as_ref().is_some_and(|o| o.path == self.path) {
            *open = None;
        }
    }

    /// The change a killed command left unfinished, if any. An unreadable
    /// record is removed with a warning: it cannot be acted on.
    pub fn pending(&self) -> Option<Entry> {
        let bytes = match self.read_kept() {
            Some(r) => r.ok()?,
            None => std::fs::read(&self.path).ok()?,
        };
        let text = String::from_utf8_lossy(&bytes);
        if text.trim().is_empty() || text.as_bytes()[0] == DONE {
            return None;
        }
        // Only the first value counts: another process's longer record may
        // have left bytes after it.
        match serde_json::Deserializer::from_str(&text)
            .into_iter::<Entry>()
            .next()?
        {
            Ok(e) => Some(e),
            Err(err) => {
                tracing::warn!("ignoring unreadable {}: {err}", self.path.display());
                self.end();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_found_until_it_is_ended_also_after_a_longer_one() {
        let dir = std::env::temp_dir().join(format!("tcpka-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let j = Journal {
            path: dir.join("j"),
            generation: None,
        };
        assert_eq!(j.pending(), None);
        let long = Entry {
            step: Step::Remove,
            cookie: 1,
            netns: Some("/run/netns/a-rather-long-namespace-name".into()),
        };
        j.begin(&long).unwrap();
        assert_eq!(j.pending(), Some(long));
        j.end();
        assert_eq!(j.pending(), None);
        let short = Entry {
            step: Step::Add,
            cookie: 2,
            netns: None,
        };
        j.begin(&short).unwrap();
        assert_eq!(j.pending(), Some(short.clone()));
        // Another writer's longer record left bytes after ours.
        std::fs::write(&j.path, br#"{"step":"add","cookie":2,"netns":null}ns/x"}"#).unwrap();
        assert_eq!(j.pending(), Some(short));
        j.end();
        assert_eq!(j.pending(), None);
        j.remove();
        assert!(!j.path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
