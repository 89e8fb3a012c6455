//! Load balancing over a service's endpoints: power of two choices on a load score, with
//! outlier ejection; each endpoint keeps its pooled multiplexed HTTP/2 mTLS connections.
//!
//! The score is (requests in flight + 1) × EWMA latency, so a slow or busy endpoint loses
//! the comparison. The latency estimate decays with time since it was last fed, so an
//! endpoint that lost traffic after a bad spell is tried again instead of starved. An endpoint that fails `consecutiveFailures` times in a row is ejected
//! for `baseEjectionTime` × the number of times it has been ejected (capped), and is
//! re-admitted afterwards to prove itself again. Endpoints added or removed by discovery
//! keep their state; a removed one stays alive while requests still hold it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use rand::Rng;
use tessera_mesh::SpiffeId;
use tessera_mesh::resources::OutlierDetectionSpec;
use tracing::{info, warn};

use super::endpoint::{ConnectorFactory, Connectors};

const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Latency assumed for an endpoint before it has answered anything.
const INITIAL_EWMA_MICROS: u64 = 1_000;
/// An unfed latency estimate halves this often.
const DECAY_HALF_LIFE_MILLIS: f64 = 1_000.0;

/// One endpoint and everything learned about it.
pub struct EndpointState {
    pub address: String,
    pub identity: SpiffeId,
    pub connectors: Connectors,
    /// The pooled HTTP/2 connections, shared by all requests.
    pub h2: crate::http2::client::SharedH2,
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
pub struct InFlight(Arc<EndpointState>);

impl InFlight {
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of one upstream.
pub struct Balancer {
    name: String,
    endpoints: ArcSwap<Vec<Arc<EndpointState>>>,
    outlier: ArcSwapOption<OutlierDetectionSpec>,
    epoch: Instant,
}

impl Balancer {
    pub fn new(name: String) -> Arc<Self> {
        Arc::new(Self {
            name,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            outlier: ArcSwapOption::empty(),
            epoch: Instant::now(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces the endpoint set, keeping the state of endpoints that stay.
    pub fn update(
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

    pub fn len(&self) -> usize {
        self.endpoints.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    pub fn pick(&self, now: Instant) -> Option<InFlight> {
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
    pub fn success(&self, endpoint: &EndpointState, latency: Duration, now: Instant) {
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        let sample = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        // EWMA with weight 1/8: cheap, and quick enough to notice a slow endpoint.
        endpoint.feed(self.millis_at(now), |old| old - old / 8 + sample / 8);
    }

    /// Records a failure (connect error, reset, 5xx); ejects the endpoint when it has
    /// failed too often in a row and not too many others are ejected already.
    pub fn failure(&self, endpoint: &EndpointState) {
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
        let now = self.now_millis();
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
    pub fn readmit_expired(&self, now: Instant) {
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
mod tests {
    use super::*;
    use tokio_rustls::TlsConnector;

    fn balancer(addresses: &[&str]) -> Arc<Balancer> {
        let balancer = Balancer::new("test".into());
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let wanted: Vec<_> = addresses
            .iter()
            .map(|a| (a.to_string(), id.clone()))
            .collect();
        let trust = tessera_mesh::tls::Trust::new(
            "td",
            tessera_mesh::tls::TrustBundle::new(vec![test_root()]).unwrap(),
        );
        let factory = move |peer: &SpiffeId| {
            let make = || {
                tessera_mesh::tls::client_config(trust.clone(), peer.clone(), None, &[])
                    .map(|c| TlsConnector::from(Arc::new(c)))
            };
            Ok(Connectors {
                h2: make()?,
                http1: make()?,
                tcp: make()?,
            })
        };
        let outlier = OutlierDetectionSpec {
            consecutive_failures: 2,
            base_ejection_time: Duration::from_secs(60),
            max_ejection_percent: 50,
        };
        balancer.update(&wanted, Some(outlier), &factory);
        balancer
    }

    fn test_root() -> rustls_pki_types::CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().clone()
    }

    fn share_of(balancer: &Balancer, address: &str, picks: usize) -> f64 {
        let hits = (0..picks)
            .filter(|_| balancer.pick(Instant::now()).unwrap().endpoint().address == address)
            .count();
        hits as f64 / picks as f64
    }

    #[test]
    fn prefers_the_faster_endpoint() {
        let balancer = balancer(&["fast:1", "slow:1"]);
        for endpoint in balancer.endpoints.load().iter() {
            let latency = if endpoint.address == "fast:1" { 1 } else { 20 };
            for _ in 0..50 {
                balancer.success(endpoint, Duration::from_millis(latency), Instant::now());
            }
        }
        assert!(share_of(&balancer, "fast:1", 100) > 0.95);
    }

    #[test]
    fn ejects_after_consecutive_failures_within_the_cap() {
        let balancer = balancer(&["a:1", "b:1", "c:1", "d:1"]);
        let endpoints = balancer.endpoints.load_full();
        for endpoint in endpoints.iter().take(3) {
            balancer.failure(endpoint);
            balancer.failure(endpoint);
        }
        // At most 50 % of four endpoints may be ejected: two.
        let now = balancer.now_millis();
        let ejected = endpoints
            .iter()
            .filter(|e| e.ejected_until.load(Ordering::Relaxed) > now)
            .count();
        assert_eq!(ejected, 2);
        let picked: std::collections::HashSet<_> = (0..200)
            .map(|_| {
                balancer
                    .pick(Instant::now())
                    .unwrap()
                    .endpoint()
                    .address
                    .clone()
            })
            .collect();
        assert!(
            !picked.contains("a:1") && !picked.contains("b:1"),
            "ejected endpoints are not picked: {picked:?}"
        );
    }

    #[test]
    fn a_removed_endpoint_stays_usable_while_held() {
        let balancer = balancer(&["a:1"]);
        let held = balancer.pick(Instant::now()).unwrap();
        balancer.update(&[], None, &|_: &SpiffeId| unreachable!());
        assert!(balancer.pick(Instant::now()).is_none());
        assert_eq!(held.endpoint().address, "a:1");
    }
}
