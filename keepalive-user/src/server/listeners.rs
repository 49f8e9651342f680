//! Listening: the unix socket file and its permissions, and serving
//! connections under the connection cap and timeouts.
use super::*;

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

/// Serves HTTP/1.1 connections from `accept` until `stop`: at most
/// [`MAX_CONNECTIONS`] at once, each dropped when a request head takes
/// longer than [`HEADER_TIMEOUT`]. After `stop`, connections in flight get
/// [`SHUTDOWN_GRACE`].
pub(super) async fn serve_connections<S, F, Fut>(
    mut accept: F,
    app: Router,
    stop: tokio::sync::watch::Receiver<bool>,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(S, ConnInfo)>>,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt as _;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stopped(stop.clone()) => break,
        };
        let (io, info) = tokio::select! {
            r = accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or a client gone before accept:
                    // wait a moment and go on.
                    tracing::warn!("accepting an API connection: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stopped(stop.clone()) => break,
        };
        let svc =
            app.clone()
                .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(info);
                    req.map(Body::new)
                });
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
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
    let _ = slots.acquire_many(MAX_CONNECTIONS as u32).await;
}
