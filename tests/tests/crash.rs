//! A `tcpka` process killed at any point: each command is run once per BPF
//! syscall it makes, killed (SIGKILL, injected by strace) at that syscall,
//! and the next command must leave a consistent installation: unique rule
//! ids, holder counts equal to holder entries, a loaded installation
//! attached and seeded, keepalive on exactly while a holder remains.
use std::{
    path::Path,
    process::{Command, Stdio},
};

use aya::maps::{HashMap, MapData};
use keepalive_common::{conns::ConnInfo, holders::HolderKey, maps};
use tcpka_tests::*;

/// BPF syscalls `tcpka ARGS` makes from the current state.
fn bpf_calls(t: &Tcpka, args: &[&str]) -> usize {
    let log = std::env::temp_dir().join(unique("tcpka-strace"));
    let ok = strace(t, args, &["-o", log.to_str().unwrap()]);
    assert!(ok, "tcpka {args:?} failed under strace");
    let n = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("bpf("))
        .count();
    std::fs::remove_file(&log).unwrap();
    assert!(n > 0, "no bpf calls seen for {args:?}");
    n
}

/// Runs `tcpka ARGS`, killed at its `n`th BPF syscall; false when it made
/// fewer calls and finished (a later run can need fewer: a socket's holder
/// found once is remembered).
fn killed_at(t: &Tcpka, args: &[&str], n: usize) -> bool {
    let inject = format!("inject=bpf:signal=SIGKILL:when={n}");
    // strace reports the tracee's death by the signal.
    !strace(t, args, &["-o", "/dev/null", "-e", &inject])
}

/// `strace -f -e trace=bpf OPTIONS tcpka ARGS`; whether it succeeded.
fn strace(t: &Tcpka, args: &[&str], options: &[&str]) -> bool {
    Command::new("strace")
        .args(["-f", "-e", "trace=bpf"])
        .args(options)
        .arg(tcpka_bin())
        .args(args)
        .env("TCPKA_PIN_DIR", &t.pin_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run strace (cargo xtask setup installs it)")
        .success()
}

fn open_hash<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(pin_dir.join(name)).unwrap();
    HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap()
}

