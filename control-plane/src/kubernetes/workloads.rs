//! Services and their workloads from Kubernetes' own objects: Namespaces, Services,
//! EndpointSlices and Pods, as the file mode's `Service` and `Workload` resources.
//!
//! - A Service belongs to the mesh when its namespace is meshed (labelled
//!   `tessera.dev/inject: enabled`); its cluster IPs are the virtual IPs transparent
//!   proxies route by, its ports' protocols come from `appProtocol` or the port's name
//!   (`http`, `http-web`, `grpc`, `tcp-db`, …, as Istio names them), else detection.
//! - Its workloads are the ready endpoints of its EndpointSlices (terminating ones are
//!   left out, so proxies drain them) whose Pod carries the sidecar; the identity is the
//!   pod's service account, and each service port maps to the slice's port of the same
//!   name (the Service's `targetPort`).
//!
//! Headless and ExternalName Services have no virtual IP to route by: left out (their
//! callers dial pods or names directly, which transparent mode passes through).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServicePort as KubePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::ResourceExt as _;
use tessera_mesh::resources::{
    Metadata, Origin, Protocol, Resource, ServicePort, ServiceSpec, Spec, WorkloadSpec,
};

use super::conversions::{Conversions, Version};
use super::root_cert::MESHED_VALUE;
use crate::inject::annotations::INJECT;
use crate::inject::sidecar::PROXY_CONTAINER;

/// The label naming an EndpointSlice's Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the watches hold, at one moment.
pub struct ClusterState<'a> {
    pub namespaces: &'a [Arc<Namespace>],
    pub services: &'a [Arc<Service>],
    pub slices: &'a [Arc<EndpointSlice>],
    pub pods: &'a [Arc<Pod>],
}

/// What each Kubernetes Service was converted to: the mesh Service and its workloads.
pub type ConvertedServices = Conversions<ServiceInputs, Vec<Arc<Resource>>>;

/// Pods by (namespace, name), as endpoints name them.
type PodIndex<'a> = HashMap<(&'a str, &'a str), &'a Pod>;

/// The meshed Services and their workloads, in a stable order. A Service whose objects
/// are as `converted` last saw them is not converted again; its resources are shared.
pub fn resources(
    state: &ClusterState<'_>,
    converted: &mut ConvertedServices,
) -> Vec<Arc<Resource>> {
    let meshed = meshed_namespaces(state.namespaces);
    let pods = pods_by_name(state.pods);
    let slices_of = slices_by_service(state.slices);
    let mut services: Vec<&Service> = state
        .services
        .iter()
        .map(|service| &**service)
        .filter(|service| {
            meshed.contains(service.metadata.namespace.as_deref().unwrap_or_default())
        })
        .collect();
    // Keys borrowed: copied per comparison, they would cost more than the sort.
    services.sort_by(|a, b| namespace_and_name(a).cmp(&namespace_and_name(b)));
    let mut load = converted.load();
    let mut resources = Vec::new();
    for service in services {
        let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
        let name = service.metadata.name.as_deref().unwrap_or_default();
        let objects = ServiceObjects {
            service,
            slices: slices_of.get(&(namespace, name)).map_or(&[], Vec::as_slice),
            pods: &pods,
        };
        let conversion = load.get(
            service.metadata.uid.as_deref(),
            |inputs| inputs.are_current(&objects),
            || (ServiceInputs::of(&objects), objects.convert()),
        );
        resources.extend(conversion.iter().cloned());
    }
    resources
}

fn namespace_and_name(service: &Service) -> (Option<&str>, Option<&str>) {
    let metadata = &service.metadata;
    (metadata.namespace.as_deref(), metadata.name.as_deref())
}

/// The names of the namespaces whose Services belong to the mesh.
fn meshed_namespaces(namespaces: &[Arc<Namespace>]) -> HashSet<&str> {
    namespaces
        .iter()
        .filter(|namespace| {
            namespace
                .labels()
                .get(INJECT)
                .is_some_and(|v| v == MESHED_VALUE)
        })
        .filter_map(|namespace| namespace.metadata.name.as_deref())
        .collect()
}

fn pods_by_name(pods: &[Arc<Pod>]) -> PodIndex<'_> {
    pods.iter()
        .filter_map(|pod| {
            let key = (
                pod.metadata.namespace.as_deref()?,
                pod.metadata.name.as_deref()?,
            );
            Some((key, &**pod))
        })
        .collect()
}

