//! Load balancing over a service's endpoints: power of two choices on a load score, with
//! outlier ejection; each endpoint keeps its pooled multiplexed HTTP/2 mTLS connections.
//!
//! The score is (requests in flight + 1) × EWMA latency, so a slow or busy endpoint loses
//! the comparison. The latency estimate decays with time since it was last fed, so an
//! endpoint that lost traffic after a bad spell is tried again instead of starved. An
//! endpoint that fails `consecutiveFailures` times in a row is ejected for
//! `baseEjectionTime` × the number of times it has been ejected (capped), and is
//! re-admitted afterwards to prove itself again. Endpoints added or removed by discovery
//! keep their state; a removed one stays alive while requests still hold it.
//!
//! Every decision takes the caller's reading of tokio's clock: the system's monotonic
//! clock in the proxy, paused time in tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use rand::Rng;
use tessera_mesh::SpiffeId;
use tessera_mesh::resources::OutlierDetectionSpec;
use tokio::time::Instant;
use tracing::{info, warn};

use super::endpoint::{ConnectorFactory, Connectors};

const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Latency assumed for an endpoint before it has answered anything.
const INITIAL_EWMA_MICROS: u64 = 1_000;
/// An unfed latency estimate halves this often.
const DECAY_HALF_LIFE_MILLIS: f64 = 1_000.0;

/// One endpoint and everything learned about it.
pub(crate) struct EndpointState {
    pub address: String,
    pub identity: SpiffeId,
    pub connectors: Connectors,
    /// The pooled HTTP/2 connections, shared by all requests.
    pub h2: crate::http2::client::SharedH2,
    /// The request metrics of the requests this endpoint answers (its identity is their
    /// destination), resolved by the upstream at its first request.
    pub series: std::sync::OnceLock<Arc<crate::telemetry::RequestSeries>>,
    in_flight: AtomicU32,
    ewma_micros: AtomicU64,
    /// When `ewma_micros` was last fed, in milliseconds since the balancer's epoch.
    fed_at: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since the balancer's epoch; 0 when not ejected.
    ejected_until: AtomicU64,
}

impl EndpointState {
    /// Load × decayed latency; lower is better.
    fn score(&self, now_millis: u64) -> f64 {
        let idle = now_millis.saturating_sub(self.fed_at.load(Ordering::Relaxed)) as f64;
        let latency = self.ewma_micros.load(Ordering::Relaxed).max(1) as f64
            * (-idle / DECAY_HALF_LIFE_MILLIS).exp2();
        f64::from(self.in_flight.load(Ordering::Relaxed) + 1) * latency
    }

    /// Feeds the latency estimate, decaying what it held for the time it sat unfed.
    fn feed(&self, now_millis: u64, update: impl Fn(u64) -> u64) {
        let idle =
            now_millis.saturating_sub(self.fed_at.swap(now_millis, Ordering::Relaxed)) as f64;
        let held = self.ewma_micros.load(Ordering::Relaxed) as f64
            * (-idle / DECAY_HALF_LIFE_MILLIS).exp2();
        self.ewma_micros
            .store(update(held as u64), Ordering::Relaxed);
    }
}

/// Counts a request in flight on an endpoint until dropped.
pub(crate) struct InFlight(Arc<EndpointState>);

impl InFlight {
    pub(crate) fn endpoint(&self) -> &Arc<EndpointState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of one upstream.
pub(crate) struct Balancer {
    name: String,
    endpoints: ArcSwap<Vec<Arc<EndpointState>>>,
    outlier: ArcSwapOption<OutlierDetectionSpec>,
    epoch: Instant,
}

impl Balancer {
    pub(crate) fn new(name: String) -> Arc<Self> {
        Arc::new(Self {
            name,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            outlier: ArcSwapOption::empty(),
            epoch: Instant::now(),
        })
    }

