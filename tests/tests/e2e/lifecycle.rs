//! SIGTERM under load: the proxy turns not-ready, takes no new connection, and every
//! request accepted before the signal completes.

use std::time::{Duration, Instant};

use http::StatusCode;
use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{Http1Client, L7Mesh};

/// Starts `n` slow requests through the mesh; returns their handles.
async fn slow_requests(
    entry: std::net::SocketAddr,
    n: usize,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<StatusCode>>> {
    let mut handles = Vec::new();
    for _ in 0..n {
        let mut client = Http1Client::connect(entry).await.unwrap();
        handles.push(tokio::spawn(async move {
            Ok(client.get("/sleep/800").await?.status)
        }));
    }
    handles
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests() {
    let backend = HttpBackend::start("draining").await;
    let mut mesh = L7Mesh::start(&[backend.address], "http", None).await;

    // The outbound proxy drains.
    let in_flight = slow_requests(mesh.entry(), 8).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    mesh.client.process.terminate();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = mesh.client.admin("/ready").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"));
    assert!(
        tokio::net::TcpStream::connect(mesh.entry()).await.is_err(),
        "new connections still accepted"
    );
    for request in in_flight {
        assert_eq!(
            request.await.unwrap().unwrap(),
            StatusCode::OK,
            "an accepted request failed during drain"
        );
    }
    let exited = mesh
        .client
        .process
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("proxy exits once drained");
    assert!(exited.success());
    println!(
        "outbound proxy drained and exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    mesh.client
        .process
        .logs
        .wait_for(
            &["drained", "\"connections_left\":0"],
            Duration::from_secs(2),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_on_the_serving_proxy_completes_its_streams() {
    let backend = HttpBackend::start("draining").await;
    let mut mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let in_flight = slow_requests(mesh.entry(), 8).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    mesh.servers[0].process.terminate();
    for request in in_flight {
        assert_eq!(
            request.await.unwrap().unwrap(),
            StatusCode::OK,
            "an accepted request failed during drain"
        );
    }
    let exited = mesh.servers[0]
        .process
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("proxy exits once drained");
    assert!(exited.success());
}
