//! The mesh as proxies see it: every service with its ports, its endpoints (address and
//! the identity each must prove) and its route policy. The control plane builds one
//! snapshot from the resources and streams it; proxies route from it.
//!
//! Proxies receive it in parts, as JSON: each service ([`ServiceEntry`]) and the
//! policies of their namespace (`discovery::PolicySet`), subscribed to by name.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::SpiffeId;
use crate::policy::{
    AuthorizationPolicySpec, CompiledPolicy, Named, PeerAuthenticationSpec,
    RequestAuthenticationSpec,
};
use crate::rate_limit::{self, RateLimitPolicySpec};
use crate::resources::{
    ConfigError, Origin, Protocol, Resource, RoutePolicySpec, ServicePort, ServiceSpec, Spec,
};
use crate::spiffe::validate_namespace;

/// Namespace of resources that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Everything a proxy needs to route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSnapshot {
    pub trust_domain: String,
    pub services: Vec<ServiceEntry>,
    #[serde(default)]
    pub peer_authentications: Vec<Named<PeerAuthenticationSpec>>,
    #[serde(default)]
    pub authorization_policies: Vec<Named<AuthorizationPolicySpec>>,
    #[serde(default)]
    pub request_authentications: Vec<Named<RequestAuthenticationSpec>>,
    #[serde(default)]
    pub rate_limit_policies: Vec<Named<RateLimitPolicySpec>>,
}

/// One service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    pub ports: Vec<ServicePort>,
    /// Virtual IPs of the service (transparent mode routes by these).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub route: Option<RoutePolicySpec>,
}

impl ServiceEntry {
    /// `name.namespace`, how proxies name upstream services.
    pub fn key(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }

    /// The protocol declared for `port`, or for the only port when `port` is unset.
    pub fn protocol(&self, port: Option<u16>) -> Protocol {
        match (port, self.ports.as_slice()) {
            (Some(port), ports) => ports
                .iter()
                .find(|p| p.port == port)
                .map_or(Protocol::Detect, |p| p.protocol),
            (None, [only]) => only.protocol,
            (None, _) => Protocol::Detect,
        }
    }
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub workload: String,
    /// `host:port` of the workload proxy's inbound listener.
    pub address: String,
    pub identity: SpiffeId,
    /// Service port → this endpoint's port for it, where not the address's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, u16>,
}

impl Endpoint {
    /// Where to dial this endpoint for `service_port` (`None`: a listener bound to the
    /// service, not to one of its ports): the address, its port replaced where the
    /// workload maps that service port elsewhere.
    pub fn address_for(&self, service_port: Option<u16>) -> String {
        let mapped = service_port.and_then(|port| self.ports.get(&port));
        match (mapped, self.address.rsplit_once(':')) {
            (Some(port), Some((host, _))) => format!("{host}:{port}"),
            _ => self.address.clone(),
        }
    }
}

