//! Installing the mesh on a cluster: `tessera install` prints what the Helm chart renders
//! for the same choices; the rendered chart goes into a real API server with `kubectl
//! apply --server-side`, and a second apply after the control plane took over changes
//! nothing; `tessera check` (and `--pre`) tells a healthy install from each failure it
//! names. helm and kubectl are tests/kube's, built from their Go modules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};
use tessera_tests::kube::{ApiServer, tool as kube_tool};
use tessera_tests::*;

use crate::kubernetes::webhook_configuration;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(program: &Path, args: &[&str]) -> Output {
    std::process::Command::new(program)
        .args(args)
        .current_dir(repository())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()))
}

fn stdout_of(program: &Path, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// The objects of a YAML stream keyed by kind/namespace/name.
fn objects(yaml: &str) -> BTreeMap<String, Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("YAML")
        .into_iter()
        .filter(|o| !o.is_null())
        .map(|o| {
            let key = format!(
                "{}/{}/{}",
                o["kind"].as_str().unwrap_or_default(),
                o["metadata"]["namespace"].as_str().unwrap_or_default(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            );
            (key, o)
        })
        .collect()
}

/// `helm template` of the chart into tessera-system, with `extra` flags.
fn helm_template(helm: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "template",
        "tessera",
        "deploy/helm/tessera",
        "--namespace",
        "tessera-system",
    ];
    args.extend(extra);
    run(helm, &args)
}

/// The namespace, then the chart's rendering with its CRDs: what `tessera install`
/// prints, as one YAML stream.
fn chart_stream(helm: &Path, values: Option<&str>) -> String {
    let mut extra = vec!["--include-crds"];
    extra.extend(values.map(|v| ["--values", v]).into_iter().flatten());
    let output = helm_template(helm, &extra);
    assert!(
        output.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let namespace =
        std::fs::read_to_string(repository().join("deploy/kubernetes/namespace.yaml")).unwrap();
    format!(
        "{namespace}---\n{}",
        String::from_utf8_lossy(&output.stdout)
    )
}

#[test]
fn tessera_install_prints_what_the_chart_renders_for_the_same_choices() {
    let Some(helm) = kube_tool("helm") else {
        return;
    };
    let tessera = binary("tessera");
    let cases: [(&[&str], Option<&str>); 3] = [
        (&[], None),
        (
            &[
                "--registry",
                "registry.example.com/mesh",
                "--tag",
                "1.2.3",
                "--trust-domain",
                "corp.example",
                "--certificate-ttl",
                "12h",
                "--ca-secret",
                "corp-intermediate",
                "--replicas",
                "3",
            ],
            Some("tests/chart/values-secret-ca.yaml"),
        ),
        (
            &[
                "--replicas",
                "1",
                "--webhook-failure-policy",
                "ignore",
                "--webhook-timeout",
                "5",
                "--no-network-policy",
            ],
            Some("tests/chart/values-single.yaml"),
        ),
    ];
    for (flags, values) in cases {
        let mut args = vec!["install"];
        args.extend(flags);
        let installed = objects(&stdout_of(&tessera, &args));
        let charted = objects(&chart_stream(&helm, values));
        let keys = |m: &BTreeMap<String, Value>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            keys(&installed),
            keys(&charted),
            "{values:?}: other objects"
        );
        for (key, object) in &charted {
            assert_eq!(&installed[key], object, "{values:?}: {key} differs");
        }
    }
    // A choice the chart's schema refuses is refused with the reason, and nothing printed.
    let refused = run(&tessera, &["install", "--trust-domain", "Corp.Example"]);
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty());
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains("trust domain \"Corp.Example\""), "{error}");
    let refused = helm_template(&helm, &["--set", "mesh.trustDomain=Corp.Example"]);
    assert!(
        !refused.status.success(),
        "the chart's schema took an invalid trust domain"
    );
}

/// `kubectl` as this API server's administrator.
fn kubectl(kubectl: &Path, api: &ApiServer, args: &[&str]) -> Output {
    let kubeconfig = api.kubeconfig.to_str().unwrap();
    let mut all = vec!["--kubeconfig", kubeconfig];
    all.extend(args);
    run(kubectl, &all)
}

