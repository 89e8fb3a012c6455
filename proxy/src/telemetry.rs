//! The proxy's metrics, in Prometheus form on the admin port; the access log; each
//! request's log span.
//!
//! Labels only ever take values from small, known sets (directions, refusal reasons),
//! from this proxy's configuration (the upstream services it serves) or from verified
//! identities, so a hostile peer cannot grow the series count.
//!
//! Request and connection series name both ends the same way whichever proxy reports
//! them ([`Workload`]: the service account, namespace and SPIFFE ID a verified identity
//! names), so the outbound and the inbound view of one request aggregate together.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::metrics::exemplar::HistogramWithExemplars;

use crate::http::Body;
use crate::trace::PendingSpan;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tessera_mesh::SpiffeId;
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

/// One end of a request or connection as metric labels: the workload (service account),
/// namespace and SPIFFE ID a verified identity names, or — for a plaintext caller — the
/// workload and namespace "unknown" and no identity. Cloning is three reference counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Workload {
    pub workload: Label,
    pub namespace: Label,
    /// The full SPIFFE ID; empty when there is none.
    pub identity: Label,
}

impl Workload {
    /// The workload a verified identity names.
    pub fn of(identity: &SpiffeId) -> Self {
        Self {
            workload: Label::new(identity.service_account()),
            namespace: Label::new(identity.namespace()),
            identity: Label::new(identity.as_str()),
        }
    }

    /// Anyone who is not a verified identity.
    pub fn unknown() -> Self {
        Self {
            workload: Label::new("unknown"),
            namespace: Label::new("unknown"),
            identity: Label::new(""),
        }
    }
}

/// Who talked to whom: the labels request and connection series share.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartyLabels {
    pub source_workload: Label,
    pub source_namespace: Label,
    pub source_identity: Label,
    pub destination_workload: Label,
    pub destination_namespace: Label,
    pub destination_identity: Label,
}

