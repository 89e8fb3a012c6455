//! Checking a rate limit allocates nothing: not for a known caller, not for a new one
//! taking a slot, not for a refusal once its counter exists. An integration test of its
//! own because it needs a counting global allocator.

use std::collections::BTreeMap;
use std::path::Path;

use http::{HeaderMap, HeaderValue};
use tessera_mesh::SpiffeId;
use tessera_mesh::policy::{Named, WorkloadRef};
use tessera_mesh::resources::{Spec, parse_file};
use tessera_proxy::inbound::rate_limit::{Caller, RateLimiters};
use tessera_proxy::telemetry::Metrics;

mod common;

use common::allocations;

const POLICY: &str = "apiVersion: tessera.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: api, namespace: shop}
spec:
  limits:
  - {name: per-tenant, key: header, header: x-tenant, requestsPerSecond: 1, burst: 1}
  - {name: per-caller, key: identity, requestsPerSecond: 1, burst: 1}
  - {name: total, match: {methods: [GET], pathPrefix: /api}, requestsPerSecond: 1, burst: 1}
";

#[test]
fn checking_a_limit_allocates_nothing() {
    let policies: Vec<_> = parse_file(Path::new("limits.yaml"), POLICY)
        .expect("a valid policy")
        .into_iter()
        .map(|resource| match resource.spec {
            Spec::RateLimitPolicy(spec) => Named {
                name: resource.metadata.name,
                namespace: "shop".to_string(),
                spec,
            },
            _ => unreachable!("rate limit policies only"),
        })
        .collect();
    let orders: SpiffeId = "spiffe://cluster.local/ns/shop/sa/orders".parse().unwrap();
    let labels = BTreeMap::new();
    let workload = WorkloadRef {
        namespace: orders.namespace(),
        service_account: orders.service_account(),
        labels: &labels,
    };
    let limits = RateLimiters::new(&orders).resolve(&policies, workload, 8080);
    let metrics = Metrics::new();
    let callers: Vec<SpiffeId> = (0..64)
        .map(|i| {
            format!("spiffe://cluster.local/ns/shop/sa/caller-{i}")
                .parse()
                .unwrap()
        })
        .collect();
    let tenants: Vec<HeaderMap> = (0..1000)
        .map(|i| {
            let mut headers = HeaderMap::new();
            headers.insert("x-tenant", HeaderValue::from_str(&format!("t{i}")).unwrap());
            headers
        })
        .collect();
    let check = |identity, headers| {
        let caller = Caller {
            identity: Some(identity),
            headers: Some(headers),
        };
        limits
            .check_request(8080, "GET", "/api/orders", &caller, &metrics)
            .is_ok()
    };
    // Each limit's first refusal looks its counter up (hashing, allocating).
    assert!(check(&callers[0], &tenants[0]));
    assert!(!check(&callers[0], &tenants[0]), "per-tenant refuses");
    assert!(!check(&callers[0], &tenants[1]), "per-caller refuses");
    assert!(!check(&callers[1], &tenants[2]), "total refuses");
    let before = allocations();
    let mut admitted = 0;
    for round in 0..10 {
        for (i, headers) in tenants.iter().enumerate() {
            admitted += usize::from(check(&callers[(i + round) % callers.len()], headers));
        }
    }
    assert_eq!(allocations() - before, 0, "a check allocated");
    assert!(admitted <= 1, "one total token at most: {admitted}");
    assert!(metrics.encode().contains("limit=\"per-tenant\"}"));
}
