//! The proxy's view of the mesh — only what it uses — kept current by the control
//! plane's discovery stream.
//!
//! The proxy subscribes by name ([`ResourceName`]) to its own inbound policies and to
//! the services it calls; the control plane answers each name with the resource or its
//! absence, then sends only changes. Names are wanted through [`Subscription`] guards:
//! the first guard for a name sends `subscribe` on the open stream, dropping the last
//! one sends `unsubscribe` and forgets the resource. Every change publishes a new
//! immutable [`MeshView`]; a resource that cannot be parsed is refused on its own and
//! the last good one stays. Each response's generation is acknowledged once applied
//! (`applied`), which is how operators and tests know a change is in force.
//!
//! The stream authenticates with the workload certificate, so it starts once the proxy
//! has one. When it fails for any reason (a message over [`MAX_MESSAGE_BYTES`]
//! included) the proxy keeps routing on what it holds and reconnects after a jittered
//! backoff, naming the versions it holds so that only what changed is sent again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use rand::Rng;
use tessera_mesh::discovery::{
    MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES, MAX_SUBSCRIPTIONS, NameError, PolicySet, ResourceName,
};
use tessera_mesh::policy::{
    AuthorizationPolicySpec, Named, PeerAuthenticationSpec, RequestAuthenticationSpec,
};
use tessera_mesh::rate_limit::RateLimitPolicySpec;
use tessera_mesh::snapshot::ServiceEntry;
use tessera_proto::api::discovery::discovery_client::DiscoveryClient;
use tessera_proto::api::discovery::{DiscoveryRequest, DiscoveryResponse, Resource};
use tokio::sync::{Notify, mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::control_plane::{ControlPlane, error_chain};
use crate::identity::IdentityManager;

/// How long a first use of a name waits for the control plane's answer before the
/// caller fails closed. One round trip takes milliseconds on a healthy control plane;
/// this leaves room for one busy with a fleet reconnecting, and stays below the
/// connect timeouts applications commonly set, so they see a refusal rather than
/// their own timeout.
pub(crate) const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The first reconnection delay's ceiling, doubled after each failed attempt up to
/// [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// What the proxy holds of the mesh: the services it uses, by `name.namespace`, and its
/// inbound policies.
#[derive(Debug, Default)]
pub struct MeshView {
    /// Updates applied since the proxy started (a label for `/config`, not a version
    /// the control plane knows).
    pub version: String,
    pub services: HashMap<String, Arc<ServiceEntry>>,
    pub peer_authentications: Vec<Named<PeerAuthenticationSpec>>,
    pub authorization_policies: Vec<Named<AuthorizationPolicySpec>>,
    pub request_authentications: Vec<Named<RequestAuthenticationSpec>>,
    pub rate_limit_policies: Vec<Named<RateLimitPolicySpec>>,
    /// Service keys by virtual IP, for transparent outbound routing.
    pub by_address: HashMap<IpAddr, String>,
    /// Whether the proxy's inbound policies have arrived; inbound ports fail closed
    /// until they have.
    pub policies_known: bool,
    /// The control plane's version of the policies held (empty: none).
    pub policies_version: String,
    /// Services subscribed to that the control plane says do not exist.
    pub absent_services: HashSet<String>,
}

/// The view as `/config` shows it: what the control plane sent, services in name order.
/// Nothing in it is secret (JWKS are public keys).
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshViewDump<'a> {
    pub version: &'a str,
    pub services: Vec<&'a ServiceEntry>,
    pub peer_authentications: &'a [Named<PeerAuthenticationSpec>],
    pub authorization_policies: &'a [Named<AuthorizationPolicySpec>],
    pub request_authentications: &'a [Named<RequestAuthenticationSpec>],
    pub rate_limit_policies: &'a [Named<RateLimitPolicySpec>],
}

