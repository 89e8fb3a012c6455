//! RoutePolicy at work across real processes: retries masking a flaky backend, the retry
//! budget holding when a backend is down, a timeout, outlier ejection with re-admission,
//! endpoints changing under load. Smoke tests that wait for nothing tighter than "soon":
//! the cases, with exact durations and attempt counts, are paused-time tests of the
//! attempts loop (`proxy/src/outbound/forward.rs`) and of the retry policy
//! (`proxy/src/outbound/retry.rs`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::StatusCode;
use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{Http1Client, L7Mesh, load};

/// The value of a counter with `labels` in Prometheus text.
fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name_and_labels))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_mask_a_backend_failing_30_percent() {
    let backend = HttpBackend::start("flaky").await;
    backend
        .behaviour
        .failure_percent
        .store(30, Ordering::SeqCst);
    let policy = "  retries:\n    attempts: 6\n    budget: {ratio: 0.7, minPerSecond: 20}\n";
    let mesh = L7Mesh::start(&[backend.address], "http", Some(policy)).await;
    let started = Instant::now();
    let statuses = load(mesh.entry(), "/flaky", 10_000, 16).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let (_, metrics) = mesh.client.admin("/metrics").await.unwrap();
    let retries = sample(
        &metrics,
        "tessera_retries_total{destination_service=\"backend.shop\"}",
    );
    println!(
        "{ok}/10000 succeeded in {:?}; {retries} retries; backend saw {} requests",
        started.elapsed(),
        backend.requests()
    );
    assert!(ok >= 9_990, "only {ok} of 10000 succeeded");
    assert!(
        retries > 2_000.0,
        "a 30 % failure rate must have caused retries: {retries}"
    );
    assert_eq!(
        backend.requests(),
        10_000 + retries as u64,
        "every retry reached the backend once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_stay_within_budget_when_everything_fails() {
    let backend = HttpBackend::start("down").await;
    let policy = "  retries:\n    attempts: 3\n    budget: {ratio: 0.2, minPerSecond: 5}\n";
    let mesh = L7Mesh::start(&[backend.address], "http", Some(policy)).await;
    let requests = 2_000;
    let started = Instant::now();
    let statuses = load(mesh.entry(), "/fail", requests, 8).await;
    let elapsed = started.elapsed();
    assert!(
        statuses.iter().all(|s| *s == 503),
        "the application's own 503 comes back"
    );
    let (_, metrics) = mesh.client.admin("/metrics").await.unwrap();
    let retries = sample(
        &metrics,
        "tessera_retries_total{destination_service=\"backend.shop\"}",
    );
    // Budget: 20 % of traffic plus 5/s over a 10 s window (the floor counts once per
    // window, the whole run fits in one or two).
    let windows = (elapsed.as_secs_f64() / 10.0).ceil().max(1.0);
    let allowed = 0.2 * requests as f64 + 5.0 * 10.0 * windows;
    println!(
        "{requests} requests in {elapsed:?}: {retries} retries, budget {allowed}; without a budget: {}",
        requests * 3
    );
    assert!(retries > 0.0, "retries happened");
    assert!(
        retries <= allowed,
        "{retries} retries exceed the budget of {allowed}"
    );
    assert_eq!(backend.requests(), requests as u64 + retries as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_timeout_answers_504() {
    let backend = HttpBackend::start("slow").await;
    let mesh = L7Mesh::start(&[backend.address], "http", Some("  timeout: 200ms\n")).await;
    let mut client = Http1Client::connect(mesh.entry()).await.unwrap();
    let started = Instant::now();
    let answer = client.get("/sleep/30000").await.unwrap();
    println!("504 after {:?}", started.elapsed());
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.headers["tessera-proxy-error"], "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered by the proxy, not after the backend's 30 s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resetting_endpoint_is_ejected_then_readmitted() {
    // Alone, so every request reaches it: with a choice, the balancer steers around a
    // failing endpoint before its third failure in a row.
    let backend = HttpBackend::start("flaky").await;
    let policy = "  outlierDetection:\n    consecutiveFailures: 3\n    baseEjectionTime: 1s\n    maxEjectionPercent: 100\n";
    let mesh = L7Mesh::start(&[backend.address], "http", Some(policy)).await;
    backend.behaviour.reset.store(1, Ordering::SeqCst);
    let failed = load(mesh.entry(), "/", 3, 1).await;
    assert!(failed.iter().all(|s| *s != 200), "{failed:?}");
    let logs = &mesh.client.process.logs;
    logs.wait_for(&["endpoint ejected"], Duration::from_secs(10))
        .await
        .unwrap();
    // Every endpoint ejected: it is still tried, and once its ejection has ended, the
    // next request re-admits it.
    backend.behaviour.reset.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let statuses = load(mesh.entry(), "/", 4, 1).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    logs.wait_for(&["endpoint re-admitted"], Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_come_and_go_under_load_without_failures() {
    let backends = [
        HttpBackend::start("one").await,
        HttpBackend::start("two").await,
        HttpBackend::start("three").await,
    ];
    let mesh = L7Mesh::start(&[backends[0].address, backends[1].address], "http", None).await;
    let entry = mesh.entry();
    let traffic = tokio::spawn(async move {
        let mut statuses = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(4);
        while Instant::now() < deadline {
            statuses.extend(load(entry, "/sleep/5", 40, 4).await);
        }
        statuses
    });
    // Add a third workload (with its own proxy), then remove the first.
    let port = tessera_tests::free_port();
    let third = mesh
        .control_plane
        .workload_proxy("backend", backends[2].address, port);
    third.wait_ready(Duration::from_secs(20)).await.unwrap();
    let first_port = mesh.servers[0].inbound_port.unwrap();
    let second_port = mesh.servers[1].inbound_port.unwrap();
    mesh.control_plane.write_config(
        "backend.yaml",
        &tessera_tests::l7::service_config("http", &[first_port, second_port, port], None),
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    mesh.control_plane.write_config(
        "backend.yaml",
        &tessera_tests::l7::service_config("http", &[second_port, port], None),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let first_after_removal = backends[0].requests();
    let statuses = traffic.await.unwrap();
    let failed = statuses.iter().filter(|s| **s != 200).count();
    println!(
        "{} requests while endpoints changed, {failed} failed; served: {} {} {}",
        statuses.len(),
        backends[0].requests(),
        backends[1].requests(),
        backends[2].requests()
    );
    assert_eq!(failed, 0);
    assert!(backends[2].requests() > 0, "the added endpoint got traffic");
    assert_eq!(
        backends[0].requests(),
        first_after_removal,
        "the removed endpoint got new traffic"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callers_malformed_body_is_its_own_error_and_ejects_nothing() {
    // Issue 21, item 3: malformed chunked bodies were answered 502 upstream-reset and
    // counted against the endpoint, so three of them ejected a healthy one for 30 s.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = HttpBackend::start("healthy").await;
    let policy = "  retries: {attempts: 2}\n  outlierDetection:\n    consecutiveFailures: 3\n    baseEjectionTime: 30s\n    maxEjectionPercent: 100\n";
    let mesh = L7Mesh::start(&[backend.address], "http", Some(policy)).await;
    let chunked = |method: &str, chunk: &str| {
        format!(
            "{method} /upload HTTP/1.1\r\nHost: backend.shop\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}"
        )
    };
    let malformed = [
        chunked("POST", "zz\r\nhello\r\n0\r\n\r\n"),
        chunked("POST", "-4\r\nhello\r\n0\r\n\r\n"),
        chunked("POST", "ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        chunked("PUT", "zz\r\nhello\r\n0\r\n\r\n"), // retryable: its body is buffered first
        chunked("PUT", "-4\r\nhello\r\n0\r\n\r\n"),
        chunked(
            "POST",
            &format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(1 << 20)),
        ),
    ];
    let mut refused = 0;
    for request in &malformed {
        let mut stream = tokio::net::TcpStream::connect(mesh.entry()).await.unwrap();
        // A caller may be cut off before it has written everything: that is fine.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut answer = vec![0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
            .await
            .expect("an answer or a close");
        let head = String::from_utf8_lossy(&answer[..read.unwrap_or(0)]).into_owned();
        assert!(
            head.is_empty() || head.starts_with("HTTP/1.1 400"),
            "{:?}: {head}",
            &request[..40]
        );
        refused += usize::from(head.contains("bad-request"));
    }
    println!(
        "{refused} of {} malformed bodies answered 400 before the close",
        malformed.len()
    );
    assert!(refused > 0, "no malformed body was answered 400");
    // A caller that hangs up mid-body.
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(mesh.entry()).await.unwrap();
        stream
            .write_all(b"POST /upload HTTP/1.1\r\nHost: backend.shop\r\nContent-Length: 100000\r\n\r\npartial")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        mesh.client.process.logs.count(&["endpoint ejected"]),
        0,
        "a caller's error ejected a healthy endpoint"
    );
    let statuses = load(mesh.entry(), "/", 20, 2).await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "the only endpoint still serves: {statuses:?}"
    );
    let (_, metrics) = mesh.client.admin("/metrics").await.unwrap();
    let retries = sample(
        &metrics,
        "tessera_retries_total{destination_service=\"backend.shop\"}",
    );
    assert_eq!(retries, 0.0, "a caller's error was retried: {metrics}");
}
