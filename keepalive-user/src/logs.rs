//! What the daemon's log may cost it: nothing that blocks, nothing a sender
//! can forge, and a bounded amount under a flood.
//!
//! - [`Escaping`] writes each formatted line with every control character
//!   escaped but its final newline: a newline or a terminal escape in a
//!   Call-ID, an evapi message, an etcd key or a config value cannot start
//!   a line of its own or repaint a terminal, whatever path logged it.
//! - The daemon writes through a non-blocking writer (`tracing-appender`):
//!   a full pipe or a stalled journal drops lines, counted in
//!   [`dropped_lines`], and never stalls a request.
//! - [`Throttle`] summarises lines that repeat: past a rate per kind, one
//!   line per second says how many were left out.
use std::{
    borrow::Cow,
    io::Write,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

/// `s` with every control character (and DEL) written as an escape:
/// `\n`, `\r`, `\t`, `\x1b` and so on. Backslashes are doubled only when
/// something else was escaped, so a plain Windows path stays readable.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_escaped) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_escaped(c) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Characters [`escape_controls`] rewrites: C0 controls, DEL and the C1
/// controls (U+0080..U+009F: some terminals take U+009B as CSI).
fn is_escaped(c: char) -> bool {
    c.is_control()
}

/// A writer for formatted log lines: each write is one event's output
/// (tracing-subscriber's fmt layer formats an event, then writes it at
/// once), written on with control characters escaped but the last
/// newline.
pub struct Escaping<W>(pub W);

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (body, nl) = match text.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (&*text, ""),
        };
        let line = escape_controls(body);
        if matches!(line, Cow::Borrowed(_)) && matches!(text, Cow::Borrowed(_)) {
            self.0.write_all(buf)?;
        } else {
            let mut v = Vec::with_capacity(line.len() + 1);
            v.extend_from_slice(line.as_bytes());
            v.extend_from_slice(nl.as_bytes());
            self.0.write_all(&v)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The [`tracing_subscriber::fmt::MakeWriter`] of [`Escaping`] writers.
#[derive(Clone)]
pub struct MakeEscaping<M>(pub M);

impl<'a, M: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for MakeEscaping<M>
{
    type Writer = Escaping<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        Escaping(self.0.make_writer())
    }
}

/// Lines the non-blocking writer holds at most; more are dropped.
pub const BUFFERED_LINES: usize = 16_384;

static DROPPED: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// A non-blocking, escaping writer to stderr (a thread writes; when it
/// falls behind, lines are dropped and counted). Keep the guard for as long
/// as the process logs: dropping it flushes what is left.
pub fn nonblocking_stderr() -> (
    MakeEscaping<tracing_appender::non_blocking::NonBlocking>,
    tracing_appender::non_blocking::WorkerGuard,
) {
    let (w, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("tcpka-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(w.error_counter());
    (MakeEscaping(w), guard)
}

/// Log lines dropped because the writer fell behind (stderr not drained).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Lines of one kind: at most `per_second` are logged in each second; the
/// rest are counted and reported, one line per second per kind, by
/// [`Throttle::admit`] (with the next line logged) or [`Throttle::flush`].
pub struct Throttle {
    per_second: u32,
    /// A few kinds: a list.
    kinds: Mutex<Vec<(&'static str, Window)>>,
    suppressed: std::sync::atomic::AtomicU64,
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    logged: u32,
    left_out: u64,
}

/// What [`Throttle::admit`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Log the line; `left_out` lines of its kind were left out before it.
    Log { left_out: u64 },
    /// Leave it out (counted).
    Skip,
}

impl Throttle {
    pub const fn new(per_second: u32) -> Self {
        Self {
            per_second,
            kinds: Mutex::new(Vec::new()),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether a line of `kind` is logged now.
    pub fn admit(&self, kind: &'static str) -> Admit {
        self.admit_at(kind, Instant::now())
    }

    fn admit_at(&self, kind: &'static str, now: Instant) -> Admit {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let at = match kinds.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                kinds.push((
                    kind,
                    Window {
                        start: now,
                        logged: 0,
                        left_out: 0,
                    },
                ));
                kinds.len() - 1
            }
        };
        let w = &mut kinds[at].1;
        if now.duration_since(w.start) >= Duration::from_secs(1) {
            let left_out = w.left_out;
            *w = Window {
                start: now,
                logged: 1,
                left_out: 0,
            };
            return Admit::Log { left_out };
        }
        if w.logged < self.per_second {
            w.logged += 1;
            return Admit::Log { left_out: 0 };
        }
        w.left_out += 1;
        self.suppressed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Admit::Skip
    }

    /// The kinds with lines left out in a window that has ended, and how
    /// many (each reported once). Call about once a second.
    pub fn flush(&self) -> Vec<(&'static str, u64)> {
        self.flush_at(Instant::now())
    }

    fn flush_at(&self, now: Instant) -> Vec<(&'static str, u64)> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        kinds.retain(|(kind, w)| {
            let over = now.duration_since(w.start) >= Duration::from_secs(1);
            if over && w.left_out > 0 {
                out.push((*kind, w.left_out));
            }
            // An ended window is forgotten: the next line starts one.
            !over
        });
        out
    }

    /// Lines left out since the start.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The daemon's throttle of lines that repeat per request or message
/// (refusals, commands, evapi messages): 20 lines a second per kind.
pub static THROTTLE: Throttle = Throttle::new(20);

/// Logs the lines [`THROTTLE`] left out in windows that ended.
pub fn report_left_out() {
    for (kind, n) in THROTTLE.flush() {
        tracing::warn!(
            kind,
            left_out = n,
            "more lines like this in the last second were left out"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_plain_text_is_kept() {
        assert_eq!(escape_controls("plain C:\\x"), "plain C:\\x");
        assert_eq!(
            escape_controls("a\nFAKE line\x1b[31m\r\t\u{9b}"),
            "a\\nFAKE line\\x1b[31m\\r\\t\\x9b"
        );
        assert_eq!(escape_controls("x\\\ny"), "x\\\\\\ny");
    }

    #[test]
    fn a_written_line_keeps_only_its_last_newline() {
        let mut out = Vec::new();
        Escaping(&mut out)
            .write_all(b"WARN refused conn=a\nINFO forged\n")
            .unwrap();
        assert_eq!(out, b"WARN refused conn=a\\nINFO forged\n");
        let mut out = Vec::new();
        Escaping(&mut out).write_all(b"ok line\n").unwrap();
        assert_eq!(out, b"ok line\n");
    }

    #[test]
    fn a_flood_is_summarised_once_a_second() {
        let t = Throttle::new(3);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let logged = (0..100)
            .filter(|i| t.admit_at("refused", at(*i)) != Admit::Skip)
            .count();
        assert_eq!(logged, 3);
        // Another kind has its own budget.
        assert_eq!(t.admit_at("applied", at(5)), Admit::Log { left_out: 0 });
        // The next line after the window reports what was left out...
        assert_eq!(t.admit_at("refused", at(1000)), Admit::Log { left_out: 97 });
        for i in 0..10 {
            t.admit_at("refused", at(1001 + i));
        }
        // ...and so does a flush once the window is over, once.
        assert!(t.flush_at(at(1500)).is_empty());
        assert_eq!(t.flush_at(at(2000)), vec![("refused", 8)]);
        assert!(t.flush_at(at(2001)).is_empty());
        assert_eq!(t.suppressed(), 105);
    }
}
