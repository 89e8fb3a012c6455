//! Against a real Kubernetes API server (`tests/kube`'s kube-harness: kube-apiserver
//! from `k8s.io/kubernetes` with an embedded etcd): the admission path as a cluster
//! runs it, with the webhook configuration Tessera ships in `deploy/kubernetes`, and
//! cluster mode with nothing but the RBAC it ships there.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tessera_tests::kube::ApiServer;
use tessera_tests::*;

/// `deploy/kubernetes/tessera.yaml`, sent to this control plane's webhook by URL (a
/// test has no Service in front of it) and trusting its root.
pub(crate) fn webhook_configuration(control_plane: &ControlPlane) -> Value {
    let mut configuration = shipped_webhook_configuration();
    let root = std::fs::read(control_plane.trust_bundle_file()).expect("trust bundle");
    configuration["webhooks"][0]["clientConfig"] = json!({
        "url": format!("https://{}/inject", control_plane.webhook_address()),
        "caBundle": base64::engine::general_purpose::STANDARD.encode(root),
    });
    configuration
}

/// The MutatingWebhookConfiguration of `deploy/kubernetes`, as shipped.
pub(crate) fn shipped_webhook_configuration() -> Value {
    tessera_tests::kube::shipped_manifests()
        .into_iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .expect("deploy/kubernetes has the webhook configuration")
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
async fn the_api_server_injects_pods_of_meshed_namespaces_and_refuses_them_without_the_webhook() {
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
    let name = injected["metadata"]["name"]
        .as_str()
        .expect("generated name");
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
    assert_eq!(
        names(&stored, "initContainers"),
        names(&injected, "initContainers")
    );
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
    assert!(
        names(&opted_out, "initContainers").is_empty(),
        "{opted_out}"
    );

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

/// A pod as the API server stores it (no webhook here); its UID.
async fn create_pod(api: &ApiServer, name: &str, account: &str, finalizers: &[&str]) -> String {
    let pod = api
        .must_create(
            "/api/v1/namespaces/shop/pods",
            &json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": { "name": name, "finalizers": finalizers },
                "spec": {
                    "serviceAccountName": account,
                    "containers": [{ "name": "app", "image": "example.com/app:1" }]
                }
            }),
        )
        .await;
    pod["metadata"]["uid"].as_str().expect("uid").to_string()
}

/// A token from the TokenRequest API for `account`, bound to pod `pod`, as the
/// kubelet's projected volume asks for it.
async fn token_request(
    api: &ApiServer,
    account: &str,
    audience: &str,
    pod: (&str, &str),
) -> String {
    let answer = api
        .must_create(
            &format!("/api/v1/namespaces/shop/serviceaccounts/{account}/token"),
            &json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [audience],
                    "expirationSeconds": 3600,
                    "boundObjectRef": { "apiVersion": "v1", "kind": "Pod", "name": pod.0, "uid": pod.1 }
                }
            }),
        )
        .await;
    answer["status"]["token"]
        .as_str()
        .expect("token")
        .to_string()
}

/// A pod-bound token signed with the API server's own service-account key, valid
/// from `from` to `until` seconds from now (a TokenRequest cannot ask for a past expiry).
fn signed_token(
    api: &ApiServer,
    account_uid: &str,
    pod: (&str, &str),
    from: i64,
    until: i64,
) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = json!({
        "iss": api.issuer,
        "sub": "system:serviceaccount:shop:orders",
        "aud": ["tessera"],
        "iat": now + from,
        "nbf": now + from,
        "exp": now + until,
        "kubernetes.io": {
            "namespace": "shop",
            "pod": { "name": pod.0, "uid": pod.1 },
            "serviceaccount": { "name": "orders", "uid": account_uid }
        }
    });
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&api.service_account_key()).expect("sa.key");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .expect("sign")
}

/// A proxy configured as injection configures a sidecar, with the token at its path.
fn sidecar(control_plane: &ControlPlane, dir: &TempDir, token: &str) -> (Process, u16) {
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let admin = free_port();
    let config = format!(
        "identity:\n  namespace: shop\n  serviceAccount: orders\n  serviceAccountTokenFile: {}\ncontrolPlane:\n  address: {}\n  trustBundleFile: {}\nadmin: 127.0.0.1:{admin}\n",
        token_file.display(),
        control_plane.address(),
        control_plane.trust_bundle_file().display(),
    );
    let proxy = Process::spawn(
        "sidecar",
        std::process::Command::new(binary("tessera-proxy"))
            .args(["--log-format", "json", "run"])
            .env("TESSERA_PROXY_CONFIG", config)
            .env_remove("TESSERA_JOIN_TOKEN"),
    );
    (proxy, admin)
}

