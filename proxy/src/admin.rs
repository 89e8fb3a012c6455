//! The admin endpoint (port 15020): liveness, readiness, metrics, the current
//! certificate and the configuration in force. Plain HTTP/1.1, for kubelets, Prometheus
//! and operators; it never shows a key or a token.
//!
//! [`serve`] is a minimal router the control plane reuses for its own admin port.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::{Empty, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::config::{AppProbe, Limits, ProxyConfig};
use crate::discovery::Discovery;
use crate::identity::IdentityManager;
use crate::inbound::{Inbound, InboundSet};
use crate::lifecycle::Drain;
use crate::migration::SourceReport;
use crate::telemetry::Metrics;
use serde::Serialize;

/// One admin answer.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(value: &impl serde::Serialize) -> Self {
        match serde_json::to_string_pretty(value) {
            Ok(body) => Self {
                status: StatusCode::OK,
                content_type: "application/json",
                body,
            },
            Err(error) => Self::text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        }
    }

    /// Metrics in the format the scraper asked for: OpenMetrics (with exemplars) when
    /// its `Accept` names it, as Prometheus does, else the classic text format.
    pub fn metrics(openmetrics: String, headers: &http::HeaderMap) -> Self {
        let wants_openmetrics = headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("application/openmetrics-text"));
        if wants_openmetrics {
            Self {
                status: StatusCode::OK,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: openmetrics,
            }
        } else {
            Self {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: to_prometheus_text(&openmetrics),
            }
        }
    }

    pub fn not_found() -> Self {
        Self::text(StatusCode::NOT_FOUND, "not found\n")
    }
}

/// Serves GET requests on `listener`, answering each path (and its headers) with `route`.
pub async fn serve<R>(listener: TcpListener, route: R)
where
    R: Fn(&str, &http::HeaderMap) -> Reply + Send + Sync + 'static,
{
    serve_with_probes(listener, route, None).await;
}

/// [`serve`], with the application's probes forwarded under `/app-health/`.
pub async fn serve_with_probes<R>(listener: TcpListener, route: R, probes: Option<Arc<AppProbes>>)
where
    R: Fn(&str, &http::HeaderMap) -> Reply + Send + Sync + 'static,
{
    let route = Arc::new(route);
    let mut spare = SpareDescriptor::open();
    let mut backoff = crate::tcp::AcceptBackoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors: give up the spare one so this probe is answered.
            Err(error) if spare.release() => match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    backoff.failed(&error).await;
                    continue;
                }
            },
            Err(error) => {
                backoff.failed(&error).await;
                spare.reopen();
                continue;
            }
        };
        backoff.succeeded();
        spare.reopen();
        let route = route.clone();
        let probes = probes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let route = route.clone();
                let probes = probes.clone();
                async move {
                    let path = request.uri().path();
                    let reply = match (request.method(), &probes) {
                        (&Method::GET, Some(probes)) if probes.handles(path) => {
                            probes.check(path).await
                        }
                        (&Method::GET, _) => route(path, request.headers()),
                        _ => Reply::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"),
                    };
                    let response = Response::builder()
                        .status(reply.status)
                        .header(header::CONTENT_TYPE, reply.content_type)
                        .body(Full::new(Bytes::from(reply.body)));
                    Ok::<_, Infallible>(response.unwrap_or_default())
                }
            });
            if let Err(error) = http1::Builder::new()
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(event = "admin connection error", error = %error);
            }
        });
    }
}

/// A descriptor held back for the admin port: when the process runs out (a flood on
/// the data path), closing it lets one more probe connection in, so `/live` and
/// `/ready` still answer. Taken again as soon as a descriptor is free.
struct SpareDescriptor(Option<std::fs::File>);

impl SpareDescriptor {
    fn open() -> Self {
        Self(std::fs::File::open("/dev/null").ok())
    }

    /// Closes the spare; whether there was one.
    fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    fn reopen(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }
}

/// The application's own HTTP probes, reachable on the admin port. The kubelet speaks
/// plaintext, which a STRICT application port refuses; injection points the pod's probes
/// here instead and the proxy asks the application itself, over loopback.
pub struct AppProbes {
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
    pub fn new(config: &BTreeMap<String, AppProbe>, limits: &Limits) -> Option<Arc<Self>> {
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

    fn handles(&self, path: &str) -> bool {
        self.probes.contains_key(path)
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

/// The proxy's admin routes.
pub fn routes(
    identity: Arc<IdentityManager>,
    discovery: Arc<Discovery>,
    metrics: Arc<Metrics>,
    config: Arc<ProxyConfig>,
    inbounds: Arc<InboundSet>,
    drain: Drain,
) -> impl Fn(&str, &http::HeaderMap) -> Reply + Send + Sync + 'static {
    move |path, headers| match path {
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
        // The configuration holds no secret: the join token lives in a file or the
        // environment and only its path is part of the config.
        "/config" => Reply::json(&*config),
        "/migration" => Reply::json(&migration_report(&identity, &inbounds.all())),
        _ => Reply::not_found(),
    }
}

/// Who reaches each inbound port, over mTLS and in plaintext, and under which mode.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationReport {
    pub workload: String,
    pub ports: Vec<PortReport>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortReport {
    pub listen: std::net::SocketAddr,
    pub application_port: u16,
    pub mode: String,
    pub mode_policy: Option<String>,
    pub mtls: Vec<SourceReport>,
    pub plaintext: Vec<SourceReport>,
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

/// OpenMetrics → Prometheus text 0.0.4: no `# EOF` or `# UNIT`, no exemplars, and counter
/// families named with their `_total` suffix as that format expects.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# TYPE ", "# HELP "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match rewritten {
            Some(line) => text.push_str(&line),
            None => text.push_str(line.split(" # {").next().unwrap_or(line)),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_openmetrics_to_prometheus_text() {
        let openmetrics = "# HELP tessera_requests Requests.\n# TYPE tessera_requests counter\ntessera_requests_total{code=\"200\"} 3\n# HELP tessera_request_duration_seconds Latency.\n# TYPE tessera_request_duration_seconds histogram\n# UNIT tessera_request_duration_seconds seconds\ntessera_request_duration_seconds_bucket{le=\"0.01\"} 2 # {trace_id=\"abc\"} 0.004\n# EOF\n";
        let text = to_prometheus_text(openmetrics);
        assert_eq!(
            text,
            "# HELP tessera_requests_total Requests.\n# TYPE tessera_requests_total counter\ntessera_requests_total{code=\"200\"} 3\n# HELP tessera_request_duration_seconds Latency.\n# TYPE tessera_request_duration_seconds histogram\ntessera_request_duration_seconds_bucket{le=\"0.01\"} 2\n"
        );
    }
}
