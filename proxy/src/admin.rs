//! The admin endpoint (port 15020): liveness, readiness, metrics, the current
//! certificate and the configuration in force. Plain HTTP/1.1, for kubelets, Prometheus
//! and operators; it never shows a key or a token. Served by
//! `tessera_mesh::process::admin::serve`, as the control plane's own admin port is.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tessera_mesh::migration::{MigrationReport, PortReport};
use tessera_mesh::process::admin::Reply;
use tracing::debug;

use crate::config::{AppProbe, Limits, ProxyConfig};
use crate::discovery::{Discovery, MeshView, MeshViewDump};
use crate::identity::IdentityManager;
use crate::inbound::{Inbound, InboundSet};
use crate::lifecycle::Drain;
use crate::telemetry::Metrics;

/// The application's own HTTP probes, reachable on the admin port. The kubelet speaks
/// plaintext, which a STRICT application port refuses; injection points the pod's probes
/// here instead and the proxy asks the application itself, over loopback.
pub(crate) struct AppProbes {
    probes: HashMap<String, Probe>,
    client: Client<HttpConnector, Empty<Bytes>>,
}

struct Probe {
    uri: http::Uri,
    headers: http::HeaderMap,
    timeout: std::time::Duration,
}

impl AppProbes {
    /// `None` when there are no probes to serve.
    pub(crate) fn new(config: &BTreeMap<String, AppProbe>, limits: &Limits) -> Option<Arc<Self>> {
        let probes: HashMap<String, Probe> = config
            .iter()
            .filter_map(|(path, probe)| Some((path.clone(), Probe::new(probe)?)))
            .collect();
        if probes.is_empty() {
            return None;
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(limits.connect_timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Some(Arc::new(Self { probes, client }))
    }

    /// The application's answer: its status code, or 503 when it cannot be reached in time.
    async fn check(&self, path: &str) -> Reply {
        let Some(probe) = self.probes.get(path) else {
            return Reply::not_found();
        };
        let mut request = http::Request::new(Empty::new());
        *request.uri_mut() = probe.uri.clone();
        *request.headers_mut() = probe.headers.clone();
        match tokio::time::timeout(probe.timeout, self.client.request(request)).await {
            Ok(Ok(response)) => {
                let status = response.status();
                Reply::text(status, format!("application answered {status}\n"))
            }
            Ok(Err(error)) => {
                debug!(event = "application probe failed", probe = path, error = %error);
                Reply::text(StatusCode::SERVICE_UNAVAILABLE, "application unreachable\n")
            }
            Err(_) => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "application probe timed out\n",
            ),
        }
    }
}

impl Probe {
    fn new(config: &AppProbe) -> Option<Self> {
        let uri = format!("http://127.0.0.1:{}{}", config.port, config.path)
            .parse()
            .ok()?;
        let mut headers = http::HeaderMap::new();
        for header in &config.http_headers {
            let name = http::HeaderName::from_bytes(header.name.as_bytes()).ok()?;
            let value = http::HeaderValue::from_str(&header.value).ok()?;
            headers.append(name, value);
        }
        Some(Self {
            uri,
            headers,
            timeout: std::time::Duration::from_secs(u64::from(config.timeout_seconds.max(1))),
        })
    }
}

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
            Some(probes) if probes.probes.contains_key(path) => {
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
/config      the proxy's configuration, what the control plane sent (services, endpoints,
             routes, policies) and the policies in force on each inbound port (no secrets)
/migration   per inbound port: mTLS and plaintext callers (tessera check migration)
/app-health/<container>/livez|readyz|startupz   the application's own probes, when injected
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
