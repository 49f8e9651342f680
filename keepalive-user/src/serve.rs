//! `tcpka serve`: load or adopt, then log what the kernel applies until
//! SIGINT or SIGTERM. Stopping leaves enforcement in place.
use aya::maps::RingBuf;
use keepalive_common::{events::Event, maps};
use tcpka::{
    cgroup::Cgroup,
    events::Record,
    loader::{self, LoadOutcome},
    paths::PinLayout,
    Error,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

pub fn run(layout: PinLayout, cgroup: Cgroup, json: bool) -> Result<(), Error> {
    let outcome = loader::load(&layout, &cgroup)?;
    let i = outcome.installation();
    match outcome {
        LoadOutcome::Loaded(_) => eprintln!(
            "tcpka: loaded, attached to cgroup {}, pinned in {}",
            i.cgroup.display(),
            i.pin_dir.display()
        ),
        LoadOutcome::AlreadyLoaded(_) => eprintln!(
            "tcpka: adopted the installation on cgroup {} pinned in {}",
            i.cgroup.display(),
            i.pin_dir.display()
        ),
    }
    let map = loader::open_map(&layout, maps::EVENTS)?;
    let ring = RingBuf::try_from(map).map_err(|e| Error::map("opening the event ring", e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    rt.block_on(async move {
        // SAFETY: the ring buffer owns its fd and keeps it open for as long
        // as the AsyncFd holds it.
        let mut ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| Error::io("polling the event ring", e.into()))?;
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| Error::io("installing SIGTERM", e))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|e| Error::io("installing SIGINT", e))?;
        eprintln!("tcpka: logging applied policies; Ctrl-C stops (enforcement stays)");
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                guard = ring.readable_mut() => {
                    let mut guard = guard.map_err(|e| Error::io("polling the event ring", e))?;
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        if item.len() < size_of::<Event>() {
                            continue;
                        }
                        // SAFETY: the program writes whole `Event`s; read
                        // unaligned since the ring gives no alignment promise.
                        let raw: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                        let record = Record::from_raw(&raw);
                        if json {
                            println!("{}", serde_json::to_string(&record).expect("plain data"));
                        } else {
                            println!("{record}");
                        }
                    }
                    guard.clear_ready();
                }
            }
        }
        eprintln!("tcpka: stopped; enforcement stays in place (tcpka unload removes it)");
        Ok(())
    })
}
