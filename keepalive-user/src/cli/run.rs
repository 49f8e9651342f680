//! Dispatch: each subcommand calls the library and prints its result.
use super::*;

/// The API token: from --token-file, --token or TCPKA_TOKEN; for a TCP
/// listener without one, a new token written to /run/tcpka/api-token.
pub(crate) fn serve_token(
    listen: &Listen,
    token: Option<String>,
    file: Option<&Path>,
    group: Option<u32>,
) -> Result<Option<String>, Error> {
    let token = match (token, file) {
        (_, Some(f)) => Some(tcpka::access::read_token_file(f)?),
        (Some(t), None) => {
            tcpka::access::check_token(&t)
                .map_err(|why| Error::Invalid(tcpka::InvalidInput::Listen(why.into())))?;
            Some(t)
        }
        (None, None) => None,
    };
    if token.is_some() || !matches!(listen, Listen::Tcp(_)) {
        return Ok(token);
    }
    let t = tcpka::access::generate_token()?;
    let path = tcpka::access::default_token_file();
    tcpka::access::write_token_file(&path, &t, group)?;
    tcpka::errln!(
        "tcpka: API token in {} (send it as Authorization: Bearer TOKEN)",
        path.display()
    );
    Ok(Some(t))
}

/// The cgroup `load` and `serve` attach to: the one named, else the one an
/// existing installation recorded (so a plain `tcpka load` repairs an
/// installation whose cgroup was recreated), else the cgroup v2 root.
pub(crate) fn target_cgroup(layout: &PinLayout, named: Option<&Path>) -> Result<Cgroup, Error> {
    if named.is_none() {
        if let Ok(Some(i)) = loader::installed(layout) {
            return Cgroup::open(&i.cgroup).map_err(|e| Error::Io {
                what: format!(
                    "tcpka is loaded for cgroup {}, which no longer exists ({e}); start the service again, or `tcpka unload` and load elsewhere",
                    i.cgroup.display()
                ),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
    }
    Ok(Cgroup::open_or_root(named)?)
}

pub(crate) fn run(cli: Cli) -> Result<(), Error> {
    let layout = PinLayout::new(cli.pin_dir);
    match cli.command {
        Command::Load(args) => {
            let cgroup = target_cgroup(&layout, args.cgroup.as_deref())?;
            let outcome = loader::load(&layout, &cgroup, &args.kernel.options())?;
            let i = outcome.installation();
            let loaded = matches!(outcome, LoadOutcome::Loaded(_));
            let reattached = matches!(outcome, LoadOutcome::Reattached(_));
            if args.json {
                print_json(&serde_json::json!({
                    "loaded": loaded,
                    "already_loaded": !loaded,
                    "reattached": reattached,
                    "installation": i,
                }));
            } else if loaded {
                tcpka::outln!(
                    "loaded: attached to cgroup {}, pinned in {}",
                    i.cgroup.display(),
                    i.pin_dir.display()
                );
            } else if reattached {
                tcpka::outln!(
                    "re-attached: the cgroup had been removed; attached to cgroup {} again, pinned in {}",
                    i.cgroup.display(),
                    i.pin_dir.display()
                );
            } else {
                tcpka::outln!(
                    "already loaded: attached to cgroup {}, pinned in {}; nothing changed",
                    i.cgroup.display(),
                    i.pin_dir.display()
                );
            }
        }
        Command::Unload => {
            if loader::unload(&layout)? {
                tcpka::outln!("unloaded: detached and removed {}", layout.dir().display());
            } else {
                tcpka::outln!("not loaded: nothing to do");
            }
        }
        Command::Rule(RuleCommand::Add(a)) => {
            let policy = a.policy.policy()?;
            let m = RuleMatch {
                local_port: a.local_port,
                remote_port: a.remote_port,
                remote: a.remote,
            };
            let rule = Enforcer::new(layout).add_rule(m, policy, a.tracked)?;
            if a.json {
                print_json(&rule);
            } else {
                tcpka::outln!("{}", rule.id);
            }
        }
        Command::Rule(RuleCommand::Del { id }) => {
            Enforcer::new(layout).delete_rule(id)?;
            tcpka::outln!("deleted rule {id}");
        }
        Command::Rule(RuleCommand::Explain(a)) => {
            let enforcer = Enforcer::new(layout);
            let rules = enforcer.rules()?;
            let explanations = match a.ends.as_slice() {
                [local, remote] => {
                    let (local, remote) = (parse_endpoint(local)?, parse_endpoint(remote)?);
                    vec![(None, tcpka::rule::explain(&rules, local, remote))]
                }
                [conn] => {
                    // The live connections CONN names: what a new connection
                    // with their ends would get, beside what they hold.
                    let conn: ConnSpec = conn.parse()?;
                    let found = enforcer.apply(conn, None, Action::Query, a.netns.as_deref())?;
                    let mut out = Vec::new();
                    for c in found {
                        let (l, r) = (parse_endpoint(&c.local)?, parse_endpoint(&c.remote)?);
                        out.push((Some(c), tcpka::rule::explain(&rules, l, r)));
                    }
                    out
                }
                _ => unreachable!("clap takes one or two"),
            };
            if a.json {
                let v: Vec<_> = explanations
                    .iter()
                    .map(|(c, e)| match c {
                        Some(c) => serde_json::json!({ "connection": c, "explanation": e }),
                        None => serde_json::to_value(e).expect("plain data"),
                    })
                    .collect();
                if a.ends.len() == 2 {
                    print_json(&v[0]);
                } else {
                    print_json(&v);
                }
            } else {
                for (c, e) in &explanations {
                    print_explanation(c.as_ref(), e);
                }
            }
        }
        Command::Rule(RuleCommand::List(a)) => {
            let rules = Enforcer::new(layout).rules()?;
            if a.json {
                print_json(&rules);
            } else if rules.is_empty() {
                tcpka::outln!("no rules");
            } else {
                tcpka::outln!(
                    "{:>4}  {:>10}  {:>11}  {:<24}  {:>5}  {:>5}  {:>8}  {:>14}  {:<7}  {}",
                    "ID",
                    "LOCAL_PORT",
                    "REMOTE_PORT",
                    "REMOTE",
                    "IDLE",
                    "COUNT",
                    "INTERVAL",
                    "USER_TIMEOUT",
                    "TRACKED",
                    "NAME"
                );
                let any = |v: Option<String>| v.unwrap_or_else(|| "*".into());
                for r in rules {
                    tcpka::outln!(
                        "{:>4}  {:>10}  {:>11}  {:<24}  {:>5}  {:>5}  {:>8}  {:>14}  {:<7}  {}",
                        r.id,
                        any(r.local_port.map(|p| p.to_string())),
                        any(r.remote_port.map(|p| p.to_string())),
                        any(r.remote.map(|c| c.to_string())),
                        r.idle,
                        r.count,
                        r.interval,
                        r.user_timeout_ms.map_or("-".into(), |ms| format!("{ms}ms")),
                        if r.tracked { "yes" } else { "no" },
                        r.name.as_deref().unwrap_or("- (by hand)"),
                    );
                }
            }
        }
        Command::Enable(a) => {
            let policy = a.policy.policy()?;
            let t = a.target;
            let changed = Enforcer::new(layout).enable(
                t.which.conn,
                t.which.local,
                policy,
                t.holder.as_deref(),
                t.which.netns.as_deref(),
            )?;
            report_changed(&changed, "enabled keepalive", &policy.to_string(), t.json);
        }
        Command::Close(a) => {
            let w = a.which;
            let closed = Enforcer::new(layout).close(w.conn, w.local, w.netns.as_deref())?;
            if a.json {
                print_json(&closed);
            } else {
                let n = closed.len();
                tcpka::outln!("closed {n} connection{}", if n == 1 { "" } else { "s" });
            }
        }
        Command::Disable(t) => {
            let done = Enforcer::new(layout).disable(
                t.which.conn,
                t.which.local,
                t.holder.as_deref(),
                t.which.netns.as_deref(),
            )?;
            if t.json {
                print_json(&done);
            } else {
                report_changed(&done.changed, "disabled keepalive", "", false);
                for k in &done.kept {
                    tcpka::outln!(
                        "kept keepalive on {} -> {}: {} other holder(s) remain",
                        k.connection.local,
                        k.connection.remote,
                        k.holders_remaining
                    );
                }
            }
        }
        Command::Status(a) => {
            let enforcer = Enforcer::new(layout);
            let conns = match a.conn {
                Some(conn) => {
                    let mut found =
                        enforcer.apply(conn, a.local, Action::Query, a.netns.as_deref())?;
                    enforcer.attach_holders(&mut found)?;
                    found
                }
                None => enforcer.status(a.netns.as_deref())?,
            };
            if a.json {
                print_json(&conns);
            } else if conns.is_empty() {
                tcpka::outln!("no managed connections");
            } else {
                print_status(&conns);
            }
        }
        Command::Doctor(a) => {
            let checks = tcpka::doctor::run(&layout);
            let missing = checks
                .iter()
                .any(|c| c.status == tcpka::doctor::Status::Missing);
            if a.json {
                print_json(&serde_json::json!({ "ok": !missing, "checks": checks }));
            } else {
                for c in &checks {
                    tcpka::outln!("{}", c.line());
                }
            }
            if missing {
                return Err(Error::HostMissing {
                    check: checks
                        .iter()
                        .filter(|c| c.status == tcpka::doctor::Status::Missing)
                        .map(|c| c.name)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        Command::Info(a) => {
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
            let rules = enforcer.rules()?.len();
            let managed = enforcer.managed()?.len();
            let counters = enforcer.counters()?;
            let layout = enforcer.layout();
            let holders = tcpka::holders::total(layout)?;
            let holder_cap = tcpka::pinned::capacity(layout, keepalive_common::maps::HOLDERS)?;
            let conn_cap = tcpka::pinned::capacity(layout, keepalive_common::maps::CONNS)?;
            let index = tcpka::index::state(layout)?;
            let index_ports = tcpka::ports::read_index(layout)?;
            let rule_events =
                tcpka::ports::flag(layout, keepalive_common::ports::FLAG_RULE_EVENTS)?;
            let trace = tcpka::ports::flag(layout, keepalive_common::ports::FLAG_TRACE)?;
            if a.json {
                print_json(&serde_json::json!({
                    "loaded": true,
                    "installation": installation,
                    "rules": rules,
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
                tcpka::outln!("rules: {rules}");
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
        }
        Command::Serve(a) => {
            // The configuration file's [serve] settings, under the options
            // given here.
            let file = match &a.config {
                Some(path) => tcpka::config::Config::load(path)?.serve,
                None => ServeSettings::default(),
            };
            let cgroup = target_cgroup(&layout, a.cgroup.as_deref().or(file.cgroup.as_deref()))?;
            let api_group = a
                .api_group
                .as_deref()
                .or(file.api_group.as_deref())
                .map(tcpka::access::group_id)
                .transpose()?;
            let listen = match a.listen.or(file.listen.clone()) {
                Some(l) => l,
                None => server::DEFAULT_LISTEN
                    .parse::<Listen>()
                    .map_err(|e| Error::Invalid(tcpka::InvalidInput::Listen(e)))?,
            };
            // A token from the command line or the environment wins over the
            // file's token file.
            let token_file = a
                .token_file
                .as_deref()
                .or(file.token_file.as_deref().filter(|_| a.token.is_none()));
            let webhook_secret_file = a
                .webhook_secret_file
                .as_deref()
                .or(file.webhook_secret_file.as_deref());
            let events_token_file = a
                .events_token_file
                .as_deref()
                .or(file.events_token_file.as_deref());
            let webhook_ca = a.webhook_ca.as_deref().or(file.webhook_ca.as_deref());
            let webhook = a.webhook.or(file.webhook.clone());
            if webhook.is_none() && (webhook_secret_file.is_some() || webhook_ca.is_some()) {
                return Err(Error::Invalid(tcpka::InvalidInput::Usage(
                    "a webhook secret or CA file needs a webhook (--webhook URL)".into(),
                )));
            }
            let evapi_addr = a.evapi.or(file.evapi);
            if webhook.is_none() && evapi_addr.is_none() && events_token_file.is_some() {
                return Err(Error::Invalid(tcpka::InvalidInput::Usage(
                    "an events token file needs a receiver (--webhook URL or --evapi HOST:PORT)"
                        .into(),
                )));
            }
            if let (Some(url), Some(_)) = (&webhook, events_token_file) {
                if !server::webhook_keeps_secrets(url) {
                    return Err(Error::Invalid(tcpka::InvalidInput::Usage(format!(
                        "--events-token-file sends the token in clear: the webhook must be \
                         https:// or on a loopback address, not {url}"
                    ))));
                }
            }
            // Files are read before the token is made: a bad one changes nothing.
            let events_token = events_token_file
                .map(tcpka::access::read_token_file)
                .transpose()?;
            let webhook = webhook
                .map(|url| {
                    Ok::<_, Error>(server::WebhookConfig {
                        url,
                        secret: webhook_secret_file
                            .map(tcpka::access::read_token_file)
                            .transpose()?,
                        bearer: events_token.clone(),
                        ca_pem: webhook_ca
                            .map(|p| {
                                std::fs::read(p)
                                    .map_err(|e| Error::io(format!("reading {}", p.display()), e))
                            })
                            .transpose()?,
                    })
                })
                .transpose()?;
            let evapi = match evapi_addr {
                None => {
                    if a.evapi_user.is_some() || file.evapi_user.is_some() {
                        return Err(Error::Invalid(tcpka::InvalidInput::Usage(
                            "--evapi-user needs --evapi HOST:PORT".into(),
                        )));
                    }
                    None
                }
                Some(addr) => {
                    // Without --evapi-user: Kamailio's usual user, if this
                    // host has one (root is always accepted).
                    let users = match a.evapi_user.clone().or(file.evapi_user.clone()) {
                        Some(user) => vec![tcpka::access::uid_of(&user).ok_or_else(|| {
                            Error::Invalid(tcpka::InvalidInput::Usage(format!(
                                "--evapi-user: no such user {user:?}"
                            )))
                        })?],
                        None => tcpka::access::uid_of("kamailio").into_iter().collect(),
                    };
                    Some(tcpka::evapi::EvapiConfig {
                        addr,
                        token: events_token.clone(),
                        users,
                    })
                }
            };
            let token = serve_token(&listen, a.token, token_file, api_group)?;
            let config = server::Config {
                listen,
                token,
                api_group,
                load: a.kernel.options_over(&file),
                webhook,
                evapi,
                json: a.json || file.json.unwrap_or(false),
                rules_file: a.config,
                kernel_log: a.kernel_log,
            };
            runtime()?.block_on(server::run(layout, cgroup, config))?;
        }
        Command::Watch(a) => runtime()?.block_on(watch(a))?,
        Command::Apply(a) => {
            let config = tcpka::config::Config::load(&a.file)?;
            let steps = Enforcer::new(layout).apply_config(&config, a.dry_run)?;
            if a.json {
                print_json(&steps);
            } else {
                for s in &steps {
                    tcpka::outln!("{s}");
                }
                let n = steps.len();
                let changes = if n == 1 {
                    "1 change".to_owned()
                } else {
                    format!("{n} changes")
                };
                match (n, a.dry_run) {
                    (0, _) => tcpka::outln!("rules already match {}", a.file.display()),
                    (_, true) => tcpka::outln!("{changes}; nothing changed (--dry-run)"),
                    (_, false) => tcpka::outln!("{changes} applied"),
                }
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "tcpka", &mut out);
            tcpka::outln!("{}", String::from_utf8_lossy(&out).trim_end());
        }
        Command::Manpages { dir } => {
            let n = write_man_pages(&dir)?;
            tcpka::outln!("wrote {n} man pages to {}", dir.display());
        }
        Command::Trace(a) => {
            let enforcer = Enforcer::new(layout.clone());
            if a.stop {
                let was = enforcer.set_trace(false)?;
                tcpka::outln!(
                    "{}",
                    if was {
                        "trace turned off"
                    } else {
                        "no trace was on"
                    }
                );
            } else {
                tcpka::trace::run(&enforcer, &layout, a.json)?;
            }
        }
        Command::Reload => {
            let Some(pid) = tcpka::lock::serve_pid(&layout)? else {
                return Err(Error::NoDaemon(layout.dir().into()));
            };
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .map_err(|e| Error::io(format!("signalling tcpka serve (pid {pid})"), e.into()))?;
            tcpka::outln!("asked tcpka serve (pid {pid}) to apply its configuration file again");
        }
    }
    Ok(())
}
