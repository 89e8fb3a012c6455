//! Retry budget: retries may add at most `ratio` of live traffic plus `minPerSecond`,
//! measured over a sliding 10-second window, so retries can never multiply an outage.
//! Lock-free: one atomic pair per one-second bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tessera_mesh::resources::RetryBudgetSpec;

const BUCKETS: usize = 10;

#[derive(Default)]
struct Bucket {
    /// The second this bucket counts; stale buckets are reset on first touch.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// Tracks requests and retries of one upstream.
pub struct RetryBudget {
    spec: RetryBudgetSpec,
    epoch: Instant,
    buckets: [Bucket; BUCKETS],
}

impl RetryBudget {
    pub fn new(spec: RetryBudgetSpec) -> Self {
        Self {
            spec,
            epoch: Instant::now(),
            buckets: Default::default(),
        }
    }

    /// The bucket of the second `now` falls in.
    fn bucket(&self, now: Instant) -> &Bucket {
        let second = now.saturating_duration_since(self.epoch).as_secs() + 1;
        let bucket = &self.buckets[(second as usize) % BUCKETS];
        let seen = bucket.second.load(Ordering::Relaxed);
        if seen != second
            && bucket
                .second
                .compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            bucket.requests.store(0, Ordering::Relaxed);
            bucket.retries.store(0, Ordering::Relaxed);
        }
        bucket
    }

    fn window(&self) -> (u64, u64) {
        let now = self.epoch.elapsed().as_secs() + 1;
        self.buckets
            .iter()
            .filter(|b| now.saturating_sub(b.second.load(Ordering::Relaxed)) < BUCKETS as u64)
            .fold((0, 0), |(requests, retries), b| {
                (
                    requests + b.requests.load(Ordering::Relaxed),
                    retries + b.retries.load(Ordering::Relaxed),
                )
            })
    }

    /// Counts an original request (not a retry), arrived at `now`: the request's own
    /// clock reading, not another one.
    pub fn deposit(&self, now: Instant) {
        self.bucket(now).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget, if there is room. Claims first and gives back
    /// when over, so concurrent callers can never overdraw the budget together.
    pub fn withdraw(&self) -> bool {
        let bucket = self.bucket(Instant::now());
        bucket.retries.fetch_add(1, Ordering::Relaxed);
        let (requests, retries) = self.window();
        let allowed = (requests as f64 * self.spec.ratio) as u64
            + u64::from(self.spec.min_per_second) * BUCKETS as u64;
        if retries > allowed {
            bucket.retries.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_ratio_of_traffic_plus_floor() {
        let budget = RetryBudget::new(RetryBudgetSpec {
            ratio: 0.2,
            min_per_second: 1,
        });
        for _ in 0..100 {
            budget.deposit(Instant::now());
        }
        // 20 % of 100 plus 1/s over the 10 s window.
        let granted = (0..1000).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 30);
    }

    #[test]
    fn zero_budget_grants_nothing() {
        let budget = RetryBudget::new(RetryBudgetSpec {
            ratio: 0.0,
            min_per_second: 0,
        });
        budget.deposit(Instant::now());
        assert!(!budget.withdraw());
    }
}
