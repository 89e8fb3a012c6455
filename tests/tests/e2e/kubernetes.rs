//! Against a real Kubernetes API server (`tests/kube`'s kube-harness: kube-apiserver
//! from `k8s.io/kubernetes` with an embedded etcd): the admission path as a cluster
//! runs it, with the webhook configuration Tessera ships in `deploy/kubernetes`.

use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tessera_tests::kube::ApiServer;
use tessera_tests::*;

/// `deploy/kubernetes/webhook.yaml`, sent to this control plane's webhook by URL (a
/// test has no Service in front of it) and trusting its root.
fn webhook_configuration(control_plane: &ControlPlane) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes/webhook.yaml");
    let yaml = std::fs::read_to_string(&path).expect("read webhook.yaml");
    let mut configuration: Value = serde_saphyr::from_str(&yaml).expect("webhook.yaml parses");
    let root = std::fs::read(control_plane.trust_bundle_file()).expect("trust bundle");
    configuration["webhooks"][0]["clientConfig"] = json!({
        "url": format!("https://{}/inject", control_plane.webhook_address()),
        "caBundle": base64::engine::general_purpose::STANDARD.encode(root),
    });
    configuration
}

/// A pod as a Deployment's ReplicaSet creates it from the pod template: a generated
/// name, the template's labels and annotations, a service account.
fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "orders-5d8f7c9b6-",
            "labels": { "app": "orders", "pod-template-hash": "5d8f7c9b6" },
            "annotations": annotations
        },
        "spec": {
            "serviceAccountName": "orders",
            "containers": [{
                "name": "orders",
                "image": "example.com/orders:3",
                "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
                "readinessProbe": { "httpGet": { "path": "/ready", "port": "http" } }
            }]
        }
    })
}

/// Container names of a list in a pod's spec.
fn names(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .map(|containers| {
            containers
                .iter()
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

async fn namespace(api: &ApiServer, name: &str, labels: Value) {
    api.must_create(
        "/api/v1/namespaces",
        &json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name, "labels": labels } }),
    )
    .await;
    // No controller manager runs: the service account a pod names is made here.
    api.must_create(
        &format!("/api/v1/namespaces/{name}/serviceaccounts"),
        &json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "orders" } }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_server_injects_pods_of_meshed_namespaces_and_refuses_them_without_the_webhook()
{
    let Some(api) = ApiServer::start().await else {
        return;
    };
    let mut control_plane = ControlPlane::start("1h", "").await;
    api.must_create(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        &webhook_configuration(&control_plane),
    )
    .await;
    namespace(&api, "shop", json!({ "tessera.dev/inject": "enabled" })).await;
    namespace(&api, "plain", json!({})).await;

    // Through the API server: admission called the webhook and stored the patched pod.
    let injected = api
        .must_create("/api/v1/namespaces/shop/pods", &pod(json!({})))
        .await;
    let name = injected["metadata"]["name"].as_str().expect("generated name");
    assert_eq!(names(&injected, "containers"), ["orders"]);
    assert_eq!(
        names(&injected, "initContainers"),
        ["tessera-init", "tessera-proxy"],
        "{injected}"
    );
    assert_eq!(
        injected["spec"]["initContainers"][1]["restartPolicy"], "Always",
        "the proxy is a native sidecar"
    );
    assert_eq!(
        injected["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"], 15020,
        "the application's probe goes through the proxy's admin port"
    );
    let (status, stored) = api
        .get(&format!("/api/v1/namespaces/shop/pods/{name}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{stored}");
    assert_eq!(names(&stored, "initContainers"), names(&injected, "initContainers"));
    control_plane
        .process
        .logs
        .wait_for(
            &["admission review", "namespace=shop", "result=\"injected\""],
            Duration::from_secs(5),
        )
        .await
        .expect("the control plane logged the review the API server sent");

    // Opted out by annotation: admitted unchanged.
    let opted_out = api
        .must_create(
            "/api/v1/namespaces/shop/pods",
            &pod(json!({ "tessera.dev/inject": "false" })),
        )
        .await;
    assert!(names(&opted_out, "initContainers").is_empty(), "{opted_out}");

    // A namespace without the label is not the webhook's: admitted unchanged.
    let outside = api
        .must_create("/api/v1/namespaces/plain/pods", &pod(json!({})))
        .await;
    assert!(names(&outside, "initContainers").is_empty(), "{outside}");

    // The webhook down under `failurePolicy: Fail`: a meshed pod is refused, not
    // started outside the mesh; an unmeshed namespace is not affected.
    control_plane.kill();
    let (status, refused) = api
        .create("/api/v1/namespaces/shop/pods", &pod(json!({})))
        .await
        .unwrap();
    assert_eq!(status, 500, "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("failed calling webhook \"inject.tessera.dev\""),
        "{refused}"
    );
    api.must_create("/api/v1/namespaces/plain/pods", &pod(json!({})))
        .await;
}
