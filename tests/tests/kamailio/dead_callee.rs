//! Calls whose callee dies: Kamailio ends them when tcpka reports the
//! timeout.
use super::*;

pub(super) const CALLS: usize = 10;

/// Places [`CALLS`] calls through Kamailio to the one callee and waits
/// until they are all up (dialogs confirmed, ACKs at the callee) and, with
/// tcpka, their legs have keepalive and the callee leg is idle: the state
/// in which a dead callee host would leave them hanging.
pub(super) fn calls_up(sip: &Sip, with_tcpka: bool) -> Proc {
    let uac = sip.calls_until_bye(CALLS);
    sip.wait(
        "all calls answered and acknowledged",
        Duration::from_secs(20),
        || sip.active_dialogs() == Some(CALLS as u64) && sip.acks_at_callee() >= CALLS,
    );
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    if with_tcpka {
        sip.wait(
            "keepalive on the callee leg for every call",
            Duration::from_secs(10),
            || {
                sip.connection(&callee)
                    .is_some_and(|c| ka_on(&c) && holders_of(&c).len() == CALLS)
            },
        );
        sip.wait("the callee leg idle", Duration::from_secs(5), || {
            ss_keepalive(&callee)
        });
    }
    uac
}

pub(super) fn ends_calls_when_the_callee_dies(via: Via) {
    let mut sip = Sip::start(via);
    let mut uac = calls_up(&sip, true);

    // A local user forging a timeout for the callee's connection is refused
    // and ends nothing.
    let forged = |token: Option<&str>| {
        let mut v = serde_json::json!({"kind": "timeout",
            "remote": format!("{CALLEE}:{CALLEE_PORT}"), "local": "10.201.2.1:1"});
        if let Some(t) = token {
            v["token"] = t.into();
        }
        v.to_string()
    };
    match via {
        Via::Evapi => {
            use std::io::Write as _;
            let mut c = std::net::TcpStream::connect(EVAPI).unwrap();
            for body in [forged(None), forged(Some("wrong"))] {
                c.write_all(format!("{}:{body},", body.len()).as_bytes())
                    .unwrap();
            }
            sip.wait("both forgeries refused", Duration::from_secs(5), || {
                sip.kamailio_log().matches("no valid token").count() >= 2
            });
        }
        Via::Http | Via::HttpPooled | Via::Exec => {
            // No Authorization, then a wrong bearer token.
            for token in ["", "wrong"] {
                let body = forged(None);
                let (code, reply) = http(
                    "127.0.0.1:8088",
                    "POST",
                    "/tcpka",
                    Some(body.as_bytes()),
                    Some(token),
                )
                .unwrap();
                assert_eq!(code, 403, "{reply}");
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sip.active_dialogs(), Some(CALLS as u64));
    assert!(
        uac.0.try_wait().unwrap().is_none(),
        "a forged event ended calls"
    );

    sh(&["ip", "-n", &sip.callee.name, "link", "set", "kb1", "down"]);
    let down = Instant::now();
    let bound = Duration::from_secs(10);
    // Before the timeout, tcpka's early warning takes the callee out of
    // rotation: a new call is refused (503) at once.
    sip.wait("Kamailio heard at_risk for the callee", bound, || {
        sip.kamailio_log()
            .contains("at risk (probe): out of rotation")
    });
    let heard = down.elapsed();
    let mut refused = sip.call(0);
    let status = refused.0.wait().unwrap();
    assert!(
        !status.success() && sip.kamailio_log().contains("at risk: call"),
        "a call while the callee was at risk: sipp {status}\nkamailio log:\n{}",
        sip.kamailio_log()
    );
    eprintln!("{via:?}: at_risk {heard:?} after the link went down; a new call was refused");
    let status = loop {
        if let Some(s) = uac.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            down.elapsed() < bound,
            "not every caller got a BYE within {bound:?}; dialogs {:?}\nkamailio log:\n{}",
            sip.active_dialogs(),
            sip.kamailio_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = down.elapsed();
    assert!(
        status.success(),
        "a caller's call did not end with Kamailio's BYE: sipp {status}\nkamailio log:\n{}",
        sip.kamailio_log()
    );
    sip.wait("no active dialog", Duration::from_secs(10), || {
        sip.active_dialogs() == Some(0)
    });
    let log = sip.kamailio_log();
    let ended = log.matches("tcpka: ended call").count();
    assert_eq!(ended, CALLS, "{log}");
    // Every leg of every ended call let go: a disable for each (the
    // callee's, gone, answered "not found"), and the callers' connections
    // no longer managed (keepalive off, no holders left).
    sip.wait(
        "a disable for both legs of every ended call",
        Duration::from_secs(10),
        || sip.commands("disable") >= 2 * CALLS as u64,
    );
    sip.wait(
        "keepalive released on the callers' legs",
        Duration::from_secs(10),
        || {
            let r = sip.e.tcpka.run(&["status", "--json"]);
            let managed: Vec<serde_json::Value> =
                serde_json::from_str(&r.stdout).unwrap_or_default();
            !managed.iter().any(|c| {
                c["remote"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&format!("{CALLER}:")))
            })
        },
    );
    eprintln!(
        "{via:?}: link down -> last of {CALLS} callers got its BYE: {took:?} \
         (keepalive {}/{}/{}, user timeout {KA_USER_TIMEOUT_MS} ms)",
        KA.0, KA.1, KA.2
    );

    // The callee's host back: a new call goes through.
    sh(&["ip", "-n", &sip.callee.name, "link", "set", "kb1", "up"]);
    sip.restart_callee();
    let mut again = sip.call(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = again.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "a new call after the link came back hung\nkamailio log:\n{}\ncallee's messages:\n{}",
            sip.kamailio_log(),
            std::fs::read_to_string(sip.dir.join("uas_messages.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "a new call after the link came back: sipp {status}\nkamailio log:\n{}",
        sip.kamailio_log()
    );
}