/// The slices of each Service, by (namespace, name), in name order: found once per load,
/// not by reading every slice for every Service, which a mesh of thousands cannot afford.
fn slices_by_service(slices: &[Arc<EndpointSlice>]) -> HashMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let namespace = slice.metadata.namespace.as_deref();
        let service = slice.labels().get(SERVICE_NAME_LABEL);
        if let (Some(namespace), Some(service)) = (namespace, service) {
            by_service
                .entry((namespace, service.as_str()))
                .or_default()
                .push(slice);
        }
    }
    // The store's order is a hash map's: sorted, the same slices read the same way.
    for slices in by_service.values_mut() {
        slices.sort_by_key(|slice| slice.metadata.name.as_deref());
    }
    by_service
}

/// Everything one Service's conversion reads: the Service, its slices, and the pods
/// their endpoints name.
struct ServiceObjects<'a> {
    service: &'a Service,
    slices: &'a [&'a EndpointSlice],
    pods: &'a PodIndex<'a>,
}

impl ServiceObjects<'_> {
    /// The Service as a mesh service and its workloads; nothing without a virtual IP.
    fn convert(&self) -> Vec<Arc<Resource>> {
        let service = self.service;
        let Some(spec) = service_spec(service) else {
            return Vec::new();
        };
        let family = spec.addresses.first().copied();
        let namespace = service.namespace().unwrap_or_default();
        let name = service.name_any();
        let mut resources = vec![Arc::new(resource(
            "Service",
            &namespace,
            &name,
            Spec::Service(spec),
        ))];
        let ports = service_ports(service);
        let slices = self
            .slices
            .iter()
            .filter(|slice| same_family(&slice.address_type, family));
        let mut workloads: Vec<(String, WorkloadSpec)> = Vec::new();
        for slice in slices {
            let target_ports = target_ports(ports, slice);
            workloads.extend(slice.endpoints.iter().filter_map(|endpoint| {
                workload(endpoint, &target_ports, &name, &namespace, self.pods)
            }));
        }
        workloads.sort_by(|a, b| (&a.0, &a.1.address).cmp(&(&b.0, &b.1.address)));
        workloads.dedup_by(|a, b| a.1.address == b.1.address);
        resources.extend(workloads.into_iter().map(|(pod, workload)| {
            let name = format!("{pod}.{}", workload.service);
            Arc::new(resource("Pod", &namespace, &name, Spec::Workload(workload)))
        }));
        resources
    }

    /// Per endpoint of each slice, in order, the pod of the Service's namespace it names,
    /// if there is one: at least every pod [`Self::convert`] reads.
    fn pods_named(&self) -> impl Iterator<Item = Option<&Pod>> {
        let namespace = self
            .service
            .metadata
            .namespace
            .as_deref()
            .unwrap_or_default();
        self.slices
            .iter()
            .flat_map(|slice| &slice.endpoints)
            .map(move |endpoint| {
                let name = endpoint.target_ref.as_ref()?.name.as_deref()?;
                self.pods.get(&(namespace, name)).copied()
            })
    }
}

/// The versions of the objects a Service's conversion read, which it stays right for.
#[derive(Debug)]
pub struct ServiceInputs {
    service: Version,
    slices: Vec<Version>,
    /// Per endpoint, the version of the pod it named (`None`: no such pod).
    pods: Vec<Option<Version>>,
}

impl ServiceInputs {
    /// `None` when one of the objects has no version to tell a later one by.
    fn of(objects: &ServiceObjects<'_>) -> Option<Self> {
        let slices = objects.slices.iter();
        let pods = objects.pods_named().map(|pod| match pod {
            Some(pod) => Version::of(&pod.metadata).map(Some),
            None => Some(None),
        });
        Some(Self {
            service: Version::of(&objects.service.metadata)?,
            slices: slices
                .map(|slice| Version::of(&slice.metadata))
                .collect::<Option<_>>()?,
            pods: pods.collect::<Option<_>>()?,
        })
    }

