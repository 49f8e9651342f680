//! `tcpka doctor`: what this host gives tcpka, one line per check.
use tcpka::{paths::PinLayout, Error};

use super::{args::JsonArg, output::print_json};

pub(crate) fn doctor(layout: &PinLayout, a: JsonArg) -> Result<(), Error> {
    let checks = tcpka::doctor::run(layout);
    let missing = checks
        .iter()
        .any(|c| c.status == tcpka::doctor::Status::Missing);
    if a.json {
        print_json(&serde_json::json!({ "ok": !missing, "checks": checks }));
    } else {
        for c in &checks {
            tcpka::outln!("{}", c.line());
        }
    }
    if missing {
        return Err(Error::HostMissing {
            check: checks
                .iter()
                .filter(|c| c.status == tcpka::doctor::Status::Missing)
                .map(|c| c.name)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(())
}
