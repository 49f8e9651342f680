//! Real Kamailio 5.6 and sipp in network namespaces, driving tcpka with the
//! shipped `examples/kamailio/kamailio.cfg`:
//!
//! ```text
//!  caller ns (sipp uac)  10.201.1.2 ── 10.201.1.1  kamailio ns  10.201.2.1 ── 10.201.2.2  callee ns (sipp uas)
//!                                      (kamailio, tcpka serve)
//! ```
//!
//! Each call: keepalive on both legs from the 200 OK to the INVITE, off
//! at the BYE (or the dialog's timeout); when the callee's host stops answering, the
//! timeout event reaches Kamailio's xhttp route. Call-IDs made to break out
//! of a shell word or a JSON string run nothing and add no field: the
//! config hands tcpka only their MD5, and those calls get keepalive too.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tcpka_tests::*;

mod checks;
mod dead_callee;
mod sip;

use checks::*;
use dead_callee::*;
use sip::*;

const CALLER: &str = "10.201.1.2";
const CALLEE: &str = "10.201.2.2";
const CALLEE_PORT: u16 = 5062;
const KAMAILIO_CALLER_SIDE: &str = "10.201.1.1";
const KA: (u32, u32, u32) = (1, 2, 1); // idle, count, interval
const KA_USER_TIMEOUT_MS: u64 = 4000;
const EVENTS_TOKEN: &str = "tcpka-events-token-fedcba9876543210";

#[test]
fn kamailio_via_http_api_and_dead_callee_timeout_event() {
    let sip = Sip::start(Via::Http);
    call_turns_keepalive_on_and_off(&sip);
    assert!(
        sip.kamailio_log().contains("tcpka enable"),
        "{}",
        sip.kamailio_log()
    );
    assert!(
        sip.kamailio_log().contains("HTTP 200"),
        "{}",
        sip.kamailio_log()
    );
    let (_, metrics) = http(&sip.serve().addr, "GET", "/metrics", None, None).unwrap();
    let lookups: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tcpka_lookups_total"))
        .collect();
    eprintln!("how Kamailio's connections were found: {lookups:?}");
    // Kamailio's tcp_main keeps the descriptors it accepts and connects, so
    // the connection index reaches every one directly.
    assert!(
        lookups.contains(&"tcpka_lookups_total{path=\"walk\"} 0"),
        "{lookups:?}"
    );

    // A long call; then the callee's host stops answering.
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    let _uac = sip.call(60_000);
    sip.wait(
        "keepalive on the callee leg",
        Duration::from_secs(10),
        || sip.connection(&callee).is_some_and(|c| ka_on(&c)),
    );
    // Cut only once the leg is idle, the second call's ACK delivered: with
    // data in flight the kernel retransmits instead of probing, and only
    // TCP_USER_TIMEOUT bounds that (a policy can set it: user_timeout_ms).
    sip.wait(
        "the callee got the second ACK",
        Duration::from_secs(5),
        || sip.acks_at_callee() >= 2,
    );
    sip.wait("the callee leg idle", Duration::from_secs(5), || {
        ss_keepalive(&callee)
    });
    sh(&["ip", "-n", &sip.callee.name, "link", "set", "kb1", "down"]);
    let start = Instant::now();
    let bound = Duration::from_secs(u64::from(KA.0 + KA.1 * KA.2) + 2);
    sip.wait("the timeout event at Kamailio's xhttp route", bound, || {
        sip.kamailio_log().lines().any(|l| {
            l.contains("tcpka event:") && l.contains("\"kind\":\"timeout\"") && l.contains(&callee)
        })
    });
    let took = start.elapsed();
    let line = sip
        .kamailio_log()
        .lines()
        .find(|l| l.contains("tcpka event:") && l.contains("timeout"))
        .unwrap()
        .to_owned();
    eprintln!("timeout event at Kamailio after {took:?} (bound {bound:?}):\n{line}");
    let _ = sip.uas.0.id();
}

#[test]
fn kamailio_via_exec_cli() {
    let sip = Sip::start(Via::Exec);
    call_turns_keepalive_on_and_off(&sip);
    assert!(
        sip.kamailio_log().contains("(exec)"),
        "{}",
        sip.kamailio_log()
    );
    let _ = sip.kamailio.0.id();
}

