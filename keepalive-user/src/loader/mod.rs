//! Loading, attaching and pinning the kernel programs, adopting an
//! installation that is already pinned, and removing it again.
//!
//! A load that fails halfway removes whatever it pinned: the host is left
//! as it was.
//!
//! `load_and_pin` is one sequence of steps in the order the kernel needs
//! them (maps before the programs that use them, the state tracepoint
//! before sock_ops, sock_ops attached last), each a function of its own
//! below it, in that order. The
//! options and what a load returns (`options.rs`), the kernel offsets
//! (`btf_offsets.rs`), which index a load gets, what is attached, the
//! hooks, the filesystems a load needs, and unloading are in the
//! submodules.
use std::{
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::Array,
    programs::{
        links::{CgroupAttachMode, FdLink},
        BtfTracePoint, Iter, SockOps, TracePoint,
    },
    EbpfLoader,
};
use keepalive_common::{maps, meta::Meta, offsets, offsets::Offsets, programs};

use crate::lock::Lock;
use crate::pinned::{read_meta, write_meta};
pub use crate::pinned::{HolderMode, IndexMode};
use crate::{cgroup::Cgroup, paths::PinLayout, Error, Result};

mod attach;
mod btf_offsets;
mod hooks;
mod index_choice;
mod mounts;
mod options;
mod unload;

pub use attach::{installed, is_loaded, repair_attachment};
use attach::{reattach, set_meta_cgroup};
use btf_offsets::kernel_offsets;
pub use hooks::{
    close_by_tracepoint, hooks, unwatch_outside, unwatch_outside_locked, unwatched_indexed,
    watch_outside, Hook, Watch,
};
pub use index_choice::{
    choose_index, default_index, index_reason, iterators_set_cb_flags, kernel_release,
    kernel_version, CLOSE_BY_TRACEPOINT_ENV,
};
use mounts::ensure_bpffs;
pub use mounts::{ensure_tracefs, is_bpffs, mount_bpffs};
pub use options::{
    parse_map_size, Installation, LoadOptions, LoadOutcome, MapSizes, MAP_SIZE_MAX, MAP_SIZE_MIN,
};
pub use unload::unload;
use unload::{detach_and_remove, remove_pin_dir, remove_pins};

/// Loads, attaches and pins everything, or adopts what is already pinned
/// for the same cgroup. Never attaches a second time.
pub fn load(layout: &PinLayout, cgroup: &Cgroup, options: &LoadOptions) -> Result<LoadOutcome> {
    // What this host lacks, said as `tcpka doctor` says it, before anything
    // is touched.
    if let Some(c) = crate::host::blocking() {
        return Err(Error::HostMissing {
            check: c.describe(),
        });
    }
    // Before anything is read or removed: a pin directory outside bpffs is
    // refused with nothing touched.
    ensure_bpffs(layout)?;
    let _lock = Lock::acquire(layout)?;
    if let Some(current) = installed(layout)? {
        if !current.attached {
            // The cgroup it ran on is gone: attach where asked.
            let outcome = reattach(layout, cgroup).map(LoadOutcome::Reattached)?;
            crate::service::hand_over_pins(layout)?;
            return Ok(outcome);
        }
        if current.cgroup_id == cgroup.id {
            if !current.seeded {
                repair_seed(layout)?;
                return installed(layout)?
                    .map(LoadOutcome::AlreadyLoaded)
                    .ok_or_else(|| Error::NotLoaded {
                        pin_dir: layout.dir().into(),
                    });
            }
            return Ok(LoadOutcome::AlreadyLoaded(current));
        }
        return Err(Error::LoadedElsewhere {
            loaded: current.cgroup.display().to_string(),
            requested: cgroup.path.display().to_string(),
        });
    }
    // Pins without a link are left over from an interrupted run: they carry
    // no enforcement, so start afresh.
    remove_pins(layout)?;
    let index = choose_index(options.index)?;
    let mut undo = Undo {
        layout,
        armed: true,
    };
    let installation = load_and_pin(layout, cgroup, options, index)?;
    // Root loading into the service's pin directory leaves it the pins.
    crate::service::hand_over_pins(layout)?;
    undo.armed = false;
    Ok(LoadOutcome::Loaded(installation))
}

