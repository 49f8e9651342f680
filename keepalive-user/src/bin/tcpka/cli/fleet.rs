//! `tcpka fleet`: the fleet's rules in etcd, and its nodes' status, from
//! anywhere that reaches etcd.

use clap::{Args, Subcommand};
use etcd_client::Client;
use tcpka::{
    config::{EtcdSettings, RuleSpec},
    fleet::{etcd_error, EtcdOptions, FleetRule, Selector},
    Error,
};

use super::{
    args::{JsonArg, MatchArgs, PolicyArgs},
    fleet_nodes::{fleet_explain, fleet_status},
    output::{print_json, runtime},
    rule::print_preview,
};

#[derive(Args, Debug)]
pub(crate) struct FleetArgs {
    #[command(flatten)]
    pub(crate) etcd: EtcdSettings,
    #[command(subcommand)]
    pub(crate) command: FleetCommand,
}

#[derive(Subcommand, Debug)]
pub(crate) enum FleetCommand {
    /// The fleet's rules (PREFIX/rules/NAME).
    #[command(subcommand)]
    Rule(FleetRuleCommand),
    /// The nodes: each agent's status (up while its lease lives), and
    /// nodes seen before whose agent is gone.
    Status(JsonArg),
    /// Which rules select NODE and why, and the ones it could not apply.
    Explain(FleetExplainArgs),
    /// Forget a node taken out of service: `status` no longer lists it
    /// as gone. A node whose agent still runs comes back.
    Forget {
        /// The node's name.
        node: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum FleetRuleCommand {
    /// Put a rule (add or replace): every agent it selects applies it
    /// within a second. Arguments in the reference module's order: IDLE
    /// COUNT INTERVAL.
    Add(FleetRuleAddArgs),
    /// Delete a rule: every agent removes it from its kernel.
    Del {
        /// The rule's name.
        name: String,
        #[command(flatten)]
        preview: FleetPreviewArgs,
        /// With --dry-run: print the agents' answers as JSON.
        #[arg(long, requires = "dry_run")]
        json: bool,
    },
    /// List the rules, with their selectors.
    List(JsonArg),
}

#[derive(Args, Debug)]
pub(crate) struct FleetRuleAddArgs {
    /// The rule's name: 1 to 31 of A-Z a-z 0-9 . _ - (agents install it as
    /// @NAME).
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) policy: PolicyArgs,
    #[command(flatten)]
    pub(crate) matcher: MatchArgs,
    /// Track the connections the rule matches (see `rule add --help`).
    #[arg(long)]
    pub(crate) tracked: bool,
    /// Only connections established after the rule get it: the agents
    /// give it (and its later changes) to no live connection.
    #[arg(long)]
    pub(crate) new_only: bool,
    /// Only for this node (repeat it for more) [default: every node].
    #[arg(long = "node", value_name = "NODE")]
    pub(crate) nodes: Vec<String>,
    /// Only for nodes with this label, KEY=VALUE (repeat it: all must
    /// match).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = |s: &str| tcpka::fleet::parse_label(s))]
    pub(crate) labels: Vec<(String, String)>,
    /// Print the rule as put, as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) preview: FleetPreviewArgs,
}

/// A preview of a fleet change, asked of every agent.
#[derive(Args, Debug, Clone, Copy)]
pub(crate) struct FleetPreviewArgs {
    /// Change nothing: ask every node's agent what the change would do to
    /// the live connections on its host, per rule, with a sample of them.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// With --dry-run: how long to wait for the agents' answers, in
    /// seconds (nodes without a status are not waited for).
    #[arg(long, value_name = "SECONDS", default_value_t = 5, requires = "dry_run", value_parser = clap::value_parser!(u64).range(1..=60))]
    pub(crate) wait: u64,
}

#[derive(Args, Debug)]
pub(crate) struct FleetExplainArgs {
    /// The node's name.
    pub(crate) node: String,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn fleet(a: FleetArgs) -> Result<(), Error> {
    let mut etcd = a.etcd;
    if etcd.etcd.is_none() {
        if let Ok(env) = std::env::var("TCPKA_ETCD") {
            tcpka::node::parse_etcd_endpoints(&env).map_err(|e| {
                Error::Invalid(tcpka::InvalidInput::Usage(format!("TCPKA_ETCD: {e}")))
            })?;
            etcd.etcd = Some(env);
        }
    }
    let options = EtcdOptions::from_settings(&etcd)?.ok_or_else(|| {
        Error::Invalid(tcpka::InvalidInput::Usage(
            "tcpka fleet needs etcd: --etcd URL[,URL...] or TCPKA_ETCD".into(),
        ))
    })?;
    // Every command is read-only or idempotent: run again on another
    // member while etcd cannot answer (an election, a member gone).
    let command = std::sync::Arc::new(a.command);
    runtime()?.block_on(async move {
        let o = options.clone();
        options
            .retrying(tcpka::fleet::RETRY_FOR, move |client| {
                let (o, command) = (o.clone(), command.clone());
                Box::pin(async move { run_command(client, &o, &command).await })
            })
            .await
    })
}

async fn run_command(
    client: &mut Client,
    options: &EtcdOptions,
    command: &FleetCommand,
) -> Result<(), Error> {
    match command {
        FleetCommand::Rule(FleetRuleCommand::Add(r)) => rule_add(client, options, r).await,
        FleetCommand::Rule(FleetRuleCommand::Del {
            name,
            preview,
            json,
        }) if preview.dry_run => {
            let key = options.rule_key(name);
            let found = client
                .get(key, None)
                .await
                .map_err(|e| etcd_error("reading the rule", e))?;
            if found.kvs().is_empty() {
                return Err(Error::NotFound {
                    what: format!("no fleet rule {name:?} under {}", options.rules_prefix()),
                });
            }
            let report = tcpka::fleet::preview(
                client,
                options,
                name,
                None,
                std::time::Duration::from_secs(preview.wait),
            )
            .await?;
            print_fleet_preview(&format!("would delete fleet rule {name}"), &report, *json);
            Ok(())
        }
        FleetCommand::Rule(FleetRuleCommand::Del { name, .. }) => {
            let revision = delete_one(
                client,
                options.rule_key(name),
                "deleting the rule",
                format!("no fleet rule {name:?} under {}", options.rules_prefix()),
            )
            .await?;
            tcpka::outln!("deleted fleet rule {name} (revision {revision})");
            Ok(())
        }
        FleetCommand::Rule(FleetRuleCommand::List(j)) => rule_list(client, options, j.json).await,
        FleetCommand::Status(j) => fleet_status(client, options, j.json).await,
        FleetCommand::Explain(e) => fleet_explain(client, options, e).await,
        FleetCommand::Forget { node } => {
            delete_one(
                client,
                options.known_key(node),
                "forgetting the node",
                format!("no node {node:?} under {}", options.prefix),
            )
            .await?;
            tcpka::outln!("forgot node {node}");
            Ok(())
        }
    }
}

/// Deletes one key; returns the revision, or `missing` when there was no
/// such key.
async fn delete_one(
    client: &mut Client,
    key: String,
    what: &str,
    missing: String,
) -> Result<i64, Error> {
    let deleted = client
        .delete(key, None)
        .await
        .map_err(|e| etcd_error(what, e))?;
    if deleted.deleted() == 0 {
        return Err(Error::NotFound { what: missing });
    }
    Ok(deleted.header().map_or(0, |h| h.revision()))
}

async fn rule_add(client: &mut Client, o: &EtcdOptions, r: &FleetRuleAddArgs) -> Result<(), Error> {
    let policy = r.policy.policy()?;

    for n in &r.nodes {
        if !tcpka::fleet::valid_node(n) {
            return Err(Error::Invalid(tcpka::InvalidInput::Usage(format!(
                "--node {n:?}: 1 to 64 of A-Z a-z 0-9 . _ -"
            ))));
        }
    }
    let value = RuleSpec {
        name: None,
        local_port: r.matcher.local_port.map(i64::from),
        remote_port: r.matcher.remote_port.map(i64::from),
        remote: r.matcher.remote.map(|c| c.to_string()),
        idle: policy.idle.into(),
        count: policy.count.into(),
        interval: policy.interval.into(),
        user_timeout_ms: policy.user_timeout_ms.map(i64::from),
        at_risk: (!policy.risk.is_default()).then(|| policy.risk.to_string()),
        tracked: r.tracked,
        new_only: r.new_only,
        nodes: r.nodes.clone(),
        labels: r.labels.iter().cloned().collect(),
    };
    let json = serde_json::to_string(&value).expect("plain data");
    // The same check every agent makes: a value they would skip is refused.
    FleetRule::parse(&r.name, json.as_bytes())
        .map_err(|e| Error::Invalid(tcpka::InvalidInput::Usage(e)))?;
    if r.preview.dry_run {
        let report = tcpka::fleet::preview(
            client,
            o,
            &r.name,
            Some(json),
            std::time::Duration::from_secs(r.preview.wait),
        )
        .await?;
        print_fleet_preview(&format!("would put fleet rule {}", r.name), &report, r.json);
        return Ok(());
    }
    let put = client
        .put(o.rule_key(&r.name), json.clone(), None)
        .await
        .map_err(|e| etcd_error("putting the rule", e))?;
    let revision = put.header().map_or(0, |h| h.revision());
    if r.json {
        print_json(&serde_json::json!({ "name": r.name, "rule": value, "revision": revision }));
    } else {
        tcpka::outln!("put fleet rule {} (revision {revision})", r.name);
    }
    Ok(())
}

/// Every rule under the prefix: its name, raw value, and the checked rule
/// or why it is malformed.
pub(crate) async fn fleet_rules(
    client: &mut Client,
    o: &EtcdOptions,
) -> Result<Vec<(String, String, Result<FleetRule, String>)>, Error> {
    let (all, _) =
        tcpka::fleet::read_prefix(client, &o.rules_prefix(), "reading the rules").await?;
    Ok(all
        .into_iter()
        .map(|(name, value)| {
            let raw = String::from_utf8_lossy(&value).into_owned();
            let parsed = FleetRule::parse(&name, &value);
            (name, raw, parsed)
        })
        .collect())
}

fn describe_selector(s: &Selector) -> String {
    let mut parts = Vec::new();
    if !s.nodes.is_empty() {
        parts.push(format!("nodes {}", s.nodes.join(",")));
    }
    if !s.labels.is_empty() {
        let l: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.push(format!("labels {}", l.join(",")));
    }
    if parts.is_empty() {
        "every node".into()
    } else {
        parts.join("; ")
    }
}

async fn rule_list(client: &mut Client, o: &EtcdOptions, json: bool) -> Result<(), Error> {
    let rules = fleet_rules(client, o).await?;
    if json {
        let v: Vec<_> = rules
            .iter()
            .map(|(name, raw, parsed)| match parsed {
                Ok(r) => serde_json::json!({ "name": name, "rule": r.value, "valid": true }),
                Err(e) => {
                    serde_json::json!({ "name": name, "value": raw, "valid": false, "error": e })
                }
            })
            .collect();
        print_json(&v);
        return Ok(());
    }
    if rules.is_empty() {
        tcpka::outln!("no fleet rules under {}", o.rules_prefix());
        return Ok(());
    }
    tcpka::outln!(
        "{:<31}  {:<40}  {:>5}  {:>5}  {:>8}  {:>12}  {:<7}  {}",
        "NAME",
        "MATCH",
        "IDLE",
        "COUNT",
        "INTERVAL",
        "USER_TIMEOUT",
        "TRACKED",
        "FOR"
    );
    for (name, _, parsed) in &rules {
        match parsed {
            Ok(r) => {
                let m = tcpka::rule::Rule::new(0, r.rule.matcher, r.rule.policy, r.rule.tracked);
                tcpka::outln!(
                    "{:<31}  {:<40}  {:>5}  {:>5}  {:>8}  {:>12}  {:<7}  {}",
                    name,
                    m.describe_match(),
                    r.rule.policy.idle,
                    r.rule.policy.count,
                    r.rule.policy.interval,
                    r.rule
                        .policy
                        .user_timeout_ms
                        .map_or("-".into(), |ms| format!("{ms}ms")),
                    if r.rule.tracked { "yes" } else { "no" },
                    describe_selector(&r.selector)
                );
            }
            Err(e) => tcpka::outln!("{name:<31}  MALFORMED (agents skip it): {e}"),
        }
    }
    Ok(())
}

/// Prints what every node answered to a preview (stdout: the command's
/// own output).
fn print_fleet_preview(what: &str, report: &tcpka::fleet::PreviewReport, json: bool) {
    if json {
        print_json(&serde_json::json!({
            "dry_run": true,
            "nodes": report.answers,
            "missing": report.missing,
        }));
        return;
    }
    tcpka::outln!("{what}");
    for (node, answer) in &report.answers {
        match answer.get("live") {
            Some(live) => {
                tcpka::outln!("node {node}:");
                print_preview(live, "  ");
            }
            None => tcpka::outln!(
                "node {node}: cannot tell: {}",
                answer["error"].as_str().unwrap_or("no answer")
            ),
        }
    }
    for node in &report.missing {
        tcpka::outln!("node {node}: no answer in time (an older tcpka, or a busy agent)");
    }
    if report.answers.is_empty() && report.missing.is_empty() {
        tcpka::outln!("no node has a status: no agent to ask");
    }
    tcpka::outln!("nothing changed (--dry-run)");
}
