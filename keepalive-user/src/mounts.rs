//! The mount table (`/proc/self/mounts`), read where tcpka needs to know
//! what is mounted: cgroup v2, tracefs.
use std::path::PathBuf;

/// Where the mount table is read.
pub const MOUNTS: &str = "/proc/self/mounts";

/// The mount points of file system type `fstype`, in the table's order.
pub fn mount_points(fstype: &str) -> std::io::Result<Vec<PathBuf>> {
    Ok(std::fs::read_to_string(MOUNTS)?
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_, dir, t) = (f.next()?, f.next()?, f.next()?);
            (t == fstype).then(|| PathBuf::from(unescape(dir)))
        })
        .collect())
}

/// Mount paths in /proc/self/mounts escape spaces and such as `\040`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/x\\04"), "/x\\04");
    }

    #[test]
    fn finds_mount_points_by_type() {
        assert!(mount_points("proc")
            .unwrap()
            .contains(&PathBuf::from("/proc")));
        assert!(mount_points("no-such-fs").unwrap().is_empty());
    }
}
