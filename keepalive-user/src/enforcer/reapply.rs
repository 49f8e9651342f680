//! A rule change reaching the connections that already exist: the rule
//! keys it touched go to the kernel for one pass of the rules iterator,
//! which gives each live connection in the attached cgroup one of them
//! matches what the rules now decide for it (see `tcpka_iter_rules`).
use super::*;

/// How a rule change treats live connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    /// Count and report, change nothing.
    pub dry_run: bool,
    /// A connection a changed rule matched and no rule matches now gets
    /// SO_KEEPALIVE off (default: left as it is: tcpka cannot know whether
    /// the application turned keepalive on itself).
    pub revert: bool,
}

/// What one pass did (or, dry, would do) to live connections.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reached {
    /// Connections given a rule's values (or that would be).
    pub changed: usize,
    /// Connections a changed rule matched that no rule matches now, with
    /// keepalive on: left as they are, or turned off with `revert`.
    pub unmatched: usize,
    /// Connections the kernel refused a value for.
    pub failed: usize,
    pub dry_run: bool,
    /// The first connections, for a look.
    pub sample: Vec<ConnStatus>,
}

/// Connections listed in [`Reached::sample`].
const SAMPLE: usize = 10;
/// Rule keys one pass takes (the changed-rule map's size).
const REACH_KEYS_MAX: usize = RULES_MAX_ENTRIES as usize * 2;

impl Enforcer {
    /// [`Enforcer::reach_locked`] under the installation lock, for rule
    /// changes made earlier (the fleet's, gathered over a stream of
    /// changes). Keys beyond one pass's room go in further passes.
    pub fn reach(&self, keys: &[(u32, RuleKey)], how: Reach) -> Result<Reached> {
        let _lock = self.lock()?;
        let mut total = Reached {
            dry_run: how.dry_run,
            ..Reached::default()
        };
        for chunk in keys.chunks(REACH_KEYS_MAX) {
            let r = self.reach_locked(chunk, how)?;
            total.changed += r.changed;
            total.unmatched += r.unmatched;
            total.failed += r.failed;
            if total.sample.len() < SAMPLE {
                total.sample.extend(r.sample);
                total.sample.truncate(SAMPLE);
            }
        }
        Ok(total)
    }

    /// Gives the live connections one of `keys` matches what the rules now
    /// decide for them (one walk of this namespace's sockets). The caller
    /// holds the installation lock and has changed the rule table.
    pub(super) fn reach_locked(&self, keys: &[(u32, RuleKey)], how: Reach) -> Result<Reached> {
        if keys.is_empty() {
            return Ok(Reached {
                dry_run: how.dry_run,
                ..Reached::default()
            });
        }
        let mut changed: LpmTrie<MapData, RuleKey, u32> =
            LpmTrie::try_from(crate::pinned::open_map(&self.layout, maps::CHANGED)?)
                .map_err(|e| Error::map("opening the changed-rule map", e))?;
        let mut ports: Lent<Array<MapData, u32>> = lend(&self.layout, maps::REQ_PORTS)?;
        let mut any_port = false;
        let mut marked: Vec<(u32, u32)> = Vec::new();
        let mut mark = |ports: &mut Lent<Array<MapData, u32>>, port: u16, bit: u32| -> Result<()> {
            let i = u32::from(port);
            let old = ports
                .get(&i, 0)
                .map_err(|e| Error::map("reading the request ports", e))?;
            ports
                .set(i, old | bit, 0)
                .map_err(|e| Error::map("marking the changed rules' ports", e))?;
            marked.push((i, bit));
            Ok(())
        };
        let cleanup = |changed: &mut LpmTrie<MapData, RuleKey, u32>,
                       ports: &mut Lent<Array<MapData, u32>>,
                       marked: &[(u32, u32)]| {
            for (len, k) in keys {
                let _ = changed.remove(&Key::new(*len, *k));
            }
            for (i, bit) in marked {
                if let Ok(old) = ports.get(i, 0) {
                    let _ = ports.set(*i, old & !bit, 0);
                }
            }
            let _ = crate::ports::set_flag(
                &self.layout,
                FLAG_REAPPLY_DRY_RUN | FLAG_REAPPLY_REVERT | FLAG_REAPPLY_ANY_PORT,
                false,
            );
        };
        let prepared = (|| -> Result<()> {
            for (len, k) in keys {
                changed
                    .insert(&Key::new(*len, *k), 1, 0)
                    .map_err(|e| Error::map("recording the changed rules", e))?;
                if k.local_port != 0 {
                    mark(&mut ports, k.local_port, REAPPLY_LOCAL)?;
                } else if k.remote_port != 0 {
                    mark(&mut ports, k.remote_port, REAPPLY_REMOTE)?;
                } else {
                    any_port = true;
                }
            }
            let mut flags = 0;
            if how.dry_run {
                flags |= FLAG_REAPPLY_DRY_RUN;
            }
            if how.revert {
                flags |= FLAG_REAPPLY_REVERT;
            }
            if any_port {
                flags |= FLAG_REAPPLY_ANY_PORT;
            }
            if flags != 0 {
                crate::ports::set_flag(&self.layout, flags, true)?;
            }
            Ok(())
        })();
        let found = prepared.and_then(|()| crate::pass::run(&self.layout.iter_rules(), None, None));
        cleanup(&mut changed, &mut ports, &marked);
        let records = parse_raw(&found?);
        let mut out = Reached {
            dry_run: how.dry_run,
            ..Reached::default()
        };
        for r in &records {
            if r.apply_failed & REAPPLY_NO_RULE != 0 {
                out.unmatched += 1;
            } else {
                out.changed += 1;
            }
            if r.apply_failed & APPLY_SETSOCKOPT_FAILED != 0 {
                out.failed += 1;
            }
        }
        out.sample = records
            .iter()
            .take(SAMPLE)
            .map(ConnStatus::from_raw)
            .collect();
        Ok(out)
    }
}