impl MeshView {
    /// What `/config` shows of the view.
    pub fn dump(&self) -> MeshViewDump<'_> {
        let mut services: Vec<&ServiceEntry> = self.services.values().map(|s| &**s).collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        MeshViewDump {
            version: &self.version,
            services,
            peer_authentications: &self.peer_authentications,
            authorization_policies: &self.authorization_policies,
            request_authentications: &self.request_authentications,
            rate_limit_policies: &self.rate_limit_policies,
        }
    }

    /// The service a connection to `destination` is for: its virtual IP, on a port the
    /// service declares (or any port when it declares none).
    pub fn service_at(&self, destination: SocketAddr) -> Option<&str> {
        let key = self.by_address.get(&destination.ip())?;
        let service = self.services.get(key)?;
        let port_declared =
            service.ports.is_empty() || service.ports.iter().any(|p| p.port == destination.port());
        port_declared.then_some(key.as_str())
    }

    fn apply_policies(&mut self, policies: &PolicySet) {
        self.peer_authentications = policies.peer_authentications.clone();
        self.authorization_policies = policies.authorization_policies.clone();
        self.request_authentications = policies.request_authentications.clone();
        self.rate_limit_policies = policies.rate_limit_policies.clone();
        self.policies_known = true;
    }
}

/// A resource as the control plane last sent it.
#[derive(Debug, Clone)]
struct Held {
    /// The control plane's version; empty for an absent resource, as on the wire.
    version: String,
    body: Body,
}

#[derive(Debug, Clone)]
enum Body {
    Absent,
    Policies(Arc<PolicySet>),
    Service(Arc<ServiceEntry>),
}

/// Why one resource of a response was refused; the last good one stays.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0} was never subscribed to")]
    NotSubscribed(ResourceName),
    #[error("{name} version {version}: {source}")]
    Body {
        name: ResourceName,
        version: String,
        source: serde_json::Error,
    },
    #[error("{name} version {version} describes service {found}, a different one")]
    WrongService {
        name: ResourceName,
        version: String,
        found: String,
    },
}

/// Names wanted, what the control plane sent for them, and what the open stream has
/// been told. Never locked across an await.
#[derive(Debug, Default)]
struct State {
    /// Guards held per name.
    wanted: HashMap<ResourceName, usize>,
    /// The last answer to each name the control plane has answered.
    held: HashMap<ResourceName, Held>,
    /// The open stream's number, if one is open: a closed stream's sender stops.
    stream: Option<u64>,
    streams_opened: u64,
    /// Names the open stream follows (subscribed and not unsubscribed).
    sent: HashSet<ResourceName>,
    /// Names wanted or released since the open stream was last told.
    changed: BTreeSet<ResourceName>,
    /// The generation of the last response applied on the open stream, and the last
    /// one acknowledged to the control plane.
    applied: u64,
    acknowledged: u64,
    /// Updates applied: the view's label.
    updates: u64,
}

impl State {
    fn want(&mut self, name: &ResourceName) {
        let guards = self.wanted.entry(name.clone()).or_default();
        *guards += 1;
        if *guards == 1 {
            self.changed.insert(name.clone());
        }
    }

    /// Whether the open stream has something to be told.
    fn release(&mut self, name: &ResourceName) -> bool {
        let Some(guards) = self.wanted.get_mut(name) else {
            return false;
        };
        *guards -= 1;
        if *guards > 0 {
            return false;
        }
        self.wanted.remove(name);
        if self.sent.contains(name) {
            // Kept until the unsubscribe goes out: updates may still arrive until then.
            self.changed.insert(name.clone());
            true
        } else {
            self.changed.remove(name);
            self.held.remove(name);
            false
        }
    }

    /// Opens a new stream. Its first request names what is wanted, with the version held
    /// of each, as far as one request holds; the rest follow in the next ones. What is
    /// no longer wanted is forgotten.
    fn open_stream(&mut self, admin_address: SocketAddr) -> (u64, DiscoveryRequest) {
        self.streams_opened += 1;
        self.stream = Some(self.streams_opened);
        let wanted = &self.wanted;
        self.held.retain(|name, _| wanted.contains_key(name));
        self.sent.clear();
        self.changed = self.wanted.keys().cloned().collect();
        (self.applied, self.acknowledged) = (0, 0);
        let mut first = self.next_request().unwrap_or_default();
        first.admin_address = admin_address.to_string();
        (self.streams_opened, first)
    }

    fn close_stream(&mut self, stream: u64) {
        if self.stream == Some(stream) {
            self.stream = None;
            self.sent.clear();
        }
    }

