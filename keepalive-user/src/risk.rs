//! Early-warning thresholds as users write them: `probe=800ms,backoff=4`,
//! `zero-window=10s`, `retrans=off`, `off` (no early warning), `default`.
//! Unnamed thresholds keep their defaults (`keepalive_common::risk`).
use std::fmt;

use keepalive_common::risk::{
    Risk, REASONS, REASON_BACKOFF, REASON_PROBE, REASON_RETRANS, REASON_ZERO_WINDOW,
};

use crate::InvalidInput;

/// Thresholds of one rule or command, validated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Thresholds(Risk);

/// The names users write, per reason.
const NAMES: [(&str, u32); 4] = [
    ("probe", REASON_PROBE),
    ("backoff", REASON_BACKOFF),
    ("zero-window", REASON_ZERO_WINDOW),
    ("retrans", REASON_RETRANS),
];

fn bad(value: &str, reason: String) -> InvalidInput {
    InvalidInput::Usage(format!("invalid at-risk thresholds {value:?}: {reason}"))
}

/// Milliseconds: `800ms`, `2s`, or a bare number of milliseconds.
fn millis(v: &str) -> Option<u32> {
    let (n, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000)
    } else {
        (v, 1)
    };
    n.parse::<u32>().ok()?.checked_mul(scale)
}

impl Thresholds {
    /// No early warning at all.
    pub const OFF: Self = Self(Risk {
        probe_ms: 0,
        zero_window_ms: 0,
        retrans: 0,
        backoff: 0,
        off: (REASON_PROBE | REASON_BACKOFF | REASON_ZERO_WINDOW | REASON_RETRANS) as u8,
    });

    /// Parses the written form; an error names what is wrong.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        let s = s.trim();
        match s {
            "" | "default" => return Ok(Self::default()),
            "off" => return Ok(Self::OFF),
            _ => {}
        }
        let mut r = Risk::default();
        let mut seen = 0u32;
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(s, format!("{part:?} is not NAME=VALUE")))?;
            let (k, v) = (k.trim(), v.trim());
            let bit = NAMES
                .iter()
                .find(|(n, _)| *n == k || n.replace('-', "_") == k)
                .map(|(_, b)| *b)
                .ok_or_else(|| {
                    bad(
                        s,
                        format!("unknown threshold {k:?} (probe, backoff, zero-window, retrans)"),
                    )
                })?;
            if seen & bit != 0 {
                return Err(bad(s, format!("{k} is given twice")));
            }
            seen |= bit;
            if v == "off" {
                r.off |= bit as u8;
                continue;
            }
            let range = |max: u32, unit: &str| {
                bad(s, format!("{k} must be 1..={max}{unit} or off, got {v:?}"))
            };
            match bit {
                REASON_PROBE | REASON_ZERO_WINDOW => {
                    const MAX_MS: u32 = 3_600_000;
                    let ms = millis(v)
                        .filter(|ms| (1..=MAX_MS).contains(ms))
                        .ok_or_else(|| range(MAX_MS, "ms"))?;
                    if bit == REASON_PROBE {
                        r.probe_ms = ms;
                    } else {
                        r.zero_window_ms = ms;
                    }
                }
                REASON_BACKOFF => {
                    // icsk_backoff is a u8; the kernel's own limit is lower.
                    r.backoff = v
                        .parse::<u8>()
                        .ok()
                        .filter(|b| (1..=15).contains(b))
                        .ok_or_else(|| range(15, ""))?;
                }
                _ => {
                    r.retrans = v
                        .parse::<u16>()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| range(u16::MAX.into(), " per 10 s"))?;
                }
            }
        }
        Ok(Self(r))
    }

    pub fn to_raw(self) -> Risk {
        self.0
    }

    pub fn from_raw(r: Risk) -> Self {
        Self(r)
    }

    /// Whether every threshold is its default.
    pub fn is_default(&self) -> bool {
        self.0 == Risk::default()
    }
}

