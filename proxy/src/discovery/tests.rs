use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::pin::Pin;

use tessera_mesh::policy::{AuthorizationPolicySpec, Named};
use tessera_proto::api::discovery::discovery_server::{Discovery as DiscoveryApi, DiscoveryServer};
use tokio::task::JoinHandle;
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::*;

const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);

/// A control plane played by the test: each stream opened is handed over, its
/// requests to read and its responses to send (dropping the sender ends the stream).
struct ScriptedControlPlane(mpsc::UnboundedSender<OpenedStream>);

struct OpenedStream {
    requests: Streaming<DiscoveryRequest>,
    responses: mpsc::UnboundedSender<Result<DiscoveryResponse, Status>>,
}

impl OpenedStream {
    async fn request(&mut self) -> DiscoveryRequest {
        self.requests.message().await.unwrap().unwrap()
    }

    fn send(&self, resources: Vec<Resource>, absent: &[&str]) {
        self.send_generation(resources, absent, 0);
    }

    fn send_generation(&self, resources: Vec<Resource>, absent: &[&str], generation: u64) {
        let response = DiscoveryResponse {
            resources,
            absent: absent.iter().map(ToString::to_string).collect(),
            generation,
        };
        self.responses.send(Ok(response)).unwrap();
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DiscoveryApi for ScriptedControlPlane {
    type DiscoverStream = ResponseStream;

    async fn discover(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let (responses, outgoing) = mpsc::unbounded_channel();
        let opened = OpenedStream {
            requests: request.into_inner(),
            responses,
        };
        self.0
            .send(opened)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            outgoing,
        ))))
    }
}

/// A control plane that refuses every stream.
struct Refusing;

#[tonic::async_trait]
impl DiscoveryApi for Refusing {
    type DiscoverStream = ResponseStream;

    async fn discover(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        Err(Status::new(Code::Unavailable, "down"))
    }
}

/// Serves `api` on loopback (plaintext: TLS is not what these tests are about).
async fn channel_to(api: impl DiscoveryApi) -> Channel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiscoveryServer::new(api))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn scripted_control_plane() -> (Channel, mpsc::UnboundedReceiver<OpenedStream>) {
    let (streams, opened) = mpsc::unbounded_channel();
    (channel_to(ScriptedControlPlane(streams)).await, opened)
}

fn start(discovery: &Arc<Discovery>, channel: Channel) -> JoinHandle<StreamEnded> {
    let discovery = discovery.clone();
    tokio::spawn(async move { discovery.discover(channel, ADMIN).await })
}

fn name(name: &str) -> ResourceName {
    name.parse().unwrap()
}

fn service_json(name: &str, vip: &str, port: u16) -> Vec<u8> {
    format!(
        r#"{{"name": "{name}", "namespace": "shop", "addresses": ["{vip}"],
            "ports": [{{"port": {port}}}], "endpoints": []}}"#
    )
    .into_bytes()
}

fn resource(name: &str, version: &str, body: Vec<u8>) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        body: body.into(),
    }
}

fn policies(names: &[&str]) -> Vec<u8> {
    let set = PolicySet {
        trust_domain: "cluster.local".into(),
        authorization_policies: names
            .iter()
            .map(|name| Named {
                name: name.to_string(),
                namespace: "shop".into(),
                spec: AuthorizationPolicySpec::default(),
            })
            .collect(),
        ..PolicySet::default()
    };
    serde_json::to_vec(&set).unwrap()
}

/// Waits for the next view and returns it.
async fn next_view(views: &mut watch::Receiver<Option<Arc<MeshView>>>) -> Arc<MeshView> {
    views.changed().await.unwrap();
    views.borrow_and_update().clone().unwrap()
}

fn port_of(view: &MeshView, key: &str) -> u16 {
    view.services[key].ports[0].port
}

#[tokio::test]
async fn the_first_request_names_the_admin_port_and_every_subscription() {
    let discovery = Discovery::new(Gauge::default());
    let _web = discovery.want(name("service/web.shop"));
    let (channel, mut opened) = scripted_control_plane().await;
    let _running = start(&discovery, channel);
    let first = opened.recv().await.unwrap().request().await;
    assert_eq!(first.admin_address, "127.0.0.1:15020");
    assert_eq!(first.subscribe, ["policies", "service/web.shop"]);
    assert!(first.known.is_empty() && first.unsubscribe.is_empty());
}