/// Removes the pins of a load that failed halfway.
struct Undo<'a> {
    layout: &'a PinLayout,
    armed: bool,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = detach_and_remove(self.layout).and_then(|_| remove_pin_dir(self.layout))
            {
                tracing::warn!("undoing a failed load: {e}");
            }
        }
    }
}

/// Loads the eBPF object, pins its maps, attaches its programs and indexes
/// the connections that exist already, in the order the kernel needs them
/// (maps before the programs that use them, the state tracepoint before
/// sock_ops, sock_ops attached last). Call with the lock held. A step that
/// fails leaves what the steps before it pinned; the caller's [`Undo`]
/// removes it.
fn load_and_pin(
    layout: &PinLayout,
    cgroup: &Cgroup,
    options: &LoadOptions,
    index: IndexMode,
) -> Result<Installation> {
    let holders = options.holders;
    create_pin_dir(layout)?;
    let offsets = checked_kernel_offsets(index)?;
    let btf = aya::Btf::from_sys_fs().map_err(|e| Error::Ebpf(e.into()))?;
    let mut ebpf = open_object(&btf, &offsets, options, index)?;
    pin_maps(&ebpf, layout)?;
    write_meta_record(&mut ebpf, cgroup, holders, index)?;
    // Before sock_ops runs: which connections it looks at.
    write_port_filter(&mut ebpf, options, index)?;
    load_state_tracepoint(&mut ebpf, &btf, layout, index)?;
    // Before 6.12, the destroy tracepoint forgets index entries sock_ops
    // does not watch; pinned, attached while any is left.
    if index == IndexMode::Ports {
        pin_destroy_tracepoint(&mut ebpf, &btf, layout)?;
    }
    pin_lookup_program(&mut ebpf, layout)?;
    attach_syscall_hooks(&mut ebpf, layout, holders)?;
    attach_iterators(&mut ebpf, &btf, layout)?;
    attach_sock_ops(&mut ebpf, layout, cgroup)?;
    record_hz(layout)?;

    // Index what existed before: who holds each socket (all processes),
    // and the connections of our own namespace (others are indexed when
    // first asked about). fd_install and the state tracepoint are attached
    // already, so nothing falls between the two.
    seed(layout)?;
    Ok(Installation {
        pin_dir: layout.dir().to_path_buf(),
        cgroup: cgroup.path.clone(),
        cgroup_id: cgroup.id,
        attached: true,
        seeded: true,
        holders,
        index,
    })
}

/// Creates the pin directory (mode 0700, with its parents). On failure
/// nothing is pinned yet.
fn create_pin_dir(layout: &PinLayout) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(layout.dir())
        .map_err(|e| Error::io(format!("creating {}", layout.dir().display()), e))
}

/// Reads the kernel's BTF for the offsets the programs read at, and checks
/// that `struct socket` is laid out as the fd programs expect. Touches
/// nothing, so a failure leaves only the (empty) pin directory.
fn checked_kernel_offsets(index: IndexMode) -> Result<Offsets> {
    let kernel_btf = crate::btf::Btf::from_sys_fs()?;
    let offsets = kernel_offsets(&kernel_btf, index)?;
    // The fd programs read `struct socket` at fixed offsets; refuse a kernel
    // where they moved rather than read garbage.
    for (member, want) in [("type", 4), ("file", 16), ("sk", 24)] {
        let got = kernel_btf.member_offset("socket", member)?;
        if got != want {
            return Err(Error::Unsupported {
                what: format!("struct socket.{member} is at offset {got}"),
                needs: format!("the layout tcpka's programs read (offset {want})"),
            });
        }
    }
    Ok(offsets)
}

/// Opens the eBPF object, patched with the kernel's offsets, the index
/// mode and the map sizes asked for, and creates its maps. Nothing is
/// pinned yet: on failure the maps go with the object.
fn open_object(
    btf: &aya::Btf,
    offsets: &Offsets,
    options: &LoadOptions,
    index: IndexMode,
) -> Result<aya::Ebpf> {
    let host_index = u32::from(index == IndexMode::Host);
    EbpfLoader::new()
        .btf(Some(btf))
        .override_global(offsets::GLOBAL, offsets, true)
        .override_global(programs::GLOBAL_HOST_INDEX, &host_index, true)
        .map_max_entries(
            maps::CONNS,
            options
                .sizes
                .connections
                .unwrap_or(keepalive_common::CONNS_MAX_ENTRIES),
        )
        .map_max_entries(
            maps::PEERS,
            options
                .sizes
                .indexed
                .unwrap_or(keepalive_common::index::MAX_ENTRIES),
        )
        .map_max_entries(
            maps::SLOTS,
            options
                .sizes
                .indexed
                .unwrap_or(keepalive_common::index::MAX_ENTRIES),
        )
        .map_max_entries(
            maps::HOLDERS,
            options
                .sizes
                .holders
                .unwrap_or(keepalive_common::holders::MAX_ENTRIES),
        )
        .map_max_entries(
            maps::HOLDER_COUNT,
            options
                .sizes
                .holders
                .unwrap_or(keepalive_common::holders::MAX_ENTRIES),
        )
        .load(crate::EBPF_OBJECT)
        .map_err(Error::Ebpf)
}

