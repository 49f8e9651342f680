//! Network namespaces: private ones, named ones (`ip netns`), and a peer
//! host behind a veth pair.
use super::*;

/// The current thread in a fresh network namespace with `lo` up; restores
/// the previous namespace on drop. Processes spawned from this thread
/// inherit the namespace.
pub struct NetNs {
    previous: File,
}

impl NetNs {
    pub fn new() -> Self {
        require_root();
        let previous = File::open("/proc/thread-self/ns/net").expect("open current netns");
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        set_link_up("lo");
        Self { previous }
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        setns(self.previous.as_fd(), CloneFlags::CLONE_NEWNET).expect("restore netns");
    }
}

/// Brings an interface of the current namespace up (SIOCSIFFLAGS).
pub fn set_link_up(name: &str) {
    // SAFETY: plain socket/ioctl calls on an ifreq we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket for ioctl");
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.bytes().enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        assert_eq!(
            libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr),
            0,
            "SIOCGIFFLAGS {name}"
        );
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut ifr),
            0,
            "SIOCSIFFLAGS {name}"
        );
        libc::close(fd);
    }
}

/// Runs `f` with the current thread in the namespace behind `ns_path`
/// (e.g. `/run/netns/NAME`); sockets made in `f` stay in that namespace.
pub fn in_netns<T>(ns_path: &Path, f: impl FnOnce() -> T) -> T {
    let previous = File::open("/proc/thread-self/ns/net").expect("open current netns");
    let target = File::open(ns_path).expect("open target netns");
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns target");
    let out = f();
    setns(previous.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns back");
    out
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    pub fn new() -> Self {
        let name = unique("tcpka-test-ns");
        sh(&["ip", "netns", "add", &name]);
        Self { name }
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Default for NamedNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A peer host in its own network namespace behind a veth pair:
/// 10.199.0.1 (ours, `tka0`) <-> 10.199.0.2 (the peer, `tka1`).
/// [`VethPeer::cut`] takes the peer's link down: its packets stop.
pub struct VethPeer {
    pub ns: NamedNetns,
}

impl VethPeer {
    pub const ADDR: &'static str = "10.199.0.2";

    pub fn new() -> Self {
        let ns = NamedNetns::new();
        let name = ns.name.clone();
        sh(&[
            "ip", "link", "add", "tka0", "type", "veth", "peer", "name", "tka1", "netns", &name,
        ]);
        sh(&["ip", "addr", "add", "10.199.0.1/24", "dev", "tka0"]);
        sh(&["ip", "link", "set", "tka0", "up"]);
        sh(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            "10.199.0.2/24",
            "dev",
            "tka1",
        ]);
        sh(&["ip", "-n", &name, "link", "set", "tka1", "up"]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { ns }
    }

    /// A listener on the peer.
    pub fn listen(&self) -> TcpListener {
        self.listen_on(0)
    }

    /// A listener on the peer, on `port` (0: any).
    pub fn listen_on(&self, port: u16) -> TcpListener {
        in_netns(&self.ns.path(), || {
            listen(&format!("{}:{port}", Self::ADDR))
        })
    }

    /// The peer stops answering.
    pub fn cut(&self) {
        sh(&["ip", "-n", &self.ns.name, "link", "set", "tka1", "down"]);
    }

    /// The peer answers again.
    pub fn restore(&self) {
        sh(&["ip", "-n", &self.ns.name, "link", "set", "tka1", "up"]);
    }

    /// The peer's answers are dropped on its side (a blackhole route to
    /// us): the link stays up, so what we send leaves and is counted
    /// (retransmits), and nothing comes back.
    pub fn drop_answers(&self) {
        sh(&[
            "ip",
            "-n",
            &self.ns.name,
            "route",
            "add",
            "blackhole",
            "10.199.0.1/32",
        ]);
    }

    /// Undoes [`VethPeer::drop_answers`].
    pub fn answer_again(&self) {
        sh(&[
            "ip",
            "-n",
            &self.ns.name,
            "route",
            "del",
            "blackhole",
            "10.199.0.1/32",
        ]);
    }
}

impl Default for VethPeer {
    fn default() -> Self {
        Self::new()
    }
}