    /// The next request for stream `stream`, if it has anything to be told.
    fn take_changes(&mut self, stream: u64) -> Option<DiscoveryRequest> {
        if self.stream != Some(stream) {
            return None;
        }
        self.next_request()
    }

    /// What the open stream has not been told yet, as far as one request of
    /// [`REQUEST_BUDGET`] holds: policies first, then services, then addresses. Names
    /// beyond [`MAX_SUBSCRIPTIONS`] wait for room (their first use times out meanwhile)
    /// rather than make the control plane end the stream.
    fn next_request(&mut self) -> Option<DiscoveryRequest> {
        let mut request = DiscoveryRequest::default();
        let mut size = 0;
        let mut over_limit = 0;
        let mut later = BTreeSet::new();
        for name in std::mem::take(&mut self.changed) {
            let (wanted, sent) = (self.wanted.contains_key(&name), self.sent.contains(&name));
            if wanted == sent {
                // Released and wanted again (or the reverse) before the stream was told.
                continue;
            }
            if size >= REQUEST_BUDGET {
                later.insert(name);
            } else if sent {
                let text = name.to_string();
                size += text.len() + FIELD_BYTES;
                request.unsubscribe.push(text);
                self.sent.remove(&name);
                self.held.remove(&name);
            } else if self.sent.len() >= MAX_SUBSCRIPTIONS {
                over_limit += 1;
                later.insert(name);
            } else {
                let text = name.to_string();
                size += text.len() + FIELD_BYTES;
                if let Some(held) = self.held.get(&name) {
                    size += text.len() + held.version.len() + 2 * FIELD_BYTES;
                    request.known.insert(text.clone(), held.version.clone());
                }
                request.subscribe.push(text);
                self.sent.insert(name);
            }
        }
        self.changed = later;
        if over_limit > 0 {
            warn!(
                event = "subscriptions deferred",
                waiting = over_limit,
                limit = MAX_SUBSCRIPTIONS,
                "the first use of each fails until others are released"
            );
        }
        let acknowledge = self.applied > self.acknowledged;
        if acknowledge {
            request.applied = self.applied;
            self.acknowledged = self.applied;
        }
        let nothing = request.subscribe.is_empty() && request.unsubscribe.is_empty();
        (acknowledge || !nothing).then_some(request)
    }

    /// Takes one resource, or says why not. `Ok(false)`: already held at this version.
    fn accept(&mut self, resource: Resource) -> Result<bool, Refused> {
        let name: ResourceName = resource.name.parse()?;
        if !self.sent.contains(&name) {
            return Err(Refused::NotSubscribed(name));
        }
        if self
            .held
            .get(&name)
            .is_some_and(|h| h.version == resource.version)
        {
            return Ok(false);
        }
        let body = match parse_body(&name, &resource.body) {
            Ok(body) => body,
            Err(source) => {
                let version = resource.version;
                return Err(Refused::Body {
                    name,
                    version,
                    source,
                });
            }
        };
        if let Body::Service(service) = &body {
            let fits = match &name {
                ResourceName::Service(key) => service.key() == *key,
                ResourceName::Address(ip) => service.addresses.contains(ip),
                ResourceName::Policies => false,
            };
            if !fits {
                return Err(Refused::WrongService {
                    name,
                    version: resource.version,
                    found: service.key(),
                });
            }
        }
        let version = resource.version;
        self.held.insert(name, Held { version, body });
        Ok(true)
    }

    /// Records a name as absent. `Ok(false)`: already known absent.
    fn accept_absent(&mut self, name: &str) -> Result<bool, Refused> {
        let name: ResourceName = name.parse()?;
        if !self.sent.contains(&name) {
            return Err(Refused::NotSubscribed(name));
        }
        let absent = Held {
            version: String::new(),
            body: Body::Absent,
        };
        let was_absent = self
            .held
            .insert(name, absent)
            .is_some_and(|h| matches!(h.body, Body::Absent));
        Ok(!was_absent)
    }

