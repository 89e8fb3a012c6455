//! The fleet's mesh in cluster mode: the same Services, endpoints and policies as the
//! file mode's, as objects of a real Kubernetes API server (kube-apiserver and etcd,
//! tessera-tests' `ApiServer`) that a control plane started with `--kubernetes` watches.
//!
//! No controller runs: the bench writes what they would. Per namespace of services a
//! meshed Namespace; per service a ServiceAccount, a Service with its cluster IP, and
//! one EndpointSlice as the EndpointSlice controller writes it; per endpoint a Pod
//! carrying the sidecar (the control plane takes an endpoint's identity from its pod);
//! the policies as AuthorizationPolicy objects. A change is an API write: an
//! EndpointSlice gaining an endpoint (its pod created with the mesh), a policy's spec
//! patched.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Instant;

use futures_util::future::try_join_all;
use serde::Serialize;
use serde_json::{Value, json};
use tessera_tests::kube::{ApiConnection, ApiServer};

use super::mesh::{
    self, Change, INBOUND_PORT, MeshShape, POLICIES, SERVICE_PORT, SERVICES_PER_NAMESPACE,
    ServiceIndex,
};
use crate::error::{BenchError, Result};
use crate::topology::tessera::NAMESPACE;

/// Requests in flight while the mesh is created, one connection each.
const WRITERS: usize = 16;
/// The harness serves Services from a /24; ten thousand need a /16. Its first address
/// stays the one the API server's certificate names.
const SERVICE_CIDR: &str = "--service-cluster-ip-range=10.0.0.0/16";
const MESHED_LABEL: &str = "tessera.dev/inject";
const SIDECAR: &str = "tessera-proxy";
const POLICY_API: &str = "/apis/tessera.dev/v1alpha1";

/// How long creating the mesh's objects took.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectsCreated {
    pub objects: usize,
    pub writers: usize,
    pub seconds: f64,
}

/// A running API server holding the mesh.
pub struct ClusterMesh {
    api: ApiServer,
    /// The control plane's, with the RBAC `deploy/kubernetes` ships.
    kubeconfig: PathBuf,
    shape: MeshShape,
    pub created: ObjectsCreated,
}

