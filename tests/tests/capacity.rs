//! When something cannot be done, it is said and nothing blocks: a full
//! connection map (the connections it cannot hold are left as they were,
//! and counted), an interrupted holder change that cannot be finished (set
//! aside, shown, and no other command waits for it).
use std::time::Duration;

use tcpka_tests::*;

fn info(t: &Tcpka) -> serde_json::Value {
    serde_json::from_str(&t.run(&["info", "--json"]).ok().stdout).unwrap()
}

#[test]
fn a_full_connection_map_leaves_connections_as_they_were_and_says_so() {
    // The smallest map tcpka takes, and four connections more than it
    // holds (both ends of each are ours: raise the descriptor limit).
    const CAP: usize = 1024;
    raise_fd_limit(4 * CAP + 256);
    let e = Env::outside_with(&["--max-connections", &CAP.to_string()]);
    let addr = format!("127.0.0.1:{}", free_port());
    let _s = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
    let l = listen("127.0.0.1:0");
    let pairs: Vec<_> = (0..CAP + 4).map(|_| connect(&l)).collect();
    let peer = l.local_addr().unwrap().to_string();
    let (code, v) = http_json(
        &addr,
        "POST",
        "/v1/enable",
        serde_json::json!({"conn": peer, "idle": 31, "count": 3, "interval": 5}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["changed"], CAP, "{v}");
    assert_eq!(v["failed"], 4, "{v}");
    assert!(
        v["warning"]
            .as_str()
            .unwrap()
            .contains("connection map is full"),
        "{v}"
    );
    let refused: Vec<u64> = v["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["error"].is_string())
        .map(|c| c["cookie"].as_u64().unwrap())
        .collect();
    assert_eq!(refused.len(), 4, "{v}");
    // Those four got nothing; the others got the policy.
    for (c, _) in &pairs {
        let ka = keepalive(c);
        if refused.contains(&cookie(c)) {
            assert!(
                !ka.enabled,
                "a connection tcpka cannot manage got keepalive"
            );
        } else {
            assert_eq!(ka, expect(31, 3, 5, 0));
        }
    }
    // A command for connections none of which fits: 507, nothing changed.
    let l2 = listen("127.0.0.1:0");
    let (c2, _s2) = connect(&l2);
    let (code, v) = http_json(
        &addr,
        "POST",
        "/v1/enable",
        serde_json::json!({"conn": l2.local_addr().unwrap().to_string(), "idle": 31, "count": 3, "interval": 5}),
    );
    assert_eq!(code, 507, "{v}");
    assert_eq!(v["result"], -1, "{v}");
    assert!(!keepalive(&c2).enabled);
    // The CLI says so too, and exits 1.
    let out = e
        .tcpka
        .cmd()
        .args([
            "enable",
            &l2.local_addr().unwrap().to_string(),
            "31",
            "3",
            "5",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connection map is full"),
        "{out:?}"
    );
    // Counted where operators look.
    let full = info(&e.tcpka)["counters"]["conns_map_full"]
        .as_u64()
        .unwrap();
    assert!(full > 5, "{full}");
    let (_, metrics) = http(&addr, "GET", "/metrics", None, None).unwrap();
    assert!(
        metrics.contains("tcpka_kernel_errors_total{kind=\"connection_map_full\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "tcpka_table_entries{{table=\"connections\"}} {CAP}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "tcpka_table_capacity{{table=\"connections\"}} {CAP}"
        )),
        "{metrics}"
    );
}

/// Raises this process's soft limit of open descriptors to at least `n`
/// (root may, up to the hard limit).
fn raise_fd_limit(n: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if (lim.rlim_cur as usize) < n {
            lim.rlim_cur = (n as libc::rlim_t).min(lim.rlim_max).max(n as libc::rlim_t);
            lim.rlim_max = lim.rlim_max.max(lim.rlim_cur);
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim),
                0,
                "raising the descriptor limit to {n}"
            );
        }
    }
}

#[test]
fn a_holder_change_that_cannot_be_finished_is_set_aside_and_blocks_nothing() {
    let e = Env::outside();
    let addr = format!("127.0.0.1:{}", free_port());
    let _s = Serve::start(&e.tcpka, &e.cgroup.path, &addr, &[]);
    let l = listen("127.0.0.1:0");
    let (c, _s2) = connect(&l);
    let ck = cookie(&c);
    e.tcpka
        .run(&["enable", &format!("cookie:{ck}"), "30", "3", "5"])
        .ok();
    // What a `disable --holder --netns NS` killed between its steps leaves,
    // once NS's file is gone: its journal record.
    let gone = NamedNetns::new();
    let path = gone.path();
    drop(gone);
    assert!(!path.exists());
    tcpka::journal::Journal::new(&e.tcpka.layout())
        .begin(&tcpka::journal::Entry {
            step: tcpka::journal::Step::Remove,
            cookie: ck,
            netns: Some(path),
        })
        .unwrap();
    // The next command goes on, and the record is set aside.
    e.tcpka.rule_add(&["--local-port", "1", "60", "5", "5"]);
    let (code, _) = http_json(
        &addr,
        "POST",
        "/v1/enable",
        serde_json::json!({"conn": format!("cookie:{ck}"), "idle": 32, "count": 3, "interval": 5}),
    );
    assert_eq!(code, 200);
    let v = info(&e.tcpka);
    let aside = v["set_aside"].as_array().unwrap();
    assert_eq!(aside.len(), 1, "{v}");
    assert_eq!(aside[0]["entry"]["cookie"], ck, "{v}");
    let (code, health) = http(&addr, "GET", "/healthz", None, None).unwrap();
    assert_eq!(code, 200);
    assert!(health.contains("set aside"), "{health}");
    // Once the connection is gone, so is the record.
    drop((c, _s2));
    wait_until("the record forgotten", Duration::from_secs(10), || {
        info(&e.tcpka)["set_aside"].as_array().unwrap().is_empty()
    });
    let (_, health) = http(&addr, "GET", "/healthz", None, None).unwrap();
    assert_eq!(health, "ok\n");
}
