//! Which version of each cluster object a snapshot takes.
//!
//! All current versions when the whole checks out (the common case: one build). Else the
//! object the checks blame is set back to its last accepted version, or left out when it
//! has none, and the build is tried again: one bad object neither freezes every other
//! change nor takes down what was in force (a DENY policy stays enforced through a bad
//! edit). Each object is set back at most twice, so the builds are bounded.
//!
//! While isolating, the objects already in force come first: the checks between
//! resources (an address or a name claimed twice) blame the later one, so a newcomer is
//! refused rather than the object it collides with. Whether a set builds does not depend
//! on its order, so the snapshot is then built in the usual order, the one every other
//! load uses, and an unchanged set never differs from the one published.

use std::collections::BTreeMap;
use std::sync::Arc;

use tessera_mesh::resources::{ConfigError, Origin, Resource};
use tessera_mesh::snapshot::MeshSnapshot;

use super::status::Subject;

/// One cluster object offered to a snapshot. Its versions are shared, not copied: a
/// load offers every object in the cluster, and most are the versions already in force.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Identifies the object across versions (its uid; the origin for derived resources).
    pub key: String,
    /// Where it comes from, for messages.
    pub origin: Origin,
    /// Its current version, or why it cannot be read at all.
    pub current: Result<Arc<Resource>, String>,
    /// Its version in the last snapshot built, if any.
    pub accepted: Option<Arc<Resource>>,
    /// A `tessera.dev` object's status to report on; none for derived resources.
    pub subject: Option<Subject>,
}

/// A snapshot and the version of each object it took.
#[derive(Debug)]
pub struct Accepted {
    pub snapshot: MeshSnapshot,
    /// Per key: the version in force, when one is.
    pub in_force: BTreeMap<String, Arc<Resource>>,
    /// Per key: why its current version is not in force.
    pub refused: BTreeMap<String, String>,
}

/// Builds a snapshot of `files` and `candidates` (in that order) with `build`. An error
/// that blames a file, or that persists with every cluster object set back, refuses the
/// whole load as before cluster mode.
pub fn accept(
    files: &[Resource],
    candidates: &[Candidate],
    build: impl Fn(&[&Resource]) -> Result<MeshSnapshot, ConfigError>,
) -> Result<Accepted, ConfigError> {
    let mut refused = BTreeMap::new();
    let mut chosen: Vec<Option<Arc<Resource>>> = candidates
        .iter()
        .map(|candidate| match &candidate.current {
            Ok(current) => Some(current.clone()),
            Err(reason) => {
                refused.insert(candidate.key.clone(), reason.clone());
                candidate.accepted.clone()
            }
        })
        .collect();
    if let Ok(snapshot) = build(&in_order(files, &chosen, |_| true)) {
        return Ok(settled(snapshot, candidates, chosen, refused));
    }
    for _ in 0..=2 * candidates.len() {
        let in_force_first = |index: usize| chosen[index] == candidates[index].accepted;
        let mut prioritized = in_order(files, &chosen, in_force_first);
        prioritized.extend(in_order(&[], &chosen, |index| !in_force_first(index)));
        let error = match build(&prioritized) {
            Ok(_) => {
                let snapshot = build(&in_order(files, &chosen, |_| true))?;
                return Ok(settled(snapshot, candidates, chosen, refused));
            }
            Err(error) => error,
        };
        let blamed = chosen
            .iter()
            .position(|version| version.as_ref().is_some_and(|r| r.origin == error.origin));
        let Some(index) = blamed else {
            return Err(error);
        };
        let candidate = &candidates[index];
        refused.entry(candidate.key.clone()).or_insert(error.reason);
        chosen[index] = candidate
            .accepted
            .clone()
            .filter(|accepted| chosen[index].as_ref() != Some(accepted));
    }
    // Unreachable: each round sets one object back, at most twice each.
    build(&in_order(files, &chosen, |_| true))
        .map(|snapshot| settled(snapshot, candidates, chosen, refused))
}

