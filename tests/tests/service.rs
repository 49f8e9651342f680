//! The systemd unit (`contrib/systemd/tcpka.service`): it verifies, and its
//! command line runs as an unprivileged user holding exactly the unit's
//! capabilities, as systemd would start it.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tcpka_tests::*;

/// A directory of the test's own under the temporary directory, removed
/// on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd/tcpka.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of the unit's `KEY=` line.
fn unit_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_owned()
}

/// `CAP_BPF CAP_NET_ADMIN` as setpriv wants it: `-all,+bpf,+net_admin`.
fn setpriv_caps(caps: &[String]) -> String {
    let mut s = String::from("-all");
    for c in caps {
        s.push_str(",+");
        s.push_str(&c.trim_start_matches("CAP_").to_lowercase());
    }
    s
}

fn unit_caps(text: &str) -> Vec<String> {
    unit_value(text, "AmbientCapabilities")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn unit_verifies_and_holds_the_documented_capabilities() {
    let text = unit_text();
    let caps = unit_caps(&text);
    let documented: Vec<String> = tcpka::doctor::CAPS.iter().map(|c| c.1.to_owned()).collect();
    assert_eq!(caps, documented);
    assert_eq!(unit_value(&text, "CapabilityBoundingSet"), caps.join(" "));

    // systemd-analyze checks that the binaries exist: the built one stands
    // in for /usr/bin/tcpka.
    let dir = TempDir::new("tcpka-unit");
    let unit = dir.0.join("tcpka.service");
    let bin = tcpka_bin();
    std::fs::write(&unit, text.replace("/usr/bin/tcpka", bin.to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

/// The service, as systemd starts it from the unit's lines, on a host whose
/// bpffs is root's mode 0700:
/// - `RuntimeDirectory=`: the runtime directory (here the test's own, named
///   in `$RUNTIME_DIRECTORY` to root's commands too) handed to the service
///   user, mode 0750;
/// - `ExecStartPre=+`: run as root;
/// - `TemporaryFileSystem=` and `BindPaths=`: a private, read-only
///   `/sys/fs/bpf` holding only the pin directory;
/// - `ExecStart=` run by the service user (uid 65534) with exactly
///   `AmbientCapabilities=`, told where to notify systemd (`Type=notify`).
///
/// The config file, pin directory, cgroup and group are the test's own.
struct Service {
    child: Child,
    caps: String,
    run_dir: PathBuf,
    notify: std::os::unix::net::UnixDatagram,
    _notify_dir: TempDir,
}

/// A runtime directory of the test's own under /run, as root's commands
/// leave /run/tcpka before the service first starts (root's, 0755);
/// removed on drop.
struct RunDir(PathBuf);

impl RunDir {
    fn new() -> Self {
        let dir = PathBuf::from("/run").join(unique("tcpka-rt"));
        std::fs::create_dir(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Service {
    fn start(t: &Tcpka, cgroup: &Path, config: &Path, run_dir: &Path) -> Self {
        let text = unit_text();
        assert_eq!(unit_value(&text, "Type"), "notify");
        assert_eq!(unit_value(&text, "RuntimeDirectory"), "tcpka");
        let caps = setpriv_caps(&unit_caps(&text));
        let bin = tcpka_bin().to_str().unwrap().to_owned();
        let pre = unit_value(&text, "ExecStartPre");
        let pre = pre
            .strip_prefix('+')
            .expect("ExecStartPre runs as root")
            .replace("/usr/bin/tcpka", &bin)
            .replace("--user tcpka", "--user 65534");
        // A private, read-only /sys/fs/bpf with only the pin directory.
        let (tmpfs, tmpfs_opts) = unit_value(&text, "TemporaryFileSystem")
            .split_once(':')
            .map(|(p, o)| (p.to_owned(), o.to_owned()))
            .unwrap();
        assert_eq!((tmpfs.as_str(), tmpfs_opts.as_str()), ("/sys/fs/bpf", "ro"));
        assert_eq!(unit_value(&text, "BindPaths"), "/sys/fs/bpf/tcpka");
        assert_eq!(t.pin_dir.parent().unwrap(), Path::new(&tmpfs));
        let exec = unit_value(&text, "ExecStart")
            .replace("/etc/tcpka/tcpka.toml", config.to_str().unwrap())
            .replace("--api-group tcpka", "--api-group nogroup");
        let mut args: Vec<String> = exec.split_whitespace().map(str::to_owned).collect();
        assert_eq!(args[0], "/usr/bin/tcpka");
        args[0] = bin;
        args.extend(["--cgroup".into(), cgroup.to_str().unwrap().into()]);
        let notify_dir = TempDir::new("tcpka-notify");
        std::fs::set_permissions(&notify_dir.0, PermissionsExt::from_mode(0o755)).unwrap();
        let socket = notify_dir.0.join("notify");
        let notify = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
        std::fs::set_permissions(&socket, PermissionsExt::from_mode(0o666)).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let script = format!(
            "set -e; \
             chown 65534:65534 \"$RUNTIME_DIRECTORY\"; chmod 0750 \"$RUNTIME_DIRECTORY\"; \
             {pre} >/dev/null; \
             keep=\"$RUNTIME_DIRECTORY/.bind\"; mkdir \"$keep\"; \
             mount --bind \"$TCPKA_PIN_DIR\" \"$keep\"; \
             mount -t tmpfs -o mode=0755 tmpfs {tmpfs}; \
             mkdir \"$TCPKA_PIN_DIR\"; mount --move \"$keep\" \"$TCPKA_PIN_DIR\"; rmdir \"$keep\"; \
             mount -o remount,bind,ro {tmpfs}; \
             exec setpriv --reuid 65534 --regid 65534 --clear-groups \
               --inh-caps {caps} --ambient-caps {caps} --bounding-set {caps} \"$@\""
        );
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"])
            .args(&args)
            .env("TCPKA_PIN_DIR", &t.pin_dir)
            .env("RUNTIME_DIRECTORY", run_dir)
            .env("NOTIFY_SOCKET", &socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the service");
        Self {
            child,
            caps,
            run_dir: run_dir.to_owned(),
            notify,
            _notify_dir: notify_dir,
        }
    }

    /// The next message the service sent systemd.
    fn notified(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .notify
            .recv(&mut buf)
            .expect("a message to systemd within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Waits for a message to systemd that contains `what`, returning the
    /// messages before it.
    fn wait_notified(&self, what: &str) -> Vec<String> {
        let mut before = Vec::new();
        loop {
            let m = self.notified();
            if m.lines().any(|l| l == what) {
                return before;
            }
            before.push(m);
        }
    }

    /// A tcpka command as the service user, in the service's mount
    /// namespace (its /sys/fs/bpf).
    fn cli(&self, t: &Tcpka, args: &[&str]) -> std::process::Output {
        let caps = &self.caps;
        Command::new("nsenter")
            .args(["-t", &self.child.id().to_string(), "-m", "--"])
            .args([
                "setpriv",
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
            ])
            .args([
                "--inh-caps",
                caps,
                "--ambient-caps",
                caps,
                "--bounding-set",
                caps,
            ])
            .arg(tcpka_bin())
            .args(args)
            .env("TCPKA_PIN_DIR", &t.pin_dir)
            .env("RUNTIME_DIRECTORY", &self.run_dir)
            .output()
            .unwrap()
    }

    fn signal(&self, sig: i32) {
        // The service is the unshare's exec'd process: its pid is ours to
        // signal.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // systemd stops with SIGTERM.
        self.signal(libc::SIGTERM);
        let _ = self.child.wait();
    }
}

/// `tcpka ARGS` as uid 65534 holding exactly `caps` (setpriv's form), on
/// the pin directory `pin_dir`, in the host's mount namespace.
fn as_nobody(caps: &str, pin_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(["--inh-caps", caps, "--ambient-caps", caps])
        .args(["--bounding-set", caps])
        .arg(tcpka_bin())
        .args(args)
        .env("TCPKA_PIN_DIR", pin_dir)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap()
}

/// A root command sharing the service's runtime directory.
fn root_cli(t: &Tcpka, run_dir: &Path, args: &[&str]) -> Run {
    Run::from(
        t.cmd()
            .env("RUNTIME_DIRECTORY", run_dir)
            .args(args)
            .output()
            .unwrap(),
    )
}

fn rule_idles(t: &Tcpka) -> Vec<u64> {
    let r = t.run(&["rule", "list", "--json"]);
    if r.code != 0 {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["idle"].as_u64().unwrap())
        .collect()
}

fn sip_rule(idle: u32) -> String {
    format!("[[rule]]\nname = \"sip\"\nlocal_port = 7030\nidle = {idle}\ncount = 4\ninterval = 6\n")
}

/// A config file the service user can read.
fn service_config(dir: &TempDir, idle: u32) -> PathBuf {
    let config = dir.0.join("tcpka.toml");
    std::fs::write(&config, sip_rule(idle)).unwrap();
    std::fs::set_permissions(&dir.0, PermissionsExt::from_mode(0o755)).unwrap();
    config
}

/// On a host whose bpffs is root's 0700 (this test run's), the unit's
/// service starts as its user with exactly its capabilities, tells systemd
/// it is ready only once its rules are applied and its API listens, and
/// reloads around RELOADING=1/READY=1.
#[test]
fn the_units_command_runs_as_a_service_user_with_its_capabilities() {
    let _netns = NetNs::new();
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    let dir = TempDir::new("tcpka-svc");
    let config = service_config(&dir, 30);
    let run = RunDir::new();
    let bpffs = std::fs::metadata("/sys/fs/bpf").unwrap();
    assert_eq!(
        PermissionsExt::mode(&bpffs.permissions()) & 0o777,
        0o700,
        "the tests run on a bpffs mounted as systemd does (cargo xtask test)"
    );

    let svc = Service::start(&t, &cgroup.path, &config, &run.0);
    svc.wait_notified("READY=1");
    // Ready means ready: the rules are in and the API answers.
    assert_eq!(rule_idles(&t), [30]);
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&t.pin_dir).unwrap());
    assert_eq!(owner, 65534, "the pins belong to the service user");
    // The API on loopback, with the token serve wrote for its group.
    // This installation's (the default one's is api-token), in the
    // service's runtime directory.
    let token_name = t.layout().token_file();
    let token_file = run.0.join("locks").join(token_name.file_name().unwrap());
    let meta = std::fs::metadata(&token_file).unwrap();
    assert_eq!(PermissionsExt::mode(&meta.permissions()) & 0o777, 0o640);
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
    let token = std::fs::read_to_string(&token_file).unwrap();
    let (code, body) = http(
        "127.0.0.1:7077",
        "GET",
        "/v1/rules",
        None,
        Some(token.trim()),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"sip\""), "{body}");

    // Its rule reaches new connections of the cgroup.
    cgroup.enter();
    let l = listen("127.0.0.1:7030");
    let (client, server) = connect(&l);
    assert_eq!(keepalive(&server), expect(30, 4, 6, 0));

    // The CLI as the service user: a live connection (held by this root
    // process), a rule, the reload.
    let port = client.local_addr().unwrap().port().to_string();
    let out = svc.cli(
        &t,
        &["enable", &format!("127.0.0.1:{port}"), "12", "3", "4"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(keepalive(&server), expect(12, 3, 4, 0));
    let out = svc.cli(&t, &["rule", "add", "--local-port", "7031", "20", "2", "2"]);
    assert!(out.status.success(), "{out:?}");
    std::fs::write(&config, sip_rule(33)).unwrap();
    let out = svc.cli(&t, &["reload"]);
    assert!(out.status.success(), "{out:?}");
    svc.wait_notified("RELOADING=1");
    svc.wait_notified("READY=1");
    let mut idles = rule_idles(&t);
    idles.sort_unstable();
    assert_eq!(idles, [20, 33]);
    cgroup.leave();

    // Root shares the installation and its lock with the service.
    root_cli(
        &t,
        &run.0,
        &["rule", "add", "--local-port", "7032", "21", "2", "2"],
    )
    .ok();
    let out = svc.cli(&t, &["rule", "add", "--local-port", "7033", "22", "2", "2"]);
    assert!(out.status.success(), "{out:?}");

    // Without the unit's view of bpffs, the service user is told which
    // directory it may not search, not that a capability is missing.
    let out = as_nobody(&svc.caps, &t.pin_dir, &["info"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/sys/fs/bpf is mode 0700 owned by uid 0, and uid 65534 may not search it"),
        "{stderr}"
    );
    assert!(!stderr.contains("needs root"), "{stderr}");

    // Without one of the unit's capabilities, load says which.
    let text = unit_text();
    let fewer: Vec<String> = unit_caps(&text)
        .into_iter()
        .filter(|c| c != "CAP_NET_ADMIN")
        .collect();
    let fewer = setpriv_caps(&fewer);
    let other = PathBuf::from("/sys/fs/bpf").join(unique("tcpka-svc-other"));
    let out = as_nobody(
        &fewer,
        &other,
        &["load", "--cgroup", cgroup.path.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lacks CAP_NET_ADMIN"), "{stderr}");
    assert!(!other.exists());

    svc.signal(libc::SIGTERM);
    svc.wait_notified("STOPPING=1");
    drop(svc);
    // Stopping the service leaves enforcement in place.
    assert_eq!(rule_idles(&t).len(), 4);
}

/// Root's commands before the service's first start leave a root-owned
/// runtime directory, lock directory and pins: the unit's ExecStartPre hands
/// them to the service, which adopts the installation; then root and the
/// service take turns on it.
#[test]
fn root_first_then_the_service_then_root_again() {
    let _netns = NetNs::new();
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    let run = RunDir::new();
    root_cli(
        &t,
        &run.0,
        &["load", "--cgroup", cgroup.path.to_str().unwrap()],
    )
    .ok();
    root_cli(
        &t,
        &run.0,
        &["rule", "add", "--local-port", "7040", "40", "4", "4"],
    )
    .ok();
    let locks = run.0.join("locks");
    let uid = |p: &Path| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).unwrap());
    assert_eq!((uid(&locks), uid(&t.pin_dir)), (0, 0));

    let dir = TempDir::new("tcpka-svc");
    let config = service_config(&dir, 30);
    let svc = Service::start(&t, &cgroup.path, &config, &run.0);
    svc.wait_notified("READY=1");
    assert_eq!((uid(&locks), uid(&t.pin_dir)), (65534, 65534));
    for entry in std::fs::read_dir(&t.pin_dir).unwrap() {
        assert_eq!(uid(&entry.unwrap().path()), 65534);
    }
    let mut idles = rule_idles(&t);
    idles.sort_unstable();
    assert_eq!(idles, [30, 40]);
    let out = svc.cli(&t, &["rule", "add", "--local-port", "7041", "41", "4", "4"]);
    assert!(out.status.success(), "{out:?}");
    let id = root_cli(
        &t,
        &run.0,
        &["rule", "add", "--local-port", "7042", "42", "4", "4"],
    )
    .ok();
    let out = svc.cli(&t, &["rule", "del", id.stdout.trim()]);
    assert!(out.status.success(), "{out:?}");
    for entry in std::fs::read_dir(&locks).unwrap() {
        assert_eq!(
            uid(&entry.unwrap().path()),
            65534,
            "root hands its lock files over"
        );
    }
    drop(svc);
    assert_eq!(rule_idles(&t).len(), 3);
}

/// Whether process `pid` is tcpka and ignores or catches SIGHUP: from the
/// first lines of its `main` on. (Before, from the exec on, the kernel's
/// default would end it; systemd sends a reload only after READY=1.)
fn owns_sighup(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let is_tcpka = status
        .lines()
        .next()
        .is_some_and(|l| l.trim_start_matches("Name:").trim() == "tcpka");
    let hup = 1 << (libc::SIGHUP - 1);
    is_tcpka && (mask("SigIgn:") | mask("SigCgt:")) & hup != 0
}

/// A SIGHUP at any moment of the start once tcpka runs (`systemctl start;
/// kill -HUP`) is never fatal: the service becomes ready with its rules.
#[test]
fn sighup_while_the_service_starts_is_not_fatal() {
    let _netns = NetNs::new();
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    let run = RunDir::new();
    let dir = TempDir::new("tcpka-svc");
    let config = service_config(&dir, 30);
    let svc = Service::start(&t, &cgroup.path, &config, &run.0);
    // The unshare and shell exec into tcpka: signal whatever runs there
    // now, from the first millisecond until it is ready.
    svc.notify
        .set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut ready = false;
    let mut sent = 0;
    while !ready && std::time::Instant::now() < deadline {
        if owns_sighup(svc.child.id()) {
            svc.signal(libc::SIGHUP);
            sent += 1;
        }
        let mut buf = [0u8; 512];
        if let Ok(n) = svc.notify.recv(&mut buf) {
            ready = String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1");
        }
    }
    assert!(ready, "the service became ready ({sent} SIGHUPs sent)");
    assert!(sent > 0);
    assert_eq!(rule_idles(&t), [30]);
    drop(svc);
}

/// `load` without CAP_SYS_PTRACE works (commands walk to find sockets of
/// other users), as documented.
#[test]
fn load_works_without_cap_sys_ptrace() {
    let _netns = NetNs::new();
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    // Root, with the unit's capabilities but CAP_SYS_PTRACE.
    let caps = "-all,+bpf,+perfmon,+net_admin";
    let run = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--inh-caps", caps, "--ambient-caps", caps])
            .args(["--bounding-set", caps])
            .arg(tcpka_bin())
            .args(args)
            .env("TCPKA_PIN_DIR", &t.pin_dir)
            .output()
            .unwrap()
    };
    let out = run(&["load", "--cgroup", cgroup.path.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    cgroup.enter();
    let l = listen("127.0.0.1:0");
    let (client, server) = connect(&l);
    cgroup.leave();
    let port = client.local_addr().unwrap().port().to_string();
    let out = run(&["enable", &format!("127.0.0.1:{port}"), "11", "3", "4"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(keepalive(&server), expect(11, 3, 4, 0));
}

/// Two loads started together on a host without bpffs mounted end with one
/// bpffs mount and one installation (each mount is a new instance, which
/// would hide the other's pins).
#[test]
fn two_loads_at_once_mount_bpffs_once() {
    let _netns = NetNs::new();
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    let cg = cgroup.path.to_str().unwrap();
    let bin = tcpka_bin();
    let bin = bin.to_str().unwrap();
    // In a mount namespace of its own, without bpffs; what the loads pin
    // goes with it.
    let script = format!(
        "set -e; while umount /sys/fs/bpf 2>/dev/null; do :; done; \
         if grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts; then exit 3; fi; \
         {bin} load --cgroup {cg} >/dev/null & a=$!; \
         {bin} load --cgroup {cg} >/dev/null & b=$!; \
         wait $a; wait $b; \
         grep -c ' /sys/fs/bpf bpf ' /proc/self/mounts; \
         {bin} info --json; {bin} unload >/dev/null"
    );
    for _ in 0..3 {
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .env("TCPKA_PIN_DIR", &t.pin_dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        let (mounts, info) = stdout.split_once('\n').unwrap();
        assert_eq!(mounts, "1", "{stdout}");
        let v: serde_json::Value = serde_json::from_str(info).unwrap();
        assert_eq!(v["loaded"], true, "{v}");
    }
}

/// Undoes, on drop, what the package test made, if it failed halfway:
/// purges the package, and removes the system user and group tcpka, which
/// the package's postinst created (the test checked that none existed
/// before) and which purging keeps, as Debian's convention is.
struct PackageTrial;

impl Drop for PackageTrial {
    fn drop(&mut self) {
        if package_present() {
            let _ = Command::new("dpkg").args(["--purge", "tcpka"]).output();
        }
        remove_user_and_group();
    }
}

fn remove_user_and_group() {
    if user_exists("tcpka", "passwd") {
        let _ = Command::new("userdel").arg("tcpka").output();
    }
    // (userdel removes a user's own group too, where login.defs says so.)
    if user_exists("tcpka", "group") {
        let _ = Command::new("groupdel").arg("tcpka").output();
    }
}

fn package_status() -> String {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "tcpka"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether dpkg knows the package in any state but purged (installed,
/// half-configured, its configuration files left, …).
fn package_present() -> bool {
    let status = package_status();
    !status.is_empty() && !status.ends_with("not-installed")
}

fn user_exists(name: &str, db: &str) -> bool {
    Command::new("getent")
        .args([db, name])
        .output()
        .unwrap()
        .status
        .success()
}

/// What the package installs.
const PACKAGE_FILES: [&str; 12] = [
    "/usr/bin/tcpka",
    "/usr/lib/systemd/system/tcpka.service",
    "/etc/tcpka/tcpka.toml",
    "/usr/share/man/man8/tcpka.8.gz",
    "/usr/share/man/man8/tcpka-apply.8.gz",
    "/usr/share/bash-completion/completions/tcpka",
    "/usr/share/zsh/vendor-completions/_tcpka",
    "/usr/share/doc/tcpka/examples/kamailio.cfg",
    "/usr/share/doc/tcpka/copyright",
    "/usr/share/doc/tcpka/changelog.Debian.gz",
    "/usr/share/doc/tcpka/docs/operations.md",
    "/usr/share/doc/tcpka/docs/kamailio.md",
];

/// What systemd's side of the package may leave on the host: the links
/// `systemctl enable` (or deb-systemd-helper) makes, the mask postrm puts
/// on a removed package's unit, and deb-systemd-helper's records of both.
/// None may exist before the test, nor after the purge.
const SYSTEMD_TRACES: [&str; 4] = [
    "/etc/systemd/system/multi-user.target.wants/tcpka.service",
    "/etc/systemd/system/tcpka.service",
    "/var/lib/systemd/deb-systemd-helper-enabled/tcpka.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-masked/tcpka.service",
];

/// A stand-in for systemd, to run dpkg against: the test machines do not
/// run systemd as PID 1, and the package's maintainer scripts act on
/// systemd only where `/run/systemd/system` exists (as Debian's do).
///
/// Each run of dpkg is in a private mount namespace with a fresh /run
/// holding `/run/systemd/system` (so the scripts take their systemd
/// branch; the machine's own /run is untouched; a fresh /run rather than a
/// tmpfs on /run/systemd, which `cargo xtask test`'s empty /run lacks),
/// with a recording
/// `systemctl` first on PATH that logs every call and answers
/// `is-active`/`is-enabled` for the unit as told (running and enabled, or
/// stopped and disabled), and with a `policy-rc.d` that allows every
/// action (a container's forbids them all, and deb-systemd-invoke asks it
/// before calling systemctl).
///
/// What this proves: what the maintainer scripts built into this package
/// ask systemd to do, through deb-systemd-invoke and deb-systemd-helper as
/// installed here, on installation, upgrade and removal. What it does not:
/// that systemd does it (no unit is started, stopped or restarted here),
/// nor that a restarted service runs the new binary.
struct FakeSystemd {
    dir: TempDir,
}

/// One recorded `systemctl` call: its verb and the units it names (the
/// options left out).
#[derive(Debug)]
struct SystemctlCall {
    verb: String,
    units: Vec<String>,
}

impl SystemctlCall {
    fn is(&self, verbs: &[&str], unit: &str) -> bool {
        verbs.contains(&self.verb.as_str()) && self.units.iter().any(|u| u == unit)
    }
}

impl FakeSystemd {
    fn new() -> Self {
        let dir = TempDir::new("tcpka-fake-systemd");
        std::fs::create_dir(dir.0.join("bin")).unwrap();
        let policy = dir.0.join("policy-rc.d");
        std::fs::write(&policy, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    /// Runs `dpkg ARGS` against systemd reporting tcpka.service as running
    /// and enabled (`running`) or stopped and disabled; returns the
    /// `systemctl` calls made, in order.
    fn dpkg(&self, args: &[&str], running: bool) -> Vec<SystemctlCall> {
        let log = self.dir.0.join(unique("systemctl-log"));
        let (active, enabled) = if running {
            ("exit 0", "echo enabled; exit 0")
        } else {
            ("exit 3", "echo disabled; exit 1")
        };
        let systemctl = self.dir.0.join("bin/systemctl");
        std::fs::write(
            &systemctl,
            format!(
                "#!/bin/sh\n\
                 # Records every call; answers for tcpka.service as the test says.\n\
                 echo \"$*\" >>'{}'\n\
                 case \" $* \" in\n\
                 *' is-active '*tcpka.service*) {active} ;;\n\
                 *' is-enabled '*tcpka.service*) {enabled} ;;\n\
                 esac\n\
                 exit 0\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = "set -e; \
             mount -t tmpfs -o mode=0755,nosuid,nodev tcpka-test /run; \
             install -d -m 1777 /run/lock; mkdir -p /run/systemd/system; \
             if [ -e /usr/sbin/policy-rc.d ]; then \
                 mount --bind \"$FAKE/policy-rc.d\" /usr/sbin/policy-rc.d; fi; \
             PATH=\"$FAKE/bin:$PATH\" exec dpkg \"$@\"";
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
            .args(args)
            .env("FAKE", &self.dir.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "dpkg {args:?}: {out:?}");
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let mut words = l.split_whitespace().filter(|w| !w.starts_with('-'));
                SystemctlCall {
                    verb: words.next().unwrap_or_default().to_owned(),
                    units: words.map(str::to_owned).collect(),
                }
            })
            .collect()
    }
}

/// The Debian package (`cargo xtask deb`; `cargo xtask test` builds it and
/// names it in TCPKA_DEB): installs without starting or enabling the
/// service, runs, verifies as a unit, asks systemd to restart a running
/// service on upgrade and to stop it on removal (see `FakeSystemd` for
/// what that shows), and purges leaving nothing behind but the system
/// user and group (which the test then removes).
///
/// One test, so that nothing else works on the package at the same time.
#[test]
fn debian_package_installs_runs_and_purges_without_a_trace() {
    require_root();
    let deb = std::env::var("TCPKA_DEB")
        .expect("TCPKA_DEB names the package to test: run the tests with `cargo xtask test`");
    assert!(
        !package_present(),
        "a tcpka package is installed on this machine: this test would replace it; remove it first"
    );
    assert!(
        !user_exists("tcpka", "passwd") && !user_exists("tcpka", "group"),
        "a user or group tcpka exists already: this test would remove it"
    );
    for p in SYSTEMD_TRACES {
        assert!(
            std::fs::symlink_metadata(p).is_err(),
            "{p} exists already: this test would remove it"
        );
    }
    let _trial = PackageTrial;
    let systemd = FakeSystemd::new();
    let run = |cmd: &str, args: &[&str]| {
        let out = Command::new(cmd).args(args).output().unwrap();
        assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // Installed: neither started nor enabled (the operator configures it
    // first). Only calls that change no unit's state are allowed.
    let calls = systemd.dpkg(&["-i", &deb], false);
    assert!(
        calls
            .iter()
            .all(|c| ["daemon-reload", "is-active", "is-enabled"].contains(&c.verb.as_str())),
        "installation: {calls:?}"
    );
    assert!(
        calls.iter().any(|c| c.verb == "daemon-reload"),
        "installation: the scripts never reached systemd: {calls:?}"
    );
    assert!(
        std::fs::symlink_metadata(SYSTEMD_TRACES[0]).is_err(),
        "installation enabled the unit"
    );
    for f in PACKAGE_FILES {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    // The unit is the package's at /usr/lib (not only through a /lib link).
    let listed = run("dpkg", &["-L", "tcpka"]);
    assert!(
        listed
            .lines()
            .any(|l| l == "/usr/lib/systemd/system/tcpka.service")
            && !listed.lines().any(|l| l.starts_with("/lib/")),
        "{listed}"
    );
    assert!(user_exists("tcpka", "passwd") && user_exists("tcpka", "group"));
    let passwd = run("getent", &["passwd", "tcpka"]);
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!(fields[5], "/nonexistent", "{passwd}");
    let version = run("/usr/bin/tcpka", &["--version"]);
    assert_eq!(
        version.trim(),
        format!("tcpka {}", env!("CARGO_PKG_VERSION"))
    );
    // The changelog's version is the package's; the copyright file is
    // Debian's machine-readable one.
    let deb_version = run("dpkg-query", &["-W", "-f=${Version}", "tcpka"]);
    assert!(
        deb_version.starts_with(&format!("{}-", env!("CARGO_PKG_VERSION"))),
        "{deb_version}"
    );
    let changelog = run("gzip", &["-dc", "/usr/share/doc/tcpka/changelog.Debian.gz"]);
    assert!(
        changelog.starts_with(&format!("tcpka ({deb_version}) ")),
        "{changelog}"
    );
    let copyright = std::fs::read_to_string("/usr/share/doc/tcpka/copyright").unwrap();
    assert!(
        copyright.starts_with(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        ),
        "{copyright}"
    );
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("tcpka-deb"));
    let out = Command::new("/usr/bin/tcpka")
        .arg("doctor")
        .env("TCPKA_PIN_DIR", &pin_dir)
        .output()
        .unwrap();
    let doctor = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && doctor.contains("ok      kernel"),
        "{doctor}"
    );
    // Installed, the unit verifies as it is.
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "/usr/lib/systemd/system/tcpka.service",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");

    // Upgraded (the same package again: postinst gets `configure
    // <installed version>`) while the service runs: restarted, so that the
    // new binary runs; never left stopped.
    let calls = systemd.dpkg(&["-i", &deb], true);
    let restart = ["restart", "try-restart"];
    assert!(
        calls.iter().any(|c| c.is(&restart, "tcpka.service")),
        "upgrade: no restart: {calls:?}"
    );
    for (i, c) in calls.iter().enumerate() {
        if c.is(&["stop"], "tcpka.service") {
            assert!(
                calls[i + 1..]
                    .iter()
                    .any(|c| c.is(&["start", "restart", "try-restart"], "tcpka.service")),
                "upgrade: stopped and not started again: {calls:?}"
            );
        }
    }
    assert!(
        !calls
            .iter()
            .any(|c| c.is(&["enable", "reenable"], "tcpka.service")),
        "upgrade: {calls:?}"
    );

    // Purged while running: stopped, and nothing left but the user and
    // group.
    let calls = systemd.dpkg(&["--purge", "tcpka"], true);
    assert!(
        calls.iter().any(|c| c.is(&["stop"], "tcpka.service")),
        "removal: not stopped: {calls:?}"
    );
    assert!(!package_present(), "{}", package_status());
    let info = std::fs::read_dir("/var/lib/dpkg/info")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tcpka."))
        .collect::<Vec<_>>();
    assert!(info.is_empty(), "dpkg's records left behind: {info:?}");
    for f in PACKAGE_FILES {
        assert!(!Path::new(f).exists(), "{f} left behind");
    }
    for d in ["/etc/tcpka", "/usr/share/doc/tcpka"] {
        assert!(!Path::new(d).exists(), "{d} left behind");
    }
    for p in SYSTEMD_TRACES {
        assert!(std::fs::symlink_metadata(p).is_err(), "{p} left behind");
    }
    assert!(!pin_dir.exists());
    // Debian keeps a purged package's system user and group; they are the
    // test's to remove.
    assert!(user_exists("tcpka", "passwd") && user_exists("tcpka", "group"));
    remove_user_and_group();
    assert!(!user_exists("tcpka", "passwd") && !user_exists("tcpka", "group"));
}

/// Logs go to the journal only when stderr is the stream that systemd's
/// `$JOURNAL_STREAM` names, not whenever the variable is set (Kamailio's
/// `exec_cmd` children inherit it with their stderr elsewhere).
#[test]
fn journal_stream_must_name_stderr_itself() {
    use std::os::unix::fs::MetadataExt as _;
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    let dir = TempDir::new("tcpka-journal");
    let cg = cgroup.path.to_str().unwrap().to_owned();
    // A load that mounts bpffs logs it (at info).
    let run = |journal_stream: &dyn Fn(&std::fs::File) -> String| {
        let path = dir.0.join(unique("stderr"));
        let file = std::fs::File::create(&path).unwrap();
        let stream = journal_stream(&file);
        let script = format!(
            "set -e; while umount /sys/fs/bpf 2>/dev/null; do :; done; if grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts; then exit 3; fi; {} load --cgroup {cg} >/dev/null; {} unload >/dev/null",
            tcpka_bin().display(),
            tcpka_bin().display()
        );
        let status = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .env("TCPKA_PIN_DIR", &t.pin_dir)
            .env("RUST_LOG", "info")
            .env("JOURNAL_STREAM", stream)
            .stderr(file)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read_to_string(&path).unwrap()
    };
    // (With no journald here, a tcpka that chose the journal says so and
    // falls back to stderr.)
    let elsewhere = run(&|_| "1:1".to_owned());
    assert!(elsewhere.contains("mounted bpffs"), "{elsewhere}");
    assert!(!elsewhere.contains("journald"), "{elsewhere}");
    let this = run(&|f| {
        let m = f.metadata().unwrap();
        format!("{}:{}", m.dev(), m.ino())
    });
    assert!(this.contains("no journald"), "{this}");
}
