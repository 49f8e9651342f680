//! `tcpka enable` and `tcpka disable`: keepalive on live connections now.
use super::*;

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
    report_changed(&changed, "enabled keepalive", &policy.to_string(), t.json);
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
