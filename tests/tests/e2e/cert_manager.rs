//! A CA made by `tessera ca create`, served as cert-manager writes a `kubernetes.io/tls`
//! Secret and the kubelet mounts it: renewed in place, it signs new certificates without
//! a restart while workloads certified before keep working; a broken renewal is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tessera_tests::certs::csr;
use tessera_tests::*;

/// `tessera ca create`; returns its report.
fn ca_create(out: &Path, root_dir: &Path, extra: &[&str]) -> String {
    let output = Command::new(binary("tessera"))
        .args(["ca", "create", "--out"])
        .arg(out)
        .arg("--root-dir")
        .arg(root_dir)
        .args(extra)
        .output()
        .expect("run tessera ca create");
    let report = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    report
}

/// One version of the Secret, as the kubelet's atomic writer publishes it: the files in
/// a timestamped directory (mode 0400, the volume's `defaultMode`), `..data` swapped to
/// it with a rename, and each key a link through `..data`.
fn publish_secret(volume: &Path, version: &str, tls_crt: &str, tls_key: &str, ca_crt: &str) {
    let dir = volume.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in [
        ("tls.crt", tls_crt),
        ("tls.key", tls_key),
        ("ca.crt", ca_crt),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    let staged = volume.join("..data_tmp");
    std::os::unix::fs::symlink(version, &staged).unwrap();
    std::fs::rename(&staged, volume.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key", "ca.crt"] {
        let link = volume.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

/// The Secret's three keys from a `tessera ca create` directory, as cert-manager's CA
/// issuer fills them: the intermediate followed by the root, its key, the root.
fn secret_keys(cacerts: &Path) -> (String, String, String) {
    let read = |name: &str| std::fs::read_to_string(cacerts.join(name)).unwrap();
    (
        read("cert-chain.pem"),
        read("ca-key.pem"),
        read("root-cert.pem"),
    )
}

fn der(pem: &str) -> Vec<Vec<u8>> {
    tessera_mesh::tls::certs_from_pem(pem.as_bytes())
        .unwrap()
        .into_iter()
        .map(|c| c.to_vec())
        .collect()
}

/// A certificate for `service_account` from the control plane: its chain, leaf first.
async fn certify(control_plane: &ControlPlane, service_account: &str) -> Vec<Vec<u8>> {
    tessera_tests::grpc::certify(
        &control_plane.address(),
        &control_plane.trust_bundle_file(),
        csr(&[&spiffe(service_account)], false),
        &control_plane.token(service_account, "10m"),
    )
    .await
    .expect("certificate issued")
    .cert_chain_der
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cert_manager_intermediate_renewed_in_place_signs_without_a_restart() {
    init();
    let scratch = TempDir::new("cert-manager");
    let (cacerts, root) = (scratch.path().join("cacerts"), scratch.path().join("root"));
    let report = ca_create(&cacerts, &root, &[]);
    assert!(
        report.contains("SHA-256 fingerprint:") && report.contains("expires:"),
        "{report}"
    );
    let (first_chain, first_key, root_pem) = secret_keys(&cacerts);
    let first_intermediate = der(&first_chain).remove(0);

    let volume = scratch.path().join("tessera-ca");
    std::fs::create_dir_all(&volume).unwrap();
    publish_secret(
        &volume,
        "..2026_12_05_01_02_03.123",
        &first_chain,
        &first_key,
        &root_pem,
    );
    let control_plane = ControlPlane::start(
        "1h",
        &format!(
            "  certificateAuthority:\n    pluginCertsDir: {}\n",
            volume.display()
        ),
    )
    .await;
    control_plane
        .process
        .logs
        .wait_for(
            &["using plug-in CA", "cert-manager Secret"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(
        certify(&control_plane, "before").await[1],
        first_intermediate
    );

    // Workloads certified by the first intermediate.
    let echo = EchoServer::start().await;
    let ProxyPair { server, client } =
        ProxyPair::start(&control_plane, echo.address, &["server"]).await;
    let payload = random_payload(16 * 1024);
    assert!(echo_roundtrip(client.outbound(0), &payload).await.unwrap() == payload);

    // cert-manager renews the intermediate (same root, new key); the kubelet swaps
    // `..data`.
    let renewal = ca_create(&cacerts, &root, &["--force"]);
    assert!(renewal.contains("root (existing)"), "{renewal}");
    let (second_chain, second_key, same_root) = secret_keys(&cacerts);
    assert_eq!(same_root, root_pem);
    let second_intermediate = der(&second_chain).remove(0);
    assert_ne!(second_intermediate, first_intermediate);
    publish_secret(
        &volume,
        "..2026_12_05_02_03_04.456",
        &second_chain,
        &second_key,
        &root_pem,
    );
    control_plane
        .process
        .logs
        .wait_for(&["plug-in CA reloaded"], Duration::from_secs(5))
        .await
        .unwrap();
    let renewed = certify(&control_plane, "after").await;
    assert_eq!(renewed[1], second_intermediate);

    // Old workloads keep working, and with a workload certified by the new intermediate.
    assert!(echo_roundtrip(client.outbound(0), &payload).await.unwrap() == payload);
    let newcomer = control_plane.proxy(
        "newcomer",
        None,
        &[Upstream::fixed(server.inbound(), spiffe("server"))],
    );
    newcomer.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert!(
        echo_roundtrip(newcomer.outbound(0), &payload)
            .await
            .unwrap()
            == payload
    );

    // A renewal whose key is not its certificate's is refused; the CA in force stays.
    let third = scratch.path().join("third");
    ca_create(&third, &root, &[]);
    let (third_chain, _, _) = secret_keys(&third);
    publish_secret(
        &volume,
        "..2026_12_05_03_04_05.789",
        &third_chain,
        &first_key,
        &root_pem,
    );
    control_plane
        .process
        .logs
        .wait_for(
            &[
                "plug-in CA not reloaded",
                "tls.key is not the key of tls.crt",
            ],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(
        certify(&control_plane, "later").await[1],
        second_intermediate
    );
    assert_eq!(
        control_plane.process.logs.count(&["control plane started"]),
        1,
        "no restart"
    );
}

/// In cluster mode, the Secret renewed under a new root: the state directory's bundle,
/// the root ConfigMap of a meshed namespace and the webhook's `caBundle` hold the old and
/// the new root together, while the old intermediate keeps signing until the new root
/// has reached every proxy (one certificate lifetime).
#[tokio::test(flavor = "multi_thread")]
async fn a_new_root_is_published_beside_the_old_one_in_the_cluster() {
    use base64::Engine as _;
    use serde_json::{Value, json};

    init();
    let Some(api) = tessera_tests::kube::ApiServer::start().await else {
        return;
    };
    api.must_create(
        "/api/v1/namespaces",
        &json!({ "apiVersion": "v1", "kind": "Namespace",
                 "metadata": { "name": "shop", "labels": { "tessera.dev/inject": "enabled" } } }),
    )
    .await;
    let shipped = crate::kubernetes::shipped_webhook_configuration();
    api.must_create(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        &shipped,
    )
    .await;

    let scratch = TempDir::new("cert-manager-root");
    let dir = |name: &str| scratch.path().join(name);
    ca_create(&dir("old"), &dir("old-root"), &[]);
    let (old_chain, old_key, old_root) = secret_keys(&dir("old"));
    let volume = dir("tessera-ca");
    std::fs::create_dir_all(&volume).unwrap();
    publish_secret(
        &volume,
        "..2026_12_05_01_02_03.123",
        &old_chain,
        &old_key,
        &old_root,
    );
    let control_plane = ControlPlane::start_in_cluster_with_spec(
        &api.control_plane_kubeconfig().await,
        &format!(
            "  certificateAuthority:\n    pluginCertsDir: {}\n",
            volume.display()
        ),
    )
    .await;
    const MAP: &str = "/api/v1/namespaces/shop/configmaps/tessera-ca-root-cert";
    let holds = |pem: String| {
        move |status: u16, map: &Value| {
            status == 200 && map["data"]["root-cert.pem"] == pem.as_str()
        }
    };
    api.eventually(MAP, Duration::from_secs(10), holds(old_root.clone()))
        .await
        .expect("the old root published");

    ca_create(&dir("new"), &dir("new-root"), &[]);
    let (new_chain, new_key, new_root) = secret_keys(&dir("new"));
    publish_secret(
        &volume,
        "..2026_12_05_02_03_04.456",
        &new_chain,
        &new_key,
        &new_root,
    );
    control_plane
        .process
        .logs
        .wait_for(&["new root announced"], Duration::from_secs(5))
        .await
        .unwrap();
    let both = format!("{old_root}{new_root}");
    api.eventually(MAP, Duration::from_secs(5), holds(both.clone()))
        .await
        .expect("both roots published in the meshed namespace");
    let bundle = base64::engine::general_purpose::STANDARD.encode(&both);
    api.eventually(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/tessera-sidecar-injector",
        Duration::from_secs(5),
        |_, configuration| configuration["webhooks"][0]["clientConfig"]["caBundle"] == bundle.as_str(),
    )
    .await
    .expect("the webhook's caBundle holds both roots");
    assert_eq!(
        std::fs::read_to_string(control_plane.trust_bundle_file()).unwrap(),
        both
    );
    // Not signing with the new root yet: proxies have not all been told of it.
    let chain = certify(&control_plane, "orders").await;
    assert_eq!(chain[1], der(&old_chain)[0]);
}
