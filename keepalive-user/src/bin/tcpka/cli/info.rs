//! `tcpka info`: whether tcpka is loaded, where, how, and its kernel-side
//! counters.
use tcpka::{enforcer::Enforcer, loader, paths::PinLayout, Error};

use super::{args::JsonArg, output::print_json};

pub(crate) fn info(layout: PinLayout, a: JsonArg) -> Result<(), Error> {
    let installation = loader::installed(&layout)?;
    let Some(installation) = installation else {
        if a.json {
            print_json(&NotLoaded { loaded: false });
        }
        return Err(Error::NotLoaded {
            pin_dir: layout.dir().into(),
        });
    };
    let info = gather(layout, installation)?;
    if a.json {
        // Through a `Value`, whose objects keep their keys sorted: the keys
        // come out in the order they always have.
        print_json(&serde_json::to_value(&info).expect("serialising plain data"));
    } else {
        print_text(&info);
    }
    Ok(())
}

/// `tcpka info --json` when nothing is loaded.
#[derive(serde::Serialize)]
struct NotLoaded {
    loaded: bool,
}

/// What `tcpka info` reports of a loaded installation: its fields are the
/// keys of `tcpka info --json`, and the text output is printed from it.
#[derive(serde::Serialize)]
struct Info {
    /// Always true (false is [`NotLoaded`]).
    loaded: bool,
    installation: loader::Installation,
    rules: usize,
    rule_capacity: u32,
    /// Of `rules`, those the fleet agent installed.
    fleet_rules: usize,
    managed_connections: usize,
    connection_capacity: u32,
    holders: Holders,
    index: tcpka::index::IndexState,
    index_mode: loader::IndexMode,
    index_mode_reason: &'static str,
    index_ports: String,
    rule_events: bool,
    trace: bool,
    counters: tcpka::enforcer::Counters,
    hooks: Vec<loader::Hook>,
    set_aside: Vec<tcpka::journal::Aside>,
}

/// Socket holders recorded, and room for them.
#[derive(serde::Serialize)]
struct Holders {
    count: usize,
    capacity: u32,
}

/// Reads everything `info` reports from the pinned maps and links. Reads
/// only: on failure nothing has been printed.
fn gather(layout: PinLayout, installation: loader::Installation) -> Result<Info, Error> {
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
    Ok(Info {
        loaded: true,
        index_mode: installation.index,
        index_mode_reason: loader::index_reason(installation.index),
        installation,
        rules,
        rule_capacity: rule_cap,
        fleet_rules,
        managed_connections: managed,
        connection_capacity: conn_cap,
        holders: Holders {
            count: holders,
            capacity: holder_cap,
        },
        index,
        index_ports: index_ports.to_string(),
        rule_events,
        trace,
        counters,
        hooks: loader::hooks(layout),
        set_aside: aside,
    })
}

/// Prints `info` as text, one line per fact: how it is loaded, then its
/// tables and counters.
fn print_text(i: &Info) {
    print_setup(i);
    print_figures(i);
}

/// The text lines of how the installation is loaded: its cgroup, holder
/// and index modes, events, trace, and whether it is complete and attached.
fn print_setup(i: &Info) {
    tcpka::outln!("loaded: cgroup {}", i.installation.cgroup.display());
    match i.installation.holders {
        loader::HolderMode::Scan => tcpka::outln!(
            "holders: found on demand (a search of every process's descriptors when a command meets an unknown socket; no cost to other processes)"
        ),
        loader::HolderMode::Syscalls => tcpka::outln!(
            "holders: syscall tracepoints accept/accept4/connect (commands take the direct path at once; every syscall on the host takes the slow path)"
        ),
    }
    let why = i.index_mode_reason;
    let index_ports = &i.index_ports;
    match i.installation.index {
        loader::IndexMode::Ports => tcpka::outln!(
            "index mode: ports {index_ports}, {why} (sock_ops indexes the cgroup's connections on these ports and watches them, and those a --tracked rule matched, until they close; other connections cost five array reads, and commands for them walk the socket table)"
        ),
        loader::IndexMode::Host => tcpka::outln!(
            "index mode: host, {why} (the inet_sock_set_state tracepoint indexes every connection on the host; every connection setup on the host pays for it)"
        ),
    }
    tcpka::outln!(
        "rule events: {}",
        if i.rule_events {
            "on (applied and closed, for each connection a rule matches)"
        } else {
            "timeouts, resets and aborts only (load with --rule-events for applied and closed too)"
        }
    );
    if i.trace {
        tcpka::outln!(
            "trace: on (a `tcpka trace` reads the programs' decisions; `tcpka trace --stop` if none runs)"
        );
    }
    if !i.installation.seeded {
        tcpka::outln!(
            "load: INTERRUPTED: existing connections are not indexed yet; the next command (or `tcpka load`) completes it"
        );
    }
    if i.installation.attached {
        tcpka::outln!("attached: yes");
    } else {
        tcpka::outln!(
            "attached: NO: the cgroup was removed (a service restart?); new connections get no rules until `tcpka load` (or a running `tcpka serve`) attaches again"
        );
    }
}

/// The text lines of the pins, how full each table is, and the kernel's
/// counters.
fn print_figures(i: &Info) {
    tcpka::outln!("pins: {}", i.installation.pin_dir.display());
    tcpka::outln!(
        "rules: {} of {} ({} from the fleet)",
        i.rules,
        i.rule_capacity,
        i.fleet_rules
    );
    tcpka::outln!(
        "managed connections: {} of {}",
        i.managed_connections,
        i.connection_capacity
    );
    tcpka::outln!("holders: {} of {}", i.holders.count, i.holders.capacity);
    if i.index.failures > 0 {
        tcpka::outln!(
            "index: INCOMPLETE: full, {} connections not indexed ({} of {} entries); every peer lookup walks the socket table",
            i.index.failures,
            i.index.entries,
            i.index.capacity
        );
    } else if i.index.overflowed_peers > 0 {
        tcpka::outln!(
            "index: INCOMPLETE: {} peers have more connections than their slots; lookups of those peers walk the socket table ({} of {} entries)",
            i.index.overflowed_peers,
            i.index.entries,
            i.index.capacity
        );
    } else {
        tcpka::outln!(
            "index: complete ({} of {} entries)",
            i.index.entries,
            i.index.capacity
        );
    }
    tcpka::outln!("applied by rule: {}", i.counters.applied_by_rule);
    tcpka::outln!("setsockopt errors: {}", i.counters.setsockopt_errors);
    tcpka::outln!("connection map full: {}", i.counters.conns_map_full);
    for a in &i.set_aside {
        tcpka::outln!(
            "set aside: an interrupted holder change on cookie {} ({:?}) could not be finished: {}; the connection keeps its keepalive until it closes",
            a.entry.cookie,
            a.entry.step,
            tcpka::logs::escape_controls(&a.why)
        );
    }
    if i.counters.close_watch_errors > 0 {
        tcpka::outln!(
            "close watch errors: {} (connections whose close is not reported)",
            i.counters.close_watch_errors
        );
    }
    tcpka::outln!(
        "events dropped (applied/closed): {}",
        i.counters.events_dropped
    );
    tcpka::outln!(
        "events dropped (timeout/reset/aborted): {}",
        i.counters.alerts_dropped
    );
}