impl PartyLabels {
    pub fn new(source: &Workload, destination: &Workload) -> Self {
        Self {
            source_workload: source.workload.clone(),
            source_namespace: source.namespace.clone(),
            source_identity: source.identity.clone(),
            destination_workload: destination.workload.clone(),
            destination_namespace: destination.namespace.clone(),
            destination_identity: destination.identity.clone(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub direction: Direction,
    #[prometheus(flatten)]
    pub parties: PartyLabels,
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

/// Bounded: the workload this proxy serves and the limits its policies declare; never
/// the caller or a header value a bucket is keyed by.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub destination_workload: Label,
    pub destination_namespace: Label,
    pub destination_identity: Label,
    /// `namespace/name` of the RateLimitPolicy.
    pub policy: String,
    /// The limit's `name`, or `limits[<index>]`.
    pub limit: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvaluationErrorLabels {
    /// `namespace/name` of the CUSTOM policy.
    pub policy: String,
    /// "timeout", "error", "undefined", "not-a-decision" or "input-too-large".
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// The upstream service, `name.namespace`.
    pub destination_service: String,
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
    pub rate_limited: Family<RateLimitLabels, Counter>,
    pub policy_evaluation_errors: Family<EvaluationErrorLabels, Counter>,
    pub retries: Family<ServiceLabels, Counter>,
    pub connections: Family<ConnectionLabels, Counter>,
    pub connections_active: Family<DirectionLabels, Gauge>,
    pub connections_closed: Family<DirectionLabels, Counter>,
    pub bytes: Family<ByteLabels, Counter>,
    pub refused: Family<RefusalLabels, Counter>,
    pub cert_expiry: Gauge<f64, AtomicU64>,
    pub cert_renewals: Counter,
    /// Attempts to obtain or renew the workload certificate that failed.
    pub cert_renewal_failures: Counter,
    /// 1 while the discovery stream to the control plane is up, else 0.
    pub control_plane_connected: Gauge,
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
            cert_renewal_failures: Counter::default(),
            control_plane_connected: Gauge::default(),
            retries: Family::default(),
            authz: Family::default(),
            rate_limited: Family::default(),
            policy_evaluation_errors: Family::default(),
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
            "identity_cert_renewal_failures",
            "Attempts to obtain or renew the workload certificate that failed",
            metrics.cert_renewal_failures.clone(),
        );
        registry.register(
            "control_plane_connected",
            "1 while the discovery stream to the control plane is up, else 0",
            metrics.control_plane_connected.clone(),
        );
        registry.register(
            "authz_decisions",
            "Authorization decisions, by outcome and deciding policy",
            metrics.authz.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests and opaque connections refused by a RateLimitPolicy, by policy and limit",
            metrics.rate_limited.clone(),
        );
        registry.register(
            "policy_evaluation_errors",
            "CUSTOM (Rego) policy evaluations that gave no decision, so denied, by policy and reason",
            metrics.policy_evaluation_errors.clone(),
        );
        registry.register(
            "retries",
            "Requests retried, by upstream service",
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

    /// Counts one plaintext connection accepted on a PERMISSIVE or DISABLE port of the
    /// workload `local`.
    pub fn plaintext_connection(&self, local: &SpiffeId) {
        self.connections
            .get_or_create(&ConnectionLabels {
                direction: Direction::Inbound,
                parties: PartyLabels::new(&Workload::unknown(), &Workload::of(local)),
                security: "plaintext",
            })
            .inc();
    }

    /// Counts one established connection between this workload (`local`) and a verified
    /// peer: outbound, this workload is the source; inbound, the destination.
    pub fn connection(&self, direction: Direction, local: &SpiffeId, peer: &SpiffeId) {
        let (local, peer) = (Workload::of(local), Workload::of(peer));
        let parties = match direction {
            Direction::Outbound => PartyLabels::new(&local, &peer),
            Direction::Inbound => PartyLabels::new(&peer, &local),
        };
        self.connections
            .get_or_create(&ConnectionLabels {
                direction,
                parties,
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

    /// The counter of what limit `limit` of RateLimitPolicy `policy` (`namespace/name`)
    /// refused at `destination`.
    pub fn rate_limited_counter(
        &self,
        destination: &Workload,
        policy: String,
        limit: String,
    ) -> Counter {
        self.rate_limited
            .get_or_create(&RateLimitLabels {
                destination_workload: destination.workload.clone(),
                destination_namespace: destination.namespace.clone(),
                destination_identity: destination.identity.clone(),
                policy,
                limit,
            })
            .clone()
    }

    /// Counts a CUSTOM policy's evaluation that gave no decision.
    pub fn policy_evaluation_error(&self, policy: &str, reason: &'static str) {
        self.policy_evaluation_errors
            .get_or_create(&EvaluationErrorLabels {
                policy: policy.to_string(),
                reason,
            })
            .inc();
    }

    /// The retry counter of one upstream service.
    pub fn retries(&self, service: &str) -> Counter {
        self.retries
            .get_or_create(&ServiceLabels {
                destination_service: service.to_string(),
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

/// What every request series carries: which proxy reported it, both ends, and how the
/// hop was secured.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeLabels {
    pub direction: Direction,
    #[prometheus(flatten)]
    pub parties: PartyLabels,
    /// Outbound: the upstream service (`name.namespace`); inbound: empty.
    pub destination_service: Label,
    /// "mtls" or "plaintext" (the hop this proxy saw).
    pub security: &'static str,
}

impl EdgeLabels {
    /// An outbound proxy's requests from its workload to `destination`, the identity the
    /// endpoints of `service` proved (unknown when the request reached none).
    pub fn outbound(source: &Workload, destination: &Workload, service: Label) -> Self {
        Self {
            direction: Direction::Outbound,
            parties: PartyLabels::new(source, destination),
            destination_service: service,
            security: "mtls",
        }
    }

    /// An inbound proxy's requests from a verified peer (or, `None`, a plaintext caller)
    /// to its workload.
    pub fn inbound(source: Option<&SpiffeId>, destination: &Workload) -> Self {
        let (source, security) = match source {
            Some(identity) => (Workload::of(identity), "mtls"),
            None => (Workload::unknown(), "plaintext"),
        };
        Self {
            direction: Direction::Inbound,
            parties: PartyLabels::new(&source, destination),
            destination_service: Label::new(""),
            security,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub edge: EdgeLabels,
    /// 1xx..5xx, as on the latency histogram.
    pub code_class: &'static str,
    /// The exact HTTP status.
    pub code: u16,
    /// gRPC status (from trailers or a trailers-only answer): "0".."16", "other", or
    /// empty for plain HTTP.
    pub grpc_status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    #[prometheus(flatten)]
    pub edge: EdgeLabels,
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

/// The requests of one edge (direction, source, destination, service, security): their
/// metric series are resolved once and kept, so recording a request is a few atomic
/// operations — no label hashing, no family lock, no allocation. Outbound has one per
/// endpoint identity of an upstream, inbound one per peer connection.
pub struct RequestSeries {
    metrics: Arc<Metrics>,
    labels: EdgeLabels,
    /// Latency by code class (1xx..5xx), created on first use.
    latency: [std::sync::OnceLock<LatencyHistogram>; 5],
    /// Request counters by (code, gRPC status) seen so far; grows to the handful of
    /// outcomes a route has, read without locking.
    counters: arc_swap::ArcSwap<Vec<(u16, &'static str, Counter)>>,
}

/// The index and label of a status code's class; anything outside 1xx..4xx is 5xx.
fn code_class(code: u16) -> (usize, &'static str) {
    match code {
        100..=199 => (0, "1xx"),
        200..=299 => (1, "2xx"),
        300..=399 => (2, "3xx"),
        400..=499 => (3, "4xx"),
        _ => (4, "5xx"),
    }
}

impl RequestSeries {
    pub fn new(metrics: Arc<Metrics>, labels: EdgeLabels) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            labels,
            latency: Default::default(),
            counters: Default::default(),
        })
    }

    pub fn labels(&self) -> &EdgeLabels {
        &self.labels
    }

    fn latency(&self, code: u16) -> &LatencyHistogram {
        let (index, code_class) = code_class(code);
        self.latency[index].get_or_init(|| {
            self.metrics
                .http
                .latency
                .get_or_create(&LatencyLabels {
                    edge: self.labels.clone(),
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
                edge: self.labels.clone(),
                code_class: code_class(code).1,
                code,
                grpc_status,
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

    /// The caller as the access log names it: its SPIFFE ID, or "unauthenticated".
    fn access_source(&self) -> &str {
        match self.labels.parties.source_identity.as_str() {
            "" => "unauthenticated",
            identity => identity,
        }
    }

    /// The destination as the access log names it: outbound the upstream service,
    /// inbound this workload's SPIFFE ID.
    fn access_destination(&self) -> &str {
        match self.labels.direction {
            Direction::Outbound => self.labels.destination_service.as_str(),
            Direction::Inbound => self.labels.parties.destination_identity.as_str(),
        }
    }
}

/// The span a request's events are logged in: its own (`request`: method and path)
/// inside its connection's, which names the peer; or, when debug logging is off, the
/// connection's itself. Debug level because an enabled span costs the subscriber's
/// bookkeeping on every request, where the connection's is paid once per connection;
/// a disabled one costs a level check. Shared: the request carries it for a reference
/// count, not a copy of the span (which would be a call into the subscriber).
pub fn request_span<B>(
    connection: &Arc<tracing::Span>,
    request: &http::Request<B>,
) -> Arc<tracing::Span> {
    let span = tracing::debug_span!(
        parent: connection.as_ref(),
        "request",
        method = %request.method(),
        path = request.uri().path(),
    );
    if span.is_disabled() {
        connection.clone()
    } else {
        Arc::new(span)
    }
}

/// One request being measured: recorded once, when the answer's body ends (or is dropped),
/// under the series named when it is answered (outbound, the endpoint that answered it
/// is known only then).
pub struct RequestMeter {
    started: Instant,
    trace_id: Option<String>,
    /// Set when access logging is on: (method, path without query).
    access: Option<(http::Method, String)>,
}

impl RequestMeter {
    pub fn start() -> Self {
        Self {
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

    /// Wraps the response body (boxing it once) to record the request in `series` when
    /// it ends, and then to end a traced request's `span` (with the gRPC status the body
    /// carried).
    pub fn finish<B>(
        self,
        series: Arc<RequestSeries>,
        span: Option<Box<PendingSpan>>,
        response: http::Response<B>,
    ) -> http::Response<Body>
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
                    series,
                    span,
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
    series: Arc<RequestSeries>,
    span: Option<Box<PendingSpan>>,
    code: u16,
    grpc_status: Option<&'static str>,
    proxy_error: Option<String>,
    /// Body bytes sent to the caller.
    bytes: u64,
}

impl Pending {
    fn record(self) {
        let meter = self.meter;
        if let Some(span) = self.span {
            (*span).end(self.grpc_status);
        }
        let series = &self.series;
        let elapsed = meter.started.elapsed().as_secs_f64();
        if let Some((method, path)) = &meter.access {
            tracing::info!(
                target: "access",
                event = "request",
                direction = series.labels.direction.as_str(),
                source = series.access_source(),
                destination = series.access_destination(),
                method = %method,
                path = %path,
                status = self.code,
                grpc_status = self.grpc_status,
                // Microseconds are the precision worth reading.
                duration_ms = (elapsed * 1e6).round() / 1e3,
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::BodyExt;

    use super::*;
    use crate::http::BoxError;

    /// A response body: these frames, then its end.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Frames {
        fn data(chunks: &[&'static [u8]]) -> Self {
            Self(
                chunks
                    .iter()
                    .map(|chunk| Frame::data(Bytes::from_static(chunk)))
                    .collect(),
            )
        }

        fn with_trailers(mut self, name: &'static str, value: &'static str) -> Self {
            let mut trailers = http::HeaderMap::new();
            trailers.insert(name, http::HeaderValue::from_static(value));
            self.0.push_back(Frame::trailers(trailers));
            self
        }
    }

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn id(workload: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/shop/sa/{workload}")
            .parse()
            .expect("a valid SPIFFE ID")
    }

    /// Requests from web to orders (the service orders.shop), as either proxy sees them.
    fn series(metrics: &Arc<Metrics>, direction: Direction) -> Arc<RequestSeries> {
        let orders = Workload::of(&id("orders"));
        let labels = match direction {
            Direction::Outbound => EdgeLabels::outbound(
                &Workload::of(&id("web")),
                &orders,
                Label::new("orders.shop"),
            ),
            Direction::Inbound => EdgeLabels::inbound(Some(&id("web")), &orders),
        };
        RequestSeries::new(metrics.clone(), labels)
    }

    fn response(
        code: u16,
        headers: &[(&'static str, &'static str)],
        body: Frames,
    ) -> http::Response<Frames> {
        let mut response = http::Response::new(body);
        *response.status_mut() = http::StatusCode::from_u16(code).expect("a valid status");
        for (name, value) in headers {
            response
                .headers_mut()
                .insert(*name, http::HeaderValue::from_static(value));
        }
        response
    }

    /// Sends one request through a meter and reads its answer to the end.
    async fn exchange(series: &Arc<RequestSeries>, response: http::Response<Frames>) {
        let answer = RequestMeter::start().finish(series.clone(), None, response);
        answer
            .into_body()
            .collect()
            .await
            .expect("the test body does not fail");
    }

    /// The value of the one sample of `name` whose labels include every `label`.
    fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
        let mut found = text.lines().filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
                && labels.iter().all(|label| line.contains(label))
        });
        let line = found.next()?;
        assert!(
            found.next().is_none(),
            "more than one {name} sample matches {labels:?}"
        );
        let (_, after_labels) = line.split_once("} ")?;
        after_labels.split(' ').next()?.parse().ok()
    }

    #[tokio::test]
    async fn a_series_counts_each_outcome_under_its_own_labels() {
        let metrics = Arc::new(Metrics::new());
        let series = series(&metrics, Direction::Outbound);
        for _ in 0..3 {
            exchange(&series, response(200, &[], Frames::data(&[b"ok"]))).await;
        }
        exchange(&series, response(503, &[], Frames::data(&[]))).await;

        let text = metrics.encode();
        let ok = [
            "direction=\"outbound\",source_workload=\"web\",source_namespace=\"shop\",\
             source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",\
             destination_workload=\"orders\",destination_namespace=\"shop\",\
             destination_identity=\"spiffe://cluster.local/ns/shop/sa/orders\",\
             destination_service=\"orders.shop\",security=\"mtls\",\
             code_class=\"2xx\",code=\"200\",grpc_status=\"\"}",
        ];
        assert_eq!(
            sample(&text, "tessera_requests_total", &ok),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "tessera_requests_total", &["code=\"503\""]),
            Some(1.0)
        );
        // The series caches its counters: the family still holds one per outcome.
        assert_eq!(
            text.lines()
                .filter(|line| line.starts_with("tessera_requests_total{"))
                .count(),
            2
        );
    }

    /// The labels of the one sample of `name`, by key.
    fn labels_of(text: &str, name: &str) -> std::collections::BTreeMap<String, String> {
        let line = text
            .lines()
            .find(|line| line.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("no {name}: {text}"));
        let (_, labels) = line.split_once('{').expect("labels");
        let (labels, _) = labels.rsplit_once('}').expect("labels end");
        labels
            .split("\",")
            .map(|pair| {
                let (key, value) = pair.split_once("=\"").expect("key=\"value\"");
                (key.to_string(), value.trim_end_matches('"').to_string())
            })
            .collect()
    }

    #[tokio::test]
    async fn the_client_and_the_server_proxy_name_one_request_alike() {
        let (client, server) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
        let answer = || response(503, &[], Frames::data(&[]));
        exchange(&series(&client, Direction::Outbound), answer()).await;
        exchange(&series(&server, Direction::Inbound), answer()).await;
        for name in [
            "tessera_requests_total",
            "tessera_request_duration_seconds_count",
        ] {
            let mut outbound = labels_of(&client.encode(), name);
            let mut inbound = labels_of(&server.encode(), name);
            assert_eq!(outbound.remove("direction").as_deref(), Some("outbound"));
            assert_eq!(inbound.remove("direction").as_deref(), Some("inbound"));
            assert_eq!(
                outbound.remove("destination_service").as_deref(),
                Some("orders.shop")
            );
            assert_eq!(inbound.remove("destination_service").as_deref(), Some(""));
            // Everything else is the same: summed by workload, namespace, identity or
            // code class, the two views of the edge fall in one group.
            assert_eq!(outbound, inbound, "{name}");
            assert_eq!(outbound["source_workload"], "web");
            assert_eq!(outbound["destination_workload"], "orders");
            assert_eq!(outbound["destination_namespace"], "shop");
            assert_eq!(outbound["code_class"], "5xx");
        }
        let counter = labels_of(&client.encode(), "tessera_requests_total");
        assert_eq!((&*counter["code"], &*counter["grpc_status"]), ("503", ""));
        let histogram = labels_of(&client.encode(), "tessera_request_duration_seconds_count");
        assert!(!histogram.contains_key("code") && !histogram.contains_key("grpc_status"));
    }

    #[tokio::test]
    async fn a_plaintext_caller_is_unknown_with_no_identity() {
        let metrics = Arc::new(Metrics::new());
        let labels = EdgeLabels::inbound(None, &Workload::of(&id("orders")));
        exchange(
            &RequestSeries::new(metrics.clone(), labels),
            response(200, &[], Frames::data(&[])),
        )
        .await;
        let labels = labels_of(&metrics.encode(), "tessera_requests_total");
        assert_eq!(labels["source_workload"], "unknown");
        assert_eq!(labels["source_namespace"], "unknown");
        assert_eq!(labels["source_identity"], "");
        assert_eq!(labels["security"], "plaintext");
        assert_eq!(labels["destination_workload"], "orders");
    }

    #[test]
    fn connections_name_the_source_and_destination_workloads() {
        let metrics = Metrics::new();
        metrics.connection(Direction::Outbound, &id("web"), &id("orders"));
        metrics.connection(Direction::Inbound, &id("orders"), &id("web"));
        let text = metrics.encode();
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("tessera_tcp_connections_total{"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        for line in lines {
            assert!(
                line.contains("source_workload=\"web\",source_namespace=\"shop\",source_identity=\"spiffe://cluster.local/ns/shop/sa/web\",destination_workload=\"orders\",destination_namespace=\"shop\",destination_identity=\"spiffe://cluster.local/ns/shop/sa/orders\",security=\"mtls\"}"),
                "{line}"
            );
        }
    }

    #[tokio::test]
    async fn the_grpc_status_comes_from_the_head_or_the_trailers_and_is_bounded() {
        let metrics = Arc::new(Metrics::new());
        let series = series(&metrics, Direction::Inbound);
        // Trailers-only answer: the status is in the head.
        exchange(
            &series,
            response(200, &[("grpc-status", "14")], Frames::data(&[])),
        )
        .await;
        // The usual answer: the status comes in the trailers after the message.
        let body = Frames::data(&[b"message"]).with_trailers("grpc-status", "0");
        exchange(&series, response(200, &[], body)).await;
        // Anything but one of the 17 codes is "other", not a new series.
        let body = Frames::data(&[]).with_trailers("grpc-status", "999999");
        exchange(&series, response(200, &[], body)).await;

        let text = metrics.encode();
        for status in ["14", "0", "other"] {
            let label = format!("grpc_status=\"{status}\"");
            assert_eq!(
                sample(&text, "tessera_requests_total", &[&label]),
                Some(1.0),
                "{status}: {text}"
            );
        }
        assert!(!text.contains("grpc_status=\"999999\""), "{text}");
    }

    #[tokio::test]
    async fn a_traced_request_ends_its_span_with_the_grpc_status_of_its_trailers() {
        use crate::trace::{SpanKind, SpanStatus, Tracer};
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let (tracer, mut spans) = Tracer::capturing();
        let tracer = Arc::new(tracer);
        let metrics = Arc::new(Metrics::new());
        let series = series(&metrics, Direction::Inbound);
        // (kind, gRPC status in the trailers, whether the span errs)
        let cases = [
            (SpanKind::Server, "14", true),
            (SpanKind::Server, "5", false),
            (SpanKind::Client, "5", true),
            (SpanKind::Server, "0", false),
        ];
        for (kind, status, errs) in cases {
            let span = tracer
                .start_span(None, &http::Method::POST, kind)
                .expect("tracing is on");
            let pending =
                PendingSpan::new(tracer.clone(), span, kind, Vec::new(), SpanStatus::Unset);
            let body = Frames::data(&[b"message"]).with_trailers("grpc-status", status);
            let answer = RequestMeter::start().finish(
                series.clone(),
                Some(pending),
                response(200, &[], body),
            );
            let mut body = answer.into_body();
            body.frame().await.expect("data").expect("data");
            assert!(spans.try_recv().is_err(), "ended before the trailers");
            while body.frame().await.is_some() {}
            let span = spans.try_recv().expect("ended with the body");
            let code = span
                .attributes
                .iter()
                .find(|kv| kv.key == "rpc.grpc.status_code")
                .and_then(|kv| kv.value.clone()?.value);
            let expected: i64 = status.parse().expect("a number");
            assert_eq!(code, Some(Value::IntValue(expected)), "{kind:?} {status}");
            assert_eq!(span.status.is_some(), errs, "{kind:?} {status}");
        }
    }

    #[tokio::test]
    async fn latency_is_kept_by_status_class() {
        let metrics = Arc::new(Metrics::new());
        let series = series(&metrics, Direction::Inbound);
        for code in [101, 204, 200, 302, 404, 503, 999] {
            exchange(&series, response(code, &[], Frames::data(&[]))).await;
        }
        let text = metrics.encode();
        for (class, requests) in [
            ("1xx", 1.0),
            ("2xx", 2.0),
            ("3xx", 1.0),
            ("4xx", 1.0),
            ("5xx", 2.0),
        ] {
            let label = format!("code_class=\"{class}\"");
            assert_eq!(
                sample(&text, "tessera_request_duration_seconds_count", &[&label]),
                Some(requests),
                "{class}: {text}"
            );
        }
        let histograms = text
            .lines()
            .filter(|line| line.starts_with("tessera_request_duration_seconds_count{"))
            .count();
        assert_eq!(histograms, 5, "no class beyond 1xx..5xx");
    }

    #[test]
    fn latency_buckets_are_the_documented_ones_and_cumulative() {
        let metrics = Arc::new(Metrics::new());
        let series = series(&metrics, Direction::Outbound);
        series.latency(200).observe(0.004, None, None);
        series.latency(200).observe(12.0, None, None);
        let text = metrics.encode();

        let buckets: Vec<(f64, f64)> = text
            .lines()
            .filter(|line| line.starts_with("tessera_request_duration_seconds_bucket{"))
            .map(|line| {
                let (_, le) = line.split_once("le=\"").expect("a bucket has le");
                let (le, _) = le.split_once('"').expect("le is quoted");
                let value = sample(line, "tessera_request_duration_seconds_bucket", &[])
                    .expect("a bucket has a value");
                (le.parse().expect("le is a number or +Inf"), value)
            })
            .collect();
        let bounds: Vec<f64> = buckets.iter().map(|(le, _)| *le).collect();
        let expected: Vec<f64> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .collect();
        assert_eq!(bounds, expected);
        for (le, count) in buckets {
            let want = match le {
                le if le < 0.004 => 0.0,
                le if le < 12.0 => 1.0,
                _ => 2.0,
            };
            assert_eq!(count, want, "bucket le={le}");
        }
        let sum = sample(&text, "tessera_request_duration_seconds_sum", &[]).expect("a sum");
        assert!((sum - 12.004).abs() < 1e-9, "sum {sum}");
    }

    #[tokio::test]
    async fn a_sampled_request_is_the_exemplar_of_its_bucket() {
        let metrics = Arc::new(Metrics::new());
        let series = series(&metrics, Direction::Inbound);
        let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let answer = RequestMeter::start()
            .with_trace(Some(trace_id.to_string()))
            .finish(
                series.clone(),
                None,
                response(200, &[], Frames::data(&[b"ok"])),
            );
        answer.into_body().collect().await.expect("body");
        let text = metrics.encode();
        let exemplars: Vec<&str> = text
            .lines()
            .filter(|line| line.contains(trace_id))
            .collect();
        assert_eq!(exemplars.len(), 1, "{text}");
        assert!(exemplars[0].starts_with("tessera_request_duration_seconds_bucket{"));
    }

    #[tokio::test]
    async fn a_request_is_recorded_once_even_when_the_caller_goes_away() {
        let metrics = Arc::new(Metrics::new());
        let series = series(&metrics, Direction::Outbound);
        let answer = RequestMeter::start().finish(
            series.clone(),
            None,
            response(200, &[], Frames::data(&[b"first", b"second"])),
        );
        let mut body = answer.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"first")));
        drop(body);
        let text = metrics.encode();
        assert_eq!(sample(&text, "tessera_requests_total", &[]), Some(1.0));
        assert_eq!(
            sample(&text, "tessera_request_duration_seconds_count", &[]),
            Some(1.0)
        );

        // Read to the end and then dropped: still one more, not two.
        exchange(&series, response(200, &[], Frames::data(&[b"x"]))).await;
        let text = metrics.encode();
        assert_eq!(sample(&text, "tessera_requests_total", &[]), Some(2.0));
    }

    #[tokio::test]
    async fn a_failing_body_is_recorded_when_it_fails() {
        let metrics = Arc::new(Metrics::new());
        let series = series(&metrics, Direction::Inbound);
        let (upload, fail) = crate::http::test_bodies::upload(b"partial");
        let mut response = http::Response::new(upload);
        *response.status_mut() = http::StatusCode::OK;
        let mut body = RequestMeter::start()
            .finish(series.clone(), None, response)
            .into_body();
        body.frame().await.expect("a frame").expect("data");
        fail.send(()).expect("the body waits");
        assert!(body.frame().await.expect("a frame").is_err());
        // Recorded at the error, before the body is dropped.
        let text = metrics.encode();
        assert_eq!(sample(&text, "tessera_requests_total", &[]), Some(1.0));
        drop(body);
        assert_eq!(
            sample(&metrics.encode(), "tessera_requests_total", &[]),
            Some(1.0)
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Arc::new(Metrics::new());
        let evil = Label::new("evil\"} 1\ninjected_total 99\\");
        let destination = Workload {
            workload: evil.clone(),
            namespace: evil.clone(),
            identity: evil.clone(),
        };
        let series = RequestSeries::new(
            metrics.clone(),
            EdgeLabels::outbound(&Workload::unknown(), &destination, evil),
        );
        series.count(200, "");
        metrics.retries("a\"b").inc();
        let text = metrics.encode();
        assert!(
            !text.lines().any(|line| line.starts_with("injected_total")),
            "a label value made its own line: {text}"
        );
        assert!(
            text.contains(r#"destination_workload="evil\"} 1\ninjected_total 99\\""#),
            "{text}"
        );
        assert!(
            text.contains(r#"destination_service="evil\"} 1\ninjected_total 99\\""#),
            "{text}"
        );
        assert!(text.contains(r#"destination_service="a\"b""#), "{text}");
    }

    #[test]
    fn connections_are_counted_open_and_closed() {
        let metrics = Metrics::new();
        let inbound = metrics.direction(Direction::Inbound);
        let first = inbound.open();
        let second = inbound.open();
        assert_eq!(inbound.active.get(), 2);
        drop(first);
        assert_eq!((inbound.active.get(), inbound.closed.get()), (1, 1));
        drop(second);
        assert_eq!((inbound.active.get(), inbound.closed.get()), (0, 2));
        // Another direction's series are its own.
        assert_eq!(metrics.direction(Direction::Outbound).closed.get(), 0);

        metrics.refuse(Direction::Inbound, Refusal::Plaintext);
        metrics.plaintext_connection(&id("orders"));
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                "tessera_tcp_connections_refused_total",
                &["direction=\"inbound\"", "reason=\"plaintext\""]
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "tessera_tcp_connections_total",
                &["security=\"plaintext\""]
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "tessera_tcp_connections_closed_total",
                &["direction=\"inbound\""]
            ),
            Some(2.0)
        );
    }

    /// An event as logged: its target and its fields (name, value).
    type Logged = (String, Vec<(String, String)>);

    /// The events logged while it is the thread's subscriber.
    #[derive(Clone, Default)]
    struct Events(Arc<Mutex<Vec<Logged>>>);

    #[derive(Default)]
    struct Fields(Vec<(String, String)>);

    impl tracing::field::Visit for Fields {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            self.0.push((field.name().to_string(), value.to_string()));
        }

        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.0
                .push((field.name().to_string(), format!("{value:?}")));
        }
    }

    impl tracing::Subscriber for Events {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }

        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }

        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

        fn event(&self, event: &tracing::Event<'_>) {
            let mut fields = Fields::default();
            event.record(&mut fields);
            let target = event.metadata().target().to_string();
            if let Ok(mut events) = self.0.lock() {
                events.push((target, fields.0));
            }
        }

        fn enter(&self, _: &tracing::span::Id) {}

        fn exit(&self, _: &tracing::span::Id) {}
    }

    impl Events {
        fn access_lines(&self) -> Vec<Vec<(String, String)>> {
            let events = self.0.lock().expect("not poisoned");
            events
                .iter()
                .filter(|(target, _)| target == "access")
                .map(|(_, fields)| fields.clone())
                .collect()
        }
    }

    #[tokio::test]
    async fn the_access_log_line_says_what_happened_and_nothing_secret() {
        let events = Events::default();
        let _logging = tracing::subscriber::set_default(events.clone());
        let metrics = Arc::new(Metrics::new());
        let series = series(&metrics, Direction::Inbound);
        let uri: http::Uri = "/orders/42?access_token=s3cr3t&card=4111111111111111"
            .parse()
            .expect("a valid URI");
        let answer = RequestMeter::start()
            .with_access_log(true, &http::Method::POST, &uri)
            .with_trace(Some("4bf92f3577b34da6a3ce929d0e0e4736".to_string()))
            .finish(
                series.clone(),
                None,
                response(
                    503,
                    &[("tessera-proxy-error", "no-healthy-endpoints")],
                    Frames::data(&[b"0123456789"]),
                ),
            );
        answer.into_body().collect().await.expect("body");

        let lines = events.access_lines();
        assert_eq!(lines.len(), 1, "one line per request");
        let line = &lines[0];
        let field = |name: &str| {
            line.iter()
                .find(|(field, _)| field == name)
                .map(|(_, value)| value.as_str())
        };
        assert_eq!(field("direction"), Some("inbound"));
        assert_eq!(
            field("source"),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(
            field("destination"),
            Some("spiffe://cluster.local/ns/shop/sa/orders")
        );
        assert_eq!(field("method"), Some("POST"));
        assert_eq!(
            field("path"),
            Some("/orders/42"),
            "the path without its query"
        );
        assert_eq!(field("status"), Some("503"));
        assert_eq!(field("bytes"), Some("10"));
        assert_eq!(field("trace_id"), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(field("proxy_error"), Some("no-healthy-endpoints"));
        assert_eq!(field("grpc_status"), None, "plain HTTP has none");
        let duration = field("duration_ms").expect("duration_ms");
        let decimals = duration.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(decimals <= 3, "rounded to microseconds: {duration}");
        let everything = format!("{line:?}");
        for secret in ["s3cr3t", "4111111111111111", "access_token"] {
            assert!(
                !everything.contains(secret),
                "{secret} logged: {everything}"
            );
        }
    }

    #[tokio::test]
    async fn no_access_log_line_unless_enabled() {
        let events = Events::default();
        let _logging = tracing::subscriber::set_default(events.clone());
        let metrics = Arc::new(Metrics::new());
        let series = series(&metrics, Direction::Outbound);
        let uri: http::Uri = "/".parse().expect("a valid URI");
        let answer = RequestMeter::start()
            .with_access_log(false, &http::Method::GET, &uri)
            .finish(
                series.clone(),
                None,
                response(200, &[], Frames::data(&[b"ok"])),
            );
        answer.into_body().collect().await.expect("body");
        assert!(events.access_lines().is_empty());
        assert_eq!(
            sample(&metrics.encode(), "tessera_requests_total", &[]),
            Some(1.0),
            "metrics are recorded either way"
        );
    }
}
