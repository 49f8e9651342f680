//! Holders: the calls (e.g. SIP dialogs) that share a connection. An
//! enable records its holder, a disable by a holder turns keepalive off
//! only when the last one is gone; closed connections are swept.
use aya::maps::{HashMap, MapData};
use keepalive_common::{conns::ConnInfo, maps};

use super::{
    live::{no_such, remote_hint, Op},
    sock::is_connected,
    status::{ConnStatus, Kept, Outcome},
    Action, Enforcer,
};
use crate::{
    conn::ConnSpec,
    holders::Holders,
    index::Held,
    journal::{Entry, Journal, Step},
    lend::lend,
    Error, InvalidInput, Result,
};

impl Enforcer {
    /// Records holders after an enable, forgets them after a plain disable.
    pub(super) fn finish(&self, op: &Op, found: Vec<ConnStatus>) -> Result<Outcome> {
        if found.is_empty() {
            return Err(no_such(op.conn, op.local));
        }
        if !matches!(op.action, Action::Query) && found.iter().any(|c| c.state == "listen") {
            // The kernel programs leave listening sockets alone.
            return Err(Error::Invalid(InvalidInput::Conn {
                value: op.conn.to_string(),
                reason: "is a listening socket: its keepalive would pass to every connection it accepts; use `tcpka rule add --local-port PORT` for those",
            }));
        }
        match (&op.action, &op.holder) {
            (Action::Enable(_), Some(id)) => {
                let mut holders = Holders::open(&self.layout)?;
                let conns = lend::<HashMap<MapData, u64, ConnInfo>>(&self.layout, maps::CONNS)?;
                let journal = Journal::new(&self.layout);
                for c in &found {
                    journal.begin(&Entry {
                        step: Step::Add,
                        cookie: c.cookie,
                        netns: op.netns.clone(),
                    })?;
                    holders.add(c.cookie, id)?;
                    // Closed meanwhile: the kernel dropped its entries, and
                    // would not drop a count written after that.
                    if conns.get(&c.cookie, 0).is_err() {
                        holders.forget(c.cookie);
                    }
                    journal.end();
                }
            }
            (Action::Disable, None) => {
                let mut holders = Holders::open(&self.layout)?;
                let journal = Journal::new(&self.layout);
                for c in &found {
                    journal.begin(&Entry {
                        step: Step::Clear,
                        cookie: c.cookie,
                        netns: op.netns.clone(),
                    })?;
                    holders.clear(c.cookie);
                    journal.end();
                }
            }
            _ => {}
        }
        Ok(Outcome {
            changed: found,
            kept: Vec::new(),
        })
    }

    /// Disable for one holder: connections with other holders keep
    /// keepalive.
    pub(super) fn disable_held_locked(&self, op: &Op) -> Result<Outcome> {
        let id = op.holder.as_deref().expect("a holder");
        let netns = op.netns.as_deref();
        let mut holders = Holders::open(&self.layout)?;
        // Through the index, each connection's descriptor is kept for the
        // step that follows, and its values are read then (once: disabled,
        // or queried when kept).
        enum Reached {
            Held(Held),
            Walked(Box<ConnStatus>),
        }
        let targets: Vec<Reached> = match self.resolve_held(op.conn, op.local, netns)? {
            Some(held) => held
                .into_iter()
                // Closed meanwhile: gone, like a connection the walk no
                // longer finds.
                .filter(|h| is_connected(&h.stream))
                .map(Reached::Held)
                .collect(),
            None => self
                .walk(&[&Op {
                    action: Action::Query,
                    holder: None,
                    ..op.clone()
                }])?
                .pop()
                .unwrap_or_default()
                .into_iter()
                .map(|c| Reached::Walked(Box::new(c)))
                .collect(),
        };
        if targets.is_empty() {
            return Err(no_such(op.conn, op.local));
        }
        let mut out = Outcome {
            changed: Vec::new(),
            kept: Vec::new(),
        };
        let hint = remote_hint(op.conn);
        let status = |t: &Reached| -> Result<Option<ConnStatus>> {
            match t {
                Reached::Walked(c) => Ok(Some((**c).clone())),
                Reached::Held(h) => self.apply_held_if_open(h, Action::Query, None, hint),
            }
        };
        let journal = Journal::new(&self.layout);
        for t in targets {
            let cookie = match &t {
                Reached::Held(h) => h.cookie,
                Reached::Walked(c) => c.cookie,
            };
            journal.begin(&Entry {
                step: Step::Remove,
                cookie,
                netns: op.netns.clone(),
            })?;
            // A connection this holder never held (another call's, or a
            // reconnection) stays as it is.
            let removed = holders.remove(cookie, id);
            if !matches!(removed, Ok(Some(0))) {
                journal.end();
            }
            let (remaining, held_it) = match removed? {
                Some(n) => (n, true),
                None => (holders.count_of(cookie), false),
            };
            if remaining > 0 || !held_it {
                if let Some(c) = status(&t)? {
                    out.kept.push(Kept {
                        connection: c,
                        holders_remaining: remaining,
                    });
                }
                continue;
            }
            let spec = ConnSpec::Cookie(cookie);
            let changed = match &t {
                Reached::Held(h) => {
                    match self.apply_held_if_open(h, Action::Disable, None, hint)? {
                        Some(c) => vec![c],
                        None => return Err(no_such(spec, None)),
                    }
                }
                Reached::Walked(_) => self.apply_locked(spec, None, Action::Disable, netns)?,
            };
            out.changed.extend(changed);
            journal.end();
        }
        Ok(out)
    }

    /// Removes the holder entries of connections that closed.
    pub fn sweep_holders(&self) -> Result<()> {
        let _lock = self.lock()?;
        Holders::open(&self.layout)?.all();
        Ok(())
    }

    /// Fills in each connection's holders.
    pub fn attach_holders(&self, conns: &mut [ConnStatus]) -> Result<()> {
        let _lock = self.lock()?;
        let mut all = Holders::open(&self.layout)?.all();
        for c in conns {
            c.holders = Some(all.remove(&c.cookie).unwrap_or_default());
        }
        Ok(())
    }
}