/// `Certify` for shop/orders with a service-account token; the refusal's message.
async fn refusal(control_plane: &ControlPlane, token: &str) -> (tonic::Code, String) {
    let request = tessera_proto::api::identity::CertifyRequest {
        csr_der: certs::csr(&[&spiffe("orders")], false),
        kubernetes_token: token.to_string(),
        ..Default::default()
    };
    let status = grpc::certify_request(
        &control_plane.address(),
        &control_plane.trust_bundle_file(),
        request,
    )
    .await
    .expect_err("refused");
    (status.code(), status.message().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_get_certificates_for_their_service_account_tokens_and_nothing_else() {
    let Some(api) = ApiServer::start().await else {
        return;
    };
    namespace(&api, "shop", json!({})).await;
    let payments =
        json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "payments" } });
    api.must_create("/api/v1/namespaces/shop/serviceaccounts", &payments)
        .await;
    let (_, account) = api
        .get("/api/v1/namespaces/shop/serviceaccounts/orders")
        .await
        .unwrap();
    let account_uid = account["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let orders = create_pod(&api, "orders-1", "orders", &[]).await;
    let control_plane = ControlPlane::start_in_cluster(&api.control_plane_kubeconfig().await).await;

    // The projected token of a pod, from the real TokenRequest API: a certificate.
    let token = token_request(&api, "orders", "tessera", ("orders-1", &orders)).await;
    let dir = TempDir::new("sidecar");
    let (proxy, admin) = sidecar(&control_plane, &dir, &token);
    control_plane
        .process
        .logs
        .wait_for(
            &[
                "certificate issued",
                &spiffe("orders"),
                "ServiceAccountToken",
            ],
            Duration::from_secs(20),
        )
        .await
        .expect("the sidecar's token earns its certificate");
    // Issued is not yet installed: the answer is on its way to the sidecar.
    let mut certs = String::new();
    for _ in 0..100 {
        let (status, answer) = http_get(local(admin), "/certs").await.unwrap_or_default();
        certs = answer;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(certs.contains(&spiffe("orders")), "{certs}");

    // Another service account's token, for the same pod's identity: its own identity
    // (payments) is not the one the CSR asks for.
    let other = create_pod(&api, "payments-1", "payments", &[]).await;
    let payments_token = token_request(&api, "payments", "tessera", ("payments-1", &other)).await;
    let (code, message) = refusal(&control_plane, &payments_token).await;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(message.contains("payments"), "{message}");

    // Issued for another audience (the API server's own): not ours.
    let foreign = token_request(&api, "orders", &api.issuer, ("orders-1", &orders)).await;
    let (code, message) = refusal(&control_plane, &foreign).await;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
    assert!(message.contains("did not authenticate"), "{message}");

    // Signed by the cluster's own key, for this pod, but expired: the control check
    // (the same token, still valid) shows it is the expiry that is refused.
    let valid = signed_token(&api, &account_uid, ("orders-1", &orders), -60, 600);
    let request = tessera_proto::api::identity::CertifyRequest {
        csr_der: certs::csr(&[&spiffe("orders")], false),
        kubernetes_token: valid,
        ..Default::default()
    };
    grpc::certify_request(
        &control_plane.address(),
        &control_plane.trust_bundle_file(),
        request,
    )
    .await
    .expect("a token signed with the cluster's key is the cluster's");
    let expired = signed_token(&api, &account_uid, ("orders-1", &orders), -7200, -3600);
    let (code, message) = refusal(&control_plane, &expired).await;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
    assert!(message.contains("expired"), "{message}");

    // The pod is being deleted (held by a finalizer), then gone.
    let leaving = create_pod(&api, "orders-2", "orders", &["tessera.dev/test"]).await;
    let leaving_token = token_request(&api, "orders", "tessera", ("orders-2", &leaving)).await;
    let (status, _) = api
        .delete("/api/v1/namespaces/shop/pods/orders-2")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (code, message) = refusal(&control_plane, &leaving_token).await;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
    assert!(message.contains("being deleted"), "{message}");
    let (status, _) = api
        .delete("/api/v1/namespaces/shop/pods/orders-1")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (code, message) = refusal(&control_plane, &token).await;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
    assert!(message.contains("orders-1"), "{message}");

    // One refusal line each, never a token.
    control_plane
        .process
        .logs
        .wait_for(&["certificate refused", "orders-1"], Duration::from_secs(5))
        .await
        .unwrap();
    let refused = control_plane.process.logs.count(&["certificate refused"]);
    assert_eq!(
        refused,
        5,
        "{:#?}",
        control_plane
            .process
            .logs
            .matching(&["certificate refused"])
    );
    for secret in [&token, &payments_token, &foreign, &expired, &leaving_token] {
        let signature = secret.rsplit('.').next().unwrap();
        for logs in [&control_plane.process.logs, &proxy.logs] {
            assert_eq!(logs.count(&[signature]), 0, "a token was logged");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_root_is_kept_published_in_meshed_namespaces_and_the_webhook() {
    let Some(api) = ApiServer::start().await else {
        return;
    };
    namespace(&api, "shop", json!({ "tessera.dev/inject": "enabled" })).await;
    namespace(&api, "plain", json!({})).await;
    let shipped = shipped_webhook_configuration();
    api.must_create(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        &shipped,
    )
    .await;
    let control_plane = ControlPlane::start_in_cluster(&api.control_plane_kubeconfig().await).await;
    let root = std::fs::read_to_string(control_plane.trust_bundle_file()).unwrap();
    const MAP: &str = "configmaps/tessera-ca-root-cert";
    let published =
        |status: u16, map: &Value| status == 200 && map["data"]["root-cert.pem"] == root.as_str();
    let within = Duration::from_secs(1);

    api.eventually(
        &format!("/api/v1/namespaces/shop/{MAP}"),
        Duration::from_secs(10),
        published,
    )
    .await
    .unwrap_or_else(|error| {
        let logs = control_plane.process.logs.lines().join("\n");
        panic!("not published in the meshed namespace: {error}\n{logs}")
    });
    let (status, _) = api
        .get(&format!("/api/v1/namespaces/plain/{MAP}"))
        .await
        .unwrap();
    assert_eq!(status, 404, "nothing in a namespace outside the mesh");
    let bundle = base64::engine::general_purpose::STANDARD.encode(&root);
    api.eventually(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/tessera-sidecar-injector",
        within,
        |_, configuration| configuration["webhooks"][0]["clientConfig"]["caBundle"] == bundle.as_str(),
    )
    .await
    .expect("the webhook's caBundle is the root");

    // Deleted: recreated. Changed: restored.
    let (status, _) = api
        .delete(&format!("/api/v1/namespaces/shop/{MAP}"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    api.eventually(&format!("/api/v1/namespaces/shop/{MAP}"), within, published)
        .await
        .expect("recreated after deletion");
    let tampered = json!({ "data": { "root-cert.pem": "-----BEGIN CERTIFICATE-----\nforged\n" } });
    let (status, _) = api
        .merge_patch(&format!("/api/v1/namespaces/shop/{MAP}"), &tampered)
        .await
        .unwrap();
    assert_eq!(status, 200);
    api.eventually(&format!("/api/v1/namespaces/shop/{MAP}"), within, published)
        .await
        .expect("restored after a change");

    // A namespace joining the mesh gets it.
    let label = json!({ "metadata": { "labels": { "tessera.dev/inject": "enabled" } } });
    let (status, _) = api
        .merge_patch("/api/v1/namespaces/plain", &label)
        .await
        .unwrap();
    assert_eq!(status, 200);
    api.eventually(
        &format!("/api/v1/namespaces/plain/{MAP}"),
        within,
        published,
    )
    .await
    .expect("published when the namespace joins the mesh");
    control_plane
        .process
        .logs
        .wait_for(&["root certificate published", "namespace=plain"], within)
        .await
        .unwrap();
}

/// A tessera.dev object of `kind` as the API server takes it; `spec` as in a file.
pub(crate) fn custom_resource(kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": kind,
        "metadata": { "name": name },
        "spec": spec,
    })
}

/// The collection path of `kind`'s objects in `namespace`, with strict field validation
/// (what kubectl asks for): unknown fields are refused, not dropped.
fn collection(kind_plural: &str, namespace: &str) -> String {
    format!(
        "/apis/tessera.dev/v1alpha1/namespaces/{namespace}/{kind_plural}?fieldValidation=Strict"
    )
}

/// Issue 23: the CRDs generated from the file mode's types apply; every documented local
/// resource (but the install-time MeshConfig) is accepted as a cluster object under
/// strict validation; invalid objects are refused by the API server with the field named.
#[tokio::test(flavor = "multi_thread")]
async fn the_crds_apply_and_the_api_server_refuses_invalid_objects_naming_the_field() {
    init();
    let Some(api) = ApiServer::start().await else {
        return;
    };
    let crds = api.apply_crds().await;
    let plural = |kind: &str| {
        crds.iter()
            .find(|crd| crd["spec"]["names"]["kind"] == kind)
            .and_then(|crd| crd["spec"]["names"]["plural"].as_str())
            .unwrap_or_else(|| panic!("no CRD for {kind}"))
            .to_string()
    };
    namespace(&api, "shop", json!({})).await;

    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/mesh");
    let mut applied = 0;
    for file in ["services.yaml", "policies.yaml"] {
        let text = std::fs::read_to_string(local.join(file)).expect("read local resources");
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text).expect("parses");
        for mut document in documents {
            let kind = document["kind"].as_str().expect("kind").to_string();
            let namespace = document["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            if namespace != "default" && namespace != "shop" {
                namespace_once(&api, &namespace).await;
            }
            document["metadata"]
                .as_object_mut()
                .expect("metadata")
                .remove("namespace");
            let (status, answer) = api
                .create(&collection(&plural(&kind), &namespace), &document)
                .await
                .unwrap();
            assert_eq!(status, 201, "{file}: {kind} refused: {answer}");
            applied += 1;
        }
    }
    assert!(applied >= 4, "only {applied} documented resources applied");

    let policies = collection(&plural("AuthorizationPolicy"), "shop");
    let refused = [
        (
            "bad action",
            json!({ "action": "DENYX" }),
            &["spec.action", "DENYX"][..],
        ),
        (
            "unknown field",
            json!({ "action": "ALLOW", "rulez": [] }),
            &["unknown field", "spec.rulez"][..],
        ),
        (
            "malformed principal",
            json!({ "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/*/sa/x"] } }] }] }),
            &["spec.rules[0].from[0].source.principals[0]"][..],
        ),
        (
            "a rule's source without its body",
            json!({ "rules": [{ "from": [{}] }] }),
            &["spec.rules[0].from[0].source", "Required"][..],
        ),
    ];
    for (case, spec, named) in refused {
        let object = custom_resource("AuthorizationPolicy", "bad", spec);
        let (status, answer) = api.create(&policies, &object).await.unwrap();
        assert!(
            (400..500).contains(&status),
            "{case}: accepted ({status}): {answer}"
        );
        let message = answer["message"].as_str().unwrap_or_default();
        for field in named {
            assert!(
                message.contains(field),
                "{case}: {field:?} not in {message:?}"
            );
        }
    }
    let routes = collection(&plural("RoutePolicy"), "shop");
    let object = custom_resource(
        "RoutePolicy",
        "slow",
        json!({ "service": "orders", "timeout": "soon" }),
    );
    let (status, answer) = api.create(&routes, &object).await.unwrap();
    assert_eq!(status, 422, "a timeout of 'soon' accepted: {answer}");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.timeout")),
        "{answer}"
    );
    // A rule over the whole map (CEL): keys are ports.
    let peers = collection(&plural("PeerAuthentication"), "shop");
    let object = custom_resource(
        "PeerAuthentication",
        "named-port",
        json!({ "selector": { "serviceAccount": "orders" }, "portLevelMtls": { "http": { "mode": "DISABLE" } } }),
    );
    let (status, answer) = api.create(&peers, &object).await.unwrap();
    assert_eq!(status, 422, "a port named 'http' accepted: {answer}");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.portLevelMtls") && m.contains("port numbers")),
        "{answer}"
    );
    let good = custom_resource(
        "AuthorizationPolicy",
        "good",
        json!({ "action": "DENY", "rules": [{ "from": [{ "source": { "principals": ["*/sa/intruder"] } }] }] }),
    );
    let created = api.must_create(&policies, &good).await;
    assert_eq!(
        created["spec"]["rules"][0]["from"][0]["source"]["principals"][0],
        "*/sa/intruder"
    );
}

