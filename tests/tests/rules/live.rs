//! A rule change reaching the connections that already exist.
use super::*;

/// Connections made before a rule get its values when it is added; a
/// command's connection and one in another cgroup do not; `--new-only`
/// leaves them alone; a change of values reaches them again; a delete
/// leaves them as they are, unless `--revert`.
#[test]
fn a_rule_change_reaches_the_connections_that_exist() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let port = l.local_addr().unwrap().port().to_string();
    let (c1, s1) = connect(&l);
    let (held, _held_server) = connect(&l);
    e.tcpka
        .run(&[
            "enable",
            &format!("cookie:{}", cookie(&held)),
            "50",
            "5",
            "5",
        ])
        .ok();
    let other = CgroupDir::new();
    other.enter();
    let (c_other, _s_other) = connect(&l);
    e.cgroup.enter();
    assert_eq!(keepalive(&c1), KERNEL_DEFAULT);

    // --new-only: live connections keep what they have.
    let id = e
        .tcpka
        .rule_add(&["--local-port", &port, "--new-only", "21", "3", "4"]);
    assert_eq!(keepalive(&s1), KERNEL_DEFAULT);
    e.tcpka
        .run(&["rule", "del", &id.to_string(), "--new-only"])
        .ok();

    // Added: the live connections it decides get its values, at once.
    let r = e
        .tcpka
        .run(&[
            "rule",
            "add",
            "--local-port",
            &port,
            "--json",
            "22",
            "3",
            "4",
        ])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        keepalive(&s1),
        expect(22, 3, 4, 0),
        "server end, port {port}"
    );
    // The client ends' local port is an ephemeral one: not this rule's.
    assert_eq!(keepalive(&c1), KERNEL_DEFAULT);
    assert_eq!(keepalive(&held), expect(50, 5, 5, 0), "a command wins");
    assert_eq!(keepalive(&c_other), KERNEL_DEFAULT, "another cgroup");
    let changed = v["live"]["changed"].as_u64().unwrap();
    assert!(changed >= 1, "{v}");
    assert!(
        r.stderr.contains("live connection(s) given"),
        "{}",
        r.stderr
    );
    let id: u32 = v["id"].as_u64().unwrap() as u32;

    // A second, more specific rule for the client ends' peer port.
    let (c2, _s2) = connect(&l);
    assert_eq!(keepalive(&_s2), expect(22, 3, 4, 0), "new connection");
    let remote = e.tcpka.rule_add(&[
        "--remote-port",
        &port,
        "--remote",
        "127.0.0.1",
        "23",
        "3",
        "4",
    ]);
    assert_eq!(keepalive(&c1), expect(23, 3, 4, 0));
    assert_eq!(keepalive(&c2), expect(23, 3, 4, 0));
    assert_eq!(keepalive(&held), expect(50, 5, 5, 0), "a command wins");
    assert_eq!(keepalive(&c_other), KERNEL_DEFAULT, "another cgroup");

    // Deleted: what another rule decides, or left as it was.
    e.tcpka.run(&["rule", "del", &id.to_string()]).ok();
    assert_eq!(keepalive(&s1), expect(22, 3, 4, 0), "no rule left: kept");
    let r = e
        .tcpka
        .run(&["rule", "del", &remote.to_string(), "--revert"])
        .ok();
    assert!(r.stderr.contains("keepalive turned off"), "{}", r.stderr);
    assert!(!keepalive(&c1).enabled, "reverted: {:?}", keepalive(&c1));
    assert_eq!(
        keepalive(&held),
        expect(50, 5, 5, 0),
        "a command still wins"
    );
    drop(other);
}

