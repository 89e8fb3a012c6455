//! The identity API refuses every credential or CSR it must, with a clear status for the
//! caller and a log line on the control plane, and issues nothing.

use std::time::Duration;

use tessera_tests::certs::csr;
use tessera_tests::*;
use tonic::Code;

async fn certify(
    control_plane: &ControlPlane,
    csr_der: Vec<u8>,
    token: &str,
) -> Result<(), tonic::Status> {
    tessera_tests::grpc::certify(
        &control_plane.address(),
        &control_plane.trust_bundle_file(),
        csr_der,
        token,
    )
    .await
    .map(|_| ())
}

/// Asserts a refusal with `code`, a log line naming `reason`, and no issuance.
async fn assert_refused(
    control_plane: &ControlPlane,
    result: Result<(), tonic::Status>,
    code: Code,
    reason: &str,
    detail: &str,
) {
    let status = result.expect_err("request must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    let logs = &control_plane.process.logs;
    let line = logs
        .wait_for(
            &[
                "certificate refused",
                &format!("reason=\"{reason}\""),
                detail,
            ],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(line.contains("caller=127.0.0.1:"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_join_tokens_are_refused() {
    init();
    let control_plane = ControlPlane::start("1h", "").await;
    let web = spiffe("web");

    // Sanity: the same request with a good token succeeds, so the refusals below are
    // about the token alone.
    certify(
        &control_plane,
        csr(&[&web], false),
        &control_plane.token("web", "10m"),
    )
    .await
    .expect("good token accepted");

    let expired = control_plane.token("web", "1s");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let result = certify(&control_plane, csr(&[&web], false), &expired).await;
    assert_refused(
        &control_plane,
        result,
        Code::Unauthenticated,
        "token",
        "join token expired at",
    )
    .await;

    let good = control_plane.token("web", "10m");
    let (head, mac) = good.rsplit_once('.').unwrap();
    let mut payload: Vec<u8> = head.bytes().collect();
    let last = payload.len() - 1;
    payload[last] = if payload[last] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{}.{mac}", String::from_utf8(payload).unwrap());
    let result = certify(&control_plane, csr(&[&web], false), &tampered).await;
    assert_refused(
        &control_plane,
        result,
        Code::Unauthenticated,
        "token",
        "signature does not verify",
    )
    .await;

    let other_mesh = ControlPlane::start("1h", "").await;
    let foreign = other_mesh.token("web", "10m");
    let before = control_plane
        .process
        .logs
        .count(&["signature does not verify"]);
    let result = certify(&control_plane, csr(&[&web], false), &foreign).await;
    assert_eq!(result.unwrap_err().code(), Code::Unauthenticated);
    assert!(
        eventually(Duration::from_secs(5), || control_plane
            .process
            .logs
            .count(&["signature does not verify"])
            > before)
        .await
    );

    let result = certify(&control_plane, csr(&[&web], false), "").await;
    assert_refused(
        &control_plane,
        result,
        Code::Unauthenticated,
        "unauthenticated",
        "no join token",
    )
    .await;

    assert_eq!(
        control_plane.process.logs.count(&["certificate issued"]),
        1,
        "only the sanity request was issued"
    );
    for token in [&expired, &tampered, &foreign, &good] {
        assert!(
            control_plane
                .process
                .logs
                .lines()
                .iter()
                .all(|l| !l.contains(token.as_str())),
            "token logged"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_join_token_is_single_use_unless_reusable() {
    init();
    let mut control_plane = ControlPlane::start("1h", "").await;
    let web = spiffe("web");

    let once = control_plane.token("web", "10m");
    certify(&control_plane, csr(&[&web], false), &once)
        .await
        .expect("first use accepted");
    let result = certify(&control_plane, csr(&[&web], false), &once).await;
    assert_refused(
        &control_plane,
        result,
        Code::Unauthenticated,
        "token",
        "token already used",
    )
    .await;

    // A request refused for its CSR does not use the token up.
    let spare = control_plane.token("web", "10m");
    let result = certify(&control_plane, csr(&[&spiffe("db")], false), &spare).await;
    assert_eq!(result.unwrap_err().code(), Code::PermissionDenied);
    certify(&control_plane, csr(&[&web], false), &spare)
        .await
        .expect("a token refused for its CSR is still good");

    let fleet = control_plane.reusable_token("web", "10m");
    for n in 0..3 {
        certify(&control_plane, csr(&[&web], false), &fleet)
            .await
            .unwrap_or_else(|status| panic!("reusable token, use {n}: {status:?}"));
    }
    assert!(
        eventually(Duration::from_secs(5), || control_plane
            .process
            .logs
            .count(&["certificate issued"])
            == 5)
        .await,
        "issued: {}",
        control_plane.process.logs.count(&["certificate issued"])
    );
    for token in [&once, &spare, &fleet] {
        assert_eq!(
            control_plane.process.logs.count(&[token.as_str()]),
            0,
            "token logged"
        );
    }

    // The control plane remembers consumed tokens across a restart.
    control_plane.restart().await;
    let result = certify(&control_plane, csr(&[&web], false), &once).await;
    assert_refused(
        &control_plane,
        result,
        Code::Unauthenticated,
        "token",
        "token already used",
    )
    .await;
    certify(&control_plane, csr(&[&web], false), &fleet)
        .await
        .expect("a reusable token survives a restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn csrs_asking_for_more_than_the_caller_is_are_refused() {
    init();
    let control_plane = ControlPlane::start("1h", "").await;
    let web = spiffe("web");
    let token = control_plane.token("web", "10m");

    let result = certify(&control_plane, csr(&[&spiffe("db")], false), &token).await;
    assert_refused(
        &control_plane,
        result,
        Code::PermissionDenied,
        "csr",
        "but the caller is authenticated as",
    )
    .await;

    let result = certify(&control_plane, csr(&[&web], true), &token).await;
    assert_refused(
        &control_plane,
        result,
        Code::InvalidArgument,
        "csr",
        "asks for a CA",
    )
    .await;

    let result = certify(&control_plane, csr(&[&web, &spiffe("db")], false), &token).await;
    assert_refused(
        &control_plane,
        result,
        Code::InvalidArgument,
        "csr",
        "2 URI",
    )
    .await;

    // A P-384 key signed with ecdsa-with-SHA256 (openssl-made, for …/sa/api): the key
    // is checked, not the signature algorithm.
    let p384 = include_bytes!("../../../control-plane/src/testdata/csr/p384-sha256.der");
    let result = certify(
        &control_plane,
        p384.to_vec(),
        &control_plane.token("api", "10m"),
    )
    .await;
    assert_refused(
        &control_plane,
        result,
        Code::InvalidArgument,
        "csr",
        "secp384r1",
    )
    .await;

    let result = certify(&control_plane, b"not a csr".to_vec(), &token).await;
    assert_refused(
        &control_plane,
        result,
        Code::InvalidArgument,
        "csr",
        "cannot be parsed",
    )
    .await;

    assert_eq!(control_plane.process.logs.count(&["certificate issued"]), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_with_a_bad_token_stays_unready_and_passes_nothing() {
    init();
    let control_plane = ControlPlane::start("1h", "").await;
    let echo = EchoServer::start().await;
    let good = control_plane.token("server", "10m");
    let tampered = good.replacen("tessera-join.v1.", "tessera-join.v1.x", 1);
    let proxy = Proxy::start(
        &control_plane.address(),
        &control_plane.trust_bundle_file(),
        "server",
        &tampered,
        Some(echo.address),
        &[],
    );
    proxy
        .process
        .logs
        .wait_for(
            &["certificate renewal failed", "Unauthenticated"],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let (status, _) = proxy.admin("/ready").await.unwrap();
    assert_eq!(status, 503);
    let _ = echo_roundtrip(proxy.inbound(), b"must not arrive").await;
    proxy
        .process
        .logs
        .wait_for(
            &["inbound connection refused", "NoLocalCertificate"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(echo.received(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kubernetes_token_is_sent_but_refused_by_a_local_mode_control_plane() {
    init();
    let control_plane = ControlPlane::start("1h", "").await;
    let dir = TempDir::new("k8s-token");
    let token_file = dir.path().join("token");
    let token = "eyJhbGciOiJSUzI1NiJ9.projected-sa-token-8c21.signature";
    std::fs::write(&token_file, token).unwrap();
    // Configured the way injection configures a sidecar: YAML in the environment.
    let config = format!(
        "identity:\n  namespace: shop\n  serviceAccount: web\n  serviceAccountTokenFile: {}\ncontrolPlane:\n  address: {}\n  trustBundleFile: {}\nadmin: 127.0.0.1:{}\n",
        token_file.display(),
        control_plane.address(),
        control_plane.trust_bundle_file().display(),
        free_port(),
    );
    let proxy = Process::spawn(
        "k8s-proxy",
        std::process::Command::new(binary("tessera-proxy"))
            .args(["--log-format", "json", "run"])
            .env("TESSERA_PROXY_CONFIG", config)
            .env_remove("TESSERA_JOIN_TOKEN"),
    );
    proxy
        .logs
        .wait_for(
            &["certificate renewal failed", "TokenReview"],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    control_plane
        .process
        .logs
        .wait_for(
            &["certificate refused", "reason=\"token\"", "local mode"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(control_plane.process.logs.count(&["certificate issued"]), 0);
    for logs in [&proxy.logs, &control_plane.process.logs] {
        assert_eq!(logs.count(&["projected-sa-token"]), 0, "a token was logged");
    }
}
