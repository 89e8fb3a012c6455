//! Cluster mode end to end, as a node runs it: pods created through a real API server,
//! injected by the control plane's webhook, and run by the test's kubelet
//! (`tessera_tests::kubelet`) in network namespaces with exactly the containers the API
//! server stored — the init container's iptables program, the proxy with its
//! environment, the token from TokenRequest and the root from the published ConfigMap at
//! their mount paths. Needs root and the kube harness; says SKIPPED otherwise.

use std::net::IpAddr;
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};
use tessera_tests::kube::ApiServer;
use tessera_tests::netns::{self, Network, Pod};
use tessera_tests::{ControlPlane, TempDir, binary, eventually, init, kubelet};

use crate::kubernetes::{custom_resource, webhook_configuration};
use crate::transparent::{Capture, assert_encrypted, outside_server};

/// The control plane's Service name, as the webhook writes it into sidecars.
const CONTROL_PLANE_SERVICE: &str = "tessera-control-plane.tessera-system.svc";
// Payloads that must never cross the bridge in clear.
const WEB_SECRET: &str = "web-payload-93be40";
const PATH_SECRET: &str = "path-secret-1f27c8";
// A payload that must cross in clear (a destination outside the mesh): proves the
// capture sees payloads.
const OUTSIDE_PAYLOAD: &str = "outside-payload-64d1e0";

/// A pod as a workload controller would create it: labels `app: <name>`, one container.
fn pod(name: &str, container: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": name } },
        "spec": { "serviceAccountName": name, "containers": [container] }
    })
}

/// Creates the pod through the API server (admission included): the stored object.
async fn create_injected(api: &ApiServer, pod: &Value) -> Value {
    let stored = api.must_create("/api/v1/namespaces/shop/pods", pod).await;
    let init: Vec<&str> = stored["spec"]["initContainers"]
        .as_array()
        .map(|list| list.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        init,
        ["tessera-init", "tessera-proxy"],
        "not injected: {stored}"
    );
    stored
}

/// `curl` in `pod` as its application would run it: the HTTP status and the body.
fn curl(network: &Network, pod: &Pod, url: &str) -> (String, String) {
    let output: Output = network
        .command(pod, "curl")
        .args(["-s", "-m", "3", "-w", "\n%{http_code}", url])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_string(), body.trim().to_string())
}

