//! Wiring: reads nothing, decides nothing, just builds the proxy from its configuration
//! and starts its parts — identity renewal, admin, inbound and outbound listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use tessera_proto::tls::{self, ClientAuth, Trust, TrustBundle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::info;

use arc_swap::{ArcSwap, ArcSwapOption};
use tessera_proto::SpiffeId;
use tessera_proto::resources::Protocol;
use tracing::warn;

use crate::admin::AppProbes;
use crate::authz::InboundPolicy;
use crate::balance::{
    ALPN_H2, ALPN_H2_TUNNELS, ALPN_HTTP1, ALPN_TCP, ConnectorFactory, Connectors,
};
use crate::config::{InboundPort, Limits, ProxyConfig, UpstreamTarget};
use crate::control_plane::ControlPlane;
use crate::discovery::{Discovery, MeshView};
use crate::identity::IdentityManager;
use crate::inbound::{AppClient, Inbound, InboundSet};
use crate::lifecycle::{Drain, DrainTrigger};
use crate::migration::SourceLog;
use crate::outbound::Outbound;
use crate::router::Upstream;
use crate::telemetry::{Direction, Label, Metrics};
use crate::trace::Tracer;
use crate::transparent::{TransparentInbound, TransparentOutbound};
use crate::{admin, config};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("trust bundle {path}: {source}")]
    TrustBundle {
        path: std::path::PathBuf,
        source: Box<tls::TlsError>,
    },
    #[error("TLS setup: {0}")]
    Tls(Box<tls::TlsError>),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
}

impl From<tls::TlsError> for StartError {
    fn from(error: tls::TlsError) -> Self {
        Self::Tls(Box::new(error))
    }
}