    /// Replaces the endpoint set, keeping the state of endpoints that stay.
    pub(crate) fn update(
        &self,
        wanted: &[(String, SpiffeId)],
        outlier: Option<OutlierDetectionSpec>,
        connectors: &ConnectorFactory,
    ) {
        let current = self.endpoints.load_full();
        let mut next = Vec::with_capacity(wanted.len());
        for (address, identity) in wanted {
            if let Some(existing) = current
                .iter()
                .find(|e| e.address == *address && e.identity == *identity)
            {
                next.push(existing.clone());
                continue;
            }
            match connectors(identity) {
                Ok(connectors) => next.push(Arc::new(EndpointState {
                    address: address.clone(),
                    identity: identity.clone(),
                    connectors,
                    h2: crate::http2::client::SharedH2::new(crate::http::ProxyError::Unreachable),
                    series: std::sync::OnceLock::new(),
                    in_flight: AtomicU32::new(0),
                    ewma_micros: AtomicU64::new(INITIAL_EWMA_MICROS),
                    fed_at: AtomicU64::new(self.now_millis()),
                    consecutive_failures: AtomicU32::new(0),
                    ejections: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                })),
                Err(error) => {
                    warn!(event = "endpoint skipped", upstream = %self.name, address, error = %error)
                }
            }
        }
        self.outlier.store(outlier.map(Arc::new));
        self.endpoints.store(Arc::new(next));
    }

    fn now_millis(&self) -> u64 {
        self.millis_at(Instant::now())
    }

    /// `at` in milliseconds since the balancer's epoch. The per-request calls take the
    /// request's clock reading instead of each reading the clock again.
    fn millis_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Picks an endpoint: the better of two random non-ejected ones, as of `now`. `None`
    /// when there is no endpoint at all.
    pub(crate) fn pick(&self, now: Instant) -> Option<InFlight> {
        let endpoints = self.endpoints.load();
        let now = self.millis_at(now);
        let admitted = |e: &&Arc<EndpointState>| e.ejected_until.load(Ordering::Relaxed) <= now;
        let healthy = endpoints.iter().filter(admitted).count();
        let chosen = match healthy {
            0 => {
                // Everything ejected: better to try than to fail outright.
                endpoints
                    .iter()
                    .min_by_key(|e| e.ejected_until.load(Ordering::Relaxed))?
            }
            1 => endpoints.iter().find(admitted)?,
            n => {
                let mut rng = rand::rng();
                let first = rng.random_range(0..n);
                let mut second = rng.random_range(0..n - 1);
                if second >= first {
                    second += 1;
                }
                let mut candidates = endpoints.iter().filter(admitted);
                let (a, b) = if first < second {
                    (first, second)
                } else {
                    (second, first)
                };
                let x = candidates.nth(a)?;
                let y = candidates.nth(b - a - 1)?;
                if x.score(now) <= y.score(now) { x } else { y }
            }
        };
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(InFlight(chosen.clone()))
    }

    /// Records a successful answer and its latency, as of `now`.
    pub(crate) fn success(&self, endpoint: &EndpointState, latency: Duration, now: Instant) {
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        let sample = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        // EWMA with weight 1/8: cheap, and quick enough to notice a slow endpoint.
        endpoint.feed(self.millis_at(now), |old| old - old / 8 + sample / 8);
    }

    /// Records a failure (connect error, reset, 5xx) at `now`; ejects the endpoint when
    /// it has failed too often in a row and not too many others are ejected already.
    pub(crate) fn failure(&self, endpoint: &EndpointState, now: Instant) {
        let failures = endpoint
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        // Failures make an endpoint look slow too, so P2C avoids it before ejection.
        endpoint
            .ewma_micros
            .fetch_add(INITIAL_EWMA_MICROS, Ordering::Relaxed);
        let Some(outlier) = self.outlier.load_full() else {
            return;
        };
        if failures < outlier.consecutive_failures {
            return;
        }
        let now = self.millis_at(now);
        let endpoints = self.endpoints.load();
        let ejected = endpoints
            .iter()
            .filter(|e| e.ejected_until.load(Ordering::Relaxed) > now)
            .count();
        let allowed = endpoints.len() * outlier.max_ejection_percent as usize / 100;
        if ejected >= allowed || endpoint.ejected_until.load(Ordering::Relaxed) > now {
            return;
        }
        let times = endpoint.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = (outlier.base_ejection_time * times).min(MAX_EJECTION);
        endpoint
            .ejected_until
            .store(now + duration.as_millis() as u64, Ordering::Relaxed);
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        endpoint.h2.reset();
        warn!(
            event = "endpoint ejected",
            upstream = %self.name,
            address = %endpoint.address,
            identity = %endpoint.identity,
            consecutive_failures = failures,
            for_ms = duration.as_millis() as u64,
        );
    }

