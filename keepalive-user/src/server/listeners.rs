//! Listening: the unix socket file and its permissions, and serving
//! connections in per-caller slots, under limits of time and size.
use std::{path::PathBuf, sync::Arc, time::Duration};

use axum::{body::Body, Router};

use super::{auth::ConnInfo, HEADER_TIMEOUT, HEAD_LIMIT, MAX_CONNECTIONS, PER_CALLER, RESERVED};
use crate::Error;

/// The socket file of a unix listener, removed when serving ends if it is
/// still the one we bound.
pub(super) struct SocketFile {
    path: PathBuf,
    ino: Option<u64>,
}

impl SocketFile {
    pub(super) fn new(path: &std::path::Path) -> Self {
        let ino = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        Self {
            path: path.to_path_buf(),
            ino,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        if now.is_some() && now == self.ino {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A unix listener at `path` whose file has its mode and group before
/// anyone can connect: bound under a temporary name in the same
/// directory, secured, then renamed into place.
pub(super) fn bind_secured(
    path: &std::path::Path,
    group: Option<u32>,
) -> Result<tokio::net::UnixListener, Error> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)
        .map_err(|e| Error::io(format!("listening on {}", path.display()), e))?;
    let placed = secure_socket(&tmp, group).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("placing {}", path.display()), e))
    });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Makes a unix listener's socket file 0600, or 0660 with the API group.
pub(super) fn secure_socket(path: &std::path::Path, group: Option<u32>) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let done = (|| {
        if let Some(gid) = group {
            std::os::unix::fs::lchown(path, None, Some(gid))?;
        }
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    })();
    done.map_err(|e| Error::io(format!("setting the mode of {}", path.display()), e))
}

/// Who is on the other end of an API connection, for [`Slots`].
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(super) enum Caller {
    /// A local process: a unix socket's peer, or a loopback TCP client
    /// whose socket sock_diag found.
    Uid(u32),
    /// A TCP client on another host (or one sock_diag could not find).
    Addr(std::net::IpAddr),
}

impl Caller {
    /// Root and the daemon's own user (the service's helpers) may use the
    /// reserved slots.
    fn privileged(self) -> bool {
        matches!(self, Caller::Uid(u) if u == 0 || u == nix::unistd::geteuid().as_raw())
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Uid(u) => write!(f, "uid {u}"),
            Caller::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// The owner of a loopback TCP client's socket (the other end of the
/// connection accepted with these ends), from sock_diag: one exact lookup.
/// `None` when it is not found, or no process holds it.
pub(super) fn loopback_caller(local: std::net::SocketAddr, peer: std::net::SocketAddr) -> Caller {
    match crate::destroy::holder_uid(peer, local) {
        Ok(Some(uid)) => Caller::Uid(uid),
        _ => Caller::Addr(peer.ip()),
    }
}

/// The API's connection slots: [`MAX_CONNECTIONS`] shared, of which one
/// caller (a uid, or a remote address) holds at most [`PER_CALLER`], and
/// [`RESERVED`] more that only root and the daemon's own user may take. A
/// connection over its caller's share is closed at once: one local user
/// cannot take the API from the others, nor from root.
pub(super) struct Slots {
    /// What is counted ("API connections", "event streams").
    what: &'static str,
    shared_max: usize,
    per_caller: usize,
    reserved: usize,
    state: std::sync::Mutex<SlotState>,
    /// Every slot taken holds one of these (for the wait at shutdown).
    all: Arc<tokio::sync::Semaphore>,
}

#[derive(Default)]
struct SlotState {
    per_caller: std::collections::HashMap<Caller, usize>,
    shared: usize,
}

/// A slot taken; given back when dropped.
pub(super) struct Slot {
    slots: Arc<Slots>,
    caller: Caller,
    shared: bool,
    _all: tokio::sync::OwnedSemaphorePermit,
}

impl Slots {
    /// The API's connections.
    pub(super) fn new() -> Arc<Self> {
        Self::with("API connections", MAX_CONNECTIONS, PER_CALLER, RESERVED)
    }

    /// `shared_max` shared, at most `per_caller` each, `reserved` more for
    /// root and the daemon's user.
    pub(super) fn with(
        what: &'static str,
        shared_max: usize,
        per_caller: usize,
        reserved: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            what,
            shared_max,
            per_caller,
            reserved,
            state: std::sync::Mutex::default(),
            all: Arc::new(tokio::sync::Semaphore::new(shared_max + reserved)),
        })
    }