/// The recommended variant: commands relayed over evapi, applied on the
/// sockets like the others; Call-IDs made to break out of JSON reach tcpka
/// only as their hash.
#[test]
fn kamailio_via_evapi() {
    let sip = Sip::start(Via::Evapi);
    call_turns_keepalive_on_and_off(&sip);
    assert!(
        sip.kamailio_log().contains("(evapi)"),
        "{}",
        sip.kamailio_log()
    );
    hostile_call_ids_run_nothing_and_get_keepalive(&sip, "(evapi)");
}

/// The API over one kept-alive connection: the same commands, and the
/// requests share a connection instead of opening one each.
#[test]
fn kamailio_via_http_kept_alive() {
    let sip = Sip::start(Via::HttpPooled);
    call_turns_keepalive_on_and_off(&sip);
    let log = sip.kamailio_log();
    assert!(
        log.contains("HTTP 200") && !log.contains("HTTP 401"),
        "{log}"
    );
    hostile_call_ids_run_nothing_and_get_keepalive(&sip, "HTTP 200");
    // Kamailio keeps its connection to the API open after its requests
    // (http_client_query closes each one; the test's own requests close
    // too).
    let (_, metrics) = http(&sip.serve().addr, "GET", "/metrics", None, None).unwrap();
    let commands: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tcpka_commands_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let port = sip.serve().addr.rsplit(':').next().unwrap().to_owned();
    let out = Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .unwrap();
    let kept = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(
        commands >= 4.0 && kept >= 1,
        "{commands} commands, {kept} kept connection(s) to the API\n{log}"
    );
}

#[test]
fn kamailio_via_http_api_hostile_call_ids() {
    let sip = Sip::start(Via::Http);
    hostile_call_ids_run_nothing_and_get_keepalive(&sip, "HTTP 200");
    long_call_id_is_one_holder(&sip, Via::Http);
    let _ = (sip.uas.0.id(), sip.kamailio.0.id());
}

#[test]
fn kamailio_via_exec_cli_hostile_call_ids() {
    let sip = Sip::start(Via::Exec);
    hostile_call_ids_run_nothing_and_get_keepalive(&sip, "(exec)");
    long_call_id_is_one_holder(&sip, Via::Exec);
    let _ = (sip.uas.0.id(), sip.kamailio.0.id());
}

/// The loop closed: the callee's host goes dark while 10 calls are up;
/// keepalive finds the dead connection, tcpka's timeout event reaches
/// Kamailio's event route, and Kamailio ends every call on it (BYE to each
/// caller), its dialog count back to 0. A forged event without the token
/// ends nothing. New calls work once the link is back.
#[test]
fn kamailio_ends_calls_when_the_callee_dies() {
    ends_calls_when_the_callee_dies(Via::Http);
}

/// The same loop over evapi: commands relayed, the timeout event sent back
/// over the same connection.
#[test]
fn kamailio_via_evapi_ends_calls_when_the_callee_dies() {
    ends_calls_when_the_callee_dies(Via::Evapi);
}

/// Calls answered while tcpka was away (Kamailio's evapi drops what it
/// relays with no client connected) get their keepalive once it is back.
#[test]
fn kamailio_via_evapi_gives_calls_of_a_gap_their_keepalive() {
    let mut sip = Sip::start(Via::Evapi);
    sip.stop_tcpka();
    let _uac = calls_up(&sip, false);
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    sip.start_tcpka();
    sip.wait(
        "keepalive on the callee leg for every call of the gap",
        Duration::from_secs(10),
        || {
            sip.connection(&callee)
                .is_some_and(|c| ka_on(&c) && holders_of(&c).len() == CALLS)
        },
    );
}