    fn view(&self) -> MeshView {
        let mut view = MeshView {
            version: self.updates.to_string(),
            ..MeshView::default()
        };
        // Services by key first; an address's own answer then decides who has its IP.
        for (name, held) in &self.held {
            if *name == ResourceName::Policies {
                view.policies_version = held.version.clone();
            }
            match (name, &held.body) {
                (ResourceName::Policies, Body::Policies(policies)) => view.apply_policies(policies),
                // The control plane says there are none: nothing to enforce but the
                // defaults, as with an empty policy set.
                (ResourceName::Policies, Body::Absent) => view.policies_known = true,
                (ResourceName::Service(key), Body::Service(service)) => {
                    for ip in &service.addresses {
                        view.by_address.insert(*ip, key.clone());
                    }
                    view.services.insert(key.clone(), service.clone());
                }
                (ResourceName::Service(key), Body::Absent) => {
                    view.absent_services.insert(key.clone());
                }
                _ => {}
            }
        }
        for (name, held) in &self.held {
            match (name, &held.body) {
                (ResourceName::Address(ip), Body::Service(service)) => {
                    let key = service.key();
                    view.services
                        .entry(key.clone())
                        .or_insert_with(|| service.clone());
                    view.by_address.insert(*ip, key);
                }
                (ResourceName::Address(ip), Body::Absent) => {
                    view.by_address.remove(ip);
                }
                _ => {}
            }
        }
        view
    }
}

fn parse_body(name: &ResourceName, json: &[u8]) -> Result<Body, serde_json::Error> {
    Ok(match name {
        ResourceName::Policies => Body::Policies(Arc::new(serde_json::from_slice(json)?)),
        ResourceName::Service(_) | ResourceName::Address(_) => {
            Body::Service(Arc::new(serde_json::from_slice(json)?))
        }
    })
}

/// The largest request the proxy sends, in bytes of names and versions: the control
/// plane decodes requests of up to [`MAX_REQUEST_BYTES`], and the rest is room for
/// field framing (counted by [`FIELD_BYTES`] per field) and the admin address.
const REQUEST_BUDGET: usize = MAX_REQUEST_BYTES / 4 * 3;
/// Framing of one field or map entry in a request: tag, length and slack.
const FIELD_BYTES: usize = 8;

/// Holds what the proxy follows and publishes a view whenever it changes.
pub struct Discovery {
    view: watch::Sender<Option<Arc<MeshView>>>,
    state: Mutex<State>,
    /// Wakes the open stream's sender when a name is wanted or released.
    changes: Notify,
    /// `tessera_control_plane_connected`: 1 while a stream is up.
    connected: Gauge,
}

/// A name wanted for as long as this guard lives; dropping the last guard for a name
/// unsubscribes it and forgets the resource.
#[must_use = "the name is released when the subscription is dropped"]
pub struct Subscription {
    discovery: Arc<Discovery>,
    name: ResourceName,
}

impl Subscription {
    pub fn name(&self) -> &ResourceName {
        &self.name
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Subscription({})", self.name)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.discovery.release(&self.name);
    }
}

/// Holds the connected gauge at 1 while a stream is up, and closes the stream's
/// bookkeeping however it ends.
struct OpenStream<'a> {
    discovery: &'a Discovery,
    stream: u64,
    sender: tokio::task::JoinHandle<()>,
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.sender.abort();
        self.discovery.lock().close_stream(self.stream);
        self.discovery.connected.set(0);
    }
}

/// Why a discovery stream ended, and whether it had been up.
#[derive(Debug)]
pub(crate) struct StreamEnded {
    pub connected: bool,
    pub reason: String,
}

