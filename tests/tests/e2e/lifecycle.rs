//! Start and stop. SIGTERM under load: the proxy turns not-ready, takes no new
//! connection, and every request accepted before the signal completes. A process that
//! cannot start says why.

use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{Http1Client, L7Mesh};
use tessera_tests::{TempDir, binary};

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

/// A proxy configuration reading its trust bundle from `bundle`.
fn proxy_config(bundle: &std::path::Path) -> String {
    format!(
        "identity:\n  namespace: shop\n  serviceAccount: web\ncontrolPlane:\n  address: 127.0.0.1:1\n  trustBundleFile: {}\nadmin: 127.0.0.1:0\n",
        bundle.display()
    )
}

/// A process that cannot start says why on one line, each cause once, with no backtrace
/// (even with RUST_BACKTRACE set), and exits 1: a missing trust bundle is "cannot read
/// it", not "malformed PEM"; a proxy with no credential for its first certificate is a
/// configuration error, not an endless "renewal failed".
#[test]
fn a_process_that_cannot_start_says_why_on_one_line() {
    let dir = TempDir::new("unstartable");
    let missing = dir.path().join("root-cert.pem");
    let mut proxy = Command::new(binary("tessera-proxy"));
    proxy
        .arg("run")
        .env("TESSERA_PROXY_CONFIG", proxy_config(&missing))
        .env("TESSERA_JOIN_TOKEN", "unused");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, tessera_tests::certs::TestCa::root("mesh").pem()).unwrap();
    let mut no_token = Command::new(binary("tessera-proxy"));
    no_token
        .arg("run")
        .env("TESSERA_PROXY_CONFIG", proxy_config(&bundle))
        .env_remove("TESSERA_JOIN_TOKEN");
    let mut control_plane = Command::new(binary("tessera"));
    control_plane
        .arg("control-plane")
        .arg("--config")
        .arg(dir.path().join("no-such-directory"));
    let expected = [
        format!(
            "error: trust bundle {}: cannot read it: No such file or directory (os error 2)",
            missing.display()
        ),
        "error: no credential for the first certificate: set TESSERA_JOIN_TOKEN (a token from `tessera token create`), identity.joinTokenFile or identity.serviceAccountTokenFile".to_string(),
        format!(
            "error: {}: cannot read: No such file or directory (os error 2)",
            dir.path().join("no-such-directory").display()
        ),
    ];
    let commands = [proxy, no_token, control_plane];
    for (mut command, expected) in commands.into_iter().zip(expected) {
        let output = command.env("RUST_BACKTRACE", "1").output().expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim_end(), expected);
    }
}
