//! `tcpka check FILE`: a configuration file validated offline.
use std::path::PathBuf;

use clap::Args;
use tcpka::{config::ServeOptions, Error};

use super::output::print_json;

#[derive(Args, Debug)]
pub(crate) struct CheckArgs {
    /// The configuration file, e.g. /etc/tcpka/tcpka.toml.
    pub(crate) file: PathBuf,
    /// Print the result as JSON: `file`, `rules` (each as `tcpka rule
    /// list --json` shows a rule, without its id) and `serve` (whether
    /// the file has a [serve] table).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Reads and validates the file, as `apply` and `serve --config` would,
/// and prints its rules. Needs no installation and no privilege.
pub(crate) fn check(a: CheckArgs) -> Result<(), Error> {
    let config = tcpka::config::Config::load(&a.file)?;
    let rules = tcpka::config::file_rules(&config);
    let serve = config.serve != ServeOptions::default();
    let file = a.file.display().to_string();
    if a.json {
        let rules: Vec<serde_json::Value> = rules
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).expect("plain data");
                v.as_object_mut().map(|o| o.remove("id"));
                v
            })
            .collect();
        print_json(&serde_json::json!({ "file": file, "rules": rules, "serve": serve }));
        return Ok(());
    }
    for r in &rules {
        tcpka::outln!("{}", tcpka::config::Step::Add { rule: r.clone() });
    }
    let n = rules.len();
    tcpka::outln!(
        "{file} is valid: {n} rule{}{}",
        if n == 1 { "" } else { "s" },
        if serve { " and a [serve] table" } else { "" }
    );
    Ok(())
}
