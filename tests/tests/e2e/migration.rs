//! Migrating to zero trust: PERMISSIVE accepts plaintext and mTLS on one port, the
//! migration report names who still sends plaintext, and flipping to STRICT under load
//! refuses them without dropping a single mTLS request.

use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{Http1Client, L7Mesh, load, resource};
use tessera_tests::{binary, spiffe};

fn peer_authentication(mode: &str) -> String {
    resource(
        "PeerAuthentication",
        "backend",
        &format!("  selector: {{serviceAccount: backend}}\n  mtls: {{mode: {mode}}}\n"),
    )
}

/// `tessera check migration` of one proxy: whether it exited 0, and its report.
fn migration_report(admin_port: u16) -> (bool, String) {
    let output = Command::new(binary("tessera"))
        .args([
            "check",
            "migration",
            "--proxy",
            // A host name, as an operator types it.
            &format!("localhost:{admin_port}"),
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    // Exit status 1 is a verdict (a port would break), anything else a failure.
    assert!(
        matches!(output.status.code(), Some(0 | 1)),
        "{output:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), report)
}

#[tokio::test(flavor = "multi_thread")]
async fn permissive_to_strict_under_load() {
    let backend = HttpBackend::start("legacy").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    mesh.apply("peer.yaml", &peer_authentication("PERMISSIVE"))
        .await;
    let server = &mesh.servers[0];

    // A caller outside the mesh, straight to the workload's port, in plaintext.
    let mut plaintext = Http1Client::connect(server.inbound()).await.unwrap();
    let answer = plaintext.get("/").await.unwrap();
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "PERMISSIVE accepts plaintext"
    );

    // A meshed caller keeps calling through its proxy the whole time.
    let entry = mesh.entry();
    let meshed = tokio::spawn(async move {
        let mut statuses = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(4);
        while Instant::now() < deadline {
            statuses.extend(load(entry, "/", 20, 2).await);
        }
        statuses
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (passed, report) = migration_report(server.admin_port);
    println!("{report}");
    assert!(
        !passed,
        "a port that would break must fail the check (a rollout gate)"
    );
    assert!(report.contains("PERMISSIVE"), "{report}");
    assert!(
        report.contains(&spiffe("client")),
        "mTLS caller listed: {report}"
    );
    assert!(
        report.contains("PLAINTEXT  127.0.0.1"),
        "plaintext caller named: {report}"
    );
    assert!(
        report.contains("would BREAK plaintext callers: 127.0.0.1"),
        "{report}"
    );

    mesh.apply("peer.yaml", &peer_authentication("STRICT"))
        .await;
    let refused = match Http1Client::connect(server.inbound()).await {
        Ok(mut client) => client.get("/").await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "plaintext still accepted under STRICT");
    // Nor does a plaintext connection opened before the switch get another request in.
    if let Ok(answer) = plaintext.get("/").await {
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        server
            .process
            .logs
            .wait_for(
                &["request refused", "plaintext on a STRICT mTLS port"],
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
    server
        .process
        .logs
        .wait_for(
            &["inbound connection refused", "STRICT", "shop/backend"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();

    let statuses = meshed.await.unwrap();
    let failed = statuses.iter().filter(|s| **s != 200).count();
    println!(
        "{} meshed requests across the switch, {failed} failed",
        statuses.len()
    );
    assert_eq!(
        failed, 0,
        "the mTLS caller lost requests when the port went STRICT"
    );
    assert!(statuses.len() > 100);
    let (passed, report) = migration_report(server.admin_port);
    assert!(report.contains("— STRICT (by shop/backend)"), "{report}");
    assert!(passed, "nothing left to break: {report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plaintext_http_1_0_caller_without_host_reaches_the_app_with_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = HttpBackend::start("old-client").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    mesh.apply("peer.yaml", &peer_authentication("PERMISSIVE"))
        .await;
    let mut caller = tokio::net::TcpStream::connect(mesh.servers[0].inbound())
        .await
        .unwrap();
    caller.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), caller.read_to_end(&mut answer))
        .await
        .expect("an HTTP/1.0 answer ends with the connection")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.0 200"), "{answer}");
    // HTTP/1.1 to the application needs a Host: the application's own address.
    let expected = format!("x-seen-host: {}", backend.address);
    assert!(answer.contains(&expected), "{answer}");
}
