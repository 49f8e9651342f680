//! `tcpka rule`: add, delete, list and explain the rules for new connections.
use std::path::PathBuf;

use clap::{Args, Subcommand};
use tcpka::{
    conn::{parse_endpoint, ConnSpec},
    enforcer::{Action, Enforcer},
    paths::PinLayout,
    policy::parse_u32,
    Error,
};

use super::{
    args::{JsonArg, MatchArgs, PolicyArgs},
    output::{print_explanation, print_json},
};

#[derive(Subcommand, Debug)]
pub(crate) enum RuleCommand {
    /// Add a rule; prints its id. New connections get it, and so do the
    /// live ones in the attached cgroup it now decides (not those a
    /// command manages: commands win).
    ///
    /// Arguments in the reference module's order: IDLE COUNT INTERVAL.
    /// The rule with the most fields set wins; among --remote prefixes the
    /// longest wins; on a tie the older rule (lower id) wins.
    Add(RuleAddArgs),
    /// Delete a rule. Its live connections get what another rule decides
    /// for them; those no rule matches keep its values (tcpka cannot know
    /// whether the application turned keepalive on itself) unless
    /// --revert.
    Del {
        /// Rule id, as printed by `rule add` and `rule list`.
        #[arg(value_parser = |s: &str| parse_u32("ID", s))]
        id: u32,
        #[command(flatten)]
        live: LiveArgs,
        /// Live connections it matched that no rule matches now get
        /// SO_KEEPALIVE off.
        #[arg(long, conflicts_with = "new_only")]
        revert: bool,
        /// Print the deleted rule as JSON (with `live`: what it did to live
        /// connections).
        #[arg(long)]
        json: bool,
    },
    /// List the rules.
    List(JsonArg),
    /// Show which rule a new connection from LOCAL to REMOTE would get, and
    /// why (the precedence sock_ops applies), without changing anything.
    Explain(RuleExplainArgs),
}

