//! The proxy's metrics, in Prometheus form on the admin port.
//!
//! Labels only ever take values from small, known sets (directions, refusal reasons) or
//! from verified identities, so a hostile peer cannot grow the series count.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::metrics::exemplar::HistogramWithExemplars;

use crate::http::Body;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tessera_mesh::process::accept::ACCEPT_ERRORS;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Why a connection was refused before any application byte moved.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Refusal {
    /// Plaintext on a port that only speaks mTLS.
    Plaintext,
    /// The peer's certificate does not chain to the trust bundle, or is expired.
    UntrustedCertificate,
    /// The peer is trusted but is not who it was expected to be.
    UnexpectedIdentity,
    /// The peer presented no certificate.
    NoCertificate,
    /// This proxy has no certificate yet (or it expired).
    NoLocalCertificate,
    HandshakeTimeout,
    HandshakeFailed,
    /// The remote address or local application did not accept the TCP connection.
    ConnectFailed,
    /// No configuration from the control plane yet: nothing is let in blind.
    NoConfiguration,
}

/// A label value shared by every request of one caller or destination: cloning it is a
/// reference count, not a string copy.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Label(Arc<str>);

impl Label {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, &self.0)
    }
}

/// The gRPC status label: one of the 17 codes, else "other" (bounded cardinality, and
/// no string allocated per request).
fn grpc_status_label(value: &str) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    CODES
        .iter()
        .find(|code| **code == value)
        .copied()
        .unwrap_or("other")
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Plaintext => "plaintext",
            Refusal::UntrustedCertificate => "untrusted_certificate",
            Refusal::UnexpectedIdentity => "unexpected_identity",
            Refusal::NoCertificate => "no_certificate",
            Refusal::NoLocalCertificate => "no_local_certificate",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::HandshakeFailed => "handshake_failed",
            Refusal::ConnectFailed => "connect_failed",
            Refusal::NoConfiguration => "no_configuration",
        }
    }
}

impl EncodeLabelValue for Refusal {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub direction: Direction,
    /// Verified SPIFFE ID of the other proxy.
    pub peer_identity: String,
    /// "mtls", or "plaintext" on PERMISSIVE / DISABLE ports.
    pub security: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    pub direction: Direction,
    /// "sent" to the peer proxy, or "received" from it.
    pub flow: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub decision: &'static str,
    /// `namespace/name`, or "none" when no policy decided.
    pub policy: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: Direction,
    pub reason: Refusal,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    pub http: RequestMetrics,
    pub spans_dropped: Counter,
    pub authz: Family<AuthzLabels, Counter>,
    pub retries: Family<UpstreamLabels, Counter>,
    pub connections: Family<ConnectionLabels, Counter>,
    pub connections_active: Family<DirectionLabels, Gauge>,
    pub connections_closed: Family<DirectionLabels, Counter>,
    pub bytes: Family<ByteLabels, Counter>,
    pub refused: Family<RefusalLabels, Counter>,
    pub cert_expiry: Gauge<f64, AtomicU64>,
    pub cert_renewals: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let http = RequestMetrics::new(&mut registry);
        let spans_dropped = Counter::default();
        registry.register(
            "spans_dropped",
            "Spans dropped because the export queue was full or the collector failed",
            spans_dropped.clone(),
        );
        let metrics = Self {
            http,
            spans_dropped,
            connections: Family::default(),
            connections_active: Family::default(),
            connections_closed: Family::default(),
            bytes: Family::default(),
            refused: Family::default(),
            cert_expiry: Gauge::default(),
            cert_renewals: Counter::default(),
            retries: Family::default(),
            authz: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "tcp_connections",
            "mTLS connections established",
            metrics.connections.clone(),
        );
        registry.register(
            "tcp_connections_active",
            "Connections open now",
            metrics.connections_active.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "Connections that carried traffic and have ended",
            metrics.connections_closed.clone(),
        );
        registry.register(
            "tcp_bytes",
            "Application bytes carried over mTLS",
            metrics.bytes.clone(),
        );
        registry.register(
            "tcp_connections_refused",
            "Connections refused before any application byte moved",
            metrics.refused.clone(),
        );
        registry.register(
            "identity_cert_expiry_timestamp_seconds",
            "When the current workload certificate expires (Unix time)",
            metrics.cert_expiry.clone(),
        );
        registry.register(
            "identity_cert_renewals",
            "Workload certificates obtained from the control plane",
            metrics.cert_renewals.clone(),
        );
        registry.register(
            "authz_decisions",
            "Authorization decisions, by outcome and deciding policy",
            metrics.authz.clone(),
        );
        registry.register(
            "retries",
            "Requests retried, by upstream",
            metrics.retries.clone(),
        );
        registry.register(
            "accept_errors",
            "Connections a listener could not accept, or closed at once to keep descriptors in reserve",
            ACCEPT_ERRORS.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// Prometheus text exposition (OpenMetrics flavour, ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Counters and gauges of one direction, resolved once so connections touch no lock.
    pub fn direction(&self, direction: Direction) -> DirectionMetrics {
        let bytes = |flow| {
            self.bytes
                .get_or_create(&ByteLabels { direction, flow })
                .clone()
        };
        DirectionMetrics {
            active: self
                .connections_active
                .get_or_create(&DirectionLabels { direction })
                .clone(),
            closed: self
                .connections_closed
                .get_or_create(&DirectionLabels { direction })
                .clone(),
            sent: bytes("sent"),
            received: bytes("received"),
        }
    }

    /// Counts one plaintext connection accepted on a PERMISSIVE or DISABLE port.
    pub fn plaintext_connection(&self) {
        self.connections
            .get_or_create(&ConnectionLabels {
                direction: Direction::Inbound,
                peer_identity: String::new(),
                security: "plaintext",
            })
            .inc();
    }

    /// Counts one established connection with a verified peer.
    pub fn connection(&self, direction: Direction, peer_identity: &tessera_mesh::SpiffeId) {
        self.connections
            .get_or_create(&ConnectionLabels {
                direction,
                peer_identity: peer_identity.to_string(),
                security: "mtls",
            })
            .inc();
    }

    /// The counter of authorization decisions `decision` ("allow", "deny", "audit") made
    /// by `policy` (`namespace/name`, or "none").
    pub fn authz_counter(&self, decision: &'static str, policy: String) -> Counter {
        self.authz
            .get_or_create(&AuthzLabels { decision, policy })
            .clone()
    }

    /// The retry counter of one upstream.
    pub fn retries(&self, upstream: &str) -> Counter {
        self.retries
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .clone()
    }

    pub fn refuse(&self, direction: Direction, reason: Refusal) {
        self.refused
            .get_or_create(&RefusalLabels { direction, reason })
            .inc();
    }
}

/// The per-direction series every connection updates.
#[derive(Clone)]
pub struct DirectionMetrics {
    pub active: Gauge,
    pub closed: Counter,
    /// Bytes sent to the peer proxy.
    pub sent: Counter,
    /// Bytes received from the peer proxy.
    pub received: Counter,
}

/// Latency buckets, seconds: fine from half a millisecond to 10 s, so percentiles
/// interpolated from them stay close to the truth.
const LATENCY_BUCKETS: [f64; 24] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    /// Caller: a SPIFFE ID, or "unauthenticated".
    pub source: Label,
    /// Outbound: the upstream service; inbound: this workload's SPIFFE ID.
    pub destination: Label,
    pub code: u16,
    /// gRPC status (from trailers or a trailers-only answer); empty for plain HTTP.
    pub grpc_status: &'static str,
    /// "mtls" or "plaintext" (the hop this proxy saw).
    pub security: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: Direction,
    pub destination: Label,
    pub code_class: &'static str,
}

