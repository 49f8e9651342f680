//! Validated keepalive values, shared by every front end.
use std::fmt;

use keepalive_common::{limits, policy::FLAG_USER_TIMEOUT};

use crate::{risk::Thresholds, InvalidInput};

/// Keepalive values checked against the kernel's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Policy {
    /// Seconds of idleness before the first probe (TCP_KEEPIDLE).
    pub idle: u32,
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT).
    pub count: u32,
    /// Seconds between probes (TCP_KEEPINTVL).
    pub interval: u32,
    /// TCP_USER_TIMEOUT in milliseconds, when set.
    pub user_timeout_ms: Option<u32>,
    /// Early-warning thresholds (`at_risk` events).
    #[serde(rename = "at_risk", skip_serializing_if = "Thresholds::is_default")]
    pub risk: Thresholds,
}

impl Policy {
    /// Checks every value; nothing is applied when any is out of range.
    pub fn new(
        idle: u32,
        count: u32,
        interval: u32,
        user_timeout_ms: Option<u32>,
    ) -> Result<Self, InvalidInput> {
        check("IDLE", idle, 1, limits::IDLE_MAX)?;
        check("COUNT", count, 1, limits::COUNT_MAX)?;
        check("INTERVAL", interval, 1, limits::INTERVAL_MAX)?;
        if let Some(ms) = user_timeout_ms {
            check("user timeout (ms)", ms, 0, limits::USER_TIMEOUT_MAX_MS)?;
        }
        Ok(Self {
            idle,
            count,
            interval,
            user_timeout_ms,
            risk: Thresholds::default(),
        })
    }

    /// The same values with these early-warning thresholds.
    pub fn with_risk(self, risk: Thresholds) -> Self {
        Self { risk, ..self }
    }

    /// Seconds after the last data until the kernel gives up on a silent
    /// peer: idle + count × interval (when no user timeout overrides it).
    pub fn dead_after_secs(&self) -> u64 {
        u64::from(self.idle) + u64::from(self.count) * u64::from(self.interval)
    }

    /// The kernel-side representation.
    pub fn to_raw(self) -> keepalive_common::policy::Policy {
        keepalive_common::policy::Policy {
            idle: self.idle,
            count: self.count,
            interval: self.interval,
            user_timeout_ms: self.user_timeout_ms.unwrap_or(0),
            flags: if self.user_timeout_ms.is_some() {
                FLAG_USER_TIMEOUT
            } else {
                0
            },
        }
    }

    /// Back from the kernel-side representation (not re-validated: it was
    /// validated when written).
    pub fn from_raw(raw: &keepalive_common::policy::Policy) -> Self {
        Self {
            idle: raw.idle,
            count: raw.count,
            interval: raw.interval,
            user_timeout_ms: (raw.flags & FLAG_USER_TIMEOUT != 0).then_some(raw.user_timeout_ms),
            risk: Thresholds::default(),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "idle={}s count={} interval={}s",
            self.idle, self.count, self.interval
        )?;
        if let Some(ms) = self.user_timeout_ms {
            write!(f, " user_timeout={ms}ms")?;
        }
        if !self.risk.is_default() {
            write!(f, " at_risk={}", self.risk)?;
        }
        Ok(())
    }
}

fn check(what: &'static str, value: u32, min: u32, max: u32) -> Result<(), InvalidInput> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(InvalidInput::OutOfRange {
            what,
            value: value.into(),
            min: min.into(),
            max: max.into(),
        })
    }
}

/// Parses a whole number for a clap argument, naming the argument.
pub fn parse_u32(what: &'static str, s: &str) -> Result<u32, InvalidInput> {
    s.trim()
        .parse::<u32>()
        .map_err(|_| InvalidInput::NotANumber {
            what,
            value: s.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_limits() {
        assert!(Policy::new(1, 1, 1, None).is_ok());
        assert!(Policy::new(32767, 127, 32767, Some(0)).is_ok());
    }

    #[test]
    fn rejects_out_of_range() {
        for (i, c, n) in [
            (0, 1, 1),
            (32768, 1, 1),
            (1, 0, 1),
            (1, 128, 1),
            (1, 1, 0),
            (1, 1, 32768),
        ] {
            assert!(Policy::new(i, c, n, None).is_err(), "{i} {c} {n}");
        }
        assert!(Policy::new(1, 1, 1, Some(u32::MAX)).is_err());
    }

    #[test]
    fn raw_round_trip() {
        let p = Policy::new(60, 5, 5, Some(10_000)).unwrap();
        assert_eq!(Policy::from_raw(&p.to_raw()), p);
        let p = Policy::new(60, 5, 5, None).unwrap();
        assert_eq!(Policy::from_raw(&p.to_raw()), p);
        assert_eq!(p.dead_after_secs(), 85);
    }
}
