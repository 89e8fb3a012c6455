//! Local rate limiting: the token buckets of the `RateLimitPolicy` limits that select
//! this workload, checked after authorization (a denied request takes no token) and
//! before the application is reached.
//!
//! A bucket is one `AtomicU64` updated by compare-and-swap: checking it takes no lock
//! and allocates nothing. It holds the bucket as GCRA does, as the moment it will be
//! full again (`full_at`, nanoseconds on the limiter's monotonic clock): taking a token
//! moves that moment one token interval later, and is refused when it would go further
//! than `burst` intervals past now. That is a token bucket with `burst` tokens refilled
//! one per interval, with no separate refill step to race with.
//!
//! Per-caller limits keep their buckets in a fixed table ([`KeyedBuckets`]), indexed by
//! a keyed hash (seeded at random per process, so a caller cannot aim at a slot), so a
//! caller inventing identities or header values cannot grow memory. A new key takes a
//! slot in its probe window whose bucket is already full (nothing is lost: a fresh
//! bucket is full too), else the fullest one: the key evicted starts with a full bucket
//! if it returns, which gives it at most the tokens it lacked when it was evicted.
//!
//! Limiters are kept per workload across snapshots ([`RateLimiters`]): a snapshot that
//! leaves a limit unchanged keeps its buckets, so a configuration push refills nobody.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use tessera_mesh::SpiffeId;
use tessera_mesh::policy::{self, Named, WorkloadRef};
use tessera_mesh::rate_limit::{self, CompiledLimit, LimitKey, RateLimitPolicySpec};
use tokio::time::Instant;
use tracing::warn;

use crate::telemetry::{Metrics, Workload};

/// Buckets of one per-caller limit: 4096 slots of 16 bytes, 64 KiB.
pub const KEYED_SLOTS: usize = 4096;
/// Slots a key may sit in, from the one its hash names.
const PROBE_WINDOW: usize = 8;

/// A limit's rate in bucket terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rate {
    /// Nanoseconds one token takes.
    interval: u64,
    /// Nanoseconds a full bucket holds: `burst` intervals.
    capacity: u64,
}

impl Rate {
    fn of(limit: &CompiledLimit) -> Self {
        let interval = u64::try_from(limit.token_interval.as_nanos()).unwrap_or(u64::MAX);
        Self {
            interval,
            capacity: interval.saturating_mul(limit.burst.into()),
        }
    }
}

/// One token bucket: the moment (nanoseconds since the limiter's epoch) it is full again.
#[derive(Debug, Default)]
struct TokenBucket {
    full_at: AtomicU64,
}

impl TokenBucket {
    /// Takes a token at `now`, or says how long until one is there. A `now` earlier
    /// than a previous one (a thread that read the clock before another) only makes
    /// the check stricter: `full_at` never moves back.
    fn take(&self, now: u64, rate: Rate) -> Result<(), Duration> {
        let mut full_at = self.full_at.load(Ordering::Relaxed);
        loop {
            let next = full_at.max(now).saturating_add(rate.interval);
            let limit = now.saturating_add(rate.capacity);
            if next > limit {
                return Err(Duration::from_nanos(next - limit));
            }
            match self.full_at.compare_exchange_weak(
                full_at,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => full_at = current,
            }
        }
    }

    fn full_at(&self) -> u64 {
        self.full_at.load(Ordering::Relaxed)
    }
}

/// One slot of a [`KeyedBuckets`] table: the key's hash (0: free) and its bucket.
#[derive(Debug, Default)]
struct Slot {
    tag: AtomicU64,
    bucket: TokenBucket,
}

/// The buckets of a per-caller limit, in a table of fixed size.
///
/// Two keys whose hashes collide share a bucket (with 64-bit keyed hashes, never by a
/// caller's design). Two threads claiming one slot at the same moment for different
/// keys may hand one token more or less: the table trades that for taking no lock.
pub struct KeyedBuckets {
    slots: Box<[Slot]>,
    hasher: RandomState,
}