/// Exemplar label: the trace a sample came from.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    pub trace_id: String,
}

type LatencyHistogram = HistogramWithExemplars<TraceExemplar>;

fn latency_histogram() -> LatencyHistogram {
    HistogramWithExemplars::new(LATENCY_BUCKETS.into_iter())
}

/// Request (RED) metrics.
pub struct RequestMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<LatencyLabels, LatencyHistogram, fn() -> LatencyHistogram>,
}

impl RequestMetrics {
    fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        };
        registry.register(
            "requests",
            "HTTP and gRPC requests, by caller, destination and outcome",
            metrics.requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Request latency until the last byte of the answer",
            prometheus_client::registry::Unit::Seconds,
            metrics.latency.clone(),
        );
        metrics
    }
}

/// The requests of one (direction, source, destination, security): their metric series
/// are resolved once and kept, so recording a request is a few atomic operations — no
/// label hashing, no family lock, no allocation. Outbound has one per upstream, inbound
/// one per peer connection.
pub struct RequestSeries {
    metrics: Arc<Metrics>,
    direction: Direction,
    source: Label,
    destination: Label,
    security: &'static str,
    /// Latency by code class (1xx..5xx), created on first use.
    latency: [std::sync::OnceLock<LatencyHistogram>; 5],
    /// Request counters by (code, gRPC status) seen so far; grows to the handful of
    /// outcomes a route has, read without locking.
    counters: arc_swap::ArcSwap<Vec<(u16, &'static str, Counter)>>,
}

impl RequestSeries {
    pub fn new(
        metrics: Arc<Metrics>,
        direction: Direction,
        source: Label,
        destination: Label,
        security: &'static str,
    ) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            direction,
            source,
            destination,
            security,
            latency: Default::default(),
            counters: Default::default(),
        })
    }

    fn latency(&self, code: u16) -> &LatencyHistogram {
        let (index, code_class) = match code {
            100..=199 => (0, "1xx"),
            200..=299 => (1, "2xx"),
            300..=399 => (2, "3xx"),
            400..=499 => (3, "4xx"),
            _ => (4, "5xx"),
        };
        self.latency[index].get_or_init(|| {
            self.metrics
                .http
                .latency
                .get_or_create(&LatencyLabels {
                    direction: self.direction,
                    destination: self.destination.clone(),
                    code_class,
                })
                .clone()
        })
    }

    fn count(&self, code: u16, grpc_status: &'static str) {
        let known = self.counters.load();
        if let Some((_, _, counter)) = known
            .iter()
            .find(|(c, g, _)| *c == code && *g == grpc_status)
        {
            counter.inc();
            return;
        }
        let counter = self
            .metrics
            .http
            .requests
            .get_or_create(&RequestLabels {
                direction: self.direction,
                source: self.source.clone(),
                destination: self.destination.clone(),
                code,
                grpc_status,
                security: self.security,
            })
            .clone();
        counter.inc();
        self.counters.rcu(|known| {
            let mut known = Vec::clone(known);
            if !known
                .iter()
                .any(|(c, g, _)| *c == code && *g == grpc_status)
            {
                known.push((code, grpc_status, counter.clone()));
            }
            known
        });
    }
}

