//! The README's first command works and shows verified identities.

use std::process::Command;

use tessera_tests::binary;

#[test]
fn demo_runs_and_shows_verified_identities() {
    let output = Command::new(binary("tessera"))
        .args(["demo", "--duration", "4s"])
        .output()
        .expect("run tessera demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "mTLS connections with spiffe://cluster.local/ns/shop/sa/frontend",
        "refused: plaintext",
        "refused: unexpected_identity",
        "denied by policy shop/no-cancel",
        "throttled with 429 rate-limited, Retry-After: 1  ✔",
        "(shop/refunds-opa: Rego in the proxy) refused ✔ (403 Forbidden)",
        "rego: shop/refunds-opa (data.shop.refunds.allow) denies — deny: refunds are issued by payments only",
        "denied by policy shop/refunds-opa",
        "throttled by shop/reports (reports-per-caller)",
        // Opaque TCP is tunnelled over the pooled connection: no handshake per call.
        "carried between the proxies over 1 mTLS connection(s)",
        "0 failed",
        "(capabilities: NET_ADMIN, NET_RAW)",
        "native sidecar tessera-proxy (restartPolicy Always, UID 1337",
        "readinessProbe of orders → :15020/app-health/orders/readyz",
        "injecting again changes nothing",
        // Discovery on demand: the services each proxy calls, its namespace's policies.
        "frontend  services: orders.shop, payments.shop ",
        "payments  services: none (it calls none) ",
        "in force on 4 of 4 proxies (each acknowledged it;",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains("inventory.shop") && !stdout.contains("billing/ledger-callers"),
        "a proxy holds what it does not use:\n{stdout}"
    );
    // Retries masked the flaky replica: it failed, callers saw no failure.
    let orders = stdout
        .lines()
        .find(|line| line.starts_with("Orders:"))
        .expect("orders summary");
    assert!(orders.contains(", 0 failed."), "{orders}");
    let flaky_failures: u64 = orders
        .split("failed ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("flaky failure count");
    assert!(
        flaky_failures > 0,
        "the flaky replica never failed: {orders}"
    );
    assert!(stdout.contains("retries to orders.shop"), "{stdout}");
    // The RED table covers the run: a rate, not "-".
    let red = stdout
        .lines()
        .find(|line| line.starts_with("orders.shop "))
        .expect("a RED row for orders");
    let rps = red.split_whitespace().nth(2).unwrap_or_default();
    assert!(rps.parse::<f64>().is_ok_and(|r| r > 0.0), "{red}");
    // The hint names this very binary, which `cargo run` does not put on PATH.
    let hint = binary("tessera");
    let hint = hint
        .strip_prefix(std::env::current_dir().unwrap())
        .unwrap_or(&hint);
    assert!(
        stdout.contains(&format!("While it runs: {} stat", hint.display())),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tessera_stat_reads_a_running_demo() {
    let demo = tessera_tests::Process::spawn(
        "demo",
        Command::new(binary("tessera")).args(["demo", "--duration", "12s"]),
    );
    let line = demo
        .logs
        .wait_for(
            &["While it runs: ", " stat --proxy"],
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap();
    let admins: Vec<String> = line
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|pair| pair[0] == "--proxy")
        .map(|pair| pair[1].to_string())
        .collect();
    assert_eq!(admins.len(), 4, "{line}");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    // The same proxies, found through the control plane's list of connected proxies.
    let via_control_plane = demo
        .logs
        .wait_for(
            &[
                "the proxies the control plane knows: ",
                " --control-plane-admin ",
            ],
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap();
    let control_plane_admin = via_control_plane
        .split_whitespace()
        .skip_while(|word| *word != "--control-plane-admin")
        .nth(1)
        .unwrap_or_else(|| panic!("{via_control_plane}"))
        .to_string();
    let mut args = vec!["stat".to_string()];
    for admin in &admins {
        args.extend(["--proxy".to_string(), admin.clone()]);
    }
    let output = Command::new(binary("tessera"))
        .args(&args)
        .args(["--window", "2s"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    println!("{table}");
    let orders = table
        .lines()
        .find(|l| l.starts_with("orders.shop "))
        .unwrap_or_else(|| panic!("{table}"));
    let rps: f64 = orders
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{orders}"));
    assert!(rps > 1.0, "{orders}");
    let output = Command::new(binary("tessera"))
        .args([
            "stat",
            "--control-plane-admin",
            &control_plane_admin,
            "--window",
            "2s",
        ])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{listed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let destinations = |table: &str| -> Vec<String> {
        table
            .lines()
            .skip(1)
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    assert_eq!(destinations(&listed), destinations(&table), "{listed}");
    // After the table: how far the newest configuration has reached (the demo's four
    // proxies, every one acknowledged it by now).
    let rollout = listed
        .lines()
        .find(|l| l.starts_with("configuration generation "))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        rollout.ends_with(" in force on 4 of 4 connected proxies"),
        "{listed}"
    );
    assert!(!listed.contains("behind:"), "{listed}");

    // Totals agree with the proxies' own /metrics, read right after.
    let output = Command::new(binary("tessera"))
        .args(&args)
        .args(["--window", "0s", "-o", "json"])
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let row = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["workload"] == "orders")
        .unwrap()
        .clone();
    let mut total = 0.0;
    for admin in &admins {
        let (_, metrics) = tessera_tests::http_get(admin.parse().unwrap(), "/metrics")
            .await
            .unwrap();
        total += metrics
            .lines()
            .filter(|l| {
                l.starts_with("tessera_requests_total{direction=\"inbound\"")
                    && l.contains("destination_workload=\"orders\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>();
    }
    let stat_total = row["requests"].as_u64().unwrap() as f64;
    println!("stat: {stat_total} requests, /metrics a moment later: {total}");
    assert!(
        stat_total <= total && stat_total >= total * 0.9,
        "stat {stat_total} vs metrics {total}"
    );
}

/// The trace links the demo printed: (what, trace id).
fn trace_links(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|line| {
            let (what, link) = line.trim().split_once(" http://")?;
            let id = link.split("/trace/").nth(1)?;
            Some((what.trim().to_string(), id.trim().to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_traces_into_a_named_jaeger_a_retried_and_a_denied_call() {
    let Some(jaeger) = tessera_tests::telemetry::Jaeger::start().await else {
        return;
    };
    let output = tokio::process::Command::new(binary("tessera"))
        .args(["demo", "--duration", "4s", "--jaeger"])
        .arg(jaeger.query.to_string())
        .arg("--jaeger-otlp")
        .arg(jaeger.otlp.to_string())
        .output()
        .await
        .expect("run tessera demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed:\n{stdout}");
    let links = trace_links(&stdout);
    let link = |what: &str| {
        links
            .iter()
            .find(|(w, _)| w.starts_with(what))
            .map(|(_, id)| id.clone())
            .unwrap_or_else(|| panic!("no link for {what}:\n{stdout}"))
    };
    // The retried call: the frontend proxy's two attempts, the first answered 503.
    let retried = jaeger.trace(&link("a retried call"), 4).await.unwrap();
    let attempts = retried.of("frontend.shop");
    assert!(attempts.len() >= 2, "{}", retried.summary());
    assert!(
        attempts.iter().any(|a| a
            .tag("http.response.status_code")
            .is_some_and(|t| t["value"] == 503 || t["value"] == "503")),
        "{}",
        retried.summary()
    );
    // The denied call reached the orders proxy, not the application.
    let denied = jaeger.trace(&link("the denied DELETE"), 2).await.unwrap();
    let server = denied.of("orders.shop");
    assert_eq!(server.len(), 1, "{}", denied.summary());
    assert_eq!(server[0].operation(), "DELETE");
    assert!(
        stdout.contains(&format!("http://{}/trace/", jaeger.query)),
        "{stdout}"
    );
}

#[test]
fn the_demo_starts_a_jaeger_from_path_or_says_how_to_get_one() {
    let run = |path: &str| {
        let output = Command::new(binary("tessera"))
            .args(["demo", "--duration", "3s"])
            .env("PATH", path)
            .output()
            .expect("run tessera demo");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "demo with PATH={path} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let without = run("/usr/bin:/bin");
    assert!(
        without.contains("Traces: no `jaeger` on PATH") && without.contains("--jaeger HOST:16686"),
        "{without}"
    );
    let Some(jaeger) = tessera_tests::telemetry::tool("jaeger") else {
        return;
    };
    let bin = jaeger.parent().unwrap().display().to_string();
    let with = run(&format!("{bin}:/usr/bin:/bin"));
    assert!(
        with.contains(&format!("(started from {}", jaeger.display())),
        "{with}"
    );
    assert_eq!(
        trace_links(&with).len(),
        2,
        "a retried and a denied call, each found in Jaeger:\n{with}"
    );
}
