//! What a Rego authorization decision costs per request: in the proxy (a CUSTOM policy
//! evaluated with regorus, input built from the request included) and the Istio-shaped
//! alternative's lower bound — the same decision asked of an OPA server over loopback
//! REST on a kept-alive connection (`tessera-benches rego`; OPA from `tests/opa`).
//! `benches/hot_paths.rs` measures the in-proxy evaluation with criterion too.

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use http::{HeaderMap, HeaderValue};
use serde_json::{Value, json};
use tessera_mesh::SpiffeId;
use tessera_mesh::policy::{CompiledRego, HttpRequest, RegoModule, RegoProvider, Request};
use tessera_tests::opa::{self, Bundle, OpaClient, OpaServer};

/// RBAC by caller and path prefix, with an admin list and a deny reason: a policy as
/// users of Istio + OPA write one.
pub const TYPICAL_POLICY: &str = r#"package tessera.authz

import rego.v1

default allow := false

principal := input.attributes.source.principal

http_request := input.attributes.request.http

allow if {
	some grant in data.grants[principal]
	http_request.method in grant.methods
	startswith(http_request.path, grant.prefix)
}

allow if principal in data.admins

deny contains "admin paths are closed" if input.parsed_path[0] == "admin"
"#;

pub const QUERY: &str = "data.tessera.authz.allow";

pub fn typical_data() -> Value {
    json!({
        "grants": {
            "spiffe://cluster.local/ns/shop/sa/frontend": [
                {"methods": ["GET", "HEAD"], "prefix": "/orders"},
                {"methods": ["POST"], "prefix": "/orders/new"},
            ],
            "spiffe://cluster.local/ns/shop/sa/billing": [
                {"methods": ["GET"], "prefix": "/invoices"},
            ],
        },
        "admins": ["spiffe://cluster.local/ns/ops/sa/admin"],
    })
}

/// The typical policy compiled, as a proxy compiles it when a snapshot arrives.
pub fn typical_policy() -> CompiledRego {
    CompiledRego::try_from(&RegoProvider {
        query: QUERY.into(),
        modules: vec![RegoModule {
            name: "authz.rego".into(),
            source: Some(TYPICAL_POLICY.into()),
            file: None,
        }],
        data: Some(typical_data()),
    })
    .expect("the typical policy compiles")
}

/// The fields of a browser-ish request through a mesh: a dozen headers.
pub fn typical_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "orders.shop"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/133.0",
        ),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-GB,en;q=0.5"),
        ("x-request-id", "8c4f2b1e-7d3a-4e5f-9a0b-1c2d3e4f5a6b"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-forwarded-proto", "https"),
        ("content-type", "application/json"),
        ("cookie", "session=abc123"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
}

/// `GET /orders/42?verbose=1` from the frontend, as the proxy describes it to policy.
pub fn with_typical_request<R>(decide: impl FnOnce(&Request<'_>) -> R) -> R {
    let source = SpiffeId::new("cluster.local", "shop", "frontend").expect("an id");
    let destination = SpiffeId::new("cluster.local", "shop", "orders").expect("an id");
    let headers = typical_headers();
    let header = |_: &http::HeaderName| None;
    decide(&Request {
        source: Some(&source),
        destination: Some(&destination),
        request_principal: None,
        jwt_claims: None,
        port: 8080,
        http: Some(HttpRequest {
            method: "GET",
            path: "/orders/42",
            query: Some("verbose=1"),
            host: "orders.shop",
            scheme: "http",
            protocol: "HTTP/1.1",
            header: &header,
            headers: Some(&headers),
        }),
    })
}

/// Latency percentiles of one way of deciding, in microseconds.
#[derive(Debug)]
pub struct Cost {
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

impl Cost {
    fn of(histogram: &Histogram<u64>) -> Self {
        let micros = |nanos: f64| nanos / 1000.0;
        Self {
            p50_us: micros(histogram.value_at_quantile(0.5) as f64),
            p99_us: micros(histogram.value_at_quantile(0.99) as f64),
            mean_us: micros(histogram.mean()),
        }
    }
}

/// Times `samples` decisions of the typical request both ways; `None` for OPA when its
/// binary is not built (it says so).
pub async fn compare(samples: usize) -> anyhow::Result<(Cost, Option<Cost>)> {
    let policy = typical_policy();
    let mut in_proxy = histogram();
    for _ in 0..samples {
        let started = Instant::now();
        let verdict = with_typical_request(|request| policy.evaluate(request));
        record(&mut in_proxy, started.elapsed());
        anyhow::ensure!(
            verdict.allowed,
            "the typical request is allowed: {verdict:?}"
        );
    }
    let Some(binary) = opa::binary() else {
        return Ok((Cost::of(&in_proxy), None));
    };
    let bundle = Bundle::new(&[("authz.rego", TYPICAL_POLICY)], &typical_data());
    let server = OpaServer::start(&binary, &bundle).await?;
    let mut client = OpaClient::connect(server.address).await?;
    let input = with_typical_request(tessera_mesh::policy::rego::input)
        .map_err(|failure| anyhow::anyhow!("input: {}", failure.as_str()))?;
    let mut over_rest = histogram();
    for index in 0..samples + samples / 10 {
        // The input is built per request in the proxy too; OPA's side adds the hop,
        // the JSON encoding and its own evaluation.
        let started = Instant::now();
        let request = input.clone();
        let answer = client.query(QUERY, &request).await.context("ask opa")?;
        let elapsed = started.elapsed();
        anyhow::ensure!(answer == Some(Value::Bool(true)), "opa allows: {answer:?}");
        // The first tenth warms OPA's caches and the connection.
        if index >= samples / 10 {
            record(&mut over_rest, elapsed);
        }
    }
    Ok((Cost::of(&in_proxy), Some(Cost::of(&over_rest))))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    histogram.saturating_record(nanos.max(1));
}
