//! The proxy's view of the mesh, kept current by the control plane's discovery stream.
//!
//! The stream authenticates with the workload certificate, so it starts once the proxy
//! has one. Every snapshot replaces the view atomically; a snapshot that cannot be parsed
//! is refused and the last good view stays. When the control plane goes away, or the
//! stream fails for any reason (a message over [`MAX_SNAPSHOT_BYTES`] included), the
//! proxy keeps routing on its last view and reconnects with backoff.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tessera_mesh::discovery::MAX_MESSAGE_BYTES as MAX_SNAPSHOT_BYTES;
use tessera_mesh::policy::{
    AuthorizationPolicySpec, Named, PeerAuthenticationSpec, RequestAuthenticationSpec,
};
use tessera_mesh::rate_limit::RateLimitPolicySpec;
use tessera_mesh::snapshot::{MeshSnapshot, ServiceEntry};
use tessera_proto::api::discovery::DiscoveryRequest;
use tessera_proto::api::discovery::discovery_client::DiscoveryClient;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::control_plane::{ControlPlane, error_chain};
use crate::identity::IdentityManager;

const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// The services a proxy can route to, by `name.namespace`.
#[derive(Debug, Default)]
pub struct MeshView {
    pub version: String,
    pub services: HashMap<String, Arc<ServiceEntry>>,
    pub peer_authentications: Vec<Named<PeerAuthenticationSpec>>,
    pub authorization_policies: Vec<Named<AuthorizationPolicySpec>>,
    pub request_authentications: Vec<Named<RequestAuthenticationSpec>>,
    pub rate_limit_policies: Vec<Named<RateLimitPolicySpec>>,
    /// Service keys by virtual IP, for transparent outbound routing.
    pub by_address: HashMap<IpAddr, String>,
}

impl MeshView {
    fn from_snapshot(version: String, snapshot: MeshSnapshot) -> Self {
        let services: HashMap<String, Arc<ServiceEntry>> = snapshot
            .services
            .into_iter()
            .map(|service| (service.key(), Arc::new(service)))
            .collect();
        let by_address = services
            .iter()
            .flat_map(|(key, service)| service.addresses.iter().map(|ip| (*ip, key.clone())))
            .collect();
        Self {
            version,
            services,
            by_address,
            peer_authentications: snapshot.peer_authentications,
            authorization_policies: snapshot.authorization_policies,
            request_authentications: snapshot.request_authentications,
            rate_limit_policies: snapshot.rate_limit_policies,
        }
    }
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
}

/// Holds the current view and tells subscribers when it changes.
pub struct Discovery {
    view: watch::Sender<Option<Arc<MeshView>>>,
    /// `tessera_control_plane_connected`: 1 while a stream is up.
    connected: Gauge,
}

/// Holds the connected gauge at 1 until dropped, however the stream ends.
struct Connected<'a>(&'a Gauge);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

impl Discovery {
    /// `connected` is set to 1 while the discovery stream is up, 0 otherwise.
    pub fn new(connected: Gauge) -> Arc<Self> {
        let (view, _) = watch::channel(None);
        connected.set(0);
        Arc::new(Self { view, connected })
    }

    /// The current view, if one has arrived.
    pub fn current(&self) -> Option<Arc<MeshView>> {
        self.view.borrow().clone()
    }