impl KeyedBuckets {
    fn new(slots: usize) -> Self {
        debug_assert!(slots.is_power_of_two() && slots >= PROBE_WINDOW);
        Self {
            slots: (0..slots).map(|_| Slot::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    /// How many buckets the table holds; it never holds more.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn take(&self, key: &[u8], now: u64, rate: Rate) -> Result<(), Duration> {
        // Never 0, which marks a free slot.
        let tag = self.hasher.hash_one(key) | 1;
        let mask = self.slots.len() - 1;
        let start = (tag >> 16) as usize;
        let window = (0..PROBE_WINDOW).map(|i| &self.slots[(start + i) & mask]);
        if let Some(slot) = window
            .clone()
            .find(|slot| slot.tag.load(Ordering::Acquire) == tag)
        {
            return slot.bucket.take(now, rate);
        }
        // A free slot or an idle one (full_at ≤ now) has the smallest full_at; with
        // none, the fullest bucket in the window is the one whose key loses least.
        let victim = window
            .min_by_key(|slot| slot.bucket.full_at())
            .unwrap_or(&self.slots[start & mask]);
        victim.bucket.full_at.store(0, Ordering::Relaxed);
        victim.tag.store(tag, Ordering::Release);
        victim.bucket.take(now, rate)
    }
}

enum Buckets {
    Shared(TokenBucket),
    Keyed(KeyedBuckets),
}

/// One limit of one policy, with its buckets.
pub struct Limiter {
    /// `namespace/name` of the policy.
    policy: String,
    limit: CompiledLimit,
    rate: Rate,
    /// Zero of this limiter's clock (monotonic).
    epoch: Instant,
    buckets: Buckets,
    /// This workload, for the metric's labels.
    destination: Workload,
    /// `tessera_rate_limited_total` of this limit, looked up on its first refusal.
    refused: OnceLock<Counter>,
}

/// What a limit refused, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited<'a> {
    pub policy: &'a str,
    pub limit: &'a str,
    pub retry_after: Duration,
}

impl RateLimited<'_> {
    /// `Retry-After`: whole seconds until a token is there, rounded up.
    pub fn retry_after_seconds(&self) -> u64 {
        self.retry_after.as_nanos().div_ceil(1_000_000_000) as u64
    }
}

/// Who is asking, as the limits key their buckets.
pub struct Caller<'a> {
    pub identity: Option<&'a SpiffeId>,
    /// The request's headers; `None` for a connection.
    pub headers: Option<&'a HeaderMap>,
}

impl Limiter {
    fn new(policy: String, limit: CompiledLimit, destination: Workload) -> Self {
        let buckets = match limit.key {
            LimitKey::Total => Buckets::Shared(TokenBucket::default()),
            LimitKey::Identity | LimitKey::Header(_) => {
                Buckets::Keyed(KeyedBuckets::new(KEYED_SLOTS))
            }
        };
        Self {
            rate: Rate::of(&limit),
            policy,
            limit,
            epoch: Instant::now(),
            buckets,
            destination,
            refused: OnceLock::new(),
        }
    }

    /// Takes a token for `caller`, counting a refusal.
    fn take(&self, caller: &Caller<'_>, metrics: &Metrics) -> Result<(), RateLimited<'_>> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let taken = match &self.buckets {
            Buckets::Shared(bucket) => bucket.take(now, self.rate),
            Buckets::Keyed(table) => table.take(self.key(caller), now, self.rate),
        };
        taken.map_err(|retry_after| {
            self.refused
                .get_or_init(|| {
                    metrics.rate_limited_counter(
                        &self.destination,
                        self.policy.clone(),
                        self.limit.name.clone(),
                    )
                })
                .inc();
            RateLimited {
                policy: &self.policy,
                limit: &self.limit.name,
                retry_after,
            }
        })
    }

    /// The bytes that key `caller`'s bucket: its identity or the header's value; empty
    /// (one bucket for all of them) for plaintext callers or requests without it.
    fn key<'a>(&self, caller: &Caller<'a>) -> &'a [u8] {
        match &self.limit.key {
            LimitKey::Identity => caller.identity.map_or(&[], |id| id.as_str().as_bytes()),
            LimitKey::Header(name) => caller
                .headers
                .and_then(|headers| headers.get(name))
                .map_or(&[], |value| value.as_bytes()),
            LimitKey::Total => &[],
        }
    }
}

/// The limits in force on one inbound port, in policy order.
#[derive(Default, Clone)]
pub struct RateLimits {
    limiters: Vec<Arc<Limiter>>,
}

