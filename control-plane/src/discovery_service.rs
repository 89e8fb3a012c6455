//! The discovery API: each proxy, authenticated by its mTLS certificate, subscribes to
//! the resources it uses and receives each one, then every change to it.
//!
//! Every configuration is published as a [`Catalog`] on a `watch` channel. A stream
//! remembers the version it sent of each name it follows and, whenever the catalog or
//! its subscriptions change, sends what differs — so a change reaches only the streams
//! following what changed, and a slow proxy skips straight to the newest content; the
//! control plane never queues old versions for it.
//!
//! Each open stream is a connected proxy: [`ConnectedProxies`] lists them (identity,
//! address, where its admin port is) on the admin port's `/proxies`, so `tessera stat`
//! can find every proxy through the control plane.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tessera_mesh::discovery::{MAX_MESSAGE_BYTES, MAX_SUBSCRIPTIONS, ResourceName};
use tessera_proto::api::discovery::discovery_server::Discovery;
use tessera_proto::api::discovery::{DiscoveryRequest, DiscoveryResponse, Resource};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use crate::catalog::{Body, Catalog, Version};
use crate::grpc::Caller;
use crate::telemetry::Metrics;

/// A caller must say what it follows this soon after opening its stream.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Queued answers a stream keeps room for once they are sent.
const OUTGOING_KEPT: usize = 4;
/// Room in a message for the fields around the resources.
const MESSAGE_SLACK: usize = 64 * 1024;
/// A message is sent once it holds this much (a larger resource goes alone). tonic
/// keeps each stream's encode buffer as large as the largest message it encoded, for
/// the stream's life: small messages keep every idle stream small.
const MESSAGE_TARGET_BYTES: usize = 4 * 1024;

/// Serves `Discover`.
pub(crate) struct DiscoveryService {
    pub catalogs: watch::Receiver<Arc<Catalog>>,
    pub metrics: Arc<Metrics>,
    pub proxies: Arc<ConnectedProxies>,
}

/// The proxies with an open discovery stream. One small entry per stream, dropped with
/// it: the list grows only as the open streams themselves do.
#[derive(Default)]
pub(crate) struct ConnectedProxies {
    streams: Mutex<BTreeMap<u64, ConnectedProxy>>,
    next: std::sync::atomic::AtomicU64,
}

/// One connected proxy, as `/proxies` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConnectedProxy {
    /// Its SPIFFE ID, from its certificate.
    pub identity: String,
    /// Where its stream comes from.
    pub address: SocketAddr,
    /// Where its admin port can be reached, when known.
    pub admin: Option<SocketAddr>,
    /// Why `admin` is not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_unknown: Option<String>,
    /// RFC 3339, UTC.
    pub connected_since: String,
    /// The configuration generation in force on the proxy: it acknowledged applying
    /// every change of it up to this one that concerns it. 0 until its first answer.
    #[serde(default)]
    pub generation: u64,
}

impl ConnectedProxies {
    /// Every connected proxy, by identity then address.
    pub(crate) fn list(&self) -> Vec<ConnectedProxy> {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let mut proxies: Vec<ConnectedProxy> = streams.values().cloned().collect();
        proxies.sort_by(|a, b| (&a.identity, a.address).cmp(&(&b.identity, b.address)));
        proxies
    }

    /// Records the generation in force on the proxy of `registration`.
    fn set_generation(&self, registration: &Registration, generation: u64) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(proxy) = streams.get_mut(&registration.id) {
            proxy.generation = generation;
        }
    }

    fn add(self: &Arc<Self>, proxy: ConnectedProxy) -> Registration {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.insert(id, proxy);
        Registration {
            proxies: self.clone(),
            id,
        }
    }
}

/// Removes a proxy from the list when its stream ends.
struct Registration {
    proxies: Arc<ConnectedProxies>,
    id: u64,
}

impl Registration {
    fn set_generation(&self, generation: u64) {
        self.proxies.set_generation(self, generation);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut streams = self
            .proxies
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        streams.remove(&self.id);
    }
}

