//! `tessera check`: the installed mesh, from the API — CRDs, the control plane's
//! replicas, version and RBAC, the CA's root and issuer, the webhook (its caBundle and a
//! dry-run injection), every meshed namespace's root ConfigMap, and the proxies.

use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt as _, Limited};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};
use tessera_mesh::tls;

use super::{CONTROL_PLANE, Check, NAMESPACE, WEBHOOK, lifetime_check, not_after, subject};
use crate::inject::sidecar::{ADMIN_PORT, PROXY_CONTAINER};
use crate::kubernetes::{ca_secret, crds, root_cert};

const CRDS: &str = "tessera-crds";
const CONTROL: &str = "tessera-control-plane";
const IDENTITY: &str = "tessera-identity";
const INJECTION: &str = "tessera-webhook";
const PROXIES: &str = "tessera-proxies";

const VERSION: &str = env!("CARGO_PKG_VERSION");
const REAPPLY: &str =
    "apply the manifests again: tessera install | kubectl apply --server-side -f -";
/// At most this many proxies are asked for their certificates, each for at most this long.
const PROXIES_ASKED: usize = 100;
const PROXY_TIMEOUT: Duration = Duration::from_secs(3);
/// A proxy's `/certs` is a few hundred bytes.
const CERTS_BYTES: usize = 64 * 1024;

/// Every post-install check.
pub async fn run(client: &Client) -> Vec<Check> {
    let (mut checks, reached) = super::pre::api(client).await;
    if !reached {
        return checks;
    }
    checks.push(crds_current(client).await);
    let deployment = control_plane(client, &mut checks).await;
    checks.push(control_plane_access(client).await);
    let roots = certificate_authority(client, deployment.as_ref(), &mut checks).await;
    let selector = webhook_configuration(client, roots.as_deref(), &mut checks).await;
    let meshed = match meshed_namespaces(client, selector.as_ref()).await {
        Ok(meshed) => meshed,
        Err(error) => {
            checks.push(Check::error(
                INJECTION,
                "meshed namespaces can be listed",
                error.to_string(),
            ));
            return checks;
        }
    };
    checks.push(injection(client, &meshed).await);
    if let Some(roots) = &roots {
        checks.push(root_config_maps(client, &meshed, roots).await);
    }
    checks.extend(proxies(client, &meshed).await);
    checks
}

/// The control plane's Deployment: its replicas and version.
async fn control_plane(client: &Client, checks: &mut Vec<Check>) -> Option<Deployment> {
    let name = "the control plane is installed";
    match Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .get_opt(CONTROL_PLANE)
        .await
    {
        Ok(Some(deployment)) => {
            checks.push(replicas_ready(&deployment));
            checks.push(control_plane_version(&deployment));
            Some(deployment)
        }
        Ok(None) => {
            checks.push(
                Check::error(
                    CONTROL,
                    name,
                    format!("no Deployment {NAMESPACE}/{CONTROL_PLANE}"),
                )
                .hint("tessera install | kubectl apply --server-side -f -   (or helm install)"),
            );
            None
        }
        Err(error) => {
            checks.push(Check::error(CONTROL, name, error.to_string()));
            None
        }
    }
}

/// The lifetimes of the CA's roots and issuer; the roots, when they could be read.
async fn certificate_authority(
    client: &Client,
    deployment: Option<&Deployment>,
    checks: &mut Vec<Check>,
) -> Option<Vec<CertificateDer<'static>>> {
    let (roots, issuer) = match ca(client, deployment).await {
        Ok(found) => found,
        Err(check) => {
            checks.push(*check);
            return None;
        }
    };
    let now = SystemTime::now();
    for root in &roots {
        let what = format!("root {}", subject(root));
        checks.push(certificate_lifetime(IDENTITY, &what, root, now));
    }
    if !roots.contains(&issuer) {
        let what = format!("issuer {}", subject(&issuer));
        checks.push(certificate_lifetime(IDENTITY, &what, &issuer, now));
    }
    Some(roots)
}

