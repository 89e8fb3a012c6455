//! Discovery under churn: a proxy follows the services it uses as they change. It never
//! sends to an endpoint removed more than a second ago, and a service deleted and
//! created again is followed — with a client on kept-alive connections throughout, so
//! pooled connections to a removed endpoint are no way around it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{Http1Client, L7Mesh, load, service_config};

/// Sends requests through `entry` on two kept-alive connections until `stop`; returns
/// every status (0: a transport error).
fn traffic(
    entry: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let mut statuses = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            statuses.extend(load(entry, "/", 20, 2).await);
        }
        statuses
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_endpoint_gets_no_request_a_second_later() {
    let backends = [
        HttpBackend::start("b0").await,
        HttpBackend::start("b1").await,
        HttpBackend::start("b2").await,
        HttpBackend::start("b3").await,
    ];
    let apps: Vec<_> = backends.iter().map(|b| b.address).collect();
    let mesh = L7Mesh::start(&apps, "http", None).await;
    let ports: Vec<u16> = mesh
        .servers
        .iter()
        .map(|s| s.inbound_port.unwrap())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = traffic(mesh.entry(), stop.clone());

    // Each workload in turn leaves the service for two seconds and comes back.
    for round in 0..backends.len() * 2 {
        let removed = round % backends.len();
        let before = backends[removed].requests();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            backends[removed].requests() > before,
            "round {round}: {} gets no traffic while in the service",
            backends[removed].name
        );
        let staying: Vec<u16> = (0..ports.len())
            .filter(|i| *i != removed)
            .map(|i| ports[i])
            .collect();
        let removed_at = Instant::now();
        mesh.control_plane
            .write_config("backend.yaml", &service_config("http", &staying, None));
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(removed_at.elapsed())).await;
        let after_a_second = backends[removed].requests();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            backends[removed].requests(),
            after_a_second,
            "round {round}: {} was sent requests more than a second after it was removed",
            backends[removed].name
        );
        mesh.control_plane
            .write_config("backend.yaml", &service_config("http", &ports, None));
    }
    stop.store(true, Ordering::Relaxed);
    let statuses = sent.await.unwrap();
    let failed = statuses.iter().filter(|s| **s != 200).count();
    println!(
        "{} requests across {} endpoint removals, {failed} failed",
        statuses.len(),
        backends.len() * 2
    );
    assert_eq!(failed, 0, "removing an endpoint fails no request");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_and_recreated_service_is_followed() {
    let first = HttpBackend::start("first").await;
    let second = HttpBackend::start("second").await;
    let mesh = L7Mesh::start(&[first.address], "http", None).await;
    let control_plane = &mesh.control_plane;
    let mut client = Http1Client::connect(mesh.entry()).await.unwrap();
    assert_eq!(client.get("/").await.unwrap().body, "first");

    // Deleted: the proxy learns it within a second and stops sending.
    let before = control_plane.generation().await;
    std::fs::remove_file(control_plane.config_dir().join("backend.yaml")).unwrap();
    control_plane
        .wait_in_force(before, 2, Duration::from_secs(1))
        .await
        .expect("the deletion is in force within a second");
    let deleted = first.requests();
    let statuses = load(mesh.entry(), "/", 10, 2).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    assert_eq!(first.requests(), deleted);

    // Created again, with another workload: followed, on the connection kept open.
    let port = tessera_tests::free_port();
    let server = control_plane.workload_proxy("backend", second.address, port);
    server.wait_ready(Duration::from_secs(20)).await.unwrap();
    let before = control_plane.generation().await;
    control_plane.write_config("backend.yaml", &service_config("http", &[port], None));
    control_plane
        .wait_in_force(before, 3, Duration::from_secs(1))
        .await
        .expect("the new service is in force within a second");
    let answer = client.get("/").await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "second");
    let statuses = load(mesh.entry(), "/", 20, 2).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(first.requests(), deleted, "the old workload gets nothing");
}