#[derive(Args, Debug)]
pub(crate) struct RuleExplainArgs {
    /// LOCAL REMOTE: this host's end and the peer's of a new connection
    /// (ADDR:PORT, IPv6 as [ADDR]:PORT); or one CONN (peer endpoint, SIP
    /// URI or cookie:N): the live connections it names, with the values
    /// they hold.
    #[arg(num_args = 1..=2, required = true, value_name = "LOCAL REMOTE | CONN")]
    pub(crate) ends: Vec<String>,
    /// With CONN: the network namespace to look in [default: tcpka's own].
    #[arg(long, value_name = "PATH")]
    pub(crate) netns: Option<PathBuf>,
    /// Print the explanation as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct RuleAddArgs {
    #[command(flatten)]
    pub(crate) matcher: MatchArgs,
    #[command(flatten)]
    pub(crate) policy: PolicyArgs,
    /// Track the connections the rule matches: `status` lists them and
    /// their timeout, reset or abort is reported as an event. Without it
    /// (the default) the rule only sets the values, which costs each new
    /// connection the least; the kernel still ends a dead one. Tracking
    /// costs about 1 µs more per connection setup (see
    /// docs/performance.md).
    #[arg(long)]
    pub(crate) tracked: bool,
    /// The default: only set the values (kept for scripts).
    #[arg(long, hide = true, conflicts_with = "tracked")]
    pub(crate) untracked: bool,
    #[command(flatten)]
    pub(crate) live: LiveArgs,
    /// Print the new rule as JSON (with `live`: what it did, or with
    /// --dry-run would do, to live connections; the id is 0 in a preview).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Whether a rule change reaches the connections that already exist.
#[derive(Args, Debug, Clone, Copy, Default)]
pub(crate) struct LiveArgs {
    /// Only connections established from now on see the change; live ones
    /// keep what they have.
    #[arg(long)]
    pub(crate) new_only: bool,
    /// Change nothing: say which live connections the change would give
    /// new values, per rule, with a sample of them (--json lists them).
    #[arg(long, conflicts_with = "new_only")]
    pub(crate) dry_run: bool,
}

impl LiveArgs {
    /// How the change treats live connections (`None`: it does not).
    pub(crate) fn reach(self, revert: bool) -> Option<tcpka::enforcer::Reach> {
        (!self.new_only).then_some(tcpka::enforcer::Reach {
            dry_run: self.dry_run,
            revert,
        })
    }
}

/// Prints a preview of what a change would do to live connections (the
/// command's own output: stdout).
pub(crate) fn print_local_preview(reached: &Option<tcpka::Result<tcpka::enforcer::Reached>>) {
    match reached {
        None => {}
        Some(Err(e)) => tcpka::outln!("live connections: cannot tell: {}", tcpka::one_line(e)),
        Some(Ok(r)) => print_preview(&serde_json::to_value(r).expect("plain data"), ""),
    }
}

/// Prints a preview from its JSON (a `Reached`, local or an agent's),
/// each line after `indent`.
pub(crate) fn print_preview(r: &serde_json::Value, indent: &str) {
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let (changed, unmatched) = (n(r, "changed"), n(r, "unmatched"));
    if changed == 0 && unmatched == 0 {
        tcpka::outln!("{indent}live connections: none would change");
        return;
    }
    tcpka::outln!(
        "{indent}live connections: {changed} would get new values, {unmatched} would match no rule any more"
    );
    for rule in r["rules"].as_array().into_iter().flatten() {
        let name = rule["rule"].as_str().unwrap_or("?");
        let what = match rule["match"].as_str() {
            Some(m) => format!("{name} ({m})"),
            None => name.to_owned(),
        };
        let mut parts = Vec::new();
        if n(rule, "changed") > 0 {
            parts.push(format!("{} would get its values", n(rule, "changed")));
        }
        if n(rule, "unmatched") > 0 {
            parts.push(format!("{} would match no rule", n(rule, "unmatched")));
        }
        tcpka::outln!("{indent}  {what}: {}", parts.join(", "));
        let sample = rule["sample"].as_array().map_or(&[][..], |s| s.as_slice());
        for c in sample {
            let k = &c["keepalive"];
            let now = if k["enabled"].as_bool().unwrap_or(false) {
                format!(
                    "idle {} count {} interval {}",
                    n(k, "idle"),
                    n(k, "count"),
                    n(k, "interval")
                )
            } else {
                "keepalive off".to_owned()
            };
            tcpka::outln!(
                "{indent}    {} -> {}  (now {now})",
                c["local"].as_str().unwrap_or("?"),
                c["remote"].as_str().unwrap_or("?")
            );
        }
        let total = n(rule, "changed") + n(rule, "unmatched");
        if total > sample.len() as u64 {
            tcpka::outln!("{indent}    ... and {} more", total - sample.len() as u64);
        }
    }
}

/// Says on stderr what a rule change did to live connections (stdout
/// stays the command's own output).
pub(crate) fn report_live(
    what: &str,
    reached: &Option<tcpka::Result<tcpka::enforcer::Reached>>,
    revert: bool,
) {
    match reached {
        None => {}
        Some(Err(e)) => tcpka::errln!(
            "tcpka: {what}: live connections not reached: {} (new connections get the change)",
            tcpka::one_line(e)
        ),
        Some(Ok(r)) if r.changed == 0 && r.unmatched == 0 => {}
        Some(Ok(r)) => {
            let mut parts = vec![format!(
                "{} live connection(s) given the values the rules now decide",
                r.changed
            )];
            if r.failed > 0 {
                parts.push(format!("{} refused a value", r.failed));
            }
            if r.unmatched > 0 {
                parts.push(format!(
                    "{} no rule matches any more: {}",
                    r.unmatched,
                    if revert {
                        "keepalive turned off"
                    } else {
                        "left as they were (--revert turns keepalive off)"
                    }
                ));
            }
            tcpka::errln!("tcpka: {what}: {}", parts.join("; "));
        }
    }
}

pub(crate) fn rule(layout: PinLayout, command: RuleCommand) -> Result<(), Error> {
    match command {
        RuleCommand::Add(a) => add(layout, a),
        RuleCommand::Del {
            id,
            live,
            revert,
            json,
        } => {
            let (rule, reached) =
                Enforcer::new(layout).delete_rule_reaching(id, live.reach(revert))?;
            if json {
                print_json(&with_live(&rule, &reached));
            } else if live.dry_run {
                tcpka::outln!("would delete rule {id} ({})", rule.describe_match());
                print_local_preview(&reached);
                tcpka::outln!("nothing changed (--dry-run)");
            } else {
                tcpka::outln!("deleted rule {id}");
            }
            if !live.dry_run {
                report_live(&format!("rule {id}"), &reached, revert);
            }
            Ok(())
        }
        RuleCommand::List(a) => list(layout, a),
        RuleCommand::Explain(a) => explain(layout, a),
    }
}

fn add(layout: PinLayout, a: RuleAddArgs) -> Result<(), Error> {
    let policy = a.policy.policy()?;
    let m = a.matcher.matcher();
    let reach = a.live.reach(false);
    let (rule, reached) = Enforcer::new(layout).add_rule_reaching(m, policy, a.tracked, reach)?;
    if a.json {
        print_json(&with_live(&rule, &reached));
    } else if a.live.dry_run {
        tcpka::outln!("would add a rule: {}", rule.describe_match());
        print_local_preview(&reached);
        tcpka::outln!("nothing changed (--dry-run)");
    } else {
        tcpka::outln!("{}", rule.id);
    }
    if !a.live.dry_run {
        report_live(&format!("rule {}", rule.id), &reached, false);
    }
    Ok(())
}

/// A value as JSON with a `live` field: what a change did (or would do)
/// to live connections; null when it did not reach them.
pub(crate) fn with_live(
    value: &impl serde::Serialize,
    reached: &Option<tcpka::Result<tcpka::enforcer::Reached>>,
) -> serde_json::Value {
    let mut v = serde_json::to_value(value).expect("plain data");
    v["live"] = tcpka::enforcer::live_json(reached);
    v
}

fn list(layout: PinLayout, a: JsonArg) -> Result<(), Error> {
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
            let risk = if r.risk.is_default() {
                String::new()
            } else {
                format!("  at_risk={}", r.risk)
            };
            tcpka::outln!(
                "{:>4}  {:>10}  {:>11}  {:<24}  {:>5}  {:>5}  {:>8}  {:>14}  {:<7}  {}{}",
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
                risk,
            );
        }
    }
    Ok(())
}

fn explain(layout: PinLayout, a: RuleExplainArgs) -> Result<(), Error> {
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
    Ok(())
}