/// Where operators reach a proxy's admin port: the port it reports, at the address its
/// stream comes from. The proxy's word is never taken for the host — a proxy naming
/// another host would send operators' tools there — so an admin port bound to one
/// specific address other than that one (loopback included, from another host) is
/// unknown, and says why.
pub(crate) fn admin_address(reported: &str, caller: SocketAddr) -> Result<SocketAddr, String> {
    if reported.is_empty() {
        return Err("the proxy does not report it (a version that predates it)".into());
    }
    let reported: SocketAddr = reported
        .parse()
        .map_err(|_| "the proxy reported no IP:port".to_string())?;
    let caller_ip = caller.ip().to_canonical();
    let bound = reported.ip().to_canonical();
    let reachable = bound.is_unspecified()
        || bound == caller_ip
        || (bound.is_loopback() && caller_ip.is_loopback());
    if reachable {
        let host = if bound.is_unspecified() {
            caller_ip
        } else {
            bound
        };
        Ok(SocketAddr::new(host, reported.port()))
    } else if bound.is_loopback() {
        Err(format!(
            "it listens on {reported}, reachable only on the proxy's host"
        ))
    } else {
        Err(format!(
            "it listens on {reported}, not on {caller_ip}, where the proxy connects from"
        ))
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type DiscoverStream = ResponseStream;

    async fn discover(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::DiscoverStream>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let Some(Caller {
            address,
            identity: Some(identity),
        }) = caller
        else {
            return Err(Status::unauthenticated(
                "discovery requires a workload certificate",
            ));
        };
        let proxy = ConnectedProxy {
            identity: identity.to_string(),
            address,
            admin: None,
            admin_unknown: None,
            connected_since: rfc3339(SystemTime::now()),
            generation: 0,
        };
        let subscriber = Subscriber {
            namespace: identity.namespace().to_string(),
            subscriptions: Subscriptions::default(),
            catalogs: self.catalogs.clone(),
            requests: request.into_inner(),
            outgoing: VecDeque::new(),
            metrics: self.metrics.clone(),
            progress: Progress::default(),
            state: State::AwaitingFirst {
                proxy,
                proxies: self.proxies.clone(),
            },
        };
        // The stream is the subscriber: tonic polls it for the next message when the
        // connection can take one, and drops it (ending the subscription) when the
        // proxy goes away. No task or channel of its own per stream.
        let responses = futures_util::stream::unfold(subscriber, |mut subscriber| async move {
            let next = subscriber.next().await?;
            Some((next, subscriber))
        });
        Ok(Response::new(Box::pin(responses)))
    }
}

/// One discovery stream: what its proxy follows, and the answers not yet taken.
struct Subscriber {
    /// The caller's namespace, from its certificate: which policies it receives.
    namespace: String,
    subscriptions: Subscriptions,
    catalogs: watch::Receiver<Arc<Catalog>>,
    requests: Streaming<DiscoveryRequest>,
    /// Answers to hand to tonic, in order; an error ends the stream after it.
    outgoing: VecDeque<Result<DiscoveryResponse, Status>>,
    metrics: Arc<Metrics>,
    progress: Progress,
    state: State,
}

/// Where a stream is in its life.
enum State {
    /// Opened, waiting for the proxy to say what it follows.
    AwaitingFirst {
        proxy: ConnectedProxy,
        proxies: Arc<ConnectedProxies>,
    },
    /// Following: listed in `/proxies` and counted until dropped.
    Following {
        registration: Registration,
        _gauge: StreamGauge,
    },
    /// Done: what is in `outgoing` is the last of it.
    Ended,
}

/// How far a proxy has come: what it was sent and what it acknowledged.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Progress {
    /// The generation of the last message sent.
    sent: u64,
    /// The last generation the proxy acknowledged.
    applied: u64,
    /// The generation the proxy is at once it acknowledges `sent`.
    target: u64,
}

impl Progress {
    /// A generation the proxy was brought up to, by `sent_any` messages or by none
    /// (nothing it follows changed). Returns the generation now in force, if known.
    fn reached(&mut self, generation: u64, sent_any: bool) -> Option<u64> {
        self.target = self.target.max(generation);
        if sent_any {
            self.sent = generation;
        }
        self.in_force()
    }

