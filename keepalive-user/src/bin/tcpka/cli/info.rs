//! `tcpka info`: whether tcpka is loaded, where, how, and its kernel-side
//! counters.
use tcpka::{enforcer::Enforcer, loader, paths::PinLayout, Error};

use super::{args::JsonArg, output::print_json};

pub(crate) fn info(layout: PinLayout, a: JsonArg) -> Result<(), Error> {
    let installation = loader::installed(&layout)?;
    let Some(installation) = installation else {
        if a.json {
            print_json(&serde_json::json!({ "loaded": false }));
        }
        return Err(Error::NotLoaded {
            pin_dir: layout.dir().into(),
        });
    };
    let enforcer = Enforcer::new(layout);
    let all_rules = enforcer.rules()?;
    let rules = all_rules.len();
    let fleet_rules = all_rules
        .iter()
        .filter(|r| {
            r.name
                .as_deref()
                .is_some_and(|n| n.starts_with(tcpka::config::FLEET_PREFIX))
        })
        .count();
    let managed = enforcer.managed()?.len();
    let counters = enforcer.counters()?;
    let layout = enforcer.layout();
    let holders = tcpka::holders::total(layout)?;
    let holder_cap = tcpka::pinned::capacity(layout, keepalive_common::maps::HOLDERS)?;
    let rule_cap = tcpka::pinned::capacity(layout, keepalive_common::maps::RULES)?;
    let conn_cap = tcpka::pinned::capacity(layout, keepalive_common::maps::CONNS)?;
    let index = tcpka::index::state(layout)?;
    let index_ports = tcpka::ports::read_index(layout)?;
    let rule_events = tcpka::ports::flag(layout, keepalive_common::ports::FLAG_RULE_EVENTS)?;
    let trace = tcpka::ports::flag(layout, keepalive_common::ports::FLAG_TRACE)?;
    let aside = enforcer.set_aside()?;
    if a.json {
        print_json(&serde_json::json!({
            "loaded": true,
            "installation": installation,
            "rules": rules,
            "rule_capacity": rule_cap,
            "fleet_rules": fleet_rules,
            "managed_connections": managed,
            "connection_capacity": conn_cap,
            "holders": { "count": holders, "capacity": holder_cap },
            "index": index,
            "index_mode": installation.index,
            "index_mode_reason": loader::index_reason(installation.index),
            "index_ports": index_ports.to_string(),
            "rule_events": rule_events,
            "trace": trace,
            "counters": counters,
            "hooks": loader::hooks(layout),
            "set_aside": aside,
        }));
    } else {
        tcpka::outln!("loaded: cgroup {}", installation.cgroup.display());
        match installation.holders {
            loader::HolderMode::Scan => tcpka::outln!(
                "holders: found on demand (a search of every process's descriptors when a command meets an unknown socket; no cost to other processes)"
            ),
            loader::HolderMode::Syscalls => tcpka::outln!(
                "holders: syscall tracepoints accept/accept4/connect (commands take the direct path at once; every syscall on the host takes the slow path)"
            ),
        }
        let why = loader::index_reason(installation.index);
        match installation.index {
            loader::IndexMode::Ports => tcpka::outln!(
                "index mode: ports {index_ports}, {why} (sock_ops indexes the cgroup's connections on these ports and watches them, and those a --tracked rule matched, until they close; other connections cost five array reads, and commands for them walk the socket table)"
            ),
            loader::IndexMode::Host => tcpka::outln!(
                "index mode: host, {why} (the inet_sock_set_state tracepoint indexes every connection on the host; every connection setup on the host pays for it)"
            ),
        }
        tcpka::outln!(
            "rule events: {}",
            if rule_events {
                "on (applied and closed, for each connection a rule matches)"
            } else {
                "timeouts, resets and aborts only (load with --rule-events for applied and closed too)"
            }
        );
        if trace {
            tcpka::outln!(
                "trace: on (a `tcpka trace` reads the programs' decisions; `tcpka trace --stop` if none runs)"
            );
        }
        if !installation.seeded {
            tcpka::outln!(
                "load: INTERRUPTED: existing connections are not indexed yet; the next command (or `tcpka load`) completes it"
            );
        }
        if installation.attached {
            tcpka::outln!("attached: yes");
        } else {
            tcpka::outln!(
                "attached: NO: the cgroup was removed (a service restart?); new connections get no rules until `tcpka load` (or a running `tcpka serve`) attaches again"
            );
        }
        tcpka::outln!("pins: {}", installation.pin_dir.display());
        tcpka::outln!("rules: {rules} of {rule_cap} ({fleet_rules} from the fleet)");
        tcpka::outln!("managed connections: {managed} of {conn_cap}");
        tcpka::outln!("holders: {holders} of {holder_cap}");
        if index.failures > 0 {
            tcpka::outln!(
                "index: INCOMPLETE: full, {} connections not indexed ({} of {} entries); every peer lookup walks the socket table",
                index.failures,
                index.entries,
                index.capacity
            );
        } else if index.overflowed_peers > 0 {
            tcpka::outln!(
                "index: INCOMPLETE: {} peers have more connections than their slots; lookups of those peers walk the socket table ({} of {} entries)",
                index.overflowed_peers,
                index.entries,
                index.capacity
            );
        } else {
            tcpka::outln!(
                "index: complete ({} of {} entries)",
                index.entries,
                index.capacity
            );
        }
        tcpka::outln!("applied by rule: {}", counters.applied_by_rule);
        tcpka::outln!("setsockopt errors: {}", counters.setsockopt_errors);
        tcpka::outln!("connection map full: {}", counters.conns_map_full);
        for a in &aside {
            tcpka::outln!(
                "set aside: an interrupted holder change on cookie {} ({:?}) could not be finished: {}; the connection keeps its keepalive until it closes",
                a.entry.cookie,
                a.entry.step,
                tcpka::logs::escape_controls(&a.why)
            );
        }
        if counters.close_watch_errors > 0 {
            tcpka::outln!(
                "close watch errors: {} (connections whose close is not reported)",
                counters.close_watch_errors
            );
        }
        tcpka::outln!(
            "events dropped (applied/closed): {}",
            counters.events_dropped
        );
        tcpka::outln!(
            "events dropped (timeout/reset/aborted): {}",
            counters.alerts_dropped
        );
    }
    Ok(())
}