impl fmt::Display for Thresholds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        if *self == Self::OFF {
            return f.write_str("off");
        }
        let mut parts = Vec::new();
        for (name, bit) in NAMES {
            if u32::from(r.off) & bit != 0 {
                parts.push(format!("{name}=off"));
                continue;
            }
            match bit {
                REASON_PROBE if r.probe_ms != 0 => parts.push(format!("probe={}ms", r.probe_ms)),
                REASON_ZERO_WINDOW if r.zero_window_ms != 0 => {
                    parts.push(format!("zero-window={}ms", r.zero_window_ms))
                }
                REASON_BACKOFF if r.backoff != 0 => parts.push(format!("backoff={}", r.backoff)),
                REASON_RETRANS if r.retrans != 0 => parts.push(format!("retrans={}", r.retrans)),
                _ => {}
            }
        }
        if parts.is_empty() {
            f.write_str("default")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

impl serde::Serialize for Thresholds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Thresholds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One pass of the status iterator (`pin`): the kernel's monotonic clock
/// and jiffies, which it writes after its records.
fn clocks(pin: &std::path::Path) -> crate::Result<(u64, u64)> {
    let out = crate::pass::run(pin, None, None)?;
    let tail = out
        .len()
        .checked_sub(16)
        .filter(|at| at % size_of::<keepalive_common::requests::ConnRecord>() == 0)
        .map(|at| &out[at..])
        .ok_or_else(|| crate::Error::BadRecord {
            what: format!("the iterator {}", pin.display()),
            why: format!(
                "wrote {} bytes, not whole records followed by the two clocks",
                out.len()
            ),
        })?;
    let word = |i: usize| u64::from_ne_bytes(tail[i..i + 8].try_into().expect("8 bytes"));
    Ok((word(0), word(8)))
}

/// The kernel's HZ values (`CONFIG_HZ`).
const HZ: [u64; 4] = [100, 250, 300, 1000];

/// The HZ closest to `jiffies` ticks in `ns` nanoseconds.
pub fn hz_of(jiffies: u64, ns: u64) -> u64 {
    let measured = jiffies as f64 * 1e9 / ns.max(1) as f64;
    HZ.into_iter()
        .min_by(|a, b| {
            (*a as f64 - measured)
                .abs()
                .total_cmp(&(*b as f64 - measured).abs())
        })
        .expect("not empty")
}

/// Nanoseconds per jiffy, from two passes of the status iterator 120 ms
/// apart (the kernel does not publish its HZ).
pub fn measure_jiffy_ns(pin: &std::path::Path) -> crate::Result<u32> {
    let (ns0, j0) = clocks(pin)?;
    std::thread::sleep(std::time::Duration::from_millis(120));
    let (ns1, j1) = clocks(pin)?;
    let hz = hz_of(j1.wrapping_sub(j0), ns1.wrapping_sub(ns0));
    Ok((1_000_000_000 / hz) as u32)
}

/// Names every reason (for metrics and docs).
pub fn reason_names() -> impl Iterator<Item = &'static str> {
    REASONS.into_iter().map(keepalive_common::risk::reason_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_back() {
        for (written, shown) in [
            ("default", "default"),
            ("", "default"),
            ("off", "off"),
            ("probe=800ms", "probe=800ms"),
            ("probe=2s,backoff=4", "probe=2000ms,backoff=4"),
            (
                "zero-window=10s, retrans=off",
                "zero-window=10000ms,retrans=off",
            ),
            ("zero_window=5", "zero-window=5ms"),
        ] {
            let t = Thresholds::parse(written).unwrap();
            assert_eq!(t.to_string(), shown, "{written}");
            assert_eq!(Thresholds::parse(shown).unwrap(), t);
        }
        assert_eq!(
            Thresholds::parse("probe=1s").unwrap().to_raw().probe_ms,
            1000
        );
    }

    #[test]
    fn hz_snaps_to_the_nearest_kernel_value() {
        assert_eq!(hz_of(30, 120_000_000), 250);
        assert_eq!(hz_of(29, 120_000_000), 250);
        assert_eq!(hz_of(37, 120_000_000), 300);
        assert_eq!(hz_of(120, 120_000_000), 1000);
        assert_eq!(hz_of(12, 120_000_000), 100);
    }

    #[test]
    fn refuses_what_it_cannot_mean() {
        for bad in [
            "probe",
            "probe=0",
            "probe=-1s",
            "probe=1h",
            "probe=1s,probe=2s",
            "backoff=0",
            "backoff=16",
            "retrans=0",
            "speed=3",
            "probe=1s;backoff=2",
        ] {
            let e = Thresholds::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid at-risk thresholds"), "{bad}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
