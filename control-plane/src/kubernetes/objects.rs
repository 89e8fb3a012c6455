//! The cluster's `tessera.dev` objects, as the file mode's resources.
//!
//! One reflector per kind (list, then watch from the list's resourceVersion; kube-runtime
//! re-lists on 410 Gone and backs off on errors, so no update is lost) keeps a store of
//! the objects. Every change wakes the configuration loader, which merges
//! [`ClusterObjects::resources`] with the configuration directory's and checks the whole
//! as it checks files: one snapshot, one set of rules. Only the objects changed since
//! the last load are converted again ([`super::conversions`]).
//!
//! Objects are read untyped and converted one by one: an object the control plane cannot
//! read (the API server's schema lets through something our types refuse) is reported
//! and its last good version stays in force, so one bad object neither stops the others
//! nor drops a DENY policy that was enforced.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::store::WriterDropped;
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::watcher::ExponentialBackoff;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, CustomResourceExt as _, ResourceExt as _};
use serde::de::DeserializeOwned;
use tessera_mesh::resources::{Metadata, Origin, Resource, Spec};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tracing::warn;

use super::acceptance::{Accepted, Candidate};
use super::conversions::Conversions;
use super::crds;
use super::status::{Subject, Verdict};
use super::workloads::{self, ClusterState, ConvertedServices};

/// One watched kind: its store of objects.
struct Kind {
    name: &'static str,
    resource: ApiResource,
    store: Store<DynamicObject>,
    /// Each object as a candidate, by the resourceVersion it was read from.
    converted: Mutex<Conversions<String, Candidate>>,
}

impl Kind {
    fn new(name: &'static str, resource: ApiResource, store: Store<DynamicObject>) -> Self {
        Self {
            name,
            resource,
            store,
            converted: Mutex::default(),
        }
    }

    /// Its objects as candidates, by namespace and name; an object at the version last
    /// read is not read again.
    fn candidates(&self) -> Vec<Candidate> {
        let mut objects = self.store.state();
        objects.sort_by_key(|object| (object.namespace(), object.name_any()));
        let mut converted = self
            .converted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut load = converted.load();
        let candidates = objects.iter().map(|object| {
            let version = object.metadata.resource_version.as_ref();
            load.get(
                object.metadata.uid.as_deref(),
                |read| Some(read) == version,
                || (version.cloned(), candidate(self, object)),
            )
            .into_owned()
        });
        candidates.collect()
    }
}

/// The `tessera.dev` objects of every namespace, kept current by their watches.
pub struct ClusterObjects {
    kinds: Vec<Kind>,
    /// Services and workloads from Namespaces, Services, EndpointSlices and Pods.
    discovery: Option<Discovery>,
    /// Per candidate key: its version in the last snapshot built.
    accepted: Mutex<HashMap<String, Arc<Resource>>>,
    /// Per candidate key: the refusal last logged, so a reload logs each one once.
    reported: Mutex<HashMap<String, String>>,
    /// What the last snapshot made of each `tessera.dev` object.
    verdicts: watch::Sender<Vec<Verdict>>,
}

