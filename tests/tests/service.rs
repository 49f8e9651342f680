//! The systemd unit (`contrib/systemd/tcpka.service`): it verifies, and its
//! command line runs as an unprivileged user holding exactly the unit's
//! capabilities, as systemd would start it.
use std::{
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

/// The service, as systemd starts it: a private /run/tcpka owned by the
/// service user (`RuntimeDirectory=`), the pin directory made for it
/// (`ExecStartPre=`), and `ExecStart=` run by that user with exactly
/// `AmbientCapabilities=` (here uid 65534; the config file, pin directory,
/// cgroup and group are the test's own).
struct Service {
    child: Child,
    caps: String,
}

impl Service {
    fn start(t: &Tcpka, cgroup: &Path, config: &Path) -> Self {
        let text = unit_text();
        let caps = setpriv_caps(&unit_caps(&text));
        let exec = unit_value(&text, "ExecStart")
            .replace("/etc/tcpka/tcpka.toml", config.to_str().unwrap())
            .replace("--api-group tcpka", "--api-group nogroup");
        let mut args: Vec<String> = exec.split_whitespace().map(str::to_owned).collect();
        assert_eq!(args[0], "/usr/bin/tcpka");
        args[0] = tcpka_bin().to_str().unwrap().to_owned();
        args.extend(["--cgroup".into(), cgroup.to_str().unwrap().into()]);
        let script = format!(
            "set -e; mkdir -p /run/tcpka; \
             mount -t tmpfs -o mode=0750,uid=65534,gid=65534 tcpka-run /run/tcpka; \
             install -d -o 65534 -g 65534 -m 0700 \"$TCPKA_PIN_DIR\"; \
             exec setpriv --reuid 65534 --regid 65534 --clear-groups \
               --inh-caps {caps} --ambient-caps {caps} --bounding-set {caps} \"$@\""
        );
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"])
            .args(&args)
            .env("TCPKA_PIN_DIR", &t.pin_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the service");
        Self { child, caps }
    }

    /// A tcpka command as the service user, in the service's mount
    /// namespace (its /run/tcpka).
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
            .output()
            .unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // SAFETY: signalling our own child (systemd stops with SIGTERM).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
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

#[test]
fn the_units_command_runs_as_a_service_user_with_its_capabilities() {
    let _netns = NetNs::new();
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    let dir = TempDir::new("tcpka-svc");
    let config = dir.0.join("tcpka.toml");
    let rule = |idle: u32| {
        format!(
            "[[rule]]\nname = \"sip\"\nlocal_port = 7030\nidle = {idle}\ncount = 4\ninterval = 6\n"
        )
    };
    std::fs::write(&config, rule(30)).unwrap();
    // The service user must read its config.
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let svc = Service::start(&t, &cgroup.path, &config);
    wait_until(
        "the service to load and apply its rules",
        Duration::from_secs(15),
        || rule_idles(&t) == [30],
    );
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&t.pin_dir).unwrap());
    assert_eq!(owner, 65534, "the pins belong to the service user");
    // The API on loopback, with the token serve wrote for its group.
    let out = Command::new("nsenter")
        .args(["-t", &svc.child.id().to_string(), "-m", "--"])
        .args(["stat", "-c", "%a %U %G", "/run/tcpka/api-token"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "640 nobody nogroup"
    );
    let token = Command::new("nsenter")
        .args(["-t", &svc.child.id().to_string(), "-m", "--"])
        .args(["cat", "/run/tcpka/api-token"])
        .output()
        .unwrap();
    let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();
    let (code, body) = http("127.0.0.1:7077", "GET", "/v1/rules", None, Some(&token)).unwrap();
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
    std::fs::write(&config, rule(33)).unwrap();
    let out = svc.cli(&t, &["reload"]);
    assert!(out.status.success(), "{out:?}");
    wait_until("the reload", Duration::from_secs(15), || {
        let mut idles = rule_idles(&t);
        idles.sort_unstable();
        idles == [20, 33]
    });
    cgroup.leave();

    // Without one of the unit's capabilities, load says which.
    let text = unit_text();
    let fewer: Vec<String> = unit_caps(&text)
        .into_iter()
        .filter(|c| c != "CAP_NET_ADMIN")
        .collect();
    let fewer = setpriv_caps(&fewer);
    let other = PathBuf::from("/sys/fs/bpf").join(unique("tcpka-svc-other"));
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args([
            "--inh-caps",
            &fewer,
            "--ambient-caps",
            &fewer,
            "--bounding-set",
            &fewer,
        ])
        .arg(tcpka_bin())
        .args(["load", "--cgroup", cgroup.path.to_str().unwrap()])
        .env("TCPKA_PIN_DIR", &other)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lacks CAP_NET_ADMIN"), "{stderr}");
    assert!(!other.exists());

    drop(svc);
    // Stopping the service leaves enforcement in place.
    assert_eq!(rule_idles(&t).len(), 2);
}

/// Purges the package on drop if a test left it installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if package_status().contains("installed") {
            let _ = Command::new("dpkg").args(["--purge", "tcpka"]).output();
        }
    }
}

fn package_status() -> String {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "tcpka"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
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
const PACKAGE_FILES: [&str; 8] = [
    "/usr/bin/tcpka",
    "/lib/systemd/system/tcpka.service",
    "/etc/tcpka/tcpka.toml",
    "/usr/share/man/man8/tcpka.8.gz",
    "/usr/share/man/man8/tcpka-apply.8.gz",
    "/usr/share/bash-completion/completions/tcpka",
    "/usr/share/zsh/vendor-completions/_tcpka",
    "/usr/share/doc/tcpka/examples/kamailio.cfg",
];

/// The Debian package (`cargo xtask deb`; `cargo xtask test` builds it and
/// names it in TCPKA_DEB): installs, runs, verifies as a unit, and purges
/// leaving nothing behind.
#[test]
fn debian_package_installs_runs_and_purges_without_a_trace() {
    require_root();
    let deb = std::env::var("TCPKA_DEB")
        .expect("TCPKA_DEB names the package to test: run the tests with `cargo xtask test`");
    assert!(
        !package_status().contains("installed"),
        "a tcpka package is installed on this machine: this test would replace it; remove it first"
    );
    assert!(
        !user_exists("tcpka", "passwd") && !user_exists("tcpka", "group"),
        "a user or group tcpka exists already: this test would remove it"
    );
    let _guard = Installed;
    let run = |cmd: &str, args: &[&str]| {
        let out = Command::new(cmd).args(args).output().unwrap();
        assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run("dpkg", &["-i", &deb]);
    for f in PACKAGE_FILES {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    assert!(user_exists("tcpka", "passwd") && user_exists("tcpka", "group"));
    let version = run("/usr/bin/tcpka", &["--version"]);
    assert_eq!(
        version.trim(),
        format!("tcpka {}", env!("CARGO_PKG_VERSION"))
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
        .args(["verify", "--man=no", "/lib/systemd/system/tcpka.service"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");

    run("dpkg", &["--purge", "tcpka"]);
    assert!(!package_status().contains("installed"));
    for f in PACKAGE_FILES {
        assert!(!Path::new(f).exists(), "{f} left behind");
    }
    for d in ["/etc/tcpka", "/usr/share/doc/tcpka"] {
        assert!(!Path::new(d).exists(), "{d} left behind");
    }
    assert!(!user_exists("tcpka", "passwd") && !user_exists("tcpka", "group"));
    assert!(!pin_dir.exists());
}
