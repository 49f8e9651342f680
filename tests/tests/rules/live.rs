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
