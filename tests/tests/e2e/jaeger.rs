//! Traces in a real Jaeger, the way a cluster sends them: applications instrumented with
//! the OpenTelemetry SDK and both proxies export OTLP to an OpenTelemetry Collector, which
//! forwards to Jaeger v2 (all-in-one, in memory). Everything is read back through Jaeger's
//! query API — what its UI shows — and the exemplars Prometheus 3 scraped lead there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
use serde_json::Value;
use tessera_tests::l7::{Http1Client, L7Mesh, resource};
use tessera_tests::spiffe;
use tessera_tests::telemetry::{Collector, Jaeger, JaegerSpan, JaegerTrace, Prometheus, TracedApp};

const RETRIES: &str = "  retries:\n    attempts: 3\n    budget: {ratio: 1.0, minPerSecond: 10}\n";

/// Jaeger, a collector in front of it, the traced server application behind a server
/// proxy (retries on, `/admin` denied) and the traced frontend's client proxy.
struct TracedMesh {
    jaeger: Jaeger,
    _collector: Collector,
    mesh: L7Mesh,
    frontend: TracedApp,
    backend: Arc<TracedApp>,
    _backend_task: tokio::task::JoinHandle<()>,
}

impl TracedMesh {
    async fn start() -> Option<Self> {
        let jaeger = Jaeger::start().await?;
        let collector = Collector::start(&jaeger.otlp_endpoint()).await?;
        let backend = Arc::new(TracedApp::new("shop-backend", &collector.otlp_endpoint()));
        let (address, backend_task) = backend.clone().serve().await;
        let tracing = format!(
            "tracing:\n  otlpEndpoint: {}\n  sampleRatio: 1.0\n",
            collector.otlp_endpoint()
        );
        let mesh = L7Mesh::start_with(&[address], "http", Some(RETRIES), &tracing).await;
        mesh.apply(
            "deny-admin.yaml",
            &resource(
                "AuthorizationPolicy",
                "no-admin",
                "  selector: {serviceAccount: backend}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/admin*\"]}}]\n",
            ),
        )
        .await;
        Some(Self {
            frontend: TracedApp::new("shop-frontend", &collector.otlp_endpoint()),
            jaeger,
            _collector: collector,
            mesh,
            backend,
            _backend_task: backend_task,
        })
    }

    /// The frontend calls `path` through its proxy inside a client span of its own;
    /// returns the status, the trace id and the frontend span's id.
    async fn call(&self, path: &str) -> (StatusCode, String, String) {
        let tracer = self.frontend.tracer();
        let span = tracer
            .span_builder(format!("GET {path}"))
            .with_kind(SpanKind::Client)
            .start(&tracer);
        let context = opentelemetry::Context::current_with_span(span);
        let mut headers = HashMap::new();
        opentelemetry_sdk::propagation::TraceContextPropagator::new()
            .inject_context(&context, &mut headers);
        let headers: Vec<(String, String)> = headers.into_iter().collect();
        let mut client = Http1Client::connect(self.mesh.entry()).await.unwrap();
        let answer = client.get_with(path, &headers).await.unwrap();
        let span_context = context.span().span_context().clone();
        context.span().end();
        (
            answer.status,
            span_context.trace_id().to_string(),
            span_context.span_id().to_string(),
        )
    }

    async fn flush(&self) {
        self.frontend.flush().await;
        self.backend.flush().await;
    }
}

fn only(trace: &JaegerTrace, service: &str) -> JaegerSpan {
    let spans = trace.of(service);
    assert_eq!(spans.len(), 1, "one span of {service}: {}", trace.summary());
    spans.into_iter().next().unwrap()
}

fn tag<'a>(span: &'a JaegerSpan, key: &str) -> &'a Value {
    span.tag(key).unwrap_or_else(|| {
        panic!(
            "{} span {} has no tag {key}: {}",
            span.service,
            span.operation(),
            span.span["tags"]
        )
    })
}