#[tokio::test]
async fn a_subscription_goes_out_at_once_and_a_release_unsubscribes() {
    let discovery = Discovery::new(Gauge::default());
    let (channel, mut opened) = scripted_control_plane().await;
    let _running = start(&discovery, channel);
    let mut stream = opened.recv().await.unwrap();
    assert_eq!(stream.request().await.subscribe, ["policies"]);

    let web = discovery.want(name("service/web.shop"));
    let again = discovery.want(name("service/web.shop"));
    assert_eq!(stream.request().await.subscribe, ["service/web.shop"]);
    let mut views = discovery.subscribe();
    stream.send(
        vec![resource(
            "service/web.shop",
            "w1",
            service_json("web", "10.96.0.10", 80),
        )],
        &[],
    );
    assert_eq!(port_of(&*next_view(&mut views).await, "web.shop"), 80);

    // The name stays followed while any guard for it lives.
    drop(web);
    let api = discovery.want(name("service/api.shop"));
    assert_eq!(stream.request().await.subscribe, ["service/api.shop"]);
    drop(again);
    let request = stream.request().await;
    assert_eq!(request.unsubscribe, ["service/web.shop"]);
    assert!(request.subscribe.is_empty());
    assert!(!discovery.is_answered(&name("service/web.shop")));
    assert_eq!(
        discovery.wanted(),
        [name("policies"), name("service/api.shop")]
    );
    drop(api);
}

#[tokio::test]
async fn a_first_use_waits_for_one_answer_then_routes_or_passes_through() {
    let discovery = Discovery::new(Gauge::default());
    let (channel, mut opened) = scripted_control_plane().await;
    let _running = start(&discovery, channel);
    let mut stream = opened.recv().await.unwrap();
    stream.request().await;

    let resolving = tokio::spawn({
        let discovery = discovery.clone();
        async move {
            discovery
                .resolve(name("address/10.96.0.10"), Duration::from_secs(30))
                .await
        }
    });
    assert_eq!(stream.request().await.subscribe, ["address/10.96.0.10"]);
    stream.send(
        vec![resource(
            "address/10.96.0.10",
            "w1",
            service_json("web", "10.96.0.10", 80),
        )],
        &[],
    );
    let (_web, view) = resolving.await.unwrap();
    let view = view.unwrap();
    assert_eq!(
        view.service_at("10.96.0.10:80".parse().unwrap()),
        Some("web.shop")
    );

    // An address no service has is answered absent: a destination outside the mesh.
    let resolving = tokio::spawn({
        let discovery = discovery.clone();
        async move {
            discovery
                .resolve(name("address/10.0.0.1"), Duration::from_secs(30))
                .await
        }
    });
    assert_eq!(stream.request().await.subscribe, ["address/10.0.0.1"]);
    stream.send(vec![], &["address/10.0.0.1"]);
    let (_outside, view) = resolving.await.unwrap();
    assert_eq!(
        view.unwrap().service_at("10.0.0.1:80".parse().unwrap()),
        None
    );
    assert!(discovery.is_answered(&name("address/10.0.0.1")));
}

