//! The configuration as proxies subscribe to it: each service and each namespace's
//! policy set serialized once, with a content version, shared by every discovery stream.
//!
//! Versions are content hashes, so they are the same for the same content across
//! control-plane restarts and replicas: a proxy that reconnects naming the versions it
//! holds is sent only what changed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tessera_mesh::discovery::{MAX_RESOURCE_BYTES, PolicySet, ResourceName};
use tessera_mesh::policy::ROOT_NAMESPACE;
use tessera_mesh::snapshot::MeshSnapshot;

/// One resource as sent: its body and the version naming that body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Body {
    pub version: Version,
    pub json: Bytes,
}

/// A content hash, sent as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Version(u64);

impl Version {
    fn of(json: &[u8]) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, json);
        let mut first = [0; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        Self(u64::from_be_bytes(first))
    }

    /// What a proxy says it holds; anything else is no version (the resource is sent).
    pub(crate) fn parse(text: &str) -> Option<Self> {
        if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(text, 16).ok().map(Self)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A resource too large to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} would be {size} bytes, over the {MAX_RESOURCE_BYTES} proxies accept")]
pub(crate) struct TooLarge {
    pub what: String,
    pub size: usize,
}

/// Every resource of one configuration.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    /// The configuration's version (1, 2, …): what proxies acknowledge having applied.
    pub generation: u64,
    services: HashMap<String, Arc<Body>>,
    addresses: HashMap<IpAddr, String>,
    /// The policy set of each namespace that has policies of its own.
    policies: HashMap<String, Arc<Body>>,
    /// The policy set of every other namespace: the root namespace's alone.
    mesh_wide: Arc<Body>,
}

impl Default for Body {
    fn default() -> Self {
        Self::new(b"{}".to_vec())
    }
}

impl Body {
    fn new(json: Vec<u8>) -> Self {
        Self {
            version: Version::of(&json),
            json: json.into(),
        }
    }

    /// A body of `size` bytes, for tests of message sizes.
    #[cfg(test)]
    pub(crate) fn test_sized(size: usize) -> Self {
        Self::new(vec![b' '; size])
    }

    fn of(what: impl FnOnce() -> String, value: &impl Serialize) -> Result<Self, TooLarge> {
        // Serializing plain data structures cannot fail.
        let json = serde_json::to_vec(value).unwrap_or_default();
        if json.len() > MAX_RESOURCE_BYTES {
            return Err(TooLarge {
                what: what(),
                size: json.len(),
            });
        }
        Ok(Self::new(json))
    }
}

impl Catalog {
    /// Serializes every resource of `snapshot`, refusing one larger than proxies accept.
    pub(crate) fn build(snapshot: &MeshSnapshot) -> Result<Self, TooLarge> {
        let mut services = HashMap::with_capacity(snapshot.services.len());
        let mut addresses = HashMap::new();
        for service in &snapshot.services {
            let key = service.key();
            let body = Body::of(|| format!("service {key}"), service)?;
            for address in &service.addresses {
                addresses.insert(*address, key.clone());
            }
            services.insert(key, Arc::new(body));
        }
        let namespaces = policy_namespaces(snapshot);
        let mut policies = HashMap::with_capacity(namespaces.len());
        for namespace in namespaces {
            let set = PolicySet::for_namespace(snapshot, &namespace);
            let body = Body::of(|| policies_of(&namespace), &set)?;
            policies.insert(namespace, Arc::new(body));
        }
        let set = PolicySet::for_namespace(snapshot, ROOT_NAMESPACE);
        let mesh_wide = Arc::new(Body::of(|| policies_of(ROOT_NAMESPACE), &set)?);
        Ok(Self {
            generation: 0,
            services,
            addresses,
            policies,
            mesh_wide,
        })
    }

    /// What [`Catalog::build`] refuses, checked without keeping what it builds.
    pub(crate) fn check_sizes(snapshot: &MeshSnapshot) -> Result<(), TooLarge> {
        for service in &snapshot.services {
            check_size(|| format!("service {}", service.key()), service)?;
        }
        let namespaces = policy_namespaces(snapshot);
        for namespace in namespaces
            .iter()
            .map(String::as_str)
            .chain([ROOT_NAMESPACE])
        {
            let set = PolicySet::for_namespace(snapshot, namespace);
            check_size(|| policies_of(namespace), &set)?;
        }
        Ok(())
    }

    /// The resource `name` as a caller of `namespace` sees it, if it exists.
    pub(crate) fn get(&self, name: &ResourceName, namespace: &str) -> Option<&Arc<Body>> {
        match name {
            ResourceName::Policies => Some(self.policies.get(namespace).unwrap_or(&self.mesh_wide)),
            ResourceName::Service(key) => self.services.get(key),
            ResourceName::Address(ip) => self.services.get(self.addresses.get(ip)?),
        }
    }

    #[cfg(test)]
    pub(crate) fn service_count(&self) -> usize {
        self.services.len()
    }
}

fn policies_of(namespace: &str) -> String {
    match namespace {
        ROOT_NAMESPACE => "the mesh-wide policies".into(),
        namespace => format!("the policies of namespace {namespace}"),
    }
}

/// Refuses `value` when its JSON is larger than proxies accept; counts the bytes
/// without keeping them.
fn check_size(what: impl FnOnce() -> String, value: &impl Serialize) -> Result<(), TooLarge> {
    struct Count(usize);

    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let mut count = Count(0);
    // Serializing plain data structures cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    if count.0 > MAX_RESOURCE_BYTES {
        return Err(TooLarge {
            what: what(),
            size: count.0,
        });
    }
    Ok(())
}