/// A tag's type and value as Jaeger stores them: an integer attribute is "int64".
fn assert_tag(span: &JaegerSpan, key: &str, kind: &str, value: Value) {
    let found = tag(span, key);
    assert_eq!(
        (found["type"].as_str(), &found["value"]),
        (Some(kind), &value),
        "{} span {}: {key}",
        span.service,
        span.operation()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_is_one_trace_in_jaeger_app_to_proxy_to_proxy_to_app() {
    let Some(traced) = TracedMesh::start().await else {
        return;
    };
    let (status, trace_id, frontend_span) = traced.call("/checkout").await;
    assert_eq!(status, StatusCode::OK);
    traced.flush().await;

    let trace = traced.jaeger.trace(&trace_id, 4).await.unwrap();
    // As Jaeger's API returned it (shown with --nocapture).
    println!("{}", serde_json::to_string_pretty(&trace.0).unwrap());
    let frontend = only(&trace, "shop-frontend");
    let client = only(&trace, "client.shop");
    let server = only(&trace, "backend.shop");
    let backend = only(&trace, "shop-backend");
    assert_eq!(frontend.span_id(), frontend_span);
    // Parented in the order the request travelled.
    assert_eq!(client.parent().as_deref(), Some(frontend.span_id()));
    assert_eq!(server.parent().as_deref(), Some(client.span_id()));
    assert_eq!(backend.parent().as_deref(), Some(server.span_id()));
    assert_tag(&client, "span.kind", "string", "client".into());
    assert_tag(&server, "span.kind", "string", "server".into());

    // HTTP semantic conventions, with their types.
    for span in [&client, &server] {
        assert_tag(span, "http.request.method", "string", "GET".into());
        assert_tag(span, "http.response.status_code", "int64", 200.into());
        assert_eq!(span.tag("error"), None, "{}: not an error", span.service);
    }
    assert_tag(&server, "url.path", "string", "/checkout".into());
    assert_tag(&client, "server.address", "string", "backend.shop".into());
    assert_tag(
        &client,
        "tessera.peer.identity",
        "string",
        spiffe("backend").into(),
    );
    assert_tag(
        &server,
        "tessera.peer.identity",
        "string",
        spiffe("client").into(),
    );
    // The workload names the service; namespace and identity are resource attributes.
    for (span, workload) in [(&client, "client"), (&server, "backend")] {
        let namespace = span
            .process_tag("service.namespace")
            .expect("service.namespace");
        assert_eq!(namespace["value"], "shop", "{}", span.service);
        let identity = span.process_tag("tessera.identity").expect("identity");
        assert_eq!(identity["value"], spiffe(workload).as_str());
    }

    let services = traced.jaeger.services().await.unwrap();
    for service in [
        "shop-frontend",
        "client.shop",
        "backend.shop",
        "shop-backend",
    ] {
        assert!(
            services.iter().any(|s| s == service),
            "{service} in {services:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_call_shows_each_attempt_and_a_denied_call_its_reason() {
    let Some(traced) = TracedMesh::start().await else {
        return;
    };
    let (status, retried, frontend_span) = traced.call("/flaky").await;
    assert_eq!(status, StatusCode::OK, "the retry masks the 503");
    let (status, denied, _) = traced.call("/admin/users").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    traced.flush().await;

    // Two attempts: two client spans under the frontend's span, the second a resend;
    // each reached the server proxy and the application.
    let trace = traced.jaeger.trace(&retried, 7).await.unwrap();
    let mut attempts = trace.of("client.shop");
    assert_eq!(attempts.len(), 2, "{}", trace.summary());
    attempts.sort_by_key(|span| span.span["startTime"].as_u64());
    for attempt in &attempts {
        assert_eq!(attempt.parent().as_deref(), Some(frontend_span.as_str()));
    }
    assert_tag(
        &attempts[0],
        "http.response.status_code",
        "int64",
        503.into(),
    );
    assert_tag(&attempts[0], "error", "bool", true.into());
    assert_eq!(attempts[0].tag("http.request.resend_count"), None);
    assert_tag(
        &attempts[1],
        "http.response.status_code",
        "int64",
        200.into(),
    );
    assert_tag(&attempts[1], "http.request.resend_count", "int64", 1.into());
    let servers = trace.of("backend.shop");
    assert_eq!(servers.len(), 2, "{}", trace.summary());
    for attempt in &attempts {
        assert!(
            servers
                .iter()
                .any(|s| s.parent().as_deref() == Some(attempt.span_id())),
            "a server span under attempt {}: {}",
            attempt.span_id(),
            trace.summary()
        );
    }
    assert_eq!(trace.of("shop-backend").len(), 2, "{}", trace.summary());

    // The denied call: an error span at the server proxy saying why, and the
    // application never saw it.
    let trace = traced.jaeger.trace(&denied, 3).await.unwrap();
    let server = only(&trace, "backend.shop");
    assert_tag(&server, "http.response.status_code", "int64", 403.into());
    assert_tag(&server, "error", "bool", true.into());
    assert_tag(&server, "tessera.authz.decision", "string", "deny".into());
    assert_tag(
        &server,
        "tessera.authz.policy",
        "string",
        "shop/no-admin".into(),
    );
    let reason = tag(&server, "otel.status_description");
    assert!(
        reason["value"]
            .as_str()
            .is_some_and(|r| r.contains("DENY policy")),
        "the span says why it was denied: {reason}"
    );
    assert!(trace.of("shop-backend").is_empty(), "{}", trace.summary());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_b3_caller_joins_and_exemplars_open_their_trace_in_jaeger() {
    let Some(traced) = TracedMesh::start().await else {
        return;
    };
    let scraped = vec![
        tessera_tests::local(traced.mesh.client.admin_port),
        tessera_tests::local(traced.mesh.servers[0].admin_port),
    ];
    let Some(prometheus) = Prometheus::start(&[("tessera", scraped)]).await else {
        return;
    };

    // A caller speaking only B3 (Zipkin's headers) is joined to its trace.
    let b3_trace = "463ac35c9f6413ad48485a3953bb6124";
    let b3_span = "a2fb4a1d1a96d312";
    let mut client = Http1Client::connect(traced.mesh.entry()).await.unwrap();
    let headers = [("b3".to_string(), format!("{b3_trace}-{b3_span}-1"))];
    let answer = client.get_with("/b3", &headers).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    traced.flush().await;
    let trace = traced.jaeger.trace(b3_trace, 3).await.unwrap();
    let proxy = only(&trace, "client.shop");
    assert_eq!(proxy.parent().as_deref(), Some(b3_span));
    let server = only(&trace, "backend.shop");
    assert_eq!(server.parent().as_deref(), Some(proxy.span_id()));

    // Exemplars: the latency histogram names traces; Prometheus keeps them; each opens
    // in Jaeger.
    for _ in 0..5 {
        traced.call("/checkout").await;
    }
    traced.flush().await;
    let mut exemplars = Vec::new();
    for _ in 0..100 {
        exemplars = prometheus
            .exemplars(
                "tessera_request_duration_seconds_bucket",
                Duration::from_secs(120),
            )
            .await
            .unwrap();
        if !exemplars.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let trace_ids: Vec<&str> = exemplars
        .iter()
        .flat_map(|series| series["exemplars"].as_array().into_iter().flatten())
        .filter_map(|exemplar| exemplar["labels"]["trace_id"].as_str())
        .collect();
    assert!(
        !trace_ids.is_empty(),
        "Prometheus scraped no exemplar: {exemplars:?}"
    );
    for trace_id in trace_ids {
        let trace = traced.jaeger.trace(trace_id, 2).await.unwrap();
        assert!(
            !trace.of("backend.shop").is_empty(),
            "exemplar {trace_id}: {}",
            trace.summary()
        );
    }
}
