//! The admission webhook of a real control plane: AdmissionReviews over HTTPS, the
//! server certificate verified against the mesh root by the names Kubernetes dials, and
//! the JSONPatch, applied to the pod, giving exactly what `tessera inject` gives. And
//! the probes injection rewrites, performed by a real proxy on real applications.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tessera_control_plane::inject;
use tessera_tests::backend::health_proto::health_check_response::ServingStatus;
use tessera_tests::backend::{HealthService, start_grpc_with_health};
use tessera_tests::*;
use tokio_rustls::TlsConnector;

const SERVICE_NAME: &str = "tessera-control-plane.tessera-system.svc";

/// POSTs `body` to the webhook, verifying its certificate for `server_name` against the
/// trust bundle; returns (status, body).
async fn post(
    control_plane: &ControlPlane,
    server_name: &str,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut roots = RootCertStore::empty();
    let bundle = std::fs::read(control_plane.trust_bundle_file())?;
    for root in tessera_mesh::tls::certs_from_pem(&bundle)? {
        roots.add(root)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(tessera_mesh::tls::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(control_plane.webhook_address()).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(server_name.to_string())?, tcp)
        .await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = http::Request::post(path)
        .header(http::header::HOST, server_name)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response =
        tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await??;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, body))
}

fn admission_review(uid: &str, pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": { "kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1" }
        }
    }))
    .unwrap()
}

/// A pod as a ReplicaSet creates it: no name or namespace yet, probes on a named port.
fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "orders-5d8f7c9b6-",
            "labels": { "app": "orders" },
            "annotations": annotations
        },
        "spec": {
            "serviceAccountName": "orders",
            "initContainers": [{ "name": "migrate", "image": "example.com/orders:3" }],
            "containers": [{
                "name": "orders",
                "image": "example.com/orders:3",
                "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
                "livenessProbe": { "httpGet": { "path": "/healthz", "port": "http" }, "periodSeconds": 5 },
                "readinessProbe": { "httpGet": { "path": "/ready", "port": 8443, "scheme": "HTTPS" } }
            }],
            "volumes": [{ "name": "cache", "emptyDir": {} }],
            "restartPolicy": "Always"
        }
    })
}