/// One request being measured: recorded once, when the answer's body ends (or is dropped).
pub struct RequestMeter {
    series: Arc<RequestSeries>,
    started: Instant,
    trace_id: Option<String>,
    /// Set when access logging is on: (method, path without query).
    access: Option<(http::Method, String)>,
}

impl RequestMeter {
    pub fn start(series: Arc<RequestSeries>) -> Self {
        Self {
            series,
            started: Instant::now(),
            trace_id: None,
            access: None,
        }
    }

    /// Logs the request as one JSON line when it ends.
    pub fn with_access_log(
        mut self,
        enabled: bool,
        method: &http::Method,
        uri: &http::Uri,
    ) -> Self {
        if enabled {
            self.access = Some((method.clone(), uri.path().to_string()));
        }
        self
    }

    /// Attaches the trace of a sampled request, shown as the latency exemplar.
    pub fn with_trace(mut self, trace_id: Option<String>) -> Self {
        self.trace_id = trace_id;
        self
    }

    /// Wraps the response body (boxing it once) to record the request when it ends.
    pub fn finish<B>(self, response: http::Response<B>) -> http::Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Unpin + Send + Sync + 'static,
        B::Error: Into<crate::http::BoxError>,
    {
        let code = response.status().as_u16();
        let grpc_status = response
            .headers()
            .get(&crate::http::GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .map(grpc_status_label);
        let proxy_error = response
            .headers()
            .get(crate::http::PROXY_ERROR)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        response.map(|body| {
            crate::http::boxed(MeasuredBody {
                inner: body,
                pending: Some(Pending {
                    meter: self,
                    code,
                    grpc_status,
                    proxy_error,
                    bytes: 0,
                }),
            })
        })
    }
}

struct Pending {
    meter: RequestMeter,
    code: u16,
    grpc_status: Option<&'static str>,
    proxy_error: Option<String>,
    /// Body bytes sent to the caller.
    bytes: u64,
}

impl Pending {
    fn record(self) {
        let meter = self.meter;
        let series = &meter.series;
        let elapsed = meter.started.elapsed().as_secs_f64();
        if let Some((method, path)) = &meter.access {
            tracing::info!(
                target: "access",
                event = "request",
                direction = series.direction.as_str(),
                source = %series.source,
                destination = %series.destination,
                method = %method,
                path = %path,
                status = self.code,
                grpc_status = self.grpc_status,
                duration_ms = elapsed * 1000.0,
                bytes = self.bytes,
                trace_id = meter.trace_id.as_deref(),
                proxy_error = self.proxy_error.as_deref(),
            );
        }
        series.latency(self.code).observe(
            elapsed,
            meter.trace_id.map(|trace_id| TraceExemplar { trace_id }),
            None,
        );
        series.count(self.code, self.grpc_status.unwrap_or_default());
    }
}

/// A body that records its request when it ends.
struct MeasuredBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> http_body::Body for MeasuredBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<crate::http::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(Into::into);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(pending)) = (frame.data_ref(), self.pending.as_mut()) {
                    pending.bytes += data.len() as u64;
                }
                if let (Some(trailers), Some(pending)) =
                    (frame.trailers_ref(), self.pending.as_mut())
                    && let Some(status) = trailers
                        .get(&crate::http::GRPC_STATUS)
                        .and_then(|v| v.to_str().ok())
                {
                    pending.grpc_status = Some(grpc_status_label(status));
                }
            }
            std::task::Poll::Ready(None) | std::task::Poll::Ready(Some(Err(_))) => {
                if let Some(pending) = self.pending.take() {
                    pending.record();
                }
            }
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeasuredBody<B> {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.record();
        }
    }
}

impl DirectionMetrics {
    /// Marks a connection open until the returned guard drops.
    pub fn open(&self) -> OpenConnection {
        self.active.inc();
        OpenConnection(self.clone())
    }
}

/// An open connection in the active gauge; counted as closed when dropped.
pub struct OpenConnection(DirectionMetrics);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.active.dec();
        self.0.closed.inc();
    }
}