/// Every watched kind (the CRD's kind, which is the file mode's) and its API resource.
fn watched() -> [(&'static str, ApiResource); 7] {
    [
        (
            "AuthorizationPolicy",
            crds::AuthorizationPolicy::api_resource(),
        ),
        (
            "PeerAuthentication",
            crds::PeerAuthentication::api_resource(),
        ),
        (
            "RequestAuthentication",
            crds::RequestAuthentication::api_resource(),
        ),
        ("RateLimitPolicy", crds::RateLimitPolicy::api_resource()),
        ("RoutePolicy", crds::RoutePolicy::api_resource()),
        ("Service", crds::MeshService::api_resource()),
        ("Workload", crds::MeshWorkload::api_resource()),
    ]
}

/// An object's spec as the file mode's resource spec of `kind`.
fn to_spec(kind: &str, spec: serde_json::Value) -> Result<Spec, serde_json::Error> {
    use serde_json::from_value;
    Ok(match kind {
        "AuthorizationPolicy" => Spec::AuthorizationPolicy(from_value(spec)?),
        "PeerAuthentication" => Spec::PeerAuthentication(from_value(spec)?),
        "RequestAuthentication" => Spec::RequestAuthentication(from_value(spec)?),
        "RateLimitPolicy" => Spec::RateLimitPolicy(from_value(spec)?),
        "RoutePolicy" => Spec::RoutePolicy(from_value(spec)?),
        "Service" => Spec::Service(from_value(spec)?),
        _ => Spec::Workload(from_value(spec)?),
    })
}

/// Kubernetes' own objects that say where services and workloads are.
struct Discovery {
    namespaces: Store<Namespace>,
    services: Store<KubeService>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    converted: Mutex<ConvertedServices>,
}

impl Discovery {
    fn resources(&self) -> Vec<Arc<Resource>> {
        let (namespaces, services) = (self.namespaces.state(), self.services.state());
        let (slices, pods) = (self.slices.state(), self.pods.state());
        let state = ClusterState {
            namespaces: &namespaces,
            services: &services,
            slices: &slices,
            pods: &pods,
        };
        let mut converted = self
            .converted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        workloads::resources(&state, &mut converted)
    }

    async fn ready(&self) -> Result<(), WriterDropped> {
        self.namespaces.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.pods.wait_until_ready().await
    }
}

/// Mirrors `api`'s objects into a store, sending on `changed` at every change, as long
/// as the returned task runs.
fn reflect<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    changed: &mpsc::Sender<()>,
    kind: &'static str,
    slim: fn(&mut K),
) -> (Store<K>, JoinHandle<()>)
where
    K: kube::Resource + Clone + std::fmt::Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    let events = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default())
            .backoff(retry_schedule())
            .modify(slim),
    );
    let changed = changed.clone();
    let task = tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(_) => {
                    let _ = changed.try_send(());
                }
                Err(error) => {
                    warn!(event = "watch of cluster objects failed", kind, error = %error, "retrying");
                }
            }
        }
    });
    (store, task)
}

/// How a failed watch is retried: kube-runtime's default climbs to 30 s, which would
/// leave the mesh's configuration that long behind an API server back from a restart;
/// a control plane holds about ten watches, so retrying every 2 s at most costs an API
/// server little.
fn retry_schedule() -> impl kube::runtime::utils::Backoff {
    let schedule = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times();
    // Back to the shortest delay once a watch has run for a minute.
    ResetTimerBackoff::new(ExponentialBackoff::from(schedule), Duration::from_secs(60))
}

/// A pod as discovery reads it: name, namespace, uid, service account, containers' names.
fn slim_pod(pod: &mut Pod) {
    without_managed_fields(pod);
    pod.metadata.annotations = None;
    pod.status = None;
    if let Some(spec) = &mut pod.spec {
        for container in spec
            .init_containers
            .iter_mut()
            .flatten()
            .chain(&mut spec.containers)
        {
            *container = k8s_openapi::api::core::v1::Container {
                name: std::mem::take(&mut container.name),
                ..Default::default()
            };
        }
        spec.volumes = None;
    }
}

/// What no reader of a store needs (the largest part of most objects).
fn without_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

impl ClusterObjects {
    /// Starts a watch per kind; each change sends on `changed` (a full channel already
    /// means "reload pending"). The watches run as long as the returned tasks.
    pub fn watch(client: &Client, changed: &mpsc::Sender<()>) -> (Self, Vec<JoinHandle<()>>) {
        let mut kinds = Vec::new();
        let mut tasks = Vec::new();
        for (name, resource) in watched() {
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            let (store, task) =
                reflect(api, resource.clone(), changed, name, without_managed_fields);
            kinds.push(Kind::new(name, resource, store));
            tasks.push(task);
        }
        let (namespaces, task) = reflect(
            Api::all(client.clone()),
            (),
            changed,
            "Namespace",
            without_managed_fields,
        );
        tasks.push(task);
        let (services, task) = reflect(
            Api::all(client.clone()),
            (),
            changed,
            "Service",
            without_managed_fields,
        );
        tasks.push(task);
        let (slices, task) = reflect(
            Api::all(client.clone()),
            (),
            changed,
            "EndpointSlice",
            without_managed_fields,
        );
        tasks.push(task);
        let (pods, task) = reflect(Api::all(client.clone()), (), changed, "Pod", slim_pod);
        tasks.push(task);
        let discovery = Discovery {
            namespaces,
            services,
            slices,
            pods,
            converted: Mutex::default(),
        };
        (Self::over(kinds, Some(discovery)), tasks)
    }

    fn over(kinds: Vec<Kind>, discovery: Option<Discovery>) -> Self {
        Self {
            kinds,
            discovery,
            accepted: Mutex::default(),
            reported: Mutex::default(),
            verdicts: watch::Sender::new(Vec::new()),
        }
    }

