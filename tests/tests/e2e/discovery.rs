//! Configuration from the control plane: changes reach proxies within a second, bad
//! files are refused with file and line while the last good configuration keeps serving,
//! a configuration too large for proxies is refused before it reaches them, and a
//! control-plane outage costs no request.

use std::time::{Duration, Instant};

use tessera_mesh::snapshot::MAX_SNAPSHOT_BYTES;
use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{L7Mesh, load, service_config};

/// A RequestAuthentication in a namespace no test workload is in, whose inline key set
/// is padded to about `size` bytes: a configuration of that size that changes nothing
/// for the traffic under test.
fn padded_config(size: usize) -> String {
    let padding = "k".repeat(size);
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: padded, namespace: elsewhere}}\nspec:\n  jwtRules:\n  - issuer: https://issuer.example\n    jwks: '{{\"keys\": [], \"padding\": \"{padding}\"}}'\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn large_configurations_reach_proxies_and_too_large_ones_are_refused() {
    let backend = HttpBackend::start("v1").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let proxy_logs = &mesh.client.process.logs;
    let control_plane_logs = &mesh.control_plane.process.logs;

    // 6 MiB: more than gRPC's default 4 MiB message, within the limit: it arrives.
    let received = proxy_logs.count(&["configuration received"]);
    mesh.control_plane
        .write_config("padded.yaml", &padded_config(6 << 20));
    assert!(
        tessera_tests::eventually(Duration::from_secs(30), || proxy_logs
            .count(&["configuration received"])
            > received)
        .await,
        "a 6 MiB configuration did not reach the proxy; proxy log:\n{}",
        proxy_logs.lines().join("\n")
    );
    let received = proxy_logs.count(&["configuration received"]);
    let last_version = proxy_logs.matching(&["configuration received"]).pop();

    // Over the limit: refused where the operator looks, never sent.
    mesh.control_plane.write_config(
        "padded.yaml",
        &padded_config(MAX_SNAPSHOT_BYTES + (1 << 20)),
    );
    let refusal = control_plane_logs
        .wait_for(
            &["configuration refused", "snapshot too large"],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(
        refusal.contains(&format!("limit {MAX_SNAPSHOT_BYTES}")),
        "{refusal}"
    );
    println!("{refusal}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The proxy kept its configuration and its stream, and serves.
    assert_eq!(proxy_logs.count(&["configuration received"]), received);
    assert_eq!(
        proxy_logs.matching(&["configuration received"]).pop(),
        last_version
    );
    assert_eq!(
        proxy_logs.count(&["discovery stream lost"]),
        0,
        "{}",
        proxy_logs.lines().join("\n")
    );
    assert_eq!(mesh.client.admin("/ready").await.unwrap().0, 200);
    let statuses = load(mesh.entry(), "/", 20, 2).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_propagate_and_bad_files_are_refused() {
    let backend = HttpBackend::start("v1").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let logs = &mesh.client.process.logs;
    let received_before = logs.count(&["configuration received"]);

    // A good change (a route timeout) reaches the proxy within a second.
    let started = Instant::now();
    let ports = [mesh.servers[0].inbound_port.unwrap()];
    mesh.control_plane.write_config(
        "backend.yaml",
        &service_config("http", &ports, Some("  timeout: 150ms\n")),
    );
    while logs.count(&["configuration received"]) == received_before {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "change did not arrive within a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "configuration change reached the proxy in {:?}",
        started.elapsed()
    );
    let statuses = load(mesh.entry(), "/sleep/400", 4, 2).await;
    assert!(
        statuses.iter().all(|s| *s == 504),
        "new timeout in force: {statuses:?}"
    );

    // A bad file: refused with file:line for each of its mistakes, nothing pushed, the
    // old configuration serves.
    let received = logs.count(&["configuration received"]);
    mesh.control_plane.write_config("broken.yaml", "apiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: shop}\nspec:\n  service: backend\n  serviceAccount: backend\n  adress: 127.0.0.1:1\n---\napiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  action: MAYBE\n");
    let refusal = mesh
        .control_plane
        .process
        .logs
        .wait_for(
            &["configuration refused", "broken.yaml:7"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(refusal.contains("adress"), "{refusal}");
    assert!(
        refusal.contains("broken.yaml:13: unknown variant `MAYBE`"),
        "every mistake is named, not only the first: {refusal}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        logs.count(&["configuration received"]),
        received,
        "a refused configuration was pushed"
    );
    let statuses = load(mesh.entry(), "/", 20, 2).await;
    assert!(statuses.iter().all(|s| *s == 200));

    // Counted, and its repair (the file removed) is said too.
    let (_, metrics) = tessera_tests::http_get(
        tessera_tests::local(mesh.control_plane.admin_port),
        "/metrics",
    )
    .await
    .unwrap();
    let refusals = metrics
        .lines()
        .find_map(|line| line.strip_prefix("tessera_config_refusals_total "))
        .and_then(|value| value.trim().parse::<f64>().ok());
    assert!(refusals.is_some_and(|n| n >= 1.0), "{metrics}");
    std::fs::remove_file(mesh.control_plane.config_dir().join("broken.yaml")).unwrap();
    mesh.control_plane
        .process
        .logs
        .wait_for(&["configuration accepted"], Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_outage_loses_no_request() {
    let backend = HttpBackend::start("steady").await;
    let mut mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let entry = mesh.entry();
    let traffic = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(14);
        let mut statuses = Vec::new();
        while Instant::now() < deadline {
            statuses.extend(load(entry, "/", 40, 2).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        statuses
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    mesh.control_plane.kill();
    tokio::time::sleep(Duration::from_secs(10)).await;
    mesh.control_plane.restart().await;
    let statuses = traffic.await.unwrap();
    let failed = statuses.iter().filter(|s| **s != 200).count();
    println!(
        "{} requests across a 10 s control-plane outage, {failed} failed",
        statuses.len()
    );
    assert_eq!(failed, 0);
    assert!(statuses.len() > 500);
    // The proxy noticed the outage and came back to the restarted control plane.
    let logs = &mesh.client.process.logs;
    assert!(logs.count(&["discovery stream lost"]) >= 1);
    logs.wait_for(
        &["configuration received", "version"],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(
        tessera_tests::eventually(Duration::from_secs(10), || logs
            .count(&["configuration received"])
            >= 2)
        .await,
        "no snapshot after the restart"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_plane_refuses_large_requests() {
    tessera_tests::init();
    let control_plane = tessera_tests::ControlPlane::start("1h", "").await;
    // Within the limit: read, then refused for what it says. Past it: refused before it
    // is buffered whole. (The token is not one: only its size matters here.)
    for (token_len, too_large) in [(60 * 1024, false), (100 * 1024, true)] {
        let status = tessera_tests::grpc::certify(
            &control_plane.address(),
            &control_plane.trust_bundle_file(),
            Vec::new(),
            &"t".repeat(token_len),
        )
        .await
        .unwrap_err();
        assert_eq!(
            status.code() == tonic::Code::OutOfRange && status.message().contains("too large"),
            too_large,
            "{token_len} bytes: {status:?}"
        );
    }
}

/// `tessera check config` lints a directory offline as the control plane would: every
/// problem on a line of its own, exit 1; the shipped example passes.
#[test]
fn check_config_lists_every_problem_offline() {
    let check = |dir: &std::path::Path| {
        let output = std::process::Command::new(tessera_tests::binary("tessera"))
            .args(["check", "config"])
            .arg(dir)
            .output()
            .expect("run tessera check config");
        let report = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.code(), report)
    };
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/mesh");
    let (code, report) = check(&example);
    assert_eq!(code, Some(0), "{report}");
    assert!(report.starts_with('✔'), "{report}");

    let dir = tessera_tests::TempDir::new("check-config");
    std::fs::copy(
        example.join("services.yaml"),
        dir.path().join("services.yaml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "apiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  action: MAYBE\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("workload.yaml"),
        "apiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: shop}\nspec: {service: nowhere, serviceAccount: w, address: '127.0.0.1:9'}\n",
    )
    .unwrap();
    let (code, report) = check(dir.path());
    assert_eq!(code, Some(1), "{report}");
    let problems: Vec<&str> = report.lines().filter(|l| l.starts_with('×')).collect();
    assert_eq!(problems.len(), 2, "{report}");
    assert!(
        problems[0].contains("policy.yaml:5: unknown variant `MAYBE`"),
        "{report}"
    );
    assert!(
        problems[1].contains("workload.yaml:2: workload names service nowhere.shop"),
        "{report}"
    );
}