impl RateLimits {
    /// Takes a token from every limit that counts this HTTP request; the first that has
    /// none refuses it (tokens taken by the limits before it stay taken).
    pub fn check_request(
        &self,
        port: u16,
        method: &str,
        path: &str,
        caller: &Caller<'_>,
        metrics: &Metrics,
    ) -> Result<(), RateLimited<'_>> {
        self.limiters
            .iter()
            .filter(|l| l.limit.counts_request(port, method, path))
            .try_for_each(|limiter| limiter.take(caller, metrics))
    }

    /// Takes a token from every limit that counts new opaque connections to `port`.
    pub fn check_connection(
        &self,
        port: u16,
        caller: &Caller<'_>,
        metrics: &Metrics,
    ) -> Result<(), RateLimited<'_>> {
        self.limiters
            .iter()
            .filter(|l| l.limit.counts_connection(port))
            .try_for_each(|limiter| limiter.take(caller, metrics))
    }

    /// `namespace/name: limit` of each limit here, in order, for `/config`.
    pub fn describe(&self) -> Vec<String> {
        self.limiters
            .iter()
            .map(|l| format!("{}: {}", l.policy, l.limit.name))
            .collect()
    }
}

/// The limiters of this workload, kept from one snapshot to the next while their limit
/// is unchanged. Used when a snapshot is applied, never per request.
pub struct RateLimiters {
    destination: Workload,
    current: Mutex<Vec<Arc<Limiter>>>,
}

impl RateLimiters {
    pub fn new(identity: &SpiffeId) -> Self {
        Self {
            destination: Workload::of(identity),
            current: Mutex::new(Vec::new()),
        }
    }

