//! RateLimitPolicy enforced by real proxies: HTTP 429 with `Retry-After`, gRPC
//! RESOURCE_EXHAUSTED, opaque connections closed at once, a greedy caller limited while
//! a polite one is not, and a new limit applied without a restart. Request rates are one
//! a minute so that what a burst admits does not depend on how fast the test runs (the
//! connection rate, one a second, leaves a second for three loopback connections).

use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use tessera_tests::backend::echo_proto::Message;
use tessera_tests::backend::echo_proto::echo_client::EchoClient;
use tessera_tests::backend::{HttpBackend, start_grpc};
use tessera_tests::l7::{Http1Client, L7Mesh, SERVICE, resource};
use tessera_tests::{EchoServer, Upstream, binary, echo_roundtrip};

fn per_caller(burst: u32) -> String {
    resource(
        "RateLimitPolicy",
        "api-limits",
        &format!(
            "  selector: {{serviceAccount: backend}}\n  limits:\n  - name: per-caller\n    match: {{pathPrefix: /api}}\n    rate: 1\n    per: 1m\n    burst: {burst}\n    key: identity\n"
        ),
    )
}

/// Sends `count` GETs of `path`; the answers.
async fn gets(
    client: &mut Http1Client,
    path: &str,
    count: usize,
) -> Vec<(StatusCode, http::HeaderMap)> {
    let mut answers = Vec::new();
    for _ in 0..count {
        let answer = client.get(path).await.unwrap();
        answers.push((answer.status, answer.headers));
    }
    answers
}

fn admitted(answers: &[(StatusCode, http::HeaderMap)]) -> usize {
    answers.iter().filter(|(s, _)| *s == StatusCode::OK).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_greedy_caller_gets_429_a_polite_one_is_served_and_a_new_limit_applies_at_once() {
    let backend = HttpBackend::start("limited").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let polite_proxy = mesh
        .control_plane
        .proxy("batch", None, &[Upstream::service(SERVICE)]);
    polite_proxy
        .wait_ready(Duration::from_secs(20))
        .await
        .expect("proxy ready");
    mesh.apply("limits.yaml", &per_caller(3)).await;
    let mut greedy = Http1Client::connect(mesh.entry()).await.unwrap();
    let mut polite = Http1Client::connect(polite_proxy.outbound(0))
        .await
        .unwrap();
    let served = backend.requests();

    let answers = gets(&mut greedy, "/api/orders", 10).await;
    assert_eq!(admitted(&answers), 3, "the burst, then nothing");
    for (status, headers) in &answers[3..] {
        assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["tessera-proxy-error"], "rate-limited");
        let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
    }
    // Another route is not limited; another caller has its own bucket.
    assert_eq!(admitted(&gets(&mut greedy, "/health", 2).await), 2);
    assert_eq!(admitted(&gets(&mut polite, "/api/orders", 3).await), 3);
    assert_eq!(
        backend.requests(),
        served + 3 + 2 + 3,
        "a limited request reached the application"
    );

    let (_, metrics) = mesh.servers[0].admin("/metrics").await.unwrap();
    let series = "policy=\"shop/api-limits\",limit=\"per-caller\"} 7";
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tessera_rate_limited_total{") && l.ends_with(series)),
        "{metrics}"
    );
    let admin = format!("127.0.0.1:{}", mesh.servers[0].admin_port);
    let stat = Command::new(binary("tessera"))
        .args(["stat", "--proxy", &admin, "--window", "0s", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        stat.status.success(),
        "{}",
        String::from_utf8_lossy(&stat.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    let backend_stat = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["workload"] == "backend")
        .unwrap_or_else(|| panic!("{stats:#}"));
    assert_eq!(backend_stat["rateLimited"], 7, "{stats:#}");

    // A larger burst, written while everything runs: applied at the next snapshot.
    mesh.apply("limits.yaml", &per_caller(20)).await;
    assert_eq!(admitted(&gets(&mut greedy, "/api/orders", 25).await), 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_call_over_the_limit_is_resource_exhausted() {
    let (service, _task) = start_grpc().await;
    let mesh = L7Mesh::start(&[service], "grpc", None).await;
    let limit = resource(
        "RateLimitPolicy",
        "grpc",
        "  limits:\n  - {rate: 1, per: 1m, burst: 1}\n",
    );
    mesh.apply("limits.yaml", &limit).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.entry()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(channel);
    let message = || Message {
        text: "hi".into(),
        count: 1,
    };
    client.unary(message()).await.unwrap();
    let status = client.unary(message()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "rate-limited");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_opaque_connection_over_the_rate_is_closed_before_a_byte_moves() {
    let echo = EchoServer::start().await;
    let mesh = L7Mesh::start(&[echo.address], "opaque", None).await;
    let limit = resource(
        "RateLimitPolicy",
        "tcp",
        "  limits:\n  - {name: connections, connectionsPerSecond: 1, burst: 2}\n",
    );
    mesh.apply("limits.yaml", &limit).await;
    for _ in 0..2 {
        assert_eq!(
            echo_roundtrip(mesh.entry(), b"ping").await.unwrap(),
            b"ping"
        );
    }
    let received = echo.received();
    let refused: Vec<u8> = echo_roundtrip(mesh.entry(), b"over the limit")
        .await
        .unwrap_or_default();
    assert!(refused.is_empty());
    assert_eq!(echo.received(), received, "bytes reached the application");
    let (_, metrics) = mesh.servers[0].admin("/metrics").await.unwrap();
    assert!(
        metrics.contains("policy=\"shop/tcp\",limit=\"connections\"} 1"),
        "{metrics}"
    );
}
