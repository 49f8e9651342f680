//! `tcpka enable` and `tcpka disable`: keepalive on live connections now.
use clap::Args;
use tcpka::{
    enforcer::{ConnStatus, Enforcer},
    paths::PinLayout,
    Error,
};

use super::{
    args::{ConnArgs, PolicyArgs},
    output::{print_json, report_changed},
};

#[derive(Args, Debug)]
pub(crate) struct EnableArgs {
    #[command(flatten)]
    pub(crate) target: ConnArgs,
    #[command(flatten)]
    pub(crate) policy: PolicyArgs,
}

pub(crate) fn enable(layout: PinLayout, a: EnableArgs) -> Result<(), Error> {
    let policy = a.policy.policy()?;
    let t = a.target;
    let changed = Enforcer::new(layout).enable(
        t.which.conn,
        t.which.local,
        policy,
        t.holder.as_deref(),
        t.which.netns.as_deref(),
    )?;
    // Connections the full connection map left as they were: an error when
    // none could be managed, a warning beside the others.
    let full = changed.iter().filter(|c| c.error.is_some()).count();
    if full > 0 && full == changed.len() {
        return Err(Error::ConnsFull(full));
    }
    let managed: Vec<ConnStatus> = changed
        .iter()
        .filter(|c| c.error.is_none())
        .cloned()
        .collect();
    if t.json {
        print_json(&changed);
    } else {
        report_changed(&managed, "enabled keepalive", &policy.to_string(), false);
    }
    if full > 0 {
        tcpka::errln!("warning: {}", Error::ConnsFull(full));
    }
    Ok(())
}

pub(crate) fn disable(layout: PinLayout, t: ConnArgs) -> Result<(), Error> {
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
    Ok(())
}
