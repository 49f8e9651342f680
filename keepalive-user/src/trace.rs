//! `tcpka trace`: what the kernel programs decide, as they decide it (which
//! rule a new connection got, a keepalive option the kernel refused, a full
//! connection map), through aya-log. Off unless a trace runs: the programs
//! then test one bit of a word they read anyway.
use std::os::fd::AsRawFd as _;

use aya::{maps::MapInfo, programs::loaded_programs};
use keepalive_common::maps;

use crate::{paths::PinLayout, Error, Result};

/// The sock_ops program of this installation: the loaded `tcpka_sockops`
/// that uses this installation's connection map.
fn sockops_program_id(layout: &PinLayout) -> Result<u32> {
    let conns = MapInfo::from_pin(layout.map(maps::CONNS))
        .map_err(|e| Error::map("opening the connection map", e))?
        .id();
    loaded_programs()
        .filter_map(std::result::Result::ok)
        .find(|p| {
            p.name_as_str() == Some("tcpka_sockops")
                && p.map_ids()
                    .ok()
                    .flatten()
                    .is_some_and(|ids| ids.contains(&conns))
        })
        .map(|p| p.id())
        .ok_or_else(|| Error::NotFound {
            what: format!(
                "no loaded tcpka_sockops program uses the connection map of {}",
                layout.dir().display()
            ),
        })
}

/// Writes each kernel log record to stdout, as text or JSON; stops the
/// trace when stdout is gone.
struct Printer {
    json: bool,
    broken: std::sync::atomic::AtomicBool,
}

impl log::Log for Printer {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        use std::io::Write as _;
        let line = if self.json {
            serde_json::json!({
                "level": record.level().as_str().to_lowercase(),
                "message": record.args().to_string(),
            })
            .to_string()
        } else {
            format!("{:<5} {}", record.level(), record.args())
        };
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            self.broken
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Opens the installation's kernel log for `sink` and turns the programs'
/// decision log on. Refused when a trace already runs: two readers would
/// split the log.
fn start(
    enforcer: &crate::enforcer::Enforcer,
    layout: &PinLayout,
    sink: &'static dyn log::Log,
) -> Result<Logger> {
    let id = sockops_program_id(layout)?;
    let logger = aya_log::EbpfLogger::init_from_id_with_logger(id, sink).map_err(|e| match e {
        aya_log::Error::MapError(source) => Error::map("opening the kernel log", source),
        aya_log::Error::ProgramError(source) => Error::Program {
            what: "opening the kernel log".into(),
            source,
        },
        aya_log::Error::ProgramNotFound => Error::NotFound {
            what: format!("opening the kernel log: program {id} was unloaded meanwhile"),
        },
        aya_log::Error::MapNotFound => Error::NotFound {
            what: format!("opening the kernel log: program {id} has no log map (AYA_LOGS)"),
        },
    })?;
    if enforcer.set_trace(true)? {
        return Err(Error::Conflict(
            "a trace already runs for this installation (or one was killed: `tcpka trace --stop`)"
                .into(),
        ));
    }
    Ok(logger)
}

/// Hands records to the sink until `done()`, then turns the log off.
fn pump(
    enforcer: &crate::enforcer::Enforcer,
    mut logger: Logger,
    done: impl Fn() -> bool,
) -> Result<()> {
    let fd = logger.as_raw_fd();
    while !done() {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid descriptor.
        unsafe { libc::poll(&mut pfd, 1, 200) };
        logger.flush();
    }
    logger.flush();
    enforcer.set_trace(false)?;
    Ok(())
}

/// Forwards kernel records to the daemon's log (`serve --kernel-log`),
/// at most as detailed as `max`.
struct ToLog(log::LevelFilter);

impl log::Log for ToLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.0
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let msg = r.args().to_string();
        match r.level() {
            log::Level::Error => tracing::error!(target: "kernel", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "kernel", "{msg}"),
            log::Level::Info => tracing::info!(target: "kernel", "{msg}"),
            _ => tracing::debug!(target: "kernel", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// The kernel log in the daemon's own, until `stop` is set; turns it off
/// then. The returned thread ends after that.
pub fn spawn_into_log(
    enforcer: crate::enforcer::Enforcer,
    layout: &PinLayout,
    max: log::LevelFilter,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let sink: &'static ToLog = Box::leak(Box::new(ToLog(max)));
    let logger = start(&enforcer, layout, sink)?;
    Ok(std::thread::spawn(move || {
        let done = || stop.load(std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = pump(&enforcer, logger, done) {
            tracing::warn!("kernel log: {}", crate::one_line(&e));
        }
    }))
}

/// Turns the programs' decision log on, prints it until SIGINT or SIGTERM
/// (or until stdout closes), and turns it off again.
pub fn run(enforcer: &crate::enforcer::Enforcer, layout: &PinLayout, json: bool) -> Result<()> {
    let printer: &'static Printer = Box::leak(Box::new(Printer {
        json,
        broken: false.into(),
    }));
    let logger = start(enforcer, layout, printer)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let _ = signal_hook_flag(sig, &stop);
    }
    crate::errln!("tracing the kernel programs' decisions; Ctrl-C stops");
    pump(enforcer, logger, || {
        stop.load(std::sync::atomic::Ordering::Relaxed)
            || printer.broken.load(std::sync::atomic::Ordering::Relaxed)
    })
}

/// Sets `flag` when `sig` arrives (and nothing else: the loop then ends
/// and turns the trace off).
fn signal_hook_flag(sig: i32, flag: &std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    static FLAG: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
        std::sync::OnceLock::new();
    let _ = FLAG.set(flag.clone());
    extern "C" fn on_signal(_: i32) {
        if let Some(f) = FLAG.get() {
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_signal),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    let sig = nix::sys::signal::Signal::try_from(sig)
        .map_err(|e| Error::io("installing a signal handler", e.into()))?;
    // SAFETY: the handler only stores to an atomic.
    unsafe { nix::sys::signal::sigaction(sig, &action) }
        .map_err(|e| Error::io("installing a signal handler", e.into()))?;
    Ok(())
}
