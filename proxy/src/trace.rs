//! Distributed tracing: W3C `traceparent`/`tracestate` and B3 (single and multi header)
//! extracted and propagated, a server span per inbound request and a client span per
//! outbound attempt, exported with OTLP/gRPC to any collector (Jaeger's listens on 4317).
//!
//! Spans are plain data handed to a bounded queue with `try_send`: a request never waits
//! for the exporter. When the queue is full, or an export fails, spans are dropped and
//! counted (`tessera_spans_dropped_total`). Sampling is parent-based: a caller's decision
//! is kept; new traces are sampled at `sampleRatio`.
//!
//! Spans follow OpenTelemetry's HTTP and RPC semantic conventions, typed as OTLP carries
//! them (numbers as `int_value`, so numeric filters work): [`RequestAttributes`] is what a
//! span records of its request when it starts, [`response_attributes`] what it records of
//! the answer. Nothing here runs when tracing is off.

use crate::config::{MAX_QUEUE, TracingConfig};
use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};

use prometheus_client::metrics::counter::Counter;
use rand::Rng;
pub use span::SpanKind;
use tessera_mesh::SpiffeId;
use tokio::sync::mpsc;
use tracing::warn;

const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The trace a request belongs to, as received or as we continue it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span: our span's parent.
    pub span_id: [u8; 8],
    pub sampled: bool,
    pub tracestate: Option<HeaderValue>,
}

// The trace headers, as names: every request is looked up for them, and a lookup by
// text parses the text into a name first.
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
static B3: HeaderName = HeaderName::from_static("b3");
static X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
static X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
static X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
static X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Names past which one pass over them costs more than the three lookups it spares.
const SCAN_AT_MOST: usize = 12;

/// Reads the caller's trace context: W3C first, then B3 single, then B3 multi.
pub fn extract(headers: &HeaderMap) -> Option<TraceContext> {
    // Most requests carry none: a pass over their few names spares three hash lookups.
    if headers.keys_len() <= SCAN_AT_MOST && !headers.keys().any(is_trace_header) {
        return None;
    }
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(context) = text(&TRACEPARENT).and_then(parse_traceparent) {
        return Some(TraceContext {
            tracestate: headers.get(&TRACESTATE).cloned(),
            ..context
        });
    }
    if let Some(context) = text(&B3).and_then(parse_b3_single) {
        return Some(context);
    }
    let trace_id = text(&X_B3_TRACEID).and_then(trace_id_from_hex)?;
    let span_id = text(&X_B3_SPANID).and_then(span_id_from_hex)?;
    let sampled =
        matches!(text(&X_B3_SAMPLED), Some("1") | Some("true")) || text(&X_B3_FLAGS) == Some("1");
    Some(TraceContext {
        trace_id,
        span_id,
        sampled,
        tracestate: None,
    })
}

/// A name `extract` reads a context from (`tracestate` alone carries none).
fn is_trace_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    // Names are lower case: a plain comparison (comparing with a `HeaderName` folds case).
    name == TRACEPARENT.as_str() || name == B3.as_str() || name.starts_with("x-b3-")
}