/// The webhook configuration, its caBundle against the roots; its namespace selector.
async fn webhook_configuration(
    client: &Client,
    roots: Option<&[CertificateDer<'static>]>,
    checks: &mut Vec<Check>,
) -> Option<LabelSelector> {
    let name = "the webhook configuration exists";
    match Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(WEBHOOK)
        .await
    {
        Ok(Some(webhook)) => {
            if let Some(roots) = roots {
                checks.push(ca_bundle(&webhook, roots));
            }
            webhook
                .webhooks
                .and_then(|w| w.into_iter().next())
                .and_then(|w| w.namespace_selector)
        }
        Ok(None) => {
            checks.push(
                Check::error(
                    INJECTION,
                    name,
                    format!("no MutatingWebhookConfiguration {WEBHOOK}"),
                )
                .hint(REAPPLY),
            );
            None
        }
        Err(error) => {
            checks.push(Check::error(INJECTION, name, error.to_string()));
            None
        }
    }
}

async fn crds_current(client: &Client) -> Check {
    let name = "the tessera.dev CRDs are installed and current";
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let (mut missing, mut stale) = (Vec::new(), Vec::new());
    for expected in crds::definitions() {
        let crd_name = expected.metadata.name.clone().unwrap_or_default();
        match api.get_opt(&crd_name).await {
            Ok(Some(installed)) => {
                let established = installed
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if !established || schemas(&installed) != schemas(&expected) {
                    stale.push(crd_name);
                }
            }
            Ok(None) => missing.push(crd_name),
            Err(error) => return Check::error(CRDS, name, error.to_string()),
        }
    }
    if !missing.is_empty() {
        Check::error(CRDS, name, format!("missing: {}", missing.join(", "))).hint(REAPPLY)
    } else if !stale.is_empty() {
        Check::warning(
            CRDS,
            name,
            format!(
                "not this version's ({VERSION}) or not established: {}",
                stale.join(", ")
            ),
        )
        .hint(REAPPLY)
    } else {
        Check::ok(CRDS, name)
    }
}

/// Each served version's name and schema, as JSON (the API server adds defaults
/// elsewhere in the object, not in the schema).
fn schemas(crd: &CustomResourceDefinition) -> Vec<(String, Value)> {
    crd.spec
        .versions
        .iter()
        .map(|v| {
            (
                v.name.clone(),
                serde_json::to_value(&v.schema).unwrap_or(Value::Null),
            )
        })
        .collect()
}

fn replicas_ready(deployment: &Deployment) -> Check {
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let name = "the control plane's replicas are ready";
    let detail = format!("{ready}/{wanted} ready");
    let hint = format!(
        "kubectl -n {NAMESPACE} describe deployment {CONTROL_PLANE}; kubectl -n {NAMESPACE} logs deployment/{CONTROL_PLANE}"
    );
    if ready == 0 {
        Check::error(CONTROL, name, detail).hint(hint)
    } else if ready < wanted {
        Check::warning(CONTROL, name, detail).hint(hint)
    } else {
        Check::ok(CONTROL, name).detail(detail)
    }
}

fn control_plane_version(deployment: &Deployment) -> Check {
    let name = format!("the control plane runs this version ({VERSION})");
    let image = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    if image_tag(&image) == Some(VERSION) {
        Check::ok(CONTROL, name)
    } else {
        Check::warning(CONTROL, name, format!("its image is {image}"))
            .hint("upgrade: tessera install | kubectl apply --server-side -f -")
    }
}

/// `registry/name:tag` → `tag` (a digest is no version).
fn image_tag(image: &str) -> Option<&str> {
    let (_, last) = image.rsplit_once('/').unwrap_or(("", image));
    last.split_once(':')
        .map(|(_, tag)| tag)
        .filter(|_| !image.contains('@'))
}

async fn control_plane_access(client: &Client) -> Check {
    let name = "the control plane's service account may make every call it needs";
    let mut denied = Vec::new();
    for access in super::rbac::control_plane_needs() {
        match super::pre::review(client, NAMESPACE, CONTROL_PLANE, &access).await {
            Ok(true) => {}
            Ok(false) => denied.push(access.describe()),
            Err(error) => {
                return Check::error(CONTROL, name, format!("cannot ask the API: {error}"));
            }
        }
    }
    if denied.is_empty() {
        Check::ok(CONTROL, name)
    } else {
        Check::error(CONTROL, name, format!("denied: {}", denied.join(", "))).hint(REAPPLY)
    }
}

fn certificate_lifetime(
    group: &'static str,
    what: &str,
    cert: &CertificateDer<'_>,
    now: SystemTime,
) -> Check {
    match not_after(cert) {
        Ok(end) => lifetime_check(group, what, end, now),
        Err(error) => Check::error(group, format!("the {what} is readable"), error),
    }
}

/// The roots the mesh trusts and the certificate that signs workloads, from the CA
/// Secret the Deployment mounts (plug-in, either layout) or the development root.
async fn ca(
    client: &Client,
    deployment: Option<&Deployment>,
) -> Result<(Vec<CertificateDer<'static>>, CertificateDer<'static>), Box<Check>> {
    let plugin = deployment
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.volumes.as_ref())
        .and_then(|v| v.iter().find(|v| v.name == "ca"))
        .and_then(|v| v.secret.as_ref())
        .and_then(|s| s.secret_name.clone());
    let secret_name = plugin
        .clone()
        .unwrap_or_else(|| ca_secret::SECRET.to_string());
    let name = "the CA's certificates can be read";
    let fail =
        |detail: String, hint: &str| Box::new(Check::error(IDENTITY, name, detail).hint(hint));
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get_opt(&secret_name)
        .await
        .map_err(|e| fail(format!("Secret {NAMESPACE}/{secret_name}: {e}"), ""))?;
    let Some(secret) = secret else {
        let hint = if plugin.is_some() {
            "create it: tessera ca create, then kubectl -n tessera-system create secret generic <name> --from-file=<dir>"
        } else {
            "the first control-plane replica creates it when it starts: is one running?"
        };
        return Err(fail(format!("no Secret {NAMESPACE}/{secret_name}"), hint));
    };
    let data = secret.data.unwrap_or_default();
    let certs = |key: &str| -> Option<Vec<CertificateDer<'static>>> {
        data.get(key)
            .and_then(|ByteString(pem)| tls::certs_from_pem(pem).ok())
            .filter(|c| !c.is_empty())
    };
    let layouts: [(&str, &str); 2] = [("root-cert.pem", "ca-cert.pem"), ("ca.crt", "tls.crt")];
    for (roots_key, issuer_key) in layouts {
        if let (Some(roots), Some(mut issuer)) = (certs(roots_key), certs(issuer_key)) {
            return Ok((roots, issuer.remove(0)));
        }
    }
    if plugin.is_none()
        && let Some(mut root) = certs("ca-cert.pem")
    {
        let root = root.remove(0);
        return Ok((vec![root.clone()], root));
    }
    let keys: Vec<&String> = data.keys().collect();
    Err(fail(
        format!(
            "Secret {NAMESPACE}/{secret_name} holds {keys:?}: neither root-cert.pem + ca-cert.pem nor ca.crt + tls.crt"
        ),
        "see `tessera ca create --help` for the files the control plane reads",
    ))
}

