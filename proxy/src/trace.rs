//! Distributed tracing: W3C `traceparent`/`tracestate` and B3 (single and multi header)
//! extracted and propagated, a server span per inbound request and a client span per
//! outbound attempt, exported with OTLP/gRPC to any collector (Jaeger's listens on 4317).
//!
//! Spans are plain data handed to a bounded queue with `try_send`: a request never waits
//! for the exporter. When the queue is full, or an export fails, spans are dropped and
//! counted (`tessera_spans_dropped_total`). Sampling is parent-based: a caller's decision
//! is kept; new traces are sampled at `sampleRatio`.

use crate::config::{MAX_QUEUE, TracingConfig};
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

    /// Starts the exporter task; `service` names this proxy's workload in the traces.
    pub fn start(
        config: &TracingConfig,
        service: String,
        identity: String,
        dropped: Counter,
    ) -> Self {
        // Clamped as well as checked at parse time: a config built in code skips parsing.
        let (queue, spans) = mpsc::channel(config.max_queue.clamp(1, MAX_QUEUE));
        tokio::spawn(export(
            config.otlp_endpoint.clone(),
            service,
            identity,
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

    /// Starts a span under `parent` (or a new trace). `None` when tracing is off.
    pub fn start_span(
        &self,
        parent: Option<&TraceContext>,
        name: &str,
        kind: span::SpanKind,
    ) -> Option<ActiveSpan> {
        self.queue.as_ref()?;
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
    pub fn finish(
        &self,
        mut active: ActiveSpan,
        attributes: Vec<(&'static str, String)>,
        error: bool,
    ) {
        let Some(queue) = &self.queue else { return };
        if !active.sampled {
            return;
        }
        active.span.end_time_unix_nano = unix_nanos();
        active.span.attributes = attributes
            .into_iter()
            .map(|(k, v)| attribute(k, v))
            .collect();
        if error {
            active.span.status = Some(Status {
                message: String::new(),
                code: status::StatusCode::Error as i32,
            });
        }
        if queue.try_send(*active.span).is_err() {
            self.dropped.inc();
        }
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

fn attribute(key: &'static str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..KeyValue::default()
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
    service: String,
    identity: String,
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
    let resource = Resource {
        attributes: vec![
            attribute("service.name", service),
            attribute("tessera.identity", identity),
        ],
        ..Resource::default()
    };
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