    /// Waits until every kind has been listed once: before that, a snapshot would lack
    /// policies that are in force (a DENY among them).
    pub async fn ready(&self) -> anyhow::Result<()> {
        for kind in &self.kinds {
            kind.store
                .wait_until_ready()
                .await
                .map_err(|_| anyhow::anyhow!("the watch of {} ended", kind.name))?;
        }
        if let Some(discovery) = &self.discovery {
            discovery
                .ready()
                .await
                .map_err(|_| anyhow::anyhow!("a watch of Services or their workloads ended"))?;
        }
        Ok(())
    }

    /// Every object as a snapshot candidate, in a stable order: Kubernetes' Services and
    /// their workloads, then the `tessera.dev` objects by kind, namespace and name.
    pub fn candidates(&self) -> Vec<Candidate> {
        let accepted = self.accepted.lock().unwrap_or_else(PoisonError::into_inner);
        let mut candidates: Vec<Candidate> = self
            .discovery
            .as_ref()
            .map(Discovery::resources)
            .unwrap_or_default()
            .into_iter()
            .map(|resource| {
                let key = resource.origin.to_string();
                Candidate {
                    accepted: accepted.get(&key).cloned(),
                    key,
                    origin: resource.origin.clone(),
                    current: Ok(resource),
                    subject: None,
                }
            })
            .collect();
        for kind in &self.kinds {
            candidates.extend(kind.candidates().into_iter().map(|candidate| Candidate {
                accepted: accepted.get(&candidate.key).cloned(),
                ..candidate
            }));
        }
        candidates
    }

    /// Takes note of what a snapshot took: the versions in force become the ones a later
    /// bad version falls back to, each new refusal is logged once, and the `tessera.dev`
    /// objects' verdicts go to [`Self::verdicts`].
    pub fn settle(&self, candidates: &[Candidate], outcome: &Accepted) {
        *self.accepted.lock().unwrap_or_else(PoisonError::into_inner) = outcome
            .in_force
            .iter()
            .map(|(key, resource)| (key.clone(), resource.clone()))
            .collect();
        let mut reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
        for candidate in candidates {
            let Some(refusal) = outcome.refused.get(&candidate.key) else {
                continue;
            };
            if reported.get(&candidate.key) != Some(refusal) {
                warn!(
                    event = "cluster object refused",
                    object = %candidate.origin,
                    error = %refusal,
                    kept = if outcome.in_force.contains_key(&candidate.key) { "its last accepted version" } else { "nothing" },
                );
            }
        }
        // One entry per refused live object, however often a bad one is edited.
        *reported = outcome.refused.clone().into_iter().collect();
        let verdicts: Vec<Verdict> = candidates
            .iter()
            .filter_map(|candidate| {
                Some(Verdict {
                    subject: candidate.subject.clone()?,
                    refusal: outcome.refused.get(&candidate.key).cloned(),
                })
            })
            .collect();
        self.verdicts.send_if_modified(|current| {
            let changed = *current != verdicts;
            *current = verdicts;
            changed
        });
    }

    /// The verdicts of the last snapshot on the `tessera.dev` objects, for their status.
    pub fn verdicts(&self) -> watch::Receiver<Vec<Verdict>> {
        self.verdicts.subscribe()
    }
}