fn ca_bundle(webhook: &MutatingWebhookConfiguration, roots: &[CertificateDer<'static>]) -> Check {
    let name = "the webhook's caBundle is the mesh root";
    let bundle = webhook
        .webhooks
        .as_ref()
        .and_then(|w| w.first())
        .and_then(|w| w.client_config.ca_bundle.as_ref())
        .map(|ByteString(pem)| pem.clone())
        .unwrap_or_default();
    if bundle.is_empty() {
        return Check::error(INJECTION, name, "the caBundle is empty, so the API server cannot call the webhook")
            .hint("the control plane sets it in cluster mode (--kubernetes): are its replicas running, and may they patch the webhook configuration?");
    }
    match tls::certs_from_pem(&bundle) {
        Ok(certs) if same_set(&certs, roots) => Check::ok(INJECTION, name),
        Ok(_) => Check::error(INJECTION, name, "the caBundle holds other certificates than the CA's roots")
            .hint("the control plane restores it within a second when it runs; something else writes it (a manifest with a caBundle?)"),
        Err(error) => Check::error(INJECTION, name, format!("the caBundle is not PEM: {error}")),
    }
}

fn same_set(a: &[CertificateDer<'_>], b: &[CertificateDer<'_>]) -> bool {
    a.iter().all(|c| b.contains(c)) && b.iter().all(|c| a.contains(c))
}

/// The namespaces the webhook's selector picks, by name.
async fn meshed_namespaces(
    client: &Client,
    selector: Option<&LabelSelector>,
) -> Result<Vec<String>, kube::Error> {
    let Some(selector) = selector.and_then(label_selector) else {
        return Ok(Vec::new());
    };
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await?;
    Ok(namespaces
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect())
}

/// A LabelSelector in the API's query syntax; `None` when it selects nothing we can say.
fn label_selector(selector: &LabelSelector) -> Option<String> {
    let mut terms: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.clone().unwrap_or_default().join(",");
        let key = &expression.key;
        terms.push(match expression.operator.as_str() {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} notin ({values})"),
            "Exists" => key.clone(),
            "DoesNotExist" => format!("!{key}"),
            _ => return None,
        });
    }
    (!terms.is_empty()).then(|| terms.join(","))
}