/// Requests the example handles as Kamailio's stock config does: a
/// malformed one gets 400 before anything is kept for it, and a CANCEL is
/// never refused as an unknown method (one for no transaction is dropped).
#[test]
fn the_example_checks_requests_lets_cancel_through_and_names_real_addresses() {
    use std::io::{Read as _, Write as _};
    let sip = Sip::start(Via::Evapi);
    let ask = |req: &str| -> String {
        let mut c = std::net::TcpStream::connect((KAMAILIO_CALLER_SIDE, 5060)).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let head = |method: &str, cseq: &str| {
        format!(
            "{method} sip:callee@{CALLEE}:{CALLEE_PORT};transport=tcp SIP/2.0\r\n\
             Via: SIP/2.0/TCP {CALLER}:5999;branch=z9hG4bK-tcpka-{method}\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:caller@{CALLER}>;tag=1\r\n\
             To: <sip:callee@{CALLEE}>\r\n\
             Call-ID: tcpka-sanity-{method}\r\n\
             CSeq: {cseq}\r\n\
             Contact: <sip:caller@{CALLER}:5999;transport=tcp>\r\n\
             Content-Length: 0\r\n\r\n"
        )
    };
    // The CSeq's method is not the request's: malformed.
    let reply = ask(&head("INVITE", "1 BYE"));
    assert!(reply.starts_with("SIP/2.0 400"), "{reply:?}");
    // A CANCEL for no transaction: dropped, not refused as a method.
    let reply = ask(&head("CANCEL", "1 CANCEL"));
    assert!(!reply.contains(" 405 "), "{reply:?}");
    // A call: what reaches the callee names a real address of Kamailio's
    // in its Record-Route and Via, never 0.0.0.0.
    let mut call = sip.call(0);
    let _ = call.0.wait();
    let seen = std::fs::read_to_string(sip.dir.join("uas_messages.log")).unwrap_or_default();
    assert!(seen.contains("Record-Route:"), "{seen}");
    assert!(!seen.contains("0.0.0.0"), "{seen}");
}

/// The example keeps a quiet call's connections open: Kamailio's own idle
/// timer (120 s by default) would close them under a long call.
#[test]
fn the_example_keeps_idle_connections_for_longer_than_a_call() {
    let sip = Sip::start(Via::Evapi);
    let lifetime: u64 = sip
        .tcp_option("connection_lifetime")
        .and_then(|v| v.parse().ok())
        .expect("kamcmd core.tcp_options: connection_lifetime");
    assert!(lifetime >= 3600, "tcp connection_lifetime {lifetime} s");
}

/// A call's state lives with its dialog, not in a table that expires: a
/// call longer than such an expiry would lose it (its BYE could not
/// release its keepalive, nor a dead connection find the call).
#[test]
fn the_example_keeps_a_calls_state_with_its_dialog() {
    let sip = Sip::start(Via::Evapi);
    let tables = sip.kamcmd(&["htable.listTables"]);
    assert!(tables.contains("calls"), "htable.listTables:\n{tables}");
    assert!(
        tables
            .lines()
            .filter(|l| l.trim().starts_with("expire:"))
            .all(|l| l.trim() == "expire: 0"),
        "a table expires its entries:\n{tables}"
    );
    let mut uac = sip.call(3000);
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    sip.wait(
        "both legs kept in the call's dialog",
        Duration::from_secs(10),
        || {
            let d = sip.kamcmd(&["dlg.list"]);
            d.contains("callerlocal") && d.contains(&callee)
        },
    );
    let status = uac.0.wait().unwrap();
    assert!(status.success(), "sipp uac: {status}");
    sip.wait(
        "the call gone from the list of calls",
        Duration::from_secs(5),
        || !sip.kamcmd(&["htable.dump", "calls"]).contains(CALLER),
    );
}

/// A call whose BYE never comes (both phones lost, say) still releases its
/// keepalive: at the dialog's timeout (DIALOG_TIMEOUT, 3 s here).
#[test]
fn the_example_releases_keepalive_when_a_dialog_times_out() {
    let sip = Sip::start_with(Via::Evapi, &[("DIALOG_TIMEOUT", "3")]);
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    let mut uac = sip.call(30_000);
    sip.wait(
        "keepalive on the callee leg",
        Duration::from_secs(10),
        || sip.connection(&callee).is_some_and(|c| ka_on(&c)),
    );
    sip.wait(
        "keepalive released at the dialog's timeout",
        Duration::from_secs(10),
        || {
            sip.connection(&callee)
                .is_some_and(|c| c["keepalive"]["enabled"] == false)
        },
    );
    assert!(
        uac.0.try_wait().unwrap().is_none(),
        "the call ended before its dialog timed out"
    );
}

/// The contrast: the same calls and the same dead callee without tcpka.
/// Nothing notices: after longer than the bound above every call is still
/// up in Kamailio and no caller got a BYE.
#[test]
fn without_tcpka_calls_to_a_dead_callee_stay_up() {
    let mut sip = Sip::start(Via::Http);
    sip.stop_tcpka();
    let mut uac = calls_up(&sip, false);
    sh(&["ip", "-n", &sip.callee.name, "link", "set", "kb1", "down"]);
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        uac.0.try_wait().unwrap().is_none(),
        "a caller got a BYE without tcpka"
    );
    assert_eq!(sip.active_dialogs(), Some(CALLS as u64));
    eprintln!("without tcpka: {CALLS} calls to a dead callee still up after 12 s");
}