    /// A receiver that sees every new view.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<MeshView>>> {
        self.view.subscribe()
    }

    pub fn has_view(&self) -> bool {
        self.view.borrow().is_some()
    }

    /// Follows the discovery stream forever, telling the control plane where this
    /// proxy's admin port is.
    pub async fn run(
        self: Arc<Self>,
        control_plane: ControlPlane,
        identity: Arc<IdentityManager>,
        admin_address: SocketAddr,
    ) {
        let mut retry = FIRST_RETRY;
        loop {
            while !identity.has_valid_cert() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match self.follow(&control_plane, &identity, admin_address).await {
                Ok(()) => retry = FIRST_RETRY,
                Err(reason) => {
                    warn!(event = "discovery stream lost", reason = %reason, retry_in_ms = retry.as_millis() as u64, "routing on the last configuration");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }

    async fn follow(
        &self,
        control_plane: &ControlPlane,
        identity: &IdentityManager,
        admin_address: SocketAddr,
    ) -> Result<(), String> {
        let channel = control_plane
            .connect(identity.trust(), Some(identity.current_cert()))
            .await
            .map_err(|e| e.to_string())?;
        self.watch(channel, admin_address).await
    }

    /// Follows one discovery stream until it fails. Whatever ends it — the control plane
    /// going away, a message too large to decode, any other status — only ends the
    /// stream: the view stays until a good snapshot replaces it.
    async fn watch(&self, channel: Channel, admin_address: SocketAddr) -> Result<(), String> {
        let known_version = self
            .current()
            .map(|v| v.version.clone())
            .unwrap_or_default();
        // The control plane refuses a configuration whose snapshot would be larger, so
        // every snapshot it sends fits.
        let mut stream = DiscoveryClient::new(channel)
            .max_decoding_message_size(MAX_SNAPSHOT_BYTES)
            .discover(tonic::codegen::tokio_stream::StreamExt::chain(
                tonic::codegen::tokio_stream::iter([DiscoveryRequest {
                    subscribe: vec![known_version, "policies".into()],
                    admin_address: admin_address.to_string(),
                    ..Default::default()
                }]),
                tonic::codegen::tokio_stream::pending(),
            ))
            .await
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
            .into_inner();
        self.connected.set(1);
        let _connected = Connected(&self.connected);
        loop {
            match stream.message().await {
                Ok(Some(snapshot)) => self.apply(String::new(), &snapshot.resources[0].body),
                Ok(None) => return Err("control plane closed the stream".into()),
                Err(status) => return Err(error_chain(&status)),
            }
        }
    }

    fn apply(&self, version: String, json: &[u8]) {
        match serde_json::from_slice::<MeshSnapshot>(json) {
            Ok(snapshot) => {
                let services = snapshot.services.len();
                self.view
                    .send_replace(Some(Arc::new(MeshView::from_snapshot(
                        version.clone(),
                        snapshot,
                    ))));
                info!(event = "configuration received", version = %version, services);
            }
            Err(error) => {
                warn!(event = "configuration refused", version = %version, error = %error, "keeping the last good configuration")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use tessera_proto::api::discovery::Snapshot;
    use tessera_proto::api::discovery::discovery_server::{
        Discovery as DiscoveryApi, DiscoveryServer,
    };
    use tonic::codegen::tonic::codegen::tokio_stream::{self, Stream};
    use tonic::{Code, Request, Response, Status};

    use super::*;

    /// A control plane that answers every `Watch` with the same script.
    struct Scripted(Vec<Result<Snapshot, (Code, &'static str)>>);

    #[tonic::async_trait]
    impl DiscoveryApi for Scripted {
        type WatchStream = Pin<Box<dyn Stream<Item = Result<Snapshot, Status>> + Send>>;

        async fn watch(
            &self,
            _: Request<WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            let script = self
                .0
                .clone()
                .into_iter()
                .map(|step| step.map_err(|(code, message)| Status::new(code, message)));
            Ok(Response::new(Box::pin(tonic::codegen::tokio_stream::iter(
                script,
            ))))
        }
    }

    const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15020);

    /// A control plane that refuses every `Watch`, naming the admin address it was told.
    struct AdminEcho;

    #[tonic::async_trait]
    impl DiscoveryApi for AdminEcho {
        type WatchStream = Pin<Box<dyn Stream<Item = Result<Snapshot, Status>> + Send>>;

        async fn watch(
            &self,
            request: Request<WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            let told = &request.get_ref().admin_address;
            Err(Status::unavailable(format!("told admin {told}")))
        }
    }

    #[tokio::test]
    async fn the_watch_tells_where_the_admin_port_is() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DiscoveryServer::new(AdminEcho))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let admin: SocketAddr = "0.0.0.0:15020".parse().unwrap();
        let error = Discovery::new(Gauge::default())
            .watch(channel, admin)
            .await
            .unwrap_err();
        assert!(error.ends_with("told admin 0.0.0.0:15020"), "{error}");
    }

    /// Serves `script` on loopback (plaintext: TLS is not what these tests are about).
    async fn channel_to(script: Scripted) -> Channel {
        channel_to_api(script).await
    }

    async fn channel_to_api(api: impl DiscoveryApi) -> Channel {
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

    /// A snapshot labelled `version` whose message is `size` bytes, give or take ten.
    fn snapshot_of(version: &str, size: usize) -> Result<Snapshot, (Code, &'static str)> {
        let padding = "p".repeat(size.saturating_sub(40));
        let mesh_json = format!(r#"{{"trustDomain":"{padding}","services":[]}}"#);
        Ok(Snapshot {
            version: version.into(),
            mesh_json: mesh_json.into_bytes(),
        })
    }

    #[tokio::test]
    async fn snapshots_up_to_the_limit_arrive_and_a_larger_one_keeps_the_view() {
        let discovery = Discovery::new(Gauge::default());
        let channel = channel_to(Scripted(vec![
            snapshot_of("1", 1000),
            // Over tonic's default 4 MiB, within the limit the control plane enforces.
            snapshot_of("2", MAX_SNAPSHOT_BYTES - 100),
            snapshot_of("3", MAX_SNAPSHOT_BYTES + 100),
        ]))
        .await;
        let error = discovery.watch(channel, ADMIN).await.unwrap_err();
        assert!(error.contains("too large"), "{error}");
        assert_eq!(discovery.current().unwrap().version, "2");
    }

    #[tokio::test]
    async fn a_failed_stream_or_a_bad_snapshot_keeps_the_view() {
        let discovery = Discovery::new(Gauge::default());
        let channel = channel_to(Scripted(vec![
            snapshot_of("1", 1000),
            Ok(Snapshot {
                version: "2".into(),
                mesh_json: b"{not json".to_vec(),
            }),
            Err((Code::Internal, "control plane failed")),
        ]))
        .await;
        let error = discovery.watch(channel.clone(), ADMIN).await.unwrap_err();
        assert!(error.contains("control plane failed"), "{error}");
        assert_eq!(discovery.current().unwrap().version, "1");
        // A stream that just ends is no different.
        let ended = channel_to(Scripted(vec![])).await;
        discovery.watch(ended, ADMIN).await.unwrap_err();
        assert!(discovery.has_view());
        assert_eq!(discovery.current().unwrap().version, "1");
    }

    /// A control plane whose one stream sends what `feed` is given, and ends when it
    /// is dropped.
    struct Fed(std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Snapshot>>>);

    struct Feed(tokio::sync::mpsc::Receiver<Snapshot>);

    impl Stream for Feed {
        type Item = Result<Snapshot, Status>;

        fn poll_next(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.poll_recv(cx).map(|snapshot| snapshot.map(Ok))
        }
    }

    #[tonic::async_trait]
    impl DiscoveryApi for Fed {
        type WatchStream = Pin<Box<dyn Stream<Item = Result<Snapshot, Status>> + Send>>;

        async fn watch(
            &self,
            _: Request<WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            let feed = self.0.lock().unwrap().take();
            let feed = feed.ok_or_else(|| Status::unavailable("one stream only"))?;
            Ok(Response::new(Box::pin(Feed(feed))))
        }
    }

    #[tokio::test]
    async fn connected_is_one_while_the_stream_is_up() {
        let metrics = crate::telemetry::Metrics::new();
        let connected = || {
            let text = metrics.encode();
            let line = text
                .lines()
                .find(|line| line.starts_with("tessera_control_plane_connected "));
            line.map(str::to_string).unwrap_or(text)
        };
        let discovery = Discovery::new(metrics.control_plane_connected.clone());
        let (feed, fed) = tokio::sync::mpsc::channel(1);
        let channel = channel_to_api(Fed(std::sync::Mutex::new(Some(fed)))).await;
        assert_eq!(connected(), "tessera_control_plane_connected 0");
        let mut views = discovery.subscribe();
        let watching = tokio::spawn({
            let discovery = discovery.clone();
            async move { discovery.watch(channel, ADMIN).await }
        });
        feed.send(snapshot_of("1", 100).unwrap()).await.unwrap();
        views.changed().await.unwrap();
        assert_eq!(connected(), "tessera_control_plane_connected 1");
        drop(feed);
        watching.await.unwrap().unwrap_err();
        assert_eq!(connected(), "tessera_control_plane_connected 0");
        // A refused stream never counts as connected.
        let refused = channel_to(Scripted(vec![Err((Code::Unavailable, "down"))])).await;
        discovery.watch(refused, ADMIN).await.unwrap_err();
        assert_eq!(metrics.control_plane_connected.get(), 0);
    }

    fn view() -> MeshView {
        let json = r#"{"trustDomain": "cluster.local", "services": [
            {"name": "web", "namespace": "shop", "addresses": ["10.96.0.10"],
             "ports": [{"port": 80}], "endpoints": []},
            {"name": "any", "namespace": "shop", "addresses": ["fd96::20"],
             "ports": [], "endpoints": []}]}"#;
        MeshView::from_snapshot("1".into(), serde_json::from_str(json).unwrap())
    }

    #[test]
    fn services_are_found_by_virtual_ip_and_declared_port() {
        let view = view();
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
    }
}
