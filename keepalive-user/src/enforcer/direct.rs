//! The direct path: a command reaches its connections through the
//! connection index (see `crate::index`), or learns that it must walk.
use std::{net::SocketAddr, path::Path, sync::atomic::Ordering};

use super::{live::remote_hint, status::ConnStatus, Action, Enforcer};
use crate::{conn::ConnSpec, index::Held, Result};

impl Enforcer {
    /// The direct path: `None` when the connection index cannot vouch for
    /// the complete answer.
    pub(super) fn try_index(
        &self,
        conn: ConnSpec,
        local: Option<SocketAddr>,
        action: Action,
        netns: Option<&Path>,
    ) -> Result<Option<Vec<ConnStatus>>> {
        Ok(self
            .try_index_held(conn, local, action, netns)?
            .map(|v| v.into_iter().map(|(c, _)| c).collect()))
    }

    /// [`Self::try_index`], keeping each connection's borrowed descriptor
    /// for a next step on it.
    pub(super) fn try_index_held(
        &self,
        conn: ConnSpec,
        local: Option<SocketAddr>,
        action: Action,
        netns: Option<&Path>,
    ) -> Result<Option<Vec<(ConnStatus, Held)>>> {
        let Some(held) = self.resolve_held(conn, local, netns)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(held.len());
        for h in held {
            if let Some(c) = self.apply_held_if_open(&h, action, local, remote_hint(conn))? {
                out.push((c, h));
            }
        }
        Ok(Some(out))
    }

    /// The connections CONN names, held through their owners' descriptors
    /// (nothing applied yet); `None` when the index cannot vouch for the
    /// complete answer.
    pub(super) fn resolve_held(
        &self,
        conn: ConnSpec,
        local: Option<SocketAddr>,
        netns: Option<&Path>,
    ) -> Result<Option<Vec<Held>>> {
        if !crate::index::seed_netns(&self.layout, netns)? {
            return Ok(None);
        }
        let Some(held) = crate::index::resolve(&self.layout, conn, local, netns)? else {
            tracing::debug!("{conn}: the index cannot vouch for it; walking the socket table");
            return Ok(None);
        };
        tracing::debug!("{conn}: {} connection(s) via the index", held.len());
        self.lookups.index.fetch_add(1, Ordering::Relaxed);
        Ok(Some(held))
    }
}