/// Calls up with no keepalive (tcpka's serve is down, so Kamailio's
/// commands fail): phones, each on a connection of its own (sipp `-t tn`),
/// and the callee's trunk, one connection for every call. Rules added
/// then give those live connections keepalive at once, as the kernel's
/// timers show; nothing waits for them to reconnect.
#[test]
fn a_rule_added_while_calls_are_up_reaches_the_trunk_and_the_phones() {
    const PHONES: usize = 4;
    let mut sip = Sip::start(Via::Http);
    sip.stop_tcpka();
    let n = PHONES.to_string();
    let _uac = Proc::spawn(
        Command::new("ip")
            .args(["netns", "exec", &sip.caller.name, "sipp"])
            .arg(format!("{KAMAILIO_CALLER_SIDE}:5060"))
            .arg("-sf")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("sipp/uac_until_bye.xml"))
            .args(["-t", "tn", "-i", CALLER, "-m", &n, "-l", &n, "-r", &n])
            .args(["-s", "callee", "-nostdin", "-timeout", "120s"])
            // A socket per call: sipp's default (50,000) is above the open
            // files limit, which it refuses.
            .args(["-max_socket", "100"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    sip.wait(
        "all calls answered and acknowledged",
        Duration::from_secs(20),
        || sip.active_dialogs() == Some(PHONES as u64) && sip.acks_at_callee() >= PHONES,
    );
    let callee = format!("{CALLEE}:{CALLEE_PORT}");
    // Kamailio's connections to the phones (its end on 5060), and how many
    // hold the policy's values (Kamailio sets keepalive of its own).
    let phones = || -> (usize, usize) {
        let out = Command::new("ss")
            .args([
                "-tnH",
                "state",
                "established",
                "src",
                &format!("{KAMAILIO_CALLER_SIDE}:5060"),
            ])
            .output()
            .unwrap();
        let peers: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with(&format!("{CALLER}:")))
            .map(str::to_owned)
            .collect();
        let on = peers
            .iter()
            .filter(|p| sip.connection(p).is_some_and(|c| ka_on(&c)))
            .count();
        (peers.len(), on)
    };
    assert_eq!(
        phones(),
        (PHONES, 0),
        "a connection per phone, none with the policy"
    );
    assert!(
        !sip.connection(&callee).is_some_and(|c| ka_on(&c)),
        "the trunk has not the policy"
    );

    let (idle, count, interval) = (KA.0.to_string(), KA.1.to_string(), KA.2.to_string());
    let r = sip
        .e
        .tcpka
        .run(&[
            "rule",
            "add",
            "--local-port",
            "5060",
            "--json",
            &idle,
            &count,
            &interval,
        ])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["live"]["changed"].as_u64(), Some(PHONES as u64), "{v}");
    let r = sip
        .e
        .tcpka
        .run(&[
            "rule",
            "add",
            "--remote-port",
            &CALLEE_PORT.to_string(),
            "--remote",
            CALLEE,
            "--json",
            &idle,
            &count,
            &interval,
        ])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["live"]["changed"].as_u64(), Some(1), "the trunk: {v}");
    // At once: the commands returned after the kernel changed them.
    assert_eq!(phones(), (PHONES, PHONES), "every phone's connection");
    assert!(ss_keepalive(&callee), "the trunk's timer");
    let trunk = sip.connection(&callee).expect("the trunk");
    assert!(ka_on(&trunk), "{trunk}");
    assert_eq!(
        sip.active_dialogs(),
        Some(PHONES as u64),
        "the calls stay up"
    );
}