    /// The limits of `policies` that select `workload`, for application port `port`. Every
    /// port of the workload shares a limit's buckets: a limit without ports is one
    /// budget for the workload, not one per port.
    pub fn resolve(
        &self,
        policies: &[Named<RateLimitPolicySpec>],
        workload: WorkloadRef<'_>,
        port: u16,
    ) -> RateLimits {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = Vec::new();
        for named in policies
            .iter()
            .filter(|p| policy::selects(&p.namespace, p.spec.selector.as_ref(), workload))
        {
            let id = named.id();
            let limits = match rate_limit::compile(named) {
                Ok(limits) => limits,
                Err(error) => {
                    // The control plane refuses these; one from an older control plane
                    // limits nothing rather than refusing everything.
                    warn!(event = "rate limit policy unusable", policy = %id, error = %error, "its limits are not enforced");
                    continue;
                }
            };
            for limit in limits {
                let kept = current
                    .iter()
                    .find(|l| l.policy == id && l.limit == limit)
                    .cloned();
                next.push(kept.unwrap_or_else(|| {
                    Arc::new(Limiter::new(id.clone(), limit, self.destination.clone()))
                }));
            }
        }
        let for_port = next
            .iter()
            .filter(|l| l.limit.applies_to(port))
            .cloned()
            .collect();
        *current = next;
        RateLimits { limiters: for_port }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use http::HeaderValue;
    use tessera_mesh::resources::{Spec, parse_file};

    use super::*;
    use crate::discovery::MeshView;

    const SECOND: u64 = 1_000_000_000;

    fn rate(per_second: u64, burst: u64) -> Rate {
        Rate {
            interval: SECOND / per_second,
            capacity: SECOND / per_second * burst,
        }
    }

    fn admitted(bucket: &TokenBucket, now: u64, rate: Rate, attempts: usize) -> usize {
        (0..attempts)
            .filter(|_| bucket.take(now, rate).is_ok())
            .count()
    }

    #[test]
    fn a_full_bucket_admits_a_burst_then_one_per_interval() {
        let bucket = TokenBucket::default();
        let rate = rate(10, 5);
        assert_eq!(admitted(&bucket, 0, rate, 100), 5, "the burst");
        // 100 ms later one token has come back, not more.
        assert_eq!(admitted(&bucket, SECOND / 10, rate, 100), 1);
        // After a quiet spell the bucket holds a burst again, never more.
        assert_eq!(admitted(&bucket, 60 * SECOND, rate, 100), 5);
    }

    #[test]
    fn a_refusal_says_how_long_until_a_token() {
        let bucket = TokenBucket::default();
        let rate = rate(2, 1);
        bucket.take(0, rate).unwrap();
        assert_eq!(bucket.take(0, rate), Err(Duration::from_millis(500)));
        assert_eq!(
            bucket.take(SECOND / 5, rate),
            Err(Duration::from_millis(300))
        );
        bucket.take(SECOND / 2, rate).unwrap();

        let limited = |retry_after| RateLimited {
            policy: "shop/api",
            limit: "all",
            retry_after,
        };
        assert_eq!(limited(Duration::from_millis(300)).retry_after_seconds(), 1);
        assert_eq!(limited(Duration::from_secs(1)).retry_after_seconds(), 1);
        assert_eq!(
            limited(Duration::from_millis(1001)).retry_after_seconds(),
            2
        );
        // One a minute, burst 1: the next comes in a minute.
        let slow = Rate {
            interval: 60 * SECOND,
            capacity: 60 * SECOND,
        };
        let bucket = TokenBucket::default();
        bucket.take(5 * SECOND, slow).unwrap();
        let wait = bucket.take(5 * SECOND, slow).unwrap_err();
        assert_eq!(limited(wait).retry_after_seconds(), 60);
    }

    #[test]
    fn a_clock_read_late_never_gives_tokens_back() {
        let bucket = TokenBucket::default();
        let rate = rate(10, 2);
        assert_eq!(admitted(&bucket, 10 * SECOND, rate, 10), 2);
        let full_at = bucket.full_at();
        // A thread that read the clock a second before the others.
        assert_eq!(admitted(&bucket, 9 * SECOND, rate, 10), 0);
        assert_eq!(bucket.full_at(), full_at, "full_at never moves back");
        // The extremes saturate instead of overflowing (validation keeps a full bucket
        // under an hour times a million tokens, far from them).
        let extreme = Rate {
            interval: u64::MAX / 2,
            capacity: u64::MAX,
        };
        let bucket = TokenBucket::default();
        for now in [u64::MAX, 0, u64::MAX] {
            let _ = bucket.take(now, extreme);
        }
        assert_eq!(bucket.full_at(), u64::MAX);
    }

    #[test]
    fn a_million_invented_keys_leave_the_table_its_size_and_a_polite_caller_its_budget() {
        let table = KeyedBuckets::new(KEYED_SLOTS);
        let rate = rate(10, 10);
        let before = std::mem::size_of_val(&*table.slots);
        // A greedy caller spends its burst at once, then keeps asking...
        assert_eq!(
            (0..100)
                .filter(|_| table.take(b"greedy", 0, rate).is_ok())
                .count(),
            10
        );
        // ... and is refused while a polite caller still has its whole burst.
        for second in 1..=10u64 {
            let now = second * SECOND;
            let greedy = (0..100)
                .filter(|_| table.take(b"greedy", now, rate).is_ok())
                .count();
            assert_eq!(greedy, 10, "one second's worth, not more");
            let polite = (0..5)
                .filter(|_| table.take(b"polite", now, rate).is_ok())
                .count();
            assert_eq!(
                polite, 5,
                "the greedy caller does not spend the polite one's"
            );
        }
        // A caller inventing a million keys gets a fresh bucket for each, as a key
        // never seen would; the table stays its size.
        let now = 11 * SECOND;
        for key in 0..1_000_000u64 {
            let _ = table.take(&key.to_le_bytes(), now, rate);
        }
        assert_eq!(table.capacity(), KEYED_SLOTS);
        assert_eq!(std::mem::size_of_val(&*table.slots), before);
        // The greedy caller, evicted or not, has at most one burst.
        let greedy = (0..100)
            .filter(|_| table.take(b"greedy", now, rate).is_ok())
            .count();
        assert!(greedy <= 10, "{greedy}");
    }

    #[test]
    fn a_returning_key_finds_its_own_bucket() {
        let table = KeyedBuckets::new(KEYED_SLOTS);
        let rate = rate(1, 1);
        for key in 0..200u64 {
            table.take(&key.to_le_bytes(), 0, rate).unwrap();
        }
        // Few keys for the table: none was evicted, every bucket is still empty.
        for key in 0..200u64 {
            assert!(table.take(&key.to_le_bytes(), 0, rate).is_err(), "{key}");
        }
    }

    /// The mesh view of a set of RateLimitPolicies (YAML).
    fn view(documents: &str) -> MeshView {
        let mut view = MeshView::default();
        for resource in parse_file(Path::new("limits.yaml"), documents).expect("resources") {
            let Spec::RateLimitPolicy(spec) = resource.spec else {
                unreachable!("rate limit policies only");
            };
            view.rate_limit_policies.push(Named {
                name: resource.metadata.name,
                namespace: resource.metadata.namespace.unwrap_or_default(),
                spec,
            });
        }
        view
    }

    fn policy(limits: &str) -> String {
        format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: api, namespace: shop}}\nspec:\n  limits:\n{limits}"
        )
    }

    fn orders() -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", "orders").unwrap()
    }

    fn resolve(limiters: &RateLimiters, view: &MeshView, port: u16) -> RateLimits {
        let identity = orders();
        let labels = BTreeMap::new();
        let workload = WorkloadRef {
            namespace: identity.namespace(),
            service_account: identity.service_account(),
            labels: &labels,
        };
        limiters.resolve(&view.rate_limit_policies, workload, port)
    }

    #[tokio::test(start_paused = true)]
    async fn limits_count_matching_requests_per_caller_and_are_metered() {
        let view = view(&policy(
            "  - {name: per-caller, key: identity, match: {pathPrefix: /api}, requestsPerSecond: 1, burst: 2}\n  - {name: db, connectionsPerSecond: 1, ports: [5432]}\n",
        ));
        let limiters = RateLimiters::new(&orders());
        let limits = resolve(&limiters, &view, 8080);
        let metrics = Metrics::new();
        let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
        let batch = SpiffeId::new("cluster.local", "shop", "batch").unwrap();
        let as_caller = |identity| Caller {
            identity: Some(identity),
            headers: None,
        };
        let get = |caller: &Caller<'_>, path| {
            limits
                .check_request(8080, "GET", path, caller, &metrics)
                .map_err(|l| (l.limit.to_string(), l.retry_after_seconds()))
        };
        assert!(get(&as_caller(&batch), "/api/x").is_ok());
        assert!(get(&as_caller(&batch), "/api/x").is_ok());
        assert_eq!(
            get(&as_caller(&batch), "/api/x"),
            Err(("per-caller".into(), 1))
        );
        assert!(get(&as_caller(&batch), "/health").is_ok(), "not matched");
        assert!(get(&as_caller(&web), "/api/x").is_ok(), "its own bucket");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(get(&as_caller(&batch), "/api/x").is_ok(), "refilled");
        // The connection limit is on another port.
        assert!(
            limits
                .check_connection(8080, &as_caller(&batch), &metrics)
                .is_ok()
        );
        let db = resolve(&limiters, &view, 5432);
        assert!(
            db.check_connection(5432, &as_caller(&batch), &metrics)
                .is_ok()
        );
        assert!(
            db.check_connection(5432, &as_caller(&web), &metrics)
                .is_err()
        );
        let text = metrics.encode();
        for expected in [
            r#"policy="shop/api",limit="per-caller"} 1"#,
            r#"policy="shop/api",limit="db"} 1"#,
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
        assert!(
            !text.contains("spiffe://cluster.local/ns/shop/sa/batch"),
            "no caller in the labels:\n{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn header_keys_and_a_snapshot_keep_unchanged_buckets() {
        let documents = policy(
            "  - {name: tenant, key: header, header: x-tenant, requestsPerSecond: 1, burst: 1}\n",
        );
        let limiters = RateLimiters::new(&orders());
        let metrics = Metrics::new();
        let headers = |tenant: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-tenant", HeaderValue::from_static(tenant));
            headers
        };
        let (a, b) = (headers("a"), headers("b"));
        let request = |limits: &RateLimits, headers| {
            let caller = Caller {
                identity: None,
                headers: Some(headers),
            };
            limits
                .check_request(8080, "POST", "/", &caller, &metrics)
                .is_ok()
        };
        let limits = resolve(&limiters, &view(&documents), 8080);
        assert!(request(&limits, &a));
        assert!(!request(&limits, &a));
        assert!(request(&limits, &b), "another tenant, another bucket");

        // The same limit in a new snapshot: still spent.
        let limits = resolve(&limiters, &view(&documents), 8080);
        assert!(!request(&limits, &a));
        // A changed limit starts afresh and applies at once.
        let raised = documents.replace("burst: 1", "burst: 3");
        let limits = resolve(&limiters, &view(&raised), 8080);
        assert_eq!((0..5).filter(|_| request(&limits, &a)).count(), 3);
        // A policy removed limits nothing.
        let limits = resolve(&limiters, &MeshView::default(), 8080);
        assert!((0..5).all(|_| request(&limits, &a)));
    }
}