    /// Re-admits endpoints whose ejection ended by `now`, with a log line; called per
    /// request, cheap.
    pub(crate) fn readmit_expired(&self, now: Instant) {
        let now = self.millis_at(now);
        for endpoint in self.endpoints.load().iter() {
            let until = endpoint.ejected_until.load(Ordering::Relaxed);
            if until != 0
                && until <= now
                && endpoint
                    .ejected_until
                    .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                info!(event = "endpoint re-admitted", upstream = %self.name, address = %endpoint.address);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio_rustls::TlsConnector;

    /// Connectors for any identity, trusting a throwaway root: the tests that use them
    /// never make a TLS connection.
    pub(crate) fn connectors()
    -> impl Fn(&SpiffeId) -> Result<Connectors, tessera_mesh::tls::TlsError> + Send + Sync {
        let trust = tessera_mesh::tls::Trust::new(
            "td",
            tessera_mesh::tls::TrustBundle::new(vec![test_root()]).unwrap(),
        );
        move |peer: &SpiffeId| {
            let make = || {
                tessera_mesh::tls::client_config(trust.clone(), peer.clone(), None, &[])
                    .map(|c| TlsConnector::from(Arc::new(c)))
            };
            Ok(Connectors {
                h2: make()?,
                http1: make()?,
                tcp: make()?,
            })
        }
    }

    /// `addresses` as discovery would list them, all with one identity.
    pub(crate) fn endpoints(addresses: &[&str]) -> Vec<(String, SpiffeId)> {
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        addresses
            .iter()
            .map(|a| (a.to_string(), id.clone()))
            .collect()
    }

    pub(crate) fn test_root() -> rustls_pki_types::CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().clone()
    }

    impl Balancer {
        /// The addresses of the endpoints ejected at `now`.
        pub(crate) fn ejected(&self, now: Instant) -> Vec<String> {
            let now = self.millis_at(now);
            self.endpoints
                .load()
                .iter()
                .filter(|e| e.ejected_until.load(Ordering::Relaxed) > now)
                .map(|e| e.address.clone())
                .collect()
        }

        fn endpoint(&self, address: &str) -> Arc<EndpointState> {
            let endpoints = self.endpoints.load();
            let found = endpoints.iter().find(|e| e.address == address);
            found.expect("a listed endpoint").clone()
        }
    }

    fn outlier(consecutive_failures: u32, max_ejection_percent: u32) -> OutlierDetectionSpec {
        OutlierDetectionSpec {
            consecutive_failures,
            base_ejection_time: Duration::from_secs(60),
            max_ejection_percent,
        }
    }

    fn balancer(addresses: &[&str], outlier: OutlierDetectionSpec) -> Arc<Balancer> {
        let balancer = Balancer::new("test".into());
        balancer.update(&endpoints(addresses), Some(outlier), &connectors());
        balancer
    }

    fn share_of(balancer: &Balancer, address: &str, picks: usize, now: Instant) -> f64 {
        let hits = (0..picks)
            .filter(|_| balancer.pick(now).unwrap().endpoint().address == address)
            .count();
        hits as f64 / picks as f64
    }

    #[test]
    fn prefers_the_faster_endpoint() {
        let balancer = balancer(&["fast:1", "slow:1"], outlier(2, 50));
        let now = Instant::now();
        for endpoint in balancer.endpoints.load().iter() {
            let latency = if endpoint.address == "fast:1" { 1 } else { 20 };
            for _ in 0..50 {
                balancer.success(endpoint, Duration::from_millis(latency), now);
            }
        }
        assert!(share_of(&balancer, "fast:1", 100, now) > 0.95);
    }

    #[test]
    fn ejects_after_consecutive_failures_within_the_cap() {
        let balancer = balancer(&["a:1", "b:1", "c:1", "d:1"], outlier(2, 50));
        let now = Instant::now();
        for address in ["a:1", "b:1", "c:1"] {
            let endpoint = balancer.endpoint(address);
            balancer.failure(&endpoint, now);
            balancer.failure(&endpoint, now);
        }
        // At most 50 % of four endpoints may be ejected: two.
        assert_eq!(balancer.ejected(now), ["a:1", "b:1"]);
        let picked: std::collections::HashSet<_> = (0..200)
            .map(|_| balancer.pick(now).unwrap().endpoint().address.clone())
            .collect();
        assert!(
            !picked.contains("a:1") && !picked.contains("b:1"),
            "ejected endpoints are not picked: {picked:?}"
        );
    }

    #[test]
    fn only_failures_in_a_row_eject() {
        let balancer = balancer(&["a:1", "b:1"], outlier(3, 50));
        let a = balancer.endpoint("a:1");
        let now = Instant::now();
        for _ in 0..5 {
            balancer.failure(&a, now);
            balancer.failure(&a, now);
            balancer.success(&a, Duration::from_millis(1), now);
        }
        assert!(balancer.ejected(now).is_empty());
        balancer.failure(&a, now);
        balancer.failure(&a, now);
        balancer.failure(&a, now);
        assert_eq!(balancer.ejected(now), ["a:1"]);
    }

    #[test]
    fn an_ejected_endpoint_is_readmitted_after_its_ejection_which_grows_each_time() {
        let balancer = balancer(&["a:1", "b:1"], outlier(1, 50));
        let a = balancer.endpoint("a:1");
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        balancer.failure(&a, start);
        // Ejected for the base time, 60 s: until then only `b` is picked.
        for second in [0, 30, 59] {
            balancer.readmit_expired(at(second));
            assert_eq!(balancer.ejected(at(second)), ["a:1"], "at {second} s");
            assert_eq!(share_of(&balancer, "a:1", 20, at(second)), 0.0);
        }
        balancer.readmit_expired(at(60));
        assert!(balancer.ejected(at(60)).is_empty());
        balancer.success(&balancer.endpoint("b:1"), Duration::from_secs(1), at(60));
        assert_eq!(
            share_of(&balancer, "a:1", 20, at(60)),
            1.0,
            "back in the choice, and now the faster"
        );
        // Failing again, twice as long; then three times.
        balancer.failure(&a, at(60));
        assert_eq!(balancer.ejected(at(60 + 119)), ["a:1"]);
        assert!(balancer.ejected(at(60 + 120)).is_empty());
        balancer.failure(&a, at(180));
        assert_eq!(balancer.ejected(at(180 + 179)), ["a:1"]);
        assert!(balancer.ejected(at(180 + 180)).is_empty());
        // Never longer than the cap.
        let mut now = at(360);
        for _ in 0..10 {
            balancer.failure(&a, now);
            now += MAX_EJECTION;
        }
        assert!(balancer.ejected(now).is_empty());
    }

    #[test]
    fn when_every_endpoint_is_ejected_the_one_back_soonest_is_tried() {
        let balancer = balancer(&["a:1", "b:1"], outlier(1, 100));
        let start = Instant::now();
        balancer.failure(&balancer.endpoint("a:1"), start);
        balancer.failure(&balancer.endpoint("b:1"), start + Duration::from_secs(1));
        assert_eq!(balancer.ejected(start + Duration::from_secs(1)).len(), 2);
        assert_eq!(
            share_of(&balancer, "a:1", 20, start + Duration::from_secs(1)),
            1.0
        );
    }

    #[test]
    fn a_removed_endpoint_stays_usable_while_held() {
        let balancer = balancer(&["a:1"], outlier(2, 50));
        let held = balancer.pick(Instant::now()).unwrap();
        balancer.update(&[], None, &|_: &SpiffeId| unreachable!());
        assert!(balancer.pick(Instant::now()).is_none());
        assert_eq!(held.endpoint().address, "a:1");
    }
}