/// A `tessera.dev` object as a candidate: its current version, if it can be read.
fn candidate(kind: &Kind, object: &DynamicObject) -> Candidate {
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    let uid = object.uid().unwrap_or_default();
    let origin = Origin {
        // Kind and group: a Service object is not Kubernetes' Service of the same name.
        file: PathBuf::from(format!("{}.{} {namespace}/{name}", kind.name, crds::GROUP)),
        line: 0,
    };
    let spec = object.data.get("spec").cloned().unwrap_or_default();
    let spec = match spec {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        spec => spec,
    };
    let current = to_spec(kind.name, spec)
        .map(|spec| {
            Arc::new(Resource {
                origin: origin.clone(),
                metadata: Metadata {
                    name: name.clone(),
                    namespace: Some(namespace.clone()),
                    labels: object.labels().clone(),
                    annotations: Default::default(),
                },
                spec,
            })
        })
        .map_err(|error| format!("cannot be read: {error}"));
    Candidate {
        key: uid.clone(),
        origin,
        current,
        accepted: None,
        subject: Some(Subject {
            resource: kind.resource.clone(),
            namespace,
            name,
            uid,
            generation: object.metadata.generation,
            condition: Subject::condition_of(object),
        }),
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;
    use serde_json::json;
    use tessera_mesh::snapshot::MeshSnapshot;

    use super::*;
    use crate::kubernetes::acceptance;

    fn policy(uid: &str, version: &str, spec: serde_json::Value) -> DynamicObject {
        let name = format!("policy-{uid}");
        let mut object = DynamicObject::new(&name, &crds::AuthorizationPolicy::api_resource())
            .within("shop")
            .data(json!({ "spec": spec }));
        object.metadata.uid = Some(uid.to_string());
        object.metadata.resource_version = Some(version.to_string());
        object
    }

    fn objects() -> (ClusterObjects, Writer<DynamicObject>) {
        let resource = crds::AuthorizationPolicy::api_resource();
        let writer = Writer::new(resource.clone());
        let kind = Kind::new("AuthorizationPolicy", resource, writer.as_reader());
        (ClusterObjects::over(vec![kind], None), writer)
    }

    /// Loads the objects as the loader does; the actions of the policies in force.
    fn actions(objects: &ClusterObjects) -> Vec<String> {
        let candidates = objects.candidates();
        let accepted = acceptance::accept(&[], &candidates, |resources| {
            MeshSnapshot::from_resources("cluster.local", resources)
        })
        .unwrap();
        objects.settle(&candidates, &accepted);
        accepted
            .snapshot
            .authorization_policies
            .iter()
            .map(|policy| format!("{:?}", policy.spec.action))
            .collect()
    }

    /// Every watched kind reads as its file-mode spec; a RateLimitPolicy's fields are
    /// the file's.
    #[test]
    fn a_rate_limit_policy_object_reads_as_the_file_kind() {
        assert!(watched().iter().any(|(kind, _)| *kind == "RateLimitPolicy"));
        let spec = json!({
            "selector": {"serviceAccount": "orders"},
            "limits": [{"name": "per-caller", "match": {"pathPrefix": "/api"},
                        "rate": 60, "per": "1m", "key": "identity"}]
        });
        let Ok(Spec::RateLimitPolicy(spec)) = to_spec("RateLimitPolicy", spec) else {
            panic!("not read as a RateLimitPolicy");
        };
        let limit = &spec.limits[0];
        assert_eq!(limit.per, Some(std::time::Duration::from_secs(60)));
        assert_eq!(limit.key, tessera_mesh::rate_limit::LimitKeySpec::Identity);
        assert!(to_spec("RateLimitPolicy", json!({"limits": [{"burst": -1}]})).is_err());
    }

    #[test]
    fn objects_become_candidates_named_by_kind_group_namespace_and_name() {
        let (objects, mut writer) = objects();
        writer.apply_watcher_event(&Event::Apply(policy(
            "u1",
            "1",
            json!({ "action": "DENY" }),
        )));
        let candidates = objects.candidates();
        assert_eq!(candidates.len(), 1);
        let resource = candidates[0].current.as_ref().unwrap();
        assert_eq!(
            resource.origin.to_string(),
            "AuthorizationPolicy.tessera.dev shop/policy-u1"
        );
        assert_eq!(resource.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(candidates[0].key, "u1");
        assert_eq!(actions(&objects), ["Deny"]);
    }

    /// The policy of each candidate, by key.
    fn currents(objects: &ClusterObjects) -> Vec<(String, Arc<Resource>)> {
        let candidates = objects.candidates();
        let current = |c: Candidate| Some((c.key, c.current.ok()?));
        candidates.into_iter().filter_map(current).collect()
    }

    /// An object at the version last read is not read again: its resource is the same
    /// one. An edited one, or one deleted and created again under the same name (a new
    /// uid, whatever its resourceVersion), is read again; a deleted one is forgotten.
    #[test]
    fn objects_are_read_again_only_when_their_uid_or_version_changed() {
        let (objects, mut writer) = objects();
        let deny = policy("u1", "1", json!({ "action": "DENY" }));
        writer.apply_watcher_event(&Event::Apply(deny));
        writer.apply_watcher_event(&Event::Apply(policy("u2", "1", json!({}))));
        let first = currents(&objects);
        assert!(Arc::ptr_eq(&first[0].1, &currents(&objects)[0].1));
        let audit = policy("u1", "2", json!({ "action": "AUDIT" }));
        writer.apply_watcher_event(&Event::Apply(audit));
        let edited = currents(&objects);
        assert!(!Arc::ptr_eq(&first[0].1, &edited[0].1));
        assert!(Arc::ptr_eq(&first[1].1, &edited[1].1), "the other is kept");
        assert_eq!(actions(&objects), ["Audit", "Allow"]);
        let mut recreated = policy("u1", "2", json!({ "action": "DENY" }));
        recreated.metadata.uid = Some("u3".into());
        writer.apply_watcher_event(&Event::Apply(recreated));
        assert_eq!(actions(&objects), ["Deny", "Allow"]);
        writer.apply_watcher_event(&Event::Delete(policy("u2", "1", json!({}))));
        assert_eq!(actions(&objects), ["Deny"]);
        assert_eq!(objects.kinds[0].converted.lock().unwrap().kept(), 1);
    }

    /// A version the control plane cannot read keeps the last accepted one in force: a
    /// DENY policy is not lifted by a bad edit. The object's verdict says why.
    #[test]
    fn an_unreadable_version_keeps_the_last_accepted_one() {
        let (objects, mut writer) = objects();
        writer.apply_watcher_event(&Event::Apply(policy(
            "u1",
            "1",
            json!({ "action": "DENY" }),
        )));
        assert_eq!(actions(&objects), ["Deny"]);
        assert_eq!(objects.verdicts().borrow()[0].refusal, None);
        let unreadable = json!({ "action": "DENY", "rules": "all of them" });
        writer.apply_watcher_event(&Event::Apply(policy("u1", "2", unreadable.clone())));
        assert_eq!(actions(&objects), ["Deny"]);
        let refusal = objects.verdicts().borrow()[0].refusal.clone().unwrap();
        assert!(refusal.starts_with("cannot be read: "), "{refusal}");
        writer.apply_watcher_event(&Event::Apply(policy(
            "u1",
            "3",
            json!({ "action": "AUDIT" }),
        )));
        assert_eq!(actions(&objects), ["Audit"]);
        // Never readable: nothing of it is in force, and nothing else is lost.
        writer.apply_watcher_event(&Event::Apply(policy("u2", "1", unreadable)));
        assert_eq!(actions(&objects), ["Audit"]);
    }

    /// A caller editing a bad object over and over costs one entry, not one per edit.
    #[test]
    fn refusals_are_remembered_once_per_object() {
        let (objects, mut writer) = objects();
        for version in 1..=50 {
            let bad = policy("u1", &version.to_string(), json!({ "rules": "all" }));
            writer.apply_watcher_event(&Event::Apply(bad));
            assert!(actions(&objects).is_empty());
        }
        assert_eq!(objects.reported.lock().unwrap().len(), 1);
        writer.apply_watcher_event(&Event::Delete(policy("u1", "51", json!({}))));
        actions(&objects);
        assert!(objects.reported.lock().unwrap().is_empty());
    }

    #[test]
    fn a_deleted_object_leaves_nothing_behind() {
        let (objects, mut writer) = objects();
        let object = policy("u1", "1", json!({ "action": "DENY" }));
        writer.apply_watcher_event(&Event::Apply(object.clone()));
        assert_eq!(actions(&objects), ["Deny"]);
        writer.apply_watcher_event(&Event::Delete(object));
        assert!(actions(&objects).is_empty());
        assert!(objects.accepted.lock().unwrap().is_empty());
        assert!(objects.verdicts().borrow().is_empty());
    }

    /// The verdict carries what status needs: the generation judged and the condition the
    /// object already shows.
    #[test]
    fn verdicts_name_the_generation_judged_and_the_condition_shown() {
        let (objects, mut writer) = objects();
        let mut object = policy("u1", "1", json!({ "action": "DENY" }));
        object.metadata.generation = Some(4);
        object.data["status"] = json!({ "conditions": [{ "type": "Accepted", "status": "True",
            "reason": "Accepted", "message": "in force", "observedGeneration": 3,
            "lastTransitionTime": "2026-12-04T00:00:00Z" }] });
        writer.apply_watcher_event(&Event::Apply(object));
        actions(&objects);
        let verdicts = objects.verdicts().borrow().clone();
        let subject = &verdicts[0].subject;
        assert_eq!(
            (subject.name.as_str(), subject.generation),
            ("policy-u1", Some(4))
        );
        assert_eq!(
            subject.condition.as_ref().unwrap().observed_generation,
            Some(3)
        );
    }
}
