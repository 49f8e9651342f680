//! `tcpka trace`: what the kernel programs decide, as they decide it.
use clap::Args;
use tcpka::{enforcer::Enforcer, paths::PinLayout, Error};

#[derive(Args, Debug)]
pub(crate) struct TraceArgs {
    /// One JSON object per line: {"level", "message"}.
    #[arg(long)]
    pub(crate) json: bool,
    /// Turn off a trace left on by a trace that was killed, and exit.
    #[arg(long)]
    pub(crate) stop: bool,
}

pub(crate) fn trace(layout: PinLayout, a: TraceArgs) -> Result<(), Error> {
    let enforcer = Enforcer::new(layout.clone());
    if a.stop {
        let was = enforcer.set_trace(false)?;
        tcpka::outln!(
            "{}",
            if was {
                "trace turned off"
            } else {
                "no trace was on"
            }
        );
    } else {
        tcpka::trace::run(&enforcer, &layout, a.json)?;
    }
    Ok(())
}