impl Discovery {
    /// `connected` is set to 1 while the discovery stream is up, 0 otherwise. The
    /// proxy's inbound policies are wanted for its whole life.
    pub fn new(connected: Gauge) -> Arc<Self> {
        let (view, _) = watch::channel(None);
        connected.set(0);
        let mut state = State::default();
        state.want(&ResourceName::Policies);
        Arc::new(Self {
            view,
            state: Mutex::new(state),
            changes: Notify::new(),
            connected,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current view, once anything has arrived.
    pub fn current(&self) -> Option<Arc<MeshView>> {
        self.view.borrow().clone()
    }

    /// A receiver that sees every new view.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<MeshView>>> {
        self.view.subscribe()
    }

    /// Whether the proxy's inbound policies have arrived (it can serve its inbound
    /// side).
    pub fn has_view(&self) -> bool {
        self.view
            .borrow()
            .as_ref()
            .is_some_and(|v| v.policies_known)
    }

    /// Follows `name` until the returned guard (and every other for it) is dropped.
    /// The subscription goes out on the open stream at once, or with the next one.
    pub fn want(self: &Arc<Self>, name: ResourceName) -> Subscription {
        self.lock().want(&name);
        self.changes.notify_one();
        Subscription {
            discovery: self.clone(),
            name,
        }
    }

    fn release(&self, name: &ResourceName) {
        if self.lock().release(name) {
            self.changes.notify_one();
        }
    }

    /// Every name wanted now: policies, services, addresses.
    pub fn wanted(&self) -> Vec<ResourceName> {
        let mut wanted: Vec<_> = self.lock().wanted.keys().cloned().collect();
        wanted.sort();
        wanted
    }

    /// Whether the control plane has answered `name` (with the resource or its absence).
    pub fn is_answered(&self, name: &ResourceName) -> bool {
        self.lock().held.contains_key(name)
    }

    /// The view once it holds the control plane's answer to `name`, waiting up to
    /// `within`; `None` when no answer came (the caller fails closed).
    pub async fn answered(&self, name: &ResourceName, within: Duration) -> Option<Arc<MeshView>> {
        let mut views = self.view.subscribe();
        let wait = async {
            loop {
                // Checked after subscribing: a view published in between wakes us.
                if self.is_answered(name) {
                    return self.current();
                }
                if views.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(within, wait).await.ok().flatten()
    }

    /// Wants `name` and waits up to `within` for its answer: the first use of a name.
    pub async fn resolve(
        self: &Arc<Self>,
        name: ResourceName,
        within: Duration,
    ) -> (Subscription, Option<Arc<MeshView>>) {
        let subscription = self.want(name);
        let view = self.answered(subscription.name(), within).await;
        (subscription, view)
    }

    /// Follows the discovery stream forever, telling the control plane where this
    /// proxy's admin port is.
    pub async fn run(
        self: Arc<Self>,
        control_plane: ControlPlane,
        identity: Arc<IdentityManager>,
        admin_address: SocketAddr,
    ) {
        let mut backoff = Backoff::default();
        loop {
            while !identity.has_valid_cert() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let ended = self.follow(&control_plane, &identity, admin_address).await;
            if ended.connected {
                backoff = Backoff::default();
            }
            let retry = backoff.next_delay(rand::rng().random());
            warn!(event = "discovery stream lost", reason = %ended.reason, retry_in_ms = retry.as_millis() as u64, "routing on the last configuration");
            tokio::time::sleep(retry).await;
        }
    }

    async fn follow(
        self: &Arc<Self>,
        control_plane: &ControlPlane,
        identity: &IdentityManager,
        admin_address: SocketAddr,
    ) -> StreamEnded {
        match control_plane
            .connect(identity.trust(), Some(identity.current_cert()))
            .await
        {
            Ok(channel) => self.discover(channel, admin_address).await,
            Err(error) => StreamEnded {
                connected: false,
                reason: error.to_string(),
            },
        }
    }

    /// Follows one discovery stream until it fails. Whatever ends it — the control plane
    /// going away, a message too large to decode, any other status — only ends the
    /// stream: what the proxy holds stays until the control plane replaces it.
    pub(crate) async fn discover(
        self: &Arc<Self>,
        channel: Channel,
        admin_address: SocketAddr,
    ) -> StreamEnded {
        let (stream, first) = self.lock().open_stream(admin_address);
        // One request in flight at a time: what changes meanwhile waits in `State`,
        // merged, so a slow control plane cannot make the queue grow.
        let (requests, outgoing) = mpsc::channel(1);
        let ended = |reason: String| StreamEnded {
            connected: false,
            reason,
        };
        if requests.try_send(first).is_err() {
            return ended("discovery request queue closed".into());
        }
        let open = OpenStream {
            discovery: self,
            stream,
            sender: tokio::spawn(self.clone().send_changes(stream, requests)),
        };
        let call = DiscoveryClient::new(channel)
            // The control plane splits its answers so that none is larger.
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .discover(ReceiverStream::new(outgoing))
            .await;
        let mut responses = match call {
            Ok(responses) => responses.into_inner(),
            Err(status) => {
                return ended(format!("{:?}: {}", status.code(), status.message()));
            }
        };
        self.connected.set(1);
        let reason = loop {
            match responses.message().await {
                Ok(Some(response)) => self.apply(response),
                Ok(None) => break "control plane closed the stream".to_string(),
                Err(status) => break error_chain(&status),
            }
        };
        drop(open);
        StreamEnded {
            connected: true,
            reason,
        }
    }

    /// Sends stream `stream` each change to what is wanted, merged into as few requests
    /// as the request budget allows, and acknowledges each response applied.
    async fn send_changes(self: Arc<Self>, stream: u64, requests: mpsc::Sender<DiscoveryRequest>) {
        loop {
            let next = self.lock().take_changes(stream);
            let Some(request) = next else {
                // A change made since the lock was released left a permit.
                self.changes.notified().await;
                continue;
            };
            debug!(
                event = "discovery request",
                subscribe = request.subscribe.len(),
                unsubscribe = request.unsubscribe.len(),
                applied = request.applied,
            );
            if requests.send(request).await.is_err() {
                return;
            }
        }
    }

    /// Applies one response, each resource on its own: a refused one keeps the last
    /// good one.
    fn apply(&self, response: DiscoveryResponse) {
        let mut state = self.lock();
        let mut changed = 0;
        for resource in response.resources {
            match state.accept(resource) {
                Ok(updated) => changed += usize::from(updated),
                Err(refused) => {
                    warn!(event = "resource refused", reason = %refused, "keeping the last good one")
                }
            }
        }
        for name in &response.absent {
            match state.accept_absent(name) {
                Ok(updated) => changed += usize::from(updated),
                Err(refused) => warn!(event = "absence refused", reason = %refused),
            }
        }
        // Acknowledged whatever was refused: the proxy is as far as it will get with
        // this generation, and operators waiting for it to be in force see the warning.
        state.applied = state.applied.max(response.generation);
        self.changes.notify_one();
        if changed == 0 {
            return;
        }
        state.updates += 1;
        let view = state.view();
        info!(
            event = "configuration received",
            version = state.updates,
            changed,
            services = view.services.len()
        );
        // Published under the lock, so `answered` never sees an answer before its view.
        self.view.send_replace(Some(Arc::new(view)));
    }
}

/// The control plane's side played by hand, for tests of what uses discovery.
#[cfg(test)]
impl Discovery {
    /// Opens a stream in the bookkeeping only; its number.
    pub(crate) fn open_stream_by_hand(&self) -> u64 {
        self.lock()
            .open_stream(SocketAddr::from(([127, 0, 0, 1], 15020)))
            .0
    }

    /// What stream `stream` would be told now.
    pub(crate) fn changes_by_hand(&self, stream: u64) -> Option<DiscoveryRequest> {
        self.lock().take_changes(stream)
    }

    pub(crate) fn respond_by_hand(&self, resources: Vec<Resource>, absent: &[&str]) {
        self.apply(DiscoveryResponse {
            resources,
            absent: absent.iter().map(ToString::to_string).collect(),
            generation: 0,
        });
    }
}

/// Reconnection delays with equal jitter: each at least half its ceiling, so a control
/// plane refusing everyone is not hammered, and spread over the other half, so a fleet
/// that lost its control plane at the same moment does not come back at the same one.
#[derive(Debug)]
struct Backoff {
    ceiling: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            ceiling: FIRST_RETRY,
        }
    }
}

impl Backoff {
    /// The next delay for `unit`, a random draw in [0, 1).
    fn next_delay(&mut self, unit: f64) -> Duration {
        let half = self.ceiling / 2;
        let delay = half + half.mul_f64(unit.clamp(0.0, 1.0));
        self.ceiling = (self.ceiling * 2).min(MAX_RETRY);
        delay
    }
}

#[cfg(test)]
mod tests;
