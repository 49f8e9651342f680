//! `tcpka apply` and `tcpka reload`: rules from a configuration file.
use std::path::PathBuf;

use clap::Args;
use tcpka::{enforcer::Enforcer, paths::PinLayout, Error};

use super::{
    output::print_json,
    rule::{print_local_preview, report_live, with_live, LiveArgs},
};

#[derive(Args, Debug)]
pub(crate) struct ApplyArgs {
    /// The configuration file, e.g. /etc/tcpka/tcpka.toml.
    pub(crate) file: PathBuf,
    /// Print the changes as JSON: `steps`, and `live` (what they did, or
    /// with --dry-run would do, to live connections).
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
    let (steps, reached) =
        Enforcer::new(layout).apply_config_reaching(&config, dry_run, a.live.reach(a.revert))?;
    if !dry_run {
        report_live(&a.file.display().to_string(), &reached, a.revert);
    }
    if a.json {
        print_json(&with_live(&serde_json::json!({ "steps": steps }), &reached));
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