/// A dry-run pod in a meshed namespace: the API server calls the webhook (it has no side
/// effects), and the pod must come back with the sidecar.
async fn injection(client: &Client, meshed: &[String]) -> Check {
    let name = "the webhook is reachable and injects the sidecar";
    let Some(namespace) = meshed.first() else {
        return Check::warning(
            INJECTION,
            name,
            "no namespace is meshed yet, so nothing was tried",
        )
        .hint("kubectl label namespace <ns> tessera.dev/inject=enabled");
    };
    let pod: Pod = match serde_json::from_value(probe_pod()) {
        Ok(pod) => pod,
        Err(error) => return Check::error(INJECTION, name, error.to_string()),
    };
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    match Api::<Pod>::namespaced(client.clone(), namespace).create(&params, &pod).await {
        Ok(created) => {
            let spec = created.spec.unwrap_or_default();
            let injected = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .any(|c| c.name == PROXY_CONTAINER);
            if injected {
                Check::ok(INJECTION, name).detail(format!("a dry-run pod in {namespace} got the sidecar"))
            } else {
                Check::error(INJECTION, name, format!("a dry-run pod in {namespace} came back without the sidecar"))
                    .hint("is the webhook configuration's namespaceSelector the namespace's label, and its failurePolicy Ignore with the control plane down?")
            }
        }
        Err(error) => Check::error(INJECTION, name, format!("a dry-run pod in {namespace} was refused: {error}"))
            .hint(format!("kubectl -n {NAMESPACE} get pods; kubectl -n {NAMESPACE} logs deployment/{CONTROL_PLANE}")),
    }
}

/// The smallest pod the restricted Pod Security Standard admits.
fn probe_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "generateName": "tessera-check-", "labels": { "app": "tessera-check" } },
        "spec": {
            "containers": [{
                "name": "check",
                "image": "registry.k8s.io/pause:3.10",
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": 65532,
                    "allowPrivilegeEscalation": false,
                    "capabilities": { "drop": ["ALL"] },
                    "seccompProfile": { "type": "RuntimeDefault" }
                }
            }]
        }
    })
}

async fn root_config_maps(
    client: &Client,
    meshed: &[String],
    roots: &[CertificateDer<'static>],
) -> Check {
    let name = "every meshed namespace holds the current root";
    let mut wrong = Vec::new();
    for namespace in meshed {
        let map = Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .get_opt(root_cert::CONFIG_MAP)
            .await;
        let pem = match map {
            Ok(Some(map)) => map
                .data
                .unwrap_or_default()
                .remove(root_cert::CONFIG_MAP_KEY),
            Ok(None) => None,
            Err(error) => return Check::error(IDENTITY, name, format!("{namespace}: {error}")),
        };
        let current = pem
            .and_then(|pem| tls::certs_from_pem(pem.as_bytes()).ok())
            .is_some_and(|certs| same_set(&certs, roots));
        if !current {
            wrong.push(namespace.clone());
        }
    }
    if wrong.is_empty() {
        Check::ok(IDENTITY, name).detail(format!("{} meshed namespaces", meshed.len()))
    } else {
        Check::error(IDENTITY, name, format!("ConfigMap {} missing or stale in: {}", root_cert::CONFIG_MAP, wrong.join(", ")))
            .hint("the control plane publishes it (cluster mode): are its replicas running? New sidecars there cannot verify peers until it is back")
    }
}

/// A meshed pod's proxy: its version and what its admin `/certs` says.
struct Proxy {
    pod: String,
    image: String,
    certs: Result<Value, String>,
}

async fn proxies(client: &Client, meshed: &[String]) -> Vec<Check> {
    let mut found = Vec::new();
    for namespace in meshed {
        let pods = match Api::<Pod>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await
        {
            Ok(pods) => pods.items,
            Err(error) => {
                return vec![Check::error(
                    PROXIES,
                    "meshed pods can be listed",
                    error.to_string(),
                )];
            }
        };
        for pod in pods {
            let spec = pod.spec.clone().unwrap_or_default();
            let Some(proxy) = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|c| c.name == PROXY_CONTAINER)
            else {
                continue;
            };
            found.push((
                namespace.clone(),
                pod.metadata.name.clone().unwrap_or_default(),
                proxy.image.clone().unwrap_or_default(),
            ));
        }
    }
    let total = found.len();
    found.truncate(PROXIES_ASKED);
    let mut proxies = Vec::with_capacity(found.len());
    for (namespace, pod, image) in found {
        let certs = admin_certs(client, &namespace, &pod).await;
        proxies.push(Proxy {
            pod: format!("{namespace}/{pod}"),
            image,
            certs,
        });
    }
    vec![
        proxy_versions(&proxies, total),
        proxy_certificates(&proxies, SystemTime::now()),
    ]
}

