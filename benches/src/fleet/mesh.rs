//! The simulated mesh: Services (each with a virtual IP and an HTTP port) and their
//! endpoints, a few policies, and the changes the run times. In file mode they are
//! resource files in a control plane's configuration directory, one per namespace;
//! `cluster` makes the same mesh of Kubernetes objects.

use std::fmt::Write as _;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_mesh::policy::ROOT_NAMESPACE;

use crate::error::{BenchError, Result};
use crate::topology::tessera::NAMESPACE;

/// Services per namespace (the files are this big).
pub const SERVICES_PER_NAMESPACE: usize = 100;
/// The port every simulated workload's proxy listens on for mTLS.
pub const INBOUND_PORT: u16 = 15006;
/// The port every service is called on.
pub const SERVICE_PORT: u16 = 8080;
/// The policies: a mesh-wide one (root namespace: every proxy holds it), one for the
/// simulated proxies' own namespace, and one for a namespace none of them is in.
pub const POLICIES: [(&str, &str); 3] = [
    ("mesh-wide", ROOT_NAMESPACE),
    ("bench-only", NAMESPACE),
    ("elsewhere", "fleet-000"),
];
/// How sharply popularity falls: a stream's choice is `u^SKEW` of the range for a
/// uniform `u`, so low-numbered services are watched by many and the tail by a few.
const SKEW: i32 = 3;

/// How big a mesh is.
#[derive(Debug, Clone, Copy)]
pub struct MeshShape {
    pub services: usize,
    pub endpoints_per_service: usize,
}

impl MeshShape {
    pub fn endpoints(&self) -> usize {
        self.services * self.endpoints_per_service
    }
}

/// Service number `index`: `svc-00042` in namespace `fleet-000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceIndex(pub usize);

impl ServiceIndex {
    /// The one every simulated proxy watches.
    pub const EVERYONE: Self = Self(0);

    pub fn name(self) -> String {
        format!("svc-{:05}", self.0)
    }

    pub fn namespace(self) -> String {
        format!("fleet-{:03}", self.0 / SERVICES_PER_NAMESPACE)
    }

    /// Its discovery resource name, `service/NAME.NS`.
    pub fn resource(self) -> String {
        format!("service/{}.{}", self.name(), self.namespace())
    }

    /// Its virtual IP, in 10.96.0.0/16.
    fn address(self) -> String {
        format!("10.96.{}.{}", self.0 / 256, self.0 % 256)
    }

    /// Its endpoints: (endpoint number, address numbered across the mesh).
    pub fn endpoints(self, shape: MeshShape) -> impl Iterator<Item = (usize, usize)> {
        let per_service = shape.endpoints_per_service;
        (0..per_service).map(move |endpoint| (endpoint, self.0 * per_service + endpoint))
    }
}

/// A change to the mesh the run times.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    /// An endpoint added to a service (numbered past any the mesh has).
    EndpointAdded {
        service: ServiceIndex,
        revision: usize,
    },
    /// The root-namespace policy rewritten: every proxy's `policies` change.
    MeshWidePolicy { revision: usize },
}

impl Change {
    /// The discovery resource that changes with it.
    pub fn resource(self) -> String {
        match self {
            Self::EndpointAdded { service, .. } => service.resource(),
            Self::MeshWidePolicy { .. } => "policies".into(),
        }
    }
}

/// The endpoint an [`Change::EndpointAdded`] adds: (endpoint number, address number).
pub fn added_endpoint(revision: usize) -> (usize, usize) {
    (1_000 + revision, 10_000_000 + revision)
}

/// The address of the endpoint numbered `global` across the mesh, in 10.128.0.0/10.
pub fn endpoint_ip(global: usize) -> String {
    format!(
        "10.{}.{}.{}",
        128 + (global >> 16) % 64,
        (global >> 8) & 255,
        global & 255
    )
}

/// Writes the mesh into `config_dir`: `fleet-NNN.yaml` per namespace, `policies.yaml`.
pub fn write(config_dir: &Path, shape: MeshShape) -> Result<()> {
    std::fs::create_dir_all(config_dir)
        .map_err(BenchError::io(format!("create {}", config_dir.display())))?;
    let namespaces = shape.services.div_ceil(SERVICES_PER_NAMESPACE);
    for namespace in 0..namespaces {
        let first = namespace * SERVICES_PER_NAMESPACE;
        let last = (first + SERVICES_PER_NAMESPACE).min(shape.services);
        let mut yaml = String::new();
        for index in first..last {
            let service = ServiceIndex(index);
            yaml.push_str(&service_yaml(service));
            for (endpoint, global) in service.endpoints(shape) {
                yaml.push_str(&workload_yaml(service, endpoint, global));
            }
        }
        write_file(config_dir, &format!("fleet-{namespace:03}.yaml"), &yaml)?;
    }
    write_file(config_dir, "policies.yaml", &policies_yaml(0))
}

