//! What a call must show: keepalive on its legs while it lasts, and
//! hostile Call-IDs that run nothing and still get keepalive.
use super::*;

pub(super) fn ka_on(c: &serde_json::Value) -> bool {
    c["keepalive"]["enabled"] == true
        && c["keepalive"]["idle"].as_u64() == Some(KA.0.into())
        && c["keepalive"]["count"].as_u64() == Some(KA.1.into())
        && c["keepalive"]["interval"].as_u64() == Some(KA.2.into())
}

/// Kernel timers, independent of tcpka: `ss -tno` shows a keepalive timer.
pub(super) fn ss_keepalive(peer: &str) -> bool {
    let out = Command::new("ss")
        .args(["-tnoH", "dst", peer])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("timer:(keepalive")
}

pub(super) fn call_turns_keepalive_on_and_off(sip: &Sip) {
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    let mut uac = sip.call(2500);
    // During the call: both legs have the configured keepalive.
    sip.wait(
        "keepalive on both legs during the call",
        Duration::from_secs(10),
        || {
            let conns = sip.connections();
            let caller_leg = conns.iter().any(|c| {
                c["remote"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(&format!("{CALLER}:"))
                    && ka_on(c)
            });
            let callee_leg = conns
                .iter()
                .any(|c| c["remote"] == callee.as_str() && ka_on(c));
            caller_leg && callee_leg
        },
    );
    // While data is unacknowledged the kernel runs the retransmit timer
    // instead; the keepalive timer shows once the leg is idle.
    sip.wait(
        "ss shows the keepalive timer on the callee leg",
        Duration::from_secs(2),
        || ss_keepalive(&callee),
    );
    let status = uac.0.wait().unwrap();
    assert!(
        status.success(),
        "sipp uac: {status}\nkamailio log:\n{}",
        sip.kamailio_log()
    );
    // After the BYE: keepalive off on the callee's connection (Kamailio keeps
    // it open for the next call) and on the caller's, if still open.
    sip.wait(
        "keepalive off after the BYE",
        Duration::from_secs(5),
        || {
            sip.connection(&callee)
                .is_some_and(|c| c["keepalive"]["enabled"] == false)
                && sip.connections().iter().all(|c| {
                    !c["remote"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with(&format!("{CALLER}:"))
                })
        },
    );
    assert!(!ss_keepalive(&callee));
}

/// A file that hostile Call-IDs try to create; removed on drop.
pub(super) struct Canary(pub(super) PathBuf);

impl Canary {
    pub(super) fn new() -> Self {
        let path = Path::new("/tmp").join(format!("{}-canary", unique("tcpka")));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Call-IDs that break out of a '...' shell word (through a quote and a
/// backtick, `$(...)`, `;`) or out of a JSON string (`"`, `\`), one of
/// them over 200 bytes. `${IFS}` stands for a space, which a Call-ID has
/// none of.
pub(super) fn hostile_call_ids(canary: &Path) -> Vec<String> {
    let touch = format!("touch${{IFS}}{}", canary.display());
    vec![
        format!("q1'`{touch}`'@x"),
        format!("q2'$({touch})'@x"),
        r#"j","user_timeout_ms":1,"netns":"/proc/self/ns/net"#.to_owned(),
        format!("s';{touch};'\\\"@x"),
        format!("long-{}'`{touch}`'\\q\"$({touch})\"@x", "x".repeat(220)),
    ]
}

/// Lower-case hex MD5, as Kamailio's `{s.md5}` gives it.
pub(super) fn md5_hex(s: &str) -> String {
    use std::io::Write as _;
    let mut p = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    p.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..32].to_owned()
}

pub(super) fn holders_of(c: &serde_json::Value) -> Vec<&str> {
    c["holders"]
        .as_array()
        .map(|a| a.iter().filter_map(|h| h.as_str()).collect())
        .unwrap_or_default()
}

/// Concurrent calls with hostile Call-IDs: nothing runs, no policy field
/// is added, and every call gets keepalive on both legs, held by the MD5
/// of its Call-ID, until its BYE.
pub(super) fn hostile_call_ids_run_nothing_and_get_keepalive(sip: &Sip, via: &str) {
    let canary = Canary::new();
    let ids = hostile_call_ids(&canary.0);
    assert!(ids.iter().any(|id| id.len() > 200));
    let hashes: Vec<String> = ids.iter().map(|id| md5_hex(id)).collect();
    let calls: Vec<Proc> = ids
        .iter()
        .zip(5070..)
        .map(|(id, port)| {
            // sipp's -cid_str is a format (a literal % is %%). Concurrent
            // sipps each need their own local port: left to choose, they
            // race for the same one.
            let cid = id.replace('%', "%%");
            // Held long enough for every enable to land first (under TCG
            // each exec'd command takes about a second).
            sip.call_with(
                if under_tcg() { 20_000 } else { 4000 },
                &["-cid_str".into(), cid, "-p".into(), port.to_string()],
            )
        })
        .collect();
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    let is_caller_leg = |c: &serde_json::Value| {
        c["remote"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{CALLER}:"))
    };
    let within = Duration::from_secs(if under_tcg() { 30 } else { 10 });
    let deadline = Instant::now() + within;
    loop {
        assert!(
            !canary.0.exists(),
            "a Call-ID ran a command: {} exists\nkamailio log:\n{}",
            canary.0.display(),
            sip.kamailio_log()
        );
        let conns = sip.connections();
        for c in &conns {
            assert!(
                c["keepalive"]["user_timeout_ms"].as_u64() != Some(1),
                "a Call-ID set a user timeout: {c}\nkamailio log:\n{}",
                sip.kamailio_log()
            );
        }
        let caller_legs = hashes.iter().all(|h| {
            conns
                .iter()
                .any(|c| is_caller_leg(c) && ka_on(c) && holders_of(c) == [h.as_str()])
        });
        let callee_leg = conns.iter().any(|c| {
            c["remote"] == callee.as_str()
                && ka_on(c)
                && hashes.iter().all(|h| holders_of(c).contains(&h.as_str()))
        });
        if caller_legs && callee_leg {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keepalive on both legs of every call, held by the MD5 of its Call-ID \
             ({hashes:?} for {ids:?}): not within {within:?}\nconnections: {conns:#?}\n\
             kamailio log:\n{}",
            sip.kamailio_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for mut uac in calls {
        let status = uac.0.wait().unwrap();
        assert!(
            status.success(),
            "sipp uac: {status}\nkamailio log:\n{}",
            sip.kamailio_log()
        );
    }
    // The BYEs' disables name the same holders: the shared callee leg lets
    // go once the last call ends.
    sip.wait(
        "keepalive off after the BYEs",
        Duration::from_secs(if under_tcg() { 30 } else { 5 }),
        || {
            sip.connection(&callee)
                .is_some_and(|c| c["keepalive"]["enabled"] == false && holders_of(&c).is_empty())
                && sip.connections().iter().all(|c| !is_caller_leg(c))
        },
    );
    let log = sip.kamailio_log();
    for (id, h) in ids.iter().zip(&hashes) {
        // Operators find the Call-ID next to its holder in the log.
        assert!(
            log.contains(&format!("holder {h} for Call-ID {id}")),
            "{h} for {id} in the kamailio log:\n{log}"
        );
    }
    assert!(log.contains(via), "{log}");
    assert!(
        !canary.0.exists(),
        "a Call-ID ran a command: {} exists\nkamailio log:\n{log}",
        canary.0.display()
    );
}

/// A controller may also pass a Call-ID of any length as the holder (here
/// on Kamailio's connection to the callee): one over 64 bytes is kept
/// hashed, and the disable with the same Call-ID finds it.
pub(super) fn long_call_id_is_one_holder(sip: &Sip, via: Via) {
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    let id = format!("{}@host.example", "a1-.!%*_+`'~()<>:\\\"/[]?{}".repeat(10));
    assert!(id.len() > 200);
    let (idle, count, interval) = KA;
    let run = |body: serde_json::Value, args: &[&str]| {
        if via == Via::Http {
            let path = if args[0] == "enable" {
                "/v1/enable"
            } else {
                "/v1/disable"
            };
            let (code, reply) = http_json(&sip.serve().addr, "POST", path, body);
            assert_eq!(code, 200, "{reply}");
        } else {
            sip.e.tcpka.run(args).ok();
        }
    };
    let (i, c, n) = (idle.to_string(), count.to_string(), interval.to_string());
    run(
        serde_json::json!({"conn": callee, "idle": idle, "count": count,
                           "interval": interval, "holder": id}),
        &["enable", &callee, &i, &c, &n, "--holder", &id],
    );
    let conn = sip.connection(&callee).expect("the callee leg");
    assert!(ka_on(&conn), "{conn}");
    let held = holders_of(&conn);
    assert!(
        held.len() == 1 && held[0].len() == 44 && held[0].starts_with('#'),
        "{conn}"
    );
    run(
        serde_json::json!({"conn": callee, "holder": id}),
        &["disable", &callee, "--holder", &id],
    );
    let conn = sip.connection(&callee).expect("the callee leg");
    assert!(
        conn["keepalive"]["enabled"] == false && holders_of(&conn).is_empty(),
        "{conn}"
    );
}
