//! `tcpka close`: end live connections from the kernel side.
use clap::Args;
use tcpka::{enforcer::Enforcer, paths::PinLayout, Error};

use super::{args::Which, output::print_json};

#[derive(Args, Debug)]
pub(crate) struct CloseArgs {
    #[command(flatten)]
    pub(crate) which: Which,
    /// Print the connections closed as JSON (as they were).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn close(layout: PinLayout, a: CloseArgs) -> Result<(), Error> {
    let w = a.which;
    let closed = Enforcer::new(layout).close(w.conn, w.local, w.netns.as_deref())?;
    if a.json {
        print_json(&closed);
    } else {
        let n = closed.len();
        tcpka::outln!("closed {n} connection{}", if n == 1 { "" } else { "s" });
    }
    Ok(())
}