/// Creates namespace `name` unless it exists.
async fn namespace_once(api: &ApiServer, name: &str) {
    let (status, _) = api
        .get(&format!("/api/v1/namespaces/{name}"))
        .await
        .unwrap();
    if status == 404 {
        namespace(api, name, json!({})).await;
    }
}

/// Polls `path` on one connection until it answers `status`; how long that took.
async fn until_status(
    client: &mut l7::Http1Client,
    path: &str,
    status: u16,
    within: Duration,
) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let answer = client.get(path).await.expect("the mesh answers");
        if answer.status.as_u16() == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "GET {path} still {} after {within:?} (expected {status})",
            answer.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An API server, a control plane in cluster mode and an HTTP mesh (client → backend in
/// `shop`) through which `/admin` is allowed; the client on one kept-alive connection.
async fn cluster_mesh() -> Option<(ApiServer, l7::L7Mesh, backend::HttpBackend, l7::Http1Client)> {
    init();
    let api = ApiServer::start().await?;
    let kubeconfig = api.control_plane_kubeconfig().await;
    namespace(&api, "shop", json!({})).await;
    let control_plane = ControlPlane::start_in_cluster(&kubeconfig).await;
    let backend = backend::HttpBackend::start("guarded").await;
    let mesh = l7::L7Mesh::start_on(control_plane, &[backend.address], "http", None).await;
    let mut client = l7::Http1Client::connect(mesh.entry()).await.unwrap();
    assert_eq!(client.get("/admin").await.unwrap().status, 200);
    Some((api, mesh, backend, client))
}

/// Issue 23: policy is a cluster object. An AuthorizationPolicy created through the API
/// server is enforced by the running proxies within 1 s, and so are its change and its
/// deletion; the control plane reads it with nothing but the RBAC `deploy/` ships.
#[tokio::test(flavor = "multi_thread")]
async fn authorization_policies_from_the_api_server_take_effect_within_a_second() {
    let Some((api, _mesh, _backend, mut client)) = cluster_mesh().await else {
        return;
    };

    let policies = "/apis/tessera.dev/v1alpha1/namespaces/shop/authorizationpolicies";
    let deny = |paths: &[&str]| {
        json!({ "selector": { "serviceAccount": "backend" }, "action": "DENY",
                "rules": [{ "to": [{ "operation": { "paths": paths } }] }] })
    };
    let policy = custom_resource("AuthorizationPolicy", "no-admin", deny(&["/admin*"]));
    api.must_create(policies, &policy).await;
    let enforced = until_status(&mut client, "/admin", 403, Duration::from_secs(1)).await;
    assert_eq!(client.get("/menu").await.unwrap().status, 200);

    let (status, answer) = api
        .merge_patch(
            &format!("{policies}/no-admin"),
            &json!({ "spec": deny(&["/menu"]) }),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let changed = until_status(&mut client, "/menu", 403, Duration::from_secs(1)).await;
    assert_eq!(client.get("/admin").await.unwrap().status, 200);

    let (status, answer) = api.delete(&format!("{policies}/no-admin")).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let deleted = until_status(&mut client, "/menu", 200, Duration::from_secs(1)).await;
    eprintln!("enforced after {enforced:?}, changed after {changed:?}, lifted after {deleted:?}");
}

/// The `Accepted` condition of the object at `path` once it is `status` for
/// `generation`; fails after 5 s.
async fn accepted_condition(api: &ApiServer, path: &str, status: &str, generation: i64) -> Value {
    let object = api
        .eventually(path, Duration::from_secs(5), |code, object| {
            code == 200
                && accepted(object)
                    .is_some_and(|c| c["status"] == status && c["observedGeneration"] == generation)
        })
        .await
        .unwrap();
    accepted(&object).unwrap().clone()
}

fn accepted(object: &Value) -> Option<&Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
}

/// Issue 23: what only the control plane can judge. A new object it refuses (a route
/// policy for a service that does not exist) and a bad edit of one in force (a
/// condition key with a typo) are reported in `status.conditions` and as Warning
/// Events; the edited policy's last accepted version stays enforced, and changes to
/// other objects keep reaching the proxies within 1 s meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_object_is_reported_in_its_status_and_holds_up_nothing_else() {
    let Some((api, _mesh, _backend, mut client)) = cluster_mesh().await else {
        return;
    };
    let policies = "/apis/tessera.dev/v1alpha1/namespaces/shop/authorizationpolicies";
    let deny = |path: &str, when: Value| {
        json!({ "selector": { "serviceAccount": "backend" }, "action": "DENY",
                "rules": [{ "to": [{ "operation": { "paths": [path] } }], "when": when }] })
    };
    api.must_create(
        policies,
        &custom_resource("AuthorizationPolicy", "no-admin", deny("/admin", json!([]))),
    )
    .await;
    until_status(&mut client, "/admin", 403, Duration::from_secs(1)).await;
    let condition = accepted_condition(&api, &format!("{policies}/no-admin"), "True", 1).await;
    assert_eq!(condition["reason"], "Accepted", "{condition}");

    let routes = "/apis/tessera.dev/v1alpha1/namespaces/shop/routepolicies";
    let ghost = json!({ "service": "ghost", "timeout": "1s" });
    api.must_create(routes, &custom_resource("RoutePolicy", "ghost", ghost))
        .await;
    let condition = accepted_condition(&api, &format!("{routes}/ghost"), "False", 1).await;
    assert_eq!(condition["reason"], "Refused", "{condition}");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("ghost.shop, which is not defined"),
        "{condition}"
    );

    // A typo in a condition key: the schema lets it through, the control plane cannot.
    let typo = json!([{ "key": "request.header[x-user]", "values": ["bob"] }]);
    let (status, answer) = api
        .merge_patch(
            &format!("{policies}/no-admin"),
            &json!({ "spec": deny("/admin", typo) }),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let condition = accepted_condition(&api, &format!("{policies}/no-admin"), "False", 2).await;
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("request.header[x-user]"),
        "{condition}"
    );
    assert_eq!(
        client.get("/admin").await.unwrap().status,
        403,
        "the accepted version stays enforced"
    );

    // Meanwhile, other objects still apply.
    api.must_create(
        policies,
        &custom_resource("AuthorizationPolicy", "no-menu", deny("/menu", json!([]))),
    )
    .await;
    let applied = until_status(&mut client, "/menu", 403, Duration::from_secs(1)).await;
    assert_eq!(client.get("/admin").await.unwrap().status, 403);

    // Each refusal is a Warning Event about its object, saying why.
    let events = api
        .eventually(
            "/apis/events.k8s.io/v1/namespaces/shop/events",
            Duration::from_secs(5),
            |code, list| {
                let refused = |name: &str| {
                    list["items"].as_array().is_some_and(|items| {
                        items.iter().any(|e| {
                            e["regarding"]["name"] == name
                                && e["reason"] == "Refused"
                                && e["type"] == "Warning"
                        })
                    })
                };
                code == 200 && refused("ghost") && refused("no-admin")
            },
        )
        .await
        .unwrap();
    let note = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["regarding"]["name"] == "no-admin")
        .map(|e| e["note"].to_string())
        .unwrap();
    assert!(note.contains("request.header[x-user]"), "{note}");

    // Fixed: accepted again, and in force.
    let (status, answer) = api
        .merge_patch(
            &format!("{policies}/no-admin"),
            &json!({ "spec": deny("/admin*", json!([])) }),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    accepted_condition(&api, &format!("{policies}/no-admin"), "True", 3).await;
    until_status(&mut client, "/admin/x", 403, Duration::from_secs(1)).await;
    eprintln!("another object applied after {applied:?} while one was refused");
}

