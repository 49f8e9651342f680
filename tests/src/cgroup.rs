//! A child cgroup of the test's own, and what is attached to a cgroup.
use super::*;

/// The cgroup v2 mount point.
pub fn cgroup2_root() -> PathBuf {
    tcpka::cgroup::cgroup2_mount().expect("a cgroup v2 mount")
}

/// A child cgroup of the cgroup v2 root. [`CgroupDir::enter`] moves this
/// whole process into it; drop moves it back and removes the directory.
pub struct CgroupDir {
    pub path: PathBuf,
    home: PathBuf,
}

impl CgroupDir {
    pub fn new() -> Self {
        require_root();
        let root = cgroup2_root();
        let path = root.join(unique("tcpka-test"));
        std::fs::create_dir(&path).expect("create test cgroup");
        Self {
            path,
            home: current_cgroup(&root),
        }
    }

    /// Moves the whole test process into this cgroup: sockets created from
    /// now on belong to it.
    pub fn enter(&self) {
        std::fs::write(
            self.path.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .expect("move into test cgroup");
    }

    /// Moves the process back to where it started.
    pub fn leave(&self) {
        std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .expect("move back to original cgroup");
    }
}

impl Default for CgroupDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        self.leave();
        // A cgroup whose last socket is still being freed can briefly refuse.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

pub(super) fn current_cgroup(root: &Path) -> PathBuf {
    let s = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let rel = s
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line in /proc/self/cgroup");
    root.join(rel.trim_start_matches('/'))
}

/// Programs attached to a cgroup directly, as bpftool reports them.
pub fn attached_programs(cgroup: &Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show", cgroup.to_str().unwrap(), "--json"])
        .output()
        .expect("run bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.get("name").and_then(|n| n.as_str()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
