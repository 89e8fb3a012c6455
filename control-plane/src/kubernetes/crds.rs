//! The `tessera.dev/v1alpha1` custom resources: the kinds the file mode reads, as
//! Kubernetes objects.
//!
//! Each spec is the file mode's own type (`tessera_mesh`), so a policy means the same in a
//! file and in the cluster, and the CRD schema is generated from it: `deploy/kubernetes/
//! crds.yaml` is [`render`]'s output, checked in CI (`tessera crds`). The API server
//! refuses what the schema can judge (unknown enum values, unknown fields under strict
//! field validation, a malformed principal or duration) with the field named; what only
//! the control plane can judge goes to the object's `status.conditions`.
//!
//! `MeshConfig` is not a CRD: the trust domain and the CA are fixed when the control
//! plane starts (changing them re-issues every identity), so they are install-time
//! configuration (`--config`), not objects that change under a running mesh.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tessera_mesh::{policy, resources};

/// The API group of every kind (the derive below needs it as a literal).
pub const GROUP: &str = "tessera.dev";

/// What the control plane found in an object it watches, as Kubernetes conditions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One condition (`Accepted`): the meta/v1 Condition's fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339.
    pub last_transition_time: String,
}

/// Declares one namespaced kind whose spec is `$spec`, as is: kube's derive needs a struct
/// of its own, which `serde(transparent)` makes invisible on the wire and in the schema.
/// `$root` names the Rust type of the whole object (`kind` unless that is taken).
macro_rules! custom_resource {
    ($body:ident, $root:literal, $kind:literal, $short:literal, $spec:ty, $doc:literal) => {
        #[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[kube(
                            group = "tessera.dev",
                            version = "v1alpha1",
                            kind = $kind,
                            root = $root,
                            namespaced,
                            status = "ResourceStatus",
                            shortname = $short,
                            category = "tessera",
                            doc = $doc,
                            printcolumn(
                                name = "Accepted",
                                type_ = "string",
                                json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
                            ),
                            printcolumn(
                                name = "Age",
                                type_ = "date",
                                json_path = ".metadata.creationTimestamp"
                            )
                        )]
        #[serde(transparent)]
        pub struct $body {
            pub spec: $spec,
        }
    };
}

custom_resource!(
    AuthorizationPolicyBody,
    "AuthorizationPolicy",
    "AuthorizationPolicy",
    "tap",
    policy::AuthorizationPolicySpec,
    "Who may call the selected workloads, and how (Istio AuthorizationPolicy semantics)."
);
custom_resource!(
    PeerAuthenticationBody,
    "PeerAuthentication",
    "PeerAuthentication",
    "tpa",
    policy::PeerAuthenticationSpec,
    "Whether the selected workloads accept plaintext (mTLS STRICT, PERMISSIVE or DISABLE)."
);
custom_resource!(
    RequestAuthenticationBody,
    "RequestAuthentication",
    "RequestAuthentication",
    "tra",
    policy::RequestAuthenticationSpec,
    "Which JWT issuers the selected workloads accept, and their keys."
);
custom_resource!(
    RateLimitPolicyBody,
    "RateLimitPolicy",
    "RateLimitPolicy",
    "trl",
    tessera_mesh::rate_limit::RateLimitPolicySpec,
    "How many requests (or new opaque connections) the selected workloads accept, in total or per caller."
);
custom_resource!(
    RoutePolicyBody,
    "RoutePolicy",
    "RoutePolicy",
    "trp",
    resources::RoutePolicySpec,
    "Timeouts, retries and outlier detection for calls to one service."
);
// Named so as not to be taken for Kubernetes' own Services and Pods in the code.
custom_resource!(
    ServiceBody,
    "MeshService",
    "Service",
    "tsvc",
    resources::ServiceSpec,
    "A service outside Kubernetes (hosts, VMs): its ports and virtual IPs."
);
custom_resource!(
    WorkloadBody,
    "MeshWorkload",
    "Workload",
    "twl",
    resources::WorkloadSpec,
    "One instance of a tessera.dev Service outside Kubernetes: its proxy address and service account."
);

/// Every CRD, in a stable order.
pub fn definitions() -> Vec<CustomResourceDefinition> {
    vec![
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
        RequestAuthentication::crd(),
        RateLimitPolicy::crd(),
        RoutePolicy::crd(),
        MeshService::crd(),
        MeshWorkload::crd(),
    ]
}

/// `deploy/kubernetes/crds.yaml`: every CRD as one YAML stream.
pub fn render() -> String {
    let header = "# Generated by `tessera crds` from the resource types; do not edit.\n";
    let documents = serde_saphyr::to_string_multiple(&definitions())
        .unwrap_or_else(|error| panic!("a CRD does not serialize: {error}"));
    format!("{header}{documents}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI's check that the committed CRDs are the code's: regenerate with
    /// `cargo run -p tessera-control-plane --bin tessera -- crds > deploy/kubernetes/crds.yaml`
    /// (and the same into deploy/helm/tessera/crds/crds.yaml).
    #[test]
    fn the_committed_crds_match_the_code() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/kubernetes/crds.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == render(),
            "{path} is stale: regenerate it with `tessera crds > deploy/kubernetes/crds.yaml`"
        );
        // The Helm chart installs the same file (its crds/ folder).
        let chart = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/helm/tessera/crds/crds.yaml"
        );
        assert!(
            std::fs::read_to_string(chart).unwrap_or_default() == render(),
            "{chart} is stale: `tessera crds > {chart}`"
        );
    }
}
