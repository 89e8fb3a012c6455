//! Giving freed heap back to the operating system.
//!
//! glibc keeps what the proxy frees in its arenas. After a burst of large bodies a
//! sidecar would hold its peak heap for good: measured on the server side of the
//! benchmark pair, 14.7 MiB anonymous memory after a 64 KiB-body burst of which 7.6 MiB
//! was live. Once traffic has calmed down, trimming returns the rest to the node.
//!
//! Only once it has calmed down: a trim holds the allocator while it walks the heap, and
//! the pages it returns fault back in as traffic allocates again. With a trim every 10 s,
//! six open-loop runs at 1,000 req/s after a burst gave p99 0.77–1.12 ms; without, six
//! gave 0.45–0.97 ms (a noisy VM: the direction, not the size, is the finding).
//!
//! A flood of connections that then closes is the other case: 5,000 idle connections
//! opened and closed left the (debug-build) proxy 32 MiB above its baseline, and the
//! flood's own CPU kept the quiet rule from trimming until long after. So a trim also
//! follows a fall in open connections to half their peak or less (at least
//! [`CONNECTION_FALL`] fewer): the count is one atomic load a second, and a trim then
//! happens once per fall, not per connection, off the connections' tasks.

use std::time::Duration;

use tokio::time::Instant;

use crate::lifecycle::Drain;
// glibc's readings and trim (`os` holds the `unsafe` calls). Elsewhere the fallbacks
// below: unknown CPU time never counts as quiet, and other allocators return memory on
// their own terms.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
use crate::os::{free_heap_bytes, process_cpu_time as cpu_time, trim_heap as release};

/// How often the proxy checks whether to hand memory back when quiet.
pub(crate) const RELEASE_INTERVAL: Duration = Duration::from_secs(10);

/// How often open connections are counted for a fall.
const CONNECTION_CHECK: Duration = Duration::from_secs(1);

/// A fall in open connections this large (and to half the peak or less) calls for a
/// trim even while busy: below it, what the closed connections freed (~8 KiB each) is
/// not worth one.
const CONNECTION_FALL: usize = 256;

/// Quiet means under 1 % of a core over a whole interval (1,000 req/s is ~13 %).
const QUIET_SHARE: u32 = 100;

/// Less newly freed heap than this is not worth a trim.
const MIN_RELEASE_BYTES: usize = 1 << 20;

/// Forever: every `every`, hands freed heap back if the proxy was quiet all along, and
/// within a second of the open connections (of `drain`) falling from a peak.
pub(crate) async fn release_when_quiet(every: Duration, drain: Drain) {
    release_loop(every, || drain.open_connections(), free_heap_bytes, release).await
}

/// [`release_when_quiet`] with its readings and its trim passed in (tests).
async fn release_loop(
    every: Duration,
    open_connections: impl Fn() -> usize,
    free_heap: impl Fn() -> usize,
    mut trim: impl FnMut(),
) {
    let mut ticker = tokio::time::interval(CONNECTION_CHECK.min(every));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut before = cpu_time();
    let mut interval_start = Instant::now();
    let mut trimmed = Trimmed::default();
    let mut peak = Peak::default();
    loop {
        ticker.tick().await;
        let fell = peak.fell(open_connections());
        let interval_over = interval_start.elapsed() >= every;
        let due = if fell {
            trimmed.due_after_fall(free_heap())
        } else if interval_over {
            // Unknown CPU time never counts as quiet.
            let busy = match (cpu_time(), before) {
                (Some(now), Some(before)) => now.saturating_sub(before),
                _ => Duration::MAX,
            };
            trimmed.due(busy, every, free_heap())
        } else {
            false
        };
        if due {
            trim();
            trimmed.done(free_heap());
        }
        if interval_over {
            before = cpu_time();
            interval_start = Instant::now();
        }
    }
}

/// The most connections open since the last fall.
#[derive(Default)]
struct Peak(usize);

impl Peak {
    /// Whether `open` connections are a fall from the peak; a fall starts a new peak.
    fn fell(&mut self, open: usize) -> bool {
        self.0 = self.0.max(open);
        let fell = self.0 - open >= CONNECTION_FALL && open <= self.0 / 2;
        if fell {
            self.0 = open;
        }
        fell
    }
}