/// Issue 23: the API server restarted under a running mesh. While it is down, requests
/// keep flowing on the configuration in force (a DENY included); once it is back on
/// the same data, the control plane's watches resume by themselves: a policy created
/// right after the restart is enforced, and one deleted is lifted, without restarting
/// anything else.
#[tokio::test(flavor = "multi_thread")]
async fn the_mesh_rides_out_an_api_server_restart_and_loses_no_update() {
    let Some((mut api, mesh, _backend, mut client)) = cluster_mesh().await else {
        return;
    };
    let policies = "/apis/tessera.dev/v1alpha1/namespaces/shop/authorizationpolicies";
    let deny = |path: &str| {
        json!({ "selector": { "serviceAccount": "backend" }, "action": "DENY",
                "rules": [{ "to": [{ "operation": { "paths": [path] } }] }] })
    };
    api.must_create(
        policies,
        &custom_resource("AuthorizationPolicy", "no-admin", deny("/admin")),
    )
    .await;
    until_status(&mut client, "/admin", 403, Duration::from_secs(1)).await;

    api.stop();
    mesh.control_plane
        .process
        .logs
        .wait_for(
            &["watch of cluster objects failed"],
            Duration::from_secs(10),
        )
        .await
        .expect("the control plane notices the API server is gone");
    for _ in 0..20 {
        assert_eq!(client.get("/menu").await.unwrap().status, 200);
        assert_eq!(client.get("/admin").await.unwrap().status, 403);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    api.restart().await;
    let back = std::time::Instant::now();
    api.must_create(
        policies,
        &custom_resource("AuthorizationPolicy", "no-menu", deny("/menu")),
    )
    .await;
    until_status(&mut client, "/menu", 403, Duration::from_secs(15)).await;
    let created = back.elapsed();
    let (status, answer) = api.delete(&format!("{policies}/no-admin")).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let lifted = until_status(&mut client, "/admin", 200, Duration::from_secs(1)).await;
    eprintln!(
        "after the API server's restart: a new policy enforced {created:?} after it was back, \
         a deletion then lifted in {lifted:?}"
    );
}

/// A pod as the injector leaves it (its proxy a native sidecar), created directly: no
/// kubelet runs it, a proxy of the test plays its sidecar.
async fn create_meshed_pod(api: &ApiServer, name: &str, account: &str) {
    api.must_create(
        "/api/v1/namespaces/shop/pods",
        &json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "labels": { "app": "backend" } },
            "spec": {
                "serviceAccountName": account,
                "initContainers": [{ "name": "tessera-proxy", "image": "example.com/proxy:1", "restartPolicy": "Always" }],
                "containers": [{ "name": "app", "image": "example.com/app:1" }]
            }
        }),
    )
    .await;
}

