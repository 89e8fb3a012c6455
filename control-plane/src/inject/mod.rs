//! Sidecar injection: the one mutation behind both `tessera inject` (files) and the
//! admission webhook (pods at creation).
//!
//! Objects stay `serde_json::Value`s so fields this code does not know — newer API
//! versions, other tools' additions — survive untouched; only what injection adds is
//! built with typed k8s-openapi structs. `annotations` reads the owner's choices,
//! `probes` reroutes HTTP, gRPC and TCP probes through the proxy (and says which it
//! left), `sidecar` builds what is added, `manifests` handles multi-document YAML for
//! the CLI.

pub mod annotations;
pub mod manifests;
pub mod probes;
pub mod sidecar;

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use annotations::{Annotations, InjectChoice};
use probes::ProbeReport;
pub use sidecar::{INIT_CONTAINER, PROXY_CONTAINER};

/// The default control plane address, as `deploy/kubernetes` installs it.
pub const DEFAULT_CONTROL_PLANE_ADDRESS: &str = "tessera-control-plane.tessera-system.svc:15012";

/// What to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub proxy_image: String,
    /// `host:port` of the control plane's gRPC endpoint, as proxies will dial it.
    pub control_plane_address: String,
    /// The mesh's trust domain: the proxy's SPIFFE ID and the control plane's it expects.
    pub trust_domain: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            proxy_image: default_proxy_image(),
            control_plane_address: DEFAULT_CONTROL_PLANE_ADDRESS.into(),
            trust_domain: tessera_mesh::spiffe::DEFAULT_TRUST_DOMAIN.into(),
        }
    }
}

/// The proxy image released with this version of the control plane.
pub fn default_proxy_image() -> String {
    concat!(
        "ghcr.io/tessera-mesh/tessera-proxy:",
        env!("CARGO_PKG_VERSION")
    )
    .to_string()
}

/// Why an object was left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Not a kind that runs pods (Service, ConfigMap, …).
    NotAWorkload,
    /// `tessera.dev/inject: "false"`.
    OptedOut,
    /// `hostNetwork: true`.
    HostNetwork,
    /// It already has a `tessera-proxy` init container.
    AlreadyInjected,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SkipReason::NotAWorkload => "not a workload",
            SkipReason::OptedOut => "opted out (tessera.dev/inject: \"false\")",
            SkipReason::HostNetwork => "host network",
            SkipReason::AlreadyInjected => "already injected",
        })
    }
}

/// What injection did to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(SkipReason),
}

/// What injection did to an object, and to each probe of its pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    pub outcome: Outcome,
    /// One per probe found, in container order; empty unless injected.
    pub probes: Vec<ProbeReport>,
}

impl Injection {
    fn skipped(reason: SkipReason) -> Self {
        Self {
            outcome: Outcome::Skipped(reason),
            probes: Vec::new(),
        }
    }
}

/// Why an object cannot be injected. The object is then left unchanged.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {annotation}: {value:?} is not valid: {reason}")]
    InvalidAnnotation {
        annotation: &'static str,
        value: String,
        reason: String,
    },
    #[error("{path} must be {expected}")]
    Malformed {
        path: String,
        expected: &'static str,
    },
    #[error("{path} already has {name:?}, a name reserved for the Tessera sidecar")]
    ReservedName { path: String, name: String },
    #[error("cannot build the sidecar: {0}")]
    Internal(String),
    /// In an item of a `List`.
    #[error("items[{index}] ({object}): {source}")]
    InItem {
        index: usize,
        object: String,
        source: Box<InjectError>,
    },
}

/// Injects the sidecar into a Pod or into the pod template of a workload (Deployment,
/// StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob), or into
/// each item of a `List` (what `kubectl get -o yaml` prints for several objects); any
/// other object is `Skipped(NotAWorkload)`. On error `object` is unchanged.
pub fn inject_object(object: &mut Value, options: &Options) -> Result<Outcome, InjectError> {
    inject_object_reporting(object, options).map(|injection| injection.outcome)
}

/// [`inject_object`], with what was done to each probe.
pub fn inject_object_reporting(
    object: &mut Value,
    options: &Options,
) -> Result<Injection, InjectError> {
    if is_list(object) {
        return inject_list(object, options);
    }
    match pod_template_path(object) {
        Some(template_path) => inject_template(object, template_path, options),
        None => Ok(Injection::skipped(SkipReason::NotAWorkload)),
    }
}

fn is_list(object: &Value) -> bool {
    object.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && object.get("kind").and_then(Value::as_str) == Some("List")
}