    /// The proxy's acknowledgement. Returns the generation now in force, if known.
    fn acknowledged(&mut self, applied: u64) -> Option<u64> {
        // A proxy cannot acknowledge what it was never sent.
        self.applied = self.applied.max(applied.min(self.sent));
        self.in_force()
    }

    fn in_force(&self) -> Option<u64> {
        (self.applied >= self.sent).then_some(self.target)
    }
}

impl Subscriber {
    /// The next message for the proxy, waiting for a request or a new catalog when
    /// there is none; `None` once the stream is over.
    async fn next(&mut self) -> Option<Result<DiscoveryResponse, Status>> {
        loop {
            if let Some(message) = self.outgoing.pop_front() {
                if message.is_ok() {
                    self.metrics.config_pushes.inc();
                }
                if self.outgoing.is_empty() {
                    // A large first answer's room is not kept for the stream's life.
                    self.outgoing.shrink_to(OUTGOING_KEPT);
                }
                return Some(message);
            }
            match std::mem::replace(&mut self.state, State::Ended) {
                State::Ended => return None,
                State::AwaitingFirst { proxy, proxies } => self.first(proxy, proxies).await,
                State::Following {
                    registration,
                    _gauge,
                } => {
                    if self.follow(&registration).await {
                        self.state = State::Following {
                            registration,
                            _gauge,
                        };
                    }
                }
            }
        }
    }

    /// Waits for the proxy's first request, lists the proxy and answers it.
    async fn first(&mut self, mut proxy: ConnectedProxy, proxies: Arc<ConnectedProxies>) {
        let first = match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, self.requests.message()).await
        {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return,
            Ok(Err(status)) => return self.outgoing.push_back(Err(status)),
            Err(_) => {
                let status = Status::deadline_exceeded(format!(
                    "no subscription within {} s",
                    FIRST_REQUEST_TIMEOUT.as_secs()
                ));
                return self.outgoing.push_back(Err(status));
            }
        };
        let admin = admin_address(&first.admin_address, proxy.address);
        proxy.admin_unknown = admin.as_ref().err().cloned();
        proxy.admin = admin.ok();
        info!(event = "discovery stream opened", identity = %proxy.identity, caller = %proxy.address);
        let registration = proxies.add(proxy);
        let gauge = StreamGauge::open(&self.metrics.discovery_streams);
        if self.answer(first, &registration) {
            self.state = State::Following {
                registration,
                _gauge: gauge,
            };
        }
    }

    /// Waits for the next request or catalog and queues what it calls for; false when
    /// the stream is over (the proxy is done, or broke the protocol: told why).
    async fn follow(&mut self, registration: &Registration) -> bool {
        tokio::select! {
            request = self.requests.message() => match request {
                Ok(Some(request)) => self.answer(request, registration),
                // The proxy is done.
                Ok(None) => false,
                // A request that could not be read (too large, not a message): the proxy
                // is told why, if it is still there to hear it.
                Err(status) => {
                    self.outgoing.push_back(Err(status));
                    false
                }
            },
            changed = self.catalogs.changed() => {
                if changed.is_err() {
                    return false;
                }
                let catalog = self.catalogs.borrow_and_update().clone();
                let messages = self.subscriptions.changes(&catalog, &self.namespace, None);
                self.queue(messages, &catalog, registration);
                true
            }
        }
    }

    /// Applies a request and queues what the new subscriptions hold; false (the error
    /// queued) when the request breaks the protocol.
    fn answer(&mut self, request: DiscoveryRequest, registration: &Registration) -> bool {
        let applied = request.applied;
        let added = match self.subscriptions.apply(request) {
            Ok(added) => added,
            Err(status) => {
                self.outgoing.push_back(Err(status));
                return false;
            }
        };
        if let Some(generation) = self.progress.acknowledged(applied) {
            registration.set_generation(generation);
        }
        if !added.is_empty() {
            let catalog = self.catalogs.borrow_and_update().clone();
            let messages = self
                .subscriptions
                .changes(&catalog, &self.namespace, Some(&added));
            self.queue(messages, &catalog, registration);
        }
        true
    }

    /// Queues `messages`, which bring the proxy up to `catalog`.
    fn queue(
        &mut self,
        messages: Vec<DiscoveryResponse>,
        catalog: &Catalog,
        registration: &Registration,
    ) {
        let sent_any = !messages.is_empty();
        for mut message in messages {
            message.generation = catalog.generation;
            self.outgoing.push_back(Ok(message));
        }
        if let Some(generation) = self.progress.reached(catalog.generation, sent_any) {
            registration.set_generation(generation);
        }
    }
}

