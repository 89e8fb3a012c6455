//! Wiring: reads nothing, decides nothing, just builds the proxy from its configuration
//! and starts its parts — identity renewal, admin, inbound and outbound listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use tessera_proto::tls::{self, ClientAuth, Trust, TrustBundle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::info;

use crate::config::ProxyConfig;
use crate::control_plane::ControlPlane;
use crate::identity::IdentityManager;
use crate::inbound::Inbound;
use crate::outbound::Outbound;
use crate::telemetry::{Direction, Metrics};
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
    pub identity: Arc<IdentityManager>,
    pub metrics: Arc<Metrics>,
    tasks: Vec<JoinHandle<()>>,
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
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let identity = identity_manager(&config, metrics.clone())?;
    let mut tasks = vec![tokio::spawn(identity.clone().run())];

    let admin_listener = bind(config.admin).await?;
    let admin_address = local_address(&admin_listener, config.admin)?;
    let routes = admin::routes(identity.clone(), metrics.clone(), config.clone());
    tasks.push(tokio::spawn(admin::serve(admin_listener, routes)));

    let server_config = tls::server_config(
        identity.trust(),
        identity.current_cert(),
        ClientAuth::Required,
        &[],
    )?;
    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let mut inbound_addresses = Vec::new();
    for port in &config.inbound {
        let listener = bind(port.listen).await?;
        inbound_addresses.push(local_address(&listener, port.listen)?);
        let inbound = Arc::new(Inbound {
            port: port.clone(),
            acceptor: acceptor.clone(),
            identity: identity.clone(),
            metrics: metrics.clone(),
            counters: metrics.direction(Direction::Inbound),
            limits: config.limits.clone(),
        });
        tasks.push(tokio::spawn(inbound.serve(listener)));
    }

    let mut outbound_addresses = Vec::new();
    for upstream in &config.outbound {
        let listener = bind(upstream.listen).await?;
        outbound_addresses.push(local_address(&listener, upstream.listen)?);
        let client_config = tls::client_config(
            identity.trust(),
            upstream.identity.clone(),
            Some(identity.current_cert()),
            &[],
        )?;
        let outbound = Arc::new(Outbound {
            upstream: upstream.clone(),
            connector: TlsConnector::from(Arc::new(client_config)),
            identity: identity.clone(),
            metrics: metrics.clone(),
            counters: metrics.direction(Direction::Outbound),
            limits: config.limits.clone(),
        });
        tasks.push(tokio::spawn(outbound.serve(listener)));
    }

    info!(
        event = "proxy started",
        identity = %identity.identity(),
        admin = %admin_address,
        inbound = ?inbound_addresses,
        outbound = ?outbound_addresses,
        control_plane = %config.control_plane.address,
    );
    Ok(RunningProxy {
        admin_address,
        inbound_addresses,
        outbound_addresses,
        identity,
        metrics,
        tasks,
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
        config.join_token()?,
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
