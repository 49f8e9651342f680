//! The rules an agent last saw, kept on disk across restarts.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The rules as etcd has them (raw values, malformed ones included) and
/// the revision they are at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Cache {
    pub(super) prefix: String,
    pub(super) revision: i64,
    pub(super) rules: BTreeMap<String, String>,
}

impl Cache {
    pub(super) fn load(path: &std::path::Path, prefix: &str) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        match serde_json::from_str::<Cache>(&text) {
            Ok(c) if c.prefix == prefix => Some(c),
            Ok(c) => {
                tracing::warn!(
                    cache = %path.display(),
                    "fleet: the cached rules are for prefix {}, not {prefix}: not used",
                    c.prefix
                );
                None
            }
            Err(e) => {
                tracing::warn!(cache = %path.display(), "fleet: unreadable cache ignored: {e}");
                None
            }
        }
    }

    /// Written whole or not at all (a new file renamed over the old).
    pub(super) fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let tmp = path.with_extension("json.new");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_written_whole_and_read_back() {
        let dir = std::env::temp_dir().join(format!("tcpka-fleet-cache-{}", std::process::id()));
        let path = dir.join("sub/x.json");
        let c = Cache {
            prefix: "/tcpka".into(),
            revision: 7,
            rules: [("a".to_owned(), "{\"idle\":1}".to_owned())].into(),
        };
        c.save(&path).unwrap();
        assert_eq!(Cache::load(&path, "/tcpka"), Some(c));
        assert_eq!(Cache::load(&path, "/other"), None);
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(Cache::load(&path, "/tcpka"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
