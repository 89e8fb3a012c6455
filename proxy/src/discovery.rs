//! The proxy's view of the mesh, kept current by the control plane's discovery stream.
//!
//! The stream authenticates with the workload certificate, so it starts once the proxy
//! has one. Every snapshot replaces the view atomically; a snapshot that cannot be parsed
//! is refused and the last good view stays. When the control plane goes away the proxy
//! keeps routing on its last view and reconnects with backoff.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tessera_proto::api::discovery::WatchRequest;
use tessera_proto::api::discovery::discovery_client::DiscoveryClient;
use tessera_proto::mesh::{MeshSnapshot, ServiceEntry};
use tessera_proto::policy::{
    AuthorizationPolicySpec, Named, PeerAuthenticationSpec, RequestAuthenticationSpec,
};
use tokio::sync::watch;
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
        }
    }
}

impl MeshView {
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
}

impl Discovery {
    pub fn new() -> Arc<Self> {
        let (view, _) = watch::channel(None);
        Arc::new(Self { view })
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

    /// Follows the discovery stream forever.
    pub async fn run(self: Arc<Self>, control_plane: ControlPlane, identity: Arc<IdentityManager>) {
        let mut retry = FIRST_RETRY;
        loop {
            while !identity.has_valid_cert() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match self.follow(&control_plane, &identity).await {
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
    ) -> Result<(), String> {
        let channel = control_plane
            .connect(identity.trust(), Some(identity.current_cert()))
            .await
            .map_err(|e| e.to_string())?;
        let known_version = self
            .current()
            .map(|v| v.version.clone())
            .unwrap_or_default();
        let mut stream = DiscoveryClient::new(channel)
            .watch(WatchRequest { known_version })
            .await
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
            .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(snapshot)) => self.apply(snapshot.version, &snapshot.mesh_json),
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
    use super::*;

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
