//! What every Tessera listener does when `accept` fails (out of descriptors, out of
//! memory): count it in `tessera_accept_errors_total{kind}`, log it at most once per
//! [`ACCEPT_LOG_EVERY`] with the count of lines not written, and pause, longer each time
//! in a row, instead of spinning.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::warn;

/// At most one "accept failed" line per listener this often.
pub const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The pause after a failed accept doubles from the first to the last.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_LAST: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptErrorLabels {
    /// `descriptors` (EMFILE/ENFILE), `memory` (ENOBUFS/ENOMEM), `reserve` (accepted
    /// but closed: the descriptors left are kept for the admin port and the
    /// application), or `other`.
    pub kind: &'static str,
}

/// Failed or refused accepts, process-wide: descriptors are the process's, not one
/// listener's. Each binary registers it with its own metrics.
pub static ACCEPT_ERRORS: LazyLock<Family<AcceptErrorLabels, Counter>> =
    LazyLock::new(Family::default);

/// The metric label for an accept error.
pub fn accept_error_kind(error: &std::io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => "descriptors",
        Some(libc::ENOBUFS | libc::ENOMEM) => "memory",
        _ => "other",
    }
}

/// One log line per period for a repeating event, with how many were not logged.
#[derive(Debug)]
pub struct RateLimitedLog {
    every: Duration,
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last line)` when this occurrence is to be logged.
    pub fn admit(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        match self.last {
            Some(last) if now < last + self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// What a listener does after a failed accept: count it, log it (rate-limited) and
/// pause, longer each time in a row.
#[derive(Debug)]
pub struct AcceptBackoff {
    log: RateLimitedLog,
    pause: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self {
            log: RateLimitedLog::new(ACCEPT_LOG_EVERY),
            pause: ACCEPT_BACKOFF_FIRST,
        }
    }
}

impl AcceptBackoff {
    pub async fn failed(&mut self, error: &std::io::Error) {
        let kind = accept_error_kind(error);
        ACCEPT_ERRORS
            .get_or_create(&AcceptErrorLabels { kind })
            .inc();
        if let Some(suppressed) = self.log.admit() {
            warn!(event = "accept failed", error = %error, kind, suppressed, pause_ms = self.pause.as_millis() as u64);
        }
        self.pause().await;
    }

    /// A connection refused to keep the reserve: counted by the caller, logged like a
    /// failure.
    pub async fn failed_quietly(&mut self) {
        if let Some(suppressed) = self.log.admit() {
            warn!(
                event = "connection refused",
                reason = "descriptors kept in reserve",
                suppressed
            );
        }
        self.pause().await;
    }

    pub fn succeeded(&mut self) {
        self.pause = ACCEPT_BACKOFF_FIRST;
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(ACCEPT_BACKOFF_LAST);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_accept_errors_is_one_line_per_period_with_a_count() {
        let mut log = RateLimitedLog::new(ACCEPT_LOG_EVERY);
        let mut lines = Vec::new();
        // 387 failures 50 ms apart (19 s): the flood the issue saw.
        for _ in 0..387 {
            if let Some(suppressed) = log.admit() {
                lines.push(suppressed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(lines, vec![0, 199], "a line at 0 s and at 10 s, not 387");
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_are_counted_and_reset_on_success() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let counter = ACCEPT_ERRORS.get_or_create(&AcceptErrorLabels {
            kind: "descriptors",
        });
        let before = counter.get();
        let mut backoff = AcceptBackoff::default();
        let started = tokio::time::Instant::now();
        for _ in 0..10 {
            backoff.failed(&emfile).await;
        }
        // 50 + 100 + 200 + 400 + 800 ms, then 1 s each: 6.55 s, not 10 × 50 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(6550));
        assert_eq!(counter.get() - before, 10);
        backoff.succeeded();
        let again = tokio::time::Instant::now();
        backoff.failed(&emfile).await;
        assert_eq!(again.elapsed(), ACCEPT_BACKOFF_FIRST);
    }

    #[test]
    fn accept_errors_are_named_by_what_ran_out() {
        let kind = |errno| accept_error_kind(&std::io::Error::from_raw_os_error(errno));
        assert_eq!(kind(libc::EMFILE), "descriptors");
        assert_eq!(kind(libc::ENFILE), "descriptors");
        assert_eq!(kind(libc::ENOBUFS), "memory");
        assert_eq!(kind(libc::ECONNABORTED), "other");
    }
}