/// `files`, then the chosen versions of the candidates `include` takes, in their order.
fn in_order<'a>(
    files: &'a [Resource],
    chosen: &'a [Option<Arc<Resource>>],
    include: impl Fn(usize) -> bool,
) -> Vec<&'a Resource> {
    let cluster = chosen
        .iter()
        .enumerate()
        .filter(|(index, _)| include(*index))
        .filter_map(|(_, version)| version.as_deref());
    files.iter().chain(cluster).collect()
}

fn settled(
    snapshot: MeshSnapshot,
    candidates: &[Candidate],
    chosen: Vec<Option<Arc<Resource>>>,
    refused: BTreeMap<String, String>,
) -> Accepted {
    let in_force = candidates
        .iter()
        .zip(chosen)
        .filter_map(|(candidate, version)| Some((candidate.key.clone(), version?)))
        .collect();
    Accepted {
        snapshot,
        in_force,
        refused,
    }
}

#[cfg(test)]
mod tests {
    use tessera_mesh::resources::parse_file;

    use super::*;

    const TRUST_DOMAIN: &str = "cluster.local";

    fn build(resources: &[&Resource]) -> Result<MeshSnapshot, ConfigError> {
        MeshSnapshot::from_resources(TRUST_DOMAIN, resources)
    }

    /// One resource from YAML, its origin `name` (as a cluster object's).
    fn resource(name: &str, yaml: &str) -> Resource {
        let mut resources = parse_file(std::path::Path::new(name), yaml).unwrap();
        let mut resource = resources.remove(0);
        resource.origin.line = 0;
        resource
    }

    fn service(name: &str, address: &str) -> Resource {
        resource(
            name,
            &format!(
                "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{addresses: [{address}], ports: [{{port: 80, protocol: http}}]}}\n"
            ),
        )
    }

    fn workload(name: &str, service: &str) -> Resource {
        resource(
            name,
            &format!(
                "apiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{service: {service}, address: '10.0.0.9:8080', serviceAccount: {name}}}\n"
            ),
        )
    }

    fn candidate(key: &str, current: Resource, accepted: Option<Resource>) -> Candidate {
        Candidate {
            key: key.into(),
            origin: current.origin.clone(),
            current: Ok(Arc::new(current)),
            accepted: accepted.map(Arc::new),
            subject: None,
        }
    }

    fn services(accepted: &Accepted) -> Vec<String> {
        accepted
            .snapshot
            .services
            .iter()
            .map(|s| format!("{} {:?}", s.name, s.addresses))
            .collect()
    }

    #[test]
    fn a_set_that_checks_out_is_taken_whole() {
        let orders = service("orders", "10.96.0.1");
        let accepted = accept(&[], &[candidate("u1", orders, None)], build).unwrap();
        assert_eq!(services(&accepted), ["orders [10.96.0.1]"]);
        assert!(accepted.refused.is_empty());
        assert_eq!(accepted.in_force.keys().collect::<Vec<_>>(), ["u1"]);
    }

    /// The versions in force are the candidates' own, shared rather than copied.
    #[test]
    fn the_versions_in_force_are_shared_with_the_candidates() {
        let candidates = [candidate("u1", service("orders", "10.96.0.1"), None)];
        let accepted = accept(&[], &candidates, build).unwrap();
        let current = candidates[0].current.as_ref().unwrap();
        assert!(Arc::ptr_eq(&accepted.in_force["u1"], current));
    }

    /// A newcomer claiming an address in force is refused, whatever the order of the two:
    /// the object in force keeps it, and the other changes of the same load still apply.
    #[test]
    fn a_newcomer_colliding_with_an_object_in_force_is_the_one_refused() {
        let orders = service("orders", "10.96.0.1");
        let intruder = service("aardvark", "10.96.0.1");
        let payments = service("payments", "10.96.0.2");
        let candidates = [
            candidate("u0", intruder, None),
            candidate("u1", orders.clone(), Some(orders)),
            candidate("u2", payments, None),
        ];
        let accepted = accept(&[], &candidates, build).unwrap();
        assert_eq!(
            services(&accepted),
            ["orders [10.96.0.1]", "payments [10.96.0.2]"]
        );
        assert_eq!(accepted.refused.keys().collect::<Vec<_>>(), ["u0"]);
        assert!(
            accepted.refused["u0"].contains("already belongs to orders.shop"),
            "{:?}",
            accepted.refused
        );
        assert!(!accepted.in_force.contains_key("u0"));
    }