#[tokio::test(start_paused = true)]
async fn a_first_use_without_an_answer_gives_up_at_the_bound() {
    let discovery = Discovery::new(Gauge::default());
    let started = tokio::time::Instant::now();
    let (_subscription, view) = discovery
        .resolve(name("address/10.96.0.10"), RESOLVE_TIMEOUT)
        .await;
    assert!(view.is_none());
    let waited = started.elapsed();
    assert!(
        waited >= RESOLVE_TIMEOUT && waited < RESOLVE_TIMEOUT * 2,
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_reconnect_resubscribes_naming_the_versions_held() {
    let discovery = Discovery::new(Gauge::default());
    let _web = discovery.want(name("service/web.shop"));
    let _vip = discovery.want(name("address/10.96.0.10"));
    let _outside = discovery.want(name("address/10.0.0.1"));
    let (channel, mut opened) = scripted_control_plane().await;
    let running = start(&discovery, channel.clone());
    let mut stream = opened.recv().await.unwrap();
    stream.request().await;
    let mut views = discovery.subscribe();
    stream.send(
        vec![
            resource("policies", "p1", policies(&[])),
            resource(
                "service/web.shop",
                "w1",
                service_json("web", "10.96.0.10", 80),
            ),
            resource(
                "address/10.96.0.10",
                "w1",
                service_json("web", "10.96.0.10", 80),
            ),
        ],
        &["address/10.0.0.1"],
    );
    let view = next_view(&mut views).await;
    assert!(view.policies_known && discovery.has_view());
    assert_eq!(view.policies_version, "p1");
    // Acknowledged on the stream.
    stream.send_generation(vec![], &["address/10.0.0.1"], 5);
    assert_eq!(stream.request().await.applied, 5);
    drop(stream);
    let ended = running.await.unwrap();
    assert!(ended.connected, "{ended:?}");

    let _running = start(&discovery, channel);
    let first = opened.recv().await.unwrap().request().await;
    let expected: HashMap<String, String> = [
        ("policies", "p1"),
        ("service/web.shop", "w1"),
        ("address/10.96.0.10", "w1"),
        ("address/10.0.0.1", ""),
    ]
    .into_iter()
    .map(|(name, version)| (name.to_string(), version.to_string()))
    .collect();
    assert_eq!(first.known, expected);
    assert_eq!(first.subscribe.len(), 4);
}

#[tokio::test]
async fn a_bad_resource_is_refused_alone_and_the_last_good_one_stays() {
    let discovery = Discovery::new(Gauge::default());
    let _web = discovery.want(name("service/web.shop"));
    let _api = discovery.want(name("service/api.shop"));
    let _vip = discovery.want(name("address/10.96.0.10"));
    let (channel, mut opened) = scripted_control_plane().await;
    let _running = start(&discovery, channel);
    let mut stream = opened.recv().await.unwrap();
    stream.request().await;
    let mut views = discovery.subscribe();
    let web = |version, port| {
        resource(
            "service/web.shop",
            version,
            service_json("web", "10.96.0.10", port),
        )
    };
    stream.send(vec![web("w1", 80)], &[]);
    next_view(&mut views).await;

    stream.send(
        vec![
            resource("service/web.shop", "w2", b"{not json".to_vec()),
            // Unknown, never subscribed, or describing another service or address.
            resource("cluster/x", "x", b"{}".to_vec()),
            resource(
                "service/other.shop",
                "o1",
                service_json("other", "10.96.0.30", 80),
            ),
            resource(
                "service/web.shop",
                "w3",
                service_json("api", "10.96.0.10", 81),
            ),
            resource(
                "address/10.96.0.10",
                "w3",
                service_json("web", "10.96.0.99", 81),
            ),
            resource(
                "service/api.shop",
                "a1",
                service_json("api", "10.96.0.20", 90),
            ),
        ],
        &["cluster/y", "service/never.shop"],
    );
    let view = next_view(&mut views).await;
    assert_eq!(port_of(&view, "web.shop"), 80);
    assert_eq!(port_of(&view, "api.shop"), 90);
    assert!(!view.services.contains_key("other.shop"));
    assert!(!discovery.is_answered(&name("address/10.96.0.10")));
    assert!(view.absent_services.is_empty());
    // The next good version is taken.
    stream.send(vec![web("w4", 8080)], &[]);
    assert_eq!(port_of(&*next_view(&mut views).await, "web.shop"), 8080);
}

#[tokio::test]
async fn an_outage_keeps_every_known_service() {
    let metrics = crate::telemetry::Metrics::new();
    let discovery = Discovery::new(metrics.control_plane_connected.clone());
    let _vip = discovery.want(name("address/10.96.0.10"));
    let (channel, mut opened) = scripted_control_plane().await;
    let running = start(&discovery, channel);
    let mut stream = opened.recv().await.unwrap();
    stream.request().await;
    let mut views = discovery.subscribe();
    stream.send(
        vec![resource(
            "address/10.96.0.10",
            "w1",
            service_json("web", "10.96.0.10", 80),
        )],
        &[],
    );
    next_view(&mut views).await;
    assert_eq!(metrics.control_plane_connected.get(), 1);
    stream
        .responses
        .send(Err(Status::internal("control plane failed")))
        .unwrap();
    let ended = running.await.unwrap();
    assert!(ended.reason.contains("control plane failed"), "{ended:?}");
    assert_eq!(metrics.control_plane_connected.get(), 0);

    // Known: answered at once, without a control plane.
    let view = discovery
        .answered(&name("address/10.96.0.10"), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        view.service_at("10.96.0.10:80".parse().unwrap()),
        Some("web.shop")
    );
    // A refused stream never counts as connected.
    let refused = discovery.discover(channel_to(Refusing).await, ADMIN).await;
    assert!(
        !refused.connected && refused.reason.contains("down"),
        "{refused:?}"
    );
    assert_eq!(metrics.control_plane_connected.get(), 0);
    assert!(discovery.is_answered(&name("address/10.96.0.10")));
}

/// A service whose body is `size` bytes, give or take a hundred.
fn service_of_size(size: usize) -> Vec<u8> {
    let padding = "p".repeat(size.saturating_sub(120));
    format!(
        r#"{{"name": "web", "namespace": "shop", "ports": [], "endpoints": [],
            "route": null, "addresses": [], "_": "{padding}"}}"#
    )
    .into_bytes()
}