/// An EndpointSlice of Service `backend`: `pod` at `ip`:`port` (its port `http`), as
/// the EndpointSlice controller writes it.
fn endpoint_slice(name: &str, pod: &str, ip: IpAddr, port: u16, conditions: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": { "name": name, "labels": { "kubernetes.io/service-name": "backend" } },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [ip.to_string()],
            "conditions": conditions,
            "targetRef": { "kind": "Pod", "name": pod, "namespace": "shop" }
        }],
        "ports": [{ "name": "http", "port": port, "protocol": "TCP" }]
    })
}

/// Polls the service through `client` until `backend` answers; how long that took.
async fn until_served_by(client: &Proxy, backend: &str, within: Duration) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let answer = match l7::Http1Client::connect(client.outbound(0)).await {
            Ok(mut connection) => connection.get("/").await.ok(),
            Err(_) => None,
        };
        let body = answer.map(|a| (a.status, String::from_utf8_lossy(&a.body).into_owned()));
        if body.as_ref().is_some_and(|(_, body)| body == backend) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not served by {backend} after {within:?}: last answer {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 23: discovery from the API server. A Service, its EndpointSlices and the
/// sidecar pods behind them, created and changed through the API server as the
/// controllers would, are what running proxies route to, each change within 1 s: the
/// service port maps to the slice's port (targetPort), an endpoint no longer ready or
/// terminating stops getting traffic, a deleted Service is gone.
#[tokio::test(flavor = "multi_thread")]
async fn services_and_endpoint_slices_from_the_api_server_are_routed_to_within_a_second() {
    init();
    let Some(host) = tessera_tests::kube::host_address() else {
        return;
    };
    let Some(api) = ApiServer::start().await else {
        return;
    };
    let kubeconfig = api.control_plane_kubeconfig().await;
    namespace(&api, "shop", json!({ "tessera.dev/inject": "enabled" })).await;
    api.must_create(
        "/api/v1/namespaces/shop/serviceaccounts",
        &json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "backend" } }),
    )
    .await;
    let control_plane = ControlPlane::start_in_cluster(&kubeconfig).await;
    let one = backend::HttpBackend::start("one").await;
    let two = backend::HttpBackend::start("two").await;
    let (port_one, port_two) = (free_port(), free_port());
    let servers = [
        control_plane.workload_proxy_at("backend", one.address, SocketAddr::new(host, port_one)),
        control_plane.workload_proxy_at("backend", two.address, SocketAddr::new(host, port_two)),
    ];
    let client = control_plane.proxy("client", None, &[Upstream::service("backend.shop")]);
    for proxy in servers.iter().chain([&client]) {
        proxy
            .wait_ready(Duration::from_secs(20))
            .await
            .expect("proxy ready");
    }
    create_meshed_pod(&api, "backend-1", "backend").await;
    create_meshed_pod(&api, "backend-2", "backend").await;
    let service = api
        .must_create(
            "/api/v1/namespaces/shop/services",
            &json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": "backend" },
                "spec": { "selector": { "app": "backend" },
                          "ports": [{ "name": "http", "port": 80, "targetPort": "http" }] }
            }),
        )
        .await;
    assert!(
        service["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.parse::<std::net::IpAddr>().is_ok())
    );
    let slices = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices";
    api.must_create(
        slices,
        &endpoint_slice(
            "backend-one",
            "backend-1",
            host,
            port_one,
            json!({ "ready": true }),
        ),
    )
    .await;
    let first = until_served_by(&client, "one", Duration::from_secs(1)).await;

    // The second pod becomes ready, the first stops being ready: traffic follows.
    api.must_create(
        slices,
        &endpoint_slice(
            "backend-two",
            "backend-2",
            host,
            port_two,
            json!({ "ready": true }),
        ),
    )
    .await;
    let (status, answer) = api
        .merge_patch(
            &format!("{slices}/backend-one"),
            &json!({ "endpoints": [{ "addresses": [host.to_string()], "conditions": { "ready": false },
                                      "targetRef": { "kind": "Pod", "name": "backend-1", "namespace": "shop" } }] }),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let moved = until_served_by(&client, "two", Duration::from_secs(1)).await;
    let before = one.requests();
    for _ in 0..10 {
        until_served_by(&client, "two", Duration::from_secs(1)).await;
    }
    assert_eq!(
        one.requests(),
        before,
        "an unready endpoint still got traffic"
    );

    // Terminating: drained like unready; the first pod is back.
    let (status, answer) = api
        .merge_patch(
            &format!("{slices}/backend-two"),
            &json!({ "endpoints": [{ "addresses": [host.to_string()], "conditions": { "ready": true, "terminating": true },
                                      "targetRef": { "kind": "Pod", "name": "backend-2", "namespace": "shop" } }] }),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = api
        .merge_patch(
            &format!("{slices}/backend-one"),
            &json!({ "endpoints": [{ "addresses": [host.to_string()], "conditions": { "ready": true },
                                      "targetRef": { "kind": "Pod", "name": "backend-1", "namespace": "shop" } }] }),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let back = until_served_by(&client, "one", Duration::from_secs(1)).await;

    // The Service deleted: the mesh no longer has it.
    let (status, answer) = api
        .delete("/api/v1/namespaces/shop/services/backend")
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let gone = client
        .process
        .logs
        .wait_for(&["unknown upstream service"], Duration::from_secs(1))
        .await;
    assert!(gone.is_ok(), "the deleted Service is still routed to");
    eprintln!("served after {first:?}, moved after {moved:?}, back after {back:?}");
}

/// Issue 23: replicas share one CA. Without a plug-in CA, the first control plane stores
/// its development root in an immutable Secret and the second signs with the same root:
/// a proxy certified by one and a proxy certified by the other talk mTLS. The key is in
/// no log.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_sign_with_the_development_root_they_share_in_a_secret() {
    init();
    let Some(api) = ApiServer::start().await else {
        return;
    };
    let kubeconfig = api.control_plane_kubeconfig().await;
    let first = ControlPlane::start_in_cluster(&kubeconfig).await;
    let second = ControlPlane::start_in_cluster(&kubeconfig).await;
    let root = |control_plane: &ControlPlane| {
        std::fs::read_to_string(control_plane.trust_bundle_file()).expect("trust bundle")
    };
    assert_eq!(root(&first), root(&second), "the replicas' roots differ");
    let (status, secret) = api
        .get("/api/v1/namespaces/tessera-system/secrets/tessera-ca-dev-root")
        .await
        .unwrap();
    assert_eq!(status, 200, "{secret}");
    assert_eq!(secret["immutable"], true);

    let echo = EchoServer::start().await;
    let server = first.proxy("server", Some(echo.address), &[]);
    let upstream = Upstream::fixed(server.inbound(), spiffe("server"));
    let client = second.proxy("client", None, &[upstream]);
    for proxy in [&server, &client] {
        proxy
            .wait_ready(Duration::from_secs(20))
            .await
            .expect("proxy ready");
    }
    let echoed = echo_roundtrip(client.outbound(0), b"one root")
        .await
        .unwrap();
    assert_eq!(echoed, b"one root");
    for control_plane in [&first, &second] {
        let logs = control_plane.process.logs.lines().join("\n");
        assert!(!logs.contains("PRIVATE KEY"), "a key in the log:\n{logs}");
    }
}

/// Issue 23: a restart loses no update. A policy created while the control plane is
/// down is in force once it is back (its first list sees it), and proxies that kept
/// serving through the outage (their certificates and last view) pick it up.
#[tokio::test(flavor = "multi_thread")]
async fn a_policy_created_while_the_control_plane_is_down_is_in_force_after_its_restart() {
    let Some((api, mut mesh, _backend, mut client)) = cluster_mesh().await else {
        return;
    };

    mesh.control_plane.kill();
    let policy = custom_resource(
        "AuthorizationPolicy",
        "no-admin",
        json!({ "selector": { "serviceAccount": "backend" }, "action": "DENY",
                "rules": [{ "to": [{ "operation": { "paths": ["/admin*"] } }] }] }),
    );
    api.must_create(
        "/apis/tessera.dev/v1alpha1/namespaces/shop/authorizationpolicies",
        &policy,
    )
    .await;
    // Down: the proxies keep serving with what they have.
    assert_eq!(client.get("/admin").await.unwrap().status, 200);
    mesh.control_plane.restart().await;
    // Back: the proxies reconnect (after their backoff) and get the policy.
    until_status(&mut client, "/admin", 403, Duration::from_secs(15)).await;
    assert_eq!(client.get("/menu").await.unwrap().status, 200);
}

/// Issue 23: two replicas, one writer. Exactly one holds the Lease and keeps the root
/// published; when it dies, the other takes the Lease over (after the lease duration,
/// 3 s here) and recreates a deleted root ConfigMap.
#[tokio::test(flavor = "multi_thread")]
async fn one_replica_holds_the_lease_and_another_takes_over_when_it_dies() {
    init();
    let Some(api) = ApiServer::start().await else {
        return;
    };
    namespace(&api, "shop", json!({ "tessera.dev/inject": "enabled" })).await;
    let kubeconfig = api.control_plane_kubeconfig().await;
    let args = ["--lease-duration", "3s"];
    let mut replicas = [
        ControlPlane::start_in_cluster_with(&kubeconfig, &args).await,
        ControlPlane::start_in_cluster_with(&kubeconfig, &args).await,
    ];
    let leaders = |replicas: &[ControlPlane]| -> Vec<usize> {
        replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.process.logs.count(&["event=\"leading\""]) > 0)
            .map(|(index, _)| index)
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(5), || !leaders(&replicas).is_empty()).await,
        "no replica leads"
    );
    // Twice the renewal period later, still one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = match leaders(&replicas)[..] {
        [one] => one,
        ref both => panic!("replicas {both:?} all lead"),
    };
    let (status, lease) = api
        .get("/apis/coordination.k8s.io/v1/namespaces/tessera-system/leases/tessera-control-plane")
        .await
        .unwrap();
    assert_eq!(status, 200, "{lease}");
    let map = "/api/v1/namespaces/shop/configmaps/tessera-ca-root-cert";
    api.eventually(map, Duration::from_secs(5), |status, _| status == 200)
        .await
        .expect("the leader publishes the root");

    replicas[leader].kill();
    let follower = 1 - leader;
    let took_over = replicas[follower]
        .process
        .logs
        .wait_for(&["event=\"leading\""], Duration::from_secs(8))
        .await;
    assert!(
        took_over.is_ok(),
        "the surviving replica never took the Lease over"
    );
    let (status, _) = api.delete(map).await.unwrap();
    assert_eq!(status, 200);
    api.eventually(map, Duration::from_secs(1), |status, _| status == 200)
        .await
        .expect("the new leader recreates the root ConfigMap");
}