/// Pins every map of the object in the pin directory. On failure the maps
/// pinned before the one that failed stay pinned (for [`Undo`]).
fn pin_maps(ebpf: &aya::Ebpf, layout: &PinLayout) -> Result<()> {
    for name in maps::ALL {
        let map = ebpf.map(name).ok_or_else(|| Error::Object {
            missing: format!("map {name}"),
        })?;
        map.pin(layout.map(name)).map_err(|e| Error::Pin {
            what: format!("pinning map {name}"),
            source: e,
        })?;
    }
    Ok(())
}

/// Writes the installation record (the cgroup, the holder and index modes,
/// the layout version) into the META map. Call after [`pin_maps`]; on
/// failure the maps stay pinned (for [`Undo`]).
fn write_meta_record(
    ebpf: &mut aya::Ebpf,
    cgroup: &Cgroup,
    holders: HolderMode,
    index: IndexMode,
) -> Result<()> {
    let mut meta = Meta {
        cgroup_id: cgroup.id,
        next_rule_id: 1,
        cgroup_path_len: 0,
        cgroup_path: [0; keepalive_common::meta::PATH_MAX],
        flags: if holders == HolderMode::Syscalls {
            keepalive_common::meta::FLAG_SYSCALL_HOLDERS
        } else {
            0
        } | if index == IndexMode::Host {
            keepalive_common::meta::FLAG_HOST_INDEX
        } else {
            0
        },
        version: keepalive_common::meta::LAYOUT_VERSION,
        jiffy_ns: 0,
        _pad: 0,
    };
    set_meta_cgroup(&mut meta, cgroup);
    let map = ebpf.map_mut(maps::META).expect("checked above");
    let mut array: Array<_, Meta> =
        Array::try_from(map).map_err(|e| Error::map("opening the installation record", e))?;
    array
        .set(0, meta, 0)
        .map_err(|e| Error::map("writing the installation record", e))
}

/// Writes the port filter sock_ops reads (the index ports, whether rules
/// report events). Call after [`pin_maps`]; on failure the maps stay
/// pinned (for [`Undo`]).
fn write_port_filter(ebpf: &mut aya::Ebpf, options: &LoadOptions, index: IndexMode) -> Result<()> {
    let map = ebpf.map_mut(maps::PORTS).expect("checked above");
    let mut ports: Array<_, u64> =
        Array::try_from(map).map_err(|e| Error::map("opening the port filter", e))?;
    crate::ports::write_initial(
        &mut ports,
        &options.index_ports,
        options.rule_events,
        index == IndexMode::Ports && !iterators_set_cb_flags(),
    )
}

/// Loads the state tracepoint: with a host-wide index attached first, so
/// nothing the other programs record can outlive its connection. With
/// the ports index, sock_ops watches each connection it records, and
/// the tracepoint is only pinned, to be attached while connections
/// outside the cgroup are managed (see `watch_outside`). On failure what
/// was pinned before stays pinned (for [`Undo`]).
fn load_state_tracepoint(
    ebpf: &mut aya::Ebpf,
    btf: &aya::Btf,
    layout: &PinLayout,
    index: IndexMode,
) -> Result<()> {
    let prog: &mut BtfTracePoint = program(ebpf, programs::STATE)?;
    prog.load("inet_sock_set_state", btf)
        .map_err(|e| Error::Program {
            what: "loading the close tracepoint program".into(),
            source: e,
        })?;
    if index == IndexMode::Host {
        let id = prog.attach().map_err(|e| Error::Program {
            what: "attaching to tracepoint inet_sock_set_state".into(),
            source: e,
        })?;
        let link = prog.take_link(id).map_err(|e| Error::Program {
            what: "taking the tracepoint link".into(),
            source: e,
        })?;
        pin_link(link, &layout.close_link())?;
    } else {
        prog.pin(layout.close_prog()).map_err(|e| Error::Pin {
            what: "pinning the close tracepoint program".into(),
            source: e,
        })?;
    }
    Ok(())
}