/// Injected if any item was; else why the first workload among them was skipped.
fn inject_list(list: &mut Value, options: &Options) -> Result<Injection, InjectError> {
    let Some(items) = list.get_mut("items").and_then(Value::as_array_mut) else {
        return Ok(Injection::skipped(SkipReason::NotAWorkload));
    };
    // On a copy, so an error in a later item leaves the earlier ones unchanged too.
    let mut draft = items.clone();
    let mut outcomes = Vec::with_capacity(draft.len());
    let mut probes = Vec::new();
    for (index, item) in draft.iter_mut().enumerate() {
        let injection =
            inject_object_reporting(item, options).map_err(|source| InjectError::InItem {
                index,
                object: describe(item),
                source: Box::new(source),
            })?;
        let item = format!("items[{index}] ({})", describe(item));
        probes.extend(injection.probes.into_iter().map(|probe| ProbeReport {
            item: Some(item.clone()),
            ..probe
        }));
        outcomes.push(injection.outcome);
    }
    *items = draft;
    let outcome = if outcomes.contains(&Outcome::Injected) {
        Outcome::Injected
    } else {
        outcomes
            .into_iter()
            .find(|o| *o != Outcome::Skipped(SkipReason::NotAWorkload))
            .unwrap_or(Outcome::Skipped(SkipReason::NotAWorkload))
    };
    Ok(Injection { outcome, probes })
}

/// `Deployment/web`, or the kind alone, or `object`: how errors and reports name it.
pub fn describe(object: &Value) -> String {
    let kind = object.get("kind").and_then(Value::as_str);
    let name = object
        .get("metadata")
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str);
    match (kind, name) {
        (Some(kind), Some(name)) => format!("{kind}/{name}"),
        (Some(kind), None) => kind.to_string(),
        _ => "object".to_string(),
    }
}

/// Injects the sidecar into a Pod, whatever its `kind` field says (the webhook knows
/// the kind from the request). On error `pod` is unchanged.
pub fn inject_pod(pod: &mut Value, options: &Options) -> Result<Outcome, InjectError> {
    inject_pod_reporting(pod, options).map(|injection| injection.outcome)
}

/// [`inject_pod`], with what was done to each probe.
pub fn inject_pod_reporting(pod: &mut Value, options: &Options) -> Result<Injection, InjectError> {
    inject_template(pod, "", options)
}

fn inject_template(
    object: &mut Value,
    template_path: &str,
    options: &Options,
) -> Result<Injection, InjectError> {
    let template = object
        .pointer_mut(template_path)
        .and_then(Value::as_object_mut)
        .ok_or_else(|| malformed(&dotted(template_path), "an object"))?;
    let base = dotted(&format!("{template_path}/spec"));
    let Some(spec) = template.get("spec") else {
        return Err(malformed(&base, "an object"));
    };
    // Injection works on a copy, swapped in only when complete: never half-injected.
    let mut draft = spec.clone();
    let injection = inject_pod_spec(template.get("metadata"), &mut draft, &base, options)?;
    if injection.outcome == Outcome::Injected {
        template.insert("spec".into(), draft);
    }
    Ok(injection)
}

/// Where the pod (template) of a kind lives, as a JSON pointer; `None` for kinds that
/// run no pods. The API group is checked too: a CRD of another group may well be
/// called `Deployment`, and its schema is not ours to guess.
fn pod_template_path(object: &Value) -> Option<&'static str> {
    let kind = object.get("kind")?.as_str()?;
    let api_version = object.get("apiVersion")?.as_str()?;
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    match (group, kind) {
        ("", "Pod") => Some(""),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("", "ReplicationController")
        | ("batch", "Job") => Some("/spec/template"),
        ("batch", "CronJob") => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn inject_pod_spec(
    metadata: Option<&Value>,
    spec: &mut Value,
    base: &str,
    options: &Options,
) -> Result<Injection, InjectError> {
    let annotations = Annotations::of(metadata);
    if annotations.inject_choice()? == InjectChoice::OptOut {
        return Ok(Injection::skipped(SkipReason::OptedOut));
    }
    let spec = spec
        .as_object_mut()
        .ok_or_else(|| malformed(base, "an object"))?;
    // The proxy would capture the node's traffic, not the pod's, and every such pod
    // on a node would fight over ports 15001/15006/15020.
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Injection::skipped(SkipReason::HostNetwork));
    }
    if names(spec, "initContainers", base)?.contains(&PROXY_CONTAINER) {
        return Ok(Injection::skipped(SkipReason::AlreadyInjected));
    }
    let exclusions = annotations.exclusions()?;
    refuse_reserved_names(spec, base)?;

    let containers = spec
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| malformed(&format!("{base}.containers"), "a list of containers"))?;
    let rewritten = probes::rewrite(containers, &exclusions.inbound_ports);
    let labels = labels_of(metadata, base)?;
    let added = [
        to_value(&sidecar::init_container(options, &exclusions))?,
        to_value(&sidecar::proxy_container(
            options,
            &labels,
            &rewritten.app_probes,
        )?)?,
    ];
    // First, so the capture is in place and the proxy ready before any app container,
    // including the app's own init containers, opens a connection.
    list_mut(spec, "initContainers", base)?.splice(0..0, added);
    for volume in sidecar::volumes() {
        list_mut(spec, "volumes", base)?.push(to_value(&volume)?);
    }
    Ok(Injection {
        outcome: Outcome::Injected,
        probes: rewritten.reports,
    })
}

