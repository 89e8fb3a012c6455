//! What operators see: a real Prometheus scraping two proxies agrees with the load
//! generator, and `tessera stat` agrees with the proxies' /metrics.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{Http1Client, L7Mesh};
use tessera_tests::telemetry::{self, Prometheus};
use tessera_tests::{binary, http_get, local};

/// One request as the generator saw it.
struct Observation {
    at: f64,
    ok: bool,
    seconds: f64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn query(prometheus: &Prometheus, promql: &str, at: f64) -> f64 {
    let result = prometheus
        .api(&format!(
            "/api/v1/query?query={}&time={at:.3}",
            telemetry::encode(promql)
        ))
        .await
        .unwrap();
    result["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value for {promql}: {result}"))
}

fn within(label: &str, measured: f64, expected: f64, tolerance: f64) {
    let off = (measured - expected).abs() / expected;
    println!(
        "{label}: Prometheus {measured:.4}, load generator {expected:.4} ({:.1} % apart)",
        off * 100.0
    );
    assert!(off <= tolerance, "{label}: {measured} vs {expected}");
}

/// The proxy's latency buckets (proxy/src/telemetry.rs): a quantile estimated from a
/// histogram is only as precise as the bucket it falls in.
const LATENCY_BUCKETS: [f64; 24] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
];

