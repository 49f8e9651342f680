//! `tcpka status`: managed connections, or the ones CONN names, with the
//! values read back from the kernel.
use std::{net::SocketAddr, path::PathBuf};

use clap::Args;
use tcpka::{
    conn::{parse_endpoint, ConnSpec},
    enforcer::{Action, Enforcer},
    paths::PinLayout,
    Error,
};

use super::output::{print_json, print_status};

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// Show this connection (peer endpoint, SIP URI or cookie:N), managed
    /// or not; exit 1 when there is none.
    #[arg(value_name = "CONN", value_parser = |s: &str| s.parse::<ConnSpec>())]
    pub(crate) conn: Option<ConnSpec>,
    /// With CONN: only the connection with this local end.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_endpoint, requires = "conn")]
    pub(crate) local: Option<SocketAddr>,
    /// Network namespace to look in [default: tcpka's own].
    #[arg(long, value_name = "PATH")]
    pub(crate) netns: Option<PathBuf>,
    /// Print a JSON array.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn status(layout: PinLayout, a: StatusArgs) -> Result<(), Error> {
    let enforcer = Enforcer::new(layout);
    let mut conns = match a.conn {
        Some(conn) => {
            let mut found = enforcer.apply(conn, a.local, Action::Query, a.netns.as_deref())?;
            enforcer.attach_holders(&mut found)?;
            found
        }
        None => enforcer.status(a.netns.as_deref())?,
    };
    enforcer.add_liveness(&mut conns, a.netns.as_deref())?;
    if a.json {
        print_json(&conns);
    } else if conns.is_empty() {
        tcpka::outln!("no managed connections");
    } else {
        print_status(&conns);
    }
    Ok(())
}