#[tokio::test]
async fn messages_up_to_the_limit_arrive_and_a_larger_one_ends_the_stream() {
    let discovery = Discovery::new(Gauge::default());
    let _web = discovery.want(name("service/web.shop"));
    let (channel, mut opened) = scripted_control_plane().await;
    let running = start(&discovery, channel);
    let mut stream = opened.recv().await.unwrap();
    stream.request().await;
    let mut views = discovery.subscribe();
    // Over tonic's default 4 MiB, within the limit the control plane holds to.
    let within = MAX_MESSAGE_BYTES - 1000;
    stream.send(
        vec![resource("service/web.shop", "w1", service_of_size(within))],
        &[],
    );
    next_view(&mut views).await;
    stream.send(
        vec![resource(
            "service/web.shop",
            "w2",
            service_of_size(MAX_MESSAGE_BYTES + 100),
        )],
        &[],
    );
    let ended = running.await.unwrap();
    assert!(ended.reason.contains("too large"), "{ended:?}");
    assert_eq!(
        discovery.lock().held[&name("service/web.shop")].version,
        "w1"
    );
}

/// What `/config` and routing read: services by virtual IP and declared port.
#[test]
fn services_are_found_by_virtual_ip_and_declared_port() {
    let mut state = State {
        sent: [name("service/web.shop"), name("address/fd96::20")].into(),
        ..State::default()
    };
    state
        .accept(resource(
            "service/web.shop",
            "w1",
            service_json("web", "10.96.0.10", 80),
        ))
        .unwrap();
    let any = br#"{"name": "any", "namespace": "shop", "addresses": ["fd96::20"],
        "ports": [], "endpoints": []}"#;
    state
        .accept(resource("address/fd96::20", "a1", any.to_vec()))
        .unwrap();
    let view = state.view();
    assert_eq!(
        view.service_at("10.96.0.10:80".parse().unwrap()),
        Some("web.shop")
    );
    // An undeclared port of a VIP is not the service's.
    assert_eq!(view.service_at("10.96.0.10:81".parse().unwrap()), None);
    assert_eq!(view.service_at("10.96.0.11:80".parse().unwrap()), None);
    // A service that declares no ports takes them all.
    assert_eq!(
        view.service_at("[fd96::20]:5432".parse().unwrap()),
        Some("any.shop")
    );
    let dump = serde_json::to_value(view.dump()).unwrap();
    let keys: Vec<&str> = dump
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "authorizationPolicies",
            "peerAuthentications",
            "rateLimitPolicies",
            "requestAuthentications",
            "services",
            "version"
        ]
    );
}

#[test]
fn an_address_answered_absent_is_no_service_even_if_a_held_service_lists_it() {
    let mut state = State {
        sent: [name("service/web.shop"), name("address/10.96.0.10")].into(),
        ..State::default()
    };
    state
        .accept(resource(
            "service/web.shop",
            "w1",
            service_json("web", "10.96.0.10", 80),
        ))
        .unwrap();
    state.accept_absent("address/10.96.0.10").unwrap();
    assert_eq!(
        state.view().service_at("10.96.0.10:80".parse().unwrap()),
        None
    );
}

/// Wanting, releasing and wanting again before the stream is told sends only what
/// the control plane must know.
#[test]
fn changes_are_merged_into_what_the_stream_must_be_told() {
    let mut state = State::default();
    let web = name("service/web.shop");
    state.want(&web);
    let (stream, first) = state.open_stream(ADMIN);
    assert_eq!(first.subscribe, ["service/web.shop"]);
    assert!(state.take_changes(stream).is_none());
    // Released and wanted again before the stream was told: nothing to say.
    state.release(&web);
    state.want(&web);
    assert!(state.take_changes(stream).is_none());
    // Wanted and released before the stream was told: nothing either.
    let api = name("service/api.shop");
    state.want(&api);
    state.release(&api);
    assert!(state.take_changes(stream).is_none());
    // A closed stream's sender gets nothing, and the next stream names all.
    state.want(&api);
    state.close_stream(stream);
    assert!(state.take_changes(stream).is_none());
    let (_, next) = state.open_stream(ADMIN);
    assert_eq!(next.subscribe, ["service/api.shop", "service/web.shop"]);
    // Releasing a name never wanted does not underflow.
    state.release(&name("address/10.0.0.1"));
}