impl MeshSnapshot {
    /// Builds the snapshot, checking references between resources. Linear in the
    /// number of resources: a mesh of tens of thousands of endpoints is rebuilt on
    /// every change. Takes the resources owned or borrowed (`&[&Resource]`), so a
    /// caller choosing among versions it holds need not copy them.
    pub fn from_resources<R: Borrow<Resource>>(
        trust_domain: &str,
        resources: &[R],
    ) -> Result<Self, ConfigError> {
        let resources = move || resources.iter().map(Borrow::borrow);
        let mut services = Services::default();
        for resource in resources() {
            if let Spec::Service(spec) = &resource.spec {
                services.add(resource, spec)?;
            }
        }
        for resource in resources() {
            match &resource.spec {
                Spec::Workload(spec) => {
                    let namespace = namespace_of(resource)?;
                    let identity =
                        SpiffeId::new(trust_domain, &namespace, &spec.service_account)
                            .map_err(|e| invalid(resource, format!("serviceAccount: {e}")))?;
                    if !spec.address.contains(':') {
                        return Err(invalid(
                            resource,
                            format!("address {:?} must be host:port", spec.address),
                        ));
                    }
                    let service = services.find(&spec.service, &namespace).ok_or_else(|| {
                        invalid(
                            resource,
                            format!(
                                "workload names service {}.{namespace}, which is not defined",
                                spec.service
                            ),
                        )
                    })?;
                    service.endpoints.push(Endpoint {
                        workload: resource.metadata.name.clone(),
                        address: spec.address.clone(),
                        identity,
                        ports: spec.ports.clone(),
                    });
                }
                Spec::RoutePolicy(spec) => {
                    let namespace = namespace_of(resource)?;
                    validate_route(spec).map_err(|reason| invalid(resource, reason))?;
                    let service = services.find(&spec.service, &namespace).ok_or_else(|| {
                        invalid(
                            resource,
                            format!(
                                "route policy names service {}.{namespace}, which is not defined",
                                spec.service
                            ),
                        )
                    })?;
                    if service.route.is_some() {
                        return Err(invalid(
                            resource,
                            format!(
                                "service {}.{namespace} already has a route policy",
                                spec.service
                            ),
                        ));
                    }
                    service.route = Some(spec.clone());
                }
                _ => {}
            }
        }
        let mut snapshot = Self {
            trust_domain: trust_domain.to_string(),
            services: services.entries,
            ..Self::default()
        };
        for resource in resources() {
            let name = || resource.metadata.name.clone();
            match &resource.spec {
                Spec::PeerAuthentication(spec) => snapshot.peer_authentications.push(Named {
                    name: name(),
                    namespace: namespace_of(resource)?,
                    spec: spec.clone(),
                }),
                Spec::AuthorizationPolicy(spec) => {
                    let policy = Named {
                        name: name(),
                        namespace: namespace_of(resource)?,
                        spec: spec.clone(),
                    };
                    // Refused here, where the operator sees why; a proxy could only fail
                    // closed on it.
                    CompiledPolicy::try_from(&policy)
                        .map_err(|error| invalid(resource, error.to_string()))?;
                    snapshot.authorization_policies.push(policy);
                }
                Spec::RequestAuthentication(spec) => {
                    for rule in &spec.jwt_rules {
                        validate_jwt_rule(rule).map_err(|reason| invalid(resource, reason))?;
                    }
                    snapshot.request_authentications.push(Named {
                        name: name(),
                        namespace: namespace_of(resource)?,
                        spec: spec.clone(),
                    })
                }
                Spec::RateLimitPolicy(spec) => {
                    let policy = Named {
                        name: name(),
                        namespace: namespace_of(resource)?,
                        spec: spec.clone(),
                    };
                    rate_limit::compile(&policy)
                        .map_err(|error| invalid(resource, error.to_string()))?;
                    snapshot.rate_limit_policies.push(policy);
                }
                _ => {}
            }
        }
        Ok(snapshot)
    }
}

/// The services being built, indexed by key and by address.
#[derive(Default)]
struct Services<'a> {
    entries: Vec<ServiceEntry>,
    /// Where each entry was defined.
    origins: Vec<&'a Origin>,
    by_key: HashMap<(String, String), usize>,
    by_address: HashMap<std::net::IpAddr, usize>,
}

impl<'a> Services<'a> {
    /// Adds a Service, refusing a second definition or an address another one has.
    fn add(&mut self, resource: &'a Resource, spec: &ServiceSpec) -> Result<(), ConfigError> {
        let namespace = namespace_of(resource)?;
        let name = &resource.metadata.name;
        validate_namespace(name).map_err(|e| invalid(resource, format!("service name: {e}")))?;
        let taken = spec
            .addresses
            .iter()
            .find_map(|address| Some((address, *self.by_address.get(address)?)));
        if let Some((address, other)) = taken {
            return Err(invalid(
                resource,
                format!(
                    "address {address} of {name}.{namespace} already belongs to {} ({})",
                    self.entries[other].key(),
                    self.origins[other]
                ),
            ));
        }
        let key = (name.clone(), namespace.clone());
        if let Some(first) = self.by_key.get(&key) {
            return Err(invalid(
                resource,
                format!(
                    "service {name}.{namespace} is already defined at {}",
                    self.origins[*first]
                ),
            ));
        }
        let index = self.entries.len();
        self.by_key.insert(key, index);
        for address in &spec.addresses {
            self.by_address.insert(*address, index);
        }
        self.entries.push(ServiceEntry {
            name: name.clone(),
            namespace,
            ports: spec.ports.clone(),
            addresses: spec.addresses.clone(),
            endpoints: Vec::new(),
            route: None,
        });
        self.origins.push(&resource.origin);
        Ok(())
    }

    fn find(&mut self, name: &str, namespace: &str) -> Option<&mut ServiceEntry> {
        let index = *self
            .by_key
            .get(&(name.to_string(), namespace.to_string()))?;
        self.entries.get_mut(index)
    }
}

fn namespace_of(resource: &Resource) -> Result<String, ConfigError> {
    let namespace = resource
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    validate_namespace(&namespace).map_err(|e| invalid(resource, e.to_string()))?;
    Ok(namespace)
}

fn validate_jwt_rule(rule: &crate::policy::JwtRule) -> Result<(), String> {
    if rule.issuer.is_empty() {
        return Err("jwtRules: issuer must be set".into());
    }
    let Some(jwks) = &rule.jwks else {
        return Err(format!(
            "jwtRules for {}: set jwks or jwksFile",
            rule.issuer
        ));
    };
    let parsed: serde_json::Value = serde_json::from_str(jwks)
        .map_err(|e| format!("jwks for {}: not JSON: {e}", rule.issuer))?;
    if !parsed.get("keys").is_some_and(serde_json::Value::is_array) {
        return Err(format!("jwks for {}: no \"keys\" array", rule.issuer));
    }
    Ok(())
}

