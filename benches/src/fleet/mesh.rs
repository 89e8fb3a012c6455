//! The simulated mesh: Services (each with a virtual IP and an HTTP port) and their
//! Workloads, written as resource files into a control plane's configuration directory,
//! one file per namespace; a few policies; and the edits the run times.

use std::fmt::Write as _;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_mesh::policy::ROOT_NAMESPACE;

use crate::error::{BenchError, Result};
use crate::topology::tessera::NAMESPACE;

/// Services per namespace (the files are this big).
const SERVICES_PER_NAMESPACE: usize = 100;
/// The port every simulated workload's proxy listens on for mTLS.
const INBOUND_PORT: u16 = 15006;
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

    fn name(self) -> String {
        format!("svc-{:05}", self.0)
    }

    fn namespace(self) -> String {
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
            for endpoint in 0..shape.endpoints_per_service {
                let global = index * shape.endpoints_per_service + endpoint;
                yaml.push_str(&workload_yaml(service, endpoint, global));
            }
        }
        write_file(config_dir, &format!("fleet-{namespace:03}.yaml"), &yaml)?;
    }
    write_file(config_dir, "policies.yaml", &policies_yaml(0))
}

/// One edit to the mesh: a file written (renamed into place) and the resource that
/// changes with it.
#[derive(Debug, Clone)]
pub struct Edit {
    pub file: String,
    pub yaml: String,
    pub resource: String,
}

/// A workload added to `service` (numbered past any the mesh has).
pub fn endpoint_added(service: ServiceIndex, revision: usize) -> Edit {
    let global = 10_000_000 + revision;
    Edit {
        file: format!("added-{}-{revision}.yaml", service.name()),
        yaml: workload_yaml(service, 1_000 + revision, global),
        resource: service.resource(),
    }
}

/// The root-namespace policy rewritten: every proxy's `policies` change.
pub fn mesh_wide_policy_changed(revision: usize) -> Edit {
    Edit {
        file: "policies.yaml".into(),
        yaml: policies_yaml(revision),
        resource: "policies".into(),
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
        "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  addresses: [{}]\n  ports: [{{port: 8080, protocol: http}}]\n---\n",
        service.name(),
        service.namespace(),
        service.address(),
    )
}

/// Endpoint `endpoint` of `service`, at an address numbered `global` across the mesh.
fn workload_yaml(service: ServiceIndex, endpoint: usize, global: usize) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}-{endpoint}, namespace: {namespace}}}\nspec: {{service: {name}, serviceAccount: {name}, address: \"10.{}.{}.{}:{INBOUND_PORT}\"}}\n---\n",
        128 + (global >> 16) % 64,
        (global >> 8) & 255,
        global & 255,
        name = service.name(),
        namespace = service.namespace(),
    )
}

/// A mesh-wide policy (root namespace: every proxy holds it), one for the simulated
/// proxies' own namespace, and one for a namespace none of them is in. Each denies a
/// caller that does not exist, which opaque TCP can check: no traffic is refused.
fn policies_yaml(revision: usize) -> String {
    let mut yaml = String::new();
    for (name, namespace) in [
        ("mesh-wide", ROOT_NAMESPACE),
        ("bench-only", NAMESPACE),
        ("elsewhere", "fleet-000"),
    ] {
        let _ = write!(
            yaml,
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  action: DENY\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/nowhere/sa/revision-{revision}\"]}}}}]\n---\n"
        );
    }
    yaml
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