    /// A bad edit of an object in force leaves its last accepted version in force.
    #[test]
    fn a_bad_edit_keeps_the_accepted_version() {
        let orders = service("orders", "10.96.0.1");
        let payments = service("payments", "10.96.0.2");
        let worker = workload("worker", "orders");
        let edited = workload("worker", "nowhere");
        let candidates = [
            candidate("s1", orders.clone(), Some(orders)),
            candidate("s2", payments.clone(), Some(payments)),
            candidate("w1", edited, Some(worker.clone())),
        ];
        let accepted = accept(&[], &candidates, build).unwrap();
        assert_eq!(*accepted.in_force["w1"], worker);
        assert!(
            accepted.refused["w1"].contains("nowhere"),
            "{:?}",
            accepted.refused
        );
        assert_eq!(accepted.snapshot.services[0].endpoints.len(), 1);
    }

    /// An object in force that a deletion made unusable (its service gone) is left out,
    /// and said so; the rest stays.
    #[test]
    fn an_object_in_force_that_no_longer_checks_out_is_left_out() {
        let payments = service("payments", "10.96.0.2");
        let worker = workload("worker", "orders");
        let candidates = [
            candidate("s2", payments.clone(), Some(payments)),
            candidate("w1", worker.clone(), Some(worker)),
        ];
        let accepted = accept(&[], &candidates, build).unwrap();
        assert_eq!(services(&accepted), ["payments [10.96.0.2]"]);
        assert!(accepted.refused["w1"].contains("orders.shop, which is not defined"));
        assert!(!accepted.in_force.contains_key("w1"));
    }

    #[test]
    fn an_unreadable_object_keeps_its_accepted_version_and_its_reason() {
        let orders = service("orders", "10.96.0.1");
        let candidates = [Candidate {
            key: "u1".into(),
            origin: orders.origin.clone(),
            current: Err("spec.ports: invalid type".into()),
            accepted: Some(Arc::new(orders.clone())),
            subject: None,
        }];
        let accepted = accept(&[], &candidates, build).unwrap();
        assert_eq!(*accepted.in_force["u1"], orders);
        assert_eq!(accepted.refused["u1"], "spec.ports: invalid type");
    }

    /// What a file gets wrong refuses the whole load, as without cluster mode.
    #[test]
    fn an_error_in_a_file_refuses_the_load() {
        let file = workload("from-a-file", "nowhere");
        let orders = service("orders", "10.96.0.1");
        let error = accept(&[file], &[candidate("u1", orders, None)], build).unwrap_err();
        assert!(error.to_string().contains("from-a-file"), "{error}");
    }

    /// A load where every object is bad is bounded: each is set back at most twice.
    #[test]
    fn many_bad_objects_are_each_refused_in_a_bounded_number_of_builds() {
        let builds = std::cell::Cell::new(0);
        let counting = |resources: &[&Resource]| {
            builds.set(builds.get() + 1);
            build(resources)
        };
        let candidates: Vec<_> = (0..50)
            .map(|i| {
                let name = format!("w{i}");
                let accepted = workload(&name, "gone");
                candidate(&name, workload(&name, "nowhere"), Some(accepted))
            })
            .collect();
        let accepted = accept(&[], &candidates, counting).unwrap();
        assert_eq!(accepted.refused.len(), 50);
        assert!(accepted.in_force.is_empty());
        assert!(builds.get() <= 2 * 50 + 3, "{} builds", builds.get());
    }
}