    /// Whether `objects` are the versions read: same Service, same slices, and every
    /// endpoint naming the same pod, or again none.
    fn are_current(&self, objects: &ServiceObjects<'_>) -> bool {
        let same_slices = self.slices.len() == objects.slices.len()
            && (self.slices.iter())
                .zip(objects.slices)
                .all(|(version, slice)| version.is(&slice.metadata));
        if !self.service.is(&objects.service.metadata) || !same_slices {
            return false;
        }
        let mut read = self.pods.iter();
        let same_pods = objects.pods_named().all(|pod| match (read.next(), pod) {
            (Some(Some(version)), Some(pod)) => version.is(&pod.metadata),
            (Some(None), None) => true,
            _ => false,
        });
        same_pods && read.next().is_none()
    }
}

fn resource(kind: &str, namespace: &str, name: &str, spec: Spec) -> Resource {
    Resource {
        origin: Origin {
            file: PathBuf::from(format!("{kind} {namespace}/{name}")),
            line: 0,
        },
        metadata: Metadata {
            name: name.to_string(),
            namespace: Some(namespace.to_string()),
            ..Metadata::default()
        },
        spec,
    }
}

/// The Service as a mesh service; `None` without a virtual IP (headless, ExternalName).
fn service_spec(service: &Service) -> Option<ServiceSpec> {
    let spec = service.spec.as_ref()?;
    let mut addresses: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    addresses.dedup();
    if addresses.is_empty() {
        return None;
    }
    let ports = service_ports(service)
        .iter()
        .filter(|port| port.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|port| {
            Some(ServicePort {
                port: u16::try_from(port.port).ok()?,
                protocol: protocol(port.app_protocol.as_deref(), port.name.as_deref()),
            })
        })
        .collect();
    Some(ServiceSpec { ports, addresses })
}

fn service_ports(service: &Service) -> &[KubePort] {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.ports.as_deref())
        .unwrap_or_default()
}

/// A port's protocol from its `appProtocol`, else its name's prefix (Istio's naming),
/// else sniffed.
fn protocol(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let named = |word: &str| match word.to_ascii_lowercase().as_str() {
        "http" | "http1" | "kubernetes.io/ws" => Some(Protocol::Http),
        "http2" | "h2c" | "grpc" | "kubernetes.io/h2c" => Some(Protocol::Http2),
        "tcp" | "tls" | "https" | "kubernetes.io/wss" | "mongo" | "mysql" | "redis" => {
            Some(Protocol::Opaque)
        }
        _ => None,
    };
    app_protocol
        .and_then(named)
        .or_else(|| name.and_then(|name| named(name.split('-').next().unwrap_or(name))))
        .unwrap_or(Protocol::Detect)
}

/// Whether a slice's endpoints are of the Service's (first) IP family.
fn same_family(address_type: &str, family: Option<IpAddr>) -> bool {
    match family {
        Some(IpAddr::V6(_)) => address_type == "IPv6",
        _ => address_type == "IPv4",
    }
}

/// Service port → the slice's port of the same name (the resolved `targetPort`).
fn target_ports(ports: &[KubePort], slice: &EndpointSlice) -> BTreeMap<u16, u16> {
    let slice_ports = slice.ports.as_deref().unwrap_or_default();
    ports
        .iter()
        .filter_map(|port| {
            let target = slice_ports
                .iter()
                .find(|p| p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or(""))?;
            Some((
                u16::try_from(port.port).ok()?,
                u16::try_from(target.port?).ok()?,
            ))
        })
        .collect()
}

/// A ready endpoint whose pod carries the sidecar, as (pod name, workload).
fn workload(
    endpoint: &Endpoint,
    target_ports: &BTreeMap<u16, u16>,
    service: &str,
    namespace: &str,
    pods: &PodIndex<'_>,
) -> Option<(String, WorkloadSpec)> {
    let conditions = endpoint.conditions.as_ref();
    // "Ready unset" means ready, as kube-proxy reads it.
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if !ready || terminating {
        return None;
    }
    let target = endpoint.target_ref.as_ref()?;
    if target.kind.as_deref() != Some("Pod") {
        return None;
    }
    let pod_name = target.name.as_deref()?;
    // A slice names pods of its own namespace: one pointing elsewhere would have its
    // address expected to prove another namespace's identity.
    if target
        .namespace
        .as_deref()
        .is_some_and(|ns| ns != namespace)
    {
        return None;
    }
    let pod = pods.get(&(namespace, pod_name))?;
    if !has_sidecar(pod) || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ip: IpAddr = endpoint.addresses.first()?.parse().ok()?;
    let first_port = *target_ports.values().next()?;
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.service_account_name.clone())
        .unwrap_or_else(|| "default".to_string());
    let workload = WorkloadSpec {
        service: service.to_string(),
        service_account,
        address: std::net::SocketAddr::new(ip, first_port).to_string(),
        ports: target_ports.clone(),
    };
    Some((pod_name.to_string(), workload))
}

