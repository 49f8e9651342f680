//! How results are printed: tables for people, `--json` for scripts, and
//! the man pages.
use std::path::Path;

use tcpka::{enforcer::ConnStatus, Error};

use super::args::Cli;

/// tcpka.8, then tcpka-COMMAND.8 for each command and tcpka-rule-add.8
/// and so on for their own commands, from the clap definitions.
pub(crate) fn write_man_pages(dir: &Path) -> Result<usize, Error> {
    fn write(cmd: &clap::Command, name: &str, dir: &Path, n: &mut usize) -> Result<(), Error> {
        let cmd = cmd
            .clone()
            .name(name.to_owned())
            .bin_name(name.replace('-', " "));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .section("8")
            .render(&mut out)
            .map_err(|e| Error::io(format!("rendering the man page of {name}"), e))?;
        let path = dir.join(format!("{name}.8"));
        std::fs::write(&path, out)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        *n += 1;
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            write(sub, &format!("{name}-{}", sub.get_name()), dir, n)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let mut n = 0;
    write(
        &<Cli as clap::CommandFactory>::command(),
        "tcpka",
        dir,
        &mut n,
    )?;
    Ok(n)
}

pub(crate) fn print_explanation(conn: Option<&ConnStatus>, e: &tcpka::rule::Explanation) {
    match conn {
        None => tcpka::outln!("new connection {} -> {}", e.local, e.remote),
        Some(c) => {
            let k = &c.keepalive;
            let now = if k.enabled {
                format!(
                    "keepalive on (idle {}, count {}, interval {})",
                    k.idle, k.count, k.interval
                )
            } else {
                "keepalive off".to_owned()
            };
            let from = match (c.source, c.rule) {
                (Some(src), Some(id)) => format!(", from {src} {id}"),
                (Some(src), None) => format!(", from {src}"),
                _ => String::new(),
            };
            tcpka::outln!(
                "connection {} -> {} (cookie:{:#x}): {now}{from}; a new one with these ends:",
                c.local,
                c.remote,
                c.cookie
            );
        }
    }
    for v in &e.rules {
        let verdict = match &v.why_not {
            None => "matches".to_owned(),
            Some(why) => format!("no: {why}"),
        };
        tcpka::outln!("  rule {:<4} {:<40} {verdict}", v.id, v.matcher);
    }
    match &e.winner {
        Some(r) => tcpka::outln!(
            "applies rule {} (idle {}, count {}, interval {}{}{}): {}",
            r.id,
            r.idle,
            r.count,
            r.interval,
            r.user_timeout_ms
                .map(|ms| format!(", user timeout {ms} ms"))
                .unwrap_or_default(),
            if r.tracked { ", tracked" } else { "" },
            e.reason
        ),
        None => tcpka::outln!("applies nothing: {}", e.reason),
    }
}

pub(crate) fn print_json(value: &impl serde::Serialize) {
    tcpka::outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialising plain data")
    );
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))
}

pub(crate) fn report_changed(changed: &[ConnStatus], what: &str, policy: &str, json: bool) {
    if !json && changed.is_empty() {
        return;
    }
    if json {
        print_json(&changed);
        return;
    }
    let n = changed.len();
    let plural = if n == 1 { "connection" } else { "connections" };
    if policy.is_empty() {
        tcpka::outln!("{what} on {n} {plural}");
    } else {
        tcpka::outln!("{what} on {n} {plural} ({policy})");
    }
    if changed.iter().any(|c| c.apply_failed) {
        tcpka::errln!("warning: the kernel refused some values; see `tcpka status`");
    }
}

pub(crate) fn print_status(conns: &[ConnStatus]) {
    tcpka::outln!(
        "{:<18}  {:<46}  {:<46}  {:<12}  {:<34}  SOURCE",
        "COOKIE",
        "LOCAL",
        "REMOTE",
        "STATE",
        "KEEPALIVE"
    );
    for c in conns {
        let k = &c.keepalive;
        let mut ka = if k.enabled {
            format!(
                "on idle={}s count={} intvl={}s",
                k.idle, k.count, k.interval
            )
        } else {
            "off".to_owned()
        };
        if let Some(ms) = k.user_timeout_ms {
            ka.push_str(&format!(" user_timeout={ms}ms"));
        }
        let source = match (c.source, c.rule) {
            (_, Some(id)) => format!("rule {id}"),
            (Some(s), None) => s.to_owned(),
            (None, None) => "-".to_owned(),
        };
        tcpka::outln!(
            "{:<18}  {:<46}  {:<46}  {:<12}  {:<34}  {source}",
            format!("{:#x}", c.cookie),
            c.local,
            c.remote,
            c.state,
            ka
        );
        if let Some(h) = c.holders.as_ref().filter(|h| !h.is_empty()) {
            tcpka::outln!("{:<18}  holders: {}", "", h.join(", "));
        }
        if let Some(l) = &c.liveness {
            tcpka::outln!(
                "{:<18}  last ack {}ms ago, last data sent {}ms ago, probes unanswered {}, retransmits {} (in a row {}), rto {}ms, rtt {:.1}ms",
                "",
                l.last_ack_recv_ms,
                l.last_data_sent_ms,
                l.probes_out,
                l.total_retrans,
                l.retransmits,
                l.rto_us / 1000,
                f64::from(l.rtt_us) / 1000.0
            );
        }
        if k.count_ignored {
            tcpka::outln!(
                "{:<18}  note: TCP_USER_TIMEOUT is set, so the kernel ignores count={} and drops the connection {}ms after data stops being acknowledged",
                "", k.count, k.user_timeout_ms.unwrap_or(0)
            );
        }
    }
}