/// Namespaces, other than the root, with a policy of any kind.
fn policy_namespaces(snapshot: &MeshSnapshot) -> std::collections::BTreeSet<String> {
    let namespaces = snapshot
        .peer_authentications
        .iter()
        .map(|p| &p.namespace)
        .chain(snapshot.authorization_policies.iter().map(|p| &p.namespace))
        .chain(
            snapshot
                .request_authentications
                .iter()
                .map(|p| &p.namespace),
        )
        .chain(snapshot.rate_limit_policies.iter().map(|p| &p.namespace));
    namespaces
        .filter(|namespace| *namespace != ROOT_NAMESPACE)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use tessera_mesh::policy::{AuthorizationPolicySpec, Named};
    use tessera_mesh::snapshot::ServiceEntry;

    use super::*;

    fn service(name: &str, address: &str) -> ServiceEntry {
        ServiceEntry {
            name: name.into(),
            namespace: "shop".into(),
            ports: Vec::new(),
            addresses: vec![address.parse().unwrap()],
            endpoints: Vec::new(),
            route: None,
        }
    }

    fn allow(namespace: &str, name: &str) -> Named<AuthorizationPolicySpec> {
        Named {
            name: name.into(),
            namespace: namespace.into(),
            spec: AuthorizationPolicySpec::default(),
        }
    }

    fn snapshot() -> MeshSnapshot {
        MeshSnapshot {
            trust_domain: "cluster.local".into(),
            services: vec![service("web", "10.96.0.10"), service("api", "10.96.0.11")],
            authorization_policies: vec![allow("shop", "shop"), allow(ROOT_NAMESPACE, "all")],
            ..MeshSnapshot::default()
        }
    }

    fn version(catalog: &Catalog, name: &str, namespace: &str) -> Option<Version> {
        let name: ResourceName = name.parse().unwrap();
        catalog.get(&name, namespace).map(|body| body.version)
    }

    #[test]
    fn services_are_found_by_key_and_by_address() {
        let catalog = Catalog::build(&snapshot()).unwrap();
        let web = version(&catalog, "service/web.shop", "shop").unwrap();
        assert_eq!(version(&catalog, "address/10.96.0.10", "any"), Some(web));
        assert_ne!(version(&catalog, "address/10.96.0.11", "any"), Some(web));
        assert_eq!(version(&catalog, "address/10.96.0.12", "any"), None);
        assert_eq!(version(&catalog, "service/web.other", "any"), None);
        let body = catalog
            .get(&"service/web.shop".parse().unwrap(), "x")
            .unwrap();
        let parsed: ServiceEntry = serde_json::from_slice(&body.json).unwrap();
        assert_eq!(parsed, snapshot().services[0]);
    }

    /// The same content has the same version in another build (a restarted control
    /// plane), and a change changes only the version of what changed.
    #[test]
    fn versions_follow_content() {
        let first = Catalog::build(&snapshot()).unwrap();
        let again = Catalog::build(&snapshot()).unwrap();
        for name in ["service/web.shop", "service/api.shop", "policies"] {
            assert_eq!(
                version(&first, name, "shop"),
                version(&again, name, "shop"),
                "{name}"
            );
        }
        let mut changed = snapshot();
        changed.services[1]
            .ports
            .push(tessera_mesh::resources::ServicePort {
                port: 80,
                protocol: Default::default(),
            });
        let changed = Catalog::build(&changed).unwrap();
        let same = |name| version(&first, name, "shop") == version(&changed, name, "shop");
        assert!(same("service/web.shop"));
        assert!(same("policies"));
        assert!(!same("service/api.shop"));
        let version = version(&first, "service/web.shop", "shop").unwrap();
        assert_eq!(Version::parse(&version.to_string()), Some(version));
        for hostile in ["", "xyz", "0123456789abcdef0", "+123456789abcdef"] {
            assert_eq!(Version::parse(hostile), None, "{hostile}");
        }
    }

    /// A namespace sees its own policies and the root namespace's; one without any of
    /// its own shares the mesh-wide set.
    #[test]
    fn policies_are_scoped_to_the_callers_namespace() {
        let catalog = Catalog::build(&snapshot()).unwrap();
        let names = |namespace: &str| -> Vec<String> {
            let body = catalog.get(&ResourceName::Policies, namespace).unwrap();
            let set: PolicySet = serde_json::from_slice(&body.json).unwrap();
            set.authorization_policies
                .into_iter()
                .map(|p| p.name)
                .collect()
        };
        assert_eq!(names("shop"), ["shop", "all"]);
        assert_eq!(names("billing"), ["all"]);
        assert_eq!(names(ROOT_NAMESPACE), ["all"]);
    }

    #[test]
    fn a_resource_larger_than_proxies_accept_is_refused_by_name() {
        let mut large = snapshot();
        large.services[1].endpoints = (0..200_000)
            .map(|i| tessera_mesh::snapshot::Endpoint {
                workload: format!("api-{i}"),
                address: format!("10.1.{}.{}:8080", i / 256 % 256, i % 256),
                identity: "spiffe://cluster.local/ns/shop/sa/api".parse().unwrap(),
                ports: Default::default(),
            })
            .collect();
        let error = Catalog::build(&large).unwrap_err();
        assert_eq!(error.what, "service api.shop");
        assert!(error.size > MAX_RESOURCE_BYTES, "{error}");
        assert_eq!(Catalog::check_sizes(&large), Err(error));
        assert_eq!(Catalog::check_sizes(&snapshot()), Ok(()));
    }
}