/// What a stream's proxy follows, and what it was last told of each.
#[derive(Debug, Default)]
struct Subscriptions {
    held: HashMap<ResourceName, Held>,
}

/// What a proxy holds of one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Nothing told yet.
    Nothing,
    /// Told it does not exist.
    Absent,
    Version(Version),
}

impl Subscriptions {
    /// Applies a request; returns the names newly followed. A name that is none of the
    /// forms, or more names than a stream may follow, fails the whole stream: the proxy
    /// is broken or hostile, and a partial answer would hide it.
    fn apply(&mut self, request: DiscoveryRequest) -> Result<Vec<ResourceName>, Status> {
        for name in &request.unsubscribe {
            if let Ok(name) = name.parse::<ResourceName>() {
                self.held.remove(&name);
            }
        }
        let mut added = Vec::new();
        for name in &request.subscribe {
            let parsed: ResourceName = name
                .parse()
                .map_err(|error| Status::invalid_argument(format!("subscribe: {error}")))?;
            if self.held.contains_key(&parsed) {
                continue;
            }
            if self.held.len() >= MAX_SUBSCRIPTIONS {
                return Err(Status::resource_exhausted(format!(
                    "a stream follows at most {MAX_SUBSCRIPTIONS} resources"
                )));
            }
            let held = match request.known.get(name).map(String::as_str) {
                Some("") => Held::Absent,
                Some(version) => Version::parse(version).map_or(Held::Nothing, Held::Version),
                None => Held::Nothing,
            };
            self.held.insert(parsed.clone(), held);
            added.push(parsed);
        }
        Ok(added)
    }

    /// The messages that bring the proxy up to `catalog` for `names` (all it follows
    /// when `None`), split so that none exceeds what proxies decode; none when it is up
    /// to date.
    fn changes(
        &mut self,
        catalog: &Catalog,
        namespace: &str,
        names: Option<&[ResourceName]>,
    ) -> Vec<DiscoveryResponse> {
        let mut batch = Batch::default();
        match names {
            Some(names) => {
                for name in names {
                    if let Some(held) = self.held.get_mut(name) {
                        batch.update(name, held, catalog.get(name, namespace));
                    }
                }
            }
            None => {
                for (name, held) in &mut self.held {
                    batch.update(name, held, catalog.get(name, namespace));
                }
            }
        }
        batch.finish()
    }
}

/// Responses being filled: each closed once it holds [`MESSAGE_TARGET_BYTES`], and
/// always under [`MAX_MESSAGE_BYTES`].
#[derive(Default)]
struct Batch {
    done: Vec<DiscoveryResponse>,
    current: DiscoveryResponse,
    size: usize,
}

impl Batch {
    /// Adds what the proxy lacks of `name`, and records that it has it.
    fn update(&mut self, name: &ResourceName, held: &mut Held, current: Option<&Arc<Body>>) {
        match current {
            Some(body) if *held == Held::Version(body.version) => {}
            Some(body) => {
                *held = Held::Version(body.version);
                self.add(Resource {
                    name: name.to_string(),
                    version: body.version.to_string(),
                    body: body.json.clone(),
                });
            }
            None if *held == Held::Absent => {}
            None => {
                *held = Held::Absent;
                let name = name.to_string();
                self.make_room(name.len());
                self.current.absent.push(name);
            }
        }
    }

    fn add(&mut self, resource: Resource) {
        self.make_room(resource.name.len() + resource.version.len() + resource.body.len());
        self.current.resources.push(resource);
    }

    fn make_room(&mut self, size: usize) {
        let limit = MESSAGE_TARGET_BYTES.min(MAX_MESSAGE_BYTES - MESSAGE_SLACK);
        let full = self.size + size > limit;
        if full && (!self.current.resources.is_empty() || !self.current.absent.is_empty()) {
            self.done.push(std::mem::take(&mut self.current));
            self.size = 0;
        }
        // Per entry: its field's tag and length prefixes.
        self.size += size + 16;
    }

