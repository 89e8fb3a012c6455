//! The admin endpoint (port 15020): liveness, readiness, metrics, the current
//! certificate and the configuration in force. Plain HTTP/1.1, for kubelets, Prometheus
//! and operators; it never shows a key or a token. Served by
//! `tessera_mesh::process::admin::serve`, as the control plane's own admin port is.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::StatusCode;
use tessera_mesh::migration::{MigrationReport, PortReport};
use tessera_mesh::process::admin::Reply;

use crate::config::ProxyConfig;
use crate::discovery::{Discovery, MeshView, MeshViewDump};
use crate::identity::IdentityManager;
use crate::inbound::{Inbound, InboundSet};
use crate::lifecycle::Drain;
use crate::probe::AppProbes;
use crate::telemetry::Metrics;

/// What the admin port answers: the application's probes under their paths (they wait
/// on the application), the proxy's own state otherwise.
pub(crate) struct Routes {
    pub identity: Arc<IdentityManager>,
    pub discovery: Arc<Discovery>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ProxyConfig>,
    pub inbounds: Arc<InboundSet>,
    pub drain: Drain,
    pub probes: Option<Arc<AppProbes>>,
}

impl Routes {
    /// The answer to a GET of `path`.
    pub(crate) fn route(
        &self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Pin<Box<dyn Future<Output = Reply> + Send>> {
        match &self.probes {
            Some(probes) if probes.serves(path) => {
                let (probes, path) = (probes.clone(), path.to_owned());
                Box::pin(async move { probes.check(&path).await })
            }
            _ => Box::pin(std::future::ready(self.state(path, headers))),
        }
    }

    fn state(&self, path: &str, headers: &http::HeaderMap) -> Reply {
        let Self {
            identity,
            discovery,
            metrics,
            config,
            inbounds,
            drain,
            ..
        } = self;
        match path {
            "/" => Reply::text(StatusCode::OK, INDEX),
            "/live" => Reply::text(StatusCode::OK, "live\n"),
            "/ready" if drain.is_draining() => {
                Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
            }
            "/ready" if !identity.has_valid_cert() => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no valid certificate\n",
            ),
            "/ready" if !discovery.has_view() => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no configuration from the control plane yet\n",
            ),
            "/ready" => Reply::text(StatusCode::OK, "ready\n"),
            "/metrics" => Reply::metrics(metrics.encode(), headers),
            "/certs" => match identity.status() {
                Some(status) => Reply::json(&*status),
                None => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "no certificate yet\n"),
            },
            "/config" => {
                let view = discovery.current();
                Reply::json(&config_dump(config, view.as_deref(), &inbounds.all()))
            }
            "/migration" => Reply::json(&migration_report(identity, &inbounds.all())),
            _ => Reply::not_found(),
        }
    }
}

/// What `/` answers: every endpoint, so an operator need not know them by heart.
const INDEX: &str = "\
/live        200 while the process runs
/ready       200 with a certificate and the control plane's configuration, 503 and why otherwise
/metrics     Prometheus metrics (OpenMetrics with exemplars when asked for)
/certs       the workload certificate: identity, serial, validity, renewal time
/config      the proxy's configuration, what the control plane sent of what it uses (services,
             endpoints, routes, policies) and the policies in force on each inbound port (no secrets)
/migration   per inbound port: mTLS and plaintext callers (tessera check migration)
/app-health/<container>/livez|readyz|startupz   the application's own probes (HTTP, gRPC health, TCP), when injected
";

/// What `/config` answers, as `istioctl proxy-config` would: the proxy's own
/// configuration (its fields at the top, as before), the control plane's last snapshot
/// (`discovery`, null before the first), and what each inbound port enforces from it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigDump<'a> {
    /// Holds no secret: the join token lives in a file or the environment and only
    /// its path is part of the configuration.
    #[serde(flatten)]
    proxy: &'a ProxyConfig,
    discovery: Option<MeshViewDump<'a>>,
    inbound_policies: Vec<PortPolicy>,
}

/// The policy in force on one inbound port.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct PortPolicy {
    listen: std::net::SocketAddr,
    application_port: u16,
    /// `None` until the first snapshot.
    mtls_mode: Option<String>,
    /// The PeerAuthentication that set it (`None`: the STRICT default).
    mtls_mode_by: Option<String>,
    /// `namespace/name (ACTION)`, in evaluation order; a policy that could not be
    /// compiled says why (it fails closed).
    authorization_policies: Vec<String>,
    jwt_validation: bool,
    /// `namespace/name: limit` of each RateLimitPolicy limit, in order.
    rate_limits: Vec<String>,
}

fn config_dump<'a>(
    config: &'a ProxyConfig,
    view: Option<&'a MeshView>,
    inbounds: &[Arc<Inbound>],
) -> ConfigDump<'a> {
    let inbound_policies = inbounds
        .iter()
        .map(|inbound| {
            let policy = inbound.policy.load();
            let policy = policy.as_deref();
            PortPolicy {
                listen: inbound.port.listen,
                application_port: inbound.app_port(),
                mtls_mode: policy.map(|p| p.mode.to_string()),
                mtls_mode_by: policy.and_then(|p| p.mode_policy.clone()),
                authorization_policies: policy
                    .map(|p| {
                        p.authorization_policies()
                            .iter()
                            .map(|compiled| {
                                let action = format!("{:?}", compiled.action()).to_uppercase();
                                match compiled.error() {
                                    None => format!("{} ({action})", compiled.id()),
                                    Some(error) => format!(
                                        "{} ({action}, fails closed: {error})",
                                        compiled.id()
                                    ),
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                jwt_validation: policy.is_some_and(|p| p.jwt.is_some()),
                rate_limits: policy.map(|p| p.rate_limits.describe()).unwrap_or_default(),
            }
        })
        .collect();
    ConfigDump {
        proxy: config,
        discovery: view.map(MeshView::dump),
        inbound_policies,
    }
}

fn migration_report(identity: &IdentityManager, inbounds: &[Arc<Inbound>]) -> MigrationReport {
    MigrationReport {
        workload: identity.identity().to_string(),
        ports: inbounds
            .iter()
            .map(|inbound| {
                let policy = inbound.policy.load();
                let (mtls, plaintext) = inbound.sources.report();
                PortReport {
                    listen: inbound.port.listen,
                    application_port: inbound.app_port(),
                    mode: policy
                        .as_ref()
                        .map_or("unknown".into(), |p| p.mode.to_string()),
                    mode_policy: policy.as_ref().and_then(|p| p.mode_policy.clone()),
                    mtls,
                    plaintext,
                }
            })
            .collect(),
    }
}