/// Loads and pins the destroy tracepoint (ports index only), never
/// attaching it here. On failure what was pinned before stays pinned (for
/// [`Undo`]).
fn pin_destroy_tracepoint(ebpf: &mut aya::Ebpf, btf: &aya::Btf, layout: &PinLayout) -> Result<()> {
    let prog: &mut BtfTracePoint = program(ebpf, programs::DESTROY)?;
    prog.load("tcp_destroy_sock", btf)
        .map_err(|e| Error::Program {
            what: "loading the destroy tracepoint program".into(),
            source: e,
        })?;
    prog.pin(layout.destroy_prog()).map_err(|e| Error::Pin {
        what: "pinning the destroy tracepoint program".into(),
        source: e,
    })?;
    Ok(())
}

/// Loads and pins the index lookups of a command in one system call (see
/// crate::index::resolve); never attached. On failure what was pinned
/// before stays pinned (for [`Undo`]).
fn pin_lookup_program(ebpf: &mut aya::Ebpf, layout: &PinLayout) -> Result<()> {
    let prog: &mut aya::programs::Xdp = program(ebpf, programs::LOOKUP)?;
    prog.load().map_err(|e| Error::Program {
        what: "loading the index lookup program".into(),
        source: e,
    })?;
    prog.pin(layout.lookup_prog()).map_err(|e| Error::Pin {
        what: "pinning the index lookup program".into(),
        source: e,
    })?;
    Ok(())
}

/// Who holds each socket: attaches and pins the accept and connect
/// tracepoints, when asked for (see HolderMode); does nothing otherwise.
/// Attaching a tracepoint reads its id from tracefs. On failure the links
/// pinned so far stay pinned (for [`Undo`]).
fn attach_syscall_hooks(
    ebpf: &mut aya::Ebpf,
    layout: &PinLayout,
    holders: HolderMode,
) -> Result<()> {
    let syscall_hooks: &[(&str, &str, &str, PathBuf)] = &[
        (
            programs::ACCEPT_EXIT,
            "syscalls",
            "sys_exit_accept4",
            layout.accept4_link(),
        ),
        (
            programs::ACCEPT_EXIT,
            "syscalls",
            "sys_exit_accept",
            layout.accept_link(),
        ),
        (
            programs::CONNECT_ENTER,
            "syscalls",
            "sys_enter_connect",
            layout.connect_link(),
        ),
    ];
    let syscall_hooks = if holders == HolderMode::Syscalls {
        ensure_tracefs()?;
        syscall_hooks
    } else {
        &[]
    };
    for &(name, category, event, ref pin) in syscall_hooks {
        let prog: &mut TracePoint = program(ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| Error::Program {
                what: format!("loading {name}"),
                source: e,
            })?;
        }
        let id = prog.attach(category, event).map_err(|e| Error::Program {
            what: format!("attaching to tracepoint {category}:{event}"),
            source: e,
        })?;
        let link = prog.take_link(id).map_err(|e| Error::Program {
            what: format!("taking the {event} link"),
            source: e,
        })?;
        pin_link(link, pin)?;
    }
    Ok(())
}

/// Loads, attaches and pins the iterators (apply, status, rules, and the
/// seeding and holder searches). On failure the links pinned so far stay
/// pinned (for [`Undo`]).
fn attach_iterators(ebpf: &mut aya::Ebpf, btf: &aya::Btf, layout: &PinLayout) -> Result<()> {
    for (name, kind, pin) in [
        (programs::ITER_APPLY, "tcp", layout.iter_apply()),
        (programs::ITER_STATUS, "tcp", layout.iter_status()),
        (programs::ITER_RULES, "tcp", layout.iter_rules()),
        (programs::SEED_PEERS, "tcp", layout.iter_seed_peers()),
        (programs::SEED_FDS, "task_file", layout.iter_seed_fds()),
        (programs::FIND_FDS, "task_file", layout.iter_find_fds()),
    ] {
        let prog: &mut Iter = program(ebpf, name)?;
        prog.load(kind, btf).map_err(|e| Error::Program {
            what: format!("loading iterator {name}"),
            source: e,
        })?;
        let id = prog.attach().map_err(|e| Error::Program {
            what: format!("attaching iterator {name}"),
            source: e,
        })?;
        let link = prog.take_link(id).map_err(|e| Error::Program {
            what: format!("taking the {name} link"),
            source: e,
        })?;
        pin_link(link, &pin)?;
    }
    Ok(())
}

