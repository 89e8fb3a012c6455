//! The API calls the control plane makes (control-plane/src/kubernetes/), as access a
//! SubjectAccessReview can ask about. A unit test holds the chart's roles to exactly
//! this list: no call the roles lack, no grant nobody uses.

use super::NAMESPACE;

/// One verb on one kind of object, possibly limited to a namespace and a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Access {
    pub(crate) verb: &'static str,
    pub(crate) group: &'static str,
    pub(crate) resource: &'static str,
    pub(crate) subresource: &'static str,
    /// `None`: every namespace (a ClusterRole's grant).
    pub(crate) namespace: Option<&'static str>,
    pub(crate) name: &'static str,
}

impl Access {
    const fn cluster(verb: &'static str, group: &'static str, resource: &'static str) -> Self {
        Self {
            verb,
            group,
            resource,
            subresource: "",
            namespace: None,
            name: "",
        }
    }

    const fn status(verb: &'static str, resource: &'static str) -> Self {
        Self {
            subresource: "status",
            ..Self::cluster(verb, "tessera.dev", resource)
        }
    }

    const fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    const fn own_namespace(mut self) -> Self {
        self.namespace = Some(NAMESPACE);
        self
    }

    /// `patch mutatingwebhookconfigurations/tessera-sidecar-injector`, as a reader
    /// would write it.
    pub(crate) fn describe(&self) -> String {
        let mut what = String::from(self.resource);
        if !self.group.is_empty() {
            what = format!("{what}.{}", self.group);
        }
        if !self.subresource.is_empty() {
            what = format!("{what}/{}", self.subresource);
        }
        if !self.name.is_empty() {
            what = format!("{what} {}", self.name);
        }
        match self.namespace {
            Some(namespace) => format!("{} {what} in {namespace}", self.verb),
            None => format!("{} {what}", self.verb),
        }
    }
}

const TESSERA_KINDS: [&str; 7] = [
    "authorizationpolicies",
    "peerauthentications",
    "ratelimitpolicies",
    "requestauthentications",
    "routepolicies",
    "services",
    "workloads",
];

/// Every call the control plane makes in cluster mode.
pub(crate) fn control_plane_needs() -> Vec<Access> {
    let mut needs = vec![
        Access::cluster("create", "authentication.k8s.io", "tokenreviews"),
        Access::cluster("get", "", "pods"),
        Access::cluster("list", "", "pods"),
        Access::cluster("watch", "", "pods"),
        Access::cluster("get", "", "services"),
        Access::cluster("list", "", "services"),
        Access::cluster("watch", "", "services"),
        Access::cluster("list", "discovery.k8s.io", "endpointslices"),
        Access::cluster("watch", "discovery.k8s.io", "endpointslices"),
        Access::cluster("create", "events.k8s.io", "events"),
        Access::cluster("patch", "events.k8s.io", "events"),
        Access::cluster("get", "", "namespaces"),
        Access::cluster("list", "", "namespaces"),
        Access::cluster("watch", "", "namespaces"),
        Access::cluster("list", "", "configmaps"),
        Access::cluster("watch", "", "configmaps"),
        Access::cluster("create", "", "configmaps"),
        Access::cluster("patch", "", "configmaps").named(crate::kubernetes::root_cert::CONFIG_MAP),
        Access::cluster(
            "list",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
        ),
        Access::cluster(
            "watch",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
        ),
        Access::cluster(
            "patch",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
        )
        .named(super::WEBHOOK),
        Access::cluster("create", "", "secrets").own_namespace(),
        Access::cluster("get", "", "secrets")
            .named(crate::kubernetes::ca_secret::SECRET)
            .own_namespace(),
        Access::cluster("create", "coordination.k8s.io", "leases").own_namespace(),
        Access::cluster("get", "coordination.k8s.io", "leases")
            .named(crate::kubernetes::lease::LEASE)
            .own_namespace(),
        Access::cluster("update", "coordination.k8s.io", "leases")
            .named(crate::kubernetes::lease::LEASE)
            .own_namespace(),
    ];
    for kind in TESSERA_KINDS {
        needs.push(Access::cluster("list", "tessera.dev", kind));
        needs.push(Access::cluster("watch", "tessera.dev", kind));
        needs.push(Access::status("patch", kind));
    }
    needs
}

/// What `tessera install` creates, as `create` access for whoever installs it.
pub(crate) fn install_needs() -> Vec<Access> {
    let cluster = [
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("", "namespaces"),
        ("rbac.authorization.k8s.io", "clusterroles"),
        ("rbac.authorization.k8s.io", "clusterrolebindings"),
        (
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
        ),
    ];
    let namespaced = [
        ("", "serviceaccounts"),
        ("", "configmaps"),
        ("", "services"),
        ("apps", "deployments"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
        ("policy", "poddisruptionbudgets"),
        ("networking.k8s.io", "networkpolicies"),
    ];
    cluster
        .into_iter()
        .map(|(group, resource)| Access::cluster("create", group, resource))
        .chain(
            namespaced.into_iter().map(|(group, resource)| {
                Access::cluster("create", group, resource).own_namespace()
            }),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// The chart's roles, rule by rule, as the access each grants.
    fn granted() -> Vec<Access> {
        let rendered = include_str!("../../../deploy/kubernetes/tessera.yaml");
        let objects: Vec<Value> = serde_saphyr::from_multiple(rendered).unwrap();
        let leak = |v: &Value| -> &'static str {
            Box::leak(v.as_str().unwrap().to_string().into_boxed_str())
        };
        let mut granted = Vec::new();
        for role in objects
            .iter()
            .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        {
            let namespace = (role["kind"] == "Role").then(|| leak(&role["metadata"]["namespace"]));
            for rule in role["rules"].as_array().unwrap() {
                let names: Vec<&'static str> = match rule["resourceNames"].as_array() {
                    Some(names) => names.iter().map(leak).collect(),
                    None => vec![""],
                };
                for group in rule["apiGroups"].as_array().unwrap() {
                    for resource in rule["resources"].as_array().unwrap() {
                        let (resource, subresource) = leak(resource)
                            .split_once('/')
                            .unwrap_or((leak(resource), ""));
                        for verb in rule["verbs"].as_array().unwrap() {
                            for &name in &names {
                                granted.push(Access {
                                    verb: leak(verb),
                                    group: leak(group),
                                    resource,
                                    subresource,
                                    namespace,
                                    name,
                                });
                            }
                        }
                    }
                }
            }
        }
        granted
    }

    #[test]
    fn the_chart_grants_exactly_what_the_control_plane_calls() {
        let granted = granted();
        let needs = control_plane_needs();
        let missing: Vec<_> = needs
            .iter()
            .filter(|n| !granted.contains(n))
            .map(Access::describe)
            .collect();
        let unused: Vec<_> = granted
            .iter()
            .filter(|g| !needs.contains(g))
            .map(Access::describe)
            .collect();
        assert!(missing.is_empty(), "the chart's roles lack {missing:#?}");
        assert!(
            unused.is_empty(),
            "the chart's roles grant what nothing calls: {unused:#?}"
        );
    }

    #[test]
    fn access_reads_as_kubectl_would_say_it() {
        let patch = Access::cluster(
            "patch",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
        )
        .named("x");
        assert_eq!(
            patch.describe(),
            "patch mutatingwebhookconfigurations.admissionregistration.k8s.io x"
        );
        assert_eq!(
            Access::status("patch", "services").describe(),
            "patch services.tessera.dev/status"
        );
        assert_eq!(
            Access::cluster("create", "", "secrets")
                .own_namespace()
                .describe(),
            "create secrets in tessera-system"
        );
    }
}