impl ClusterMesh {
    /// Starts an API server and creates the mesh in it, with the pods of the endpoints
    /// `changes` will add.
    pub async fn create(shape: MeshShape, changes: &[Change]) -> Result<Self> {
        let api = ApiServer::start_with(&[SERVICE_CIDR])
            .await
            .ok_or_else(|| BenchError::failed("start kube-harness", tessera_tests::kube::BUILD))?;
        // The CRDs, the control plane's namespace and its RBAC.
        let kubeconfig = api.control_plane_kubeconfig().await;
        let started = Instant::now();
        // Each phase's objects need the previous phase's: a pod its service account.
        let phases = [
            namespaces(shape),
            service_accounts(shape),
            workloads(shape, changes),
        ];
        let mut objects = 0;
        for phase in phases {
            objects += phase.len();
            create_all(&api, phase).await?;
        }
        let created = ObjectsCreated {
            objects,
            writers: WRITERS,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok(Self {
            api,
            kubeconfig,
            shape,
            created,
        })
    }

    /// `tessera control-plane`'s arguments for cluster mode against this API server.
    pub fn control_plane_args(&self) -> Vec<OsString> {
        vec![
            "--kubernetes".into(),
            "--kubeconfig".into(),
            self.kubeconfig.clone().into(),
        ]
    }

    /// Makes `change` through the API; returns once the API server has it.
    pub async fn apply(&self, change: Change) -> Result<()> {
        let (path, patch) = match change {
            Change::EndpointAdded { service, revision } => (
                format!(
                    "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices/{}",
                    service.namespace(),
                    service.name()
                ),
                json!({ "endpoints": slice_endpoints(service, self.shape, revision + 1) }),
            ),
            Change::MeshWidePolicy { revision } => {
                let (name, namespace) = POLICIES[0];
                (
                    format!("{POLICY_API}/namespaces/{namespace}/authorizationpolicies/{name}"),
                    json!({ "spec": policy_spec(revision) }),
                )
            }
        };
        let answer = self.api.merge_patch(&path, &patch).await;
        expect_status(format!("PATCH {path}"), 200, answer)
    }
}

/// An object to create: the collection's path and the object.
type Create = (String, Value);

/// Creates `objects`, [`WRITERS`] at a time over kept-alive connections.
async fn create_all(api: &ApiServer, objects: Vec<Create>) -> Result<()> {
    let writers = (0..WRITERS).map(|writer| {
        let share: Vec<&Create> = objects.iter().skip(writer).step_by(WRITERS).collect();
        async move {
            let mut connection = api
                .connect()
                .await
                .map_err(|e| BenchError::failed("connect to the API server", format!("{e:#}")))?;
            for (path, object) in share {
                create(&mut connection, path, object).await?;
            }
            Ok::<_, BenchError>(())
        }
    });
    try_join_all(writers).await?;
    Ok(())
}

async fn create(connection: &mut ApiConnection, path: &str, object: &Value) -> Result<()> {
    let answer = connection
        .request(http::Method::POST, path, Some(object))
        .await;
    expect_status(format!("POST {path}"), 201, answer)
}

/// An error naming `request` unless the API server answered it with `expected`.
fn expect_status(
    request: String,
    expected: u16,
    answer: anyhow::Result<(u16, Value)>,
) -> Result<()> {
    match answer {
        Ok((status, _)) if status == expected => Ok(()),
        Ok((status, answer)) => Err(BenchError::failed(request, format!("{status} {answer}"))),
        Err(error) => Err(BenchError::failed(request, format!("{error:#}"))),
    }
}

fn services(shape: MeshShape) -> impl Iterator<Item = ServiceIndex> {
    (0..shape.services).map(ServiceIndex)
}

/// The services' namespaces, meshed; and the simulated proxies' own.
fn namespaces(shape: MeshShape) -> Vec<Create> {
    let meshed = (0..shape.services.div_ceil(SERVICES_PER_NAMESPACE))
        .map(|n| ServiceIndex(n * SERVICES_PER_NAMESPACE).namespace());
    meshed
        .map(|name| (name, json!({ MESHED_LABEL: "enabled" })))
        .chain([(NAMESPACE.to_string(), json!({}))])
        .map(|(name, labels)| {
            let namespace = json!({ "apiVersion": "v1", "kind": "Namespace",
                                    "metadata": { "name": name, "labels": labels } });
            ("/api/v1/namespaces".to_string(), namespace)
        })
        .collect()
}

/// A service account per service: its endpoints' identity, as in file mode.
fn service_accounts(shape: MeshShape) -> Vec<Create> {
    services(shape)
        .map(|service| {
            let account = json!({ "apiVersion": "v1", "kind": "ServiceAccount",
                                  "metadata": { "name": service.name() } });
            (
                format!("/api/v1/namespaces/{}/serviceaccounts", service.namespace()),
                account,
            )
        })
        .collect()
}

/// Services, their pods and EndpointSlices, the pods of the endpoints `changes` add,
/// and the policies.
fn workloads(shape: MeshShape, changes: &[Change]) -> Vec<Create> {
    let mut objects = Vec::new();
    for service in services(shape) {
        let namespace = service.namespace();
        objects.push((
            format!("/api/v1/namespaces/{namespace}/services"),
            service_object(service),
        ));
        for (endpoint, _) in service.endpoints(shape) {
            objects.push(pod(service, endpoint));
        }
        objects.push((
            format!("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"),
            slice(service, shape),
        ));
    }
    for change in changes {
        if let Change::EndpointAdded { service, revision } = *change {
            objects.push(pod(service, mesh::added_endpoint(revision).0));
        }
    }
    for (name, namespace) in POLICIES {
        let policy = json!({
            "apiVersion": "tessera.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": { "name": name }, "spec": policy_spec(0)
        });
        objects.push((
            format!("{POLICY_API}/namespaces/{namespace}/authorizationpolicies"),
            policy,
        ));
    }
    objects
}

/// A Service without a selector (no controller would act on one), its cluster IP in
/// 10.0.1.0 onwards, its port mapped to the endpoints' inbound port.
fn service_object(service: ServiceIndex) -> Value {
    let index = service.0;
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": service.name() },
        "spec": {
            "clusterIP": format!("10.0.{}.{}", 1 + index / 256, index % 256),
            "ports": [{ "name": "http", "port": SERVICE_PORT, "targetPort": INBOUND_PORT }]
        }
    })
}

