//! The destinations transparent outbound has met: each virtual IP resolved through
//! discovery on first use, each service port given an outbound that follows its
//! service, both kept while used and released when unused for a while.
//!
//! Everything here is bounded: an application connecting to a million IPs makes the
//! proxy hold at most [`MAX_ADDRESSES`] answers (the least recently used go first), and
//! services beyond [`MAX_IDLE_SERVICES`] evict the least recently used idle one. A
//! service is in use while any connection holds its outbound — a long-lived HTTP/2
//! connection keeps its service followed, or its endpoints would go stale.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tessera_mesh::discovery::ResourceName;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use crate::discovery::{Discovery, MeshView, RESOLVE_TIMEOUT, Subscription};

/// How long a destination no connection uses stays followed by default. Long enough
/// that a client calling a service every few minutes keeps it warm (no round trip to
/// the control plane on its next call), short enough that a proxy's memory follows what
/// its application uses now.
pub(crate) const RELEASE_UNUSED_AFTER: Duration = Duration::from_secs(10 * 60);

/// Virtual-IP answers held at most (services and absences alike). A sidecar's
/// application uses a few dozen destinations; this leaves room for a gateway-like one
/// while bounding what a hostile one can make the proxy (and its control plane) hold.
pub(crate) const MAX_ADDRESSES: usize = 1024;

/// Service ports held beyond those in use before the least recently used idle one is
/// released. Those in use are bounded by the connection limit.
pub(crate) const MAX_IDLE_SERVICES: usize = 1024;

/// A service key (`name.namespace`) and one of its ports.
type ServicePort = (String, u16);

/// The destinations met so far. `T` is what a service port is served by (an outbound).
pub(crate) struct Destinations<T> {
    discovery: Arc<Discovery>,
    release_after: Duration,
    addresses: Mutex<HashMap<IpAddr, Address>>,
    services: Mutex<HashMap<ServicePort, Service<T>>>,
}

struct Address {
    _subscription: Subscription,
    last_used: Instant,
}

struct Service<T> {
    served_by: Arc<T>,
    /// Follows the service (and holds its subscription); aborted when it is released.
    follow: JoinHandle<()>,
    last_used: Instant,
}

impl<T> Service<T> {
    /// A connection holds the other references.
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.served_by) > 1
    }
}

fn lock<V>(map: &Mutex<V>) -> MutexGuard<'_, V> {
    map.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T> Destinations<T> {
    /// Destinations released `release_after` after their last use.
    pub(crate) fn new(discovery: Arc<Discovery>, release_after: Duration) -> Self {
        Self {
            discovery,
            release_after,
            addresses: Mutex::default(),
            services: Mutex::default(),
        }
    }

    /// The view holding the control plane's answer for `ip` — the service whose
    /// virtual IP it is, or its absence. A first use waits up to [`RESOLVE_TIMEOUT`];
    /// `None` when no answer came.
    pub(crate) async fn view_for(&self, ip: IpAddr) -> Option<Arc<MeshView>> {
        let name = ResourceName::Address(ip);
        self.touch_address(ip, &name);
        self.discovery.answered(&name, RESOLVE_TIMEOUT).await
    }

    fn touch_address(&self, ip: IpAddr, name: &ResourceName) {
        let now = Instant::now();
        let mut addresses = lock(&self.addresses);
        if let Some(address) = addresses.get_mut(&ip) {
            address.last_used = now;
            return;
        }
        if addresses.len() >= MAX_ADDRESSES {
            let oldest = addresses
                .iter()
                .min_by_key(|(_, address)| address.last_used)
                .map(|(ip, _)| *ip);
            if let Some(oldest) = oldest {
                debug!(event = "destination released", address = %oldest, reason = "address limit");
                addresses.remove(&oldest);
            }
        }
        let subscription = self.discovery.want(name.clone());
        addresses.insert(
            ip,
            Address {
                _subscription: subscription,
                last_used: now,
            },
        );
    }

    /// What serves `key` on `port`, made by `make` (with the task following it) on
    /// first use.
    pub(crate) fn service(
        &self,
        key: &str,
        port: u16,
        make: impl FnOnce() -> (Arc<T>, JoinHandle<()>),
    ) -> Arc<T> {
        let now = Instant::now();
        let mut services = lock(&self.services);
        if let Some(service) = services.get_mut(&(key.to_string(), port)) {
            service.last_used = now;
            return service.served_by.clone();
        }
        if services.len() >= MAX_IDLE_SERVICES {
            evict_least_recently_used_idle(&mut services);
        }
        debug!(event = "transparent outbound service", service = key, port);
        let (served_by, follow) = make();
        services.insert(
            (key.to_string(), port),
            Service {
                served_by: served_by.clone(),
                follow,
                last_used: now,
            },
        );
        served_by
    }

    /// Releases what has not been used for `release_after`. A service a connection
    /// still holds counts as used now.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let unused_since = |last_used: Instant| now.duration_since(last_used) >= self.release_after;
        lock(&self.addresses).retain(|_, address| !unused_since(address.last_used));
        lock(&self.services).retain(|(key, port), service| {
            if service.in_use() {
                service.last_used = now;
            }
            let keep = !unused_since(service.last_used);
            if !keep {
                debug!(event = "destination released", service = %key, port, reason = "unused");
                service.follow.abort();
            }
            keep
        });
    }

    /// Sweeps forever, often enough that nothing stays much past `release_after`.
    pub(crate) async fn sweep_periodically(&self) {
        let every = (self.release_after / 4).max(Duration::from_secs(1));
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.sweep();
        }
    }

    /// Addresses and service ports held now.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        (lock(&self.addresses).len(), lock(&self.services).len())
    }
}

fn evict_least_recently_used_idle<T>(services: &mut HashMap<ServicePort, Service<T>>) {
    let oldest = services
        .iter()
        .filter(|(_, service)| !service.in_use())
        .min_by_key(|(_, service)| service.last_used)
        .map(|(key, _)| key.clone());
    if let Some(oldest) = oldest.and_then(|key| services.remove(&key)) {
        oldest.follow.abort();
    }
}

impl<T> Drop for Destinations<T> {
    fn drop(&mut self) {
        let services = self
            .services
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for service in services.values() {
            service.follow.abort();
        }
    }
}

#[cfg(test)]
mod tests;