async fn review(control_plane: &ControlPlane, uid: &str, pod: &Value) -> Value {
    let (status, body) = post(
        control_plane,
        SERVICE_NAME,
        "/inject",
        admission_review(uid, pod),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(review["response"]["uid"], uid);
    review["response"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_patch_injects_what_the_cli_injects() {
    init();
    let control_plane = ControlPlane::start("1h", "").await;
    let original = pod(json!({ "tessera.dev/exclude-outbound-ports": "5432" }));

    let response = review(&control_plane, "5a1f3c1e-0001", &original).await;
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("base64 patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = original.clone();
    json_patch::patch(&mut patched, &patch).unwrap();

    let mut expected = original.clone();
    let outcome = inject::inject_pod(&mut expected, &inject::Options::default()).unwrap();
    assert_eq!(outcome, inject::Outcome::Injected);
    assert_eq!(patched, expected);
    assert_eq!(
        patched["spec"]["initContainers"][1]["name"],
        "tessera-proxy"
    );
    assert_eq!(
        patched["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"],
        15020
    );

    let line = control_plane
        .process
        .logs
        .wait_for(
            &["admission review", "5a1f3c1e-0001"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    for expected in [
        "namespace=shop",
        "pod=orders-5d8f7c9b6-",
        "result=\"injected\"",
        "rewrote orders/livenessProbe (httpGet :http/healthz) → :15020/app-health/orders/livez",
        "left orders/readinessProbe (httpGet :8443/ready, HTTPS",
    ] {
        assert!(line.contains(expected), "{expected} not in {line}");
    }

    // An injected pod (a retried creation) and an opted-out pod get no patch.
    for (uid, pod) in [
        ("5a1f3c1e-0002", patched),
        (
            "5a1f3c1e-0003",
            pod(json!({ "tessera.dev/inject": "false" })),
        ),
    ] {
        let response = review(&control_plane, uid, &pod).await;
        assert_eq!(response["allowed"], true);
        assert!(response.get("patch").is_none(), "{response}");
    }
    let line = control_plane
        .process
        .logs
        .wait_for(
            &["admission review", "5a1f3c1e-0003"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(line.contains("opted out"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_refuses_what_it_must() {
    init();
    let control_plane = ControlPlane::start("1h", "").await;

    let invalid = pod(json!({ "tessera.dev/exclude-inbound-ports": "8080,metrics" }));
    let response = review(&control_plane, "5a1f3c1e-0004", &invalid).await;
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("tessera.dev/exclude-inbound-ports: \"8080,metrics\" is not valid"),
        "{message}"
    );
    assert!(response.get("patch").is_none());

    let (status, body) = post(
        &control_plane,
        "localhost",
        "/inject",
        b"{\"kind\":".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("not an AdmissionReview"), "{body}");

    let huge = vec![b' '; 4 * 1024 * 1024 + 1];
    let (status, _) = post(&control_plane, "localhost", "/inject", huge)
        .await
        .unwrap();
    assert_eq!(status, 413);

    let (status, _) = post(&control_plane, "localhost", "/other", Vec::new())
        .await
        .unwrap();
    assert_eq!(status, 404);

    // The certificate names the webhook's Service and loopback, nothing else.
    let error = post(&control_plane, "example.com", "/inject", Vec::new())
        .await
        .expect_err("a certificate for another name is refused");
    assert!(format!("{error:#}").contains("certificate"), "{error:#}");
}

/// gRPC and tcpSocket probes, rewritten by `tessera inject` (which says so on stderr)
/// and performed by a proxy running the configuration injection wrote: the admin port
/// answers 200 while the application's health service says SERVING and its port
/// accepts, and 503 once it does not.
#[tokio::test(flavor = "multi_thread")]
async fn rewritten_grpc_and_tcp_probes_are_performed_by_the_proxy() {
    init();
    let control_plane = ControlPlane::start("1h", "").await;
    let health = HealthService::default();
    health.set("", ServingStatus::Serving);
    health.set("orders.v1.Orders", ServingStatus::Serving);
    let (grpc, grpc_server) = start_grpc_with_health(health.clone()).await;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();

    let dir = TempDir::new("probed-pod");
    let pod_file = dir.path().join("pod.yaml");
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "orders" },
        "spec": { "containers": [{
            "name": "orders", "image": "example.com/orders:3",
            "livenessProbe": { "grpc": { "port": grpc.port() }, "timeoutSeconds": 2 },
            "readinessProbe": { "grpc": { "port": grpc.port(), "service": "orders.v1.Orders" } },
            "startupProbe": { "tcpSocket": { "port": tcp_port } }
        }] }
    });
    std::fs::write(&pod_file, pod.to_string()).unwrap();
    let output = std::process::Command::new(binary("tessera"))
        .args(["inject", "-f"])
        .arg(&pod_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let port = grpc.port();
    for line in [
        format!("rewrote orders/livenessProbe (grpc :{port}) → :15020/app-health/orders/livez"),
        format!(
            "rewrote orders/readinessProbe (grpc :{port} service \"orders.v1.Orders\") → :15020/app-health/orders/readyz"
        ),
        format!(
            "rewrote orders/startupProbe (tcpSocket :{tcp_port}) → :15020/app-health/orders/startupz"
        ),
    ] {
        assert!(stderr.contains(&line), "{line} not in:\n{stderr}");
    }

    // The proxy's configuration as injected, its probes as the kubelet now makes them.
    let injected: Value =
        serde_saphyr::from_str(&String::from_utf8(output.stdout).unwrap()).unwrap();
    let proxy_env = &injected["spec"]["initContainers"][1]["env"][2];
    assert_eq!(proxy_env["name"], "TESSERA_PROXY_CONFIG");
    let config: Value = serde_saphyr::from_str(proxy_env["value"].as_str().unwrap()).unwrap();
    let app_probes = serde_saphyr::to_string(&json!({ "appProbes": config["appProbes"] })).unwrap();
    let container = &injected["spec"]["containers"][0];
    let path = |probe: &str| {
        assert_eq!(container[probe]["httpGet"]["port"], 15020, "{container}");
        container[probe]["httpGet"]["path"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (livez, readyz, startupz) = (
        path("livenessProbe"),
        path("readinessProbe"),
        path("startupProbe"),
    );
    assert_eq!(container["livenessProbe"]["timeoutSeconds"], 2);

    let proxy = Proxy::launch(
        &control_plane.address(),
        &control_plane.trust_bundle_file(),
        "orders",
        &control_plane.token("orders", "10m"),
        None,
        &[],
        Extra {
            yaml: &app_probes,
            ..Extra::default()
        },
    );
    proxy.wait_ready(Duration::from_secs(20)).await.unwrap();
    let probe = |path: String| {
        let proxy = &proxy;
        async move { proxy.admin(&path).await.unwrap() }
    };
    assert_eq!(
        probe(livez.clone()).await,
        (200, "application SERVING\n".into())
    );
    assert_eq!(
        probe(readyz.clone()).await,
        (200, "application SERVING\n".into())
    );
    assert_eq!(
        probe(startupz.clone()).await,
        (200, "application accepts connections\n".into())
    );

    // The application reports a service unhealthy; then it stops altogether.
    health.set("orders.v1.Orders", ServingStatus::NotServing);
    assert_eq!(
        probe(readyz.clone()).await,
        (503, "application NOT_SERVING\n".into())
    );
    assert_eq!(probe(livez.clone()).await.0, 200);
    grpc_server.abort();
    let _ = grpc_server.await;
    drop(tcp);
    let (status, body) = probe(livez).await;
    assert_eq!(status, 503);
    assert!(
        body.starts_with("gRPC health check failed: cannot connect"),
        "{body}"
    );
    assert_eq!(
        probe(startupz).await,
        (503, "application unreachable: connection refused\n".into())
    );
}

/// The contract with `tessera-proxy init`: the injected init container's arguments are
/// ones it accepts, and its rules honour the exclusion annotations.
#[test]
fn the_proxy_init_accepts_the_injected_arguments() {
    let mut injected = pod(json!({
        "tessera.dev/exclude-inbound-ports": "9100",
        "tessera.dev/exclude-outbound-ports": "5432,6379",
        "tessera.dev/exclude-outbound-cidrs": "169.254.169.254/32,fd00::/8"
    }));
    inject::inject_pod(&mut injected, &inject::Options::default()).unwrap();
    let init = &injected["spec"]["initContainers"][0];
    assert_eq!(init["name"], "tessera-init");
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|arg| arg.as_str().unwrap())
        .collect();

    let output = std::process::Command::new(binary("tessera-proxy"))
        .args(&args)
        .arg("--dry-run")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{args:?}: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "15020",
        "9100",
        "5432",
        "6379",
        "169.254.169.254/32",
        "fd00::/8",
        "1337",
    ] {
        assert!(stdout.contains(expected), "{expected} not in:\n{stdout}");
    }
}
