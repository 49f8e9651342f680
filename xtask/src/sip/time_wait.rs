//! A busy SIP host's TIME_WAIT population, in the bench's own network
//! namespace (where Kamailio and serve run): connections on loopback that
//! this side closed first, as a proxy that closes phones' connections
//! leaves them. Every walk of the socket table passes them.
use std::{
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// TIME_WAIT sockets kept at a target count.
pub(super) struct TimeWait {
    target: usize,
    listeners: Vec<TcpListener>,
    next: usize,
    /// When each batch was made, and its size.
    batches: Vec<(Instant, usize)>,
}

/// How long the kernel keeps a TIME_WAIT socket (TCP_TIMEWAIT_LEN).
pub(super) const LIFETIME: Duration = Duration::from_secs(60);

impl TimeWait {
    /// Prepares the namespace for `target` TIME_WAIT sockets. The sysctls
    /// are the namespace's own, which ends with the bench.
    pub(super) fn new(target: usize) -> Result<Self> {
        let set = |name: &str, value: &str| {
            std::fs::write(format!("/proc/sys/net/ipv4/{name}"), value)
                .with_context(|| format!("set net.ipv4.{name} in the bench's namespace"))
        };
        // Loopback connects would otherwise reuse TIME_WAIT sockets (the
        // default tcp_tw_reuse=2) and the count would never grow past the
        // ports.
        set("tcp_tw_reuse", "0")?;
        let buckets: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_max_tw_buckets")?
            .trim()
            .parse()
            .context("net.ipv4.tcp_max_tw_buckets")?;
        if buckets < target * 2 {
            set("tcp_max_tw_buckets", &(target * 2).to_string())?;
        }
        // Ephemeral ports clear of the bench's listeners (5060, 7177, 8448).
        set("ip_local_port_range", "10000 65000")?;
        // A top-up may hold twice the target while the older half ends.
        // The kernel looks for a free ephemeral port per destination from
        // where the last search stopped, every other port first: at most
        // 10,000 per destination keeps that search short.
        let listeners = (0..(2 * target).div_ceil(10_000).max(1) + 1)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .context("listen for the TIME_WAIT connections")?;
        Ok(Self {
            target,
            listeners,
            next: 0,
            batches: Vec::new(),
        })
    }

    pub(super) fn target(&self) -> usize {
        self.target
    }

    /// TIME_WAIT sockets in this namespace now (`/proc/net/sockstat`).
    pub(super) fn count() -> Result<usize> {
        let s = std::fs::read_to_string("/proc/net/sockstat")?;
        s.lines()
            .find_map(|l| l.strip_prefix("TCP: "))
            .and_then(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let i = f.iter().position(|k| *k == "tw")?;
                f.get(i + 1)?.parse().ok()
            })
            .context("no TIME_WAIT count in /proc/net/sockstat")
    }

    /// Makes connections and closes them from this side until at least the
    /// target will still be in TIME_WAIT `ahead` from now (the kernel ends
    /// each 60 s after it began), and returns the count now.
    pub(super) fn top_up(&mut self, ahead: Duration) -> Result<usize> {
        let have = Self::count()?;
        let until = Instant::now() + ahead;
        self.batches.retain(|(at, _)| *at + LIFETIME > until);
        let lasting: usize = self.batches.iter().map(|b| b.1).sum();
        if lasting >= self.target {
            return Ok(have);
        }
        let need = self.target - lasting;
        eprint!("bench: {need} new TIME_WAIT sockets ({have} now)…");
        let start = Instant::now();
        for _ in 0..need {
            let l = &self.listeners[self.next % self.listeners.len()];
            self.next += 1;
            let client = TcpStream::connect(l.local_addr()?)
                .context("connect for a TIME_WAIT socket (ephemeral ports used up?)")?;
            let (server, _) = l.accept()?;
            // The side that closes first keeps the TIME_WAIT.
            drop(client);
            drop(server);
        }
        self.batches.push((start, need));
        let now = Self::count()?;
        eprintln!(" {now} in {:.1?}", start.elapsed());
        if now < need {
            bail!(
                "only {now} TIME_WAIT sockets of {} (net.ipv4.tcp_max_tw_buckets?)",
                self.target
            );
        }
        Ok(now)
    }
}
