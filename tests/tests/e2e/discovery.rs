//! Configuration from the control plane: changes reach proxies within a second, bad
//! files are refused with file and line while the last good configuration keeps serving,
//! and a control-plane outage costs no request.

use std::time::{Duration, Instant};

use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{L7Mesh, load, service_config};

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

    // A bad file: refused with file:line, nothing pushed, the old configuration serves.
    let received = logs.count(&["configuration received"]);
    mesh.control_plane.write_config("broken.yaml", "apiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: shop}\nspec:\n  service: backend\n  serviceAccount: backend\n  adress: 127.0.0.1:1\n");
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
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        logs.count(&["configuration received"]),
        received,
        "a refused configuration was pushed"
    );
    let statuses = load(mesh.entry(), "/", 20, 2).await;
    assert!(statuses.iter().all(|s| *s == 200));
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