/// Whether the injector gave the pod its proxy (a native sidecar, or a container on
/// clusters without them).
fn has_sidecar(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(|container| container.name == PROXY_CONTAINER)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use serde_json::{Value, json};

    use super::*;

    fn object<K: serde::de::DeserializeOwned>(value: Value) -> Arc<K> {
        Arc::new(serde_json::from_value(value).unwrap())
    }

    fn namespace(name: &str, meshed: bool) -> Arc<Namespace> {
        let labels = if meshed {
            json!({ INJECT: MESHED_VALUE })
        } else {
            json!({})
        };
        object(json!({ "metadata": { "name": name, "labels": labels } }))
    }

    fn service(namespace: &str, cluster_ip: &str) -> Arc<Service> {
        object(json!({
            "metadata": { "name": "orders", "namespace": namespace },
            "spec": {
                "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                "ports": [
                    { "name": "http-api", "port": 80, "targetPort": "api" },
                    { "name": "metrics", "port": 9090, "appProtocol": "http" },
                    { "name": "dns", "port": 53, "protocol": "UDP" }
                ]
            }
        }))
    }

    fn pod(name: &str, account: &str, sidecar: bool) -> Arc<Pod> {
        let init = if sidecar {
            json!([{ "name": PROXY_CONTAINER }])
        } else {
            json!([])
        };
        object(json!({
            "metadata": { "name": name, "namespace": "shop" },
            "spec": { "serviceAccountName": account, "initContainers": init,
                      "containers": [{ "name": "app" }] }
        }))
    }

    fn endpoint(ip: &str, pod: &str, conditions: Value) -> Value {
        json!({ "addresses": [ip], "conditions": conditions,
                "targetRef": { "kind": "Pod", "name": pod, "namespace": "shop" } })
    }

    fn slice(endpoints: Vec<Value>) -> Arc<EndpointSlice> {
        object(json!({
            "metadata": { "name": "orders-abcde", "namespace": "shop",
                          "labels": { SERVICE_NAME_LABEL: "orders" } },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [ { "name": "http-api", "port": 8080 }, { "name": "metrics", "port": 9091 } ]
        }))
    }

    fn build(
        namespaces: &[Arc<Namespace>],
        slices: &[Arc<EndpointSlice>],
        pods: &[Arc<Pod>],
    ) -> Vec<Resource> {
        from_scratch(&ClusterState {
            namespaces,
            services: &[service("shop", "10.96.0.10")],
            slices,
            pods,
        })
    }

    /// The resources of `state` with nothing converted before.
    fn from_scratch(state: &ClusterState<'_>) -> Vec<Resource> {
        resources(state, &mut ConvertedServices::default())
            .iter()
            .map(|resource| (**resource).clone())
            .collect()
    }

    fn workloads(resources: &[Resource]) -> Vec<(String, WorkloadSpec)> {
        resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::Workload(w) => Some((r.metadata.name.clone(), w.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_meshed_service_has_its_virtual_ip_ports_and_ready_sidecar_pods() {
        let pods = [
            pod("orders-1", "orders", true),
            pod("orders-2", "orders", true),
        ];
        let slices = [slice(vec![
            endpoint("10.0.0.1", "orders-1", json!({ "ready": true })),
            endpoint("10.0.0.2", "orders-2", json!({})),
        ])];
        let resources = build(&[namespace("shop", true)], &slices, &pods);
        let Spec::Service(spec) = &resources[0].spec else {
            panic!("no service first: {resources:?}");
        };
        assert_eq!(resources[0].origin.to_string(), "Service shop/orders");
        assert_eq!(spec.addresses, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        let ports: Vec<(u16, Protocol)> = spec.ports.iter().map(|p| (p.port, p.protocol)).collect();
        assert_eq!(
            ports,
            [(80, Protocol::Http), (9090, Protocol::Http)],
            "UDP left out"
        );
        let workloads = workloads(&resources);
        assert_eq!(workloads.len(), 2, "{workloads:?}");
        let (name, first) = &workloads[0];
        assert_eq!(name, "orders-1.orders");
        assert_eq!(first.service_account, "orders");
        assert_eq!(first.address, "10.0.0.1:8080");
        assert_eq!(first.ports, BTreeMap::from([(80, 8080), (9090, 9091)]));
        assert_eq!(
            workloads[1].1.address, "10.0.0.2:8080",
            "ready unset is ready"
        );
    }

    #[test]
    fn unready_terminating_unmeshed_unknown_and_foreign_pods_are_not_workloads() {
        let pods = [
            pod("ready", "orders", true),
            pod("unready", "orders", true),
            pod("leaving", "orders", true),
            pod("plain", "orders", false),
            object(json!({
                "metadata": { "name": "ready", "namespace": "other" },
                "spec": { "serviceAccountName": "admin",
                          "initContainers": [{ "name": PROXY_CONTAINER }], "containers": [] }
            })),
        ];
        let slices = [slice(vec![
            endpoint("10.0.0.1", "ready", json!({ "ready": true })),
            endpoint("10.0.0.2", "unready", json!({ "ready": false })),
            endpoint(
                "10.0.0.3",
                "leaving",
                json!({ "ready": true, "terminating": true }),
            ),
            endpoint("10.0.0.4", "plain", json!({ "ready": true })),
            endpoint("10.0.0.5", "gone", json!({ "ready": true })),
            {
                // A pod of that name in another namespace is not this slice's.
                let mut elsewhere = endpoint("10.0.0.6", "ready", json!({ "ready": true }));
                elsewhere["targetRef"]["namespace"] = json!("other");
                elsewhere
            },
        ])];
        let resources = build(&[namespace("shop", true)], &slices, &pods);
        let addresses: Vec<String> = workloads(&resources)
            .into_iter()
            .map(|(_, w)| w.address)
            .collect();
        assert_eq!(addresses, ["10.0.0.1:8080"]);
    }

    #[test]
    fn services_outside_meshed_namespaces_or_without_a_virtual_ip_are_left_out() {
        let pods = [pod("orders-1", "orders", true)];
        let slices = [slice(vec![endpoint("10.0.0.1", "orders-1", json!({}))])];
        assert!(build(&[namespace("shop", false)], &slices, &pods).is_empty());
        assert!(build(&[], &slices, &pods).is_empty());
        let headless = from_scratch(&ClusterState {
            namespaces: &[namespace("shop", true)],
            services: &[service("shop", "None")],
            slices: &slices,
            pods: &pods,
        });
        assert!(headless.is_empty(), "{headless:?}");
    }

    /// Many Services of one name in several namespaces, and slices labelled for each:
    /// every Service takes the endpoints of its own namespace's slices and no other's.
    #[test]
    fn each_service_takes_the_slices_of_its_namespace_and_name() {
        let namespaces: Vec<String> = (0..5).map(|n| format!("ns-{n}")).collect();
        let mut services = Vec::new();
        let (mut slices, mut pods) = (Vec::new(), Vec::new());
        for (n, namespace) in namespaces.iter().enumerate() {
            for s in 0..40 {
                let name = format!("svc-{s}");
                services.push(object(json!({
                    "metadata": { "name": name, "namespace": namespace },
                    "spec": { "clusterIP": format!("10.96.{n}.{s}"),
                              "ports": [{ "name": "http", "port": 80 }] }
                })));
                let pod_name = format!("{name}-pod");
                pods.push(object(json!({
                    "metadata": { "name": pod_name, "namespace": namespace },
                    "spec": { "serviceAccountName": name,
                              "initContainers": [{ "name": PROXY_CONTAINER }],
                              "containers": [{ "name": "app" }] }
                })));
                slices.push(object(json!({
                    "metadata": { "name": format!("{name}-abcde"), "namespace": namespace,
                                  "labels": { SERVICE_NAME_LABEL: name } },
                    "addressType": "IPv4",
                    "endpoints": [{ "addresses": [format!("10.1.{n}.{s}")],
                                    "targetRef": { "kind": "Pod", "name": pod_name } }],
                    "ports": [{ "name": "http", "port": 8080 }]
                })));
            }
        }
        let meshed: Vec<Arc<Namespace>> = namespaces.iter().map(|n| namespace(n, true)).collect();
        let resources = from_scratch(&ClusterState {
            namespaces: &meshed,
            services: &services,
            slices: &slices,
            pods: &pods,
        });
        let workloads: Vec<(String, String)> = resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::Workload(w) => Some((r.origin.to_string(), w.address.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(workloads.len(), 5 * 40);
        for (origin, address) in workloads {
            // "Pod ns-N/svc-S-pod.svc-S" at 10.1.N.S.
            let (namespace, rest) = origin["Pod ns-".len()..].split_once('/').unwrap();
            let service = rest.split_once('.').unwrap().1;
            let expected = format!("10.1.{namespace}.{}:8080", &service["svc-".len()..]);
            assert_eq!(address, expected, "{origin}");
        }
    }

    static WRITES: AtomicU64 = AtomicU64::new(1);

    /// `object` as an API server keeps it: a uid once created, a new resourceVersion
    /// at every write.
    fn stored<K: kube::Resource>(mut object: K) -> Arc<K> {
        let write = WRITES.fetch_add(1, Ordering::Relaxed);
        let metadata = object.meta_mut();
        metadata.uid.get_or_insert_with(|| format!("uid-{write}"));
        metadata.resource_version = Some(write.to_string());
        Arc::new(object)
    }

    /// Writes the object `name` of `objects`, changed by `change`.
    fn edit<K: kube::Resource + Clone>(
        objects: &mut [Arc<K>],
        name: &str,
        change: impl FnOnce(&mut K),
    ) {
        let object = objects
            .iter_mut()
            .find(|object| object.meta().name.as_deref() == Some(name))
            .unwrap();
        let mut edited = (**object).clone();
        change(&mut edited);
        *object = stored(edited);
    }

    fn renamed<K: kube::Resource + Clone>(object: &K, name: &str) -> K {
        let mut object = object.clone();
        object.meta_mut().name = Some(name.to_string());
        object
    }

    /// The meshed namespace `shop` with the Services `orders` and `payments`, each with
    /// one slice of two ready sidecar pods, every object as an API server keeps it.
    struct Cluster {
        namespaces: Vec<Arc<Namespace>>,
        services: Vec<Arc<Service>>,
        slices: Vec<Arc<EndpointSlice>>,
        pods: Vec<Arc<Pod>>,
    }

    impl Cluster {
        fn shop() -> Self {
            let orders = service("shop", "10.96.0.10");
            let mut payments = renamed(&*service("shop", "10.96.0.11"), "payments");
            payments.spec.as_mut().unwrap().cluster_ips = None;
            let mut slices = Vec::new();
            let mut pods = Vec::new();
            for (service, subnet) in [("orders", 1), ("payments", 2)] {
                let endpoints = (1..=2)
                    .map(|n| {
                        let pod_name = format!("{service}-{n}");
                        pods.push(stored((*pod(&pod_name, service, true)).clone()));
                        endpoint(&format!("10.0.{subnet}.{n}"), &pod_name, json!({}))
                    })
                    .collect();
                let mut slice = renamed(&*slice(endpoints), &format!("{service}-abcde"));
                slice
                    .labels_mut()
                    .insert(SERVICE_NAME_LABEL.into(), service.into());
                slices.push(stored(slice));
            }
            Self {
                namespaces: vec![stored((*namespace("shop", true)).clone())],
                services: vec![stored((*orders).clone()), stored(payments)],
                slices,
                pods,
            }
        }

        fn state(&self) -> ClusterState<'_> {
            ClusterState {
                namespaces: &self.namespaces,
                services: &self.services,
                slices: &self.slices,
                pods: &self.pods,
            }
        }

        /// Loads through `converted`, holding the result to what a conversion of
        /// everything from scratch gives.
        fn load(&self, converted: &mut ConvertedServices) -> Vec<Arc<Resource>> {
            let resources = resources(&self.state(), converted);
            let loaded: Vec<&Resource> = resources.iter().map(|r| &**r).collect();
            let expected = from_scratch(&self.state());
            assert_eq!(loaded, expected.iter().collect::<Vec<_>>());
            resources
        }
    }

    /// The resources of `resources` whose origin starts with `prefix`.
    fn of<'r>(resources: &'r [Arc<Resource>], prefix: &str) -> Vec<&'r Arc<Resource>> {
        resources
            .iter()
            .filter(|r| r.origin.to_string().starts_with(prefix))
            .collect()
    }

    fn shared(before: &[&Arc<Resource>], after: &[&Arc<Resource>]) -> bool {
        before.len() == after.len() && before.iter().zip(after).all(|(b, a)| Arc::ptr_eq(b, a))
    }

    /// A change to one Service's slice converts that Service again and shares the
    /// other's resources, as they were.
    #[test]
    fn a_load_after_another_services_change_shares_the_unchanged_conversions() {
        let mut cluster = Cluster::shop();
        let mut converted = ConvertedServices::default();
        let before = cluster.load(&mut converted);
        assert_eq!(before.len(), 2 * 3, "{before:?}");
        edit(&mut cluster.slices, "payments-abcde", |slice| {
            slice.endpoints.pop();
        });
        let after = cluster.load(&mut converted);
        let orders = "Service shop/orders";
        assert!(shared(&of(&before, orders), &of(&after, orders)));
        assert!(shared(
            &of(&before, "Pod shop/orders"),
            &of(&after, "Pod shop/orders")
        ));
        assert_eq!(of(&after, "Pod shop/payments").len(), 1);
        let again = cluster.load(&mut converted);
        assert!(shared(&of(&after, ""), &of(&again, "")), "nothing changed");
    }

    /// Each object a Service's resources are converted from, changed, changes them.
    #[test]
    fn a_change_to_any_object_a_service_reads_is_converted() {
        type Change = fn(&mut Cluster);
        let changes: [(&str, Change); 8] = [
            ("endpoint unready", |c| {
                edit(&mut c.slices, "orders-abcde", |slice| {
                    slice.endpoints[0].conditions =
                        serde_json::from_value(json!({ "ready": false })).unwrap();
                })
            }),
            ("endpoint added", |c| {
                edit(&mut c.slices, "orders-abcde", |slice| {
                    let added = endpoint("10.0.1.3", "payments-1", json!({}));
                    slice.endpoints.push(serde_json::from_value(added).unwrap());
                })
            }),
            ("slice port", |c| {
                edit(&mut c.slices, "orders-abcde", |slice| {
                    slice.ports.as_mut().unwrap()[0].port = Some(8443);
                })
            }),
            ("pod terminating", |c| {
                edit(&mut c.pods, "orders-1", |pod| {
                    let deleted = json!("2026-12-05T00:00:00Z");
                    pod.metadata.deletion_timestamp = serde_json::from_value(deleted).unwrap();
                })
            }),
            ("pod without its sidecar", |c| {
                edit(&mut c.pods, "orders-2", |pod| {
                    pod.spec.as_mut().unwrap().init_containers = None;
                })
            }),
            ("pod deleted", |c| {
                c.pods.retain(|pod| pod.name_any() != "orders-1")
            }),
            ("service port", |c| {
                edit(&mut c.services, "orders", |service| {
                    service.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 81;
                })
            }),
            ("namespace unmeshed", |c| {
                edit(&mut c.namespaces, "shop", |namespace| {
                    namespace.labels_mut().clear();
                })
            }),
        ];
        for (what, change) in changes {
            let mut cluster = Cluster::shop();
            let mut converted = ConvertedServices::default();
            let before = cluster.load(&mut converted);
            change(&mut cluster);
            // `load` holds it to a conversion from scratch.
            let after = cluster.load(&mut converted);
            let deref = |resources: &[Arc<Resource>]| -> Vec<Resource> {
                of(resources, "")
                    .into_iter()
                    .map(|r| (**r).clone())
                    .collect()
            };
            assert_ne!(deref(&before), deref(&after), "{what}");
            let payments = "Service shop/payments";
            if what != "namespace unmeshed" {
                assert!(
                    shared(&of(&before, payments), &of(&after, payments)),
                    "{what}"
                );
            }
        }
    }

    /// The watches are not ordered between kinds: a slice may name a pod the control
    /// plane has not seen yet. Its workload appears once the pod does.
    #[test]
    fn a_pod_seen_after_the_endpoint_naming_it_is_converted() {
        let mut cluster = Cluster::shop();
        let late = cluster.pods.remove(0);
        let mut converted = ConvertedServices::default();
        assert_eq!(workload_specs(&cluster.load(&mut converted)).count(), 3);
        cluster.pods.push(late);
        assert_eq!(workload_specs(&cluster.load(&mut converted)).count(), 4);
    }

    /// An object deleted and created again under its name is a new object, even at the
    /// same resourceVersion: what was converted from the old one is not reused.
    #[test]
    fn a_recreated_object_is_converted_again_whatever_its_resource_version() {
        let mut cluster = Cluster::shop();
        let mut converted = ConvertedServices::default();
        let before = cluster.load(&mut converted);
        // `load` holds each load to a conversion from scratch.
        recreate(&mut cluster.pods[0], |pod| {
            pod.spec.as_mut().unwrap().service_account_name = Some("intruder".into());
        });
        let after = cluster.load(&mut converted);
        assert_ne!(before, after);
        recreate(&mut cluster.slices[0], |slice| {
            slice.endpoints.truncate(1);
        });
        let fewer = cluster.load(&mut converted);
        assert_eq!(fewer.len(), after.len() - 1);
        recreate(&mut cluster.services[0], |service| {
            let spec = service.spec.as_mut().unwrap();
            (spec.cluster_ip, spec.cluster_ips) = (Some("10.96.0.99".into()), None);
        });
        let readdressed = cluster.load(&mut converted);
        assert_ne!(fewer[0], readdressed[0]);
    }

    /// `object` deleted and created again, changed, at the same resourceVersion.
    fn recreate<K: kube::Resource + Clone>(object: &mut Arc<K>, change: impl FnOnce(&mut K)) {
        let mut recreated = (**object).clone();
        change(&mut recreated);
        let uid = &mut recreated.meta_mut().uid;
        *uid = Some(format!("{}-again", uid.as_deref().unwrap_or_default()));
        *object = Arc::new(recreated);
    }

    fn workload_specs(resources: &[Arc<Resource>]) -> impl Iterator<Item = &WorkloadSpec> {
        resources.iter().filter_map(|r| match &r.spec {
            Spec::Workload(workload) => Some(workload),
            _ => None,
        })
    }

    /// Without versions (objects not from an API server) nothing could tell a later
    /// object from the one converted: nothing is kept.
    #[test]
    fn objects_without_versions_are_converted_every_time() {
        let mut cluster = Cluster::shop();
        cluster.pods.push(pod("orders-3", "orders", true));
        cluster.slices[0] = slice(vec![endpoint("10.0.1.3", "orders-3", json!({}))]);
        let mut converted = ConvertedServices::default();
        assert_eq!(workload_specs(&cluster.load(&mut converted)).count(), 1 + 2);
        assert_eq!(
            converted.kept(),
            1,
            "payments only: orders read a pod without a version"
        );
        cluster.pods.pop();
        assert_eq!(workload_specs(&cluster.load(&mut converted)).count(), 2);
    }

    /// What is kept is the last load's Services: a deleted one, or one whose namespace
    /// left the mesh, is forgotten.
    #[test]
    fn deleted_services_leave_the_conversions() {
        let mut cluster = Cluster::shop();
        let mut converted = ConvertedServices::default();
        cluster.load(&mut converted);
        assert_eq!(converted.kept(), 2);
        cluster
            .services
            .retain(|service| service.name_any() != "payments");
        cluster.load(&mut converted);
        assert_eq!(converted.kept(), 1);
        edit(&mut cluster.namespaces, "shop", |namespace| {
            namespace.labels_mut().clear();
        });
        assert!(cluster.load(&mut converted).is_empty());
        assert_eq!(converted.kept(), 0);
    }

    #[test]
    fn port_protocols_follow_app_protocol_then_the_name() {
        assert_eq!(
            protocol(Some("kubernetes.io/h2c"), Some("tcp")),
            Protocol::Http2
        );
        assert_eq!(protocol(Some("grpc"), None), Protocol::Http2);
        assert_eq!(protocol(None, Some("grpc-orders")), Protocol::Http2);
        assert_eq!(protocol(None, Some("tcp-postgres")), Protocol::Opaque);
        assert_eq!(protocol(None, Some("HTTP")), Protocol::Http);
        assert_eq!(protocol(Some("unknown"), Some("web")), Protocol::Detect);
        assert_eq!(protocol(None, None), Protocol::Detect);
    }
}
