//! The namespaces, links, processes and configuration a round runs in.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::{CALLEE, CALLEE_PORT, KAMAILIO, KAMAILIO_CALLEE_SIDE, TOKEN};

/// A child killed with its process group on drop.
pub(super) struct Proc(pub(super) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

pub(super) fn spawn(cmd: &mut Command) -> Result<Proc> {
    use std::os::unix::process::CommandExt as _;
    Ok(Proc(
        cmd.process_group(0)
            .spawn()
            .with_context(|| format!("{cmd:?}"))?,
    ))
}

pub(super) fn sh(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0]).args(&args[1..]).status()?;
    if !st.success() {
        bail!("{args:?} failed");
    }
    Ok(())
}

/// The namespaces, links and files of the setup; removed on drop.
pub(super) struct Setup {
    pub(super) caller: String,
    pub(super) callee: String,
    pub(super) dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for ns in [&self.caller, &self.callee] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn link(ns: &str, ours: &str, theirs: &str, our_ip: &str, their_ip: &str) -> Result<()> {
    sh(&[
        "ip", "link", "add", ours, "type", "veth", "peer", "name", theirs, "netns", ns,
    ])?;
    sh(&["ip", "addr", "add", &format!("{our_ip}/24"), "dev", ours])?;
    sh(&["ip", "link", "set", ours, "up"])?;
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{their_ip}/24"),
        "dev",
        theirs,
    ])?;
    sh(&["ip", "-n", ns, "link", "set", theirs, "up"])?;
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"])
}

/// The example config with this setup's addresses and the bench's values.
pub(super) fn config(root: &Path, dir: &Path, tcpka: &Path, api: &str) -> Result<PathBuf> {
    let mut text = std::fs::read_to_string(root.join("examples/kamailio/kamailio.cfg"))?;
    let mut subst = |name: &str, value: &str| -> Result<()> {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("#!substdef \"!{name}!")))
            .with_context(|| format!("{name} in the example config"))?
            .to_owned();
        text = text.replace(&line, &format!("#!substdef \"!{name}!{value}!g\""));
        Ok(())
    };
    subst("TCPKA_BIN", &tcpka.display().to_string())?;
    subst("TCPKA_API", &format!("http://{api}"))?;
    subst("TCPKA_TOKEN", TOKEN)?;
    subst("TCPKA_HTTPCON", &format!("http://tcpka:{TOKEN}@{api}"))?;
    subst("EVENTS_TOKEN", TOKEN)?;
    subst(
        "CALLEE",
        &format!("sip:{CALLEE}:{CALLEE_PORT};transport=tcp"),
    )?;
    subst("SIP_LISTEN", &format!("tcp:{KAMAILIO}:5060"))?;
    subst(
        "UPSTREAM_LISTEN",
        &format!("tcp:{KAMAILIO_CALLEE_SIDE}:5060"),
    )?;
    subst("CTL_SOCKET", &format!("unix:{}", dir.join("ctl").display()))?;
    let path = dir.join("kamailio.cfg");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The bench's own installation and cgroup, removed on drop.
pub(super) struct Installation {
    pub(super) tcpka: PathBuf,
    pub(super) pin_dir: PathBuf,
    pub(super) cgroup: PathBuf,
}

impl Drop for Installation {
    fn drop(&mut self) {
        crate::harness::unload(&self.tcpka, &self.pin_dir);
        // Kamailio's processes may still be exiting: end what is left
        // (cgroup.kill, Linux 5.14+) and retry until the cgroup is empty.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                return;
            }
            let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("bench: could not remove {}", self.cgroup.display());
    }
}
