//! Configuration from the control plane: each proxy holds what it uses — its
//! namespace's policies and the services it calls — changes reach proxies within a
//! second and are acknowledged, bad files are refused with file and line while the last
//! good configuration keeps serving, a resource too large for proxies is refused before
//! it reaches them, and a control-plane outage costs no request.

use std::time::{Duration, Instant};

use tessera_mesh::discovery::MAX_RESOURCE_BYTES;
use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::{L7Mesh, load, service_config};

/// A RequestAuthentication in `namespace` selecting no workload, whose inline key set
/// is padded to about `size` bytes: a configuration of that size that changes nothing
/// for the traffic under test.
fn padded_config(namespace: &str, size: usize) -> String {
    let padding = "k".repeat(size);
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: padded, namespace: {namespace}}}\nspec:\n  selector: {{matchLabels: {{app: nothing}}}}\n  jwtRules:\n  - issuer: https://issuer.example\n    jwks: '{{\"keys\": [], \"padding\": \"{padding}\"}}'\n"
    )
}

/// The names of the request authentications a proxy holds, from its `/config`.
async fn request_authentications(proxy: &tessera_tests::Proxy) -> Vec<String> {
    let (_, config) = proxy.admin("/config").await.unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["discovery"]["requestAuthentications"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{}/{}",
                p["namespace"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn large_configurations_reach_proxies_and_too_large_ones_are_refused() {
    let backend = HttpBackend::start("v1").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let control_plane = &mesh.control_plane;
    let proxies = mesh.servers.len() + 1;

    // 6 MiB in the proxies' namespace: more than gRPC's default 4 MiB message, within
    // the limit: it arrives. The same in another namespace never reaches them.
    // One file at a time: two writes may be loaded as one generation or as two.
    let before = control_plane.generation().await;
    control_plane.write_config("elsewhere.yaml", &padded_config("elsewhere", 6 << 20));
    let elsewhere = control_plane
        .wait_in_force(before, proxies, Duration::from_secs(30))
        .await
        .unwrap();
    control_plane.write_config("padded.yaml", &padded_config("shop", 6 << 20));
    let in_force = control_plane
        .wait_in_force(elsewhere, proxies, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(request_authentications(&mesh.client).await, ["shop/padded"]);

    // Over the limit: refused where the operator looks, never sent.
    control_plane.write_config(
        "padded.yaml",
        &padded_config("shop", MAX_RESOURCE_BYTES + (1 << 20)),
    );
    let refusal = control_plane
        .process
        .logs
        .wait_for(
            &["configuration refused", "the policies of namespace shop"],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(
        refusal.contains(&format!("over the {MAX_RESOURCE_BYTES} proxies accept")),
        "{refusal}"
    );
    println!("{refusal}");

    // The proxy kept its configuration and its stream, and serves.
    assert_eq!(control_plane.generation().await, in_force);
    let proxy_logs = &mesh.client.process.logs;
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

/// A proxy holds its namespace's policies and the services it calls, not the mesh:
/// services it does not call and another namespace's policies never reach it.
#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_holds_only_what_it_uses() {
    let backend = HttpBackend::start("v1").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let mut others = String::new();
    for i in 0..50 {
        others.push_str(&format!(
            "---\napiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: other-{i}, namespace: shop}}\nspec: {{ports: [{{port: 8080, protocol: http}}]}}\n"
        ));
    }
    others.push_str(&format!("---\n{}", padded_config("billing", 100)));
    mesh.apply("others.yaml", &others).await;
    let (_, config) = mesh.client.admin("/config").await.unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let services: Vec<&str> = config["discovery"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(services, ["backend"], "{config:#}");
    assert!(request_authentications(&mesh.client).await.is_empty());
    // A workload proxy calls nothing: it holds no service at all.
    let (_, config) = mesh.servers[0].admin("/config").await.unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["discovery"]["services"],
        serde_json::json!([]),
        "{config:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_propagate_and_bad_files_are_refused() {
    let backend = HttpBackend::start("v1").await;
    let mesh = L7Mesh::start(&[backend.address], "http", None).await;
    let control_plane = &mesh.control_plane;
    let proxies = mesh.servers.len() + 1;

    // A good change (a route timeout) is in force on every proxy within a second.
    let started = Instant::now();
    let before = control_plane.generation().await;
    let ports = [mesh.servers[0].inbound_port.unwrap()];
    control_plane.write_config(
        "backend.yaml",
        &service_config("http", &ports, Some("  timeout: 150ms\n")),
    );
    let in_force = control_plane
        .wait_in_force(before, proxies, Duration::from_secs(1))
        .await
        .expect("the change is in force within a second");
    println!(
        "configuration change in force on every proxy in {:?}",
        started.elapsed()
    );
    let statuses = load(mesh.entry(), "/sleep/400", 4, 2).await;
    assert!(
        statuses.iter().all(|s| *s == 504),
        "new timeout in force: {statuses:?}"
    );

    // A bad file: refused with file:line for each of its mistakes, nothing pushed, the
    // old configuration serves.
    control_plane.write_config("broken.yaml", "apiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: shop}\nspec:\n  service: backend\n  serviceAccount: backend\n  adress: 127.0.0.1:1\n---\napiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  action: MAYBE\n");
    let refusal = control_plane
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
    assert_eq!(
        control_plane.generation().await,
        in_force,
        "a refused configuration was published"
    );
    let statuses = load(mesh.entry(), "/", 20, 2).await;
    assert!(statuses.iter().all(|s| *s == 200));

    // Counted, and its repair (the file removed) is said too.
    let (_, metrics) =
        tessera_tests::http_get(tessera_tests::local(control_plane.admin_port), "/metrics")
            .await
            .unwrap();
    let refusals = metrics
        .lines()
        .find_map(|line| line.strip_prefix("tessera_config_refusals_total "))
        .and_then(|value| value.trim().parse::<f64>().ok());
    assert!(refusals.is_some_and(|n| n >= 1.0), "{metrics}");
    std::fs::remove_file(control_plane.config_dir().join("broken.yaml")).unwrap();
    control_plane
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
    // The proxies noticed the outage and came back to the restarted control plane.
    let logs = &mesh.client.process.logs;
    assert!(logs.count(&["discovery stream lost"]) >= 1);
    mesh.control_plane
        .wait_in_force(0, mesh.servers.len() + 1, Duration::from_secs(10))
        .await
        .expect("every proxy back on the restarted control plane");
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
    // The same limit on a discovery request: ~60 KiB of names is answered (each one
    // absent), ~100 KiB is refused before it is buffered whole.
    let workload = format!("spiffe://{}/ns/shop/sa/web", tessera_tests::TRUST_DOMAIN);
    for (names, too_large) in [(440, false), (730, true)] {
        let request = tessera_proto::api::discovery::DiscoveryRequest {
            subscribe: (0..names)
                .map(|i| format!("service/s{i:0>61}.{}", "n".repeat(63)))
                .collect(),
            ..Default::default()
        };
        let bytes = prost::Message::encoded_len(&request);
        let answer = tessera_tests::grpc::discover_once(&control_plane, &workload, request).await;
        match answer {
            Ok(response) if !too_large => assert!(!response.absent.is_empty(), "{response:?}"),
            Err(status) if too_large => assert!(
                status.code() == tonic::Code::OutOfRange && status.message().contains("too large"),
                "{bytes} bytes: {status:?}"
            ),
            other => panic!("{bytes} bytes, too large: {too_large}: {other:?}"),
        }
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
