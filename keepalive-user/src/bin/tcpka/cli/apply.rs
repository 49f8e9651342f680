//! `tcpka apply` and `tcpka reload`: rules from a configuration file.
use std::path::PathBuf;

use clap::Args;
use tcpka::{enforcer::Enforcer, loader, paths::PinLayout, Error};

use super::{
    output::print_json,
    rule::{print_local_preview, report_live, with_live, LiveArgs},
};

#[derive(Args, Debug)]
pub(crate) struct ApplyArgs {
    /// The configuration file, e.g. /etc/tcpka/tcpka.toml.
    pub(crate) file: PathBuf,
    /// Print the changes as JSON: `steps`, `live` (what they did, or
    /// with --dry-run would do, to live connections) and `loaded` (false:
    /// --dry-run where tcpka is not loaded).
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) live: LiveArgs,
    /// Live connections a removed or changed rule matched that no rule
    /// matches now get SO_KEEPALIVE off.
    #[arg(long, conflicts_with = "new_only")]
    pub(crate) revert: bool,
}

pub(crate) fn apply(layout: PinLayout, a: ApplyArgs) -> Result<(), Error> {
    let config = tcpka::config::Config::load(&a.file)?;
    let dry_run = a.live.dry_run;
    if dry_run && !loader::is_loaded(&layout)? {
        return apply_offline(&layout, &a, &config);
    }
    let (steps, reached) =
        Enforcer::new(layout).apply_config_reaching(&config, dry_run, a.live.reach(a.revert))?;
    if !dry_run {
        report_live(&a.file.display().to_string(), &reached, a.revert);
    }
    if a.json {
        let mut v = with_live(&serde_json::json!({ "steps": steps }), &reached);
        v["loaded"] = true.into();
        print_json(&v);
    } else {
        for s in &steps {
            tcpka::outln!("{s}");
        }
        if dry_run && !steps.is_empty() {
            print_local_preview(&reached);
        }
        let n = steps.len();
        let changes = if n == 1 {
            "1 change".to_owned()
        } else {
            format!("{n} changes")
        };
        match (n, dry_run) {
            (0, _) => tcpka::outln!("rules already match {}", a.file.display()),
            (_, true) => tcpka::outln!("{changes}; nothing changed (--dry-run)"),
            (_, false) => tcpka::outln!("{changes} applied"),
        }
    }
    Ok(())
}

/// `apply --dry-run` where nothing is loaded: the file is checked, and its
/// steps are those that would bring an empty rule table to it. Touches
/// nothing (no lock, no pin directory).
fn apply_offline(
    layout: &PinLayout,
    a: &ApplyArgs,
    config: &tcpka::config::Config,
) -> Result<(), Error> {
    let steps = tcpka::config::plan(&[], config).map_err(Error::Conflict)?;
    let dir = layout.dir().display();
    if a.json {
        print_json(&serde_json::json!({ "steps": steps, "live": null, "loaded": false }));
        return Ok(());
    }
    for s in &steps {
        tcpka::outln!("{s}");
    }
    let n = steps.len();
    tcpka::outln!(
        "{n} change{}; nothing changed (--dry-run; tcpka is not loaded at {dir}, so these \
         are the steps from no rules)",
        if n == 1 { "" } else { "s" }
    );
    Ok(())
}

pub(crate) fn reload(layout: &PinLayout) -> Result<(), Error> {
    let Some(pid) = tcpka::lock::serve_pid(layout)? else {
        return Err(Error::NoDaemon(layout.dir().into()));
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|e| Error::io(format!("signalling tcpka serve (pid {pid})"), e.into()))?;
    tcpka::outln!("asked tcpka serve (pid {pid}) to apply its configuration file again");
    Ok(())
}
