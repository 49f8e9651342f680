//! The fleet with a real 3-member etcd cluster (the Debian package) on
//! loopback in the test's network namespace, and two `tcpka serve --etcd`
//! agents, each with its own pin directory, child cgroup and cache file.
//! Rules are checked in each agent's kernel maps and on real sockets made
//! in each agent's cgroup.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcpka_tests::*;

mod agent;
mod etcd;

use agent::Agent;
use etcd::Cluster;

fn rule(port: u16, idle: u32) -> String {
    format!(r#"{{"local_port":{port},"idle":{idle},"count":3,"interval":5}}"#)
}

fn fleet(cluster: &Cluster, prefix: &str, args: &[&str]) -> Run {
    Run::from(
        Command::new(tcpka_bin())
            .args([
                "fleet",
                "--etcd",
                &cluster.endpoints(),
                "--etcd-prefix",
                prefix,
            ])
            .args(args)
            .output()
            .expect("tcpka fleet"),
    )
}

fn prefix() -> String {
    format!("/{}", unique("tcpka-fleet"))
}

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn a_rule_reaches_the_agents_it_selects_within_a_second() {
    let _ns = NetNs::new();
    let cluster = Cluster::start(3);
    let prefix = prefix();
    let a = Agent::start("edge-1", &["role=edge"], &cluster, &prefix);
    let b = Agent::start("core-1", &["role=core"], &cluster, &prefix);
    let (p_all, p_edge) = (free_port(), free_port());
    // Connections made before the rule exists get it too.
    let before: Vec<_> = [&a, &b].iter().map(|x| x.live_on(p_all)).collect();

    // A preview asks both agents, and changes nothing.
    let preview = |args: &[&str]| -> Value {
        let out = fleet(&cluster, &prefix, args).ok().stdout;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let p = p_all.to_string();
    let v = preview(&[
        "rule",
        "add",
        "all",
        "--local-port",
        &p,
        "31",
        "3",
        "5",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(v["missing"], serde_json::json!([]), "{v}");
    for node in ["edge-1", "core-1"] {
        let live = &v["nodes"][node]["live"];
        assert_eq!(live["changed"], 1, "{node}: {v}");
        assert_eq!(live["rules"][0]["rule"], "@all", "{node}: {v}");
    }
    let text = fleet(
        &cluster,
        &prefix,
        &[
            "rule",
            "add",
            "all",
            "--local-port",
            &p,
            "31",
            "3",
            "5",
            "--dry-run",
        ],
    )
    .ok()
    .stdout;
    assert!(
        text.contains("node edge-1:") && text.contains("1 would get new values"),
        "{text}"
    );
    assert_eq!(
        cluster.get(&format!("{prefix}/rules/all")),
        None,
        "nothing put"
    );
    assert_eq!(
        cluster.keys(&format!("{prefix}/previews/")),
        Vec::<String>::new(),
        "the preview's keys are gone"
    );
    for (x, live) in [&a, &b].into_iter().zip(&before) {
        assert!(!x.has("all"), "{}", x.name);
        assert_eq!(keepalive(&live.server), KERNEL_DEFAULT, "{}", x.name);
    }

    cluster.put(&format!("{prefix}/rules/all"), &rule(p_all, 31));
    for (x, live) in [&a, &b].into_iter().zip(&before) {
        let took = x.wait("the rule for every node", SECOND, |x| x.has("all"));
        eprintln!(
            "{}: rule `all` in the kernel {took:?} after the put",
            x.name
        );
        assert_eq!(x.keepalive_on(p_all), expect(31, 3, 5, 0), "{}", x.name);
        // Live connections are reached just after the rule is in (once
        // a stream of changes pauses).
        let within = if under_tcg() { SECOND * 5 } else { SECOND };
        wait_until(&format!("{}: the live connection", x.name), within, || {
            keepalive(&live.server) == expect(31, 3, 5, 0)
        });
    }
    let status = |node: &str| -> Value {
        serde_json::from_str(
            &cluster
                .get(&format!("{prefix}/nodes/{node}"))
                .unwrap_or_default(),
        )
        .unwrap_or_default()
    };
    for node in ["edge-1", "core-1"] {
        wait_until(
            "the live count in the node's status",
            Duration::from_secs(5),
            || status(node)["live_changed_total"].as_u64() >= Some(1),
        );
    }

    // A labelled rule: only the edge node.
    let mut v: Value = serde_json::from_str(&rule(p_edge, 32)).unwrap();
    v["labels"] = serde_json::json!({ "role": "edge" });
    cluster.put(&format!("{prefix}/rules/edge-only"), &v.to_string());
    a.wait("the labelled rule", SECOND, |x| x.has("edge-only"));
    assert_eq!(a.keepalive_on(p_edge), expect(32, 3, 5, 0));
    std::thread::sleep(SECOND);
    assert!(!b.has("edge-only"), "{:?}", b.fleet_rules());
    assert_eq!(b.keepalive_on(p_edge), KERNEL_DEFAULT);

    // `tcpka fleet` sees both nodes and explains the selection.
    let s = fleet(&cluster, &prefix, &["status", "--json"]).ok();
    let nodes: Value = serde_json::from_str(&s.stdout).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    for n in nodes.as_array().unwrap() {
        assert_eq!(n["up"], true, "{n}");
        assert!(n["status"]["revision"].as_i64().unwrap() > 0, "{n}");
        assert_eq!(n["status"]["attached"], true, "{n}");
    }
    let e = fleet(&cluster, &prefix, &["explain", "core-1"]).ok();
    assert!(
        e.stdout.contains("all: applies") && e.stdout.contains("edge-only: not for it"),
        "{}",
        e.stdout
    );

    // A preview of the delete: the live connections would match no rule.
    let v = preview(&["rule", "del", "all", "--dry-run", "--json"]);
    for node in ["edge-1", "core-1"] {
        assert_eq!(v["nodes"][node]["live"]["unmatched"], 1, "{node}: {v}");
    }
    assert!(a.has("all") && b.has("all"), "a preview deletes nothing");

    // Deleting a rule removes it everywhere.
    fleet(&cluster, &prefix, &["rule", "del", "all"]).ok();
    for x in [&a, &b] {
        x.wait("the deleted rule gone", SECOND, |x| !x.has("all"));
        assert_eq!(x.keepalive_on(p_all), KERNEL_DEFAULT, "{}", x.name);
    }
    assert!(a.has("edge-only"));
}

#[test]
fn malformed_values_and_clashes_are_reported_and_break_nothing() {
    let _ns = NetNs::new();
    let cluster = Cluster::start(3);
    let prefix = prefix();
    let a = Agent::start("n1", &[], &cluster, &prefix);
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    // The host's own named rule, from a file.
    let file = a.log.with_file_name("tcpka.toml");
    std::fs::write(
        &file,
        format!(
            "[[rule]]\nname = \"mine\"\nlocal_port = {p2}\nidle = 40\ncount = 4\ninterval = 4\n"
        ),
    )
    .unwrap();
    a.tcpka.run(&["apply", file.to_str().unwrap()]).ok();

    // Malformed, with a field name made to forge a log line.
    cluster.put(
        &format!("{prefix}/rules/bad"),
        r#"{"idle": 30, "count": 3, "x\nERROR FORGED line \u001b[2J": 1}"#,
    );
    cluster.put(&format!("{prefix}/rules/mine"), &rule(p3, 33));
    cluster.put(&format!("{prefix}/rules/same-match"), &rule(p2, 34));
    cluster.put(&format!("{prefix}/rules/good"), &rule(p1, 35));
    a.wait("the good rule", SECOND, |x| x.has("good"));
    assert_eq!(a.keepalive_on(p1), expect(35, 3, 5, 0));
    // The host's rule wins, by name and by match.
    assert_eq!(a.keepalive_on(p2), expect(40, 4, 4, 0));
    assert_eq!(a.keepalive_on(p3), KERNEL_DEFAULT);
    assert_eq!(a.fleet_rules(), vec![("good".to_owned(), 35)]);
    let status = |c: &Cluster| -> Value {
        serde_json::from_str(&c.get(&format!("{prefix}/nodes/n1")).unwrap_or_default())
            .unwrap_or_default()
    };
    wait_until(
        "the node status reporting them",
        Duration::from_secs(5),
        || {
            let s = status(&cluster);
            s["invalid"].as_array().is_some_and(|v| v.len() == 1)
                && s["clashes"].as_array().is_some_and(|v| v.len() == 2)
        },
    );
    let s = status(&cluster);
    assert!(
        s["invalid"][0].as_str().unwrap().starts_with("bad: "),
        "{s}"
    );
    let log = a.log();
    assert!(log.contains("rule skipped, malformed: bad"), "{log}");
    assert!(log.contains("FORGED"), "{log}");
    for line in log.lines() {
        assert!(!line.trim_start().starts_with("ERROR FORGED"), "{line}");
        assert!(!line.contains('\u{1b}'), "a raw escape: {line:?}");
    }
    assert!(
        log.contains("mine: this host has a rule of that name"),
        "{log}"
    );
    assert!(log.contains("same-match: this host's rule"), "{log}");
    let e = fleet(&cluster, &prefix, &["explain", "n1"]).ok();
    assert!(
        e.stdout.contains("mine: selects it") && e.stdout.contains("NOT applied"),
        "{}",
        e.stdout
    );
    // A value the agents would skip is refused by `tcpka fleet` itself.
    let r = fleet(&cluster, &prefix, &["rule", "add", "x", "0", "3", "5"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(cluster.get(&format!("{prefix}/rules/x")).is_none());
}

#[test]
fn agents_ride_out_the_leader_and_the_whole_cluster_going_away() {
    let _ns = NetNs::new();
    let mut cluster = Cluster::start(3);
    let prefix = prefix();
    let mut a = Agent::start("a", &[], &cluster, &prefix);
    let b = Agent::start("b", &[], &cluster, &prefix);
    let (p1, p2, p3, p4) = (free_port(), free_port(), free_port(), free_port());
    cluster.put(&format!("{prefix}/rules/r1"), &rule(p1, 41));
    for x in [&a, &b] {
        x.wait("r1", SECOND, |x| x.has("r1"));
    }

    // The leader goes: the agents keep enforcing and follow the new one;
    // an operator's command during the election waits it out.
    let leader = cluster.leader();
    cluster.stop(leader);
    let during = Instant::now();
    let r = fleet(
        &cluster,
        &prefix,
        &[
            "rule",
            "add",
            "r2",
            "42",
            "3",
            "5",
            "--local-port",
            &p2.to_string(),
        ],
    );
    eprintln!(
        "rule add during the election: {:?}, {r:?}",
        during.elapsed()
    );
    assert_eq!(r.code, 0, "{r:?}");
    for x in [&a, &b] {
        assert_eq!(x.keepalive_on(p1), expect(41, 3, 5, 0), "{}", x.name);
    }
    let put = Instant::now();
    for x in [&a, &b] {
        x.wait("r2 through the new leader", Duration::from_secs(15), |x| {
            x.has("r2")
        });
        eprintln!(
            "{}: r2 {:?} after the put, leader gone",
            x.name,
            put.elapsed()
        );
    }

    // Every member goes: local commands still work, enforcement stays, and
    // an agent started afresh (its pins gone) restores the rules it had.
    for i in 0..cluster.members.len() {
        cluster.stop(i);
    }
    assert_eq!(a.keepalive_on(p2), expect(42, 3, 5, 0));
    // With no member, `tcpka fleet` gives up after a bounded time, in one
    // line that names the cause.
    let tried = Instant::now();
    let r = fleet(&cluster, &prefix, &["rule", "list"]);
    let took = tried.elapsed();
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(25),
        "{took:?}"
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("no etcd member answers") && r.stderr.contains("did not answer for"),
        "{}",
        r.stderr
    );
    a.tcpka
        .rule_add(&["--local-port", &p4.to_string(), "44", "4", "4"]);
    assert_eq!(a.keepalive_on(p4), expect(44, 4, 4, 0));
    a.stop();
    a.tcpka.run(&["unload"]).ok();
    a.spawn();
    a.wait(
        "r1 and r2 from the cache, etcd down",
        Duration::from_secs(5),
        |x| x.has("r1") && x.has("r2"),
    );
    assert_eq!(a.keepalive_on(p1), expect(41, 3, 5, 0));
    assert!(
        a.log().contains("cached rule(s) before etcd answers"),
        "{}",
        a.log()
    );

    // etcd comes back: both converge on what changes next.
    for i in 0..cluster.members.len() {
        cluster.restart(i);
    }
    cluster.wait_all_healthy();
    cluster.del(&format!("{prefix}/rules/r1"));
    cluster.put(&format!("{prefix}/rules/r3"), &rule(p3, 43));
    for x in [&a, &b] {
        x.wait(
            "convergence after etcd came back",
            Duration::from_secs(20),
            |x| {
                let mut names: Vec<String> = x.fleet_rules().into_iter().map(|(n, _)| n).collect();
                names.sort();
                names == ["r2", "r3"]
            },
        );
        assert_eq!(x.keepalive_on(p3), expect(43, 3, 5, 0), "{}", x.name);
    }
}

#[test]
fn a_killed_agents_node_key_vanishes_within_its_ttl() {
    let _ns = NetNs::new();
    let cluster = Cluster::start(3);
    let prefix = prefix();
    let mut a = Agent::start("doomed", &["role=edge"], &cluster, &prefix);
    let key = format!("{prefix}/nodes/doomed");
    wait_until("the node's status", Duration::from_secs(5), || {
        cluster.get(&key).is_some()
    });
    let s: Value = serde_json::from_str(&cluster.get(&key).unwrap()).unwrap();
    assert_eq!(s["node"], "doomed");
    assert_eq!(s["labels"]["role"], "edge");
    assert_eq!(s["loaded"], true);
    a.kill9();
    let killed = Instant::now();
    wait_until("the node key gone", Duration::from_secs(14), || {
        cluster.get(&key).is_none()
    });
    eprintln!("node key gone {:?} after kill -9", killed.elapsed());
    let s = fleet(&cluster, &prefix, &["status"]).ok();
    assert!(
        s.stdout.contains("doomed") && s.stdout.contains("gone"),
        "{}",
        s.stdout
    );
    let _ = Path::new(&a.cache);
}

#[test]
fn tls_with_a_client_certificate_and_etcd_auth() {
    let _ns = NetNs::new();
    // TLS, the members asking for a client certificate.
    let cluster = Cluster::start_tls(1);
    let prefix = prefix();
    let tls = cluster.tls();
    let (ca, cert, key) = (
        tls.ca.to_str().unwrap(),
        tls.client_cert.to_str().unwrap(),
        tls.client_key.to_str().unwrap(),
    );
    assert!(cluster.endpoints().starts_with("https://"));
    let a = Agent::start_with(
        "tls",
        &[],
        &cluster,
        &prefix,
        &["--etcd-ca", ca, "--etcd-cert", cert, "--etcd-key", key],
    );
    let port = free_port();
    cluster.put(&format!("{prefix}/rules/over-tls"), &rule(port, 51));
    a.wait("a rule over TLS", Duration::from_secs(5), |x| {
        x.has("over-tls")
    });
    assert_eq!(a.keepalive_on(port), expect(51, 3, 5, 0));
    // Without the client certificate etcd refuses, and says so.
    let r = fleet(&cluster, &prefix, &["--etcd-ca", ca, "rule", "list"]);
    assert_eq!(r.code, 1, "{r:?}");
    let r = fleet(
        &cluster,
        &prefix,
        &[
            "--etcd-ca",
            ca,
            "--etcd-cert",
            cert,
            "--etcd-key",
            key,
            "rule",
            "list",
        ],
    )
    .ok();
    assert!(r.stdout.contains("over-tls"), "{}", r.stdout);
    drop(a);
    drop(cluster);

    // etcd auth: user and password, the password from a file.
    let mut cluster = Cluster::start(1);
    cluster.enable_auth("s3cret-pw");
    let dir = cluster.root.join("auth");
    std::fs::create_dir_all(&dir).unwrap();
    let (good, bad) = (dir.join("good"), dir.join("bad"));
    for (f, pw) in [(&good, "s3cret-pw\n"), (&bad, "wrong\n")] {
        std::fs::write(f, pw).unwrap();
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let user = |f: &Path| -> Vec<String> {
        vec![
            "--etcd-user".into(),
            "root".into(),
            "--etcd-password-file".into(),
            f.to_str().unwrap().into(),
        ]
    };
    let good_args = user(&good);
    let good_args: Vec<&str> = good_args.iter().map(String::as_str).collect();
    let a = Agent::start_with("authed", &[], &cluster, &prefix, &good_args);
    let port = free_port();
    let mut add = good_args.clone();
    add.extend(["rule", "add", "with-auth", "52", "3", "5", "--local-port"]);
    let p = port.to_string();
    add.push(&p);
    fleet(&cluster, &prefix, &add).ok();
    a.wait("a rule with etcd auth", Duration::from_secs(5), |x| {
        x.has("with-auth")
    });
    assert_eq!(a.keepalive_on(port), expect(52, 3, 5, 0));
    let bad_args = user(&bad);
    let mut list: Vec<&str> = bad_args.iter().map(String::as_str).collect();
    list.extend(["rule", "list"]);
    let r = fleet(&cluster, &prefix, &list);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("authentication failed"), "{}", r.stderr);
    // A password file every user can read is refused before anything.
    std::fs::set_permissions(&good, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut list = good_args.clone();
    list.extend(["rule", "list"]);
    let r = fleet(&cluster, &prefix, &list);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("readable by every user"), "{}", r.stderr);
}

#[test]
fn an_agent_back_after_a_compaction_reads_everything_again() {
    let _ns = NetNs::new();
    let cluster = Cluster::start(3);
    let prefix = prefix();
    let mut a = Agent::start("c", &[], &cluster, &prefix);
    let (p1, p2) = (free_port(), free_port());
    cluster.put(&format!("{prefix}/rules/old"), &rule(p1, 61));
    a.wait("the first rule", SECOND, |x| x.has("old"));
    a.stop();
    // While it is away: a rule deleted, another added, and the history
    // compacted past the revision the agent saw last.
    cluster.del(&format!("{prefix}/rules/old"));
    cluster.put(&format!("{prefix}/rules/new"), &rule(p2, 62));
    cluster.compact();
    a.spawn();
    a.wait(
        "the rules as etcd has them now",
        Duration::from_secs(10),
        |x| x.fleet_rules() == [("new".to_owned(), 62)],
    );
    assert!(
        a.log()
            .contains("was compacted away; reading every rule again"),
        "{}",
        a.log()
    );
    assert_eq!(a.keepalive_on(p2), expect(62, 3, 5, 0));
    assert_eq!(a.keepalive_on(p1), KERNEL_DEFAULT);
    // A node taken out of service for good is forgotten.
    a.kill9();
    let known = format!("{prefix}/known/c");
    assert!(cluster.get(&known).is_some());
    let r = fleet(&cluster, &prefix, &["forget", "c"]).ok();
    assert!(r.stdout.contains("forgot node c"), "{}", r.stdout);
    assert!(cluster.get(&known).is_none());
    let r = fleet(&cluster, &prefix, &["forget", "c"]);
    assert_eq!(r.code, 1, "{r:?}");
}

/// A fleet rule of its own match: local port 5060 from one address.
fn peer_rule(i: usize) -> String {
    format!(
        r#"{{"local_port":5060,"remote":"10.9.{}.{}","idle":30,"count":3,"interval":5}}"#,
        i >> 8,
        i & 255
    )
}

#[test]
fn thousands_of_rules_fill_the_table_in_order_and_go_in_one_delete() {
    let _ns = NetNs::new();
    // Under TCG every bound is six times longer (the bars are for real
    // hardware).
    let slow = if under_tcg() { 6 } else { 1 };
    let cluster = Cluster::start(3);
    let prefix = prefix();
    let a = Agent::start("big", &[], &cluster, &prefix);
    let table = keepalive_common::RULES_MAX_ENTRIES as usize;
    let n = table + 104;
    let mut kvs: Vec<(String, String)> = (0..n)
        .map(|i| (format!("{prefix}/rules/s{i:05}"), peer_rule(i)))
        .collect();
    // Less specific than all of them (a port, no address): left out first.
    let broad = free_port();
    kvs.push((format!("{prefix}/rules/broad"), rule(broad, 71)));
    // Five values of 900 kB (malformed): 4.5 MB in all, past a single
    // read's 4 MiB.
    for i in 0..5 {
        kvs.push((format!("{prefix}/rules/huge{i}"), "x".repeat(900_000)));
    }
    let put = Instant::now();
    cluster.put_many(&kvs);
    let status = |c: &Cluster| -> Value {
        serde_json::from_str(&c.get(&format!("{prefix}/nodes/big")).unwrap_or_default())
            .unwrap_or_default()
    };
    wait_until(
        "the node reporting a full table",
        Duration::from_secs(10 * slow),
        || {
            let s = status(&cluster);
            s["fleet_rules"] == table
                && s["left_out"].as_array().is_some_and(|v| v.len() == 105)
                && s["invalid"].as_array().is_some_and(|v| v.len() == 5)
        },
    );
    eprintln!(
        "{} puts applied and reported within {:?}",
        kvs.len(),
        put.elapsed()
    );
    // The kernel has the first 4,096 by name of the most specific rules.
    let mut names: Vec<String> = a.fleet_rules().into_iter().map(|(n, _)| n).collect();
    names.sort();
    let want: Vec<String> = (0..table).map(|i| format!("s{i:05}")).collect();
    assert_eq!(names, want);
    let s = status(&cluster);
    assert_eq!(s["left_out"][0], "s04096", "{}", s["left_out"]);
    assert_eq!(s["left_out"][104], "broad");
    assert_eq!(s["invalid"].as_array().map(Vec::len), Some(5));
    assert_eq!(s["rule_table"], table);
    assert_eq!(a.keepalive_on(broad), KERNEL_DEFAULT);
    // `info` shows the capacity; `explain` says what is left out, as the
    // kernel has it; `rule list` reads past 4 MiB.
    let info: Value = serde_json::from_str(&a.tcpka.run(&["info", "--json"]).ok().stdout).unwrap();
    assert_eq!(info["rule_capacity"], table);
    assert_eq!(info["fleet_rules"], table);
    let e = fleet(&cluster, &prefix, &["explain", "big", "--json"]).ok();
    let e: Value = serde_json::from_str(&e.stdout).unwrap();
    let verdict = |name: &str| {
        e["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["rule"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(verdict("s00000")["applied"], true);
    assert_eq!(verdict("broad")["applied"], false);
    assert_eq!(verdict("broad")["left_out"], true);
    assert!(verdict("broad")["clash"].as_str().unwrap().contains("full"));
    let list = fleet(&cluster, &prefix, &["rule", "list", "--json"]).ok();
    let list: Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), kvs.len());
    // A change that fits is never blocked by those that do not: a delete
    // makes room for the next in line.
    fleet(&cluster, &prefix, &["rule", "del", "s00000"]).ok();
    a.wait("the next rule in line", SECOND * 2 * slow as u32, |x| {
        let names: Vec<String> = x.fleet_rules().into_iter().map(|(n, _)| n).collect();
        names.contains(&"s04096".to_owned()) && !names.contains(&"s00000".to_owned())
    });
    // A new agent with no cache reads all of it (in pages) and applies the
    // same subset.
    let b = Agent::start("late", &[], &cluster, &prefix);
    b.wait(
        "every rule read at start",
        Duration::from_secs(20 * slow),
        |x| x.fleet_rules().len() == table,
    );
    // One delete of everything: the kernels empty within 5 s, and the
    // nodes stay up throughout.
    let nodes = |c: &Cluster| {
        ["big", "late"]
            .iter()
            .filter(|n| c.get(&format!("{prefix}/nodes/{n}")).is_some())
            .count()
    };
    cluster.del_prefix(&format!("{prefix}/rules/"));
    let deleted = Instant::now();
    for x in [&a, &b] {
        x.wait(
            "every fleet rule gone",
            Duration::from_secs(5 * slow),
            |x| x.fleet_rules().is_empty(),
        );
    }
    eprintln!(
        "one delete of {} rules applied within {:?}",
        kvs.len(),
        deleted.elapsed()
    );
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(12) {
        assert_eq!(nodes(&cluster), 2, "a node's status went away");
        std::thread::sleep(Duration::from_millis(500));
    }
    for x in [&a, &b] {
        assert!(!x.log().contains("lease"), "{}", x.log());
    }
}