/// Prometheus' estimate lies in the bucket of the true value or the next one (the load
/// generator's figure also holds the client's own time, which can cross a boundary).
fn within_buckets(label: &str, measured: f64, expected: f64) {
    let bucket = |value: f64| LATENCY_BUCKETS.iter().take_while(|le| **le < value).count();
    println!(
        "{label}: Prometheus {measured:.4}, load generator {expected:.4} (buckets {} and {})",
        bucket(measured),
        bucket(expected)
    );
    assert!(
        bucket(measured).abs_diff(bucket(expected)) <= 1,
        "{label}: {measured} vs {expected}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_agrees_with_the_load_generator() {
    let backend = HttpBackend::start("measured").await;
    backend
        .behaviour
        .failure_percent
        .store(10, Ordering::SeqCst);
    backend.behaviour.delay_ms.store(32, Ordering::SeqCst);
    backend.behaviour.jitter_ms.store(12, Ordering::SeqCst);
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let targets = vec![
        local(mesh.client.admin_port),
        local(mesh.servers[0].admin_port),
    ];
    let Some(prometheus) = Prometheus::start(&[("tessera", targets)]).await else {
        return;
    };
    let prometheus = &prometheus;

    // Closed-loop load, four connections, for 16 s.
    let entry = mesh.entry();
    let deadline = Instant::now() + Duration::from_secs(16);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut client = Http1Client::connect(entry).await.unwrap();
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let answer = client.get("/flaky").await.unwrap();
                    seen.push(Observation {
                        at: unix_now(),
                        ok: answer.status.is_success(),
                        seconds: started.elapsed().as_secs_f64(),
                    });
                }
                seen
            })
        })
        .collect();
    let mut observations = Vec::new();
    for worker in workers {
        observations.extend(worker.await.unwrap());
    }
    // Compare over the 10 s that end one second before the load stopped.
    let at = observations.iter().map(|o| o.at).fold(0.0, f64::max) - 1.0;
    let window: Vec<&Observation> = observations
        .iter()
        .filter(|o| o.at > at - 10.0 && o.at <= at)
        .collect();
    let rate = window.len() as f64 / 10.0;
    let success = window.iter().filter(|o| o.ok).count() as f64 / window.len() as f64;
    let mut latencies: Vec<f64> = window.iter().map(|o| o.seconds).collect();
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies[(latencies.len() as f64 * 0.99) as usize - 1];
    tokio::time::sleep(Duration::from_secs(3)).await; // let Prometheus scrape past `at`

    let selector = "direction=\"outbound\"";
    let measured_rate = query(
        prometheus,
        &format!("sum(rate(tessera_requests_total{{{selector}}}[10s]))"),
        at,
    )
    .await;
    within("request rate (req/s)", measured_rate, rate, 0.10);
    let measured_success = query(
        prometheus,
        &format!("sum(rate(tessera_requests_total{{{selector},code!~\"5..\"}}[10s])) / sum(rate(tessera_requests_total{{{selector}}}[10s]))"),
        at,
    )
    .await;
    within("success rate", measured_success, success, 0.10);
    let measured_p99 = query(
        prometheus,
        &format!("histogram_quantile(0.99, sum by (le) (rate(tessera_request_duration_seconds_bucket{{{selector}}}[10s])))"),
        at,
    )
    .await;
    within_buckets("p99 latency (s)", measured_p99, p99);
    // The serving proxy is scraped too, and saw the same requests inbound.
    let inbound = query(
        prometheus,
        "sum(rate(tessera_requests_total{direction=\"inbound\"}[10s]))",
        at,
    )
    .await;
    within("inbound request rate (req/s)", inbound, rate, 0.10);
    // Both views of the edge carry the same workload labels: summed by them, the
    // client's outbound and the server's inbound series fall together (twice the rate).
    let edge = query(
        prometheus,
        "sum by (source_workload, source_namespace, destination_workload, destination_namespace) (rate(tessera_requests_total{source_workload=\"client\",destination_workload=\"backend\",destination_namespace=\"shop\"}[10s]))",
        at,
    )
    .await;
    within(
        "client → backend, both directions (req/s)",
        edge,
        2.0 * rate,
        0.10,
    );
    // The counter and the histogram share code_class.
    let failing = query(
        prometheus,
        "sum(rate(tessera_requests_total{direction=\"outbound\",code_class=\"5xx\"}[10s])) / sum(rate(tessera_request_duration_seconds_count{direction=\"outbound\",code_class=\"5xx\"}[10s]))",
        at,
    )
    .await;
    within(
        "5xx counted alike by counter and histogram",
        failing,
        1.0,
        0.01,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tessera_stat_agrees_with_metrics() {
    let backend = HttpBackend::start("stat").await;
    backend
        .behaviour
        .failure_percent
        .store(25, Ordering::SeqCst);
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let mut client = Http1Client::connect(mesh.entry()).await.unwrap();
    for _ in 0..80 {
        client.get("/flaky").await.unwrap();
    }
    let admin = local(mesh.servers[0].admin_port).to_string();
    let (_, metrics) = mesh.servers[0].admin("/metrics").await.unwrap();
    let (mut total, mut ok) = (0.0, 0.0);
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("tessera_requests_total{direction=\"inbound\""))
    {
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        total += value;
        if line.contains("code=\"200\"") {
            ok += value;
        }
    }
    assert_eq!(total, 80.0, "{metrics}");

    let output = Command::new(binary("tessera"))
        .args(["stat", "--proxy", &admin, "--window", "0s", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let row = &stats[0];
    assert_eq!(row["workload"], "backend");
    assert_eq!(row["namespace"], tessera_tests::NAMESPACE);
    assert_eq!(row["identity"], tessera_tests::spiffe("backend"));
    assert_eq!(row["requests"].as_u64(), Some(80), "an integer: {row}");
    let success = row["successRate"].as_f64().unwrap();
    assert!(
        (success - ok / total).abs() < 1e-9,
        "stat {success} vs metrics {}",
        ok / total
    );
    assert!(row["p99Ms"].as_f64().unwrap() > 0.0);

    // Through the control plane, which lists its connected proxies and their admin
    // ports: the same figures, without naming a proxy.
    let control_plane_admin = local(mesh.control_plane.admin_port).to_string();
    let (_, listed) = tessera_tests::http_get(local(mesh.control_plane.admin_port), "/proxies")
        .await
        .unwrap();
    assert!(listed.contains(&admin), "{listed}");
    let output = Command::new(binary("tessera"))
        .args(["stat", "--control-plane-admin", &control_plane_admin])
        .args(["--window", "0s", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let through: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(through, stats, "--control-plane-admin vs --proxy");

    let output = Command::new(binary("tessera"))
        .args(["stat", "--proxy", &admin, "--window", "0s"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    println!("{table}");
    assert!(
        table.contains("SUCCESS")
            && table.contains(&format!("backend.{}", tessera_tests::NAMESPACE)),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn access_logs_and_control_plane_metrics() {
    let backend = HttpBackend::start("logged").await;
    let mesh = L7Mesh::start_with(&[backend.address], "http", None, "accessLog: true\n").await;
    let mut client = Http1Client::connect(mesh.entry()).await.unwrap();
    assert!(
        client
            .get("/orders/42?secret=token")
            .await
            .unwrap()
            .status
            .is_success()
    );

    let line = mesh
        .client
        .process
        .logs
        .wait_for(
            &["\"event\":\"request\"", "/orders/42"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["direction"], "outbound");
    assert_eq!(entry["source"], tessera_tests::spiffe("client"));
    assert_eq!(entry["destination"], "backend.shop");
    assert_eq!(entry["method"], "GET");
    assert_eq!(
        entry["path"], "/orders/42",
        "no query string in access logs"
    );
    assert_eq!(entry["status"], 200);
    assert!(entry["duration_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(entry["bytes"], 6); // "logged"
    assert!(entry["timestamp"].is_string());
    assert!(!line.contains("secret=token"));
    let inbound = mesh.servers[0]
        .process
        .logs
        .wait_for(
            &["\"event\":\"request\"", "\"direction\":\"inbound\""],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(
        inbound.contains(&tessera_tests::spiffe("client")),
        "{inbound}"
    );

    let (status, metrics) = http_get(local(mesh.control_plane.admin_port), "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    for expected in [
        "tessera_ca_certificates_issued_total 2",
        "tessera_discovery_connected_proxies 2",
        "tessera_config_pushes_total",
        "tessera_config_push_latency_seconds_count 1",
    ] {
        assert!(
            metrics.contains(expected),
            "control plane metrics lack {expected}:\n{metrics}"
        );
    }
}