/// How much of glibc's free heap is already back with the kernel: glibc still counts
/// trimmed pages as free, so without this an idle proxy would trim again every interval.
#[derive(Default)]
struct Trimmed(usize);

impl Trimmed {
    /// Whether to trim now, with `free` bytes free in the heap.
    fn due(&mut self, busy: Duration, interval: Duration, free: usize) -> bool {
        // Free heap reused since the last trim is back in use: at most what is free now
        // can still be trimmed.
        self.0 = self.0.min(free);
        worth_releasing(busy, interval, free - self.0)
    }

    /// Whether to trim now, busy or not, after open connections fell.
    fn due_after_fall(&mut self, free: usize) -> bool {
        self.0 = self.0.min(free);
        free - self.0 >= MIN_RELEASE_BYTES
    }

    /// After a trim, with `free` bytes free (all of them back with the kernel).
    fn done(&mut self, free: usize) {
        self.0 = free;
    }
}

/// Quiet for the whole interval, with enough memory freed since the last trim.
fn worth_releasing(busy: Duration, interval: Duration, newly_free_bytes: usize) -> bool {
    busy <= interval / QUIET_SHARE && newly_free_bytes >= MIN_RELEASE_BYTES
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn cpu_time() -> Option<Duration> {
    None
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn free_heap_bytes() -> usize {
    0
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() {}

#[cfg(test)]
mod decision_tests {
    use super::*;

    #[test]
    fn releases_only_when_quiet_and_worth_it() {
        let interval = Duration::from_secs(10);
        let quiet = Duration::from_millis(50);
        let busy = Duration::from_millis(1_300); // ~1,000 req/s
        assert!(worth_releasing(quiet, interval, 8 << 20));
        assert!(!worth_releasing(busy, interval, 8 << 20));
        assert!(!worth_releasing(quiet, interval, 64 << 10));
        assert!(!worth_releasing(Duration::MAX, interval, 8 << 20));
    }

    #[test]
    fn trims_once_per_release_of_memory_not_every_quiet_interval() {
        let interval = Duration::from_secs(10);
        let quiet = Duration::from_millis(50);
        let busy = Duration::from_millis(1_300);
        let mut trimmed = Trimmed::default();
        assert!(trimmed.due(quiet, interval, 8 << 20));
        trimmed.done(8 << 20);
        assert!(
            !trimmed.due(quiet, interval, 8 << 20),
            "nothing new to give back"
        );
        assert!(!trimmed.due(quiet, interval, (8 << 20) + (512 << 10)));
        assert!(trimmed.due(quiet, interval, 10 << 20), "2 MiB freed since");
        trimmed.done(10 << 20);
        // Traffic reuses all but 2 MiB of the free heap, then frees 2 MiB more.
        assert!(!trimmed.due(busy, interval, 2 << 20));
        assert!(trimmed.due(quiet, interval, 4 << 20));
    }
}

#[cfg(test)]
mod loop_tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_fall_is_to_half_the_peak_and_by_enough_connections() {
        let mut peak = Peak::default();
        assert!(!peak.fell(5_000));
        assert!(!peak.fell(3_000), "not yet half");
        assert!(peak.fell(2_000));
        assert!(!peak.fell(2_000), "the same fall counts once");
        assert!(peak.fell(200), "a fall of 1,800 from 2,000");
        let mut small = Peak::default();
        assert!(!small.fell(200));
        assert!(!small.fell(0), "200 connections are not worth a trim");
    }

    #[tokio::test(start_paused = true)]
    async fn memory_goes_back_within_seconds_of_a_flood_of_connections_closing() {
        let open = Arc::new(AtomicUsize::new(0));
        let trims = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (open, trims) = (open.clone(), trims.clone());
            async move {
                release_loop(
                    RELEASE_INTERVAL,
                    move || open.load(Ordering::Relaxed),
                    // The flood's memory, freed once its connections are gone.
                    || 64 << 20,
                    move || {
                        trims.fetch_add(1, Ordering::Relaxed);
                    },
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        open.store(5_000, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(3)).await;
        open.store(0, Ordering::Relaxed);
        // Before the 10 s quiet check, which the flood's CPU may fail anyway.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(trims.load(Ordering::Relaxed), 1, "trimmed after the fall");
        task.abort();
    }
}