/// Every applied object's resourceVersion, read back from the API.
async fn versions(api: &ApiServer, kubectl_path: &Path, file: &Path) -> BTreeMap<String, String> {
    let output = kubectl(
        kubectl_path,
        api,
        &["get", "-f", file.to_str().unwrap(), "-o", "json"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list: Value = serde_json::from_slice(&output.stdout).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                ),
                o["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect()
}

/// `tessera check` as the administrator: (success, checks by name).
fn check(api: &ApiServer, args: &[&str]) -> (bool, BTreeMap<String, Value>) {
    check_as(&api.kubeconfig, args)
}

fn check_as(kubeconfig: &Path, args: &[&str]) -> (bool, BTreeMap<String, Value>) {
    let mut all = vec![
        "check",
        "-o",
        "json",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    all.extend(args);
    let output = run(&binary("tessera"), &all);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "tessera check: {e}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(
        output.status.success(),
        report["success"] == true,
        "exit status and report disagree: {report}"
    );
    let checks = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c.clone()))
        .collect();
    (output.status.success(), checks)
}

/// The check whose name starts with `prefix`, and its status.
fn status<'a>(checks: &'a BTreeMap<String, Value>, prefix: &str) -> (&'a str, &'a Value) {
    let (_, check) = checks
        .iter()
        .find(|(name, _)| name.starts_with(prefix))
        .unwrap_or_else(|| panic!("no check {prefix:?} in {checks:#?}"));
    (check["status"].as_str().unwrap(), check)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_installs_server_side_a_second_apply_changes_nothing_and_check_tells_each_failure()
 {
    let (Some(helm), Some(kubectl_path)) = (kube_tool("helm"), kube_tool("kubectl")) else {
        return;
    };
    let Some(api) = ApiServer::start().await else {
        return;
    };

    // --pre: the administrator may install; an account with no roles may not.
    let (ok, checks) = check(&api, &["--pre"]);
    assert!(ok, "{checks:#?}");
    assert_eq!(status(&checks, "you may create everything").0, "ok");
    api.must_create(
        "/api/v1/namespaces/default/serviceaccounts",
        &json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "nobody" } }),
    )
    .await;
    let nobody = api.service_account_kubeconfig("default", "nobody").await;
    let (ok, checks) = check_as(&nobody, &["--pre"]);
    assert!(!ok);
    let (state, denied) = status(&checks, "you may create everything");
    assert_eq!(state, "error");
    assert!(
        denied["detail"]
            .as_str()
            .unwrap()
            .contains("create customresourcedefinitions.apiextensions.k8s.io"),
        "{denied}"
    );

    // The chart, rendered and applied as a GitOps tool or a user would.
    let dir = TempDir::new("install");
    let manifests = dir.path().join("tessera.yaml");
    std::fs::write(&manifests, chart_stream(&helm, None)).unwrap();
    let file = manifests.to_str().unwrap();
    let applied = kubectl(&kubectl_path, &api, &["apply", "--server-side", "-f", file]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // Installed, but no replica runs (no kubelet here): named as such.
    let (ok, checks) = check(&api, &[]);
    assert!(!ok);
    assert_eq!(status(&checks, "the tessera.dev CRDs").0, "ok");
    assert_eq!(
        status(&checks, "the control plane's replicas are ready").0,
        "error"
    );
    assert_eq!(
        status(&checks, "the control plane's service account may").0,
        "ok"
    );
    let (state, ca) = status(&checks, "the CA's certificates can be read");
    assert_eq!(state, "error");
    assert!(
        ca["hint"]
            .as_str()
            .unwrap()
            .contains("first control-plane replica creates it"),
        "{ca}"
    );

    // A replica as the chart's service account (run here, as a process), and what the
    // controllers would write: the Deployment's status, the meshed namespace's account.
    let kubeconfig = api
        .service_account_kubeconfig("tessera-system", "tessera-control-plane")
        .await;
    let control_plane = ControlPlane::start_in_cluster(&kubeconfig).await;
    api.must_create(
        "/api/v1/namespaces",
        &json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop", "labels": { "tessera.dev/inject": "enabled" } } }),
    )
    .await;
    api.must_create(
        "/api/v1/namespaces/shop/serviceaccounts",
        &json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "default" } }),
    )
    .await;
    let root = std::fs::read_to_string(control_plane.trust_bundle_file()).unwrap();
    let webhook_path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/tessera-sidecar-injector";
    let bundle = base64_of(&root);
    api.eventually(webhook_path, Duration::from_secs(10), |status, w| {
        status == 200 && w["webhooks"][0]["clientConfig"]["caBundle"] == bundle.as_str()
    })
    .await
    .expect("the control plane sets the caBundle");
    api.eventually(
        "/api/v1/namespaces/shop/configmaps/tessera-ca-root-cert",
        Duration::from_secs(10),
        |status, _| status == 200,
    )
    .await
    .expect("the control plane publishes the root");

    // Applied again: nothing the control plane wrote is undone, nothing changes at all.
    let before = versions(&api, &kubectl_path, &manifests).await;
    assert!(before.len() >= 15, "{before:#?}");
    let again = kubectl(&kubectl_path, &api, &["apply", "--server-side", "-f", file]);
    assert!(
        again.status.success(),
        "second apply: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        versions(&api, &kubectl_path, &manifests).await,
        before,
        "the second apply changed objects"
    );
    let (_, webhook) = api.get(webhook_path).await.unwrap();
    assert_eq!(
        webhook["webhooks"][0]["clientConfig"]["caBundle"],
        bundle.as_str()
    );

    // Healthy: the webhook reached by URL (no Service routing without kube-proxy), the
    // replicas ready as the Deployment controller would report them.
    let (status_code, _) = api.delete(webhook_path).await.unwrap();
    assert_eq!(status_code, 200);
    api.must_create(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        &webhook_configuration(&control_plane),
    )
    .await;
    let deployment_status =
        "/apis/apps/v1/namespaces/tessera-system/deployments/tessera-control-plane/status";
    let ready =
        |n: u32| json!({ "status": { "replicas": 2, "readyReplicas": n, "availableReplicas": n } });
    let (code, answer) = api.merge_patch(deployment_status, &ready(2)).await.unwrap();
    assert_eq!(code, 200, "{answer}");
    let (ok, checks) = check(&api, &[]);
    let failing: Vec<_> = checks.values().filter(|c| c["status"] != "ok").collect();
    assert!(ok && failing.is_empty(), "{failing:#?}");
    assert!(
        status(&checks, "the webhook is reachable").1["detail"]
            .as_str()
            .unwrap()
            .contains("got the sidecar")
    );

    // Each failure, named.
    let role = "/apis/rbac.authorization.k8s.io/v1/clusterroles/tessera-control-plane";
    let (_, mut cluster_role) = api.get(role).await.unwrap();
    let rules = cluster_role["rules"].as_array_mut().unwrap();
    rules.retain(|r| r["resourceNames"] != json!(["tessera-sidecar-injector"]));
    let (code, answer) = api
        .merge_patch(role, &json!({ "rules": rules }))
        .await
        .unwrap();
    assert_eq!(code, 200, "{answer}");
    api.merge_patch(deployment_status, &ready(0)).await.unwrap();
    api.delete("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/routepolicies.tessera.dev")
        .await
        .unwrap();
    drop(control_plane);
    api.delete("/api/v1/namespaces/shop/configmaps/tessera-ca-root-cert")
        .await
        .unwrap();
    let (ok, checks) = check(&api, &[]);
    assert!(!ok);
    let (state, crds) = status(&checks, "the tessera.dev CRDs");
    assert_eq!(
        (state, crds["detail"].as_str().unwrap()),
        ("error", "missing: routepolicies.tessera.dev")
    );
    assert_eq!(
        status(&checks, "the control plane's replicas are ready").0,
        "error"
    );
    let (state, rbac) = status(&checks, "the control plane's service account may");
    assert_eq!(state, "error");
    assert!(rbac["detail"].as_str().unwrap().contains("patch mutatingwebhookconfigurations.admissionregistration.k8s.io tessera-sidecar-injector"), "{rbac}");
    let (state, injection) = status(&checks, "the webhook is reachable");
    assert_eq!(state, "error");
    assert!(
        injection["detail"].as_str().unwrap().contains("refused"),
        "{injection}"
    );
    let (state, maps) = status(&checks, "every meshed namespace holds the current root");
    assert_eq!(state, "error");
    assert!(maps["detail"].as_str().unwrap().contains("shop"), "{maps}");

    // A caBundle that is not the root.
    let (_, mut webhook) = api.get(webhook_path).await.unwrap();
    webhook["webhooks"][0]["clientConfig"]["caBundle"] = base64_of(&other_certificate()).into();
    let (code, answer) = api
        .merge_patch(webhook_path, &json!({ "webhooks": webhook["webhooks"] }))
        .await
        .unwrap();
    assert_eq!(code, 200, "{answer}");
    let (_, checks) = check(&api, &[]);
    let (state, bundle_check) = status(&checks, "the webhook's caBundle is the mesh root");
    assert_eq!(state, "error");
    assert!(
        bundle_check["detail"]
            .as_str()
            .unwrap()
            .contains("other certificates"),
        "{bundle_check}"
    );

    // Another version running, a CRD changed by hand, no webhook configuration, and a
    // plug-in CA near its end (`tessera ca create`: a root for 20 days, ‼, and an
    // intermediate for 5, ×), mounted as the chart mounts one.
    let ca_dir = dir.path().join("short");
    let (cacerts, root_dir) = (ca_dir.join("cacerts"), ca_dir.join("root"));
    let created = run(
        &binary("tessera"),
        &[
            "ca",
            "create",
            "--out",
            cacerts.to_str().unwrap(),
            "--root-dir",
            root_dir.to_str().unwrap(),
            "--root-validity",
            "20d",
            "--intermediate-validity",
            "5d",
        ],
    );
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let from_file = |name: &str| format!("--from-file={}", cacerts.join(name).display());
    let files = [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ]
    .map(from_file);
    let mut create_secret = vec![
        "-n",
        "tessera-system",
        "create",
        "secret",
        "generic",
        "short-ca",
    ];
    create_secret.extend(files.iter().map(String::as_str));
    let kubectl_ok = |args: &[&str]| {
        let output = kubectl(&kubectl_path, &api, args);
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    kubectl_ok(&create_secret);
    kubectl_ok(&[
        "-n",
        "tessera-system",
        "patch",
        "deployment",
        "tessera-control-plane",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/template/spec/volumes/-","value":{"name":"ca","secret":{"secretName":"short-ca"}}},
            {"op":"replace","path":"/spec/template/spec/containers/0/image","value":"ghcr.io/tessera-mesh/tessera:0.0.9"}]"#,
    ]);
    let crds = repository().join("deploy/kubernetes/crds.yaml");
    kubectl_ok(&["apply", "--server-side", "-f", crds.to_str().unwrap()]);
    kubectl_ok(&[
        "patch",
        "crd",
        "workloads.tessera.dev",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/versions/0/schema/openAPIV3Schema/description","value":"edited by hand"}]"#,
    ]);
    kubectl_ok(&[
        "delete",
        "mutatingwebhookconfiguration",
        "tessera-sidecar-injector",
    ]);
    let (ok, checks) = check(&api, &[]);
    assert!(!ok);
    let (state, crds) = status(&checks, "the tessera.dev CRDs");
    assert_eq!(state, "warning", "{crds}");
    assert!(
        crds["detail"]
            .as_str()
            .unwrap()
            .ends_with("workloads.tessera.dev"),
        "{crds}"
    );
    let (state, version) = status(&checks, "the control plane runs this version");
    assert_eq!(state, "warning");
    assert!(
        version["detail"].as_str().unwrap().contains(":0.0.9"),
        "{version}"
    );
    assert_eq!(
        status(&checks, "the webhook configuration exists").0,
        "error"
    );
    let (state, root) = status(&checks, "the root ");
    assert_eq!(state, "warning", "{root}");
    assert!(
        root["detail"].as_str().unwrap().contains("in 19 days"),
        "{root}"
    );
    let (state, issuer) = status(&checks, "the issuer ");
    assert_eq!(state, "error", "{issuer}");
    assert!(
        issuer["detail"].as_str().unwrap().contains("in 4 days"),
        "{issuer}"
    );

    // --pre on an installed cluster: the namespace is in use.
    let (_, checks) = check(&api, &["--pre"]);
    assert_eq!(status(&checks, "the namespace tessera-system").0, "warning");
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A self-signed certificate that is not the mesh's.
fn other_certificate() -> String {
    rcgen::generate_simple_self_signed(vec!["elsewhere.example".to_string()])
        .expect("certificate")
        .cert
        .pem()
}