/// The pod's labels, which its proxy's policies may select by (`matchLabels`).
fn labels_of(
    metadata: Option<&Value>,
    base: &str,
) -> Result<BTreeMap<String, String>, InjectError> {
    let Some(labels) = metadata.and_then(|m| m.get("labels")) else {
        return Ok(BTreeMap::new());
    };
    // `base` is the pod spec's path; the metadata is its sibling.
    let field = || format!("{}metadata.labels", base.strip_suffix("spec").unwrap_or(""));
    let labels = labels
        .as_object()
        .ok_or_else(|| malformed(&field(), "a map of strings"))?;
    labels
        .iter()
        .map(|(key, value)| match value.as_str() {
            Some(value) => Ok((key.clone(), value.to_string())),
            None => Err(malformed(&format!("{}.{key}", field()), "a string")),
        })
        .collect()
}

fn refuse_reserved_names(spec: &Map<String, Value>, base: &str) -> Result<(), InjectError> {
    let reserved = [
        ("initContainers", &sidecar::RESERVED_CONTAINERS),
        ("containers", &sidecar::RESERVED_CONTAINERS),
        ("volumes", &sidecar::RESERVED_VOLUMES),
    ];
    for (field, reserved_names) in reserved {
        if let Some(name) = names(spec, field, base)?
            .into_iter()
            .find(|name| reserved_names.contains(name))
        {
            return Err(InjectError::ReservedName {
                path: format!("{base}.{field}"),
                name: name.to_string(),
            });
        }
    }
    Ok(())
}

/// The `name`s of a list of named items (containers, volumes); empty when absent.
fn names<'a>(
    spec: &'a Map<String, Value>,
    field: &str,
    base: &str,
) -> Result<Vec<&'a str>, InjectError> {
    match spec.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items
            .iter()
            .filter_map(|item| item.get("name").and_then(Value::as_str))
            .collect()),
        Some(_) => Err(malformed(&format!("{base}.{field}"), "a list")),
    }
}

/// A list field, created empty when absent.
fn list_mut<'a>(
    spec: &'a mut Map<String, Value>,
    field: &str,
    base: &str,
) -> Result<&'a mut Vec<Value>, InjectError> {
    let value = spec
        .entry(field)
        .and_modify(|v| {
            if v.is_null() {
                *v = Value::Array(Vec::new());
            }
        })
        .or_insert_with(|| Value::Array(Vec::new()));
    value
        .as_array_mut()
        .ok_or_else(|| malformed(&format!("{base}.{field}"), "a list"))
}

fn to_value(item: &impl serde::Serialize) -> Result<Value, InjectError> {
    serde_json::to_value(item).map_err(|e| InjectError::Internal(e.to_string()))
}

fn malformed(path: &str, expected: &'static str) -> InjectError {
    InjectError::Malformed {
        path: path.to_string(),
        expected,
    }
}