fn validate_route(spec: &RoutePolicySpec) -> Result<(), String> {
    if let Some(retries) = &spec.retries {
        if retries.attempts > 10 {
            return Err("retries.attempts must be at most 10".into());
        }
        if !(0.0..=1.0).contains(&retries.budget.ratio) {
            return Err("retries.budget.ratio must be between 0 and 1".into());
        }
    }
    if let Some(outlier) = &spec.outlier_detection
        && (outlier.consecutive_failures == 0 || outlier.max_ejection_percent > 100)
    {
        return Err(
            "outlierDetection: consecutiveFailures ≥ 1 and maxEjectionPercent ≤ 100".into(),
        );
    }
    for (name, value) in [
        ("timeout", spec.timeout),
        ("perTryTimeout", spec.per_try_timeout),
    ] {
        if value.is_some_and(|d| d.is_zero()) {
            return Err(format!("{name} must be positive"));
        }
    }
    Ok(())
}

fn invalid(resource: &Resource, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        origin: resource.origin.clone(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::resources::parse_file;

    const MESH: &str = "apiVersion: tessera.dev/v1alpha1
kind: Service
metadata: {name: orders, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tessera.dev/v1alpha1
kind: Workload
metadata: {name: orders-1, namespace: shop}
spec: {service: orders, serviceAccount: orders, address: 127.0.0.1:16006}
---
apiVersion: tessera.dev/v1alpha1
kind: RoutePolicy
metadata: {name: orders, namespace: shop}
spec:
  service: orders
  timeout: 2s
  retries: {attempts: 3}
";

    /// Borrowed resources build what the same resources owned build.
    #[test]
    fn borrowed_resources_build_the_same_snapshot() {
        let resources = parse_file(Path::new("mesh.yaml"), MESH).unwrap();
        let borrowed: Vec<&Resource> = resources.iter().collect();
        assert_eq!(
            MeshSnapshot::from_resources("cluster.local", &borrowed).unwrap(),
            MeshSnapshot::from_resources("cluster.local", &resources).unwrap()
        );
    }

    #[test]
    fn builds_services_with_endpoints_and_routes() {
        let resources = parse_file(Path::new("mesh.yaml"), MESH).unwrap();
        let snapshot = MeshSnapshot::from_resources("cluster.local", &resources).unwrap();
        let orders = &snapshot.services[0];
        assert_eq!(orders.key(), "orders.shop");
        assert_eq!(orders.protocol(None), Protocol::Http);
        assert_eq!(
            orders.endpoints[0].identity.as_str(),
            "spiffe://cluster.local/ns/shop/sa/orders"
        );
        let route = orders.route.as_ref().unwrap();
        assert_eq!(route.timeout, Some(std::time::Duration::from_secs(2)));
        assert_eq!(route.retries.as_ref().unwrap().budget.ratio, 0.2);
        let json = serde_json::to_string(&snapshot).unwrap();
        assert_eq!(
            serde_json::from_str::<MeshSnapshot>(&json).unwrap(),
            snapshot
        );
    }

    /// A workload serving a service port elsewhere (a Kubernetes `targetPort`) is dialled
    /// there by a listener bound to that port; elsewhere at its address.
    #[test]
    fn endpoints_are_dialled_at_the_port_their_workload_maps() {
        let text = MESH.replace(
            "address: 127.0.0.1:16006}",
            "address: \"[fd00::7]:16006\", ports: {8080: 9090}}",
        );
        let resources = parse_file(Path::new("mesh.yaml"), &text).unwrap();
        let snapshot = MeshSnapshot::from_resources("cluster.local", &resources).unwrap();
        let endpoint = &snapshot.services[0].endpoints[0];
        assert_eq!(endpoint.address_for(Some(8080)), "[fd00::7]:9090");
        assert_eq!(endpoint.address_for(Some(8081)), "[fd00::7]:16006");
        assert_eq!(endpoint.address_for(None), "[fd00::7]:16006");
        let json = serde_json::to_string(&snapshot).unwrap();
        assert!(json.contains(r#""ports":{"8080":9090}"#), "{json}");
        assert_eq!(
            serde_json::from_str::<MeshSnapshot>(&json).unwrap(),
            snapshot
        );
        let plain = MeshSnapshot::from_resources(
            "cluster.local",
            &parse_file(Path::new("mesh.yaml"), MESH).unwrap(),
        )
        .unwrap();
        let json = serde_json::to_string(&plain).unwrap();
        assert!(
            !json.contains("\"ports\":{"),
            "an empty map is left out: {json}"
        );
    }

    #[test]
    fn a_virtual_ip_belongs_to_one_service() {
        let two = "apiVersion: tessera.dev/v1alpha1
kind: Service
metadata: {name: orders, namespace: shop}
spec: {addresses: [10.96.0.10, \"fd96::10\"]}
---
apiVersion: tessera.dev/v1alpha1
kind: Service
metadata: {name: payments, namespace: shop}
spec: {addresses: [\"fd96::10\"]}
";
        let resources = parse_file(Path::new("vips.yaml"), two).unwrap();
        let error = MeshSnapshot::from_resources("cluster.local", &resources).unwrap_err();
        assert_eq!(error.origin.line, 7, "{error}");
        assert!(
            error
                .reason
                .contains("fd96::10 of payments.shop already belongs to orders.shop"),
            "{error}"
        );

        let distinct = two.replace("[\"fd96::10\"]", "[\"fd96::11\"]");
        let resources = parse_file(Path::new("vips.yaml"), &distinct).unwrap();
        let snapshot = MeshSnapshot::from_resources("cluster.local", &resources).unwrap();
        assert_eq!(snapshot.services[0].addresses.len(), 2);
    }

    #[test]
    fn an_authorization_policy_that_cannot_be_compiled_is_refused_at_its_line() {
        let text = format!(
            "{MESH}---
apiVersion: tessera.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: canary, namespace: shop}}
spec:
  rules:
  - when: [{{key: \"request.header[x-canary]\", values: [yes]}}]
"
        );
        let resources = parse_file(Path::new("mesh.yaml"), &text).unwrap();
        let error = MeshSnapshot::from_resources("cluster.local", &resources).unwrap_err();
        assert_eq!(error.origin.line, 21, "{error}");
        assert!(
            error.to_string().starts_with(
                "mesh.yaml:21: spec.rules[0].when[0].key: key \"request.header[x-canary]\""
            ),
            "{error}"
        );
        let fixed = text.replace("request.header[", "request.headers[");
        let resources = parse_file(Path::new("mesh.yaml"), &fixed).unwrap();
        let snapshot = MeshSnapshot::from_resources("cluster.local", &resources).unwrap();
        assert_eq!(snapshot.authorization_policies.len(), 1);
    }

    #[test]
    fn a_rate_limit_policy_that_cannot_be_compiled_is_refused_at_its_line() {
        let text = format!(
            "{MESH}---
apiVersion: tessera.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: api, namespace: shop}}
spec:
  selector: {{serviceAccount: orders}}
  limits:
  - {{name: checkout, match: {{pathPrefix: /checkout}}, requestsPerSecond: 10, burst: 0}}
"
        );
        let resources = parse_file(Path::new("mesh.yaml"), &text).unwrap();
        let error = MeshSnapshot::from_resources("cluster.local", &resources).unwrap_err();
        assert_eq!(
            error.to_string(),
            "mesh.yaml:21: spec.limits[0].burst: must be at least 1"
        );
        let fixed = text.replace("burst: 0", "burst: 20");
        let resources = parse_file(Path::new("mesh.yaml"), &fixed).unwrap();
        let snapshot = MeshSnapshot::from_resources("cluster.local", &resources).unwrap();
        assert_eq!(snapshot.rate_limit_policies.len(), 1);
        assert_eq!(snapshot.rate_limit_policies[0].id(), "shop/api");

        let typo = text.replace("requestsPerSecond", "requestPerSecond");
        let error = parse_file(Path::new("mesh.yaml"), &typo).unwrap_err();
        assert_eq!(error.origin.line, 26, "{error}");
        assert!(error.reason.contains("requestPerSecond"), "{error}");
    }

    #[test]
    fn dangling_references_point_at_their_line() {
        let text = MESH.replace(
            "service: orders, serviceAccount",
            "service: ordres, serviceAccount",
        );
        let resources = parse_file(Path::new("mesh.yaml"), &text).unwrap();
        let error = MeshSnapshot::from_resources("cluster.local", &resources).unwrap_err();
        assert_eq!(error.origin.line, 8, "{error}");
        assert!(error.reason.contains("ordres.shop"), "{error}");

        let text = MESH.replace(
            "retries: {attempts: 3}",
            "retries: {attempts: 3, budget: {ratio: 2, minPerSecond: 1}}",
        );
        let resources = parse_file(Path::new("mesh.yaml"), &text).unwrap();
        let error = MeshSnapshot::from_resources("cluster.local", &resources).unwrap_err();
        assert_eq!(error.origin.line, 13, "{error}");

        let text = MESH.replace("protocol: http", "protocol: smtp");
        let error = parse_file(Path::new("mesh.yaml"), &text).unwrap_err();
        assert_eq!(error.origin.line, 5, "{error}");
    }
}