    /// A slot for `caller`, or why not.
    pub(super) fn take(self: &Arc<Self>, caller: Caller) -> Result<Slot, String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mine = st.per_caller.get(&caller).copied().unwrap_or(0);
        let privileged = caller.privileged();
        let what = self.what;
        if !privileged && mine >= self.per_caller {
            return Err(format!("{caller} already holds {} {what}", self.per_caller));
        }
        let shared = st.shared < self.shared_max;
        if !shared && !privileged {
            return Err(format!("all {} {what} are taken", self.shared_max));
        }
        let Ok(all) = self.all.clone().try_acquire_owned() else {
            return Err(format!("every one of the {what} is taken"));
        };
        *st.per_caller.entry(caller).or_insert(0) += 1;
        if shared {
            st.shared += 1;
        }
        Ok(Slot {
            slots: self.clone(),
            caller,
            shared,
            _all: all,
        })
    }

    /// Waits until every slot is back.
    pub(super) async fn drained(&self) {
        let _ = self
            .all
            .acquire_many((self.shared_max + self.reserved) as u32)
            .await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.slots.state.lock().unwrap_or_else(|e| e.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut e) = st.per_caller.entry(self.caller)
        {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        if self.shared {
            st.shared -= 1;
        }
    }
}

/// A connection's slot, which an event stream gives back (it gets one of
/// its own): shared by the connection's task and its requests.
#[derive(Clone)]
pub(super) struct SlotHandle(Arc<std::sync::Mutex<Option<Slot>>>);

impl SlotHandle {
    /// Whose slot it is, while held.
    pub(super) fn caller(&self) -> Option<Caller> {
        let slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().map(|s| s.caller)
    }

    /// Gives the slot back.
    pub(super) fn give_back(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// TCP keepalive on an API connection: a subscriber to the event stream
/// that is gone without a word (its host died) is found within about a
/// minute, and its stream slot freed.
pub(super) fn keep_alive(s: &tokio::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::KeepAlive, &true);
    let _ = setsockopt(s, sockopt::TcpKeepIdle, &30);
    let _ = setsockopt(s, sockopt::TcpKeepInterval, &10);
    let _ = setsockopt(s, sockopt::TcpKeepCount, &3);
}

/// Serves HTTP/1.1 connections from `accept` until `stop`, each in a slot
/// of its caller's (see [`Slots`]; a connection with none is closed at
/// once). A request head must come within [`HEADER_TIMEOUT`] and fit in
/// [`HEAD_LIMIT`] bytes. After `stop`, connections in flight get
/// [`SHUTDOWN_GRACE`] (the caller's timer).
pub(super) async fn serve_connections<S, F, Fut>(
    mut accept: F,
    app: Router,
    stop: tokio::sync::watch::Receiver<bool>,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(S, ConnInfo, Caller)>>,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt as _;
    let slots = Slots::new();
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    loop {
        let (io, info, caller) = tokio::select! {
            r = accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or a client gone before accept:
                    // wait a moment and go on.
                    if let crate::logs::Admit::Log { left_out } =
                        crate::logs::THROTTLE.admit("API accept failed")
                    {
                        tracing::warn!(left_out, "accepting an API connection: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stopped(stop.clone()) => break,
        };
        let slot = match slots.take(caller) {
            Ok(s) => s,
            Err(why) => {
                if let crate::logs::Admit::Log { left_out } =
                    crate::logs::THROTTLE.admit("API connection refused")
                {
                    tracing::warn!(left_out, "API connection closed: {why}");
                }
                drop(io);
                continue;
            }
        };
        let handle = SlotHandle(Arc::new(std::sync::Mutex::new(Some(slot))));
        let held = handle.clone();
        let svc =
            app.clone()
                .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(info);
                    req.extensions_mut().insert(handle.clone());
                    req.map(Body::new)
                });
        tokio::spawn(async move {
            let _slot = held;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(HEAD_LIMIT)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(io),
                    hyper_util::service::TowerToHyperService::new(svc),
                );
            if let Err(e) = conn.await {
                tracing::debug!("API connection: {e}");
            }
        });
    }
    // In-flight requests get the grace period (the caller's timer).
    slots.drained().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_holds_its_share_and_root_keeps_the_reserve() {
        let slots = Slots::new();
        let nobody = Caller::Uid(65534);
        let mut held: Vec<Slot> = (0..PER_CALLER)
            .map(|_| slots.take(nobody).unwrap())
            .collect();
        let err = slots.take(nobody).err().unwrap();
        assert!(err.contains("uid 65534 already holds 64"), "{err}");
        // Others fill the shared slots...
        let others = MAX_CONNECTIONS - PER_CALLER;
        for i in 0..others {
            held.push(slots.take(Caller::Uid(20_000 + i as u32 / 32)).unwrap());
        }
        assert!(slots.take(Caller::Uid(30_000)).is_err());
        let remote = Caller::Addr("192.0.2.1".parse().unwrap());
        assert!(slots.take(remote).is_err());
        // ...root still gets in, up to the reserve.
        let root: Vec<Slot> = (0..RESERVED)
            .map(|_| slots.take(Caller::Uid(0)).unwrap())
            .collect();
        assert!(slots.take(Caller::Uid(0)).is_err());
        // A slot given back is a slot for the next caller.
        held.pop();
        assert!(slots.take(Caller::Uid(30_000)).is_ok());
        drop(root);
        drop(held);
        let st = slots.state.lock().unwrap();
        assert_eq!(st.shared, 0);
        assert!(st.per_caller.is_empty());
    }
}
