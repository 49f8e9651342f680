//! `tcpka load` and `tcpka unload`.
use std::path::{Path, PathBuf};

use clap::Args;
use tcpka::{
    cgroup::Cgroup, config::KernelOptions, loader, loader::LoadOutcome, paths::PinLayout, Error,
};

use super::output::print_json;

#[derive(Args, Debug)]
pub(crate) struct LoadArgs {
    /// cgroup v2 directory to attach to [default: the root of the cgroup v2
    /// mount, i.e. every process on the host].
    #[arg(long)]
    pub(crate) cgroup: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) kernel: KernelOptions,
    /// Print the result as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn load(layout: &PinLayout, args: LoadArgs) -> Result<(), Error> {
    let cgroup = target_cgroup(layout, args.cgroup.as_deref())?;
    let outcome = loader::load(layout, &cgroup, &args.kernel.load_options())?;
    let i = outcome.installation();
    let loaded = matches!(outcome, LoadOutcome::Loaded(_));
    let reattached = matches!(outcome, LoadOutcome::Reattached(_));
    if args.json {
        print_json(&serde_json::json!({
            "loaded": loaded,
            "already_loaded": !loaded,
            "reattached": reattached,
            "installation": i,
        }));
    } else if loaded {
        tcpka::outln!(
            "loaded: attached to cgroup {}, pinned in {}",
            i.cgroup.display(),
            i.pin_dir.display()
        );
    } else if reattached {
        tcpka::outln!(
            "re-attached: the cgroup had been removed; attached to cgroup {} again, pinned in {}",
            i.cgroup.display(),
            i.pin_dir.display()
        );
    } else {
        tcpka::outln!(
            "already loaded: attached to cgroup {}, pinned in {}; nothing changed",
            i.cgroup.display(),
            i.pin_dir.display()
        );
    }
    Ok(())
}

pub(crate) fn unload(layout: &PinLayout) -> Result<(), Error> {
    if loader::unload(layout)? {
        tcpka::outln!("unloaded: detached and removed {}", layout.dir().display());
    } else {
        tcpka::outln!("not loaded: nothing to do");
    }
    Ok(())
}

/// The cgroup `load` and `serve` attach to: the one named, else the one an
/// existing installation recorded (so a plain `tcpka load` repairs an
/// installation whose cgroup was recreated), else the cgroup v2 root.
pub(crate) fn target_cgroup(layout: &PinLayout, named: Option<&Path>) -> Result<Cgroup, Error> {
    if named.is_none() {
        if let Ok(Some(i)) = loader::installed(layout) {
            return Cgroup::open(&i.cgroup).map_err(|e| Error::NotFound {
                what: format!(
                    "tcpka is loaded for cgroup {}, which no longer exists ({e}); start the service again, or `tcpka unload` and load elsewhere",
                    i.cgroup.display()
                ),
            });
        }
    }
    Ok(Cgroup::open_or_root(named)?)
}

#[derive(Args, Debug)]
pub(crate) struct PrepareArgs {
    /// The service's user (name or uid); its primary group goes with it.
    #[arg(long, default_value = "tcpka")]
    pub(crate) user: String,
    /// Print what was done as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn prepare(layout: &PinLayout, args: PrepareArgs) -> Result<(), Error> {
    let owner = tcpka::service::Owner::lookup(&args.user)?;
    let steps = tcpka::service::prepare(layout, owner)?;
    if args.json {
        print_json(&serde_json::json!({ "user": args.user, "uid": owner.uid, "steps": steps }));
    } else {
        for s in steps {
            tcpka::outln!("prepared: {s}");
        }
    }
    Ok(())
}
