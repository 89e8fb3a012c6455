//! Wiring: reads nothing, decides nothing, just builds the proxy from its configuration
//! and starts its parts — identity renewal, admin, inbound and outbound listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use tessera_mesh::tls::{self, ClientAuth, Trust, TrustBundle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::info;

use tessera_mesh::SpiffeId;

use crate::alpn::{ALPN_H2, ALPN_H2_TUNNELS, ALPN_HTTP1, ALPN_TCP};
use crate::config::{ProxyConfig, UpstreamTarget};
use crate::control_plane::ControlPlane;
use crate::discovery::Discovery;
use crate::identity::IdentityManager;
use crate::inbound::InboundSet;
use crate::inbound::rate_limit::RateLimiters;
use crate::lifecycle::DrainTrigger;
use crate::listeners::{Listeners, follow_inbound_policy};
use crate::outbound::endpoint::{ConnectorFactory, Connectors};
use crate::probe::AppProbes;
use crate::telemetry::Metrics;
use crate::trace::Tracer;
use crate::transparent::{TransparentInbound, TransparentOutbound};
use crate::{admin, config};
use tessera_mesh::process;

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
    #[error("trust bundle {path}: cannot read it: {error}")]
    TrustBundleUnreadable {
        path: std::path::PathBuf,
        error: std::io::Error,
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
    let discovery = Discovery::new(metrics.control_plane_connected.clone());
    let control_plane = ControlPlane {
        address: config.control_plane.address.clone(),
        identity: config.control_plane_identity()?,
    };
    let mut tasks = vec![tokio::spawn(identity.clone().run())];

    let server_config = tls::server_config(
        identity.trust(),
        identity.current_cert(),
        ClientAuth::Required,
        &[ALPN_H2_TUNNELS, ALPN_H2, ALPN_HTTP1, ALPN_TCP],
    )?;
    let (drain_trigger, drain) =
        crate::lifecycle::channel_with_budget(config.limits.max_requests_in_flight);
    let tracer = Arc::new(match &config.tracing {
        Some(tracing) => Tracer::start(tracing, identity.identity(), metrics.spans_dropped.clone()),
        None => Tracer::disabled(metrics.spans_dropped.clone()),
    });
    let shared = Arc::new(Listeners {
        acceptor: TlsAcceptor::from(Arc::new(server_config)),
        connectors: connector_factory(&identity),
        identity: identity.clone(),
        labels: Arc::new(config.labels.clone()),
        discovery: discovery.clone(),
        metrics: metrics.clone(),
        limits: config.limits.clone(),
        tracer,
        access_log: config.access_log,
        drain: drain.clone(),
        inbounds: Arc::new(InboundSet::default()),
        rate_limiters: RateLimiters::new(identity.identity()),
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
    // Discovery tells the control plane where this admin port is (for `tessera stat`).
    tasks.push(tokio::spawn(discovery.clone().run(
        control_plane,
        identity.clone(),
        admin_address,
    )));
    let routes = admin::Routes {
        identity: identity.clone(),
        discovery: discovery.clone(),
        metrics: metrics.clone(),
        config: config.clone(),
        inbounds: shared.inbounds.clone(),
        drain: drain.clone(),
        probes: AppProbes::new(&config.app_probes, &config.limits),
    };
    tasks.push(tokio::spawn(process::admin::serve(
        admin_listener,
        move |path, headers| routes.route(path, headers),
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
        let outbound = TransparentOutbound::new(shared.clone(), transparent.release_unused_after);
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

fn identity_manager(
    config: &ProxyConfig,
    metrics: Arc<Metrics>,
) -> Result<Arc<IdentityManager>, StartError> {
    let path = &config.control_plane.trust_bundle_file;
    let bundle_error = |source| StartError::TrustBundle {
        path: path.clone(),
        source: Box::new(source),
    };
    let pem = std::fs::read(path).map_err(|error| StartError::TrustBundleUnreadable {
        path: path.clone(),
        error,
    })?;
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