/// Endpoint `endpoint`'s pod, as the injector leaves it (its proxy a native sidecar).
fn pod(service: ServiceIndex, endpoint: usize) -> Create {
    let object = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": pod_name(service, endpoint), "labels": { "app": service.name() } },
        "spec": {
            "serviceAccountName": service.name(),
            "initContainers": [{ "name": SIDECAR, "image": "example.com/proxy:1", "restartPolicy": "Always" }],
            "containers": [{ "name": "app", "image": "example.com/app:1" }]
        }
    });
    (
        format!("/api/v1/namespaces/{}/pods", service.namespace()),
        object,
    )
}

fn pod_name(service: ServiceIndex, endpoint: usize) -> String {
    format!("{}-{endpoint}", service.name())
}

/// The service's one EndpointSlice: its endpoints, ready.
fn slice(service: ServiceIndex, shape: MeshShape) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": service.name(),
                      "labels": { "kubernetes.io/service-name": service.name() } },
        "addressType": "IPv4",
        "endpoints": slice_endpoints(service, shape, 0),
        "ports": [{ "name": "http", "port": INBOUND_PORT, "protocol": "TCP" }]
    })
}

/// The slice's endpoints: the service's own, then the first `added` of those
/// [`Change::EndpointAdded`] adds (revisions 0, 1, …).
fn slice_endpoints(service: ServiceIndex, shape: MeshShape, added: usize) -> Vec<Value> {
    service
        .endpoints(shape)
        .chain((0..added).map(mesh::added_endpoint))
        .map(|(endpoint, global)| {
            json!({
                "addresses": [mesh::endpoint_ip(global)],
                "conditions": { "ready": true },
                "targetRef": { "kind": "Pod", "name": pod_name(service, endpoint),
                               "namespace": service.namespace() }
            })
        })
        .collect()
}

/// The policies' spec at `revision` (see [`mesh::denied_principal`]).
fn policy_spec(revision: usize) -> Value {
    json!({
        "action": "DENY",
        "rules": [{ "from": [{ "source": { "principals": [mesh::denied_principal(revision)] } }] }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: MeshShape = MeshShape {
        services: 250,
        endpoints_per_service: 5,
    };

    #[test]
    fn every_endpoint_names_a_pod_that_is_created() {
        let change = Change::EndpointAdded {
            service: ServiceIndex(7),
            revision: 0,
        };
        let objects = workloads(SHAPE, &[change]);
        let pods: Vec<(&str, &str)> = objects
            .iter()
            .filter(|(_, o)| o["kind"] == "Pod")
            .map(|(path, o)| (path.as_str(), o["metadata"]["name"].as_str().unwrap()))
            .collect();
        assert_eq!(pods.len(), SHAPE.endpoints() + 1);
        let edited = slice_endpoints(ServiceIndex(7), SHAPE, 1);
        assert_eq!(edited.len(), SHAPE.endpoints_per_service + 1);
        for endpoint in &edited {
            let target = &endpoint["targetRef"];
            let path = format!(
                "/api/v1/namespaces/{}/pods",
                target["namespace"].as_str().unwrap()
            );
            assert!(
                pods.contains(&(path.as_str(), target["name"].as_str().unwrap())),
                "{target}"
            );
        }
    }

    #[test]
    fn cluster_ips_are_distinct_and_inside_the_service_range() {
        let ips: std::collections::HashSet<String> = (0..10_000)
            .map(|i| {
                service_object(ServiceIndex(i))["spec"]["clusterIP"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(ips.len(), 10_000);
        assert!(!ips.contains("10.0.0.1"), "the API server's own Service");
        for ip in ips {
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            assert_eq!(ip.octets()[..2], [10, 0]);
        }
    }

    #[test]
    fn service_namespaces_are_meshed_and_the_benchs_is_not() {
        let namespaces = namespaces(SHAPE);
        assert_eq!(namespaces.len(), 3 + 1);
        let meshed = |n: &Create| n.1["metadata"]["labels"][MESHED_LABEL] == "enabled";
        assert!(namespaces[..3].iter().all(meshed));
        assert!(!meshed(&namespaces[3]));
    }
}
