//! `tcpka close`: ending live connections from the kernel side.
use super::*;

/// `close --netns` ends a connection of another network namespace, with
/// either way of ending it; the same connection is not reachable without.
#[test]
pub(super) fn close_in_another_network_namespace_with_netns() {
    use std::io::Read as _;
    let e = env();
    // bpf_sock_destroy is Linux 6.5's (before, close_with_bpf_sock_destroy
    // checks the refusal).
    let kfunc = tcpka::sock_destroy::probe().is_ok();
    let methods: &[&str] = if kfunc {
        &["sock_diag", "bpf_sock_destroy"]
    } else {
        &["sock_diag"]
    };
    for &method in methods {
        let named = NamedNetns::new();
        let ns = named.path();
        let (l, mut c, _s) = in_netns(&ns, || {
            set_link_up("lo");
            let l = listen("127.0.0.1:0");
            let (c, s) = connect(&l);
            (l, c, s)
        });
        let peer = l.local_addr().unwrap().to_string();
        let run = |args: &[&str]| {
            Run::from(
                e.tcpka
                    .cmd()
                    .env("TCPKA_CLOSE_WITH", method)
                    .args(args)
                    .output()
                    .unwrap(),
            )
        };
        let r = run(&["close", &peer]);
        assert_eq!(r.code, 1, "{method}: {r:?}");
        let r = run(&["close", &peer, "--netns", ns.to_str().unwrap()]).ok();
        assert_eq!(r.stdout.trim(), "closed 1 connection", "{method}: {r:?}");
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let err = c.read(&mut [0u8; 1]).expect_err("aborted");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ECONNABORTED),
            "{method}: {err}"
        );
    }
}

/// `tcpka close` ends a live, idle connection from the kernel side: the
/// owner's next call fails with ECONNABORTED and the peer gets a reset. A
/// listening socket is refused (exit 2) and an unknown connection is exit 1.
#[test]
pub(super) fn close_ends_a_live_connection_from_the_kernel_side() {
    close_with(None);
}

/// The same with the `bpf_sock_destroy` kfunc from an iter/tcp program,
/// the way a kernel without sock_diag's SOCK_DESTROY is served.
#[test]
pub(super) fn close_with_bpf_sock_destroy() {
    // The kfunc is Linux 6.5's: before, asking for it is refused, saying so.
    if let Err(why) = tcpka::sock_destroy::probe() {
        assert!(why.contains("no bpf_sock_destroy (Linux 6.5+)"), "{why}");
        let e = Env::outside();
        let run = |args: &[&str]| {
            Run::from(
                e.tcpka
                    .cmd()
                    .env("TCPKA_CLOSE_WITH", "bpf_sock_destroy")
                    .args(args)
                    .output()
                    .unwrap(),
            )
        };
        let doctor = run(&["doctor"]).ok().stdout;
        assert!(
            doctor.contains(
                "note    close: bpf_sock_destroy: the kernel has no bpf_sock_destroy (Linux 6.5+)"
            ),
            "{doctor}"
        );
        let l = listen("127.0.0.1:0");
        let (c, _s) = connect(&l);
        let r = run(&["close", &l.local_addr().unwrap().to_string()]);
        assert_eq!(r.code, 1, "{r:?}");
        assert!(
            r.stderr.contains("this host cannot end connections")
                && r.stderr.contains("Linux 6.5+"),
            "{r:?}"
        );
        assert!(c.peer_addr().is_ok(), "the connection is still open");
        return;
    }
    close_with(Some("bpf_sock_destroy"));
}

pub(super) fn close_with(method: Option<&str>) {
    use std::io::Read as _;
    let e = Env::outside();
    let run = |args: &[&str]| {
        let mut c = e.tcpka.cmd();
        if let Some(m) = method {
            c.env("TCPKA_CLOSE_WITH", m);
        }
        Run::from(c.args(args).output().unwrap())
    };
    let doctor = run(&["doctor"]).ok().stdout;
    let want = match method {
        Some(_) => "bpf_sock_destroy (iter/tcp)",
        None => "sock_diag SOCK_DESTROY",
    };
    assert!(
        doctor.contains(&format!("close: tcpka close ends connections with {want}")),
        "{doctor}"
    );
    let l = listen("127.0.0.1:0");
    let listener = l.local_addr().unwrap().to_string();
    let (mut c, mut s) = connect(&l);

    let r = run(&["close", &format!("cookie:{}", cookie(&l))]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("listening socket"), "{r:?}");

    // The client's peer is the listener's address: that one connection.
    let r = run(&["close", &listener]).ok();
    assert_eq!(r.stdout.trim(), "closed 1 connection", "{r:?}");
    let mut b = [0u8; 1];
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let err = c.read(&mut b).expect_err("the owner sees the abort");
    assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let err = s.read(&mut b).expect_err("the peer gets a reset");
    assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET), "{err}");

    let r = run(&["close", &listener]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no such connection"), "{r:?}");
}