/// `/spec/template/spec` → `spec.template.spec`, as `kubectl explain` names fields.
fn dotted(pointer: &str) -> String {
    let path = pointer.trim_start_matches('/').replace('/', ".");
    if path.is_empty() { ".".into() } else { path }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(spec: Value) -> Value {
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p" }, "spec": spec })
    }

    #[test]
    fn refuses_reserved_names_and_malformed_specs_leaving_the_object_unchanged() {
        let cases = [
            (
                pod(json!({ "containers": [{ "name": "tessera-init" }] })),
                "spec.containers already has \"tessera-init\"",
            ),
            (
                pod(
                    json!({ "containers": [{ "name": "a" }], "volumes": [{ "name": "tessera-token" }] }),
                ),
                "spec.volumes already has \"tessera-token\"",
            ),
            (
                pod(json!({ "containers": "a" })),
                "spec.containers must be a list",
            ),
            (
                pod(json!({})),
                "spec.containers must be a list of containers",
            ),
            (
                json!({ "apiVersion": "apps/v1", "kind": "Deployment", "spec": {} }),
                "spec.template must be an object",
            ),
            (
                json!({ "apiVersion": "apps/v1", "kind": "Deployment", "spec": { "template": {
                    "metadata": { "labels": { "app": 7 } },
                    "spec": { "containers": [{ "name": "a" }] } } } }),
                "spec.template.metadata.labels.app must be a string",
            ),
            (
                json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "labels": ["app"] },
                        "spec": { "containers": [{ "name": "a" }] } }),
                "metadata.labels must be a map of strings",
            ),
        ];
        for (mut object, message) in cases {
            let before = object.clone();
            let error = inject_object(&mut object, &Options::default()).unwrap_err();
            assert!(error.to_string().contains(message), "{error}");
            assert_eq!(object, before);
        }
    }

    /// The pod template's labels are the proxy's: its policies select by them.
    #[test]
    fn the_pod_labels_reach_the_proxy_configuration() {
        let mut deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "labels": { "owner": "x" } },
            "spec": { "template": {
                "metadata": { "labels": { "app": "orders", "version": "v2" } },
                "spec": { "containers": [{ "name": "a" }] } } }
        });
        inject_object(&mut deployment, &Options::default()).unwrap();
        let proxy = &deployment["spec"]["template"]["spec"]["initContainers"][1];
        let config = proxy["env"][2]["value"].as_str().unwrap();
        let config: Value = serde_saphyr::from_str(config).unwrap();
        assert_eq!(
            config["labels"],
            json!({ "app": "orders", "version": "v2" })
        );
    }

    /// The exclusion annotation reaches the probe rewrite, and the probes of a `List`'s
    /// items are reported with the item they belong to.
    #[test]
    fn probe_reports_follow_exclusions_and_name_list_items() {
        let item = |name: &str, excluded: &str| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": name, "annotations": { "tessera.dev/exclude-inbound-ports": excluded } },
                "spec": { "containers": [{ "name": "db", "livenessProbe": { "tcpSocket": { "port": 5432 } } }] }
            })
        };
        let mut list = json!({
            "apiVersion": "v1", "kind": "List",
            "items": [item("a", "5432"), item("b", "")]
        });
        let injection = inject_object_reporting(&mut list, &Options::default()).unwrap();
        let lines: Vec<String> = injection.probes.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "items[0] (Pod/a): left db/livenessProbe (tcpSocket :5432, port excluded from capture)",
                "items[1] (Pod/b): rewrote db/livenessProbe (tcpSocket :5432) → :15020/app-health/db/livez",
            ]
        );

        // Skipped objects report no probes: nothing was rewritten.
        let mut opted_out = item("c", "");
        opted_out["metadata"]["annotations"]["tessera.dev/inject"] = json!("false");
        let injection = inject_object_reporting(&mut opted_out, &Options::default()).unwrap();
        assert_eq!(injection.outcome, Outcome::Skipped(SkipReason::OptedOut));
        assert!(injection.probes.is_empty());
    }

    #[test]
    fn only_known_groups_are_workloads() {
        let mut foreign = json!({
            "apiVersion": "example.com/v1", "kind": "Deployment",
            "spec": { "template": { "spec": { "containers": [{ "name": "a" }] } } }
        });
        let before = foreign.clone();
        assert_eq!(
            inject_object(&mut foreign, &Options::default()).unwrap(),
            Outcome::Skipped(SkipReason::NotAWorkload)
        );
        assert_eq!(foreign, before);
    }

    #[test]
    fn an_error_in_a_list_item_names_it_and_changes_nothing() {
        let mut list = json!({
            "apiVersion": "v1", "kind": "List",
            "items": [
                pod(json!({ "containers": [{ "name": "a" }] })),
                {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": { "name": "q", "annotations": { "tessera.dev/exclude-inbound-ports": "x" } },
                    "spec": { "containers": [{ "name": "b" }] }
                }
            ]
        });
        let before = list.clone();
        let error = inject_object(&mut list, &Options::default()).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("items[1] (Pod/q): annotation tessera.dev/exclude-inbound-ports"),
            "{error}"
        );
        assert_eq!(list, before);
    }

    #[test]
    fn null_lists_are_treated_as_empty() {
        let mut object = pod(
            json!({ "containers": [{ "name": "a" }], "initContainers": null, "volumes": null }),
        );
        assert_eq!(
            inject_object(&mut object, &Options::default()).unwrap(),
            Outcome::Injected
        );
        assert_eq!(
            object["spec"]["initContainers"].as_array().unwrap().len(),
            2
        );
        assert_eq!(object["spec"]["volumes"].as_array().unwrap().len(), 2);
    }
}