/// HAProxy in TCP mode on `port`, balancing connections over `backends` as a Service's
/// virtual IP does over its endpoints: a connection refused by one (a replica gone) is
/// sent to another.
fn service_balancer(dir: &TempDir, port: u16, backends: &[SocketAddr]) -> Process {
    let mut config = format!(
        "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 200ms\n  timeout client 1h\n  \
         timeout server 1h\n  retries 3\n  option redispatch 1\n\
         frontend control-plane\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\
         backend replicas\n  balance roundrobin\n"
    );
    for (index, backend) in backends.iter().enumerate() {
        config.push_str(&format!("  server replica-{index} {backend}\n"));
    }
    let file = dir.path().join("haproxy.cfg");
    std::fs::write(&file, config).unwrap();
    Process::spawn(
        "service",
        std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&file),
    )
}

/// Issue 23: replicas behind a Service. Proxies reach the control plane through one
/// address that balances over both replicas; the replica holding the proxies'
/// discovery streams is killed while requests flow, on a kept-alive connection and on
/// new ones: not one fails, the streams move to the other replica, and a policy created
/// after the kill is enforced through it within a second.
#[tokio::test(flavor = "multi_thread")]
async fn proxies_move_to_another_replica_when_theirs_dies_and_no_request_fails() {
    init();
    let Some(api) = ApiServer::start().await else {
        return;
    };
    let kubeconfig = api.control_plane_kubeconfig().await;
    namespace(&api, "shop", json!({})).await;
    let mut first = ControlPlane::start_in_cluster(&kubeconfig).await;
    let second = ControlPlane::start_in_cluster(&kubeconfig).await;
    let (dir, port) = (TempDir::new("service"), free_port());
    let backends = [local(first.grpc_port), local(second.grpc_port)];
    let _service = service_balancer(&dir, port, &backends);
    first.advertised = Some(local(port).to_string());
    let backend = backend::HttpBackend::start("guarded").await;
    let mesh = l7::L7Mesh::start_on(first, &[backend.address], "http", None).await;
    // The same files for both: in a cluster they come from one ConfigMap.
    let backend_yaml =
        std::fs::read_to_string(mesh.control_plane.config_dir().join("backend.yaml")).unwrap();
    second.write_config("backend.yaml", &backend_yaml);
    second
        .process
        .logs
        .wait_for(&["configuration updated"], Duration::from_secs(10))
        .await
        .expect("the second replica takes the same files");
    let entry = mesh.client.outbound(0);
    let mut client = l7::Http1Client::connect(entry).await.unwrap();
    until_status(&mut client, "/menu", 200, Duration::from_secs(5)).await;
    let mut replicas = [mesh.control_plane, second];

    let streams = async |replicas: &[ControlPlane; 2]| {
        [
            replicas[0].connected_proxies().await,
            replicas[1].connected_proxies().await,
        ]
    };
    let mut counts = streams(&replicas).await;
    for _ in 0..100 {
        if counts[0] + counts[1] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        counts = streams(&replicas).await;
    }
    assert_eq!(
        counts[0] + counts[1],
        2,
        "both proxies' discovery streams open"
    );
    let serving = usize::from(counts[1] > counts[0]);
    let other = 1 - serving;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killed_at = std::time::Instant::now() + Duration::from_millis(500);
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut sent, mut failed) = (0u32, Vec::new());
            let mut kept = l7::Http1Client::connect(entry).await.unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = if sent % 10 == 0 {
                    match l7::Http1Client::connect(entry).await {
                        Ok(mut fresh) => fresh.get("/menu").await,
                        Err(error) => Err(error),
                    }
                } else {
                    kept.get("/menu").await
                };
                sent += 1;
                match answer {
                    Ok(answer) if answer.status == 200 => {}
                    Ok(answer) => failed.push(format!(
                        "{:?}: {} {:?} {}",
                        killed_at.elapsed(),
                        answer.status,
                        answer.headers.get("tessera-proxy-error"),
                        String::from_utf8_lossy(&answer.body)
                    )),
                    Err(error) => failed.push(error.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (sent, failed)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = std::time::Instant::now();
    replicas[serving].kill();
    let mut moved = None;
    for _ in 0..300 {
        if replicas[other].connected_proxies().await == 2 {
            moved = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(moved) = moved else {
        let logs = mesh.client.process.logs.lines().join("\n");
        panic!(
            "the proxies' streams did not reach the other replica within 15 s; client proxy:\n{logs}"
        );
    };

    let policies = "/apis/tessera.dev/v1alpha1/namespaces/shop/authorizationpolicies";
    let deny = json!({ "selector": { "serviceAccount": "backend" }, "action": "DENY",
                       "rules": [{ "to": [{ "operation": { "paths": ["/admin*"] } }] }] });
    api.must_create(
        policies,
        &custom_resource("AuthorizationPolicy", "no-admin", deny),
    )
    .await;
    let mut client = l7::Http1Client::connect(entry).await.unwrap();
    let enforced = until_status(&mut client, "/admin", 403, Duration::from_secs(1)).await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed: {failed:?}",
        failed.len()
    );
    assert!(sent > 100, "only {sent} requests were sent");
    eprintln!(
        "{sent} requests, none failed; streams on the other replica {moved:?} after the kill; \
         a policy created then enforced after {enforced:?}"
    );
}