#[test]
fn backoff_is_jittered_within_half_to_all_of_a_doubling_ceiling() {
    let mut ceilings = Vec::new();
    let mut backoff = Backoff::default();
    for _ in 0..8 {
        let ceiling = backoff.ceiling;
        ceilings.push(ceiling);
        let mut draw = Backoff { ceiling };
        assert_eq!(draw.next_delay(0.0), ceiling / 2);
        let mut draw = Backoff { ceiling };
        assert_eq!(draw.next_delay(1.0), ceiling);
        let delay = backoff.next_delay(rand::rng().random());
        assert!(
            delay >= ceiling / 2 && delay <= ceiling,
            "{delay:?} {ceiling:?}"
        );
    }
    let millis: Vec<u128> = ceilings.iter().map(Duration::as_millis).collect();
    assert_eq!(millis, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    // Draws spread: a fleet does not come back at one moment.
    let delays: HashSet<Duration> = (0..32)
        .map(|_| Backoff::default().next_delay(rand::rng().random()))
        .collect();
    assert!(delays.len() > 16, "{delays:?}");
}

/// However many names are wanted, the stream never follows more than the control plane
/// accepts, and no request is larger than it decodes; the rest go out as room is made,
/// the proxy's own policies first, each with the version held.
#[test]
fn subscriptions_are_split_into_requests_and_beyond_the_limit_wait_for_room() {
    let mut state = State::default();
    let address = |i: u32| ResourceName::Address(IpAddr::V6(std::net::Ipv6Addr::from(i as u128)));
    let over = MAX_SUBSCRIPTIONS as u32 + 1;
    for i in 0..over {
        state.want(&address(i));
    }
    state.want(&ResourceName::Policies);
    // Versions held from an earlier stream go out with their names.
    let version = "v".repeat(64);
    for i in 0..over {
        let held = Held {
            version: version.clone(),
            body: Body::Absent,
        };
        state.held.insert(address(i), held);
    }
    let (stream, first) = state.open_stream(ADMIN);
    assert_eq!(first.subscribe[0], "policies");
    let mut requests = vec![first];
    while let Some(request) = state.take_changes(stream) {
        requests.push(request);
    }
    assert!(requests.len() > 1);
    for request in &requests {
        let bytes = prost::Message::encoded_len(request);
        assert!(bytes <= MAX_REQUEST_BYTES, "{bytes}");
        for name in &request.subscribe {
            let expected = (name != "policies").then_some(&version);
            assert_eq!(request.known.get(name), expected, "{name}");
        }
    }
    let subscribed: usize = requests.iter().map(|r| r.subscribe.len()).sum();
    assert_eq!(subscribed, MAX_SUBSCRIPTIONS);
    // Two waiting; releasing one followed name makes room for one of them.
    state.release(&address(0));
    let request = state.take_changes(stream).unwrap();
    assert_eq!(request.unsubscribe, [address(0).to_string()]);
    assert_eq!(request.subscribe.len(), 1);
    assert_eq!(state.sent.len(), MAX_SUBSCRIPTIONS);
    assert_eq!(state.changed.len(), 1);
}

/// Each response's generation is acknowledged once applied, refused resources or not.
#[test]
fn every_response_applied_is_acknowledged() {
    let discovery = Discovery::new(Gauge::default());
    let stream = discovery.open_stream_by_hand();
    discovery.changes_by_hand(stream);
    let response = |generation| DiscoveryResponse {
        resources: vec![resource("policies", "p1", b"{not json".to_vec())],
        absent: Vec::new(),
        generation,
    };
    discovery.apply(response(7));
    let request = discovery.changes_by_hand(stream).unwrap();
    assert_eq!(request.applied, 7);
    assert!(request.subscribe.is_empty());
    assert!(discovery.changes_by_hand(stream).is_none());
    // A new stream starts from nothing.
    let stream = discovery.open_stream_by_hand();
    discovery.apply(response(8));
    assert_eq!(discovery.changes_by_hand(stream).unwrap().applied, 8);
}