/// Issue 23, the whole path: two pods admitted and injected through the API server, run
/// as admitted in network namespaces, get certificates for their service-account tokens
/// and talk mTLS through the Service's ClusterIP; an AuthorizationPolicy created as a
/// custom resource denies one call by the caller's identity; the bridge never carries a
/// payload in clear, and no log carries a token.
#[tokio::test(flavor = "multi_thread")]
async fn injected_pods_talk_mtls_and_obey_a_policy_from_the_api_server() {
    init();
    for tool in ["tcpdump", "curl", "setpriv"] {
        if netns::unavailable().is_none() && !netns::on_path(tool) {
            panic!("{tool} is not installed: scripts/test.sh installs it when run as root");
        }
    }
    let Some(mut network) = Network::create().expect("create network") else {
        return;
    };
    let Some(api) = ApiServer::start().await else {
        return;
    };
    let kubeconfig = api.control_plane_kubeconfig().await;
    let gateway = IpAddr::V4(network.gateway());
    let control_plane =
        ControlPlane::start_in_cluster_on(gateway, &kubeconfig, CONTROL_PLANE_SERVICE).await;
    api.must_create(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        &webhook_configuration(&control_plane),
    )
    .await;
    api.must_create(
        "/api/v1/namespaces",
        &json!({ "apiVersion": "v1", "kind": "Namespace",
                 "metadata": { "name": "shop", "labels": { "tessera.dev/inject": "enabled" } } }),
    )
    .await;
    // What the controller manager would publish: the API server's CA, which the
    // ServiceAccount admission plugin projects into every pod (kube-api-access-*).
    let ca = std::fs::read_to_string(&api.ca_file).expect("API server CA");
    api.must_create(
        "/api/v1/namespaces/shop/configmaps",
        &json!({ "apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": { "name": "kube-root-ca.crt" }, "data": { "ca.crt": ca } }),
    )
    .await;
    for account in ["web", "client"] {
        api.must_create(
            "/api/v1/namespaces/shop/serviceaccounts",
            &json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": account } }),
        )
        .await;
    }
    let service = api
        .must_create(
            "/api/v1/namespaces/shop/services",
            &json!({
                "apiVersion": "v1", "kind": "Service", "metadata": { "name": "web" },
                "spec": { "selector": { "app": "web" },
                          "ports": [{ "name": "http", "port": 8080, "targetPort": "http" }] }
            }),
        )
        .await;
    let cluster_ip: IpAddr = service["spec"]["clusterIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .expect("a ClusterIP");

    // The nodes' side: a namespace per pod; cluster DNS as hosts files.
    let web_netns = network.add_pod("web").unwrap();
    let client_netns = network.add_pod("client").unwrap();
    let names = [
        (cluster_ip, "web.shop web.shop.svc.cluster.local"),
        (gateway, &format!("{CONTROL_PLANE_SERVICE} outside.example")),
    ];
    for pod in [&web_netns, &client_netns] {
        network.set_hosts(pod, &names).unwrap();
    }

    let web = create_injected(
        &api,
        &pod(
            "web",
            json!({ "name": "web", "image": "example.com/web:1",
                    "command": ["tessera-test-app", "http-server", "0.0.0.0:8080", WEB_SECRET],
                    "ports": [{ "name": "http", "containerPort": 8080 }] }),
        ),
    )
    .await;
    let client = create_injected(
        &api,
        &pod(
            "client",
            json!({ "name": "client", "image": "example.com/shell:1", "command": ["sleep", "3600"] }),
        ),
    )
    .await;
    let web = kubelet::run(&api, &network, &web_netns, web)
        .await
        .expect("run web");
    let client = kubelet::run(&api, &network, &client_netns, client)
        .await
        .expect("run client");
    // What the EndpointSlice controller writes for the ready pod.
    api.must_create(
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        &json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": "web-1", "labels": { "kubernetes.io/service-name": "web" } },
            "addressType": "IPv4",
            "endpoints": [{ "addresses": [web_netns.ip.to_string()], "conditions": { "ready": true },
                            "targetRef": { "kind": "Pod", "name": "web", "namespace": "shop" } }],
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }]
        }),
    )
    .await;
    for account in ["web", "client"] {
        control_plane
            .process
            .logs
            .wait_for(
                &[
                    "certificate issued",
                    &tessera_tests::spiffe(account),
                    "ServiceAccountToken",
                ],
                Duration::from_secs(5),
            )
            .await
            .expect("the pod's projected token earned its certificate");
    }

    // The client application by the Service's name: ClusterIP → client sidecar → mTLS
    // → web sidecar → web application.
    let url = format!("http://web.shop:8080/{PATH_SECRET}");
    let mut answer = (String::new(), String::new());
    let served = eventually(Duration::from_secs(15), || {
        answer = curl(&network, &client_netns, &url);
        answer.0 == "200"
    })
    .await;
    assert!(served, "web never answered through the mesh: {answer:?}");
    assert_eq!(answer.1, WEB_SECRET);

    // From here on the bridge is watched (not before: until the client's sidecar has the
    // Service, its first calls may pass through to the ClusterIP in clear, as designed).
    let dir = TempDir::new("capture");
    let capture = Capture::start(&network, &dir).await;
    let (_outside, outside_port) = outside_server(gateway, OUTSIDE_PAYLOAD);

    assert_eq!(
        curl(&network, &client_netns, &url),
        ("200".into(), WEB_SECRET.into())
    );

    // Policy as a custom resource: the client's identity may not reach /admin.
    let policy = custom_resource(
        "AuthorizationPolicy",
        "web-no-admin-for-client",
        json!({
            "selector": { "matchLabels": { "app": "web" } },
            "action": "DENY",
            "rules": [{
                "from": [{ "source": { "principals": ["cluster.local/ns/shop/sa/client"] } }],
                "to": [{ "operation": { "paths": ["/admin*"] } }]
            }]
        }),
    );
    api.must_create(
        "/apis/tessera.dev/v1alpha1/namespaces/shop/authorizationpolicies",
        &policy,
    )
    .await;
    let admin = "http://web.shop:8080/admin/keys";
    let denied = eventually(Duration::from_secs(2), || {
        curl(&network, &client_netns, admin).0 == "403"
    })
    .await;
    assert!(
        denied,
        "the policy never denied /admin: {:?}",
        curl(&network, &client_netns, admin)
    );
    assert_eq!(
        curl(&network, &client_netns, &url),
        ("200".into(), WEB_SECRET.into())
    );
    assert!(
        web.container("web/tessera-proxy")
            .logs
            .count(&["request denied", "sa/client"])
            >= 1,
        "the web sidecar logs the denial with the caller's identity"
    );

    // A destination outside the mesh passes through, in clear.
    let outside = curl(
        &network,
        &client_netns,
        &format!("http://outside.example:{outside_port}/"),
    );
    assert_eq!(outside, ("200".into(), OUTSIDE_PAYLOAD.into()));

    let packets = capture.stop().await;
    assert_encrypted(
        &packets,
        OUTSIDE_PAYLOAD,
        &[WEB_SECRET, PATH_SECRET, "/admin/keys"],
        4,
    );

    // `tessera check` reads each meshed pod's proxy certificate through the API server.
    let kubeconfig = api.kubeconfig.to_str().unwrap();
    let check = std::process::Command::new(binary("tessera"))
        .args(["check", "-o", "json", "--kubeconfig", kubeconfig])
        .output()
        .expect("tessera check");
    let report: Value = serde_json::from_slice(&check.stdout).expect("a JSON report");
    let proxies: Vec<&Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["group"] == "tessera-proxies")
        .collect();
    assert_eq!(proxies.len(), 2, "{report:#}");
    assert!(proxies.iter().all(|c| c["status"] == "ok"), "{report:#}");
    assert_eq!(proxies[0]["detail"], "2 proxies", "{report:#}");
    assert!(
        proxies[1]["detail"]
            .as_str()
            .unwrap()
            .starts_with("the first expires at"),
        "{report:#}"
    );

    // No log carries a pod's token.
    for pod in [&web, &client] {
        let token = std::fs::read_to_string(pod.volume_file("tessera-token", "token")).unwrap();
        // The signature alone is the secret part; a log keeping only it still leaks.
        let signature = token.trim().rsplit('.').next().unwrap().to_string();
        let logs = control_plane
            .process
            .logs
            .lines()
            .into_iter()
            .chain(pod.containers.iter().flat_map(|(_, p)| p.logs.lines()));
        for line in logs {
            assert!(!line.contains(&signature), "a token was logged: {line}");
        }
    }
}
