//! The configuration file's named rules: `tcpka apply`, `serve --config`
//! and its reload, checked on the rule table and on real sockets.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tcpka_tests::*;

/// A configuration file in a directory of the test's own, removed on drop.
struct ConfigFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("tcpka-config"));
        std::fs::create_dir(&dir).unwrap();
        let f = Self {
            path: dir.join("tcpka.toml"),
            dir,
        };
        f.write(text);
        f
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rule(name: &str, local_port: u16, idle: u32) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\nlocal_port = {local_port}\nidle = {idle}\ncount = 4\ninterval = 6\n\n"
    )
}

/// `rule list --json` as (id, name, local_port, idle).
fn rules(t: &Tcpka) -> Vec<(u64, Option<String>, Option<u64>, u64)> {
    let out = t.run(&["rule", "list", "--json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_u64().unwrap(),
                r["name"].as_str().map(str::to_owned),
                r["local_port"].as_u64(),
                r["idle"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn apply_adds_changes_and_removes_named_rules_and_keeps_hand_ones() {
    let e = Env::entered();
    let hand = e.tcpka.rule_add(&["--local-port", "7001", "10", "2", "3"]);
    let file = ConfigFile::new(&format!(
        "{}{}",
        rule("sip", 7002, 30),
        rule("tls", 7003, 40)
    ));

    // --dry-run says what it would do and changes nothing.
    let dry = e.tcpka.run(&["apply", "--dry-run", file.arg()]).ok().stdout;
    assert!(
        dry.contains("+ sip: --local-port 7002 idle 30 count 4 interval 6"),
        "{dry}"
    );
    assert!(dry.contains("nothing changed (--dry-run)"), "{dry}");
    assert_eq!(rules(&e.tcpka).len(), 1);

    e.tcpka.run(&["apply", file.arg()]).ok();
    let after = rules(&e.tcpka);
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(
        after.contains(&(u64::from(hand), None, Some(7001), 10)),
        "{after:?}"
    );
    let sip = after
        .iter()
        .find(|r| r.1.as_deref() == Some("sip"))
        .unwrap()
        .0;
    // The kernel applies it.
    let l = listen("127.0.0.1:7002");
    let (_c, s) = connect(&l);
    assert_eq!(keepalive(&s), expect(30, 4, 6, 0));

    // Applying the same file again changes nothing.
    let again = e.tcpka.run(&["apply", file.arg()]).ok().stdout;
    assert!(again.contains("rules already match"), "{again}");

    // A changed value is changed in place (same id); a rule gone from the
    // file is removed; the hand-made rule stays.
    file.write(&rule("sip", 7002, 31));
    let out = e.tcpka.run(&["apply", "--json", file.arg()]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let actions: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["change", "remove"], "{out}");
    let after = rules(&e.tcpka);
    assert_eq!(
        after,
        [
            (u64::from(hand), None, Some(7001), 10),
            (sip, Some("sip".into()), Some(7002), 31)
        ]
    );
    let (_c2, s2) = connect(&l);
    assert_eq!(keepalive(&s2), expect(31, 4, 6, 0));
}

#[test]
fn an_invalid_or_conflicting_file_is_refused_and_changes_nothing() {
    let e = Env::entered();
    let hand = e.tcpka.rule_add(&["--local-port", "7011", "10", "2", "3"]);
    let file = ConfigFile::new(&rule("a", 7010, 20));
    e.tcpka.run(&["apply", file.arg()]).ok();
    let before = rules(&e.tcpka);

    // Out of range on the second rule (line 8): exit 2, file and line named.
    file.write(&format!("{}{}", rule("a", 7010, 21), rule("b", 7012, 0)));
    let r = e.tcpka.run(&["apply", file.arg()]);
    assert_eq!(r.code, 2, "{r:?}");
    let want = format!("{}:8: rule \"b\": idle must be in", file.arg());
    assert!(r.stderr.contains(&want), "{r:?}");
    // A syntax error: one line on stderr, however many the parser wrote.
    file.write("[[rule]\nname = 1\n");
    let r = e.tcpka.run(&["apply", file.arg()]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains(&format!("{}:1:", file.arg())), "{r:?}");
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{r:?}");
    // A name made to forge a line: quoted in one line, no raw escape.
    file.write(&rule("x\\nERROR FORGED line \\u001b[2J", 7013, 0));
    let r = e.tcpka.run(&["apply", file.arg()]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("FORGED"), "{r:?}");
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{r:?}");
    assert!(!r.stderr.contains('\u{1b}'), "{r:?}");
    // The match of a rule added by hand: refused, nothing changed.
    file.write(&format!("{}{}", rule("a", 7010, 22), rule("c", 7011, 5)));
    let r = e.tcpka.run(&["apply", file.arg()]);
    assert_eq!(r.code, 1, "{r:?}");
    let want = format!("rule \"c\" has the match of rule {hand}");
    assert!(
        r.stderr.contains(&want) && r.stderr.contains("nothing changed"),
        "{r:?}"
    );
    assert_eq!(rules(&e.tcpka), before);
}

/// A file is checked before a deploy, where nothing is loaded and by a
/// user without privilege: `tcpka check`, and `apply --dry-run` where
/// tcpka is not loaded. Neither touches the pin directory.
#[test]
fn a_file_is_checked_offline_without_an_installation_or_privilege() {
    let t = Tcpka::new();
    let file = ConfigFile::new(&format!("{}{}", rule("a", 7020, 20), rule("b", 7021, 30)));
    let r = t.run(&["check", file.arg()]).ok();
    assert!(
        r.stdout
            .contains("+ a: --local-port 7020 idle 20 count 4 interval 6"),
        "{r:?}"
    );
    assert!(
        r.stdout
            .contains(&format!("{} is valid: 2 rules", file.arg())),
        "{r:?}"
    );
    let r = t.run(&["check", "--json", file.arg()]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["rules"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["rules"][1]["name"], "b", "{v}");
    assert_eq!(v["rules"][1]["idle"], 30, "{v}");
    assert!(v["rules"][0].get("id").is_none(), "{v}");
    assert_eq!(v["serve"], false, "{v}");

    // As nobody, with no capability.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(tcpka_bin())
        .args(["check", file.arg()])
        .env("TCPKA_PIN_DIR", &t.pin_dir)
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("is valid: 2 rules"), "{r:?}");

    // Invalid: exit 2, one line with the file and line; missing: exit 1.
    file.write(&format!("{}[[rule\n", rule("a", 7020, 20)));
    let r = t.run(&["check", file.arg()]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains(&format!("{}:8:", file.arg())), "{r:?}");
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{r:?}");
    assert!(r.stdout.is_empty(), "{r:?}");
    let r = t.run(&["check", "/nonexistent/tcpka.toml"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("reading /nonexistent/tcpka.toml"),
        "{r:?}"
    );

    // apply --dry-run where nothing is loaded: the steps from no rules.
    file.write(&rule("a", 7020, 20));
    let r = t.run(&["apply", "--dry-run", file.arg()]).ok();
    assert!(r.stdout.contains("+ a: --local-port 7020"), "{r:?}");
    assert!(r.stdout.contains("is not loaded at"), "{r:?}");
    let r = t.run(&["apply", "--dry-run", "--json", file.arg()]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["loaded"], false, "{v}");
    assert_eq!(v["steps"][0]["action"], "add", "{v}");
    // Without --dry-run it needs the installation.
    let r = t.run(&["apply", file.arg()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not loaded"), "{r:?}");
    assert!(!t.pin_dir.exists(), "the pin directory was made");
}

/// What a reboot leaves: no pins. `serve --config` brings the rules back,
/// and `tcpka reload` applies the edited file to the running daemon.
#[test]
fn serve_config_restores_rules_after_the_pins_are_gone_and_reloads() {
    let _netns = NetNs::new();
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    let file = ConfigFile::new(&rule("sip", 7020, 30));
    let addr = format!("127.0.0.1:{}", 17000 + std::process::id() % 1000);
    {
        let _s = Serve::start(&t, &cgroup.path, &addr, &["--config", file.arg()]);
        assert_eq!(rules(&t).len(), 1);
    }
    // The pins go, as at a reboot.
    t.run(&["unload"]).ok();
    assert!(!Path::new(&t.pin_dir).exists());
    let _s = Serve::start(&t, &cgroup.path, &addr, &["--config", file.arg()]);
    let back = rules(&t);
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(
        (back[0].1.as_deref(), back[0].2, back[0].3),
        (Some("sip"), Some(7020), 30)
    );
    cgroup.enter();
    let l = listen("127.0.0.1:7020");
    let (_c, s) = connect(&l);
    assert_eq!(keepalive(&s), expect(30, 4, 6, 0));

    // Edited, then reloaded.
    file.write(&format!(
        "{}{}",
        rule("sip", 7020, 33),
        rule("tls", 7021, 40)
    ));
    let r = t.run(&["reload"]).ok();
    assert!(
        r.stdout.contains("apply its configuration file again"),
        "{r:?}"
    );
    wait_until("the reload", Duration::from_secs(10), || {
        let now = rules(&t);
        now.len() == 2
            && now
                .iter()
                .any(|r| r.1.as_deref() == Some("sip") && r.3 == 33)
    });
    // An invalid edit is refused by the daemon, which keeps the rules.
    file.write("[[rule]]\nname = \"x\"\n");
    t.run(&["reload"]).ok();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rules(&t).len(), 2);
    cgroup.leave();
}

/// A serve without --config is not stopped by a reload (SIGHUP).
#[test]
fn reload_of_a_serve_without_config_leaves_it_running() {
    let e = Env::outside();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut s = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
    e.tcpka.run(&["reload"]).ok();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "serve exited on SIGHUP"
    );
    let (code, _) = http(&addr, "GET", "/healthz", None, None).unwrap();
    assert_eq!(code, 200);
}

#[test]
fn reload_without_a_daemon_says_so() {
    let e = Env::outside();
    let r = e.tcpka.run(&["reload"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no tcpka serve runs for"), "{r:?}");
}

/// `serve --config` takes its settings from the file's [serve] table; an
/// option on the command line wins.
#[test]
fn serve_takes_its_settings_from_the_file_under_the_command_line() {
    let _netns = NetNs::new();
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    let file = ConfigFile::new(
        "[serve]\nlisten = \"127.0.0.1:1\"\nindex_ports = \"5099\"\nrule_events = true\nmax_connections = 4096\nmax_holders = 2048\n\n",
    );
    let addr = format!("127.0.0.1:{}", 18000 + std::process::id() % 1000);
    // Serve::start passes --listen ADDR: it must win over the file's.
    let _s = Serve::start(&t, &cgroup.path, &addr, &["--config", file.arg()]);
    let info = t.run(&["info", "--json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["index_ports"], "5099", "{info}");
    assert_eq!(v["rule_events"], true, "{info}");
    // The table sizes, as the kernel has them.
    assert_eq!(v["connection_capacity"], 4096, "{info}");
    assert_eq!(v["holders"]["capacity"], 2048, "{info}");
    assert_eq!(v["index"]["capacity"], 1 << 20, "{info}");
}