/// The invariants of an installation.
fn check(t: &Tcpka, when: &str) {
    let r = t.run(&["info", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    if v["loaded"] != true {
        return;
    }
    assert_eq!(v["installation"]["attached"], true, "{when}: {v}");
    assert_eq!(v["installation"]["seeded"], true, "{when}: {v}");
    let rules = tcpka::enforcer::Enforcer::new(t.layout()).rules().unwrap();
    let mut ids: Vec<u32> = rules.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        rules.len(),
        "{when}: duplicate rule ids {rules:?}"
    );
    let entries: HashMap<MapData, HolderKey, u8> = open_hash(&t.pin_dir, maps::HOLDERS);
    let counts: HashMap<MapData, u64, u32> = open_hash(&t.pin_dir, maps::HOLDER_COUNT);
    let conns: HashMap<MapData, u64, ConnInfo> = open_hash(&t.pin_dir, maps::CONNS);
    let keys: Vec<HolderKey> = entries.keys().map(Result::unwrap).collect();
    for c in counts.iter().map(Result::unwrap) {
        let n = keys.iter().filter(|k| k.cookie == c.0).count() as u32;
        assert_eq!(
            c.1, n,
            "{when}: cookie {} counts {} holders, has {n}",
            c.0, c.1
        );
    }
    for k in &keys {
        if conns.get(&k.cookie, 0).is_ok() {
            assert!(
                counts.get(&k.cookie, 0).is_ok(),
                "{when}: holder entry of cookie {} without a count",
                k.cookie
            );
        }
    }
}

#[test]
fn load_and_unload_killed_at_each_bpf_call() {
    let _netns = NetNs::new();
    let cgroup = CgroupDir::new();
    let t = Tcpka::new();
    let cg = cgroup.path.to_str().unwrap();
    let load = ["load", "--cgroup", cg];
    let n = bpf_calls(&t, &load);
    t.run(&["unload"]).ok();
    for i in 1..=n {
        assert!(
            killed_at(&t, &load, i),
            "load was not killed at bpf call {i}"
        );
        // Whatever was left, `info` says something sensible...
        let r = t.run(&["info", "--json"]);
        assert!(r.code == 0 || r.code == 1, "load killed at {i}: {r:?}");
        assert!(!r.stderr.contains("panicked"), "{r:?}");
        // ...and the next load completes it.
        t.run(&load).ok();
        check(&t, &format!("load killed at bpf call {i}"));
        t.run(&["unload"]).ok();
        assert!(
            !t.pin_dir.exists(),
            "unload after a killed load at {i} left pins"
        );
    }
    t.run(&load).ok();
    let n = bpf_calls(&t, &["unload"]);
    for i in 1..=n {
        t.run(&load).ok();
        assert!(
            killed_at(&t, &["unload"], i),
            "unload was not killed at {i}"
        );
        t.run(&["unload"]).ok();
        assert!(!t.pin_dir.exists(), "unload killed at {i} left pins");
        assert!(
            attached_programs(&cgroup.path).is_empty(),
            "unload killed at {i}"
        );
    }
}

#[test]
fn rule_add_killed_at_each_bpf_call() {
    let e = Env::outside();
    e.tcpka.rule_add(&["--local-port", "999", "30", "3", "5"]);
    let n = bpf_calls(
        &e.tcpka,
        &["rule", "add", "--local-port", "998", "30", "3", "5"],
    );
    let enforcer = tcpka::enforcer::Enforcer::new(e.tcpka.layout());
    let base = enforcer.rules().unwrap();
    for i in 1..=n {
        let p = (1000 + i).to_string();
        killed_at(
            &e.tcpka,
            &["rule", "add", "--local-port", &p, "30", "3", "5"],
            i,
        );
        let p = (3000 + i).to_string();
        e.tcpka.rule_add(&["--local-port", &p, "30", "3", "5"]);
        check(&e.tcpka, &format!("rule add killed at bpf call {i}"));
        // Back to the same table, so that every call of the command is hit.
        for r in enforcer.rules().unwrap() {
            if !base.iter().any(|b| b.id == r.id) {
                e.tcpka.run(&["rule", "del", &r.id.to_string()]).ok();
            }
        }
    }
}

#[test]
fn holder_enable_and_disable_killed_at_each_bpf_call() {
    let e = Env::outside();
    let l = listen("127.0.0.1:0");
    let (c, _s) = connect(&l);
    let conn = format!("cookie:{}", cookie(&c));
    fn as_refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let enable = |h: &str| -> Vec<String> {
        ["enable", &conn, "30", "3", "5", "--holder", h]
            .map(str::to_owned)
            .to_vec()
    };

    // enable --holder, killed: the retry leaves counts right, keepalive on.
    // (Once first, so that the socket's holder is known and every run
    // makes the same calls.)
    e.tcpka.run(&as_refs(&enable("warm"))).ok();
    let n = bpf_calls(&e.tcpka, &as_refs(&enable("probe")));
    e.tcpka.run(&["disable", &conn]).ok();
    for i in 1..=n {
        let h = format!("call-{i}");
        assert!(
            killed_at(&e.tcpka, &as_refs(&enable(&h)), i),
            "enable not killed at {i}"
        );
        e.tcpka.run(&as_refs(&enable(&h))).ok();
        check(&e.tcpka, &format!("enable --holder killed at bpf call {i}"));
        assert!(keepalive(&c).enabled, "enable killed at {i}");
        e.tcpka.run(&["disable", &conn]).ok();
        check(&e.tcpka, &format!("disable after enable killed at {i}"));
    }

    // disable --holder of the last holder, killed: the next command turns
    // keepalive off and leaves no holder.
    e.tcpka.run(&as_refs(&enable("last"))).ok();
    let n = bpf_calls(&e.tcpka, &["disable", &conn, "--holder", "last"]);
    for i in 1..=n {
        e.tcpka.run(&as_refs(&enable("last"))).ok();
        assert!(
            killed_at(&e.tcpka, &["disable", &conn, "--holder", "last"], i),
            "disable not killed at {i}"
        );
        let r = e.tcpka.run(&["disable", &conn, "--holder", "last"]);
        assert!(r.code == 0 || r.code == 1, "{r:?}");
        check(
            &e.tcpka,
            &format!("disable --holder killed at bpf call {i}"),
        );
        assert!(
            !keepalive(&c).enabled,
            "disable --holder killed at {i}: keepalive left on"
        );
        let r = e.tcpka.run(&["status", &conn, "--json"]).ok();
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v[0]["holders"], serde_json::json!([]), "killed at {i}: {v}");
    }
}
