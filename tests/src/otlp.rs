//! A trace collector for tests, built on the official OTLP protobuf definitions
//! (opentelemetry-proto): it accepts OTLP/gRPC exports and keeps every span with the
//! `service.name` and the other attributes of the resource that sent it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;

/// A received span and the service that exported it.
#[derive(Debug, Clone)]
pub struct Received {
    pub service: String,
    /// The exporter's resource attributes.
    pub resource: Vec<KeyValue>,
    pub span: Span,
}

impl Received {
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// A string attribute (other types show as their OTLP form, e.g. `IntValue(200)`).
    pub fn attribute(&self, key: &str) -> Option<String> {
        text(&self.span.attributes, key)
    }

    /// An int attribute; `None` when missing or of another type.
    pub fn int_attribute(&self, key: &str) -> Option<i64> {
        match self.value(key)? {
            any_value::Value::IntValue(number) => Some(*number),
            _ => None,
        }
    }

    fn value(&self, key: &str) -> Option<&any_value::Value> {
        let kv = self.span.attributes.iter().find(|kv| kv.key == key)?;
        kv.value.as_ref()?.value.as_ref()
    }

    /// A resource attribute, as [`Received::attribute`].
    pub fn resource_attribute(&self, key: &str) -> Option<String> {
        text(&self.resource, key)
    }

    /// The span's status: (code, message); code 2 is ERROR, 0 unset.
    pub fn status(&self) -> (i32, String) {
        self.span
            .status
            .as_ref()
            .map_or((0, String::new()), |s| (s.code, s.message.clone()))
    }
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            other => Some(format!("{other:?}")),
        }
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    delay: Duration,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let mut spans = self.spans.lock().expect("spans");
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            let service = text(&resource, "service.name").unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        resource: resource.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running collector.
pub struct OtlpCollector {
    pub address: SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtlpCollector {
    /// Starts a collector; `delay` makes every export answer that late (a slow collector).
    pub async fn start(delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let address = listener.local_addr().expect("collector address");
        let collector = Collector {
            spans: Arc::default(),
            delay,
        };
        let spans = collector.spans.clone();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(incoming)
                .await;
        });
        Self {
            address,
            spans,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("spans").clone()
    }

    /// Spans of one trace, waiting until at least `count` arrived.
    pub async fn trace(&self, trace_id: &str, count: usize) -> Vec<Received> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let spans: Vec<_> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id() == trace_id)
                .collect();
            if spans.len() >= count || std::time::Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
