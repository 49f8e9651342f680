//! `tcpka`: the command-line front end. It parses arguments, calls the
//! library and prints; nothing else.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 invalid arguments.
use std::process::ExitCode;

use clap::Parser;
use cli::{
    args::{init_logs, Cli, Command},
    run::run,
};

/// One module per subcommand (`load.rs` has load and unload, `enable.rs`
/// enable and disable, `apply.rs` apply and reload); `args.rs` the
/// command line and the argument groups they share; `output.rs` printing.
mod cli {
    pub(crate) mod apply;
    pub(crate) mod args;
    pub(crate) mod check;
    pub(crate) mod close;
    pub(crate) mod completions;
    pub(crate) mod doctor;
    pub(crate) mod enable;
    pub(crate) mod fleet;
    pub(crate) mod fleet_nodes;
    pub(crate) mod info;
    pub(crate) mod load;
    pub(crate) mod output;
    pub(crate) mod rule;
    pub(crate) mod run;
    pub(crate) mod serve;
    pub(crate) mod status;
    pub(crate) mod trace;
    pub(crate) mod watch;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        // A SIGHUP (`systemctl reload`) that comes while serve starts must
        // not end it: ignored until serve installs its reload handler, which
        // happens before it loads.
        // SAFETY: setting a signal's disposition to SIG_IGN, before any
        // thread is started.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::SIGHUP,
                nix::sys::signal::SigHandler::SigIgn,
            )
        };
    }
    let _logs = init_logs(cli.log_format, matches!(cli.command, Command::Serve(_)));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = tcpka::one_line(&e);
            if let Some(hint) = privilege_hint(&msg) {
                msg.push_str("; ");
                msg.push_str(&hint);
            }
            tcpka::errln!("error: {}", tcpka::logs::escape_controls(&msg));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// For an error the kernel gave for lack of privilege: which capabilities
/// this process lacks.
fn privilege_hint(msg: &str) -> Option<String> {
    if !msg.contains("Permission denied") && !msg.contains("Operation not permitted") {
        return None;
    }
    let missing = tcpka::doctor::missing_caps()?;
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "tcpka needs root (this process lacks {})",
        missing.join(", ")
    ))
}
