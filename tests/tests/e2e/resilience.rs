//! The data path outlives the control plane: traffic keeps flowing on current
//! certificates while it is down, and proxies renew again once it is back.

use std::time::{Duration, Instant};

use tessera_tests::*;

use crate::rotation::churn;

#[tokio::test(flavor = "multi_thread")]
async fn traffic_survives_a_control_plane_restart() {
    init();
    let mut control_plane = ControlPlane::start("24s", "").await;
    let echo = EchoServer::start().await;
    let ProxyPair { server, client } =
        ProxyPair::start(&control_plane, echo.address, &["server"]).await;

    let traffic = tokio::spawn(churn(
        client.outbound(0),
        Instant::now() + Duration::from_secs(28),
    ));
    control_plane.kill();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let renewals_before = client.process.logs.count(&["certificate renewed"])
        + server.process.logs.count(&["certificate renewed"]);
    control_plane.restart().await;

    // Both proxies renew against the restarted control plane, authenticating with the
    // certificates they kept serving on.
    for proxy in [&client, &server] {
        assert!(
            eventually(Duration::from_secs(20), || proxy
                .process
                .logs
                .count(&["certificate renewed"])
                >= 1)
            .await,
            "no renewal after restart; log:\n{}",
            proxy.process.logs.lines().join("\n")
        );
    }
    let renewals_after = client.process.logs.count(&["certificate renewed"])
        + server.process.logs.count(&["certificate renewed"]);
    assert!(
        renewals_after > renewals_before,
        "renewals {renewals_before} → {renewals_after}"
    );
    assert!(
        control_plane
            .process
            .logs
            .count(&["certificate issued", "authenticated_by=Certificate"])
            >= 1
    );

    let (ok, failed) = traffic.await.unwrap();
    println!("{ok} round trips across the outage, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 50, "{ok}");
}
