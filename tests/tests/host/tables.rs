//! Full tables: the holder cap, the index overflow, and the holder modes.
use super::*;

/// The holder table has a cap: past it, `enable --holder` is refused with a
/// clear error and changes nothing; once holders are released it works
/// again. `info` shows the fill.
#[test]
pub(super) fn holder_table_cap_is_enforced_and_recovers() {
    let e = Env::outside();
    let l = listen("127.0.0.1:0");
    let (c, _s) = connect(&l);
    let conn = format!("cookie:{}", cookie(&c));
    let cap = keepalive_common::holders::MAX_ENTRIES as u64;
    let mut h = tcpka::holders::Holders::open(&e.tcpka.layout()).unwrap();
    // Other connections' holders fill the table (cookies no socket has).
    for i in 0..cap {
        h.add(u64::MAX - i, "call").unwrap();
    }
    let r = e
        .tcpka
        .run(&["enable", &conn, "30", "3", "5", "--holder", "one-more"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("holder table is full"), "{r:?}");
    assert_eq!(
        keepalive(&c),
        KERNEL_DEFAULT,
        "a refused enable changed the socket"
    );
    let info: serde_json::Value =
        serde_json::from_str(&e.tcpka.run(&["info", "--json"]).ok().stdout).unwrap();
    assert_eq!(info["holders"]["count"].as_u64(), Some(cap), "{info}");
    assert_eq!(info["holders"]["capacity"].as_u64(), Some(cap), "{info}");
    // Room again: it works.
    assert_eq!(h.remove(u64::MAX, "call").unwrap(), Some(0));
    e.tcpka
        .run(&["enable", &conn, "30", "3", "5", "--holder", "one-more"])
        .ok();
    assert_eq!(keepalive(&c), expect(30, 3, 5, 0));
}

/// More connections to one peer than the index has slots for: `info` says
/// the index is incomplete, and commands still find every connection.
#[test]
pub(super) fn index_overflow_is_shown_and_lookups_stay_complete() {
    // Connections of the cgroup on an index port: what the index holds.
    // (The environment is a fresh network namespace: the port is free.)
    let e = Env::entered_with(&["--index-ports", "5070"]);
    let l = listen("127.0.0.1:5070");
    let peer = l.local_addr().unwrap().to_string();
    let info = |t: &Tcpka| -> serde_json::Value {
        serde_json::from_str(&t.run(&["info", "--json"]).ok().stdout).unwrap()
    };
    assert_eq!(info(&e.tcpka)["index"]["failures"], 0);
    let slots = keepalive_common::index::PEER_SLOTS as usize;
    let pairs: Vec<_> = (0..slots + 2).map(|_| connect(&l)).collect();
    let v = info(&e.tcpka);
    assert_eq!(v["index"]["failures"], 0, "the map is not full: {v}");
    assert_eq!(v["index"]["overflowed_peers"], 1, "{v}");
    let text = e.tcpka.run(&["info"]).ok().stdout;
    assert!(text.contains("index: INCOMPLETE"), "{text}");
    let r = e.tcpka.run(&["enable", &peer, "30", "3", "5"]).ok();
    assert!(
        r.stdout.contains(&format!("on {} connections", slots + 2)),
        "{r:?}"
    );
    for (c, _) in &pairs {
        assert_eq!(keepalive(c), expect(30, 3, 5, 0));
    }
    // Back within the slots: the next command for the peer finds every
    // connection indexed and the peer goes back to the index.
    let mut pairs = pairs;
    pairs.truncate(slots - 1);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let r = e.tcpka.run(&["enable", &peer, "31", "3", "5"]).ok();
    assert!(
        r.stdout.contains(&format!("on {} connections", slots - 1)),
        "{r:?}"
    );
    let v = info(&e.tcpka);
    assert_eq!(v["index"]["overflowed_peers"], 0, "{v}");
    assert!(e
        .tcpka
        .run(&["info"])
        .ok()
        .stdout
        .contains("index: complete"));
    let r = e.tcpka.run(&["enable", &peer, "32", "3", "5"]).ok();
    assert!(
        r.stdout.contains(&format!("on {} connections", slots - 1)),
        "{r:?}"
    );
    for (c, _) in &pairs {
        assert_eq!(keepalive(c), expect(32, 3, 5, 0));
    }
    // And over them again: marked again.
    let more: Vec<_> = (0..3).map(|_| connect(&l)).collect();
    assert_eq!(info(&e.tcpka)["index"]["overflowed_peers"], 1);
    let r = e.tcpka.run(&["enable", &peer, "33", "3", "5"]).ok();
    assert!(
        r.stdout.contains(&format!("on {} connections", slots + 2)),
        "{r:?}"
    );
    drop(more);
}

/// Each holder mode attaches what `info` says, and nothing more: checked
/// against bpftool's view of the pinned links.
#[test]
pub(super) fn holder_modes_attach_what_info_says() {
    for (extra, mode, host_wide_syscall_hooks) in [
        (&[][..], "scan", 0),
        (&["--holders", "syscalls"][..], "syscalls", 3),
    ] {
        let e = Env::outside_with(extra);
        let v: serde_json::Value =
            serde_json::from_str(&e.tcpka.run(&["info", "--json"]).ok().stdout).unwrap();
        assert_eq!(v["installation"]["holders"], mode, "{v}");
        let hooks = v["hooks"].as_array().unwrap();
        let syscall = hooks
            .iter()
            .filter(|h| h["cost"] == "host: every syscall")
            .count();
        assert_eq!(syscall, host_wide_syscall_hooks, "{mode}: {v}");
        // Every hook info lists is a link bpftool sees, of the kind it says.
        for h in hooks {
            let pin = e.tcpka.pin_dir.join(h["pin"].as_str().unwrap());
            let out = Command::new("bpftool")
                .args(["link", "show", "pinned"])
                .arg(&pin)
                .arg("--json")
                .output()
                .unwrap();
            assert!(out.status.success(), "{pin:?}: {out:?}");
            let link: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let kind = link["type"].as_str().unwrap_or_default().to_owned();
            let attach = h["attach"].as_str().unwrap();
            let want = match attach.split(' ').next().unwrap() {
                "cgroup" => "cgroup",
                "tp_btf" => "raw_tracepoint",
                "tracepoint" => "perf_event",
                "iter" => "iter",
                other => panic!("unknown attach {other}"),
            };
            assert_eq!(kind, want, "{attach}: {link}");
        }
        // And nothing is pinned that info leaves out.
        let links = std::fs::read_dir(&e.tcpka.pin_dir)
            .unwrap()
            .filter_map(|d| d.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("link_") || n.starts_with("iter_"))
            .count();
        assert_eq!(links, hooks.len(), "{mode}: {v}");
    }
}
