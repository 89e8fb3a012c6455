//! Micro-benchmarks of per-connection and per-request work in the proxy.

#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use tessera_mesh::SpiffeId;
use tessera_mesh::policy::{
    self, AuthorizationPolicySpec, CompiledPolicy, HttpRequest, MtlsMode, Named, Request,
};
use tessera_proxy::detect::classify;
use tessera_proxy::inbound::authorize::InboundPolicy;
use tessera_proxy::telemetry::Metrics;

/// Compiled once, as a proxy does when a snapshot arrives.
fn policies() -> Vec<CompiledPolicy> {
    let yaml = [
        "action: DENY\nrules:\n- to: [{operation: {methods: [DELETE]}}]\n",
        "action: DENY\nrules:\n- to: [{operation: {paths: [\"/admin*\"]}}]\n",
        "action: ALLOW\nrules:\n- from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]\n  to: [{operation: {methods: [GET, POST], paths: [\"/orders*\"]}}]\n",
        "action: ALLOW\nrules:\n- from: [{source: {namespaces: [ops]}}]\n",
        "action: AUDIT\nrules: [{}]\n",
    ];
    yaml.iter()
        .enumerate()
        .map(|(i, spec)| {
            let named = Named {
                name: format!("p{i}"),
                namespace: "shop".into(),
                spec: parse_policy(spec),
            };
            CompiledPolicy::try_from(&named).expect("a policy that compiles")
        })
        .collect()
}

/// Policies are built from YAML the way the control plane reads them.
fn parse_policy(text: &str) -> AuthorizationPolicySpec {
    let document = format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n{}",
        indent(text)
    );
    let resources =
        tessera_mesh::resources::parse_file(std::path::Path::new("bench.yaml"), &document)
            .expect("policy");
    match &resources[0].spec {
        tessera_mesh::resources::Spec::AuthorizationPolicy(spec) => spec.clone(),
        _ => unreachable!("an AuthorizationPolicy document"),
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn hot_paths(c: &mut Criterion) {
    c.bench_function("detect/http1", |b| {
        b.iter(|| classify(black_box(b"GET /orders HTTP/1.1\r\n")))
    });
    c.bench_function("detect/h2-preface", |b| {
        b.iter(|| classify(black_box(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")))
    });

    let policies = policies();
    let selected: Vec<&CompiledPolicy> = policies.iter().collect();
    let source: SpiffeId = "spiffe://cluster.local/ns/shop/sa/frontend"
        .parse()
        .expect("id");
    let header = |_: &HeaderName| None;
    let request = Request {
        source: Some(&source),
        destination: None,
        request_principal: None,
        jwt_claims: None,
        port: 8080,
        http: Some(HttpRequest {
            method: "GET",
            path: "/orders/42",
            query: None,
            host: "orders.shop",
            scheme: "http",
            protocol: "HTTP/1.1",
            header: &header,
            headers: None,
        }),
    };
    let rego = tessera_benches::rego::typical_policy();
    c.bench_function("policy/rego-typical", |b| {
        b.iter(|| {
            tessera_benches::rego::with_typical_request(|request| rego.evaluate(black_box(request)))
        })
    });
    c.bench_function("policy/authorize-5-policies", |b| {
        b.iter(|| policy::authorize(black_box(&selected), black_box(&request)))
    });
    c.bench_function("policy/normalize-path", |b| {
        b.iter(|| policy::normalize_path(black_box("/api/v1/orders/42")).is_ok())
    });

    let mut incoming = HeaderMap::new();
    incoming.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    c.bench_function("trace/extract-and-inject", |b| {
        b.iter(|| {
            let context = tessera_proxy::trace::extract(black_box(&incoming)).expect("context");
            let mut outgoing = HeaderMap::new();
            tessera_proxy::trace::inject(
                &mut outgoing,
                &context.trace_id,
                &[7; 8],
                context.sampled,
                None,
            );
            outgoing
        })
    });

    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("content-type", "application/json"),
        ("user-agent", "bench"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    c.bench_function("http/strip-hop-by-hop", |b| {
        b.iter(|| {
            let mut copy = headers.clone();
            tessera_proxy::http::strip_hop_by_hop(&mut copy, false);
            copy
        })
    });

    // What the inbound proxy does per request: decide, and count the decision.
    let metrics = Metrics::new();
    let inbound = InboundPolicy::new(MtlsMode::Strict, None, policies.clone(), None);
    c.bench_function("metrics/authorize-and-count-5-policies", |b| {
        b.iter(|| inbound.authorize(black_box(&request), &metrics))
    });
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