fn parse_traceparent(value: &str) -> Option<TraceContext> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace_id = trace_id_from_hex(parts.next()?)?;
    let span_id = span_id_from_hex(parts.next()?)?;
    let flags = u8::from_str_radix(parts.next()?, 16).ok()?;
    if version == "ff" || version.len() != 2 || trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(TraceContext {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
        tracestate: None,
    })
}

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`.
fn parse_b3_single(value: &str) -> Option<TraceContext> {
    let mut parts = value.trim().split('-');
    let trace_id = trace_id_from_hex(parts.next()?)?;
    let span_id = span_id_from_hex(parts.next()?)?;
    let sampled = matches!(parts.next(), Some("1") | Some("d") | None);
    Some(TraceContext {
        trace_id,
        span_id,
        sampled,
        tracestate: None,
    })
}

/// 32 hex digits, or 16 (64-bit B3 ids, left-padded).
fn trace_id_from_hex(hex: &str) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    match hex.len() {
        32 => decode_hex(hex, &mut id)?,
        16 => decode_hex(hex, &mut id[8..])?,
        _ => return None,
    }
    (id != [0; 16]).then_some(id)
}

fn span_id_from_hex(hex: &str) -> Option<[u8; 8]> {
    let mut id = [0u8; 8];
    if hex.len() != 16 {
        return None;
    }
    decode_hex(hex, &mut id)?;
    (id != [0; 8]).then_some(id)
}

fn decode_hex(hex: &str, out: &mut [u8]) -> Option<()> {
    if hex.len() != out.len() * 2 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(())
}

/// Lower-case hex, as trace ids are written.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(DIGITS[usize::from(byte >> 4)] as char);
        text.push(DIGITS[usize::from(byte & 0x0f)] as char);
    }
    text
}

/// Replaces the trace headers with ours: `traceparent` (with the caller's `tracestate`)
/// and B3 single, so W3C and B3 applications downstream both join the trace.
pub fn inject(
    headers: &mut HeaderMap,
    trace_id: &[u8; 16],
    span_id: &[u8; 8],
    sampled: bool,
    tracestate: Option<&HeaderValue>,
) {
    for name in [
        &TRACEPARENT,
        &TRACESTATE,
        &B3,
        &X_B3_TRACEID,
        &X_B3_SPANID,
        &X_B3_PARENTSPANID,
        &X_B3_SAMPLED,
        &X_B3_FLAGS,
    ] {
        headers.remove(name);
    }
    let flag = if sampled { "01" } else { "00" };
    let (trace, span) = (hex(trace_id), hex(span_id));
    if let Ok(value) = HeaderValue::from_str(&format!("00-{trace}-{span}-{flag}")) {
        headers.insert(TRACEPARENT.clone(), value);
    }
    if let Some(state) = tracestate {
        headers.insert(TRACESTATE.clone(), state.clone());
    }
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{trace}-{span}-{}",
        if sampled { "1" } else { "0" }
    )) {
        headers.insert(B3.clone(), value);
    }
}

/// A span attribute's value, typed as OTLP carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Text(Cow<'static, str>),
    Int(i64),
}

impl From<&'static str> for Value {
    fn from(text: &'static str) -> Self {
        Value::Text(Cow::Borrowed(text))
    }
}

impl From<String> for Value {
    fn from(text: String) -> Self {
        Value::Text(Cow::Owned(text))
    }
}

impl From<i64> for Value {
    fn from(number: i64) -> Self {
        Value::Int(number)
    }
}

impl From<u16> for Value {
    fn from(number: u16) -> Self {
        Value::Int(i64::from(number))
    }
}

impl From<u32> for Value {
    fn from(number: u32) -> Self {
        Value::Int(i64::from(number))
    }
}

/// A span's attributes, in the order they are recorded.
pub type Attributes = Vec<(&'static str, Value)>;

/// How a span ended: unset (fine), or an error with a message (possibly empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SpanStatus {
    #[default]
    Unset,
    Error(Cow<'static, str>),
}

/// What a span records of its request, taken when it starts: the request moves on (to
/// the application, or to another attempt) before the span ends. Kept with its span,
/// boxed, so a request's future carries a pointer only when it is traced.
#[derive(Debug, Clone)]
pub struct RequestAttributes {
    method: http::Method,
    path: String,
    host: String,
    port: Option<u16>,
    /// `network.protocol.version` of the hop the span covers.
    version: &'static str,
    /// `Some((service, method))` for a gRPC call.
    rpc: Option<(String, String)>,
}

impl RequestAttributes {
    /// The request as seen on the hop: `authority` is where it is addressed (the URI's,
    /// else `Host`); the path never carries the query, which may hold secrets.
    pub fn new(
        method: &http::Method,
        uri: &http::Uri,
        authority: Option<&str>,
        version: http::Version,
        grpc: bool,
    ) -> Self {
        let (host, port) = match authority {
            Some(authority) => split_authority(authority),
            None => (String::new(), None),
        };
        let path = uri.path();
        let rpc = grpc
            .then(|| {
                let (service, method) = path.strip_prefix('/')?.split_once('/')?;
                Some((service.to_string(), method.to_string()))
            })
            .flatten();
        Self {
            method: method.clone(),
            path: path.to_string(),
            host,
            port,
            version: protocol_version(version),
            rpc,
        }
    }

    /// The request's attributes: method, path, scheme, server address and port,
    /// protocol version and, for gRPC, the RPC's system, service and method.
    pub fn record(self, attributes: &mut Attributes) {
        attributes.push(("http.request.method", method_name(&self.method)));
        attributes.push(("url.path", self.path.into()));
        attributes.push(("url.scheme", "http".into()));
        if !self.host.is_empty() {
            attributes.push(("server.address", self.host.into()));
        }
        attributes.push(("server.port", self.port.unwrap_or(80).into()));
        attributes.push(("network.protocol.version", self.version.into()));
        if let Some((service, method)) = self.rpc {
            attributes.push(("rpc.system", "grpc".into()));
            attributes.push(("rpc.service", service.into()));
            attributes.push(("rpc.method", method.into()));
        }
    }
}

/// A standard method by name; anything else is `_OTHER`, as the conventions ask (a
/// caller could otherwise invent a new value with every request).
fn method_name(method: &http::Method) -> Value {
    standard_method(method).unwrap_or("_OTHER").into()
}

/// A request's span name: its method, or `HTTP` for a method that is not a standard one
/// (the conventions' rule; span-metrics pipelines group by name, so a caller must not
/// choose it).
pub fn span_name(method: &http::Method) -> &'static str {
    standard_method(method).unwrap_or("HTTP")
}

fn standard_method(method: &http::Method) -> Option<&'static str> {
    const KNOWN: [(http::Method, &str); 9] = [
        (http::Method::GET, "GET"),
        (http::Method::POST, "POST"),
        (http::Method::PUT, "PUT"),
        (http::Method::DELETE, "DELETE"),
        (http::Method::HEAD, "HEAD"),
        (http::Method::OPTIONS, "OPTIONS"),
        (http::Method::PATCH, "PATCH"),
        (http::Method::CONNECT, "CONNECT"),
        (http::Method::TRACE, "TRACE"),
    ];
    KNOWN
        .iter()
        .find(|(known, _)| known == method)
        .map(|(_, name)| *name)
}

/// `host[:port]` or `[v6]:port` into host and port.
fn split_authority(authority: &str) -> (String, Option<u16>) {
    match authority.parse::<http::uri::Authority>() {
        Ok(parsed) => (parsed.host().to_string(), parsed.port_u16()),
        Err(_) => (String::new(), None),
    }
}

fn protocol_version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_11 => "1.1",
        http::Version::HTTP_3 => "3",
        _ => "2",
    }
}

/// What a span records of the answer: the status code, the gRPC status when the head
/// carries it, and from `error_from` on `error.type` (the proxy's reason when it
/// answered itself, else the status code). Returns the span's status.
pub fn response_attributes(
    status: http::StatusCode,
    headers: &http::HeaderMap,
    error_from: u16,
    attributes: &mut Attributes,
) -> SpanStatus {
    attributes.push(("http.response.status_code", status.as_u16().into()));
    if let Some(code) = headers
        .get(&crate::http::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
    {
        attributes.push(("rpc.grpc.status_code", code.into()));
    }
    if status.as_u16() < error_from {
        return SpanStatus::Unset;
    }
    let proxy_error = headers
        .get(crate::http::PROXY_ERROR)
        .and_then(|v| v.to_str().ok());
    let error_type = match proxy_error {
        Some(reason) => reason.to_string(),
        None => status.as_str().to_string(),
    };
    attributes.push(("error.type", error_type.into()));
    SpanStatus::Error(Cow::Borrowed(""))
}

/// A span whose attributes are recorded but which ends with its request's answer body:
/// only then is a gRPC status in the trailers known. Client spans are errors for any
/// status but OK, server spans for the ones that mean the server failed (the RPC
/// conventions' rule).
pub struct PendingSpan {
    tracer: std::sync::Arc<Tracer>,
    span: ActiveSpan,
    kind: SpanKind,
    attributes: Attributes,
    status: SpanStatus,
}

impl PendingSpan {
    pub fn new(
        tracer: std::sync::Arc<Tracer>,
        span: ActiveSpan,
        kind: SpanKind,
        attributes: Attributes,
        status: SpanStatus,
    ) -> Box<Self> {
        Box::new(Self {
            tracer,
            span,
            kind,
            attributes,
            status,
        })
    }

    /// Ends the span now; `grpc_status` is the call's status once its body ended (one
    /// of "0".."16", or "other").
    pub fn end(self, grpc_status: Option<&str>) {
        let Self {
            tracer,
            span,
            kind,
            mut attributes,
            mut status,
        } = self;
        // A trailers-only answer carried its status in the head, already recorded.
        let recorded = attributes.iter().find_map(|(key, value)| match value {
            Value::Int(code) if *key == "rpc.grpc.status_code" => Some(*code),
            _ => None,
        });
        let code = recorded.or_else(|| {
            let code = grpc_status?.parse::<u16>().ok()?;
            attributes.push(("rpc.grpc.status_code", code.into()));
            Some(i64::from(code))
        });
        if let Some(code) = code {
            let failed = match kind {
                SpanKind::Client => code != 0,
                // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE,
                // DATA_LOSS: the server's failures, not the caller's.
                _ => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
            };
            if failed && status == SpanStatus::Unset {
                attributes.push(("error.type", code.to_string().into()));
                status = SpanStatus::Error(Cow::Borrowed(""));
            }
        }
        tracer.finish(span, attributes, status);
    }
}

/// Creates spans and queues them for export. Disabled when no collector is configured:
/// headers then pass through untouched.
pub struct Tracer {
    queue: Option<mpsc::Sender<Span>>,
    sample_ratio: f64,
    dropped: Counter,
}

/// A span in progress.
pub struct ActiveSpan {
    /// Boxed: request futures hold an `Option<ActiveSpan>` whether tracing is on or not.
    span: Box<Span>,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
    pub tracestate: Option<HeaderValue>,
}

impl Tracer {
    pub fn disabled(dropped: Counter) -> Self {
        Self {
            queue: None,
            sample_ratio: 0.0,
            dropped,
        }
    }

    /// Starts the exporter task; `identity` names this proxy's workload in the traces.
    pub fn start(config: &TracingConfig, identity: &SpiffeId, dropped: Counter) -> Self {
        // Clamped as well as checked at parse time: a config built in code skips parsing.
        let (queue, spans) = mpsc::channel(config.max_queue.clamp(1, MAX_QUEUE));
        tokio::spawn(export(
            config.otlp_endpoint.clone(),
            resource(identity),
            spans,
            dropped.clone(),
        ));
        Self {
            queue: Some(queue),
            sample_ratio: config.sample_ratio.clamp(0.0, 1.0),
            dropped,
        }
    }

    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// A new trace for a request that arrived without one, so that all its spans (one
    /// per attempt) share it. `None` when tracing is off.
    pub fn root_context(&self) -> Option<TraceContext> {
        self.queue.as_ref()?;
        let mut rng = rand::rng();
        Some(TraceContext {
            trace_id: rng.random(),
            span_id: [0; 8],
            sampled: rng.random::<f64>() < self.sample_ratio,
            tracestate: None,
        })
    }

    /// Starts the span of a request with this `method` (named by [`span_name`]) under
    /// `parent` (or a new trace). `None` when tracing is off.
    pub fn start_span(
        &self,
        parent: Option<&TraceContext>,
        method: &http::Method,
        kind: span::SpanKind,
    ) -> Option<ActiveSpan> {
        self.queue.as_ref()?;
        let name = span_name(method);
        let mut rng = rand::rng();
        let (trace_id, parent_span, sampled, tracestate) = match parent {
            Some(p) => (
                p.trace_id,
                (p.span_id != [0; 8]).then_some(p.span_id),
                p.sampled,
                p.tracestate.clone(),
            ),
            None => (
                rng.random::<[u8; 16]>(),
                None,
                rng.random::<f64>() < self.sample_ratio,
                None,
            ),
        };
        let span_id: [u8; 8] = rng.random();
        Some(ActiveSpan {
            span: Box::new(Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id.to_vec(),
                trace_state: tracestate
                    .as_ref()
                    .and_then(|s| s.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                parent_span_id: parent_span.map(|p| p.to_vec()).unwrap_or_default(),
                flags: u32::from(sampled),
                name: name.to_string(),
                kind: kind as i32,
                start_time_unix_nano: unix_nanos(),
                ..Span::default()
            }),
            trace_id,
            span_id,
            sampled,
            tracestate,
        })
    }

    /// Ends a span and queues it (if sampled); never waits.
    pub fn finish(&self, mut active: ActiveSpan, attributes: Attributes, status: SpanStatus) {
        let Some(queue) = &self.queue else { return };
        if !active.sampled {
            return;
        }
        active.span.end_time_unix_nano = unix_nanos();
        active.span.attributes = attributes
            .into_iter()
            .map(|(k, v)| attribute(k, v))
            .collect();
        if let SpanStatus::Error(message) = status {
            active.span.status = Some(Status {
                message: message.into_owned(),
                code: status::StatusCode::Error as i32,
            });
        }
        if queue.try_send(*active.span).is_err() {
            self.dropped.inc();
        }
    }
}

#[cfg(test)]
impl Tracer {
    /// A tracer that samples every new trace and hands its finished spans to the receiver,
    /// as they would be exported.
    pub(crate) fn capturing() -> (Self, mpsc::Receiver<Span>) {
        let (queue, spans) = mpsc::channel(1024);
        let tracer = Self {
            queue: Some(queue),
            sample_ratio: 1.0,
            dropped: Counter::default(),
        };
        (tracer, spans)
    }
}

impl ActiveSpan {
    /// The trace id, hex, for exemplars and access logs.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Writes this span as the parent for the next hop.
    pub fn inject(&self, headers: &mut HeaderMap) {
        inject(
            headers,
            &self.trace_id,
            &self.span_id,
            self.sampled,
            self.tracestate.as_ref(),
        );
    }
}

fn attribute(key: &'static str, value: Value) -> KeyValue {
    let value = match value {
        Value::Text(text) => any_value::Value::StringValue(text.into_owned()),
        Value::Int(number) => any_value::Value::IntValue(number),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

/// Who exports the spans: the workload as `service.name` (`<workload>.<namespace>`, as
/// the proxies have always named it), its namespace, workload and identity on their own,
/// and the proxy's version.
fn resource(identity: &SpiffeId) -> Resource {
    let (workload, namespace) = (identity.service_account(), identity.namespace());
    let text = |text: &str| Value::from(text.to_string());
    Resource {
        attributes: vec![
            attribute("service.name", text(&format!("{workload}.{namespace}"))),
            attribute("service.namespace", text(namespace)),
            attribute("service.version", env!("CARGO_PKG_VERSION").into()),
            attribute("tessera.workload", text(workload)),
            attribute("tessera.identity", text(identity.as_str())),
        ],
        ..Resource::default()
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Batches spans and sends them to the collector; drops (and counts) what it cannot send.
async fn export(
    endpoint: String,
    resource: Resource,
    mut spans: mpsc::Receiver<Span>,
    dropped: Counter,
) {
    let channel = match tonic::transport::Endpoint::from_shared(endpoint.clone()) {
        Ok(endpoint) => endpoint
            .connect_timeout(EXPORT_TIMEOUT)
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy(),
        Err(error) => {
            warn!(event = "tracing disabled", endpoint, error = %error);
            while spans.recv().await.is_some() {
                dropped.inc();
            }
            return;
        }
    };
    let mut client = TraceServiceClient::new(channel);
    let mut failing = false;
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        let Some(first) = spans.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, spans.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "tessera-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    spans: batch,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        match client.export(request).await {
            Ok(_) => failing = false,
            Err(status) => {
                dropped.inc_by(count);
                if !failing {
                    warn!(event = "span export failed", endpoint, error = %status.message(), "dropping spans until the collector answers");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exported attribute's value.
    fn exported(span: &Span, key: &str) -> Option<any_value::Value> {
        let kv = span.attributes.iter().find(|kv| kv.key == key)?;
        kv.value.clone()?.value
    }

    fn text(value: &str) -> Option<any_value::Value> {
        Some(any_value::Value::StringValue(value.to_string()))
    }

    #[tokio::test]
    async fn spans_are_exported_with_typed_attributes_and_their_status() {
        let (tracer, mut spans) = Tracer::capturing();
        let request = http::Request::builder()
            .method("PURGE")
            .uri("http://orders.shop:8080/tessera.test.v1.Echo/Unary?token=s3cr3t")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let span = tracer
            .start_span(None, request.method(), SpanKind::Client)
            .unwrap();
        let mut attributes = Vec::new();
        RequestAttributes::new(
            request.method(),
            request.uri(),
            request.uri().authority().map(|a| a.as_str()),
            http::Version::HTTP_2,
            true,
        )
        .record(&mut attributes);
        let mut head = HeaderMap::new();
        head.insert("grpc-status", HeaderValue::from_static("14"));
        head.insert("tessera-proxy-error", HeaderValue::from_static("timeout"));
        let status = response_attributes(
            http::StatusCode::GATEWAY_TIMEOUT,
            &head,
            400,
            &mut attributes,
        );
        attributes.push(("http.request.resend_count", 2u32.into()));
        tracer.finish(span, attributes, status);
        let span = spans.recv().await.unwrap();
        assert_eq!(
            span.name, "HTTP",
            "a method of the caller's own is no span name"
        );

        let int = |number| Some(any_value::Value::IntValue(number));
        assert_eq!(exported(&span, "http.response.status_code"), int(504));
        assert_eq!(exported(&span, "server.port"), int(8080));
        assert_eq!(exported(&span, "http.request.resend_count"), int(2));
        assert_eq!(exported(&span, "rpc.grpc.status_code"), int(14));
        assert_eq!(exported(&span, "http.request.method"), text("_OTHER"));
        assert_eq!(exported(&span, "server.address"), text("orders.shop"));
        assert_eq!(
            exported(&span, "url.path"),
            text("/tessera.test.v1.Echo/Unary")
        );
        assert_eq!(exported(&span, "url.scheme"), text("http"));
        assert_eq!(exported(&span, "network.protocol.version"), text("2"));
        assert_eq!(exported(&span, "rpc.system"), text("grpc"));
        assert_eq!(exported(&span, "rpc.service"), text("tessera.test.v1.Echo"));
        assert_eq!(exported(&span, "rpc.method"), text("Unary"));
        assert_eq!(exported(&span, "error.type"), text("timeout"));
        assert!(
            !format!("{span:?}").contains("s3cr3t"),
            "no query: {span:?}"
        );
        let status = span.status.unwrap();
        assert_eq!(status.code, status::StatusCode::Error as i32);

        // Below the threshold: no error, no error.type; a status message when one is given.
        let span = tracer
            .start_span(None, &http::Method::GET, SpanKind::Server)
            .unwrap();
        let mut attributes = Vec::new();
        let ok = response_attributes(
            http::StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            500,
            &mut attributes,
        );
        assert_eq!(ok, SpanStatus::Unset);
        tracer.finish(
            span,
            attributes,
            SpanStatus::Error("no ALLOW policy matched".into()),
        );
        let span = spans.recv().await.unwrap();
        assert_eq!(exported(&span, "error.type"), None);
        assert_eq!(span.status.unwrap().message, "no ALLOW policy matched");
    }

    #[tokio::test]
    async fn a_trailers_only_grpc_error_is_judged_like_one_in_the_trailers() {
        let (tracer, mut spans) = Tracer::capturing();
        let tracer = std::sync::Arc::new(tracer);
        let mut head = HeaderMap::new();
        head.insert("grpc-status", HeaderValue::from_static("9"));
        for (kind, errs) in [(SpanKind::Client, true), (SpanKind::Server, false)] {
            let span = tracer.start_span(None, &http::Method::POST, kind).unwrap();
            let mut attributes = Vec::new();
            let status = response_attributes(http::StatusCode::OK, &head, 400, &mut attributes);
            PendingSpan::new(tracer.clone(), span, kind, attributes, status).end(Some("9"));
            let span = spans.recv().await.unwrap();
            let codes = span
                .attributes
                .iter()
                .filter(|kv| kv.key == "rpc.grpc.status_code")
                .count();
            assert_eq!(codes, 1, "recorded once: {span:?}");
            assert_eq!(span.status.is_some(), errs, "{kind:?}");
        }
    }

    #[test]
    fn the_resource_names_the_workload_its_namespace_and_identity() {
        let identity: SpiffeId = "spiffe://cluster.local/ns/shop/sa/orders".parse().unwrap();
        let resource = resource(&identity);
        let value = |key: &str| {
            resource
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.clone()?.value)
        };
        assert_eq!(value("service.name"), text("orders.shop"));
        assert_eq!(value("service.namespace"), text("shop"));
        assert_eq!(value("tessera.workload"), text("orders"));
        assert_eq!(
            value("tessera.identity"),
            text("spiffe://cluster.local/ns/shop/sa/orders")
        );
        assert_eq!(value("service.version"), text(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn extracts_w3c_and_both_b3_forms() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        headers.insert("tracestate", "vendor=x".parse().unwrap());
        let w3c = extract(&headers).unwrap();
        assert_eq!(hex(&w3c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&w3c.span_id), "00f067aa0ba902b7");
        assert!(w3c.sampled);
        assert_eq!(w3c.tracestate.unwrap(), "vendor=x");

        let mut single = HeaderMap::new();
        single.insert(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"
                .parse()
                .unwrap(),
        );
        let b3 = extract(&single).unwrap();
        assert_eq!(hex(&b3.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
        assert!(b3.sampled);

        let mut multi = HeaderMap::new();
        multi.insert("x-b3-traceid", "463ac35c9f6413ad".parse().unwrap());
        multi.insert("x-b3-spanid", "a2fb4a1d1a96d312".parse().unwrap());
        multi.insert("x-b3-sampled", "0".parse().unwrap());
        let b3 = extract(&multi).unwrap();
        assert_eq!(hex(&b3.trace_id), "0000000000000000463ac35c9f6413ad");
        assert!(!b3.sampled);

        let mut bad = HeaderMap::new();
        bad.insert(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(extract(&bad), None);
        assert_eq!(extract(&HeaderMap::new()), None);
    }

    #[test]
    fn finds_the_context_among_few_names_and_among_many() {
        let traceparent: HeaderValue = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
        for others in [0, 3, SCAN_AT_MOST, 40] {
            let mut headers = HeaderMap::new();
            for i in 0..others {
                headers.insert(
                    HeaderName::try_from(format!("x-app-{i}")).unwrap(),
                    HeaderValue::from_static("v"),
                );
            }
            assert_eq!(extract(&headers), None, "{others} other names, no context");
            headers.insert("TraceParent", traceparent.clone());
            let found = extract(&headers).expect("traceparent among the names");
            assert_eq!(
                hex(&found.span_id),
                "00f067aa0ba902b7",
                "{others} other names"
            );

            headers.remove("traceparent");
            headers.insert("X-B3-TraceId", "463ac35c9f6413ad".parse().unwrap());
            headers.insert("x-b3-spanid", "a2fb4a1d1a96d312".parse().unwrap());
            let found = extract(&headers).expect("B3 multi among the names");
            assert_eq!(
                hex(&found.span_id),
                "a2fb4a1d1a96d312",
                "{others} other names"
            );
        }
    }

    #[test]
    fn injects_w3c_and_b3_replacing_old_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-b3-spanid", "a2fb4a1d1a96d312".parse().unwrap());
        let trace = [1u8; 16];
        let span = [2u8; 8];
        inject(&mut headers, &trace, &span, true, None);
        assert_eq!(
            headers["traceparent"],
            "00-01010101010101010101010101010101-0202020202020202-01"
        );
        assert_eq!(
            headers["b3"],
            "01010101010101010101010101010101-0202020202020202-1"
        );
        assert!(!headers.contains_key("x-b3-spanid"));
        let round = extract(&headers).unwrap();
        assert_eq!((round.trace_id, round.span_id), (trace, span));
    }
}