/// `rule add`, `rule del` and `apply` with `--dry-run`: the preview counts
/// exactly the connections the change then gives new values, per rule,
/// lists them, and changes nothing (no rule, no value).
#[test]
fn a_preview_counts_exactly_and_changes_nothing() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let port = l.local_addr().unwrap().port();
    let p = port.to_string();
    let pairs: Vec<_> = (0..5).map(|_| connect(&l)).collect();
    // A command holds a server end.
    let (_held_client, held) = connect(&l);
    e.tcpka
        .run(&[
            "enable",
            &format!("cookie:{}", cookie(&held)),
            "50",
            "5",
            "5",
        ])
        .ok();
    // A client in another cgroup (its server end, accepted by the
    // listener, is in the listener's).
    let other = CgroupDir::new();
    other.enter();
    let (c_other, _s_other) = connect(&l);
    e.cgroup.enter();
    let json = |args: &[&str]| -> serde_json::Value {
        let out = e.tcpka.run(args).ok().stdout;
        serde_json::from_str(&out).unwrap_or_else(|err| panic!("{err}: {out}"))
    };
    let servers_hold = |k: Keepalive, why: &str| {
        for (_, s) in &pairs {
            assert_eq!(keepalive(s), k, "{why}");
        }
    };

    // Add: the six server ends that no command holds.
    let v = json(&[
        "rule",
        "add",
        "--local-port",
        &p,
        "--dry-run",
        "--json",
        "31",
        "3",
        "4",
    ]);
    assert_eq!(v["live"]["dry_run"], true, "{v}");
    assert_eq!(v["live"]["changed"], 6, "{v}");
    assert_eq!(v["live"]["unmatched"], 0, "{v}");
    let per_rule = v["live"]["rules"].as_array().unwrap();
    assert_eq!(per_rule.len(), 1, "{v}");
    assert_eq!(per_rule[0]["rule"], "new rule", "{v}");
    assert_eq!(per_rule[0]["changed"], 6, "{v}");
    let listed: Vec<String> = per_rule[0]["sample"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["remote"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed.len(), 6, "{v}");
    for (c, _) in &pairs {
        let a = c.local_addr().unwrap().to_string();
        assert!(listed.contains(&a), "{a} not in the sample: {v}");
    }
    servers_hold(KERNEL_DEFAULT, "a preview changes no value");
    assert_eq!(
        e.tcpka.run(&["rule", "list", "--json"]).ok().stdout.trim(),
        "[]"
    );
    let (_c_new, s_new) = connect(&l);
    assert_eq!(keepalive(&s_new), KERNEL_DEFAULT, "a preview adds no rule");
    let text = e
        .tcpka
        .run(&[
            "rule",
            "add",
            "--local-port",
            &p,
            "--dry-run",
            "31",
            "3",
            "4",
        ])
        .ok()
        .stdout;
    assert!(text.contains("7 would get new values"), "{text}");
    assert!(text.contains("nothing changed (--dry-run)"), "{text}");

    // The change itself reaches exactly what the preview counted.
    let v = json(&["rule", "add", "--local-port", &p, "--json", "31", "3", "4"]);
    assert_eq!(v["live"]["changed"], 7, "{v}");
    let id = v["id"].as_u64().unwrap().to_string();
    assert_eq!(v["live"]["rules"][0]["rule"], format!("rule {id}"), "{v}");
    servers_hold(expect(31, 3, 4, 0), "added");
    assert_eq!(keepalive(&held), expect(50, 5, 5, 0), "a command wins");
    assert_eq!(keepalive(&s_new), expect(31, 3, 4, 0), "added");
    assert_eq!(keepalive(&c_other), KERNEL_DEFAULT, "another cgroup");

    // A value the connections already hold changes nothing.
    let v = json(&[
        "rule",
        "add",
        "--local-port",
        &p,
        "--remote",
        "127.0.0.1",
        "--dry-run",
        "--json",
        "31",
        "3",
        "4",
    ]);
    assert_eq!(v["live"]["changed"], 0, "{v}");

    // Delete: the seven would match no rule; with or without --revert, a
    // preview leaves the rule and the values.
    for revert in [false, true] {
        let mut args = vec!["rule", "del", id.as_str(), "--dry-run", "--json"];
        if revert {
            args.push("--revert");
        }
        let v = json(&args);
        assert_eq!(v["live"]["unmatched"], 7, "{v}");
        assert_eq!(v["live"]["changed"], 0, "{v}");
        assert_eq!(v["live"]["rules"][0]["rule"], format!("rule {id}"), "{v}");
        servers_hold(expect(31, 3, 4, 0), "a preview of a delete");
    }
    let v = json(&["rule", "del", &id, "--revert", "--json"]);
    assert_eq!(v["live"]["unmatched"], 7, "{v}");
    for (_, s) in &pairs {
        assert!(!keepalive(s).enabled, "reverted");
    }

    // apply: named rules, per rule.
    let dir = std::env::temp_dir().join(unique("tcpka-preview"));
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("tcpka.toml");
    std::fs::write(
        &file,
        format!(
            "[[rule]]\nname = \"servers\"\nlocal_port = {port}\nidle = 41\ncount = 3\ninterval = 4\n\n\
             [[rule]]\nname = \"clients\"\nremote_port = {port}\nidle = 42\ncount = 3\ninterval = 4\n"
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let v = json(&["apply", "--dry-run", "--json", f]);
    assert_eq!(v["steps"].as_array().unwrap().len(), 2, "{v}");
    let count = |v: &serde_json::Value, name: &str| {
        v["live"]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["rule"] == name)
            .map_or(0, |r| r["changed"].as_u64().unwrap())
    };
    // Seven server ends; seven clients (their peer's port is the
    // listener's), not the one in another cgroup.
    assert_eq!(count(&v, "servers"), 7, "{v}");
    assert_eq!(count(&v, "clients"), 7, "{v}");
    assert_eq!(v["live"]["changed"], 14, "{v}");
    assert_eq!(
        e.tcpka.run(&["rule", "list", "--json"]).ok().stdout.trim(),
        "[]"
    );
    for (c, s) in &pairs {
        assert!(!keepalive(s).enabled, "a preview of apply");
        assert_eq!(keepalive(c), KERNEL_DEFAULT, "a preview of apply");
    }
    let v = json(&["apply", "--json", f]);
    assert_eq!(v["live"]["changed"], 14, "{v}");
    assert_eq!(count(&v, "servers"), 7, "{v}");
    assert_eq!(count(&v, "clients"), 7, "{v}");
    for (c, s) in &pairs {
        assert_eq!(keepalive(s), expect(41, 3, 4, 0));
        assert_eq!(keepalive(c), expect(42, 3, 4, 0));
    }
    assert_eq!(keepalive(&held), expect(50, 5, 5, 0), "a command wins");
    assert_eq!(keepalive(&c_other), KERNEL_DEFAULT, "another cgroup");
    let _ = std::fs::remove_dir_all(&dir);
    drop(other);
}

/// A rule for new connections only (`new_only` in a file, `rule add
/// --new-only`): neither its add, its changes nor its removal reach a live
/// connection, and a pass for another rule leaves the connections it
/// decides as they are.
#[test]
fn a_new_only_rule_never_reaches_live_connections() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let port = l.local_addr().unwrap().port();
    let (_c, s) = connect(&l);
    let dir = std::env::temp_dir().join(unique("tcpka-new-only"));
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("tcpka.toml");
    let write = |idle: u32| {
        std::fs::write(
            &file,
            format!(
                "[[rule]]\nname = \"n\"\nlocal_port = {port}\nidle = {idle}\ncount = 3\ninterval = 4\nnew_only = true\n"
            ),
        )
        .unwrap()
    };
    let f = file.to_str().unwrap();
    let apply = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["apply", "--json"];
        all.extend_from_slice(args);
        all.push(f);
        serde_json::from_str(&e.tcpka.run(&all).ok().stdout).unwrap()
    };

    write(51);
    let v = apply(&["--dry-run"]);
    assert_eq!(v["live"]["changed"], 0, "{v}");
    let v = apply(&[]);
    assert_eq!(v["live"]["changed"], 0, "{v}");
    assert_eq!(keepalive(&s), KERNEL_DEFAULT, "added: not reached");
    let list: serde_json::Value =
        serde_json::from_str(&e.tcpka.run(&["rule", "list", "--json"]).ok().stdout).unwrap();
    assert_eq!(list[0]["new_only"], true, "{list}");
    let (_c1, s1) = connect(&l);
    assert_eq!(keepalive(&s1), expect(51, 3, 4, 0), "a new connection");

    write(52);
    let v = apply(&[]);
    assert_eq!(v["live"]["changed"], 0, "{v}");
    assert_eq!(keepalive(&s), KERNEL_DEFAULT, "changed: not reached");
    assert_eq!(keepalive(&s1), expect(51, 3, 4, 0), "changed: not reached");

    // Another rule, more specific, reaches them; once it is gone, the
    // new-only rule decides them again and leaves them as they are.
    let p = port.to_string();
    let other = e
        .tcpka
        .rule_add(&["--local-port", &p, "--remote", "127.0.0.1", "53", "3", "4"]);
    assert_eq!(keepalive(&s), expect(53, 3, 4, 0));
    let r = e
        .tcpka
        .run(&["rule", "del", &other.to_string(), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (
            v["live"]["changed"].as_u64(),
            v["live"]["unmatched"].as_u64()
        ),
        (Some(0), Some(0)),
        "{v}"
    );
    assert_eq!(keepalive(&s), expect(53, 3, 4, 0), "kept");
    assert_eq!(keepalive(&s1), expect(53, 3, 4, 0), "kept");

    // Removed, even with --revert: not reached.
    std::fs::write(&file, "").unwrap();
    let v = apply(&["--revert"]);
    assert_eq!(v["live"]["unmatched"], 0, "{v}");
    assert_eq!(keepalive(&s1), expect(53, 3, 4, 0), "removed: not reached");

    // `rule add --new-only` makes such a rule too.
    let id = e
        .tcpka
        .rule_add(&["--local-port", &p, "--new-only", "54", "3", "4"]);
    let r = e
        .tcpka
        .run(&["rule", "del", &id.to_string(), "--revert", "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["new_only"], true, "{v}");
    assert_eq!(v["live"]["unmatched"], 0, "{v}");
    assert_eq!(keepalive(&s1), expect(53, 3, 4, 0), "removed: not reached");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pass that reports more connections than one read of the iterator
/// holds (the kernel shows the connection whose report did not fit again
/// to the next read, by then changed): every one is counted, once.
#[test]
fn a_pass_counts_every_connection_beyond_one_read() {
    let e = env();
    let l = listen("127.0.0.1:0");
    let port = l.local_addr().unwrap().port().to_string();
    // About 90 bytes a report, 32 KiB a read: several reads. 3,000
    // descriptors: above the usual soft limit of 1,024.
    let mut room = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) and setrlimit(2) with valid pointers (as root:
    // the hard limit may be raised; it is never lowered here).
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut room), 0);
        room.rlim_max = room.rlim_max.max(8192);
        room.rlim_cur = room.rlim_cur.max(8192);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &room), 0);
    }
    let conns: Vec<_> = (0..1500).map(|_| connect(&l)).collect();
    for (idle, how) in [(41, "--dry-run"), (41, "--tracked"), (42, "--untracked")] {
        let out = e
            .tcpka
            .run(&[
                "rule",
                "add",
                "--local-port",
                &port,
                how,
                "--json",
                &idle.to_string(),
                "3",
                "4",
            ])
            .ok()
            .stdout;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["live"]["changed"], 1500,
            "{how} {idle}: {}",
            v["live"]["took_us"]
        );
        if how != "--dry-run" {
            e.tcpka
                .run(&["rule", "del", "--new-only", &v["id"].to_string()])
                .ok();
        }
    }
    for (_, s) in &conns {
        assert_eq!(keepalive(s), expect(42, 3, 4, 0));
    }
}