    fn finish(mut self) -> Vec<DiscoveryResponse> {
        if !self.current.resources.is_empty() || !self.current.absent.is_empty() {
            self.done.push(self.current);
        }
        self.done
    }
}

/// Counts an open stream in the gauge until dropped.
struct StreamGauge(prometheus_client::metrics::gauge::Gauge);

impl StreamGauge {
    fn open(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host is always the stream's: an unspecified bind is reachable there, a bind
    /// to that very address too; loopback only from the same host; any other address a
    /// proxy names is not taken (it would point operators' tools elsewhere).
    #[test]
    fn the_admin_address_is_at_the_callers_address() {
        let caller: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let at = |reported: &str, caller: SocketAddr| admin_address(reported, caller);
        assert_eq!(
            at("0.0.0.0:15020", caller),
            Ok("10.0.0.5:15020".parse().unwrap())
        );
        assert_eq!(
            at("[::]:15020", caller),
            Ok("10.0.0.5:15020".parse().unwrap())
        );
        assert_eq!(
            at("10.0.0.5:15021", caller),
            Ok("10.0.0.5:15021".parse().unwrap())
        );
        // A caller seen as an IPv4-mapped IPv6 address is the same host.
        let mapped: SocketAddr = "[::ffff:10.0.0.5]:40000".parse().unwrap();
        assert_eq!(
            at("10.0.0.5:15020", mapped),
            Ok("10.0.0.5:15020".parse().unwrap())
        );
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(
            at("127.0.0.1:15020", local),
            Ok("127.0.0.1:15020".parse().unwrap())
        );
        for (reported, why) in [
            ("127.0.0.1:15020", "reachable only on the proxy's host"),
            (
                "169.254.169.254:80",
                "not on 10.0.0.5, where the proxy connects from",
            ),
            ("", "predates it"),
            ("localhost:15020", "no IP:port"),
        ] {
            let error = at(reported, caller).unwrap_err();
            assert!(error.contains(why), "{reported}: {error}");
        }
    }

    fn catalog(services: &[(&str, &str)]) -> Catalog {
        let snapshot = tessera_mesh::snapshot::MeshSnapshot {
            trust_domain: "cluster.local".into(),
            services: services
                .iter()
                .map(|(name, address)| tessera_mesh::snapshot::ServiceEntry {
                    name: (*name).into(),
                    namespace: "shop".into(),
                    ports: Vec::new(),
                    addresses: vec![address.parse().unwrap()],
                    endpoints: Vec::new(),
                    route: None,
                })
                .collect(),
            ..Default::default()
        };
        Catalog::build(&snapshot).unwrap()
    }

    fn subscribe(names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Names and absences of `messages`, in a stable order.
    fn told(messages: &[DiscoveryResponse]) -> (Vec<String>, Vec<String>) {
        let mut resources: Vec<String> = messages
            .iter()
            .flat_map(|m| m.resources.iter().map(|r| r.name.clone()))
            .collect();
        let mut absent: Vec<String> = messages.iter().flat_map(|m| m.absent.clone()).collect();
        resources.sort();
        absent.sort();
        (resources, absent)
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// A subscription is answered with the resource or its absence, then only changes
    /// are sent: a stream that does not follow what changed gets nothing.
    #[test]
    fn only_what_changed_reaches_only_its_followers() {
        let first = catalog(&[("web", "10.96.0.10"), ("api", "10.96.0.11")]);
        let mut web = Subscriptions::default();
        let mut api = Subscriptions::default();
        let added = web
            .apply(subscribe(&[
                "policies",
                "service/web.shop",
                "address/10.96.0.99",
            ]))
            .unwrap();
        let messages = web.changes(&first, "shop", Some(&added));
        assert_eq!(
            told(&messages),
            (
                strings(&["policies", "service/web.shop"]),
                strings(&["address/10.96.0.99"])
            )
        );
        let added = api.apply(subscribe(&["address/10.96.0.11"])).unwrap();
        api.changes(&first, "shop", Some(&added));
        // Nothing changed: nothing is sent.
        assert!(web.changes(&first, "shop", None).is_empty());
        // api changes: its follower gets it, web's does not.
        let second = catalog(&[("web", "10.96.0.10"), ("api", "10.96.0.12")]);
        assert!(web.changes(&second, "shop", None).is_empty());
        assert_eq!(
            told(&api.changes(&second, "shop", None)),
            (vec![], strings(&["address/10.96.0.11"]))
        );
        // A service appearing at a followed address is sent.
        let third = catalog(&[("web", "10.96.0.10"), ("api", "10.96.0.99")]);
        assert_eq!(
            told(&web.changes(&third, "shop", None)),
            (strings(&["address/10.96.0.99"]), vec![])
        );
        // Once unsubscribed, changes are not sent.
        web.apply(DiscoveryRequest {
            unsubscribe: strings(&["service/web.shop"]),
            ..Default::default()
        })
        .unwrap();
        assert!(
            web.changes(&first, "shop", None)
                .iter()
                .all(|m| m.resources.iter().all(|r| r.name != "service/web.shop"))
        );
    }

    /// A reconnecting proxy naming what it holds is sent only what differs.
    #[test]
    fn known_versions_are_not_sent_again() {
        let catalog = catalog(&[("web", "10.96.0.10"), ("api", "10.96.0.11")]);
        let mut first = Subscriptions::default();
        let names = ["service/web.shop", "service/api.shop", "service/gone.shop"];
        let added = first.apply(subscribe(&names)).unwrap();
        let messages = first.changes(&catalog, "shop", Some(&added));
        let mut known: HashMap<String, String> = messages[0]
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        known.insert("service/gone.shop".into(), String::new());
        // The proxy's api is stale.
        known.insert("service/api.shop".into(), "0000000000000000".into());
        let mut again = Subscriptions::default();
        let added = again
            .apply(DiscoveryRequest {
                known,
                ..subscribe(&names)
            })
            .unwrap();
        assert_eq!(
            told(&again.changes(&catalog, "shop", Some(&added))),
            (strings(&["service/api.shop"]), vec![])
        );
    }

    /// A broken or hostile proxy ends its own stream, told why; it cannot make the
    /// control plane follow more than the limit.
    #[test]
    fn bad_subscriptions_end_the_stream() {
        let mut subscriptions = Subscriptions::default();
        let error = subscriptions
            .apply(subscribe(&["service/web.shop", "cluster/all"]))
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(error.message().contains("\"cluster/all\""), "{error}");
        let many: Vec<String> = (0..=MAX_SUBSCRIPTIONS)
            .map(|i| format!("address/10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
            .collect();
        let error = Subscriptions::default()
            .apply(DiscoveryRequest {
                subscribe: many,
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
        // Unknown versions and unknown names to unsubscribe are harmless.
        let mut subscriptions = Subscriptions::default();
        subscriptions
            .apply(DiscoveryRequest {
                unsubscribe: strings(&["nonsense", "service/never.shop"]),
                known: [("service/web.shop".to_string(), "zz".to_string())].into(),
                ..subscribe(&["service/web.shop"])
            })
            .unwrap();
        assert_eq!(subscriptions.held.len(), 1);
    }

    /// However much a proxy follows, no message exceeds what proxies decode.
    #[test]
    fn large_answers_are_split_into_messages_proxies_accept() {
        use prost::Message;

        let mut batch = Batch::default();
        for i in 0..40 {
            let mut held = Held::Nothing;
            let body = Arc::new(Body::test_sized(1 << 20));
            batch.update(
                &ResourceName::Service(format!("s{i}.shop")),
                &mut held,
                Some(&body),
            );
        }
        let messages = batch.finish();
        assert!(messages.len() >= 3, "{}", messages.len());
        assert_eq!(
            messages.iter().map(|m| m.resources.len()).sum::<usize>(),
            40
        );
        for message in &messages {
            assert!(message.encoded_len() <= MAX_MESSAGE_BYTES);
        }
    }

    /// Many small resources go in messages of about [`MESSAGE_TARGET_BYTES`], so no
    /// stream's encode buffer grows past that; a larger resource goes alone.
    #[test]
    fn answers_are_sent_in_small_messages() {
        use prost::Message;

        let mut batch = Batch::default();
        let mut add = |name: String, size: usize| {
            let body = Arc::new(Body::test_sized(size));
            batch.update(
                &ResourceName::Service(name),
                &mut Held::Nothing,
                Some(&body),
            );
        };
        for i in 0..100 {
            add(format!("s{i}.shop"), 500);
        }
        add("large.shop".to_string(), 3 * MESSAGE_TARGET_BYTES);
        let messages = batch.finish();
        assert_eq!(
            messages.iter().map(|m| m.resources.len()).sum::<usize>(),
            101
        );
        for message in &messages {
            let alone = message.resources.len() == 1;
            assert!(
                alone || message.encoded_len() <= MESSAGE_TARGET_BYTES,
                "{} resources in {} bytes",
                message.resources.len(),
                message.encoded_len()
            );
        }
        assert!(messages.len() >= 100 * 500 / MESSAGE_TARGET_BYTES);
    }

    /// A generation is in force on a proxy once it acknowledged the last message
    /// sent, or at once when nothing it follows changed; an acknowledgement of what
    /// was never sent counts for nothing.
    #[test]
    fn a_generation_is_in_force_once_acknowledged() {
        let mut progress = Progress::default();
        assert_eq!(progress.reached(1, true), None);
        assert_eq!(progress.acknowledged(1), Some(1));
        // Nothing the proxy follows changed in 2.
        assert_eq!(progress.reached(2, false), Some(2));
        assert_eq!(progress.reached(3, true), None);
        // Nothing changed for it in 4, but 3 is not acknowledged yet.
        assert_eq!(progress.reached(4, false), None);
        assert_eq!(progress.acknowledged(2), None);
        assert_eq!(progress.acknowledged(3), Some(4));
        let mut hostile = Progress::default();
        hostile.reached(1, true);
        assert_eq!(hostile.acknowledged(u64::MAX), Some(1));
        hostile.reached(2, true);
        assert_eq!(hostile.applied, 1, "an early acknowledgement is not kept");
        assert_eq!(hostile.acknowledged(2), Some(2));
    }

    type Frame = Result<hyper::body::Frame<bytes::Bytes>, Status>;

    /// A `Discover` call to `service` as `spiffe://cluster.local/ns/shop/sa/web`, its
    /// request messages sent through the returned sender (dropping it ends them).
    async fn open_stream(
        service: &DiscoveryService,
    ) -> (tokio::sync::mpsc::Sender<Frame>, ResponseStream) {
        use http_body_util::{BodyExt, StreamBody};
        use tokio_stream::wrappers::ReceiverStream;

        let (sender, frames) = tokio::sync::mpsc::channel::<Frame>(4);
        let body = StreamBody::new(ReceiverStream::new(frames)).boxed_unsync();
        let decoder = tonic::codec::Codec::decoder(&mut tessera_proto::codec::SmallBuffers::<
            DiscoveryResponse,
            DiscoveryRequest,
        >::default());
        let mut request = Request::new(Streaming::new_request(decoder, body, None, None));
        request.extensions_mut().insert(Caller {
            address: "10.0.0.5:40000".parse().unwrap(),
            identity: Some("spiffe://cluster.local/ns/shop/sa/web".parse().unwrap()),
        });
        let responses = service.discover(request).await.unwrap().into_inner();
        (sender, responses)
    }

    /// `request` as one gRPC message frame.
    fn frame(request: &DiscoveryRequest) -> Frame {
        use prost::Message;

        let mut bytes = vec![0u8];
        bytes.extend((request.encoded_len() as u32).to_be_bytes());
        bytes.extend(request.encode_to_vec());
        Ok(hyper::body::Frame::data(bytes.into()))
    }

    fn service(catalogs: watch::Receiver<Arc<Catalog>>) -> DiscoveryService {
        DiscoveryService {
            catalogs,
            metrics: Arc::new(Metrics::new()),
            proxies: Arc::new(ConnectedProxies::default()),
        }
    }

    /// A caller that opens a stream and never says what it follows is told so and
    /// dropped after [`FIRST_REQUEST_TIMEOUT`], and was never listed as a proxy.
    #[tokio::test(start_paused = true)]
    async fn a_stream_without_a_first_request_is_ended() {
        use tokio_stream::StreamExt;

        let (_catalog, catalogs) = watch::channel(Arc::new(catalog(&[])));
        let service = service(catalogs);
        let (_open, mut responses) = open_stream(&service).await;
        let started = tokio::time::Instant::now();
        let ended = tokio::time::timeout(2 * FIRST_REQUEST_TIMEOUT, responses.next())
            .await
            .expect("ended in time")
            .expect("an answer");
        let status = ended.expect_err("no subscription: an error");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(started.elapsed(), FIRST_REQUEST_TIMEOUT);
        assert!(responses.next().await.is_none(), "the stream ends");
        assert!(service.proxies.list().is_empty());
    }

    /// A stream's whole life: the first request lists the proxy and is answered, a
    /// new catalog brings only what changed, an acknowledgement puts its generation in
    /// force, and the proxy ending its requests ends the stream and its listing.
    #[tokio::test(start_paused = true)]
    async fn a_stream_answers_follows_and_ends() {
        use tokio_stream::StreamExt;

        let (publish, catalogs) = watch::channel(Arc::new(catalog(&[("web", "10.96.0.10")])));
        let service = service(catalogs);
        let (requests, mut responses) = open_stream(&service).await;
        requests
            .send(frame(&subscribe(&["service/web.shop", "service/api.shop"])))
            .await
            .unwrap();
        let first = responses.next().await.unwrap().unwrap();
        assert_eq!(
            told(&[first]),
            (
                strings(&["service/web.shop"]),
                strings(&["service/api.shop"])
            )
        );
        assert_eq!(service.proxies.list().len(), 1);

        let mut next = catalog(&[("web", "10.96.0.10"), ("api", "10.96.0.11")]);
        next.generation = 2;
        publish.send(Arc::new(next)).unwrap();
        let change = responses.next().await.unwrap().unwrap();
        assert_eq!(change.generation, 2);
        assert_eq!(told(&[change]), (strings(&["service/api.shop"]), vec![]));
        assert_eq!(
            service.proxies.list()[0].generation,
            0,
            "not acknowledged yet"
        );
        let ack = DiscoveryRequest {
            applied: 2,
            ..Default::default()
        };
        requests.send(frame(&ack)).await.unwrap();
        // Nothing to send for it: the stream reads it and waits on.
        let quiet = tokio::time::timeout(Duration::from_secs(1), responses.next()).await;
        assert!(quiet.is_err(), "{quiet:?}");
        assert_eq!(service.proxies.list()[0].generation, 2);
        drop(requests);
        assert!(responses.next().await.is_none(), "the proxy is done");
        assert!(service.proxies.list().is_empty());
    }

    /// A stream's proxy is listed while the stream is open, and only then.
    #[test]
    fn a_proxy_is_listed_while_its_stream_is_open() {
        let proxies = Arc::new(ConnectedProxies::default());
        let proxy = |identity: &str| ConnectedProxy {
            identity: identity.into(),
            address: "10.0.0.5:40000".parse().unwrap(),
            admin: Some("10.0.0.5:15020".parse().unwrap()),
            admin_unknown: None,
            connected_since: rfc3339(SystemTime::UNIX_EPOCH),
            generation: 0,
        };
        let web = proxies.add(proxy("spiffe://cluster.local/ns/shop/sa/web"));
        let api = proxies.add(proxy("spiffe://cluster.local/ns/shop/sa/api"));
        let listed: Vec<_> = proxies.list().into_iter().map(|p| p.identity).collect();
        assert_eq!(
            listed,
            [
                "spiffe://cluster.local/ns/shop/sa/api",
                "spiffe://cluster.local/ns/shop/sa/web"
            ]
        );
        assert_eq!(proxies.list()[0].connected_since, "1970-01-01T00:00:00Z");
        drop(web);
        assert_eq!(proxies.list().len(), 1);
        drop(api);
        assert!(proxies.list().is_empty());
    }
}