/// The proxy's `/certs`, through the API server's pod proxy. A pod's admin port is the
/// pod's to answer: the answer is read up to [`CERTS_BYTES`] and for [`PROXY_TIMEOUT`].
async fn admin_certs(client: &Client, namespace: &str, pod: &str) -> Result<Value, String> {
    let path = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{ADMIN_PORT}/proxy/certs");
    let request = http::Request::get(path)
        .body(kube::client::Body::empty())
        .map_err(|e| e.to_string())?;
    let read = async {
        let response = client.send(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = Limited::new(response.into_body(), CERTS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("its /certs: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("its /certs answered {status}"));
        }
        serde_json::from_slice(&body).map_err(|_| "its /certs is not JSON".to_string())
    };
    tokio::time::timeout(PROXY_TIMEOUT, read)
        .await
        .map_err(|_| format!("no answer within {PROXY_TIMEOUT:?}"))?
}

fn proxy_versions(proxies: &[Proxy], total: usize) -> Check {
    let name = format!("the meshed pods' proxies run this version ({VERSION})");
    let other: Vec<String> = proxies
        .iter()
        .filter(|p| image_tag(&p.image) != Some(VERSION))
        .map(|p| format!("{} runs {}", p.pod, p.image))
        .collect();
    if other.is_empty() {
        Check::ok(PROXIES, name).detail(format!("{total} proxies"))
    } else {
        Check::warning(PROXIES, name, other.join("\n")).hint("restart those pods to inject the current proxy: kubectl rollout restart deployment -n <ns>")
    }
}

fn proxy_certificates(proxies: &[Proxy], now: SystemTime) -> Check {
    let name = "the meshed pods' proxies hold valid certificates";
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    let mut earliest: Option<SystemTime> = None;
    for proxy in proxies {
        let certs = match &proxy.certs {
            Ok(certs) => certs,
            Err(error) => {
                warnings.push(format!("{}: cannot read its /certs: {error}", proxy.pod));
                continue;
            }
        };
        let time = |field: &str| {
            certs[field]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
        };
        match (time("not_after"), time("renew_at")) {
            (Some(end), _) if end <= now => errors.push(format!(
                "{}: its certificate expired at {}",
                proxy.pod,
                humantime::format_rfc3339_seconds(end)
            )),
            (Some(end), Some(renew)) => {
                if now > renew + Duration::from_secs(3600) {
                    warnings.push(format!(
                        "{}: renewal overdue since {} (control plane unreachable?)",
                        proxy.pod,
                        humantime::format_rfc3339_seconds(renew)
                    ));
                }
                earliest = Some(earliest.map_or(end, |e| e.min(end)));
            }
            _ => warnings.push(format!("{}: holds no certificate yet", proxy.pod)),
        }
    }
    let hint = format!(
        "kubectl logs <pod> -c {PROXY_CONTAINER}; the control plane's logs say why a certificate was refused"
    );
    if !errors.is_empty() {
        errors.extend(warnings);
        Check::error(PROXIES, name, errors.join("\n")).hint(hint)
    } else if !warnings.is_empty() {
        Check::warning(PROXIES, name, warnings.join("\n")).hint(hint)
    } else {
        let detail = earliest.map_or_else(
            || "no proxies".to_string(),
            |e| {
                format!(
                    "the first expires at {}",
                    humantime::format_rfc3339_seconds(e)
                )
            },
        );
        Check::ok(PROXIES, name).detail(detail)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;
    use crate::check::Status;

    #[test]
    fn image_tags() {
        assert_eq!(
            image_tag("ghcr.io/tessera-mesh/tessera-proxy:0.1.0"),
            Some("0.1.0")
        );
        assert_eq!(image_tag("localhost:5000/tessera-proxy:1.2"), Some("1.2"));
        assert_eq!(image_tag("localhost:5000/tessera-proxy"), None);
        assert_eq!(image_tag("r/tessera-proxy:1@sha256:ab"), None);
    }

    #[test]
    fn selectors_in_query_syntax() {
        let selector = LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "tessera.dev/inject".into(),
                "enabled".into(),
            )])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "env".into(),
                operator: "NotIn".into(),
                values: Some(vec!["dev".into(), "test".into()]),
            }]),
        };
        assert_eq!(
            label_selector(&selector).unwrap(),
            "tessera.dev/inject=enabled,env notin (dev,test)"
        );
        assert_eq!(label_selector(&LabelSelector::default()), None);
    }

    fn proxy(pod: &str, certs: Result<Value, String>) -> Proxy {
        Proxy {
            pod: pod.into(),
            image: format!("r/tessera-proxy:{VERSION}"),
            certs,
        }
    }

    #[test]
    fn proxies_with_expired_or_stale_certificates_are_named() {
        let now = humantime::parse_rfc3339("2026-12-05T12:00:00Z").unwrap();
        let certs = |not_after: &str, renew_at: &str| {
            Ok(json!({ "not_after": not_after, "renew_at": renew_at }))
        };
        let healthy = proxy(
            "shop/web",
            certs("2026-12-06T00:00:00Z", "2026-12-05T20:00:00Z"),
        );
        assert_eq!(proxy_certificates(&[healthy], now).status, Status::Ok);

        let overdue = proxy(
            "shop/late",
            certs("2026-12-05T18:00:00Z", "2026-12-05T08:00:00Z"),
        );
        let check = proxy_certificates(&[overdue], now);
        assert_eq!(check.status, Status::Warning);
        assert!(
            check.detail.contains("shop/late: renewal overdue"),
            "{}",
            check.detail
        );

        let expired = proxy(
            "shop/old",
            certs("2026-12-05T11:00:00Z", "2026-12-05T05:00:00Z"),
        );
        let unreachable = proxy("shop/gone", Err("no answer".into()));
        let check = proxy_certificates(&[expired, unreachable], now);
        assert_eq!(check.status, Status::Error);
        assert!(
            check.detail.contains("shop/old: its certificate expired"),
            "{}",
            check.detail
        );
        assert!(
            check.detail.contains("shop/gone: cannot read"),
            "{}",
            check.detail
        );

        let garbage = proxy("shop/odd", Ok(json!({ "not_after": 5 })));
        assert_eq!(proxy_certificates(&[garbage], now).status, Status::Warning);
    }

    #[test]
    fn proxies_of_another_version_are_a_warning() {
        let mut old = proxy("shop/web", Ok(json!({})));
        old.image = "r/tessera-proxy:0.0.9".into();
        let check = proxy_versions(&[old], 1);
        assert_eq!(check.status, Status::Warning);
        assert!(check.detail.contains("shop/web runs r/tessera-proxy:0.0.9"));
        assert_eq!(
            proxy_versions(&[proxy("shop/web", Ok(json!({})))], 1).status,
            Status::Ok
        );
    }

    #[test]
    fn replicas() {
        let deployment = |wanted: i32, ready: i32| -> Deployment {
            serde_json::from_value(json!({
                "spec": { "replicas": wanted, "selector": {}, "template": {} },
                "status": { "readyReplicas": ready }
            }))
            .unwrap()
        };
        assert_eq!(replicas_ready(&deployment(2, 2)).status, Status::Ok);
        assert_eq!(replicas_ready(&deployment(2, 1)).status, Status::Warning);
        assert_eq!(replicas_ready(&deployment(2, 0)).status, Status::Error);
    }
}