/// Loads sock_ops, attaches it to the cgroup and pins its link: from here
/// on the cgroup's connections are enforced. On failure what was pinned
/// before stays pinned (for [`Undo`]); once its link is pinned, [`Undo`]
/// detaches it too.
fn attach_sock_ops(ebpf: &mut aya::Ebpf, layout: &PinLayout, cgroup: &Cgroup) -> Result<()> {
    let prog: &mut SockOps = ebpf
        .program_mut(programs::SOCK_OPS)
        .ok_or_else(|| Error::Object {
            missing: format!("program {}", programs::SOCK_OPS),
        })?
        .try_into()
        .map_err(|e| Error::Program {
            what: "the sock_ops program has the wrong type".into(),
            source: e,
        })?;
    prog.load().map_err(|e| Error::Program {
        what: "loading the sock_ops program (verifier log follows)".into(),
        source: e,
    })?;
    let cgroup_dir = File::open(&cgroup.path)
        .map_err(|e| Error::io(format!("opening cgroup {}", cgroup.path.display()), e))?;
    // NB: CgroupAttachMode::Single: aya 0.14 passes AllowMultiple's flag to
    // BPF_LINK_CREATE, which the kernel rejects with EINVAL; links may be
    // combined with other programs on the cgroup anyway.
    let link_id = prog
        .attach(cgroup_dir.as_fd(), CgroupAttachMode::Single)
        .map_err(|e| Error::Program {
            what: format!("attaching to cgroup {}", cgroup.path.display()),
            source: e,
        })?;
    let link = prog.take_link(link_id).map_err(|e| Error::Program {
        what: "taking the sock_ops link".into(),
        source: e,
    })?;
    pin_link(link, &layout.sock_ops_link())
}

/// Indexes what existed before the programs were attached, then records
/// that the load is complete. A load killed before this point leaves an
/// installation that [`repair_seed`] completes.
fn seed(layout: &PinLayout) -> Result<()> {
    crate::index::seed_fds(layout)?;
    crate::index::seed_netns(layout, None)?;
    let mut meta = read_meta(layout)?;
    meta.flags |= keepalive_common::meta::FLAG_SEEDED;
    write_meta(layout, &meta)
}

/// Completes a load that was killed before it indexed the existing
/// connections. Call with the lock held. Returns whether it did.
pub fn repair_seed(layout: &PinLayout) -> Result<bool> {
    if !layout.sock_ops_link().exists() {
        return Ok(false);
    }
    // Set once per load, never cleared: remembered once seen.
    let read = || {
        read_meta(layout)
            .ok()
            .filter(|m| m.flags & keepalive_common::meta::FLAG_SEEDED != 0)
            .map(|_| ())
    };
    if crate::pinned::memo(layout, "seeded", read).is_some() {
        return Ok(false);
    }
    read_meta(layout)?;
    tracing::warn!("completing a load that was interrupted: indexing existing connections");
    seed(layout)?;
    Ok(true)
}

/// Measures the kernel's HZ with the status iterator and records it: the
/// programs turn TCP's jiffies into milliseconds with it.
fn record_hz(layout: &PinLayout) -> Result<()> {
    let jiffy_ns = crate::risk::measure_jiffy_ns(&layout.iter_status())?;
    let mut meta = read_meta(layout)?;
    meta.jiffy_ns = jiffy_ns;
    write_meta(layout, &meta)
}

fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| Error::Object {
            missing: format!("program {name}"),
        })?
        .try_into()
        .map_err(|e| Error::Program {
            what: format!("program {name} has the wrong type"),
            source: e,
        })
}

fn pin_link<L>(link: L, path: &Path) -> Result<()>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let link = FdLink::try_from(link).map_err(|e| Error::Unsupported {
        what: format!("pinning {}", path.display()),
        needs: format!("a BPF link for this attachment ({e})"),
    })?;
    link.pin(path).map_err(|e| Error::Pin {
        what: format!("pinning {}", path.display()),
        source: e,
    })?;
    Ok(())
}
