//! Certificates rotate under load without a failed connection or a lost byte, and a
//! trust bundle with two roots joins workloads certified by either.

use std::time::{Duration, Instant};

use tessera_tests::certs::TestCa;
use tessera_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echo round trips on fresh connections until `deadline`; returns (ok, failed).
pub async fn churn(address: std::net::SocketAddr, deadline: Instant) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    while Instant::now() < deadline {
        let payload = random_payload(16 * 1024);
        match echo_roundtrip(address, &payload).await {
            Ok(echoed) if echoed == payload => ok += 1,
            other => {
                failed += 1;
                eprintln!("round trip failed: {:?}", other.map(|e| e.len()));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (ok, failed)
}

/// One connection kept open until `deadline`, a chunk every 100 ms, every echo checked.
pub async fn long_lived(address: std::net::SocketAddr, deadline: Instant) -> anyhow::Result<u64> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let mut carried = 0;
    while Instant::now() < deadline {
        let chunk = random_payload(4096);
        stream.write_all(&chunk).await?;
        let mut echoed = vec![0u8; chunk.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed)).await??;
        anyhow::ensure!(echoed == chunk, "echo differs after {carried} bytes");
        carried += chunk.len() as u64;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(carried)
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_rotate_under_load_without_loss() {
    init();
    let control_plane = ControlPlane::start("10s", "").await;
    let echo = EchoServer::start().await;
    let ProxyPair { server, client } =
        ProxyPair::start(&control_plane, echo.address, &["server"]).await;

    let deadline = Instant::now() + Duration::from_secs(40);
    let route = client.outbound(0);
    let workers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(churn(route, deadline)))
        .collect();
    let held = tokio::spawn(long_lived(route, deadline));
    let (mut ok, mut failed) = (0, 0);
    for worker in workers {
        let (o, f) = worker.await.unwrap();
        ok += o;
        failed += f;
    }
    let carried = held
        .await
        .unwrap()
        .expect("a connection open across renewals keeps working");

    let server_renewals = server.process.logs.count(&["certificate renewed"]);
    let client_renewals = client.process.logs.count(&["certificate renewed"]);
    println!(
        "{ok} round trips, {failed} failed, {carried} bytes on one long connection; renewals: server {server_renewals}, client {client_renewals}"
    );
    assert_eq!(failed, 0, "connections failed during rotation");
    assert!(ok > 100, "too little traffic to mean anything: {ok}");
    assert!(
        server_renewals >= 3 && client_renewals >= 3,
        "renewals: server {server_renewals}, client {client_renewals}"
    );
    // Renewals authenticated with the certificate being replaced, not the join token.
    assert!(
        control_plane
            .process
            .logs
            .count(&["certificate issued", "authenticated_by=Certificate"])
            >= 6
    );
}

/// Writes a plug-in CA directory: `signer` issues, `chain` leads to the root, `roots` are
/// trusted.
fn plugin_dir(
    control_plane_dir: &std::path::Path,
    signer: &TestCa,
    chain: &[&TestCa],
    roots: &[&TestCa],
) -> String {
    let dir = control_plane_dir.join("cacerts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), signer.pem()).unwrap();
    // Owner-only, as the control plane requires of a key.
    let key = dir.join("ca-key.pem");
    std::fs::write(&key, &signer.key_pem).unwrap();
    let owner_only = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&key, owner_only).unwrap();
    std::fs::write(
        dir.join("cert-chain.pem"),
        chain.iter().map(|c| c.pem()).collect::<String>(),
    )
    .unwrap();
    std::fs::write(
        dir.join("root-cert.pem"),
        roots.iter().map(|c| c.pem()).collect::<String>(),
    )
    .unwrap();
    format!(
        "  certificateAuthority:\n    pluginCertsDir: {}\n",
        dir.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_with_old_and_new_roots_joins_both() {
    init();
    let old_root = TestCa::root("old root");
    let new_root = TestCa::root("new root");
    let old_intermediate = old_root.intermediate("old intermediate");
    let new_intermediate = new_root.intermediate("new intermediate");
    let scratch = TempDir::new("roots");
    let dir = |name: &str| {
        let path = scratch.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    };
    let both = [&old_root, &new_root];
    let old_cp = ControlPlane::start(
        "1h",
        &plugin_dir(
            &dir("old"),
            &old_intermediate,
            &[&old_intermediate, &old_root],
            &both,
        ),
    )
    .await;
    let new_cp = ControlPlane::start(
        "1h",
        &plugin_dir(
            &dir("new"),
            &new_intermediate,
            &[&new_intermediate, &new_root],
            &both,
        ),
    )
    .await;
    let new_only_cp = ControlPlane::start(
        "1h",
        &plugin_dir(
            &dir("new-only"),
            &new_intermediate,
            &[&new_intermediate, &new_root],
            &[&new_root],
        ),
    )
    .await;

    let old_echo = EchoServer::start().await;
    let new_echo = EchoServer::start().await;
    let strict_echo = EchoServer::start().await;
    let new_side = new_cp.proxy("new-side", Some(new_echo.address), &[]);
    let new_only = new_only_cp.proxy("new-only", Some(strict_echo.address), &[]);
    let old_side = old_cp.proxy(
        "old-side",
        Some(old_echo.address),
        &[
            Upstream::fixed(new_side.inbound(), spiffe("new-side")),
            Upstream::fixed(new_only.inbound(), spiffe("new-only")),
        ],
    );
    for proxy in [&old_side, &new_side, &new_only] {
        proxy.wait_ready(Duration::from_secs(20)).await.unwrap();
    }
    let (_, certs) = old_side.admin("/certs").await.unwrap();
    assert!(
        certs.contains("\"chain_length\": 2") && certs.contains("\"trust_bundle_roots\": 2"),
        "{certs}"
    );

    // Old-root workload → new-root workload, both trusting both roots.
    let payload = random_payload(64 * 1024);
    assert!(
        echo_roundtrip(old_side.outbound(0), &payload)
            .await
            .unwrap()
            == payload
    );
    assert_eq!(new_echo.received(), payload.len() as u64);

    // A workload that trusts only the new root refuses the old-root one.
    let _ = echo_roundtrip(old_side.outbound(1), b"must not arrive").await;
    new_only
        .process
        .logs
        .wait_for(
            &["inbound connection refused", "UntrustedCertificate"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(strict_echo.received(), 0);

    // And the other direction: new-root client → old-root server.
    let reverse = new_cp.proxy(
        "new-client",
        None,
        &[Upstream::fixed(old_side.inbound(), spiffe("old-side"))],
    );
    reverse.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert!(echo_roundtrip(reverse.outbound(0), &payload).await.unwrap() == payload);
    assert_eq!(old_echo.received(), payload.len() as u64);
}
