//! What serve runs beside the API: the holder sweep, the attachment
//! watch, the report of log lines left out, and the rules file applied at start and on SIGHUP.
use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::signal::unix::Signal;

use super::metrics::Metrics;
use crate::{enforcer::Enforcer, loader, paths::PinLayout, Error};

/// Sweeps the holder entries of closed connections: within a second of a
/// command-managed connection's end (`closed`), and once a minute in any
/// case, so that holders die with their connection and the holder map
/// never fills with the dead. One sweep a second at most, however many
/// connections end.
pub(super) fn spawn_holder_sweep(enforcer: Enforcer, closed: Arc<tokio::sync::Notify>) {
    tokio::spawn(async move {
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(60), closed.notified()).await;
            // Let the ends of a burst of calls gather.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let e = enforcer.clone();
            if let Ok(Err(err)) = tokio::task::spawn_blocking(move || e.sweep_holders()).await {
                tracing::warn!("sweeping holders: {err}");
            }
        }
    });
}

/// Once a second, one line per kind of repeated line left out of the log
/// (see [`crate::logs::Throttle`]).
pub(super) fn spawn_log_report() {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            crate::logs::report_left_out();
        }
    });
}

/// Watches the attachment: when the cgroup is removed (a service restart)
/// the kernel detaches the sock_ops program; once a cgroup exists again at
/// the same path, attach to it.
pub(super) fn spawn_attach_watch(layout: PinLayout, metrics: Arc<Metrics>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(ATTACH_CHECK);
        let mut warned = false;
        loop {
            every.tick().await;
            let l = layout.clone();
            let Ok(checked) = tokio::task::spawn_blocking(move || {
                let repaired = loader::repair_attachment(&l)?;
                if let Err(e) = loader::unwatch_outside(&l) {
                    tracing::warn!("checking for managed connections outside the cgroup: {e}");
                }
                Ok::<_, Error>((repaired, loader::installed(&l)?))
            })
            .await
            else {
                continue;
            };
            match checked {
                Ok((Some(i), _)) => {
                    metrics.reattached.inc();
                    warned = false;
                    tracing::warn!(cgroup = %i.cgroup.display(), "re-attached to the recreated cgroup");
                }
                Ok((None, Some(i))) if !i.attached && !warned => {
                    warned = true;
                    tracing::error!(
                        cgroup = %i.cgroup.display(),
                        "detached: the cgroup was removed; new connections get no rules until it is back"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("checking the attachment: {e}"),
            }
        }
    });
}

/// How often `serve` checks that the sock_ops program is still attached.
pub(super) const ATTACH_CHECK: Duration = Duration::from_secs(1);

/// Brings the installed rules to the file, logging each change.
pub(super) async fn apply_rules_file(
    enforcer: &Enforcer,
    path: &std::path::Path,
) -> Result<(), Error> {
    let (e, p) = (enforcer.clone(), path.to_owned());
    let steps = tokio::task::spawn_blocking(move || {
        let config = crate::config::Config::load(&p)?;
        e.apply_config(&config, false)
    })
    .await
    .expect("apply task")?;
    for step in &steps {
        tracing::info!(file = %path.display(), "{step}");
    }
    tracing::info!(file = %path.display(), changes = steps.len(), "rules applied");
    Ok(())
}

/// On SIGHUP (`tcpka reload`, `systemctl reload`), the rules file again. A
/// file that has become invalid is reported and changes nothing. Without a
/// file, SIGHUP is logged and ignored (it must not stop the daemon).
/// A SIGHUP that came while serve started (`hup` was installed before
/// the load) is a reload now: applying the file again is harmless.
pub(super) fn spawn_reload(mut hup: Signal, enforcer: Enforcer, path: Option<PathBuf>) {
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(path) = &path else {
                tracing::warn!("reload: serve has no --config file; nothing to apply");
                continue;
            };
            let mut reloading = vec![sd_notify::NotifyState::Reloading];
            reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
            crate::service::notify(&reloading);
            if let Err(e) = apply_rules_file(&enforcer, path).await {
                tracing::error!(file = %path.display(), "reload refused: {}", crate::one_line(&e));
            }
            crate::service::notify(&[sd_notify::NotifyState::Ready]);
        }
    });
}