/// A started proxy. Dropping it stops every task.
pub struct RunningProxy {
    pub admin_address: SocketAddr,
    pub inbound_addresses: Vec<SocketAddr>,
    pub outbound_addresses: Vec<SocketAddr>,
    /// Transparent (inbound, outbound) listeners, when configured.
    pub transparent_addresses: Option<(SocketAddr, SocketAddr)>,
    pub identity: Arc<IdentityManager>,
    pub discovery: Arc<Discovery>,
    pub metrics: Arc<Metrics>,
    pub inbounds: Arc<InboundSet>,
    drain: Option<DrainTrigger>,
    drain_timeout: std::time::Duration,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningProxy {
    /// Graceful stop: not ready, no new connections, in-flight work finishes within the
    /// configured bound. Returns the connections still open when the bound ran out.
    pub async fn shutdown(mut self) -> usize {
        let Some(trigger) = self.drain.take() else {
            return 0;
        };
        info!(
            event = "draining",
            bound_ms = self.drain_timeout.as_millis() as u64
        );
        let left = trigger.drain(self.drain_timeout).await;
        info!(event = "drained", connections_left = left);
        left
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the proxy. Listeners are bound before this returns (port 0 picks a free port;
/// the chosen ones are in the result); the certificate arrives in the background and
/// `/ready` turns true once it has.
pub async fn start(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    config.validate()?;
    let descriptors = crate::tcp::raise_fd_limit();
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let identity = identity_manager(&config, metrics.clone())?;
    let discovery = Discovery::new();
    let control_plane = ControlPlane {
        address: config.control_plane.address.clone(),
        identity: config.control_plane_identity()?,
    };
    let mut tasks = vec![
        tokio::spawn(identity.clone().run()),
        tokio::spawn(discovery.clone().run(control_plane, identity.clone())),
    ];

    let server_config = tls::server_config(
        identity.trust(),
        identity.current_cert(),
        ClientAuth::Required,
        &[ALPN_H2_TUNNELS, ALPN_H2, ALPN_HTTP1, ALPN_TCP],
    )?;
    let (drain_trigger, drain) =
        crate::lifecycle::channel_with_budget(config.limits.max_requests_in_flight);
    let tracer = Arc::new(match &config.tracing {
        Some(tracing) => Tracer::start(
            tracing,
            format!(
                "{}.{}",
                identity.identity().service_account(),
                identity.identity().namespace()
            ),
            identity.identity().to_string(),
            metrics.spans_dropped.clone(),
        ),
        None => Tracer::disabled(metrics.spans_dropped.clone()),
    });
    let shared = Arc::new(Shared {
        acceptor: TlsAcceptor::from(Arc::new(server_config)),
        connectors: connector_factory(&identity),
        identity: identity.clone(),
        discovery: discovery.clone(),
        metrics: metrics.clone(),
        limits: config.limits.clone(),
        tracer,
        access_log: config.access_log,
        drain: drain.clone(),
        inbounds: Arc::new(InboundSet::default()),
    });

    let mut inbound_addresses = Vec::new();
    for port in &config.inbound {
        let listener = bind(port.listen).await?;
        inbound_addresses.push(local_address(&listener, port.listen)?);
        let inbound = shared.inbound(port.clone());
        tasks.push(tokio::spawn(inbound.serve(listener)));
    }
    tasks.push(tokio::spawn(follow_inbound_policy(shared.clone())));
    tasks.push(tokio::spawn(crate::memory::release_when_quiet(
        crate::memory::RELEASE_INTERVAL,
        drain.clone(),
    )));

    let admin_listener = bind(config.admin).await?;
    let admin_address = local_address(&admin_listener, config.admin)?;
    let routes = admin::routes(
        identity.clone(),
        discovery.clone(),
        metrics.clone(),
        config.clone(),
        shared.inbounds.clone(),
        drain.clone(),
    );
    let probes = AppProbes::new(&config.app_probes, &config.limits);
    tasks.push(tokio::spawn(admin::serve_with_probes(
        admin_listener,
        routes,
        probes,
    )));

    let mut outbound_addresses = Vec::new();
    for upstream_config in &config.outbound {
        let listener = bind(upstream_config.listen).await?;
        outbound_addresses.push(local_address(&listener, upstream_config.listen)?);
        let (outbound, follow) = match upstream_config.target()? {
            UpstreamTarget::Fixed { address, identity } => {
                let outbound = shared.outbound(address.clone(), upstream_config.protocol);
                outbound.upstream.balancer.update(
                    &[(address, identity)],
                    None,
                    &*shared.connectors,
                );
                (outbound, None)
            }
            UpstreamTarget::Service { key, port } => {
                let (outbound, follow) =
                    shared.service_outbound(key, port, upstream_config.protocol);
                (outbound, Some(follow))
            }
        };
        tasks.extend(follow);
        tasks.push(tokio::spawn(outbound.serve(listener)));
    }

    let mut transparent_addresses = None;
    if let Some(transparent) = &config.transparent {
        let inbound_listener = bind(transparent.inbound_listen).await?;
        let outbound_listener = bind(transparent.outbound_listen).await?;
        let addresses = (
            local_address(&inbound_listener, transparent.inbound_listen)?,
            local_address(&outbound_listener, transparent.outbound_listen)?,
        );
        transparent_addresses = Some(addresses);
        let inbound = TransparentInbound::new(shared.clone(), addresses.0);
        tasks.push(tokio::spawn(inbound.serve(inbound_listener)));
        let outbound = TransparentOutbound::new(shared.clone(), addresses.1);
        tasks.push(tokio::spawn(outbound.serve(outbound_listener)));
    }

    info!(
        event = "proxy started",
        identity = %identity.identity(),
        admin = %admin_address,
        inbound = ?inbound_addresses,
        outbound = ?outbound_addresses,
        transparent = ?transparent_addresses,
        control_plane = %config.control_plane.address,
        descriptors,
    );
    Ok(RunningProxy {
        admin_address,
        inbound_addresses,
        outbound_addresses,
        transparent_addresses,
        identity,
        discovery,
        metrics,
        inbounds: shared.inbounds.clone(),
        drain: Some(drain_trigger),
        drain_timeout: config.limits.drain_timeout,
        tasks,
    })
}

/// What every listener's connections share; transparent listeners use it to create the
/// inbound ports and outbound services they meet at run time.
pub struct Shared {
    pub acceptor: TlsAcceptor,
    pub connectors: Arc<ConnectorFactory>,
    pub identity: Arc<IdentityManager>,
    pub discovery: Arc<Discovery>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub tracer: Arc<Tracer>,
    pub access_log: bool,
    pub drain: Drain,
    pub inbounds: Arc<InboundSet>,
}

impl Shared {
    /// An inbound port, registered so policy updates reach it, with the policy of the
    /// current view already applied (fail closed until there is one).
    pub fn inbound(&self, port: InboundPort) -> Arc<Inbound> {
        let inbound = Arc::new(Inbound {
            app: AppClient::new(port.forward_to, &self.limits),
            port,
            workload: Label::new(self.identity.identity().as_str()),
            acceptor: self.acceptor.clone(),
            identity: self.identity.clone(),
            metrics: self.metrics.clone(),
            counters: self.metrics.direction(Direction::Inbound),
            limits: self.limits.clone(),
            policy: ArcSwapOption::empty(),
            sources: SourceLog::default(),
            tracer: self.tracer.clone(),
            access_log: self.access_log,
            drain: self.drain.clone(),
        });
        // Registered before reading the view: a view published in between is then
        // applied by `follow_inbound_policy`, one published before is read here.
        self.inbounds.add(inbound.clone());
        if let Some(view) = self.discovery.current() {
            self.apply_policy(&inbound, &view);
        }
        inbound
    }

    fn apply_policy(&self, inbound: &Inbound, view: &MeshView) {
        let policy = InboundPolicy::resolve(view, self.identity.identity(), inbound.app_port());
        inbound.policy.store(Some(Arc::new(policy)));
    }

    /// An outbound for a fixed upstream `name` (endpoints set by the caller).
    pub fn outbound(&self, name: String, protocol: Option<Protocol>) -> Arc<Outbound> {
        let upstream = Upstream::new(
            name,
            self.identity.identity().to_string(),
            self.metrics.clone(),
            self.limits.clone(),
            self.tracer.clone(),
            self.access_log,
        );
        Arc::new(Outbound {
            upstream,
            protocol: Arc::new(ArcSwap::from_pointee(protocol.unwrap_or_default())),
            identity: self.identity.clone(),
            metrics: self.metrics.clone(),
            counters: self.metrics.direction(Direction::Outbound),
            limits: self.limits.clone(),
            drain: self.drain.clone(),
        })
    }

    /// An outbound for a service port, and the task keeping it in step with discovery.
    pub fn service_outbound(
        &self,
        key: String,
        port: Option<u16>,
        protocol_override: Option<Protocol>,
    ) -> (Arc<Outbound>, JoinHandle<()>) {
        let outbound = self.outbound(key.clone(), protocol_override);
        let binding = ServiceBinding {
            key,
            port,
            protocol_override,
            protocol: outbound.protocol.clone(),
        };
        // Applied now, not only in the task: a transparent connection creating this
        // outbound is served right after, and must not find it empty.
        let mut views = self.discovery.subscribe();
        if let Some(view) = views.borrow_and_update().clone() {
            apply_service(&view, &outbound.upstream, &binding, &*self.connectors);
        }
        let follow = tokio::spawn(follow_service(
            views,
            outbound.upstream.clone(),
            binding,
            self.connectors.clone(),
        ));
        (outbound, follow)
    }
}

/// How an outbound listener follows its service in discovery.
struct ServiceBinding {
    key: String,
    port: Option<u16>,
    protocol_override: Option<Protocol>,
    protocol: Arc<ArcSwap<Protocol>>,
}

/// Keeps an upstream's endpoints, route policy and protocol in step with discovery.
/// The subscription starts from the current view, so no snapshot is missed.
async fn follow_service(
    mut views: tokio::sync::watch::Receiver<Option<Arc<MeshView>>>,
    upstream: Arc<Upstream>,
    binding: ServiceBinding,
    connectors: Arc<ConnectorFactory>,
) {
    loop {
        let view = views.borrow_and_update().clone();
        if let Some(view) = view {
            apply_service(&view, &upstream, &binding, &*connectors);
        }
        if views.changed().await.is_err() {
            return;
        }
    }
}

/// Applies one view to an upstream.
fn apply_service(
    view: &MeshView,
    upstream: &Upstream,
    binding: &ServiceBinding,
    connectors: &ConnectorFactory,
) {
    match view.services.get(&binding.key) {
        Some(service) => {
            let endpoints: Vec<_> = service
                .endpoints
                .iter()
                .map(|e| (e.address.clone(), e.identity.clone()))
                .collect();
            let route = service.route.as_ref();
            let outlier = route.and_then(|r| r.outlier_detection.clone());
            upstream.balancer.update(&endpoints, outlier, connectors);
            upstream.set_policy(route);
            let protocol = binding
                .protocol_override
                .unwrap_or_else(|| service.protocol(binding.port));
            binding.protocol.store(Arc::new(protocol));
        }
        None => {
            warn!(event = "unknown upstream service", service = %binding.key);
            upstream.balancer.update(&[], None, connectors);
            upstream.set_policy(None);
        }
    }
}

/// Keeps each inbound port's policy in step with discovery.
async fn follow_inbound_policy(shared: Arc<Shared>) {
    let mut views = shared.discovery.subscribe();
    loop {
        let view = views.borrow_and_update().clone();
        if let Some(view) = view {
            for inbound in shared.inbounds.all().iter() {
                shared.apply_policy(inbound, &view);
            }
        }
        if views.changed().await.is_err() {
            return;
        }
    }
}

/// TLS connectors per peer identity, presenting this proxy's current certificate.
fn connector_factory(identity: &IdentityManager) -> Arc<ConnectorFactory> {
    let trust = identity.trust();
    let cert = identity.current_cert();
    Arc::new(move |peer: &SpiffeId| {
        let make = |alpn: &[&[u8]]| {
            tls::client_config(trust.clone(), peer.clone(), Some(cert.clone()), alpn)
                .map(|config| TlsConnector::from(Arc::new(config)))
        };
        Ok(Connectors {
            h2: make(&[ALPN_H2_TUNNELS, ALPN_H2])?,
            http1: make(&[ALPN_HTTP1])?,
            tcp: make(&[ALPN_TCP])?,
        })
    })
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
pub async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => Ok(()),
        result = tokio::signal::ctrl_c() => result,
    }
}

fn identity_manager(
    config: &ProxyConfig,
    metrics: Arc<Metrics>,
) -> Result<Arc<IdentityManager>, StartError> {
    let path = &config.control_plane.trust_bundle_file;
    let bundle_error = |source| StartError::TrustBundle {
        path: path.clone(),
        source: Box::new(source),
    };
    let pem = std::fs::read(path).map_err(|e| bundle_error(tls::TlsError::Pem(e.to_string())))?;
    let bundle = TrustBundle::from_pem(&pem).map_err(bundle_error)?;
    let trust = Trust::new(config.identity.trust_domain.clone(), bundle);
    let control_plane = ControlPlane {
        address: config.control_plane.address.clone(),
        identity: config.control_plane_identity()?,
    };
    Ok(IdentityManager::new(
        config.workload_identity()?,
        control_plane,
        config.bootstrap()?,
        trust,
        metrics,
    ))
}

async fn bind(address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Listen { address, source })
}

fn local_address(listener: &TcpListener, address: SocketAddr) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Listen { address, source })
}