/// `change` as the file written (renamed into place) and its content.
pub fn change_file(change: Change) -> (String, String) {
    match change {
        Change::EndpointAdded { service, revision } => {
            let (endpoint, global) = added_endpoint(revision);
            (
                format!("added-{}-{revision}.yaml", service.name()),
                workload_yaml(service, endpoint, global),
            )
        }
        Change::MeshWidePolicy { revision } => ("policies.yaml".into(), policies_yaml(revision)),
    }
}

/// The services one simulated proxy watches: [`ServiceIndex::EVERYONE`] and
/// `count - 1` others, distinct, drawn with popularity falling along the numbering.
pub fn watched_services(shape: MeshShape, count: usize, rng: &mut StdRng) -> Vec<ServiceIndex> {
    let count = count.min(shape.services);
    let mut watched = vec![ServiceIndex::EVERYONE];
    let others = shape.services - 1;
    while watched.len() < count {
        let u: f64 = rng.random();
        let index = ServiceIndex(1 + ((others as f64 * u.powi(SKEW)) as usize).min(others - 1));
        if !watched.contains(&index) {
            watched.push(index);
        }
    }
    watched
}

/// The seeded generator every run draws subscriptions from: runs are comparable.
pub fn subscription_rng() -> StdRng {
    StdRng::seed_from_u64(27)
}

fn service_yaml(service: ServiceIndex) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  addresses: [{}]\n  ports: [{{port: {SERVICE_PORT}, protocol: http}}]\n---\n",
        service.name(),
        service.namespace(),
        service.address(),
    )
}

/// Endpoint `endpoint` of `service`, at an address numbered `global` across the mesh.
fn workload_yaml(service: ServiceIndex, endpoint: usize, global: usize) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}-{endpoint}, namespace: {namespace}}}\nspec: {{service: {name}, serviceAccount: {name}, address: \"{}:{INBOUND_PORT}\"}}\n---\n",
        endpoint_ip(global),
        name = service.name(),
        namespace = service.namespace(),
    )
}

/// The [`POLICIES`]. Each denies a caller that does not exist, which opaque TCP can
/// check: no traffic is refused.
fn policies_yaml(revision: usize) -> String {
    let mut yaml = String::new();
    for (name, namespace) in POLICIES {
        let _ = write!(
            yaml,
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  action: DENY\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n---\n",
            denied_principal(revision)
        );
    }
    yaml
}

/// The caller the policies of `revision` deny, who never calls.
pub fn denied_principal(revision: usize) -> String {
    format!("cluster.local/ns/nowhere/sa/revision-{revision}")
}

fn write_file(config_dir: &Path, name: &str, yaml: &str) -> Result<()> {
    let path = config_dir.join(name);
    std::fs::write(&path, yaml).map_err(BenchError::io(format!("write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stream_watches_the_shared_service_and_distinct_others() {
        let shape = MeshShape {
            services: 10_000,
            endpoints_per_service: 5,
        };
        let mut rng = subscription_rng();
        let mut watchers = vec![0usize; shape.services];
        for _ in 0..1_000 {
            let watched = watched_services(shape, 10, &mut rng);
            assert_eq!(watched[0], ServiceIndex::EVERYONE);
            let mut distinct = watched.clone();
            distinct.sort_by_key(|s| s.0);
            distinct.dedup();
            assert_eq!(distinct.len(), 10);
            for service in watched {
                watchers[service.0] += 1;
            }
        }
        assert_eq!(watchers[0], 1_000);
        // Skewed: the first hundred services are watched far more than the last.
        let head: usize = watchers[1..101].iter().sum();
        let tail: usize = watchers[shape.services - 100..].iter().sum();
        assert!(head > 10 * tail.max(1), "head {head}, tail {tail}");
    }

    #[test]
    fn a_small_mesh_is_watched_whole() {
        let shape = MeshShape {
            services: 10,
            endpoints_per_service: 5,
        };
        let watched = watched_services(shape, 10, &mut subscription_rng());
        assert_eq!(watched.len(), 10);
    }

    #[test]
    fn names_parse_as_discovery_names() {
        for index in [0, 99, 100, 9_999] {
            let name = ServiceIndex(index).resource();
            assert!(
                name.parse::<tessera_mesh::discovery::ResourceName>()
                    .is_ok(),
                "{name}"
            );
        }
    }
}
