//! Traces: an application instrumented with the official OpenTelemetry SDK, both proxies
//! and a real OTLP/gRPC collector agree on one trace with correct parent links; spans carry
//! OpenTelemetry's HTTP semantic conventions with their types; a retried request has a
//! client span per attempt and its failures are errors; gRPC calls carry the RPC
//! conventions; a denied request errs with the reason and the deciding policy; B3-only
//! callers are joined; a dead or slow collector costs spans (counted), not requests.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::StatusCode;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, Tracer, TracerProvider};
use opentelemetry_otlp::WithExportConfig;
use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{Http1Client, L7Mesh, load};
use tessera_tests::otlp::OtlpCollector;

fn tracing_yaml(endpoint: &str) -> String {
    format!("tracing:\n  otlpEndpoint: {endpoint}\n  sampleRatio: 1.0\n  maxQueue: 64\n")
}

/// GET through the mesh with extra headers; returns the status.
async fn get_with(
    entry: std::net::SocketAddr,
    path: &str,
    headers: &HashMap<String, String>,
) -> StatusCode {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut client = Http1Client::connect(entry).await.unwrap();
    client.get_with(path, &headers).await.unwrap().status
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_from_the_app_through_both_proxies() {
    let collector = OtlpCollector::start(Duration::ZERO).await;
    let backend = HttpBackend::start("traced").await;
    let mesh = L7Mesh::start_with(
        &[backend.address],
        "http",
        None,
        &tracing_yaml(&collector.endpoint()),
    )
    .await;

    // The application: the official OpenTelemetry SDK, exporting to the same collector.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(collector.endpoint())
        .build()
        .unwrap();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("shop-app")
                .build(),
        )
        .build();
    let tracer = provider.tracer("shop-app");
    let span = tracer.start("checkout");
    let context = opentelemetry::Context::current_with_span(span);
    let app_trace_id = context.span().span_context().trace_id().to_string();
    let app_span_id = context.span().span_context().span_id().to_string();
    let mut headers = HashMap::new();
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&context, &mut headers);
    assert!(headers.contains_key("traceparent"));
    assert_eq!(
        get_with(mesh.entry(), "/checkout", &headers).await,
        StatusCode::OK
    );
    context.span().end();
    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .unwrap()
        .unwrap();

    let spans = collector.trace(&app_trace_id, 3).await;
    let by_service = |service: &str| {
        spans
            .iter()
            .find(|s| s.service == service)
            .cloned()
            .unwrap_or_else(|| panic!("no span from {service}: {spans:?}"))
    };
    let app = by_service("shop-app");
    let client = by_service("client.shop");
    let server = by_service("backend.shop");
    assert_eq!(app.span_id(), app_span_id);
    assert_eq!(
        client.parent_span_id(),
        app.span_id(),
        "client proxy span is a child of the app span"
    );
    assert_eq!(
        server.parent_span_id(),
        client.span_id(),
        "server proxy span is a child of the client span"
    );
    assert_eq!(client.span.kind, 3, "client span");
    assert_eq!(server.span.kind, 2, "server span");
    assert_eq!(
        server.attribute("http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(server.attribute("url.path").as_deref(), Some("/checkout"));
    assert_eq!(server.int_attribute("http.response.status_code"), Some(200));
    assert_eq!(server.attribute("url.scheme").as_deref(), Some("http"));
    assert!(server.int_attribute("server.port").is_some(), "{server:?}");
    assert_eq!(
        server.attribute("network.protocol.version").as_deref(),
        Some("2"),
        "the hop from the client proxy"
    );
    assert_eq!(
        server.attribute("tessera.peer.identity"),
        Some(tessera_tests::spiffe("client"))
    );
    assert_eq!(server.status().0, 0, "unset: a 200");
    assert_eq!(client.int_attribute("http.response.status_code"), Some(200));
    assert_eq!(client.attribute("url.path").as_deref(), Some("/checkout"));
    assert_eq!(
        client.attribute("tessera.destination_service").as_deref(),
        Some("backend.shop")
    );
    assert_eq!(
        client.attribute("tessera.peer.identity"),
        Some(tessera_tests::spiffe("backend"))
    );
    assert_eq!(client.int_attribute("http.request.resend_count"), None);
    // The workload, its namespace and identity describe the exporter.
    for (span, workload) in [(&client, "client"), (&server, "backend")] {
        let resource = |key| span.resource_attribute(key);
        assert_eq!(resource("service.namespace").as_deref(), Some("shop"));
        assert_eq!(resource("tessera.workload").as_deref(), Some(workload));
        assert_eq!(
            resource("tessera.identity"),
            Some(tessera_tests::spiffe(workload))
        );
        assert!(resource("service.version").is_some());
    }

    // The latency histogram links to the trace (OpenMetrics exemplar).
    let metrics = exemplar_metrics(mesh.client.admin_port).await;
    assert!(
        metrics.contains(&format!("trace_id=\"{app_trace_id}\"")),
        "{metrics}"
    );

    // A B3-only caller is joined too.
    let b3_trace = "463ac35c9f6413ad48485a3953bb6124";
    let b3_span = "a2fb4a1d1a96d312";
    let b3 = HashMap::from([("b3".to_string(), format!("{b3_trace}-{b3_span}-1"))]);
    assert_eq!(get_with(mesh.entry(), "/b3", &b3).await, StatusCode::OK);
    let spans = collector.trace(b3_trace, 2).await;
    let client = spans
        .iter()
        .find(|s| s.service == "client.shop")
        .expect("client proxy span for the B3 trace");
    assert_eq!(client.parent_span_id(), b3_span);
    assert!(
        spans
            .iter()
            .any(|s| s.service == "backend.shop" && s.parent_span_id() == client.span_id())
    );
    let multi = HashMap::from([
        (
            "x-b3-traceid".to_string(),
            "0af7651916cd43dd8448eb211c80319c".to_string(),
        ),
        ("x-b3-spanid".to_string(), "b7ad6b7169203331".to_string()),
        ("x-b3-sampled".to_string(), "1".to_string()),
    ]);
    assert_eq!(
        get_with(mesh.entry(), "/b3-multi", &multi).await,
        StatusCode::OK
    );
    assert!(
        collector
            .trace("0af7651916cd43dd8448eb211c80319c", 2)
            .await
            .len()
            >= 2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_request_has_a_span_per_attempt_and_failures_are_errors() {
    let collector = OtlpCollector::start(Duration::ZERO).await;
    let backend = HttpBackend::start("down").await;
    let retries = "  retries:\n    attempts: 2\n    budget: {ratio: 1.0, minPerSecond: 100}\n";
    let mesh = L7Mesh::start_with(
        &[backend.address],
        "http",
        Some(retries),
        &tracing_yaml(&collector.endpoint()),
    )
    .await;
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traced = HashMap::from([(
        "traceparent".to_string(),
        format!("00-{trace_id}-{caller_span}-01"),
    )]);
    assert_eq!(
        get_with(mesh.entry(), "/fail", &traced).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let spans = collector.trace(trace_id, 6).await;
    let mut attempts: Vec<_> = spans
        .iter()
        .filter(|s| s.service == "client.shop")
        .collect();
    attempts.sort_by_key(|s| s.span.start_time_unix_nano);
    assert_eq!(attempts.len(), 3, "one span per attempt: {spans:?}");
    for (index, attempt) in attempts.iter().enumerate() {
        assert_eq!(
            attempt.parent_span_id(),
            caller_span,
            "siblings under the caller"
        );
        let resends = (index > 0).then_some(index as i64);
        assert_eq!(attempt.int_attribute("http.request.resend_count"), resends);
        assert_eq!(
            attempt.int_attribute("http.response.status_code"),
            Some(503)
        );
        assert_eq!(attempt.attribute("error.type").as_deref(), Some("503"));
        assert_eq!(attempt.status().0, 2, "a client span errs on a 503");
        // Each attempt reached the server proxy, whose span is its child and errs too.
        let server = spans
            .iter()
            .find(|s| s.service == "backend.shop" && s.parent_span_id() == attempt.span_id())
            .unwrap_or_else(|| panic!("no server span under attempt {index}: {spans:?}"));
        assert_eq!(server.int_attribute("http.response.status_code"), Some(503));
        assert_eq!(server.status().0, 2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_carry_the_rpc_conventions_and_their_status_from_the_trailers() {
    use tessera_tests::backend::echo_proto::Message;
    use tessera_tests::backend::echo_proto::echo_client::EchoClient;
    let collector = OtlpCollector::start(Duration::ZERO).await;
    let (service, _task) = tessera_tests::backend::start_grpc().await;
    let mesh = L7Mesh::start_with(
        &[service],
        "grpc",
        None,
        &tracing_yaml(&collector.endpoint()),
    )
    .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.entry()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(channel);
    // (trace, what to send, gRPC status, whether the server span errs)
    let calls = [
        ("6bf92f3577b34da6a3ce929d0e0e4736", "hello", 0, false),
        // FAILED_PRECONDITION: the caller's problem, an error for the client only.
        ("7bf92f3577b34da6a3ce929d0e0e4736", "fail", 9, false),
    ];
    for (trace_id, text, _, _) in calls {
        let mut request = tonic::Request::new(Message {
            text: text.into(),
            count: 1,
        });
        let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        let _ = client.unary(request).await;
    }
    for (trace_id, text, status, server_errs) in calls {
        let spans = collector.trace(trace_id, 2).await;
        for span in &spans {
            let name = format!("{text}: {}", span.service);
            assert_eq!(
                span.attribute("rpc.system").as_deref(),
                Some("grpc"),
                "{name}"
            );
            assert_eq!(
                span.attribute("rpc.service").as_deref(),
                Some("tessera.test.v1.Echo"),
                "{name}"
            );
            assert_eq!(
                span.attribute("rpc.method").as_deref(),
                Some("Unary"),
                "{name}"
            );
            assert_eq!(
                span.int_attribute("rpc.grpc.status_code"),
                Some(status),
                "{name}"
            );
            assert_eq!(span.int_attribute("http.response.status_code"), Some(200));
            let errs = if span.span.kind == 3 {
                status != 0
            } else {
                server_errs
            };
            assert_eq!(span.status().0 == 2, errs, "{name}: {:?}", span.status());
        }
        let kinds: Vec<i32> = spans.iter().map(|s| s.span.kind).collect();
        assert!(
            kinds.contains(&2) && kinds.contains(&3),
            "{text}: {spans:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_request_is_an_error_span_with_the_reason_and_the_policy() {
    use tessera_tests::l7::resource;
    let collector = OtlpCollector::start(Duration::ZERO).await;
    let backend = HttpBackend::start("guarded").await;
    let mesh = L7Mesh::start_with(
        &[backend.address],
        "http",
        None,
        &tracing_yaml(&collector.endpoint()),
    )
    .await;
    let deny_admin = resource(
        "AuthorizationPolicy",
        "no-admin",
        "  selector: {serviceAccount: backend}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin]}}]\n",
    );
    let allow_public = resource(
        "AuthorizationPolicy",
        "public-only",
        "  selector: {serviceAccount: backend}\n  action: ALLOW\n  rules:\n  - to: [{operation: {paths: [/public]}}]\n",
    );
    mesh.apply("policy.yaml", &format!("{deny_admin}---\n{allow_public}"))
        .await;
    // (trace, path, deciding policy, reason)
    let cases = [
        (
            "8bf92f3577b34da6a3ce929d0e0e4736",
            "/admin",
            "shop/no-admin",
            "matched a DENY policy",
        ),
        (
            "9bf92f3577b34da6a3ce929d0e0e4736",
            "/private",
            "none",
            "no ALLOW policy matched",
        ),
    ];
    for (trace_id, path, policy, reason) in cases {
        let traced = HashMap::from([(
            "traceparent".to_string(),
            format!("00-{trace_id}-00f067aa0ba902b7-01"),
        )]);
        assert_eq!(
            get_with(mesh.entry(), path, &traced).await,
            StatusCode::FORBIDDEN
        );
        let spans = collector.trace(trace_id, 2).await;
        let server = spans
            .iter()
            .find(|s| s.service == "backend.shop")
            .unwrap_or_else(|| panic!("{path}: no server span: {spans:?}"));
        assert_eq!(server.status(), (2, reason.to_string()), "{path}");
        assert_eq!(
            server.attribute("tessera.authz.decision").as_deref(),
            Some("deny")
        );
        assert_eq!(
            server.attribute("tessera.authz.policy").as_deref(),
            Some(policy)
        );
        assert_eq!(server.int_attribute("http.response.status_code"), Some(403));
    }
}

async fn exemplar_metrics(admin_port: u16) -> String {
    let stream = tokio::net::TcpStream::connect(tessera_tests::local(admin_port))
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("/metrics")
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    use http_body_util::BodyExt;
    String::from_utf8_lossy(&response.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

/// Median and p99 of `n` sequential GETs on one connection, in ms.
async fn latencies(entry: std::net::SocketAddr, n: usize) -> (f64, f64) {
    let mut client = Http1Client::connect(entry).await.unwrap();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        assert_eq!(client.get("/").await.unwrap().status, StatusCode::OK);
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    (samples[n / 2], samples[n * 99 / 100])
}

fn dropped(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tessera_spans_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_or_slow_collector_costs_spans_not_requests() {
    let backend = HttpBackend::start("untraced").await;
    let healthy = OtlpCollector::start(Duration::ZERO).await;
    let slow = OtlpCollector::start(Duration::from_secs(30)).await;
    let dead = format!(
        "http://{}",
        tessera_tests::local(tessera_tests::free_port())
    );
    let mut figures = Vec::new();
    for (name, endpoint) in [
        ("collector up", healthy.endpoint()),
        ("collector slow", slow.endpoint()),
        ("collector down", dead),
    ] {
        let mesh =
            L7Mesh::start_with(&[backend.address], "http", None, &tracing_yaml(&endpoint)).await;
        let statuses = load(mesh.entry(), "/", 400, 4).await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "{name}: requests failed"
        );
        let (p50, p99) = latencies(mesh.entry(), 300).await;
        tokio::time::sleep(Duration::from_millis(1500)).await; // let the exporter try
        let (_, metrics) = mesh.client.admin("/metrics").await.unwrap();
        figures.push(format!(
            "{name}: p50 {p50:.2} ms, p99 {p99:.2} ms, spans dropped {}",
            dropped(&metrics)
        ));
        if name == "collector up" {
            assert_eq!(dropped(&metrics), 0.0, "{metrics}");
        } else {
            assert!(dropped(&metrics) > 0.0, "{name}: no drop counted");
        }
    }
    println!("{}", figures.join("\n"));
}
