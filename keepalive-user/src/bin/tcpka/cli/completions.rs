//! `tcpka completions` and the hidden `tcpka manpages`.
use std::path::Path;

use tcpka::Error;

use super::{args::Cli, output::write_man_pages};

pub(crate) fn completions(shell: clap_complete::Shell) -> Result<(), Error> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "tcpka", &mut out);
    tcpka::outln!("{}", String::from_utf8_lossy(&out).trim_end());
    Ok(())
}

pub(crate) fn manpages(dir: &Path) -> Result<(), Error> {
    let n = write_man_pages(dir)?;
    tcpka::outln!("wrote {n} man pages to {}", dir.display());
    Ok(())
}
